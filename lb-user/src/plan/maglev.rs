//! Maglev's lookup table (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, section 3.4): a table of a prime number of positions, each naming a
//! backend, filled from the backend set alone. Every node builds the same table from the same
//! backends, whatever order they were listed in, so that one flow's packets reach one backend
//! through any node; and a backend added or removed moves few positions of the others.
//!
//! Each backend has a permutation of the positions, from two hashes of its name (its address
//! and port): an offset and a skip. The backends, in the order of their names, take turns
//! claiming the next free position of their own permutation until every position is taken.

use std::net::{IpAddr, SocketAddr};

/// The table's sizes a node may choose (`--maglev-table-size`): primes, the largest the datapath's
/// 16-bit slot count holds.
pub const MAX_TABLE_SIZE: u32 = 65_521;

/// The table for `backends` (each a name, and what a position holds for it: a backend id),
/// of `size` positions ([`is_table_size`]: a composite size would leave a backend's turns
/// short of the free positions, for ever). Empty without backends.
pub fn table<T: Copy>(backends: &[(SocketAddr, T)], size: u32) -> Vec<T> {
    assert!(
        is_table_size(size),
        "{size} positions: no Maglev table size"
    );
    let mut backends = backends.to_vec();
    backends.sort_by_key(|(name, _)| *name);
    backends.dedup_by_key(|(name, _)| *name);
    if backends.is_empty() {
        return Vec::new();
    }
    let size_u64 = u64::from(size);
    // (offset, skip, next turn) of each backend.
    let mut turns: Vec<(u64, u64, u64)> = backends
        .iter()
        .map(|(name, _)| {
            let name = name_bytes(*name);
            let offset = hash(&name, OFFSET_SEED) % size_u64;
            let skip = hash(&name, SKIP_SEED) % (size_u64 - 1).max(1) + 1;
            (offset, skip, 0)
        })
        .collect();
    let mut entries: Vec<Option<T>> = vec![None; size as usize];
    let mut filled = 0;
    while filled < entries.len() {
        for ((offset, skip, next), (_, value)) in turns.iter_mut().zip(&backends) {
            // The backend's next position still free; one is, as the table is not full.
            let position = loop {
                let position = ((*offset + *next * *skip) % size_u64) as usize;
                *next += 1;
                if entries[position].is_none() {
                    break position;
                }
            };
            entries[position] = Some(*value);
            filled += 1;
            if filled == entries.len() {
                break;
            }
        }
    }
    entries.into_iter().flatten().collect()
}

/// Whether `size` may be a table's: a prime, from 2 up to [`MAX_TABLE_SIZE`].
pub fn is_table_size(size: u32) -> bool {
    // Trial division up to the square root: 256 divisors at most.
    (2..=MAX_TABLE_SIZE).contains(&size)
        && (2..=size.isqrt()).all(|divisor| !size.is_multiple_of(divisor))
}

/// A backend's name as hashed: its address's bytes, then its port's, in network order.
fn name_bytes(name: SocketAddr) -> Vec<u8> {
    let mut bytes = match name.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    bytes.extend(name.port().to_be_bytes());
    bytes
}

const OFFSET_SEED: u64 = 0x6d61_676c_6576_3031;
const SKIP_SEED: u64 = 0x6d61_676c_6576_3032;

/// FNV-1a over `bytes` from `seed`, then `SplitMix64`'s finaliser: written out, not a library's,
/// so that agents of any build, on any node, make the same table.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &byte in bytes {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const SIZE: u32 = 16_381;
    /// The table of [`the_table_is_the_one_every_release_makes`], as this release makes it.
    const PINNED: &str = "bcabacaaabccb";

    fn backends(n: u8) -> Vec<(SocketAddr, u32)> {
        (1..=n)
            .map(|i| (SocketAddr::from(([10, 244, 0, i], 8080)), u32::from(i)))
            .collect()
    }

    /// How many positions each backend holds.
    fn shares(table: &[u32]) -> BTreeMap<u32, usize> {
        let mut shares = BTreeMap::new();
        for id in table {
            *shares.entry(*id).or_default() += 1;
        }
        shares
    }

    /// The share of `before`'s positions not on `gone` that name another backend in `after`.
    fn moved(before: &[u32], after: &[u32], gone: Option<u32>) -> f64 {
        let kept: Vec<(u32, u32)> = before
            .iter()
            .zip(after)
            .filter(|(b, _)| Some(**b) != gone)
            .map(|(b, a)| (*b, *a))
            .collect();
        let changed = kept.iter().filter(|(b, a)| b != a).count();
        changed as f64 / kept.len() as f64
    }

    #[test]
    fn the_same_backends_make_the_same_table_whatever_their_order() {
        let listed = backends(7);
        let mut reversed = listed.clone();
        reversed.reverse();
        let mut shuffled = listed.clone();
        shuffled.rotate_left(3);
        let table = table(&listed, SIZE);
        assert_eq!(table.len(), SIZE as usize);
        assert_eq!(super::table(&reversed, SIZE), table);
        assert_eq!(super::table(&shuffled, SIZE), table);
        // A backend named twice is one.
        let doubled = [listed.clone(), listed[..2].to_vec()].concat();
        assert_eq!(super::table(&doubled, SIZE), table);
    }

    #[test]
    fn every_backend_holds_an_even_share() {
        for n in [1, 2, 3, 10, 100, 160] {
            let table = table(&backends(n), SIZE);
            let shares = shares(&table);
            assert_eq!(shares.len(), usize::from(n), "{n} backends");
            let even = f64::from(SIZE) / f64::from(n);
            for (id, share) in shares {
                // Turns are taken in rounds: each holds the floor or the ceiling of an even share.
                assert!(
                    (share as f64 - even).abs() <= 1.0,
                    "{n} backends: {id} holds {share} of {SIZE}, an even share is {even:.1}"
                );
            }
        }
        assert!(table::<u32>(&[], SIZE).is_empty());
    }

    #[test]
    fn removing_a_backend_moves_few_of_the_others_positions() {
        for n in [3, 5, 10, 50, 100] {
            let all = backends(n);
            let before = table(&all, SIZE);
            for gone in 0..usize::from(n) {
                let rest: Vec<_> = all.iter().copied().filter(|b| b != &all[gone]).collect();
                let after = table(&rest, SIZE);
                let share = moved(&before, &after, Some(all[gone].1));
                let bound = 1.0 / f64::from(n) + 0.02;
                assert!(
                    share <= bound,
                    "{n} backends, {} removed: {:.2}% of the others' positions moved, over {:.2}%",
                    all[gone].0,
                    share * 100.0,
                    bound * 100.0
                );
            }
        }
    }

    #[test]
    fn adding_a_backend_moves_about_its_share_nearly_all_to_it() {
        for n in [3, 5, 10, 50, 100] {
            let all = backends(n + 1);
            let before = table(&all[..usize::from(n)], SIZE);
            let after = table(&all, SIZE);
            let new_id = all[usize::from(n)].1;
            let changed: Vec<usize> = (0..before.len())
                .filter(|&p| before[p] != after[p])
                .collect();
            let share = changed.len() as f64 / before.len() as f64;
            let even = 1.0 / f64::from(n + 1);
            assert!(
                share <= even + 0.02,
                "{n} + 1 backends: {:.2}% of the positions moved, an even share is {:.2}%",
                share * 100.0,
                even * 100.0
            );
            let to_new = changed.iter().filter(|&&p| after[p] == new_id).count();
            // Nearly all while the table is large beside the backends (M / N over 1,000); fewer
            // as it shrinks, as the paper's measurements show: at 16,381 positions, 67% of the
            // moved ones for 50 backends, 39% for 100 (65,521 positions: 81% and 63%).
            if n <= 10 {
                assert!(
                    to_new as f64 >= 0.9 * changed.len() as f64,
                    "{n} + 1 backends: {to_new} of the {} moved positions went to the new one",
                    changed.len()
                );
            }
        }
    }

    /// Agents of two releases on two nodes must make the same table: a change to the hash, the
    /// seeds or the turns shows here first.
    #[test]
    fn the_table_is_the_one_every_release_makes() {
        let named = [
            (SocketAddr::from(([10, 244, 0, 11], 8080)), 'a'),
            (SocketAddr::from(([10, 244, 0, 12], 8080)), 'b'),
            ("[fd00::10:244:0:13]:8080".parse().unwrap(), 'c'),
        ];
        let table: String = table(&named, 13).into_iter().collect();
        assert_eq!(table, PINNED);
    }

    #[test]
    fn table_sizes_are_primes_a_slot_count_holds() {
        let sizes: Vec<u32> = (0..40).filter(|&n| is_table_size(n)).collect();
        assert_eq!(sizes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
        assert!(is_table_size(16_381));
        assert!(is_table_size(MAX_TABLE_SIZE));
        assert!(!is_table_size(16_383));
        assert!(!is_table_size(65_537));
    }
}
