//! What chaining stores: chains (a tenant's named definitions), their runs, and each run's
//! step calls.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Mode, TaskStatus, TaskUsage};

/// A named chain of a tenant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chain {
    /// `chain_` and 28 hex digits.
    pub id: String,
    #[serde(skip)]
    pub tenant: String,
    pub name: String,
    /// The definition as deployed (`steps`, `timeout_ms`).
    pub definition: Value,
    pub created_at: i64,
    pub updated_at: i64,
}

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    /// The run's `timeout_ms` passed.
    Timeout,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::Timeout => "timeout",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        [
            RunStatus::Queued,
            RunStatus::Running,
            RunStatus::Succeeded,
            RunStatus::Failed,
            RunStatus::Timeout,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        !matches!(self, RunStatus::Queued | RunStatus::Running)
    }
}

/// One run of a chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChainRun {
    /// `run_` and 28 hex digits; also answers at a task's status route.
    pub run_id: String,
    #[serde(skip)]
    pub tenant: String,
    pub chain_id: String,
    pub chain: String,
    pub mode: Mode,
    pub status: RunStatus,
    pub input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<super::Failure>,
    /// The definition it runs, with the chains it names expanded: fixed when the run is
    /// accepted, so a redeploy does not change a run under way.
    #[serde(skip)]
    pub definition: Value,
    /// When the run's `timeout_ms` ends it (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<i64>,
    pub created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// Its calls, in the order they started.
    pub steps: Vec<StepRecord>,
}

/// `steps` in the order they started.
pub fn in_order(steps: &mut [StepRecord]) {
    steps.sort_by(|a, b| (a.seq, a.started_at, &a.path).cmp(&(b.seq, b.started_at, &b.path)));
}

impl ChainRun {
    /// Milliseconds from start to end, once ended.
    pub fn duration_ms(&self) -> Option<i64> {
        Some(self.finished_at? - self.started_at?)
    }
}

/// One call of a run: an ordinary task of its function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Where in the definition (see [`super::engine`]).
    pub path: String,
    /// The function, as the step names it.
    pub function: String,
    /// Its task (none when the function could not be found or the input was refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    pub status: TaskStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<super::Failure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<TaskUsage>,
    pub started_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// Times its call was started: more than 1 when a crash interrupted it and its function's
    /// `max_retries` let it run again, as the queue does with a task.
    #[serde(default = "one")]
    pub attempts: u32,
    /// Its place in the order the run's steps started (a millisecond holds several).
    #[serde(default)]
    pub seq: u64,
}

fn one() -> u32 {
    1
}
