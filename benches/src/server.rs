//! A real `cloudfunc serve` for the load benchmarks: started from next to the benchmark's own
//! binary on a free loopback port, in a temporary directory, and stopped as an operator would.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cloudfunc_sandbox::cgroup::{CgroupFs, DEFAULT_CGROUP_ROOT};

/// A server this process started.
#[derive(Debug)]
pub struct Spawned {
    pub child: Child,
    /// Removed when dropped, after the server is gone.
    pub dir: tempfile::TempDir,
    /// Its cgroup parent.
    pub parent: String,
}

impl Drop for Spawned {
    /// Stops the server as an operator would (SIGTERM: it settles its records, stops its
    /// sandboxes and removes its cgroups); only one that hangs is killed, and then what it
    /// leaves behind is removed here.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            eprintln!("the server did not stop within 30 s; killing it");
            let _ = self.child.kill();
            let _ = self.child.wait();
            // The shims tear their containers down when the server goes; the parents stay.
            std::thread::sleep(Duration::from_millis(500));
            let parent = format!("/{}", self.parent);
            if let Ok(cgroups) = CgroupFs::detect(Path::new(DEFAULT_CGROUP_ROOT)) {
                for name in [parent.clone(), format!("{parent}-gvisor")] {
                    for dir in cgroups.dirs(&name) {
                        let _ = std::fs::remove_dir(dir);
                    }
                }
            }
        }
    }
}

/// Starts `cloudfunc serve` with `extra` arguments; returns it, its URL and a token of the
/// tenant `load`. `tag` names its directory and cgroup parent.
pub fn spawn(tag: &str, extra: &[&str]) -> Result<(Spawned, String, String)> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("no directory")?.join("cloudfunc");
    let dir = tempfile::Builder::new()
        .prefix(&format!("{tag}-"))
        .tempdir()?;
    let parent = format!("{tag}-{}", std::process::id());
    let mut child = Command::new(&bin)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--images-dir")
        .arg(dir.path().join("images"))
        .args(["--cgroup-parent", &parent])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("no stdout")?).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("cloudfunc listening on ")
        .context("the server did not start")?
        .to_string();
    let out = Command::new(&bin)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--tenant", "load", "token"])
        .output()?;
    let token = String::from_utf8(out.stdout)?.trim().to_string();
    Ok((Spawned { child, dir, parent }, url, token))
}
