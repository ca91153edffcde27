//! Backend selection for a new flow: the client's affinity if it has a live one, else
//! frontend -> slot -> backend id -> backend.

use lb_common::maps::{
    ALGORITHM_SOURCE_HASH, Affinity, AffinityKey, Backend, FlowKey, Frontend, SlotKey,
};

use crate::maps::{AFFINITY, BACKENDS, CURSORS, SLOTS};

const NS_PER_SECOND: u64 = 1_000_000_000;

/// Picks a backend for a new flow to `frontend`, which has at least one backend: `(slot,
/// backend id, backend)`.
#[inline(always)]
pub fn select_backend(
    frontend: &Frontend,
    key: &FlowKey,
    now: u64,
) -> Option<(u32, &'static Backend)> {
    if frontend.affinity_timeout_s == 0 {
        return pick(frontend, key).map(|(_, id, backend)| (id, backend));
    }
    let affinity_key = AffinityKey {
        client_addr_be: key.src_addr_be,
        service_id: frontend.service_id,
    };
    let timeout = u64::from(frontend.affinity_timeout_s) * NS_PER_SECOND;
    // Sticky while alive and while the service still has that backend in that slot: a backend
    // removed from this service may live on in another.
    let sticky = unsafe { AFFINITY.get(affinity_key) }
        .filter(|a| now.saturating_sub(a.last_seen_ns) <= timeout)
        .filter(|a| a.slot <= u32::from(frontend.backend_count))
        .filter(|a| slot_holds(frontend.service_id, a.slot, a.backend_id))
        .and_then(|a| Some((a.slot, a.backend_id, unsafe { BACKENDS.get(a.backend_id) }?)));
    let (slot, backend_id, backend) = match sticky {
        Some(chosen) => chosen,
        None => pick(frontend, key)?,
    };
    let affinity = Affinity {
        last_seen_ns: now,
        backend_id,
        slot,
    };
    // Losing an affinity entry costs stickiness, not the flow.
    let _ = AFFINITY.insert(affinity_key, affinity, 0);
    Some((backend_id, backend))
}

#[inline(always)]
fn slot_holds(service_id: u32, slot: u32, backend_id: u32) -> bool {
    let key = SlotKey { service_id, slot };
    unsafe { SLOTS.get(key) }.is_some_and(|s| s.backend_id == backend_id)
}

/// The backend the frontend's algorithm picks: `(slot, backend id, backend)`.
#[inline(always)]
fn pick(frontend: &Frontend, key: &FlowKey) -> Option<(u32, u32, &'static Backend)> {
    let count = u32::from(frontend.backend_count);
    let pick = if frontend.algorithm == ALGORITHM_SOURCE_HASH {
        mix32(key.src_addr_be)
    } else {
        next_round_robin(frontend.service_id)?
    };
    let slot = pick.checked_rem(count)? + 1;
    let key = SlotKey {
        service_id: frontend.service_id,
        slot,
    };
    let backend_id = unsafe { SLOTS.get(key) }?.backend_id;
    let backend = unsafe { BACKENDS.get(backend_id) }?;
    Some((slot, backend_id, backend))
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
