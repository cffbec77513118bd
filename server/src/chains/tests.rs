//! The language and the walk, over a recording fake of [`Steps`] (the real steps, in
//! sandboxes, are in `server/tests/chains.rs`).

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{json, Value};

use super::definition::{Definition, Kind};
use super::engine::{run, BoxFuture, Caps, Failure, Steps};
use super::Target;

const KINDS: &[&str] = &["raised", "timeout", "bad_input"];

fn parse(v: Value) -> Definition {
    Definition::parse(&v, KINDS).unwrap()
}

fn refused(v: Value) -> (String, String) {
    let e = Definition::parse(&v, KINDS).unwrap_err();
    (e.path, e.message)
}

/// Functions by name: `inc` adds 1 to a number, `echo` returns its input, `fail` raises,
/// `flaky` raises on its first `flaky_failures` calls, `len` counts an array. Every call is
/// recorded with its path.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<(String, String, Value)>>,
    flaky_failures: Mutex<u32>,
    /// Results by path, as a resumed run finds them.
    remembered: HashMap<String, Value>,
}

impl Steps for Fake {
    fn call<'a>(
        &'a self,
        path: String,
        target: &'a Target,
        input: Value,
    ) -> BoxFuture<'a, Result<Value, Failure>> {
        Box::pin(async move {
            if let Some(v) = self.remembered.get(&path) {
                return Ok(v.clone());
            }
            self.calls
                .lock()
                .unwrap()
                .push((path.clone(), target.name.clone(), input.clone()));
            let raise = |m: &str| Err(Failure::new("raised", &path, m));
            match target.name.as_str() {
                "inc" => Ok(json!(input.as_i64().unwrap_or(0) + 1)),
                "echo" => Ok(input),
                "len" => Ok(json!(input.as_array().map_or(0, Vec::len))),
                "fail" => raise("it fails"),
                "flaky" => {
                    let mut left = self.flaky_failures.lock().unwrap();
                    if *left > 0 {
                        *left -= 1;
                        return raise("not yet");
                    }
                    Ok(json!("recovered"))
                }
                "big" => Ok(json!("x".repeat(600))),
                other => Err(Failure::new("function_unavailable", &path, other)),
            }
        })
    }

    fn wait(&self, _: std::time::Duration) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

impl Fake {
    fn paths(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.0.clone())
            .collect()
    }
}

const CAPS: Caps = Caps {
    max_value_bytes: 1 << 20,
};

async fn go(fake: &Fake, def: Value, input: Value) -> Result<Value, Failure> {
    run(fake, CAPS, &parse(def).steps, input).await
}

#[tokio::test]
async fn a_sequence_hands_each_output_to_the_next() {
    let fake = Fake::default();
    let out = go(
        &fake,
        json!({"steps": ["inc", "inc", {"function": "inc"}]}),
        json!(1),
    )
    .await;
    assert_eq!(out, Ok(json!(4)));
    assert_eq!(fake.paths(), ["/steps/0", "/steps/1", "/steps/2"]);
    let inputs: Vec<Value> = fake
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.2.clone())
        .collect();
    assert_eq!(inputs, [json!(1), json!(2), json!(3)]);
}

#[tokio::test]
async fn parallel_joins_branch_outputs_in_branch_order() {
    let fake = Fake::default();
    let def = json!({"steps": [{"parallel": [["inc", "inc"], ["echo"], "len"]}]});
    assert_eq!(go(&fake, def, json!(5)).await, Ok(json!([7, 5, 0])));
    let mut paths = fake.paths();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/steps/0/parallel/0/0",
            "/steps/0/parallel/0/1",
            "/steps/0/parallel/1/0",
            "/steps/0/parallel/2/0"
        ]
    );
}

#[tokio::test]
async fn map_keeps_order_and_reads_items_at_a_pointer() {
    let fake = Fake::default();
    let items: Vec<i64> = (0..50).collect();
    let def = json!({"steps": [{"map": "inc", "items": "/xs", "concurrency": 7}]});
    let out = go(&fake, def, json!({"xs": items})).await.unwrap();
    let want: Vec<i64> = (1..51).collect();
    assert_eq!(out, json!(want));
    assert!(fake.paths().contains(&"/steps/0[49]".to_string()));

    let refused = go(&fake, json!({"steps": [{"map": "inc"}]}), json!({"no": 1})).await;
    assert_eq!(refused.unwrap_err().kind, "bad_input");
}

#[tokio::test]
async fn choice_takes_the_first_rule_that_holds_else_default_else_passes_through() {
    let def = json!({"steps": [{"choice": [
        {"pointer": "/size", "greater_than": 10, "then": ["len"]},
        {"pointer": "/kind", "equals": "n", "then": [{"function": "echo"}, "len"]},
    ], "default": "echo"}]});
    let fake = Fake::default();
    assert_eq!(
        go(&fake, def.clone(), json!({"size": 11})).await,
        Ok(json!(0))
    );
    assert_eq!(fake.paths(), ["/steps/0/choice/0/then/0"]);
    let fake = Fake::default();
    assert_eq!(
        go(&fake, def.clone(), json!({"size": 3, "kind": "n"})).await,
        Ok(json!(0))
    );
    assert_eq!(
        fake.paths(),
        ["/steps/0/choice/1/then/0", "/steps/0/choice/1/then/1"]
    );
    let fake = Fake::default();
    assert_eq!(
        go(&fake, def, json!({"size": 3})).await,
        Ok(json!({"size": 3}))
    );
    assert_eq!(fake.paths(), ["/steps/0/default/0"]);

    let fake = Fake::default();
    let only = json!({"steps": [{"choice": [{"pointer": "/x", "exists": true, "then": "inc"}]}]});
    assert_eq!(go(&fake, only, json!({"y": 1})).await, Ok(json!({"y": 1})));
    assert!(fake.paths().is_empty());
}

#[tokio::test]
async fn retry_runs_new_attempts_at_their_own_paths_then_catch_gets_the_error() {
    let fake = Fake::default();
    *fake.flaky_failures.lock().unwrap() = 2;
    let def = json!({"steps": [{"function": "flaky", "retry": {"attempts": 3, "backoff_ms": 1}}]});
    assert_eq!(go(&fake, def, json!(null)).await, Ok(json!("recovered")));
    assert_eq!(fake.paths(), ["/steps/0", "/steps/0@2", "/steps/0@3"]);

    let fake = Fake::default();
    let def = json!({"steps": [
        {"function": "fail", "retry": {"attempts": 2, "on": ["raised"]}, "catch": ["echo"]},
        "echo"
    ]});
    let out = go(&fake, def, json!({"a": 1})).await.unwrap();
    assert_eq!(out["error"]["kind"], "raised");
    assert_eq!(out["error"]["step"], "/steps/0@2");
    assert_eq!(out["input"], json!({"a": 1}));
    assert_eq!(
        fake.paths(),
        ["/steps/0", "/steps/0@2", "/steps/0/catch/0", "/steps/1"]
    );

    // A kind the retry does not name is not retried.
    let fake = Fake::default();
    let def = json!({"steps": [{"function": "fail", "retry": {"attempts": 5, "on": ["timeout"]}}]});
    let e = go(&fake, def, json!(null)).await.unwrap_err();
    assert_eq!((e.kind.as_str(), e.step.as_str()), ("raised", "/steps/0"));
    assert_eq!(fake.paths().len(), 1);
}

#[tokio::test]
async fn a_failure_stops_the_run_at_its_step() {
    let fake = Fake::default();
    let e = go(
        &fake,
        json!({"steps": ["inc", {"parallel": [["inc"], ["fail"]]}, "inc"]}),
        json!(0),
    )
    .await
    .unwrap_err();
    assert_eq!(e.step, "/steps/1/parallel/1/0");
    assert!(!fake.paths().contains(&"/steps/2".to_string()));
}

#[tokio::test]
async fn remembered_calls_are_not_run_again() {
    let mut fake = Fake::default();
    fake.remembered.insert("/steps/0".into(), json!(10));
    fake.remembered.insert("/steps/1[0]".into(), json!("done"));
    let def = json!({"steps": ["inc", {"map": "inc", "items": ""}]});
    // The remembered first step's output (10) is not an array: the map refuses it, having run
    // nothing, so the walk used the remembered value rather than running step 0 again.
    let e = go(&fake, def, json!(0)).await.unwrap_err();
    assert_eq!(e.kind, "bad_input");
    assert!(fake.paths().is_empty());
}

#[tokio::test]
async fn joined_outputs_over_the_cap_fail_naming_the_step() {
    let fake = Fake::default();
    let caps = Caps {
        max_value_bytes: 1000,
    };
    let def = parse(json!({"steps": [{"map": "big"}]}));
    let e = run(&fake, caps, &def.steps, json!([1, 2]))
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind.as_str(), e.step.as_str()),
        ("output_too_large", "/steps/0")
    );
}

#[test]
fn definitions_are_checked_with_the_path_of_the_mistake() {
    let cases = [
        (json!({"steps": []}), "/steps"),
        (json!({"steps": ["Bad Name"]}), "/steps/0"),
        (json!({"steps": ["f@x"]}), "/steps/0"),
        (
            json!({"steps": [{"function": "f", "map": "g"}]}),
            "/steps/0",
        ),
        (
            json!({"steps": [{"function": "f", "retyr": {}}]}),
            "/steps/0/retyr",
        ),
        (
            json!({"steps": ["f", {"parallel": [["g"], [{"nope": 1}]]}]}),
            "/steps/1/parallel/1/0",
        ),
        (
            json!({"steps": [{"map": "f", "items": "xs"}]}),
            "/steps/0/items",
        ),
        (
            json!({"steps": [{"map": "f", "concurrency": 0}]}),
            "/steps/0/concurrency",
        ),
        (
            json!({"steps": [{"choice": [{"pointer": "/a~2", "equals": 1, "then": "f"}]}]}),
            "/steps/0/choice/0/pointer",
        ),
        (
            json!({"steps": [{"choice": [{"pointer": "/a", "then": "f"}]}]}),
            "/steps/0/choice/0",
        ),
        (
            json!({"steps": [{"function": "f", "retry": {"attempts": 99}}]}),
            "/steps/0/retry/attempts",
        ),
        (
            json!({"steps": [{"function": "f", "retry": {"on": ["nonsense"]}}]}),
            "/steps/0/retry/on/0",
        ),
        (json!({"steps": ["f"], "timeout_ms": 0}), "/timeout_ms"),
        (json!({"steps": ["f"], "extra": 1}), "/extra"),
        (json!(["f"]), "/"),
    ];
    for (def, path) in cases {
        let (at, message) = refused(def.clone());
        assert_eq!(at, path, "{def}: {message}");
        assert!(!message.is_empty());
    }

    // Over-deep nesting is refused where it passes the limit.
    let mut deep = json!("f");
    for _ in 0..super::definition::MAX_DEPTH + 1 {
        deep = json!({"sequence": [deep]});
    }
    let (at, message) = refused(json!({"steps": [deep]}));
    assert!(at.starts_with("/steps/0/sequence/0/sequence"), "{at}");
    assert!(message.contains("nested"), "{message}");
}

#[test]
fn a_definition_lists_what_it_names() {
    let def = parse(
        json!({"steps": ["a@2", {"parallel": [[{"map": "b"}], [{"chain": "c"}]]}, {"function": "d", "catch": "e"}]}),
    );
    let functions: Vec<(String, String)> = def
        .functions()
        .into_iter()
        .map(|(p, t)| (p, t.to_string()))
        .collect();
    assert_eq!(
        functions,
        [
            ("/steps/0".to_string(), "a@2".to_string()),
            ("/steps/1/parallel/0/0".into(), "b".into()),
            ("/steps/2".into(), "d".into()),
            ("/steps/2/catch/0".into(), "e".into()),
        ]
    );
    assert_eq!(
        def.chains(),
        [("/steps/1/parallel/1/0".to_string(), "c".to_string())]
    );
    assert!(matches!(def.steps[1].kind, Kind::Parallel(_)));
}

#[test]
fn named_chains_expand_in_place_and_cycles_are_refused() {
    let mut chains: HashMap<&str, Value> = HashMap::new();
    chains.insert("inner", json!({"steps": ["inc", {"chain": "deeper"}]}));
    chains.insert("deeper", json!({"steps": ["echo"]}));
    chains.insert("loop_a", json!({"steps": [{"chain": "loop_b"}]}));
    chains.insert("loop_b", json!({"steps": ["inc", {"chain": "loop_a"}]}));
    let mut load = |name: &str| Ok(chains.get(name).cloned());

    let source = json!({"steps": [{"chain": "inner", "retry": {"attempts": 2}}, "len"]});
    let expanded = super::definition::expand_chains(&source, "outer", &mut load).unwrap();
    assert_eq!(
        expanded["steps"][0],
        json!({"sequence": ["inc", {"sequence": ["echo"]}], "retry": {"attempts": 2}})
    );
    parse(expanded);

    let e = super::definition::expand_chains(
        &json!({"steps": [{"chain": "loop_a"}]}),
        "outer",
        &mut load,
    )
    .unwrap_err();
    assert_eq!(e.path, "/steps/0/chain/0/chain/1/chain");
    assert!(
        e.message.contains("loop_a -> loop_b -> loop_a"),
        "{}",
        e.message
    );

    let e = super::definition::expand_chains(&json!({"steps": [{"chain": "me"}]}), "me", &mut load)
        .unwrap_err();
    assert!(e.message.contains("cycle"), "{}", e.message);
    let e =
        super::definition::expand_chains(&json!({"steps": [{"chain": "gone"}]}), "x", &mut load)
            .unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("/steps/0/chain", "no chain \"gone\"")
    );
}
