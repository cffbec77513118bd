//! A user-supplied seccomp profile is validated before use: no input may panic the loader, and
//! whatever passes validation must convert to an OCI section.
#![no_main]

use cloudfunc_seccomp::{Dialect, Profile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(profile) = Profile::from_json(text) {
            let _ = profile.to_oci(Dialect::ValueIsMask);
            let _ = profile.to_oci(Dialect::Gvisor);
        }
    }
});
