//! IP fragments, of both families, each in its own maps. Only a datagram's first fragment
//! carries its ports: the first fragment of a datagram the datapath rewrites (to a backend, or
//! back to a client), or of one to a frontend address, leaves them in `lb_fragments`
//! (`lb_fragments6`), under what every fragment of the datagram shares (source, destination,
//! protocol, IP id: IPv4's, or the IPv6 fragment header's), and each later fragment takes them
//! from there and follows its flow, or its reply, rewritten as its packets are: addresses
//! only, the first fragment carrying the TCP or UDP checksum, which covers the whole datagram.
//! The kernel is not asked to reassemble: tc and XDP run before it could, and a node
//! forwarding a datagram never does.
//!
//! A later fragment whose first was not seen yet cannot be placed. If it is to a frontend address
//! (a ClusterIP, a load-balancer or external IP, a NodePort's) or to the node's SNAT address
//! (SNATed flows' replies), a tc ingress program holds it: its bytes wait in `lb_held_fragments`
//! (`lb_held_fragments6`; a few per datagram, for a short while: an LRU table) and the skb is
//! dropped. When the first fragment has passed, rewritten or not (a datagram to a node address may
//! be no service's), it is cloned into the interface's ingress, then each held fragment is written
//! over the skb in turn and cloned after it, and the skb is dropped: the program meets each again,
//! the first passing on untouched and the others placed. XDP cannot clone a frame: it passes every
//! fragment to the uplink's tc ingress program, which balances it there. One that cannot be held
//! (too long, or past its datagram's room) is counted, and dropped if it is to a ClusterIP, else
//! passed untouched. To any other address a later fragment passes untouched, as most fragments a
//! node forwards are no frontend's.

use aya_ebpf::{
    bindings::{
        BPF_EXIST, BPF_F_INGRESS, BPF_F_RECOMPUTE_CSUM, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_skb_change_tail, bpf_skb_store_bytes},
    programs::TcContext,
};
use lb_common::maps::{
    FRAGMENT_TIMEOUT_NS, FlowKey, FragmentKey, FragmentPorts, HELD_FRAGMENT_BYTES,
    HELD_PER_DATAGRAM, HeldFragment, HeldKey, Ipv6Be, PROTO_TCP, PROTO_UDP, Vip,
};

use crate::{
    clock::now_ns,
    family::Family,
    headers::{ETH_HLEN, Ipv4Header},
    maps,
    parse::{Frame, IPV4_FRAGMENT_MASK_BE, IPV4_OFFSET_MASK_BE, Packet, Piece, parse, parse6},
    stats::count,
};

/// What a program is to do with a frame.
pub enum Input<A = u32> {
    /// Balance it.
    Packet(Packet<A>),
    /// A later fragment whose first has not come, to an address whose fragments wait for their
    /// first ([`waits_for_first`]): hold it ([`hold`]).
    Unplaced(Packet<A>),
    /// Anything else: pass it (an ICMP error among them, to translate).
    Other,
}

/// The IPv4 frame whose header is `ip`, of `header_len` bytes ([`ipv4`](crate::parse::ipv4)),
/// as a packet to balance: parsed, or a later fragment with its first's ports.
#[inline(always)]
pub fn input(
    data: usize,
    data_end: usize,
    frame: Frame,
    ip: &Ipv4Header,
    header_len: usize,
) -> Input {
    if ip.fragment_be & IPV4_OFFSET_MASK_BE == 0 {
        return parse(data, data_end, frame, ip, header_len).map_or(Input::Other, Input::Packet);
    }
    later(ip, header_len)
}

/// The IPv6 frame as a packet to balance: parsed ([`parse6`]), a later fragment given its
/// first's ports.
#[inline(always)]
pub fn input6(data: usize, data_end: usize, frame: Frame) -> Input<Ipv6Be> {
    match parse6(data, data_end, frame) {
        Some(packet) if packet.piece == Piece::Later => placed(packet),
        Some(packet) => Input::Packet(packet),
        None => Input::Other,
    }
}

/// Whether the IPv4 header `ip` is a fragment's, first or later.
#[inline(always)]
pub fn is_fragment(ip: &Ipv4Header) -> bool {
    ip.fragment_be & IPV4_FRAGMENT_MASK_BE != 0
}

/// Records the ports of a datagram's first fragment, once it was rewritten or passed.
#[inline(always)]
pub fn remember<A: Family>(packet: &Packet<A>) {
    if packet.piece != Piece::First {
        return;
    }
    let ports = FragmentPorts {
        seen_ns: now_ns(),
        src_port_be: packet.key.src_port_be,
        dst_port_be: packet.key.dst_port_be,
        _pad: 0,
    };
    // A full table evicts the oldest datagram: its later fragments go unplaced.
    let _ = A::fragments().insert(fragment_key(packet), ports, 0);
}

#[inline(always)]
fn fragment_key<A: Family>(packet: &Packet<A>) -> FragmentKey<A> {
    FragmentKey {
        src_addr_be: packet.key.src_addr_be,
        dst_addr_be: packet.key.dst_addr_be,
        id_be: packet.ip_id_be,
        protocol: packet.key.protocol,
        _pad: [0; 3],
    }
}

/// A later fragment (`ip`, a header of `header_len` bytes) of a TCP or UDP datagram, given the
/// ports its first fragment left.
#[inline(always)]
fn later(ip: &Ipv4Header, header_len: usize) -> Input {
    let total_len = usize::from(u16::from_be(ip.total_len_be));
    if (ip.protocol != PROTO_TCP && ip.protocol != PROTO_UDP) || total_len < header_len {
        return Input::Other;
    }
    let packet = Packet {
        key: FlowKey {
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
        ip_id_be: u32::from(ip.id_be),
        piece: Piece::Later,
    };
    placed(packet)
}

/// A later fragment (`packet`, its ports 0), given its first's ports if they were left.
#[inline(always)]
fn placed<A: Family>(mut packet: Packet<A>) -> Input<A> {
    let Some(ports) = placed_ports(&packet) else {
        if waits_for_first(packet.key.dst_addr_be) {
            return Input::Unplaced(packet);
        }
        return Input::Other;
    };
    packet.key.src_port_be = ports.src_port_be;
    packet.key.dst_port_be = ports.dst_port_be;
    Input::Packet(packet)
}

/// Whether a later fragment to `addr_be` that comes before its first is held for it: a frontend
/// address's may be any flow's, and the node's SNAT address is where SNATed flows' replies
/// come. Their first fragments are remembered whenever they pass, so that their later ones, in
/// order, find where to go even when the datagram was no service's.
#[inline(always)]
fn waits_for_first<A: Family>(addr_be: A) -> bool {
    maps::vip(addr_be).is_some() || maps::config().is_some_and(|c| A::snat_addr(c) == Some(addr_be))
}

/// Counts a later fragment that cannot be placed.
#[inline(always)]
pub fn unplaced() {
    count(|s| &mut s.fragments_unmatched);
}

#[inline(always)]
fn held_key<A: Family>(packet: &Packet<A>, slot: u8) -> HeldKey<A> {
    HeldKey {
        src_addr_be: packet.key.src_addr_be,
        dst_addr_be: packet.key.dst_addr_be,
        id_be: packet.ip_id_be,
        protocol: packet.key.protocol,
        slot,
        _pad: [0; 2],
    }
}

/// Holds a later fragment (`packet`, not placed) until its datagram's first comes: its bytes
/// are kept, counted as held, and the skb is to be dropped (`Err(TC_ACT_SHOT)`). One that
/// cannot be kept (too long, or its datagram's room full of fresher ones) is counted as
/// unplaced: dropped if it is to a ClusterIP, whose every datagram is a service's; else passed
/// untouched (`Err(TC_ACT_OK)`), as the node's own datagrams were before there was holding:
/// the kernel may reassemble it. If the first came meanwhile, on another CPU whose release may
/// have passed this slot already, the fragment is taken back and returned placed
/// (`Ok`), to balance now.
#[inline(always)]
pub fn hold<A: Family>(ctx: &TcContext, mut packet: Packet<A>) -> Result<Packet<A>, i32> {
    let now = now_ns();
    // Borrowed, never copied: a fragment is three times the stack a program has.
    let slot = copy_in(ctx).map(|f| &*f).and_then(|fragment| {
        (0..HELD_PER_DATAGRAM).find(|&slot| {
            let key = held_key(&packet, slot);
            let flags = match maps::held_fragment(key) {
                None => BPF_NOEXIST,
                // Another datagram's, under an IP id come round: its room is free.
                Some(old) if now.saturating_sub(old.held_ns) > FRAGMENT_TIMEOUT_NS => BPF_EXIST,
                Some(_) => return false,
            };
            A::held_fragments()
                .insert(key, fragment, u64::from(flags))
                .is_ok()
        })
    });
    let Some(slot) = slot else {
        unplaced();
        let cluster_ip = maps::vip(packet.key.dst_addr_be).is_some_and(Vip::is_cluster_ip);
        return Err(if cluster_ip { TC_ACT_SHOT } else { TC_ACT_OK });
    };
    if let Some(ports) = placed_ports(&packet)
        && A::held_fragments().remove(held_key(&packet, slot)).is_ok()
    {
        packet.key.src_port_be = ports.src_port_be;
        packet.key.dst_port_be = ports.dst_port_be;
        return Ok(packet);
    }
    count(|s| &mut s.fragments_held);
    Err(TC_ACT_SHOT)
}

/// The ports `packet`'s datagram's first fragment left, if it came within the timeout.
#[inline(always)]
fn placed_ports<A: Family>(packet: &Packet<A>) -> Option<&'static FragmentPorts> {
    maps::fragment_ports(fragment_key(packet))
        .filter(|ports| now_ns().saturating_sub(ports.seen_ns) <= FRAGMENT_TIMEOUT_NS)
}

/// The skb's bytes past its Ethernet header, in this CPU's scratch room, if they fit.
#[inline(always)]
fn copy_in(ctx: &TcContext) -> Option<&'static mut HeldFragment> {
    let scratch = maps::fragment_scratch()?;
    let len = (ctx.len() as usize).checked_sub(ETH_HLEN)?;
    if len == 0 || len > HELD_FRAGMENT_BYTES {
        return None;
    }
    let room = scratch.bytes.get_mut(..len)?;
    if ctx.load_bytes(ETH_HLEN, room).ok()? != len {
        return None;
    }
    scratch.len = len as u32;
    scratch.held_ns = now_ns();
    Some(scratch)
}

/// Makes the skb `fragment`: its Ethernet header kept, the rest `fragment`'s bytes.
#[inline(always)]
fn write_over(ctx: &TcContext, fragment: &HeldFragment) -> Option<()> {
    let len = fragment.len as usize;
    if len == 0 || len > HELD_FRAGMENT_BYTES {
        return None;
    }
    // SAFETY: helper calls on the skb the kernel gave; `fragment` is a map value of
    // `HELD_FRAGMENT_BYTES` bytes, of which `len` are read.
    unsafe {
        if bpf_skb_change_tail(ctx.skb.skb.cast(), (ETH_HLEN + len) as u32, 0) != 0 {
            return None;
        }
        let flags = u64::from(BPF_F_RECOMPUTE_CSUM);
        let bytes = fragment.bytes.as_ptr().cast();
        if bpf_skb_store_bytes(
            ctx.skb.skb.cast(),
            ETH_HLEN as u32,
            bytes,
            len as u32,
            flags,
        ) != 0
        {
            return None;
        }
    }
    Some(())
}

/// What becomes of a packet tc ingress passes, rewritten or not. If it is the first fragment of
/// a datagram whose fragments wait for their first, its ports are left for the later ones
/// (again, if it was rewritten: a first that passed untouched, a datagram no service's, leaves
/// them only here), and those held already are sent on behind it: the first is cloned into
/// this interface's ingress, where it comes round again and passes on, then
/// each held fragment is written over the skb and cloned after it, and the skb itself is
/// dropped (`TC_ACT_SHOT`). Else it goes on (`TC_ACT_OK`).
#[inline(always)]
pub fn release<A: Family>(ctx: &TcContext, first: &Packet<A>) -> i32 {
    if first.piece != Piece::First || !waits_for_first(first.key.dst_addr_be) {
        return TC_ACT_OK;
    }
    remember(first);
    let waiting =
        (0..HELD_PER_DATAGRAM).any(|slot| maps::held_fragment(held_key(first, slot)).is_some());
    if !waiting {
        return TC_ACT_OK;
    }
    // SAFETY: reads a field of the skb the kernel gave.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let to_ingress = u64::from(BPF_F_INGRESS);
    if ctx.clone_redirect(ifindex, to_ingress).is_err() {
        // The held ones wait on, until the table forgets them.
        return TC_ACT_OK;
    }
    for slot in 0..HELD_PER_DATAGRAM {
        let key = held_key(first, slot);
        let Some(fragment) = maps::held_fragment(key) else {
            continue;
        };
        // Another datagram's, under an IP id come round, is forgotten, not sent.
        let current = now_ns().saturating_sub(fragment.held_ns) <= FRAGMENT_TIMEOUT_NS;
        if current && write_over(ctx, fragment).is_some() {
            let _ = ctx.clone_redirect(ifindex, to_ingress);
        }
        // Sent or not, each goes once: one that cannot be written over this skb would
        // otherwise come round again with every clone of the first.
        let _ = A::held_fragments().remove(key);
    }
    TC_ACT_SHOT
}
