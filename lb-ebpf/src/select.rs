//! Backend selection for a new flow: the client's affinity if it has a live one, else
//! frontend -> slot -> backend id -> backend.

use lb_common::maps::{ALGORITHM_ROUND_ROBIN, Affinity, AffinityKey, Backend, FlowKey, Frontend};

use crate::{family::Family, hash::mix32, maps};

const NS_PER_SECOND: u64 = 1_000_000_000;

/// Picks a backend for a new flow to `frontend`, which has at least one backend: `(slot,
/// backend id, backend)`.
#[inline(always)]
pub fn select_backend<A: Family>(
    frontend: &Frontend,
    key: &FlowKey<A>,
    now: u64,
) -> Option<(u32, &'static Backend<A>)> {
    if frontend.affinity_timeout_s == 0 {
        return pick(frontend, key).map(|(_, id, backend)| (id, backend));
    }
    // Per Service port, across its frontends, as kube-proxy keys affinity.
    let affinity_key = AffinityKey {
        client_addr_be: key.src_addr_be,
        affinity_id: if frontend.affinity_id == 0 {
            frontend.service_id
        } else {
            frontend.affinity_id
        },
    };
    let timeout = u64::from(frontend.affinity_timeout_s) * NS_PER_SECOND;
    // Sticky while alive and while the service still has that backend in that slot: a backend
    // removed from this service may live on in another.
    let sticky = maps::affinity(affinity_key)
        .filter(|a| now.saturating_sub(a.last_seen_ns) <= timeout)
        .and_then(|a| Some((slot_of(frontend, a.backend_id, a.slot)?, a.backend_id)))
        .and_then(|(slot, id)| Some((slot, id, maps::backend(id)?)));
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
    let _ = A::affinities().insert(affinity_key, affinity, 0);
    Some((backend_id, backend))
}

/// How many of a frontend's slots are looked through for a client's affinity backend when the
/// slot it was given in (by another frontend of its Service port) holds another: a frontend's
/// slots follow its own backends (an `externalTrafficPolicy: Local` one has only the node's), or
/// its own Maglev table, where a backend holds one position in N.
const AFFINITY_SCAN: u32 = 32;

/// The slot of `frontend` that holds `backend_id`: `hint` if it does, else the first of the
/// first [`AFFINITY_SCAN`] that does. A backend removed from the Service is in none.
#[inline(always)]
fn slot_of(frontend: &Frontend, backend_id: u32, hint: u32) -> Option<u32> {
    let count = u32::from(frontend.backend_count);
    if hint <= count && maps::slot(frontend.service_id, hint) == Some(backend_id) {
        return Some(hint);
    }
    (1..=AFFINITY_SCAN)
        .take_while(|&slot| slot <= count)
        .find(|&slot| maps::slot(frontend.service_id, slot) == Some(backend_id))
}

/// The backend the frontend's algorithm picks: `(slot, backend id, backend)`. Source hash and
/// Maglev pick the same way, by a hash of the client's address: their slots differ (the backends,
/// or the Maglev table the agent built from them).
#[inline(always)]
fn pick<A: Family>(
    frontend: &Frontend,
    key: &FlowKey<A>,
) -> Option<(u32, u32, &'static Backend<A>)> {
    let count = u32::from(frontend.backend_count);
    let pick = if frontend.algorithm == ALGORITHM_ROUND_ROBIN {
        // Each CPU turns its own cursor: fair in aggregate, no shared cache line, no lost
        // update.
        maps::next_cursor(frontend.service_id)?
    } else {
        mix32(key.src_addr_be.folded())
    };
    let slot = pick.checked_rem(count)? + 1;
    let backend_id = maps::slot(frontend.service_id, slot)?;
    let backend = maps::backend(backend_id)?;
    Some((slot, backend_id, backend))
}
