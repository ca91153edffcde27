//! The agent itself: syncs on edits, bad input, restarts and upgrades, one agent per instance, map layouts, the API source, claims between Services.

use super::*;

#[test]
fn a_manifest_edit_is_synced_at_once_not_at_the_next_poll() {
    // A poll longer than any wait of the lab: only inotify can wake the agent in time.
    let lab = lab_with("inotify", &["--poll-interval-ms", "3600000"]);
    let (_, ip) = BACKENDS[2];
    lab.edit_manifest("demo.yaml", |t| remove_endpoint(&t, &ip.to_string()))
        .unwrap();
    wait_for_backends(&lab, "10.96.0.10:80/TCP", 2);
    // A new file, made by rename as kubectl and editors make them.
    let extra = fs::read_to_string(lab.manifests.path().join("demo.yaml"))
        .unwrap()
        .replace("10.96.0.10", "10.96.0.77")
        .replace("name: demo\n", "name: demo-copy\n")
        .replace("name: demo-abc12", "name: demo-copy-abc12")
        .replace("service-name: demo\n", "service-name: demo-copy\n");
    lab.add_manifest("demo-copy.yaml", &extra).unwrap();
    wait_for_backends(&lab, "10.96.0.77:80/TCP", 2);
}

#[test]
fn a_manifest_broken_by_an_edit_loses_nothing_programmed() {
    let lab = lab("broken");
    lab.edit_manifest("demo.yaml", |t| format!("{t}---\nkind: [unclosed\n"))
        .unwrap();
    lab.wait_for("the agent to read the broken file", || {
        let log = fs::read_to_string(lab.agent_log()).unwrap_or_default();
        Ok(log.contains("its last version without errors stays programmed"))
    })
    .unwrap();
    let dump = lab.dump().unwrap();
    assert_eq!(backend_count(&dump, "10.96.0.10:80/TCP"), Some(3), "{dump}");
    let pods = curl_pods(&lab, HTTP_VIP, 3);
    assert_eq!(counts(&pods).len(), 3, "{pods:?}");
}

/// The programs an agent pins, one per hook.
const PROGRAMS: [&str; 14] = [
    "lb_tc",
    "lb_tc_uplink",
    "lb_tc_egress",
    "lb_tc_loopback",
    "lb_xdp",
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
    "lb_connect6",
    "lb_sendmsg6",
    "lb_recvmsg6",
    "lb_getpeername6",
    "lb_sock_release",
];

/// The kernel's id of the program `name` that the lab's agent pinned.
fn pinned_program_id(lab: &Lab, name: &str) -> u32 {
    let path = lab.pin_dir().join("progs").join(name);
    let json = lb_tests::output(
        Command::new("bpftool")
            .args(["--json", "prog", "show", "pinned"])
            .arg(&path),
    )
    .unwrap_or_else(|e| panic!("bpftool prog show pinned {}: {e:#}", path.display()));
    json.split("\"id\":")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no id in {json}"))
}

fn program_loaded(id: u32) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The programmed entries, without the counters that traffic moves and the epoch that every
/// start bumps.
fn programme(lab: &Lab) -> String {
    let dump = lab.dump().expect("dump");
    dump.lines()
        .filter(|l| !lb_tests::COUNTER_LINES.iter().any(|p| l.starts_with(p)))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_connection_survives_kill_restart_and_upgrade_and_cleanup_removes_everything() {
    let mut lab = lab("restart");
    let mut connection = lab.connect(ECHO_VIP).expect("a connection through the VIP");
    let first = connection.ask("hello").expect("an answer");
    let pod = pod_of(&first).expect("pod").to_string();
    let programmed = programme(&lab);
    let mut same_backend = |when: &str| {
        let answer = connection
            .ask(when)
            .unwrap_or_else(|e| panic!("{when}: {e:#}"));
        assert_eq!(pod_of(&answer), Some(pod.as_str()), "{when}: {answer}");
    };

    lab.kill_agent();
    same_backend("no agent running");
    assert!(
        lab.curl(HTTP_VIP).is_ok(),
        "with no agent running, new connections are balanced too"
    );

    lab.start_agent(&[]).expect("a restarted agent");
    same_backend("after a restart");
    assert_eq!(programme(&lab), programmed, "the restart changed the maps");
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(
        log.contains("writes=0"),
        "the restarted agent's first sync writes nothing:\n{log}"
    );

    let old_program = pinned_program_id(&lab, "lb_tc");
    let object = std::env::var("LB_EBPF_OBJECT").expect("LB_EBPF_OBJECT: run through cargo xtask");
    lab.start_agent(&["--bpf-object", &object])
        .expect("an agent loading the object anew");
    assert_ne!(
        pinned_program_id(&lab, "lb_tc"),
        old_program,
        "the upgrade loads new programs"
    );
    lab.wait_for("the replaced program to be unloaded", || {
        Ok(!program_loaded(old_program))
    })
    .unwrap();
    same_backend("after the upgrade");
    assert_eq!(programme(&lab), programmed, "the upgrade changed the maps");

    let programs = PROGRAMS.map(|name| pinned_program_id(&lab, name));
    lab.kill_agent();
    lab.lb_user("cleanup").unwrap();
    assert!(!lab.pin_dir().exists(), "cleanup removes every pin");
    lab.wait_for("cleanup to unload every program", || {
        Ok(programs.iter().all(|&id| !program_loaded(id)))
    })
    .unwrap();
    assert!(
        connection.ask("after cleanup").is_err(),
        "with its links gone, nothing translates the VIP"
    );
}

#[test]
fn a_second_agent_on_the_same_instance_refuses_to_start() {
    let lab = lab("twice");
    let manifests = lab.manifests.path().as_os_str();
    let second = lab
        .agent_command(&[OsStr::new("--manifests"), manifests], &[])
        .output()
        .expect("a second agent");
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{log}");
    assert!(log.contains("another agent runs this instance"), "{log}");
    assert_eq!(
        curl_pods(&lab, HTTP_VIP, 3).len(),
        3,
        "the first agent's datapath works on"
    );
}

#[test]
fn a_pinned_map_of_another_layout_starts_empty_and_the_log_says_why() {
    let mut lab = lab("layout");
    lab.kill_agent();
    // As a build whose flow table had another layout would have left it, and an old version's.
    let flows = lab.pin_dir().join("lb_flows_v2");
    fs::remove_file(&flows).unwrap();
    for (path, name) in [
        (flows.clone(), "lb_flows_v2"),
        (lab.pin_dir().join("lb_flows_v1"), "lb_flows_v1"),
    ] {
        lb_tests::output(
            Command::new("bpftool")
                .args(["map", "create"])
                .arg(&path)
                .args(["type", "lru_hash", "key", "4", "value", "4", "entries", "8"])
                .args(["name", name]),
        )
        .expect("bpftool map create");
    }
    lab.start_agent(&[])
        .expect("an agent over a changed layout");
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(
        log.lines().any(|l| l.contains("lb_flows_v2")
            && l.contains("layout differs")
            && l.contains("key 4 B, value 4 B, 8 entries")),
        "the log names the map and both layouts:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("lb_flows_v1") && l.contains("does not have")),
        "{log}"
    );
    assert!(!lab.pin_dir().join("lb_flows_v1").exists());
    assert_eq!(curl_pods(&lab, HTTP_VIP, 3).len(), 3, "flows tracked anew");
}

/// A lab whose agent watches a test API server that serves the lab's manifests; the server,
/// and the agent's source arguments, to start it again.
fn lab_on_api(tag: &str) -> (Lab, ApiServer, Vec<OsString>) {
    let mut lab = Lab::up(tag).expect("lab");
    // In the node's network namespace, where the agent runs.
    let api = ApiServer::start(Some(&lab.node)).expect("a test API server");
    api.apply_manifests(lab.manifests.path()).unwrap();
    let kubeconfig = lab.manifests.path().with_extension("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let source = vec![
        "--kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.into_os_string(),
    ];
    start_on(&mut lab, &source);
    (lab, api, source)
}

fn start_on(lab: &mut Lab, source: &[OsString]) {
    let source: Vec<&OsStr> = source.iter().map(OsString::as_os_str).collect();
    lab.start_agent_on(&source, &[])
        .expect("an agent on the API");
}

#[test]
fn from_the_kubernetes_api_the_agent_programs_and_follows_and_outlives_an_outage() {
    let (lab, api, _) = lab_on_api("api");
    let pods = curl_pods(&lab, HTTP_VIP, 3);
    assert_eq!(counts(&pods).len(), 3, "{pods:?}");

    // An endpoint leaves demo's slice, as a controller would write it.
    let demo = lab.manifests.path().join("demo.yaml");
    let text = fs::read_to_string(&demo).unwrap();
    fs::write(&demo, remove_endpoint(&text, &BACKENDS[0].1.to_string())).unwrap();
    api.apply_manifests(lab.manifests.path()).unwrap();
    lab.wait_for_dump("demo down to two backends", |dump| {
        backend_count(dump, "10.96.0.10:80/TCP") == Some(2)
    })
    .unwrap();
    let pods = curl_pods(&lab, HTTP_VIP, 4);
    assert!(!pods.contains(&BACKENDS[0].0.to_string()), "{pods:?}");

    // The API goes away: the agent keeps what it programmed.
    let before = programme(&lab);
    api.go_down();
    lab.wait_for("the agent to see the API gone", || {
        let log = fs::read_to_string(lab.agent_log())?;
        Ok(log.contains("retrying with backoff"))
    })
    .unwrap();
    assert_eq!(programme(&lab), before, "an outage changed the maps");
    assert_eq!(curl_pods(&lab, HTTP_VIP, 2).len(), 2);
}

#[test]
fn a_newer_service_cannot_take_a_frontend_another_serves() {
    let (mut lab, api, source) = lab_on_api("claims");
    // CVE-2020-8554's shape: a tenant's new Service, named to sort first, claims demo's
    // ClusterIP and port as an external IP, with no endpoints of its own.
    api.apply(
        lb_tests::apiserver::SERVICES,
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "aaa-squatter", "namespace": "default"},
            "spec": {
                "type": "ClusterIP",
                "clusterIP": "10.96.0.99",
                "externalIPs": ["10.96.0.10"],
                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
            },
        }),
    );
    let lost = "object=Service default/aaa-squatter field=spec.ports[http] reason=10.96.0.10:80/TCP \
                is already a frontend of Service default/demo, created earlier";
    lab.wait_for("the agent to leave the newcomer's claim out", || {
        Ok(fs::read_to_string(lab.agent_log())?.contains(lost))
    })
    .unwrap();
    let pods = curl_pods(&lab, HTTP_VIP, 3);
    assert_eq!(
        counts(&pods).len(),
        3,
        "demo still serves its ClusterIP: {pods:?}"
    );
    let metrics = lb_tests::output(&mut lab.in_node(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:9403/metrics",
    ]))
    .unwrap();
    assert!(
        metrics.contains(
            "lb_frontend_claim_lost{frontend=\"10.96.0.10:80/TCP\",\
             service=\"default/aaa-squatter\",holder=\"default/demo\"} 1"
        ),
        "{metrics}"
    );
    // A restarted agent settles the claims the same way.
    start_on(&mut lab, &source);
    assert_eq!(counts(&curl_pods(&lab, HTTP_VIP, 3)).len(), 3);
}
