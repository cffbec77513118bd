//! Protection of our own binary against overwrite through `/proc/self/exe` (CVE-2019-5736).
//!
//! A container's init process is a clone of the shim until it `exec`s the function's runtime,
//! and a hostile process in the container could open the shim's binary through
//! `/proc/<pid>/exe` and write to it. So the shim never runs from its file: the host copies it
//! once into a memfd, seals the copy against every write, and starts each shim from that memfd.
//! A shim started any other way re-executes itself from a sealed copy before doing anything.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const SEALS: libc::c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// A sealed, read-only copy of an executable, kept open for the life of this value.
#[derive(Debug)]
pub struct SealedBinary {
    fd: OwnedFd,
}

impl SealedBinary {
    /// Copies `path` into a new sealed memfd.
    pub fn new(path: &Path) -> io::Result<SealedBinary> {
        let mut source = File::open(path)?;
        let name = CString::new("cloudfunc-shim").expect("no NUL in the name");
        // SAFETY: memfd_create takes a valid NUL-terminated name and flags; it returns a new
        // descriptor or -1, which is checked before the descriptor is owned.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor we just created and own exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut copy = File::from(fd);
        io::copy(&mut source, &mut copy)?;
        let fd = OwnedFd::from(copy);
        // SAFETY: fcntl on a descriptor we own with a constant argument.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SealedBinary { fd })
    }

    /// A path that `exec` can start (valid in this process only).
    pub fn exec_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Whether the running executable is a sealed memfd.
pub fn running_sealed() -> bool {
    let Ok(exe) = File::open("/proc/self/exe") else {
        return false;
    };
    // SAFETY: fcntl(F_GET_SEALS) only reads the seals of a descriptor we own.
    let seals = unsafe { libc::fcntl(exe.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & SEALS == SEALS
}

/// Re-executes the current program from a sealed copy unless it already runs from one.
/// Returns only if it already does; otherwise returns the error that stopped the re-exec.
pub fn ensure_sealed() -> io::Result<()> {
    if running_sealed() {
        return Ok(());
    }
    let sealed = SealedBinary::new(Path::new("/proc/self/exe"))?;
    let args: Vec<CString> = std::env::args_os()
        .map(|a| {
            CString::new(std::os::unix::ffi::OsStrExt::as_bytes(a.as_os_str()))
                .map_err(io::Error::other)
        })
        .collect::<io::Result<_>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: argv and envp are NULL-terminated arrays of pointers into CStrings that outlive
    // the call; fexecve only returns on failure.
    unsafe { libc::fexecve(sealed.fd.as_raw_fd(), argv.as_ptr(), envp.as_ptr()) };
    Err(io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_copy_refuses_writes() {
        let sealed = SealedBinary::new(Path::new("/proc/self/exe")).unwrap();
        let err = std::fs::OpenOptions::new()
            .write(true)
            .open(sealed.exec_path());
        // Opening for write succeeds on a memfd, but writing must fail with EPERM.
        if let Ok(mut f) = err {
            use std::io::Write;
            let e = f.write_all(b"x").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        }
        let meta = std::fs::metadata(sealed.exec_path()).unwrap();
        let original = std::fs::metadata("/proc/self/exe").unwrap();
        assert_eq!(meta.len(), original.len());
    }

    #[test]
    fn the_test_binary_does_not_run_sealed() {
        assert!(!running_sealed());
    }
}
