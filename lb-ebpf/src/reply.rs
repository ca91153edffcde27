//! Replies: a backend's packet rewritten back to the frontend and the client it answers.

use lb_common::maps::Vip;

use crate::{
    balance::{Verdict, error},
    clock::now_ns,
    family::Family,
    flow::touch,
    fragments, maps,
    nat::{End, Rewrite},
    parse::Packet,
    stats::count,
};

/// Where a program runs: before routing, or after.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

/// A packet that may be a backend's reply: rewrite it back to the frontend and the client. On
/// ingress, only a reply whose destination changes (SNATed, hairpinned) is rewritten, before
/// routing needs it; the others are left to the egress program, after routing. On ingress, a
/// packet that is no reply, to a ClusterIP on a port it does not serve, is dropped.
#[inline(always)]
pub fn to_client<C: Rewrite, A: Family>(
    ctx: &C,
    packet: &Packet<A>,
    hook: Hook,
) -> Result<Verdict, Verdict> {
    let Some(reply) = maps::reply_mut(packet.key) else {
        if hook == Hook::Ingress
            && maps::vip(packet.key.dst_addr_be).is_some_and(Vip::is_cluster_ip)
        {
            count(|s| &mut s.dropped_unknown_port);
            return Ok(Verdict::Drop);
        }
        return Ok(Verdict::Pass);
    };
    let to_client = (reply.client_addr_be, reply.client_port_be)
        != (packet.key.dst_addr_be, packet.key.dst_port_be);
    if hook == Hook::Ingress && !to_client {
        return Ok(Verdict::Pass);
    }
    let config = maps::config().ok_or_else(error)?;
    let now = now_ns();
    if !config.is_live(packet.key.protocol, reply.state, reply.last_seen_ns, now) {
        return Ok(Verdict::Pass);
    }
    touch(
        &mut reply.last_seen_ns,
        &mut reply.state,
        packet.closing(),
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
    fragments::remember(packet);
    count(|s| &mut s.replied);
    Ok(Verdict::Pass)
}
