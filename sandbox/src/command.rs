//! One-shot commands in a sandbox: no bootstrap, just a program run to completion with the
//! same isolation and limits. Used by benchmarks (`/bin/true`) and by checks that must look
//! at a container before any runtime touches it.

use std::time::{Duration, Instant};

use cloudfunc_bundles::{Limits, Process};

use crate::backend::ExitKind;
use crate::cgroup::UsageReader;
use crate::channel::{pipe, Capture, Pipes};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::outcome::Usage;

/// What a one-shot command did.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// How it ended; `None` if it was killed at the timeout.
    pub exit: Option<ExitKind>,
    /// Whether the timeout killed it.
    pub timed_out: bool,
    /// Its stdout (capped).
    pub stdout: Vec<u8>,
    /// Its stderr (capped).
    pub stderr: Vec<u8>,
    /// What it cost.
    pub usage: Usage,
}

impl Engine {
    /// Runs `args` in a fresh sandbox with empty stdin, waits for it to exit (or kills it at
    /// `timeout`) and removes the sandbox.
    pub fn run_command(
        &self,
        args: &[&str],
        limits: Limits,
        timeout: Duration,
    ) -> Result<CommandOutput> {
        let cap = self.config().max_log_bytes;
        self.run_in_sandbox(args, None, limits, timeout, cap)
    }

    /// [`Engine::run_command`] with `code_dir` mounted read-only at `/code`, and stdout kept
    /// up to `stdout_cap` bytes.
    pub(crate) fn run_in_sandbox(
        &self,
        args: &[&str],
        code_dir: Option<&std::path::Path>,
        limits: Limits,
        timeout: Duration,
        stdout_cap: usize,
    ) -> Result<CommandOutput> {
        if args.is_empty() {
            return Err(Error::InvalidSpec(
                "a command needs at least a program".into(),
            ));
        }
        let started = Instant::now();
        let id = self.next_id();
        let (req_r, req_w) = pipe().map_err(Error::Pipe)?;
        let (res_r, res_w) = pipe().map_err(Error::Pipe)?;
        let (log_r, log_w) = pipe().map_err(Error::Pipe)?;
        let process = Process::Command(args.iter().map(|a| a.to_string()).collect());
        let mut container = self.launch(
            &id,
            process,
            code_dir,
            limits,
            Vec::new(),
            [req_r, res_w, log_w],
        )?;
        let cap = self.config().max_log_bytes;
        let mut pipes = Pipes::new(req_w, res_r, log_r, cap, 0).map_err(Error::Pipe)?;
        pipes.close_requests();
        let mut stdout = Capture::new(stdout_cap);
        let finished = pipes
            .read_to_end(&mut stdout, started + timeout)
            .map_err(Error::Pipe)?;
        if !finished {
            container.kill()?;
        }
        let exit = container.wait_exit(Duration::from_secs(5))?;
        let cgroup = self.inner.cgroups.sandbox(&self.cgroup_path(&id));
        let snap = cgroup.snapshot().unwrap_or_default();
        let destroyed = container.destroy();
        let cleaned = self.cleanup(&id);
        destroyed?;
        cleaned?;
        Ok(CommandOutput {
            exit: if finished { exit } else { None },
            timed_out: !finished,
            stdout: stdout.bytes().to_vec(),
            stderr: pipes.capture.bytes().to_vec(),
            usage: Usage {
                duration: started.elapsed(),
                init_duration: Duration::ZERO,
                cpu_time: Duration::from_nanos(snap.cpu_total_ns),
                cpu_user: Duration::from_nanos(snap.cpu_user_ns),
                cpu_system: Duration::from_nanos(snap.cpu_system_ns),
                peak_memory_bytes: snap.memory_peak_bytes,
                // A command's sandbox lives for the command alone.
                peak_memory_scope: crate::cgroup::PeakScope::Call,
                cold: true,
            },
        })
    }
}
