//! A function's settings as cloudfunc.toml, manifest.json or a query string.
//! The body is shared with the stable replay (`server/tests/fuzz_replay.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloudfunc_server::fuzzing::settings(data));
