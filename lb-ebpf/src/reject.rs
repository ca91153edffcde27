//! Rejecting a new flow to a frontend that has no backend, as kube-proxy does: a TCP segment
//! is answered with a reset, a UDP datagram with an ICMP port unreachable, each written over
//! the packet and sent back out of the interface it came in on. Rejects are rare: this path
//! favours plain code over speed.
//!
//! The answer's checksums are computed in full. In tc the skb keeps its `ip_summed`: packets
//! from a pod's veth are `CHECKSUM_PARTIAL`, which the pod's stack takes as checked.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use lb_common::maps::PROTO_TCP;

use crate::{
    clock::now_ns,
    family::Family,
    headers::{
        ETH_DST, ETH_HLEN, ETH_SRC, ETH_TYPE, ICMP_CHECKSUM, ICMP_CODE, ICMP_DEST_UNREACHABLE,
        ICMP_HLEN, ICMP_TYPE, IP_CHECKSUM, IP_DST, IP_FRAGMENT, IP_PROTOCOL, IP_SRC, IP_TOTAL_LEN,
        IP_TTL, IPV4_MIN_HLEN as IP_HLEN, L4_DST_PORT, L4_SRC_PORT, PROTO_ICMP, TCP_ACK_SEQ,
        TCP_CHECKSUM, TCP_DATA_OFFSET, TCP_FLAGS, TCP_MIN_HLEN as TCP_HLEN, TCP_SEQ, UDP_HLEN,
    },
    maps,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, ptr_at},
    stats::count,
};

/// The longest quiet while a reject bucket refills for, in µs.
const MAX_QUIET_US: u64 = 4_000_000_000;
/// Version 4, a header of 5 words.
const IPV4_VERSION_IHL: u8 = 0x45;
/// "Don't fragment", in the high byte of the flags and fragment offset.
const IPV4_DONT_FRAGMENT: u8 = 0x40;
const TTL: u8 = 64;
const ICMP_PORT_UNREACHABLE: u8 = 3;
/// What an ICMP error quotes of the offending datagram: its IP header and 8 bytes.
const QUOTE_LEN: usize = IP_HLEN + UDP_HLEN;
const RESET_LEN: usize = ETH_HLEN + IP_HLEN + TCP_HLEN;
const UNREACHABLE_LEN: usize = ETH_HLEN + IP_HLEN + ICMP_HLEN + QUOTE_LEN;

/// A program context that can answer the packet it holds.
pub trait Answer {
    /// The program's return value that sends the answer.
    type Action;
    /// The first `N` bytes of the packet.
    fn head<const N: usize>(&self) -> Option<[u8; N]>;
    /// Replaces the packet by `answer` and sends it back where it came from.
    fn send_back<const N: usize>(&self, answer: &[u8; N]) -> Option<Self::Action>;
}

/// Rewrites `packet` into its rejection and sends it back; `None` when it cannot (IP options,
/// a short packet), must not (a reset is never answered) or may not (over the rate limit,
/// counted), and the caller drops.
#[inline(always)]
pub fn reject<C: Answer, A: Family>(ctx: &C, packet: &Packet<A>) -> Option<C::Action> {
    let packet = A::ipv4(packet)?;
    if packet.l4_offset != ETH_HLEN + IP_HLEN || packet.is_reset() {
        return None;
    }
    if !within_rate(now_ns()) {
        count(|s| &mut s.rejects_limited);
        return None;
    }
    if packet.key.protocol == PROTO_TCP {
        let original = ctx.head::<RESET_LEN>()?;
        ctx.send_back(&reset(&original))
    } else {
        let original = ctx.head::<{ ETH_HLEN + QUOTE_LEN }>()?;
        ctx.send_back(&port_unreachable(&original))
    }
}

impl Answer for TcContext {
    type Action = i32;

    #[inline(always)]
    fn head<const N: usize>(&self) -> Option<[u8; N]> {
        self.load(0).ok()
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
    fn head<const N: usize>(&self) -> Option<[u8; N]> {
        let head = ptr_at::<[u8; N]>(self.data(), self.data_end(), 0)?;
        // SAFETY: bounds-checked against the frame.
        Some(unsafe { *head })
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
        let frame = ptr_at::<[u8; N]>(self.data(), self.data_end(), 0)?;
        // SAFETY: bounds-checked against the resized frame.
        unsafe { *frame.cast_mut() = *answer };
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

/// The reset RFC 9293 answers a segment for no connection with.
#[inline(always)]
fn reset(original: &[u8; RESET_LEN]) -> [u8; RESET_LEN] {
    let mut out = [0u8; RESET_LEN];
    ethernet_back(original, &mut out);
    let total = (IP_HLEN + TCP_HLEN) as u16;
    ip_back(original, &mut out, PROTO_TCP, total);
    let tcp = ETH_HLEN + IP_HLEN;
    // Ports swapped.
    put16(
        &mut out,
        tcp + L4_SRC_PORT,
        be16(original, tcp + L4_DST_PORT),
    );
    put16(
        &mut out,
        tcp + L4_DST_PORT,
        be16(original, tcp + L4_SRC_PORT),
    );
    let seq = be32(original, tcp + TCP_SEQ);
    let ack = be32(original, tcp + TCP_ACK_SEQ);
    let flags = original[tcp + TCP_FLAGS];
    let (reset_seq, reset_ack, reset_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let ip_total = u32::from(be16(original, ETH_HLEN + IP_TOTAL_LEN));
        let header = u32::from(original[tcp + TCP_DATA_OFFSET] >> 4) * 4;
        let payload = ip_total.saturating_sub(IP_HLEN as u32 + header);
        let control = u32::from(flags & TCP_SYN != 0) + u32::from(flags & TCP_FIN != 0);
        (0, seq.wrapping_add(payload + control), TCP_RST | TCP_ACK)
    };
    put32(&mut out, tcp + TCP_SEQ, reset_seq);
    put32(&mut out, tcp + TCP_ACK_SEQ, reset_ack);
    out[tcp + TCP_DATA_OFFSET] = ((TCP_HLEN / 4) as u8) << 4;
    out[tcp + TCP_FLAGS] = reset_flags;
    // Pseudo-header: addresses (source and destination, adjacent), protocol, TCP length; then
    // the header, checksum zero.
    let mut sum = sum16::<8>(&out, ETH_HLEN + IP_SRC, 0);
    sum += u32::from(PROTO_TCP) + TCP_HLEN as u32;
    sum = sum16::<TCP_HLEN>(&out, tcp, sum);
    put16(&mut out, tcp + TCP_CHECKSUM, fold(sum));
    out
}

/// ICMP destination unreachable, port unreachable, quoting the datagram's header.
#[inline(always)]
fn port_unreachable(original: &[u8; ETH_HLEN + QUOTE_LEN]) -> [u8; UNREACHABLE_LEN] {
    let mut out = [0u8; UNREACHABLE_LEN];
    ethernet_back(original, &mut out);
    let total = (IP_HLEN + ICMP_HLEN + QUOTE_LEN) as u16;
    ip_back(original, &mut out, PROTO_ICMP, total);
    let icmp = ETH_HLEN + IP_HLEN;
    out[icmp + ICMP_TYPE] = ICMP_DEST_UNREACHABLE;
    out[icmp + ICMP_CODE] = ICMP_PORT_UNREACHABLE;
    let mut i = 0;
    while i < QUOTE_LEN {
        out[icmp + ICMP_HLEN + i] = original[ETH_HLEN + i];
        i += 1;
    }
    let sum = sum16::<{ ICMP_HLEN + QUOTE_LEN }>(&out, icmp, 0);
    put16(&mut out, icmp + ICMP_CHECKSUM, fold(sum));
    out
}

/// The Ethernet header back to the sender.
#[inline(always)]
fn ethernet_back<const A: usize, const B: usize>(original: &[u8; A], out: &mut [u8; B]) {
    let mut i = 0;
    while i < 6 {
        out[ETH_DST + i] = original[ETH_SRC + i];
        out[ETH_SRC + i] = original[ETH_DST + i];
        i += 1;
    }
    out[ETH_TYPE] = original[ETH_TYPE];
    out[ETH_TYPE + 1] = original[ETH_TYPE + 1];
}

/// An IPv4 header back to the sender, from the address it wrote to.
#[inline(always)]
fn ip_back<const A: usize, const B: usize>(
    original: &[u8; A],
    out: &mut [u8; B],
    protocol: u8,
    total_len: u16,
) {
    let ip = ETH_HLEN;
    out[ip] = IPV4_VERSION_IHL;
    put16(out, ip + IP_TOTAL_LEN, total_len);
    out[ip + IP_FRAGMENT] = IPV4_DONT_FRAGMENT;
    out[ip + IP_TTL] = TTL;
    out[ip + IP_PROTOCOL] = protocol;
    let mut i = 0;
    while i < 4 {
        out[ip + IP_SRC + i] = original[ip + IP_DST + i];
        out[ip + IP_DST + i] = original[ip + IP_SRC + i];
        i += 1;
    }
    let sum = sum16::<IP_HLEN>(out, ip, 0);
    put16(out, ip + IP_CHECKSUM, fold(sum));
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
