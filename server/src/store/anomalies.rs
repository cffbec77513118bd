//! What anomaly detection keeps ([`crate::anomalies`]): each series' detector between runs,
//! how far the minutes have been watched, every scored point and every event.

use super::Result;
use crate::anomalies::{Event, Key, Point, Saved, Series};

/// Storage of anomaly detection's state and findings. `tenant: None` means an admin.
pub trait AnomalyStore {
    /// The saved series and the last minute watched (its start, Unix ms).
    fn anomaly_state(&self) -> Result<(Option<i64>, Vec<Saved>)>;
    /// Replaces the saved series, as of the minute `through`.
    fn save_anomaly_state(&self, through: i64, saved: &[Saved]) -> Result<()>;
    /// A minute's scored points and the events it opened, continued or closed, at once.
    fn record_anomalies(&self, scored: &[(Key, String, Point)], events: &[Event]) -> Result<()>;
    /// Events of a function (`Some("")`: the system's; `None`: every one `tenant` sees),
    /// started in `[since, until)` or still open, newest first.
    fn anomaly_events(
        &self,
        tenant: Option<&str>,
        function_id: Option<&str>,
        since: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<Event>>;
    /// Scored points of a function (`""`: the system) in `[since, until)`, oldest first.
    fn anomaly_scores(
        &self,
        tenant: Option<&str>,
        function_id: &str,
        since: i64,
        until: i64,
    ) -> Result<Vec<(Series, Point)>>;
    /// Removes scored points and closed events older than `before`; returns how many.
    fn prune_anomalies(&self, before: i64) -> Result<u64>;
}
