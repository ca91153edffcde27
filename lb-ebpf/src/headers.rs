//! The headers the datapath reads and writes, and their fields' offsets, taken from the
//! structs (as Cilium's `offsetof(struct iphdr, daddr)`), never written as numbers.

use core::mem::{offset_of, size_of};

#[repr(C)]
pub struct EthHeader {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type_be: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Header {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len_be: u16,
    pub id_be: u16,
    pub fragment_be: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub checksum_be: u16,
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Header {
    /// Version (6), traffic class and flow label.
    pub version_class_flow_be: u32,
    /// What follows this header: extension headers and the TCP or UDP datagram.
    pub payload_len_be: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src_addr_be: [u32; 4],
    pub dst_addr_be: [u32; 4],
}

/// The first two bytes of every IPv6 extension header the datapath walks past.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6ExtensionHeader {
    pub next_header: u8,
    /// In 8-byte units past the first 8 (in 4-byte units past the first 8 for AH).
    pub len: u8,
}

/// The IPv6 fragment header (RFC 8200, 4.5).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6FragmentHeader {
    /// The datagram's first header past the fragment header, as senders write it in every
    /// fragment (RFC 8200 reads the first fragment's).
    pub next_header: u8,
    pub reserved: u8,
    /// The offset in 8-byte units (the high 13 bits) and "more fragments" (the lowest).
    pub offset_more_be: u16,
    pub id_be: u32,
}

#[repr(C)]
pub struct TcpHeader {
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub seq_be: u32,
    pub ack_seq_be: u32,
    /// The data offset, in 32-bit words, in the high nibble.
    pub data_offset: u8,
    pub flags: u8,
    pub window_be: u16,
    pub checksum_be: u16,
    pub urgent_be: u16,
}

#[repr(C)]
#[expect(
    clippy::struct_field_names,
    reason = "each field is in network order, as named"
)]
pub struct UdpHeader {
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub len_be: u16,
    pub checksum_be: u16,
}

#[repr(C)]
pub struct IcmpHeader {
    pub kind: u8,
    pub code: u8,
    pub checksum_be: u16,
    pub rest_be: u32,
}

/// IANA's number for ICMP, as in the IPv4 header.
pub const PROTO_ICMP: u8 = 1;
/// The ICMP type of "destination unreachable" errors ("port unreachable", "fragmentation
/// needed" among them).
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
/// IANA's number for ICMPv6, as in IPv6's next header.
pub const PROTO_ICMPV6: u8 = 58;
/// ICMPv6's errors (RFC 4443), from the first to the last: destination unreachable ("port
/// unreachable" among them), packet too big (path-MTU discovery's), time exceeded, parameter
/// problem.
pub const ICMPV6_DEST_UNREACHABLE: u8 = 1;
pub const ICMPV6_PARAMETER_PROBLEM: u8 = 4;

/// IANA's numbers of the IPv6 extension headers a real network carries, as in `next_header`.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_AUTH: u8 = 51;
pub const IPV6_DEST_OPTIONS: u8 = 60;

pub const ETH_HLEN: usize = size_of::<EthHeader>();
pub const IPV6_HLEN: usize = size_of::<Ipv6Header>();
pub const IPV6_FRAGMENT_HLEN: usize = size_of::<Ipv6FragmentHeader>();
/// An IPv4 header without options.
pub const IPV4_MIN_HLEN: usize = size_of::<Ipv4Header>();
/// A TCP header without options.
pub const TCP_MIN_HLEN: usize = size_of::<TcpHeader>();
pub const UDP_HLEN: usize = size_of::<UdpHeader>();
pub const ICMP_HLEN: usize = size_of::<IcmpHeader>();

pub const ETH_DST: usize = offset_of!(EthHeader, dst);
pub const ETH_SRC: usize = offset_of!(EthHeader, src);
pub const ETH_TYPE: usize = offset_of!(EthHeader, ether_type_be);

/// From the start of the IPv4 header.
pub const IP_TOTAL_LEN: usize = offset_of!(Ipv4Header, total_len_be);
pub const IP_FRAGMENT: usize = offset_of!(Ipv4Header, fragment_be);
pub const IP_TTL: usize = offset_of!(Ipv4Header, ttl);
pub const IP_PROTOCOL: usize = offset_of!(Ipv4Header, protocol);
pub const IP_CHECKSUM: usize = offset_of!(Ipv4Header, checksum_be);
pub const IP_SRC: usize = offset_of!(Ipv4Header, src_addr_be);
pub const IP_DST: usize = offset_of!(Ipv4Header, dst_addr_be);

/// From the start of the IPv6 header.
pub const IP6_SRC: usize = offset_of!(Ipv6Header, src_addr_be);
pub const IP6_DST: usize = offset_of!(Ipv6Header, dst_addr_be);

/// From the start of the TCP or UDP header: both start with the two ports.
pub const L4_SRC_PORT: usize = offset_of!(UdpHeader, src_port_be);
pub const L4_DST_PORT: usize = offset_of!(UdpHeader, dst_port_be);
const _: () = assert!(offset_of!(TcpHeader, dst_port_be) == L4_DST_PORT);
pub const TCP_SEQ: usize = offset_of!(TcpHeader, seq_be);
pub const TCP_ACK_SEQ: usize = offset_of!(TcpHeader, ack_seq_be);
pub const TCP_DATA_OFFSET: usize = offset_of!(TcpHeader, data_offset);
pub const TCP_FLAGS: usize = offset_of!(TcpHeader, flags);
pub const TCP_CHECKSUM: usize = offset_of!(TcpHeader, checksum_be);
pub const UDP_LEN: usize = offset_of!(UdpHeader, len_be);
pub const UDP_CHECKSUM: usize = offset_of!(UdpHeader, checksum_be);

pub const ICMP_TYPE: usize = offset_of!(IcmpHeader, kind);
pub const ICMP_CODE: usize = offset_of!(IcmpHeader, code);
pub const ICMP_CHECKSUM: usize = offset_of!(IcmpHeader, checksum_be);
