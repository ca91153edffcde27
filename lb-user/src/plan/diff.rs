//! The operations that turn one [`MapEntries`] into another, ordered so that the datapath never
//! reads a slot past a frontend's count or a backend id that is not written yet: backends, then
//! slots and tables of slots, then source ranges, then frontends, then service addresses (which drop ports without
//! a frontend); removals the other way round. A frontend's source ranges go in before its
//! catch-all and out after it, so that no source is refused that either state allows.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::maps::{
    BACKENDS, BACKENDS6, FRONTENDS, FRONTENDS6, Frontend, SLOT_TABLES, SLOTS, SOURCE_RANGES,
    SOURCE_RANGES6, Slot, SlotKey, SourceRange, VIPS, VIPS6, Vip,
};

use super::{Backend, FrontendKey, MapEntries, RangeKey};
use crate::model::Family;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    PutSlot(SlotKey, Slot),
    /// A table of slots: its first position in `SLOT_TABLES`, and the backend id of each.
    PutTable(u32, Arc<[u32]>),
    PutSourceRange(RangeKey, SourceRange),
    PutFrontend(FrontendKey, Frontend),
    PutVip(IpAddr, Vip),
    DeleteVip(IpAddr),
    DeleteFrontend(FrontendKey),
    DeleteSourceRange(RangeKey),
    DeleteSlot(SlotKey),
    /// A table no frontend reads any more, by its first position.
    DeleteTable(u32),
    /// A backend id, of the family whose map holds it.
    DeleteBackend(u32, Family),
}

impl Op {
    /// The name of the map it writes.
    pub fn map(&self) -> &'static str {
        let by_family = |ip: &IpAddr, v4, v6| if ip.is_ipv4() { v4 } else { v6 };
        match self {
            Self::PutBackend(_, backend) => by_family(&backend.address, BACKENDS, BACKENDS6),
            Self::DeleteBackend(_, Family::V4) => BACKENDS,
            Self::DeleteBackend(_, Family::V6) => BACKENDS6,
            Self::PutSlot(..) | Self::DeleteSlot(_) => SLOTS,
            Self::PutTable(..) | Self::DeleteTable(_) => SLOT_TABLES,
            Self::PutFrontend(key, _) | Self::DeleteFrontend(key) => {
                by_family(&key.address, FRONTENDS, FRONTENDS6)
            }
            Self::PutVip(address, _) | Self::DeleteVip(address) => by_family(address, VIPS, VIPS6),
            Self::PutSourceRange(key, _) | Self::DeleteSourceRange(key) => {
                by_family(&key.address, SOURCE_RANGES, SOURCE_RANGES6)
            }
        }
    }
}

/// The keys a [`super::Planner`] update may have changed, of each map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touched {
    pub frontends: BTreeSet<FrontendKey>,
    pub slots: BTreeSet<SlotKey>,
    /// Tables of slots, by first position.
    pub tables: BTreeSet<u32>,
    pub backends: BTreeSet<u32>,
    pub vips: BTreeSet<IpAddr>,
    pub source_ranges: BTreeSet<RangeKey>,
}

impl Touched {
    /// Every key either side holds.
    pub fn all(current: &MapEntries, desired: &MapEntries) -> Self {
        fn keys<K: Ord + Copy, V>(a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) -> BTreeSet<K> {
            a.keys().chain(b.keys()).copied().collect()
        }
        Self {
            frontends: keys(&current.frontends, &desired.frontends),
            slots: keys(&current.slots, &desired.slots),
            tables: keys(&current.tables, &desired.tables),
            backends: keys(&current.backends, &desired.backends),
            vips: keys(&current.vips, &desired.vips),
            source_ranges: keys(&current.source_ranges, &desired.source_ranges),
        }
    }
}

/// Only what differs is written.
pub fn diff(current: &MapEntries, desired: &MapEntries) -> Vec<Op> {
    diff_touched(current, desired, &Touched::all(current, desired))
}

/// What differs among the `touched` keys.
pub fn diff_touched(current: &MapEntries, desired: &MapEntries, touched: &Touched) -> Vec<Op> {
    let mut ops = Vec::new();
    puts(
        &current.backends,
        &desired.backends,
        &touched.backends,
        Op::PutBackend,
        &mut ops,
    );
    puts(
        &current.slots,
        &desired.slots,
        &touched.slots,
        Op::PutSlot,
        &mut ops,
    );
    puts(
        &current.tables,
        &desired.tables,
        &touched.tables,
        Op::PutTable,
        &mut ops,
    );
    // A frontend's catch-all sorts first: in last.
    puts(
        &current.source_ranges,
        &desired.source_ranges,
        touched.source_ranges.iter().rev(),
        Op::PutSourceRange,
        &mut ops,
    );
    puts(
        &current.frontends,
        &desired.frontends,
        &touched.frontends,
        Op::PutFrontend,
        &mut ops,
    );
    puts(
        &current.vips,
        &desired.vips,
        &touched.vips,
        Op::PutVip,
        &mut ops,
    );
    deletes(
        &current.vips,
        &desired.vips,
        &touched.vips,
        |address, _| Op::DeleteVip(address),
        &mut ops,
    );
    deletes(
        &current.frontends,
        &desired.frontends,
        &touched.frontends,
        |key, _| Op::DeleteFrontend(key),
        &mut ops,
    );
    deletes(
        &current.source_ranges,
        &desired.source_ranges,
        &touched.source_ranges,
        |key, _| Op::DeleteSourceRange(key),
        &mut ops,
    );
    deletes(
        &current.slots,
        &desired.slots,
        &touched.slots,
        |key, _| Op::DeleteSlot(key),
        &mut ops,
    );
    deletes(
        &current.tables,
        &desired.tables,
        &touched.tables,
        |offset, _| Op::DeleteTable(offset),
        &mut ops,
    );
    deletes(
        &current.backends,
        &desired.backends,
        &touched.backends,
        |id, backend| Op::DeleteBackend(id, Family::of(backend.address)),
        &mut ops,
    );
    ops
}

fn puts<'k, K: Ord + Copy + 'k, V: PartialEq + Clone>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    keys: impl IntoIterator<Item = &'k K>,
    op: fn(K, V) -> Op,
    ops: &mut Vec<Op>,
) {
    for key in keys {
        if let Some(value) = desired.get(key)
            && current.get(key) != Some(value)
        {
            ops.push(op(*key, value.clone()));
        }
    }
}

fn deletes<K: Ord + Copy, V>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    keys: &BTreeSet<K>,
    op: fn(K, &V) -> Op,
    ops: &mut Vec<Op>,
) {
    for key in keys {
        if let Some(value) = current.get(key)
            && !desired.contains_key(key)
        {
            ops.push(op(*key, value));
        }
    }
}

impl MapEntries {
    /// Applies one operation, as the kernel maps would.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::PutTable(offset, ref table) => {
                self.tables.insert(offset, Arc::clone(table));
            }
            Op::DeleteTable(offset) => {
                self.tables.remove(&offset);
            }
            Op::PutBackend(id, backend) => {
                self.backends.insert(id, backend);
            }
            Op::PutSlot(key, slot) => {
                self.slots.insert(key, slot);
            }
            Op::PutFrontend(key, frontend) => {
                self.frontends.insert(key, frontend);
            }
            Op::PutVip(addr, vip) => {
                self.vips.insert(addr, vip);
            }
            Op::PutSourceRange(key, range) => {
                self.source_ranges.insert(key, range);
            }
            Op::DeleteSourceRange(key) => {
                self.source_ranges.remove(&key);
            }
            Op::DeleteVip(addr) => {
                self.vips.remove(&addr);
            }
            Op::DeleteFrontend(key) => {
                self.frontends.remove(&key);
            }
            Op::DeleteSlot(key) => {
                self.slots.remove(&key);
            }
            Op::DeleteBackend(id, _) => {
                self.backends.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> FrontendKey {
        FrontendKey {
            address: std::net::Ipv4Addr::new(10, 96, 0, 10).into(),
            port: 80,
            protocol: lb_common::maps::PROTO_TCP,
            scope: lb_common::maps::SCOPE_INTERNAL,
        }
    }

    fn backend(id: u32) -> Backend {
        Backend {
            address: std::net::Ipv4Addr::new(10, 244, 0, 10).into(),
            port: u16::try_from(id).unwrap(),
            protocol: lb_common::maps::PROTO_TCP,
            flags: 0,
        }
    }

    fn entries(count: u16, backends: &[u32]) -> MapEntries {
        let mut e = MapEntries::default();
        let key = key();
        e.frontends.insert(
            key,
            Frontend {
                service_id: 1,
                backend_count: count,
                ..Default::default()
            },
        );
        for (slot, &backend_id) in (1..).zip(backends) {
            e.slots.insert(
                SlotKey {
                    service_id: 1,
                    slot,
                },
                Slot { backend_id },
            );
            e.backends.insert(backend_id, backend(backend_id));
        }
        e
    }

    #[test]
    fn source_ranges_go_in_before_their_catch_all_and_out_after_it() {
        let key = |prefix_len, first| RangeKey {
            service_id: 1,
            prefix_len,
            address: std::net::Ipv4Addr::new(first, 0, 0, 0).into(),
        };
        let (catch_all, range) = (key(0, 0), key(8, 10));
        let mut ranged = entries(1, &[1]);
        ranged
            .source_ranges
            .insert(catch_all, SourceRange { allowed: 0 });
        ranged
            .source_ranges
            .insert(range, SourceRange { allowed: 1 });
        let open = entries(1, &[1]);
        let ranges_of = |ops: Vec<Op>| -> Vec<Op> {
            ops.into_iter()
                .filter(|op| op.map() == SOURCE_RANGES)
                .collect()
        };
        assert_eq!(
            ranges_of(diff(&open, &ranged)),
            [
                Op::PutSourceRange(range, SourceRange { allowed: 1 }),
                Op::PutSourceRange(catch_all, SourceRange { allowed: 0 }),
            ]
        );
        assert_eq!(
            ranges_of(diff(&ranged, &open)),
            [
                Op::DeleteSourceRange(catch_all),
                Op::DeleteSourceRange(range)
            ]
        );
    }

    #[test]
    fn unchanged_entries_write_nothing() {
        assert_eq!(diff(&entries(2, &[1, 2]), &entries(2, &[1, 2])), vec![]);
    }

    #[test]
    fn shrinking_lowers_the_count_before_deleting_slots_and_backends() {
        let ops = diff(&entries(3, &[1, 2, 3]), &entries(2, &[1, 2]));
        assert_eq!(
            ops,
            vec![
                Op::PutFrontend(
                    key(),
                    Frontend {
                        service_id: 1,
                        backend_count: 2,
                        ..Default::default()
                    }
                ),
                Op::DeleteSlot(SlotKey {
                    service_id: 1,
                    slot: 3
                }),
                Op::DeleteBackend(3, Family::V4),
            ]
        );
    }

    #[test]
    fn growing_writes_backends_and_slots_before_the_count() {
        let ops = diff(&entries(1, &[1]), &entries(2, &[1, 2]));
        let kinds: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                Op::PutBackend(..) => "backend",
                Op::PutSlot(..) => "slot",
                Op::PutFrontend(..) => "frontend",
                _ => "delete",
            })
            .collect();
        assert_eq!(kinds, ["backend", "slot", "frontend"]);
    }

    #[test]
    fn applying_the_diff_reaches_the_desired_entries() {
        let mut current = entries(3, &[1, 2, 3]);
        let desired = entries(2, &[4, 2]);
        for op in diff(&current, &desired) {
            current.apply(&op);
        }
        assert_eq!(current, desired);
    }
}
