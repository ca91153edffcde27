//! Loading the eBPF object and attaching its programs, all pinned under the instance's
//! directory so that the datapath keeps forwarding while no agent runs: maps at the top,
//! programs in `progs/`, links in `links/`. A starting agent adopts what an earlier one pinned:
//! it keeps the maps whose layout is unchanged (flows, affinity and all) and swaps its new
//! programs into the existing links, atomically.

mod attach;
pub mod clock;
mod error;
mod host;
mod links;
mod pins;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSock, CgroupSockAddr, SchedClassifier, Xdp},
};
use lb_common::maps;
use tracing::{info, warn};

pub use self::{
    error::{Error, Result, at, pin, program as loading},
    host::{cgroup2_root, netns_cookie},
    pins::remove_pins,
};
use self::{
    host::{lock_instance, mount_bpffs},
    pins::{drop_incompatible_maps, remove_if_present},
};
use crate::maps::KernelMaps;

/// The compiled datapath, built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// The programs' names in [`OBJECT`]: tc ingress on pod-facing interfaces, XDP and tc ingress
/// (IP fragments, which XDP passes) on uplinks, tc egress on both, and tc egress on `lo` (the
/// node's own ICMP errors about SNATed flows).
const TC_PROGRAM: &str = "lb_tc";
const TC_UPLINK_PROGRAM: &str = "lb_tc_uplink";
const TC_EGRESS_PROGRAM: &str = "lb_tc_egress";
const TC_LOOPBACK_PROGRAM: &str = "lb_tc_loopback";
const XDP_PROGRAM: &str = "lb_xdp";
/// What an XDP program returns for a packet it lets through.
pub const XDP_PASS: u32 = 2;
/// What a tc program returns for a packet it lets through.
pub const TC_ACT_OK: u32 = 0;
/// Run once at load, never attached: see [`clock`].
const CLOCK_PROBE: &str = "lb_clock_probe";
/// The socket hooks for the node's own processes, of both families.
const SOCKET_PROGRAMS: [&str; 8] = [
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
    "lb_connect6",
    "lb_sendmsg6",
    "lb_recvmsg6",
    "lb_getpeername6",
];
/// Run when a socket is released: forgets what a connected one dialled.
const RELEASE_PROGRAM: &str = "lb_sock_release";
const PROGRAMS_DIR: &str = "progs";
const LINKS_DIR: &str = "links";

/// The programs that see packets, borrowed from a [`Datapath`].
pub struct PacketPrograms<'a> {
    /// Pod-facing interfaces, ingress: balancing of traffic from the cluster.
    pub tc_ingress: &'a SchedClassifier,
    /// Every interface, egress: reverse NAT of replies.
    pub tc_egress: &'a SchedClassifier,
    /// Uplinks: balancing of traffic from outside.
    pub xdp: &'a Xdp,
    /// Uplinks, ingress: the IP fragments from outside, which XDP passes.
    pub tc_uplink: &'a SchedClassifier,
    /// `lo`, egress: the node's own ICMP errors about SNATed flows.
    pub tc_loopback: &'a SchedClassifier,
}

/// The built-in datapath, loaded under a pin directory of this process's (`scratch-<tag>-<pid>`
/// in `/sys/fs/bpf`), attached nowhere: for the benchmarks and packet tests, which run its
/// programs with `BPF_PROG_TEST_RUN`. [`Datapath::remove`] takes it away; a load that fails
/// takes its pins.
pub fn scratch(tag: &str) -> Result<(Datapath, KernelMaps)> {
    let bpffs = Path::new("/sys/fs/bpf");
    let pin_dir = pin_dir(bpffs, &format!("scratch-{tag}-{}", std::process::id()));
    Datapath::load(OBJECT, bpffs, &pin_dir, "/proc/sys".as_ref()).inspect_err(|_| {
        if let Err(e) = remove_pins(&pin_dir) {
            eprintln!("{}", crate::error_chain(&e));
        }
    })
}

/// Where an instance pins its maps, programs and links: one directory per agent instance.
pub fn pin_dir(bpffs: &Path, instance: &str) -> PathBuf {
    bpffs.join("lb").join(instance)
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// Where `accept_local` is set on uplinks: `/proc/sys`, or the host's from a container.
    sysctl_dir: PathBuf,
    /// The links this agent attached or adopted, by pin name.
    links: BTreeMap<String, Link>,
    /// The interfaces whose links are all in place, by index, with their name and role: not
    /// looked at again until they vanish.
    attached: BTreeSet<(u32, String, Role)>,
    /// Held while the agent runs: one agent per instance.
    _lock: fs::File,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Role {
    Pod,
    Uplink,
}

/// A pinned link, and what it is attached to.
struct Link {
    /// The interface index, or the cgroup id.
    target: u64,
    on_interface: bool,
}

impl Datapath {
    /// Loads `object` with its maps pinned under `pin_dir`: those an earlier agent pinned are
    /// kept when their layout is this object's, and started afresh, saying why, when not.
    pub fn load(
        object: &[u8],
        bpffs: &Path,
        pin_dir: &Path,
        sysctl_dir: &Path,
    ) -> Result<(Self, KernelMaps)> {
        mount_bpffs(bpffs)?;
        for dir in [
            pin_dir.to_path_buf(),
            pin_dir.join(PROGRAMS_DIR),
            pin_dir.join(LINKS_DIR),
        ] {
            fs::create_dir_all(&dir).map_err(at("creating", &dir))?;
        }
        let lock = lock_instance(pin_dir)?;
        drop_incompatible_maps(object, pin_dir)?;
        let mut loader = EbpfLoader::new();
        for name in maps::ALL {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let mut ebpf = loader.load(object).map_err(Error::Load)?;
        for name in maps::ALL {
            if ebpf.map(name).is_none() {
                return Err(Error::Missing {
                    kind: "map",
                    name: name.to_string(),
                });
            }
        }
        for name in [
            TC_PROGRAM,
            TC_UPLINK_PROGRAM,
            TC_EGRESS_PROGRAM,
            TC_LOOPBACK_PROGRAM,
        ] {
            let program: &mut SchedClassifier = typed(program(&mut ebpf, name)?, name)?;
            program.load().map_err(loading(format!("loading {name}")))?;
        }
        let xdp: &mut Xdp = typed(program(&mut ebpf, XDP_PROGRAM)?, XDP_PROGRAM)?;
        xdp.load()
            .map_err(loading(format!("loading {XDP_PROGRAM}")))?;
        for name in SOCKET_PROGRAMS {
            let hook: &mut CgroupSockAddr = typed(program(&mut ebpf, name)?, name)?;
            hook.load().map_err(loading(format!("loading {name}")))?;
        }
        let release: &mut CgroupSock =
            typed(program(&mut ebpf, RELEASE_PROGRAM)?, RELEASE_PROGRAM)?;
        release
            .load()
            .map_err(loading(format!("loading {RELEASE_PROGRAM}")))?;
        for name in [
            TC_PROGRAM,
            TC_UPLINK_PROGRAM,
            TC_EGRESS_PROGRAM,
            TC_LOOPBACK_PROGRAM,
            XDP_PROGRAM,
            RELEASE_PROGRAM,
        ]
        .into_iter()
        .chain(SOCKET_PROGRAMS)
        {
            // The programs of the agent before stay alive in their links until those are
            // updated; their pins name what is loaded now.
            let path = pin_dir.join(PROGRAMS_DIR).join(name);
            remove_if_present(&path)?;
            program(&mut ebpf, name)?.pin(&path).map_err(pin(&path))?;
        }
        let mut maps = KernelMaps::take(&mut ebpf)?;
        let probe: &mut Xdp = typed(program(&mut ebpf, CLOCK_PROBE)?, CLOCK_PROBE)?;
        probe
            .load()
            .map_err(loading(format!("loading {CLOCK_PROBE}")))?;
        // Before any program is attached: until it is written, they call a helper instead.
        match clock::measure(probe) {
            Ok(measured) => {
                maps.write_clock(&measured)?;
                info!(
                    ns_per_jiffy = measured.ns_per_jiffy,
                    "datapath clock measured"
                );
            }
            Err(e) => warn!(
                error = %crate::error_chain(&e),
                "the tick could not be measured: the datapath reads the time with a helper call"
            ),
        }
        let datapath = Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            sysctl_dir: sysctl_dir.to_path_buf(),
            links: BTreeMap::new(),
            attached: BTreeSet::new(),
            _lock: lock,
        };
        Ok((datapath, maps))
    }

    /// Where its maps, programs and links are pinned.
    pub fn pins(&self) -> &Path {
        &self.pin_dir
    }

    /// The packet programs, loaded and not attached: for `BPF_PROG_TEST_RUN`.
    pub fn packet_programs(&self) -> Result<PacketPrograms<'_>> {
        let program = |name: &'static str| {
            self.ebpf.program(name).ok_or_else(|| Error::Missing {
                kind: "program",
                name: name.to_string(),
            })
        };
        let kind = |name: &'static str| loading(format!("{name} is not of the type it should be"));
        Ok(PacketPrograms {
            tc_ingress: program(TC_PROGRAM)?.try_into().map_err(kind(TC_PROGRAM))?,
            tc_egress: program(TC_EGRESS_PROGRAM)?
                .try_into()
                .map_err(kind(TC_EGRESS_PROGRAM))?,
            xdp: program(XDP_PROGRAM)?
                .try_into()
                .map_err(kind(XDP_PROGRAM))?,
            tc_uplink: program(TC_UPLINK_PROGRAM)?
                .try_into()
                .map_err(kind(TC_UPLINK_PROGRAM))?,
            tc_loopback: program(TC_LOOPBACK_PROGRAM)?
                .try_into()
                .map_err(kind(TC_LOOPBACK_PROGRAM))?,
        })
    }

    /// The kernel memory each map holds, in bytes.
    pub fn kernel_memory(&self) -> Result<Vec<(&'static str, u64)>> {
        pins::kernel_memory(&self.pin_dir)
    }

    /// Detaches everything and removes the pins: for tools that load a datapath of their own.
    pub fn remove(self) -> Result<()> {
        let Self { ebpf, pin_dir, .. } = self;
        drop(ebpf);
        remove_pins(&pin_dir)
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name).ok_or_else(|| Error::Missing {
        kind: "program",
        name: name.to_string(),
    })
}

/// `program` as the type `T` it must be.
fn typed<'a, T>(program: &'a mut aya::programs::Program, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    program
        .try_into()
        .map_err(loading(format!("{name} is not of the type it should be")))
}
