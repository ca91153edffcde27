//! Ids that name services and backends in the maps. They stay the same for the same frontend or
//! backend across syncs, so a sync rewrites only what changed.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::maps::{Backend, FrontendKey, MAX_SERVICES};

use super::MapEntries;

#[derive(Clone, Debug, Default)]
pub struct Ids {
    services: BTreeMap<FrontendKey, u32>,
    backends: BTreeMap<Backend, u32>,
    last_backend_id: u32,
}

impl Ids {
    /// The ids of what an earlier agent programmed, so that a restarted agent keeps them: its
    /// first sync then rewrites nothing that has not changed. Backend ids continue after the
    /// highest one programmed or still named by a tracked flow.
    pub fn adopt(programmed: &MapEntries, highest_flow_backend_id: u32) -> Self {
        let backends: BTreeMap<Backend, u32> = programmed
            .backends
            .iter()
            .map(|(&id, &b)| (b, id))
            .collect();
        Self {
            services: programmed
                .frontends
                .iter()
                .map(|(&key, frontend)| (key, frontend.service_id))
                .collect(),
            last_backend_id: backends
                .values()
                .copied()
                .chain([highest_flow_backend_id])
                .max()
                .unwrap_or(0),
            backends,
        }
    }

    /// Ids for exactly `keys`: kept for known frontends, the lowest free one for new frontends.
    /// An id released in this call is not handed out again in it, so a frontend never reads the
    /// slots of the frontend its id belonged to. A frontend past the map's capacity gets none.
    pub fn assign_services(
        &mut self,
        keys: impl IntoIterator<Item = FrontendKey>,
    ) -> BTreeMap<FrontendKey, u32> {
        let keys: BTreeSet<FrontendKey> = keys.into_iter().collect();
        let mut taken: BTreeSet<u32> = self.services.values().copied().collect();
        let mut assigned = BTreeMap::new();
        let mut candidate = 1;
        for key in keys {
            let id = match self.services.get(&key) {
                Some(&id) => id,
                None => {
                    while taken.contains(&candidate) {
                        candidate += 1;
                    }
                    if candidate >= MAX_SERVICES {
                        continue;
                    }
                    taken.insert(candidate);
                    candidate
                }
            };
            assigned.insert(key, id);
        }
        self.services.clone_from(&assigned);
        assigned
    }

    /// Ids for exactly `backends`: kept for known backends, new ones never reused, because a
    /// tracked flow names its backend by id and must not land on another backend that took it.
    pub fn assign_backends(
        &mut self,
        backends: impl IntoIterator<Item = Backend>,
    ) -> BTreeMap<Backend, u32> {
        let mut assigned = BTreeMap::new();
        for backend in backends {
            if assigned.contains_key(&backend) {
                continue;
            }
            let id = match self.backends.get(&backend) {
                Some(&id) => id,
                None => {
                    self.last_backend_id += 1;
                    self.last_backend_id
                }
            };
            assigned.insert(backend, id);
        }
        self.backends.clone_from(&assigned);
        assigned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FrontendKey {
        FrontendKey {
            port_be: port.to_be(),
            ..Default::default()
        }
    }

    fn backend(port: u16) -> Backend {
        Backend {
            port_be: port.to_be(),
            ..Default::default()
        }
    }

    #[test]
    fn service_ids_are_stable_and_start_at_one() {
        let mut ids = Ids::default();
        let first = ids.assign_services([key(1), key(2)]);
        assert_eq!(first[&key(1)], 1);
        assert_eq!(first[&key(2)], 2);
        let second = ids.assign_services([key(2), key(3)]);
        assert_eq!(second[&key(2)], 2, "a kept frontend keeps its id");
        assert_eq!(
            second[&key(3)],
            3,
            "an id released in the same sync is not reused"
        );
        assert!(!second.contains_key(&key(1)));
        let third = ids.assign_services([key(2), key(3), key(4)]);
        assert_eq!(third[&key(4)], 1, "a released id is reused in a later sync");
    }

    #[test]
    fn adopted_ids_are_kept_and_new_backends_follow_the_highest() {
        let mut first = Ids::default();
        let services = first.assign_services([key(1), key(2)]);
        let backends = first.assign_backends([backend(1), backend(2)]);
        let mut programmed = MapEntries::default();
        for (key, service_id) in &services {
            programmed.frontends.insert(
                *key,
                lb_common::maps::Frontend {
                    service_id: *service_id,
                    ..Default::default()
                },
            );
        }
        for (backend, id) in &backends {
            programmed.backends.insert(*id, *backend);
        }
        let mut adopted = Ids::adopt(&programmed, 7);
        assert_eq!(adopted.assign_services([key(1), key(2)]), services);
        let again = adopted.assign_backends([backend(1), backend(2), backend(3)]);
        assert_eq!((again[&backend(1)], again[&backend(2)]), (1, 2));
        assert_eq!(
            again[&backend(3)],
            8,
            "a flow still names backend 7: a new backend must not take its id"
        );
    }

    #[test]
    fn backend_ids_are_stable_and_never_reused() {
        let mut ids = Ids::default();
        let first = ids.assign_backends([backend(1), backend(2), backend(1)]);
        assert_eq!((first[&backend(1)], first[&backend(2)]), (1, 2));
        let second = ids.assign_backends([backend(2)]);
        assert_eq!(second[&backend(2)], 2);
        let third = ids.assign_backends([backend(2), backend(1)]);
        assert_eq!(
            third[&backend(1)],
            3,
            "a removed backend comes back with a new id"
        );
    }
}
