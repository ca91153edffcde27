//! ICMP and ICMPv6 errors about tracked flows (destination unreachable, "fragmentation needed"
//! among them, and ICMPv6's "packet too big"; time exceeded; parameter problem), translated as
//! conntrack translates the ICMP related to a connection: the packet the error quotes, and the
//! outer addresses that name the same ends, are rewritten as the flow's own packets are, so
//! that the error reaches the socket that sent the packet and path-MTU discovery works through
//! frontends and SNAT. An error that quotes no tracked flow passes untouched.
//!
//! An error about a packet the node sent on to a backend quotes the packet as the backend got
//! it (to the backend, from the client or the SNAT address): its reply entry turns the quote
//! back into what the client sent. Like a reply, it is rewritten on ingress only when its
//! destination changes (SNAT), else after routing, on egress, where the errors the node itself
//! sends (its own "fragmentation needed", as a router) are seen; but the node's own error
//! about a SNATed flow is addressed to the node (the SNAT address) and goes over `lo`, whose
//! egress program translates it as on ingress and sends it out toward the client or the
//! backend it now names ([`route`](crate::route)). An error about a
//! reply quotes it as the client got it (from the frontend): its flow turns the quote into
//! what the backend sent, and the error goes to the backend, before routing.
//!
//! Checksums: an address of the quoted IPv4 header and that header's checksum change
//! together, which leaves the ICMP checksum as it was; a quoted port, and the quoted TCP or
//! UDP checksum when the quote holds it, change the ICMP checksum (RFC 1624). The outer
//! header's checksum follows its addresses. IPv6 headers have no checksum: ICMPv6's covers the
//! quoted addresses, and the outer ones through its pseudo-header, and follows them all. The
//! message's sum is unchanged either way, so an skb's `CHECKSUM_COMPLETE` stays right; both
//! programs write the packet directly.
//!
//! An ICMPv6 error comes straight past its IPv6 header (hosts and routers add no extension
//! headers to their own), and quotes a TCP or UDP packet past its extension headers, walked,
//! or a datagram's first fragment (a later one, carrying no ports, is not translated, as in
//! IPv4).

use core::{
    mem::size_of,
    ptr::{self, NonNull},
};

use lb_common::maps::{FlowKey, Ipv6Be, PROTO_TCP, PROTO_UDP};

use crate::{
    family::Family,
    headers::{
        ETH_HLEN, ICMP_DEST_UNREACHABLE, ICMP_HLEN, ICMPV6_DEST_UNREACHABLE,
        ICMPV6_PARAMETER_PROBLEM, IPV4_MIN_HLEN, IPV6_HLEN, IcmpHeader, Ipv4Header, Ipv6Header,
        L4_SRC_PORT, PROTO_ICMP, PROTO_ICMPV6, TCP_CHECKSUM, UDP_CHECKSUM,
    },
    maps,
    nat::checksum_update,
    parse::{
        Fragment6, IPV4_FRAGMENT_MASK_BE, IPV4_OFFSET_MASK_BE, Piece, fragment6, ipv4, ipv6,
        ptr_at, skip_extensions,
    },
    reply::Hook,
    stats::count,
};

const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// An ICMP error's fields, as pointers bounds-checked once: the verifier keeps a checked
/// pointer's range, where offsets recomputed later would lose it.
struct IcmpError<A> {
    outer_src: *mut A,
    outer_dst: *mut A,
    /// The outer IPv4 header's checksum; IPv6 has none (ICMPv6's covers the addresses).
    outer_checksum: Option<NonNull<u16>>,
    icmp_checksum: *mut u16,
    quoted_src: *mut A,
    quoted_dst: *mut A,
    /// The quoted IPv4 header's checksum; as the outer one.
    quoted_checksum: Option<NonNull<u16>>,
    /// The quoted TCP or UDP ports.
    ports: *mut [u16; 2],
    /// The quoted TCP or UDP checksum, if the error quotes that much.
    l4_checksum: Option<NonNull<u16>>,
    /// The quoted packet, as it was sent.
    inner: FlowKey<A>,
}

/// Translates the IPv4 ICMP error in the frame from `data` to `data_end`, if it is one about
/// a tracked flow; whether its destination changed (then the node's own error, which it
/// addressed to itself, leaves for the host it now names). The packet passes either way.
#[inline(always)]
pub fn translate4(data: usize, data_end: usize, hook: Hook) -> bool {
    translate::<u32>(data, data_end, hook)
}

/// As [`translate4`], for an ICMPv6 error.
#[inline(always)]
pub fn translate6(data: usize, data_end: usize, hook: Hook) -> bool {
    translate::<Ipv6Be>(data, data_end, hook)
}

/// A family's ICMP errors, parsed.
trait Errors: Family {
    /// The frame's error quoting a TCP or UDP packet's ports; anything else is `None`.
    fn parse(data: usize, data_end: usize) -> Option<IcmpError<Self>>;
}

impl Errors for u32 {
    #[inline(always)]
    fn parse(data: usize, data_end: usize) -> Option<IcmpError<Self>> {
        parse4(data, data_end)
    }
}

impl Errors for Ipv6Be {
    #[inline(always)]
    fn parse(data: usize, data_end: usize) -> Option<IcmpError<Self>> {
        parse6(data, data_end)
    }
}

#[inline(always)]
fn translate<A: Errors>(data: usize, data_end: usize, hook: Hook) -> bool {
    let Some(error) = A::parse(data, data_end) else {
        return false;
    };
    // The map calls and the rewrite out of line, each in a stack frame of its own (the
    // parse's, here, takes much of the verifier's 512 bytes); the checked packet pointers
    // live across the calls, in slots the verifier keeps their bounds in. The verifier lets
    // no function return a pointer to its caller's stack: the rewrite is written into it.
    let mut rewrite = Rewrite::default();
    // SAFETY: checked by the parse (alignment as in `parse::read`).
    let outer_dst = unsafe { &*error.outer_dst };
    if !lookup(&error.inner, outer_dst, hook, &mut rewrite) {
        return false;
    }
    let redirected = rewrite.apply(&error);
    count(|s| &mut s.icmp_translated);
    redirected
}

/// What the quote of an error to `outer_dst` becomes (into `rewrite`), if `inner`, the packet
/// it quotes, is a tracked flow's; whether it is.
#[inline(never)]
fn lookup<A: Family>(
    inner: &FlowKey<A>,
    outer_dst: &A,
    hook: Hook,
    rewrite: &mut Rewrite<A>,
) -> bool {
    // The quoted packet's answer: what a reply entry or a flow is keyed by.
    let answer = FlowKey {
        src_addr_be: inner.dst_addr_be,
        dst_addr_be: inner.src_addr_be,
        src_port_be: inner.dst_port_be,
        dst_port_be: inner.src_port_be,
        protocol: inner.protocol,
        _pad: [0; 3],
    };
    if let Some(reply) = maps::reply(answer) {
        // About a packet sent on to a backend: the quote becomes the client's packet.
        if hook == Hook::Ingress && *outer_dst == reply.client_addr_be {
            return false;
        }
        rewrite.src = (reply.client_addr_be, reply.client_port_be);
        rewrite.dst = (reply.frontend_addr_be, reply.frontend_port_be);
        true
    } else if hook == Hook::Ingress
        && let Some(flow) = maps::flow(answer)
    {
        // About a reply: the quote becomes the backend's packet.
        rewrite.src = (flow.backend_addr_be, flow.backend_port_be);
        rewrite.dst = (flow.src_addr_be, flow.src_port_be);
        true
    } else {
        false
    }
}

/// What the quoted packet's ends become.
#[derive(Default)]
struct Rewrite<A> {
    src: (A, u16),
    dst: (A, u16),
}

impl<A: Family> Rewrite<A> {
    /// Rewrites the quote's ends, and the outer addresses that name the same hosts: the host
    /// that sent the error, if it is the quote's destination, and the one it goes to, if it
    /// is the quote's source; whether its destination changed. (Out of line, a function must
    /// return a value its callers use: else the compiler may leave R0 a pointer to the
    /// caller's stack, which the verifier refuses.)
    #[inline(never)]
    fn apply(&self, error: &IcmpError<A>) -> bool {
        let inner = &error.inner;
        // SAFETY: every pointer was bounds-checked against the packet by the parse, and
        // nothing since changed the packet's length (alignment as in `parse::read`).
        unsafe {
            let [src_port, dst_port] = &mut *error.ports;
            let mut icmp_sum = *error.icmp_checksum;
            // Plain values and flags, not `Option`s or arrays: their undefined parts would be
            // spilled from registers the verifier knows were never written.
            let l4_field = error.l4_checksum.map_or(ptr::null_mut(), NonNull::as_ptr);
            let old_l4_sum = if l4_field.is_null() { 0 } else { *l4_field };
            // A UDP checksum of 0 means none.
            let l4_summed = !l4_field.is_null() && (inner.protocol == PROTO_TCP || old_l4_sum != 0);
            let mut l4_sum = old_l4_sum;
            let quoted = error.quoted_checksum;
            let (icmp, l4) = (&mut icmp_sum, &mut l4_sum);
            quoted_end(error.quoted_src, src_port, self.src, quoted, icmp, l4);
            quoted_end(error.quoted_dst, dst_port, self.dst, quoted, icmp, l4);
            if l4_summed {
                let sum = if inner.protocol == PROTO_UDP && l4_sum == 0 {
                    0xffff
                } else {
                    l4_sum
                };
                *l4_field = sum;
                icmp_sum = checksum_update(icmp_sum, u32::from(old_l4_sum), u32::from(sum));
            }
            let (outer_src, outer_dst) = (*error.outer_src, *error.outer_dst);
            if outer_src == inner.dst_addr_be {
                follow(error.outer_checksum, &mut icmp_sum, outer_src, self.dst.0);
                *error.outer_src = self.dst.0;
            }
            let redirected = outer_dst == inner.src_addr_be && outer_dst != self.src.0;
            if redirected {
                follow(error.outer_checksum, &mut icmp_sum, outer_dst, self.src.0);
                *error.outer_dst = self.src.0;
            }
            *error.icmp_checksum = icmp_sum;
            redirected
        }
    }
}

/// One end of the quote rewritten to `new` (address, port), and the checksums that cover it:
/// the quoted header's (`header_checksum`, if it has one), the ICMP one and the quoted L4 one.
///
/// # Safety
/// The pointers must point into the packet, checked as `IcmpError`'s are.
#[inline(always)]
unsafe fn quoted_end<A: Family>(
    addr: *mut A,
    port: &mut u16,
    new: (A, u16),
    header_checksum: Option<NonNull<u16>>,
    icmp_sum: &mut u16,
    l4_sum: &mut u16,
) {
    let (new_addr, new_port) = new;
    // SAFETY: as the caller promises.
    unsafe {
        let old_addr = *addr;
        if old_addr != new_addr {
            follow(header_checksum, icmp_sum, old_addr, new_addr);
            *l4_sum = A::checksum_update(*l4_sum, old_addr, new_addr);
            *addr = new_addr;
        }
    }
    if *port != new_port {
        let (old, new) = (u32::from(*port), u32::from(new_port));
        *icmp_sum = checksum_update(*icmp_sum, old, new);
        *l4_sum = checksum_update(*l4_sum, old, new);
        *port = new_port;
    }
}

/// An address's change `old` to `new`, in the checksum of the header that holds it, if that
/// header has one (IPv4's), else in the ICMPv6 checksum, which covers it.
///
/// # Safety
/// `header_checksum` must point into the packet, checked as `IcmpError`'s pointers are.
#[inline(always)]
unsafe fn follow<A: Family>(
    header_checksum: Option<NonNull<u16>>,
    icmp_sum: &mut u16,
    old: A,
    new: A,
) {
    match header_checksum {
        // SAFETY: as the caller promises.
        Some(sum) => unsafe { *sum.as_ptr() = A::checksum_update(*sum.as_ptr(), old, new) },
        None => *icmp_sum = A::checksum_update(*icmp_sum, old, new),
    }
}

/// Parses an IPv4 ICMP error quoting a TCP or UDP packet's ports; anything else is `None`.
#[inline(always)]
fn parse4(data: usize, data_end: usize) -> Option<IcmpError<u32>> {
    let (outer, outer_len) = ipv4(data, data_end)?;
    if outer.protocol != PROTO_ICMP || outer.fragment_be & IPV4_FRAGMENT_MASK_BE != 0 {
        return None;
    }
    let outer_ptr = ptr_at::<Ipv4Header>(data, data_end, ETH_HLEN)?.cast_mut();
    // The ICMP header and the quoted IPv4 header, checked at once: fields at fixed offsets
    // from one checked pointer keep its range in the verifier's eyes.
    let head = ptr_at::<Head<Ipv4Header>>(data, data_end, ETH_HLEN + outer_len)?.cast_mut();
    // SAFETY: `ptr_at` checked it lies within the packet (alignment as in `parse::read`).
    let (kind, quoted) = unsafe { ((*head).icmp.kind, (*head).quoted) };
    if kind != ICMP_DEST_UNREACHABLE && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETER_PROBLEM
    {
        return None;
    }
    let quoted_len = usize::from(quoted.version_ihl & 0x0f) * 4;
    if quoted.version_ihl >> 4 != 4
        || quoted_len < IPV4_MIN_HLEN
        || (quoted.protocol != PROTO_TCP && quoted.protocol != PROTO_UDP)
        // A quoted first fragment still carries its ports.
        || quoted.fragment_be & IPV4_OFFSET_MASK_BE != 0
    {
        return None;
    }
    let inner_l4 = ETH_HLEN + outer_len + ICMP_HLEN + quoted_len;
    // What the error quotes ends with its datagram, not the frame (which may be padded).
    let message_end = ETH_HLEN + usize::from(u16::from_be(outer.total_len_be));
    let datagram = Quoted::parse(data, data_end, quoted.protocol, inner_l4, message_end)?;
    // SAFETY: field addresses within the checked pointers; nothing is read.
    Some(unsafe {
        IcmpError {
            outer_src: &raw mut (*outer_ptr).src_addr_be,
            outer_dst: &raw mut (*outer_ptr).dst_addr_be,
            outer_checksum: NonNull::new(&raw mut (*outer_ptr).checksum_be),
            icmp_checksum: &raw mut (*head).icmp.checksum_be,
            quoted_src: &raw mut (*head).quoted.src_addr_be,
            quoted_dst: &raw mut (*head).quoted.dst_addr_be,
            quoted_checksum: NonNull::new(&raw mut (*head).quoted.checksum_be),
            ports: datagram.ports,
            l4_checksum: datagram.checksum,
            inner: datagram.key(quoted.src_addr_be, quoted.dst_addr_be),
        }
    })
}

/// Parses an ICMPv6 error quoting a TCP or UDP packet's ports, past the quote's extension
/// headers; anything else (neighbour discovery, echo) is `None`.
#[inline(always)]
fn parse6(data: usize, data_end: usize) -> Option<IcmpError<Ipv6Be>> {
    let outer = ipv6(data, data_end)?;
    // Errors come straight past the IPv6 header (no host or router adds extension headers to
    // its own); the quote is walked, as the packet it quotes was.
    let icmp_offset = ETH_HLEN + IPV6_HLEN;
    if outer.next_header != PROTO_ICMPV6 {
        return None;
    }
    let outer_ptr = ptr_at::<Ipv6Header>(data, data_end, ETH_HLEN)?.cast_mut();
    let head = ptr_at::<Head<Ipv6Header>>(data, data_end, icmp_offset)?.cast_mut();
    // SAFETY: `ptr_at` checked it lies within the packet (alignment as in `parse::read`).
    // Field by field: a copy of the quoted header would take its room on the stack.
    let (kind, version, next_header) = unsafe {
        (
            (*head).icmp.kind,
            (*head).quoted.version_class_flow_be,
            (*head).quoted.next_header,
        )
    };
    if !(ICMPV6_DEST_UNREACHABLE..=ICMPV6_PARAMETER_PROBLEM).contains(&kind)
        || u32::from_be(version) >> 28 != 6
    {
        return None;
    }
    let (protocol, offset) = skip_extensions(
        data,
        data_end,
        next_header,
        icmp_offset + ICMP_HLEN + IPV6_HLEN,
    )?;
    let Fragment6 {
        protocol,
        offset: inner_l4,
        piece,
        ..
    } = fragment6(data, data_end, protocol, offset)?;
    // A quoted first fragment still carries its ports.
    if (protocol != PROTO_TCP && protocol != PROTO_UDP) || piece == Piece::Later {
        return None;
    }
    let message_end = ETH_HLEN + IPV6_HLEN + usize::from(u16::from_be(outer.payload_len_be));
    let datagram = Quoted::parse(data, data_end, protocol, inner_l4, message_end)?;
    // SAFETY: field addresses within the checked pointers; the quoted addresses read lie
    // within the checked `head` (alignment as in `parse::read`).
    Some(unsafe {
        IcmpError {
            outer_src: &raw mut (*outer_ptr).src_addr_be,
            outer_dst: &raw mut (*outer_ptr).dst_addr_be,
            outer_checksum: None,
            icmp_checksum: &raw mut (*head).icmp.checksum_be,
            quoted_src: &raw mut (*head).quoted.src_addr_be,
            quoted_dst: &raw mut (*head).quoted.dst_addr_be,
            quoted_checksum: None,
            ports: datagram.ports,
            l4_checksum: datagram.checksum,
            inner: datagram.key((*head).quoted.src_addr_be, (*head).quoted.dst_addr_be),
        }
    })
}

/// The quoted TCP or UDP header: its ports, and its checksum if the error quotes that much.
struct Quoted {
    protocol: u8,
    ports: *mut [u16; 2],
    ports_be: [u16; 2],
    checksum: Option<NonNull<u16>>,
}

impl Quoted {
    /// The quoted datagram of `protocol` at `offset`, in an error that ends at `message_end`.
    #[inline(always)]
    fn parse(
        data: usize,
        data_end: usize,
        protocol: u8,
        offset: usize,
        message_end: usize,
    ) -> Option<Self> {
        let within = |offset: usize, len: usize| offset + len <= message_end;
        if !within(offset + L4_SRC_PORT, size_of::<[u16; 2]>()) {
            return None;
        }
        let ports = ptr_at::<[u16; 2]>(data, data_end, offset + L4_SRC_PORT)?;
        let checksum = offset
            + if protocol == PROTO_TCP {
                TCP_CHECKSUM
            } else {
                UDP_CHECKSUM
            };
        Some(Self {
            protocol,
            ports: ports.cast_mut(),
            // SAFETY: `ptr_at` checked it lies within the packet (alignment as in
            // `parse::read`).
            ports_be: unsafe { *ports },
            checksum: ptr_at::<u16>(data, data_end, checksum)
                .filter(|_| within(checksum, size_of::<u16>()))
                .and_then(|sum| NonNull::new(sum.cast_mut())),
        })
    }

    /// The quoted packet's flow key, from the quoted addresses.
    fn key<A>(&self, src_addr_be: A, dst_addr_be: A) -> FlowKey<A> {
        FlowKey {
            src_addr_be,
            dst_addr_be,
            src_port_be: self.ports_be[0],
            dst_port_be: self.ports_be[1],
            protocol: self.protocol,
            _pad: [0; 3],
        }
    }
}

/// An ICMP error's header and the fixed part of the IP header it quotes.
#[repr(C)]
struct Head<H> {
    icmp: IcmpHeader,
    quoted: H,
}
