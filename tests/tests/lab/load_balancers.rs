//! Load-balancer IPs: `loadBalancerSourceRanges`, enforced on every path to the IP.

use std::fs;

use lb_tests::{Lab, NODE_IP, pod_of};

use super::{lab_with, stat, wait_for_backends};

const LB_IP: &str = "192.0.2.80";

/// The demo Service as a LoadBalancer at [`LB_IP`] (ClusterIP 10.96.0.16), taking only
/// `ranges`.
fn ranged_demo(ranges: &str) -> String {
    fs::read_to_string(lb_tests::workspace_root().join("deploy/examples/demo.yaml"))
        .unwrap()
        .replace("name: demo\n", "name: demo-lb\n")
        .replace(
            "kubernetes.io/service-name: demo\n",
            "kubernetes.io/service-name: demo-lb\n",
        )
        .replace("name: demo-abc12", "name: demo-lb-q8w2e")
        .replace("10.96.0.10", "10.96.0.16")
        .replace(
            "  type: ClusterIP\n",
            &format!("  type: LoadBalancer\n  loadBalancerSourceRanges: {ranges}\n"),
        )
        .replacen(
            "\n---\n",
            &format!("\nstatus: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}\n---\n"),
            1,
        )
}

/// Whether a GET of `url` from the node itself is answered.
fn node_reaches(lab: &Lab, url: &str) -> bool {
    lb_tests::output(&mut lab.in_node(&["curl", "-sS", "--max-time", "2", url])).is_ok()
}

#[test]
fn load_balancer_source_ranges_admit_only_their_sources_on_every_path() {
    // The node's own sockets are checked as coming from its address.
    let node_ip = NODE_IP.to_string();
    let lab = lab_with("ranges", &["--node-ip", &node_ip]);
    let url = format!("http://{LB_IP}/");
    lab.add_manifest("demo-lb.yaml", &ranged_demo("[10.244.0.2/32]"))
        .unwrap();
    wait_for_backends(&lab, &format!("{LB_IP}:80/TCP"), 3);

    // The client is in the range; a pod (the hairpin path) and the node are not. The ranges
    // are the load-balancer IP's: the same Service's ClusterIP takes everyone.
    let answer = lab.curl(&url).expect("the client, inside the range");
    assert!(pod_of(&answer).is_some(), "{answer}");
    assert!(
        lab.curl_from("demo-1", &url).is_err(),
        "a pod outside the range reached the load-balancer IP"
    );
    assert!(
        !node_reaches(&lab, &url),
        "the node, outside the range, reached the load-balancer IP"
    );
    lab.curl_from("demo-1", "http://10.96.0.16/")
        .expect("the ClusterIP, which has no ranges");
    let dropped = stat(&lab.dump().unwrap(), "dropped_source_range");
    assert!(dropped >= 1, "drops not counted: {dropped}");

    // An established connection from the client, then ranges without it: it goes on, as
    // kube-proxy's firewall checks new connections only, but a new one is dropped; the node
    // (10.0.0.1) and demo-1 are now let in.
    let mut connection = lab.connect(&format!("{LB_IP}:9000")).unwrap();
    let echoed = connection.ask("before").unwrap();
    assert!(echoed.starts_with("before "), "{echoed}");
    lab.add_manifest(
        "demo-lb.yaml",
        &ranged_demo("[10.0.0.0/24, 10.244.0.11/32]"),
    )
    .unwrap();
    lab.wait_for_dump("the new ranges", |d| d.contains("SRC=10.0.0.0/24 ALLOW"))
        .unwrap();
    let echoed = connection
        .ask("after")
        .expect("the established connection, after the ranges narrowed");
    assert!(echoed.starts_with("after "), "{echoed}");
    assert!(lab.curl(&url).is_err(), "the client, now outside, got in");
    let answer = lab.curl_from("demo-1", &url).expect("demo-1, now inside");
    assert!(pod_of(&answer).is_some(), "{answer}");
    assert!(node_reaches(&lab, &url), "the node, now inside, kept out");
}
