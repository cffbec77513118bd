//! Every parser of outside input, as one function per fuzz target: the cargo-fuzz targets in
//! `fuzz/` (nightly, libFuzzer) and the stable replay in `server/tests/fuzz_replay.rs` (the
//! checked-in seeds in `fuzz/seeds/` and deterministic mutations of them, in every CI run)
//! call the same code.
//! Each must return on any input without panicking; where something parses, it also checks
//! that it holds together (encodes back to itself, converts, validates).

use std::collections::HashMap;
use std::sync::OnceLock;

use cloudfunc_sandbox::control::Message;
use cloudfunc_sandbox::protocol::{parse_reply, FrameReader};
use cloudfunc_sandbox::{SeccompDialect, SeccompProfile};
use serde_json::Value;

use crate::archive::{extract, ArchiveLimits};
use crate::auth::Keys;
use crate::chains::definition::{expand_chains, Definition};
use crate::platform::Settings;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The targets, by name (their seed directories under `fuzz/seeds/` carry these names).
pub const TARGETS: &[(&str, Target)] = &[
    ("archive", archive),
    ("settings", settings),
    ("token", token),
    ("chain", chain),
    ("reply_frames", reply_frames),
    ("control_messages", control_messages),
    ("seccomp_profile", seccomp_profile),
    ("sealed", sealed),
];

/// An uploaded ZIP, extracted under the default limits into a scratch directory.
pub fn archive(data: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else { return };
    let dest = dir.path().join("code");
    let limits = ArchiveLimits {
        max_entries: 64,
        max_file_bytes: 1 << 20,
        max_total_bytes: 4 << 20,
    };
    if let Ok(files) = extract(data, &dest, limits) {
        assert!(files <= limits.max_entries);
        // Nothing escapes the destination.
        assert!(std::fs::read_dir(dir.path()).unwrap().count() <= 1);
    }
}

/// A `cloudfunc.toml`, a `manifest.json` and a query string of settings.
pub fn settings(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Settings::from_toml(text);
        let fields: HashMap<String, String> = text
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Ok(s) = Settings::from_fields(&fields) {
            // What parsed overlays onto the defaults without trouble.
            let _ = Settings::default().overlay(s);
        }
    }
    let _ = serde_json::from_slice::<Settings>(data);
}

/// A bearer token, against the built-in HS256 keys and an identity provider's key set.
pub fn token(data: &[u8]) {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    let keys = KEYS.get_or_init(|| Keys::new(b"fuzzing-secret-0123456789abcdefghijkl").unwrap());
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = keys.verify(text, 1_800_000_000);
    let _ = crate::jwks::algorithm(text);
    let _ = crate::jwks::verify_with_set(text, r#"{"keys": []}"#, 1_800_000_000);
    // The same text as a key set.
    let _ = crate::jwks::verify_with_set("e30.e30.AA", text, 1_800_000_000);
}

/// What encryption at rest reads back: a stored record (sealed, or plaintext from before),
/// and a master key's text (the key file, the variable). A record either opens to what was
/// sealed or is refused; nothing panics.
pub fn sealed(data: &[u8]) {
    use crate::atrest::{Keyring, MasterKey, Sealer};
    static SEALER: OnceLock<(Sealer, std::sync::Arc<crate::atrest::DataKey>)> = OnceLock::new();
    let (sealer, key) = SEALER.get_or_init(|| {
        let sealer = Sealer::new(Keyring::of(MasterKey::generate()), true);
        let (key, _) = sealer.make_key("fuzz");
        sealer.install(key.clone());
        (sealer, key)
    });
    let _ = sealer.open(data, ("tasks.payload", "tsk_fuzz"));
    let sealed = sealer.seal(key, ("tasks.payload", "tsk_fuzz"), data);
    assert_eq!(
        sealer.open(&sealed, ("tasks.payload", "tsk_fuzz")).unwrap(),
        data
    );
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(k) = MasterKey::parse(text) {
            assert_eq!(MasterKey::parse(&k.encode()).unwrap().id(), k.id());
        }
    }
}

/// A chain's definition, and its expansion when every chain it names is itself.
pub fn chain(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let kinds = ["raised", "timeout", "bad_input"];
    if let Ok(def) = Definition::parse(&v, &kinds) {
        let _ = def.functions();
        let _ = def.chains();
    }
    let mut load = |_: &str| Ok(Some(v.clone()));
    if let Ok(expanded) = expand_chains(&v, "fuzz", &mut load) {
        let _ = Definition::parse(&expanded, &kinds);
    }
}

/// Whatever a hostile sandbox writes to its reply pipe: the frame reader and reply parser
/// neither panic nor allocate past the limit.
pub fn reply_frames(data: &[u8]) {
    let mut reader = FrameReader::new(64 * 1024);
    let mut rest = data;
    while !rest.is_empty() {
        let n = reader.wanted().min(rest.len());
        match reader.feed(&rest[..n]) {
            Ok(Some(body)) => {
                let _ = parse_reply(&body);
            }
            Ok(None) => {}
            Err(_) => break,
        }
        rest = &rest[n..];
    }
}

/// Control messages from a shim: garbage is refused; what parses encodes back to itself.
pub fn control_messages(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(message) = Message::decode(text) {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
    }
}

/// A user-supplied seccomp profile: whatever passes validation converts to an OCI section.
pub fn seccomp_profile(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(profile) = SeccompProfile::from_json(text) {
            let _ = profile.to_oci(SeccompDialect::ValueIsMask);
            let _ = profile.to_oci(SeccompDialect::Gvisor);
        }
    }
}
