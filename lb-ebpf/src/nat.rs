//! Address and port rewrites with incremental checksum updates, of either family
//! ([`Family`] knows where the addresses lie and which checksums hold them).
//!
//! tc uses the kernel's checksum helpers, which also keep `CHECKSUM_PARTIAL` and
//! `CHECKSUM_COMPLETE` skbs right (a tc program sees locally generated traffic). XDP sees only
//! the frame, whose checksums are complete on a wire: it updates them itself (RFC 1624).

use aya_ebpf::{
    bindings::BPF_F_MARK_MANGLED_0,
    programs::{TcContext, XdpContext},
};

use crate::{
    family::Family,
    parse::{Packet, Piece, ptr_at},
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Source,
    Destination,
}

impl End {
    /// `(address offset, old address, port offset, old port)` of this end of `packet`.
    fn fields<A: Family>(self, packet: &Packet<A>) -> (usize, A, usize, u16) {
        match self {
            Self::Source => (
                A::SRC_ADDR_OFFSET,
                packet.key.src_addr_be,
                packet.src_port_offset(),
                packet.key.src_port_be,
            ),
            Self::Destination => (
                A::DST_ADDR_OFFSET,
                packet.key.dst_addr_be,
                packet.dst_port_offset(),
                packet.key.dst_port_be,
            ),
        }
    }
}

/// A program context that can rewrite the packet it holds.
pub trait Rewrite {
    /// Rewrites one end of `packet` (as parsed, before any rewrite) to `addr_be:port_be`. A
    /// later fragment has no TCP or UDP header: its address alone changes (the first
    /// fragment's checksum covers the whole datagram, its addresses included).
    fn rewrite<A: Family>(
        &self,
        packet: &Packet<A>,
        end: End,
        addr_be: A,
        port_be: u16,
    ) -> Result<(), ()>;
}

impl Rewrite for TcContext {
    #[inline(always)]
    fn rewrite<A: Family>(
        &self,
        packet: &Packet<A>,
        end: End,
        addr_be: A,
        port_be: u16,
    ) -> Result<(), ()> {
        let (addr_offset, old_addr_be, port_offset, old_port_be) = end.fields(packet);
        let (data, data_end) = (self.data(), self.data_end());
        // The IPv4 header checksum is always complete, and the addresses and ports are plain
        // bytes: direct writes. Only the L4 checksum goes through the helpers, which know
        // whether the skb holds a complete sum or a CHECKSUM_PARTIAL pseudo-header seed, and
        // so does a complete sum that an IPv6 address alone moves (a later fragment's).
        if old_addr_be != addr_be {
            A::write_addr(data, data_end, addr_offset, old_addr_be, addr_be)?;
        }
        if packet.piece == Piece::Later {
            if old_addr_be != addr_be {
                A::tc_address_alone(self, old_addr_be, addr_be)?;
            }
            return Ok(());
        }
        if old_port_be != port_be {
            let port = ptr_at::<u16>(data, data_end, port_offset).ok_or(())?;
            // SAFETY: bounds-checked against the packet just above.
            unsafe { *port.cast_mut() = port_be };
        }
        // UDP's checksum 0 means "none": the helper must leave it so, and never produce it.
        let l4_flags = if packet.is_udp() {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
        let l4_checksum = packet.l4_checksum_offset();
        if old_addr_be != addr_be {
            A::tc_l4_address(self, l4_checksum, old_addr_be, addr_be, l4_flags)?;
        }
        if old_port_be != port_be {
            let (old, new) = (u64::from(old_port_be), u64::from(port_be));
            self.l4_csum_replace(l4_checksum, old, new, l4_flags | 2)
                .map_err(drop)?;
        }
        Ok(())
    }
}

impl Rewrite for XdpContext {
    #[inline(always)]
    fn rewrite<A: Family>(
        &self,
        packet: &Packet<A>,
        end: End,
        addr_be: A,
        port_be: u16,
    ) -> Result<(), ()> {
        let (addr_offset, old_addr_be, port_offset, old_port_be) = end.fields(packet);
        let (data, data_end) = (self.data(), self.data_end());
        if old_addr_be != addr_be {
            A::write_addr(data, data_end, addr_offset, old_addr_be, addr_be)?;
        }
        if packet.piece == Piece::Later {
            return Ok(());
        }
        let l4_checksum = ptr_at::<u16>(data, data_end, packet.l4_checksum_offset()).ok_or(())?;
        let port = ptr_at::<u16>(data, data_end, port_offset).ok_or(())?;
        // SAFETY: each pointer was bounds-checked against the frame above.
        unsafe {
            let l4_checksum = l4_checksum.cast_mut();
            // UDP's checksum 0 means "none": leave it so.
            let l4_summed = !packet.is_udp() || *l4_checksum != 0;
            let mut l4 = *l4_checksum;
            if old_addr_be != addr_be {
                l4 = A::checksum_update(l4, old_addr_be, addr_be);
            }
            if old_port_be != port_be {
                l4 = checksum_update(l4, u32::from(old_port_be), u32::from(port_be));
                *port.cast_mut() = port_be;
            }
            if l4_summed {
                // A UDP checksum that comes out 0 is sent as all ones.
                *l4_checksum = if packet.is_udp() && l4 == 0 {
                    0xffff
                } else {
                    l4
                };
            }
        }
        Ok(())
    }
}

/// RFC 1624: `HC' = ~(~HC + ~m + m')`, over the 16-bit words of `old` and `new` as they lie in
/// the packet (the sum does not depend on byte order).
#[inline(always)]
pub fn checksum_update(checksum: u16, old: u32, new: u32) -> u16 {
    let mut sum = u32::from(!checksum);
    sum += u32::from(!(old as u16)) + u32::from(!((old >> 16) as u16));
    sum += (new & 0xffff) + (new >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
