//! Sending out a packet the node addressed to itself whose destination the datapath rewrote
//! elsewhere: the route the kernel would take for it, and the next hop's address, found as
//! for a packet the node forwards.

use core::{mem, ptr};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::parse::ipv4;

const AF_INET: u8 = 2;

/// Redirects the IPv4 packet on `lo`'s egress out of the interface its destination's route
/// takes, its Ethernet addresses filled in from the neighbour table (`TC_ACT_REDIRECT`). A
/// destination the node has no route for, or its own, goes on over `lo` as the kernel meant.
#[inline(always)]
pub fn out_of_loopback(ctx: &TcContext) -> i32 {
    let Some((ip, _)) = ipv4(ctx.data(), ctx.data_end()) else {
        return TC_ACT_OK;
    };
    // SAFETY: a plain C struct of integers and unions of integers: all zeroes is valid.
    let mut params: bpf_fib_lookup = unsafe { mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.protocol;
    params.__bindgen_anon_1.tot_len = u16::from_be(ip.total_len_be);
    params.__bindgen_anon_3.ipv4_src = ip.src_addr_be;
    params.__bindgen_anon_4.ipv4_dst = ip.dst_addr_be;
    // Looked up as coming in from `lo`, as the kernel routes what the node sends.
    // SAFETY: reads a field of the skb the kernel gave.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: helper calls on the skb the kernel gave, with a lookup struct of the size
    // passed; `bpf_redirect_neigh` takes no next hop (null), finding it itself.
    unsafe {
        let found = fib_lookup(
            ctx.skb.skb.cast(),
            &raw mut params,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        );
        if found != i64::from(BPF_FIB_LKUP_RET_SUCCESS)
            && found != i64::from(BPF_FIB_LKUP_RET_NO_NEIGH)
        {
            return TC_ACT_OK;
        }
        let redirected = bpf_redirect_neigh(params.ifindex, ptr::null_mut(), 0, 0);
        i32::try_from(redirected).unwrap_or(TC_ACT_SHOT)
    }
}
