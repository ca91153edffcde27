//! Connections through endpoint changes: scale-down, readiness, termination, removal, idle timeouts, a Service deleted.

use super::*;

#[test]
fn scale_down_spares_established_connections_and_stops_new_ones() {
    scale_down_spares_established_connections("scale", &DEMO);
}

#[test]
fn ipv6_scale_down_spares_established_connections_and_stops_new_ones() {
    scale_down_spares_established_connections("scale6", &DEMO6);
}

/// A keep-alive connection to `demo` in one family survives its scale from 3 to 2, and new
/// connections reach the survivors only.
fn scale_down_spares_established_connections(tag: &str, demo: &Demo) {
    let lab = lab(tag);
    let mut held = lab.connect(demo.echo).expect("connect to the echo VIP");
    let first = held.ask("hello").expect("echo through the VIP");
    let held_pod = pod_of(&first).expect("pod").to_string();
    let (removed_pod, removed_ip) = BACKENDS
        .iter()
        .find(|(name, _)| *name != held_pod)
        .copied()
        .unwrap();

    lab.edit_manifest("demo.yaml", |t| {
        remove_endpoint(&t, &demo.endpoint(removed_ip))
    })
    .unwrap();
    lab.wait_for_dump("demo's frontends to shrink to two backends", |d| {
        backend_count(d, demo.http_frontend) == Some(2)
            && backend_count(d, demo.echo_frontend) == Some(2)
    })
    .unwrap();

    let pods = curl_pods(&lab, demo.http, 9);
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
fn an_endpoint_that_stops_being_ready_gets_no_new_connections() {
    not_ready_gets_no_new_connections("ready", &DEMO);
}

#[test]
fn ipv6_an_endpoint_that_stops_being_ready_gets_no_new_connections() {
    not_ready_gets_no_new_connections("ready6", &DEMO6);
}

fn not_ready_gets_no_new_connections(tag: &str, demo: &Demo) {
    let lab = lab(tag);
    let (pod, ip) = BACKENDS[1];
    lab.edit_manifest("demo.yaml", |t| set_not_ready(&t, &demo.endpoint(ip)))
        .unwrap();
    wait_for_backends(&lab, demo.http_frontend, 2);
    let pods = curl_pods(&lab, demo.http, 9);
    assert!(
        !pods.iter().any(|p| p == pod),
        "{pod} is not ready, got {pods:?}"
    );
    assert_eq!(counts(&pods).len(), 2, "{pods:?}");
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
fn deleting_a_service_spares_its_established_connections() {
    let lab = lab("delete");
    let mut held = lab.connect(ECHO_VIP).expect("connect to the echo VIP");
    let first = held.ask("before").expect("echo through the VIP");
    fs::remove_file(lab.manifests.path().join("demo.yaml")).unwrap();
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
