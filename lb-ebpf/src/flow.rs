//! The flow table, the datapath's own conntrack: a flow's lookup (Live, BackendGone or Miss)
//! and its creation, with the reply entry that maps its backend's answers back. A flow lives
//! while it sees packets within its idle timeout ([`Config::is_live`]); FIN or RST moves it to
//! the shorter closing timeout. The agent removes idle entries; the LRU maps evict the oldest
//! when full all the same.

use aya_ebpf::bindings::BPF_NOEXIST;
use lb_common::maps::{
    BACKEND_LOCAL, Config, FLOW_COUNTED, FRONTEND_REJECT_WHEN_EMPTY, Flow, FlowKey, Frontend,
    PROTO_TCP, Reply, SCOPE_EXTERNAL, STATE_CLOSING, STATE_OPEN, counts_flows,
};

use crate::{
    balance::{Verdict, error},
    clock::now_ns,
    family::Family,
    maps,
    parse::Packet,
    select::select_backend,
    snat,
    stats::count,
};

/// Refresh `last_seen_ns` at most this often: a write per packet would bounce the entry's cache
/// line between CPUs for nothing.
const REFRESH_NS: u64 = 1_000_000_000;

/// What the flow table says of a packet.
pub enum Tracked<A: 'static> {
    /// A live flow, refreshed: the packet goes to its backend.
    Live(&'static Flow<A>),
    /// A live flow whose backend stopped serving: the packet is a new flow's.
    BackendGone,
    /// No live flow.
    Miss,
}

/// Looks the packet's flow up. A TCP connection stays on its backend until it closes or
/// idles out, whatever becomes of the backend or its Service (kube-proxy's conntrack keeps
/// established connections through rollouts; moved mid-stream, a connection would meet a
/// reset); only a SYN asks whether the backend is still there, so that a new connection on a
/// tuple still tracked (a client reusing its port after a close this node did not see) never
/// meets a gone backend. A UDP flow stays while its backend serves, and its next datagram
/// after that is a new flow's: a live backend's, or none once its Service is gone (kube-proxy
/// flushes the UDP conntrack entries of endpoints that stopped serving, and of deleted
/// Services).
#[inline(always)]
pub fn flow_lookup<A: Family>(packet: &Packet<A>) -> Result<Tracked<A>, Verdict> {
    let Some(flow) = maps::flow_mut(packet.key) else {
        return Ok(Tracked::Miss);
    };
    // Config and clock only once there is a flow: most packets have none.
    let config = maps::config().ok_or_else(error)?;
    let now = now_ns();
    let protocol = packet.key.protocol;
    // A SYN on a flow that is closing opens a new connection on a reused 4-tuple.
    if !config.is_live(protocol, flow.state, flow.last_seen_ns, now)
        || (flow.state == STATE_CLOSING && packet.opens_connection())
    {
        return Ok(Tracked::Miss);
    }
    let asks = protocol != PROTO_TCP || packet.opens_connection();
    if asks && !backend_there(flow) {
        return Ok(Tracked::BackendGone);
    }
    // Counted before `touch` marks it closing, which tells when.
    if packet.closing() && flow.state != STATE_CLOSING && flow.flags & FLOW_COUNTED != 0 {
        // Active no more: IPVS's inactive connection, until it idles out.
        maps::add_load(flow.backend_id, -1, 1);
    }
    if touch(
        &mut flow.last_seen_ns,
        &mut flow.state,
        packet.closing(),
        now,
    ) {
        keep_reply_alive(flow, packet, now);
    }
    Ok(Tracked::Live(flow))
}

/// Records a packet of a live entry; whether the entry was written.
#[inline(always)]
pub fn touch(last_seen_ns: &mut u64, state: &mut u8, closing: bool, now: u64) -> bool {
    if closing && *state != STATE_CLOSING {
        *state = STATE_CLOSING;
        *last_seen_ns = now;
        true
    } else if now.saturating_sub(*last_seen_ns) > REFRESH_NS {
        *last_seen_ns = now;
        true
    } else {
        false
    }
}

/// Whether the flow's backend is still in the backends map, where the agent keeps every
/// backend a slot names and every serving endpoint of a UDP frontend. Only after the agent
/// removed backends ([`maps::backends_epoch`]) is it looked up.
#[inline(always)]
fn backend_there<A: Family>(flow: &mut Flow<A>) -> bool {
    let epoch = maps::backends_epoch();
    if flow.backends_epoch == epoch {
        return true;
    }
    if maps::backend::<A>(flow.backend_id).is_none() {
        return false;
    }
    flow.backends_epoch = epoch;
    true
}

/// A flow that only sends (a UDP stream, a half-closed connection) keeps its reply entry alive,
/// and one the LRU table evicted is made again: without it a late reply would pass
/// unrewritten and the flow's SNAT port go to another client.
#[inline(always)]
fn keep_reply_alive<A: Family>(flow: &Flow<A>, packet: &Packet<A>, now: u64) {
    let reply_key = FlowKey {
        src_addr_be: flow.backend_addr_be,
        dst_addr_be: flow.src_addr_be,
        src_port_be: flow.backend_port_be,
        dst_port_be: flow.src_port_be,
        protocol: packet.key.protocol,
        _pad: [0; 3],
    };
    if let Some(reply) = maps::reply_mut(reply_key) {
        reply.last_seen_ns = now;
        reply.state = flow.state;
        return;
    }
    let reply = Reply {
        last_seen_ns: now,
        frontend_addr_be: packet.key.dst_addr_be,
        client_addr_be: packet.key.src_addr_be,
        frontend_port_be: packet.key.dst_port_be,
        client_port_be: packet.key.src_port_be,
        state: flow.state,
        _pad: [0; 3],
    };
    // Only if still free: a SNAT port is not taken from a flow that holds it now.
    let _ = A::replies().insert(reply_key, reply, u64::from(BPF_NOEXIST));
}

/// Gives a flow a backend, and a source to leave with, and records both of its directions.
#[inline(always)]
pub fn new_flow<A: Family>(
    packet: &Packet<A>,
    frontend: &Frontend,
    scope: u8,
    now: u64,
) -> Result<Flow<A>, Verdict> {
    if frontend.backend_count == 0 {
        if frontend.flags & FRONTEND_REJECT_WHEN_EMPTY != 0 {
            count(|s| &mut s.rejected_no_backend);
            return Err(Verdict::Reject);
        }
        count(|s| &mut s.dropped_no_backend);
        return Err(Verdict::Drop);
    }
    let config: &Config = maps::config().ok_or_else(error)?;
    // Read before the backend is: a removal after this is a later epoch.
    let backends_epoch = maps::backends_epoch();
    let (backend_id, backend) =
        select_backend(frontend, &packet.key, now, true).ok_or_else(error)?;
    let state = if packet.closing() {
        STATE_CLOSING
    } else {
        STATE_OPEN
    };
    let client = &packet.key;
    let replies = A::replies();
    let reply = Reply {
        last_seen_ns: now,
        frontend_addr_be: client.dst_addr_be,
        client_addr_be: client.src_addr_be,
        frontend_port_be: client.dst_port_be,
        client_port_be: client.src_port_be,
        state,
        _pad: [0; 3],
    };
    let mut reply_key = FlowKey {
        src_addr_be: backend.addr_be,
        dst_addr_be: client.src_addr_be,
        src_port_be: backend.port_be,
        dst_port_be: client.src_port_be,
        protocol: client.protocol,
        _pad: [0; 3],
    };
    if backend.addr_be == client.src_addr_be {
        // Hairpin: a backend calling its own service meets itself; from the frontend's
        // address, its answer leaves the pod and comes back through here.
        reply_key.dst_addr_be = client.dst_addr_be;
        replies.insert(reply_key, reply, 0).map_err(|_| error())?;
    } else if scope == SCOPE_EXTERNAL && backend.flags & BACKEND_LOCAL == 0 {
        let Some((addr_be, port_be)) = snat::allocate(config, backend, client, &reply, now) else {
            count(|s| &mut s.dropped_no_snat);
            return Err(Verdict::Drop);
        };
        reply_key.dst_addr_be = addr_be;
        reply_key.dst_port_be = port_be;
        count(|s| &mut s.snat_flows);
    } else {
        replies.insert(reply_key, reply, 0).map_err(|_| error())?;
    }
    let flow = Flow {
        last_seen_ns: now,
        backend_id,
        backend_addr_be: backend.addr_be,
        src_addr_be: reply_key.dst_addr_be,
        backend_port_be: backend.port_be,
        src_port_be: reply_key.dst_port_be,
        state,
        flags: if counts_flows(frontend.algorithm) {
            FLOW_COUNTED
        } else {
            0
        },
        _pad: [0; 2],
        service_id: frontend.service_id,
        backends_epoch,
        _pad_end: 0,
    };
    if A::flows().insert(client, flow, 0).is_err() {
        // Without its flow the reply entry would hold a SNAT port for nothing.
        let _ = replies.remove(reply_key);
        return Err(error());
    }
    if flow.flags & FLOW_COUNTED != 0 {
        let open = i64::from(flow.state == STATE_OPEN);
        maps::add_load(flow.backend_id, open, 1 - open);
    }
    count(|s| &mut s.new_flows);
    Ok(flow)
}
