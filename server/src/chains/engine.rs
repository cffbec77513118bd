//! Runs a definition: walks its steps, hands each function call to a [`Steps`] (which runs it,
//! and remembers it by path so a resumed run does not run it again), and retries, catches and
//! joins as the definition says. It knows no sandbox and no store.
//!
//! Every call has a path: the JSON pointer of its step in the definition, with `[i]` for the
//! i-th element of a map and `@n` for the n-th attempt of a retried step (`/steps/2@2`,
//! `/steps/3[7]`, `/steps/1/parallel/0/0`). The same definition and input give the same paths,
//! which is what makes a run resumable.

use std::future::Future;
use std::pin::Pin;

use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::definition::{Kind, Retry, Step, Target};

/// The most elements one map step runs over.
pub const MAX_MAP_ELEMENTS: usize = 10_000;

/// A boxed future (the walk is recursive).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a step (and so, unless caught, the run) failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// An error kind: a function's ([`crate::model::ErrorKind`]) or a chain's
    /// ([`super::definition::CHAIN_ERROR_KINDS`]).
    pub kind: String,
    pub message: String,
    /// The path of the step that failed.
    pub step: String,
    /// The function's error record, where a function failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

impl Failure {
    pub fn new(kind: &str, step: &str, message: impl Into<String>) -> Failure {
        Failure {
            kind: kind.into(),
            message: message.into(),
            step: step.into(),
            error: None,
        }
    }
}

/// What runs one function call of a run.
pub trait Steps: Send + Sync {
    /// Calls `target` with `input` as the step at `path`: once per path, whatever happens to
    /// the process between.
    fn call<'a>(
        &'a self,
        path: String,
        target: &'a Target,
        input: Value,
    ) -> BoxFuture<'a, Result<Value, Failure>>;

    /// Waits before a retry.
    fn wait(&self, d: std::time::Duration) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(d))
    }
}

/// Limits a run is held to.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// The largest value handed to a step or joined from several (the result cap).
    pub max_value_bytes: usize,
}

/// Runs `steps` on `input`.
pub async fn run(
    exec: &dyn Steps,
    caps: Caps,
    steps: &[Step],
    input: Value,
) -> Result<Value, Failure> {
    Walk { exec, caps }
        .list("/steps".into(), steps, input)
        .await
}

#[derive(Clone, Copy)]
struct Walk<'a> {
    exec: &'a dyn Steps,
    caps: Caps,
}

impl<'a> Walk<'a> {
    fn list(
        self,
        prefix: String,
        steps: &'a [Step],
        input: Value,
    ) -> BoxFuture<'a, Result<Value, Failure>> {
        Box::pin(async move {
            let mut value = input;
            for (i, step) in steps.iter().enumerate() {
                value = self.step(format!("{prefix}/{i}"), step, value).await?;
            }
            Ok(value)
        })
    }

    /// A step with its retries and its catch.
    fn step(
        self,
        path: String,
        step: &'a Step,
        input: Value,
    ) -> BoxFuture<'a, Result<Value, Failure>> {
        Box::pin(async move {
            // A map retries each element, not the whole map.
            let retry = match step.kind {
                Kind::Map { .. } => None,
                _ => step.retry.as_ref(),
            };
            let failure = match self
                .attempts(&path, retry, |p| self.kind(p, step, input.clone()))
                .await
            {
                Ok(v) => return Ok(v),
                Err(f) => f,
            };
            match &step.catch {
                None => Err(failure),
                Some(handler) => {
                    let record = json!({"error": failure, "input": input});
                    self.list(format!("{path}/catch"), handler, record).await
                }
            }
        })
    }

    /// Runs `attempt` (given the attempt's path) until it succeeds or `retry` gives up.
    async fn attempts<F>(
        self,
        path: &str,
        retry: Option<&Retry>,
        attempt: F,
    ) -> Result<Value, Failure>
    where
        F: Fn(String) -> BoxFuture<'a, Result<Value, Failure>>,
    {
        let mut n = 1;
        loop {
            let p = if n == 1 {
                path.to_string()
            } else {
                format!("{path}@{n}")
            };
            match attempt(p).await {
                Ok(v) => return Ok(v),
                Err(f) => match retry {
                    Some(r) if r.again(&f.kind, n) => {
                        self.exec.wait(r.backoff(n)).await;
                        n += 1;
                    }
                    _ => return Err(f),
                },
            }
        }
    }

    fn kind(
        self,
        path: String,
        step: &'a Step,
        input: Value,
    ) -> BoxFuture<'a, Result<Value, Failure>> {
        Box::pin(async move {
            match &step.kind {
                Kind::Function(target) => self.exec.call(path, target, input).await,
                Kind::Sequence(list) => self.list(format!("{path}/sequence"), list, input).await,
                Kind::Parallel(branches) => {
                    let runs = branches.iter().enumerate().map(|(b, list)| {
                        self.list(format!("{path}/parallel/{b}"), list, input.clone())
                    });
                    let ended = futures_util::future::join_all(runs).await;
                    let outputs = ended.into_iter().collect::<Result<Vec<_>, _>>()?;
                    self.joined(&path, outputs)
                }
                Kind::Map {
                    function,
                    items,
                    concurrency,
                } => {
                    let array = match items.as_deref().map_or(Some(&input), |p| input.pointer(p)) {
                        Some(Value::Array(a)) if a.len() > MAX_MAP_ELEMENTS => {
                            return Err(Failure::new(
                                "bad_input",
                                &path,
                                format!(
                                    "a map step takes at most {MAX_MAP_ELEMENTS} elements; this input has {}",
                                    a.len()
                                ),
                            ))
                        }
                        Some(Value::Array(a)) => a.clone(),
                        _ => {
                            return Err(Failure::new(
                                "bad_input",
                                &path,
                                format!(
                                    "a map step needs an array at {:?} of its input",
                                    items.as_deref().unwrap_or("")
                                ),
                            ))
                        }
                    };
                    let retry = step.retry.as_ref();
                    let calls = array.into_iter().enumerate().map(|(i, item)| {
                        let element = format!("{path}[{i}]");
                        async move {
                            self.attempts(&element, retry, |p| {
                                self.exec.call(p, function, item.clone())
                            })
                            .await
                        }
                    });
                    let ended: Vec<_> = stream::iter(calls).buffered(*concurrency).collect().await;
                    let outputs = ended.into_iter().collect::<Result<Vec<_>, _>>()?;
                    self.joined(&path, outputs)
                }
                Kind::Choice { rules, default } => {
                    for (r, rule) in rules.iter().enumerate() {
                        if rule.test.holds(input.pointer(&rule.pointer)) {
                            return self
                                .list(format!("{path}/choice/{r}/then"), &rule.then, input)
                                .await;
                        }
                    }
                    match default {
                        Some(list) => self.list(format!("{path}/default"), list, input).await,
                        None => Ok(input),
                    }
                }
                Kind::Chain(name) => Err(Failure::new(
                    "function_unavailable",
                    &path,
                    format!("the chain {name:?} was not expanded before the run"),
                )),
            }
        })
    }

    /// The list of `outputs`, unless it is over the cap.
    fn joined(self, path: &str, outputs: Vec<Value>) -> Result<Value, Failure> {
        let joined = Value::Array(outputs);
        let size = json_size(&joined);
        if size > self.caps.max_value_bytes {
            return Err(Failure::new(
                "output_too_large",
                path,
                format!(
                    "the joined outputs of step {path} are {size} bytes, over the {} byte cap",
                    self.caps.max_value_bytes
                ),
            ));
        }
        Ok(joined)
    }
}

/// The size of `v` as JSON, without writing it anywhere.
pub fn json_size(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}
