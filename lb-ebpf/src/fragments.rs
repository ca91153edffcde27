//! IP fragments. Only a datagram's first fragment carries its ports: the first fragment of a
//! datagram the datapath rewrites (to a backend, or back to a client) leaves them in
//! `lb_fragments`, under what every fragment of the datagram shares (source, destination,
//! protocol, IP id), and each later fragment takes them from there and follows its flow, or its
//! reply, rewritten as its packets are: addresses only, the first fragment carrying the TCP or
//! UDP checksum, which covers the whole datagram. The kernel is not asked to reassemble: tc
//! and XDP run before it could, and a node forwarding a datagram never does.
//!
//! A later fragment whose first was not seen cannot be placed: for a ClusterIP it is dropped
//! and counted (nothing else could take it); to any other address it passes untouched, as most
//! fragments a node forwards are no frontend's.

use lb_common::maps::{FragmentKey, FragmentPorts, PROTO_TCP, PROTO_UDP};

use crate::{
    headers::{ETH_HLEN, ETH_TYPE, IPV4_MIN_HLEN, Ipv4Header},
    maps::{self, FRAGMENTS},
    parse::{ETH_P_IP_BE, Frame, IPV4_OFFSET_MASK_BE, Packet, Piece, parse, read},
    stats::count,
};

/// What a program is to do with a frame.
pub enum Input {
    /// Balance it.
    Packet(Packet),
    /// A later fragment of a datagram to a ClusterIP that cannot be placed: drop it.
    Unplaced,
    /// Anything else: pass it (an ICMP error among them, to translate).
    Other,
}

/// The frame as a packet to balance: parsed, or a later fragment with its first's ports.
#[inline(always)]
pub fn input(data: usize, data_end: usize, frame: Frame) -> Input {
    if let Some(packet) = parse(data, data_end, frame) {
        return Input::Packet(packet);
    }
    later(data, data_end, frame)
}

/// Records the ports of a datagram's first fragment, once it was rewritten.
#[inline(always)]
pub fn remember(packet: &Packet) {
    if packet.piece != Piece::First {
        return;
    }
    let ports = FragmentPorts {
        src_port_be: packet.key.src_port_be,
        dst_port_be: packet.key.dst_port_be,
    };
    // A full table evicts the oldest datagram: its later fragments go unplaced.
    let _ = FRAGMENTS.insert(fragment_key(packet), ports, 0);
}

#[inline(always)]
fn fragment_key(packet: &Packet) -> FragmentKey {
    FragmentKey {
        src_addr_be: packet.key.src_addr_be,
        dst_addr_be: packet.key.dst_addr_be,
        id_be: packet.ip_id_be,
        protocol: packet.key.protocol,
        _pad: 0,
    }
}

/// A later fragment of a TCP or UDP datagram, given the ports its first fragment left.
#[inline(always)]
fn later(data: usize, data_end: usize, frame: Frame) -> Input {
    let Some(ether_type_be) = read::<u16>(data, data_end, ETH_TYPE) else {
        return Input::Other;
    };
    let Some(ip) = read::<Ipv4Header>(data, data_end, ETH_HLEN) else {
        return Input::Other;
    };
    let header_len = usize::from(ip.version_ihl & 0x0f) * 4;
    let total_len = usize::from(u16::from_be(ip.total_len_be));
    if ether_type_be != ETH_P_IP_BE
        || ip.version_ihl >> 4 != 4
        || ip.fragment_be & IPV4_OFFSET_MASK_BE == 0
        || (ip.protocol != PROTO_TCP && ip.protocol != PROTO_UDP)
        || header_len < IPV4_MIN_HLEN
        || total_len < header_len
        || (frame == Frame::Whole && data + ETH_HLEN + total_len > data_end)
    {
        return Input::Other;
    }
    let mut packet = Packet {
        key: lb_common::maps::FlowKey {
            src_addr_be: ip.src_addr_be,
            dst_addr_be: ip.dst_addr_be,
            src_port_be: 0,
            dst_port_be: 0,
            protocol: ip.protocol,
            _pad: [0; 3],
        },
        l4_offset: ETH_HLEN + header_len,
        tcp_flags: 0,
        ip_len: u16::from_be(ip.total_len_be),
        closing: false,
        ip_id_be: ip.id_be,
        piece: Piece::Later,
    };
    let Some(ports) = maps::fragment_ports(fragment_key(&packet)) else {
        if maps::is_vip(ip.dst_addr_be) {
            count(|s| &mut s.fragments_unmatched);
            return Input::Unplaced;
        }
        return Input::Other;
    };
    packet.key.src_port_be = ports.src_port_be;
    packet.key.dst_port_be = ports.dst_port_be;
    Input::Packet(packet)
}
