//! Addresses between the agent's `std::net` types and the datapath's network-order words.

use core::net::{Ipv4Addr, Ipv6Addr};

use crate::maps::Ipv6Be;

/// `address` as the datapath holds it: its bytes in packet order in one word.
pub fn ipv4_be(address: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(address.octets())
}

pub fn ipv4_from_be(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_be.to_ne_bytes())
}

/// `address` as the datapath holds it: its bytes in packet order in four words.
pub fn ipv6_be(address: Ipv6Addr) -> Ipv6Be {
    let octets = address.octets();
    core::array::from_fn(|word| {
        u32::from_ne_bytes([
            octets[word * 4],
            octets[word * 4 + 1],
            octets[word * 4 + 2],
            octets[word * 4 + 3],
        ])
    })
}

pub fn ipv6_from_be(addr_be: Ipv6Be) -> Ipv6Addr {
    let mut octets = [0; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(addr_be) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Ipv6Addr::from(octets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_in_packet_order() {
        let v4 = Ipv4Addr::new(10, 96, 0, 10);
        assert_eq!(ipv4_be(v4).to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(ipv4_be(v4), u32::from(v4).to_be());
        assert_eq!(ipv4_from_be(ipv4_be(v4)), v4);
        let v6: Ipv6Addr = "fd00::10:96:0:10".parse().unwrap();
        let words = ipv6_be(v6);
        assert_eq!(words[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
        assert_eq!(words[2].to_ne_bytes(), [0, 0x10, 0, 0x96]);
        assert_eq!(ipv6_from_be(words), v6);
    }
}
