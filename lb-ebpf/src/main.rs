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
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use lb_common::maps::{
    BACKEND_LOCAL, Backend, FRONTEND_REJECT_WHEN_EMPTY, Flow, FlowKey, Frontend, FrontendKey,
    Reply, SCOPE_EXTERNAL, SCOPE_INTERNAL, STATE_CLOSING, STATE_OPEN,
};

use crate::{
    conntrack::{config, is_live, now_ns, touch},
    maps::{BACKENDS, FLOWS, FRONTENDS, REPLIES, VIPS},
    nat::{End, Rewrite},
    parse::{Packet, parse},
    reject::reject,
    select::select_backend,
    stats::count,
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
    socket::recvmsg4(&ctx)
}

/// The packet core: a packet to a frontend of `scope` goes to a backend, a backend's reply
/// back to its client.
#[inline(always)]
fn balance<C: Rewrite>(ctx: &C, packet: &Packet, scope: u8) -> Verdict {
    let frontend_key = FrontendKey {
        addr_be: packet.key.dst_addr_be,
        port_be: packet.key.dst_port_be,
        protocol: packet.key.protocol,
        scope,
    };
    let result = match unsafe { FRONTENDS.get(frontend_key) } {
        Some(frontend) => to_backend(ctx, packet, frontend, scope),
        None => to_client(ctx, packet, Hook::Ingress),
    };
    match result {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

/// A client's packet to a frontend: DNAT to the flow's backend (and SNAT if the flow is).
#[inline(always)]
fn to_backend<C: Rewrite>(
    ctx: &C,
    packet: &Packet,
    frontend: &Frontend,
    scope: u8,
) -> Result<Verdict, Verdict> {
    let config = config().ok_or_else(error)?;
    let now = now_ns();
    let protocol = packet.key.protocol;
    // A SYN on a flow that is closing opens a new connection on a reused 4-tuple.
    let live_flow = FLOWS.get_ptr_mut(packet.key).filter(|&flow| {
        let flow = unsafe { &*flow };
        is_live(config, protocol, flow.state, flow.last_seen_ns, now)
            && !(flow.state == STATE_CLOSING && packet.opens_connection())
    });
    let (flow, backend) = match live_flow {
        Some(flow) => {
            let flow = unsafe { &mut *flow };
            match unsafe { BACKENDS.get(flow.backend_id) } {
                Some(backend) => {
                    if touch(&mut flow.last_seen_ns, &mut flow.state, packet.closing, now) {
                        keep_reply_alive(flow, backend, packet, now);
                    }
                    (*flow, backend)
                }
                None => {
                    count(|s| &mut s.reselected);
                    new_flow(packet, frontend, scope, now)?
                }
            }
        }
        None => new_flow(packet, frontend, scope, now)?,
    };
    ctx.rewrite(packet, End::Destination, backend.addr_be, backend.port_be)
        .map_err(|()| error())?;
    if (flow.src_addr_be, flow.src_port_be) != (packet.key.src_addr_be, packet.key.src_port_be) {
        ctx.rewrite(packet, End::Source, flow.src_addr_be, flow.src_port_be)
            .map_err(|()| error())?;
    }
    count(|s| &mut s.forwarded);
    Ok(Verdict::Pass)
}

/// A flow that only sends (a UDP stream, a half-closed connection) keeps its reply entry alive:
/// expired, it would let a late reply through unrewritten and free the flow's SNAT port for
/// another client.
#[inline(always)]
fn keep_reply_alive(flow: &Flow, backend: &Backend, packet: &Packet, now: u64) {
    let reply_key = FlowKey {
        src_addr_be: backend.addr_be,
        dst_addr_be: flow.src_addr_be,
        src_port_be: backend.port_be,
        dst_port_be: flow.src_port_be,
        protocol: packet.key.protocol,
        _pad: [0; 3],
    };
    if let Some(reply) = REPLIES.get_ptr_mut(reply_key) {
        let reply = unsafe { &mut *reply };
        reply.last_seen_ns = now;
        reply.state = flow.state;
    }
}

/// Gives a flow a backend, and a source to leave with, and records both of its directions.
#[inline(always)]
fn new_flow(
    packet: &Packet,
    frontend: &Frontend,
    scope: u8,
    now: u64,
) -> Result<(Flow, &'static Backend), Verdict> {
    if frontend.backend_count == 0 {
        if frontend.flags & FRONTEND_REJECT_WHEN_EMPTY != 0 {
            count(|s| &mut s.rejected_no_backend);
            return Err(Verdict::Reject);
        }
        count(|s| &mut s.dropped_no_backend);
        return Err(Verdict::Drop);
    }
    let config = config().ok_or_else(error)?;
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
        src_addr_be: reply_key.dst_addr_be,
        src_port_be: reply_key.dst_port_be,
        state,
        _pad: [0; 5],
    };
    if FLOWS.insert(client, flow, 0).is_err() {
        // Without its flow the reply entry would hold a SNAT port for nothing.
        let _ = REPLIES.remove(reply_key);
        return Err(error());
    }
    count(|s| &mut s.new_flows);
    Ok((flow, backend))
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
    if !is_live(
        config,
        packet.key.protocol,
        reply.state,
        reply.last_seen_ns,
        now,
    ) {
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
