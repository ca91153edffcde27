//! IPv6: the lab's Services over their other family (every namespace of the lab has an
//! address of each, `lb_tests::ipv6_twin`), and traffic to a pod's own IPv6 address.

use lb_tests::{ipv6_twin, stat};

use super::*;

const HTTP_VIP6: &str = DEMO6.http;
const STICKY_VIP6: &str = "http://[fd00::10:96:0:11]/";
pub(super) const DNS_VIP6: &str = "[fd00::10:96:0:53]:53";
const ECHO_VIP6: &str = DEMO6.echo;

#[test]
fn ipv6_round_robin_spreads_new_connections_over_the_backends_in_turn() {
    let lab = lab("rr6");
    let pods = curl_pods(&lab, HTTP_VIP6, 6);
    assert_eq!(pods[..3], pods[3..], "in turn: {pods:?}");
    assert_eq!(counts(&pods).len(), 3, "all three backends: {pods:?}");
}

#[test]
fn ipv6_source_hash_keeps_one_client_on_one_backend() {
    let lab = lab("sh6");
    let pods = curl_pods(&lab, STICKY_VIP6, 20);
    assert_eq!(
        counts(&pods).len(),
        1,
        "one backend for one client: {pods:?}"
    );
}

#[test]
fn ipv6_udp_through_the_vip_is_answered_from_it() {
    let lab = lab("udp6");
    let mut pods = Vec::new();
    for _ in 0..6 {
        // socat's socket is connected: an answer from the backend's own address is dropped.
        let answer = lab
            .udp(DNS_VIP6, None)
            .expect("a UDP answer through the IPv6 VIP");
        assert!(answer.contains(&client_prefix(DNS_VIP6)), "{answer}");
        pods.push(pod_of(&answer).expect("pod").to_string());
    }
    assert_eq!(counts(&pods).len(), 3, "every backend answers: {pods:?}");
}

#[test]
fn ipv6_a_service_without_endpoints_rejects_with_a_reset_and_an_icmpv6_unreachable() {
    balancing::rejects_and_counts(
        "reject6",
        (HTTP_VIP6, "[fd00::10:96:0:10]:80/TCP"),
        (DNS_VIP6, "[fd00::10:96:0:53]:53/UDP"),
    );
}

#[test]
fn a_dual_stack_service_serves_both_families_at_once_and_through_a_restart() {
    let mut lab = lab("dual");
    let mut v4 = lab.connect(ECHO_VIP).expect("an IPv4 connection");
    let mut v6 = lab.connect(ECHO_VIP6).expect("an IPv6 connection");
    let mut pods = Vec::new();
    for (connection, target) in [(&mut v4, ECHO_VIP), (&mut v6, ECHO_VIP6)] {
        let answer = connection.ask("hello").expect("an answer");
        assert!(
            answer.contains(&client_prefix(target)),
            "{target}: the backend sees the client of its family: {answer}"
        );
        pods.push(pod_of(&answer).expect("pod").to_string());
    }
    lab.kill_agent();
    lab.start_agent(&[]).expect("a restarted agent");
    for ((connection, family), pod) in [(&mut v4, "IPv4"), (&mut v6, "IPv6")]
        .into_iter()
        .zip(&pods)
    {
        let answer = connection
            .ask("after the restart")
            .unwrap_or_else(|e| panic!("{family}: {e:#}"));
        assert_eq!(pod_of(&answer), Some(pod.as_str()), "{family}: {answer}");
    }
}

#[test]
fn ipv6_to_a_pod_passes_the_node_untouched() {
    let lab = lab("ipv6");
    let before = lab.dump().unwrap();
    let (pod, ip) = BACKENDS[0];
    let (backend, client) = (ipv6_twin(ip), ipv6_twin(CLIENT_IP));
    let url = format!("http://[{backend}]:8080/");
    let http = lab
        .curl(&url)
        .unwrap_or_else(|e| panic!("curl {url}: {e:#}"));
    let target = format!("[{backend}]:5353");
    let udp = lab
        .udp(&target, None)
        .unwrap_or_else(|e| panic!("UDP to {target}: {e:#}"));
    for (what, answer) in [("TCP", &http), ("UDP", &udp)] {
        assert_eq!(pod_of(answer), Some(pod), "{what}: {answer}");
        assert!(
            client_of(answer).is_some_and(|c| c.starts_with(&format!("[{client}]:"))),
            "{what}: the pod sees the client's own IPv6 address: {answer}"
        );
    }
    let after = lab.dump().unwrap();
    for counter in ["forwarded", "replied", "new_flows", "dropped_error"] {
        assert_eq!(
            stat(&after, counter),
            stat(&before, counter),
            "{counter}: the datapath left IPv6 alone\n{after}"
        );
    }
}
