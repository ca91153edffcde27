//! Kernel-level tests on the multi-node lab (`lb_tests::cluster`): traffic from outside the
//! cluster through XDP on the nodes' uplinks, in generic and in native mode, fragments and
//! path-MTU discovery from outside, and topology.

use std::collections::BTreeSet;

use lb_tests::{
    UPLOAD, client_of, cluster::ClusterLab, df_datagrams, output, pod_of, reversed_fragments, stat,
    udp_exchange, upload,
};

const MODES: [&str; 2] = ["generic", "native"];

fn curl(lab: &ClusterLab, from: &str, url: &str) -> String {
    // `-g`: an IPv6 address's brackets are no glob.
    let command = ["curl", "-sS", "-g", "--max-time", "5", url];
    let cmd = if from == "outside" {
        lab.outside(&command)
    } else {
        lab.in_pod(from, &command)
    };
    lab.curl(cmd)
        .unwrap_or_else(|e| panic!("curl {url} from {from}: {e:#}\n{}", lab.logs()))
}

fn udp_pods(lab: &ClusterLab, from: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|_| {
            let socat = lab.in_pod(
                from,
                &["socat", "-t", "1", "-T", "1", "-", "UDP4:10.96.0.10:53"],
            );
            let answer = lb_tests::udp_query(socat).unwrap_or_else(|e| format!("{e:#}"));
            pod_of(&answer)
                .unwrap_or_else(|| panic!("no DNS answer from {from}: {answer:?}\n{}", lab.logs()))
                .to_string()
        })
        .collect()
}

#[test]
fn topology_keys_prefer_the_local_endpoint_then_any() {
    let lab = ClusterLab::up("topo", "generic").expect("cluster lab");
    assert_eq!(
        udp_pods(&lab, "client-b", 4),
        BTreeSet::from(["b1".to_string()]),
        "node-b has a local endpoint: only it"
    );
    assert_eq!(
        udp_pods(&lab, "client-a", 6),
        BTreeSet::from(["b1".to_string(), "c1".to_string()]),
        "node-a has none, nor its zone: every endpoint"
    );
}

/// The cluster lab's addresses in one family, as URLs and socat name hosts (IPv6's in
/// brackets).
struct Family {
    node_a: &'static str,
    node_b: &'static str,
    outside: &'static str,
    client_a: &'static str,
    /// web-cluster's ClusterIP.
    web_cluster: &'static str,
    /// socat's UDP address type.
    udp: &'static str,
    /// web-lb's load-balancer IP, routed to node-b, and its pod a1 on node-a.
    lb_ip: &'static str,
    a1: &'static str,
    /// node-a's pod prefix, unbracketed.
    pods_a: &'static str,
}

const IPV4: Family = Family {
    node_a: "10.0.0.1",
    node_b: "10.0.0.2",
    outside: "10.0.0.100",
    client_a: "10.244.1.2",
    web_cluster: "10.96.0.80",
    udp: "UDP4",
    lb_ip: "203.0.113.20",
    a1: "10.244.1.11",
    pods_a: "10.244.1.0/24",
};

const IPV6: Family = Family {
    node_a: "[fd00::10:0:0:1]",
    node_b: "[fd00::10:0:0:2]",
    outside: "[fd00::10:0:0:100]",
    client_a: "[fd00::10:244:1:2]",
    web_cluster: "[fd00::10:96:0:80]",
    udp: "UDP6",
    lb_ip: "[fd00::203:0:113:20]",
    a1: "[fd00::10:244:1:11]",
    pods_a: "fd00::10:244:1:0/112",
};

fn node_ports(mode: &str) {
    let lab = ClusterLab::up(&format!("np{}", &mode[..3]), mode).expect("cluster lab");
    traffic_policies(&lab, mode, &IPV4);

    // An external IP routed to node-a, served by c1 on node-c; a load-balancer IP routed to
    // node-b, served by a1 on node-a.
    let external = curl(&lab, "outside", "http://203.0.113.10/");
    assert_eq!(pod_of(&external), Some("c1"), "{external}");
    let balanced = curl(&lab, "outside", "http://203.0.113.20/");
    assert_eq!(pod_of(&balanced), Some("a1"), "{balanced}");
}

#[test]
fn ipv6_node_ports_snat_or_drop_by_traffic_policy_and_reject_xdp_generic() {
    let lab = ClusterLab::up("np6gen", MODES[0]).expect("cluster lab");
    traffic_policies(&lab, MODES[0], &IPV6);
}

#[test]
fn ipv6_node_ports_snat_or_drop_by_traffic_policy_and_reject_xdp_native() {
    let lab = ClusterLab::up("np6nat", MODES[1]).expect("cluster lab");
    traffic_policies(&lab, MODES[1], &IPV6);
}

/// NodePorts from outside by `externalTrafficPolicy`, rejects, and a pod's reply by the uplink,
/// over `family`.
fn traffic_policies(lab: &ClusterLab, mode: &str, family: &Family) {
    let Family {
        node_a,
        node_b,
        outside,
        client_a,
        web_cluster,
        udp,
        ..
    } = family;
    // externalTrafficPolicy Cluster: through node-a to b1 on node-b, SNATed to node-a.
    let via_a = curl(lab, "outside", &format!("http://{node_a}:30080/"));
    assert_eq!(pod_of(&via_a), Some("b1"), "{via_a}");
    let seen = client_of(&via_a).unwrap();
    assert!(
        seen.starts_with(&format!("{node_a}:6")),
        "SNATed to node-a's SNAT ports: {seen}"
    );
    // Through node-b, b1 is local: the client's own address.
    let via_b = curl(lab, "outside", &format!("http://{node_b}:30080/"));
    assert_eq!(pod_of(&via_b), Some("b1"), "{via_b}");
    assert!(
        client_of(&via_b)
            .unwrap()
            .starts_with(&format!("{outside}:")),
        "{via_b}"
    );

    // externalTrafficPolicy Local: node-b serves, keeping the client's address; node-a drops.
    let local = curl(lab, "outside", &format!("http://{node_b}:30081/"));
    assert!(
        client_of(&local)
            .unwrap()
            .starts_with(&format!("{outside}:")),
        "{local}"
    );
    let url = format!("http://{node_a}:30081/");
    let dropped = lab.curl(lab.outside(&["curl", "-sS", "-g", "--max-time", "2", &url]));
    let dropped = format!("{:#}", dropped.expect_err("node-a has no local endpoint"));
    assert!(
        dropped.contains("exit status: 28"),
        "dropped, not refused: {dropped}"
    );
    let dump = lab.dump("node-a").unwrap();
    assert!(
        stat(&dump, "dropped_no_backend") > 0,
        "the drop is counted:\n{dump}"
    );

    // No endpoint anywhere: refused at once, by a TCP reset and an ICMP port unreachable sent
    // back from the uplink with XDP_TX. Checked in generic mode: on native XDP over veth, a
    // frame sent back with XDP_TX waits in the peer's NAPI until the next frame arrives (seen:
    // 1 to 7 s), which a NIC does not do.
    if mode == "generic" {
        let url = format!("http://{node_a}:30090/");
        let refused = lab.curl(lab.outside(&["curl", "-sS", "-g", "--max-time", "2", &url]));
        let refused = format!("{:#}", refused.expect_err("no endpoint"));
        assert!(
            refused.contains("exit status: 7"),
            "refused, not timed out: {refused}"
        );
        let target = format!("{udp}:{node_a}:30090");
        let answer =
            lb_tests::udp_query(lab.outside(&["socat", "-t", "1", "-T", "1", "-", &target]));
        let answer = format!("{:#}", answer.expect_err("no endpoint"));
        assert!(answer.contains("Connection refused"), "{answer}");
    }

    // A pod on node-a reaching a ClusterIP served on node-b: the reply comes back by node-a's
    // uplink and is reverse-NATed on the way out to the pod.
    let inside = curl(lab, "client-a", &format!("http://{web_cluster}/"));
    assert_eq!(pod_of(&inside), Some("b1"), "{inside}");
    assert!(
        client_of(&inside)
            .unwrap()
            .starts_with(&format!("{client_a}:")),
        "{inside}"
    );
}

#[test]
fn node_ports_external_ips_and_load_balancer_ips_xdp_generic() {
    node_ports(MODES[0]);
}

#[test]
fn node_ports_external_ips_and_load_balancer_ips_xdp_native() {
    node_ports(MODES[1]);
}

#[test]
fn fragments_from_outside_wait_for_their_first_and_fragmented_answers_come_back_xdp_generic() {
    fragments_from_outside("fraggen", MODES[0], &IPV4);
}

#[test]
fn fragments_from_outside_wait_for_their_first_and_fragmented_answers_come_back_xdp_native() {
    fragments_from_outside("fragnat", MODES[1], &IPV4);
}

#[test]
fn ipv6_fragments_from_outside_wait_for_their_first_and_fragmented_answers_come_back_xdp_generic() {
    fragments_from_outside("frag6gen", MODES[0], &IPV6);
}

#[test]
fn ipv6_fragments_from_outside_wait_for_their_first_and_fragmented_answers_come_back_xdp_native() {
    fragments_from_outside("frag6nat", MODES[1], &IPV6);
}

fn fragments_from_outside(tag: &str, mode: &str, family: &Family) {
    let lab = ClusterLab::up(tag, mode).expect("cluster lab");
    let outside_ip = family.outside.trim_matches(['[', ']']).parse().unwrap();
    // The load-balancer IP's UDP port, routed to node-b and served by a1 on node-a (SNATed),
    // and the same through node-b's NodePort.
    let paths = [
        ("the load-balancer IP", format!("{}:53", family.lb_ip)),
        ("node-b's NodePort", format!("{}:30083", family.node_b)),
    ];
    for (path, address) in &paths {
        let address = address.as_str();
        // In order, as control: the kernel fragments 4,000 bytes on the 1,500-byte link.
        let in_order = udp_exchange(|args| lab.outside(args), address, "hello", 4000);
        assert_eq!(
            in_order.as_ref().map(|(_, pod)| pod.as_str()),
            Some("pod=a1"),
            "{path}, in order\n{}",
            lab.logs()
        );
        let reversed = reversed_fragments(|args| lab.outside(args), outside_ip, address);
        assert_eq!(
            reversed.as_deref(),
            Some(format!("{address} pod=a1").as_str()),
            "{path}, last fragment first\n{}",
            lab.logs()
        );
        // A 4,000-byte answer, fragmented by a1, reverse-NATed fragment by fragment on node-b.
        let big_answer = udp_exchange(|args| lab.outside(args), address, "size=4000", 20);
        assert_eq!(
            big_answer.as_ref().map(|(len, _)| *len),
            Some(4000),
            "{path}: the 4,000-byte answer"
        );
    }
    let dump = lab.dump("node-b").unwrap();
    assert_eq!(
        stat(&dump, "fragments_held"),
        4,
        "two of each reversed datagram\n{dump}"
    );
    assert_eq!(stat(&dump, "fragments_unmatched"), 0, "{dump}");
}

#[test]
fn path_mtu_discovery_works_through_a_snated_load_balancer_ip_as_straight_to_the_backend_xdp_generic()
 {
    path_mtu_discovery("pmtugen", MODES[0], &IPV4);
}

#[test]
fn path_mtu_discovery_works_through_a_snated_load_balancer_ip_as_straight_to_the_backend_xdp_native()
 {
    path_mtu_discovery("pmtunat", MODES[1], &IPV4);
}

#[test]
fn ipv6_path_mtu_discovery_works_through_a_snated_load_balancer_ip_as_straight_to_the_backend_xdp_generic()
 {
    path_mtu_discovery("pmtu6gen", MODES[0], &IPV6);
}

#[test]
fn ipv6_path_mtu_discovery_works_through_a_snated_load_balancer_ip_as_straight_to_the_backend_xdp_native()
 {
    path_mtu_discovery("pmtu6nat", MODES[1], &IPV6);
}

fn path_mtu_discovery(tag: &str, mode: &str, family: &Family) {
    let lab = ClusterLab::up(tag, mode).expect("cluster lab");
    // node-b's route to node-a's pods narrowed: node-b, as a router, answers a 1,500-byte
    // packet with DF toward a1 with "fragmentation needed" ("packet too big"), to the packet's
    // source; for the load-balancer IP's flows, SNATed, that is node-b itself. The outside
    // client routes node-a's pods through node-b too, for the straight path.
    let (node_a, node_b) = (family.node_a, family.node_b);
    let (node_a, node_b) = (
        node_a.trim_matches(['[', ']']),
        node_b.trim_matches(['[', ']']),
    );
    let narrowed = [
        "ip",
        "route",
        "replace",
        family.pods_a,
        "via",
        node_a,
        "mtu",
        "1280",
    ];
    let routes = [
        lab.in_pod("node-b", &narrowed),
        lab.outside(&["ip", "route", "add", family.pods_a, "via", node_b]),
    ];
    for mut route in routes {
        output(&mut route).unwrap_or_else(|e| panic!("{route:?}: {e:#}"));
    }
    // (path, URL, UDP address), straight as control. A host learns a path's MTU per
    // destination: the datagrams go first, and through node-b they go to its NodePort, so
    // that the upload to the load-balancer IP learns it on its own.
    let paths = [
        (
            "straight to a1 through node-b",
            format!("http://{}:8080/", family.a1),
            format!("{}:5353", family.a1),
        ),
        (
            "through node-b's load-balancer IP and NodePort, SNATed",
            format!("http://{}/", family.lb_ip),
            format!("{}:30083", family.node_b),
        ),
    ];
    let whole = UPLOAD.to_string();
    for (path, url, address) in &paths {
        let datagram = df_datagrams(|args| lab.outside(args), address);
        let received = upload(|args| lab.outside(args), url);
        assert_eq!(
            (received.as_deref(), datagram.as_str()),
            (Some(whole.as_str()), "EMSGSIZE"),
            "{path}\n{}",
            lab.logs()
        );
    }
    let dump = lab.dump("node-b").unwrap();
    assert!(
        stat(&dump, "icmp_translated") >= 2,
        "the datagram's and the upload's, at least\n{dump}"
    );
}
