//! A store for unit tests whose writes the disk "refuses" while told to: a real
//! [`SqliteStore`] behind, every other call passed through (the reads of the queue's depth
//! counted). The full-disk tests with a real filesystem are in `tests/faults.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::*;

/// A [`SqliteStore`] whose writes fail with [`StoreError::Full`] while `full` is set.
#[derive(Debug)]
pub struct Flaky {
    pub inner: SqliteStore,
    pub full: AtomicBool,
    /// How many times the queue's depth was read.
    pub depth_reads: AtomicU64,
}

impl Flaky {
    fn refuse(&self) -> Result<()> {
        if self.full.load(Ordering::SeqCst) {
            return Err(StoreError::Full);
        }
        Ok(())
    }

    /// Makes writes fail (or pass) from now on.
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }
}

impl Store for Flaky {
    fn function(&self, tenant: Option<&str>, key: &str) -> Result<Option<Function>> {
        self.inner.function(tenant, key)
    }
    fn functions(&self, tenant: Option<&str>) -> Result<Vec<Function>> {
        self.inner.functions(tenant)
    }
    fn next_version(&self, tenant: &str, name: &str) -> Result<(String, u32)> {
        self.inner.next_version(tenant, name)
    }
    fn add_version(&self, t: &str, id: &str, n: &str, v: &Version) -> Result<Function> {
        self.inner.add_version(t, id, n, v)
    }
    fn version(&self, function_id: &str, version: u32) -> Result<Option<Version>> {
        self.inner.version(function_id, version)
    }
    fn versions(&self, function_id: &str) -> Result<Vec<Version>> {
        self.inner.versions(function_id)
    }
    fn set_active(&self, function_id: &str, active: bool) -> Result<()> {
        self.inner.set_active(function_id, active)
    }
    fn delete_function(&self, function_id: &str) -> Result<Vec<Version>> {
        self.inner.delete_function(function_id)
    }
    fn write_and_claim_within(
        &self,
        writes: &[Write],
        limit: usize,
        bytes: u64,
    ) -> Result<Vec<Task>> {
        if !writes.is_empty() {
            self.refuse()?;
        }
        self.inner.write_and_claim_within(writes, limit, bytes)
    }

    fn task(&self, tenant: Option<&str>, task_id: &str) -> Result<Option<Task>> {
        self.inner.task(tenant, task_id)
    }
    fn recent_tasks(&self, function_id: &str, limit: u32) -> Result<Vec<Task>> {
        self.inner.recent_tasks(function_id, limit)
    }
    fn queue_depth(&self) -> Result<u64> {
        self.depth_reads.fetch_add(1, Ordering::SeqCst);
        self.inner.queue_depth()
    }
    fn running(&self) -> Result<u64> {
        self.inner.running()
    }
    fn give_back(&self, task_ids: &[String]) -> Result<u64> {
        self.inner.give_back(task_ids)
    }
    fn recover(
        &self,
        retries_left: &dyn Fn(&Task) -> bool,
        backoff_ms: &dyn Fn(u32) -> i64,
    ) -> Result<Recovery> {
        self.inner.recover(retries_left, backoff_ms)
    }
    fn calls(&self, t: Option<&str>, f: Option<&str>, since: i64, until: i64) -> Result<Vec<Call>> {
        self.inner.calls(t, f, since, until)
    }
    fn prune(&self, before: i64) -> Result<u64> {
        self.inner.prune(before)
    }
    fn rollups(
        &self,
        t: Option<&str>,
        f: Option<&str>,
        resolution: i64,
        since: i64,
        until: i64,
    ) -> Result<Vec<Rollup>> {
        self.inner.rollups(t, f, resolution, since, until)
    }
    fn prune_rollups(&self, resolution: i64, before: i64) -> Result<u64> {
        self.inner.prune_rollups(resolution, before)
    }
    fn size(&self) -> Result<StoreSize> {
        self.inner.size()
    }
    fn close(&self) -> Result<()> {
        self.inner.close()
    }
}

impl AnomalyStore for Flaky {
    fn anomaly_state(&self) -> Result<(Option<i64>, Vec<crate::anomalies::Saved>)> {
        self.inner.anomaly_state()
    }
    fn save_anomaly_state(&self, through: i64, saved: &[crate::anomalies::Saved]) -> Result<()> {
        self.refuse()?;
        self.inner.save_anomaly_state(through, saved)
    }
    fn record_anomalies(
        &self,
        scored: &[(crate::anomalies::Key, String, crate::anomalies::Point)],
        events: &[crate::anomalies::Event],
    ) -> Result<()> {
        self.refuse()?;
        self.inner.record_anomalies(scored, events)
    }
    fn anomaly_events(
        &self,
        t: Option<&str>,
        f: Option<&str>,
        since: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<crate::anomalies::Event>> {
        self.inner.anomaly_events(t, f, since, until, limit)
    }
    fn anomaly_scores(
        &self,
        t: Option<&str>,
        f: &str,
        since: i64,
        until: i64,
    ) -> Result<Vec<(crate::anomalies::Series, crate::anomalies::Point)>> {
        self.inner.anomaly_scores(t, f, since, until)
    }
    fn prune_anomalies(&self, before: i64) -> Result<u64> {
        self.inner.prune_anomalies(before)
    }
}

impl AlertStore for Flaky {
    fn put_rule(&self, rule: &crate::alerts::Rule) -> Result<()> {
        self.refuse()?;
        self.inner.put_rule(rule)
    }
    fn rules(&self, tenant: Option<&str>) -> Result<Vec<crate::alerts::Rule>> {
        self.inner.rules(tenant)
    }
    fn delete_rule(&self, tenant: Option<&str>, id: &str) -> Result<bool> {
        self.inner.delete_rule(tenant, id)
    }
    fn alert_phases(&self) -> Result<Vec<(String, String, crate::alerts::eval::Phase)>> {
        self.inner.alert_phases()
    }
    fn save_alert_phases(
        &self,
        phases: &[(String, String, crate::alerts::eval::Phase)],
    ) -> Result<()> {
        self.refuse()?;
        self.inner.save_alert_phases(phases)
    }
    fn put_subscription(&self, sub: &crate::alerts::Subscription) -> Result<()> {
        self.refuse()?;
        self.inner.put_subscription(sub)
    }
    fn subscriptions(&self, tenant: Option<&str>) -> Result<Vec<crate::alerts::Subscription>> {
        self.inner.subscriptions(tenant)
    }
    fn delete_subscriptions(
        &self,
        tenant: Option<&str>,
        id: Option<&str>,
        target: Option<(&str, &str)>,
    ) -> Result<u64> {
        self.inner.delete_subscriptions(tenant, id, target)
    }
    fn enqueue(
        &self,
        n: &crate::alerts::Notification,
        subs: &[crate::alerts::Subscription],
    ) -> Result<Vec<crate::alerts::deliver::Delivery>> {
        self.refuse()?;
        self.inner.enqueue(n, subs)
    }
    fn due_deliveries(
        &self,
        now: i64,
        limit: u32,
    ) -> Result<
        Vec<(
            crate::alerts::deliver::Delivery,
            crate::alerts::Notification,
            crate::alerts::Subscription,
        )>,
    > {
        self.inner.due_deliveries(now, limit)
    }
    fn record_attempt(
        &self,
        id: &str,
        outcome: Attempt,
        error: Option<&str>,
        now: i64,
    ) -> Result<()> {
        self.inner.record_attempt(id, outcome, error, now)
    }
    fn deliveries(
        &self,
        tenant: Option<&str>,
        limit: u32,
    ) -> Result<Vec<crate::alerts::deliver::Delivery>> {
        self.inner.deliveries(tenant, limit)
    }
    fn prune_notifications(&self, before: i64) -> Result<u64> {
        self.refuse()?;
        self.inner.prune_notifications(before)
    }
    fn oldest_queued_at(&self) -> Result<Option<i64>> {
        self.inner.oldest_queued_at()
    }
}

impl crate::store::ChainStore for Flaky {
    fn put_chain(&self, chain: &crate::chains::Chain) -> Result<crate::chains::Chain> {
        self.refuse()?;
        self.inner.put_chain(chain)
    }
    fn chain(&self, t: Option<&str>, key: &str) -> Result<Option<crate::chains::Chain>> {
        self.inner.chain(t, key)
    }
    fn chains(&self, t: Option<&str>) -> Result<Vec<crate::chains::Chain>> {
        self.inner.chains(t)
    }
    fn delete_chain(&self, id: &str) -> Result<bool> {
        self.refuse()?;
        self.inner.delete_chain(id)
    }
    fn prune_runs(&self, before: i64) -> Result<u64> {
        self.refuse()?;
        self.inner.prune_runs(before)
    }
    fn save_run(&self, run: &crate::chains::ChainRun) -> Result<()> {
        self.refuse()?;
        self.inner.save_run(run)
    }
    fn save_step(&self, t: &str, run_id: &str, step: &crate::chains::StepRecord) -> Result<()> {
        self.refuse()?;
        self.inner.save_step(t, run_id, step)
    }
    fn chain_run(&self, t: Option<&str>, id: &str) -> Result<Option<crate::chains::ChainRun>> {
        self.inner.chain_run(t, id)
    }
    fn chain_runs(&self, chain_id: &str, limit: u32) -> Result<Vec<crate::chains::ChainRun>> {
        self.inner.chain_runs(chain_id, limit)
    }
    fn unfinished_runs(&self) -> Result<Vec<crate::chains::ChainRun>> {
        self.inner.unfinished_runs()
    }
}

impl super::SealedStore for Flaky {
    fn put_code(&self, tenant: &str, path: &str, archive: &[u8]) -> Result<()> {
        self.refuse()?;
        self.inner.put_code(tenant, path, archive)
    }
    fn code(&self, path: &str) -> Result<Option<Vec<u8>>> {
        self.inner.code(path)
    }
    fn set_code_dir(&self, function_id: &str, version: u32, code_dir: &str) -> Result<()> {
        self.refuse()?;
        self.inner.set_code_dir(function_id, version, code_dir)
    }
    fn code_bytes(&self, tenant: &str) -> Result<u64> {
        self.inner.code_bytes(tenant)
    }
    fn set_secret(&self, tenant: &str, name: &str, value: &str) -> Result<()> {
        self.refuse()?;
        self.inner.set_secret(tenant, name, value)
    }
    fn delete_secret(&self, tenant: &str, name: &str) -> Result<bool> {
        self.refuse()?;
        self.inner.delete_secret(tenant, name)
    }
    fn secret_names(&self, tenant: &str) -> Result<Vec<super::SecretInfo>> {
        self.inner.secret_names(tenant)
    }
    fn secrets(
        &self,
        tenant: &str,
        names: &[String],
    ) -> Result<std::collections::BTreeMap<String, String>> {
        self.inner.secrets(tenant, names)
    }
    fn data_keys(&self) -> Result<Vec<super::KeyInfo>> {
        self.inner.data_keys()
    }
    fn master_key(&self) -> String {
        self.inner.master_key()
    }
    fn sealing(&self) -> bool {
        self.inner.sealing()
    }
    fn rotate_master_key(&self) -> Result<String> {
        self.refuse()?;
        self.inner.rotate_master_key()
    }
    fn reencrypt(&self, tenant: Option<&str>) -> Result<super::Reencrypted> {
        self.refuse()?;
        self.inner.reencrypt(tenant)
    }
}

impl crate::store::KeyStore for Flaky {
    fn claim_key(&self, tenant: &str, key: &str, task_id: &str, at: i64) -> Result<(String, i64)> {
        self.refuse()?;
        self.inner.claim_key(tenant, key, task_id, at)
    }
    fn take_over_key(
        &self,
        tenant: &str,
        key: &str,
        from: &str,
        task_id: &str,
        at: i64,
    ) -> Result<bool> {
        self.refuse()?;
        self.inner.take_over_key(tenant, key, from, task_id, at)
    }
    fn prune_keys(&self, before: i64) -> Result<u64> {
        self.refuse()?;
        self.inner.prune_keys(before)
    }
}
