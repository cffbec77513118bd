//! Functions that misbehave without meaning harm, or with it: what they raise cannot be
//! printed, they write to the reply channel, fork and let the child return, leave a Worker
//! running, throw outside their promise, close their own output. Each call is reported as the
//! function's doing, no call gets another's result, and nothing runs on between calls.

use serde_json::json;

use cloudfunc_sandbox::{Outcome, Runtime};

use crate::common::{needs, start};
use crate::runtimes::source;
use crate::Case;

pub fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for runtime in Runtime::ALL {
        let n = runtime.name();
        cases.push(Case::new(
            format!("{n}::an_unprintable_error_is_still_raised"),
            needs(runtime),
            move || unprintable(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::forged_reply_is_the_functions_crash"),
            needs(runtime),
            move || reply_forgery(runtime),
        ));
    }
    cases.push(Case::new(
        "node::stray_errors_fail_their_own_call",
        needs(Runtime::Node),
        stray_errors,
    ));
    cases.push(Case::new(
        "node::a_promise_nothing_can_settle_fails_its_call",
        needs(Runtime::Node),
        unsettled,
    ));
    cases.push(Case::new(
        "python::a_forked_child_that_returns_has_no_say",
        needs(Runtime::Python),
        forked_returns,
    ));
    cases.push(Case::new(
        "node::a_worker_left_running_retires_the_sandbox",
        needs(Runtime::Node),
        worker_threads,
    ));
    cases.push(Case::new(
        "python::closed_output_streams_lose_no_reply",
        needs(Runtime::Python),
        closed_streams,
    ));
    cases
}

fn unprintable(runtime: Runtime) {
    // What a function raises is its own object: its text may hold unpaired surrogates (not
    // Unicode: JSON the host refuses), and making its text may itself fail. Either way the
    // call is the function's failure, reported, and the sandbox serves on.
    let src = source(
        runtime,
        "class Odd(Exception):\n    def __str__(self):\n        raise RuntimeError('no text')\ndef handler(event):\n    if event == 'surrogate':\n        raise ValueError('bad \\ud800 text')\n    raise Odd()\n",
        "exports.handler = (e) => { if (e === 'surrogate') throw new Error('bad \\ud800 text'); throw Object.create(null); };\n",
    );
    let mut f = start(runtime, &src);
    let pid = f.sandbox.pid();
    for (event, says) in [("surrogate", "bad \u{fffd} text"), ("odd", "<unprintable")] {
        let call = f.call(json!(event));
        let Outcome::Raised { error } = &call.outcome else {
            panic!("{event}: {:?}", call.outcome)
        };
        assert!(error.message.contains(says), "{event}: {error:?}");
    }
    assert_eq!(f.sandbox.pid(), pid, "one sandbox served every call");
}

fn stray_errors() {
    // Errors outside the handler's own promise: a rejection nobody awaited, a throw in a
    // timer's callback. Node would end the process (for the rejection, during the next call,
    // with this call's error); each fails the call it came from, and the sandbox serves on.
    let src = "exports.handler = async (e) => {\n  if (e === 'rejection') Promise.reject(new Error('nobody awaited me'));\n  if (e === 'timer') { setTimeout(() => { throw new RangeError('thrown in a timer'); }, 1); await new Promise((r) => setTimeout(r, 60000)); }\n  return e;\n};\n";
    let mut f = start(Runtime::Node, src);
    let pid = f.sandbox.pid();
    for (event, says) in [
        ("rejection", "nobody awaited me"),
        ("timer", "thrown in a timer"),
    ] {
        let call = f.call(json!(event));
        let Outcome::Raised { error } = &call.outcome else {
            panic!("{event}: {:?}", call.outcome)
        };
        assert!(error.message.contains(says), "{event}: {error:?}");
        assert!(
            call.usage.duration < std::time::Duration::from_secs(10),
            "{event}: {:?}",
            call.usage
        );
        let next = f.call(json!("fine"));
        assert_eq!(
            next.outcome,
            Outcome::Succeeded {
                result: json!("fine")
            },
            "after {event}"
        );
    }
    assert_eq!(f.sandbox.pid(), pid, "one sandbox served every call");
}

fn unsettled() {
    // A promise nothing can settle: Node would exit (status 0) with the call in flight.
    let src = "exports.handler = (e) => (e === 'never' ? new Promise(() => {}) : e);\n";
    let mut f = start(Runtime::Node, src);
    let call = f.call(json!("never"));
    let Outcome::Raised { error } = &call.outcome else {
        panic!("{:?}", call.outcome)
    };
    assert_eq!(error.kind, "UnsettledPromise", "{error:?}");
    assert!(call.usage.duration < std::time::Duration::from_secs(10));
    let next = f.call(json!("fine"));
    assert_eq!(
        next.outcome,
        Outcome::Succeeded {
            result: json!("fine")
        }
    );
}

fn forked_returns() {
    // A handler that forks and lets the child return too, and a module that forks at import
    // and lets the child go on: each call still gets its own result, never another call's
    // (the child's reply was read as the next call's; at import, its second `ready` as the
    // first call's reply). Whether the child says so in the logs depends on whether it gets
    // there before the parent's clean-up kills it.
    let forking = [
        (
            "a module that forks at import",
            "import os\nos.fork()\ndef handler(event):\n    return 'parent:' + str(event)\n",
            4,
        ),
        (
            "a handler that forks",
            "import os\ndef handler(event):\n    pid = os.fork()\n    return ('child' if pid == 0 else 'parent') + ':' + str(event)\n",
            6,
        ),
    ];
    for (what, src, calls) in forking {
        let mut f = start(Runtime::Python, src);
        for n in 0..calls {
            let call = f.call(json!(n));
            assert_eq!(
                call.outcome,
                Outcome::Succeeded {
                    result: json!(format!("parent:{n}"))
                },
                "call {n} of {what}"
            );
        }
    }
}

fn worker_threads() {
    // A Worker left running would run on between calls: its sandbox retires after the call.
    // One that ended within its call, and libuv's thread pool started by a call, do not.
    let src = "const fs = require('fs');\nconst { Worker } = require('worker_threads');\nexports.handler = async (e) => {\n  if (e === 'pool') await fs.promises.readFile('/code/index.js');\n  if (e === 'done') await new Promise((r) => new Worker('1', { eval: true }).on('exit', r));\n  if (e === 'spin') new Worker('for (;;) {}', { eval: true });\n  return e;\n};\n";
    let mut f = start(Runtime::Node, src);
    for event in ["pool", "done", "pool", "done"] {
        let call = f.call(json!(event));
        assert_eq!(
            call.outcome,
            Outcome::Succeeded {
                result: json!(event)
            }
        );
        assert!(f.sandbox.is_alive(), "{event}: the sandbox serves on");
    }
    let call = f.call(json!("spin"));
    assert_eq!(
        call.outcome,
        Outcome::Succeeded {
            result: json!("spin")
        }
    );
    assert!(
        !f.sandbox.is_alive(),
        "a Worker left running retires the sandbox"
    );
}

fn closed_streams() {
    // A function may replace or close its own output streams; its result still comes back,
    // and the sandbox serves on.
    let src = "import sys\ndef handler(event):\n    print('before', flush=True)\n    if event == 'none':\n        sys.stdout = None\n    else:\n        sys.stdout.close()\n        sys.stderr.close()\n    return event\n";
    for event in ["none", "close"] {
        let mut f = start(Runtime::Python, src);
        let call = f.call(json!(event));
        assert_eq!(
            call.outcome,
            Outcome::Succeeded {
                result: json!(event)
            },
            "{event}"
        );
        assert!(
            call.logs.text.contains("before"),
            "{event}: {:?}",
            call.logs
        );
        assert!(f.sandbox.is_alive(), "{event}");
    }
}

fn reply_forgery(runtime: Runtime) {
    // The reply channel is open in the function's process (fd 4 in both bootstraps): a
    // function can write to it. What it writes there is its own doing, never the sandbox's
    // failure (which would raise the platform's alerts), and the sandbox is stopped.
    let src = source(
        runtime,
        "import os\ndef handler(event):\n    os.write(4, len(event).to_bytes(4, 'big') + event.encode())\n    return 'real'\n",
        "const fs = require('fs');\nexports.handler = (e) => { const b = Buffer.from(e); const h = Buffer.alloc(4); h.writeUInt32BE(b.length); fs.writeSync(4, Buffer.concat([h, b])); return 'real'; };\n",
    );
    for (forged, says) in [
        ("hello", "malformed reply"),
        (r#"{"ok":true,"ready":true}"#, "a ready message"),
        (
            r#"{"ok":false,"kind":"init_failed","error":{"type":"x","message":"y"}}"#,
            "a load failure",
        ),
    ] {
        let mut f = start(runtime, &src);
        let call = f.call(json!(forged));
        let Outcome::Crashed { exit } = &call.outcome else {
            panic!("{forged}: {:?}", call.outcome);
        };
        assert!(
            exit.contains("reply protocol") && exit.contains(says),
            "{exit}"
        );
        assert!(!f.sandbox.is_alive(), "{forged}: the sandbox is stopped");
    }
}
