//! What both stores share: the places of sealed records (their column and row, bound into
//! each record), a damaged record's report, a stored ending as a rollup call, and the calls of
//! a transaction added up per rollup row before they are written.

use std::collections::HashMap;
use std::sync::Arc;

use crate::atrest::{AtRestError, DataKey};
use crate::model::{Completion, ErrorKind, TaskStatus};
use crate::rollup::{bucket_start, Call, RESOLUTIONS};
use crate::store::{Result, StoreError, Write};

impl From<Damaged> for StoreError {
    fn from(d: Damaged) -> Self {
        StoreError::Damaged(d.to_string())
    }
}

/// A record whose sealed column did not open: reported for that record, never served.
#[derive(Debug, thiserror::Error)]
#[error("{record}'s {column} cannot be read: {source}")]
pub struct Damaged {
    pub record: String,
    pub column: &'static str,
    #[source]
    pub source: AtRestError,
}

/// The column names as the sealed records' places name them.
pub(crate) mod place {
    pub const PAYLOAD: &str = "tasks.payload";
    pub const RESULT: &str = "tasks.result";
    pub const ERROR: &str = "tasks.error";
    pub const LOGS: &str = "tasks.logs";
    pub const SETTINGS: &str = "versions.settings";
    pub const RUN_INPUT: &str = "chain_runs.input";
    pub const RUN_OUTPUT: &str = "chain_runs.output";
    pub const RUN_ERROR: &str = "chain_runs.error";
    pub const STEP: &str = "chain_steps.body";
    pub const CODE: &str = "code_archives.archive";
    pub const SECRET: &str = "secrets.value";
}

/// A sealed column of a table: how its rows are found by tenant and keyed.
pub(crate) struct SealedColumn {
    /// `table.column`, as records' places name it.
    pub place: &'static str,
    /// The row's key columns; the record's place is their values joined by `@`.
    pub keys: &'static [&'static str],
    /// The condition on rows of tenant `{tenant}` (the store's first parameter).
    of_tenant: &'static str,
}

impl SealedColumn {
    /// The table and the column of [`SealedColumn::place`].
    pub fn table_column(&self) -> (&'static str, &'static str) {
        self.place.split_once('.').expect("a place is table.column")
    }

    /// The condition on the tenant's rows, the tenant being parameter `mark`.
    pub fn of_tenant(&self, mark: &str) -> String {
        self.of_tenant.replace("{tenant}", mark)
    }
}

const BY_TENANT: &str = "tenant = {tenant}";

/// Every sealed column.
pub(crate) const SEALED: &[SealedColumn] = &[
    SealedColumn {
        place: place::PAYLOAD,
        keys: &["id"],
        of_tenant: BY_TENANT,
    },
    SealedColumn {
        place: place::RESULT,
        keys: &["id"],
        of_tenant: BY_TENANT,
    },
    SealedColumn {
        place: place::ERROR,
        keys: &["id"],
        of_tenant: BY_TENANT,
    },
    SealedColumn {
        place: place::LOGS,
        keys: &["id"],
        of_tenant: BY_TENANT,
    },
    SealedColumn {
        place: place::SETTINGS,
        keys: &["function_id", "version"],
        of_tenant: "function_id IN (SELECT id FROM functions WHERE tenant = {tenant})",
    },
    SealedColumn {
        place: place::RUN_INPUT,
        keys: &["id"],
        of_tenant: BY_TENANT,
    },
    SealedColumn {
        place: place::RUN_OUTPUT,
        keys: &["id"],
        of_tenant: BY_TENANT,
    },
    SealedColumn {
        place: place::RUN_ERROR,
        keys: &["id"],
        of_tenant: BY_TENANT,
    },
    SealedColumn {
        place: place::STEP,
        keys: &["run_id", "path"],
        of_tenant: "run_id IN (SELECT id FROM chain_runs WHERE tenant = {tenant})",
    },
    SealedColumn {
        place: place::CODE,
        keys: &["path"],
        of_tenant: BY_TENANT,
    },
    SealedColumn {
        place: place::SECRET,
        keys: &["tenant", "name"],
        of_tenant: BY_TENANT,
    },
];

/// Every tenant whose records a batch of writes seals, with the key that seals them (`None`
/// with sealing off), found before the batch's transaction: a first key is stored on its own.
pub(crate) struct TenantKeys<'a>(Vec<(&'a str, Option<Arc<DataKey>>)>);

impl<'a> TenantKeys<'a> {
    pub fn of(
        writes: &'a [Write],
        key: impl Fn(&str) -> Result<Option<Arc<DataKey>>>,
    ) -> Result<TenantKeys<'a>> {
        let mut keys: Vec<(&str, Option<Arc<DataKey>>)> = Vec::new();
        for w in writes {
            if !keys.iter().any(|(t, _)| *t == w.tenant()) {
                keys.push((w.tenant(), key(w.tenant())?));
            }
        }
        Ok(TenantKeys(keys))
    }

    /// The key that seals `tenant`'s records.
    pub fn get(&self, tenant: &str) -> Option<&DataKey> {
        self.0
            .iter()
            .find(|(t, _)| *t == tenant)
            .and_then(|(_, k)| k.as_deref())
    }
}

/// How a queued task whose record fails its integrity check ends, instead of running.
pub(crate) fn damaged_ending() -> Completion {
    Completion::failed(ErrorKind::SandboxFailure, "this task's stored record failed its integrity check (tampered with, or damaged on disk); it was not run")
}

/// How a task that was running when the server stopped ends, when it is not retried.
pub(crate) fn interrupted_ending() -> Completion {
    Completion::failed(
        ErrorKind::Interrupted,
        "the server stopped while this task was running; it was not retried (at most once)",
    )
}

/// The place row of a version's settings.
pub(crate) fn version_row(function_id: &str, version: u32) -> String {
    format!("{function_id}@{version}")
}

/// The place row of a chain step.
pub(crate) fn step_row(run_id: &str, path: &str) -> String {
    format!("{run_id}@{path}")
}

/// The place row of a secret.
pub(crate) fn secret_row(tenant: &str, name: &str) -> String {
    format!("{tenant}@{name}")
}

/// What a stored ending counts as in the rollups (what the stores' call columns read back).
pub(crate) fn ended_call(c: &Completion, at: i64) -> Call {
    let usage = c.usage.as_ref();
    let outcome = match (c.status, &c.error) {
        (TaskStatus::Succeeded, _) => "succeeded".to_string(),
        (_, Some(e)) => e.kind.as_str().to_string(),
        (status, None) => status.as_str().to_string(),
    };
    Call {
        outcome,
        at,
        timed: usage.is_some(),
        cold: usage.is_some_and(|u| u.cold),
        duration_ms: usage.map_or(0.0, |u| u.duration_ms),
        init_ms: usage.map_or(0.0, |u| u.init_duration_ms),
        cpu_ms: usage.map_or(0.0, |u| u.cpu_ms),
        // As stored: the column is a signed integer.
        peak_memory_bytes: usage.map_or(0, |u| u.peak_memory_bytes.min(i64::MAX as u64)),
    }
}

pub(crate) fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(crate) fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// One rollup row's worth of calls, added up before it is written.
#[derive(Debug, Default)]
pub(crate) struct RowSum {
    pub(crate) tenant: String,
    pub(crate) function: String,
    pub(crate) count: i64,
    pub(crate) timed: i64,
    pub(crate) cold: i64,
    pub(crate) duration_sum: f64,
    pub(crate) duration_max: f64,
    pub(crate) init_sum: f64,
    pub(crate) cpu_sum: f64,
    pub(crate) cpu_max: f64,
    pub(crate) memory_sum: f64,
    pub(crate) memory_max: i64,
}

/// A rollup row's key: resolution, function id, outcome and bucket start.
pub(crate) type RowKey = (i64, String, String, i64);

/// Calls added up per rollup row and per histogram bin, so that a transaction of many calls
/// writes each row once: a batch of a busy function's calls otherwise upserted the same six
/// rows once per call.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    pub(crate) rows: HashMap<RowKey, RowSum>,
    /// By the row's key and the bin: the tenant and the count.
    pub(crate) bins: HashMap<(RowKey, i64), (String, i64)>,
}

/// What one call adds to each of its rollup rows (its minute, hour and day) and, when timed,
/// to which histogram bin. An untimed call (refused, or failed before a sandbox) adds to the
/// count only.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Share {
    pub(crate) timed: bool,
    pub(crate) cold: bool,
    pub(crate) duration: f64,
    pub(crate) init: f64,
    pub(crate) cpu: f64,
    pub(crate) memory: i64,
    pub(crate) bin: Option<i64>,
}

impl Share {
    pub(crate) fn of(call: &Call) -> Share {
        let t = |x: f64| if call.timed { x } else { 0.0 };
        Share {
            timed: call.timed,
            cold: call.timed && call.cold,
            duration: t(call.duration_ms),
            init: t(call.init_ms),
            cpu: t(call.cpu_ms),
            memory: if call.timed {
                i64_of(call.peak_memory_bytes)
            } else {
                0
            },
            bin: call
                .timed
                .then(|| i64::try_from(crate::rollup::bin(call.duration_ms)).unwrap_or(i64::MAX)),
        }
    }
}

impl Pending {
    /// Adds the calls of the finished tasks (sync calls) among `writes`.
    pub(crate) fn finished(&mut self, writes: &[&Write]) {
        for w in writes {
            if let Write::Finished {
                task,
                completion,
                at,
            } = w
            {
                let call = ended_call(completion, *at);
                self.add(&task.tenant, &task.function_id, &task.function, &call);
            }
        }
    }

    /// Adds `call` of a function to its minute, hour and day rows.
    pub(crate) fn add(&mut self, tenant: &str, function_id: &str, function: &str, call: &Call) {
        let share = Share::of(call);
        for resolution in RESOLUTIONS {
            let start = bucket_start(call.at, resolution);
            let key = (
                resolution,
                function_id.to_string(),
                call.outcome.clone(),
                start,
            );
            if let Some(b) = share.bin {
                self.bins
                    .entry((key.clone(), b))
                    .or_insert_with(|| (tenant.to_string(), 0))
                    .1 += 1;
            }
            let row = self.rows.entry(key).or_insert_with(|| RowSum {
                tenant: tenant.to_string(),
                function: function.to_string(),
                ..RowSum::default()
            });
            // The latest name of the function wins, as in the table.
            if row.function != function {
                row.function = function.to_string();
            }
            row.count += 1;
            row.timed += i64::from(share.timed);
            row.cold += i64::from(share.cold);
            row.duration_sum += share.duration;
            row.duration_max = row.duration_max.max(share.duration);
            row.init_sum += share.init;
            row.cpu_sum += share.cpu;
            row.cpu_max = row.cpu_max.max(share.cpu);
            row.memory_sum += share.memory as f64;
            row.memory_max = row.memory_max.max(share.memory);
        }
    }
}
