//! The runtimes' behaviour: handler conventions, results, errors and logs, in Python and Node.

use cloudfunc_sandbox::{Error, Limits, Outcome, Runtime, Sandbox, SandboxSpec};
use serde_json::json;

use crate::common::{code, engine, needs, start, start_with};
use crate::Case;

const PY_HELLO: &str = r#"
print("loading hello")
def handler(event):
    print("handling", event)
    return f"Hello {event.get('name', 'World')}!"
"#;

const JS_HELLO: &str = r#"
console.log('loading hello');
exports.handler = async (event) => {
  console.log('handling', JSON.stringify(event));
  return `Hello ${event.name || 'World'}!`;
};
"#;

pub fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for runtime in Runtime::ALL {
        let n = runtime.name();
        cases.push(Case::new(
            format!("{n}::hello_with_input_then_warm"),
            needs(runtime),
            move || hello(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::raised_error_has_traceback"),
            needs(runtime),
            move || raised(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::unserialisable_result"),
            needs(runtime),
            move || unserialisable(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::oversized_result"),
            needs(runtime),
            move || oversized(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::requests_larger_than_a_pipe_then_small_ones"),
            needs(runtime),
            move || big_requests(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::big_stdout_truncated_and_marked"),
            needs(runtime),
            move || big_stdout(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::missing_handler_fails_at_start"),
            needs(runtime),
            move || missing_handler(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::exit_is_a_crash"),
            needs(runtime),
            move || crash(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::context_and_env"),
            needs(runtime),
            move || context_and_env(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::print_cannot_corrupt_results"),
            needs(runtime),
            move || print_forgery(runtime),
        ));
    }
    cases.push(Case::new(
        "python::handler_conventions",
        needs(Runtime::Python),
        python_conventions,
    ));
    cases.push(Case::new(
        "python::syntax_error_fails_at_start",
        needs(Runtime::Python),
        python_syntax_error,
    ));
    cases.push(Case::new(
        "python::bootstrap_runs_compiled",
        needs(Runtime::Python),
        python_compiled_bootstrap,
    ));
    cases.push(Case::new(
        "python::runs_on_every_cpu_the_host_may_use",
        needs(Runtime::Python),
        python_affinity,
    ));
    cases.push(Case::new(
        "python::precompiled_code_is_not_compiled_again",
        needs(Runtime::Python),
        python_precompiled,
    ));
    cases.push(Case::new(
        "node::handler_conventions",
        needs(Runtime::Node),
        node_conventions,
    ));
    cases
}

/// `py` or `js`, as `runtime` needs.
pub fn source(runtime: Runtime, py: &str, js: &str) -> String {
    match runtime {
        Runtime::Python => py.to_string(),
        Runtime::Node => js.to_string(),
    }
}

fn hello(runtime: Runtime) {
    let mut f = start(runtime, &source(runtime, PY_HELLO, JS_HELLO));
    assert!(f.sandbox.init_duration() > std::time::Duration::ZERO);
    let first = f.call(json!({"name": "Alice"}));
    assert_eq!(
        first.outcome,
        Outcome::Succeeded {
            result: json!("Hello Alice!")
        }
    );
    assert!(first.usage.cold && first.usage.init_duration > std::time::Duration::ZERO);
    assert!(
        first.logs.text.contains("loading hello"),
        "logs: {:?}",
        first.logs
    );
    assert!(
        first.logs.text.contains("handling"),
        "logs: {:?}",
        first.logs
    );
    assert!(
        first.usage.peak_memory_bytes > 1024 * 1024,
        "peak memory {:?}",
        first.usage
    );
    let second = f.call(json!({}));
    assert_eq!(
        second.outcome,
        Outcome::Succeeded {
            result: json!("Hello World!")
        }
    );
    assert!(!second.usage.cold);
    assert_eq!(second.usage.init_duration, std::time::Duration::ZERO);
    assert!(
        !second.logs.text.contains("loading hello"),
        "each call gets its own logs"
    );
}

fn raised(runtime: Runtime) {
    let src = source(
        runtime,
        "def handler(event):\n    raise ValueError('bad input: ' + str(event['n']))\n",
        "exports.handler = (event) => { throw new TypeError('bad input: ' + event.n); };\n",
    );
    let mut f = start(runtime, &src);
    let call = f.call(json!({"n": 7}));
    let Outcome::Raised { error } = &call.outcome else {
        panic!("expected raised, got {:?}", call.outcome)
    };
    let (kind, file) = match runtime {
        Runtime::Python => ("ValueError", "function.py"),
        Runtime::Node => ("TypeError", "index.js"),
    };
    assert_eq!(error.kind, kind);
    assert_eq!(error.message, "bad input: 7");
    assert!(
        error.traceback.contains(file),
        "traceback: {}",
        error.traceback
    );
    // A raised error leaves the sandbox usable.
    assert!(f.sandbox.is_alive());
    assert!(matches!(
        f.call(json!({"n": 8})).outcome,
        Outcome::Raised { .. }
    ));
}

fn unserialisable(runtime: Runtime) {
    // Not JSON in the language's own terms, or a result whose own code raises as it is
    // encoded; then JSON its encoder writes but the host cannot
    // take (an unpaired surrogate, more than 100 levels of nesting, more than the encoder's
    // own stack takes); then a result as deep as the host takes.
    let src = source(
        runtime,
        "class Odd(dict):\n    def items(self):\n        raise RuntimeError('no items')\ndef handler(event):\n    if event == 'object':\n        return object()\n    if event == 'raising':\n        return Odd(a=1)\n    if event == 'surrogate':\n        return 'a\\ud800'\n    x = []\n    for _ in range(event - 1):\n        x = [x]\n    return x\n",
        "exports.handler = (e) => { if (e === 'object') return 10n; if (e === 'raising') return { toJSON() { throw new RangeError('no items'); } }; if (e === 'surrogate') return 'a\\ud800'; let x = []; for (let i = 1; i < e; i++) x = [x]; return x; };\n",
    );
    let mut f = start(runtime, &src);
    let pid = f.sandbox.pid();
    for (event, says) in [
        (json!("object"), ""),
        (json!("raising"), "no items"),
        (json!("surrogate"), "unpaired UTF-16 surrogate"),
        (json!(101), "more than 100 levels"),
        (json!(128), "more than 100 levels"),
        (json!(200_000), ""),
    ] {
        let call = f.call(event.clone());
        let Outcome::OutputNotSerializable { error } = &call.outcome else {
            panic!("{event}: {:?}", call.outcome);
        };
        assert!(error.message.contains(says), "{event}: {error:?}");
        assert!(f.sandbox.is_alive(), "{event}: the sandbox serves on");
    }
    let call = f.call(json!(100));
    assert!(
        matches!(call.outcome, Outcome::Succeeded { .. }),
        "{:?}",
        call.outcome
    );
    assert_eq!(f.sandbox.pid(), pid, "one sandbox served every call");
}

fn oversized(runtime: Runtime) {
    // The test engine's limit is 1 MiB.
    let src = source(
        runtime,
        "def handler(event):\n    return 'x' * (2 * 1024 * 1024)\n",
        "exports.handler = () => 'x'.repeat(2 * 1024 * 1024);\n",
    );
    let mut f = start(runtime, &src);
    let call = f.call(json!({}));
    assert!(
        matches!(
            call.outcome,
            Outcome::OutputTooLarge {
                limit_bytes: 1048576,
                ..
            }
        ),
        "{:?}",
        call.outcome
    );
}

/// A request is written before the host polls, and the bootstrap reads a small one whole in
/// one read: a request of 1 MiB (16 times what a pipe holds) must still arrive whole, and the
/// small calls after it must find the stream in step.
fn big_requests(runtime: Runtime) {
    let src = source(
        runtime,
        "def handler(event):\n    return [len(event['text']), event['text'][-8:], event['n']]\n",
        "exports.handler = (event) => [event.text.length, event.text.slice(-8), event.n];\n",
    );
    let mut f = start(runtime, &src);
    let text = format!("{}tail{:04}", "ab".repeat(512 * 1024), 7);
    for n in 0..3 {
        let call = f.call(json!({"text": text, "n": n}));
        assert_eq!(
            call.outcome,
            Outcome::Succeeded {
                result: json!([text.len(), "tail0007", n])
            }
        );
        let call = f.call(json!({"text": "short", "n": n}));
        assert_eq!(
            call.outcome,
            Outcome::Succeeded {
                result: json!([5, "short", n])
            }
        );
    }
    assert!(f.sandbox.is_alive());
}

fn big_stdout(runtime: Runtime) {
    let src = source(
        runtime,
        "import sys\ndef handler(event):\n    for i in range(20000):\n        print('line', i, 'x' * 40)\n    sys.stderr.write('the end\\n')\n    return 'done'\n",
        "exports.handler = () => { for (let i = 0; i < 20000; i++) console.log('line', i, 'x'.repeat(40)); console.error('the end'); return 'done'; };\n",
    );
    let mut f = start(runtime, &src);
    let call = f.call(json!({}));
    assert_eq!(
        call.outcome,
        Outcome::Succeeded {
            result: json!("done")
        }
    );
    assert!(call.logs.truncated);
    assert_eq!(call.logs.text.len(), 16 * 1024, "kept exactly the cap");
    assert!(
        call.logs.total_bytes > 900_000,
        "counted everything: {}",
        call.logs.total_bytes
    );
    assert!(call.logs.text.starts_with("line 0 "));
}

fn missing_handler(runtime: Runtime) {
    let src = source(
        runtime,
        "def something_else(event):\n    return 1\n",
        "exports.other = () => 1;\n",
    );
    let dir = code(crate::common::module_file(runtime), &src);
    let err = Sandbox::create(engine(), SandboxSpec::new(runtime, dir.path())).unwrap_err();
    let Error::FunctionInit { error, .. } = &err else {
        panic!("expected FunctionInit, got {err:?}")
    };
    assert!(error.message.contains("handler"), "{}", error.message);
}

fn python_compiled_bootstrap() {
    // The sandbox's init runs the bootstrap the image compiled, and keeps its source beside it
    // for tracebacks.
    let py = "import os\ndef handler(event):\n    args = open('/proc/1/cmdline', 'rb').read().split(b'\\0')\n    return {'entry': args[-2].decode(), 'source': os.path.isfile('/cloudfunc/bootstrap.py')}\n";
    let mut f = start(Runtime::Python, py);
    let r = crate::common::result(&f.call(json!({})).outcome);
    assert_eq!(r["entry"], json!("/cloudfunc/bootstrap.pyc"), "{r}");
    assert_eq!(r["source"], json!(true), "{r}");
}

fn python_affinity() {
    // The shim starts on another CPU than the host thread (to load while the host prepares
    // its launch), and must hand the container the affinity it would have had.
    let host = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| host.is_set(c).unwrap_or(false))
        .collect();
    let mut f = start(
        Runtime::Python,
        "import os\ndef handler(event):\n    return sorted(os.sched_getaffinity(0))\n",
    );
    for _ in 0..3 {
        let r = crate::common::result(&f.call(json!({})).outcome);
        assert_eq!(r, json!(cpus), "the function's CPUs");
    }
}

/// A function that records every compile during its own import of `pkg.mod`.
const PY_AUDITED: &str = "import sys\ncompiled = []\nsys.addaudithook(lambda event, args: compiled.append(args[1]) if event == 'compile' else None)\nimport pkg.mod\ndef handler(event):\n    return {'compiled': compiled, 'value': pkg.mod.VALUE}\n";

fn python_precompiled() {
    use std::os::unix::fs::PermissionsExt;
    let dir = code("function.py", PY_AUDITED);
    let pkg = dir.path().join("pkg");
    std::fs::create_dir(&pkg).unwrap();
    std::fs::set_permissions(&pkg, std::fs::Permissions::from_mode(0o755)).unwrap();
    for (file, text) in [
        ("__init__.py", ""),
        ("mod.py", "VALUE = 1\n"),
        ("broken.py", "def (:\n"),
    ] {
        std::fs::write(pkg.join(file), text).unwrap();
        std::fs::set_permissions(pkg.join(file), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let run = |dir: &std::path::Path| {
        let mut sandbox =
            Sandbox::create(engine(), SandboxSpec::new(Runtime::Python, dir)).unwrap();
        let r = crate::common::result(
            &sandbox
                .invoke(&json!({}), &Default::default())
                .unwrap()
                .outcome,
        );
        sandbox.shutdown().unwrap();
        r
    };
    // From source, the import compiles the package.
    let r = run(dir.path());
    assert_eq!(
        r["compiled"],
        json!(["/code/pkg/__init__.py", "/code/pkg/mod.py"]),
        "{r}"
    );

    let done = engine().precompile(Runtime::Python, dir.path()).unwrap();
    let mut names: Vec<String> = done
        .written
        .iter()
        .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
        .collect();
    names.sort();
    let tag = std::process::Command::new(Runtime::Python.interpreter())
        .args(["-c", "import sys; print(sys.implementation.cache_tag)"])
        .output()
        .unwrap();
    let tag = String::from_utf8(tag.stdout).unwrap().trim().to_string();
    assert_eq!(
        names,
        [
            format!("__pycache__/function.{tag}.pyc"),
            format!("pkg/__pycache__/__init__.{tag}.pyc"),
            format!("pkg/__pycache__/mod.{tag}.pyc"),
        ],
        "every source that compiles, and not the broken one"
    );
    // Now nothing is compiled at import.
    let r = run(dir.path());
    assert_eq!(r["compiled"], json!([]), "{r}");
    assert_eq!(r["value"], 1, "{r}");
    // A source changed after its compile is compiled again, its stale .pyc ignored.
    std::fs::write(pkg.join("mod.py"), "VALUE = 2\n").unwrap();
    let r = run(dir.path());
    assert_eq!(r["compiled"], json!(["/code/pkg/mod.py"]), "{r}");
    assert_eq!(r["value"], 2, "{r}");
    // Node has no compiled form: nothing is written.
    let js = code("index.js", "exports.handler = () => 1;\n");
    assert_eq!(
        engine()
            .precompile(Runtime::Node, js.path())
            .unwrap()
            .written,
        Vec::<std::path::PathBuf>::new()
    );
}

fn python_syntax_error() {
    let dir = code("function.py", "def handler(event)\n    return 1\n");
    let err = Sandbox::create(engine(), SandboxSpec::new(Runtime::Python, dir.path())).unwrap_err();
    assert!(
        matches!(&err, Error::FunctionInit { error, .. } if error.kind == "SyntaxError"),
        "{err:?}"
    );
    // An empty directory is refused too.
    let empty = tempfile::tempdir().unwrap();
    let err =
        Sandbox::create(engine(), SandboxSpec::new(Runtime::Python, empty.path())).unwrap_err();
    assert!(
        matches!(&err, Error::FunctionInit { error, .. } if error.message.contains("function.py")),
        "{err:?}"
    );
}

fn crash(runtime: Runtime) {
    let src = source(
        runtime,
        "import os\ndef handler(event):\n    os._exit(3)\n",
        "exports.handler = () => { process.exit(4); };\n",
    );
    let mut f = start(runtime, &src);
    let call = f.call(json!({}));
    let code = if runtime == Runtime::Python { 3 } else { 4 };
    assert_eq!(
        call.outcome,
        Outcome::Crashed {
            exit: format!("exit code {code}")
        }
    );
    assert!(!f.sandbox.is_alive());
    assert!(matches!(
        f.sandbox.invoke(&json!({}), &Default::default()),
        Err(Error::SandboxGone)
    ));
}

fn context_and_env(runtime: Runtime) {
    let src = source(
        runtime,
        "import os\ndef handler(event, context):\n    return [context.function_name, context.request_id, context.memory_limit_in_mb, os.environ.get('GREETING'), os.environ.get('HOME'), context.get_remaining_time_in_millis() > 0]\n",
        "exports.handler = async (event, context) => [context.functionName, context.requestId, context.memoryLimitInMB, process.env.GREETING, process.env.HOME, context.getRemainingTimeInMillis() > 0];\n",
    );
    let dir = code(crate::common::module_file(runtime), &src);
    let mut spec = SandboxSpec::new(runtime, dir.path());
    spec.function_name = "ctx-fn".into();
    spec.env.insert("GREETING".into(), "hi".into());
    spec.limits = Limits {
        memory_bytes: 128 * 1024 * 1024,
        ..Limits::default()
    };
    let mut sandbox = Sandbox::create(engine(), spec).unwrap();
    let options = cloudfunc_sandbox::InvokeOptions {
        request_id: "r-42".into(),
        ..Default::default()
    };
    let call = sandbox.invoke(&json!({}), &options).unwrap();
    assert_eq!(
        call.outcome,
        Outcome::Succeeded {
            result: json!(["ctx-fn", "r-42", 128, "hi", "/tmp", true])
        }
    );
    sandbox.shutdown().unwrap();
    // Bad environment names are refused before anything starts.
    let mut spec = SandboxSpec::new(runtime, dir.path());
    spec.env.insert("BAD=NAME".into(), "x".into());
    assert!(matches!(
        Sandbox::create(engine(), spec),
        Err(Error::InvalidSpec(_))
    ));
}

fn print_forgery(runtime: Runtime) {
    // A function that prints something shaped like a reply frame, and makes a child process
    // write to its stdout, still gets its real result back.
    let src = source(
        runtime,
        "import os, subprocess, sys\ndef handler(event):\n    sys.stdout.write('\\x00\\x00\\x00\\x0b{\"ok\":true}')\n    os.write(1, b'\\x00\\x00\\x00\\x10{\"ok\":true,\"result\":1}')\n    subprocess.run(['/bin/echo', 'from a child'])\n    return 'real'\n",
        "const cp = require('child_process');\nexports.handler = () => { process.stdout.write('\\x00\\x00\\x00\\x0b{\"ok\":true}'); cp.spawnSync('/bin/echo', ['from a child'], {stdio: 'inherit'}); return 'real'; };\n",
    );
    let mut f = start(runtime, &src);
    let call = f.call(json!({}));
    assert_eq!(
        call.outcome,
        Outcome::Succeeded {
            result: json!("real")
        }
    );
    assert!(call.logs.text.contains("from a child"), "{:?}", call.logs);
    assert_eq!(
        f.call(json!({})).outcome,
        Outcome::Succeeded {
            result: json!("real")
        }
    );
}

fn python_conventions() {
    let cases: &[(&str, &str, serde_json::Value, serde_json::Value)] = &[
        // seed 003: handler(event)
        ("function.py", "def handler(event):\n    return f\"Hello {event.get('name', 'World')}!\"\n", json!({"name": "Bob"}), json!("Hello Bob!")),
        // handler(event, context)
        ("handler.py", "def handler(event, context):\n    return context.function_name\n", json!({}), json!("test-fn")),
        // seed 004: handle(payload: str) in handler.py
        (
            "handler.py",
            "import json\nfrom typing import Any\ndef handle(payload: str) -> Any:\n    return {'handler': 'default', 'processed_data': json.loads(payload), 'status': 'processed_as_json'}\n",
            json!("{\"key\": \"some value\"}"),
            json!({"handler": "default", "processed_data": {"key": "some value"}, "status": "processed_as_json"}),
        ),
        // main.py with an async handler
        ("main.py", "import asyncio\nasync def handler(event):\n    await asyncio.sleep(0)\n    return event['x'] * 2\n", json!({"x": 21}), json!(42)),
    ];
    for (file, src, event, expected) in cases {
        let mut f = start_with(Runtime::Python, file, src, Limits::default());
        let call = f.call(event.clone());
        assert_eq!(
            call.outcome,
            Outcome::Succeeded {
                result: expected.clone()
            },
            "{file}: {src}"
        );
    }
    // A handler named explicitly.
    let dir = code("app.py", "def entry(event):\n    return 'explicit'\n");
    let mut spec = SandboxSpec::new(Runtime::Python, dir.path());
    spec.handler = Some("app.entry".into());
    let mut sandbox = Sandbox::create(engine(), spec).unwrap();
    assert_eq!(sandbox.handler(), "app.entry");
    let call = sandbox.invoke(&json!({}), &Default::default()).unwrap();
    assert_eq!(
        call.outcome,
        Outcome::Succeeded {
            result: json!("explicit")
        }
    );
}

fn node_conventions() {
    let cases: &[(&str, &str, serde_json::Value)] = &[
        (
            "index.js",
            "module.exports.handler = async (event, context) => `Hello ${event.name}!`;\n",
            json!("Hello Ann!"),
        ),
        (
            "handler.js",
            "exports.handler = function (event) { return `Hello ${event.name}!`; };\n",
            json!("Hello Ann!"),
        ),
        (
            "index.js",
            "module.exports = (event) => ({greeting: `Hello ${event.name}!`});\n",
            json!({"greeting": "Hello Ann!"}),
        ),
        (
            "index.mjs",
            "export async function handler(event) { return `Hello ${event.name}!`; }\n",
            json!("Hello Ann!"),
        ),
        (
            "index.mjs",
            "export default async (event) => `Default ${event.name}!`;\n",
            json!("Default Ann!"),
        ),
    ];
    for (file, src, expected) in cases {
        let mut f = start_with(Runtime::Node, file, src, Limits::default());
        let call = f.call(json!({"name": "Ann"}));
        assert_eq!(
            call.outcome,
            Outcome::Succeeded {
                result: expected.clone()
            },
            "{file}: {src}"
        );
    }
}
