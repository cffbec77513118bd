//! Whatever a hostile sandbox writes to its reply pipe, the host's frame reader and reply
//! parser must neither panic nor allocate past the limit.
//! The body is shared with the stable replay (`server/tests/fuzz_replay.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cloudfunc_server::fuzzing::reply_frames(data));
