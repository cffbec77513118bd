//! The host's side of a sandbox's three pipes, driven by one `poll` loop.
//!
//! A call writes its request, reads the reply and keeps draining the log pipe all at once, so
//! a function that prints more than a pipe holds never blocks, a bootstrap that stops reading
//! never blocks the host, and the deadline is kept whatever the sandbox does.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags};

use crate::control::poll_timeout;
use crate::outcome::Logs;
use crate::protocol::{FrameError, FrameReader};

/// Reads per `read` call.
const CHUNK: usize = 64 * 1024;

thread_local! {
    /// The read buffer of the calls on this thread, made once: a fresh zeroed 64 KiB buffer
    /// per call (two, with the logs' drain) showed in the warm path's profile.
    static CHUNK_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; CHUNK].into_boxed_slice());
}

/// Runs `f` with this thread's read buffer (a fresh one should it be in use already).
fn with_chunk<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    CHUNK_BUF.with(|buf| match buf.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut vec![0u8; CHUNK]),
    })
}

/// Bytes of output kept, with a count of what was dropped.
#[derive(Debug)]
pub struct Capture {
    buf: Vec<u8>,
    cap: usize,
    total: u64,
}

impl Capture {
    /// Keeps at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Capture {
            buf: Vec::new(),
            cap,
            total: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = self.cap.saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// The raw bytes kept.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Hands out what was captured and starts again.
    pub fn take(&mut self) -> Logs {
        let logs = Logs {
            text: String::from_utf8_lossy(&self.buf).into_owned(),
            truncated: self.total > self.buf.len() as u64,
            total_bytes: self.total,
        };
        self.buf.clear();
        self.total = 0;
        logs
    }
}

/// How one exchange ended.
#[derive(Debug)]
pub enum Exchange {
    /// A complete reply body.
    Reply(Vec<u8>),
    /// The reply channel closed: the runtime is gone.
    Closed,
    /// The deadline passed first.
    TimedOut,
    /// The reply announced more than allowed.
    TooLarge(FrameError),
}

/// The host ends of one sandbox's pipes.
#[derive(Debug)]
pub struct Pipes {
    requests: Option<File>,
    replies: File,
    logs: Option<File>,
    /// The function's output, for the current call.
    pub capture: Capture,
    max_reply: usize,
}

/// Creates a pipe whose both ends are close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(io::Error::from)
}

fn nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(
        fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?,
    );
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

impl Pipes {
    /// Wraps the host ends: where requests go, where replies and logs come from.
    pub fn new(
        requests: OwnedFd,
        replies: OwnedFd,
        logs: OwnedFd,
        max_log: usize,
        max_reply: usize,
    ) -> io::Result<Pipes> {
        for fd in [&requests, &replies, &logs] {
            nonblocking(fd)?;
        }
        Ok(Pipes {
            requests: Some(File::from(requests)),
            replies: File::from(replies),
            logs: Some(File::from(logs)),
            capture: Capture::new(max_log),
            max_reply,
        })
    }

    /// Closes the request pipe: the bootstrap reads end-of-file and exits.
    pub fn close_requests(&mut self) {
        self.requests = None;
    }

    /// Sends `frame` and waits for one reply until `deadline`, capturing logs meanwhile.
    pub fn exchange(&mut self, frame: &[u8], deadline: Instant) -> io::Result<Exchange> {
        with_chunk(|chunk| self.exchange_with(frame, deadline, chunk))
    }

    fn exchange_with(
        &mut self,
        frame: &[u8],
        deadline: Instant,
        chunk: &mut [u8],
    ) -> io::Result<Exchange> {
        let mut pending = frame;
        // The request usually fits the pipe: written before the first poll, it leaves that
        // poll only the reply to wait for.
        self.send_some(&mut pending);
        let mut reader = FrameReader::new(self.max_reply);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Exchange::TimedOut);
            }
            let (reply_ready, log_ready, request_ready) = {
                let mut fds = vec![PollFd::new(self.replies.as_fd(), PollFlags::POLLIN)];
                let log_at = self.logs.as_ref().map(|l| {
                    fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
                    fds.len() - 1
                });
                let req_at = match (&self.requests, pending.is_empty()) {
                    (Some(r), false) => {
                        fds.push(PollFd::new(r.as_fd(), PollFlags::POLLOUT));
                        Some(fds.len() - 1)
                    }
                    _ => None,
                };
                match poll(&mut fds, poll_timeout(left)) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                let ready = |i: Option<usize>| {
                    i.is_some_and(|i| fds[i].revents().is_some_and(|r| !r.is_empty()))
                };
                (ready(Some(0)), ready(log_at), ready(req_at))
            };
            if log_ready {
                self.read_logs(chunk)?;
            }
            if request_ready {
                self.send_some(&mut pending);
            }
            if reply_ready {
                let want = reader.wanted().min(CHUNK);
                match self.replies.read(&mut chunk[..want]) {
                    Ok(0) => {
                        self.drain_logs_with(Duration::from_millis(200), chunk);
                        return Ok(Exchange::Closed);
                    }
                    Ok(n) => match reader.feed(&chunk[..n]) {
                        Ok(Some(body)) => {
                            self.drain_logs_with(Duration::ZERO, chunk);
                            return Ok(Exchange::Reply(body));
                        }
                        Ok(None) => {}
                        Err(e) => return Ok(Exchange::TooLarge(e)),
                    },
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Writes what of `pending` the request pipe takes now, and leaves the rest in it.
    fn send_some(&mut self, pending: &mut &[u8]) {
        let Some(requests) = self.requests.as_mut() else {
            return;
        };
        if pending.is_empty() {
            return;
        }
        match requests.write(pending) {
            Ok(n) => *pending = &pending[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // The runtime is gone; its reply pipe will say so.
            Err(_) => *pending = &[],
        }
    }

    /// Reads what the log pipe holds now; returns false once it is closed.
    fn read_logs(&mut self, chunk: &mut [u8]) -> io::Result<bool> {
        let Some(logs) = self.logs.as_mut() else {
            return Ok(false);
        };
        loop {
            match logs.read(chunk) {
                Ok(0) => {
                    self.logs = None;
                    return Ok(false);
                }
                Ok(n) => self.capture.push(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Collects remaining logs: what is there now, and for up to `grace` more until the pipe
    /// closes (after the runtime died, its last words may still be in flight).
    pub fn drain_logs(&mut self, grace: Duration) {
        with_chunk(|chunk| self.drain_logs_with(grace, chunk));
    }

    fn drain_logs_with(&mut self, grace: Duration, chunk: &mut [u8]) {
        let deadline = Instant::now() + grace;
        while let Ok(true) = self.read_logs(chunk) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(logs) = self.logs.as_ref() else {
                break;
            };
            let _ = crate::control::wait_readable(logs.as_fd(), left);
        }
    }

    /// Reads the reply pipe to its end as plain output (for commands, not bootstraps),
    /// together with the log pipe, until both close or `deadline` passes. Returns whether
    /// both closed in time.
    pub fn read_to_end(&mut self, out: &mut Capture, deadline: Instant) -> io::Result<bool> {
        let mut chunk = vec![0u8; CHUNK];
        let mut replies_open = true;
        while replies_open || self.logs.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut fds = Vec::new();
            if replies_open {
                fds.push(PollFd::new(self.replies.as_fd(), PollFlags::POLLIN));
            }
            if let Some(l) = &self.logs {
                fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, poll_timeout(left)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            drop(fds);
            if replies_open {
                loop {
                    match self.replies.read(&mut chunk) {
                        Ok(0) => {
                            replies_open = false;
                            break;
                        }
                        Ok(n) => out.push(&chunk[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            self.read_logs(&mut chunk)?;
        }
        Ok(true)
    }
}

/// Writes all of `bytes` to a blocking or non-blocking writer, for tests.
#[cfg(test)]
fn write_all_slowly(w: &mut File, bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        match w.write(rest) {
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode;
    use serde_json::json;

    /// A fake bootstrap in a thread: reads one request frame, prints a lot, replies.
    #[test]
    fn exchange_survives_floods_of_logs() {
        let (req_r, req_w) = pipe().unwrap();
        let (res_r, res_w) = pipe().unwrap();
        let (log_r, log_w) = pipe().unwrap();
        let fake = std::thread::spawn(move || {
            let mut req = File::from(req_r);
            let mut head = [0u8; 4];
            req.read_exact(&mut head).unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
            req.read_exact(&mut body).unwrap();
            let mut log = File::from(log_w);
            write_all_slowly(&mut log, &vec![b'x'; 1 << 20]);
            let mut res = File::from(res_w);
            res.write_all(&encode(&json!({"ok": true, "result": 7})))
                .unwrap();
            body
        });
        let mut pipes = Pipes::new(req_w, res_r, log_r, 1000, 1 << 20).unwrap();
        let big_request = encode(&json!({"event": "y".repeat(300_000)}));
        let got = pipes
            .exchange(&big_request, Instant::now() + Duration::from_secs(10))
            .unwrap();
        assert!(matches!(got, Exchange::Reply(ref b) if b == br#"{"ok":true,"result":7}"#));
        assert_eq!(fake.join().unwrap().len(), big_request.len() - 4);
        pipes.drain_logs(Duration::from_millis(100));
        let logs = pipes.capture.take();
        assert_eq!(logs.text.len(), 1000);
        assert!(logs.truncated);
        assert_eq!(logs.total_bytes, 1 << 20);
    }

    #[test]
    fn exchange_times_out_on_a_silent_sandbox() {
        let (_req_r, req_w) = pipe().unwrap();
        let (res_r, _res_w) = pipe().unwrap();
        let (log_r, _log_w) = pipe().unwrap();
        let mut pipes = Pipes::new(req_w, res_r, log_r, 100, 100).unwrap();
        let start = Instant::now();
        let got = pipes
            .exchange(b"\0\0\0\x02{}", start + Duration::from_millis(50))
            .unwrap();
        assert!(matches!(got, Exchange::TimedOut));
        assert!(start.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn exchange_reports_a_closed_channel_and_oversized_replies() {
        let (_req_r, req_w) = pipe().unwrap();
        let (res_r, res_w) = pipe().unwrap();
        let (log_r, _log_w) = pipe().unwrap();
        drop(res_w);
        let mut pipes = Pipes::new(req_w, res_r, log_r, 100, 100).unwrap();
        let got = pipes
            .exchange(b"", Instant::now() + Duration::from_secs(1))
            .unwrap();
        assert!(matches!(got, Exchange::Closed));

        let (_req_r, req_w) = pipe().unwrap();
        let (res_r, res_w) = pipe().unwrap();
        let (log_r, _log_w) = pipe().unwrap();
        File::from(res_w).write_all(&[0, 0, 1, 0]).unwrap();
        let mut pipes = Pipes::new(req_w, res_r, log_r, 100, 100).unwrap();
        let got = pipes
            .exchange(b"", Instant::now() + Duration::from_secs(1))
            .unwrap();
        assert!(matches!(got, Exchange::TooLarge(_)));
    }
}
