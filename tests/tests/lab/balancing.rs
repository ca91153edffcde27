//! Balancing: each algorithm, each kind of Service and policy, rejects and drops, the traffic left alone.

use super::*;

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
fn a_service_without_endpoints_rejects_and_counts() {
    rejects_and_counts(
        "reject",
        (HTTP_VIP, "10.96.0.10:80/TCP"),
        (DNS_VIP, "10.96.0.53:53/UDP"),
    );
}

/// With every endpoint of the lab's Services not ready (both families'), a new connection to
/// `http` meets a reset and a datagram to `dns` a port unreachable (ICMP or ICMPv6), counted:
/// each a URL or address, and its frontend as a dump names it.
pub(super) fn rejects_and_counts(tag: &str, http: (&str, &str), dns: (&str, &str)) {
    let lab = lab(tag);
    lab.edit_manifest("demo.yaml", all_not_ready).unwrap();
    lab.edit_manifest("demo-dns.yaml", all_not_ready).unwrap();
    let before = lab
        .wait_for_dump("the frontends to have no backend", |d| {
            backend_count(d, http.1) == Some(0) && backend_count(d, dns.1) == Some(0)
        })
        .unwrap();
    let err = lab
        .curl(http.0)
        .expect_err("nothing answers a frontend without backends");
    // curl's exit status 7: the connection was refused at once (a timeout is 28).
    assert!(
        format!("{err:#}").contains("exit status: 7"),
        "a TCP reset, not a timeout: {err:#}"
    );
    let err = lab.udp(dns.0, None).expect_err("no UDP answer");
    assert!(
        format!("{err:#}").contains("Connection refused"),
        "a port unreachable: {err:#}"
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
fn session_affinity_keeps_a_client_on_its_backend_until_the_timeout() {
    let lab = lab("affinity");
    let sticky = fs::read_to_string(lb_tests::workspace_root().join("deploy/examples/demo.yaml"))
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
    std::thread::sleep(std::time::Duration::from_secs(3));
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
fn slices_are_read_as_kube_proxy_reads_them() {
    let lab = lab("slices");
    let syncs = lab.syncs();
    // A headless Service's slice naming demo, with a pod that does not exist: left out.
    lab.add_manifest(
        "headless.yaml",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: demo-headless\n  \
         labels: {kubernetes.io/service-name: demo, service.kubernetes.io/headless: \"\"}\n\
         addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n\
         endpoints:\n- addresses: [10.244.0.99]\n",
    )
    .unwrap();
    lab.wait_for(
        "a sync after the headless slice",
        || Ok(lab.syncs() > syncs),
    )
    .unwrap();
    assert_eq!(
        backend_count(&lab.dump().unwrap(), "10.96.0.10:80/TCP"),
        Some(3)
    );
    let pods = curl_pods(&lab, HTTP_VIP, 6);
    assert_eq!(counts(&pods).len(), 3, "the three pods only: {pods:?}");
    assert!(
        !lab.dump().unwrap().contains("10.244.0.99"),
        "the headless slice is out"
    );

    // The http port without a number in the slice: no endpoints for it, as in kube-proxy (not
    // the Service's targetPort); the echo port keeps its own.
    let original = fs::read_to_string(lab.manifests.path().join("demo.yaml")).unwrap();
    lab.edit_manifest("demo.yaml", |t| {
        t.replacen("\n- name: http\n  port: 8080\n", "\n- name: http\n", 1)
    })
    .unwrap();
    wait_for_backends(&lab, "10.96.0.10:80/TCP", 0);
    let err = lab
        .curl(HTTP_VIP)
        .expect_err("no endpoints for the http port");
    assert!(
        format!("{err:#}").contains("exit status: 7"),
        "rejected: {err:#}"
    );
    assert_eq!(
        backend_count(&lab.dump().unwrap(), "10.96.0.10:9000/TCP"),
        Some(3)
    );
    let log = fs::read_to_string(lab.agent_log()).unwrap();
    assert!(
        log.contains("field=ports[0].port reason=no port number"),
        "the log names the slice port: {log}"
    );
    lab.edit_manifest("demo.yaml", |_| original).unwrap();
    wait_for_backends(&lab, "10.96.0.10:80/TCP", 3);
    assert_eq!(counts(&curl_pods(&lab, HTTP_VIP, 3)).len(), 3);
}

#[test]
fn rejects_are_rate_limited_per_node_and_counted() {
    // Two rejects a second for the node: one per CPU of the lab's machine.
    let lab = lab_with("ratelimit", &["--reject-rate", "2", "--reject-burst", "2"]);
    lab.edit_manifest("demo.yaml", all_not_ready).unwrap();
    wait_for_backends(&lab, "10.96.0.10:80/TCP", 0);
    let before = lab.dump().unwrap();
    // Six connections at once: past the burst, the SYN is dropped and the client times out
    // (curl's 28) instead of being refused (7).
    let clients: Vec<_> = (0..6)
        .map(|_| {
            lab.in_client(&["curl", "-s", "--max-time", "1", HTTP_VIP])
                .spawn()
                .unwrap()
        })
        .collect();
    let codes: Vec<i32> = clients
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.code().unwrap_or(-1))
        .collect();
    let refused = codes.iter().filter(|&&c| c == 7).count();
    let timed_out = codes.iter().filter(|&&c| c == 28).count();
    assert!(
        refused >= 1 && timed_out >= 1,
        "refused and timed out: {codes:?}"
    );
    let after = lab.dump().unwrap();
    assert!(
        stat(&after, "rejects_limited") > stat(&before, "rejects_limited"),
        "{after}"
    );
}

#[test]
fn session_affinity_holds_across_a_service_port_s_frontends() {
    let lab = lab("affinity-port");
    let sticky = fs::read_to_string(lb_tests::workspace_root().join("deploy/examples/demo.yaml"))
        .unwrap()
        .replace("name: demo\n", "name: demo-port\n")
        .replace(
            "kubernetes.io/service-name: demo\n",
            "kubernetes.io/service-name: demo-port\n",
        )
        .replace("name: demo-abc12", "name: demo-port-x7k2p")
        .replace("10.96.0.10", "10.96.0.14")
        .replace(
            "  type: ClusterIP\n",
            "  type: ClusterIP\n  externalIPs: [10.96.0.15]\n  sessionAffinity: ClientIP\n  \
             sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
        );
    lab.add_manifest("demo-port.yaml", &sticky).unwrap();
    wait_for_backends(&lab, "10.96.0.15:80/TCP", 3);
    // Another client turns the external IP's round robin first (the lab's clients run on one
    // CPU, whose cursor that is): without one affinity per Service port, the client would get
    // the next pod there, not its own.
    lab.curl_from("demo-3", "http://10.96.0.15/").unwrap();
    let own = curl_pods(&lab, "http://10.96.0.14/", 1).remove(0);
    let through_external = curl_pods(&lab, "http://10.96.0.15/", 3);
    assert!(
        through_external.iter().all(|pod| *pod == own),
        "the ClusterIP gave {own}, the external IP {through_external:?}"
    );
}

/// The clients of the Maglev test: 100 addresses of the client pod, 10.244.9.1 to .100.
const MAGLEV_CLIENTS: u8 = 100;

#[test]
fn maglev_keeps_each_of_100_clients_on_its_backend_and_moves_few_when_a_backend_goes_or_comes() {
    let lab = lab("maglev");
    let clients = many_clients(&lab);
    lab.add_manifest("maglev.yaml", &maglev_service()).unwrap();
    wait_for_positions(&lab, 3);
    let before = pods_of(&lab, &clients);
    assert_eq!(
        pods_of(&lab, &clients),
        before,
        "each client sticks to its backend"
    );
    assert_eq!(counts(&before).len(), 3, "every backend serves: {before:?}");

    // demo-3 goes: its clients move, the others' stay (at most 1/N + 2% of them may move).
    let (gone_pod, gone_ip) = BACKENDS[2];
    lab.edit_manifest("maglev.yaml", |t| remove_endpoint(&t, &gone_ip.to_string()))
        .unwrap();
    wait_for_positions(&lab, 2);
    let after = pods_of(&lab, &clients);
    assert!(!after.contains(&gone_pod.to_string()), "{after:?}");
    let kept = before.iter().filter(|p| *p != gone_pod).count();
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| *b != gone_pod && b != a)
        .count();
    assert!(
        moved as f64 <= (1.0 / 3.0 + 0.02) * kept as f64,
        "{moved} of the {kept} clients not on {gone_pod} moved"
    );

    // It comes back: about a third of the clients move, nearly all of them to it.
    lab.edit_manifest("maglev.yaml", |_| maglev_service())
        .unwrap();
    wait_for_positions(&lab, 3);
    let back = pods_of(&lab, &clients);
    let moved: Vec<&String> = after
        .iter()
        .zip(&back)
        .filter(|(a, b)| a != b)
        .map(|(_, b)| b)
        .collect();
    let to_it = moved.iter().filter(|p| **p == gone_pod).count();
    assert!(
        (15..=50).contains(&moved.len()) && to_it * 10 >= moved.len() * 9,
        "{} of {MAGLEV_CLIENTS} clients moved, {to_it} of them to {gone_pod}",
        moved.len()
    );
}

/// A Service `name` at `cluster_ip`, its port `port` (`port_name`) to the three demo pods'
/// `target`, balanced by `scheduler`, with its EndpointSlice.
fn scheduled_service(
    name: &str,
    scheduler: &str,
    cluster_ip: &str,
    (port_name, port, target): (&str, u16, u16),
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  \
         annotations: {{lb.ebpf.io/scheduler: {scheduler}}}\nspec:\n  clusterIP: {cluster_ip}\n  \
         ports: [{{name: {port_name}, port: {port}, targetPort: {target}}}]\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  \
         labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\n\
         ports: [{{name: {port_name}, port: {target}, protocol: TCP}}]\nendpoints:\n\
         - addresses: [10.244.0.11]\n- addresses: [10.244.0.12]\n- addresses: [10.244.0.13]\n"
    )
}

/// `demo-maglev`: a ClusterIP balanced by Maglev over the three demo pods' HTTP.
fn maglev_service() -> String {
    scheduled_service("demo-maglev", "mh", "10.96.0.15", ("http", 80, 8080))
}

/// Gives the client pod [`MAGLEV_CLIENTS`] more addresses, routed back to it by the node: the
/// addresses.
fn many_clients(lab: &Lab) -> Vec<String> {
    let clients: Vec<String> = (1..=MAGLEV_CLIENTS)
        .map(|i| format!("10.244.9.{i}"))
        .collect();
    for ip in &clients {
        let host = format!("{ip}/32");
        let mut add = Command::new("ip");
        add.args([
            "-n",
            &lab.client.namespace,
            "addr",
            "add",
            &host,
            "dev",
            "eth0",
        ]);
        lb_tests::output(&mut add).expect("a client's address");
    }
    let link = format!("v-{}", lab.client.name);
    let route = ["ip", "route", "add", "10.244.9.0/24", "dev", &link];
    lb_tests::output(&mut lab.in_node(&route)).expect("the route to the clients");
    clients
}

/// The pod that answers each client, in the clients' order.
fn pods_of(lab: &Lab, clients: &[String]) -> Vec<String> {
    clients
        .iter()
        .map(|client| {
            let command = [
                "curl",
                "-sS",
                "--max-time",
                "5",
                "--interface",
                client,
                "http://10.96.0.15/",
            ];
            let answer = lb_tests::output(&mut lab.in_client(&command))
                .unwrap_or_else(|e| panic!("curl from {client}: {e:#}"));
            pod_of(&answer).expect("the pod").to_string()
        })
        .collect()
}

/// Waits until `lb-user inspect` shows demo-maglev's table over `backends` backends.
fn wait_for_positions(lab: &Lab, backends: usize) {
    lab.wait_for(
        &format!("demo-maglev's table over {backends} backends"),
        || {
            let table = lab.lb_user("inspect")?;
            let lines = table
                .lines()
                .skip_while(|l| !l.contains("10.96.0.15:80"))
                .skip(1)
                .take_while(|l| l.starts_with("  ->"))
                .filter(|l| l.contains("of 16381 positions"))
                .count();
            Ok(lines == backends)
        },
    )
    .unwrap();
}

/// Connects `argv[3]` times to `argv[1]:argv[2]`, the n-th connection from 10.244.9.n, and asks
/// each connection's pod. The first connection's pod is the slow backend: its connections are
/// held open, as a backend slow to answer holds them; the others close once answered. Prints
/// the pods in order, then holds until told.
const HOLD_THE_FIRST_BACKEND: &str = r#"
import socket, sys
address, n = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3])
held, pods = [], []
for i in range(1, n + 1):
    s = socket.create_connection(address, timeout=5, source_address=(f"10.244.9.{i}", 0))
    s.sendall(b"who\n")
    answer = s.makefile().readline()
    pod = dict(kv.split("=", 1) for kv in answer.split()[1:])["pod"]
    pods.append(pod)
    if pod == pods[0]:
        held.append(s)
    else:
        s.close()
print(" ".join(pods), flush=True)
sys.stdin.readline()
"#;

/// The connections [`HOLD_THE_FIRST_BACKEND`] makes, each from its own of the [`MAGLEV_CLIENTS`]
/// addresses.
const HELD_TEST_CONNECTIONS: usize = 90;

#[test]
fn least_connection_sends_new_connections_away_from_a_backend_that_holds_them_and_rr_does_not() {
    let lab = lab("lc");
    many_clients(&lab);
    let lc = scheduled_service("demo-lc", "lc", "10.96.0.17", ("echo", 9000, 9000));
    lab.add_manifest("lc.yaml", &lc).unwrap();
    wait_for_backends(&lab, "10.96.0.17:9000/TCP", 3);
    let n = HELD_TEST_CONNECTIONS;
    let run = |vip: &str| {
        let n = n.to_string();
        let mut script = Script::start(lab.in_client(&[
            "python3",
            "-c",
            HOLD_THE_FIRST_BACKEND,
            vip,
            "9000",
            &n,
        ]));
        let pods: Vec<String> = script.line().split_whitespace().map(String::from).collect();
        assert_eq!(
            pods.len(),
            HELD_TEST_CONNECTIONS,
            "an answer for each: {pods:?}"
        );
        (script, pods)
    };

    // Round robin (the demo's echo): the slow backend keeps its turn, a third of them.
    let (_, pods) = run("10.96.0.10");
    let shares = counts(&pods);
    assert!(
        shares.len() == 3 && shares.values().all(|c| (25..=35).contains(c)),
        "round robin: {shares:?}"
    );

    // Least connection: its one held connection outweighs the others' closed ones.
    let (_script, pods) = run("10.96.0.17");
    let slow = pods[0].clone();
    let shares = counts(&pods);
    let held = shares[slow.as_str()];
    assert!(
        held <= 3 && shares.len() == 3 && shares.values().all(|c| *c == held || *c >= 35),
        "least connection, {slow} holding its connections: {shares:?}"
    );
    // inspect shows the counts, as ipvsadm -Ln: the held connections active, the closed inactive.
    let slow_ip = ip_of(&slow).to_string();
    lab.wait_for(
        "inspect to count the held and the closed connections",
        || {
            let table = lab.lb_user("inspect")?;
            let loads: Vec<(String, u64, u64)> = table
                .lines()
                .skip_while(|l| !l.contains("10.96.0.17:9000"))
                .skip(1)
                .take_while(|l| l.starts_with("  ->"))
                .filter_map(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    let [.., active, inactive] = fields[..] else {
                        return None;
                    };
                    Some((
                        fields[1].to_string(),
                        active.parse().ok()?,
                        inactive.parse().ok()?,
                    ))
                })
                .collect();
            let slow_active = loads
                .iter()
                .filter(|(address, _, _)| address.starts_with(&format!("{slow_ip}:")))
                .map(|(_, active, _)| *active)
                .sum::<u64>();
            let others_active: u64 =
                loads.iter().map(|(_, active, _)| active).sum::<u64>() - slow_active;
            let inactive: u64 = loads.iter().map(|(_, _, inactive)| inactive).sum();
            Ok(loads.len() == 3
                && slow_active == held as u64
                && others_active == 0
                && inactive == (n - held) as u64)
        },
    )
    .unwrap();
}
