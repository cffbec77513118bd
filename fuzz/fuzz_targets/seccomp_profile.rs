//! A user-supplied seccomp profile: whatever passes validation converts to an OCI section.
//! The body is shared with the stable replay (`server/tests/fuzz_replay.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloudfunc_server::fuzzing::seccomp_profile(data));
