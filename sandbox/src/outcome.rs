//! What an invocation ended as, and what it cost.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

pub use crate::backend::ExitKind;
pub use crate::protocol::FunctionError;

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// The function returned this JSON value.
    Succeeded { result: Value },
    /// The function raised (or its promise rejected).
    Raised { error: FunctionError },
    /// The function's result is not JSON-serialisable.
    OutputNotSerializable { error: FunctionError },
    /// The result is larger than the output limit.
    OutputTooLarge { limit_bytes: usize, message: String },
    /// The wall-clock timeout passed; every process of the sandbox was killed.
    Timeout { timeout_ms: u64 },
    /// The cgroup's OOM killer ended the function.
    OutOfMemory { limit_bytes: u64 },
    /// The runtime process died for another reason, or was stopped for answering against the
    /// protocol (its reply channel is the function's to write to).
    Crashed { exit: String },
    /// The sandbox itself failed (not the function's fault): its I/O with the host.
    SandboxFailure { message: String },
}

impl Outcome {
    /// The short status name (`succeeded`, `raised`, `timeout`, ...), as stored in records.
    pub fn status(&self) -> &'static str {
        match self {
            Outcome::Succeeded { .. } => "succeeded",
            Outcome::Raised { .. } => "raised",
            Outcome::OutputNotSerializable { .. } => "output_not_serializable",
            Outcome::OutputTooLarge { .. } => "output_too_large",
            Outcome::Timeout { .. } => "timeout",
            Outcome::OutOfMemory { .. } => "out_of_memory",
            Outcome::Crashed { .. } => "crashed",
            Outcome::SandboxFailure { .. } => "sandbox_failure",
        }
    }

    /// Whether the function returned normally.
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Succeeded { .. })
    }

    /// Whether the sandbox can serve another call after this outcome.
    pub fn keeps_sandbox(&self) -> bool {
        matches!(
            self,
            Outcome::Succeeded { .. }
                | Outcome::Raised { .. }
                | Outcome::OutputNotSerializable { .. }
                | Outcome::OutputTooLarge { .. }
        )
    }
}

/// What an invocation cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Wall time from sending the event to receiving the reply.
    #[serde(with = "millis")]
    pub duration: Duration,
    /// Time the sandbox took to start, for the call that started it (zero when warm).
    #[serde(with = "millis")]
    pub init_duration: Duration,
    /// CPU time of every process in the sandbox during the call (exact).
    #[serde(with = "millis")]
    pub cpu_time: Duration,
    /// The user part of it (tick-sampled by the kernel on cgroup v1).
    #[serde(with = "millis")]
    pub cpu_user: Duration,
    /// The system part of it (tick-sampled by the kernel on cgroup v1).
    #[serde(with = "millis")]
    pub cpu_system: Duration,
    /// Peak memory: during the call, or over the sandbox's life so far where the kernel
    /// cannot reset it (v2 before 6.12); [`Usage::peak_memory_scope`] says which.
    pub peak_memory_bytes: u64,
    /// What [`Usage::peak_memory_bytes`] covers.
    pub peak_memory_scope: crate::cgroup::PeakScope,
    /// Whether this call started the sandbox.
    pub cold: bool,
}

mod millis {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1000.0)
    }
}

/// The function's captured stdout and stderr.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Logs {
    /// What was kept (lossily decoded as UTF-8).
    pub text: String,
    /// Whether output beyond the cap was dropped.
    pub truncated: bool,
    /// How many bytes the function wrote in all.
    pub total_bytes: u64,
}

/// One invocation's full record.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Invocation {
    /// How it ended.
    pub outcome: Outcome,
    /// What it printed.
    pub logs: Logs,
    /// What it cost.
    pub usage: Usage,
}
