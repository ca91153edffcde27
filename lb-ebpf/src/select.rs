//! Backend selection for a new flow: the client's affinity if it has a live one, else
//! frontend -> slot (a Maglev frontend's: a position of its table) -> backend id -> backend.

use lb_common::maps::{
    ALGORITHM_MAGLEV, ALGORITHM_ROUND_ROBIN, Affinity, AffinityKey, Backend, FRONTEND_HASH_PORT,
    FlowKey, Frontend, NO_BACKEND_OVERHEAD, counts_flows, inactive_mask, least_loaded, zero_mask,
};

use crate::{family::Family, hash::mix32, maps};

const NS_PER_SECOND: u64 = 1_000_000_000;

/// Picks a backend for a new flow to `frontend`, which has at least one backend: `(backend
/// id, backend)`. `counted`: the caller counts the flow in its backend's load, as tc and XDP
/// do; the node's own sockets, which no flow entry tracks to its close, do not, and a
/// least-connection frontend gives them its backends in turn.
#[inline(always)]
pub fn select_backend<A: Family>(
    frontend: &Frontend,
    key: &FlowKey<A>,
    now: u64,
    counted: bool,
) -> Option<(u32, &'static Backend<A>)> {
    if frontend.affinity_timeout_s == 0 {
        return pick(frontend, key, counted).map(|(_, id, backend)| (id, backend));
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
        None => pick(frontend, key, counted)?,
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
    let holds = |slot| {
        slot_backend(
            frontend.service_id,
            u32::from(frontend.algorithm),
            frontend.table_offset,
            slot,
        ) == backend_id
    };
    if hint <= count && holds(hint) {
        return Some(hint);
    }
    (1..=AFFINITY_SCAN)
        .take_while(|&slot| slot <= count)
        .find(|&slot| holds(slot))
}

/// The backend the frontend's algorithm picks: `(slot, backend id, backend)`. Source hash and
/// Maglev pick the same way, by a hash of the client's address: their slots differ (the backends,
/// or the Maglev table the agent built from them).
#[inline(always)]
fn pick<A: Family>(
    frontend: &Frontend,
    key: &FlowKey<A>,
    counted: bool,
) -> Option<(u32, u32, &'static Backend<A>)> {
    // Both inputs, whichever the algorithm takes: a cursor's turn is an inlined lookup and
    // an add, and a branch here would split the verifier's paths after it.
    let cursor = maps::next_cursor(frontend.service_id)?;
    let slot = choose_slot(
        frontend.table_offset,
        u32::from(frontend.algorithm) | if counted { COUNTED } else { 0 },
        u32::from(frontend.backend_count),
        cursor,
        source_hash(frontend, key),
    );
    // Slot 0 and backend id 0 are never used: none chosen.
    let slot = Some(slot).filter(|&slot| slot != 0)?;
    let backend_id = slot_backend(
        frontend.service_id,
        u32::from(frontend.algorithm),
        frontend.table_offset,
        slot,
    );
    let backend = maps::backend(Some(backend_id).filter(|&id| id != 0)?)?;
    Some((slot, backend_id, backend))
}

/// The hash of the client that source hash and Maglev pick by: of its address (the words of an
/// IPv6 one folded into one by exclusive or), and with [`FRONTEND_HASH_PORT`] of its port too,
/// as it lies in the packet, by exclusive or before the mix.
#[inline(always)]
fn source_hash<A: Family>(frontend: &Frontend, key: &FlowKey<A>) -> u32 {
    // Without a branch: the flag's bit becomes a mask of the port.
    let with_port = u32::from(frontend.flags & FRONTEND_HASH_PORT != 0);
    let port = u32::from(key.src_port_be) & 0u32.wrapping_sub(with_port);
    mix32(key.src_addr_be.folded() ^ port)
}

/// In [`choose_slot`]'s `algorithm`: the flow is counted in its backend's load.
const COUNTED: u32 = 1 << 8;

/// The slot, of its `count`, that a frontend's `algorithm` gives a new flow, from
/// `cursor`, this CPU's round-robin cursor of the frontend, which turned for it, and
/// `source_hash`, its client's; 0 for none. Round robin takes the cursor: fair in aggregate, no
/// shared cache line, no lost update. Source hash and Maglev take the hash. Least connection
/// and its kin start a scan of the backends' loads at the cursor, so that equals take turns
/// ([`least_loaded`]), for a flow [`COUNTED`]; the node's sockets, whose flows no load counts,
/// get round robin.
///
/// A global function, as [`slot_backend`]: the verifier walks it once, for any arguments, not
/// once in every program and path that makes a flow, and what it returns is one value to them,
/// whichever the algorithm, so that their paths after it prune. Its frame sits on the deepest
/// of the programs' stacks (the IPv6 halves'), where 32 bytes are left: the scan keeps few
/// values, and weighs a backend by arithmetic alone
/// ([`BackendLoad::weighed`](lb_common::maps::BackendLoad::weighed)).
// SAFETY (no_mangle, here and below): no other symbol of the object has the name.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn choose_slot(
    table_offset: u32,
    algorithm: u32,
    count: u32,
    cursor: u32,
    source_hash: u32,
) -> u32 {
    let counted = algorithm & COUNTED != 0;
    let algorithm = algorithm as u8;
    let by_load = counts_flows(algorithm);
    let pick = if algorithm == ALGORITHM_ROUND_ROBIN || by_load {
        cursor
    } else {
        source_hash
    };
    let Some(start) = pick.checked_rem(count) else {
        return 0;
    };
    if !(by_load && counted) {
        return start + 1;
    }
    let inactive = inactive_mask(algorithm);
    least_loaded(count, start, |slot| {
        // Slots from 1. An empty position holds id 0: its load (index 0 of the array, which
        // may hold another id's counts) is read and then outweighed, by a mask rather than a
        // branch.
        let id = maps::table_entry(table_position(table_offset, slot))?;
        let load = maps::backend_load(id)?;
        Some(load.weighed(inactive) | (NO_BACKEND_OVERHEAD & zero_mask(u64::from(id))))
    })
}

/// The backend id in slot `slot` of frontend `service_id` of `algorithm`: of a Maglev or
/// least-connection family frontend, position `slot - 1` of its table, from `table_offset` in
/// `lb_slot_tables`; else its slot in `lb_slots`. 0 for none.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn slot_backend(
    service_id: u32,
    algorithm: u32,
    table_offset: u32,
    slot: u32,
) -> u32 {
    let algorithm = algorithm as u8;
    let found = if algorithm == ALGORITHM_MAGLEV || counts_flows(algorithm) {
        table_slot(table_offset, slot)
    } else {
        maps::slot(service_id, slot)
    };
    found.unwrap_or(0)
}

/// The backend id in slot `slot`, from 1, of the table at `table_offset`.
#[inline(always)]
fn table_slot(table_offset: u32, slot: u32) -> Option<u32> {
    if slot == 0 {
        return None;
    }
    maps::table_position(table_position(table_offset, slot))
}

/// Where slot `slot` (from 1, not 0) of the table at `table_offset` lies in `lb_slot_tables`.
#[inline(always)]
fn table_position(table_offset: u32, slot: u32) -> u32 {
    table_offset.wrapping_add(slot.wrapping_sub(1))
}
