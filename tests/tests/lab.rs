//! Kernel-level tests: the agent and its eBPF datapath in a lab of network namespaces, real
//! servers, real clients. Run through `cargo xtask test` (root, and the built binaries).

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::Ipv4Addr,
    process::{Child, ChildStdout, Command, Stdio},
};

use lb_tests::{
    BACKENDS, CLIENT_IP, Lab, NODE_IP, READYZ, apiserver::ApiServer, client_of, pod_of,
};

const HTTP_VIP: &str = "http://10.96.0.10/";
const STICKY_VIP: &str = "http://10.96.0.11/";
const DNS_VIP: &str = "10.96.0.53:53";
const ECHO_VIP: &str = "10.96.0.10:9000";

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
                client.starts_with(&format!("{CLIENT_IP}:")),
                "the backend sees the real client, not {client}"
            );
            pod_of(&answer).expect("answer names the pod").to_string()
        })
        .collect()
}

fn counts(pods: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for pod in pods {
        *counts.entry(pod.as_str()).or_default() += 1;
    }
    counts
}

/// The dump's lines of counters, after the map entries.
const COUNTER_LINES: [&str; 3] = ["STATS: ", "EPOCH: ", "FLOWS: "];

/// A counter from one of the dump's [`COUNTER_LINES`].
fn stat(dump: &str, name: &str) -> u64 {
    dump.lines()
        .filter_map(|l| COUNTER_LINES.iter().find_map(|p| l.strip_prefix(p)))
        .flat_map(str::split_whitespace)
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in dump:\n{dump}"))
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

#[test]
fn round_robin_spreads_new_connections_over_the_backends_in_turn() {
    let lab = lab("rr");
    let pods = curl_pods(&lab, HTTP_VIP, 6);
    // One client CPU, one cursor: strictly in turn, each backend twice.
    assert_eq!(pods[..3], pods[3..], "in turn: {pods:?}");
    assert_eq!(counts(&pods).len(), 3, "all three backends: {pods:?}");
}

#[test]
fn udp_through_the_vip() {
    let lab = lab("udp");
    let mut pods = Vec::new();
    for _ in 0..6 {
        let answer = lab
            .udp(DNS_VIP, None)
            .expect("a UDP answer through the VIP");
        assert!(answer.contains(&format!("client={CLIENT_IP}:")), "{answer}");
        pods.push(pod_of(&answer).expect("pod").to_string());
    }
    assert_eq!(counts(&pods).len(), 3, "every backend answers: {pods:?}");
}

#[test]
fn source_hash_keeps_one_client_on_one_backend() {
    let lab = lab("sh");
    let pods = curl_pods(&lab, STICKY_VIP, 20);
    assert_eq!(
        counts(&pods).len(),
        1,
        "one backend for one client: {pods:?}"
    );
}

#[test]
fn scale_down_spares_established_connections_and_stops_new_ones() {
    let lab = lab("scale");
    let mut held = lab.connect(ECHO_VIP).expect("connect to the echo VIP");
    let first = held.ask("hello").expect("echo through the VIP");
    let held_pod = pod_of(&first).expect("pod").to_string();
    let (_, removed_ip) = BACKENDS
        .iter()
        .find(|(name, _)| *name != held_pod)
        .copied()
        .unwrap();
    let removed_pod = BACKENDS.iter().find(|(_, ip)| *ip == removed_ip).unwrap().0;

    lab.edit_manifest("demo.yaml", |t| {
        remove_endpoint(&t, &removed_ip.to_string())
    })
    .unwrap();
    lab.wait_for_dump("demo's frontends to shrink to two backends", |d| {
        backend_count(d, "10.96.0.10:80/TCP") == Some(2)
            && backend_count(d, "10.96.0.10:9000/TCP") == Some(2)
    })
    .unwrap();

    let pods = curl_pods(&lab, HTTP_VIP, 9);
    assert!(
        !pods.iter().any(|p| p == removed_pod),
        "{removed_pod} removed, got {pods:?}"
    );
    assert_eq!(counts(&pods).len(), 2, "both survivors serve: {pods:?}");
    let again = held
        .ask("still there?")
        .expect("the held connection carries on");
    assert_eq!(pod_of(&again), Some(held_pod.as_str()), "{again}");
}

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
fn an_endpoint_that_stops_being_ready_gets_no_new_connections() {
    let lab = lab("ready");
    let (pod, ip) = BACKENDS[1];
    lab.edit_manifest("demo.yaml", |t| set_not_ready(&t, &ip.to_string()))
        .unwrap();
    wait_for_backends(&lab, "10.96.0.10:80/TCP", 2);
    let pods = curl_pods(&lab, HTTP_VIP, 9);
    assert!(
        !pods.iter().any(|p| p == pod),
        "{pod} is not ready, got {pods:?}"
    );
    assert_eq!(counts(&pods).len(), 2, "{pods:?}");
}

#[test]
fn a_service_without_endpoints_rejects_and_counts() {
    let lab = lab("reject");
    let unready = |t: String| {
        BACKENDS
            .iter()
            .fold(t, |t, (_, ip)| set_not_ready(&t, &ip.to_string()))
    };
    lab.edit_manifest("demo.yaml", unready).unwrap();
    lab.edit_manifest("demo-dns.yaml", unready).unwrap();
    let before = lab
        .wait_for_dump("the frontends to have no backend", |d| {
            backend_count(d, "10.96.0.10:80/TCP") == Some(0)
                && backend_count(d, "10.96.0.53:53/UDP") == Some(0)
        })
        .unwrap();
    let err = lab
        .curl(HTTP_VIP)
        .expect_err("nothing answers a frontend without backends");
    // curl's exit status 7: the connection was refused at once (a timeout is 28).
    assert!(
        format!("{err:#}").contains("exit status: 7"),
        "a TCP reset, not a timeout: {err:#}"
    );
    let err = lab.udp(DNS_VIP, None).expect_err("no UDP answer");
    assert!(
        format!("{err:#}").contains("Connection refused"),
        "an ICMP port unreachable: {err:#}"
    );
    let after = lab.dump().unwrap();
    assert_eq!(
        stat(&after, "rejected_no_backend"),
        stat(&before, "rejected_no_backend") + 2,
        "{after}"
    );
}

#[test]
fn internal_traffic_policy_local_without_local_endpoints_drops() {
    let lab = lab("itp");
    lab.edit_manifest("demo.yaml", |t| {
        t.replace("nodeName: lab-node", "nodeName: another-node")
            .replace(
                "  type: ClusterIP\n",
                "  type: ClusterIP\n  internalTrafficPolicy: Local\n",
            )
    })
    .unwrap();
    let before = lab
        .wait_for_dump("the local-only frontend to be empty", |d| {
            frontend_line(d, "10.96.0.10:80/TCP")
                .is_some_and(|l| l.contains("COUNT=0") && l.contains("EMPTY=drop"))
        })
        .unwrap();
    let err = lab
        .curl(HTTP_VIP)
        .expect_err("no endpoint on this node: dropped");
    assert!(
        format!("{err:#}").contains("timed out"),
        "a drop, not a reject: {err:#}"
    );
    let after = lab.dump().unwrap();
    assert!(
        stat(&after, "dropped_no_backend") > stat(&before, "dropped_no_backend"),
        "{after}"
    );
}

#[test]
fn traffic_to_no_frontend_passes_untouched() {
    let lab = lab("pass");
    let before = lab.dump().unwrap();
    let (pod, ip) = BACKENDS[2];
    for _ in 0..3 {
        let answer = lab
            .curl(&format!("http://{ip}:8080/"))
            .expect("direct curl");
        assert_eq!(pod_of(&answer), Some(pod), "{answer}");
        assert!(answer.contains(&format!("client={CLIENT_IP}:")), "{answer}");
    }
    let after = lab.dump().unwrap();
    for counter in ["forwarded", "replied", "new_flows"] {
        assert_eq!(
            stat(&before, counter),
            stat(&after, counter),
            "{counter} moved for traffic to no frontend"
        );
    }
}

#[test]
fn a_udp_flow_keeps_its_backend_until_it_idles_out() {
    // Each query takes about a second (socat's idle wait): well inside 3 s.
    let lab = lab_with("expiry", &["--udp-timeout-secs", "3"]);
    let first = udp_pod(&lab, 40_000);
    assert_eq!(udp_pod(&lab, 40_000), first, "same flow, same backend");
    std::thread::sleep(std::time::Duration::from_millis(4500));
    // Idle past its timeout, the flow is new: the round-robin cursor has moved on.
    assert_ne!(
        udp_pod(&lab, 40_000),
        first,
        "an expired flow gets a new backend"
    );
}

#[test]
fn idle_flows_are_removed_from_the_tables() {
    // Each query takes about a second (socat's idle wait): the flow is never idle for its 3 s
    // while they run, across two GC passes or more.
    let lab = lab_with(
        "flowgc",
        &["--udp-timeout-secs", "3", "--flow-gc-interval-secs", "1"],
    );
    let first = udp_pod(&lab, 40_002);
    for _ in 0..2 {
        assert_eq!(
            udp_pod(&lab, 40_002),
            first,
            "the live flow kept its backend"
        );
    }
    let dump = lab.dump().unwrap();
    assert_eq!(
        stat(&dump, "new_flows"),
        1,
        "the GC left the live flow alone\n{dump}"
    );
    assert_eq!(
        (stat(&dump, "flows"), stat(&dump, "replies")),
        (1, 1),
        "the queries' flow and its reply are tracked\n{dump}"
    );
    lab.wait_for_dump("the idle flow to be removed", |d| {
        stat(d, "flows") == 0 && stat(d, "replies") == 0
    })
    .unwrap();
}

#[test]
fn established_connections_stay_on_endpoints_not_ready_terminating_or_removed() {
    let lab = lab("graceful");
    // Round robin from one CPU: three connections, three pods.
    let mut held: Vec<(lb_tests::Connection, String)> = (0..3)
        .map(|i| {
            let mut connection = lab.connect(ECHO_VIP).expect("connect to the echo VIP");
            let answer = connection.ask(&format!("hello {i}")).expect("echo");
            (connection, pod_of(&answer).expect("pod").to_string())
        })
        .collect();
    let pods: Vec<String> = held.iter().map(|(_, pod)| pod.clone()).collect();
    assert_eq!(counts(&pods).len(), 3, "{pods:?}");
    let (unready, terminating, live) = (
        ip_of(&held[0].1).to_string(),
        ip_of(&held[1].1).to_string(),
        held[2].1.clone(),
    );
    let epoch = stat(&lab.dump().unwrap(), "backends_removed");

    // A readiness flap and a rolling update's first step.
    lab.edit_manifest("demo.yaml", |t| {
        let t = set_conditions(
            &t,
            &unready,
            "ready: false, serving: false, terminating: false",
        );
        set_conditions(
            &t,
            &terminating,
            "ready: false, serving: true, terminating: true",
        )
    })
    .unwrap();
    let gone = |ip: &str| format!("ADDR={ip}:9000/TCP");
    lab.wait_for_dump(
        "both to leave the echo frontend, and the datapath to know",
        |d| {
            backend_count(d, "10.96.0.10:9000/TCP") == Some(1)
                && !d.contains(&gone(&unready))
                && !d.contains(&gone(&terminating))
                && stat(d, "backends_removed") > epoch
        },
    )
    .unwrap();
    let check = |held: &mut Vec<(lb_tests::Connection, String)>, when: &str| {
        for (connection, pod) in held.iter_mut() {
            let answer = connection
                .ask(when)
                .unwrap_or_else(|e| panic!("the connection to {pod} {when}: {e:#}"));
            assert_eq!(pod_of(&answer), Some(pod.as_str()), "{when}: {answer}");
        }
    };
    check(&mut held, "after not ready and terminating");
    for i in 0..3 {
        let mut fresh = lab.connect(ECHO_VIP).expect("a new connection");
        let answer = fresh.ask(&format!("new {i}")).expect("echo");
        assert_eq!(
            pod_of(&answer),
            Some(live.as_str()),
            "new connections avoid them: {answer}"
        );
    }

    // The rolling update's end: both leave the slice. Their backends left the maps already;
    // what this checks is that a removal itself cuts nothing (kube-proxy flushes only UDP).
    let syncs = lab.syncs();
    lab.edit_manifest("demo.yaml", |t| {
        remove_endpoint(&remove_endpoint(&t, &unready), &terminating)
    })
    .unwrap();
    lab.wait_for("the agent to sync the removal", || Ok(lab.syncs() > syncs))
        .unwrap();
    check(&mut held, "after removal");

    // The terminating server ends its connection itself: a clean close, not a reset.
    let (connection, pod) = &mut held[1];
    let answer = connection.ask("close").expect("the last answer");
    assert_eq!(pod_of(&answer), Some(pod.as_str()), "{answer}");
    connection.wait_closed().expect("closed by the server");
}

#[test]
fn a_udp_flow_stays_while_its_endpoint_serves_and_moves_when_it_stops() {
    let lab = lab("udpmove");
    let first = udp_pod(&lab, 40_001);
    let ip = ip_of(&first).to_string();
    let kept = format!("ADDR={ip}:5353/UDP");

    // Terminating but serving: no new flows, but this one stays (kube-proxy keeps its
    // conntrack entry).
    lab.edit_manifest("demo-dns.yaml", |t| {
        set_conditions(&t, &ip, "ready: false, serving: true, terminating: true")
    })
    .unwrap();
    let epoch = stat(
        &lab.wait_for_dump("demo-dns to take no new flow to it", |d| {
            backend_count(d, "10.96.0.53:53/UDP") == Some(2) && d.contains(&kept)
        })
        .unwrap(),
        "backends_removed",
    );
    assert_eq!(
        udp_pod(&lab, 40_001),
        first,
        "a serving endpoint keeps its flow"
    );
    for port in 40_002..40_006 {
        assert_ne!(udp_pod(&lab, port), first, "a new flow from port {port}");
    }

    // No longer serving: the flow moves at its next datagram.
    lab.edit_manifest("demo-dns.yaml", |t| {
        set_conditions(&t, &ip, "ready: false, serving: false, terminating: true")
    })
    .unwrap();
    udp_flow_moves(&lab, &ip, epoch, &first);
}

/// Waits until demo-dns has lost its backend at `ip` and the datapath was told (the epoch past
/// `epoch`: the backend's entry goes last in a sync, and then the epoch that tells flows to
/// look); then the flow from port 40001, on `first` until now, moves at its next datagram,
/// and is counted as reselected.
fn udp_flow_moves(lab: &Lab, ip: &str, epoch: u64, first: &str) {
    let gone = format!("ADDR={ip}:5353/UDP");
    let before = lab
        .wait_for_dump("demo-dns to lose the backend", |d| {
            backend_count(d, "10.96.0.53:53/UDP") == Some(2)
                && !d.contains(&gone)
                && stat(d, "backends_removed") > epoch
        })
        .unwrap();
    let next = udp_pod(lab, 40_001);
    assert_ne!(next, first, "the flow left the backend at {ip}");
    let after = lab.dump().unwrap();
    assert_eq!(
        stat(&after, "reselected"),
        stat(&before, "reselected") + 1,
        "{after}"
    );
}

#[test]
fn a_udp_flow_whose_endpoint_is_removed_moves_to_a_live_one() {
    let lab = lab("resel");
    let first = udp_pod(&lab, 40_001);
    let ip = ip_of(&first).to_string();
    let epoch = stat(&lab.dump().unwrap(), "backends_removed");
    lab.edit_manifest("demo-dns.yaml", |t| remove_endpoint(&t, &ip))
        .unwrap();
    udp_flow_moves(&lab, &ip, epoch, &first);

    // The Service deleted, its UDP flows end with it, as kube-proxy flushes their conntrack
    // entries: the datagram meets no frontend.
    fs::remove_file(lab.manifests.path().join("demo-dns.yaml")).unwrap();
    lab.wait_for_dump("demo-dns and its backends to go", |d| {
        backend_count(d, "10.96.0.53:53/UDP").is_none() && !d.contains(":5353/UDP")
    })
    .unwrap();
    let answer = lab.udp(DNS_VIP, Some(40_001)).unwrap_or_default();
    assert_eq!(
        pod_of(&answer),
        None,
        "no answer once the Service is gone: {answer}"
    );
}

#[test]
fn a_new_connection_on_a_tracked_tuple_leaves_a_backend_that_is_gone() {
    let lab = lab("synmove");
    // A backend that never answers: its SYNs vanish, and the client retransmits on the tuple
    // the flow tracks.
    lab.in_node(&["ip", "route", "add", "blackhole", "10.244.0.99/32"])
        .status()
        .unwrap();
    let service = |ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: syn, namespace: default}}\n\
             spec: {{clusterIP: 10.96.0.88, ports: [{{port: 9000}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: syn-1, namespace: default, labels: \
             {{kubernetes.io/service-name: syn}}}}\naddressType: IPv4\n\
             ports: [{{port: 9000, protocol: TCP}}]\n\
             endpoints: [{{addresses: [{ip}], conditions: {{ready: true}}}}]\n"
        )
    };
    lab.add_manifest("syn.yaml", &service("10.244.0.99"))
        .unwrap();
    wait_for_backends(&lab, "10.96.0.88:9000/TCP", 1);
    let mut held = lab.connect("10.96.0.88:9000").expect("socat");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let epoch = stat(&lab.dump().unwrap(), "backends_removed");
    lab.add_manifest("syn.yaml", &service("10.244.0.11"))
        .unwrap();
    lab.wait_for_dump("the silent backend to go", |d| {
        !d.contains("ADDR=10.244.0.99:9000/TCP") && stat(d, "backends_removed") > epoch
    })
    .unwrap();
    // The next retransmitted SYN asks for the backend, finds it gone, and starts a new flow.
    let answer = held.ask("hello").expect("connected to the live backend");
    assert_eq!(pod_of(&answer), Some("demo-1"), "{answer}");
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_until_the_timeout() {
    let lab = lab("affinity");
    let sticky = std::fs::read_to_string(lb_tests::workspace_root().join("deploy/examples/demo.yaml"))
        .unwrap()
        .replace("name: demo\n", "name: demo-affinity\n")
        .replace("kubernetes.io/service-name: demo\n", "kubernetes.io/service-name: demo-affinity\n")
        .replace("name: demo-abc12", "name: demo-affinity-q8t2x")
        .replace("10.96.0.10", "10.96.0.12")
        .replace(
            "  type: ClusterIP\n",
            "  type: ClusterIP\n  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}\n",
        );
    lab.add_manifest("demo-affinity.yaml", &sticky).unwrap();
    lab.wait_for_dump("the affinity frontend", |d| {
        d.contains("FE: ADDR=10.96.0.12:80/TCP") && d.contains("AFFINITY=2s")
    })
    .unwrap();
    let pods = curl_pods(&lab, "http://10.96.0.12/", 8);
    assert_eq!(
        counts(&pods).len(),
        1,
        "one backend while the affinity lives: {pods:?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(3000));
    let after = curl_pods(&lab, "http://10.96.0.12/", 1);
    assert_ne!(after[0], pods[0], "after the timeout, round robin moves on");

    // Removed from this service, the backend still serves demo: the client moves anyway.
    let stuck = after[0].clone();
    let ip = ip_of(&stuck);
    lab.edit_manifest("demo-affinity.yaml", |t| {
        remove_endpoint(&t, &ip.to_string())
    })
    .unwrap();
    wait_for_backends(&lab, "10.96.0.12:80/TCP", 2);
    let moved = curl_pods(&lab, "http://10.96.0.12/", 3);
    assert!(
        !moved.contains(&stuck),
        "{stuck} left the service: {moved:?}"
    );
    assert_eq!(
        counts(&moved).len(),
        1,
        "and the client sticks to its new one: {moved:?}"
    );
}

#[test]
fn a_backend_calling_its_own_service_reaches_every_backend_itself_included() {
    let lab = lab("hairpin");
    let (pod, ip) = BACKENDS[0];
    let answers: Vec<String> = (0..6)
        .map(|_| lab.curl_from(pod, HTTP_VIP).expect("hairpin curl"))
        .collect();
    let pods: Vec<String> = answers
        .iter()
        .map(|a| pod_of(a).unwrap().to_string())
        .collect();
    assert_eq!(counts(&pods).len(), 3, "{pods:?}");
    for answer in &answers {
        let client = client_of(answer).unwrap();
        if pod_of(answer) == Some(pod) {
            // Answering itself, the pod saw the call come from the VIP, so the answer went
            // back through the node and was rewritten to the VIP for curl.
            assert!(client.starts_with("10.96.0.10:"), "{answer}");
        } else {
            assert!(client.starts_with(&format!("{ip}:")), "{answer}");
        }
    }
}

#[test]
fn with_no_ready_endpoint_the_serving_terminating_one_serves() {
    let lab = lab("term");
    let (survivor, survivor_ip) = BACKENDS[1];
    lab.edit_manifest("demo.yaml", |t| {
        let t = BACKENDS
            .iter()
            .fold(t, |t, (_, ip)| set_not_ready(&t, &ip.to_string()));
        set_conditions(
            &t,
            &survivor_ip.to_string(),
            "ready: false, serving: true, terminating: true",
        )
    })
    .unwrap();
    wait_for_backends(&lab, "10.96.0.10:80/TCP", 1);
    let pods = curl_pods(&lab, HTTP_VIP, 4);
    assert!(pods.iter().all(|p| p == survivor), "{pods:?}");
}

#[test]
fn a_service_without_a_selector_uses_hand_made_endpoints() {
    let lab = lab("manual");
    let (pod, ip) = BACKENDS[2];
    lab.add_manifest(
        "external-db.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: external-db}}\nspec:\n  \
             clusterIP: 10.96.0.33\n  ports: [{{name: sql, port: 3306, targetPort: 9000}}]\n---\n\
             apiVersion: v1\nkind: Endpoints\nmetadata: {{name: external-db}}\nsubsets:\n\
             - addresses: [{{ip: {ip}}}]\n  ports: [{{name: sql, port: 9000}}]\n"
        ),
    )
    .unwrap();
    wait_for_backends(&lab, "10.96.0.33:3306/TCP", 1);
    let mut held = lab.connect("10.96.0.33:3306").expect("connect");
    let answer = held.ask("select 1").expect("answer through the VIP");
    assert_eq!(pod_of(&answer), Some(pod), "{answer}");
}

#[test]
fn a_service_address_on_a_port_it_does_not_serve_drops() {
    let lab = lab("port");
    let before = lab.dump().unwrap();
    let err = lb_tests::output(&mut lab.in_client(&[
        "curl",
        "-sS",
        "--max-time",
        "2",
        "http://10.96.0.10:8080/",
    ]))
    .expect_err("10.96.0.10 serves 80 and 9000, not 8080");
    assert!(
        format!("{err:#}").contains("exit status: 28"),
        "a drop: {err:#}"
    );
    let after = lab.dump().unwrap();
    assert!(
        stat(&after, "dropped_unknown_port") > stat(&before, "dropped_unknown_port"),
        "{after}"
    );
}

#[test]
fn the_node_itself_reaches_cluster_ips() {
    let lab = lab("host");
    let before = lab.dump().unwrap();
    let pods: Vec<String> = (0..3)
        .map(|_| {
            let answer =
                lb_tests::output(&mut lab.in_node(&["curl", "-sS", "--max-time", "5", HTTP_VIP]))
                    .expect("curl from the node");
            assert!(
                client_of(&answer)
                    .unwrap()
                    .starts_with(&format!("{NODE_IP}:")),
                "{answer}"
            );
            pod_of(&answer).unwrap().to_string()
        })
        .collect();
    assert_eq!(
        counts(&pods).len(),
        3,
        "round robin from the node too: {pods:?}"
    );
    let target = format!("UDP4:{DNS_VIP}");
    let answer = lb_tests::udp_query(lab.in_node(&["socat", "-t", "1", "-T", "1", "-", &target]))
        .expect("UDP from the node");
    assert!(pod_of(&answer).is_some(), "{answer}");
    // Unconnected UDP, as resolvers send: the answer must read as from the service address.
    let sendto = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
                  s.settimeout(3); s.sendto(b'query', ('10.96.0.53', 53)); \
                  data, source = s.recvfrom(1500); print(source[0], source[1], data.decode())";
    let answer = lb_tests::output(&mut lab.in_node(&["python3", "-c", sendto]))
        .expect("unconnected UDP from the node");
    assert!(answer.starts_with("10.96.0.53 53 pod="), "{answer}");
    let after = lab.dump().unwrap();
    assert_eq!(
        stat(&after, "socket_rewrites"),
        stat(&before, "socket_rewrites") + 5,
        "{after}"
    );
}

/// On the node: a connected UDP socket and a TCP connection to frontends; prints what
/// `getpeername()` names and the pod that answered the datagram, then, after a line on stdin,
/// what the UDP socket's next exchange gives and the pod that a new connected socket reaches.
const NODE_SOCKETS: &str = r#"
import errno, socket, sys
def connected():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(3)
    udp.connect(("10.96.0.53", 53))
    return udp
def ask(udp):
    udp.send(b"query")
    return udp.recv(1500).decode().split()[0]
udp = connected()
tcp = socket.create_connection(("10.96.0.10", 80), timeout=3)
peer = lambda s: "%s:%d" % s.getpeername()
print(f"udp={peer(udp)} tcp={peer(tcp)} {ask(udp)}", flush=True)
sys.stdin.readline()
try:
    print(f"next={ask(udp)}", flush=True)
except OSError as e:
    print(f"next={errno.errorcode[e.errno]}", flush=True)
print(f"again={ask(connected())}", flush=True)
"#;

#[test]
fn the_node_s_sockets_name_the_vip_and_a_connected_udp_socket_leaves_a_removed_backend() {
    let lab = lab("nodesock");
    let mut script = Script::start(lab.in_node(&["python3", "-c", NODE_SOCKETS]));
    let first = script.line();
    assert!(
        first.starts_with("udp=10.96.0.53:53 tcp=10.96.0.10:80 pod="),
        "getpeername() names what was dialled: {first}"
    );
    let pod = first.rsplit("pod=").next().unwrap().to_string();
    let ip = ip_of(&pod);
    lab.edit_manifest("demo-dns.yaml", |t| remove_endpoint(&t, &ip.to_string()))
        .unwrap();
    lab.wait_for(
        "the agent to reset the socket of the removed backend",
        || {
            let log = fs::read_to_string(lab.agent_log())?;
            Ok(
                log.contains(
                    "reset the node's connected UDP sockets whose backend is gone reset=1",
                ),
            )
        },
    )
    .unwrap();
    script.tell();
    let next = script.line();
    assert!(
        next == "next=ECONNABORTED" || next == "next=EDESTADDRREQ",
        "the socket is reset, as a TCP application meets a reset: {next}"
    );
    let again = script.line();
    assert!(again.starts_with("again=pod="), "{again}");
    assert_ne!(
        again,
        format!("again=pod={pod}"),
        "a new socket reaches a live backend"
    );
    // Its sockets closed, what they dialled goes with them.
    assert_eq!(script.line(), "", "the script ended");
    lab.wait_for_dump("the closed sockets' entries to go", |d| {
        stat(d, "connected_sockets") == 0
    })
    .unwrap();
}

#[test]
fn a_backend_on_the_node_itself_answers_through_the_vip() {
    // Like default/kubernetes: the API server listens on the node's own address.
    let mut lab = lab("hostnet");
    lab.serve_on_node("node").unwrap();
    lab.add_manifest(
        "host-backed.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: host-backed}}\nspec:\n  \
             clusterIP: 10.96.0.44\n  ports: [{{name: https, port: 443, targetPort: 8080}}]\n\
             ---\napiVersion: v1\nkind: Endpoints\nmetadata: {{name: host-backed}}\n\
             subsets:\n- addresses: [{{ip: {NODE_IP}}}]\n  ports: [{{name: https, port: 8080}}]\n"
        ),
    )
    .unwrap();
    wait_for_backends(&lab, "10.96.0.44:443/TCP", 1);
    let answer = lab
        .curl("http://10.96.0.44:443/")
        .expect("an answer from the node");
    assert_eq!(pod_of(&answer), Some("node"), "{answer}");
    assert!(answer.contains(&format!("client={CLIENT_IP}:")), "{answer}");
}

#[test]
fn a_manifest_broken_by_an_edit_loses_nothing_programmed() {
    let lab = lab("broken");
    lab.edit_manifest("demo.yaml", |t| format!("{t}---\nkind: [unclosed\n"))
        .unwrap();
    lab.wait_for("the agent to read the broken file", || {
        let log = std::fs::read_to_string(lab.agent_log()).unwrap_or_default();
        Ok(log.contains("its last version without errors stays programmed"))
    })
    .unwrap();
    let dump = lab.dump().unwrap();
    assert_eq!(backend_count(&dump, "10.96.0.10:80/TCP"), Some(3), "{dump}");
    let pods = curl_pods(&lab, HTTP_VIP, 3);
    assert_eq!(counts(&pods).len(), 3, "{pods:?}");
}

#[test]
fn deleting_a_service_spares_its_established_connections() {
    let lab = lab("delete");
    let mut held = lab.connect(ECHO_VIP).expect("connect to the echo VIP");
    let first = held.ask("before").expect("echo through the VIP");
    std::fs::remove_file(lab.manifests.path().join("demo.yaml")).unwrap();
    lab.wait_for_dump("demo's frontends to go", |d| {
        backend_count(d, "10.96.0.10:9000/TCP").is_none()
            && backend_count(d, "10.96.0.10:80/TCP").is_none()
    })
    .unwrap();
    let again = held
        .ask("after")
        .expect("the connection outlives its Service");
    assert_eq!(pod_of(&again), pod_of(&first), "{again}");
    assert!(
        lab.curl(HTTP_VIP).is_err(),
        "no new connection to a deleted Service"
    );
}

#[test]
fn inspect_shows_what_the_kernel_has() {
    let lab = lab("inspect");
    let table = lab.lb_user("inspect").unwrap();
    let demo: Vec<&str> = table
        .lines()
        .skip_while(|l| !l.starts_with("TCP  10.96.0.10:80 "))
        .skip(1)
        .take_while(|l| l.starts_with("  -> "))
        .collect();
    assert_eq!(demo.len(), 3, "demo's three backends:\n{table}");
    assert!(demo.iter().all(|l| l.ends_with(":8080 local")), "{table}");
}

/// The programs an agent pins, one per hook.
const PROGRAMS: [&str; 8] = [
    "lb_tc",
    "lb_tc_egress",
    "lb_xdp",
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
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
        .filter(|l| !COUNTER_LINES.iter().any(|p| l.starts_with(p)))
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
    let log = std::fs::read_to_string(lab.agent_log()).unwrap();
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
    std::fs::remove_file(&flows).unwrap();
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
    let log = std::fs::read_to_string(lab.agent_log()).unwrap();
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
    let text = std::fs::read_to_string(&demo).unwrap();
    std::fs::write(&demo, remove_endpoint(&text, &BACKENDS[0].1.to_string())).unwrap();
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
        let log = std::fs::read_to_string(lab.agent_log())?;
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
    let lost = "Service default/aaa-squatter spec.ports[http]: 10.96.0.10:80/TCP is already a \
                frontend of Service default/demo, created earlier";
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

#[test]
fn metrics_count_the_packets_a_test_sent() {
    let lab = lab("metrics");
    let get = |path: &str| {
        let url = format!(
            "http://127.0.0.1:{}{path}",
            if path == "/metrics" { 9403 } else { 9402 }
        );
        lb_tests::output(&mut lab.in_node(&["curl", "-sS", "--max-time", "5", &url]))
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    };
    let demo = |metrics: &str, name: &str| -> u64 {
        let series = format!(
            "{name}{{frontend=\"10.96.0.10:80/TCP\",scope=\"internal\",service=\"default/demo\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    assert_eq!(get("/readyz"), "ready\n");
    let before = get("/metrics");
    curl_pods(&lab, HTTP_VIP, 3);
    let after = get("/metrics");
    assert_eq!(
        demo(&after, "lb_frontend_new_flows_total") - demo(&before, "lb_frontend_new_flows_total"),
        3,
        "three connections, three flows"
    );
    // Each connection: SYN, its ACK, the request, ACKs and the close, at least five packets.
    let packets =
        demo(&after, "lb_frontend_packets_total") - demo(&before, "lb_frontend_packets_total");
    assert!(packets >= 15, "{packets} packets for three HTTP exchanges");
    let bytes = demo(&after, "lb_frontend_bytes_total") - demo(&before, "lb_frontend_bytes_total");
    assert!(bytes >= packets * 40, "{bytes} bytes for {packets} packets");
    assert!(after.contains("lb_syncs_total 1\n"), "{after}");
    let flows = after
        .lines()
        .find_map(|l| l.strip_prefix("lb_conntrack_entries "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no lb_conntrack_entries in:\n{after}"));
    // A closed connection's flow stays in the table until it idles out.
    assert_eq!(flows, 3, "flows tracked after three connections");
}

/// Opens `argv[3]` connections to `argv[1]:argv[2]` and prints how many connected; then sends
/// a byte on each every half second, as a slow client under any read timeout would, and
/// prints how many the server left open 8 s after they connected.
const SLOW_CLIENTS: &str = r#"
import socket, sys, time
address = (sys.argv[1], int(sys.argv[2]))
held = [socket.create_connection(address, timeout=2) for _ in range(int(sys.argv[3]))]
start = time.monotonic()
for s in held:
    s.setblocking(False)
print(f"connected={len(held)}", flush=True)
def is_open(s):
    try:
        s.send(b"G")
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
while held and time.monotonic() - start < 8:
    held = [s for s in held if is_open(s)]
    time.sleep(0.5)
print(f"open={len(held)}", flush=True)
"#;

#[test]
fn the_status_endpoints_keep_metrics_from_pods_and_outlast_a_flood_of_slow_clients() {
    let lab = lab("status");
    let from_pod =
        |url: &str| lb_tests::output(&mut lab.in_client(&["curl", "-sS", "--max-time", "2", url]));
    let node = format!("http://{NODE_IP}");
    assert_eq!(from_pod(&format!("{node}:9402/healthz")).unwrap(), "ok\n");
    let err = from_pod(&format!("{node}:9403/metrics")).expect_err("metrics are the node's");
    assert!(
        format!("{err:#}").contains("exit status: 7"),
        "refused: {err:#}"
    );
    assert_eq!(
        from_pod(&format!("{node}:9402/metrics")).unwrap(),
        "not found\n",
        "metrics are not on the health address"
    );

    let pid = lab.agent_pid().expect("the agent runs");
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let files: Vec<&str> = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    // The lab starts it with a soft limit of SOFT_FILE_LIMIT, under a higher hard one.
    assert_eq!(
        files[0], files[1],
        "the soft limit raised to the hard one: {limits}"
    );

    let descriptors = || fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let before = descriptors();
    let mut flood = Script::start(lab.in_client(&[
        "python3",
        "-c",
        SLOW_CLIENTS,
        &NODE_IP.to_string(),
        "9402",
        "300",
    ]));
    assert_eq!(flood.line(), "connected=300");
    let held = descriptors();
    assert!(
        held < before + 20,
        "{held} descriptors with 300 connections held, {before} before"
    );
    // Meanwhile the node's probes are answered and the loop syncs.
    for _ in 0..3 {
        let ok = lb_tests::output(&mut lab.in_node(&["curl", "-sS", "--max-time", "2", READYZ]));
        assert_eq!(ok.unwrap(), "ready\n");
    }
    let (_, ip) = BACKENDS[2];
    lab.edit_manifest("demo.yaml", |t| remove_endpoint(&t, &ip.to_string()))
        .unwrap();
    wait_for_backends(&lab, "10.96.0.10:80/TCP", 2);

    // Slow clients are cut at the request deadline, however often they send.
    assert_eq!(flood.line(), "open=0", "every slow client was cut");
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
