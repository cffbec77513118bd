//! The server's log: `tracing` events on stderr, as text for people or one JSON object per
//! line for collectors (`--log-format json`), filtered by `CLOUDFUNC_LOG` (or `RUST_LOG`) in
//! `tracing_subscriber`'s syntax, `info` by default. Each invocation writes one event with
//! target `cloudfunc::invocation` (Lambda's REPORT line in spirit).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the subscriber for the process; a second call does nothing.
pub fn init(format: LogFormat) {
    let filter = std::env::var("CLOUDFUNC_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colours only for a terminal: in a file they were escape codes around every field, and
    // about 2 % of a warm call's CPU.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
