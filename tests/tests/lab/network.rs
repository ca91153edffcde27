//! What the network sends: ICMP errors about flows through a VIP (path-MTU discovery), and
//! datagrams in fragments.

use lb_tests::{BACKENDS, CLIENT_IP, Lab, output, reversed_fragments, udp_exchange};

use super::{DNS_VIP, HTTP_VIP, lab};

/// The MTU of the node's links toward the backends, under the client's 1,500.
const NARROW_MTU: &str = "1280";
const UPLOAD: usize = 1 << 20;

/// Narrows the node's side of every backend's link: the node, as a router, answers a
/// 1,500-byte packet with DF toward a backend with "fragmentation needed".
fn narrow_backend_links(lab: &Lab) {
    for (name, _) in BACKENDS {
        let link = format!("v-{name}");
        output(&mut lab.in_node(&["ip", "link", "set", &link, "mtu", NARROW_MTU]))
            .unwrap_or_else(|e| panic!("narrowing v-{name}: {e:#}"));
    }
}

/// A 1 MiB POST from the client to `url`: what the server says it received, if it answered.
fn upload(lab: &Lab, url: &str) -> Option<String> {
    let script = format!(
        "import urllib.request\n\
         req = urllib.request.Request({url:?}, data=b'x' * {UPLOAD}, method='POST')\n\
         print(urllib.request.urlopen(req, timeout=8).read().decode().strip())\n"
    );
    let answer = output(&mut lab.in_client(&["python3", "-c", &script])).ok()?;
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("received="))
        .map(str::to_string)
}

/// Two 1,400-byte UDP datagrams with DF to `address` from a connected socket, a moment apart:
/// how the second send went (`EMSGSIZE` once an ICMP error taught the socket the path's MTU).
fn df_datagrams(lab: &Lab, address: &str) -> String {
    let (host, port) = address.split_once(':').unwrap();
    let script = format!(
        "import errno, socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         # IP_MTU_DISCOVER, IP_PMTUDISC_DO: Python names neither.\n\
         s.setsockopt(socket.IPPROTO_IP, 10, 2)\n\
         s.connect(({host:?}, {port}))\n\
         s.send(b'x' * 1372)\n\
         time.sleep(0.5)\n\
         try:\n    s.send(b'x' * 1372)\n    print('sent')\n\
         except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    );
    output(&mut lab.in_client(&["python3", "-c", &script]))
        .unwrap_or_else(|e| panic!("the DF datagrams to {address}: {e:#}"))
        .trim()
        .to_string()
}

#[test]
fn path_mtu_discovery_works_through_a_vip_as_straight_to_the_backend() {
    let lab = lab("pmtu");
    narrow_backend_links(&lab);
    // (path, the upload's bytes received, the second DF datagram's fate), direct as control.
    let seen = [
        (
            "direct",
            upload(&lab, &format!("http://{}:8080/", BACKENDS[0].1)),
            df_datagrams(&lab, &format!("{}:5353", BACKENDS[1].1)),
        ),
        (
            "through the VIP",
            upload(&lab, HTTP_VIP),
            df_datagrams(&lab, DNS_VIP),
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
    assert!(super::stat(&dump, "icmp_translated") >= 2, "{dump}");
}

#[test]
fn fragmented_datagrams_reach_a_udp_vip_and_fragmented_answers_come_back_from_it() {
    let lab = lab("fragments");
    // (path, a 4,000-byte query's answer, a 20-byte query's 4,000-byte answer), the backend
    // straight as control; a 1,500-byte link splits each 4,000-byte datagram in three.
    let backend = format!("{}:5353", BACKENDS[0].1);
    for (path, address) in [("direct", backend.as_str()), ("through the VIP", DNS_VIP)] {
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
    assert_eq!(super::stat(&dump, "fragments_unmatched"), 0, "{dump}");
}

#[test]
fn fragments_that_come_before_their_first_wait_for_it() {
    let lab = lab("reorder");
    let backend = format!("{}:5353", BACKENDS[0].1);
    // (path, where the answer must come from), the backend straight as control.
    for (path, address) in [("direct", backend.as_str()), ("through the VIP", DNS_VIP)] {
        let answer = reversed_fragments(|args| lab.in_client(args), CLIENT_IP, address);
        assert!(
            answer
                .as_deref()
                .is_some_and(|a| a.starts_with(&format!("{address} pod="))),
            "{path}: {answer:?}"
        );
    }
    let dump = lab.dump().unwrap();
    assert_eq!(super::stat(&dump, "fragments_held"), 2, "{dump}");
}
