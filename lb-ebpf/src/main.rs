//! The service load balancer's datapath: a tc program on the node's pod-facing interfaces
//! (traffic from the cluster) and an XDP program on its uplinks (traffic from outside, but
//! for IP fragments of either family, which a tc program after it balances), over one packet core
//! ([`balance`]); tc egress on both for replies, and on `lo` for the node's own ICMP errors
//! about SNATed flows; and socket hooks for the node's own processes ([`socket`]). This file
//! holds the entry points only.
//!
//! A packet to a frontend is DNATed to its flow's backend, picking one for a new flow. A reply
//! from a backend is rewritten back to the frontend it answers for after routing, by the tc
//! egress program on the interface it leaves by, as kube-proxy's conntrack does; only replies
//! whose destination must change first (SNATed and hairpinned flows) are rewritten on ingress.
//! Anything else passes untouched, but for ports a ClusterIP does not serve, which drop.
//!
//! | module | job |
//! |---|---|
//! | `parse`, `headers` | the packet's fields, bounds-checked, offsets from the header structs |
//! | `fragments` | a datagram's later fragments, given its first's ports |
//! | `balance` | the packet core: flow or frontend, then forward |
//! | `flow` | flow lookup (Live / BackendGone / Miss) and creation, with its reply entry |
//! | `reply` | a backend's answer back to the frontend and the client |
//! | `select`, `hash` | a backend for a new flow: affinity, round robin, source hash, Maglev |
//! | `snat` | a node port for a flow to a backend elsewhere |
//! | `nat` | address and port rewrites, checksums |
//! | `reject` | the TCP reset or ICMP port unreachable of a frontend without backends |
//! | `icmp` | ICMP and ICMPv6 errors about tracked flows, translated as their packets |
//! | `route` | the node's own errors about SNATed flows, sent out of `lo` toward the client |
//! | `socket` | the node's own sockets (both families), balanced at connect and sendmsg |
//! | `maps`, `stats`, `clock` | map definitions and accessors, counters, the time |
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(
    internal_features,
    reason = "BPF has atomic adds but no compare-and-swap, so core's atomic types offer no \
              fetch_add: the intrinsic it lowers to is the way to the instruction"
)]
#![allow(
    clippy::inline_always,
    reason = "eBPF: every helper is inlined into its program, which the verifier checks whole"
)]
#![allow(
    clippy::needless_pass_by_value,
    reason = "the entry points take their context as the program macros hand it"
)]

mod balance;
mod clock;
mod family;
mod flow;
mod fragments;
mod hash;
mod headers;
mod icmp;
mod maps;
mod nat;
mod parse;
mod reject;
mod reply;
mod route;
mod select;
mod snat;
mod socket;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{cgroup_sock, cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, SockContext, TcContext, XdpContext},
};
use lb_common::maps::{Ipv6Be, SCOPE_EXTERNAL, SCOPE_INTERNAL};

use crate::{
    balance::{Verdict, balance},
    family::Family,
    fragments::{Input, input, input6},
    headers::Ipv4Header,
    parse::{Frame, Packet, Piece, ipv4, is_plain_datagram6, parse6},
    reject::{Reject, answer4, answer6, rejection},
    reply::{Hook, to_client},
};

/// Traffic from pods, before routing.
#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    match ipv4(ctx.data(), ctx.data_end()) {
        Some(_) => tc_ingress4(&ctx, SCOPE_INTERNAL),
        None if translated6(ctx.data(), ctx.data_end(), Hook::Ingress) => TC_ACT_OK,
        None => tc_ingress6(&ctx).unwrap_or_else(|reject| tc_answer6(&ctx, &reject)),
    }
}

// Each family's half of a program is a function of its own, out of line: the verifier takes
// one stack frame for each, where inlined together they would pass its 512 bytes. The IPv4
// half reads its header again, which leaves the program's own frame empty: the IPv6 half's,
// the deepest, and the backend choice's under it take all of the 512 bytes. IPv6's half leaves little of its frame: its
// rejects are answered in a frame of their own, after it returns, and its ICMPv6 errors
// translated in another, before it is called. The IPv4 half serves `lb_tc_uplink` too, in
// outside's scope, for the fragments XDP passes.
#[inline(never)]
fn tc_ingress4(ctx: &TcContext, scope: u8) -> i32 {
    let Some((ip, header_len)) = ipv4(ctx.data(), ctx.data_end()) else {
        return TC_ACT_OK;
    };
    match tc_input4(ctx, &ip, header_len) {
        Ok(packet) => tc_balance(ctx, &packet, scope)
            .unwrap_or_else(|reject| answer4(ctx, &reject).unwrap_or(TC_ACT_SHOT)),
        Err(verdict) => verdict,
    }
}

#[inline(never)]
fn tc_ingress6(ctx: &TcContext) -> Result<i32, Reject> {
    match tc_input6(ctx) {
        Ok(packet) => tc_balance(ctx, &packet, SCOPE_INTERNAL),
        Err(verdict) => Ok(verdict),
    }
}

/// Whether the IPv6 packet in the frame was an ICMPv6 error about a tracked flow translated
/// toward another host ([`icmp::translate6`]); one translated in place goes on to the
/// family's half too, which passes it. Only a packet that is no TCP or UDP datagram straight
/// past its IPv6 header is looked at: the datagrams, nearly every packet, meet no call.
#[inline(always)]
fn translated6(data: usize, data_end: usize, hook: Hook) -> bool {
    !is_plain_datagram6(data, data_end) && translate6(data, data_end, hook)
}

/// [`icmp::translate6`] in a stack frame of its own. The frame's ends are passed, not the
/// context: given only a context's loads, the compiler passes them as 32-bit words, which the
/// verifier refuses to widen back into packet pointers.
#[inline(never)]
fn translate6(data: usize, data_end: usize, hook: Hook) -> bool {
    icmp::translate6(data, data_end, hook)
}

/// As [`translate6`], for IPv4: `lb_tc_loopback`'s, whose two families' translations would
/// otherwise share its frame (the IPv4 programs translate inline).
#[inline(never)]
fn translate4(data: usize, data_end: usize, hook: Hook) -> bool {
    icmp::translate4(data, data_end, hook)
}

#[inline(never)]
fn tc_answer6(ctx: &TcContext, reject: &Reject) -> i32 {
    answer6(ctx, reject).unwrap_or(TC_ACT_SHOT)
}

/// The IP fragments from outside, which XDP passes: balanced here, where a later fragment
/// that comes before its first can be held for it ([`fragments`]).
#[classifier]
pub fn lb_tc_uplink(ctx: TcContext) -> i32 {
    // XDP saw to every packet that is no fragment: a glance at the IP header, not a parse (but
    // for IPv6 past extension headers, whose last may be a fragment header).
    match ipv4(ctx.data(), ctx.data_end()) {
        Some((ip, _)) if fragments::is_fragment(&ip) => tc_ingress4(&ctx, SCOPE_EXTERNAL),
        Some(_) => TC_ACT_OK,
        None if is_plain_datagram6(ctx.data(), ctx.data_end()) => TC_ACT_OK,
        None => tc_uplink6(&ctx),
    }
}

/// The IPv6 fragments from outside. A first fragment to a frontend without backends is
/// dropped, not answered: it carries an extension header, the fragment header, and a reject
/// answers only a packet without ([`rejection`]).
#[inline(never)]
fn tc_uplink6(ctx: &TcContext) -> i32 {
    match tc_input6(ctx) {
        Ok(packet) if packet.piece != Piece::Whole => {
            tc_balance(ctx, &packet, SCOPE_EXTERNAL).unwrap_or(TC_ACT_SHOT)
        }
        Ok(_) => TC_ACT_OK,
        Err(verdict) => verdict,
    }
}

/// The IPv4 packet tc ingress balances: parsed, or a later fragment placed (held until it can
/// be, if it must wait for its first); else what becomes of the skb (ICMP errors translated).
#[inline(always)]
fn tc_input4(ctx: &TcContext, ip: &Ipv4Header, header_len: usize) -> Result<Packet, i32> {
    match input(ctx.data(), ctx.data_end(), Frame::Linear, ip, header_len) {
        Input::Packet(packet) => Ok(packet),
        Input::Unplaced(packet) => fragments::hold(ctx, packet),
        Input::Other => {
            icmp::translate4(ctx.data(), ctx.data_end(), Hook::Ingress);
            Err(TC_ACT_OK)
        }
    }
}

/// The IPv6 packet tc ingress balances, as [`tc_input4`]; ICMPv6 errors were translated before.
#[inline(always)]
fn tc_input6(ctx: &TcContext) -> Result<Packet<Ipv6Be>, i32> {
    match input6(ctx.data(), ctx.data_end(), Frame::Linear) {
        Input::Packet(packet) => Ok(packet),
        Input::Unplaced(packet) => fragments::hold(ctx, packet),
        Input::Other => Err(TC_ACT_OK),
    }
}

/// What tc does with a packet it balanced; `Err` for a new flow to answer (a reject), which the
/// caller writes.
#[inline(always)]
fn tc_balance<A: Family>(ctx: &TcContext, packet: &Packet<A>, scope: u8) -> Result<i32, Reject> {
    match balance(ctx, packet, scope) {
        Verdict::Pass => Ok(fragments::release(ctx, packet)),
        Verdict::Drop => Ok(TC_ACT_SHOT),
        Verdict::Reject => rejection(packet).ok_or(TC_ACT_SHOT).map_or_else(Ok, Err),
    }
}

/// Replies leaving the node's interfaces (to a pod, or out of an uplink), routed already.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    match ipv4(ctx.data(), ctx.data_end()) {
        Some((ip, header_len)) => tc_egress4(&ctx, &ip, header_len),
        None if translated6(ctx.data(), ctx.data_end(), Hook::Egress) => TC_ACT_OK,
        None => tc_egress6(&ctx),
    }
}

#[inline(never)]
fn tc_egress4(ctx: &TcContext, ip: &Ipv4Header, header_len: usize) -> i32 {
    match input(ctx.data(), ctx.data_end(), Frame::Linear, ip, header_len) {
        Input::Packet(packet) => tc_reply(ctx, &packet),
        // Holding is ingress's: leaving, it is no reply this node rewrites.
        Input::Unplaced(_) => TC_ACT_OK,
        Input::Other => {
            icmp::translate4(ctx.data(), ctx.data_end(), Hook::Egress);
            TC_ACT_OK
        }
    }
}

#[inline(never)]
fn tc_egress6(ctx: &TcContext) -> i32 {
    match input6(ctx.data(), ctx.data_end(), Frame::Linear) {
        Input::Packet(packet) => tc_reply(ctx, &packet),
        // As IPv4's.
        Input::Unplaced(_) | Input::Other => TC_ACT_OK,
    }
}

#[inline(always)]
fn tc_reply<A: Family>(ctx: &TcContext, packet: &Packet<A>) -> i32 {
    match to_client(ctx, packet, Hook::Egress) {
        Ok(Verdict::Pass) | Err(Verdict::Pass) => TC_ACT_OK,
        Ok(_) | Err(_) => TC_ACT_SHOT,
    }
}

/// The node's own ICMP errors about SNATed flows, which it addresses to itself (the SNAT
/// address): translated as if they came in, they leave toward the client or the backend they
/// now name ([`route`]).
#[classifier]
pub fn lb_tc_loopback(ctx: TcContext) -> i32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if translate4(data, data_end, Hook::Ingress) || translate6(data, data_end, Hook::Ingress) {
        return route::out_of_loopback(&ctx);
    }
    TC_ACT_OK
}

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    match ipv4(ctx.data(), ctx.data_end()) {
        // Balanced by `lb_tc_uplink`, which can hold them.
        Some((ip, _)) if fragments::is_fragment(&ip) => xdp_action::XDP_PASS,
        Some(_) => xdp4(&ctx),
        None if translated6(ctx.data(), ctx.data_end(), Hook::Ingress) => xdp_action::XDP_PASS,
        None => xdp6(&ctx).unwrap_or_else(|reject| xdp_answer6(&ctx, &reject)),
    }
}

#[inline(never)]
fn xdp4(ctx: &XdpContext) -> u32 {
    let Some((ip, header_len)) = ipv4(ctx.data(), ctx.data_end()) else {
        return xdp_action::XDP_PASS;
    };
    match input(ctx.data(), ctx.data_end(), Frame::Whole, &ip, header_len) {
        Input::Packet(packet) => xdp_balance(ctx, &packet)
            .unwrap_or_else(|reject| answer4(ctx, &reject).unwrap_or(xdp_action::XDP_DROP)),
        // No fragment comes here.
        Input::Unplaced(_) => xdp_action::XDP_PASS,
        Input::Other => {
            icmp::translate4(ctx.data(), ctx.data_end(), Hook::Ingress);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(never)]
fn xdp6(ctx: &XdpContext) -> Result<u32, Reject> {
    match parse6(ctx.data(), ctx.data_end(), Frame::Whole) {
        // Fragments are balanced by `lb_tc_uplink`, which can hold them.
        Some(packet) if packet.piece == Piece::Whole => xdp_balance(ctx, &packet),
        Some(_) | None => Ok(xdp_action::XDP_PASS),
    }
}

#[inline(never)]
fn xdp_answer6(ctx: &XdpContext, reject: &Reject) -> u32 {
    answer6(ctx, reject).unwrap_or(xdp_action::XDP_DROP)
}

/// What XDP does with a packet it balanced; `Err` for a new flow to answer, as [`tc_balance`].
#[inline(always)]
fn xdp_balance<A: Family>(ctx: &XdpContext, packet: &Packet<A>) -> Result<u32, Reject> {
    match balance(ctx, packet, SCOPE_EXTERNAL) {
        Verdict::Pass => Ok(xdp_action::XDP_PASS),
        Verdict::Drop => Ok(xdp_action::XDP_DROP),
        Verdict::Reject => rejection(packet)
            .ok_or(xdp_action::XDP_DROP)
            .map_or_else(Ok, Err),
    }
}

/// Not attached: run by the agent to measure the kernel's tick.
#[xdp]
pub fn lb_clock_probe(ctx: XdpContext) -> u32 {
    if clock::sample(ctx.data(), ctx.data_end()) {
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
    socket::to_frontend4(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn lb_getpeername4(ctx: SockAddrContext) -> i32 {
    socket::to_frontend4(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn lb_connect6(ctx: SockAddrContext) -> i32 {
    socket::connect6(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn lb_sendmsg6(ctx: SockAddrContext) -> i32 {
    socket::sendmsg6(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn lb_recvmsg6(ctx: SockAddrContext) -> i32 {
    socket::to_frontend6(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn lb_getpeername6(ctx: SockAddrContext) -> i32 {
    socket::to_frontend6(&ctx)
}

#[cgroup_sock(sock_release)]
pub fn lb_sock_release(ctx: SockContext) -> i32 {
    socket::released(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
