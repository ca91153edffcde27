//! The two address families under one packet core: what differs between IPv4 and IPv6 (where
//! the addresses lie, the checksums that cover them, each family's maps) behind one trait,
//! implemented on each family's address type, `u32` and [`Ipv6Be`]. The core is written once,
//! generic over it, and compiled for each.

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, helpers::bpf_csum_update, programs::TcContext};
use lb_common::maps::{Config, Ipv6Be};

use crate::{
    headers::{ETH_HLEN, IP_CHECKSUM, IP_DST, IP_SRC, IP6_DST, IP6_SRC, IPV4_MIN_HLEN, IPV6_HLEN},
    maps::{
        AFFINITY, AFFINITY6, AffinityMap, BACKENDS, BACKENDS6, BackendMap, CONNECTED, CONNECTED6,
        ConnectedMap, FLOWS, FLOWS6, FRAGMENTS, FRAGMENTS6, FRONTENDS, FRONTENDS6, FlowMap,
        FragmentMap, FrontendMap, HELD_FRAGMENTS, HELD_FRAGMENTS6, HeldMap, REPLIES, REPLIES6,
        ReplyMap, SOCKETS, SOCKETS6, SOURCE_RANGES, SOURCE_RANGES6, SocketMap, SourceRangeMap,
        VIPS, VIPS6, VipMap,
    },
    nat::checksum_update,
    parse::ptr_at,
};

/// An address family, implemented on its address type (network order, as in the packet).
pub trait Family: Copy + PartialEq + Default + 'static {
    /// Where the packet's addresses lie, from the frame's start.
    const SRC_ADDR_OFFSET: usize;
    const DST_ADDR_OFFSET: usize;
    /// An address's bits: a whole address's prefix length.
    const BITS: u32;
    /// The IP header without options or extension headers: the only one a reject answers.
    const IP_HLEN: usize;

    fn frontends() -> &'static FrontendMap<Self>;
    fn backends() -> &'static BackendMap<Self>;
    fn vips() -> &'static VipMap<Self>;
    fn source_ranges() -> &'static SourceRangeMap<Self>;
    fn flows() -> &'static FlowMap<Self>;
    fn replies() -> &'static ReplyMap<Self>;
    fn affinities() -> &'static AffinityMap<Self>;
    fn sockets() -> &'static SocketMap<Self>;
    fn connected() -> &'static ConnectedMap<Self>;
    fn fragments() -> &'static FragmentMap<Self>;
    fn held_fragments() -> &'static HeldMap<Self>;

    /// The node's address of this family that SNATed flows leave with, if it has one.
    fn snat_addr(config: &Config) -> Option<Self>;

    /// The address in one word, for hashing.
    fn folded(self) -> u32;

    /// `checksum` (one's complement, as it lies in the packet) with `old` replaced by `new`.
    fn checksum_update(checksum: u16, old: Self, new: Self) -> u16;

    /// Writes `new` over the address `old` at `offset`, and updates the IP header's checksum
    /// if the family has one: all a rewrite changes but the ports and the L4 checksum.
    fn write_addr(
        data: usize,
        data_end: usize,
        offset: usize,
        old: Self,
        new: Self,
    ) -> Result<(), ()>;

    /// Updates the skb's TCP or UDP checksum at `offset` for the address `old` replaced by
    /// `new` (pseudo-header), through the kernel's helper; `flags` are the helper's.
    fn tc_l4_address(
        ctx: &TcContext,
        offset: usize,
        old: Self,
        new: Self,
        flags: u64,
    ) -> Result<(), ()>;

    /// Keeps a `CHECKSUM_COMPLETE` skb's sum right for the address `old` replaced by `new`
    /// with no L4 checksum moving with it (a later fragment's).
    fn tc_address_alone(ctx: &TcContext, old: Self, new: Self) -> Result<(), ()>;
}

impl Family for u32 {
    const SRC_ADDR_OFFSET: usize = ETH_HLEN + IP_SRC;
    const DST_ADDR_OFFSET: usize = ETH_HLEN + IP_DST;
    const BITS: u32 = u32::BITS;
    const IP_HLEN: usize = IPV4_MIN_HLEN;

    fn frontends() -> &'static FrontendMap<Self> {
        &FRONTENDS
    }
    fn backends() -> &'static BackendMap<Self> {
        &BACKENDS
    }
    fn vips() -> &'static VipMap<Self> {
        &VIPS
    }
    fn source_ranges() -> &'static SourceRangeMap<Self> {
        &SOURCE_RANGES
    }
    fn flows() -> &'static FlowMap<Self> {
        &FLOWS
    }
    fn replies() -> &'static ReplyMap<Self> {
        &REPLIES
    }
    fn affinities() -> &'static AffinityMap<Self> {
        &AFFINITY
    }
    fn sockets() -> &'static SocketMap<Self> {
        &SOCKETS
    }
    fn connected() -> &'static ConnectedMap<Self> {
        &CONNECTED
    }
    fn fragments() -> &'static FragmentMap<Self> {
        &FRAGMENTS
    }
    fn held_fragments() -> &'static HeldMap<Self> {
        &HELD_FRAGMENTS
    }

    #[inline(always)]
    fn snat_addr(config: &Config) -> Option<Self> {
        (config.snat_addr_be != 0).then_some(config.snat_addr_be)
    }

    #[inline(always)]
    fn folded(self) -> u32 {
        self
    }

    #[inline(always)]
    fn checksum_update(checksum: u16, old: Self, new: Self) -> u16 {
        checksum_update(checksum, old, new)
    }

    #[inline(always)]
    fn write_addr(
        data: usize,
        data_end: usize,
        offset: usize,
        old: Self,
        new: Self,
    ) -> Result<(), ()> {
        let ip_checksum = ptr_at::<u16>(data, data_end, ETH_HLEN + IP_CHECKSUM).ok_or(())?;
        let addr = ptr_at::<u32>(data, data_end, offset).ok_or(())?;
        // SAFETY: each pointer was bounds-checked against the packet above.
        unsafe {
            let ip_checksum = ip_checksum.cast_mut();
            *ip_checksum = checksum_update(*ip_checksum, old, new);
            *addr.cast_mut() = new;
        }
        Ok(())
    }

    #[inline(always)]
    fn tc_l4_address(
        ctx: &TcContext,
        offset: usize,
        old: Self,
        new: Self,
        flags: u64,
    ) -> Result<(), ()> {
        let pseudo = flags | u64::from(BPF_F_PSEUDO_HDR) | 4;
        ctx.l4_csum_replace(offset, u64::from(old), u64::from(new), pseudo)
            .map_err(drop)
    }

    /// The header checksum moved the other way: the sum is unchanged.
    #[inline(always)]
    fn tc_address_alone(_ctx: &TcContext, _old: Self, _new: Self) -> Result<(), ()> {
        Ok(())
    }
}

impl Family for Ipv6Be {
    const SRC_ADDR_OFFSET: usize = ETH_HLEN + IP6_SRC;
    const DST_ADDR_OFFSET: usize = ETH_HLEN + IP6_DST;
    const BITS: u32 = 128;
    const IP_HLEN: usize = IPV6_HLEN;

    fn frontends() -> &'static FrontendMap<Self> {
        &FRONTENDS6
    }
    fn backends() -> &'static BackendMap<Self> {
        &BACKENDS6
    }
    fn vips() -> &'static VipMap<Self> {
        &VIPS6
    }
    fn source_ranges() -> &'static SourceRangeMap<Self> {
        &SOURCE_RANGES6
    }
    fn flows() -> &'static FlowMap<Self> {
        &FLOWS6
    }
    fn replies() -> &'static ReplyMap<Self> {
        &REPLIES6
    }
    fn affinities() -> &'static AffinityMap<Self> {
        &AFFINITY6
    }
    fn sockets() -> &'static SocketMap<Self> {
        &SOCKETS6
    }
    fn connected() -> &'static ConnectedMap<Self> {
        &CONNECTED6
    }
    fn fragments() -> &'static FragmentMap<Self> {
        &FRAGMENTS6
    }
    fn held_fragments() -> &'static HeldMap<Self> {
        &HELD_FRAGMENTS6
    }

    #[inline(always)]
    fn snat_addr(config: &Config) -> Option<Self> {
        (config.snat_addr6_be != [0; 4]).then_some(config.snat_addr6_be)
    }

    #[inline(always)]
    fn folded(self) -> u32 {
        self[0] ^ self[1] ^ self[2] ^ self[3]
    }

    /// RFC 1624 over the whole address at once: one fold, not one per word.
    #[inline(always)]
    fn checksum_update(checksum: u16, old: Self, new: Self) -> u16 {
        let mut sum = u64::from(!checksum) + u64::from(address_diff(old, new));
        for _ in 0..3 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// IPv6 has no header checksum: the address alone.
    #[inline(always)]
    fn write_addr(
        data: usize,
        data_end: usize,
        offset: usize,
        _old: Self,
        new: Self,
    ) -> Result<(), ()> {
        let addr = ptr_at::<Ipv6Be>(data, data_end, offset).ok_or(())?;
        // SAFETY: bounds-checked against the packet above.
        unsafe { *addr.cast_mut() = new };
        Ok(())
    }

    /// The helper takes at most four bytes, or a sum already made: the difference of the two
    /// addresses (as Cilium's `ipv6_l4_csum_update`, summed here, not by `bpf_csum_diff`).
    /// Given a pseudo-header change, the helper also takes the difference out of a
    /// `CHECKSUM_COMPLETE` skb's sum, as IPv4 needs (its header checksum moved the other way)
    /// and IPv6 does not (the address and the L4 checksum cancel out), unless told the header
    /// is IPv6's (`BPF_F_IPV6`, Linux 6.16). Older kernels refuse that flag before they touch
    /// anything: there, the call is made again without it and `bpf_csum_update` puts the
    /// difference back.
    #[inline(always)]
    fn tc_l4_address(
        ctx: &TcContext,
        offset: usize,
        old: Self,
        new: Self,
        flags: u64,
    ) -> Result<(), ()> {
        let diff = address_diff(old, new);
        let flags = flags | u64::from(BPF_F_PSEUDO_HDR);
        if ctx
            .l4_csum_replace(offset, 0, u64::from(diff), flags | BPF_F_IPV6)
            .is_ok()
        {
            return Ok(());
        }
        ctx.l4_csum_replace(offset, 0, u64::from(diff), flags)
            .map_err(drop)?;
        // SAFETY: a helper call on the skb the kernel gave; it changes only a COMPLETE sum.
        unsafe { bpf_csum_update(ctx.skb.skb, diff) };
        Ok(())
    }

    #[inline(always)]
    fn tc_address_alone(ctx: &TcContext, old: Self, new: Self) -> Result<(), ()> {
        let diff = address_diff(old, new);
        // SAFETY: a helper call on the skb the kernel gave; it changes only a COMPLETE sum.
        unsafe { bpf_csum_update(ctx.skb.skb, diff) };
        Ok(())
    }
}

/// `bpf_l4_csum_replace`'s flag for an IPv6 header (Linux 6.16), which the bindings predate.
const BPF_F_IPV6: u64 = 1 << 7;

/// The one's-complement difference of two IPv6 addresses, as `bpf_csum_diff` makes it: the sum
/// of the old words' complements and the new words, in 32 bits (the helpers fold it to 16).
#[inline(always)]
fn address_diff(old: Ipv6Be, new: Ipv6Be) -> u32 {
    let mut sum = 0u64;
    for word in 0..4 {
        sum += u64::from(!old[word]) + u64::from(new[word]);
    }
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}
