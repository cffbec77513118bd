//! Function and version lookups, kept in memory between changes to functions.
//!
//! Every call resolves its function twice (by id or name, then the version), and the SQLite
//! reader re-reads those pages after each commit of a task on the other connection. The
//! catalog answers repeated lookups from memory instead.
//!
//! Correctness rests on one rule: whoever changes a function calls [`Catalog::invalidate`]
//! after the change is committed. Here every change goes through the platform, which does.
//! A store shared by several nodes (the PostgreSQL seam) must also invalidate when it hears
//! of another node's change, from the database's or the broker's notifications.
//!
//! A lookup that raced with a change is never cached: entries are only added under the
//! generation they were read in.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use crate::model::{Function, Version};
use crate::store::{Result, Store};

/// Entries past this many are dropped all at once; found functions only are cached, so it
/// bounds memory against many functions, not against odd keys.
const MAX_ENTRIES: usize = 16_384;

/// Lookups of functions and their versions, cached until [`Catalog::invalidate`].
#[derive(Debug, Default)]
pub struct Catalog {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Bumped by every invalidation.
    generation: u64,
    /// By (tenant scope, id or name).
    functions: HashMap<(Option<String>, String), Function>,
    /// By (function id, version number).
    versions: HashMap<(String, u32), Version>,
}

impl Catalog {
    /// The function `key` (an id or a name) as `scope` sees it, through `store` on a miss.
    pub fn function(
        &self,
        store: &dyn Store,
        scope: Option<&str>,
        key: &str,
    ) -> Result<Option<Function>> {
        self.cached(
            (scope.map(String::from), key.to_string()),
            |s| &mut s.functions,
            || store.function(scope, key),
        )
    }

    /// Version `number` of function `function_id`, through `store` on a miss, made ready to
    /// run here by `localize` (its code in this node's directory).
    pub fn version(
        &self,
        store: &dyn Store,
        function_id: &str,
        number: u32,
        localize: impl FnOnce(&mut Version) -> Result<()>,
    ) -> Result<Option<Version>> {
        self.cached(
            (function_id.to_string(), number),
            |s| &mut s.versions,
            || {
                let mut found = store.version(function_id, number)?;
                if let Some(v) = &mut found {
                    super::secrets::fill_of(store, function_id, v)?;
                    localize(v)?;
                }
                Ok(found)
            },
        )
    }

    /// The function `key` as `scope` sees it and its version `number` (its current one by
    /// default), if both are held here: no store read.
    pub fn held(
        &self,
        scope: Option<&str>,
        key: &str,
        number: Option<u32>,
    ) -> Option<(Function, Version)> {
        let state = self.lock();
        let function = state
            .functions
            .get(&(scope.map(String::from), key.to_string()))?;
        let number = number.unwrap_or(function.version);
        let version = state.versions.get(&(function.id.clone(), number))?;
        Some((function.clone(), version.clone()))
    }

    /// The entry `k` of the map `of` picks, else what `load` finds (kept when found).
    fn cached<K: std::hash::Hash + Eq, V: Clone>(
        &self,
        k: K,
        of: fn(&mut State) -> &mut HashMap<K, V>,
        load: impl FnOnce() -> Result<Option<V>>,
    ) -> Result<Option<V>> {
        let generation = {
            let mut state = self.lock();
            if let Some(v) = of(&mut state).get(&k) {
                return Ok(Some(v.clone()));
            }
            state.generation
        };
        let found = load()?;
        if let Some(v) = &found {
            self.keep(generation, |s| {
                of(s).insert(k, v.clone());
            });
        }
        Ok(found)
    }

    /// Forgets everything; call it after a change to any function is committed.
    pub fn invalidate(&self) {
        let mut state = self.lock();
        state.generation += 1;
        state.functions.clear();
        state.versions.clear();
    }

    /// Adds an entry read under `generation`, unless an invalidation came since.
    fn keep(&self, generation: u64, add: impl FnOnce(&mut State)) {
        let mut state = self.lock();
        if state.generation != generation {
            return;
        }
        if state.functions.len() + state.versions.len() >= MAX_ENTRIES {
            state.functions.clear();
            state.versions.clear();
        }
        add(&mut state);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::tests::{alice_hello, version};

    #[test]
    fn a_cached_lookup_follows_every_invalidated_change() {
        let (_dir, store, f) = alice_hello();
        let id = f.id;
        let catalog = Catalog::default();

        let f = catalog.function(&store, Some("alice"), "hello").unwrap();
        assert_eq!(f.as_ref().map(|f| f.version), Some(1));
        // Another tenant's scope is a different entry, and does not see it.
        assert!(catalog
            .function(&store, Some("bob"), "hello")
            .unwrap()
            .is_none());

        // A change the catalog was not told of is not seen: the rule in the module docs.
        store.set_active(&id, false).unwrap();
        let stale = catalog
            .function(&store, Some("alice"), "hello")
            .unwrap()
            .unwrap();
        assert!(stale.active, "served from memory");
        // The same function by its id is another key, read from the store.
        assert!(
            !catalog
                .function(&store, Some("alice"), &id)
                .unwrap()
                .unwrap()
                .active
        );
        catalog.invalidate();
        assert!(
            !catalog
                .function(&store, Some("alice"), "hello")
                .unwrap()
                .unwrap()
                .active
        );

        let (_, n2) = store.next_version("alice", "hello").unwrap();
        store
            .add_version("alice", &id, "hello", &version(n2))
            .unwrap();
        catalog.invalidate();
        let f = catalog
            .function(&store, Some("alice"), "hello")
            .unwrap()
            .unwrap();
        assert_eq!(f.version, 2);
        assert_eq!(
            catalog
                .version(&store, &id, 2, |_| Ok(()))
                .unwrap()
                .unwrap()
                .version,
            2
        );

        store.delete_function(&id).unwrap();
        catalog.invalidate();
        assert!(catalog
            .function(&store, Some("alice"), "hello")
            .unwrap()
            .is_none());
        assert!(catalog
            .version(&store, &id, 2, |_| Ok(()))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_lookup_read_before_an_invalidation_is_not_kept() {
        let (_dir, _store, f) = alice_hello();
        let id = f.id;
        let catalog = Catalog::default();
        // As if a change had been committed and invalidated while this lookup was reading.
        let generation = catalog.lock().generation;
        catalog.invalidate();
        catalog.keep(generation, |s| {
            s.versions.insert((id.clone(), 1), version(1));
        });
        assert!(catalog.lock().versions.is_empty());
    }
}
