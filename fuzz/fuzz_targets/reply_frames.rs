//! Whatever a hostile sandbox writes to its reply pipe, the host's frame reader and reply
//! parser must neither panic nor allocate past the limit.
#![no_main]

use cloudfunc_sandbox::protocol::{parse_reply, FrameReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
