//! `cloudfunc-floor`: the HTTP floor the warm-call benchmark measures a call against. A warp
//! server, on tokio's multi-threaded runtime with as many threads as `cloudfunc serve` takes
//! by default (half the CPUs, which on 2 vCPUs also cost the floor less CPU per request
//! than a thread per CPU: 10 against 11-12 µs), that answers every POST
//! with the same fixed JSON body an invoke of the load's function returns (its size and
//! shape), and does nothing else: what a request costs with no lookup, no task record, no
//! sandbox. `cloudfunc-load --floor` starts it from next to itself and sends it the same
//! requests as the server, under the same clients.
//!
//! Usage: `cloudfunc-floor [--listen 127.0.0.1:0] [--threads N]`; prints
//! `floor listening on http://ADDR`.

use std::net::SocketAddr;

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
}

fn main() -> anyhow::Result<()> {
    let Args { listen, threads } = <Args as clap::Parser>::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cloudfunc_server::cli::runtime_threads(threads))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // The body is read, as the server reads a payload, before the fixed reply.
        let route = warp::post()
            .and(warp::body::bytes())
            .map(|_body: bytes::Bytes| {
                warp::http::Response::builder()
                    .header("content-type", "application/json")
                    .body(REPLY)
            });
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("floor listening on http://{}", listener.local_addr()?);
        warp::serve(route).incoming(listener).run().await;
        Ok(())
    })
}
