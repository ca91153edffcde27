//! Backend selection for a new flow: frontend -> slot -> backend id -> backend.

use lb_common::maps::{ALGORITHM_SOURCE_HASH, Backend, FlowKey, Frontend, SlotKey};

use crate::maps::{BACKENDS, CURSORS, SLOTS};

/// Picks a backend for a new flow to `frontend`, which has at least one backend.
#[inline(always)]
pub fn select_backend(frontend: &Frontend, key: &FlowKey) -> Option<(u32, &'static Backend)> {
    let count = u32::from(frontend.backend_count);
    let pick = if frontend.algorithm == ALGORITHM_SOURCE_HASH {
        mix32(key.src_addr_be)
    } else {
        next_round_robin(frontend.service_id)?
    };
    let slot = SlotKey {
        service_id: frontend.service_id,
        slot: pick % count + 1,
    };
    let backend_id = unsafe { SLOTS.get(slot) }?.backend_id;
    let backend = unsafe { BACKENDS.get(backend_id) }?;
    Some((backend_id, backend))
}

/// Each CPU turns its own cursor: fair in aggregate, no shared cache line, no lost update.
#[inline(always)]
fn next_round_robin(service_id: u32) -> Option<u32> {
    let cursor = CURSORS.get_ptr_mut(service_id)?;
    unsafe {
        let current = *cursor;
        *cursor = current.wrapping_add(1);
        Some(current)
    }
}

/// murmur3's finaliser: spreads close addresses over the slots.
#[inline(always)]
fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}
