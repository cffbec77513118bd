//! How the CLI prints what the server answers: each reply read into a typed view first (a
//! reply that does not fit is an error that says so, never a `?` in the output), then written
//! as text.

use serde::Deserialize;
use serde_json::Value;

use crate::model::{Task, Version};

/// A function as the list shows it.
#[derive(Debug, Deserialize)]
pub struct FunctionRow {
    pub id: String,
    pub name: String,
    pub version: u32,
    pub status: String,
}

/// `GET /api/functions/`.
#[derive(Debug, Deserialize)]
pub struct FunctionList {
    pub functions: Vec<FunctionRow>,
}

/// What a deploy or an update answers.
#[derive(Debug, Deserialize)]
pub struct Deployed {
    pub id: String,
    pub name: String,
    pub version: u32,
    pub isolation: String,
}

/// What (de)activation and deletion answer.
#[derive(Debug, Deserialize)]
pub struct Changed {
    pub name: String,
    pub status: String,
}

/// `POST .../run`.
#[derive(Debug, Deserialize)]
pub struct Queued {
    pub task_id: String,
}

/// `GET .../versions`.
#[derive(Debug, Deserialize)]
pub struct Versions {
    pub versions: Vec<Version>,
}

/// `GET .../tasks`.
#[derive(Debug, Deserialize)]
pub struct Tasks {
    pub tasks: Vec<Task>,
}

/// A distribution of a metric over a range.
#[derive(Debug, Default, Deserialize)]
pub struct Spread {
    #[serde(default)]
    pub avg: f64,
    #[serde(default)]
    pub p50: f64,
    #[serde(default)]
    pub p95: f64,
    #[serde(default)]
    pub p99: f64,
    #[serde(default)]
    pub max: f64,
}

/// `GET .../metrics`.
#[derive(Debug, Deserialize)]
pub struct Metrics {
    pub invocations: u64,
    pub errors: u64,
    pub error_rate: f64,
    #[serde(default)]
    pub cold_starts: u64,
    #[serde(default)]
    pub duration_ms: Spread,
    #[serde(default)]
    pub cpu_ms: Spread,
    #[serde(default)]
    pub peak_memory_bytes: Spread,
}

/// Reads a reply as `T`.
pub fn read<T: serde::de::DeserializeOwned>(body: Value) -> anyhow::Result<T> {
    let text = body.to_string();
    serde_json::from_value(body).map_err(|e| {
        anyhow::anyhow!("the server's reply was not what this CLI expects ({e}): {text}")
    })
}

fn mib(bytes: f64) -> f64 {
    bytes / 1048576.0
}

/// A task: its id, function, status, usage, then result or error, then logs.
pub fn task(t: &Task) -> String {
    let mut out = format!(
        "task {}  {}@{}  {}",
        t.task_id,
        t.function,
        t.version,
        t.status.as_str()
    );
    if let Some(u) = &t.usage {
        let start = if u.cold {
            format!(" (cold, init {:.1} ms)", u.init_duration_ms)
        } else {
            " (warm)".into()
        };
        out += &format!(
            "  {:.1} ms{start}  cpu {:.1} ms  mem {:.1} MiB  {} ({})",
            u.duration_ms,
            u.cpu_ms,
            mib(u.peak_memory_bytes as f64),
            u.isolation,
            u.backend
        );
    }
    if let Some(r) = &t.result {
        let text = match r.as_str() {
            Some(s) => s.to_string(),
            None => r.to_string(),
        };
        out += &format!("\nresult: {text}");
    }
    if let Some(e) = &t.error {
        out += &format!("\nerror: {} {}: {}", e.kind, e.error_type, e.message);
        if !e.traceback.is_empty() {
            out += &format!("\n{}", e.traceback);
        }
    }
    if !t.logs.is_empty() {
        out += &format!("\nlogs:\n{}", t.logs.trim_end());
    }
    out
}

/// The function list as a table.
pub fn functions(list: &FunctionList) -> String {
    let mut out = format!("{:<24} {:<8} {:<9} {}", "NAME", "VERSION", "STATUS", "ID");
    for f in &list.functions {
        out += &format!("\n{:<24} {:<8} {:<9} {}", f.name, f.version, f.status, f.id);
    }
    out
}

/// Recent tasks' logs, oldest first.
pub fn logs(tasks: &Tasks) -> String {
    let mut out = String::new();
    for t in tasks.tasks.iter().rev() {
        out += &format!(
            "--- {} {} {} UTC\n{}\n",
            t.task_id,
            t.status.as_str(),
            cloudfunc_anomaly::nab::format_timestamp(t.created_at.div_euclid(1000)),
            t.logs.trim_end()
        );
    }
    out.trim_end().to_string()
}

/// A metrics summary.
pub fn metrics(m: &Metrics) -> String {
    format!(
        "invocations {}  errors {} ({:.1}%)  cold starts {}\nduration ms  p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}\ncpu ms avg {:.2}  peak memory max {:.1} MiB",
        m.invocations,
        m.errors,
        m.error_rate * 100.0,
        m.cold_starts,
        m.duration_ms.p50,
        m.duration_ms.p95,
        m.duration_ms.p99,
        m.duration_ms.max,
        m.cpu_ms.avg,
        mib(m.peak_memory_bytes.max)
    )
}

/// A function's versions, one per line.
pub fn versions(v: &Versions) -> String {
    v.versions
        .iter()
        .map(|v| {
            format!(
                "v{}  {}  {}  handler {}  timeout {} ms  memory {} MiB",
                v.version,
                v.runtime,
                v.isolation,
                v.handler.as_deref().unwrap_or("(convention)"),
                v.timeout_ms,
                v.memory_mb
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_task_reply_renders_and_a_wrong_reply_is_an_error() {
        let t: Task = read(json!({
            "task_id": "task_1", "function_id": "fn_1", "function": "hello", "version": 2,
            "mode": "sync", "status": "failed", "payload": {}, "logs": "printed\n",
            "logs_truncated": false, "attempts": 1, "created_at": 5,
            "error": {"kind": "raised", "type": "ValueError", "message": "no", "traceback": "tb"},
            "usage": {"duration_ms": 1.25, "init_duration_ms": 0.0, "cpu_ms": 0.5,
                      "peak_memory_bytes": 2097152, "cold": false, "backend": "libcontainer"}
        }))
        .unwrap();
        let text = task(&t);
        assert!(
            text.starts_with("task task_1  hello@2  failed  1.2 ms (warm)"),
            "{text}"
        );
        assert!(
            text.contains("mem 2.0 MiB  container (libcontainer)"),
            "{text}"
        );
        assert!(
            text.contains("error: raised ValueError: no\ntb\nlogs:\nprinted"),
            "{text}"
        );
        let listed = Tasks { tasks: vec![t] };
        assert_eq!(
            logs(&listed),
            "--- task_1 failed 1970-01-01 00:00:00 UTC\nprinted"
        );
        let wrong = read::<Task>(json!({"task_id": 3}));
        assert!(wrong
            .unwrap_err()
            .to_string()
            .contains("not what this CLI expects"));
    }
}
