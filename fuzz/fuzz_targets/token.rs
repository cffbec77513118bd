//! A bearer token, against the built-in HS256 keys and a JWKS.
//! The body is shared with the stable replay (`server/tests/fuzz_replay.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloudfunc_server::fuzzing::token(data));
