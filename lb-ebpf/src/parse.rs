//! Packet parsing: Ethernet, IPv4 or IPv6 (its extension headers walked) and the TCP or UDP
//! ports, by direct packet access.

use core::mem::size_of;

use lb_common::maps::{FlowKey, Ipv6Be, PROTO_TCP, PROTO_UDP};

use crate::headers::{
    ETH_HLEN, ETH_TYPE, IPV4_MIN_HLEN, IPV6_AUTH, IPV6_DEST_OPTIONS, IPV6_FRAGMENT,
    IPV6_FRAGMENT_HLEN, IPV6_HLEN, IPV6_HOP_BY_HOP, IPV6_ROUTING, Ipv4Header, Ipv6ExtensionHeader,
    Ipv6FragmentHeader, Ipv6Header, L4_DST_PORT, L4_SRC_PORT, TCP_CHECKSUM, TCP_DATA_OFFSET,
    TCP_MIN_HLEN, UDP_CHECKSUM, UDP_HLEN, UDP_LEN,
};

const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// Extension headers walked before the datagram; a packet with more passes untouched.
const MAX_EXTENSION_HEADERS: usize = 6;
/// Fragment offset and "more fragments": set on every fragment of a split datagram.
pub const IPV4_FRAGMENT_MASK_BE: u16 = 0x3fffu16.to_be();
/// The fragment offset alone: set on every fragment but the first.
pub const IPV4_OFFSET_MASK_BE: u16 = 0x1fffu16.to_be();
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Whether a packet is a whole datagram or a fragment of one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    Whole,
    /// Offset 0, more to come: it carries the ports, and its TCP or UDP checksum covers the
    /// whole datagram.
    First,
    /// Past the first: no TCP or UDP header; its ports are the first's
    /// ([`fragments`](crate::fragments)).
    Later,
}

/// Where a packet's fields are, and their values; its addresses of family `A`
/// ([`Family`](crate::family::Family)).
pub struct Packet<A = u32> {
    pub key: FlowKey<A>,
    pub l4_offset: usize,
    /// The TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    /// The IP length: IPv4's total length, IPv6's payload length and header.
    pub ip_len: u16,
    /// The identification a datagram's fragments share: IPv4's (widened), or the IPv6
    /// fragment header's (0 without one).
    pub ip_id_be: u32,
    pub piece: Piece,
}

impl<A> Packet<A> {
    pub fn src_port_offset(&self) -> usize {
        self.l4_offset + L4_SRC_PORT
    }

    pub fn dst_port_offset(&self) -> usize {
        self.l4_offset + L4_DST_PORT
    }

    pub fn l4_checksum_offset(&self) -> usize {
        self.l4_offset
            + if self.key.protocol == PROTO_TCP {
                TCP_CHECKSUM
            } else {
                UDP_CHECKSUM
            }
    }

    pub fn is_udp(&self) -> bool {
        self.key.protocol == PROTO_UDP
    }

    /// A SYN without ACK: a client opening a connection, even on a 4-tuple that just closed.
    pub fn opens_connection(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    pub fn is_reset(&self) -> bool {
        self.tcp_flags & TCP_RST != 0
    }

    /// A TCP FIN or RST: the flow is closing.
    pub fn closing(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
}

/// A pointer to a `T` at `offset` in the frame, if it fits.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*const T> {
    let start = data + offset;
    if start + size_of::<T>() > data_end {
        return None;
    }
    Some(start as *const T)
}

/// The `T` at `offset` in the frame, if it fits.
#[inline(always)]
fn read<T: Copy>(data: usize, data_end: usize, offset: usize) -> Option<T> {
    let field = ptr_at::<T>(data, data_end, offset)?;
    // SAFETY: `ptr_at` checked that the `T` lies within the packet. Its alignment is the
    // packet's (an IPv4 header follows 14 bytes of Ethernet): the verifier and the JIT allow
    // such loads on the hosts we run on, as the kernel's own C programs rely on, and
    // `read_unaligned` would split every load into bytes (about 120 more instructions per
    // program).
    Some(unsafe { *field })
}

/// What a program sees of a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// The whole of it (XDP, whose programs here take no multi-buffer frames): the datagram
    /// must fit in it. A BIG TCP datagram (total length 0) is still taken: generic XDP runs
    /// after GRO.
    Whole,
    /// An skb's linear part (tc), whose end is no datagram's (GRO, TSO), and a BIG TCP
    /// datagram's total length is 0.
    Linear,
}

/// The frame's IPv4 header and its length, if it is IPv4 (version 4, a header of at least five
/// words): what every parser of this datapath starts from.
#[inline(always)]
pub fn ipv4(data: usize, data_end: usize) -> Option<(Ipv4Header, usize)> {
    let ether_type_be: u16 = read(data, data_end, ETH_TYPE)?;
    if ether_type_be != ETH_P_IP_BE {
        return None;
    }
    let ip: Ipv4Header = read(data, data_end, ETH_HLEN)?;
    let header_len = usize::from(ip.version_ihl & 0x0f) * 4;
    if ip.version_ihl >> 4 != 4 || header_len < IPV4_MIN_HLEN {
        return None;
    }
    Some((ip, header_len))
}

/// The frame's IPv6 header, if it is IPv6 (version 6).
#[inline(always)]
pub fn ipv6(data: usize, data_end: usize) -> Option<Ipv6Header> {
    let ether_type_be: u16 = read(data, data_end, ETH_TYPE)?;
    if ether_type_be != ETH_P_IPV6_BE {
        return None;
    }
    let ip: Ipv6Header = read(data, data_end, ETH_HLEN)?;
    (u32::from_be(ip.version_class_flow_be) >> 28 == 6).then_some(ip)
}

/// Whether the frame is IPv6 carrying TCP or UDP straight past its header, as nearly every
/// IPv6 packet does.
#[inline(always)]
pub fn is_plain_datagram6(data: usize, data_end: usize) -> bool {
    ipv6(data, data_end)
        .is_some_and(|ip| ip.next_header == PROTO_TCP || ip.next_header == PROTO_UDP)
}

/// Walks the IPv6 extension headers from `offset`, where a header of type `next_header`
/// starts (hop by hop, routing, destination options, authentication; at most
/// [`MAX_EXTENSION_HEADERS`]): the header past them (its type and offset). A fragment header
/// ends the walk, as any other that is not one of those.
#[inline(always)]
pub fn skip_extensions(
    data: usize,
    data_end: usize,
    next_header: u8,
    offset: usize,
) -> Option<(u8, usize)> {
    let (mut protocol, mut offset) = (next_header, offset);
    for _ in 0..MAX_EXTENSION_HEADERS {
        if !matches!(
            protocol,
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS | IPV6_AUTH
        ) {
            break;
        }
        let header: Ipv6ExtensionHeader = read(data, data_end, offset)?;
        let len = usize::from(header.len);
        offset += if protocol == IPV6_AUTH {
            (len + 2) * 4
        } else {
            (len + 1) * 8
        };
        protocol = header.next_header;
    }
    Some((protocol, offset))
}

/// Parses an IPv6 TCP or UDP packet, or a fragment of one, past the extension headers before
/// its datagram (hop by hop, routing, destination options, authentication), at most
/// [`MAX_EXTENSION_HEADERS`] of them, and a fragment header after them, which the datagram's
/// header must follow straight (as the first fragment holds the whole header chain, RFC
/// 7112). A later fragment carries no ports: they are 0 here, and its first's in
/// [`fragments`](crate::fragments). Anything else is `None` and passes untouched: ICMPv6
/// (neighbour discovery, router advertisements; errors about tracked flows are translated
/// before, [`icmp`](crate::icmp)), a malformed packet.
#[inline(always)]
pub fn parse6(data: usize, data_end: usize, frame: Frame) -> Option<Packet<Ipv6Be>> {
    let ip = ipv6(data, data_end)?;
    let payload_len = usize::from(u16::from_be(ip.payload_len_be));
    if frame == Frame::Whole && data + ETH_HLEN + IPV6_HLEN + payload_len > data_end {
        return None;
    }
    let (protocol, offset) = skip_extensions(data, data_end, ip.next_header, ETH_HLEN + IPV6_HLEN)?;
    let Fragment6 {
        protocol,
        offset: l4_offset,
        id_be: ip_id_be,
        piece,
    } = fragment6(data, data_end, protocol, offset)?;
    // A packet past the headers walked, too.
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return None;
    }
    // A BIG TCP datagram's payload length is 0.
    let l4_len = match payload_len {
        0 if protocol == PROTO_TCP && piece == Piece::Whole => usize::MAX,
        len => (ETH_HLEN + IPV6_HLEN + len).checked_sub(l4_offset)?,
    };
    let ip_len = u16::try_from(IPV6_HLEN + payload_len).unwrap_or(u16::MAX);
    let Datagram { ports, tcp_flags } = if piece == Piece::Later {
        Datagram {
            ports: [0; 2],
            tcp_flags: 0,
        }
    } else {
        datagram(data, data_end, protocol, l4_offset, l4_len, piece)?
    };
    Some(Packet {
        key: FlowKey {
            src_addr_be: ip.src_addr_be,
            dst_addr_be: ip.dst_addr_be,
            src_port_be: ports[0],
            dst_port_be: ports[1],
            protocol,
            _pad: [0; 3],
        },
        l4_offset,
        tcp_flags,
        ip_len,
        ip_id_be,
        piece,
    })
}

/// Where an IPv6 datagram's header is, past a fragment header if there is one, and which piece
/// of the datagram the packet holds.
pub struct Fragment6 {
    pub protocol: u8,
    pub offset: usize,
    /// The fragment header's identification; 0 without one.
    pub id_be: u32,
    pub piece: Piece,
}

/// Reads the fragment header at `offset` if `next_header` is one; without one, the packet is a
/// whole datagram whose header (of type `next_header`) is at `offset`. The datagram's header
/// must follow the fragment header straight, as it does in every first fragment (RFC 7112).
#[inline(always)]
pub fn fragment6(
    data: usize,
    data_end: usize,
    next_header: u8,
    offset: usize,
) -> Option<Fragment6> {
    if next_header != IPV6_FRAGMENT {
        return Some(Fragment6 {
            protocol: next_header,
            offset,
            id_be: 0,
            piece: Piece::Whole,
        });
    }
    let fragment: Ipv6FragmentHeader = read(data, data_end, offset)?;
    let offset_more = u16::from_be(fragment.offset_more_be);
    let piece = match (offset_more >> 3, offset_more & 1) {
        // An atomic fragment (RFC 6946): a whole datagram.
        (0, 0) => Piece::Whole,
        (0, _) => Piece::First,
        _ => Piece::Later,
    };
    Some(Fragment6 {
        protocol: fragment.next_header,
        offset: offset + IPV6_FRAGMENT_HLEN,
        id_be: fragment.id_be,
        piece,
    })
}

/// What the TCP or UDP header tells.
struct Datagram {
    ports: [u16; 2],
    tcp_flags: u8,
}

/// The TCP or UDP header at `l4_offset`, of a datagram of `l4_len` bytes (the IP header's
/// word), if the lengths fit each other and the checksum lies in the frame.
#[inline(always)]
fn datagram(
    data: usize,
    data_end: usize,
    protocol: u8,
    l4_offset: usize,
    l4_len: usize,
    piece: Piece,
) -> Option<Datagram> {
    // Both headers start with the two ports; the TCP data offset is followed by the flags.
    let ports: [u16; 2] = read(data, data_end, l4_offset + L4_SRC_PORT)?;
    let (header_len, min_header_len, tcp_flags, checksum) = if protocol == PROTO_TCP {
        let offset_flags: [u8; 2] = read(data, data_end, l4_offset + TCP_DATA_OFFSET)?;
        let header_len = usize::from(offset_flags[0] >> 4) * 4;
        (header_len, TCP_MIN_HLEN, offset_flags[1], TCP_CHECKSUM)
    } else {
        let udp_len_be: u16 = read(data, data_end, l4_offset + UDP_LEN)?;
        let udp_len = usize::from(u16::from_be(udp_len_be));
        // A first fragment's UDP length is the whole datagram's.
        if udp_len < UDP_HLEN || (udp_len > l4_len && piece == Piece::Whole) {
            return None;
        }
        (UDP_HLEN, UDP_HLEN, 0, UDP_CHECKSUM)
    };
    if header_len < min_header_len || header_len > l4_len {
        return None;
    }
    // The checksum is rewritten later: make sure it is in the packet.
    ptr_at::<u16>(data, data_end, l4_offset + checksum)?;
    Some(Datagram { ports, tcp_flags })
}

/// Parses an IPv4 TCP or UDP packet, or the first fragment of one, past its IPv4 header `ip`
/// of `ip_len` bytes ([`ipv4`]); anything else (and later fragments, which carry no ports:
/// [`fragments`](crate::fragments)) is `None` and passes untouched, and so is a malformed one
/// (lengths that do not fit each other, or the frame when it is `Whole`): it is never
/// rewritten.
#[inline(always)]
pub fn parse(
    data: usize,
    data_end: usize,
    frame: Frame,
    ip: &Ipv4Header,
    ip_len: usize,
) -> Option<Packet> {
    if ip.fragment_be & IPV4_OFFSET_MASK_BE != 0 {
        return None;
    }
    let piece = if ip.fragment_be & IPV4_FRAGMENT_MASK_BE == 0 {
        Piece::Whole
    } else {
        Piece::First
    };
    let protocol = ip.protocol;
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return None;
    }
    let l4_offset = ETH_HLEN + ip_len;
    // The lengths must fit each other, and the frame when it is the whole packet.
    let total_len = usize::from(u16::from_be(ip.total_len_be));
    if frame == Frame::Whole && data + ETH_HLEN + total_len > data_end {
        return None;
    }
    let l4_len = match total_len {
        0 if protocol == PROTO_TCP => usize::MAX,
        total if total < ip_len => return None,
        total => total - ip_len,
    };
    let Datagram { ports, tcp_flags } =
        datagram(data, data_end, protocol, l4_offset, l4_len, piece)?;
    Some(Packet {
        key: FlowKey {
            src_addr_be: ip.src_addr_be,
            dst_addr_be: ip.dst_addr_be,
            src_port_be: ports[0],
            dst_port_be: ports[1],
            protocol,
            _pad: [0; 3],
        },
        l4_offset,
        tcp_flags,
        ip_len: u16::from_be(ip.total_len_be),
        ip_id_be: u32::from(ip.id_be),
        piece,
    })
}
