//! Backend selection for a new flow: the client's affinity if it has a live one, else
//! frontend -> slot -> backend id -> backend.

use lb_common::maps::{
    ALGORITHM_SOURCE_HASH, Affinity, AffinityKey, Backend, FlowKey, Frontend, SlotKey,
};

use crate::maps::{AFFINITY, BACKENDS, CURSORS, SLOTS};

const NS_PER_SECOND: u64 = 1_000_000_000;

/// Picks a backend for a new flow to `frontend`, which has at least one backend.
#[inline(always)]
pub fn select_backend(
    frontend: &Frontend,
    key: &FlowKey,
    now: u64,
) -> Option<(u32, &'static Backend)> {
    if frontend.affinity_timeout_s == 0 {
        return pick(frontend, key);
    }
    let affinity_key = AffinityKey {
        client_addr_be: key.src_addr_be,
        service_id: frontend.service_id,
    };
    let timeout = u64::from(frontend.affinity_timeout_s) * NS_PER_SECOND;
    let sticky = unsafe { AFFINITY.get(affinity_key) }
        .filter(|a| now.saturating_sub(a.last_seen_ns) <= timeout)
        .and_then(|a| Some((a.backend_id, unsafe { BACKENDS.get(a.backend_id) }?)));
    let chosen = match sticky {
        Some(chosen) => chosen,
        None => pick(frontend, key)?,
    };
    let affinity = Affinity {
        last_seen_ns: now,
        backend_id: chosen.0,
        _pad: 0,
    };
    // Losing an affinity entry costs stickiness, not the flow.
    let _ = AFFINITY.insert(affinity_key, affinity, 0);
    Some(chosen)
}

/// The backend the frontend's algorithm picks.
#[inline(always)]
fn pick(frontend: &Frontend, key: &FlowKey) -> Option<(u32, &'static Backend)> {
    let count = u32::from(frontend.backend_count);
    let pick = if frontend.algorithm == ALGORITHM_SOURCE_HASH {
        mix32(key.src_addr_be)
    } else {
        next_round_robin(frontend.service_id)?
    };
    let slot = SlotKey {
        service_id: frontend.service_id,
        slot: pick.checked_rem(count)? + 1,
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
pub fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}
