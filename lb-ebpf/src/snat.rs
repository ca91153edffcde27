//! SNAT ports: a flow from outside the node to a backend elsewhere leaves with the node's
//! address and a port of the configured range, so that the backend's replies come back through
//! this node. A port is free when no live reply entry holds it for that backend.

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::maps::{Backend, Config, FlowKey, Reply};

use crate::{family::Family, hash::mix32, maps};

/// Ports tried before the flow is dropped.
const TRIES: u32 = 8;

/// Records `reply` under a free SNAT port of the node's address of the flow's family for
/// `backend`; that address, and the port in network order.
#[inline(always)]
pub fn allocate<A: Family>(
    config: &Config,
    backend: &Backend<A>,
    client: &FlowKey<A>,
    reply: &Reply<A>,
    now: u64,
) -> Option<(A, u16)> {
    let snat_addr_be = A::snat_addr(config)?;
    if config.snat_port_max < config.snat_port_min {
        return None;
    }
    let range = u32::from(config.snat_port_max - config.snat_port_min) + 1;
    let start = mix32(client.src_addr_be.folded() ^ u32::from(client.src_port_be));
    let replies = A::replies();
    let mut key = FlowKey {
        src_addr_be: backend.addr_be,
        dst_addr_be: snat_addr_be,
        src_port_be: backend.port_be,
        dst_port_be: 0,
        protocol: backend.protocol,
        _pad: [0; 3],
    };
    for i in 0..TRIES {
        let port = u32::from(config.snat_port_min) + (start.wrapping_add(i) % range);
        key.dst_port_be = (port as u16).to_be();
        if replies.insert(key, reply, u64::from(BPF_NOEXIST)).is_ok() {
            return Some((snat_addr_be, key.dst_port_be));
        }
        // Taken; an entry that idled out is removed, and the port claimed like a free one, so
        // that two CPUs reclaiming it at once cannot both win.
        let stale = maps::reply(key)
            .is_some_and(|r| !config.is_live(key.protocol, r.state, r.last_seen_ns, now));
        if stale
            && replies.remove(key).is_ok()
            && replies.insert(key, reply, u64::from(BPF_NOEXIST)).is_ok()
        {
            return Some((snat_addr_be, key.dst_port_be));
        }
    }
    None
}
