//! Rejecting a new flow to a frontend that has no backend, as kube-proxy does: a TCP segment
//! is answered with a reset, a UDP datagram with an ICMP (or ICMPv6) port unreachable, each
//! written over the packet and sent back out of the interface it came in on. Rejects are rare:
//! this path favours plain code over speed.
//!
//! Each answer is made in one buffer, the packet's head read into it and rewritten in place (an
//! unreachable's quote is where the head is read to), so that it takes the stack once: IPv6's
//! balancing leaves little of the 512 bytes. The answer's checksums are computed in full. In tc
//! the skb keeps its `ip_summed`: packets from a pod's veth are `CHECKSUM_PARTIAL`, which the
//! pod's stack takes as checked.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{
        bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail, bpf_xdp_load_bytes, bpf_xdp_store_bytes,
    },
    programs::{TcContext, XdpContext},
};
use lb_common::maps::PROTO_TCP;

use crate::{
    clock::now_ns,
    family::Family,
    headers::{
        ETH_DST, ETH_HLEN, ETH_SRC, ETH_TYPE, ICMP_CHECKSUM, ICMP_CODE, ICMP_DEST_UNREACHABLE,
        ICMP_HLEN, ICMP_TYPE, ICMPV6_DEST_UNREACHABLE, IP_CHECKSUM, IP_DST, IP_FRAGMENT,
        IP_PROTOCOL, IP_SRC, IP_TOTAL_LEN, IP_TTL, IP6_DST, IP6_SRC, IPV4_MIN_HLEN as IP_HLEN,
        IPV6_HLEN as IP6_HLEN, L4_DST_PORT, L4_SRC_PORT, PROTO_ICMP, PROTO_ICMPV6, TCP_ACK_SEQ,
        TCP_CHECKSUM, TCP_DATA_OFFSET, TCP_FLAGS, TCP_MIN_HLEN as TCP_HLEN, TCP_SEQ, UDP_HLEN,
    },
    maps,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats::count,
};

/// The longest quiet while a reject bucket refills for, in µs.
const MAX_QUIET_US: u64 = 4_000_000_000;
/// Version 4, a header of 5 words.
const IPV4_VERSION_IHL: u8 = 0x45;
/// "Don't fragment", in the high byte of the flags and fragment offset.
const IPV4_DONT_FRAGMENT: u8 = 0x40;
/// IPv6: the version in the first word's top bits; traffic class and flow label 0.
const IPV6_VERSION: u8 = 0x60;
/// From the start of the IPv6 header: the payload length, next header and hop limit.
const IP6_PAYLOAD_LEN: usize = 4;
const IP6_NEXT_HEADER: usize = 6;
const IP6_HOP_LIMIT: usize = 7;
const TTL: u8 = 64;
const ICMP_PORT_UNREACHABLE: u8 = 3;
/// ICMPv6's "port unreachable", a destination unreachable's code.
const ICMPV6_PORT_UNREACHABLE: u8 = 4;
/// What an ICMP error quotes of the offending datagram: its IP header and 8 bytes (well
/// within the 1,280 bytes RFC 4443 allows ICMPv6).
const QUOTE_LEN: usize = IP_HLEN + UDP_HLEN;
const QUOTE6_LEN: usize = IP6_HLEN + UDP_HLEN;
const RESET_LEN: usize = ETH_HLEN + IP_HLEN + TCP_HLEN;
const RESET6_LEN: usize = ETH_HLEN + IP6_HLEN + TCP_HLEN;
const UNREACHABLE_LEN: usize = ETH_HLEN + IP_HLEN + ICMP_HLEN + QUOTE_LEN;
const UNREACHABLE6_LEN: usize = ETH_HLEN + IP6_HLEN + ICMP_HLEN + QUOTE6_LEN;

/// A program context that can answer the packet it holds.
pub trait Answer {
    /// The program's return value that sends the answer.
    type Action;
    /// Reads the packet's first `N` bytes into `into`.
    fn head<const N: usize>(&self, into: &mut [u8; N]) -> Option<()>;
    /// Replaces the packet by `answer` and sends it back where it came from.
    fn send_back<const N: usize>(&self, answer: &[u8; N]) -> Option<Self::Action>;
}

/// A new flow's first packet to answer: a TCP segment, or a UDP datagram.
pub struct Reject {
    pub tcp: bool,
}

/// Whether the new flow of `packet` is answered ([`answer4`], [`answer6`]); `None` when it
/// cannot be (IPv4 options, IPv6 extension headers), must not (a reset is never answered) or
/// may not (over the rate limit, counted), and is dropped.
#[inline(always)]
pub fn rejection<A: Family>(packet: &Packet<A>) -> Option<Reject> {
    if packet.l4_offset != ETH_HLEN + A::IP_HLEN || packet.is_reset() {
        return None;
    }
    if !within_rate(now_ns()) {
        count(|s| &mut s.rejects_limited);
        return None;
    }
    Some(Reject {
        tcp: packet.key.protocol == PROTO_TCP,
    })
}

/// Writes the answer to an IPv4 packet over it and sends it back; `None` if the packet is
/// too short.
#[inline(always)]
pub fn answer4<C: Answer>(ctx: &C, reject: &Reject) -> Option<C::Action> {
    if reject.tcp {
        let mut buf = [0u8; RESET_LEN];
        ctx.head(&mut buf)?;
        reset4(&mut buf);
        ctx.send_back(&buf)
    } else {
        let mut buf = [0u8; UNREACHABLE_LEN];
        ctx.head(quoted::<UNREACHABLE_LEN, { ETH_HLEN + QUOTE_LEN }>(
            &mut buf,
        )?)?;
        port_unreachable4(&mut buf);
        ctx.send_back(&buf)
    }
}

/// The IPv6 twin of [`answer4`].
#[inline(always)]
pub fn answer6<C: Answer>(ctx: &C, reject: &Reject) -> Option<C::Action> {
    if reject.tcp {
        let mut buf = [0u8; RESET6_LEN];
        ctx.head(&mut buf)?;
        reset6(&mut buf);
        ctx.send_back(&buf)
    } else {
        let mut buf = [0u8; UNREACHABLE6_LEN];
        ctx.head(quoted::<UNREACHABLE6_LEN, { ETH_HLEN + QUOTE6_LEN }>(
            &mut buf,
        )?)?;
        port_unreachable6(&mut buf);
        ctx.send_back(&buf)
    }
}

/// Where an unreachable's `H` bytes of the packet's head are read to in its buffer of `N`: its
/// end, so that the head's IP header and first 8 bytes are the quote where it lies.
#[inline(always)]
fn quoted<const N: usize, const H: usize>(buf: &mut [u8; N]) -> Option<&mut [u8; H]> {
    (&mut buf[N - H..]).try_into().ok()
}

impl Answer for TcContext {
    type Action = i32;

    #[inline(always)]
    fn head<const N: usize>(&self, into: &mut [u8; N]) -> Option<()> {
        // The helper itself, not aya's `load_bytes`, whose length clamped to the skb's may be
        // 0 for the verifier, which refuses that: `N` bytes or nothing.
        // SAFETY: a helper call on the skb the kernel gave, writing `N` bytes into `into`.
        let loaded = unsafe {
            bpf_skb_load_bytes(self.skb.skb.cast(), 0, into.as_mut_ptr().cast(), N as u32)
        };
        (loaded == 0).then_some(())
    }

    #[inline(always)]
    fn send_back<const N: usize>(&self, answer: &[u8; N]) -> Option<i32> {
        let skb = self.skb.skb;
        // SAFETY: `skb` is the context the kernel gave this program, valid while it runs; the
        // helpers check their arguments.
        if unsafe { bpf_skb_change_tail(skb, N as u32, 0) } != 0 {
            return None;
        }
        self.store(0, answer, 0).ok()?;
        // SAFETY: likewise; `ifindex` is a plain field of the skb.
        let ifindex = unsafe { (*skb).ifindex };
        // SAFETY: a helper call on plain integers.
        Some(unsafe { bpf_redirect(ifindex, 0) } as i32)
    }
}

impl Answer for XdpContext {
    type Action = u32;

    #[inline(always)]
    fn head<const N: usize>(&self, into: &mut [u8; N]) -> Option<()> {
        // Through the helper: a copy the compiler writes out byte by byte spills to the stack.
        // SAFETY: a helper call on the frame the kernel gave, writing `N` bytes into `into`.
        let loaded = unsafe { bpf_xdp_load_bytes(self.ctx, 0, into.as_mut_ptr().cast(), N as u32) };
        (loaded == 0).then_some(())
    }

    #[inline(always)]
    fn send_back<const N: usize>(&self, answer: &[u8; N]) -> Option<u32> {
        let grow = N as i32 - (self.data_end() - self.data()) as i32;
        // XDP guarantees headroom, not tailroom: grow at the head (the packet's head is
        // already copied out), shrink at the tail.
        // `self.ctx` is the context the kernel gave this program; the helpers check the sizes,
        // and `data`/`data_end` are read again after.
        let resized = if grow > 0 {
            // SAFETY: as said above.
            unsafe { bpf_xdp_adjust_head(self.ctx, -grow) }
        } else {
            // SAFETY: as said above.
            unsafe { bpf_xdp_adjust_tail(self.ctx, grow) }
        };
        if resized != 0 {
            return None;
        }
        let answer = answer.as_ptr().cast_mut().cast();
        // SAFETY: a helper call on the resized frame, reading `N` bytes of `answer`.
        if unsafe { bpf_xdp_store_bytes(self.ctx, 0, answer, N as u32) } != 0 {
            return None;
        }
        Some(xdp_action::XDP_TX)
    }
}

/// Takes one of this CPU's reject tokens, refilled for the time since the last reject, if one
/// is left: a frontend without endpoints is no amplifier, as the kernel limits its own ICMP.
#[inline(always)]
fn within_rate(now: u64) -> bool {
    let (Some(config), Some(bucket)) = (maps::config(), maps::reject_tokens()) else {
        return false;
    };
    // Thousandths of a reject: `rate` per second is `rate` per 1,000 µs of them. A quiet
    // while is counted to 4,000 s at most, so that the product fits in 64 bits (eBPF has no
    // 128-bit multiply) whatever the rate; any bucket is full by then.
    let micros = (now.saturating_sub(bucket.refilled_ns) / 1000).min(MAX_QUIET_US);
    let refill = micros * u64::from(config.rejects_per_sec_per_cpu) / 1000;
    let burst = u64::from(config.reject_burst_per_cpu) * 1000;
    bucket.milli_tokens = bucket.milli_tokens.saturating_add(refill).min(burst);
    bucket.refilled_ns = now;
    if bucket.milli_tokens < 1000 {
        return false;
    }
    bucket.milli_tokens -= 1000;
    true
}

/// The reset RFC 9293 answers a segment for no connection with, over the segment's head.
#[inline(always)]
fn reset4(buf: &mut [u8; RESET_LEN]) {
    let tcp = ETH_HLEN + IP_HLEN;
    let segment_len = u32::from(be16(buf, ETH_HLEN + IP_TOTAL_LEN)).saturating_sub(IP_HLEN as u32);
    ethernet_back(buf, 0);
    ip_back(buf, 0, PROTO_TCP, (IP_HLEN + TCP_HLEN) as u16);
    reset_segment(buf, tcp, segment_len);
    // Pseudo-header: addresses (source and destination, adjacent), protocol, TCP length; then
    // the header, checksum zero.
    let sum = sum16::<8>(buf, ETH_HLEN + IP_SRC, 0) + u32::from(PROTO_TCP) + TCP_HLEN as u32;
    let sum = fold(sum16::<TCP_HLEN>(buf, tcp, sum));
    put16(buf, tcp + TCP_CHECKSUM, sum);
}

/// The IPv6 twin of [`reset4`].
#[inline(always)]
fn reset6(buf: &mut [u8; RESET6_LEN]) {
    let tcp = ETH_HLEN + IP6_HLEN;
    let segment_len = u32::from(be16(buf, ETH_HLEN + IP6_PAYLOAD_LEN));
    ethernet_back(buf, 0);
    ip6_back(buf, 0, PROTO_TCP, TCP_HLEN as u16);
    reset_segment(buf, tcp, segment_len);
    let sum = sum16::<32>(buf, ETH_HLEN + IP6_SRC, 0) + u32::from(PROTO_TCP) + TCP_HLEN as u32;
    let sum = fold(sum16::<TCP_HLEN>(buf, tcp, sum));
    put16(buf, tcp + TCP_CHECKSUM, sum);
}

/// Rewrites the segment's TCP header at `tcp` into the reset's (its checksum left 0); the
/// segment, header and payload, is `segment_len` bytes.
#[inline(always)]
fn reset_segment<const N: usize>(buf: &mut [u8; N], tcp: usize, segment_len: u32) {
    let (src_port, dst_port) = (be16(buf, tcp + L4_SRC_PORT), be16(buf, tcp + L4_DST_PORT));
    let seq = be32(buf, tcp + TCP_SEQ);
    let ack = be32(buf, tcp + TCP_ACK_SEQ);
    let flags = buf[tcp + TCP_FLAGS];
    let header = u32::from(buf[tcp + TCP_DATA_OFFSET] >> 4) * 4;
    let (reset_seq, reset_ack, reset_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let payload = segment_len.saturating_sub(header);
        let control = u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (0, seq.wrapping_add(payload + control), TCP_RST | TCP_ACK)
    };
    // Ports swapped; window, checksum and urgent pointer 0.
    put16(buf, tcp + L4_SRC_PORT, dst_port);
    put16(buf, tcp + L4_DST_PORT, src_port);
    put32(buf, tcp + TCP_SEQ, reset_seq);
    put32(buf, tcp + TCP_ACK_SEQ, reset_ack);
    buf[tcp + TCP_DATA_OFFSET] = ((TCP_HLEN / 4) as u8) << 4;
    buf[tcp + TCP_FLAGS] = reset_flags;
    let mut i = TCP_FLAGS + 1;
    while i < TCP_HLEN {
        buf[tcp + i] = 0;
        i += 1;
    }
}

/// ICMP destination unreachable, port unreachable, over the datagram's head read to its end
/// ([`quoted`]), which it quotes.
#[inline(always)]
fn port_unreachable4(buf: &mut [u8; UNREACHABLE_LEN]) {
    let from = UNREACHABLE_LEN - (ETH_HLEN + QUOTE_LEN);
    ethernet_back(buf, from);
    ip_back(
        buf,
        from,
        PROTO_ICMP,
        (IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u16,
    );
    let icmp = ETH_HLEN + IP_HLEN;
    icmp_header(buf, icmp, ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE);
    let sum = sum16::<{ ICMP_HLEN + QUOTE_LEN }>(buf, icmp, 0);
    put16(buf, icmp + ICMP_CHECKSUM, fold(sum));
}

/// The ICMPv6 twin of [`port_unreachable4`], whose checksum covers IPv6's pseudo-header as
/// ICMP's does not.
#[inline(always)]
fn port_unreachable6(buf: &mut [u8; UNREACHABLE6_LEN]) {
    let from = UNREACHABLE6_LEN - (ETH_HLEN + QUOTE6_LEN);
    let len = ICMP_HLEN + QUOTE6_LEN;
    ethernet_back(buf, from);
    ip6_back(buf, from, PROTO_ICMPV6, len as u16);
    let icmp = ETH_HLEN + IP6_HLEN;
    icmp_header(buf, icmp, ICMPV6_DEST_UNREACHABLE, ICMPV6_PORT_UNREACHABLE);
    let sum = sum16::<32>(buf, ETH_HLEN + IP6_SRC, 0) + u32::from(PROTO_ICMPV6) + len as u32;
    let sum = sum16::<{ ICMP_HLEN + QUOTE6_LEN }>(buf, icmp, sum);
    put16(buf, icmp + ICMP_CHECKSUM, fold(sum));
}

/// An ICMP (or ICMPv6) error's header at `at`: `kind` and `code`, checksum and the rest 0.
#[inline(always)]
fn icmp_header<const N: usize>(buf: &mut [u8; N], at: usize, kind: u8, code: u8) {
    let mut i = 0;
    while i < ICMP_HLEN {
        buf[at + i] = 0;
        i += 1;
    }
    buf[at + ICMP_TYPE] = kind;
    buf[at + ICMP_CODE] = code;
}

/// The Ethernet header back to the sender, at the buffer's start, from the packet's at `from`.
#[inline(always)]
fn ethernet_back<const N: usize>(buf: &mut [u8; N], from: usize) {
    let mut i = 0;
    while i < 6 {
        let (src, dst) = (buf[from + ETH_SRC + i], buf[from + ETH_DST + i]);
        buf[ETH_DST + i] = src;
        buf[ETH_SRC + i] = dst;
        i += 1;
    }
    buf[ETH_TYPE] = buf[from + ETH_TYPE];
    buf[ETH_TYPE + 1] = buf[from + ETH_TYPE + 1];
}

/// An IPv4 header back to the sender after the Ethernet header, from the packet's (its
/// Ethernet header at `from`), from the address it wrote to.
#[inline(always)]
fn ip_back<const N: usize>(buf: &mut [u8; N], from: usize, protocol: u8, total_len: u16) {
    let (ip, original) = (ETH_HLEN, from + ETH_HLEN);
    let src = be32(buf, original + IP_DST);
    let dst = be32(buf, original + IP_SRC);
    let mut i = 0;
    while i < IP_HLEN {
        buf[ip + i] = 0;
        i += 1;
    }
    buf[ip] = IPV4_VERSION_IHL;
    put16(buf, ip + IP_TOTAL_LEN, total_len);
    buf[ip + IP_FRAGMENT] = IPV4_DONT_FRAGMENT;
    buf[ip + IP_TTL] = TTL;
    buf[ip + IP_PROTOCOL] = protocol;
    put32(buf, ip + IP_SRC, src);
    put32(buf, ip + IP_DST, dst);
    let sum = sum16::<IP_HLEN>(buf, ip, 0);
    put16(buf, ip + IP_CHECKSUM, fold(sum));
}

/// The IPv6 twin of [`ip_back`].
#[inline(always)]
fn ip6_back<const N: usize>(buf: &mut [u8; N], from: usize, next_header: u8, payload_len: u16) {
    let (ip, original) = (ETH_HLEN, from + ETH_HLEN);
    let mut i = 0;
    while i < 16 {
        let (src, dst) = (buf[original + IP6_DST + i], buf[original + IP6_SRC + i]);
        buf[ip + IP6_SRC + i] = src;
        buf[ip + IP6_DST + i] = dst;
        i += 1;
    }
    buf[ip] = IPV6_VERSION;
    buf[ip + 1] = 0;
    put16(buf, ip + 2, 0);
    put16(buf, ip + IP6_PAYLOAD_LEN, payload_len);
    buf[ip + IP6_NEXT_HEADER] = next_header;
    buf[ip + IP6_HOP_LIMIT] = TTL;
}

/// Adds `LEN` bytes from `at`, as big-endian 16-bit words, to `sum`.
#[inline(always)]
fn sum16<const LEN: usize>(bytes: &[u8], at: usize, mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < LEN {
        sum += u32::from(bytes[at + i]) << 8 | u32::from(bytes[at + i + 1]);
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from(bytes[at]) << 8 | u16::from(bytes[at + 1])
}

#[inline(always)]
fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from(be16(bytes, at)) << 16 | u32::from(be16(bytes, at + 2))
}

#[inline(always)]
fn put16(bytes: &mut [u8], at: usize, value: u16) {
    bytes[at] = (value >> 8) as u8;
    bytes[at + 1] = value as u8;
}

#[inline(always)]
fn put32(bytes: &mut [u8], at: usize, value: u32) {
    put16(bytes, at, (value >> 16) as u16);
    put16(bytes, at + 2, value as u16);
}
