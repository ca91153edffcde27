//! Hashing for the datapath's choices: a backend by source hash, a first SNAT port to try.

/// murmur3's finaliser: spreads close addresses over the slots.
#[inline(always)]
pub fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}
