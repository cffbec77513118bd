//! Reuse: what one call leaves behind is gone before the next, and pre-started sandboxes
//! ("stem cells") take a function's code, environment and limits when they are bound.

use std::collections::BTreeMap;

use std::time::Duration;

use cloudfunc_sandbox::{InvokeOptions, Limits, Outcome, Runtime, SandboxSpec, StemCell};
use serde_json::json;

use crate::common::{code, engine, module_file, needs, on_gvisor, result, start, Fixture};
use crate::Case;

const MIB: u64 = 1024 * 1024;

pub fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for runtime in Runtime::ALL {
        let n = runtime.name();
        cases.push(Case::new(
            format!("{n}::stem_cell_takes_code_env_and_limits"),
            needs(runtime),
            move || stem_cell(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::background_process_is_gone_before_the_next_call"),
            needs(runtime),
            move || background(runtime),
        ));
        cases.push(Case::new(
            format!("{n}::calls_from_an_async_task"),
            needs(runtime),
            move || async_calls(runtime),
        ));
    }
    cases.push(Case::new(
        "python::peak_memory_is_per_call_where_the_kernel_can_reset_it",
        needs(Runtime::Python),
        peak_per_call,
    ));
    cases.push(Case::new(
        "python::cpu_time_is_the_calls_own_to_the_microsecond",
        needs(Runtime::Python),
        cpu_time_per_call,
    ));
    cases.push(Case::new(
        "python::hidden_children_are_gone_before_the_next_call",
        needs(Runtime::Python),
        hidden_children,
    ));
    cases.push(Case::new(
        "python::lingering_thread_retires_the_sandbox",
        needs(Runtime::Python),
        lingering_thread,
    ));
    cases
}

fn stem_cell(runtime: Runtime) {
    let cell = StemCell::start(engine(), runtime, Limits::default()).expect("stem cell starts");
    let source = match runtime {
        Runtime::Python => "import os, subprocess\ndef handler(event):\n    try:\n        open('/code/new', 'w')\n        wrote = True\n    except OSError:\n        wrote = False\n    child = subprocess.run(['/bin/sh', '-c', 'printf %s \"$GREETING\"'], capture_output=True).stdout.decode()\n    return {'greeting': os.environ.get('GREETING'), 'child': child, 'files': sorted(os.listdir('/code')), 'wrote': wrote}\n",
        Runtime::Node => "const fs = require('fs');\nconst cp = require('child_process');\nexports.handler = () => { let wrote = true; try { fs.writeFileSync('/code/new', 'x'); } catch (e) { wrote = false; } const child = cp.execFileSync('/bin/sh', ['-c', 'printf %s \"$GREETING\"']).toString(); return {greeting: process.env.GREETING || null, child, files: fs.readdirSync('/code').sort(), wrote}; };\n",
    };
    let dir = code(module_file(runtime), source);
    let mut spec = SandboxSpec::new(runtime, dir.path());
    spec.env = BTreeMap::from([("GREETING".to_string(), "hi".to_string())]);
    spec.limits = Limits {
        memory_bytes: 96 * MIB,
        cpu_millicores: 500,
        ..Limits::default()
    };
    let id = cell.id().to_string();
    let mut sandbox = cell.bind(spec).expect("binds");
    assert_eq!(sandbox.id(), id);
    let call = sandbox
        .invoke(&json!({}), &Default::default())
        .expect("invoke");
    assert!(
        call.usage.cold,
        "the first call in a sandbox is its cold one"
    );
    let r = result(&call.outcome);
    assert_eq!(r["greeting"], "hi", "{r}");
    assert_eq!(
        r["child"], "hi",
        "processes it starts inherit the environment: {r}"
    );
    assert_eq!(r["files"], json!([module_file(runtime)]), "{r}");
    assert_eq!(r["wrote"], false, "/code is read-only: {r}");
    // The limits are the function's now, in the cgroup the kernel enforces.
    let dirs = engine().cgroup_dirs(&id);
    let read = |file: &str| {
        dirs.iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .map(|t| t.trim().to_string())
    };
    let memory = read("memory.limit_in_bytes").or_else(|| read("memory.max"));
    assert_eq!(memory, Some((96 * MIB).to_string()));
    let quota = read("cpu.cfs_quota_us")
        .or_else(|| read("cpu.max").map(|m| m.split(' ').next().unwrap().to_string()));
    assert_eq!(quota, Some("50000".to_string()));
    let again = sandbox.invoke(&json!({}), &Default::default()).unwrap();
    assert!(!again.usage.cold);
    sandbox.shutdown().unwrap();
    assert!(
        !engine().bundle_dir(&id).exists(),
        "the cell's code goes with it"
    );
}

fn background(runtime: Runtime) {
    let source = match runtime {
        Runtime::Python => "import os, subprocess\ndef handler(event):\n    if event.get('spawn'):\n        return subprocess.Popen(['/bin/sleep', '1000'], start_new_session=True).pid\n    try:\n        os.kill(event['pid'], 0)\n        return 'alive'\n    except ProcessLookupError:\n        return 'gone'\n",
        Runtime::Node => "const cp = require('child_process');\nexports.handler = (event) => { const c = cp.spawn('/bin/sleep', ['1000'], {detached: true, stdio: 'ignore'}); c.unref(); return c.pid; };\n",
    };
    let mut f = start(runtime, source);
    let first = f.call(json!({"spawn": true}));
    let pid = result(&first.outcome);
    assert!(pid.as_u64().is_some(), "{pid}");
    match runtime {
        Runtime::Python => {
            // The bootstrap killed and reaped it; the sandbox stays usable.
            assert!(f.sandbox.is_alive());
            let second = f.call(json!({"pid": pid}));
            assert_eq!(result(&second.outcome), "gone");
        }
        Runtime::Node => {
            // Node cannot reap what it adopts: it kills the child and retires the sandbox.
            assert!(
                !f.sandbox.is_alive(),
                "a sandbox that left a process must retire"
            );
        }
    }
    if !on_gvisor() {
        let procs = engine().cgroup_dirs(f.sandbox.id())[0].join("cgroup.procs");
        let left = std::fs::read_to_string(procs).unwrap_or_default();
        assert!(left.lines().count() <= 1, "only init may remain: {left:?}");
    }
}

/// Children a plain `wait` does not report: one cloned without an exit signal, and an
/// orphan whose parent already exited (init adopts it). Neither outlives the call.
fn hidden_children() {
    let source = r#"import ctypes, os, platform, time
CLONE = {'x86_64': 56, 'aarch64': 220}[platform.machine()]
def handler(event):
    if 'pid' in event:
        try:
            os.kill(event['pid'], 0)
            return 'alive'
        except ProcessLookupError:
            return 'gone'
    if event['spawn'] == 'clone':
        # clone(flags=0): a child with no exit signal, on a copy of this stack.
        pid = ctypes.CDLL(None, use_errno=True).syscall(CLONE, 0, 0, 0, 0, 0)
        if pid == 0:
            time.sleep(1000)
            os._exit(0)
        return pid
    r, w = os.pipe()
    if os.fork() == 0:
        grandchild = os.fork()
        if grandchild == 0:
            time.sleep(1000)
        os.write(w, str(grandchild).encode())
        os._exit(0)
    return int(os.read(r, 32))
"#;
    let mut f = start(Runtime::Python, source);
    for spawn in ["clone", "orphan"] {
        let pid = result(&f.call(json!({ "spawn": spawn })).outcome);
        assert!(pid.as_u64().is_some_and(|p| p > 1), "{spawn}: {pid}");
        assert!(
            f.sandbox.is_alive(),
            "{spawn}: killed and reaped, it serves on"
        );
        let after = f.call(json!({ "pid": pid }));
        assert_eq!(result(&after.outcome), "gone", "{spawn}");
        if !on_gvisor() {
            let procs = engine().cgroup_dirs(f.sandbox.id())[0].join("cgroup.procs");
            let left = std::fs::read_to_string(procs).unwrap_or_default();
            assert!(
                left.lines().count() <= 1,
                "{spawn}: only init may remain: {left:?}"
            );
        }
    }
}

fn lingering_thread() {
    // A thread the module started at import (an SDK's flush thread) is the function's own
    // between calls, as before its first: the sandbox stays warm. One a call started and
    // left running retires it.
    let source = "import threading, time\nthreading.Thread(target=lambda: time.sleep(1000), daemon=True).start()\ndef handler(event):\n    if event.get('start'):\n        threading.Thread(target=lambda: time.sleep(1000), daemon=True).start()\n    return 'started' if event.get('start') else 'warm'\n";
    let mut f = start(Runtime::Python, source);
    let pid = f.sandbox.pid();
    for _ in 0..3 {
        assert_eq!(result(&f.call(json!({})).outcome), "warm");
        assert!(
            f.sandbox.is_alive(),
            "the module's own thread keeps it warm"
        );
    }
    assert_eq!(f.sandbox.pid(), pid);
    assert_eq!(result(&f.call(json!({"start": true})).outcome), "started");
    assert!(!f.sandbox.is_alive(), "a thread outlived the call: retire");
}

/// A task on a tokio runtime calls through the reactor (`invoke_async`), and what it gets
/// is what a blocking call gets: results, raised errors and logs past a pipe's capacity
/// finish at once; a timeout or a crash needs the blocking finish, and kills the sandbox.
/// Blocking and async calls mix on one sandbox.
fn async_calls(runtime: Runtime) {
    let source = match runtime {
        Runtime::Python => "import os, sys, time\ndef handler(event):\n    what = event['do']\n    if what == 'print':\n        sys.stdout.write('x' * 200000)\n        return {'n': event['n'] + 1}\n    if what == 'raise':\n        raise ValueError('no')\n    if what == 'sleep':\n        time.sleep(30)\n    if what == 'flood':\n        while True:\n            sys.stdout.write('y' * 65536)\n    os._exit(3)\n",
        Runtime::Node => "exports.handler = (event) => { if (event.do === 'print') { process.stdout.write('x'.repeat(200000)); return {n: event.n + 1}; } if (event.do === 'raise') { throw new Error('no'); } if (event.do === 'sleep') { const end = Date.now() + 30000; while (Date.now() < end) {} } if (event.do === 'flood') { const fs = require('fs'); const y = 'y'.repeat(65536); for (;;) { fs.writeSync(1, y); } } process.exit(3); };\n",
    };
    let mut f = start(runtime, source);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let options = |ms: u64| InvokeOptions {
        timeout: Duration::from_millis(ms),
        request_id: "req-async".into(),
    };
    let call_async = |f: &mut Fixture, event: serde_json::Value, timeout_ms: u64| {
        rt.block_on(f.sandbox.invoke_async(&event, &options(timeout_ms)))
            .expect("invoke_async")
    };
    for n in 0..3 {
        let exchanged = call_async(&mut f, json!({"do": "print", "n": n}), 20_000);
        assert!(exchanged.finishes_at_once());
        let call = f.sandbox.finish(exchanged);
        assert_eq!(result(&call.outcome), json!({"n": n + 1}));
        assert_eq!(
            call.logs.total_bytes, 200_000,
            "every byte printed is counted"
        );
        // A blocking call between async ones.
        let call = f.call(json!({"do": "print", "n": 10}));
        assert_eq!(result(&call.outcome), json!({"n": 11}));
        assert_eq!(call.logs.total_bytes, 200_000);
    }
    let exchanged = call_async(&mut f, json!({"do": "raise"}), 20_000);
    assert!(
        exchanged.finishes_at_once(),
        "a raised error leaves the sandbox serving"
    );
    let call = f.sandbox.finish(exchanged);
    assert!(
        matches!(call.outcome, Outcome::Raised { .. }),
        "{:?}",
        call.outcome
    );
    assert!(f.sandbox.is_alive());

    let exchanged = call_async(&mut f, json!({"do": "sleep"}), 300);
    assert!(!exchanged.finishes_at_once());
    let call = f.sandbox.finish(exchanged);
    assert!(
        matches!(call.outcome, Outcome::Timeout { timeout_ms: 300 }),
        "{:?}",
        call.outcome
    );
    assert!(
        !f.sandbox.is_alive(),
        "a call past its timeout kills the sandbox"
    );

    // Output without pause does not keep the call from its timeout.
    let mut f = start(runtime, source);
    let began = std::time::Instant::now();
    let exchanged = call_async(&mut f, json!({"do": "flood"}), 500);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    let call = f.sandbox.finish(exchanged);
    assert!(
        matches!(call.outcome, Outcome::Timeout { timeout_ms: 500 }),
        "{:?}",
        call.outcome
    );
    assert!(call.logs.truncated, "the flood is cut at the log cap");

    let mut f = start(runtime, source);
    let exchanged = call_async(&mut f, json!({"do": "exit"}), 20_000);
    assert!(!exchanged.finishes_at_once());
    let call = f.sandbox.finish(exchanged);
    assert!(
        matches!(call.outcome, Outcome::Crashed { .. }),
        "{:?}",
        call.outcome
    );
    assert!(!f.sandbox.is_alive());
}

/// The kernel's version as (major, minor).
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Warm calls that each spend about 3 ms of CPU report about 3 ms: the kernel's exact count,
/// not one sampled at its ticks (cgroup v1's user and system split is, and a call shorter
/// than a tick then reads 0 or a whole tick: 0 or 4 ms at 250 Hz).
fn cpu_time_per_call() {
    let code = "import time\ndef handler(event):\n    end = time.process_time() + event['ms'] / 1000\n    n = 0\n    while time.process_time() < end:\n        n += 1\n    return n\n";
    let mut f = start(Runtime::Python, code);
    f.call(json!({"ms": 1}));
    // Sixteen calls: at 250 Hz a sampled count reads 4 ms for about three calls in four, 0
    // for the rest, so some call would show it.
    for _ in 0..16 {
        let call = f.call(json!({"ms": 3}));
        assert!(call.outcome.is_success(), "{:?}", call.outcome);
        let (cpu, took) = (call.usage.cpu_time, call.usage.duration);
        assert!(
            cpu >= Duration::from_micros(2_500),
            "a call that spent 3 ms of CPU reported {cpu:?}"
        );
        // One thread's CPU fits in the call's time, give or take what the bootstrap did
        // between the calls (counted from the last call's end). Under gVisor the sandbox's
        // kernel runs in threads of its own, and their CPU is the call's too.
        assert!(
            on_gvisor() || cpu <= took + Duration::from_millis(1),
            "{cpu:?} of CPU in {took:?}"
        );
    }
}

/// A big call, then a small one in the same sandbox: where the peak can be reset (v1, and
/// v2 from kernel 6.12) the small call reports its own small peak; elsewhere the record says
/// the figure is the sandbox's, and it still holds the big call's.
fn peak_per_call() {
    use cloudfunc_sandbox::cgroup::{CgroupVersion, PeakScope};
    let code = "def handler(event):\n    hog = bytearray(event['mib'] << 20)\n    for i in range(0, len(hog), 4096):\n        hog[i] = 1\n    return len(hog)\n";
    let mut f = start(Runtime::Python, code);
    let big = f.call(json!({"mib": 64}));
    assert_eq!(result(&big.outcome), json!(64 << 20));
    let small = f.call(json!({"mib": 1}));
    assert_eq!(result(&small.outcome), json!(1 << 20));
    let resettable = engine().cgroup_version() == CgroupVersion::V1 || kernel_version() >= (6, 12);
    let (b, s) = (big.usage.peak_memory_bytes, small.usage.peak_memory_bytes);
    assert!(b >= 64 * MIB, "big call's peak {b}");
    let scope = if resettable {
        PeakScope::Call
    } else {
        println!("this kernel cannot reset memory.peak: the peak is the sandbox's");
        PeakScope::Sandbox
    };
    assert_eq!(small.usage.peak_memory_scope, scope);
    if on_gvisor() {
        // gVisor's kernel keeps the memory the big call freed, so even a reset peak starts
        // from there.
        assert!(s <= b + MIB, "{s} > {b}");
    } else if resettable {
        assert!(
            s < b - 32 * MIB,
            "the small call's peak {s} is not its own (big {b})"
        );
    } else {
        assert!(
            s >= b - MIB,
            "the sandbox's peak {s} forgot the big call (big {b})"
        );
    }
}
