//! The manifests of deploy/kubernetes/, checked without a cluster: every document is an object
//! of a kind we ship, with no field its API type lacks (kubectl's strict validation would refuse
//! it); the objects name each other; the agent gets what it needs from the host and no more; and
//! every flag the DaemonSet passes exists in the agent's `run --help`.

use std::{
    collections::BTreeSet, ffi::OsStr, fs, net::SocketAddr, path::PathBuf, process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, ServiceAccount, VolumeMount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_tests::{Lab, pod_of, workspace_root};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The objects of deploy/kubernetes/, by kind.
#[derive(Default)]
struct Manifests {
    daemon_sets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
}

impl Manifests {
    /// Every document of every file, or a panic naming the file and the document (from 1).
    fn load() -> Self {
        let dir = workspace_root().join("deploy/kubernetes");
        let mut files: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("a directory entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no manifests in {}", dir.display());
        let mut manifests = Self::default();
        for file in &files {
            let text =
                fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
                let at = format!("{}, document {}", file.display(), index + 1);
                let value = Value::deserialize(document).unwrap_or_else(|e| panic!("{at}: {e}"));
                match value
                    .get("kind")
                    .and_then(Value::as_str)
                    .unwrap_or("(none)")
                {
                    "DaemonSet" => manifests.daemon_sets.push(typed(&value, &at)),
                    "ServiceAccount" => manifests.service_accounts.push(typed(&value, &at)),
                    "ClusterRole" => manifests.cluster_roles.push(typed(&value, &at)),
                    "ClusterRoleBinding" => manifests.bindings.push(typed(&value, &at)),
                    kind => panic!("{at}: kind {kind} is none of those we ship"),
                }
            }
        }
        manifests
    }

    fn daemon_set(&self) -> &DaemonSet {
        only(&self.daemon_sets, "DaemonSet")
    }
}

/// `value` as the API type `T`, which also checks its apiVersion, with every field read: a field
/// `T` lacks (a typo, a field of another version) would otherwise be dropped without a word.
fn typed<T: DeserializeOwned + Serialize>(value: &Value, at: &str) -> T {
    let object: T = serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{at}: {e}"));
    let read = serde_json::to_value(&object).expect("an API object serializes");
    let unknown = unread_fields(value, &read, "");
    assert!(
        unknown.is_empty(),
        "{at}: fields the API does not have: {}",
        unknown.join(", ")
    );
    object
}

/// The paths of the fields of `written` that `read` lacks.
fn unread_fields(written: &Value, read: &Value, path: &str) -> Vec<String> {
    match (written, read) {
        (Value::Object(written), Value::Object(read)) => written
            .iter()
            .flat_map(|(key, value)| {
                let path = format!("{path}.{key}");
                match read.get(key) {
                    Some(read) => unread_fields(value, read, &path),
                    None => vec![path],
                }
            })
            .collect(),
        (Value::Array(written), Value::Array(read)) => written
            .iter()
            .zip(read)
            .enumerate()
            .flat_map(|(i, (written, read))| unread_fields(written, read, &format!("{path}[{i}]")))
            .collect(),
        _ => Vec::new(),
    }
}

/// The one object of a kind: the checks below relate them one to one.
fn only<'a, T>(objects: &'a [T], kind: &str) -> &'a T {
    assert_eq!(objects.len(), 1, "one {kind} in deploy/kubernetes/");
    &objects[0]
}

fn pod(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("the DaemonSet has a pod template")
}

/// The agent: the pod's only container.
fn agent(pod: &PodSpec) -> &Container {
    assert_eq!(
        pod.containers.len(),
        1,
        "the agent is the pod's only container"
    );
    &pod.containers[0]
}

/// The agent's flags: its arguments after `run`, each `--name` or `--name=value`.
fn run_flags(agent: &Container) -> &[String] {
    assert!(
        agent.command.is_none(),
        "the image's entrypoint, lb-user, runs"
    );
    let args = agent.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    let flags = &args[1..];
    assert!(
        flags.iter().all(|flag| flag.starts_with("--")),
        "values joined to their flags with `=`: {flags:?}"
    );
    flags
}

/// The value of `--name=value` among `flags`.
fn flag<'a>(flags: &'a [String], name: &str) -> &'a str {
    flags
        .iter()
        .find_map(|flag| {
            flag.strip_prefix("--")?
                .strip_prefix(name)?
                .strip_prefix('=')
        })
        .unwrap_or_else(|| panic!("no --{name}=... in {flags:?}"))
}

/// The host path mounted at `path` in `container`, and the mount.
fn host_mount<'a>(
    pod: &'a PodSpec,
    container: &'a Container,
    path: &str,
) -> (&'a str, &'a VolumeMount) {
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| mount.mount_path == path)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {path}", container.name));
    let host = pod
        .volumes
        .iter()
        .flatten()
        .find(|volume| volume.name == mount.name)
        .and_then(|volume| volume.host_path.as_ref())
        .unwrap_or_else(|| panic!("{}: {path} is not a host path", container.name));
    (&host.path, mount)
}

/// `port` as a number: itself, or the number of `container`'s port of that name.
fn port_number(container: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(number) => *number,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|port| port.name.as_ref() == Some(name))
                .unwrap_or_else(|| panic!("{}: no port named {name}", container.name))
                .container_port
        }
    }
}

#[test]
fn the_objects_name_each_other() {
    let manifests = Manifests::load();
    let daemon_set = manifests.daemon_set();
    let account = only(&manifests.service_accounts, "ServiceAccount");
    let role = only(&manifests.cluster_roles, "ClusterRole");
    let binding = only(&manifests.bindings, "ClusterRoleBinding");
    let namespace = daemon_set.metadata.namespace.as_deref();

    let spec = daemon_set.spec.as_ref().expect("a DaemonSet spec");
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|meta| meta.labels.as_ref());
    for (key, value) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            labels.and_then(|labels| labels.get(key)),
            Some(value),
            "the selector's {key} is on the pods"
        );
    }
    assert_eq!(
        account.metadata.namespace.as_deref(),
        namespace,
        "the ServiceAccount is in the DaemonSet's namespace"
    );
    assert_eq!(
        pod(daemon_set).service_account_name,
        account.metadata.name,
        "the pods run as the ServiceAccount"
    );
    let role_ref = &binding.role_ref;
    assert_eq!(
        (
            role_ref.api_group.as_str(),
            role_ref.kind.as_str(),
            Some(&role_ref.name)
        ),
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            role.metadata.name.as_ref()
        ),
        "the binding grants the ClusterRole"
    );
    let subjects: Vec<_> = binding
        .subjects
        .iter()
        .flatten()
        .map(|subject| {
            (
                subject.kind.as_str(),
                Some(&subject.name),
                subject.namespace.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        subjects,
        [("ServiceAccount", account.metadata.name.as_ref(), namespace)],
        "the binding grants it to the ServiceAccount alone"
    );
}

#[test]
fn the_cluster_role_only_reads_services_endpointslices_and_nodes() {
    let manifests = Manifests::load();
    let role = only(&manifests.cluster_roles, "ClusterRole");
    assert!(role.aggregation_rule.is_none(), "no rules aggregated in");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.as_str(), resource.as_str(), verb.as_str()));
                }
            }
        }
    }
    let wanted: BTreeSet<_> = [
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
    ]
    .into_iter()
    .flat_map(|(group, resource)| ["get", "list", "watch"].map(|verb| (group, resource, verb)))
    .collect();
    assert_eq!(granted, wanted);
}

#[test]
fn the_agent_pod_is_wired_to_the_host() {
    let manifests = Manifests::load();
    let pod = pod(manifests.daemon_set());
    let agent = agent(pod);
    let flags = run_flags(agent);
    assert_eq!(
        pod.host_network,
        Some(true),
        "the agent programs the node's own network"
    );

    let volumes: BTreeSet<&str> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for container in pod.init_containers.iter().flatten().chain(&pod.containers) {
        for mount in container.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains(mount.name.as_str()),
                "{} mounts {}, which is no volume of the pod",
                container.name,
                mount.name
            );
        }
    }

    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|var| var.name == "NODE_NAME")
        .and_then(|var| var.value_from.as_ref()?.field_ref.as_ref());
    assert_eq!(
        node_name.map(|field| field.field_path.as_str()),
        Some("spec.nodeName"),
        "NODE_NAME is the pod's node"
    );

    let health: SocketAddr = flag(flags, "healthz-bind-address")
        .parse()
        .expect("an address");
    let status_port = i32::from(health.port());
    let metrics: SocketAddr = flag(flags, "metrics-address").parse().expect("an address");
    assert!(
        metrics.ip().is_loopback(),
        "metrics name every Service: not for every pod to read"
    );
    for (name, probe) in [
        ("liveness", &agent.liveness_probe),
        ("readiness", &agent.readiness_probe),
    ] {
        let get = probe
            .as_ref()
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap_or_else(|| panic!("no HTTP {name} probe"));
        assert_eq!(
            port_number(agent, &get.port),
            status_port,
            "the {name} probe's port"
        );
    }
    assert_eq!(
        port_number(agent, &IntOrString::String("healthz".into())),
        status_port,
        "the health port"
    );

    // Pins must outlive the pod: the host's bpffs, which a privileged init container mounts
    // there if need be, and the agent sees it.
    let (host, bpffs) = host_mount(pod, agent, flag(flags, "bpffs"));
    assert_eq!(host, "/sys/fs/bpf");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    assert!(
        pod.init_containers.iter().flatten().any(|init| {
            init.security_context.as_ref().and_then(|s| s.privileged) == Some(true)
                && init.volume_mounts.iter().flatten().any(|mount| {
                    mount.name == bpffs.name
                        && mount.mount_propagation.as_deref() == Some("Bidirectional")
                })
        }),
        "an init container mounts bpffs on the host"
    );
    let (host, _) = host_mount(pod, agent, flag(flags, "cgroup"));
    assert_eq!(
        host, "/sys/fs/cgroup",
        "the socket hooks attach to the host's cgroup root"
    );
    let (host, sysctls) = host_mount(pod, agent, &format!("{}/net", flag(flags, "sysctl-dir")));
    assert_eq!(host, "/proc/sys/net", "accept_local is the host's");
    assert_ne!(sysctls.read_only, Some(true), "the agent writes sysctls");
}

#[test]
fn the_agent_is_not_privileged() {
    let manifests = Manifests::load();
    let agent = agent(pod(manifests.daemon_set()));
    let security = agent.security_context.as_ref().expect("a securityContext");
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_string()]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    // Why each, and why not CAP_SYS_ADMIN: deploy/README.md.
    assert_eq!(added, BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]));
}

/// The capabilities the DaemonSet's agent container adds to none.
fn container_capabilities() -> Vec<String> {
    let manifests = Manifests::load();
    let agent = agent(pod(manifests.daemon_set()));
    let capabilities = agent
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_string()]));
    capabilities.add.clone().unwrap_or_default()
}

/// `setpriv` giving the agent `capabilities` alone, as a container runtime gives them: the
/// bounding, inheritable and ambient sets (and so, for root, the permitted and effective).
fn setpriv(capabilities: &[String]) -> Vec<String> {
    let set: String = std::iter::once("-all".to_string())
        .chain(
            capabilities
                .iter()
                .map(|c| format!("+{}", c.to_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    [
        "setpriv",
        "--bounding-set",
        &set,
        "--inh-caps",
        &set,
        "--ambient-caps",
        &set,
        "--",
    ]
    .map(String::from)
    .to_vec()
}

/// The capability bits of `capabilities` (`NET_ADMIN`, ...), as `/proc/PID/status` shows them.
fn capability_mask(capabilities: &[String]) -> u64 {
    capabilities
        .iter()
        .map(|c| match c.as_str() {
            "NET_ADMIN" => 1 << 12,
            "PERFMON" => 1 << 38,
            "BPF" => 1 << 39,
            other => panic!("no bit known for {other}"),
        })
        .sum()
}

/// Runs what follows in a mount namespace of its own whose every mount is read-only but the
/// container's writable volumes: bpffs (the pins) and the host's `/proc/sys/net`, bound at
/// `sysctl_dir/net` as the DaemonSet mounts it at `/host/proc/sys/net`. As a container with
/// `readOnlyRootFilesystem` sees the node: nothing else can be written.
fn read_only_but_the_volumes(sysctl_dir: &std::path::Path) -> Vec<String> {
    const SCRIPT: &str = r#"set -e
writable="$1/net"; shift
mount --bind /proc/sys/net "$writable"
findmnt -rn -o TARGET | while read -r mount; do
  case "$mount" in /sys/fs/bpf|/sys/fs/bpf/*|"$writable") continue ;; esac
  mount -o remount,bind,ro "$mount" 2>/dev/null || true
done
exec "$@""#;
    [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "bash",
        "-c",
        SCRIPT,
        "read-only-but-the-volumes",
        &sysctl_dir.display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// The mounts process `pid` sees, each with whether it is writable.
fn mounts(pid: u32) -> Vec<(String, bool)> {
    let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    mountinfo
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter_map(|fields| {
            let writable = fields.get(5)?.split(',').any(|f| f == "rw");
            Some(((*fields.get(4)?).to_string(), writable))
        })
        .collect()
}

#[test]
fn the_agent_runs_with_the_container_s_capabilities_alone() {
    let capabilities = container_capabilities();
    let manifests = Manifests::load();
    let pod = pod(manifests.daemon_set());
    // The privileged init container runs first, as the kubelet would: it mounts bpffs on a host
    // that booted without it, which the agent, without CAP_SYS_ADMIN, cannot.
    for init in pod.init_containers.iter().flatten() {
        let command = init.command.as_deref().unwrap_or_default();
        assert!(
            !command.is_empty(),
            "the init container {} runs a command",
            init.name
        );
        let status = Command::new(&command[0])
            .args(&command[1..])
            .status()
            .unwrap();
        assert!(status.success(), "the init container {}", init.name);
    }
    let container = agent(pod);
    let read_only_root = container
        .security_context
        .as_ref()
        .and_then(|s| s.read_only_root_filesystem)
        .unwrap_or(false);
    assert!(
        read_only_root,
        "the DaemonSet's container has a read-only root"
    );
    let sysctl_dir = tempfile::tempdir().unwrap();
    fs::create_dir(sysctl_dir.path().join("net")).unwrap();
    let mut lab = Lab::up("caps").expect("lab");
    // An uplink, so that the agent writes accept_local through the writable sysctl volume.
    let uplink = format!("u{}", std::process::id());
    let peer = format!("w{}", std::process::id());
    for args in [
        vec![
            "link", "add", &uplink, "type", "veth", "peer", "name", &peer,
        ],
        vec!["link", "set", &uplink, "up"],
        vec!["link", "set", &peer, "up"],
    ] {
        let status = Command::new("ip")
            .args(["-n", &lab.node])
            .args(&args)
            .status()
            .unwrap();
        assert!(status.success(), "ip {args:?}");
    }
    lab.agent_wrapper = read_only_but_the_volumes(sysctl_dir.path());
    lab.agent_wrapper.extend(setpriv(&capabilities));
    let sysctl = sysctl_dir.path().display().to_string();
    let agent_args = [
        "--sysctl-dir",
        sysctl.as_str(),
        "--uplinks",
        uplink.as_str(),
        "--xdp-mode",
        "generic",
    ];
    lab.start_agent(&agent_args)
        .expect("an agent with the container's capabilities and read-only mounts");
    let pid = lab.agent_pid().expect("the agent runs");
    // Only the container's writable volumes, and /dev's own mounts as a runtime gives them.
    let writable: Vec<String> = mounts(pid)
        .into_iter()
        .filter(|(_, writable)| *writable)
        .map(|(path, _)| path)
        .filter(|path| {
            !(path.starts_with("/sys/fs/bpf")
                || path.starts_with("/dev/")
                || *path == format!("{sysctl}/net"))
        })
        .collect();
    assert!(
        writable.is_empty(),
        "writable beyond the volumes: {writable:?}"
    );
    assert!(
        mounts(pid)
            .iter()
            .any(|(path, writable)| path == "/" && !writable),
        "the agent sees a read-only root"
    );
    let accept_local = lab
        .in_node(&[
            "cat",
            &format!("/proc/sys/net/ipv4/conf/{uplink}/accept_local"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&accept_local.stdout).trim(),
        "1",
        "accept_local written through the sysctl volume"
    );
    for probe in ["healthz", "readyz"] {
        let url = format!("http://127.0.0.1:10256/{probe}");
        let answer = lab
            .in_node(&["curl", "-sf", "--max-time", "2", &url])
            .output()
            .unwrap();
        assert!(answer.status.success(), "/{probe}: {answer:?}");
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .expect("CapEff");
    assert_eq!(
        effective,
        capability_mask(&capabilities),
        "it runs with those alone: {effective:x}"
    );
    let answer = lab.curl("http://10.96.0.10/").expect("forwarded");
    assert!(pod_of(&answer).is_some(), "{answer}");
    // A restart adopts the pins, with the same capabilities and mounts: every frontend the
    // first agent programmed.
    let first = fs::read_to_string(lab.agent_log()).unwrap();
    let programmed = first
        .lines()
        .rev()
        .find(|line| line.contains(" synced generation="))
        .and_then(|line| line.split(" frontends=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the first agent's last sync")
        .to_string();
    lab.start_agent(&agent_args).expect("the agent again");
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(
        log.contains(&format!(
            "adopted the maps pinned before frontends={programmed} "
        )),
        "{log}"
    );
    let answer = lab
        .curl("http://10.96.0.10/")
        .expect("forwarded after the restart");
    assert!(pod_of(&answer).is_some(), "{answer}");
}

#[test]
fn an_agent_without_a_capability_it_needs_says_which() {
    let capabilities = container_capabilities();
    let mut lab = Lab::up("nocap").expect("lab");
    for dropped in &capabilities {
        let kept: Vec<String> = capabilities
            .iter()
            .filter(|c| *c != dropped)
            .cloned()
            .collect();
        lab.agent_wrapper = setpriv(&kept);
        let manifests = lab.manifests.path().as_os_str().to_owned();
        let mut agent = lab.agent_command(&[OsStr::new("--manifests"), &manifests], &[]);
        let out = lb_tests::output(&mut agent).expect_err("the agent refuses to start");
        let said = format!("{out:#}");
        assert!(
            said.contains(&format!("the agent lacks CAP_{dropped}")),
            "without {dropped}: {said}"
        );
    }
}

/// Fails while the agent lacks a flag its DaemonSet passes: the two change together.
#[test]
fn every_flag_the_daemon_set_passes_exists() {
    let manifests = Manifests::load();
    let flags = run_flags(agent(pod(manifests.daemon_set())));
    let lb_user = lb_tests::binary("LB_USER_BIN").expect("the agent, built by cargo xtask");
    let help = Command::new(&lb_user)
        .args(["run", "--help"])
        .output()
        .expect("lb-user run --help");
    assert!(help.status.success(), "lb-user run --help: {help:?}");
    let help = String::from_utf8_lossy(&help.stdout);
    let known: BTreeSet<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("--"))
        .collect();
    let unknown: Vec<&str> = flags
        .iter()
        .map(|flag| flag.split('=').next().unwrap_or(flag))
        .filter(|name| !known.contains(name))
        .collect();
    assert!(
        unknown.is_empty(),
        "{} run --help has no {}",
        lb_user.display(),
        unknown.join(", ")
    );
    assert!(
        help.contains("env: NODE_NAME"),
        "the agent reads its node's name from NODE_NAME"
    );
}
