//! The CLI as a Unix tool, without a server: what it prints goes to whatever reads it, and a
//! reader that goes away early (`cloudfunc list | head -1`) ends it quietly.

use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_cloudfunc");

#[test]
fn output_goes_to_its_reader() {
    let out = Command::new(BIN)
        .args(["keys", "generate"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("cfk1:"),
        "{out:?}"
    );
}

#[test]
fn a_reader_that_has_gone_ends_it_quietly() {
    // Nothing will ever read this pipe: the first write fails with EPIPE (Rust ignores
    // SIGPIPE), as when `head` has exited.
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = Command::new(BIN)
        .args(["keys", "generate"])
        .stdout(Stdio::from(write))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(141), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "no panic, no message: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_duration_too_long_is_refused_before_anything_is_sent() {
    // A token is given and nothing listens at the URL: the refusal comes first.
    let out = Command::new(BIN)
        .args(["--url", "http://127.0.0.1:9", "--token", "t"])
        .args(["alerts", "silence", "rule_x", "--for", "99999999999999999d"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("is too long"), "{said}");
}

#[test]
fn a_tenant_no_token_could_carry_is_refused() {
    for tenant in ["a/b", "", "ü"] {
        let out = Command::new(BIN)
            .args(["--tenant", tenant, "token"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{tenant}: {out:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("letters, digits"), "{said}");
    }
}
