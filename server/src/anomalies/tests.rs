use super::*;

/// A day's start (a Monday, UTC), Unix ms.
const DAY0: i64 = 1_700_438_400_000;
const MINUTE: i64 = 60_000;

/// A small deterministic noise source in [-0.5, 0.5).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }
}

fn input(function_id: &str, series: Series, value: f64) -> Input {
    Input {
        key: Key::function(function_id, series),
        tenant: "t".into(),
        function: format!("fn-{function_id}"),
        value,
    }
}

/// A function's minute: about 20 calls with a little jitter, `ms` at p95, no errors.
fn ordinary(noise: &mut Noise, id: &str, ms: f64, error_rate: f64) -> Vec<Input> {
    vec![
        input(id, Series::Invocations, (20.0 + 4.0 * noise.next()).round()),
        input(id, Series::ErrorRate, error_rate),
        input(id, Series::DurationP95, ms * (1.0 + 0.1 * noise.next())),
        input(id, Series::ColdRatio, 0.0),
        input(id, Series::PeakMemory, 20e6 * (1.0 + 0.01 * noise.next())),
    ]
}

#[test]
fn a_steady_day_makes_no_event_and_a_latency_jump_makes_one_within_minutes() {
    let mut w = Watcher::new(WatchConfig::default());
    let mut noise = Noise(7);
    // A day of two steady functions; then one's latency jumps tenfold.
    for m in 0..1440 {
        let mut inputs = ordinary(&mut noise, "steady", 12.0, 0.0);
        inputs.extend(ordinary(&mut noise, "jumpy", 12.0, 0.0));
        let out = w.minute(DAY0 + m * MINUTE, inputs);
        assert!(out.events.is_empty(), "minute {m}: {:?}", out.events);
    }
    let statuses = w.status("steady");
    assert_eq!(statuses.len(), 5);
    assert!(statuses.iter().all(|s| s.status == "watching"));
    let jump = DAY0 + 1440 * MINUTE;
    let mut opened = None;
    for m in 0..30 {
        let mut inputs = ordinary(&mut noise, "steady", 12.0, 0.0);
        inputs.extend(ordinary(&mut noise, "jumpy", 120.0, 0.0));
        let out = w.minute(jump + m * MINUTE, inputs);
        for (change, event) in out.events {
            assert_eq!(event.function_id, "jumpy", "{event:?}");
            if change == Change::Opened && opened.is_none() {
                opened = Some((m, event));
            }
        }
    }
    let (m, event) = opened.expect("the jump opened an event");
    assert!(m <= 3, "opened {m} minutes after the jump");
    assert_eq!(event.series, Series::DurationP95);
    assert!(event.peak_score >= WatchConfig::default().threshold);
    // The points before it, then its own.
    assert!(event.points.len() > 5 && event.points.last().unwrap().value > 100.0);
    assert!(event.points[0].value < 15.0);
}

#[test]
fn a_climbing_error_rate_makes_an_event_that_closes_when_it_settles() {
    let mut w = Watcher::new(WatchConfig::default());
    let mut noise = Noise(11);
    for m in 0..600 {
        w.minute(DAY0 + m * MINUTE, ordinary(&mut noise, "f", 30.0, 0.0));
    }
    let mut changes = Vec::new();
    for m in 600..1200 {
        // Errors climb for ten minutes to a third of the calls, then stay there.
        let rate = ((m - 600) as f64 / 30.0).min(1.0 / 3.0);
        let out = w.minute(DAY0 + m * MINUTE, ordinary(&mut noise, "f", 30.0, rate));
        changes.extend(out.events.into_iter().map(|(c, e)| (m, c, e)));
    }
    let (opened_at, _, event) = changes
        .iter()
        .find(|(_, c, _)| *c == Change::Opened)
        .expect("an event opened");
    assert!(*opened_at <= 605, "opened at minute {opened_at}");
    assert_eq!(event.series, Series::ErrorRate);
    let closed = changes
        .iter()
        .find(|(_, c, e)| *c == Change::Closed && e.id == event.id)
        .expect("it closed once the new rate was the norm");
    assert!(closed.2.ended.unwrap() > closed.2.started);
    assert!(w.status("f").iter().all(|s| s.open_event.is_none()));
}

#[test]
fn a_function_no_longer_called_is_fed_zeros_and_saved_state_carries_on() {
    let mut w = Watcher::new(WatchConfig::default());
    let mut noise = Noise(3);
    for m in 0..1000 {
        w.minute(DAY0 + m * MINUTE, ordinary(&mut noise, "f", 30.0, 0.0));
    }
    let mut restored = Watcher::new(WatchConfig::default());
    assert_eq!(restored.restore(w.save()), 5);
    let mut scores = Vec::new();
    for m in 1000..1020 {
        // No calls at all: the invocations series takes 0s, the others wait.
        let a = w.minute(DAY0 + m * MINUTE, vec![]);
        let b = restored.minute(DAY0 + m * MINUTE, vec![]);
        assert_eq!(a, b);
        assert_eq!(a.scored.len(), 1);
        assert_eq!(a.scored[0].0.series, Series::Invocations);
        assert_eq!(a.scored[0].2.value, 0.0);
        scores.push(a.scored[0].2.score);
    }
    // The first minute without calls is the most surprising of them (by default, a drop to
    // no calls after a steady day scores just under the threshold: see docs/anomaly.md).
    let first = scores[0];
    assert!(scores[1..].iter().all(|s| *s < first), "{scores:?}");
    assert!(first > 0.15, "{scores:?}");
    w.forget("f");
    assert!(w.status("f").is_empty());
    assert!(w.minute(DAY0 + 1100 * MINUTE, vec![]).scored.is_empty());
}

#[test]
fn too_little_data_says_so() {
    let mut w = Watcher::new(WatchConfig::default());
    let mut noise = Noise(5);
    for m in 0..10 {
        let out = w.minute(DAY0 + m * MINUTE, ordinary(&mut noise, "new", 5.0, 0.0));
        assert!(out.scored.iter().all(|(_, _, p)| p.score == 0.0));
    }
    let s = w.status("new");
    assert!(s
        .iter()
        .all(|s| s.status == "learning" && s.points_seen == 10));
    assert!(s.iter().all(|s| s.points_needed > 10));
    let corrupt = Saved {
        detector: vec![0],
        ..w.save().remove(0)
    };
    let mut other = Watcher::new(WatchConfig::default());
    assert_eq!(
        other.restore(vec![corrupt]),
        0,
        "unreadable state is learnt again"
    );
    assert_eq!(other.status("new")[0].points_seen, 0);
}

#[test]
fn a_one_minute_blip_is_no_event_but_a_shift_that_stays_is() {
    let mut w = Watcher::new(WatchConfig::default());
    let mut noise = Noise(13);
    for m in 0..1000 {
        w.minute(DAY0 + m * MINUTE, ordinary(&mut noise, "f", 10.0, 0.0));
    }
    // A minute ten times slower, then back to usual.
    let blip = w.minute(DAY0 + 1000 * MINUTE, ordinary(&mut noise, "f", 100.0, 0.0));
    let onset = blip
        .scored
        .iter()
        .find(|(k, _, _)| k.series == Series::DurationP95)
        .unwrap()
        .2;
    assert!(onset.score >= WatchConfig::default().threshold, "{onset:?}");
    for m in 1001..1030 {
        let out = w.minute(DAY0 + m * MINUTE, ordinary(&mut noise, "f", 10.0, 0.0));
        assert!(out.events.is_empty(), "{:?}", out.events);
    }
    // Thirty times slower for good (the blip made ten times less surprising): an event from
    // its first minute, opened at the second.
    let first = w.minute(DAY0 + 1100 * MINUTE, ordinary(&mut noise, "f", 300.0, 0.0));
    assert!(first.events.is_empty());
    let second = w.minute(DAY0 + 1101 * MINUTE, ordinary(&mut noise, "f", 300.0, 0.0));
    let d = |o: &Minute| {
        o.scored
            .iter()
            .find(|(k, _, _)| k.series == Series::DurationP95)
            .map(|x| x.2)
    };
    assert!(
        !second.events.is_empty(),
        "{:?} {:?}",
        d(&first),
        d(&second)
    );
    let (change, event) = &second.events[0];
    assert_eq!(*change, Change::Opened);
    assert_eq!(event.started, DAY0 + 1100 * MINUTE);
    assert_eq!(event.series, Series::DurationP95);
}

#[test]
fn a_busy_host_slowing_a_tight_latency_by_a_quarter_is_no_event() {
    // As CI measured it: a p95 within 2 % of 10.5 ms all day, then two minutes at 13.1 and
    // 13.6 ms while the host was busy. Rare for this series, but host noise, not the function.
    let mut w = Watcher::new(WatchConfig::default());
    let mut noise = Noise(29);
    let minute = |noise: &mut Noise, ms: f64| {
        vec![
            input("f", Series::Invocations, 2.0),
            input("f", Series::DurationP95, ms * (1.0 + 0.02 * noise.next())),
        ]
    };
    for m in 0..1000 {
        w.minute(DAY0 + m * MINUTE, minute(&mut noise, 10.5));
    }
    let mut scores = Vec::new();
    for (m, ms) in (1000..).zip([13.1, 13.6, 10.4, 10.5, 10.5, 10.4, 10.5]) {
        let out = w.minute(DAY0 + m * MINUTE, minute(&mut noise, ms));
        scores.extend(
            out.scored
                .iter()
                .filter(|(k, _, _)| k.series == Series::DurationP95)
                .map(|x| x.2.score),
        );
        assert!(
            out.events.is_empty(),
            "{:?} (scores {scores:?})",
            out.events
        );
    }
}
