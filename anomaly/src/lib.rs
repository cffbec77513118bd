//! Streaming anomaly detection for metric series: one point in, one score in [0, 1] out,
//! before the next point, in bounded time and memory, with no look-ahead and no per-series
//! tuning. The state serialises (serde), so a detector survives a restart.
//!
//! [`nab`] holds the Numenta Anomaly Benchmark's file layout and a port of its scorer, with
//! which the detector is measured (`cloudfunc-nab`).

mod calibrate;
mod detector;
pub mod experts;
pub mod nab;
pub mod stats;

pub use detector::{Config, Detector, Scores, StateError};
