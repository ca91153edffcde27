//! Address and port rewrites with incremental checksum updates. The kernel's checksum helpers
//! are used (not hand-written arithmetic) because they also handle `CHECKSUM_PARTIAL` and
//! `CHECKSUM_COMPLETE` skbs, which a tc program sees for locally generated traffic.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use crate::parse::Packet;

/// Which end of the packet to rewrite.
pub enum End {
    Source,
    Destination,
}

/// Rewrites one end of `packet` to `addr_be:port_be`.
#[inline(always)]
pub fn rewrite(
    ctx: &TcContext,
    packet: &Packet,
    end: End,
    addr_be: u32,
    port_be: u16,
) -> Result<(), i64> {
    let (addr_offset, old_addr_be, port_offset, old_port_be) = match end {
        End::Source => (
            Packet::SRC_ADDR_OFFSET,
            packet.key.src_addr_be,
            packet.src_port_offset(),
            packet.key.src_port_be,
        ),
        End::Destination => (
            Packet::DST_ADDR_OFFSET,
            packet.key.dst_addr_be,
            packet.dst_port_offset(),
            packet.key.dst_port_be,
        ),
    };
    // UDP's checksum 0 means "none": the helper must leave it so, and never produce it.
    let l4_flags = if packet.is_udp() {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let l4_checksum = packet.l4_checksum_offset();
    if old_addr_be != addr_be {
        ctx.l4_csum_replace(
            l4_checksum,
            u64::from(old_addr_be),
            u64::from(addr_be),
            l4_flags | u64::from(BPF_F_PSEUDO_HDR) | 4,
        )?;
        ctx.l3_csum_replace(
            Packet::IP_CHECKSUM_OFFSET,
            u64::from(old_addr_be),
            u64::from(addr_be),
            4,
        )?;
        ctx.store(addr_offset, &addr_be, 0)?;
    }
    if old_port_be != port_be {
        ctx.l4_csum_replace(
            l4_checksum,
            u64::from(old_port_be),
            u64::from(port_be),
            l4_flags | 2,
        )?;
        ctx.store(port_offset, &port_be, 0)?;
    }
    Ok(())
}
