//! One client connection's I/O, with the clocks a slow or stalled client runs into: a request
//! whose headers do not arrive within the header timeout, and a response the client does not
//! read within the write timeout, end the connection. (How long an idle keep-alive
//! connection is kept is hyper's header-read timer, which runs whenever the connection waits
//! for a request; a body that does not arrive is the router's business, and answers 408.)

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What the connection's service has seen: whether a request is in it now, and how many
/// have reached it (their headers complete).
#[derive(Debug, Default)]
pub struct Activity {
    in_request: AtomicBool,
    started: AtomicU64,
}

impl Activity {
    /// The service has the request: its headers are complete.
    pub fn request_started(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.in_request.store(true, Ordering::Release);
    }

    /// The service answered; the next bytes read are a new request's.
    pub fn request_ended(&self) {
        self.in_request.store(false, Ordering::Release);
    }

    fn in_request(&self) -> bool {
        self.in_request.load(Ordering::Acquire)
    }

    fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }
}

/// A stream with header and write deadlines.
#[derive(Debug)]
pub struct TimedIo<T> {
    inner: T,
    activity: Arc<Activity>,
    header_timeout: Duration,
    write_timeout: Duration,
    /// Armed by the first byte of a request, until its headers reach the service.
    header_deadline: Option<Pin<Box<Sleep>>>,
    /// How many requests had reached the service when the header deadline was armed.
    armed_at: u64,
    /// Armed while a write cannot proceed.
    write_deadline: Option<Pin<Box<Sleep>>>,
}

impl<T> TimedIo<T> {
    /// Wraps `inner`; `activity` is shared with the connection's service.
    pub fn new(
        inner: T,
        activity: Arc<Activity>,
        header_timeout: Duration,
        write_timeout: Duration,
    ) -> Self {
        TimedIo {
            inner,
            activity,
            header_timeout,
            write_timeout,
            header_deadline: None,
            armed_at: 0,
            write_deadline: None,
        }
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_string())
}

/// Whether `deadline` has passed; registers `cx` to be woken when it does.
fn expired(deadline: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> bool {
    deadline
        .as_mut()
        .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.activity.in_request() || this.activity.started() != this.armed_at {
            // The request the deadline was for has reached the service.
            this.header_deadline = None;
        } else if expired(&mut this.header_deadline, cx) {
            return Poll::Ready(Err(timed_out("the request's headers took too long")));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let got_bytes = buf.filled().len() > before;
        if got_bytes && !this.activity.in_request() && this.header_deadline.is_none() {
            // The first bytes of a request: its headers must follow in time.
            let mut sleep = Box::pin(tokio::time::sleep_until(
                Instant::now() + this.header_timeout,
            ));
            // Polled once so that its expiry wakes this task even if nothing more arrives.
            let _ = sleep.as_mut().poll(cx);
            this.header_deadline = Some(sleep);
            this.armed_at = this.activity.started();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Pending => this.pending_write(cx),
            ready => {
                this.write_deadline = None;
                ready
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.pending_write(cx),
            ready => {
                this.write_deadline = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.pending_write(cx).map_ok(|_| ()),
            ready => {
                this.write_deadline = None;
                ready
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T> TimedIo<T> {
    /// A write that cannot proceed: pending until the write timeout, then an error.
    fn pending_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.write_deadline.is_none() {
            self.write_deadline = Some(Box::pin(tokio::time::sleep(self.write_timeout)));
        }
        if expired(&mut self.write_deadline, cx) {
            return Poll::Ready(Err(timed_out("the client did not read the response")));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn timed(
        io: tokio::io::DuplexStream,
        activity: &Arc<Activity>,
    ) -> TimedIo<tokio::io::DuplexStream> {
        TimedIo::new(
            io,
            activity.clone(),
            Duration::from_millis(200),
            Duration::from_millis(200),
        )
    }

    #[tokio::test]
    async fn headers_that_trickle_in_are_cut_off_and_a_served_request_is_not() {
        let (mut client, server) = tokio::io::duplex(1024);
        let activity = Arc::new(Activity::default());
        let mut io = timed(server, &activity);
        let started = Instant::now();
        let trickle = tokio::spawn(async move {
            for b in b"GET / HTTP/1.1\r\nHost: x\r\n" {
                if client.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        });
        let mut buf = [0u8; 64];
        let err = loop {
            match io.read(&mut buf).await {
                Ok(0) => panic!("the client closed first"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
        trickle.abort();

        // Headers that reach the service in time, and a call that then takes longer than
        // the header timeout: the connection serves on.
        let (mut client, server) = tokio::io::duplex(1024);
        let activity = Arc::new(Activity::default());
        let mut io = timed(server, &activity);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(io.read(&mut buf).await.unwrap() > 0);
        activity.request_started();
        tokio::time::sleep(Duration::from_millis(300)).await;
        activity.request_ended();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(io.read(&mut buf).await.unwrap() > 0);
    }

    #[tokio::test]
    async fn a_response_the_client_does_not_read_is_cut_off() {
        let (_client, server) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::default());
        let mut io = timed(server, &activity);
        let err = io.write_all(&[b'x'; 4096]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
