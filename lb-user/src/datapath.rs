//! Loading the eBPF object, pinning its maps under the instance's directory, and attaching the
//! program with tcx to the node's pod-facing interfaces.

use std::{
    collections::BTreeMap,
    ffi::{CStr, CString},
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{SchedClassifierLinkId, TcAttachOptions},
        xdp::XdpLinkId,
    },
};
use lb_common::maps;
use tracing::{info, warn};

use crate::maps::KernelMaps;

/// The compiled datapath, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// The programs' names in [`OBJECT`]: tc ingress on pod-facing interfaces, XDP on uplinks, tc
/// egress on both.
const TC_PROGRAM: &str = "lb_tc";
const TC_EGRESS_PROGRAM: &str = "lb_tc_egress";
const XDP_PROGRAM: &str = "lb_xdp";
/// The socket hooks for the node's own processes.
const SOCKET_PROGRAMS: [&str; 3] = ["lb_connect4", "lb_sendmsg4", "lb_recvmsg4"];
const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// Where cgroup v2 is mounted: alone, or beside v1 (hybrid).
const CGROUP2_MOUNTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
const BPFFS_MAGIC: i64 = 0xcafe_4a11;

/// Where an instance pins its maps: one directory per agent instance.
pub fn pin_dir(bpffs: &Path, instance: &str) -> PathBuf {
    bpffs.join("lb").join(instance)
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// Attached interfaces by index: a veth recreated under the same name (a restarted pod)
    /// is a new interface.
    pods: BTreeMap<u32, (SchedClassifierLinkId, SchedClassifierLinkId)>,
    uplinks: BTreeMap<u32, (XdpLinkId, SchedClassifierLinkId)>,
    sockets_attached: bool,
}

impl Datapath {
    /// Loads the object with its maps pinned under `pin_dir`, starting from empty maps.
    pub fn load(bpffs: &Path, pin_dir: &Path) -> Result<(Self, KernelMaps)> {
        mount_bpffs(bpffs)?;
        if pin_dir.exists() {
            warn!(dir = %pin_dir.display(), "removing the maps a previous instance left pinned");
            remove_pins(pin_dir)?;
        }
        fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
        let mut loader = EbpfLoader::new();
        for name in maps::ALL {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
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
        let maps = KernelMaps::take(&mut ebpf)?;
        let datapath = Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            pods: BTreeMap::new(),
            uplinks: BTreeMap::new(),
            sockets_attached: false,
        };
        Ok((datapath, maps))
    }

    /// Attaches tc ingress (balancing) and egress (replies) to every interface matching
    /// `patterns` (names, or prefixes ending in `*`) not attached yet, and forgets interfaces
    /// that are gone. One interface failing does not keep the others from attaching.
    pub fn attach_interfaces(&mut self, patterns: &[String]) -> Result<()> {
        let present = interfaces()?;
        for (ingress, egress) in gone(&mut self.pods, &present) {
            // The links went with their interface; this closes our handles on them.
            let _ = self.classifier(TC_PROGRAM).map(|p| p.detach(ingress));
            let _ = self.classifier(TC_EGRESS_PROGRAM).map(|p| p.detach(egress));
        }
        let mut failures = Vec::new();
        for (index, name) in new_matches(&self.pods, present, patterns) {
            let attached = ensure_ethernet(&name)
                .and_then(|()| self.attach_tc(TC_PROGRAM, &name, TcAttachType::Ingress))
                .and_then(|ingress| {
                    let egress = self.attach_tc(TC_EGRESS_PROGRAM, &name, TcAttachType::Egress)?;
                    Ok((ingress, egress))
                });
            match attached {
                Ok(links) => {
                    info!(interface = %name, "attached tc");
                    self.pods.insert(index, links);
                }
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        all_attached(failures)
    }

    /// Attaches XDP (traffic from outside, in `mode`) and tc egress (replies) to every uplink
    /// matching `patterns` not attached yet, and forgets uplinks that are gone.
    pub fn attach_uplinks(&mut self, patterns: &[String], mode: XdpMode) -> Result<()> {
        let present = interfaces()?;
        for (xdp, egress) in gone(&mut self.uplinks, &present) {
            let _ = program(&mut self.ebpf, XDP_PROGRAM)
                .and_then(|p| Ok(<&mut Xdp>::try_from(p)?.detach(xdp)?));
            let _ = self.classifier(TC_EGRESS_PROGRAM).map(|p| p.detach(egress));
        }
        let mut failures = Vec::new();
        for (index, name) in new_matches(&self.uplinks, present, patterns) {
            let attached = ensure_ethernet(&name)
                .and_then(|()| accept_local(&name))
                .and_then(|()| {
                    let xdp: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?.try_into()?;
                    let xdp_link = xdp
                        .attach(&name, mode)
                        .with_context(|| format!("attaching to {name} (XDP, {mode:?})"))?;
                    let egress = self.attach_tc(TC_EGRESS_PROGRAM, &name, TcAttachType::Egress)?;
                    Ok((xdp_link, egress))
                });
            match attached {
                Ok(links) => {
                    info!(interface = %name, ?mode, "attached XDP and tc egress");
                    self.uplinks.insert(index, links);
                }
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        all_attached(failures)
    }

    fn classifier(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        Ok(program(&mut self.ebpf, name)?.try_into()?)
    }

    fn attach_tc(
        &mut self,
        name: &str,
        interface: &str,
        direction: TcAttachType,
    ) -> Result<SchedClassifierLinkId> {
        // First in the tcx chain: services are translated before a CNI program routes.
        self.classifier(name)?
            .attach_with_options(
                interface,
                direction,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .with_context(|| format!("attaching {name} to {interface} (tcx {direction:?})"))
    }

    /// The tc programs, ingress and egress, loaded and not attached: for `BPF_PROG_TEST_RUN`.
    pub fn tc_programs(&self) -> Result<(&SchedClassifier, &SchedClassifier)> {
        let get = |name| -> Result<&SchedClassifier> {
            let program = self
                .ebpf
                .program(name)
                .with_context(|| format!("no program {name}"))?;
            Ok(program.try_into()?)
        };
        Ok((get(TC_PROGRAM)?, get(TC_EGRESS_PROGRAM)?))
    }

    /// Hooks the sockets of the processes in `cgroup` (those of this network namespace are
    /// balanced at `connect()`, `sendmsg()` and `recvmsg()`), once.
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<()> {
        if self.sockets_attached {
            return Ok(());
        }
        for name in SOCKET_PROGRAMS {
            let hook: &mut CgroupSockAddr = program(&mut self.ebpf, name)?.try_into()?;
            let cgroup_dir = fs::File::open(cgroup)
                .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
            hook.attach(cgroup_dir, CgroupAttachMode::default())
                .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        }
        info!(cgroup = %cgroup.display(), "attached socket hooks");
        self.sockets_attached = true;
        Ok(())
    }

    /// Detaches everything and removes the pinned maps.
    pub fn remove(self) -> Result<()> {
        let Self { ebpf, pin_dir, .. } = self;
        drop(ebpf);
        remove_pins(&pin_dir)
    }
}

/// Removes from `attached` the interfaces no longer `present`; their links.
fn gone<T>(attached: &mut BTreeMap<u32, T>, present: &[(u32, String)]) -> Vec<T> {
    let vanished: Vec<u32> = attached
        .keys()
        .filter(|index| !present.iter().any(|(i, _)| i == *index))
        .copied()
        .collect();
    vanished
        .into_iter()
        .filter_map(|index| attached.remove(&index))
        .collect()
}

/// The `present` interfaces that match `patterns` and are not `attached` yet.
fn new_matches<T>(
    attached: &BTreeMap<u32, T>,
    present: Vec<(u32, String)>,
    patterns: &[String],
) -> Vec<(u32, String)> {
    present
        .into_iter()
        .filter(|(index, name)| {
            !attached.contains_key(index) && patterns.iter().any(|p| matches(p, name))
        })
        .collect()
}

/// One error naming every interface that failed, if any did.
fn all_attached(failures: Vec<String>) -> Result<()> {
    if failures.is_empty() {
        Ok(())
    } else {
        bail!("{}", failures.join("; "))
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

/// A SNATed reply is rewritten on the uplink before routing, to a NodePort: one of the node's
/// own addresses as its source, which the kernel drops as a martian unless the interface
/// accepts it.
fn accept_local(interface: &str) -> Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/accept_local");
    fs::write(&path, "1").with_context(|| format!("writing {path}"))
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

/// Removes what an instance left pinned (an agent stopped by SIGKILL leaves its maps); its
/// links and programs went with its process.
pub fn remove_pins(pin_dir: &Path) -> Result<()> {
    match fs::read_dir(pin_dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
            fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
            // The last instance out leaves no empty <bpffs>/lb behind; with others, this fails.
            if let Some(parent) = pin_dir.parent() {
                let _ = fs::remove_dir(parent);
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {}", pin_dir.display())),
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
