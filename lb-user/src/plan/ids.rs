//! Ids that name services and backends in the maps, and where each table of slots
//! lies in `lb_maglev`. They stay the same for the same frontend or backend across syncs, so a
//! sync rewrites only what changed.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::maps::{MAX_SERVICES, MAX_TABLE_POSITIONS};

use super::{Backend, FrontendKey, MapEntries};

#[derive(Clone, Debug, Default)]
pub struct Ids {
    services: BTreeMap<FrontendKey, u32>,
    /// The service ids of `services`, and those released in this sync.
    taken: BTreeSet<u32>,
    /// Below it, every service id is taken: where the search for a free one starts.
    free_from: u32,
    /// Each backend's id, and how many names it has: the frontends whose slots hold it, and
    /// those that retain it for its flows ([`crate::model::Frontend::retained`]).
    backends: BTreeMap<Backend, (u32, u32)>,
    /// Backends whose last name went in this sync: released at its end unless named again.
    unnamed: Vec<Backend>,
    last_backend_id: u32,
    /// Each table of slots (a Maglev or least-connection frontend's): its first position and
    /// its size.
    tables: BTreeMap<FrontendKey, (u32, u32)>,
    /// The positions taken, by first position to the end: `tables`', and those released in
    /// this sync.
    taken_positions: BTreeMap<u32, u32>,
    /// Below it, every position is taken: where the search for free ones starts.
    positions_free_from: u32,
    /// Service ids and table positions released in this sync: free at its end.
    released: Vec<u32>,
    released_positions: Vec<u32>,
    /// Adopted from an earlier agent: the first sync's end looks at every frontend.
    adopted: bool,
}

impl Ids {
    /// The ids of what an earlier agent programmed, so that a restarted agent keeps them: its
    /// first sync then rewrites nothing that has not changed. Backend ids continue after the
    /// highest one programmed or still named by a tracked flow.
    pub fn adopt(programmed: &MapEntries, highest_flow_backend_id: u32) -> Self {
        let services: BTreeMap<FrontendKey, u32> = programmed
            .frontends
            .iter()
            .map(|(&key, frontend)| (key, frontend.service_id))
            .collect();
        let backends: BTreeMap<Backend, (u32, u32)> = programmed
            .backends
            .iter()
            .map(|(&id, &b)| (b, (id, 0)))
            .collect();
        let tables: BTreeMap<FrontendKey, (u32, u32)> = programmed
            .frontends
            .iter()
            .filter(|(_, f)| super::has_table(f))
            .map(|(&key, f)| (key, (f.table_offset, u32::from(f.backend_count))))
            .collect();
        Self {
            taken_positions: tables
                .values()
                .map(|&(offset, size)| (offset, offset + size))
                .collect(),
            positions_free_from: 0,
            tables,
            taken: services.values().copied().collect(),
            free_from: 1,
            services,
            unnamed: backends.keys().copied().collect(),
            last_backend_id: programmed
                .backends
                .keys()
                .copied()
                .chain([highest_flow_backend_id])
                .max()
                .unwrap_or(0),
            backends,
            released: Vec::new(),
            released_positions: Vec::new(),
            adopted: true,
        }
    }

    /// The id of frontend `key`: the one it has, or else the lowest free one. An id released
    /// in this sync is not handed out again in it, so a frontend never reads the slots of the
    /// frontend its id belonged to. None when the frontend map is full.
    pub fn service(&mut self, key: FrontendKey) -> Option<u32> {
        if let Some(&id) = self.services.get(&key) {
            return Some(id);
        }
        let mut id = self.free_from.max(1);
        while self.taken.contains(&id) {
            id += 1;
        }
        self.free_from = id;
        if id >= MAX_SERVICES {
            return None;
        }
        self.taken.insert(id);
        self.services.insert(key, id);
        Some(id)
    }

    /// The id of `backend`, named once more: the one it has, or else a new one. Ids are
    /// never reused, because a tracked flow names its backend by id and must not land on
    /// another backend that took it.
    pub fn name_backend(&mut self, backend: Backend) -> u32 {
        let (id, names) = self.backends.entry(backend).or_insert_with(|| {
            self.last_backend_id += 1;
            (self.last_backend_id, 0)
        });
        *names += 1;
        *id
    }

    /// `backend` has one name fewer.
    pub fn unname_backend(&mut self, backend: Backend) {
        if let Some((_, names)) = self.backends.get_mut(&backend) {
            *names = names.saturating_sub(1);
            if *names == 0 {
                self.unnamed.push(backend);
            }
        }
    }

    /// The first position of frontend `key`'s table of `size` slots: the one it
    /// has if of that size, or else the first free ones. Positions released in this sync are not
    /// handed out again in it, so a frontend never reads another's table. None when the map has
    /// no room.
    pub fn table(&mut self, key: FrontendKey, size: u32) -> Option<u32> {
        match self.tables.get(&key) {
            Some(&(offset, had)) if had == size => return Some(offset),
            // Released at the sync's end, as a withdrawn frontend's.
            Some(&(offset, _)) => {
                self.tables.remove(&key);
                self.released_positions.push(offset);
            }
            None => {}
        }
        let mut at = self.positions_free_from;
        for (&start, &end) in self.taken_positions.range(self.positions_free_from..) {
            if start >= at.checked_add(size)? {
                break;
            }
            at = at.max(end);
        }
        if at.checked_add(size)? > MAX_TABLE_POSITIONS {
            return None;
        }
        if at == self.positions_free_from {
            self.positions_free_from = at + size;
        }
        self.taken_positions.insert(at, at + size);
        self.tables.insert(key, (at, size));
        Some(at)
    }

    /// Ends a sync: of the frontends `touched` names, releases the service ids of those `kept`
    /// rejects and the tables of those `table_kept` does not name at their first position;
    /// releases the ids of the backends nothing names, and returns them. Only what the sync
    /// touched is looked at, but for the first sync after [`Ids::adopt`], which looks at every
    /// frontend an earlier agent left.
    pub fn end_sync(
        &mut self,
        touched: &BTreeSet<FrontendKey>,
        kept: impl Fn(&FrontendKey) -> bool,
        table_kept: impl Fn(&FrontendKey, u32) -> bool,
    ) -> Vec<u32> {
        let keys: Vec<FrontendKey> = if std::mem::take(&mut self.adopted) {
            self.services
                .keys()
                .chain(self.tables.keys())
                .copied()
                .collect()
        } else {
            touched.iter().copied().collect()
        };
        for key in &keys {
            if let Some(&(offset, _)) = self.tables.get(key)
                && !table_kept(key, offset)
            {
                self.tables.remove(key);
                self.released_positions.push(offset);
            }
            if !kept(key)
                && let Some(id) = self.services.remove(key)
            {
                self.released.push(id);
            }
        }
        for offset in std::mem::take(&mut self.released_positions) {
            self.taken_positions.remove(&offset);
            self.positions_free_from = self.positions_free_from.min(offset);
        }
        for id in std::mem::take(&mut self.released) {
            self.taken.remove(&id);
            self.free_from = self.free_from.min(id);
        }
        let mut released = Vec::new();
        for backend in std::mem::take(&mut self.unnamed) {
            if let Some(&(id, 0)) = self.backends.get(&backend) {
                self.backends.remove(&backend);
                released.push(id);
            }
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDRESS: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);

    fn key(port: u16) -> FrontendKey {
        FrontendKey {
            address: ADDRESS,
            port,
            protocol: 0,
            scope: 0,
        }
    }

    fn backend(port: u16) -> Backend {
        Backend {
            address: ADDRESS,
            port,
            protocol: 0,
            flags: 0,
        }
    }

    /// Every key the tests use: each sync looks at all of them.
    fn keys() -> BTreeSet<FrontendKey> {
        (1..=7).map(key).collect()
    }

    #[test]
    fn service_ids_are_stable_and_start_at_one() {
        let mut ids = Ids::default();
        assert_eq!(
            (ids.service(key(1)), ids.service(key(2))),
            (Some(1), Some(2))
        );
        ids.end_sync(&keys(), |_| true, |_, _| true);
        assert_eq!(ids.service(key(2)), Some(2), "a kept frontend keeps its id");
        assert_eq!(
            ids.service(key(3)),
            Some(3),
            "an id released in the same sync is not reused"
        );
        ids.end_sync(&keys(), |k| *k != key(1), |_, _| true);
        assert_eq!(
            ids.service(key(4)),
            Some(1),
            "a released id is reused in a later sync"
        );
    }

    #[test]
    fn adopted_ids_are_kept_and_new_backends_follow_the_highest() {
        let mut first = Ids::default();
        let services = [first.service(key(1)), first.service(key(2))];
        let backends = [
            first.name_backend(backend(1)),
            first.name_backend(backend(2)),
        ];
        let mut programmed = MapEntries::default();
        for (port, service_id) in [(1, services[0]), (2, services[1])] {
            programmed.frontends.insert(
                key(port),
                lb_common::maps::Frontend {
                    service_id: service_id.unwrap(),
                    ..Default::default()
                },
            );
        }
        for (port, id) in [(1, backends[0]), (2, backends[1])] {
            programmed.backends.insert(id, backend(port));
        }
        let mut adopted = Ids::adopt(&programmed, 7);
        assert_eq!([adopted.service(key(1)), adopted.service(key(2))], services);
        assert_eq!(
            [
                adopted.name_backend(backend(1)),
                adopted.name_backend(backend(2))
            ],
            backends
        );
        assert_eq!(
            adopted.name_backend(backend(3)),
            8,
            "a flow still names backend 7: a new backend must not take its id"
        );
        assert_eq!(
            adopted.end_sync(&keys(), |_| true, |_, _| true),
            Vec::<u32>::new()
        );
    }

    #[test]
    fn adopted_ids_nothing_names_are_released_after_the_first_sync() {
        let mut programmed = MapEntries::default();
        programmed.frontends.insert(
            key(1),
            lb_common::maps::Frontend {
                service_id: 5,
                ..Default::default()
            },
        );
        programmed.backends.insert(4, backend(1));
        let mut adopted = Ids::adopt(&programmed, 0);
        assert_eq!(adopted.service(key(2)), Some(1));
        assert_eq!(
            adopted.end_sync(&keys(), |k| *k == key(2), |_, _| true),
            vec![4]
        );
        assert_eq!(adopted.service(key(3)), Some(2));
        assert_eq!(adopted.service(key(4)), Some(3));
        assert_eq!(adopted.service(key(5)), Some(4));
        assert_eq!(adopted.service(key(6)), Some(5), "5 was released");
    }

    #[test]
    fn maglev_tables_stay_where_they_are_and_their_positions_wait_a_sync_to_be_reused() {
        let mut ids = Ids::default();
        assert_eq!(
            [
                ids.table(key(1), 7),
                ids.table(key(2), 7),
                ids.table(key(1), 7)
            ],
            [Some(0), Some(7), Some(0)]
        );
        // key(1)'s table grows: it moves, and its old positions wait for the sync's end.
        assert_eq!(ids.table(key(1), 11), Some(14));
        assert_eq!(ids.table(key(3), 7), Some(25));
        ids.end_sync(&keys(), |_| true, |_, _| true);
        assert_eq!(ids.table(key(4), 5), Some(0), "the first free positions");
        assert_eq!(
            ids.table(key(5), 5),
            Some(32),
            "past the last table: 2 free are too few"
        );
        assert_eq!(ids.table(key(6), 70_000), Some(37));
        assert_eq!(ids.table(key(7), MAX_TABLE_POSITIONS), None, "no room");
    }

    #[test]
    fn backend_ids_are_stable_while_named_and_never_reused() {
        let mut ids = Ids::default();
        let first = [
            ids.name_backend(backend(1)),
            ids.name_backend(backend(2)),
            ids.name_backend(backend(1)),
        ];
        assert_eq!(first, [1, 2, 1]);
        assert_eq!(
            ids.end_sync(&keys(), |_| true, |_, _| true),
            Vec::<u32>::new()
        );
        ids.unname_backend(backend(1));
        assert_eq!(
            ids.end_sync(&keys(), |_| true, |_, _| true),
            Vec::<u32>::new(),
            "another slot still names it"
        );
        ids.unname_backend(backend(1));
        ids.unname_backend(backend(2));
        assert_eq!(
            ids.name_backend(backend(2)),
            2,
            "named again in the same sync"
        );
        assert_eq!(ids.end_sync(&keys(), |_| true, |_, _| true), vec![1]);
        assert_eq!(
            ids.name_backend(backend(1)),
            3,
            "a removed backend comes back with a new id"
        );
    }
}
