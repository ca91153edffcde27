//! The operations that turn one [`MapEntries`] into another, ordered so that the datapath never
//! reads a slot past a frontend's count or a backend id that is not written yet: backends, then
//! slots, then frontends, then service addresses (which drop ports without a frontend);
//! removals the other way round.

use lb_common::maps::{Backend, Frontend, FrontendKey, Slot, SlotKey, Vip};

use super::MapEntries;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    PutSlot(SlotKey, Slot),
    PutFrontend(FrontendKey, Frontend),
    PutVip(u32, Vip),
    DeleteVip(u32),
    DeleteFrontend(FrontendKey),
    DeleteSlot(SlotKey),
    DeleteBackend(u32),
}

/// Only what differs is written.
pub fn diff(current: &MapEntries, desired: &MapEntries) -> Vec<Op> {
    let mut ops = Vec::new();
    for (id, backend) in &desired.backends {
        if current.backends.get(id) != Some(backend) {
            ops.push(Op::PutBackend(*id, *backend));
        }
    }
    for (key, slot) in &desired.slots {
        if current.slots.get(key) != Some(slot) {
            ops.push(Op::PutSlot(*key, *slot));
        }
    }
    for (key, frontend) in &desired.frontends {
        if current.frontends.get(key) != Some(frontend) {
            ops.push(Op::PutFrontend(*key, *frontend));
        }
    }
    for (addr, vip) in &desired.vips {
        if current.vips.get(addr) != Some(vip) {
            ops.push(Op::PutVip(*addr, *vip));
        }
    }
    for addr in current.vips.keys() {
        if !desired.vips.contains_key(addr) {
            ops.push(Op::DeleteVip(*addr));
        }
    }
    for key in current.frontends.keys() {
        if !desired.frontends.contains_key(key) {
            ops.push(Op::DeleteFrontend(*key));
        }
    }
    for key in current.slots.keys() {
        if !desired.slots.contains_key(key) {
            ops.push(Op::DeleteSlot(*key));
        }
    }
    for id in current.backends.keys() {
        if !desired.backends.contains_key(id) {
            ops.push(Op::DeleteBackend(*id));
        }
    }
    ops
}

impl MapEntries {
    /// Applies one operation, as the kernel maps would.
    pub fn apply(&mut self, op: &Op) {
        match *op {
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
            Op::DeleteVip(addr) => {
                self.vips.remove(&addr);
            }
            Op::DeleteFrontend(key) => {
                self.frontends.remove(&key);
            }
            Op::DeleteSlot(key) => {
                self.slots.remove(&key);
            }
            Op::DeleteBackend(id) => {
                self.backends.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(count: u16, backends: &[u32]) -> MapEntries {
        let mut e = MapEntries::default();
        let key = FrontendKey::default();
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
            e.backends.insert(backend_id, Backend::default());
        }
        e
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
                    FrontendKey::default(),
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
                Op::DeleteBackend(3),
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
