//! SQLite tables of anomaly detection: the saved series (a detector's state as a blob), the
//! minute watched through, the scored points and the events.

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::anomalies::{Event, Key, Point, Saved, Series};
use crate::store::{Result, StoreError};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS anomaly_series (
    function_id TEXT NOT NULL,
    series TEXT NOT NULL,
    tenant TEXT NOT NULL,
    function TEXT NOT NULL,
    detector BLOB NOT NULL,
    rest TEXT NOT NULL,
    PRIMARY KEY (function_id, series)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS anomaly_progress (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    through INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS anomaly_scores (
    function_id TEXT NOT NULL,
    minute INTEGER NOT NULL,
    series TEXT NOT NULL,
    tenant TEXT NOT NULL,
    value REAL NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (function_id, minute, series)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS anomaly_scores_time ON anomaly_scores (minute);
CREATE TABLE IF NOT EXISTS anomaly_events (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    function_id TEXT NOT NULL,
    function TEXT NOT NULL,
    series TEXT NOT NULL,
    started INTEGER NOT NULL,
    ended INTEGER,
    peak_score REAL NOT NULL,
    peak_at INTEGER NOT NULL,
    points TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS anomaly_events_function ON anomaly_events (function_id, started);
CREATE INDEX IF NOT EXISTS anomaly_events_time ON anomaly_events (started);
"#;

fn series_of(name: &str) -> rusqlite::Result<Series> {
    Series::parse(name).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("unknown series {name:?}").into(),
        )
    })
}

pub(super) fn state(conn: &Connection) -> Result<(Option<i64>, Vec<Saved>)> {
    let through = conn
        .query_row(
            "SELECT through FROM anomaly_progress WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let mut stmt = conn.prepare(
        "SELECT function_id, series, tenant, function, detector, rest FROM anomaly_series",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            series_of(&r.get::<_, String>(1)?)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Vec<u8>>(4)?,
            r.get::<_, String>(5)?,
        ))
    })?;
    let mut saved = Vec::new();
    for row in rows {
        let (function_id, series, tenant, function, detector, rest) = row?;
        saved.push(Saved {
            key: Key {
                function_id,
                series,
            },
            tenant,
            function,
            detector,
            rest: serde_json::from_str(&rest)?,
        });
    }
    Ok((through, saved))
}

pub(super) fn save_state(conn: &mut Connection, through: i64, saved: &[Saved]) -> Result<()> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM anomaly_series", [])?;
    {
        let mut put = tx.prepare_cached(
            "INSERT INTO anomaly_series (function_id, series, tenant, function, detector, rest)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for s in saved {
            put.execute(params![
                s.key.function_id,
                s.key.series.name(),
                s.tenant,
                s.function,
                s.detector,
                serde_json::to_string(&s.rest)?,
            ])?;
        }
    }
    tx.execute(
        "INSERT INTO anomaly_progress (id, through) VALUES (1, ?1)
         ON CONFLICT (id) DO UPDATE SET through = excluded.through",
        params![through],
    )?;
    tx.commit()?;
    Ok(())
}

pub(super) fn record(
    conn: &mut Connection,
    scored: &[(Key, String, Point)],
    events: &[Event],
) -> Result<()> {
    let tx = conn.transaction()?;
    {
        let mut score = tx.prepare_cached(
            "INSERT OR REPLACE INTO anomaly_scores (function_id, minute, series, tenant, value, score)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for (key, tenant, p) in scored {
            score.execute(params![
                key.function_id,
                p.minute,
                key.series.name(),
                tenant,
                p.value,
                p.score
            ])?;
        }
        let mut event = tx.prepare_cached(
            "INSERT OR REPLACE INTO anomaly_events
                 (id, tenant, function_id, function, series, started, ended, peak_score, peak_at, points)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for e in events {
            event.execute(params![
                e.id,
                e.tenant,
                e.function_id,
                e.function,
                e.series.name(),
                e.started,
                e.ended,
                e.peak_score,
                e.peak_at,
                serde_json::to_string(&e.points)?,
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

fn event_row(r: &Row) -> rusqlite::Result<(Event, String)> {
    Ok((
        Event {
            id: r.get(0)?,
            tenant: r.get(1)?,
            function_id: r.get(2)?,
            function: r.get(3)?,
            series: series_of(&r.get::<_, String>(4)?)?,
            started: r.get(5)?,
            ended: r.get(6)?,
            peak_score: r.get(7)?,
            peak_at: r.get(8)?,
            points: Vec::new(),
        },
        r.get(9)?,
    ))
}

pub(super) fn events(
    conn: &Connection,
    tenant: Option<&str>,
    function_id: Option<&str>,
    since: i64,
    until: i64,
    limit: u32,
) -> Result<Vec<Event>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, tenant, function_id, function, series, started, ended, peak_score, peak_at, points
         FROM anomaly_events
         WHERE (?1 IS NULL OR tenant = ?1) AND (?2 IS NULL OR function_id = ?2)
           AND ((started >= ?3 AND started < ?4) OR ended IS NULL)
         ORDER BY started DESC, id LIMIT ?5",
    )?;
    let rows = stmt.query_map(params![tenant, function_id, since, until, limit], event_row)?;
    let mut out = Vec::new();
    for row in rows {
        let (mut event, points) = row?;
        event.points = serde_json::from_str(&points).map_err(StoreError::Corrupt)?;
        out.push(event);
    }
    Ok(out)
}

pub(super) fn scores(
    conn: &Connection,
    tenant: Option<&str>,
    function_id: &str,
    since: i64,
    until: i64,
) -> Result<Vec<(Series, Point)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT series, minute, value, score FROM anomaly_scores
         WHERE function_id = ?1 AND minute >= ?2 AND minute < ?3 AND (?4 IS NULL OR tenant = ?4)
         ORDER BY minute, series",
    )?;
    let rows = stmt.query_map(params![function_id, since, until, tenant], |r| {
        Ok((
            series_of(&r.get::<_, String>(0)?)?,
            Point {
                minute: r.get(1)?,
                value: r.get(2)?,
                score: r.get(3)?,
            },
        ))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub(super) fn prune(conn: &Connection, before: i64) -> Result<u64> {
    let scores = conn.execute(
        "DELETE FROM anomaly_scores WHERE minute < ?1",
        params![before],
    )?;
    let events = conn.execute(
        "DELETE FROM anomaly_events WHERE ended IS NOT NULL AND ended < ?1",
        params![before],
    )?;
    Ok(u64::try_from(scores + events).unwrap_or(u64::MAX))
}
