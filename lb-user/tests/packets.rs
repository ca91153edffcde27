//! The datapath as data, as Katran's test fixtures are: the real eBPF object loaded into this
//! kernel (attached nowhere), its maps programmed through the agent's own plan, and for each
//! row a crafted packet run through a program with `BPF_PROG_TEST_RUN`, the verdict it must
//! return, the packet it must leave (byte for byte, checksums included) and the counter it must
//! move by one, or none. Rows run in order over one datapath: a flow's later packets follow
//! its first. Root only: run through `cargo xtask test`.

use std::{net::Ipv4Addr, sync::Arc};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::maps::{Config, Stats};
use lb_tests::packet::{
    TCP_ACK, TCP_RST, TCP_SYN, UDP, addr, checksum, checksums_valid, packet, port,
};
use lb_user::{
    datapath::{self, Datapath, TC_ACT_OK, XDP_PASS},
    maps::MapWrites as _,
    model::{self, Algorithm, FrontendKind, Protocol, Scope, WhenEmpty},
    plan::{self, MapEntries},
};

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const NODE: &str = "packets-node";
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
/// A ClusterIP whose Service has no endpoint: new flows are rejected.
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const LOAD_BALANCER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
const DNS: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 12);
const NOWHERE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// A load-balancer IP whose backend runs on another node: flows from outside are SNATed.
const REMOTE_LB_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 5, 11);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The node's address, that SNATed flows leave with, and its one SNAT port: a range of one
/// makes the port a row can name.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const SNAT_PORT: u16 = 61_000;

/// Which program a row's packet goes through.
#[derive(Clone, Copy, Debug)]
enum Hook {
    /// Pod-facing ingress: balancing of traffic from the cluster.
    TcIngress,
    /// Egress: reverse NAT of replies.
    TcEgress,
    /// Uplink: balancing of traffic from outside.
    Xdp,
}

/// The packet a row's program must leave.
enum Out {
    /// Byte for byte.
    Packet(Vec<u8>),
    /// The input, untouched.
    Unchanged,
    /// Checked by a function: answers built in place (a reset) whose every byte is not the
    /// row's to fix.
    Check(fn(&[u8]) -> Result<(), String>),
}

/// Every counter of [`Stats`], by name: a field added to it must be named here.
fn counters(stats: &Stats) -> [(&'static str, u64); 11] {
    let Stats {
        forwarded,
        replied,
        new_flows,
        reselected,
        dropped_no_backend,
        rejected_no_backend,
        dropped_error,
        snat_flows,
        dropped_no_snat,
        dropped_unknown_port,
        socket_rewrites,
    } = *stats;
    [
        ("forwarded", forwarded),
        ("replied", replied),
        ("new_flows", new_flows),
        ("reselected", reselected),
        ("dropped_no_backend", dropped_no_backend),
        ("rejected_no_backend", rejected_no_backend),
        ("dropped_error", dropped_error),
        ("snat_flows", snat_flows),
        ("dropped_no_snat", dropped_no_snat),
        ("dropped_unknown_port", dropped_unknown_port),
        ("socket_rewrites", socket_rewrites),
    ]
}

struct Row {
    what: &'static str,
    hook: Hook,
    input: Vec<u8>,
    verdict: u32,
    out: Out,
    /// The counters that move by one (and `forwarded` with `new_flows`, for a new flow's first
    /// packet); none of the others moves.
    counts: &'static [&'static str],
}

/// A frontend of `service` at `address:port` over `backends`, as the model makes them.
fn frontend(
    service: &str,
    address: Ipv4Addr,
    port: u16,
    protocol: Protocol,
    scope: Scope,
    backends: &[(Ipv4Addr, u16)],
) -> Arc<model::Frontend> {
    Arc::new(model::Frontend {
        service: format!("default/{service}"),
        created: None,
        port_name: String::new(),
        kind: match scope {
            Scope::Internal => FrontendKind::ClusterIP,
            Scope::External => FrontendKind::LoadBalancer,
        },
        scope,
        address,
        port,
        protocol,
        algorithm: Algorithm::RoundRobin,
        affinity_timeout: None,
        when_empty: WhenEmpty::Reject,
        rule: "ready endpoints".into(),
        backends: backends
            .iter()
            .map(|&(address, port)| model::Backend {
                address,
                port,
                node: Some(NODE.into()),
                zone: None,
            })
            .collect(),
        retained: Vec::new(),
    })
}

/// `frontend` with its backends on another node.
fn remote(frontend: Arc<model::Frontend>) -> Arc<model::Frontend> {
    let mut frontend = Arc::unwrap_or_clone(frontend);
    for backend in &mut frontend.backends {
        backend.node = Some("another-node".into());
    }
    Arc::new(frontend)
}

fn programme() -> Vec<Arc<model::Frontend>> {
    vec![
        frontend(
            "web",
            CLUSTER_IP,
            80,
            Protocol::Tcp,
            Scope::Internal,
            &[(WEB, 8080)],
        ),
        frontend(
            "dns",
            DNS_IP,
            53,
            Protocol::Udp,
            Scope::Internal,
            &[(DNS, 5353)],
        ),
        frontend("empty", EMPTY_IP, 80, Protocol::Tcp, Scope::Internal, &[]),
        frontend("empty", EMPTY_IP, 53, Protocol::Udp, Scope::Internal, &[]),
        frontend(
            "web",
            LOAD_BALANCER_IP,
            80,
            Protocol::Tcp,
            Scope::External,
            &[(WEB, 8080)],
        ),
        remote(frontend(
            "far",
            REMOTE_LB_IP,
            80,
            Protocol::Tcp,
            Scope::External,
            &[(REMOTE, 8080)],
        )),
    ]
}

/// A reset from the ClusterIP of the empty Service to the client's port 40003, as the
/// kernel's own (RST with ACK, acknowledging the SYN), checksums valid.
fn reset_to_client(p: &[u8]) -> Result<(), String> {
    let seen = (addr(p, 26), port(p, 34), addr(p, 30), port(p, 36), p[47]);
    let wanted = (EMPTY_IP, 80, CLIENT, 40003, TCP_RST | TCP_ACK);
    if seen != wanted {
        return Err(format!("{seen:?}, not {wanted:?}"));
    }
    let seq = u32::from_be_bytes([p[38], p[39], p[40], p[41]]);
    let ack = u32::from_be_bytes([p[42], p[43], p[44], p[45]]);
    if (seq, ack) != (0, 2) {
        return Err(format!(
            "sequence {seq} acknowledging {ack}, not 0 acknowledging the SYN's 1 + 1"
        ));
    }
    if !checksums_valid(p) {
        return Err("checksums do not verify".into());
    }
    Ok(())
}

/// An ICMP port unreachable from the empty Service's ClusterIP to the client, quoting the
/// datagram's IPv4 header and its first 8 bytes, IPv4 checksum valid.
fn unreachable_to_client(p: &[u8]) -> Result<(), String> {
    let seen = (p[23], addr(p, 26), addr(p, 30), p[34], p[35]);
    let wanted = (1, EMPTY_IP, CLIENT, 3, 3);
    if seen != wanted {
        return Err(format!(
            "(protocol, from, to, type, code) {seen:?}, not {wanted:?}"
        ));
    }
    let quoted = &p[42..];
    if quoted.len() < 28 || addr(quoted, 16) != EMPTY_IP || port(quoted, 22) != 53 {
        return Err(format!("quotes {quoted:02x?}"));
    }
    if checksum(&p[14..34], 0) != 0 || checksum(&p[34..], 0) != 0 {
        return Err("the IPv4 or the ICMP checksum does not verify".into());
    }
    Ok(())
}

/// `p` with an IPv4 total length of 0, as BIG TCP sends a datagram over 64 KiB, and its IPv4
/// checksum to match.
fn big_tcp(p: Vec<u8>) -> Vec<u8> {
    with(p, |p| {
        p[16..18].fill(0);
        p[24..26].fill(0);
        let sum = checksum(&p[14..34], 0);
        p[24..26].copy_from_slice(&sum.to_be_bytes());
    })
}

fn with(p: Vec<u8>, change: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut p = p;
    change(&mut p);
    p
}

fn rows() -> Vec<Row> {
    let syn = packet(TCP_SYN, CLIENT, CLUSTER_IP, 40000, 80);
    vec![
        Row {
            what: "a TCP SYN to a ClusterIP: DNAT to its backend",
            hook: Hook::TcIngress,
            input: syn.clone(),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLIENT, WEB, 40000, 8080)),
            counts: &["new_flows"],
        },
        Row {
            what: "the flow's next packet: the same backend, no new flow",
            hook: Hook::TcIngress,
            input: packet(TCP_ACK, CLIENT, CLUSTER_IP, 40000, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_ACK, CLIENT, WEB, 40000, 8080)),
            counts: &["forwarded"],
        },
        Row {
            what: "the backend's answer, leaving: its source back to the ClusterIP",
            hook: Hook::TcEgress,
            input: packet(TCP_SYN | TCP_ACK, WEB, CLIENT, 8080, 40000),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN | TCP_ACK, CLUSTER_IP, CLIENT, 80, 40000)),
            counts: &["replied"],
        },
        Row {
            what: "a UDP datagram to a ClusterIP: DNAT to its backend",
            hook: Hook::TcIngress,
            input: packet(UDP, CLIENT, DNS_IP, 40001, 53),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(UDP, CLIENT, DNS, 40001, 5353)),
            counts: &["new_flows"],
        },
        Row {
            what: "a TCP SYN to a load-balancer IP, from outside: DNAT to the local backend",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, CLIENT, LOAD_BALANCER_IP, 40002, 80),
            verdict: XDP_PASS,
            out: Out::Packet(packet(TCP_SYN, CLIENT, WEB, 40002, 8080)),
            counts: &["new_flows"],
        },
        Row {
            what: "from outside to a backend on another node: DNAT, and SNAT to the node",
            hook: Hook::Xdp,
            input: packet(TCP_SYN, OUTSIDE, REMOTE_LB_IP, 40010, 80),
            verdict: XDP_PASS,
            out: Out::Packet(packet(TCP_SYN, NODE_IP, REMOTE, SNAT_PORT, 8080)),
            counts: &["new_flows", "snat_flows"],
        },
        Row {
            what: "that backend's answer, arriving: back to the client, from the load-balancer IP",
            hook: Hook::Xdp,
            input: packet(TCP_SYN | TCP_ACK, REMOTE, NODE_IP, 8080, SNAT_PORT),
            verdict: XDP_PASS,
            out: Out::Packet(packet(TCP_SYN | TCP_ACK, REMOTE_LB_IP, OUTSIDE, 80, 40010)),
            counts: &["replied"],
        },
        Row {
            what: "to no frontend: untouched",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, NOWHERE, 40000, 80),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "a ClusterIP on a port it does not serve: dropped",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, CLUSTER_IP, 40000, 81),
            verdict: TC_ACT_SHOT,
            out: Out::Unchanged,
            counts: &["dropped_unknown_port"],
        },
        Row {
            what: "a Service without endpoints: a reset, sent back",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, CLIENT, EMPTY_IP, 40003, 80),
            verdict: TC_ACT_REDIRECT,
            out: Out::Check(reset_to_client),
            counts: &["rejected_no_backend"],
        },
        // The kernel's test run refuses a tc program an IPv4 frame shorter than its header;
        // XDP sees such frames, through the same parser.
        Row {
            what: "an Ethernet header alone: untouched",
            hook: Hook::Xdp,
            input: syn[..14].to_vec(),
            verdict: XDP_PASS,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "an IPv4 header cut short: untouched",
            hook: Hook::Xdp,
            input: syn[..30].to_vec(),
            verdict: XDP_PASS,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "a TCP header cut short: untouched",
            hook: Hook::TcIngress,
            input: syn[..44].to_vec(),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "an IPv4 header length below 5 words: untouched",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| p[14] = 0x44),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "a first fragment (more fragments): untouched",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| p[20] = 0x20),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "a TCP data offset past the datagram: untouched",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| p[46] = 0xf0),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "a TCP data offset below 5 words: untouched",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| p[46] = 0x40),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "an IPv4 total length shorter than its headers: untouched",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| {
                p[16..18].copy_from_slice(&30u16.to_be_bytes())
            }),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "a UDP length past the datagram: untouched",
            hook: Hook::TcIngress,
            input: with(packet(UDP, CLIENT, DNS_IP, 40001, 53), |p| {
                p[38..40].copy_from_slice(&64u16.to_be_bytes());
            }),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "ICMP to a ClusterIP: untouched (no port to balance)",
            hook: Hook::TcIngress,
            input: with(packet(UDP, CLIENT, CLUSTER_IP, 0, 0), |p| p[23] = 1),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "a backend calling its own Service: DNAT to itself, SNAT to the ClusterIP",
            hook: Hook::TcIngress,
            input: packet(TCP_SYN, WEB, CLUSTER_IP, 41000, 80),
            verdict: TC_ACT_OK,
            out: Out::Packet(packet(TCP_SYN, CLUSTER_IP, WEB, 41000, 8080)),
            counts: &["new_flows"],
        },
        Row {
            what: "a UDP datagram to a Service without endpoints: ICMP port unreachable, sent back",
            hook: Hook::TcIngress,
            input: packet(UDP, CLIENT, EMPTY_IP, 40004, 53),
            verdict: TC_ACT_REDIRECT,
            out: Out::Check(unreachable_to_client),
            counts: &["rejected_no_backend"],
        },
        Row {
            what: "an IPv4 total length shorter than the IPv4 header: untouched",
            hook: Hook::TcIngress,
            input: with(syn.clone(), |p| {
                p[16..18].copy_from_slice(&16u16.to_be_bytes());
            }),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "a UDP length below its header: untouched",
            hook: Hook::TcIngress,
            input: with(packet(UDP, CLIENT, DNS_IP, 40001, 53), |p| {
                p[38..40].copy_from_slice(&7u16.to_be_bytes());
            }),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "a frame padded past its datagram (Ethernet's 60 bytes): DNAT, padding kept",
            hook: Hook::TcIngress,
            input: with(packet(TCP_SYN, CLIENT, CLUSTER_IP, 40005, 80), |p| {
                p.extend([0; 6]);
            }),
            verdict: TC_ACT_OK,
            out: Out::Packet(with(packet(TCP_SYN, CLIENT, WEB, 40005, 8080), |p| {
                p.extend([0; 6]);
            })),
            counts: &["new_flows"],
        },
        Row {
            what: "a TCP datagram whose total length is 0 (BIG TCP): DNAT",
            hook: Hook::TcIngress,
            input: big_tcp(packet(TCP_SYN, CLIENT, CLUSTER_IP, 40006, 80)),
            verdict: TC_ACT_OK,
            out: Out::Packet(big_tcp(packet(TCP_SYN, CLIENT, WEB, 40006, 8080))),
            counts: &["new_flows"],
        },
        Row {
            what: "a UDP datagram whose total length is 0: untouched",
            hook: Hook::TcIngress,
            input: big_tcp(packet(UDP, CLIENT, DNS_IP, 40007, 53)),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
        Row {
            what: "a VLAN-tagged frame: untouched",
            hook: Hook::TcIngress,
            input: with(syn, |p| p[12..14].copy_from_slice(&0x8100u16.to_be_bytes())),
            verdict: TC_ACT_OK,
            out: Out::Unchanged,
            counts: &[],
        },
    ]
}

/// The datapath of this test, removed when it ends, passed or not.
struct Loaded(Option<Datapath>);

impl Drop for Loaded {
    fn drop(&mut self) {
        if let Some(datapath) = self.0.take()
            && let Err(e) = datapath.remove()
        {
            eprintln!("removing the test's datapath: {e:#}");
        }
    }
}

#[test]
fn each_packet_gets_its_verdict_its_bytes_and_its_counter() {
    let (datapath, mut maps) = datapath::scratch("packets").expect("the datapath, loaded (root)");
    let loaded = Loaded(Some(datapath));
    let datapath = loaded.0.as_ref().expect("loaded");
    maps.write_config(&Config {
        tcp_open_timeout_ns: 3_600_000_000_000,
        tcp_closing_timeout_ns: 10_000_000_000,
        udp_timeout_ns: 60_000_000_000,
        snat_addr_be: u32::from(NODE_IP).to_be(),
        snat_port_min: SNAT_PORT,
        snat_port_max: SNAT_PORT,
        netns_cookie: 0,
    })
    .unwrap();
    let (entries, skipped) = plan::entries(&programme(), NODE);
    assert!(skipped.is_empty(), "{skipped:?}");
    for op in plan::diff(&MapEntries::default(), &entries) {
        maps.apply(&op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    }
    let programs = datapath.packet_programs().unwrap();
    let mut failures = Vec::new();
    for row in rows() {
        let before = maps.stats().unwrap();
        let mut output = vec![0u8; row.input.len() + 128];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&row.input);
        opts.data_out = Some(&mut output);
        let result = match row.hook {
            Hook::TcIngress => programs.tc_ingress.test_run(opts),
            Hook::TcEgress => programs.tc_egress.test_run(opts),
            Hook::Xdp => programs.xdp.test_run(opts),
        }
        .unwrap_or_else(|e| panic!("{}: test run: {e:?}", row.what));
        output.truncate(result.data_size_out as usize);
        let after = maps.stats().unwrap();
        let mut wrong = Vec::new();
        if result.return_value != row.verdict {
            wrong.push(format!(
                "verdict {}, not {}",
                result.return_value, row.verdict
            ));
        }
        match &row.out {
            Out::Packet(expected) if output != *expected => {
                wrong.push(format!("left {output:02x?}\n  wanted {expected:02x?}"));
            }
            Out::Unchanged if output != row.input => {
                wrong.push(format!("changed the packet to {output:02x?}"));
            }
            Out::Check(check) => wrong.extend(check(&output).err()),
            _ => {}
        }
        for ((name, then), (_, now)) in counters(&before).into_iter().zip(counters(&after)) {
            // Forwarding counts every packet sent to a backend, a new flow's first too.
            let wanted = u64::from(
                row.counts.contains(&name)
                    || (name == "forwarded" && row.counts.contains(&"new_flows")),
            );
            if now - then != wanted {
                wrong.push(format!("{name} moved by {}, not {wanted}", now - then));
            }
        }
        for name in row.counts {
            assert!(
                counters(&after).iter().any(|(n, _)| n == name),
                "{}: no counter {name}",
                row.what
            );
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "{:?}: {}:\n  {}",
                row.hook,
                row.what,
                wrong.join("\n  ")
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
