//! What users read: `inspect`, `/metrics`, the status endpoints under load.

use super::*;

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

#[test]
fn metrics_count_the_packets_a_test_sent() {
    let lab = lab("metrics");
    let get = |path: &str| {
        let url = format!(
            "http://127.0.0.1:{}{path}",
            if path == "/metrics" { 9403 } else { 10256 }
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
    // Each frontend's scheduler, by IPVS's name.
    for (frontend, service, scheduler) in [
        ("10.96.0.10:80/TCP", "default/demo", "rr"),
        ("10.96.0.11:80/TCP", "default/demo-sticky", "sh"),
    ] {
        let info = format!(
            "lb_frontend_info{{frontend=\"{frontend}\",scope=\"internal\",service=\"{service}\",\
             scheduler=\"{scheduler}\"}} 1\n"
        );
        assert!(after.contains(&info), "no {info} in:\n{after}");
    }
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
    // kube-proxy's health server, as cloud load balancers and cluster tooling probe it.
    for path in ["healthz", "livez"] {
        let body = from_pod(&format!("{node}:10256/{path}")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert!(json["lastUpdated"].is_string(), "/{path}: {body}");
        assert!(json["currentTime"].is_string(), "/{path}: {body}");
        assert_eq!(
            json.get("nodeEligible").is_some(),
            path == "healthz",
            "/{path}: {body}"
        );
    }
    let err = from_pod(&format!("{node}:9403/metrics")).expect_err("metrics are the node's");
    assert!(
        format!("{err:#}").contains("exit status: 7"),
        "refused: {err:#}"
    );
    assert_eq!(
        from_pod(&format!("{node}:10256/metrics")).unwrap(),
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
        "10256",
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

#[test]
fn the_node_s_health_drains_it_while_the_autoscaler_deletes_it() {
    let lab = lab("eligible");
    let get = |path: &str| {
        http_from_client(&lab, &format!("http://{NODE_IP}:10256{path}")).expect("an answer")
    };
    let (code, body) = get("/healthz");
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("\"nodeEligible\":true"), "{body}");
    // The cluster autoscaler marks the node for deletion: a cloud load balancer must drain it,
    // while the kubelet keeps the agent (liveness) and its readiness.
    lab.edit_manifest("node.yaml", |t| {
        format!("{t}spec:\n  taints:\n  - {{key: ToBeDeletedByClusterAutoscaler, value: \"1764633600\", effect: NoSchedule}}\n")
    })
    .unwrap();
    lab.wait_for("/healthz to fail for a node being deleted", || {
        Ok(get("/healthz").0 == "503")
    })
    .unwrap();
    let (_, body) = get("/healthz");
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
    assert_eq!(get("/livez").0, "200", "alive all the same");
    assert_eq!(get("/readyz").0, "200", "and ready");
    lab.edit_manifest("node.yaml", |t| t[..t.find("spec:").unwrap()].to_string())
        .unwrap();
    lab.wait_for("/healthz to pass again", || Ok(get("/healthz").0 == "200"))
        .unwrap();
}

/// A LoadBalancer Service with `externalTrafficPolicy: Local`, its health check on
/// `health_port`, two ready endpoints on the lab's node (the third `third`), one elsewhere.
fn local_load_balancer(health_port: u16, third: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web-lb}}\nspec:\n  type: LoadBalancer\n  \
         clusterIP: 10.96.0.70\n  externalTrafficPolicy: Local\n  healthCheckNodePort: \
         {health_port}\n  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]\n\
         status: {{loadBalancer: {{ingress: [{{ip: 192.0.2.70}}]}}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-lb-1\n  \
         labels: {{kubernetes.io/service-name: web-lb}}\naddressType: IPv4\n\
         ports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n\
         - addresses: [10.244.0.11]\n  conditions: {{ready: true}}\n  nodeName: lab-node\n\
         - addresses: [10.244.0.12]\n  conditions: {{ready: true}}\n  nodeName: lab-node\n\
         - addresses: [10.244.0.13]\n  conditions: {third}\n  nodeName: lab-node\n\
         - addresses: [10.244.9.9]\n  conditions: {{ready: true}}\n  nodeName: another-node\n"
    )
}

#[test]
fn a_cloud_load_balancer_s_health_check_follows_the_node_s_local_endpoints() {
    let lab = lab("hcnp");
    // What a cloud load balancer's prober does: GET any path, read the status and the JSON.
    let probe = |port: u16| -> Option<(String, serde_json::Value)> {
        let (code, body) = http_from_client(&lab, &format!("http://{NODE_IP}:{port}/any/path"))?;
        Some((code, serde_json::from_str(&body).ok()?))
    };
    let endpoints = |port| probe(port).map(|(code, json)| (code, json["localEndpoints"].clone()));
    lab.add_manifest("web-lb.yaml", &local_load_balancer(32100, "{ready: true}"))
        .unwrap();
    lab.wait_for("the health check to answer", || Ok(probe(32100).is_some()))
        .unwrap();
    let (code, json) = probe(32100).unwrap();
    assert_eq!(code, "200", "{json}");
    assert_eq!(json["service"]["namespace"], "default");
    assert_eq!(json["service"]["name"], "web-lb");
    assert_eq!(
        json["localEndpoints"], 3,
        "the node's ready endpoints: {json}"
    );
    assert_eq!(json["serviceProxyHealthy"], true);

    // One terminating: not counted, so that the cloud drains it.
    lab.add_manifest(
        "web-lb.yaml",
        &local_load_balancer(32100, "{ready: false, serving: true, terminating: true}"),
    )
    .unwrap();
    lab.wait_for("the terminating endpoint to leave the count", || {
        Ok(endpoints(32100) == Some(("200".into(), 2.into())))
    })
    .unwrap();

    // No local endpoint: 503, the cloud sends this node nothing.
    let none = local_load_balancer(32100, "{ready: false, serving: true, terminating: true}")
        .replace(
            "ready: true}\n  nodeName: lab-node",
            "ready: false}\n  nodeName: lab-node",
        );
    lab.add_manifest("web-lb.yaml", &none).unwrap();
    lab.wait_for("503 without local endpoints", || {
        Ok(endpoints(32100) == Some(("503".into(), 0.into())))
    })
    .unwrap();

    // The port moves: the old one closes, the new one answers; the Service goes: closed.
    lab.add_manifest("web-lb.yaml", &local_load_balancer(32101, "{ready: true}"))
        .unwrap();
    lab.wait_for("the health check on its new port", || {
        Ok(endpoints(32101) == Some(("200".into(), 3.into())) && probe(32100).is_none())
    })
    .unwrap();
    fs::remove_file(lab.manifests.path().join("web-lb.yaml")).unwrap();
    lab.wait_for("the health check to close with its Service", || {
        Ok(probe(32101).is_none())
    })
    .unwrap();
}

/// A GET of `url` from the client pod: the status code and the body, if anything answered.
fn http_from_client(lab: &Lab, url: &str) -> Option<(String, String)> {
    let out = lab
        .in_client(&[
            "curl",
            "-s",
            "-w",
            "\\n%{http_code}",
            "--max-time",
            "2",
            url,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    (code != "000").then(|| (code.to_string(), body.to_string()))
}
