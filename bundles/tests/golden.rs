//! Golden tests: the generated config.json is pinned byte for byte, and its security-relevant
//! fields are asserted one by one so that a golden update cannot quietly weaken them.
//! Regenerate the golden files with `UPDATE_GOLDEN=1 cargo test -p cloudfunc-bundles`.

use std::path::{Path, PathBuf};

use cloudfunc_bundles::{
    build_spec, to_json, write_bundle, BundleConfig, Error, GuestKernel, HostFeatures, Limits,
    Process,
};
use cloudfunc_images::{BindMount, PreparedImage, Runtime};
use cloudfunc_seccomp::{Dialect, Profile};
use serde_json::Value;

fn image() -> PreparedImage {
    PreparedImage {
        rootfs: "/var/lib/cloudfunc/images/host-0/rootfs".into(),
        mounts: vec![
            BindMount {
                source: "/usr".into(),
                destination: "/usr".into(),
            },
            BindMount {
                source: "/etc/ld.so.cache".into(),
                destination: "/etc/ld.so.cache".into(),
            },
        ],
    }
}

fn config<'a>(image: &'a PreparedImage, process: Process, host: HostFeatures) -> BundleConfig<'a> {
    BundleConfig {
        id: "cf-golden",
        image,
        process,
        code_dir: Some(Path::new("/var/lib/cloudfunc/code/hello/1")),
        limits: Limits::default(),
        cgroup_path: "/cloudfunc/cf-golden".into(),
        seccomp: Some(
            Profile::default_profile()
                .to_oci(Dialect::ValueIsMask)
                .unwrap(),
        ),
        env: vec!["GREETING=hi".into()],
        host,
        kernel: GuestKernel::Host,
    }
}

const FULL_HOST: HostFeatures = HostFeatures {
    cgroup_namespace: true,
    swap_limit: true,
};

fn golden(name: &str, value: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let text = serde_json::to_string_pretty(value).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        expected == text,
        "{name} differs from the golden file; rerun with UPDATE_GOLDEN=1 if the change is meant"
    );
}

#[test]
fn python_bundle_matches_golden() {
    let image = image();
    let spec = build_spec(&config(
        &image,
        Process::Bootstrap(Runtime::Python),
        FULL_HOST,
    ))
    .unwrap();
    golden("python.json", &to_json(&spec));
}

#[test]
fn node_bundle_matches_golden() {
    let image = image();
    let spec = build_spec(&config(
        &image,
        Process::Bootstrap(Runtime::Node),
        FULL_HOST,
    ))
    .unwrap();
    golden("node.json", &to_json(&spec));
}

#[test]
fn security_fields_hold() {
    let image = image();
    let spec = build_spec(&config(
        &image,
        Process::Bootstrap(Runtime::Python),
        FULL_HOST,
    ))
    .unwrap();
    let v = to_json(&spec);
    assert_eq!(v["root"]["readonly"], true);
    assert_eq!(v["process"]["noNewPrivileges"], true);
    assert_eq!(v["process"]["user"]["uid"], 65534);
    for set in [
        "bounding",
        "effective",
        "inheritable",
        "permitted",
        "ambient",
    ] {
        assert_eq!(
            v["process"]["capabilities"][set],
            serde_json::json!([]),
            "{set} must be empty"
        );
    }
    let ns: Vec<&str> = v["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    for kind in ["pid", "mount", "ipc", "uts", "network", "cgroup"] {
        assert!(ns.contains(&kind), "{kind} namespace missing");
    }
    let mem = &v["linux"]["resources"]["memory"];
    assert_eq!(mem["limit"], mem["swap"], "swap must equal memory");
    assert_eq!(v["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
    let env: Vec<&str> = v["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(env.contains(&"GREETING=hi"));
    assert!(
        !env.iter()
            .any(|e| e.starts_with("USER=") || e.starts_with("SSH_")),
        "no host environment"
    );
    let mounts = v["mounts"].as_array().unwrap();
    for m in mounts.iter().filter(|m| m["type"] == "bind") {
        let opts: Vec<&str> = m["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert!(
            opts.contains(&"ro"),
            "{} must be read-only",
            m["destination"]
        );
    }
    let tmp = mounts.iter().find(|m| m["destination"] == "/tmp").unwrap();
    assert!(tmp["options"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o.as_str().unwrap().starts_with("size=")));
}

#[test]
fn host_without_swap_accounting_or_cgroupns() {
    let image = image();
    let host = HostFeatures {
        cgroup_namespace: false,
        swap_limit: false,
    };
    let v = to_json(
        &build_spec(&config(
            &image,
            Process::Command(vec!["/bin/true".into()]),
            host,
        ))
        .unwrap(),
    );
    assert!(v["linux"]["resources"]["memory"].get("swap").is_none());
    assert!(!v["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["type"] == "cgroup"));
    assert_eq!(v["process"]["args"], serde_json::json!(["/bin/true"]));
}

#[test]
fn gvisor_limits_pids_inside_and_keeps_a_host_backstop() {
    let image = image();
    let mut cfg = config(&image, Process::Bootstrap(Runtime::Python), FULL_HOST);
    let host = to_json(&build_spec(&cfg).unwrap());
    cfg.kernel = GuestKernel::Gvisor;
    let gvisor = to_json(&build_spec(&cfg).unwrap());
    let pids = u64::from(Limits::default().pids);
    assert_eq!(host["linux"]["resources"]["pids"]["limit"], pids);
    assert_eq!(
        gvisor["linux"]["resources"]["pids"]["limit"],
        pids * 16 + 256
    );
    let nproc = |v: &Value| {
        v["process"]["rlimits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == "RLIMIT_NPROC")
            .cloned()
    };
    assert_eq!(
        nproc(&host),
        None,
        "the host counts NPROC per user: never set"
    );
    assert_eq!(
        nproc(&gvisor).unwrap(),
        serde_json::json!({"type": "RLIMIT_NPROC", "soft": pids, "hard": pids})
    );
    // Nothing else differs.
    let (mut a, mut b) = (host.clone(), gvisor.clone());
    for v in [&mut a, &mut b] {
        v["linux"]["resources"]["pids"] = Value::Null;
        v["process"]["rlimits"] = Value::Null;
    }
    assert_eq!(a, b);
}

#[test]
fn bad_configs_are_refused() {
    let image = image();
    let mut c = config(&image, Process::Bootstrap(Runtime::Python), FULL_HOST);
    c.cgroup_path = "cloudfunc/x".into();
    assert!(matches!(build_spec(&c), Err(Error::RelativeCgroup(_))));
    let mut c = config(&image, Process::Bootstrap(Runtime::Python), FULL_HOST);
    c.env = vec!["=x".into()];
    assert!(matches!(build_spec(&c), Err(Error::BadEnv(_))));
    let mut c = config(&image, Process::Bootstrap(Runtime::Python), FULL_HOST);
    c.limits.memory_bytes = 10;
    assert!(matches!(build_spec(&c), Err(Error::Limits(_))));
}

#[test]
fn bundle_is_written_private() {
    use std::os::unix::fs::PermissionsExt;
    let image = image();
    let spec = build_spec(&config(
        &image,
        Process::Bootstrap(Runtime::Python),
        FULL_HOST,
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write_bundle(&dir.path().join("b"), &spec).unwrap();
    let back: oci_spec::runtime::Spec =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(to_json(&back), to_json(&spec));
    let mode = std::fs::metadata(dir.path().join("b"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
}
