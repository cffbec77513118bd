//! Abuse limits per tenant: how fast it may invoke (off by default) and deploy (on), and how
//! many functions and how much stored code it may have. Admin tokens are not limited: they
//! are the operator's.

use std::path::Path;
use std::time::Instant;

use super::{Platform, PlatformError, Result};
use crate::auth::Caller;
use crate::ratelimit::{Buckets, Limit};

/// The limits, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quotas {
    /// Invocations (sync calls, async submits, chain runs) per tenant; `None`: unlimited.
    pub invocations: Option<Limit>,
    /// Deploys per tenant; `None`: unlimited.
    pub deploys: Option<Limit>,
    /// Functions a tenant may have.
    pub max_functions: u32,
    /// Bytes of code (every version kept) a tenant may store.
    pub max_code_bytes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            invocations: None,
            deploys: Some(Limit {
                per_second: crate::config::defaults::DEPLOYS_PER_MINUTE / 60.0,
                burst: crate::config::defaults::DEPLOY_BURST,
            }),
            max_functions: crate::config::defaults::MAX_FUNCTIONS_PER_TENANT,
            max_code_bytes: crate::config::defaults::MAX_CODE_MB_PER_TENANT << 20,
        }
    }
}

/// The buckets of both rates.
#[derive(Debug)]
pub(super) struct Rates {
    invocations: Buckets,
    deploys: Buckets,
}

impl Rates {
    pub(super) fn new(q: &Quotas) -> Rates {
        Rates {
            invocations: Buckets::new(q.invocations),
            deploys: Buckets::new(q.deploys),
        }
    }
}

fn over(
    what: &str,
    caller: &Caller,
    limit: Option<Limit>,
    wait: std::time::Duration,
) -> PlatformError {
    let rate = limit.map_or(0.0, |l| l.per_second);
    PlatformError::TooBusy {
        message: format!(
            "tenant {:?} is over its {what} rate ({rate} per second): retry in {:.1} s",
            caller.tenant,
            wait.as_secs_f64()
        ),
        retry_after: wait,
    }
}

impl Platform {
    /// Counts an invocation of `caller`'s against its rate.
    pub(super) fn admit_invocation(&self, caller: &Caller) -> Result<()> {
        if caller.admin {
            return Ok(());
        }
        let b = &self.inner.rates.invocations;
        b.take(&caller.tenant, Instant::now())
            .map_err(|wait| over("invocation", caller, b.limit(), wait))
    }

    /// Counts a deploy of `caller`'s against its rate.
    pub(super) fn admit_deploy(&self, caller: &Caller) -> Result<()> {
        if caller.admin {
            return Ok(());
        }
        let b = &self.inner.rates.deploys;
        b.take(&caller.tenant, Instant::now())
            .map_err(|wait| over("deploy", caller, b.limit(), wait))
    }

    /// Whether `caller` may store `adding` more bytes of code, under `name` (a new function
    /// counts against the function cap). Blocking: it reads the store and walks the code.
    pub(super) fn check_storage(&self, caller: &Caller, name: &str, adding: u64) -> Result<()> {
        if caller.admin {
            return Ok(());
        }
        let q = &self.inner.config.quotas;
        let functions = self.inner.store.functions(Some(&caller.tenant))?;
        if !functions.iter().any(|f| f.name == name)
            && functions.len() >= usize::try_from(q.max_functions).unwrap_or(usize::MAX)
        {
            return Err(PlatformError::QuotaExceeded(format!(
                "tenant {:?} has {} functions, its cap: delete one first",
                caller.tenant,
                functions.len()
            )));
        }
        let stored: u64 = functions
            .iter()
            .map(|f| tree_bytes(&self.inner.config.code_dir.join(&f.id)))
            .sum();
        if stored + adding > q.max_code_bytes {
            return Err(PlatformError::QuotaExceeded(format!(
                "tenant {:?} stores {} MiB of code; {} MiB more would pass its {} MiB cap: delete old functions first",
                caller.tenant,
                stored >> 20,
                adding.div_ceil(1 << 20),
                q.max_code_bytes >> 20
            )));
        }
        Ok(())
    }
}

/// The bytes of the files under `dir` (0 where there is none).
pub(super) fn tree_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}
