//! The service load balancer's datapath: a tc program on the node's pod-facing interfaces
//! (traffic from the cluster) and an XDP program on its uplinks (traffic from outside), over
//! one packet core; and socket hooks for the node's own processes.
//!
//! A packet to a frontend is DNATed to its flow's backend, picking one for a new flow. A reply
//! from a backend is rewritten back to the frontend it answers for after routing, by the tc
//! egress program on the interface it leaves by, as kube-proxy's conntrack does; only replies
//! whose destination must change first (SNATed and hairpinned flows) are rewritten on ingress.
//! Anything else passes untouched, but for ports a ClusterIP does not serve, which drop.
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod snat;
mod socket;
mod stats;

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use lb_common::maps::{
    BACKEND_LOCAL, FRONTEND_REJECT_WHEN_EMPTY, Flow, FlowKey, Frontend, FrontendKey, PROTO_TCP,
    Reply, SCOPE_EXTERNAL, SCOPE_INTERNAL, STATE_CLOSING, STATE_OPEN,
};

use crate::{
    conntrack::{backends_epoch, config, now_ns, touch},
    maps::{BACKENDS, FLOWS, FRONTENDS, REPLIES, VIPS},
    nat::{End, Rewrite},
    parse::{Packet, parse},
    reject::reject,
    select::select_backend,
    stats::{count, count_frontend},
};

/// Where a program runs: before routing, or after.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Ingress,
    Egress,
}

/// What becomes of a packet.
enum Verdict {
    Pass,
    Drop,
    /// Answer with a TCP reset or an ICMP port unreachable.
    Reject,
}

#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    let Some(packet) = parse(ctx.data(), ctx.data_end()) else {
        return TC_ACT_OK;
    };
    match balance(&ctx, &packet, SCOPE_INTERNAL) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
        Verdict::Reject => reject(&ctx, &packet).unwrap_or(TC_ACT_SHOT),
    }
}

/// Replies leaving the node's interfaces (to a pod, or out of an uplink), routed already.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    let Some(packet) = parse(ctx.data(), ctx.data_end()) else {
        return TC_ACT_OK;
    };
    match to_client(&ctx, &packet, Hook::Egress) {
        Ok(Verdict::Pass) | Err(Verdict::Pass) => TC_ACT_OK,
        Ok(_) | Err(_) => TC_ACT_SHOT,
    }
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let Some(packet) = parse(ctx.data(), ctx.data_end()) else {
        return xdp_action::XDP_PASS;
    };
    match balance(&ctx, &packet, SCOPE_EXTERNAL) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Reject => reject(&ctx, &packet).unwrap_or(xdp_action::XDP_DROP),
    }
}

/// Not attached: run by the agent to measure the kernel's tick.
#[xdp]
pub fn lb_clock_probe(ctx: XdpContext) -> u32 {
    if conntrack::sample(ctx.data(), ctx.data_end()) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_ABORTED
    }
}

#[cgroup_sock_addr(connect4)]
pub fn lb_connect4(ctx: SockAddrContext) -> i32 {
    socket::connect4(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn lb_sendmsg4(ctx: SockAddrContext) -> i32 {
    socket::sendmsg4(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn lb_recvmsg4(ctx: SockAddrContext) -> i32 {
    socket::to_frontend(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    socket::to_frontend(&ctx)
}

#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    socket::released(&ctx)
}

/// The packet core. A packet of a live flow goes to the flow's backend; a packet to a frontend
/// of `scope` starts a flow; a backend's reply goes back to its client.
#[inline(always)]
fn balance<C: Rewrite>(ctx: &C, packet: &Packet, scope: u8) -> Verdict {
    match try_balance(ctx, packet, scope) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn try_balance<C: Rewrite>(ctx: &C, packet: &Packet, scope: u8) -> Result<Verdict, Verdict> {
    let backend_gone = match flow_lookup(packet)? {
        Tracked::Live(flow) => return forward(ctx, packet, flow, false),
        Tracked::BackendGone => true,
        Tracked::Miss => false,
    };
    // SAFETY: a hash map value stays valid while the program runs (RCU); the agent replaces
    // frontends whole, so the read sees one version.
    let Some(frontend) = (unsafe { FRONTENDS.get(frontend_key(packet, scope)) }) else {
        return to_client(ctx, packet, Hook::Ingress);
    };
    if backend_gone {
        count(|s| &mut s.reselected);
    }
    let flow = new_flow(packet, frontend, scope, now_ns())?;
    forward(ctx, packet, &flow, true)
}

/// What the flow table says of a packet.
enum Tracked<'a> {
    /// A live flow, refreshed: the packet goes to its backend.
    Live(&'a Flow),
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
fn flow_lookup<'a>(packet: &Packet) -> Result<Tracked<'a>, Verdict> {
    let Some(flow) = FLOWS.get_ptr_mut(packet.key) else {
        return Ok(Tracked::Miss);
    };
    // SAFETY: an LRU hash value stays valid while the program runs (RCU); racing writers of
    // the same flow write the same fields with values that are each valid.
    let flow = unsafe { &mut *flow };
    // Config and clock only once there is a flow: most packets have none.
    let config = config().ok_or_else(error)?;
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
    if touch(&mut flow.last_seen_ns, &mut flow.state, packet.closing, now) {
        keep_reply_alive(flow, packet, now);
    }
    Ok(Tracked::Live(flow))
}

/// Whether the flow's backend is still in [`BACKENDS`], where the agent keeps every backend a
/// slot names and every serving endpoint of a UDP frontend. Only after the agent removed
/// backends ([`backends_epoch`]) is it looked up.
#[inline(always)]
fn backend_there(flow: &mut Flow) -> bool {
    let epoch = backends_epoch();
    if flow.backends_epoch == epoch {
        return true;
    }
    // SAFETY: as for every hash map value, valid while the program runs; only its presence
    // is read.
    if unsafe { BACKENDS.get(flow.backend_id) }.is_none() {
        return false;
    }
    flow.backends_epoch = epoch;
    true
}

#[inline(always)]
fn frontend_key(packet: &Packet, scope: u8) -> FrontendKey {
    FrontendKey {
        addr_be: packet.key.dst_addr_be,
        port_be: packet.key.dst_port_be,
        protocol: packet.key.protocol,
        scope,
    }
}

/// DNATs a packet of `flow` to its backend, and SNATs it if the flow is.
#[inline(always)]
fn forward<C: Rewrite>(
    ctx: &C,
    packet: &Packet,
    flow: &Flow,
    new_flow: bool,
) -> Result<Verdict, Verdict> {
    ctx.rewrite(
        packet,
        End::Destination,
        flow.backend_addr_be,
        flow.backend_port_be,
    )
    .map_err(|()| error())?;
    if (flow.src_addr_be, flow.src_port_be) != (packet.key.src_addr_be, packet.key.src_port_be) {
        ctx.rewrite(packet, End::Source, flow.src_addr_be, flow.src_port_be)
            .map_err(|()| error())?;
    }
    count(|s| &mut s.forwarded);
    count_frontend(flow.service_id, packet.ip_len, new_flow);
    Ok(Verdict::Pass)
}

/// A flow that only sends (a UDP stream, a half-closed connection) keeps its reply entry alive,
/// and one the LRU table evicted is made again: without it a late reply would pass
/// unrewritten and the flow's SNAT port go to another client.
#[inline(always)]
fn keep_reply_alive(flow: &Flow, packet: &Packet, now: u64) {
    let reply_key = FlowKey {
        src_addr_be: flow.backend_addr_be,
        dst_addr_be: flow.src_addr_be,
        src_port_be: flow.backend_port_be,
        dst_port_be: flow.src_port_be,
        protocol: packet.key.protocol,
        _pad: [0; 3],
    };
    if let Some(reply) = REPLIES.get_ptr_mut(reply_key) {
        let reply = unsafe { &mut *reply };
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
    let _ = REPLIES.insert(reply_key, reply, u64::from(BPF_NOEXIST));
}

/// Gives a flow a backend, and a source to leave with, and records both of its directions.
#[inline(always)]
fn new_flow(packet: &Packet, frontend: &Frontend, scope: u8, now: u64) -> Result<Flow, Verdict> {
    if frontend.backend_count == 0 {
        if frontend.flags & FRONTEND_REJECT_WHEN_EMPTY != 0 {
            count(|s| &mut s.rejected_no_backend);
            return Err(Verdict::Reject);
        }
        count(|s| &mut s.dropped_no_backend);
        return Err(Verdict::Drop);
    }
    let config = config().ok_or_else(error)?;
    // Read before the backend is: a removal after this is a later epoch.
    let backends_epoch = backends_epoch();
    let (backend_id, backend) = select_backend(frontend, &packet.key, now).ok_or_else(error)?;
    let state = if packet.closing {
        STATE_CLOSING
    } else {
        STATE_OPEN
    };
    let client = &packet.key;
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
        REPLIES.insert(reply_key, reply, 0).map_err(|_| error())?;
    } else if scope == SCOPE_EXTERNAL && backend.flags & BACKEND_LOCAL == 0 {
        let Some(port_be) = snat::allocate(config, backend, client, &reply, now) else {
            count(|s| &mut s.dropped_no_snat);
            return Err(Verdict::Drop);
        };
        reply_key.dst_addr_be = config.snat_addr_be;
        reply_key.dst_port_be = port_be;
        count(|s| &mut s.snat_flows);
    } else {
        REPLIES.insert(reply_key, reply, 0).map_err(|_| error())?;
    }
    let flow = Flow {
        last_seen_ns: now,
        backend_id,
        backend_addr_be: backend.addr_be,
        src_addr_be: reply_key.dst_addr_be,
        backend_port_be: backend.port_be,
        src_port_be: reply_key.dst_port_be,
        state,
        _pad: [0; 3],
        service_id: frontend.service_id,
        backends_epoch,
        _pad_end: 0,
    };
    if FLOWS.insert(client, flow, 0).is_err() {
        // Without its flow the reply entry would hold a SNAT port for nothing.
        let _ = REPLIES.remove(reply_key);
        return Err(error());
    }
    count(|s| &mut s.new_flows);
    Ok(flow)
}

/// A packet that may be a backend's reply: rewrite it back to the frontend and the client. On
/// ingress, only a reply whose destination changes (SNATed, hairpinned) is rewritten, before
/// routing needs it; the others are left to the egress program, after routing. On ingress, a
/// packet that is no reply, to a ClusterIP on a port it does not serve, is dropped.
#[inline(always)]
fn to_client<C: Rewrite>(ctx: &C, packet: &Packet, hook: Hook) -> Result<Verdict, Verdict> {
    let Some(reply) = REPLIES.get_ptr_mut(packet.key) else {
        if hook == Hook::Ingress && unsafe { VIPS.get(packet.key.dst_addr_be) }.is_some() {
            count(|s| &mut s.dropped_unknown_port);
            return Ok(Verdict::Drop);
        }
        return Ok(Verdict::Pass);
    };
    let reply = unsafe { &mut *reply };
    let to_client = (reply.client_addr_be, reply.client_port_be)
        != (packet.key.dst_addr_be, packet.key.dst_port_be);
    if hook == Hook::Ingress && !to_client {
        return Ok(Verdict::Pass);
    }
    let config = config().ok_or_else(error)?;
    let now = now_ns();
    if !config.is_live(packet.key.protocol, reply.state, reply.last_seen_ns, now) {
        return Ok(Verdict::Pass);
    }
    touch(
        &mut reply.last_seen_ns,
        &mut reply.state,
        packet.closing,
        now,
    );
    ctx.rewrite(
        packet,
        End::Source,
        reply.frontend_addr_be,
        reply.frontend_port_be,
    )
    .map_err(|()| error())?;
    if to_client {
        ctx.rewrite(
            packet,
            End::Destination,
            reply.client_addr_be,
            reply.client_port_be,
        )
        .map_err(|()| error())?;
    }
    count(|s| &mut s.replied);
    Ok(Verdict::Pass)
}

/// Counts a failed map access or rewrite; the packet is dropped.
#[inline(always)]
fn error() -> Verdict {
    count(|s| &mut s.dropped_error);
    Verdict::Drop
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
