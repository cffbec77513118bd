//! The platform's records: functions, their versions, and tasks (one per invocation).

use cloudfunc_sandbox::Runtime;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::isolation::Isolation;

/// A function: a name owned by a tenant, with numbered versions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Function {
    /// `fn_` and 16 hex digits.
    pub id: String,
    /// The owner (the token's subject).
    pub tenant: String,
    /// `^[a-z0-9_-]{1,64}$`, unique per tenant.
    pub name: String,
    /// The newest version; new runs use it unless a version is named.
    pub version: u32,
    /// Whether it may be run.
    pub active: bool,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub updated_at: i64,
}

/// One deployed version: its code and settings. Immutable once written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    /// The version number, from 1.
    pub version: u32,
    /// The language runtime.
    pub runtime: Runtime,
    /// `module.function`, or `None` for the conventions.
    pub handler: Option<String>,
    /// Wall-clock limit per call.
    pub timeout_ms: u64,
    /// Memory limit.
    pub memory_mb: u64,
    /// CPU limit in thousandths of a core.
    pub cpu_millicores: u32,
    /// Environment variables the function sees.
    pub env: std::collections::BTreeMap<String, String>,
    /// Retries of an async task interrupted by a crash (0: at most once).
    pub max_retries: u32,
    /// `container` or `gvisor` (versions stored before the setting existed ran in containers).
    #[serde(default)]
    pub isolation: Isolation,
    /// Seconds an idle sandbox stays warm after its last call (0: never kept).
    #[serde(default = "default_keep_warm_s")]
    pub keep_warm_s: u64,
    /// Sandboxes kept warm even when idle.
    #[serde(default)]
    pub min_instances: u32,
    /// Calls at once; past it sync calls queue briefly, then get 429.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Where an async run's result goes when it succeeds (a function, or `chain:NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_success: Option<String>,
    /// Where an async run's error record goes when it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
    /// Names of the tenant's secrets put in the function's environment at load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Their values, filled in by the platform when it loads the version (never stored with
    /// it, never serialised, never printed).
    #[serde(skip)]
    pub secret_env: SecretEnv,
    /// Where the code lives on disk (not shown to clients).
    #[serde(skip)]
    pub code_dir: String,
    /// Unix milliseconds.
    pub created_at: i64,
}

/// Secret values for a function's environment: shown as their names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretEnv(pub std::sync::Arc<std::collections::BTreeMap<String, String>>);

impl std::fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Accepted and stored, not started.
    Queued,
    /// In a sandbox now.
    Running,
    /// The function returned.
    Succeeded,
    /// It raised, its result was unusable, it could not load, or it was interrupted.
    Failed,
    /// It ran past its timeout.
    Timeout,
    /// The cgroup's OOM killer ended it.
    OutOfMemory,
    /// The runtime died.
    Crashed,
}

impl TaskStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Timeout => "timeout",
            TaskStatus::OutOfMemory => "out_of_memory",
            TaskStatus::Crashed => "crashed",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<TaskStatus> {
        Some(match s {
            "queued" => TaskStatus::Queued,
            "running" => TaskStatus::Running,
            "succeeded" => TaskStatus::Succeeded,
            "failed" => TaskStatus::Failed,
            "timeout" => TaskStatus::Timeout,
            "out_of_memory" => TaskStatus::OutOfMemory,
            "crashed" => TaskStatus::Crashed,
            _ => return None,
        })
    }

    /// Whether the task is over.
    pub fn is_terminal(self) -> bool {
        !matches!(self, TaskStatus::Queued | TaskStatus::Running)
    }
}

/// How a task was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Run while its caller waits; stored once it has ended.
    Sync,
    /// Queued, stored before its caller hears of it, run by a queue worker.
    Async,
}

impl Mode {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Async => "async",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Mode> {
        [Mode::Sync, Mode::Async]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// Why a task did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The function raised (threw) an error.
    Raised,
    /// The function's code did not load.
    InitFailed,
    /// Its result could not be made JSON.
    OutputNotSerializable,
    /// Its result was over the size cap.
    OutputTooLarge,
    /// It ran past its timeout and was killed.
    Timeout,
    /// It used more than its memory limit and was killed.
    OutOfMemory,
    /// The runtime died.
    Crashed,
    /// The sandbox could not be started or failed under the call.
    SandboxFailure,
    /// The server stopped while it ran (it was not retried).
    Interrupted,
    /// Its function was deactivated or deleted before it ran.
    FunctionUnavailable,
    /// The function or the server was at capacity.
    Throttled,
}

impl ErrorKind {
    /// Every kind.
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::Raised,
        ErrorKind::InitFailed,
        ErrorKind::OutputNotSerializable,
        ErrorKind::OutputTooLarge,
        ErrorKind::Timeout,
        ErrorKind::OutOfMemory,
        ErrorKind::Crashed,
        ErrorKind::SandboxFailure,
        ErrorKind::Interrupted,
        ErrorKind::FunctionUnavailable,
        ErrorKind::Throttled,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Raised => "raised",
            ErrorKind::InitFailed => "init_failed",
            ErrorKind::OutputNotSerializable => "output_not_serializable",
            ErrorKind::OutputTooLarge => "output_too_large",
            ErrorKind::Timeout => "timeout",
            ErrorKind::OutOfMemory => "out_of_memory",
            ErrorKind::Crashed => "crashed",
            ErrorKind::SandboxFailure => "sandbox_failure",
            ErrorKind::Interrupted => "interrupted",
            ErrorKind::FunctionUnavailable => "function_unavailable",
            ErrorKind::Throttled => "throttled",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong, for a task that did not succeed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskError {
    /// Why.
    pub kind: ErrorKind,
    /// The exception's type, where there is one.
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub error_type: String,
    /// What happened.
    pub message: String,
    /// The traceback, where there is one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceback: String,
}

/// What a call cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskUsage {
    pub duration_ms: f64,
    pub init_duration_ms: f64,
    pub cpu_ms: f64,
    pub peak_memory_bytes: u64,
    /// What the peak covers: `call`, or `sandbox` (its life so far) on cgroup v2 kernels
    /// before 6.12, which cannot reset it between calls. Absent in records from before it
    /// was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_scope: Option<cloudfunc_sandbox::cgroup::PeakScope>,
    pub cold: bool,
    /// How its sandbox came to be: `cold` (started for it), `prewarmed` (a pre-started
    /// sandbox bound to it) or `warm` (kept from an earlier call).
    #[serde(default)]
    pub start: String,
    /// The runtime that ran it: `libcontainer`, `runc`, `crun` or `runsc`.
    pub backend: String,
    /// The isolation level it ran under.
    #[serde(default)]
    pub isolation: Isolation,
}

/// One invocation, sync or async.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// `task_` and 16 hex digits.
    pub task_id: String,
    /// The tenant that submitted it.
    #[serde(skip)]
    pub tenant: String,
    pub function_id: String,
    pub function: String,
    pub version: u32,
    /// How it was asked for.
    pub mode: Mode,
    pub status: TaskStatus,
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    pub logs: String,
    pub logs_truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TaskUsage>,
    pub attempts: u32,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// The chain run it is a step of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_run: Option<String>,
}

/// How a task ended, to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub status: TaskStatus,
    pub result: Option<Value>,
    pub error: Option<TaskError>,
    pub logs: String,
    pub logs_truncated: bool,
    pub usage: Option<TaskUsage>,
}

impl Completion {
    /// A failure of `kind` before (or instead of) any result: no output, no usage.
    pub fn failed(kind: ErrorKind, message: &str) -> Completion {
        Completion {
            status: TaskStatus::Failed,
            result: None,
            error: Some(TaskError {
                kind,
                error_type: String::new(),
                message: message.into(),
                traceback: String::new(),
            }),
            logs: String::new(),
            logs_truncated: false,
            usage: None,
        }
    }
}

impl Task {
    /// A new queued task of `version` of `function`; it belongs to the function's tenant,
    /// also when an admin submits it.
    pub fn queued(function: &Function, version: u32, mode: Mode, payload: Value) -> Task {
        Task {
            task_id: new_id("task"),
            tenant: function.tenant.clone(),
            function_id: function.id.clone(),
            function: function.name.clone(),
            version,
            mode,
            status: TaskStatus::Queued,
            payload,
            result: None,
            error: None,
            logs: String::new(),
            logs_truncated: false,
            usage: None,
            attempts: 0,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
            chain_run: None,
        }
    }

    /// The task as it reads once `c` is stored as its end at `at` (Unix ms).
    pub fn ended(mut self, c: Completion, at: i64) -> Task {
        self.status = c.status;
        self.result = c.result;
        self.error = c.error;
        self.logs = c.logs;
        self.logs_truncated = c.logs_truncated;
        self.usage = c.usage;
        self.finished_at = Some(at);
        self
    }
}

/// What a version stored before `keep_warm_s` existed kept: the default then.
fn default_keep_warm_s() -> u64 {
    crate::config::defaults::KEEP_WARM_S
}

/// What a version stored before `max_instances` existed ran at: the default then.
fn default_max_instances() -> u32 {
    crate::config::defaults::MAX_INSTANCES
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A new id: `prefix_`, the time in Unix milliseconds as 12 hex digits, and 16 random hex
/// digits. Ids made later sort after: stored tasks' primary key grows at its right edge, where
/// random ids dirtied a page of the index anywhere for each insert (most of what a commit of
/// many calls wrote to the WAL).
pub fn new_id(prefix: &str) -> String {
    let ms = u64::try_from(now_ms()).unwrap_or(0) & 0xffff_ffff_ffff;
    format!("{prefix}_{ms:012x}{:016x}", rand::random::<u64>())
}

/// A valid function name made of `text`: lower case, every other character `_`, at most 64;
/// `None` when nothing is left.
pub fn name_from(text: &str) -> Option<String> {
    let name: String = text
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    valid_name(&name).then_some(name)
}

/// Whether a function name is valid.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_sort_by_time() {
        let first = new_id("task");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later: Vec<String> = (0..1000).map(|_| new_id("task")).collect();
        assert!(later.iter().all(|id| id.as_str() > first.as_str()));
        let distinct: std::collections::HashSet<&String> = later.iter().collect();
        assert_eq!(distinct.len(), later.len());
        assert!(first.starts_with("task_") && first.len() == "task_".len() + 28);
        assert!(first[5..].bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn names() {
        assert!(valid_name("hello_fn"));
        assert!(valid_name("a-1"));
        assert!(!valid_name(""));
        assert!(!valid_name("Hello"));
        assert!(!valid_name("../x"));
        assert!(!valid_name(&"a".repeat(65)));
    }

    #[test]
    fn kinds_and_modes_round_trip() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        for m in [Mode::Sync, Mode::Async] {
            assert_eq!(Mode::parse(m.as_str()), Some(m));
            assert_eq!(serde_json::to_value(m).unwrap(), m.as_str());
        }
    }

    #[test]
    fn statuses_round_trip() {
        for s in [
            "queued",
            "running",
            "succeeded",
            "failed",
            "timeout",
            "out_of_memory",
            "crashed",
        ] {
            assert_eq!(TaskStatus::parse(s).unwrap().as_str(), s);
        }
        assert!(TaskStatus::Failed.is_terminal());
        assert!(!TaskStatus::Queued.is_terminal());
    }
}
