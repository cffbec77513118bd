//! Anomaly detection on live metrics: each function's per-minute series ([`series`]) and the
//! system's are fed, as each minute closes, to a detector per series
//! (`cloudfunc-anomaly`), whose scores open and close anomaly events ([`watcher`]). This
//! module knows neither HTTP nor SQL: the platform feeds it and stores what it says.

pub mod series;
pub mod watcher;

pub use series::Series;
pub use watcher::{Change, Event, Input, Key, Minute, Point, Saved, Status, WatchConfig, Watcher};

#[cfg(test)]
mod tests;
