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
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

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

/// One host end of a pipe: a plain file, the same file registered with a tokio runtime's
/// reactor once a call waited for it there (it stays registered for the calls after, unless
/// a call comes from another runtime), or closed.
#[derive(Debug)]
enum End {
    Plain(File),
    Registered(AsyncFd<File>, tokio::runtime::Id),
    Closed,
}

impl End {
    fn file(&self) -> Option<&File> {
        match self {
            End::Plain(file) => Some(file),
            End::Registered(fd, _) => Some(fd.get_ref()),
            End::Closed => None,
        }
    }

    fn is_open(&self) -> bool {
        !matches!(self, End::Closed)
    }

    /// Registers the end with the reactor of `runtime`, the current one, unless it is
    /// registered there already.
    fn register(&mut self, runtime: tokio::runtime::Id) -> io::Result<()> {
        let file = match std::mem::replace(self, End::Closed) {
            End::Plain(file) => file,
            End::Registered(fd, id) if id != runtime => fd.into_inner(),
            other => {
                *self = other;
                return Ok(());
            }
        };
        // SAFETY: the `File` owns its descriptor, which stays open and the same until the
        // `AsyncFd` (which owns the `File`) is dropped or unwrapped.
        *self = match unsafe { AsyncFd::register(file) } {
            Ok(fd) => End::Registered(fd, runtime),
            Err(e) => {
                let (file, error) = e.into_parts();
                *self = End::Plain(file);
                return Err(error);
            }
        };
        Ok(())
    }

    /// Waits until the reactor says the end is readable; never, for an end not registered.
    async fn readable(&self) -> io::Result<AsyncFdReadyGuard<'_, File>> {
        match self {
            End::Registered(fd, _) => fd.readable().await,
            _ => std::future::pending().await,
        }
    }

    /// Waits until the reactor says the end is writable; never, for an end not registered.
    async fn writable(&self) -> io::Result<AsyncFdReadyGuard<'_, File>> {
        match self {
            End::Registered(fd, _) => fd.writable().await,
            _ => std::future::pending().await,
        }
    }
}

/// Reads what `file` holds now into `capture`; returns false once it is closed.
fn read_available(file: &File, capture: &mut Capture, chunk: &mut [u8]) -> io::Result<bool> {
    let mut file = file;
    loop {
        match file.read(chunk) {
            Ok(0) => return Ok(false),
            Ok(n) => capture.push(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads what the log end holds now, closing it at its end; returns whether it is open.
fn drain_now(logs: &mut End, capture: &mut Capture, chunk: &mut [u8]) -> io::Result<bool> {
    let Some(file) = logs.file() else {
        return Ok(false);
    };
    let open = read_available(file, capture, chunk)?;
    if !open {
        *logs = End::Closed;
    }
    Ok(open)
}

/// Takes in what a read of the reply pipe gave: the exchange's end once the reply is
/// whole (with the logs written before it), or the channel's, or `None` to read on.
fn take_reply(
    read: io::Result<usize>,
    reader: &mut FrameReader,
    chunk: &mut [u8],
    logs: &mut End,
    capture: &mut Capture,
) -> io::Result<Option<Exchange>> {
    match read {
        Ok(0) => Ok(Some(Exchange::Closed)),
        Ok(n) => match reader.feed(&chunk[..n]) {
            Ok(Some(body)) => {
                drain_now(logs, capture, chunk)?;
                Ok(Some(Exchange::Reply(body)))
            }
            Ok(None) => Ok(None),
            Err(e) => Ok(Some(Exchange::TooLarge(e))),
        },
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The host ends of one sandbox's pipes.
#[derive(Debug)]
pub struct Pipes {
    requests: End,
    replies: End,
    logs: End,
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
            requests: End::Plain(File::from(requests)),
            replies: End::Plain(File::from(replies)),
            logs: End::Plain(File::from(logs)),
            capture: Capture::new(max_log),
            max_reply,
        })
    }

    /// Closes the request pipe: the bootstrap reads end-of-file and exits.
    pub fn close_requests(&mut self) {
        self.requests = End::Closed;
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
                let Some(replies) = self.replies.file() else {
                    return Ok(Exchange::Closed);
                };
                let mut fds = vec![PollFd::new(replies.as_fd(), PollFlags::POLLIN)];
                let log_at = self.logs.file().map(|l| {
                    fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
                    fds.len() - 1
                });
                let req_at = match (self.requests.file(), pending.is_empty()) {
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
                drain_now(&mut self.logs, &mut self.capture, chunk)?;
            }
            if request_ready {
                self.send_some(&mut pending);
            }
            if reply_ready {
                let want = reader.wanted().min(CHUNK);
                let read = match self.replies.file() {
                    Some(mut replies) => replies.read(&mut chunk[..want]),
                    None => Ok(0),
                };
                let (logs, capture) = (&mut self.logs, &mut self.capture);
                if let Some(done) = take_reply(read, &mut reader, chunk, logs, capture)? {
                    return Ok(done);
                }
            }
        }
    }

    /// [`Pipes::exchange`] for a task on a tokio runtime: the task waits for the pipes in the
    /// runtime's reactor, where a thread would block in `poll`. The pipes stay registered with
    /// that runtime for the calls after (a later blocking `exchange` still works).
    pub async fn exchange_async(
        &mut self,
        frame: &[u8],
        deadline: Instant,
    ) -> io::Result<Exchange> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| io::Error::other("an async exchange needs a tokio runtime"))?
            .id();
        for end in [&mut self.requests, &mut self.replies, &mut self.logs] {
            end.register(runtime)?;
        }
        let mut pending = frame;
        self.send_some(&mut pending);
        let mut reader = FrameReader::new(self.max_reply);
        let sleep = tokio::time::sleep_until(deadline.into());
        tokio::pin!(sleep);
        loop {
            // Checked here too: a function that prints without pause keeps the log branch
            // ready, and a biased select would never come to the timer.
            if Instant::now() >= deadline {
                return Ok(Exchange::TimedOut);
            }
            // A pipe read or written without blocking keeps its readiness, and its branch
            // runs again; one that would block clears it (`try_io`). The thread's read buffer
            // is only borrowed between two waits.
            tokio::select! {
                biased;
                ready = self.replies.readable() => {
                    let mut guard = ready?;
                    let want = reader.wanted().min(CHUNK);
                    let done = with_chunk(|chunk| {
                        let read = guard.try_io(|fd| {
                            let mut file = fd.get_ref();
                            file.read(&mut chunk[..want])
                        });
                        drop(guard);
                        let (logs, capture) = (&mut self.logs, &mut self.capture);
                        match read {
                            Ok(read) => take_reply(read, &mut reader, chunk, logs, capture),
                            Err(_would_block) => Ok(None),
                        }
                    })?;
                    if let Some(done) = done {
                        return Ok(done);
                    }
                }
                ready = self.logs.readable(), if self.logs.is_open() => {
                    let mut guard = ready?;
                    let capture = &mut self.capture;
                    let open = with_chunk(|chunk| {
                        // Read up to the point of blocking, said as `WouldBlock` so that
                        // `try_io` clears the readiness.
                        let read = guard.try_io(|fd| {
                            match read_available(fd.get_ref(), capture, chunk)? {
                                true => Err(io::ErrorKind::WouldBlock.into()),
                                false => Ok(()),
                            }
                        });
                        match read {
                            Ok(Ok(())) => Ok(false),
                            Ok(Err(e)) => Err(e),
                            Err(_would_block) => Ok(true),
                        }
                    })?;
                    drop(guard);
                    if !open {
                        self.logs = End::Closed;
                    }
                }
                ready = self.requests.writable(), if !pending.is_empty() => {
                    let mut guard = ready?;
                    match guard.try_io(|fd| {
                        let mut file = fd.get_ref();
                        file.write(pending)
                    }) {
                        Ok(Ok(n)) => pending = &pending[n..],
                        Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                        // The runtime is gone; its reply pipe will say so.
                        Ok(Err(_)) => pending = &[],
                        Err(_would_block) => {}
                    }
                }
                () = &mut sleep => return Ok(Exchange::TimedOut),
            }
        }
    }

    /// Writes what of `pending` the request pipe takes now, and leaves the rest in it.
    fn send_some(&mut self, pending: &mut &[u8]) {
        let Some(mut requests) = self.requests.file() else {
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

    /// Collects remaining logs: what is there now, and for up to `grace` more until the pipe
    /// closes (after the runtime died, its last words may still be in flight).
    pub fn drain_logs(&mut self, grace: Duration) {
        with_chunk(|chunk| {
            let deadline = Instant::now() + grace;
            while let Ok(true) = drain_now(&mut self.logs, &mut self.capture, chunk) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let Some(logs) = self.logs.file() else {
                    break;
                };
                let _ = crate::control::wait_readable(logs.as_fd(), left);
            }
        });
    }

    /// Reads the reply pipe to its end as plain output (for commands, not bootstraps),
    /// together with the log pipe, until both close or `deadline` passes. Returns whether
    /// both closed in time.
    pub fn read_to_end(&mut self, out: &mut Capture, deadline: Instant) -> io::Result<bool> {
        let mut chunk = vec![0u8; CHUNK];
        while self.replies.is_open() || self.logs.is_open() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut fds = Vec::new();
            for end in [&self.replies, &self.logs] {
                if let Some(file) = end.file() {
                    fds.push(PollFd::new(file.as_fd(), PollFlags::POLLIN));
                }
            }
            match poll(&mut fds, poll_timeout(left)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            drop(fds);
            if let Some(replies) = self.replies.file() {
                if !read_available(replies, out, &mut chunk)? {
                    self.replies = End::Closed;
                }
            }
            drain_now(&mut self.logs, &mut self.capture, &mut chunk)?;
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

    /// One exchange, blocking or (`on_runtime`) as a task on a tokio runtime.
    fn exchange(
        pipes: &mut Pipes,
        frame: &[u8],
        deadline: Instant,
        on_runtime: bool,
    ) -> io::Result<Exchange> {
        if !on_runtime {
            return pipes.exchange(frame, deadline);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(pipes.exchange_async(frame, deadline))
    }

    /// A fake bootstrap in a thread: reads one request frame, prints a lot, replies.
    #[test]
    fn exchange_survives_floods_of_logs() {
        for on_runtime in [false, true] {
            floods_of_logs(on_runtime);
        }
    }

    fn floods_of_logs(on_runtime: bool) {
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
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = exchange(&mut pipes, &big_request, deadline, on_runtime).unwrap();
        assert!(matches!(got, Exchange::Reply(ref b) if b == br#"{"ok":true,"result":7}"#));
        assert_eq!(fake.join().unwrap().len(), big_request.len() - 4);
        pipes.drain_logs(Duration::from_millis(100));
        let logs = pipes.capture.take();
        assert_eq!(logs.text.len(), 1000);
        assert!(logs.truncated);
        assert_eq!(logs.total_bytes, 1 << 20, "on a runtime: {on_runtime}");
    }

    #[test]
    fn exchange_times_out_on_a_silent_sandbox() {
        for on_runtime in [false, true] {
            let (_req_r, req_w) = pipe().unwrap();
            let (res_r, _res_w) = pipe().unwrap();
            let (log_r, _log_w) = pipe().unwrap();
            let mut pipes = Pipes::new(req_w, res_r, log_r, 100, 100).unwrap();
            let start = Instant::now();
            let deadline = start + Duration::from_millis(50);
            let got = exchange(&mut pipes, b"\0\0\0\x02{}", deadline, on_runtime).unwrap();
            assert!(matches!(got, Exchange::TimedOut));
            assert!(start.elapsed() >= Duration::from_millis(50));
        }
    }

    #[test]
    fn exchange_reports_a_closed_channel_and_oversized_replies() {
        for on_runtime in [false, true] {
            let in_time = || Instant::now() + Duration::from_secs(1);
            let (_req_r, req_w) = pipe().unwrap();
            let (res_r, res_w) = pipe().unwrap();
            let (log_r, _log_w) = pipe().unwrap();
            drop(res_w);
            let mut pipes = Pipes::new(req_w, res_r, log_r, 100, 100).unwrap();
            let got = exchange(&mut pipes, b"", in_time(), on_runtime).unwrap();
            assert!(matches!(got, Exchange::Closed));

            let (_req_r, req_w) = pipe().unwrap();
            let (res_r, res_w) = pipe().unwrap();
            let (log_r, _log_w) = pipe().unwrap();
            File::from(res_w).write_all(&[0, 0, 1, 0]).unwrap();
            let mut pipes = Pipes::new(req_w, res_r, log_r, 100, 100).unwrap();
            let got = exchange(&mut pipes, b"", in_time(), on_runtime).unwrap();
            assert!(matches!(got, Exchange::TooLarge(_)));
        }
    }

    /// Pipes registered with a runtime by an async exchange still serve blocking ones and
    /// async ones from another runtime (each exchange here makes its own); an async exchange
    /// needs a runtime.
    #[test]
    fn registered_pipes_serve_blocking_exchanges_too() {
        let (req_r, req_w) = pipe().unwrap();
        let (res_r, res_w) = pipe().unwrap();
        let (log_r, _log_w) = pipe().unwrap();
        let fake = std::thread::spawn(move || {
            let (mut req, mut res) = (File::from(req_r), File::from(res_w));
            let mut frame = [0u8; 6];
            for n in 0..4 {
                req.read_exact(&mut frame).unwrap();
                res.write_all(&encode(&json!({"ok": true, "result": n})))
                    .unwrap();
            }
        });
        let mut pipes = Pipes::new(req_w, res_r, log_r, 100, 100).unwrap();
        let no_runtime = futures_lite_block_on(pipes.exchange_async(b"", Instant::now()));
        assert!(no_runtime.is_err(), "no tokio runtime, no async exchange");
        for n in 0..4 {
            let deadline = Instant::now() + Duration::from_secs(5);
            let got = exchange(&mut pipes, b"\0\0\0\x02{}", deadline, n % 2 == 0).unwrap();
            let want = format!(r#"{{"ok":true,"result":{n}}}"#);
            assert!(
                matches!(got, Exchange::Reply(ref b) if b == want.as_bytes()),
                "{got:?}"
            );
        }
        fake.join().unwrap();
    }

    /// Polls a future to its end on this thread, outside any tokio runtime.
    fn futures_lite_block_on<F: std::future::Future>(future: F) -> F::Output {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }
}
