//! `cloudfunc-floor`: the floors the warm-call benchmark measures a call against.
//!
//! - **The HTTP floor** (the default): a warp server, on tokio's multi-threaded runtime with
//!   as many threads as `cloudfunc serve` takes by default (half the CPUs, which on 2 vCPUs
//!   also cost the floor less CPU per request than a thread per CPU: 10 against 11-12 µs),
//!   that answers every POST with the same fixed JSON body an invoke of the load's function
//!   returns (its size and shape), and does nothing else: what a request costs with no lookup,
//!   no task record, no sandbox.
//! - **The exchange floor** (`--sandboxes N`, as root): the same server passing each request's
//!   body to one of N warm Python hello sandboxes made with the sandbox library, as the
//!   server's pool does (`invoke_async`, then `finish`, which reads the call's cgroup
//!   counters), and answering with the call's result and usage. What a warm call costs with
//!   its sandbox exchange and nothing of the platform: no token, lookup, pool, task record,
//!   log line or rollup.
//!
//! `cloudfunc-load --floor` starts both from next to itself and sends them the same requests
//! as the server, under the same clients.
//!
//! Usage: `cloudfunc-floor [--listen 127.0.0.1:0] [--threads N] [--sandboxes N]`; prints
//! `floor listening on http://ADDR`, and stops its sandboxes on SIGTERM.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use cloudfunc_sandbox::{InvokeOptions, Limits, Outcome, Runtime, Sandbox, SandboxSpec};
use warp::http::{Response, StatusCode};
use warp::Filter;

/// An invoke's reply, as `cloudfunc serve` sends it for the load's function.
const REPLY: &str = r#"{"task_id":"task_01a2398639857833c26cb14ee49a","function_id":"fn_01a2398639119c8d9f2153e01327","function":"hello_load","version":1,"mode":"sync","status":"succeeded","payload":{"name":"Load"},"result":"Hello Load!","logs":"","logs_truncated":false,"usage":{"duration_ms":0.141606,"init_duration_ms":0.0,"cpu_ms":0.200157,"peak_memory_bytes":3100672,"peak_memory_scope":"call","cold":false,"start":"warm","backend":"libcontainer","isolation":"container"},"attempts":1,"created_at":1796261427589,"started_at":1796261427589,"finished_at":1796261427611}"#;

#[derive(clap::Parser)]
struct Args {
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The runtime's threads [default: as `cloudfunc serve`'s]
    #[arg(long)]
    threads: Option<std::num::NonZeroUsize>,
    /// Pass each request through one of this many warm Python hello sandboxes (the exchange
    /// floor; needs root). 0: the HTTP floor.
    #[arg(long, default_value_t = 0)]
    sandboxes: usize,
}

fn main() -> anyhow::Result<()> {
    let Args {
        listen,
        threads,
        sandboxes,
    } = <Args as clap::Parser>::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cloudfunc_server::cli::runtime_threads(threads))
        .enable_all()
        .build()?;
    if sandboxes > 0 {
        return exchange_floor(&runtime, listen, sandboxes);
    }
    runtime.block_on(async {
        // The body is read, as the server reads a payload, before the fixed reply.
        let route = warp::post()
            .and(warp::body::bytes())
            .map(|_body: bytes::Bytes| {
                Response::builder()
                    .header("content-type", "application/json")
                    .body(REPLY)
            });
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("floor listening on http://{}", listener.local_addr()?);
        warp::serve(route).incoming(listener).run().await;
        Ok(())
    })
}

/// Warm sandboxes lent one per request.
struct Lender {
    free: Mutex<Vec<Sandbox>>,
    permits: tokio::sync::Semaphore,
    calls: AtomicU64,
}

/// The exchange floor: serves until SIGTERM, then stops its sandboxes.
fn exchange_floor(
    runtime: &tokio::runtime::Runtime,
    listen: SocketAddr,
    count: usize,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-floor-")
        .tempdir()?;
    let engine = cloudfunc_benches::bench_engine(dir.path())?;
    let code = cloudfunc_benches::Code::new(&engine)?;
    // The limits a function deployed with the server's defaults runs under.
    let mut spec = SandboxSpec::new(Runtime::Python, code.path());
    spec.limits = Limits {
        memory_bytes: cloudfunc_server::config::defaults::MEMORY_MB << 20,
        cpu_millicores: cloudfunc_server::config::defaults::CPU_MILLICORES,
        ..Limits::default()
    };
    let mut warm = Vec::with_capacity(count);
    for _ in 0..count {
        warm.push(Sandbox::create(&engine, spec.clone()).context("starting a sandbox")?);
    }
    let lender = Arc::new(Lender {
        free: Mutex::new(warm),
        permits: tokio::sync::Semaphore::new(count),
        calls: AtomicU64::new(0),
    });
    let served = lender.clone();
    runtime.block_on(async move {
        let route = warp::post()
            .and(warp::body::bytes())
            .then(move |body: bytes::Bytes| exchange(served.clone(), body));
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        println!("floor listening on http://{}", listener.local_addr()?);
        tokio::select! {
            () = warp::serve(route).incoming(listener).run() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    let warm = std::mem::take(&mut *lender.free.lock().expect("not poisoned"));
    for sandbox in warm {
        sandbox.shutdown()?;
    }
    Ok(())
}

/// One request through a lent sandbox: its result and usage, as JSON.
async fn exchange(lender: Arc<Lender>, body: bytes::Bytes) -> Response<String> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        r.headers_mut().insert(
            "content-type",
            warp::http::HeaderValue::from_static("application/json"),
        );
        r
    };
    let event: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(event) => event,
        Err(e) => {
            let body = serde_json::json!({"error": e.to_string()}).to_string();
            return reply(StatusCode::BAD_REQUEST, body);
        }
    };
    let _permit = lender.permits.acquire().await.expect("never closed");
    let mut sandbox = lender
        .free
        .lock()
        .expect("not poisoned")
        .pop()
        .expect("a permit holds a sandbox");
    let options = InvokeOptions {
        timeout: Duration::from_secs(30),
        request_id: format!("call_{}", lender.calls.fetch_add(1, Ordering::Relaxed)),
    };
    // A hello call always finishes at once; one that would not (a sandbox killed) is an error
    // of the floor, never waited for here.
    let call = match sandbox.invoke_async(&event, &options).await {
        Ok(exchanged) if exchanged.finishes_at_once() => Some(sandbox.finish(exchanged)),
        _ => None,
    };
    lender.free.lock().expect("not poisoned").push(sandbox);
    match call {
        Some(call) => match call.outcome {
            Outcome::Succeeded { result } => reply(
                StatusCode::OK,
                serde_json::json!({
                    "task_id": options.request_id,
                    "status": "succeeded",
                    "result": result,
                    "logs": call.logs.text,
                    "usage": call.usage,
                })
                .to_string(),
            ),
            other => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"error": format!("{other:?}")}).to_string(),
            ),
        },
        None => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":"the sandbox failed"}"#.to_string(),
        ),
    }
}
