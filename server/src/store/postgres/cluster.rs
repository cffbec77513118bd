//! Several nodes on one PostgreSQL database: their rows and heartbeats, the running tasks of
//! nodes that stopped heartbeating, and signals between them by `NOTIFY`/`LISTEN`.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;

use super::rows::{complete, task_row, TASK_COLS};
use super::sealed::Seal;
use super::PgStore;
use crate::model::{now_ms, Mode, Task};
use crate::store::cluster::{ClusterStore, NodeInfo, Signal};
use crate::store::records::{interrupted_ending, Pending};
use crate::store::{Recovery, Result};

/// The channel the nodes signal on.
pub(super) const CHANNEL: &str = "cloudfunc";

/// How long a node that stopped heartbeating stays listed (dead) before it is forgotten.
const FORGOTTEN_AFTER_MS: i64 = 86_400_000;

/// Running tasks whose node is not alive: none (from before nodes), or one whose last
/// heartbeat is older than `$2`. `$1` is this node.
const NOT_ALIVE: &str =
    "NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = t.node AND n.heartbeat_at >= $2)";

impl PgStore {
    /// At start: the running tasks this node left (it stopped without finishing them) and
    /// those of nodes no longer alive are ended, in one transaction that skips any another
    /// node is ending at the same time.
    pub(super) fn recover_running(
        &self,
        retries_left: &dyn Fn(&Task) -> bool,
        backoff_ms: &dyn Fn(u32) -> i64,
    ) -> Result<Recovery> {
        self.end_running(
            &format!("(t.node IS NULL OR t.node = $1 OR {NOT_ALIVE})"),
            now_ms() - self.lease_ms,
            retries_left,
            backoff_ms,
        )
    }

    /// Ends the running tasks `filter` selects (with `$1` this node and `$2` the oldest
    /// heartbeat of an alive node).
    fn end_running(
        &self,
        filter: &str,
        alive_since: i64,
        retries_left: &dyn Fn(&Task) -> bool,
        backoff_ms: &dyn Fn(u32) -> i64,
    ) -> Result<Recovery> {
        let mut conn = self.pool.get()?;
        let mut tx = conn.transaction()?;
        let rows = tx.query(
            &format!(
                "SELECT {TASK_COLS} FROM tasks t WHERE t.status = 'running' AND {filter}
                 ORDER BY t.created_at, t.id FOR UPDATE SKIP LOCKED"
            ),
            &[&self.node_id, &alive_since],
        )?;
        let mut report = Recovery::default();
        let mut ended = Pending::default();
        let now = now_ms();
        for r in &rows {
            let task = task_row(self, r)?;
            if task.mode == Mode::Async && retries_left(&task) {
                tx.execute(
                    "UPDATE tasks SET status = 'queued', not_before = $2, node = NULL WHERE id = $1",
                    &[&task.task_id, &(now + backoff_ms(task.attempts))],
                )?;
                report.requeued.push(task.task_id);
            } else {
                let key = self.tenant_key(&task.tenant)?;
                let seal = Seal {
                    sealer: &self.sealer,
                    key: key.as_deref(),
                };
                complete(
                    &mut tx,
                    &task.task_id,
                    &interrupted_ending(),
                    now,
                    &mut ended,
                    seal,
                )?;
                report.interrupted.push(task.task_id);
            }
        }
        super::rollups::commit(tx, Vec::new(), ended, Vec::new())?;
        if !report.requeued.is_empty() {
            // They keep their place in the queue, behind where this node's claims start.
            self.floor.lock().reset();
            self.signal(&Signal::Queued)?;
        }
        Ok(report)
    }
}

/// A connection of its own, listening on the nodes' channel.
fn listening(pool: &super::pool::Pool) -> Result<postgres::Client> {
    let mut c = pool.listener()?;
    c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    Ok(c)
}

fn node_row(r: &postgres::Row) -> Result<NodeInfo> {
    Ok(NodeInfo {
        id: r.try_get(0)?,
        address: r.try_get(1)?,
        started_at: r.try_get(2)?,
        heartbeat_at: r.try_get(3)?,
        version: r.try_get(4)?,
    })
}

impl ClusterStore for PgStore {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn heartbeat(&self, node: &NodeInfo) -> Result<()> {
        self.pool.get()?.execute(
            "INSERT INTO nodes (id, address, started_at, heartbeat_at, version) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET address = excluded.address, started_at = excluded.started_at,
                 heartbeat_at = excluded.heartbeat_at, version = excluded.version",
            &[&node.id, &node.address, &node.started_at, &now_ms(), &node.version],
        )?;
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<NodeInfo>> {
        self.pool
            .get()?
            .query(
                "SELECT id, address, started_at, heartbeat_at, version FROM nodes ORDER BY id",
                &[],
            )?
            .iter()
            .map(node_row)
            .collect()
    }

    fn leave(&self) -> Result<()> {
        self.pool
            .get()?
            .execute("DELETE FROM nodes WHERE id = $1", &[&self.node_id])?;
        Ok(())
    }

    fn reap(
        &self,
        lease_ms: i64,
        retries_left: &dyn Fn(&Task) -> bool,
        backoff_ms: &dyn Fn(u32) -> i64,
    ) -> Result<Recovery> {
        let report = self.end_running(
            &format!("t.node IS NOT NULL AND t.node <> $1 AND {NOT_ALIVE}"),
            now_ms() - lease_ms,
            retries_left,
            backoff_ms,
        )?;
        // A node silent for a day is forgotten (one with a new name at each start, as a
        // container's, would otherwise stay listed dead for good), once nothing of its runs.
        self.pool.get()?.execute(
            "DELETE FROM nodes n WHERE n.id <> $1 AND n.heartbeat_at < $2
               AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.status = 'running' AND t.node = n.id)",
            &[&self.node_id, &(now_ms() - FORGOTTEN_AFTER_MS)],
        )?;
        Ok(report)
    }

    fn catalog_stamp(&self) -> Result<i64> {
        Ok(self
            .pool
            .get()?
            .query_one(
                "SELECT (SELECT COALESCE(MAX(updated_at), 0) + COUNT(*) FROM functions)
                      + (SELECT COALESCE(MAX(updated_at), 0) + COUNT(*) FROM secrets)",
                &[],
            )?
            .try_get::<_, Option<i64>>(0)?
            .unwrap_or(0))
    }

    fn signal(&self, signal: &Signal) -> Result<()> {
        let text = signal.encode();
        let p: [&(dyn ToSql + Sync); 2] = [&CHANNEL, &text];
        self.pool.get()?.execute("SELECT pg_notify($1, $2)", &p)?;
        Ok(())
    }

    fn listen(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Signal>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // The first connection now, so that a signal sent after this returns is heard.
        let first = listening(&self.pool)?;
        let pool = self.pool.clone();
        std::thread::Builder::new()
            .name("cloudfunc-listen".into())
            .spawn(move || {
                let mut conn = Some(first);
                while !tx.is_closed() {
                    let Some(c) = conn.as_mut() else {
                        std::thread::sleep(Duration::from_secs(1));
                        conn = listening(&pool)
                            .map_err(|e| tracing::warn!(error = %e, "listening for other nodes' signals: reconnecting"))
                            .ok();
                        continue;
                    };
                    let mut broken = false;
                    {
                        let mut heard = c.notifications();
                        let mut batch = heard.timeout_iter(Duration::from_millis(500));
                        loop {
                            match batch.next() {
                                Ok(Some(n)) => {
                                    if let Some(s) = Signal::decode(n.payload()) {
                                        let _ = tx.send(s);
                                    }
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    tracing::warn!(error = %e, "the connection listening for other nodes' signals broke");
                                    broken = true;
                                    break;
                                }
                            }
                        }
                    }
                    if broken || c.is_closed() {
                        conn = None;
                    }
                }
            })
            .map_err(|e| crate::store::StoreError::Unavailable(e.to_string()))?;
        Ok(rx)
    }
}
