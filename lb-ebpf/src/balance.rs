//! The packet core, shared by tc and XDP: a packet of a live flow goes to the flow's backend; a
//! packet to a frontend of the program's scope starts a flow; a backend's reply goes back to
//! its client ([`reply`](crate::reply)); anything else passes.

use lb_common::maps::{FRONTEND_SOURCE_RANGES, Flow, FrontendKey};

use crate::{
    clock::now_ns,
    family::Family,
    flow::{Tracked, flow_lookup, new_flow},
    fragments, maps,
    nat::{End, Rewrite},
    parse::{Packet, Piece},
    reply::{Hook, to_client},
    stats::{count, count_frontend},
};

/// What becomes of a packet.
pub enum Verdict {
    Pass,
    Drop,
    /// Answer with a TCP reset or an ICMP port unreachable.
    Reject,
}

/// Balances a packet that `scope`'s program sees before routing.
#[inline(always)]
pub fn balance<C: Rewrite, A: Family>(ctx: &C, packet: &Packet<A>, scope: u8) -> Verdict {
    match try_balance(ctx, packet, scope) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

#[inline(always)]
fn try_balance<C: Rewrite, A: Family>(
    ctx: &C,
    packet: &Packet<A>,
    scope: u8,
) -> Result<Verdict, Verdict> {
    let backend_gone = match flow_lookup(packet)? {
        Tracked::Live(flow) => return forward(ctx, packet, flow, false),
        Tracked::BackendGone => true,
        Tracked::Miss => false,
    };
    // A later fragment follows its datagram's flow, or is a reply's: it starts no flow.
    if packet.piece == Piece::Later {
        if backend_gone {
            fragments::unplaced();
            return Ok(Verdict::Drop);
        }
        return to_client(ctx, packet, Hook::Ingress);
    }
    let Some(frontend) = maps::frontend(frontend_key(packet, scope)) else {
        return to_client(ctx, packet, Hook::Ingress);
    };
    if frontend.flags & FRONTEND_SOURCE_RANGES != 0 {
        check_source(frontend.service_id, packet)?;
    }
    if backend_gone {
        count(|s| &mut s.reselected);
    }
    let flow = new_flow(packet, frontend, scope, now_ns())?;
    forward(ctx, packet, &flow, true)
}

/// Drops a new flow's packet whose source the load-balancer source ranges of frontend
/// `service_id` leave out, before a flow is made or a reject sent.
#[inline(always)]
fn check_source<A: Family>(service_id: u32, packet: &Packet<A>) -> Result<(), Verdict> {
    if maps::source_allowed(service_id, packet.key.src_addr_be) {
        return Ok(());
    }
    count(|s| &mut s.dropped_source_range);
    Err(Verdict::Drop)
}

#[inline(always)]
fn frontend_key<A: Family>(packet: &Packet<A>, scope: u8) -> FrontendKey<A> {
    FrontendKey {
        addr_be: packet.key.dst_addr_be,
        port_be: packet.key.dst_port_be,
        protocol: packet.key.protocol,
        scope,
    }
}

/// DNATs a packet of `flow` to its backend, and SNATs it if the flow is.
#[inline(always)]
fn forward<C: Rewrite, A: Family>(
    ctx: &C,
    packet: &Packet<A>,
    flow: &Flow<A>,
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
    // Here, not only where tc passes it: a flow outlives its Service, whose address may no
    // longer be a frontend's.
    fragments::remember(packet);
    count(|s| &mut s.forwarded);
    count_frontend(flow.service_id, packet.ip_len, new_flow);
    Ok(Verdict::Pass)
}

/// Counts a failed map access or rewrite; the packet is dropped.
#[inline(always)]
pub fn error() -> Verdict {
    count(|s| &mut s.dropped_error);
    Verdict::Drop
}
