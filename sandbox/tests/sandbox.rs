//! Real containers, checked from inside: every test starts actual sandboxes through the
//! libcontainer backend and asserts what the kernel did. Tests whose requirements are missing
//! (root, cgroups, an interpreter) are reported as ignored, with one line saying why.

mod bootstrap;
mod common;
mod gvisor;
mod hostile;
mod lifecycle;
mod misbehaving;
mod runtimes;
mod warm;

use common::{missing, Need};
use libtest_mimic::{Arguments, Failed, Trial};

/// A test and what it needs.
#[allow(missing_debug_implementations)]
pub struct Case {
    pub name: String,
    pub needs: Vec<Need>,
    pub run: Box<dyn FnOnce() + Send + std::panic::UnwindSafe>,
    pub backend: cloudfunc_sandbox::BackendKind,
}

impl Case {
    pub fn new(
        name: impl Into<String>,
        needs: Vec<Need>,
        run: impl FnOnce() + Send + std::panic::UnwindSafe + 'static,
    ) -> Case {
        Case {
            name: name.into(),
            needs,
            run: Box::new(run),
            backend: cloudfunc_sandbox::BackendKind::Libcontainer,
        }
    }
}

fn main() {
    if lifecycle::run_helper_if_asked() {
        return;
    }
    let args = Arguments::from_args();
    // The runtime and hostile-function tests run against every backend; the lifecycle tests
    // exercise the shim and engine machinery, which is the same for all, on libcontainer.
    let mut cases = Vec::new();
    for backend in cloudfunc_sandbox::BackendKind::ALL {
        for mut case in runtimes::cases()
            .into_iter()
            .chain(misbehaving::cases())
            .chain(hostile::cases())
            .chain(warm::cases())
        {
            case.name = format!("{}::{}", backend.name(), case.name);
            case.needs.push(Need::Backend(backend));
            case.backend = backend;
            cases.push(case);
        }
    }
    cases.extend(bootstrap::cases());
    cases.extend(gvisor::cases());
    cases.extend(lifecycle::cases());

    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    let trials = cases
        .into_iter()
        .map(|case| {
            let why: Vec<String> = case.needs.iter().filter_map(|n| missing(*n)).collect();
            let skip = !why.is_empty();
            if skip {
                *reasons.entry(why.join("; ")).or_default() += 1;
            }
            let (run, backend) = (case.run, case.backend);
            Trial::test(case.name, move || {
                common::set_backend(backend);
                std::panic::catch_unwind(run).map_err(|e| {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "test panicked".into());
                    Failed::from(msg)
                })
            })
            .with_ignored_flag(skip)
        })
        .collect();
    for (why, count) in &reasons {
        println!("SKIPPED {count} sandbox tests: {why}");
    }
    let conclusion = libtest_mimic::run(&args, trials);
    common::release();
    conclusion.exit();
}
