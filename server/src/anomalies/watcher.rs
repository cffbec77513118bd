//! The watcher: a detector per series, fed one point per minute, and the anomaly events its
//! scores make. An event opens when a series' score reaches the threshold, takes the points
//! around it, and closes once the score has stayed below the threshold for a quiet spell.

use std::collections::{BTreeMap, VecDeque};

use cloudfunc_anomaly::Detector;
use serde::{Deserialize, Serialize};

use super::series::Series;

/// How the watcher judges.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchConfig {
    /// A score at or above this opens an event.
    pub threshold: f64,
    /// Minutes below the threshold that close an event.
    pub quiet_minutes: u32,
    /// The detector of each series.
    pub detector: cloudfunc_anomaly::Config,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            threshold: DEFAULT_THRESHOLD,
            quiet_minutes: 10,
            detector: cloudfunc_anomaly::Config::default(),
        }
    }
}

/// The default threshold: about where the detector's scores on the Numenta Anomaly Benchmark
/// separate anomalies best (0.19 there). A one-minute blip of ordinary noise can pass it; the
/// confirmation by the next minute keeps it from being an event.
pub const DEFAULT_THRESHOLD: f64 = 0.2;

/// Points before the opening of an event that it keeps, and most points it keeps in all.
const BEFORE: usize = 10;
const MOST_POINTS: usize = 120;

/// A watched series: the system's when `function_id` is empty.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub function_id: String,
    pub series: Series,
}

impl Key {
    /// A function's series.
    pub fn function(function_id: &str, series: Series) -> Key {
        Key {
            function_id: function_id.to_string(),
            series,
        }
    }

    /// A series of the system.
    pub fn system(series: Series) -> Key {
        Key::function("", series)
    }

    /// Whether it is the system's.
    pub fn is_system(&self) -> bool {
        self.function_id.is_empty()
    }
}

/// One scored minute of a series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// The minute's start, Unix ms.
    pub minute: i64,
    pub value: f64,
    /// The detector's score, 0 while it is still learning the series.
    pub score: f64,
}

/// An anomaly: a series' score at or above the threshold, from `started` to `ended`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Stable: the series and the minute it started.
    pub id: String,
    pub tenant: String,
    /// Empty for the system's series.
    pub function_id: String,
    pub function: String,
    pub series: Series,
    /// The first anomalous minute's start, Unix ms.
    pub started: i64,
    /// The end of the last anomalous minute, once the series has been quiet; `None` while
    /// it lasts.
    pub ended: Option<i64>,
    pub peak_score: f64,
    /// The minute of the peak.
    pub peak_at: i64,
    /// The points around it: some before it started, then every point while it lasted.
    pub points: Vec<Point>,
}

/// What happened to an event this minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Opened,
    Continued,
    Closed,
}

/// A point offered to the watcher.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub key: Key,
    pub tenant: String,
    pub function: String,
    pub value: f64,
}

/// What a minute did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Minute {
    /// Every point scored, with its series and tenant.
    pub scored: Vec<(Key, String, Point)>,
    /// Events opened, continued or closed, as they stand now.
    pub events: Vec<(Change, Event)>,
}

/// A series' state, as saved between runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    pub key: Key,
    pub tenant: String,
    pub function: String,
    /// [`Detector::to_bytes`].
    pub detector: Vec<u8>,
    /// The rest: recent points, the open event, the quiet count.
    pub rest: Rest,
}

/// A series' state beside its detector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rest {
    recent: VecDeque<Point>,
    open: Option<Event>,
    quiet: u32,
    /// An onset waiting for the next point to confirm it.
    #[serde(default)]
    pending: Option<Onset>,
}

#[derive(Debug, Clone)]
struct Tracked {
    tenant: String,
    function: String,
    detector: Detector,
    rest: Rest,
}

/// How a series stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    pub series: Series,
    /// `learning` until the detector has seen enough points to score, then `watching`.
    pub status: &'static str,
    pub points_seen: u64,
    pub points_needed: u64,
    pub last: Option<Point>,
    /// The open event's id, if the series is anomalous now.
    pub open_event: Option<String>,
}

/// Detectors and open events of every watched series.
#[derive(Debug)]
pub struct Watcher {
    config: WatchConfig,
    series: BTreeMap<Key, Tracked>,
}

impl Watcher {
    /// Watching nothing yet.
    pub fn new(config: WatchConfig) -> Watcher {
        Watcher {
            config,
            series: BTreeMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &WatchConfig {
        &self.config
    }

    /// Scores one minute's points. A series watched before that has no point this minute gets
    /// a 0 if it is a count (a function no longer called is news); others skip the minute.
    pub fn minute(&mut self, minute: i64, inputs: Vec<Input>) -> Minute {
        let mut given: BTreeMap<Key, Input> =
            inputs.into_iter().map(|i| (i.key.clone(), i)).collect();
        for (key, tracked) in &self.series {
            if key.series.idle_is_zero() && !given.contains_key(key) {
                given.insert(
                    key.clone(),
                    Input {
                        key: key.clone(),
                        tenant: tracked.tenant.clone(),
                        function: tracked.function.clone(),
                        value: 0.0,
                    },
                );
            }
        }
        let mut out = Minute::default();
        for (key, input) in given {
            let config = &self.config;
            let tracked = self.series.entry(key.clone()).or_insert_with(|| Tracked {
                tenant: input.tenant.clone(),
                function: input.function.clone(),
                detector: Detector::new(config.detector.clone()),
                rest: Rest::default(),
            });
            tracked.function.clone_from(&input.function);
            let scores = tracked.detector.update_scores(minute / 1000, input.value);
            let point = Point {
                minute,
                value: input.value,
                // Not inhibited: the events' own rules (an onset confirmed, a quiet spell to
                // close) decide what is one anomaly; an earlier blip must not hide a shift.
                score: scores.uninhibited,
            };
            if let Some(change) = judge(config, &key, tracked, point) {
                out.events.push(change);
            }
            out.scored.push((key, tracked.tenant.clone(), point));
        }
        out
    }

    /// Stops watching a function's series (it was deleted).
    pub fn forget(&mut self, function_id: &str) {
        self.series.retain(|k, _| k.function_id != function_id);
    }

    /// How a function's series (or the system's, for `""`) stand.
    pub fn status(&self, function_id: &str) -> Vec<Status> {
        let needed = self.config.detector.warmup + 1;
        self.series
            .iter()
            .filter(|(k, _)| k.function_id == function_id)
            .map(|(k, t)| Status {
                series: k.series,
                status: if t.detector.is_warm() {
                    "watching"
                } else {
                    "learning"
                },
                points_seen: t.detector.seen(),
                points_needed: needed,
                last: t.rest.recent.back().copied(),
                open_event: t.rest.open.as_ref().map(|e| e.id.clone()),
            })
            .collect()
    }

    /// The latest score of every series, with its tenant and function name.
    pub fn latest(&self) -> Vec<(Key, String, String, Point)> {
        self.series
            .iter()
            .filter_map(|(k, t)| {
                let p = t.rest.recent.back()?;
                Some((k.clone(), t.tenant.clone(), t.function.clone(), *p))
            })
            .collect()
    }

    /// Every series' state, to save.
    pub fn save(&self) -> Vec<Saved> {
        self.series
            .iter()
            .map(|(k, t)| Saved {
                key: k.clone(),
                tenant: t.tenant.clone(),
                function: t.function.clone(),
                detector: t.detector.to_bytes(),
                rest: t.rest.clone(),
            })
            .collect()
    }

    /// Takes back saved states; a series whose detector state is unreadable (saved by another
    /// version) starts learning again. Returns how many were restored whole.
    pub fn restore(&mut self, saved: Vec<Saved>) -> usize {
        let mut whole = 0;
        for s in saved {
            let detector = match Detector::from_bytes(&s.detector) {
                Ok(d) => {
                    whole += 1;
                    d
                }
                Err(e) => {
                    tracing::warn!(function_id = %s.key.function_id, series = s.key.series.name(), error = %e, "a saved detector was not restored; the series is learnt again");
                    Detector::new(self.config.detector.clone())
                }
            };
            self.series.insert(
                s.key,
                Tracked {
                    tenant: s.tenant,
                    function: s.function,
                    detector,
                    rest: s.rest,
                },
            );
        }
        whole
    }
}

/// Opens, extends or closes the series' event with this point. A point at or above the
/// threshold is an onset; the event opens (as of the onset) once the next point confirms it:
/// the series is still off its usual level by at least half as much, the same way. A
/// one-minute blip is not an event, as an alert rule's `for` duration would have it.
fn judge(
    config: &WatchConfig,
    key: &Key,
    tracked: &mut Tracked,
    point: Point,
) -> Option<(Change, Event)> {
    let anomalous = point.score >= config.threshold;
    let rest = &mut tracked.rest;
    // An onset must also be a material move from the usual level.
    let new_onset = || {
        let o = Onset::at(&rest.recent, point);
        (anomalous && key.series.is_material(o.usual, point.value)).then_some(o)
    };
    let change = if let Some(event) = &mut rest.open {
        if event.points.len() < MOST_POINTS {
            event.points.push(point);
        }
        if point.score > event.peak_score {
            event.peak_score = point.score;
            event.peak_at = point.minute;
        }
        if anomalous {
            rest.quiet = 0;
            Some(Change::Continued)
        } else {
            rest.quiet += 1;
            if rest.quiet >= config.quiet_minutes {
                // It ended with the last anomalous minute.
                let last = event
                    .points
                    .iter()
                    .rev()
                    .find(|p| p.score >= config.threshold)
                    .map_or(event.started, |p| p.minute);
                event.ended = Some(last + 60_000);
                Some(Change::Closed)
            } else {
                Some(Change::Continued)
            }
        }
    } else if let Some(onset) = rest.pending.take() {
        if confirms(&onset, &point) {
            let mut points: Vec<Point> = rest.recent.iter().copied().collect();
            points.push(point);
            let peak = if point.score > onset.point.score {
                point
            } else {
                onset.point
            };
            rest.open = Some(Event {
                id: format!(
                    "{}:{}:{}",
                    if key.is_system() {
                        "system"
                    } else {
                        &key.function_id
                    },
                    key.series.name(),
                    onset.point.minute
                ),
                tenant: tracked.tenant.clone(),
                function_id: key.function_id.clone(),
                function: tracked.function.clone(),
                series: key.series,
                started: onset.point.minute,
                ended: None,
                peak_score: peak.score,
                peak_at: peak.minute,
                points,
            });
            rest.quiet = 0;
            Some(Change::Opened)
        } else {
            rest.pending = new_onset();
            None
        }
    } else {
        rest.pending = new_onset();
        None
    };
    let rest = &mut tracked.rest;
    rest.recent.push_back(point);
    if rest.recent.len() > BEFORE {
        rest.recent.pop_front();
    }
    let change = change?;
    let event = match change {
        Change::Closed => rest.open.take()?,
        Change::Opened | Change::Continued => rest.open.clone()?,
    };
    Some((change, event))
}

/// An anomalous point waiting for the next to confirm it, with the series' recent points
/// before it: their median (the usual level) and their extremes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Onset {
    point: Point,
    usual: f64,
    low: f64,
    high: f64,
}

impl Onset {
    fn at(recent: &VecDeque<Point>, point: Point) -> Onset {
        let mut values: Vec<f64> = recent.iter().map(|p| p.value).collect();
        values.sort_by(f64::total_cmp);
        let at = |i: usize| values.get(i).copied().unwrap_or(point.value);
        Onset {
            point,
            usual: at(values.len() / 2),
            low: at(0),
            high: at(values.len().saturating_sub(1)),
        }
    }
}

/// Whether `next` is still off the usual level the onset's way: outside what the recent
/// points spanned, and by at least half as much as the onset was.
fn confirms(onset: &Onset, next: &Point) -> bool {
    let off = onset.point.value - onset.usual;
    let still = next.value - onset.usual;
    let outside = if off > 0.0 {
        next.value > onset.high
    } else {
        next.value < onset.low
    };
    off != 0.0 && outside && still * off.signum() >= 0.5 * off.abs()
}
