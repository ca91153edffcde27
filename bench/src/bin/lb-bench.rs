//! Per-packet cost of the datapath under `BPF_PROG_TEST_RUN`, beside an empty program's.
//!
//! N ClusterIP services of 10 backends each are programmed through the agent's own plan and
//! maps, and the one in the middle is also a LoadBalancer IP with node-local backends (the XDP
//! program balances external frontends only); first over IPv4, then over IPv6 (each address's
//! twin, `lb_tests::ipv6_twin`), so that each family's figures come from the same run. Each case then runs the tc or XDP program on
//! crafted packets, one packet per call (`repeat` would re-run the program on the packet it
//! already rewrote), and the same loop runs an empty program of the same type: a figure is the
//! difference of the kernel-measured durations. Every output packet
//! is checked (the rewrite it must carry, valid checksums), so a case can never time a program
//! that did nothing.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::Arc,
};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions, TestRunResult, Xdp},
};
use clap::Parser;
use lb_bench::Spread;
use lb_common::maps::Config;
use lb_tests::{
    ipv6_twin,
    packet::{
        TCP_ACK, TCP_SYN, UDP, addr, addr6, checksum6_valid, checksums_valid, packet, packet6, port,
    },
};
use lb_user::{
    datapath::{self, Datapath, PacketPrograms, TC_ACT_OK, XDP_PASS},
    maps::MapWrites as _,
    model::{self, Algorithm, FrontendKind, Protocol, Scope, WhenEmpty},
    plan::{self, Ids, MapEntries, Planner},
};
use serde::Serialize;

/// The empty programs, built beside the datapath.
static EMPTY_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("LB_EBPF_OBJECTS"), "/empty"));
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const NOWHERE: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// The first of the clients new flows come from.
const NEW_CLIENTS: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 0);
const BACKENDS_PER_SERVICE: u32 = 10;
const SERVICE_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
/// The first client port of the established and reply cases, below those new flows use.
const ESTABLISHED_PORT: u16 = 700;

#[derive(Parser)]
struct Args {
    /// Services programmed, one scale after another.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    scales: Vec<u32>,
    /// Runs per case; each figure is the median over them.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Packets per run.
    #[arg(long, default_value_t = 20_000)]
    packets: u32,
    /// Only the cases whose name (`tc ipv4 tcp established`, ...) contains this: for profiling.
    #[arg(long, default_value = "")]
    only: String,
    /// Where the raw figures go, as JSON.
    #[arg(long, default_value = "target/bench/datapath.json")]
    output: PathBuf,
}

/// A program under test, or its floor.
#[derive(Clone, Copy)]
enum Program<'a> {
    Tc(&'a SchedClassifier),
    Xdp(&'a Xdp),
}

impl Program<'_> {
    fn test_run(self, opts: TestRunOptions<'_>) -> Result<TestRunResult> {
        Ok(match self {
            Program::Tc(program) => program.test_run(opts)?,
            Program::Xdp(program) => program.test_run(opts)?,
        })
    }

    /// What the program returns for a packet it lets through.
    fn pass(self) -> u32 {
        match self {
            Program::Tc(_) => TC_ACT_OK,
            Program::Xdp(_) => XDP_PASS,
        }
    }

    fn type_name(self) -> &'static str {
        match self {
            Program::Tc(_) => "tc",
            Program::Xdp(_) => "xdp",
        }
    }
}

/// The address family a run's services, and its packets, are of.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn name(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    /// The family's address for `ip`: itself, or its IPv6 twin.
    fn addr(self, ip: Ipv4Addr) -> IpAddr {
        match self {
            Family::V4 => ip.into(),
            Family::V6 => ipv6_twin(ip).into(),
        }
    }

    /// A TCP segment with `flags`, or a UDP datagram, of this family, checksums filled in.
    fn packet(self, flags: u8, src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
        match self {
            Family::V4 => packet(flags, src, dst, sport, dport),
            Family::V6 => packet6(flags, ipv6_twin(src), ipv6_twin(dst), sport, dport),
        }
    }

    /// The source and destination of `p`, a frame of this family, and its ports.
    fn ends(self, p: &[u8]) -> ((IpAddr, u16), (IpAddr, u16)) {
        match self {
            Family::V4 => (
                (addr(p, 26).into(), port(p, 34)),
                (addr(p, 30).into(), port(p, 36)),
            ),
            Family::V6 => (
                (addr6(p, 22).into(), port(p, 54)),
                (addr6(p, 38).into(), port(p, 56)),
            ),
        }
    }

    fn checksums_valid(self, p: &[u8]) -> bool {
        match self {
            Family::V4 => checksums_valid(p),
            Family::V6 => checksum6_valid(p),
        }
    }
}

/// The schedulers beside round robin that the TCP cases also run under.
const OTHER_SCHEDULERS: [Algorithm; 5] = [
    Algorithm::SourceHash,
    Algorithm::Maglev,
    Algorithm::LeastConnection,
    Algorithm::ShortestExpectedDelay,
    Algorithm::NeverQueue,
];

/// The target Service's port of each scheduler's TCP cases: round robin's [`SERVICE_PORT`],
/// the others after it.
fn scheduler_port(algorithm: Algorithm) -> u16 {
    match algorithm {
        Algorithm::RoundRobin => SERVICE_PORT,
        Algorithm::SourceHash => SERVICE_PORT + 1,
        Algorithm::Maglev => SERVICE_PORT + 2,
        Algorithm::LeastConnection => SERVICE_PORT + 3,
        Algorithm::ShortestExpectedDelay => SERVICE_PORT + 4,
        Algorithm::NeverQueue => SERVICE_PORT + 5,
    }
}

#[derive(Clone, Copy)]
enum Case {
    TcpNew(Algorithm),
    TcpEstablished(Algorithm),
    UdpNew,
    Reply,
    NoFrontend,
    /// What every packet over `lo` pays for the node's ICMP errors about SNATed flows.
    Loopback,
    /// What every packet from outside pays, after XDP, for the fragments XDP passes to tc.
    Uplink,
}

impl Case {
    const ALL: [Case; 17] = [
        Case::TcpNew(Algorithm::RoundRobin),
        Case::TcpEstablished(Algorithm::RoundRobin),
        Case::TcpNew(Algorithm::SourceHash),
        Case::TcpEstablished(Algorithm::SourceHash),
        Case::TcpNew(Algorithm::Maglev),
        Case::TcpEstablished(Algorithm::Maglev),
        Case::TcpNew(Algorithm::LeastConnection),
        Case::TcpEstablished(Algorithm::LeastConnection),
        Case::TcpNew(Algorithm::ShortestExpectedDelay),
        Case::TcpEstablished(Algorithm::ShortestExpectedDelay),
        Case::TcpNew(Algorithm::NeverQueue),
        Case::TcpEstablished(Algorithm::NeverQueue),
        Case::UdpNew,
        Case::Reply,
        Case::NoFrontend,
        Case::Loopback,
        Case::Uplink,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::TcpNew(Algorithm::RoundRobin) => "tcp new flow",
            Case::TcpEstablished(Algorithm::RoundRobin) => "tcp established",
            Case::TcpNew(Algorithm::SourceHash) => "tcp new flow, sh",
            Case::TcpEstablished(Algorithm::SourceHash) => "tcp established, sh",
            Case::TcpNew(Algorithm::Maglev) => "tcp new flow, mh",
            Case::TcpEstablished(Algorithm::Maglev) => "tcp established, mh",
            Case::TcpNew(Algorithm::LeastConnection) => "tcp new flow, lc",
            Case::TcpEstablished(Algorithm::LeastConnection) => "tcp established, lc",
            Case::TcpNew(Algorithm::ShortestExpectedDelay) => "tcp new flow, sed",
            Case::TcpEstablished(Algorithm::ShortestExpectedDelay) => "tcp established, sed",
            Case::TcpNew(Algorithm::NeverQueue) => "tcp new flow, nq",
            Case::TcpEstablished(Algorithm::NeverQueue) => "tcp established, nq",
            Case::UdpNew => "udp new flow",
            Case::Reply => "reply",
            Case::NoFrontend => "no frontend",
            Case::Loopback => "loopback",
            Case::Uplink => "uplink, whole",
        }
    }

    /// The program that handles the case's packets on `hook`, if one does: the XDP program
    /// balances, but replies are rewritten by tc on egress.
    fn program<'a>(self, programs: &PacketPrograms<'a>, xdp: bool) -> Option<Program<'a>> {
        Some(match (self, xdp) {
            (Case::Reply, false) => Program::Tc(programs.tc_egress),
            (Case::Loopback, false) => Program::Tc(programs.tc_loopback),
            (Case::Uplink, false) => Program::Tc(programs.tc_uplink),
            (Case::Reply | Case::Loopback | Case::Uplink, true) => return None,
            (_, false) => Program::Tc(programs.tc_ingress),
            (_, true) => Program::Xdp(programs.xdp),
        })
    }

    /// The `n`th packet of the case against `target`'s frontend; for a new-flow case, one of a
    /// tuple never used before (60,000 client ports per client address).
    fn packet(self, target: &Target, n: u32) -> Vec<u8> {
        let client = Ipv4Addr::from(u32::from(NEW_CLIENTS) + n / 60_000);
        let fresh = 1024 + (n % 60_000) as u16;
        let packet =
            |flags, src, dst, sport, dport| target.family.packet(flags, src, dst, sport, dport);
        match self {
            Case::TcpNew(scheduler) => packet(
                TCP_SYN,
                client,
                target.vip,
                fresh,
                scheduler_port(scheduler),
            ),
            Case::TcpEstablished(scheduler) => packet(
                TCP_ACK,
                CLIENT,
                target.vip,
                target.established_port,
                scheduler_port(scheduler),
            ),
            Case::UdpNew => packet(UDP, client, target.vip, fresh, SERVICE_PORT),
            Case::Reply => packet(
                TCP_ACK,
                target.backends[target.replier],
                CLIENT,
                BACKEND_PORT,
                target.established_port,
            ),
            Case::NoFrontend | Case::Loopback => {
                packet(TCP_ACK, CLIENT, NOWHERE, ESTABLISHED_PORT, 80)
            }
            // A packet XDP balanced already: the tc program only sees that it is no fragment.
            Case::Uplink => packet(
                TCP_ACK,
                CLIENT,
                target.backends[0],
                target.established_port,
                BACKEND_PORT,
            ),
        }
    }

    /// Whether `output`, the program's answer to `input`, carries the case's rewrite.
    fn check(self, target: &Target, input: &[u8], output: &[u8]) -> Result<()> {
        let family = target.family;
        ensure!(
            family.checksums_valid(output),
            "{}: bad checksums out",
            self.name()
        );
        let ((src, sport), (dst, dport)) = family.ends(output);
        match self {
            Case::TcpNew(_) | Case::TcpEstablished(_) | Case::UdpNew => ensure!(
                target.backend(dst).is_some()
                    && dport == BACKEND_PORT
                    && src == family.ends(input).0.0,
                "{}: not DNATed to a backend: {dst}:{dport}",
                self.name()
            ),
            Case::Reply => ensure!(
                src == family.addr(target.vip) && sport == SERVICE_PORT,
                "{}: not rewritten to the frontend: {src}:{sport}",
                self.name()
            ),
            Case::NoFrontend | Case::Loopback | Case::Uplink => {
                ensure!(output == input, "{}: rewritten", self.name());
            }
        }
        Ok(())
    }
}

/// The service the cases run against, its addresses as IPv4's (each family's twin in packets).
struct Target {
    family: Family,
    vip: Ipv4Addr,
    backends: Vec<Ipv4Addr>,
    /// The backend the established flow was given (its index), which the reply case answers
    /// from.
    replier: usize,
    /// The established flow's client port, below those new flows cycle through.
    established_port: u16,
}

impl Target {
    /// The index of the backend at `address`, if it is one of the target's.
    fn backend(&self, address: IpAddr) -> Option<usize> {
        self.backends
            .iter()
            .position(|&b| self.family.addr(b) == address)
    }
}

#[derive(Serialize)]
struct Figure {
    /// `tc` or `xdp`.
    program: &'static str,
    /// `ipv4` or `ipv6`.
    family: &'static str,
    case: &'static str,
    services: u32,
    /// Nanoseconds per packet above the empty program: median, min and max over the runs.
    median_ns: f64,
    min_ns: f64,
    max_ns: f64,
    /// The empty program's own cost per packet, median over the runs.
    floor_ns: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut empty = Ebpf::load(EMPTY_OBJECT).context("loading the empty programs")?;
    let tc: &mut SchedClassifier = empty
        .program_mut("empty_tc")
        .context("no empty_tc")?
        .try_into()?;
    tc.load()?;
    let xdp: &mut Xdp = empty
        .program_mut("empty_xdp")
        .context("no empty_xdp")?
        .try_into()?;
    xdp.load()?;
    let floors = PacketPrograms {
        tc_ingress: empty.program("empty_tc").context("empty_tc")?.try_into()?,
        tc_egress: empty.program("empty_tc").context("empty_tc")?.try_into()?,
        xdp: empty
            .program("empty_xdp")
            .context("empty_xdp")?
            .try_into()?,
        tc_uplink: empty.program("empty_tc").context("empty_tc")?.try_into()?,
        tc_loopback: empty.program("empty_tc").context("empty_tc")?.try_into()?,
    };

    let (datapath, mut maps) = datapath::scratch("datapath")?;
    let figures = measure(&args, &datapath, &mut maps, &floors);
    datapath.remove()?;
    let figures = figures?;

    println!(
        "{:<4} {:<5} {:<19} {:>9} {:>10} {:>9} {:>9} {:>9}",
        "", "", "case", "services", "median ns", "min", "max", "floor ns"
    );
    for f in &figures {
        println!(
            "{:<4} {:<5} {:<19} {:>9} {:>10.1} {:>9.1} {:>9.1} {:>9.1}",
            f.program, f.family, f.case, f.services, f.median_ns, f.min_ns, f.max_ns, f.floor_ns
        );
    }
    if let Some(dir) = args.output.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(&args.output, serde_json::to_string_pretty(&figures)?)?;
    println!("raw figures: {}", args.output.display());
    Ok(())
}

fn measure(
    args: &Args,
    datapath: &Datapath,
    maps: &mut lb_user::maps::KernelMaps,
    floors: &PacketPrograms,
) -> Result<Vec<Figure>> {
    maps.write_config(&Config {
        // Long enough that no flow of a run expires in it.
        tcp_open_timeout_ns: 3_600_000_000_000,
        tcp_closing_timeout_ns: 3_600_000_000_000,
        udp_timeout_ns: 3_600_000_000_000,
        snat_addr_be: 0,
        snat_addr6_be: [0; 4],
        snat_port_min: 61_000,
        snat_port_max: 65_535,
        netns_cookie: 0,
        rejects_per_sec_per_cpu: 0,
        reject_burst_per_cpu: 0,
    })?;
    let programs = datapath.packet_programs()?;
    let mut planner = Planner::new("bench-node", Ids::default());
    let mut programmed = MapEntries::default();
    let mut figures = Vec::new();
    // The packet number new flows start from: every case makes flows never seen before.
    let mut fresh = 0;
    for (&services, family) in args
        .scales
        .iter()
        .flat_map(|scale| Family::ALL.map(|family| (scale, family)))
    {
        // The service in the middle, not the first written, also has a UDP port, and both
        // ports are also a LoadBalancer IP's, for the XDP program.
        let index = services / 2;
        let mut frontends: Vec<Arc<model::Frontend>> = (0..services)
            .map(|i| Arc::new(service(i, family)))
            .collect();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            for (kind, scope) in [
                (FrontendKind::ClusterIP, Scope::Internal),
                (FrontendKind::LoadBalancer, Scope::External),
            ] {
                if (protocol, scope) != (Protocol::Tcp, Scope::Internal) {
                    frontends.push(Arc::new(model::Frontend {
                        protocol,
                        kind,
                        scope,
                        ..service(index, family)
                    }));
                }
                // The TCP cases of the other schedulers, each on a port of its own.
                for algorithm in OTHER_SCHEDULERS
                    .into_iter()
                    .filter(|_| protocol == Protocol::Tcp)
                {
                    frontends.push(Arc::new(model::Frontend {
                        kind,
                        scope,
                        port: scheduler_port(algorithm),
                        algorithm,
                        maglev_table_size: (algorithm == Algorithm::Maglev)
                            .then_some(model::DEFAULT_MAGLEV_TABLE_SIZE),
                        ..service(index, family)
                    }));
                }
            }
        }
        // The cases before go in a sync of their own: a sync gives no id its frontend just
        // left, and 100,000 Services of each family would not fit the ids at once.
        for wanted in [&[][..], &frontends] {
            planner.update_all(wanted);
            let skipped = planner.unplanned();
            ensure!(
                skipped.is_empty(),
                "{services} services do not fit: {:?}",
                skipped.first()
            );
            for op in plan::diff(&programmed, planner.desired()) {
                maps.apply(&op).with_context(|| {
                    format!("programming {services} services over {}", family.name())
                })?;
                programmed.apply(&op);
            }
        }
        let mut target = Target {
            family,
            vip: vip(index),
            backends: (0..BACKENDS_PER_SERVICE)
                .map(|b| backend(index, b))
                .collect(),
            replier: 0,
            established_port: ESTABLISHED_PORT,
        };
        // Each run times every case once, in turn: the machine's drift over the runs falls on
        // every case alike, and their figures compare within one run.
        let mut cases = Vec::new();
        for xdp in [false, true] {
            for case in Case::ALL {
                let (Some(program), Some(floor)) =
                    (case.program(&programs, xdp), case.program(floors, xdp))
                else {
                    continue;
                };
                let name = format!("{} {} {}", program.type_name(), family.name(), case.name());
                if name.contains(&args.only) {
                    cases.push((xdp, case, program, floor));
                }
            }
        }
        let mut spreads = vec![(Vec::new(), Vec::new()); cases.len()];
        for _ in 0..args.runs {
            for (&(xdp, case, program, floor), (per_run, floor_per_run)) in
                cases.iter().zip(&mut spreads)
            {
                // Every case starts on flow tables with room, as the agent's GC keeps them on
                // a node: the GC's own pass, as of a time past every timeout, empties them.
                maps.expire_flows(u64::MAX)
                    .context("expiring the flows of the cases before")?;
                // So the established flow is made just before each case, from a client port of
                // its own, by the hook's balancing program. Its backend is the replier.
                target.established_port += 1;
                let opener = match case {
                    Case::TcpEstablished(scheduler) => Case::TcpEstablished(scheduler),
                    _ => Case::TcpEstablished(Algorithm::RoundRobin),
                };
                let balancer = opener.program(&programs, xdp).context("no balancer")?;
                let (_, out) = run(balancer, &opener.packet(&target, 0))?;
                target.replier = target
                    .backend(family.ends(&out).1.0)
                    .context("the established flow went to no backend")?;
                let (program_ns, floor_ns) =
                    time(program, floor, case, &target, fresh, args.packets)?;
                fresh += args.packets;
                per_run.push(program_ns - floor_ns);
                floor_per_run.push(floor_ns);
            }
        }
        for ((_, case, program, _), (per_run, floor_per_run)) in cases.into_iter().zip(spreads) {
            let ns = Spread::of(per_run);
            figures.push(Figure {
                program: program.type_name(),
                family: family.name(),
                case: case.name(),
                services,
                median_ns: ns.median,
                min_ns: ns.min,
                max_ns: ns.max,
                floor_ns: Spread::of(floor_per_run).median,
            });
        }
    }
    Ok(figures)
}

/// Mean kernel-measured nanoseconds per packet of `program` and of `floor` over the same
/// packets (the case's `first`th on), every output of `program` checked.
fn time(
    program: Program,
    floor: Program,
    case: Case,
    target: &Target,
    first: u32,
    packets: u32,
) -> Result<(f64, f64)> {
    let (mut program_ns, mut floor_ns) = (0u128, 0u128);
    for n in first..first + packets {
        let input = case.packet(target, n);
        let (duration, output) = run(program, &input)?;
        case.check(target, &input, &output)?;
        program_ns += duration;
        floor_ns += run(floor, &input)?.0;
    }
    let packets = f64::from(packets);
    Ok((program_ns as f64 / packets, floor_ns as f64 / packets))
}

/// One packet through `program`, which must let it pass: the kernel's duration in ns, and the
/// packet out.
fn run(program: Program, input: &[u8]) -> Result<(u128, Vec<u8>)> {
    let mut output = vec![0u8; input.len() + 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut output);
    let result = program.test_run(opts)?;
    ensure!(
        result.return_value == program.pass(),
        "the {} program returned {}",
        program.type_name(),
        result.return_value
    );
    output.truncate(result.data_size_out as usize);
    Ok((result.duration.as_nanos(), output))
}

/// Service `i`: ClusterIP 10.96.0.0/15 + i (or its IPv6 twin), port 80, 10 backends of its
/// own on 8080.
fn service(i: u32, family: Family) -> model::Frontend {
    model::Frontend {
        service: format!("bench/svc-{i}"),
        created: None,
        port_name: "http".into(),
        kind: FrontendKind::ClusterIP,
        scope: Scope::Internal,
        address: family.addr(vip(i)),
        port: SERVICE_PORT,
        protocol: Protocol::Tcp,
        algorithm: Algorithm::RoundRobin,
        maglev_table_size: None,
        hash_port: false,
        affinity_timeout: None,
        when_empty: WhenEmpty::Reject,
        rule: "ready endpoints".into(),
        backends: (0..BACKENDS_PER_SERVICE)
            .map(|b| model::Backend {
                address: family.addr(backend(i, b)),
                port: BACKEND_PORT,
                node: Some("bench-node".into()),
                zone: None,
            })
            .collect(),
        retained: Vec::new(),
        source_ranges: None,
    }
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

fn backend(service: u32, b: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + service * BACKENDS_PER_SERVICE + b)
}
