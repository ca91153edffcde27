//! A synthetic cluster for the benchmarks: ClusterIP Services on port 80 whose endpoints serve
//! on 8080, written as the manifests the agent reads and as the rulesets kube-proxy's iptables
//! and nftables modes load for the same Services.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

pub const SERVICE_PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
/// Endpoints of each synthetic Service.
pub const ENDPOINTS: u32 = 10;
/// Services per manifest file, as a directory of many small files would hold them.
/// Services per manifest file.
pub const PER_FILE: usize = 100;

#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub endpoints: Vec<Ipv4Addr>,
}

/// Synthetic Service `i`, `bench/svc-<i>`: ClusterIP 10.97.0.0 + i (clear of the examples'
/// 10.96.0.0/16), and [`ENDPOINTS`] endpoints of its own from 10.128.0.0 on.
pub fn synthetic(i: u32) -> Service {
    let offset = |base: Ipv4Addr, n: u32| Ipv4Addr::from(u32::from(base) + n);
    Service {
        namespace: "bench".into(),
        name: format!("svc-{i}"),
        cluster_ip: offset(Ipv4Addr::new(10, 97, 0, 0), i),
        endpoints: (0..ENDPOINTS)
            .map(|e| offset(Ipv4Addr::new(10, 128, 0, 0), i * ENDPOINTS + e))
            .collect(),
    }
}

impl Service {
    /// The Service and its EndpointSlice, as YAML documents.
    pub fn manifest(&self) -> String {
        let Self {
            namespace, name, ..
        } = self;
        let mut out = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
             spec:\n  clusterIP: {}\n  ports: [{{name: http, port: {SERVICE_PORT}, targetPort: \
             {TARGET_PORT}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {name}-1\n  namespace: {namespace}\n  labels: \
             {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, \
             port: {TARGET_PORT}}}]\nendpoints:\n",
            self.cluster_ip
        );
        for address in &self.endpoints {
            out.push_str(&Self::endpoint_line(*address));
        }
        out.push_str("---\n");
        out
    }

    /// An endpoint's line in [`Service::manifest`]: removing it removes the endpoint.
    pub fn endpoint_line(address: Ipv4Addr) -> String {
        format!("- addresses: [{address}]\n")
    }

    /// The comment kube-proxy gives the Service's rules.
    fn port_name(&self) -> String {
        format!("{}/{}:http", self.namespace, self.name)
    }
}

/// Writes `services` as manifests into `dir`, [`PER_FILE`] to a file named
/// `services-<nnnn>.yaml`; the first Service is in `services-0000.yaml`.
pub fn write_manifests(dir: &Path, services: &[Service]) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (file, chunk) in services.chunks(PER_FILE).enumerate() {
        let path = dir.join(manifest_name(file));
        let text: String = chunk.iter().map(Service::manifest).collect();
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The name of the `file`th manifest file [`write_manifests`] writes.
pub fn manifest_name(file: usize) -> String {
    format!("services-{file:04}.yaml")
}

/// A kube-proxy mode's ruleset for `services`: the whole of it, as its first sync writes it,
/// and its partial sync once the first Service's first endpoint is gone. Chains are named by
/// the Service's index in the slice (kube-proxy hashes the names instead).
pub trait Ruleset {
    /// A name for tables of figures.
    const NAME: &'static str;
    /// The command that loads a ruleset from standard input, and its arguments.
    const LOAD: (&'static str, &'static [&'static str]);
    fn full(&self, services: &[Service]) -> String;
    fn one_endpoint_fewer(&self, services: &[Service]) -> String;
}

/// kube-proxy's iptables mode: KUBE-SERVICES, hooked from PREROUTING and OUTPUT, with a rule
/// per Service; a KUBE-SVC chain choosing an endpoint with `statistic` rules; a KUBE-SEP chain
/// per endpoint doing the DNAT. Its partial sync rewrites KUBE-SERVICES whole, and the chains
/// that changed.
pub struct Iptables;

impl Iptables {
    fn services_chain(services: &[Service]) -> String {
        let mut out = String::from(":KUBE-SERVICES - [0:0]\n");
        for (i, service) in services.iter().enumerate() {
            let _ = writeln!(
                out,
                "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d \
                 {}/32 --dport {SERVICE_PORT} -j KUBE-SVC-{i}",
                service.port_name(),
                service.cluster_ip
            );
        }
        out
    }

    fn service_chain(i: usize, service: &Service, endpoints: &[Ipv4Addr]) -> String {
        let name = service.port_name();
        let mut out = format!(
            "-A KUBE-SVC-{i} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/32 \
             --dport {SERVICE_PORT} ! -s 10.128.0.0/9 -j KUBE-MARK-MASQ\n",
            service.cluster_ip
        );
        let first = service.endpoints.len() - endpoints.len();
        for (n, address) in endpoints.iter().enumerate() {
            let left = endpoints.len() - n;
            let statistic = if left > 1 {
                format!(
                    "-m statistic --mode random --probability {:.10} ",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "-A KUBE-SVC-{i} -m comment --comment \"{name} -> {address}:{TARGET_PORT}\" \
                 {statistic}-j KUBE-SEP-{i}-{}",
                first + n
            );
        }
        out
    }

    fn endpoint_chain(i: usize, e: usize, service: &Service) -> String {
        let (name, address) = (service.port_name(), service.endpoints[e]);
        format!(
            "-A KUBE-SEP-{i}-{e} -m comment --comment {name} -s {address}/32 -j KUBE-MARK-MASQ\n\
             -A KUBE-SEP-{i}-{e} -m comment --comment {name} -m tcp -p tcp -j DNAT \
             --to-destination {address}:{TARGET_PORT}\n"
        )
    }
}

impl Ruleset for Iptables {
    const NAME: &'static str = "iptables";
    const LOAD: (&'static str, &'static [&'static str]) = ("iptables-restore", &["--noflush"]);

    fn full(&self, services: &[Service]) -> String {
        let mut out = String::from("*nat\n:KUBE-MARK-MASQ - [0:0]\n");
        for (i, service) in services.iter().enumerate() {
            let _ = writeln!(out, ":KUBE-SVC-{i} - [0:0]");
            for e in 0..service.endpoints.len() {
                let _ = writeln!(out, ":KUBE-SEP-{i}-{e} - [0:0]");
            }
        }
        out.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
        out.push_str(&Self::services_chain(services));
        for hook in ["PREROUTING", "OUTPUT"] {
            let _ = writeln!(
                out,
                "-A {hook} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            );
        }
        for (i, service) in services.iter().enumerate() {
            out.push_str(&Self::service_chain(i, service, &service.endpoints));
            for e in 0..service.endpoints.len() {
                out.push_str(&Self::endpoint_chain(i, e, service));
            }
        }
        out.push_str("COMMIT\n");
        out
    }

    fn one_endpoint_fewer(&self, services: &[Service]) -> String {
        format!(
            "*nat\n:KUBE-SVC-0 - [0:0]\n:KUBE-SEP-0-0 - [0:0]\n{}{}-X KUBE-SEP-0-0\nCOMMIT\n",
            Self::services_chain(services),
            Self::service_chain(0, &services[0], &services[0].endpoints[1..])
        )
    }
}

/// kube-proxy's nftables mode: a verdict map from address, protocol and port to a service
/// chain, which picks an endpoint chain with `numgen random`. Its partial sync touches the
/// changed chains only.
pub struct Nftables;

impl Nftables {
    fn service_chain(i: usize, service: &Service, endpoints: &[Ipv4Addr]) -> String {
        let first = service.endpoints.len() - endpoints.len();
        let elements: Vec<String> = (0..endpoints.len())
            .map(|n| format!("{n} : goto endpoint-{i}-{}", first + n))
            .collect();
        format!(
            "add rule ip kube-proxy service-{i} ip daddr {} tcp dport {SERVICE_PORT} ip saddr != \
             10.128.0.0/9 jump mark-for-masquerade\nadd rule ip kube-proxy service-{i} numgen \
             random mod {} vmap {{ {} }}\n",
            service.cluster_ip,
            endpoints.len(),
            elements.join(", ")
        )
    }
}

impl Ruleset for Nftables {
    const NAME: &'static str = "nftables";
    const LOAD: (&'static str, &'static [&'static str]) = ("nft", &["-f", "-"]);

    fn full(&self, services: &[Service]) -> String {
        let mut out = String::from(
            "add table ip kube-proxy\n\
             add chain ip kube-proxy mark-for-masquerade\n\
             add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
             add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; }\n\
             add chain ip kube-proxy services\n\
             add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
             add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority dstnat ; }\n\
             add rule ip kube-proxy nat-prerouting jump services\n\
             add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
             add rule ip kube-proxy nat-output jump services\n",
        );
        for (i, service) in services.iter().enumerate() {
            let _ = writeln!(out, "add chain ip kube-proxy service-{i}");
            for (e, address) in service.endpoints.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "add chain ip kube-proxy endpoint-{i}-{e}\n\
                     add rule ip kube-proxy endpoint-{i}-{e} ip saddr {address} jump mark-for-masquerade\n\
                     add rule ip kube-proxy endpoint-{i}-{e} meta l4proto tcp dnat to {address}:{TARGET_PORT}"
                );
            }
            out.push_str(&Self::service_chain(i, service, &service.endpoints));
            let _ = writeln!(
                out,
                "add element ip kube-proxy service-ips {{ {} . tcp . {SERVICE_PORT} : goto service-{i} }}",
                service.cluster_ip
            );
        }
        out
    }

    fn one_endpoint_fewer(&self, services: &[Service]) -> String {
        format!(
            "flush chain ip kube-proxy service-0\n{}delete chain ip kube-proxy endpoint-0-0\n",
            Self::service_chain(0, &services[0], &services[0].endpoints[1..])
        )
    }
}

/// Loads `text` with `R::LOAD` in the network namespace `netns`; how long it took.
pub fn load<R: Ruleset>(netns: &str, text: &str) -> Result<Duration> {
    let (command, load_args) = R::LOAD;
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, command])
        .args(load_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    let took = started.elapsed();
    ensure!(
        output.status.success(),
        "{command} in {netns}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(took)
}
