//! What the network sends: ICMP errors about flows through a VIP (path-MTU discovery), and
//! datagrams in fragments.

use lb_tests::{BACKENDS, Lab, output};

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

/// One datagram of `size` bytes (`query`, padded) from a connected UDP socket in the client to
/// `address`, which takes answers from that address only, as a resolver: the answer's length
/// and its first word (the pod), if one came.
fn udp_exchange(lab: &Lab, address: &str, query: &str, size: usize) -> Option<(usize, String)> {
    let (host, port) = address.split_once(':').unwrap();
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         s.settimeout(2)\n\
         s.connect(({host:?}, {port}))\n\
         s.send({query:?}.encode().ljust({size}, b' '))\n\
         answer = s.recv(65535)\n\
         print(len(answer), answer.split()[0].decode())\n"
    );
    let out = output(&mut lab.in_client(&["python3", "-c", &script])).ok()?;
    let (len, pod) = out.trim().split_once(' ')?;
    Some((len.parse().ok()?, pod.to_string()))
}

#[test]
fn fragmented_datagrams_reach_a_udp_vip_and_fragmented_answers_come_back_from_it() {
    let lab = lab("fragments");
    // (path, a 4,000-byte query's answer, a 20-byte query's 4,000-byte answer), the backend
    // straight as control; a 1,500-byte link splits each 4,000-byte datagram in three.
    let backend = format!("{}:5353", BACKENDS[0].1);
    for (path, address) in [("direct", backend.as_str()), ("through the VIP", DNS_VIP)] {
        let big_query = udp_exchange(&lab, address, "hello", 4000);
        let big_answer = udp_exchange(&lab, address, "size=4000", 20);
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

/// A 3,000-byte UDP datagram from the client's port 46000 to `address`, sent as three
/// fragments last first (a raw socket), and the answer's source and pod, if one came.
fn reversed_fragments(lab: &Lab, address: &str) -> Option<String> {
    let (host, port) = address.split_once(':').unwrap();
    let script = format!(
        "import socket, struct\n\
         src, dst, sport, dport = {client:?}, {host:?}, 46000, {port}\n\
         def csum(b):\n    b += b'\\0' * (len(b) % 2)\n    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))\n    \
         while s >> 16:\n        s = (s & 0xffff) + (s >> 16)\n    return ~s & 0xffff\n\
         payload = b'hello'.ljust(3000, b' ')\n\
         length = 8 + len(payload)\n\
         pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack('!BBH', 0, 17, length)\n\
         check = csum(pseudo + struct.pack('!HHHH', sport, dport, length, 0) + payload) or 0xffff\n\
         datagram = struct.pack('!HHHH', sport, dport, length, check) + payload\n\
         rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         rx.bind(('0.0.0.0', sport))\n\
         rx.settimeout(2)\n\
         raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)\n\
         pieces = [datagram[i:i + 1480] for i in range(0, len(datagram), 1480)]\n\
         frags = [struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(p), 0x7777, \
         (0x2000 if i < len(pieces) - 1 else 0) | i * 1480 // 8, 64, 17, 0, \
         socket.inet_aton(src), socket.inet_aton(dst)) + p for i, p in enumerate(pieces)]\n\
         for f in reversed(frags):\n    raw.sendto(f, (dst, 0))\n\
         data, peer = rx.recvfrom(65535)\n\
         print('%s:%d' % peer, data.split()[0].decode())\n",
        client = lb_tests::CLIENT_IP.to_string(),
    );
    output(&mut lab.in_client(&["python3", "-c", &script]))
        .ok()
        .map(|answer| answer.trim().to_string())
}

#[test]
fn fragments_that_come_before_their_first_wait_for_it() {
    let lab = lab("reorder");
    let backend = format!("{}:5353", BACKENDS[0].1);
    // (path, where the answer must come from), the backend straight as control.
    for (path, address) in [("direct", backend.as_str()), ("through the VIP", DNS_VIP)] {
        let answer = reversed_fragments(&lab, address);
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
