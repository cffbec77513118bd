//! Lifetimes: nothing is left behind after many runs, launches from a multi-threaded
//! process never hang, one engine per state root, and a crash is swept up at the next start.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use cloudfunc_sandbox::{
    Engine, EngineConfig, Error, InvokeOptions, Outcome, Runtime, Sandbox, SandboxSpec,
};
use serde_json::json;

use crate::common::{code, engine, pid_alive, Need};
use crate::Case;

const HELPER_ENV: &str = "CLOUDFUNC_TEST_CRASH_HELPER";

pub fn cases() -> Vec<Case> {
    let py = vec![Need::Containers, Need::Runtime(Runtime::Python)];
    vec![
        Case::new(
            "lifecycle::sequential_runs_leave_nothing",
            py.clone(),
            sequential_runs_leave_nothing,
        ),
        Case::new(
            "lifecycle::concurrent_launches_from_tokio",
            py.clone(),
            concurrent_launches,
        ),
        Case::new(
            "lifecycle::panic_while_holding_a_sandbox_leaves_nothing",
            py.clone(),
            panic_leaves_nothing,
        ),
        Case::new(
            "lifecycle::one_engine_per_state_root",
            vec![Need::Containers],
            one_engine_per_root,
        ),
        Case::new(
            "lifecycle::dropping_the_engine_removes_what_a_teardown_left",
            vec![Need::Containers],
            drop_removes_leftovers,
        ),
        Case::new(
            "lifecycle::crash_is_swept_at_next_start",
            py.clone(),
            crash_is_swept,
        ),
        Case::new(
            "lifecycle::host_gone_shim_removes_the_container",
            py,
            host_gone_shim_removes_the_container,
        ),
        Case::new(
            "lifecycle::state_is_kept_in_memory",
            vec![Need::Containers, Need::Runtime(Runtime::Python)],
            state_is_kept_in_memory,
        ),
        Case::new(
            "lifecycle::shim_needs_no_relocating",
            vec![],
            shim_needs_no_relocating,
        ),
    ]
}

fn private_engine(tag: &str) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-life-")
        .tempdir()
        .unwrap();
    let mut config = EngineConfig::under(
        dir.path(),
        &format!("cloudfunc-{tag}-{}", std::process::id()),
    );
    config.shim_binary = Some(env!("CARGO_BIN_EXE_cloudfunc-shim").into());
    let engine = Engine::new(config).unwrap();
    (dir, engine)
}

/// The host's mounts but the engines' own tmpfs (which come and go with the engines that
/// tests running alongside create).
fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| !l.contains(" - tmpfs cloudfunc-state "))
        .count()
}

fn on_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// The engine keeps container state and bundles on a tmpfs of its own where its state
/// directory is on disk, and takes it away when it goes.
fn state_is_kept_in_memory() {
    let (dir, engine) = private_engine("memory");
    if on_tmpfs(dir.path()) {
        eprintln!("SKIP: the temporary directory is on a tmpfs already");
        return;
    }
    let state = engine.config().state_dir.clone();
    let (containers, bundles) = (state.join("containers"), state.join("bundles"));
    assert!(on_tmpfs(&containers) && on_tmpfs(&bundles));
    let code = code("function.py", "def handler(event):\n    return 1\n");
    let mut sandbox =
        Sandbox::create(&engine, SandboxSpec::new(Runtime::Python, code.path())).unwrap();
    let id = sandbox.id().to_string();
    assert!(on_tmpfs(&engine.container_state_dir(&id)));
    assert!(engine.bundle_dir(&id).starts_with(&bundles));
    let call = sandbox
        .invoke(&json!({}), &InvokeOptions::default())
        .unwrap();
    assert_eq!(call.outcome, Outcome::Succeeded { result: json!(1) });
    sandbox.shutdown().unwrap();
    drop(engine);
    assert!(
        !on_tmpfs(&containers) && !on_tmpfs(&bundles),
        "unmounted with the engine"
    );
    assert!(
        !mount_points_under(dir.path()),
        "no mount left under the state directory"
    );
}

/// Whether anything is mounted under `dir`.
fn mount_points_under(dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|point| Path::new(point).starts_with(&dir))
}

fn dir_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes on the host whose command line mentions `needle` (shims carry their state root).
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) && pid_alive(pid) {
            found.push(pid);
        }
    }
    found
}

fn assert_nothing_left(engine: &Engine, ids: &[String]) {
    let state = &engine.config().state_dir;
    assert_eq!(
        dir_entries(&state.join("containers")),
        Vec::<String>::new(),
        "container state left"
    );
    assert_eq!(
        dir_entries(&state.join("bundles")),
        Vec::<String>::new(),
        "bundles left"
    );
    for id in ids {
        for dir in engine.cgroup_dirs(id) {
            assert!(!dir.exists(), "cgroup {} left", dir.display());
        }
    }
    let marker = state.join("containers").to_string_lossy().into_owned();
    assert_eq!(
        processes_mentioning(&marker),
        Vec::<i32>::new(),
        "shims left running"
    );
}

fn sequential_runs_leave_nothing() {
    let (_dir, engine) = private_engine("seq");
    let code = code(
        "function.py",
        "def handler(event):\n    return event['i'] * 2\n",
    );
    let mounts = mount_count();
    let mut ids = Vec::new();
    for i in 0..200 {
        let mut sandbox =
            Sandbox::create(&engine, SandboxSpec::new(Runtime::Python, code.path())).unwrap();
        ids.push(sandbox.id().to_string());
        let call = sandbox
            .invoke(&json!({"i": i}), &InvokeOptions::default())
            .unwrap();
        assert_eq!(
            call.outcome,
            Outcome::Succeeded {
                result: json!(i * 2)
            }
        );
        // Every tenth sandbox ends in a timeout, so the kill path is counted too.
        if i % 10 == 9 {
            let mut spinner = Sandbox::create(
                &engine,
                SandboxSpec::new(
                    Runtime::Python,
                    crate::common::code("function.py", "def handler(e):\n    while True: pass\n")
                        .path(),
                ),
            );
            if let Ok(s) = spinner.as_mut() {
                ids.push(s.id().to_string());
                let t = s
                    .invoke(
                        &json!({}),
                        &InvokeOptions {
                            timeout: Duration::from_millis(100),
                            ..Default::default()
                        },
                    )
                    .unwrap();
                assert!(matches!(t.outcome, Outcome::Timeout { .. }));
            }
            drop(spinner);
        }
        sandbox.shutdown().unwrap();
    }
    assert_eq!(mount_count(), mounts, "host mounts changed");
    assert_nothing_left(&engine, &ids);
}

fn concurrent_launches() {
    const N: usize = 200;
    let (_dir, engine) = private_engine("conc");
    let code = code(
        "function.py",
        "def handler(event):\n    return event['i']\n",
    );
    let path: PathBuf = code.path().to_path_buf();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .max_blocking_threads(N)
        .enable_all()
        .build()
        .unwrap();
    let results = runtime.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..N {
            let engine = engine.clone();
            let path = path.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                let mut sandbox =
                    Sandbox::create(&engine, SandboxSpec::new(Runtime::Python, path))?;
                let id = sandbox.id().to_string();
                let call = sandbox.invoke(&json!({"i": i}), &InvokeOptions::default())?;
                sandbox.shutdown()?;
                Ok::<_, Error>((id, call.outcome, i))
            }));
        }
        tokio::time::timeout(Duration::from_secs(600), futures_join(tasks)).await
    });
    let results = results.expect("hundreds of concurrent launches must not hang");
    let mut ids = Vec::new();
    for r in results {
        let (id, outcome, i) = r.expect("task").expect("sandbox");
        assert_eq!(outcome, Outcome::Succeeded { result: json!(i) });
        ids.push(id);
    }
    assert_eq!(ids.len(), N);
    assert_nothing_left(&engine, &ids);
}

async fn futures_join<T>(
    tasks: Vec<tokio::task::JoinHandle<T>>,
) -> Vec<Result<T, tokio::task::JoinError>> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await);
    }
    out
}

fn panic_leaves_nothing() {
    let (_dir, engine) = private_engine("panic");
    let code = code("function.py", "def handler(event):\n    return 1\n");
    let id = std::sync::Mutex::new(String::new());
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut sandbox =
            Sandbox::create(&engine, SandboxSpec::new(Runtime::Python, code.path())).unwrap();
        *id.lock().unwrap() = sandbox.id().to_string();
        sandbox
            .invoke(&json!({}), &InvokeOptions::default())
            .unwrap();
        panic!("the host panics with a live sandbox");
    }));
    assert!(caught.is_err());
    let id = id.into_inner().unwrap();
    assert!(!id.is_empty());
    assert_nothing_left(&engine, &[id]);
}

fn one_engine_per_root() {
    let mut config = engine().config().clone();
    config.images_dir = engine().config().images_dir.clone();
    let err = Engine::new(config).unwrap_err();
    assert!(matches!(err, Error::Busy(_)), "{err:?}");
}

/// In the helper process: start a sandbox, say so, and wait to be killed.
pub fn run_helper_if_asked() -> bool {
    let Ok(dir) = std::env::var(HELPER_ENV) else {
        return false;
    };
    let dir = PathBuf::from(dir);
    let mut config = EngineConfig::under(&dir, "cloudfunc-crash");
    config.shim_binary = Some(env!("CARGO_BIN_EXE_cloudfunc-shim").into());
    let engine = Engine::new(config).unwrap();
    let code = dir.join("code");
    std::fs::create_dir_all(&code).unwrap();
    std::fs::write(
        code.join("function.py"),
        "def handler(e):\n    while True:\n        pass\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&code, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        code.join("function.py"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut sandbox = Sandbox::create(&engine, SandboxSpec::new(Runtime::Python, &code)).unwrap();
    println!("ready {} {}", sandbox.pid().unwrap(), sandbox.id());
    // Crash in the middle of a call that never ends: the container's init is busy and will
    // not notice its host has gone.
    let _ = sandbox.invoke(
        &json!({}),
        &InvokeOptions {
            timeout: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    unreachable!("the test kills this process first")
}

/// A sandbox cgroup that a teardown gave up on (its processes slower to die than it waited,
/// as gVisor's can be on a loaded host) is removed, its processes killed, when the engine goes,
/// and the engine's parent with it.
fn drop_removes_leftovers() {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-leftover-")
        .tempdir()
        .unwrap();
    let parent = format!("cloudfunc-leftover-{}", std::process::id());
    let mut config = EngineConfig::under(dir.path(), &parent);
    config.shim_binary = Some(env!("CARGO_BIN_EXE_cloudfunc-shim").into());
    let engine = Engine::new(config).unwrap();
    let cgroups = cloudfunc_sandbox::cgroup::CgroupFs::detect(Path::new("/sys/fs/cgroup")).unwrap();
    let mut stray = Command::new("/bin/sleep").arg("600").spawn().unwrap();
    let stray_pid = i32::try_from(stray.id()).unwrap();
    let mut joined = 0;
    for dir in cgroups.dirs(&format!("/{parent}/sb-left")) {
        if dir
            .parent()
            .and_then(Path::parent)
            .is_some_and(Path::is_dir)
        {
            std::fs::create_dir_all(&dir).unwrap();
            // cpuset refuses tasks until configured; the other hierarchies take it.
            if std::fs::write(dir.join("cgroup.procs"), stray_pid.to_string()).is_ok() {
                joined += 1;
            }
        }
    }
    assert!(joined > 0, "the stray process joined no cgroup");
    drop(engine);
    let ended = (0..250).find_map(|_| {
        let ended = stray.try_wait().unwrap();
        if ended.is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        ended
    });
    let Some(status) = ended else {
        let _ = cgroups.remove_tree(&format!("/{parent}"));
        let _ = stray.kill();
        let _ = stray.wait();
        panic!("the process left in the sandbox's cgroup outlived the engine");
    };
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the process left in the cgroup is killed"
    );
    for dir in cgroups.dirs(&format!("/{parent}")) {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

/// Starts the helper (a host with one sandbox busy in an endless call) in a process group of
/// its own, under a new directory; returns the directory, the helper, its sandbox's init pid
/// and its sandbox's id.
fn start_helper() -> (tempfile::TempDir, std::process::Child, i32, String) {
    let dir = tempfile::Builder::new()
        .prefix("cloudfunc-crash-")
        .tempdir()
        .unwrap();
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .env(HELPER_ENV, dir.path())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(helper.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(words.first(), Some(&"ready"), "helper said {line:?}");
    (dir, helper, words[1].parse().unwrap(), words[2].to_string())
}

fn crash_is_swept() {
    let (dir, mut helper, init, id) = start_helper();

    // A power-cut-like crash: the host process and its shim die together, so nobody is left
    // to tear the container down. Its init keeps running in its own session.
    let pgid = nix::unistd::Pid::from_raw(i32::try_from(helper.id()).unwrap());
    nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL).unwrap();
    helper.wait().unwrap();
    assert!(
        pid_alive(init),
        "the orphaned container must still run before the sweep"
    );

    // Things that are not ours must survive the sweep.
    let cgroups = cloudfunc_sandbox::cgroup::CgroupFs::detect(Path::new("/sys/fs/cgroup")).unwrap();
    let foreign =
        cgroups.dirs(&format!("/cloudfunc-foreign-{}/keep", std::process::id()))[0].clone();
    std::fs::create_dir_all(&foreign).unwrap();
    let state = dir.path().join("state");
    std::fs::write(state.join("keep.txt"), "mine").unwrap();
    // A cgroup of ours that no container state knows about, with a process still in it.
    let mut stray = Command::new("/bin/sleep").arg("600").spawn().unwrap();
    let stray_pid = i32::try_from(stray.id()).unwrap();
    for dir in cgroups.dirs("/cloudfunc-crash/stray") {
        // Only hierarchies that exist here; cpuset refuses tasks until configured, which is fine.
        if dir
            .parent()
            .and_then(Path::parent)
            .is_some_and(Path::is_dir)
        {
            std::fs::create_dir_all(&dir).unwrap();
            let _ = std::fs::write(dir.join("cgroup.procs"), stray_pid.to_string());
        }
    }

    let mut config = EngineConfig::under(dir.path(), "cloudfunc-crash");
    config.shim_binary = Some(env!("CARGO_BIN_EXE_cloudfunc-shim").into());
    let engine = Engine::new(config).unwrap();
    let report = engine.sweep_report().clone();
    assert_eq!(report.containers, vec![id.clone()]);
    assert_eq!(report.bundles, vec![id.clone()]);
    // libcontainer's delete removes the container's own cgroup; the engine's sweep removes
    // the stray one it knew nothing about, killing its process first. Where the killed init
    // is still exiting when the delete comes (seconds, in the emulated cgroup v2 VM), its
    // cgroup is busy and the engine's sweep removes it after: either way it goes, and nothing
    // but the stray and the container's own is removed.
    let mut removed = report.cgroups.clone();
    removed.retain(|name| *name != id);
    assert_eq!(removed, vec!["stray".to_string()], "{report:?}");
    let status = stray.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "stray process killed"
    );
    for _ in 0..100 {
        if !pid_alive(init) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !pid_alive(init),
        "the orphaned init must be killed by the sweep"
    );
    assert_nothing_left(&engine, &[id]);
    assert!(foreign.exists(), "a cgroup outside our parent must survive");
    assert_eq!(
        std::fs::read_to_string(state.join("keep.txt")).unwrap(),
        "mine"
    );
    std::fs::remove_dir(&foreign).unwrap();
    std::fs::remove_dir(foreign.parent().unwrap()).unwrap();
}

/// The host dies but its shim does not: the shim sees its control socket close and removes
/// the container itself (processes, cgroup in every hierarchy, runtime state), with no engine
/// left to clean up after it and no sweep.
fn host_gone_shim_removes_the_container() {
    let (dir, mut helper, init, id) = start_helper();
    let containers = dir.path().join("state").join("containers");
    assert_eq!(dir_entries(&containers), vec![id.clone()]);
    let cgroups = cloudfunc_sandbox::cgroup::CgroupFs::detect(Path::new("/sys/fs/cgroup")).unwrap();
    let own = cgroups.dirs(&format!("/cloudfunc-crash/{id}"));
    assert!(own[0].is_dir(), "the sandbox has a cgroup while it runs");

    helper.kill().unwrap();
    helper.wait().unwrap();
    let marker = containers.to_string_lossy().into_owned();
    for _ in 0..250 {
        if processes_mentioning(&marker).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        processes_mentioning(&marker),
        Vec::<i32>::new(),
        "shim left"
    );
    assert!(!pid_alive(init), "the container's init outlived its shim");
    assert_eq!(dir_entries(&containers), Vec::<String>::new(), "state left");
    for dir in &own {
        assert!(!dir.exists(), "cgroup {} left", dir.display());
    }
    for dir in cgroups.dirs("/cloudfunc-crash") {
        let _ = std::fs::remove_dir(dir);
    }
    // The next engine on this state takes the dead one's tmpfs over, and unmounts it when it
    // goes (under a cgroup parent of its own: another test's container runs under this one).
    let mut config = EngineConfig::under(
        dir.path(),
        &format!("cloudfunc-crash-next-{}", std::process::id()),
    );
    config.shim_binary = Some(env!("CARGO_BIN_EXE_cloudfunc-shim").into());
    let next = Engine::new(config).unwrap();
    assert_eq!(next.sweep_report().containers, Vec::<String>::new());
    drop(next);
    assert!(
        !mount_points_under(dir.path()),
        "the dead engine's tmpfs is left"
    );
}

/// The shim is linked at a fixed address (see `sandbox/build.rs`): its ELF type is `ET_EXEC`,
/// not the `ET_DYN` of a position-independent executable the loader must relocate.
fn shim_needs_no_relocating() {
    let elf = std::fs::read(env!("CARGO_BIN_EXE_cloudfunc-shim")).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    let e_type = u16::from_le_bytes([elf[16], elf[17]]);
    assert_eq!(e_type, 2, "the shim must be ET_EXEC (2), is {e_type}");
}
