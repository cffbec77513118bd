//! An uploaded code archive, extracted under limits: nothing may panic or escape.
//! The body is shared with the stable replay (`server/tests/fuzz_replay.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloudfunc_server::fuzzing::archive(data));
