//! The server's log: `tracing` events on stderr, as text for people or one JSON object per
//! line for collectors (`--log-format json`), filtered by `CLOUDFUNC_LOG` (or `RUST_LOG`) in
//! `tracing_subscriber`'s syntax, `info` by default. Each invocation writes one event with
//! target `cloudfunc::invocation` (Lambda's REPORT line in spirit).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// A warning that can come once per request or record while something is down (thousands a
/// second while the database is unreachable): logged the first time, then at most once per
/// period, with how many there were since.
#[derive(Debug)]
pub struct Sparse {
    period_ms: u64,
    last_ms: AtomicU64,
    since: AtomicU64,
}

impl Sparse {
    /// A warning logged at most once per `period_ms`.
    pub const fn new(period_ms: u64) -> Sparse {
        Sparse {
            period_ms,
            last_ms: AtomicU64::new(0),
            since: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence; `Some(n)` when it is to be logged, `n` being the occurrences
    /// since the last one logged, this one included.
    pub fn due(&self) -> Option<u64> {
        self.since.fetch_add(1, Ordering::Relaxed);
        // Milliseconds on a monotonic clock, from 1: a wall clock set back would silence it.
        static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let elapsed = BASE.get_or_init(std::time::Instant::now).elapsed();
        let now = u64::try_from(elapsed.as_millis()).map_or(u64::MAX, |ms| ms.saturating_add(1));
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now < last.saturating_add(self.period_ms) {
            return None;
        }
        self.last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        Some(self.since.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::Sparse;

    #[test]
    fn a_sparse_warning_is_logged_first_then_once_a_period_with_its_count() {
        let warning = Sparse::new(200);
        assert_eq!(warning.due(), Some(1));
        for _ in 0..5 {
            assert_eq!(warning.due(), None);
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert_eq!(warning.due(), Some(6));
        assert_eq!(warning.due(), None);
    }
}
