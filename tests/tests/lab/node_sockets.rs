//! The node's own sockets: balanced at connect and sendmsg, the VIP named back.

use super::*;

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

#[test]
fn ipv6_the_node_itself_reaches_cluster_ips() {
    let lab = lab("host6");
    let before = lab.dump().unwrap();
    let node = lb_tests::ipv6_twin(NODE_IP);
    let pods: Vec<String> = (0..3)
        .map(|_| {
            let answer = lb_tests::output(&mut lab.in_node(&[
                "curl",
                "-sS",
                "-g",
                "--max-time",
                "5",
                "http://[fd00::10:96:0:10]/",
            ]))
            .expect("curl from the node over IPv6");
            assert!(
                client_of(&answer)
                    .unwrap()
                    .starts_with(&format!("[{node}]:")),
                "the backend sees the node's IPv6 address: {answer}"
            );
            pod_of(&answer).unwrap().to_string()
        })
        .collect();
    assert_eq!(
        counts(&pods).len(),
        3,
        "round robin from the node too: {pods:?}"
    );
    // Unconnected UDP, as resolvers send, to the IPv6 ClusterIP and to the IPv4 one mapped:
    // each answer must read as from the address sent to.
    for vip in ["fd00::10:96:0:53", "::ffff:10.96.0.53"] {
        let sendto = format!(
            "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); \
             s.settimeout(3); s.sendto(b'query', ('{vip}', 53)); \
             data, source = s.recvfrom(1500); print(source[0], source[1], data.decode())"
        );
        let answer = lb_tests::output(&mut lab.in_node(&["python3", "-c", &sendto]))
            .unwrap_or_else(|e| panic!("unconnected UDP from the node to {vip}: {e:#}"));
        assert!(answer.starts_with(&format!("{vip} 53 pod=")), "{answer}");
    }
    let after = lab.dump().unwrap();
    assert_eq!(
        stat(&after, "socket_rewrites"),
        stat(&before, "socket_rewrites") + 5,
        "{after}"
    );
}

/// On the node: a connected UDP socket and a TCP connection to frontends (`{dns}` and
/// `{http}`, sockets of `{family}`); prints what `getpeername()` names and the pod that
/// answered the datagram, then, after a line on stdin, what the UDP socket's next exchange
/// gives and the pod that a new connected socket reaches.
const NODE_SOCKETS: &str = r#"
import errno, socket, sys
def connected():
    udp = socket.socket(socket.{family}, socket.SOCK_DGRAM)
    udp.settimeout(3)
    udp.connect(("{dns}", 53))
    return udp
def ask(udp):
    udp.send(b"query")
    return udp.recv(1500).decode().split()[0]
udp = connected()
tcp = socket.socket(socket.{family}, socket.SOCK_STREAM)
tcp.settimeout(3)
tcp.connect(("{http}", 80))
peer = lambda s: "%s:%d" % s.getpeername()[:2]
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
    node_sockets_leave_a_removed_backend("nodesock", "AF_INET", ("10.96.0.53", "10.96.0.10"));
}

#[test]
fn ipv6_the_node_s_sockets_name_the_vip_and_a_connected_udp_socket_leaves_a_removed_backend() {
    node_sockets_leave_a_removed_backend(
        "nodesock6",
        "AF_INET6",
        ("fd00::10:96:0:53", "fd00::10:96:0:10"),
    );
}

/// An IPv6 socket that dials an IPv4 Service by its mapped address (`::ffff:10.96.0.53`), as a
/// dual-stack socket does, is balanced as IPv4's: its backend is handed back mapped.
#[test]
fn a_mapped_address_the_node_s_ipv6_sockets_dial_is_the_ipv4_service() {
    node_sockets_leave_a_removed_backend(
        "nodesockm",
        "AF_INET6",
        ("::ffff:10.96.0.53", "::ffff:10.96.0.10"),
    );
}

/// The node's connected sockets of `family` to the DNS and HTTP ClusterIPs `vips` name them,
/// and the UDP one is reset when its backend is removed.
fn node_sockets_leave_a_removed_backend(tag: &str, family: &str, (dns, http): (&str, &str)) {
    let lab = lab(tag);
    let source = NODE_SOCKETS
        .replace("{family}", family)
        .replace("{dns}", dns)
        .replace("{http}", http);
    let mut script = Script::start(lab.in_node(&["python3", "-c", &source]));
    let first = script.line();
    assert!(
        first.starts_with(&format!("udp={dns}:53 tcp={http}:80 pod=")),
        "getpeername() names what was dialled: {first}"
    );
    let pod = first.rsplit("pod=").next().unwrap().to_string();
    let ip = ip_of(&pod);
    // A mapped address is the IPv4 Service's, whose endpoints are IPv4's.
    let slice = if family == "AF_INET6" && !dns.starts_with("::ffff:") {
        &DEMO6
    } else {
        &DEMO
    };
    lab.edit_manifest("demo-dns.yaml", |t| {
        remove_endpoint(&t, &slice.endpoint(ip))
    })
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
