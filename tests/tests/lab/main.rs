//! Kernel-level tests: the agent and its eBPF datapath in a lab of network namespaces, real
//! servers, real clients. Run through `cargo xtask test` (root, and the built binaries). One
//! file per theme; the helpers they share are here.

mod agent;
mod balancing;
mod ipv6;
mod load_balancers;
mod network;
mod node_sockets;
mod observability;
mod rollouts;

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    process::{Child, ChildStdout, Command, Stdio},
};

use lb_tests::{
    BACKENDS, CLIENT_IP, Lab, NODE_IP, READYZ, apiserver::ApiServer, client_of, pod_of, stat,
};

const HTTP_VIP: &str = "http://10.96.0.10/";
const STICKY_VIP: &str = "http://10.96.0.11/";
const DNS_VIP: &str = "10.96.0.53:53";
const ECHO_VIP: &str = "10.96.0.10:9000";

/// The demo Service in one family: its addresses, its frontends as dumps name them, and how
/// the lab's EndpointSlices of that family write an endpoint's address.
struct Demo {
    http: &'static str,
    echo: &'static str,
    http_frontend: &'static str,
    echo_frontend: &'static str,
    ipv6: bool,
}

const DEMO: Demo = Demo {
    http: HTTP_VIP,
    echo: ECHO_VIP,
    http_frontend: "10.96.0.10:80/TCP",
    echo_frontend: "10.96.0.10:9000/TCP",
    ipv6: false,
};

const DEMO6: Demo = Demo {
    http: "http://[fd00::10:96:0:10]/",
    echo: "[fd00::10:96:0:10]:9000",
    http_frontend: "[fd00::10:96:0:10]:80/TCP",
    echo_frontend: "[fd00::10:96:0:10]:9000/TCP",
    ipv6: true,
};

impl Demo {
    /// The lab's backend at `ip` (its IPv4 address) as this family's slice lists it.
    fn endpoint(&self, ip: Ipv4Addr) -> String {
        if self.ipv6 {
            format!("\"{}\"", lb_tests::ipv6_twin(ip))
        } else {
            ip.to_string()
        }
    }
}

fn lab(tag: &str) -> Lab {
    lab_with(tag, &[])
}

fn lab_with(tag: &str, agent_args: &[&str]) -> Lab {
    let mut lab = Lab::up(tag).expect("lab");
    lab.start_agent(agent_args).expect("agent");
    lab
}

/// The pod answering a UDP query from the client's `source_port`.
fn udp_pod(lab: &Lab, source_port: u16) -> String {
    let answer = lab
        .udp(DNS_VIP, Some(source_port))
        .expect("a UDP answer through the VIP");
    pod_of(&answer).expect("pod").to_string()
}

/// The pods answering `n` curls of `url`, in order.
fn curl_pods(lab: &Lab, url: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let answer = lab
                .curl(url)
                .unwrap_or_else(|e| panic!("curl {url} #{i}: {e:#}"));
            let client = client_of(&answer).expect("answer names the client");
            assert!(
                client.starts_with(&client_prefix(url)),
                "the backend sees the real client, not {client}"
            );
            pod_of(&answer).expect("answer names the pod").to_string()
        })
        .collect()
}

/// How a backend names the client's address when it reaches `target` (a URL or an address):
/// its IPv6 twin's in brackets when `target` is IPv6.
fn client_prefix(target: &str) -> String {
    if target.contains('[') {
        format!("[{}]:", lb_tests::ipv6_twin(CLIENT_IP))
    } else {
        format!("{CLIENT_IP}:")
    }
}

fn counts(pods: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for pod in pods {
        *counts.entry(pod.as_str()).or_default() += 1;
    }
    counts
}

/// Waits until `frontend` is programmed with `count` backends.
fn wait_for_backends(lab: &Lab, frontend: &str, count: u16) {
    lab.wait_for_dump(&format!("{frontend} to have {count} backends"), |d| {
        backend_count(d, frontend) == Some(count)
    })
    .unwrap();
}

/// The dump line of a frontend (`10.96.0.10:80/TCP`).
fn frontend_line<'a>(dump: &'a str, frontend: &str) -> Option<&'a str> {
    dump.lines()
        .find(|l| l.starts_with(&format!("FE: ADDR={frontend} ")))
}

/// The backend count of a frontend (`10.96.0.10:80/TCP`) in a dump.
fn backend_count(dump: &str, frontend: &str) -> Option<u16> {
    let line = frontend_line(dump, frontend)?;
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("COUNT="))?
        .parse()
        .ok()
}

/// Makes every one of the lab's backends not ready in a manifest's text, in the slices of both
/// families.
fn all_not_ready(text: String) -> String {
    BACKENDS.iter().fold(text, |t, (_, ip)| {
        let v4 = set_not_ready(&t, &ip.to_string());
        set_not_ready(&v4, &DEMO6.endpoint(*ip))
    })
}

/// Makes the endpoint at `ip` not ready, as the EndpointSlice controller writes it: not
/// serving either while it is not terminating.
fn set_not_ready(text: &str, ip: &str) -> String {
    set_conditions(text, ip, "ready: false, serving: false, terminating: false")
}

/// The address of the lab's backend pod `pod`.
fn ip_of(pod: &str) -> Ipv4Addr {
    BACKENDS
        .iter()
        .find(|(name, _)| *name == pod)
        .unwrap_or_else(|| panic!("no backend pod {pod}"))
        .1
}

/// Gives the endpoint at `ip` the `conditions` (`ready: false, serving: true, ...`).
fn set_conditions(text: &str, ip: &str, conditions: &str) -> String {
    let marker = format!("- addresses: [{ip}]\n  conditions: {{");
    let start = text.find(&marker).expect("endpoint in the manifest") + marker.len();
    let end = start + text[start..].find('}').expect("conditions end");
    format!("{}{conditions}{}", &text[..start], &text[end..])
}

/// Removes the endpoint at `ip` (its three lines and its targetRef) from demo.yaml.
fn remove_endpoint(text: &str, ip: &str) -> String {
    let start = text
        .find(&format!("- addresses: [{ip}]"))
        .expect("endpoint in demo.yaml");
    let end = text[start + 1..]
        .find("- addresses:")
        .map_or(text.len(), |i| start + 1 + i);
    format!("{}{}", &text[..start], &text[end..])
}

/// A script run for a test: its output read line by line, killed when the test ends, passed
/// or not.
struct Script {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Script {
    fn start(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the script");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self { child, stdout }
    }

    /// The next line it prints, trimmed; empty once it ends.
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("the script's output");
        line.trim().to_string()
    }

    /// Sends it a line.
    fn tell(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin).expect("the script's input");
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
