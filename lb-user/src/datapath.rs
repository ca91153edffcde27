//! Loading the eBPF object and attaching its programs, all pinned under the instance's
//! directory so that the datapath keeps forwarding while no agent runs: maps at the top,
//! programs in `progs/`, links in `links/`. A starting agent adopts what an earlier one pinned:
//! it keeps the maps whose layout is unchanged (flows, affinity and all) and swaps its new
//! programs into the existing links, atomically.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::{CStr, CString},
    fs, io,
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::MapInfo,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        Xdp, XdpMode, links::FdLink, tc::TcAttachOptions,
    },
};
use lb_common::maps;
use tracing::{info, warn};

use crate::{clock, links, maps::KernelMaps};

/// The compiled datapath, built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// The programs' names in [`OBJECT`]: tc ingress on pod-facing interfaces, XDP on uplinks, tc
/// egress on both.
const TC_PROGRAM: &str = "lb_tc";
const TC_EGRESS_PROGRAM: &str = "lb_tc_egress";
const XDP_PROGRAM: &str = "lb_xdp";
/// What an XDP program returns for a packet it lets through.
pub const XDP_PASS: u32 = 2;
/// What a tc program returns for a packet it lets through.
pub const TC_ACT_OK: u32 = 0;
/// Run once at load, never attached: see [`clock`].
const CLOCK_PROBE: &str = "lb_clock_probe";
/// The socket hooks for the node's own processes.
const SOCKET_PROGRAMS: [&str; 4] = [
    "lb_connect4",
    "lb_sendmsg4",
    "lb_recvmsg4",
    "lb_getpeername4",
];
/// Run when a socket is released: forgets what a connected one dialled.
const RELEASE_PROGRAM: &str = "lb_sock_release";
const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// Where cgroup v2 is mounted: alone, or beside v1 (hybrid).
const CGROUP2_MOUNTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
const BPFFS_MAGIC: i64 = 0xcafe_4a11;
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
            eprintln!("{e:#}");
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
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let lock = lock_instance(pin_dir)?;
        drop_incompatible_maps(object, pin_dir)?;
        let mut loader = EbpfLoader::new();
        for name in maps::ALL {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let mut ebpf = loader.load(object).context("loading the eBPF object")?;
        for name in maps::ALL {
            if ebpf.map(name).is_none() {
                bail!("the eBPF object has no map {name}: lb-common and lb-ebpf disagree");
            }
        }
        for name in [TC_PROGRAM, TC_EGRESS_PROGRAM] {
            let program: &mut SchedClassifier = program(&mut ebpf, name)?.try_into()?;
            program.load().with_context(|| format!("loading {name}"))?;
        }
        let xdp: &mut Xdp = program(&mut ebpf, XDP_PROGRAM)?.try_into()?;
        xdp.load()
            .with_context(|| format!("loading {XDP_PROGRAM}"))?;
        for name in SOCKET_PROGRAMS {
            let hook: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into()?;
            hook.load().with_context(|| format!("loading {name}"))?;
        }
        let release: &mut CgroupSock = program(&mut ebpf, RELEASE_PROGRAM)?.try_into()?;
        release
            .load()
            .with_context(|| format!("loading {RELEASE_PROGRAM}"))?;
        for name in [TC_PROGRAM, TC_EGRESS_PROGRAM, XDP_PROGRAM, RELEASE_PROGRAM]
            .into_iter()
            .chain(SOCKET_PROGRAMS)
        {
            // The programs of the agent before stay alive in their links until those are
            // updated; their pins name what is loaded now.
            let path = pin_dir.join(PROGRAMS_DIR).join(name);
            remove_if_present(&path)?;
            program(&mut ebpf, name)?
                .pin(&path)
                .with_context(|| format!("pinning {name} at {}", path.display()))?;
        }
        let mut maps = KernelMaps::take(&mut ebpf)?;
        let probe: &mut Xdp = program(&mut ebpf, CLOCK_PROBE)?.try_into()?;
        probe
            .load()
            .with_context(|| format!("loading {CLOCK_PROBE}"))?;
        // Before any program is attached: until it is written, they call a helper instead.
        match clock::measure(probe) {
            Ok(measured) => {
                maps.write_clock(&measured)?;
                info!(
                    ns_per_jiffy = measured.ns_per_jiffy,
                    "datapath clock measured"
                );
            }
            Err(e) => warn!("the datapath reads the time with a helper call: {e:#}"),
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

    /// Attaches tc ingress (balancing) and egress (replies) to every interface matching
    /// `patterns` (names, or prefixes ending in `*`) not attached yet, and lets go of the links
    /// of interfaces that are gone. One interface failing does not keep the others from
    /// attaching.
    pub fn attach_interfaces(&mut self, patterns: &[String]) -> Result<()> {
        self.attach_each(patterns, Role::Pod, |datapath, index, name| {
            ensure_ethernet(name)?;
            datapath.attach_tc(TC_PROGRAM, index, name, TcAttachType::Ingress)?;
            datapath.attach_tc(TC_EGRESS_PROGRAM, index, name, TcAttachType::Egress)
        })
    }

    /// Attaches XDP (traffic from outside, in `mode`) and tc egress (replies) to every uplink
    /// matching `patterns` not attached yet.
    pub fn attach_uplinks(&mut self, patterns: &[String], mode: XdpMode) -> Result<()> {
        self.attach_each(patterns, Role::Uplink, |datapath, index, name| {
            ensure_ethernet(name)?;
            datapath.accept_local(name)?;
            datapath.attach_xdp(index, name, mode)?;
            datapath.attach_tc(TC_EGRESS_PROGRAM, index, name, TcAttachType::Egress)
        })
    }

    fn attach_each(
        &mut self,
        patterns: &[String],
        role: Role,
        mut attach: impl FnMut(&mut Self, u32, &str) -> Result<()>,
    ) -> Result<()> {
        let present = interfaces()?;
        self.release_vanished(&present)?;
        let mut failures = Vec::new();
        for (index, name) in present {
            let interface = (index, name, role);
            if self.attached.contains(&interface)
                || !patterns.iter().any(|p| matches(p, &interface.1))
            {
                continue;
            }
            match attach(self, index, &interface.1) {
                Ok(()) => {
                    self.attached.insert(interface);
                }
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            bail!("{}", failures.join("; "))
        }
    }

    /// Unpins the links of interfaces no longer `present`: the kernel detached them with their
    /// interface; the pin kept the link object alive.
    fn release_vanished(&mut self, present: &[(u32, String)]) -> Result<()> {
        self.attached
            .retain(|(index, name, _)| present.iter().any(|(i, n)| i == index && n == name));
        let vanished: Vec<String> = self
            .links
            .iter()
            .filter(|(_, link)| {
                link.on_interface && !present.iter().any(|(i, _)| u64::from(*i) == link.target)
            })
            .map(|(pin, _)| pin.clone())
            .collect();
        for pin in vanished {
            self.links.remove(&pin);
            remove_if_present(&self.pin_dir.join(LINKS_DIR).join(&pin))?;
        }
        Ok(())
    }

    fn attach_tc(
        &mut self,
        program_name: &str,
        index: u32,
        interface: &str,
        direction: TcAttachType,
    ) -> Result<()> {
        let direction_name = match direction {
            TcAttachType::Ingress => "ingress",
            _ => "egress",
        };
        let pin = format!("tcx-{direction_name}-{interface}");
        self.ensure_link(&pin, program_name, u64::from(index), true, |ebpf| {
            let program: &mut SchedClassifier = program(ebpf, program_name)?.try_into()?;
            // First in the tcx chain: services are translated before a CNI program routes.
            let id = program
                .attach_with_options(
                    interface,
                    direction,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .with_context(|| {
                    format!("attaching {program_name} to {interface} (tcx {direction_name})")
                })?;
            Ok(FdLink::try_from(program.take_link(id)?)?)
        })
    }

    fn attach_xdp(&mut self, index: u32, interface: &str, mode: XdpMode) -> Result<()> {
        // The mode is in the name: a link adopted in another mode is replaced, not updated.
        let mode_name = xdp_mode_name(mode);
        for other in [XdpMode::Default, XdpMode::Driver, XdpMode::Skb] {
            let other_name = xdp_mode_name(other);
            if other_name != mode_name {
                let pin = format!("xdp-{other_name}-{interface}");
                self.links.remove(&pin);
                remove_if_present(&self.pin_dir.join(LINKS_DIR).join(pin))?;
            }
        }
        let pin = format!("xdp-{mode_name}-{interface}");
        self.ensure_link(&pin, XDP_PROGRAM, u64::from(index), true, |ebpf| {
            let xdp: &mut Xdp = program(ebpf, XDP_PROGRAM)?.try_into()?;
            let id = xdp
                .attach(interface, mode)
                .with_context(|| format!("attaching to {interface} (XDP, {mode_name})"))?;
            Ok(FdLink::try_from(xdp.take_link(id)?)?)
        })
    }

    /// Hooks the sockets of the processes in `cgroup` (those of this network namespace are
    /// balanced at `connect()`, `sendmsg()`, `recvmsg()` and `getpeername()`, and forgotten
    /// when released).
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<()> {
        let cgroup_id = fs::metadata(cgroup)
            .with_context(|| format!("the cgroup {}", cgroup.display()))?
            .ino();
        let open = || {
            fs::File::open(cgroup)
                .with_context(|| format!("opening the cgroup {}", cgroup.display()))
        };
        for name in SOCKET_PROGRAMS {
            self.ensure_link(&format!("cgroup-{name}"), name, cgroup_id, false, |ebpf| {
                let hook: &mut CgroupSockAddr = program(ebpf, name)?.try_into()?;
                let id = hook
                    .attach(open()?, CgroupAttachMode::default())
                    .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
                Ok(FdLink::try_from(hook.take_link(id)?)?)
            })?;
        }
        let name = RELEASE_PROGRAM;
        self.ensure_link(&format!("cgroup-{name}"), name, cgroup_id, false, |ebpf| {
            let hook: &mut CgroupSock = program(ebpf, name)?.try_into()?;
            let id = hook
                .attach(open()?, CgroupAttachMode::default())
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
            Ok(FdLink::try_from(hook.take_link(id)?)?)
        })
    }

    /// Makes sure the link pinned as `pin` runs `program_name` on `target`: kept if this agent
    /// made it, adopted (its program swapped in place) if an earlier agent did, else attached
    /// by `attach` and pinned.
    fn ensure_link(
        &mut self,
        pin: &str,
        program_name: &str,
        target: u64,
        on_interface: bool,
        attach: impl FnOnce(&mut Ebpf) -> Result<FdLink>,
    ) -> Result<()> {
        if self
            .links
            .get(pin)
            .is_some_and(|link| link.target == target)
        {
            return Ok(());
        }
        let path = self.pin_dir.join(LINKS_DIR).join(pin);
        match adoptable(&path, target)? {
            Some(link) => {
                let program = program(&mut self.ebpf, program_name)?.fd()?;
                links::update(link.as_fd(), program.as_fd())
                    .with_context(|| format!("updating the program of {}", path.display()))?;
                info!(
                    link = pin,
                    "adopted the link pinned before, with the new program"
                );
            }
            None => {
                remove_if_present(&path)?;
                attach(&mut self.ebpf)?
                    .pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
                info!(link = pin, "attached");
            }
        }
        self.links.insert(
            pin.to_owned(),
            Link {
                target,
                on_interface,
            },
        );
        Ok(())
    }

    /// Detaches the links an earlier agent pinned that this one has not taken over: interfaces
    /// that no longer match, a cgroup no longer asked for. Called once every wanted interface
    /// has had its chance.
    pub fn release_unclaimed(&self) -> Result<()> {
        let dir = self.pin_dir.join(LINKS_DIR);
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let entry = entry?;
            let pin = entry.file_name().to_string_lossy().into_owned();
            if !self.links.contains_key(&pin) {
                info!(
                    link = pin,
                    "detaching a link pinned before and no longer wanted"
                );
                remove_if_present(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Where its maps, programs and links are pinned.
    pub fn pins(&self) -> &Path {
        &self.pin_dir
    }

    /// The packet programs, loaded and not attached: for `BPF_PROG_TEST_RUN`.
    pub fn packet_programs(&self) -> Result<PacketPrograms<'_>> {
        let program = |name| {
            self.ebpf
                .program(name)
                .with_context(|| format!("no program {name}"))
        };
        Ok(PacketPrograms {
            tc_ingress: program(TC_PROGRAM)?.try_into()?,
            tc_egress: program(TC_EGRESS_PROGRAM)?.try_into()?,
            xdp: program(XDP_PROGRAM)?.try_into()?,
        })
    }

    /// Detaches everything and removes the pins: for tools that load a datapath of their own.
    pub fn remove(self) -> Result<()> {
        let Self { ebpf, pin_dir, .. } = self;
        drop(ebpf);
        remove_pins(&pin_dir)
    }

    /// A SNATed reply is rewritten on the uplink before routing, to a NodePort: one of the
    /// node's own addresses as its source, which the kernel drops as a martian unless the
    /// interface accepts it.
    fn accept_local(&self, interface: &str) -> Result<()> {
        let path = self
            .sysctl_dir
            .join("net/ipv4/conf")
            .join(interface)
            .join("accept_local");
        fs::write(&path, "1").with_context(|| format!("writing {}", path.display()))
    }
}

/// Locks the instance's pin directory, so that a second agent on the same instance stops
/// before it touches anything: two would allocate ids each its own way in the same maps.
fn lock_instance(pin_dir: &Path) -> Result<fs::File> {
    let dir = fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } != 0
    {
        let error = io::Error::last_os_error();
        if error.kind() == io::ErrorKind::WouldBlock {
            bail!(
                "another agent runs this instance ({}): stop it first",
                pin_dir.display()
            );
        }
        return Err(error).with_context(|| format!("locking {}", pin_dir.display()));
    }
    Ok(dir)
}

/// The link pinned at `path`, if it is still attached to `target` (a link whose interface was
/// deleted is attached to nothing).
fn adoptable(path: &Path, target: u64) -> Result<Option<OwnedFd>> {
    let link = match links::open_pinned(path) {
        Ok(link) => link,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let info = links::info(link.as_fd()).with_context(|| format!("reading {}", path.display()))?;
    Ok((info.target == target).then_some(link))
}

/// Removes the pinned maps whose type, key, value, capacity or flags differ from `object`'s,
/// and those `object` no longer has (a layout bumped to a new `_vN` name), saying why: the
/// loader would otherwise reuse a map the new programs misread.
fn drop_incompatible_maps(object: &[u8], pin_dir: &Path) -> Result<()> {
    let parsed = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    for entry in fs::read_dir(pin_dir).with_context(|| format!("reading {}", pin_dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let Some(wanted) = parsed
            .maps
            .get(&name)
            .filter(|_| maps::ALL.contains(&name.as_str()))
        else {
            warn!(
                map = name,
                "removing a pinned map this build does not have: its state is not carried over"
            );
            remove_if_present(&path)?;
            continue;
        };
        let pinned =
            MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
        let layout = |map_type, key, value, entries, flags| {
            format!(
                "type {map_type}, key {key} B, value {value} B, {entries} entries, flags {flags:#x}"
            )
        };
        let old = layout(
            pinned.map_type().map_or(u32::MAX, |t| t as u32),
            pinned.key_size(),
            pinned.value_size(),
            pinned.max_entries(),
            pinned.map_flags(),
        );
        let new = layout(
            wanted.map_type(),
            wanted.key_size(),
            wanted.value_size(),
            wanted.max_entries(),
            wanted.map_flags(),
        );
        if old != new {
            warn!(
                map = name,
                pinned = old,
                this_build = new,
                "the pinned map's layout differs from this build's: starting it empty, its state is lost"
            );
            remove_if_present(&path)?;
        } else {
            info!(map = name, "adopting the pinned map");
        }
    }
    Ok(())
}

fn xdp_mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "generic",
        _ => "auto",
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("the eBPF object has no program {name}"))
}

/// The datapath parses Ethernet frames: an L3 device (a tunnel, WireGuard) would be misread.
fn ensure_ethernet(interface: &str) -> Result<()> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("a socket for SIOCGIFHWADDR")?;
    // SAFETY: ifreq is plain data; the name fits (IFNAMSIZ) and is NUL-terminated by zeroing.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = interface.as_bytes();
    if name.len() >= request.ifr_name.len() {
        bail!("{interface}: name too long");
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    if unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut request) } != 0 {
        return Err(io::Error::last_os_error()).context(format!("{interface}: SIOCGIFHWADDR"));
    }
    let family = unsafe { request.ifr_ifru.ifru_hwaddr.sa_family };
    if family != libc::ARPHRD_ETHER {
        bail!(
            "{interface} is not an Ethernet device (type {family}): the datapath cannot parse it"
        );
    }
    Ok(())
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// The interfaces of this network namespace, `(index, name)`. Asked of the kernel, not read
/// from /sys/class/net, which shows the namespace sysfs was mounted in.
fn interfaces() -> Result<Vec<(u32, String)>> {
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error()).context("listing interfaces");
    }
    let mut names = Vec::new();
    let mut entry = list;
    // SAFETY: if_nameindex returns an array ending with a zeroed entry.
    unsafe {
        while (*entry).if_index != 0 {
            let name = CStr::from_ptr((*entry).if_name)
                .to_string_lossy()
                .into_owned();
            names.push(((*entry).if_index, name));
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(names)
}

/// Removes everything an instance pinned: its links (which detaches its programs), programs
/// and maps.
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    match fs::remove_dir_all(pin_dir) {
        Ok(()) => {
            // The last instance out leaves no empty <bpffs>/lb behind; with others, this fails.
            if let Some(parent) = pin_dir.parent() {
                let _ = fs::remove_dir(parent);
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", pin_dir.display())),
    }
}

/// The cookie of this process's network namespace, which the socket hooks compare with each
/// socket's.
pub fn netns_cookie() -> Result<u64> {
    let socket =
        std::net::UdpSocket::bind("127.0.0.1:0").context("a socket for the netns cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and a buffer of the length given.
    let ret = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error()).context("SO_NETNS_COOKIE");
    }
    Ok(cookie)
}

/// Where cgroup v2 is mounted.
pub fn cgroup2_root() -> Result<PathBuf> {
    CGROUP2_MOUNTS
        .iter()
        .map(PathBuf::from)
        .find(|path| fs_type(path).is_ok_and(|t| t == CGROUP2_MAGIC))
        .with_context(|| {
            format!(
                "no cgroup v2 at {}: give --cgroup",
                CGROUP2_MOUNTS.join(" or ")
            )
        })
}

fn fs_type(path: &Path) -> Result<i64> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error()).context(format!("statfs {}", path.display()));
    }
    Ok(stat.f_type)
}

/// Mounts bpffs at `bpffs` unless it is there already (it is not at boot on every machine).
fn mount_bpffs(bpffs: &Path) -> Result<()> {
    fs::create_dir_all(bpffs).with_context(|| format!("creating {}", bpffs.display()))?;
    if fs_type(bpffs)? == BPFFS_MAGIC {
        return Ok(());
    }
    let path = CString::new(bpffs.as_os_str().as_encoded_bytes())?;
    let fstype = c"bpf";
    if unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error())
            .context(format!("mounting bpffs at {}", bpffs.display()));
    }
    info!(path = %bpffs.display(), "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn interface_patterns() {
        assert!(matches("veth*", "veth12"));
        assert!(matches("eth0", "eth0"));
        assert!(!matches("eth0", "eth01"));
        assert!(!matches("lxc*", "veth1"));
    }
}
