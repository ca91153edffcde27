//! The service load balancer's datapath, attached with tcx on the node's pod-facing interfaces.
//!
//! A packet to a frontend is DNATed to its flow's backend, picking one for a new flow; a reply
//! from a backend is rewritten back to the frontend it answers for; anything else passes
//! untouched.
#![no_std]
#![no_main]

mod conntrack;
mod maps;
mod nat;
mod parse;
mod reject;
mod select;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb_common::maps::{
    FRONTEND_REJECT_WHEN_EMPTY, Flow, FlowKey, Frontend, FrontendKey, Reply, SCOPE_INTERNAL,
    STATE_CLOSING, STATE_OPEN,
};

use crate::{
    conntrack::{config, is_live, now_ns, touch},
    maps::{BACKENDS, FLOWS, FRONTENDS, REPLIES},
    nat::{End, rewrite},
    parse::{Packet, parse},
    reject::reject,
    select::select_backend,
    stats::count,
};

const PASS: i32 = TC_ACT_OK;
const DROP: i32 = TC_ACT_SHOT;

#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    match try_lb_tc(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_lb_tc(ctx: &TcContext) -> Result<i32, i32> {
    let Some(packet) = parse(ctx.data(), ctx.data_end()) else {
        return Ok(PASS);
    };
    let frontend_key = FrontendKey {
        addr_be: packet.key.dst_addr_be,
        port_be: packet.key.dst_port_be,
        protocol: packet.key.protocol,
        scope: SCOPE_INTERNAL,
    };
    match unsafe { FRONTENDS.get(frontend_key) } {
        Some(frontend) => to_backend(ctx, &packet, frontend),
        None => to_frontend(ctx, &packet),
    }
}

/// A client's packet to a frontend: DNAT to the flow's backend.
#[inline(always)]
fn to_backend(ctx: &TcContext, packet: &Packet, frontend: &Frontend) -> Result<i32, i32> {
    let config = config().ok_or_else(error)?;
    let now = now_ns();
    let protocol = packet.key.protocol;
    let live_flow = FLOWS.get_ptr_mut(packet.key).filter(|&flow| {
        let flow = unsafe { &*flow };
        is_live(config, protocol, flow.state, flow.last_seen_ns, now)
    });
    let backend = match live_flow {
        Some(flow) => {
            let flow = unsafe { &mut *flow };
            match unsafe { BACKENDS.get(flow.backend_id) } {
                Some(backend) => {
                    touch(&mut flow.last_seen_ns, &mut flow.state, packet.closing, now);
                    backend
                }
                None => {
                    count(|s| &mut s.reselected);
                    new_flow(ctx, packet, frontend, now)?
                }
            }
        }
        None => new_flow(ctx, packet, frontend, now)?,
    };
    rewrite(
        ctx,
        packet,
        End::Destination,
        backend.addr_be,
        backend.port_be,
    )
    .map_err(|_| error())?;
    count(|s| &mut s.forwarded);
    Ok(PASS)
}

/// Gives a flow a backend and records both of its directions.
#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    packet: &Packet,
    frontend: &Frontend,
    now: u64,
) -> Result<&'static lb_common::maps::Backend, i32> {
    if frontend.backend_count == 0 {
        if frontend.flags & FRONTEND_REJECT_WHEN_EMPTY != 0 {
            count(|s| &mut s.rejected_no_backend);
            return Err(reject(ctx, packet).unwrap_or(DROP));
        }
        count(|s| &mut s.dropped_no_backend);
        return Err(DROP);
    }
    let (backend_id, backend) = select_backend(frontend, &packet.key, now).ok_or_else(error)?;
    let state = if packet.closing {
        STATE_CLOSING
    } else {
        STATE_OPEN
    };
    let flow = Flow {
        last_seen_ns: now,
        backend_id,
        state,
        _pad: [0; 3],
    };
    let reply_key = FlowKey {
        src_addr_be: backend.addr_be,
        dst_addr_be: packet.key.src_addr_be,
        src_port_be: backend.port_be,
        dst_port_be: packet.key.src_port_be,
        protocol: packet.key.protocol,
        _pad: [0; 3],
    };
    let reply = Reply {
        last_seen_ns: now,
        frontend_addr_be: packet.key.dst_addr_be,
        frontend_port_be: packet.key.dst_port_be,
        state,
        _pad: 0,
    };
    FLOWS.insert(packet.key, flow, 0).map_err(|_| error())?;
    REPLIES.insert(reply_key, reply, 0).map_err(|_| error())?;
    count(|s| &mut s.new_flows);
    Ok(backend)
}

/// A packet that may be a backend's reply: rewrite its source back to the frontend.
#[inline(always)]
fn to_frontend(ctx: &TcContext, packet: &Packet) -> Result<i32, i32> {
    let Some(reply) = REPLIES.get_ptr_mut(packet.key) else {
        return Ok(PASS);
    };
    let reply = unsafe { &mut *reply };
    let config = config().ok_or_else(error)?;
    let now = now_ns();
    if !is_live(
        config,
        packet.key.protocol,
        reply.state,
        reply.last_seen_ns,
        now,
    ) {
        return Ok(PASS);
    }
    touch(
        &mut reply.last_seen_ns,
        &mut reply.state,
        packet.closing,
        now,
    );
    rewrite(
        ctx,
        packet,
        End::Source,
        reply.frontend_addr_be,
        reply.frontend_port_be,
    )
    .map_err(|_| error())?;
    count(|s| &mut s.replied);
    Ok(PASS)
}

/// Counts a failed map access or rewrite and drops the packet.
#[inline(always)]
fn error() -> i32 {
    count(|s| &mut s.dropped_error);
    DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
