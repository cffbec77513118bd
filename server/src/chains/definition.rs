//! A chain's definition: the small workflow language, parsed from JSON (or TOML read as JSON)
//! with every mistake reported at the JSON pointer of the offending step.
//!
//! A step is a function's name (`"resize"`, `"resize@3"`), or an object with exactly one kind
//! (`function`, `sequence`, `parallel`, `map`, `choice`, `chain`) and, on any kind, `retry`
//! and `catch`. Nothing in it is code: conditions are JSON pointers compared with values.

use serde_json::{Map, Value};

/// The deepest nesting of steps inside steps.
pub const MAX_DEPTH: usize = 8;
/// The most steps (of every kind, at every level) in one definition.
pub const MAX_STEPS: usize = 256;
/// The most branches of one `parallel` step.
pub const MAX_BRANCHES: usize = 32;
/// The highest `concurrency` of a `map` step.
pub const MAX_CONCURRENCY: usize = 64;
/// The most attempts of a `retry`.
pub const MAX_ATTEMPTS: u32 = 10;
/// The longest backoff between attempts.
pub const MAX_BACKOFF_MS: u64 = 60_000;
/// The longest a whole run may be given.
pub const MAX_TIMEOUT_MS: u64 = 24 * 3_600_000;
/// The `concurrency` of a `map` step that names none.
pub const DEFAULT_CONCURRENCY: usize = 4;

/// Error kinds a run reports beyond a function's own ([`crate::model::ErrorKind`]).
pub const CHAIN_ERROR_KINDS: [&str; 3] = ["bad_input", "input_too_large", "run_timeout"];

/// A mistake in a definition, at `path` (a JSON pointer into it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DefinitionError {
    pub path: String,
    pub message: String,
}

fn bad(path: &str, message: impl Into<String>) -> DefinitionError {
    DefinitionError {
        path: if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
        message: message.into(),
    }
}

/// A parsed definition. The JSON it came from is kept ([`Definition::source`]): it is what is
/// stored and shown, and parsing it again gives the same steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub steps: Vec<Step>,
    /// The whole run's limit, if any.
    pub timeout_ms: Option<u64>,
    source: Value,
}

/// One step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub kind: Kind,
    pub retry: Option<Retry>,
    /// Steps that get the error (and the step's input) when it fails for good; their output
    /// is the step's.
    pub catch: Option<Vec<Step>>,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Calls a function with the input; its result is the output.
    Function(Target),
    /// Runs steps in order.
    Sequence(Vec<Step>),
    /// Runs each branch on the same input at once; the output is the list of their outputs.
    Parallel(Vec<Vec<Step>>),
    /// Calls a function on each element of an array (the input, or the array at `items`),
    /// `concurrency` at a time; the output is the list of results, in order. A `retry` of a
    /// map step applies to each element.
    Map {
        function: Target,
        items: Option<String>,
        concurrency: usize,
    },
    /// Runs the steps of the first rule that holds; else `default`; else passes the input on.
    Choice {
        rules: Vec<Rule>,
        default: Option<Vec<Step>>,
    },
    /// Runs another chain of the same tenant, by name (expanded when a run starts).
    Chain(String),
}

/// A function, by name, at its newest version unless one is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub version: Option<u32>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.version {
            Some(v) => write!(f, "{}@{v}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One branch of a `choice`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// A JSON pointer into the input.
    pub pointer: String,
    pub test: Test,
    pub then: Vec<Step>,
}

/// What a rule asks of the value at its pointer.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    Equals(Value),
    NotEquals(Value),
    GreaterThan(f64),
    LessThan(f64),
    /// Whether the pointer finds a value at all.
    Exists(bool),
}

impl Test {
    /// Whether `found` (the value at the pointer, if any) passes.
    pub fn holds(&self, found: Option<&Value>) -> bool {
        match self {
            Test::Equals(v) => found == Some(v),
            Test::NotEquals(v) => found != Some(v),
            Test::GreaterThan(x) => found.and_then(Value::as_f64).is_some_and(|n| n > *x),
            Test::LessThan(x) => found.and_then(Value::as_f64).is_some_and(|n| n < *x),
            Test::Exists(want) => found.is_some() == *want,
        }
    }
}

/// When and how often a failed step is tried again.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The wait before the second attempt.
    pub backoff_ms: u64,
    /// Each later wait is this many times the one before.
    pub factor: f64,
    /// The error kinds retried (`None`: every kind).
    pub on: Option<Vec<String>>,
}

impl Retry {
    /// Whether a failure of `kind` after `attempt` attempts is tried again.
    pub fn again(&self, kind: &str, attempt: u32) -> bool {
        attempt < self.attempts
            && self
                .on
                .as_ref()
                .is_none_or(|on| on.iter().any(|k| k == kind))
    }

    /// The wait after attempt `attempt` (from 1) failed.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let ms = (self.backoff_ms as f64 * self.factor.powi(exp)).min(MAX_BACKOFF_MS as f64);
        std::time::Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }
}

impl Definition {
    /// Parses and checks a definition: `{"steps": [...], "timeout_ms": ...}`. `known_kinds`
    /// are the error kinds a `retry` may name.
    pub fn parse(source: &Value, known_kinds: &[&str]) -> Result<Definition, DefinitionError> {
        let obj = source
            .as_object()
            .ok_or_else(|| bad("", "a chain is a JSON object with \"steps\""))?;
        for key in obj.keys() {
            if !matches!(
                key.as_str(),
                "name" | "steps" | "timeout_ms" | "description"
            ) {
                return Err(bad(
                    &format!("/{}", escape(key)),
                    format!("unknown field {key:?}: a chain has name, steps, timeout_ms and description"),
                ));
            }
        }
        let timeout_ms = match obj.get("timeout_ms") {
            None | Some(Value::Null) => None,
            Some(v) => Some(bounded(v, "/timeout_ms", 1, MAX_TIMEOUT_MS)?),
        };
        let mut parser = Parser {
            known_kinds,
            count: 0,
        };
        let steps = parser.list(obj.get("steps"), "/steps", 0)?;
        Ok(Definition {
            steps,
            timeout_ms,
            source: source.clone(),
        })
    }

    /// The JSON it was parsed from.
    pub fn source(&self) -> &Value {
        &self.source
    }

    /// Every function it names, with the path of the first step naming it.
    pub fn functions(&self) -> Vec<(String, Target)> {
        let mut out = Vec::new();
        visit(&self.steps, "/steps", &mut |path, step| match &step.kind {
            Kind::Function(t) | Kind::Map { function: t, .. } => {
                out.push((path.to_string(), t.clone()))
            }
            _ => {}
        });
        out
    }

    /// Every chain it names, with the path of the step.
    pub fn chains(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        visit(&self.steps, "/steps", &mut |path, step| {
            if let Kind::Chain(name) = &step.kind {
                out.push((path.to_string(), name.clone()))
            }
        });
        out
    }
}

/// Calls `f` on every step, with its path, parents first.
fn visit(steps: &[Step], prefix: &str, f: &mut dyn FnMut(&str, &Step)) {
    for (i, step) in steps.iter().enumerate() {
        let path = format!("{prefix}/{i}");
        f(&path, step);
        match &step.kind {
            Kind::Sequence(list) => visit(list, &format!("{path}/sequence"), f),
            Kind::Parallel(branches) => {
                for (b, list) in branches.iter().enumerate() {
                    visit(list, &format!("{path}/parallel/{b}"), f);
                }
            }
            Kind::Choice { rules, default } => {
                for (r, rule) in rules.iter().enumerate() {
                    visit(&rule.then, &format!("{path}/choice/{r}/then"), f);
                }
                if let Some(list) = default {
                    visit(list, &format!("{path}/default"), f);
                }
            }
            Kind::Function(_) | Kind::Map { .. } | Kind::Chain(_) => {}
        }
        if let Some(list) = &step.catch {
            visit(list, &format!("{path}/catch"), f);
        }
    }
}

/// `~` and `/` escaped for a JSON pointer segment.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Whether `pointer` is a well-formed JSON pointer (RFC 6901): empty, or segments each after a
/// `/`, with `~` only in `~0` and `~1`.
pub fn valid_pointer(pointer: &str) -> bool {
    if pointer.is_empty() {
        return true;
    }
    if !pointer.starts_with('/') {
        return false;
    }
    let bytes = pointer.as_bytes();
    bytes
        .iter()
        .enumerate()
        .all(|(i, &b)| b != b'~' || matches!(bytes.get(i + 1), Some(b'0' | b'1')))
}

fn bounded(v: &Value, path: &str, min: u64, max: u64) -> Result<u64, DefinitionError> {
    v.as_u64()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| bad(path, format!("must be a whole number from {min} to {max}")))
}

struct Parser<'a> {
    known_kinds: &'a [&'a str],
    count: usize,
}

/// The keys a step object may have besides its kind.
const COMMON: [&str; 2] = ["retry", "catch"];
const KINDS: [&str; 6] = ["function", "sequence", "parallel", "map", "choice", "chain"];

impl Parser<'_> {
    /// A list of steps: an array, or one step (a name) standing for a list of one.
    fn list(
        &mut self,
        v: Option<&Value>,
        path: &str,
        depth: usize,
    ) -> Result<Vec<Step>, DefinitionError> {
        if depth >= MAX_DEPTH {
            return Err(bad(
                path,
                format!("steps are nested more than {MAX_DEPTH} deep"),
            ));
        }
        match v {
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .enumerate()
                .map(|(i, item)| self.step(item, &format!("{path}/{i}"), depth))
                .collect(),
            Some(Value::Array(_)) => Err(bad(path, "must list at least one step")),
            Some(v @ (Value::String(_) | Value::Object(_))) => {
                Ok(vec![self.step(v, &format!("{path}/0"), depth)?])
            }
            Some(_) => Err(bad(path, "must be a list of steps")),
            None => Err(bad(path, "is missing: list the steps")),
        }
    }

    fn step(&mut self, v: &Value, path: &str, depth: usize) -> Result<Step, DefinitionError> {
        self.count += 1;
        if self.count > MAX_STEPS {
            return Err(bad(path, format!("a chain has at most {MAX_STEPS} steps")));
        }
        let obj = match v {
            Value::String(name) => {
                return Ok(Step {
                    kind: Kind::Function(target(name, path)?),
                    retry: None,
                    catch: None,
                })
            }
            Value::Object(obj) => obj,
            _ => {
                return Err(bad(
                    path,
                    "a step is a function's name or an object with one of function, sequence, parallel, map, choice or chain",
                ))
            }
        };
        let kinds: Vec<&str> = KINDS.into_iter().filter(|k| obj.contains_key(*k)).collect();
        let kind_name = match kinds.as_slice() {
            [one] => *one,
            [] => {
                return Err(bad(
                    path,
                    "the step has no kind: give one of function, sequence, parallel, map, choice or chain",
                ))
            }
            _ => {
                return Err(bad(
                    path,
                    format!("the step has several kinds ({}): give one", kinds.join(", ")),
                ))
            }
        };
        let allowed: &[&str] = match kind_name {
            "map" => &["items", "concurrency"],
            "choice" => &["default"],
            _ => &[],
        };
        for key in obj.keys() {
            if key != kind_name
                && !COMMON.contains(&key.as_str())
                && !allowed.contains(&key.as_str())
            {
                return Err(bad(
                    &format!("{path}/{}", escape(key)),
                    format!("unknown field {key:?} for a {kind_name} step"),
                ));
            }
        }
        let at = |k: &str| format!("{path}/{k}");
        let value = &obj[kind_name];
        let kind = match kind_name {
            "function" => Kind::Function(
                string(value, &at("function")).and_then(|s| target(s, &at("function")))?,
            ),
            "sequence" => Kind::Sequence(self.list(Some(value), &at("sequence"), depth + 1)?),
            "parallel" => {
                let branches = value.as_array().filter(|b| !b.is_empty()).ok_or_else(|| {
                    bad(
                        &at("parallel"),
                        "must be a list of branches, each a list of steps",
                    )
                })?;
                if branches.len() > MAX_BRANCHES {
                    return Err(bad(
                        &at("parallel"),
                        format!("at most {MAX_BRANCHES} branches"),
                    ));
                }
                Kind::Parallel(
                    branches
                        .iter()
                        .enumerate()
                        .map(|(b, list)| {
                            self.list(Some(list), &format!("{path}/parallel/{b}"), depth + 1)
                        })
                        .collect::<Result<_, _>>()?,
                )
            }
            "map" => {
                let function = string(value, &at("map")).and_then(|s| target(s, &at("map")))?;
                let items = match obj.get("items") {
                    None => None,
                    Some(p) => {
                        let p = string(p, &at("items"))?;
                        if !valid_pointer(p) {
                            return Err(bad(
                                &at("items"),
                                format!("{p:?} is not a JSON pointer (\"\" or \"/a/0\")"),
                            ));
                        }
                        Some(p.to_string())
                    }
                };
                let concurrency = match obj.get("concurrency") {
                    None => DEFAULT_CONCURRENCY,
                    Some(c) => {
                        usize::try_from(bounded(c, &at("concurrency"), 1, MAX_CONCURRENCY as u64)?)
                            .unwrap_or(DEFAULT_CONCURRENCY)
                    }
                };
                Kind::Map {
                    function,
                    items,
                    concurrency,
                }
            }
            "choice" => {
                let rules = value
                    .as_array()
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| bad(&at("choice"), "must be a list of rules: {\"pointer\": \"/x\", \"equals\": 1, \"then\": [...]}"))?;
                let rules = rules
                    .iter()
                    .enumerate()
                    .map(|(r, rule)| self.rule(rule, &format!("{path}/choice/{r}"), depth))
                    .collect::<Result<_, _>>()?;
                let default = match obj.get("default") {
                    None => None,
                    Some(d) => Some(self.list(Some(d), &at("default"), depth + 1)?),
                };
                Kind::Choice { rules, default }
            }
            _ => {
                let name = string(value, &at("chain"))?;
                if !crate::model::valid_name(name) {
                    return Err(bad(&at("chain"), format!("{name:?} is not a chain name")));
                }
                Kind::Chain(name.to_string())
            }
        };
        let retry = obj
            .get("retry")
            .map(|r| self.retry(r, &at("retry")))
            .transpose()?;
        let catch = match obj.get("catch") {
            None => None,
            Some(c) => Some(self.list(Some(c), &at("catch"), depth + 1)?),
        };
        Ok(Step { kind, retry, catch })
    }

    fn rule(&mut self, v: &Value, path: &str, depth: usize) -> Result<Rule, DefinitionError> {
        let obj = v.as_object().ok_or_else(|| {
            bad(
                path,
                "a rule is an object: {\"pointer\": \"/x\", \"equals\": 1, \"then\": [...]}",
            )
        })?;
        let at = |k: &str| format!("{path}/{k}");
        let pointer = string(
            obj.get("pointer")
                .ok_or_else(|| bad(path, "the rule has no \"pointer\""))?,
            &at("pointer"),
        )?;
        if !valid_pointer(pointer) {
            return Err(bad(
                &at("pointer"),
                format!("{pointer:?} is not a JSON pointer (\"\" or \"/a/0\")"),
            ));
        }
        let tests: Vec<&str> = [
            "equals",
            "not_equals",
            "greater_than",
            "less_than",
            "exists",
        ]
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
        let test =
            match tests.as_slice() {
                [one] => {
                    let v = &obj[*one];
                    let number = || v.as_f64().ok_or_else(|| bad(&at(one), "must be a number"));
                    match *one {
                        "equals" => Test::Equals(v.clone()),
                        "not_equals" => Test::NotEquals(v.clone()),
                        "greater_than" => Test::GreaterThan(number()?),
                        "less_than" => Test::LessThan(number()?),
                        _ => Test::Exists(
                            v.as_bool()
                                .ok_or_else(|| bad(&at(one), "must be true or false"))?,
                        ),
                    }
                }
                _ => return Err(bad(
                    path,
                    "a rule has exactly one of equals, not_equals, greater_than, less_than, exists",
                )),
            };
        for key in obj.keys() {
            if !matches!(key.as_str(), "pointer" | "then") && !tests.contains(&key.as_str()) {
                return Err(bad(
                    &format!("{path}/{}", escape(key)),
                    format!("unknown field {key:?} in a rule"),
                ));
            }
        }
        let then = self.list(obj.get("then"), &at("then"), depth + 1)?;
        Ok(Rule {
            pointer: pointer.to_string(),
            test,
            then,
        })
    }

    fn retry(&self, v: &Value, path: &str) -> Result<Retry, DefinitionError> {
        let obj: &Map<String, Value> = v.as_object().ok_or_else(|| {
            bad(
                path,
                "retry is an object: {\"attempts\": 3, \"backoff_ms\": 100}",
            )
        })?;
        let at = |k: &str| format!("{path}/{k}");
        for key in obj.keys() {
            if !matches!(key.as_str(), "attempts" | "backoff_ms" | "factor" | "on") {
                return Err(bad(
                    &at(&escape(key)),
                    format!("unknown field {key:?}: retry has attempts, backoff_ms, factor and on"),
                ));
            }
        }
        let attempts = match obj.get("attempts") {
            Some(a) => {
                u32::try_from(bounded(a, &at("attempts"), 1, u64::from(MAX_ATTEMPTS))?).unwrap_or(1)
            }
            None => 3,
        };
        let backoff_ms = match obj.get("backoff_ms") {
            Some(b) => bounded(b, &at("backoff_ms"), 0, MAX_BACKOFF_MS)?,
            None => 100,
        };
        let factor = match obj.get("factor") {
            Some(f) => f
                .as_f64()
                .filter(|f| (1.0..=10.0).contains(f))
                .ok_or_else(|| bad(&at("factor"), "must be a number from 1 to 10"))?,
            None => 2.0,
        };
        let on = match obj.get("on") {
            None => None,
            Some(Value::Array(kinds)) if !kinds.is_empty() => Some(
                kinds
                    .iter()
                    .enumerate()
                    .map(|(i, k)| {
                        let p = format!("{path}/on/{i}");
                        let k = string(k, &p)?;
                        if self.known_kinds.contains(&k) {
                            Ok(k.to_string())
                        } else {
                            Err(bad(
                                &p,
                                format!(
                                    "unknown error kind {k:?}: one of {}",
                                    self.known_kinds.join(", ")
                                ),
                            ))
                        }
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err(bad(&at("on"), "must be a list of error kinds")),
        };
        Ok(Retry {
            attempts,
            backoff_ms,
            factor,
            on,
        })
    }
}

fn string<'v>(v: &'v Value, path: &str) -> Result<&'v str, DefinitionError> {
    v.as_str().ok_or_else(|| bad(path, "must be a string"))
}

/// `name` or `name@version`.
fn target(s: &str, path: &str) -> Result<Target, DefinitionError> {
    let (name, version) = match s.rsplit_once('@') {
        Some((name, v)) => {
            let v = v
                .parse::<u32>()
                .ok()
                .filter(|v| *v >= 1)
                .ok_or_else(|| bad(path, format!("bad version in {s:?}: write name@3")))?;
            (name, Some(v))
        }
        None => (s, None),
    };
    if !crate::model::valid_name(name) {
        return Err(bad(
            path,
            format!("{name:?} is not a function name (a-z, 0-9, _ and -)"),
        ));
    }
    Ok(Target {
        name: name.to_string(),
        version,
    })
}

/// `source` with every `chain` step replaced by a `sequence` of the named chain's steps
/// (keeping its `retry` and `catch`), recursively. `load` gives a chain's definition by name
/// (`None`: no such chain). A chain that names itself, directly or through others, is refused
/// at the step that closes the cycle.
pub fn expand_chains(
    source: &Value,
    own_name: &str,
    load: &mut dyn FnMut(&str) -> Result<Option<Value>, String>,
) -> Result<Value, DefinitionError> {
    let mut out = source.clone();
    let mut stack = vec![own_name.to_string()];
    let mut budget = MAX_STEPS;
    if let Some(steps) = out.get_mut("steps") {
        expand_list(steps, "/steps", &mut stack, &mut budget, load)?;
    }
    Ok(out)
}

fn expand_list(
    list: &mut Value,
    path: &str,
    stack: &mut Vec<String>,
    budget: &mut usize,
    load: &mut dyn FnMut(&str) -> Result<Option<Value>, String>,
) -> Result<(), DefinitionError> {
    match list {
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_step(item, &format!("{path}/{i}"), stack, budget, load)?;
            }
            Ok(())
        }
        one @ Value::Object(_) => expand_step(one, path, stack, budget, load),
        _ => Ok(()),
    }
}

fn expand_step(
    step: &mut Value,
    path: &str,
    stack: &mut Vec<String>,
    budget: &mut usize,
    load: &mut dyn FnMut(&str) -> Result<Option<Value>, String>,
) -> Result<(), DefinitionError> {
    let Some(obj) = step.as_object_mut() else {
        return Ok(());
    };
    if let Some(Value::String(name)) = obj.get("chain").cloned() {
        if stack.contains(&name) {
            return Err(bad(
                &format!("{path}/chain"),
                format!("a cycle: {} -> {name}", stack.join(" -> ")),
            ));
        }
        *budget = budget.checked_sub(1).ok_or_else(|| {
            bad(
                path,
                format!("the chains it names expand to more than {MAX_STEPS} steps"),
            )
        })?;
        let sub = load(&name)
            .map_err(|e| bad(&format!("{path}/chain"), e))?
            .ok_or_else(|| bad(&format!("{path}/chain"), format!("no chain {name:?}")))?;
        let mut steps = sub.get("steps").cloned().unwrap_or(Value::Null);
        stack.push(name);
        expand_list(&mut steps, &format!("{path}/chain"), stack, budget, load)?;
        stack.pop();
        obj.remove("chain");
        obj.insert("sequence".into(), steps);
    }
    for key in ["sequence", "default", "catch"] {
        if let Some(list) = obj.get_mut(key) {
            expand_list(list, &format!("{path}/{key}"), stack, budget, load)?;
        }
    }
    if let Some(Value::Array(branches)) = obj.get_mut("parallel") {
        for (b, list) in branches.iter_mut().enumerate() {
            expand_list(list, &format!("{path}/parallel/{b}"), stack, budget, load)?;
        }
    }
    if let Some(Value::Array(rules)) = obj.get_mut("choice") {
        for (r, rule) in rules.iter_mut().enumerate() {
            if let Some(then) = rule.get_mut("then") {
                expand_list(
                    then,
                    &format!("{path}/choice/{r}/then"),
                    stack,
                    budget,
                    load,
                )?;
            }
        }
    }
    Ok(())
}
