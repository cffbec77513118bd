//! Control messages from a shim are parsed by the host; garbage must be refused cleanly and
//! what parses must encode back to itself.
#![no_main]

use cloudfunc_sandbox::control::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(message) = Message::decode(text) {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
    }
});
