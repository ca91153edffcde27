//! Sending out a packet the node addressed to itself whose destination the datapath rewrote
//! elsewhere: the route the kernel would take for it, and the next hop's address, found as
//! for a packet the node forwards.

use core::mem;

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
        TC_ACT_SHOT, bpf_fib_lookup, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::{
    headers::IPV6_HLEN,
    parse::{ipv4, ipv6},
    stats::count,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// The flow label and traffic class of the IPv6 header's first word, not its version.
const IPV6_FLOW_INFO_BE: u32 = 0x0fff_ffffu32.to_be();

/// Redirects the IPv4 or IPv6 packet on `lo`'s egress out of the interface its destination's
/// route takes, to the route's next hop, its Ethernet addresses filled in from the neighbour
/// table (`TC_ACT_REDIRECT`). One still addressed to the node goes on over `lo`; one rewritten
/// away from it that has no route is dropped and counted (`dropped_error`), as over `lo` it
/// would reach no one. Out of line: the translation before it takes most of the stack.
#[inline(never)]
pub fn out_of_loopback(ctx: &TcContext) -> i32 {
    // SAFETY: a plain C struct of integers and unions of integers: all zeroes is valid.
    let mut params: bpf_fib_lookup = unsafe { mem::zeroed() };
    if let Some((ip, _)) = ipv4(ctx.data(), ctx.data_end()) {
        params.family = AF_INET;
        params.l4_protocol = ip.protocol;
        params.__bindgen_anon_1.tot_len = u16::from_be(ip.total_len_be);
        params.__bindgen_anon_2.tos = ip.tos;
        params.__bindgen_anon_3.ipv4_src = ip.src_addr_be;
        params.__bindgen_anon_4.ipv4_dst = ip.dst_addr_be;
    } else if let Some(ip) = ipv6(ctx.data(), ctx.data_end()) {
        params.family = AF_INET6;
        params.l4_protocol = ip.next_header;
        params.__bindgen_anon_1.tot_len =
            u16::from_be(ip.payload_len_be).saturating_add(IPV6_HLEN as u16);
        params.__bindgen_anon_2.flowinfo = ip.version_class_flow_be & IPV6_FLOW_INFO_BE;
        params.__bindgen_anon_3.ipv6_src = ip.src_addr_be;
        params.__bindgen_anon_4.ipv6_dst = ip.dst_addr_be;
    } else {
        count(|s| &mut s.dropped_error);
        return TC_ACT_SHOT;
    }
    // Looked up as coming in from `lo`, as the kernel routes what the node sends; the lookup
    // wants forwarding on there, which `net.ipv4.ip_forward=1` (and IPv6's
    // `net.ipv6.conf.all.forwarding=1`) turns on for every interface.
    // SAFETY: reads a field of the skb the kernel gave.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a helper call on the skb the kernel gave, with a lookup struct of the size passed.
    let found = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &raw mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if found == i64::from(BPF_FIB_LKUP_RET_NOT_FWDED) {
        // Still the node's own: on over `lo`.
        return TC_ACT_OK;
    }
    if found != i64::from(BPF_FIB_LKUP_RET_SUCCESS) && found != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH)
    {
        count(|s| &mut s.dropped_error);
        return TC_ACT_SHOT;
    }
    // The lookup's next hop (the gateway, or the destination on a connected route), so that
    // the redirect does not route again on its own.
    let mut next_hop = bpf_redir_neigh {
        nh_family: u32::from(params.family),
        __bindgen_anon_1: if params.family == AF_INET {
            bpf_redir_neigh__bindgen_ty_1 {
                // SAFETY: the lookup wrote the IPv4 member.
                ipv4_nh: unsafe { params.__bindgen_anon_4.ipv4_dst },
            }
        } else {
            bpf_redir_neigh__bindgen_ty_1 {
                // SAFETY: the lookup wrote the IPv6 member.
                ipv6_nh: unsafe { params.__bindgen_anon_4.ipv6_dst },
            }
        },
    };
    // SAFETY: a helper call on the skb the kernel gave, with a next hop of the size passed.
    let redirected = unsafe {
        bpf_redirect_neigh(
            params.ifindex,
            &raw mut next_hop,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    i32::try_from(redirected).unwrap_or(TC_ACT_SHOT)
}
