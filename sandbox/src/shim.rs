//! The shim: a small single-threaded process that owns one container for its whole life.
//!
//! libcontainer clones the calling process and runs Rust code in the clone, which is unsafe
//! in a multi-threaded caller (a lock held by another thread at clone time is never
//! released). So the host never calls libcontainer itself: it starts one shim per sandbox,
//! and the shim creates the container, starts it, reaps its init, and deletes it when told to
//! or when the host goes away (its control channel closes). The container's init is the
//! shim's direct child.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::control::{Channel, ExitKind, Message};

/// The shim's arguments.
#[derive(Debug, Clone)]
pub struct ShimArgs {
    /// Container id.
    pub id: String,
    /// Bundle directory.
    pub bundle: PathBuf,
    /// libcontainer's state root.
    pub state_root: PathBuf,
}

impl ShimArgs {
    /// The command line for these arguments.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--id".into(),
            self.id.clone().into(),
            "--bundle".into(),
            self.bundle.clone().into(),
            "--root".into(),
            self.state_root.clone().into(),
        ]
    }

    /// Parses the command line (without the program name).
    pub fn parse(mut args: impl Iterator<Item = std::ffi::OsString>) -> Result<ShimArgs, String> {
        let (mut id, mut bundle, mut root) = (None, None, None);
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .ok_or_else(|| format!("{flag:?} needs a value"))?;
            match flag.to_str() {
                Some("--id") => id = value.into_string().ok(),
                Some("--bundle") => bundle = Some(PathBuf::from(value)),
                Some("--root") => root = Some(PathBuf::from(value)),
                _ => return Err(format!("unknown argument {flag:?}")),
            }
        }
        Ok(ShimArgs {
            id: id.ok_or("--id is required")?,
            bundle: bundle.ok_or("--bundle is required")?,
            state_root: root.ok_or("--root is required")?,
        })
    }
}

/// Runs the shim with its control channel on stdin. Returns the process exit code.
pub fn run(args: ShimArgs) -> i32 {
    // SAFETY: fd 0 is the control socket the host handed us; nothing else owns it.
    let control = Channel::from_fd(unsafe { OwnedFd::from_raw_fd(0) });
    let fds = match control.recv(Some(std::time::Duration::from_secs(30))) {
        Ok(Some((Message::Launch, fds))) if fds.len() == 3 => fds,
        other => {
            let _ = control.send(&Message::Failed(format!(
                "expected launch with 3 descriptors, got {other:?}"
            )));
            return 2;
        }
    };
    let mut fds = fds.into_iter();
    let (stdin, stdout, stderr) = (
        fds.next().unwrap(),
        fds.next().unwrap(),
        fds.next().unwrap(),
    );

    let mut container = match create_and_start(&args, stdin, stdout, stderr) {
        Ok(c) => c,
        Err((why, container)) => {
            if let Some(mut c) = container {
                let _ = c.delete(true);
            }
            let _ = control.send(&Message::Failed(why));
            return 1;
        }
    };
    let Some(pid) = container.pid() else {
        let _ = container.delete(true);
        let _ = control.send(&Message::Failed("the container has no init pid".into()));
        return 1;
    };
    if control.send(&Message::Started(pid.as_raw())).is_err() {
        teardown(&mut container, pid, true);
        return 1;
    }
    serve(&control, &mut container, pid)
}

type CreateError = (String, Option<Box<Container>>);

fn create_and_start(
    args: &ShimArgs,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<Container, CreateError> {
    let describe = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    let builder = ContainerBuilder::new(args.id.clone(), SyscallType::default())
        .with_root_path(&args.state_root)
        .map_err(|e| (describe("state root", &e), None))?
        .with_stdin(stdin)
        .with_stdout(stdout)
        .with_stderr(stderr)
        .validate_id()
        .map_err(|e| (describe("container id", &e), None))?;
    let mut container = builder
        .as_init(&args.bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|e| (describe("creating the container", &error_chain(&e)), None))?;
    if let Err(e) = container.start() {
        return Err((
            describe("starting the container", &error_chain(&e)),
            Some(Box::new(container)),
        ));
    }
    Ok(container)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn serve(control: &Channel, container: &mut Container, pid: Pid) -> i32 {
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = control.send(&Message::Failed(format!("pidfd_open: {e}")));
            teardown(container, pid, true);
            return 1;
        }
    };
    let mut alive = true;
    loop {
        let (control_ready, init_ready) = {
            let mut fds = [
                PollFd::new(control.as_fd(), PollFlags::POLLIN),
                PollFd::new(pidfd.as_fd(), PollFlags::POLLIN),
            ];
            let timeout = if alive {
                PollTimeout::NONE
            } else {
                PollTimeout::MAX
            };
            match poll(&mut fds[..if alive { 2 } else { 1 }], timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), alive && ready(&fds[1]))
        };
        if init_ready {
            alive = false;
            if let Some(status) = reap(pid) {
                let _ = control.send(&Message::Exited(status));
            }
        }
        if control_ready {
            match control.recv(None) {
                Ok(Some((Message::Kill, _))) => {
                    let _ = container.kill(Signal::SIGKILL, false);
                }
                Ok(Some((Message::Destroy, _))) => {
                    teardown(container, pid, alive);
                    let _ = control.send(&Message::Destroyed);
                    return 0;
                }
                Ok(Some(_)) => {}
                // The host is gone, or its end broke: nobody will ever use this sandbox.
                Ok(None) | Err(_) => break,
            }
        }
    }
    teardown(container, pid, alive);
    0
}

fn teardown(container: &mut Container, pid: Pid, alive: bool) {
    if alive {
        let _ = container.kill(Signal::SIGKILL, false);
        let _ = waitpid(pid, None);
    }
    let _ = container.delete(true);
}

fn reap(pid: Pid) -> Option<ExitKind> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Some(ExitKind::Code(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Some(ExitKind::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) => std::thread::sleep(std::time::Duration::from_micros(100)),
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return None,
        }
    }
}

fn pidfd_open(pid: Pid) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let raw = i32::try_from(raw).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just gave us this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    debug_assert!(fd.as_raw_fd() >= 0);
    Ok(fd)
}
