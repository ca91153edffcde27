//! What the network sends: ICMP and ICMPv6 errors about flows through a VIP (path-MTU
//! discovery), and datagrams in fragments.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_tests::{
    BACKENDS, CLIENT_IP, Lab, UPLOAD, df_datagrams, ipv6_twin, output, reversed_fragments, stat,
    udp_exchange, upload,
};

use super::{DEMO6, DNS_VIP, HTTP_VIP, ipv6::DNS_VIP6, lab};

const CLIENT_IP6: Ipv6Addr = ipv6_twin(CLIENT_IP);

/// The MTU of the node's links toward the backends, under the client's 1,500.
const NARROW_MTU: &str = "1280";

/// Narrows the node's side of every backend's link: the node, as a router, answers a
/// 1,500-byte packet with DF toward a backend with "fragmentation needed".
fn narrow_backend_links(lab: &Lab) {
    for (name, _) in BACKENDS {
        let link = format!("v-{name}");
        output(&mut lab.in_node(&["ip", "link", "set", &link, "mtu", NARROW_MTU]))
            .unwrap_or_else(|e| panic!("narrowing v-{name}: {e:#}"));
    }
}

#[test]
fn path_mtu_discovery_works_through_a_vip_as_straight_to_the_backend() {
    path_mtu_discovery("pmtu", &IPV4);
}

#[test]
fn ipv6_path_mtu_discovery_works_through_a_vip_as_straight_to_the_backend() {
    path_mtu_discovery("pmtu6", &IPV6);
}

/// The VIPs, the client's and the backends' addresses, of one family.
struct Family {
    http_vip: &'static str,
    dns_vip: &'static str,
    client: IpAddr,
    /// A backend's address as a URL's or a socket address's host.
    host: fn(Ipv4Addr) -> String,
}

const IPV4: Family = Family {
    http_vip: HTTP_VIP,
    dns_vip: DNS_VIP,
    client: IpAddr::V4(CLIENT_IP),
    host: |ip| ip.to_string(),
};

const IPV6: Family = Family {
    http_vip: DEMO6.http,
    dns_vip: DNS_VIP6,
    client: IpAddr::V6(CLIENT_IP6),
    host: |ip| format!("[{}]", ipv6_twin(ip)),
};

/// The node, as a router, answers a packet too big for a backend's link with "fragmentation
/// needed" (IPv4) or "packet too big" (IPv6), quoting the packet as it sent it on: translated,
/// the error teaches the client the path's MTU to the VIP as straight to the backend.
fn path_mtu_discovery(tag: &str, family: &Family) {
    let lab = lab(tag);
    narrow_backend_links(&lab);
    // (path, the upload's bytes received, the second DF datagram's fate), direct as control.
    let seen = [
        (
            "direct",
            upload(
                |args| lab.in_client(args),
                &format!("http://{}:8080/", (family.host)(BACKENDS[0].1)),
            ),
            df_datagrams(
                |args| lab.in_client(args),
                &format!("{}:5353", (family.host)(BACKENDS[1].1)),
            ),
        ),
        (
            "through the VIP",
            upload(|args| lab.in_client(args), family.http_vip),
            df_datagrams(|args| lab.in_client(args), family.dns_vip),
        ),
    ];
    let whole = UPLOAD.to_string();
    for (path, received, datagram) in seen {
        assert_eq!(
            (received.as_deref(), datagram.as_str()),
            (Some(whole.as_str()), "EMSGSIZE"),
            "{path}"
        );
    }
    let dump = lab.dump().unwrap();
    assert!(stat(&dump, "icmp_translated") >= 2, "{dump}");
}

#[test]
fn fragmented_datagrams_reach_a_udp_vip_and_fragmented_answers_come_back_from_it() {
    fragmented_datagrams("fragments", &IPV4);
}

#[test]
fn ipv6_fragmented_datagrams_reach_a_udp_vip_and_fragmented_answers_come_back_from_it() {
    fragmented_datagrams("fragments6", &IPV6);
}

/// The UDP Service of `family`, straight to a backend (as control) and through its VIP: (path,
/// `host:port`).
fn dns_paths(family: &Family) -> [(&'static str, String); 2] {
    let backend = format!("{}:5353", (family.host)(BACKENDS[0].1));
    [
        ("direct", backend),
        ("through the VIP", family.dns_vip.to_string()),
    ]
}

fn fragmented_datagrams(tag: &str, family: &Family) {
    let lab = lab(tag);
    // (path, a 4,000-byte query's answer, a 20-byte query's 4,000-byte answer); a 1,500-byte
    // link splits each 4,000-byte datagram in three.
    for (path, address) in &dns_paths(family) {
        let big_query = udp_exchange(|args| lab.in_client(args), address, "hello", 4000);
        let big_answer = udp_exchange(|args| lab.in_client(args), address, "size=4000", 20);
        assert!(
            big_query
                .as_ref()
                .is_some_and(|(_, pod)| pod.starts_with("pod=")),
            "{path}: the 4,000-byte query got {big_query:?}"
        );
        assert_eq!(
            big_answer.as_ref().map(|(len, _)| *len),
            Some(4000),
            "{path}: the 4,000-byte answer"
        );
    }
    let dump = lab.dump().unwrap();
    assert_eq!(stat(&dump, "fragments_unmatched"), 0, "{dump}");
}

#[test]
fn fragments_that_come_before_their_first_wait_for_it() {
    fragments_before_their_first("reorder", &IPV4);
}

#[test]
fn ipv6_fragments_that_come_before_their_first_wait_for_it() {
    fragments_before_their_first("reorder6", &IPV6);
}

fn fragments_before_their_first(tag: &str, family: &Family) {
    let lab = lab(tag);
    // (path, where the answer must come from).
    for (path, address) in &dns_paths(family) {
        let answer = reversed_fragments(|args| lab.in_client(args), family.client, address);
        assert!(
            answer
                .as_deref()
                .is_some_and(|a| a.starts_with(&format!("{address} pod="))),
            "{path}: {answer:?}"
        );
    }
    let dump = lab.dump().unwrap();
    assert_eq!(stat(&dump, "fragments_held"), 2, "{dump}");
}
