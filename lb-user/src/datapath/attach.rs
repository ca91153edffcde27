//! Attaching the programs: tc and XDP on the interfaces that match, the socket hooks on a
//! cgroup, each link pinned, kept, adopted from an earlier agent or released.

use std::{
    fs,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        Xdp, XdpMode, links::FdLink, tc::TcAttachOptions,
    },
};
use tracing::info;

use super::{
    Datapath, LINKS_DIR, Link, RELEASE_PROGRAM, Role, SOCKET_PROGRAMS, TC_EGRESS_PROGRAM,
    TC_LOOPBACK_PROGRAM, TC_PROGRAM, TC_UPLINK_PROGRAM, XDP_PROGRAM,
    error::{self, Error, Result, at, link, os, program as attaching},
    host::{ensure_ethernet, interfaces},
    links,
    pins::{adoptable, remove_if_present},
    program, typed,
};

/// `lo`'s index, the same in every network namespace (the kernel's `LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;

impl Datapath {
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

    /// Attaches XDP (traffic from outside, in `mode`), tc ingress (the IP fragments XDP passes)
    /// and tc egress (replies) to every uplink matching `patterns` not attached yet; and, with
    /// the first, tc egress to `lo`, where the node's own ICMP errors about the flows it SNATs
    /// go.
    pub fn attach_uplinks(&mut self, patterns: &[String], mode: XdpMode) -> Result<()> {
        self.attach_each(patterns, Role::Uplink, |datapath, index, name| {
            ensure_ethernet(name)?;
            datapath.accept_local(name)?;
            // Ingress first: XDP passes fragments on from the moment it is attached. An
            // interface that is pod-facing too keeps the pods' tc ingress, which balances
            // fragments as well (in the cluster's scope): tc ingress is one program here.
            if datapath
                .attached
                .contains(&(index, name.to_string(), Role::Pod))
            {
                info!(
                    interface = name,
                    "pod-facing and an uplink: its tc ingress stays the pods', fragments from \
                     outside balanced as the cluster's"
                );
            } else {
                datapath.attach_tc(TC_UPLINK_PROGRAM, index, name, TcAttachType::Ingress)?;
            }
            datapath.attach_xdp(index, name, mode)?;
            datapath.attach_tc(TC_EGRESS_PROGRAM, index, name, TcAttachType::Egress)?;
            // Once for all uplinks (a link already there is kept); failing, it fails each.
            datapath.attach_tc(
                TC_LOOPBACK_PROGRAM,
                LOOPBACK_IFINDEX,
                "lo",
                TcAttachType::Egress,
            )
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
                Err(e) => failures.push(crate::error_chain(&e)),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Error::Interfaces(failures))
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
            let program: &mut SchedClassifier = typed(program(ebpf, program_name)?, program_name)?;
            let attach = format!("attaching {program_name} to {interface} (tcx {direction_name})");
            // First in the tcx chain: services are translated before a CNI program routes.
            let id = program
                .attach_with_options(
                    interface,
                    direction,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(attaching(attach.clone()))?;
            let taken = program.take_link(id).map_err(attaching(attach.clone()))?;
            FdLink::try_from(taken).map_err(link(attach))
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
            let xdp: &mut Xdp = typed(program(ebpf, XDP_PROGRAM)?, XDP_PROGRAM)?;
            let attach = format!("attaching to {interface} (XDP, {mode_name})");
            let id = xdp
                .attach(interface, mode)
                .map_err(attaching(attach.clone()))?;
            let taken = xdp.take_link(id).map_err(attaching(attach.clone()))?;
            FdLink::try_from(taken).map_err(link(attach))
        })
    }

    /// Hooks the sockets of the processes in `cgroup` (those of this network namespace are
    /// balanced at `connect()`, `sendmsg()`, `recvmsg()` and `getpeername()`, and forgotten
    /// when released).
    pub fn attach_sockets(&mut self, cgroup: &Path) -> Result<()> {
        let cgroup_id = fs::metadata(cgroup)
            .map_err(at("reading the cgroup", cgroup))?
            .ino();
        let open = || fs::File::open(cgroup).map_err(at("opening the cgroup", cgroup));
        let attach = |name: &str| format!("attaching {name} to {}", cgroup.display());
        for name in SOCKET_PROGRAMS {
            self.ensure_link(&format!("cgroup-{name}"), name, cgroup_id, false, |ebpf| {
                let hook: &mut CgroupSockAddr = typed(program(ebpf, name)?, name)?;
                let id = hook
                    .attach(open()?, CgroupAttachMode::default())
                    .map_err(attaching(attach(name)))?;
                let taken = hook.take_link(id).map_err(attaching(attach(name)))?;
                FdLink::try_from(taken).map_err(link(attach(name)))
            })?;
        }
        let name = RELEASE_PROGRAM;
        self.ensure_link(&format!("cgroup-{name}"), name, cgroup_id, false, |ebpf| {
            let hook: &mut CgroupSock = typed(program(ebpf, name)?, name)?;
            let id = hook
                .attach(open()?, CgroupAttachMode::default())
                .map_err(attaching(attach(name)))?;
            let taken = hook.take_link(id).map_err(attaching(attach(name)))?;
            FdLink::try_from(taken).map_err(link(attach(name)))
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
                let program = program(&mut self.ebpf, program_name)?
                    .fd()
                    .map_err(attaching(format!("the descriptor of {program_name}")))?;
                links::update(link.as_fd(), program.as_fd())
                    .map_err(os(format!("updating the program of {}", path.display())))?;
                info!(
                    link = pin,
                    "adopted the link pinned before, with the new program"
                );
            }
            None => {
                remove_if_present(&path)?;
                attach(&mut self.ebpf)?
                    .pin(&path)
                    .map_err(error::pin(&path))?;
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
        for entry in fs::read_dir(&dir).map_err(at("reading", &dir))? {
            let entry = entry.map_err(at("reading", &dir))?;
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

    /// A SNATed reply is rewritten on the uplink before routing, to a NodePort: one of the
    /// node's own addresses as its source, which the kernel drops as a martian unless the
    /// interface accepts it.
    fn accept_local(&self, interface: &str) -> Result<()> {
        let path = self
            .sysctl_dir
            .join("net/ipv4/conf")
            .join(interface)
            .join("accept_local");
        fs::write(&path, "1").map_err(at("writing", path))
    }
}

fn xdp_mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "generic",
        _ => "auto",
    }
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
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
