//! SQLite tables of the rollups ([`crate::rollup`]): one row per resolution, function,
//! outcome and bucket, with its duration histogram in a side table. A finished call is added
//! in the transaction that stores it, so the rollups never miss or double-count one.

use rusqlite::{params, Connection};

use crate::rollup::{Call, Stats};
use crate::store::records::{u64_of, Pending};
use crate::store::Rollup;

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS rollups (
    resolution INTEGER NOT NULL,
    function_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    start INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    function TEXT NOT NULL,
    count INTEGER NOT NULL,
    timed INTEGER NOT NULL,
    cold INTEGER NOT NULL,
    duration_sum REAL NOT NULL,
    duration_max REAL NOT NULL,
    init_sum REAL NOT NULL,
    cpu_sum REAL NOT NULL,
    cpu_max REAL NOT NULL,
    memory_sum REAL NOT NULL,
    memory_max INTEGER NOT NULL,
    PRIMARY KEY (resolution, function_id, outcome, start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollups_time ON rollups (resolution, start);
CREATE TABLE IF NOT EXISTS rollup_bins (
    resolution INTEGER NOT NULL,
    function_id TEXT NOT NULL,
    outcome TEXT NOT NULL,
    start INTEGER NOT NULL,
    bin INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (resolution, function_id, outcome, start, bin)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollup_bins_time ON rollup_bins (resolution, start);
"#;

impl Pending {
    /// Adds what was gathered to the tables, one statement per row and bin.
    pub(super) fn flush(self, conn: &Connection) -> rusqlite::Result<()> {
        let mut upsert_row = conn.prepare_cached(
            "INSERT INTO rollups (resolution, function_id, outcome, start, tenant, function, count, timed, cold,
                 duration_sum, duration_max, init_sum, cpu_sum, cpu_max, memory_sum, memory_max)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
             ON CONFLICT (resolution, function_id, outcome, start) DO UPDATE SET
                 count = count + excluded.count, timed = timed + excluded.timed,
                 cold = cold + excluded.cold,
                 duration_sum = duration_sum + excluded.duration_sum,
                 duration_max = MAX(duration_max, excluded.duration_max),
                 init_sum = init_sum + excluded.init_sum,
                 cpu_sum = cpu_sum + excluded.cpu_sum, cpu_max = MAX(cpu_max, excluded.cpu_max),
                 memory_sum = memory_sum + excluded.memory_sum,
                 memory_max = MAX(memory_max, excluded.memory_max), function = excluded.function",
        )?;
        for ((resolution, function_id, outcome, start), r) in &self.rows {
            upsert_row.execute(params![
                resolution,
                function_id,
                outcome,
                start,
                r.tenant,
                r.function,
                r.count,
                r.timed,
                r.cold,
                r.duration_sum,
                r.duration_max,
                r.init_sum,
                r.cpu_sum,
                r.cpu_max,
                r.memory_sum,
                r.memory_max,
            ])?;
        }
        let mut upsert_bin = conn.prepare_cached(
            "INSERT INTO rollup_bins (resolution, function_id, outcome, start, bin, tenant, count)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (resolution, function_id, outcome, start, bin) DO UPDATE SET
                 count = count + excluded.count",
        )?;
        for (((resolution, function_id, outcome, start), bin), (tenant, count)) in &self.bins {
            upsert_bin.execute(params![
                resolution,
                function_id,
                outcome,
                start,
                bin,
                tenant,
                count
            ])?;
        }
        Ok(())
    }
}

/// Rollup rows of one resolution in `[since, until)`, for a tenant (or all) and a function
/// (or all), with their histograms.
pub(super) fn read(
    conn: &Connection,
    tenant: Option<&str>,
    function_id: Option<&str>,
    resolution: i64,
    since: i64,
    until: i64,
) -> rusqlite::Result<Vec<Rollup>> {
    let mut stmt = conn.prepare_cached(
        "SELECT start, tenant, function_id, function, outcome, count, timed, cold, duration_sum, duration_max,
                init_sum, cpu_sum, cpu_max, memory_sum, memory_max
         FROM rollups
         WHERE resolution = ?1 AND start >= ?2 AND start < ?3 AND (?4 IS NULL OR tenant = ?4) AND (?5 IS NULL OR function_id = ?5)
         ORDER BY start, function_id, outcome",
    )?;
    let mut rows: Vec<Rollup> = stmt
        .query_map(
            params![resolution, since, until, tenant, function_id],
            |r| {
                let outcome: String = r.get(4)?;
                let count = u64_of(r.get(5)?);
                let mut stats = Stats {
                    count,
                    timed: u64_of(r.get(6)?),
                    cold: u64_of(r.get(7)?),
                    duration_sum: r.get(8)?,
                    duration_max: r.get(9)?,
                    init_sum: r.get(10)?,
                    cpu_sum: r.get(11)?,
                    cpu_max: r.get(12)?,
                    memory_sum: r.get(13)?,
                    memory_max: u64_of(r.get(14)?),
                    ..Stats::default()
                };
                if outcome != "succeeded" {
                    stats.errors_by_kind.insert(outcome.clone(), count);
                }
                Ok(Rollup {
                    start: r.get(0)?,
                    tenant: r.get(1)?,
                    function_id: r.get(2)?,
                    function: r.get(3)?,
                    outcome,
                    stats,
                })
            },
        )?
        .collect::<rusqlite::Result<_>>()?;
    let mut bins = conn.prepare_cached(
        "SELECT start, function_id, outcome, bin, count FROM rollup_bins
         WHERE resolution = ?1 AND start >= ?2 AND start < ?3 AND (?4 IS NULL OR tenant = ?4) AND (?5 IS NULL OR function_id = ?5)",
    )?;
    let found = bins.query_map(
        params![resolution, since, until, tenant, function_id],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        },
    )?;
    for bin in found {
        let (start, fid, outcome, b, n) = bin?;
        let at = rows.binary_search_by(|row| {
            (row.start, row.function_id.as_str(), row.outcome.as_str()).cmp(&(
                start,
                fid.as_str(),
                outcome.as_str(),
            ))
        });
        if let (Ok(i), Ok(b)) = (at, usize::try_from(b)) {
            rows[i].stats.bins.insert(b, u64_of(n));
        }
    }
    Ok(rows)
}

/// Removes rollups of `resolution` that start before `before`; returns how many rows.
pub(super) fn prune(conn: &Connection, resolution: i64, before: i64) -> rusqlite::Result<u64> {
    let n = conn.execute(
        "DELETE FROM rollups WHERE resolution = ?1 AND start < ?2",
        params![resolution, before],
    )?;
    conn.execute(
        "DELETE FROM rollup_bins WHERE resolution = ?1 AND start < ?2",
        params![resolution, before],
    )?;
    Ok(n as u64)
}

/// A database from before rollups: adds every finished task once, when the table is new.
pub(super) fn backfill(conn: &Connection) -> rusqlite::Result<u64> {
    let empty: bool = conn.query_row("SELECT NOT EXISTS (SELECT 1 FROM rollups)", [], |r| {
        r.get(0)
    })?;
    if !empty {
        return Ok(0);
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT tenant, function_id, function, {} FROM tasks WHERE finished_at IS NOT NULL",
        super::rows::CALL_COLS
    ))?;
    let calls: Vec<(String, String, String, Call)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                super::rows::call_row(r, 3)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut pending = Pending::default();
    for (tenant, fid, name, call) in &calls {
        pending.add(tenant, fid, name, call);
    }
    pending.flush(conn)?;
    Ok(calls.len() as u64)
}

#[cfg(test)]
mod tests {
    use crate::model::{Completion, Function, Mode, TaskError, TaskStatus, TaskUsage};
    use crate::store::{SqliteStore, Store, Write};

    const OUTCOMES: [&str; 4] = ["succeeded", "raised", "timeout", "throttled"];
    const T0: i64 = 1_700_000_000_000;

    /// One generated call: function, outcome, offset from T0, cold, duration, cpu, memory.
    type Gen = (usize, usize, i64, bool, f64, f64, u64);

    fn completion(outcome: &str, cold: bool, ms: f64, cpu: f64, mem: u64) -> Completion {
        let status = match outcome {
            "succeeded" => TaskStatus::Succeeded,
            "timeout" => TaskStatus::Timeout,
            _ => TaskStatus::Failed,
        };
        let error = (outcome != "succeeded").then(|| TaskError {
            kind: crate::model::ErrorKind::parse(outcome).expect("a known kind"),
            error_type: String::new(),
            message: String::new(),
            traceback: String::new(),
        });
        let usage = (outcome != "throttled").then(|| TaskUsage {
            duration_ms: ms,
            init_duration_ms: if cold { ms / 3.0 } else { 0.0 },
            cpu_ms: cpu,
            peak_memory_bytes: mem,
            cold,
            ..TaskUsage::default()
        });
        Completion {
            status,
            result: None,
            error,
            logs: String::new(),
            logs_truncated: false,
            usage,
        }
    }

    fn store_with(calls: &[Gen]) -> (tempfile::TempDir, SqliteStore, Vec<Function>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).unwrap();
        let functions: Vec<Function> = [("a", "one"), ("a", "two"), ("b", "one")]
            .iter()
            .map(|(tenant, name)| {
                let (id, n) = store.next_version(tenant, name).unwrap();
                let v = crate::store::sqlite::tests::version(n);
                store.add_version(tenant, &id, name, &v).unwrap()
            })
            .collect();
        // Stored in batches of up to five calls, as the recorder commits them: a batch adds
        // up its calls' rollups before it writes them.
        let mut batch = Vec::new();
        for (i, (f, outcome, offset, cold, ms, cpu, mem)) in calls.iter().enumerate() {
            let function = &functions[*f];
            let task = crate::store::sqlite::tests::task(&function.tenant, function, Mode::Sync);
            let c = completion(OUTCOMES[*outcome], *cold, *ms, *cpu, *mem);
            // Both ways a task is stored: queued then ended, or only once ended (sync calls).
            if i % 2 == 0 {
                let task_id = task.task_id.clone();
                batch.push(Write::Insert(task));
                batch.push(Write::Complete {
                    task_id,
                    tenant: function.tenant.clone(),
                    completion: c,
                    at: T0 + offset,
                });
            } else {
                batch.push(Write::Finished {
                    task: Box::new(task),
                    completion: c,
                    at: T0 + offset,
                });
            }
            if i % 5 == 4 || i + 1 == calls.len() {
                store.write(&batch).unwrap();
                batch.clear();
            }
        }
        (dir, store, functions)
    }

    #[test]
    fn an_old_database_is_backfilled_once() {
        let (dir, store, _) =
            store_with(&[(0, 0, 5, false, 1.0, 1.0, 1), (2, 2, 7, false, 2.0, 1.0, 1)]);
        drop(store);
        let conn = rusqlite::Connection::open(dir.path().join("db")).unwrap();
        // As written before rollups (and the schema's version table) existed.
        conn.execute_batch(
            "DROP TABLE rollups; DROP TABLE rollup_bins; DROP TABLE schema_version;",
        )
        .unwrap();
        drop(conn);
        for _ in 0..2 {
            let store = SqliteStore::open(&dir.path().join("db")).unwrap();
            let rows = store.rollups(None, None, 86_400_000, 0, i64::MAX).unwrap();
            assert_eq!(rows.iter().map(|r| r.stats.count).sum::<u64>(), 2);
            assert_eq!(
                rows.iter()
                    .map(|r| r.stats.bins.values().sum::<u64>())
                    .sum::<u64>(),
                2
            );
        }
    }
}
