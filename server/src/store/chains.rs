//! What chaining keeps ([`crate::chains`]): chains, their runs, and each run's step calls,
//! written as each call starts and ends so that a run survives the process.

use super::Result;
use crate::chains::{Chain, ChainRun, StepRecord};

/// Storage of chains and runs. `tenant: None` means an admin.
pub trait ChainStore {
    /// Adds a chain, or replaces the definition of `tenant`'s chain of the same name (which
    /// keeps its id and creation time); returns it as stored.
    fn put_chain(&self, chain: &Chain) -> Result<Chain>;
    /// The chain `key` (an id or a name) as `tenant` sees it.
    fn chain(&self, tenant: Option<&str>, key: &str) -> Result<Option<Chain>>;
    /// Every chain `tenant` sees, by name.
    fn chains(&self, tenant: Option<&str>) -> Result<Vec<Chain>>;
    /// Deletes a chain (its runs stay readable); whether it was there.
    fn delete_chain(&self, id: &str) -> Result<bool>;
    /// Removes the runs that ended before `before`, with their steps; returns how many runs.
    fn prune_runs(&self, before: i64) -> Result<u64>;
    /// Writes a run and every step it carries, in one transaction.
    fn save_run(&self, run: &ChainRun) -> Result<()>;
    /// Writes one step of `tenant`'s run (as it starts, and again as it ends).
    fn save_step(&self, tenant: &str, run_id: &str, step: &StepRecord) -> Result<()>;
    /// A run, with its steps, as `tenant` sees it.
    fn chain_run(&self, tenant: Option<&str>, run_id: &str) -> Result<Option<ChainRun>>;
    /// A chain's newest runs, with their steps, newest first.
    fn chain_runs(&self, chain_id: &str, limit: u32) -> Result<Vec<ChainRun>>;
    /// Runs not yet ended (queued or running), oldest first: what a restart resumes.
    fn unfinished_runs(&self) -> Result<Vec<ChainRun>>;
}
