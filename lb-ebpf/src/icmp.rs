//! ICMP errors about tracked flows (destination unreachable, "fragmentation needed" among
//! them; time exceeded; parameter problem), translated as conntrack translates the ICMP
//! related to a connection: the packet the error quotes, and the outer addresses that name the
//! same ends, are rewritten as the flow's own packets are, so that the error reaches the socket
//! that sent the packet and path-MTU discovery works through frontends and SNAT. An error that
//! quotes no tracked flow passes untouched.
//!
//! An error about a packet the node sent on to a backend quotes the packet as the backend got
//! it (to the backend, from the client or the SNAT address): its reply entry turns the quote
//! back into what the client sent. Like a reply, it is rewritten on ingress only when its
//! destination changes (SNAT), else after routing, on egress, where the errors the node itself
//! sends (its own "fragmentation needed", as a router) are seen; but the node's own error
//! about a SNATed flow is addressed to the node (the SNAT address) and goes over `lo`, whose
//! egress program translates it as on ingress and sends it out toward the client
//! ([`route`](crate::route)). An error about a
//! reply quotes it as the client got it (from the frontend): its flow turns the quote into
//! what the backend sent, and the error goes to the backend, before routing.
//!
//! Checksums: an address of the quoted IPv4 header and that header's checksum change
//! together, which leaves the ICMP checksum as it was; a quoted port, and the quoted TCP or
//! UDP checksum when the quote holds it, change the ICMP checksum (RFC 1624). The outer
//! header's checksum follows its addresses. The ICMP message's sum is unchanged, so an skb's
//! `CHECKSUM_COMPLETE` stays right; both programs write the packet directly.

use core::mem::size_of;

use lb_common::maps::{FlowKey, PROTO_TCP, PROTO_UDP};

use crate::{
    headers::{
        ETH_HLEN, ICMP_DEST_UNREACHABLE, IPV4_MIN_HLEN, IcmpHeader, Ipv4Header, L4_SRC_PORT,
        PROTO_ICMP, TCP_CHECKSUM, UDP_CHECKSUM,
    },
    maps,
    nat::checksum_update,
    parse::{IPV4_FRAGMENT_MASK_BE, IPV4_OFFSET_MASK_BE, ipv4, ptr_at},
    reply::Hook,
    stats::count,
};

const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// An ICMP error's fields, as pointers bounds-checked once: the verifier keeps a checked
/// pointer's range, where offsets recomputed later would lose it.
struct IcmpError {
    outer: *mut Ipv4Header,
    icmp_checksum: *mut u16,
    quoted: *mut Ipv4Header,
    /// The quoted TCP or UDP ports.
    ports: *mut [u16; 2],
    /// The quoted TCP or UDP checksum, if the error quotes that much.
    l4_checksum: Option<*mut u16>,
    outer_src_be: u32,
    outer_dst_be: u32,
    /// The quoted packet, as it was sent.
    inner: FlowKey,
}

/// Translates the ICMP error in the frame (`frame` gives its start and end), if it is one
/// about a tracked flow; whether it was. The packet passes either way.
#[inline(always)]
pub fn translate(frame: impl Fn() -> (usize, usize), hook: Hook) -> bool {
    let (data, data_end) = frame();
    let Some(error) = parse(data, data_end) else {
        return false;
    };
    let inner = &error.inner;
    // The quoted packet's answer: what a reply entry or a flow is keyed by.
    let answer = FlowKey {
        src_addr_be: inner.dst_addr_be,
        dst_addr_be: inner.src_addr_be,
        src_port_be: inner.dst_port_be,
        dst_port_be: inner.src_port_be,
        protocol: inner.protocol,
        _pad: [0; 3],
    };
    let rewrite = if let Some(reply) = maps::reply(answer) {
        // About a packet sent on to a backend: the quote becomes the client's packet.
        if hook == Hook::Ingress && error.outer_dst_be == reply.client_addr_be {
            return false;
        }
        Rewrite {
            src: (reply.client_addr_be, reply.client_port_be),
            dst: (reply.frontend_addr_be, reply.frontend_port_be),
        }
    } else if hook == Hook::Ingress
        && let Some(flow) = maps::flow(answer)
    {
        // About a reply: the quote becomes the backend's packet.
        Rewrite {
            src: (flow.backend_addr_be, flow.backend_port_be),
            dst: (flow.src_addr_be, flow.src_port_be),
        }
    } else {
        return false;
    };
    // Parsed again where it is written: across the map calls the compiler may rebuild the
    // packet pointers from offsets, whose bounds the verifier no longer knows.
    let (data, data_end) = frame();
    let Some(error) = parse(data, data_end) else {
        return false;
    };
    rewrite.apply(&error);
    count(|s| &mut s.icmp_translated);
    true
}

/// What the quoted packet's ends become.
struct Rewrite {
    src: (u32, u16),
    dst: (u32, u16),
}

impl Rewrite {
    /// Rewrites the quote's ends, and the outer addresses that name the same hosts: the host
    /// that sent the error, if it is the quote's destination, and the one it goes to, if it
    /// is the quote's source.
    #[inline(always)]
    fn apply(&self, error: &IcmpError) {
        let inner = &error.inner;
        // SAFETY: every pointer was bounds-checked against the packet by `parse`, and nothing
        // since changed the packet's length (alignment as in `parse::read`).
        unsafe {
            let (quoted, outer) = (&mut *error.quoted, &mut *error.outer);
            let ports = &mut *error.ports;
            let mut icmp_sum = *error.icmp_checksum;
            // A UDP checksum of 0 means none.
            let old_l4_sum = error
                .l4_checksum
                .map(|sum| *sum)
                .filter(|&sum| inner.protocol == PROTO_TCP || sum != 0);
            let mut l4_sum = old_l4_sum;
            let [src_port, dst_port] = ports;
            let ends = [
                (&mut quoted.src_addr_be, src_port, self.src),
                (&mut quoted.dst_addr_be, dst_port, self.dst),
            ];
            for (addr, port, (new_addr, new_port)) in ends {
                if *addr != new_addr {
                    quoted.checksum_be = checksum_update(quoted.checksum_be, *addr, new_addr);
                    l4_sum = l4_sum.map(|sum| checksum_update(sum, *addr, new_addr));
                    *addr = new_addr;
                }
                if *port != new_port {
                    let (old, new) = (u32::from(*port), u32::from(new_port));
                    icmp_sum = checksum_update(icmp_sum, old, new);
                    l4_sum = l4_sum.map(|sum| checksum_update(sum, old, new));
                    *port = new_port;
                }
            }
            if let (Some(field), Some(old), Some(sum)) = (error.l4_checksum, old_l4_sum, l4_sum) {
                let sum = if inner.protocol == PROTO_UDP && sum == 0 {
                    0xffff
                } else {
                    sum
                };
                *field = sum;
                icmp_sum = checksum_update(icmp_sum, u32::from(old), u32::from(sum));
            }
            *error.icmp_checksum = icmp_sum;
            if error.outer_src_be == inner.dst_addr_be {
                outer.checksum_be =
                    checksum_update(outer.checksum_be, outer.src_addr_be, self.dst.0);
                outer.src_addr_be = self.dst.0;
            }
            if error.outer_dst_be == inner.src_addr_be {
                outer.checksum_be =
                    checksum_update(outer.checksum_be, outer.dst_addr_be, self.src.0);
                outer.dst_addr_be = self.src.0;
            }
        }
    }
}

/// Parses an IPv4 ICMP error quoting a TCP or UDP packet's ports; anything else is `None`.
#[inline(always)]
fn parse(data: usize, data_end: usize) -> Option<IcmpError> {
    let (outer, outer_len) = ipv4(data, data_end)?;
    if outer.protocol != PROTO_ICMP || outer.fragment_be & IPV4_FRAGMENT_MASK_BE != 0 {
        return None;
    }
    let outer_ptr = ptr_at::<Ipv4Header>(data, data_end, ETH_HLEN)?;
    // The ICMP header and the quoted IPv4 header, checked at once: fields at fixed offsets
    // from one checked pointer keep its range in the verifier's eyes.
    let head = ptr_at::<Head>(data, data_end, ETH_HLEN + outer_len)?.cast_mut();
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
    let inner_l4 = ETH_HLEN + outer_len + size_of::<IcmpHeader>() + quoted_len;
    // What the error quotes ends with its datagram, not the frame (which may be padded).
    let message_end = ETH_HLEN + usize::from(u16::from_be(outer.total_len_be));
    let within = |offset: usize, len: usize| offset + len <= message_end;
    if !within(inner_l4 + L4_SRC_PORT, size_of::<[u16; 2]>()) {
        return None;
    }
    let ports_ptr = ptr_at::<[u16; 2]>(data, data_end, inner_l4 + L4_SRC_PORT)?;
    // SAFETY: `ptr_at` checked it lies within the packet (alignment as in `parse::read`).
    let ports = unsafe { *ports_ptr };
    let l4_checksum = inner_l4
        + if quoted.protocol == PROTO_TCP {
            TCP_CHECKSUM
        } else {
            UDP_CHECKSUM
        };
    Some(IcmpError {
        outer: outer_ptr.cast_mut(),
        // SAFETY: field addresses within the checked `head`; nothing is read.
        icmp_checksum: unsafe { &raw mut (*head).icmp.checksum_be },
        // SAFETY: as above.
        quoted: unsafe { &raw mut (*head).quoted },
        ports: ports_ptr.cast_mut(),
        l4_checksum: ptr_at::<u16>(data, data_end, l4_checksum)
            .filter(|_| within(l4_checksum, size_of::<u16>()))
            .map(<*const u16>::cast_mut),
        outer_src_be: outer.src_addr_be,
        outer_dst_be: outer.dst_addr_be,
        inner: FlowKey {
            src_addr_be: quoted.src_addr_be,
            dst_addr_be: quoted.dst_addr_be,
            src_port_be: ports[0],
            dst_port_be: ports[1],
            protocol: quoted.protocol,
            _pad: [0; 3],
        },
    })
}

/// An ICMP error's header and the fixed part of the IPv4 header it quotes.
#[repr(C)]
struct Head {
    icmp: IcmpHeader,
    quoted: Ipv4Header,
}
