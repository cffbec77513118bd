//! cloudfunc's server: a warp REST API over a SQLite store and a durable queue, running
//! functions in sandboxes through `cloudfunc-sandbox`. The `cloudfunc` binary serves it and
//! is also its command-line client.

#![forbid(unsafe_code)]

pub mod alerts;
pub mod anomalies;
pub mod api;
pub mod archive;
pub mod auth;
pub mod chains;
pub mod cli;
pub mod config;
pub mod datadir;
pub mod fuzzing;
pub mod http;
pub mod isolation;
pub mod jwks;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod platform;
pub mod pool;
pub mod prometheus;
pub mod ratelimit;
pub mod rollup;
pub mod serve;
pub mod store;
pub mod tls;
pub mod wall;

pub use cloudfunc_atrest as atrest;
