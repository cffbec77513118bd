//! gVisor only: the function's calls reach gVisor's kernel, not the host's.

use cloudfunc_sandbox::{BackendKind, Runtime};
use serde_json::json;

use crate::common::{result, set_backend, start, Need};
use crate::Case;

fn needs() -> Vec<Need> {
    vec![
        Need::Containers,
        Need::Runtime(Runtime::Python),
        Need::Backend(BackendKind::Runsc),
    ]
}

fn case(name: &str, run: fn()) -> Case {
    let mut case = Case::new(format!("runsc::gvisor::{name}"), needs(), run);
    case.backend = BackendKind::Runsc;
    case
}

pub fn cases() -> Vec<Case> {
    vec![
        case("function_sees_gvisors_kernel", sees_gvisor),
        case("unimplemented_call_fails_cleanly", unimplemented_call),
    ]
}

fn sees_gvisor() {
    set_backend(BackendKind::Runsc);
    let code = "import os\ndef handler(event):\n    return {'version': open('/proc/version').read(), 'release': os.uname().release}\n";
    let mut f = start(Runtime::Python, code);
    let r = result(&f.call(json!({})).outcome);
    let host_version = std::fs::read_to_string("/proc/version").unwrap();
    let inside = r["version"].as_str().unwrap();
    assert_ne!(
        inside, host_version,
        "the host's kernel must not be visible"
    );
    // gVisor presents itself as this fixed, made-up Linux release.
    assert!(
        inside.starts_with("Linux version 4.4.0 #1 SMP Sun Jan 10 15:06:54 PST 2016"),
        "not gVisor's kernel: {inside:?}"
    );
    assert_eq!(r["release"], json!("4.4.0"));
}

fn unimplemented_call() {
    set_backend(BackendKind::Runsc);
    // copy_file_range and pkey_alloc pass the seccomp filter; gVisor's kernel does not
    // implement them and says so with ENOSYS, and the function carries on.
    let code = r#"
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def handler(event):
    out = {}
    src = os.open('/tmp/a', os.O_RDWR | os.O_CREAT)
    dst = os.open('/tmp/b', os.O_RDWR | os.O_CREAT)
    os.write(src, b'hello')
    os.lseek(src, 0, 0)
    try:
        os.copy_file_range(src, dst, 5)
        out['copy_file_range'] = 'copied'
    except OSError as e:
        out['copy_file_range'] = errno.errorcode[e.errno]
    ctypes.set_errno(0)
    rc = libc.syscall(330, 0, 0)
    out['pkey_alloc'] = errno.errorcode[ctypes.get_errno()] if rc == -1 else rc
    out['after'] = sum(range(event['n']))
    return out
"#;
    let mut f = start(Runtime::Python, code);
    let r = result(&f.call(json!({"n": 10})).outcome);
    assert_eq!(r["copy_file_range"], json!("ENOSYS"), "{r}");
    assert_eq!(r["pkey_alloc"], json!("ENOSYS"), "{r}");
    assert_eq!(r["after"], json!(45));
    // The same sandbox serves the next call.
    let again = f.call(json!({"n": 4}));
    assert!(!again.usage.cold);
    assert_eq!(result(&again.outcome)["after"], json!(6));
}
