//! A rule's state for each thing it watches, as Alertmanager keeps it: `ok`, then
//! `pending` while the condition holds for less than the rule's `for`, then `firing`, and
//! back to `ok` (a resolved notification) when it stops holding. A notification goes out on
//! firing, on resolving, and while firing every re-notify interval; never on every
//! evaluation.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::model::{Item, Rule};

/// Where one rule stands for one subject (a function, or the system).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Phase {
    Pending { since: i64 },
    Firing { since: i64, notified_at: i64 },
}

/// What a rule observed of one subject in an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The function's id (empty for the system).
    pub subject: String,
    /// The function's name (empty for the system).
    pub name: String,
    /// The metric's value; `None` when there is nothing to measure (a rate without calls),
    /// which does not hold.
    pub value: Option<f64>,
}

/// A change worth a notification.
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// It started firing (or fires again, past the re-notify interval).
    Firing(Item),
    /// It stopped holding while firing.
    Resolved(Item),
}

/// A subject that is pending or firing, with what it last showed.
#[derive(Debug, Clone)]
struct Tracked {
    phase: Phase,
    name: String,
    value: f64,
}

/// Every rule's phase per subject (subjects in `ok` are absent). Keyed by rule, then subject,
/// so that an evaluation looks subjects up without allocating: most are `ok` and cost a
/// lookup.
#[derive(Debug, Default)]
pub struct Evaluator {
    rules: HashMap<String, HashMap<String, Tracked>>,
}

impl Evaluator {
    /// Starts from saved phases (after a restart, so that nothing fires twice).
    pub fn restore(phases: Vec<(String, String, Phase)>) -> Evaluator {
        let mut e = Evaluator::default();
        for (rule, subject, phase) in phases {
            e.rules.entry(rule).or_default().insert(
                subject,
                Tracked {
                    phase,
                    name: String::new(),
                    value: 0.0,
                },
            );
        }
        e
    }

    /// Every phase, to save.
    pub fn phases(&self) -> Vec<(String, String, Phase)> {
        let mut all: Vec<_> = self
            .rules
            .iter()
            .flat_map(|(r, subjects)| {
                subjects
                    .iter()
                    .map(move |(s, t)| (r.clone(), s.clone(), t.phase))
            })
            .collect();
        all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        all
    }

    /// A rule's phase for a subject (`None`: ok).
    pub fn phase(&self, rule: &str, subject: &str) -> Option<Phase> {
        self.rules.get(rule)?.get(subject).map(|t| t.phase)
    }

    /// Forgets a deleted rule.
    pub fn forget(&mut self, rule: &str) {
        self.rules.remove(rule);
    }

    /// Steps `rule` with what it observed at `now`: every subject it watched before and did
    /// not observe now counts as not holding.
    pub fn evaluate(
        &mut self,
        rule: &Rule,
        observations: &[Observation],
        now: i64,
    ) -> Vec<Transition> {
        let for_ms = i64::try_from(rule.spec.for_s).unwrap_or(i64::MAX / 1000) * 1000;
        let renotify_ms = i64::try_from(rule.spec.renotify_s).unwrap_or(0) * 1000;
        let subjects = self.rules.entry(rule.id.clone()).or_default();
        let mut out = Vec::new();
        for o in observations {
            let holds = o.value.is_some_and(|v| rule.spec.holds(v));
            let item = |since| Item {
                function: o.name.clone(),
                function_id: o.subject.clone(),
                value: o.value.unwrap_or(0.0),
                since,
            };
            match (subjects.get_mut(o.subject.as_str()), holds) {
                (None, false) => {}
                (None, true) => {
                    let phase = if for_ms == 0 {
                        out.push(Transition::Firing(item(now)));
                        Phase::Firing {
                            since: now,
                            notified_at: now,
                        }
                    } else {
                        Phase::Pending { since: now }
                    };
                    subjects.insert(
                        o.subject.clone(),
                        Tracked {
                            phase,
                            name: o.name.clone(),
                            value: o.value.unwrap_or(0.0),
                        },
                    );
                }
                (Some(t), true) => {
                    t.name.clone_from(&o.name);
                    t.value = o.value.unwrap_or(t.value);
                    match t.phase {
                        Phase::Pending { since } if now - since >= for_ms => {
                            t.phase = Phase::Firing {
                                since,
                                notified_at: now,
                            };
                            out.push(Transition::Firing(item(since)));
                        }
                        Phase::Firing { since, notified_at }
                            if renotify_ms > 0 && now - notified_at >= renotify_ms =>
                        {
                            t.phase = Phase::Firing {
                                since,
                                notified_at: now,
                            };
                            out.push(Transition::Firing(item(since)));
                        }
                        _ => {}
                    }
                }
                (Some(t), false) => {
                    if let Phase::Firing { since, .. } = t.phase {
                        out.push(Transition::Resolved(Item {
                            value: o.value.unwrap_or(t.value),
                            ..item(since)
                        }));
                    }
                    subjects.remove(o.subject.as_str());
                }
            }
        }
        // Subjects no longer observed (a function deleted, or without data) stop holding.
        if !subjects.is_empty() {
            let seen: std::collections::HashSet<&str> =
                observations.iter().map(|o| o.subject.as_str()).collect();
            subjects.retain(|subject, t| {
                if seen.contains(subject.as_str()) {
                    return true;
                }
                if let Phase::Firing { since, .. } = t.phase {
                    out.push(Transition::Resolved(Item {
                        function: t.name.clone(),
                        function_id: subject.clone(),
                        value: t.value,
                        since,
                    }));
                }
                false
            });
        }
        if subjects.is_empty() {
            self.rules.remove(&rule.id);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::model::{Metric, Op, RuleSpec, Severity};

    fn rule(for_s: u64, renotify_s: u64) -> Rule {
        Rule {
            id: "r1".into(),
            tenant: "t".into(),
            spec: RuleSpec {
                name: "errors".into(),
                function: None,
                metric: Metric::ErrorRate,
                error_kind: None,
                op: Op::Above,
                threshold: 0.1,
                for_s,
                severity: Severity::Critical,
                renotify_s,
            },
            function_id: None,
            silenced_until: None,
            created_at: 0,
        }
    }

    fn seen(subject: &str, value: Option<f64>) -> Observation {
        Observation {
            subject: subject.into(),
            name: format!("name-{subject}"),
            value,
        }
    }

    #[test]
    fn fires_after_its_window_once_then_resolves_once() {
        let r = rule(60, 0);
        let mut e = Evaluator::default();
        assert!(e.evaluate(&r, &[seen("f", Some(0.5))], 0).is_empty());
        assert_eq!(e.phase("r1", "f"), Some(Phase::Pending { since: 0 }));
        assert!(e.evaluate(&r, &[seen("f", Some(0.5))], 30_000).is_empty());
        let fired = e.evaluate(&r, &[seen("f", Some(0.6))], 60_000);
        assert!(matches!(&fired[..], [Transition::Firing(i)] if i.since == 0 && i.value == 0.6));
        // Still firing: nothing new on every evaluation.
        for t in 1..100 {
            assert!(e
                .evaluate(&r, &[seen("f", Some(0.6))], 60_000 + t * 15_000)
                .is_empty());
        }
        let resolved = e.evaluate(&r, &[seen("f", Some(0.0))], 2_000_000);
        assert!(matches!(&resolved[..], [Transition::Resolved(i)] if i.function == "name-f"));
        assert_eq!(e.phase("r1", "f"), None);
    }

    #[test]
    fn a_blip_shorter_than_the_window_never_fires() {
        let r = rule(60, 0);
        let mut e = Evaluator::default();
        let mut all = Vec::new();
        for (t, v) in [
            (0, 0.5),
            (15, 0.5),
            (30, 0.0),
            (45, 0.5),
            (60, 0.5),
            (75, 0.0),
        ] {
            all.extend(e.evaluate(&r, &[seen("f", Some(v))], t * 1000));
        }
        assert!(all.is_empty(), "{all:?}");
    }

    #[test]
    fn re_notifies_while_firing_and_resolves_a_subject_that_is_gone() {
        let r = rule(0, 600);
        let mut e = Evaluator::default();
        assert_eq!(e.evaluate(&r, &[seen("f", Some(1.0))], 0).len(), 1);
        assert!(e.evaluate(&r, &[seen("f", Some(1.0))], 599_000).is_empty());
        assert_eq!(e.evaluate(&r, &[seen("f", Some(1.0))], 600_000).len(), 1);
        let gone = e.evaluate(&r, &[], 700_000);
        assert!(matches!(&gone[..], [Transition::Resolved(i)] if i.value == 1.0 && i.since == 0));
        // No data is not holding.
        let r2 = rule(0, 0);
        assert_eq!(e.evaluate(&r2, &[seen("g", Some(1.0))], 0).len(), 1);
        assert_eq!(e.evaluate(&r2, &[seen("g", None)], 1).len(), 1);
    }

    #[test]
    fn restored_phases_do_not_fire_again() {
        let r = rule(0, 0);
        let mut e = Evaluator::default();
        assert_eq!(e.evaluate(&r, &[seen("f", Some(1.0))], 0).len(), 1);
        let mut back = Evaluator::restore(e.phases());
        assert!(back.evaluate(&r, &[seen("f", Some(1.0))], 1000).is_empty());
        back.forget("r1");
        assert_eq!(back.phase("r1", "f"), None);
    }
}
