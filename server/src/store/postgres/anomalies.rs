//! Anomaly detection's tables on PostgreSQL: saved series, the minute watched through, scored
//! points and events.

use postgres::Row;

use super::pool::Conn;
use crate::anomalies::{Event, Key, Point, Saved, Series};
use crate::store::{Result, StoreError};

fn series_of(name: &str) -> Result<Series> {
    Series::parse(name).ok_or_else(|| {
        StoreError::Damaged(format!(
            "a stored anomaly series {name:?} is unknown to this cloudfunc"
        ))
    })
}

pub(super) fn state(conn: &mut Conn) -> Result<(Option<i64>, Vec<Saved>)> {
    let through = conn
        .query_opt("SELECT through FROM anomaly_progress WHERE id = 1", &[])?
        .map(|r| r.try_get(0))
        .transpose()?;
    let saved = conn
        .query(
            "SELECT function_id, series, tenant, function, detector, rest FROM anomaly_series",
            &[],
        )?
        .iter()
        .map(|r| {
            Ok(Saved {
                key: Key {
                    function_id: r.try_get(0)?,
                    series: series_of(r.try_get(1)?)?,
                },
                tenant: r.try_get(2)?,
                function: r.try_get(3)?,
                detector: r.try_get(4)?,
                rest: serde_json::from_str(r.try_get(5)?)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok((through, saved))
}

pub(super) fn save_state(conn: &mut Conn, through: i64, saved: &[Saved]) -> Result<()> {
    let mut tx = conn.transaction()?;
    tx.execute("DELETE FROM anomaly_series", &[])?;
    for s in saved {
        tx.execute(
            "INSERT INTO anomaly_series (function_id, series, tenant, function, detector, rest)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &s.key.function_id,
                &s.key.series.name(),
                &s.tenant,
                &s.function,
                &s.detector,
                &serde_json::to_string(&s.rest)?,
            ],
        )?;
    }
    tx.execute(
        "INSERT INTO anomaly_progress (id, through) VALUES (1, $1)
         ON CONFLICT (id) DO UPDATE SET through = excluded.through",
        &[&through],
    )?;
    tx.commit()
}

pub(super) fn record(
    conn: &mut Conn,
    scored: &[(Key, String, Point)],
    events: &[Event],
) -> Result<()> {
    let mut tx = conn.transaction()?;
    for (key, tenant, p) in scored {
        tx.execute(
            "INSERT INTO anomaly_scores (function_id, minute, series, tenant, value, score)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (function_id, minute, series) DO UPDATE SET tenant = excluded.tenant,
                 value = excluded.value, score = excluded.score",
            &[
                &key.function_id,
                &p.minute,
                &key.series.name(),
                tenant,
                &p.value,
                &p.score,
            ],
        )?;
    }
    for e in events {
        tx.execute(
            "INSERT INTO anomaly_events
                 (id, tenant, function_id, function, series, started, ended, peak_score, peak_at, points)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (id) DO UPDATE SET tenant = excluded.tenant, function_id = excluded.function_id,
                 function = excluded.function, series = excluded.series, started = excluded.started,
                 ended = excluded.ended, peak_score = excluded.peak_score, peak_at = excluded.peak_at,
                 points = excluded.points",
            &[
                &e.id,
                &e.tenant,
                &e.function_id,
                &e.function,
                &e.series.name(),
                &e.started,
                &e.ended,
                &e.peak_score,
                &e.peak_at,
                &serde_json::to_string(&e.points)?,
            ],
        )?;
    }
    tx.commit()
}

fn event_row(r: &Row) -> Result<Event> {
    Ok(Event {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        function_id: r.try_get(2)?,
        function: r.try_get(3)?,
        series: series_of(r.try_get(4)?)?,
        started: r.try_get(5)?,
        ended: r.try_get(6)?,
        peak_score: r.try_get(7)?,
        peak_at: r.try_get(8)?,
        points: serde_json::from_str(r.try_get(9)?)?,
    })
}

pub(super) fn events(
    conn: &mut Conn,
    tenant: Option<&str>,
    function_id: Option<&str>,
    since: i64,
    until: i64,
    limit: u32,
) -> Result<Vec<Event>> {
    conn.query(
        "SELECT id, tenant, function_id, function, series, started, ended, peak_score, peak_at, points
         FROM anomaly_events
         WHERE ($1::TEXT IS NULL OR tenant = $1) AND ($2::TEXT IS NULL OR function_id = $2)
           AND ((started >= $3 AND started < $4) OR ended IS NULL)
         ORDER BY started DESC, id LIMIT $5",
        &[&tenant, &function_id, &since, &until, &i64::from(limit)],
    )?
    .iter()
    .map(event_row)
    .collect()
}

pub(super) fn scores(
    conn: &mut Conn,
    tenant: Option<&str>,
    function_id: &str,
    since: i64,
    until: i64,
) -> Result<Vec<(Series, Point)>> {
    conn.query(
        "SELECT series, minute, value, score FROM anomaly_scores
         WHERE function_id = $1 AND minute >= $2 AND minute < $3 AND ($4::TEXT IS NULL OR tenant = $4)
         ORDER BY minute, series",
        &[&function_id, &since, &until, &tenant],
    )?
    .iter()
    .map(|r| {
        Ok((
            series_of(r.try_get(0)?)?,
            Point {
                minute: r.try_get(1)?,
                value: r.try_get(2)?,
                score: r.try_get(3)?,
            },
        ))
    })
    .collect()
}

pub(super) fn prune(conn: &mut Conn, before: i64) -> Result<u64> {
    let scores = conn.execute("DELETE FROM anomaly_scores WHERE minute < $1", &[&before])?;
    let events = conn.execute(
        "DELETE FROM anomaly_events WHERE ended IS NOT NULL AND ended < $1",
        &[&before],
    )?;
    Ok(scores + events)
}
