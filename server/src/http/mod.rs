//! The HTTP server under the API: the accept loop, per-client connection caps, the clocks a
//! slow client runs into, and a graceful stop that does not wait for a stalled one.
//!
//! warp is the filter layer (the API's routes are a warp filter); hyper serves each
//! connection here rather than in warp's own server, which has neither timeouts for clients
//! nor a bound on how long its graceful stop waits.

mod conn;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use warp::filters::BoxedFilter;

pub use conn::{Activity, TimedIo};

/// How long clients may take, and how many connections they may hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// From a request's first byte to its last header.
    pub header_timeout: Duration,
    /// How long a connection may wait for its next request (idle keep-alive).
    pub keep_alive_timeout: Duration,
    /// How long a response may wait for the client to read it.
    pub write_timeout: Duration,
    /// Between two chunks of a request body.
    pub body_idle_timeout: Duration,
    /// For a whole request body.
    pub body_timeout: Duration,
    /// Connections one client address may hold at once.
    pub max_connections_per_client: usize,
    /// Connections at once, all clients together.
    pub max_connections: usize,
    /// How long a graceful stop waits for responses under way.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        use crate::config::defaults as d;
        Limits {
            header_timeout: Duration::from_secs_f64(d::HEADER_TIMEOUT_S),
            keep_alive_timeout: Duration::from_secs_f64(d::KEEP_ALIVE_S),
            write_timeout: Duration::from_secs_f64(d::WRITE_TIMEOUT_S),
            body_idle_timeout: Duration::from_secs_f64(d::BODY_IDLE_TIMEOUT_S),
            body_timeout: Duration::from_secs_f64(d::BODY_TIMEOUT_S),
            max_connections_per_client: d::MAX_CONNECTIONS_PER_CLIENT,
            max_connections: d::MAX_CONNECTIONS,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Connections held, per client address.
#[derive(Debug, Default)]
struct Census {
    by_client: HashMap<IpAddr, usize>,
    total: usize,
}

/// A connection counted in the census until it is dropped.
struct Counted {
    census: Arc<Mutex<Census>>,
    client: IpAddr,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut census = self.census.lock().unwrap_or_else(|e| e.into_inner());
        census.total -= 1;
        if let Some(n) = census.by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                census.by_client.remove(&self.client);
            }
        }
    }
}

/// Counts a new connection from `client`, unless a cap is reached.
fn admit(census: &Arc<Mutex<Census>>, client: IpAddr, limits: &Limits) -> Option<Counted> {
    let mut c = census.lock().unwrap_or_else(|e| e.into_inner());
    let mine = c.by_client.get(&client).copied().unwrap_or(0);
    if mine >= limits.max_connections_per_client || c.total >= limits.max_connections {
        return None;
    }
    c.total += 1;
    *c.by_client.entry(client).or_default() += 1;
    Some(Counted {
        census: census.clone(),
        client,
    })
}

/// Serves `routes` on `listener` (over TLS with `tls`) until `stop` resolves; then stops
/// accepting, lets the responses under way finish for up to `limits.drain_timeout`, and
/// returns. A TLS handshake must end within the header timeout.
pub async fn serve(
    listener: TcpListener,
    routes: BoxedFilter<(warp::reply::Response,)>,
    limits: Limits,
    tls: Option<Arc<crate::tls::Tls>>,
    stop: impl Future<Output = ()>,
) {
    let census = Arc::new(Mutex::new(Census::default()));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.keep_alive_timeout);
    let builder = Arc::new(builder);
    let mut stop = std::pin::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors, usually: back off rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Some(counted) = admit(&census, peer.ip(), &limits) else {
            tracing::warn!(client = %peer.ip(), "a client is at its connection cap; connection refused");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (routes, builder, watcher) = (routes.clone(), builder.clone(), graceful.watcher());
        match &tls {
            None => {
                tokio::spawn(async move {
                    connection(stream, routes, &builder, watcher, &limits, peer).await;
                    drop(counted);
                });
            }
            Some(tls) => {
                let acceptor = tls.acceptor();
                tokio::spawn(async move {
                    let shaken =
                        tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await;
                    match shaken {
                        Ok(Ok(io)) => {
                            connection(io, routes, &builder, watcher, &limits, peer).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(client = %peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(client = %peer, "TLS handshake timed out")
                        }
                    }
                    drop(counted);
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after {:?}; stopping without them",
            limits.drain_timeout
        );
    }
}

/// Serves one connection (plain or TLS) until it ends.
async fn connection<I>(
    io: I,
    routes: BoxedFilter<(warp::reply::Response,)>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    limits: &Limits,
    peer: std::net::SocketAddr,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let io = TokioIo::new(TimedIo::new(
        io,
        activity.clone(),
        limits.header_timeout,
        limits.write_timeout,
    ));
    let service = Service {
        inner: warp::service(routes),
        activity,
    };
    let service = hyper_util::service::TowerToHyperService::new(service);
    let conn = builder.serve_connection_with_upgrades(io, service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(client = %peer, error = %e, "connection ended with an error");
    }
}

/// The routes' service for one connection, telling its I/O when a request is in it.
#[derive(Clone)]
struct Service<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> tower_service::Service<warp::http::Request<B>> for Service<S>
where
    S: tower_service::Service<warp::http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: warp::http::Request<B>) -> Self::Future {
        self.activity.request_started();
        let activity = self.activity.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            activity.request_ended();
            response
        })
    }
}
