//! The rollup tables on PostgreSQL ([`crate::rollup`]), written in the transaction that
//! stores the calls, as on SQLite. Rows are upserted in key order, so that two nodes' batches
//! touching the same rows wait for each other instead of deadlocking.

use postgres::types::ToSql;

use super::pool::{Conn, Queued, Tx};
use crate::rollup::Stats;
use crate::store::records::{u64_of, Pending, RowKey, RowSum};
use crate::store::{Result, Rollup};

/// The columns of a rollup row, as inserted.
pub(super) const ROW_COLUMNS: &str =
    "resolution, function_id, outcome, start, tenant, function, count, timed,
    cold, duration_sum, duration_max, init_sum, cpu_sum, cpu_max, memory_sum, memory_max";

/// A row inserted again adds to the one there.
pub(super) const ON_ROW: &str =
    "ON CONFLICT (resolution, function_id, outcome, start) DO UPDATE SET
    count = rollups.count + excluded.count, timed = rollups.timed + excluded.timed,
    cold = rollups.cold + excluded.cold,
    duration_sum = rollups.duration_sum + excluded.duration_sum,
    duration_max = GREATEST(rollups.duration_max, excluded.duration_max),
    init_sum = rollups.init_sum + excluded.init_sum,
    cpu_sum = rollups.cpu_sum + excluded.cpu_sum,
    cpu_max = GREATEST(rollups.cpu_max, excluded.cpu_max),
    memory_sum = rollups.memory_sum + excluded.memory_sum,
    memory_max = GREATEST(rollups.memory_max, excluded.memory_max),
    function = excluded.function";

/// The columns of a histogram bin, as inserted.
pub(super) const BIN_COLUMNS: &str = "resolution, function_id, outcome, start, bin, tenant, count";

/// A bin inserted again adds to the one there.
pub(super) const ON_BIN: &str =
    "ON CONFLICT (resolution, function_id, outcome, start, bin) DO UPDATE SET
    count = rollup_bins.count + excluded.count";

/// Runs `before`, adds what was gathered to the tables (one statement for the rows and one
/// for the bins, however many, in key order), runs `after`, and commits: all sent at once.
pub(super) fn commit<'a>(
    tx: Tx<'_>,
    before: Vec<Queued<'a>>,
    pending: Pending,
    after: Vec<Queued<'a>>,
) -> Result<()> {
    let mut steps = before;
    if !pending.rows.is_empty() {
        let mut rows: Vec<_> = pending.rows.into_iter().collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let col = |f: fn(&RowSum) -> f64| -> Box<dyn ToSql + Sync> {
            Box::new(rows.iter().map(|(_, r)| f(r)).collect::<Vec<f64>>())
        };
        let int = |f: fn(&RowSum) -> i64| -> Box<dyn ToSql + Sync> {
            Box::new(rows.iter().map(|(_, r)| f(r)).collect::<Vec<i64>>())
        };
        let key = |f: fn(&RowKey) -> i64| -> Box<dyn ToSql + Sync> {
            Box::new(rows.iter().map(|(k, _)| f(k)).collect::<Vec<i64>>())
        };
        let text = |f: fn(&(RowKey, RowSum)) -> &str| -> Box<dyn ToSql + Sync> {
            Box::new(
                rows.iter()
                    .map(|r| f(r).to_string())
                    .collect::<Vec<String>>(),
            )
        };
        steps.push(Queued {
            sql: format!(
                "INSERT INTO rollups ({ROW_COLUMNS})
                 SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::text[], $7::int8[],
                     $8::int8[], $9::int8[], $10::float8[], $11::float8[], $12::float8[], $13::float8[], $14::float8[],
                     $15::float8[], $16::int8[])
                 {ON_ROW}"
            ),
            params: vec![
                key(|k| k.0),
                text(|(k, _)| &k.1),
                text(|(k, _)| &k.2),
                key(|k| k.3),
                text(|(_, r)| &r.tenant),
                text(|(_, r)| &r.function),
                int(|r| r.count),
                int(|r| r.timed),
                int(|r| r.cold),
                col(|r| r.duration_sum),
                col(|r| r.duration_max),
                col(|r| r.init_sum),
                col(|r| r.cpu_sum),
                col(|r| r.cpu_max),
                col(|r| r.memory_sum),
                int(|r| r.memory_max),
            ],
        });
    }
    if !pending.bins.is_empty() {
        let mut bins: Vec<_> = pending.bins.into_iter().collect();
        bins.sort_by(|a, b| a.0.cmp(&b.0));
        let resolution: Vec<i64> = bins.iter().map(|((k, _), _)| k.0).collect();
        let function_id: Vec<String> = bins.iter().map(|((k, _), _)| k.1.clone()).collect();
        let outcome: Vec<String> = bins.iter().map(|((k, _), _)| k.2.clone()).collect();
        let start: Vec<i64> = bins.iter().map(|((k, _), _)| k.3).collect();
        let bin: Vec<i64> = bins.iter().map(|((_, b), _)| *b).collect();
        let count: Vec<i64> = bins.iter().map(|(_, (_, n))| *n).collect();
        let tenant: Vec<String> = bins.into_iter().map(|(_, (t, _))| t).collect();
        steps.push(Queued {
            sql: format!(
                "INSERT INTO rollup_bins ({BIN_COLUMNS})
                 SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::text[], $7::int8[])
                 {ON_BIN}"
            ),
            params: vec![
                Box::new(resolution),
                Box::new(function_id),
                Box::new(outcome),
                Box::new(start),
                Box::new(bin),
                Box::new(tenant),
                Box::new(count),
            ],
        });
    }
    steps.extend(after);
    tx.commit_after(&steps)?;
    Ok(())
}

/// Rollup rows of one resolution in `[since, until)`, for a tenant (or all) and a function
/// (or all), with their histograms.
pub(super) fn read(
    conn: &mut Conn,
    tenant: Option<&str>,
    function_id: Option<&str>,
    resolution: i64,
    since: i64,
    until: i64,
) -> Result<Vec<Rollup>> {
    let rows = conn.query(
        "SELECT start, tenant, function_id, function, outcome, count, timed, cold, duration_sum, duration_max,
                init_sum, cpu_sum, cpu_max, memory_sum, memory_max
         FROM rollups
         WHERE resolution = $1 AND start >= $2 AND start < $3 AND ($4::TEXT IS NULL OR tenant = $4) AND ($5::TEXT IS NULL OR function_id = $5)
         ORDER BY start, function_id, outcome",
        &[&resolution, &since, &until, &tenant, &function_id],
    )?;
    let mut out: Vec<Rollup> = rows
        .iter()
        .map(|r| {
            let outcome: String = r.try_get(4)?;
            let count = u64_of(r.try_get(5)?);
            let mut stats = Stats {
                count,
                timed: u64_of(r.try_get(6)?),
                cold: u64_of(r.try_get(7)?),
                duration_sum: r.try_get(8)?,
                duration_max: r.try_get(9)?,
                init_sum: r.try_get(10)?,
                cpu_sum: r.try_get(11)?,
                cpu_max: r.try_get(12)?,
                memory_sum: r.try_get(13)?,
                memory_max: u64_of(r.try_get(14)?),
                ..Stats::default()
            };
            if outcome != "succeeded" {
                stats.errors_by_kind.insert(outcome.clone(), count);
            }
            Ok(Rollup {
                start: r.try_get(0)?,
                tenant: r.try_get(1)?,
                function_id: r.try_get(2)?,
                function: r.try_get(3)?,
                outcome,
                stats,
            })
        })
        .collect::<Result<_>>()?;
    let bins = conn.query(
        "SELECT start, function_id, outcome, bin, count FROM rollup_bins
         WHERE resolution = $1 AND start >= $2 AND start < $3 AND ($4::TEXT IS NULL OR tenant = $4) AND ($5::TEXT IS NULL OR function_id = $5)",
        &[&resolution, &since, &until, &tenant, &function_id],
    )?;
    for r in &bins {
        let (start, fid, outcome, b, n): (i64, String, String, i64, i64) = (
            r.try_get(0)?,
            r.try_get(1)?,
            r.try_get(2)?,
            r.try_get(3)?,
            r.try_get(4)?,
        );
        let at = out.binary_search_by(|row| {
            (row.start, row.function_id.as_str(), row.outcome.as_str()).cmp(&(
                start,
                fid.as_str(),
                outcome.as_str(),
            ))
        });
        if let (Ok(i), Ok(b)) = (at, usize::try_from(b)) {
            out[i].stats.bins.insert(b, u64_of(n));
        }
    }
    Ok(out)
}

/// Removes rollups of `resolution` that start before `before`; returns how many rows.
pub(super) fn prune(conn: &mut Conn, resolution: i64, before: i64) -> Result<u64> {
    let mut tx = conn.transaction()?;
    let n = tx.execute(
        "DELETE FROM rollups WHERE resolution = $1 AND start < $2",
        &[&resolution, &before],
    )?;
    tx.execute(
        "DELETE FROM rollup_bins WHERE resolution = $1 AND start < $2",
        &[&resolution, &before],
    )?;
    tx.commit()?;
    Ok(n)
}
