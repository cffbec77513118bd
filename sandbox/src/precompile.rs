//! Compiling a function's code once, at deploy, so that its cold starts do not.
//!
//! A Python cold start that imports its function from source spends about 0.8 ms compiling:
//! most of it setting the compiler up, once per process. [`Engine::precompile`] compiles the
//! code in a one-shot sandbox (the code is untrusted, and so is the compiler's work on it)
//! and stores the result in the code directory's `__pycache__`, where every later sandbox of
//! that code finds it. The `.pyc` files are checked-hash ones: Python compares each with its
//! source before using it, so a stale one is ignored, never run.
//!
//! What the sandbox sends back is checked before anything is written: each path must name a
//! regular `.py` file of the code directory, reached without symbolic links, and each file
//! must be a checked-hash `.pyc`. A hostile function could still send bytecode of its own
//! making, but that bytecode only ever runs in that function's own sandboxes, where its
//! source could do the same.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use cloudfunc_bundles::Limits;
use cloudfunc_images::Runtime;

use crate::engine::Engine;
use crate::error::{Error, Result};

/// The compiler script run in the sandbox.
const SCRIPT: &str = include_str!("precompile.py");
/// How many source files one deploy compiles at most.
const MAX_FILES: usize = 5000;
/// How much compiled output the host takes from the sandbox.
const MAX_OUTPUT: usize = 64 * 1024 * 1024;
/// How long the compile may take.
const TIMEOUT: Duration = Duration::from_secs(20);
/// The `.pyc` flags word of a checked-hash file (PEP 552).
const CHECKED_HASH: u32 = 0b11;

/// What [`Engine::precompile`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Precompiled {
    /// The `.pyc` files written.
    pub written: Vec<PathBuf>,
}

impl Engine {
    /// Compiles the function code in `code_dir` for `runtime` inside a one-shot sandbox and
    /// stores the result beside it (Python: `__pycache__/<module>.<tag>.pyc`). Runtimes
    /// without a compiled form are left alone. A source that does not compile is skipped;
    /// loading the function reports its error as before.
    pub fn precompile(&self, runtime: Runtime, code_dir: &Path) -> Result<Precompiled> {
        if runtime != Runtime::Python {
            return Ok(Precompiled::default());
        }
        let limit = MAX_FILES.to_string();
        let args = [
            runtime.interpreter(),
            "-I",
            "-S",
            "-B",
            "-c",
            SCRIPT,
            &limit,
        ];
        let limits = Limits {
            memory_bytes: 256 * 1024 * 1024,
            ..Limits::default()
        };
        let run = self.run_in_sandbox(&args, Some(code_dir), limits, TIMEOUT, MAX_OUTPUT)?;
        if run.timed_out {
            return Err(Error::Precompile(format!(
                "the compiler did not finish within {TIMEOUT:?}"
            )));
        }
        if run.exit != Some(crate::ExitKind::Code(0)) {
            let exit = run.exit.map_or("no exit status".into(), |e| e.to_string());
            return Err(Error::Precompile(format!(
                "the compiler ended with {exit}: {}",
                String::from_utf8_lossy(&run.stderr).trim()
            )));
        }
        store(code_dir, &run.stdout)
    }
}

/// Writes what the compiler sent into `code_dir`, after checking every part of it.
fn store(code_dir: &Path, output: &[u8]) -> Result<Precompiled> {
    let mut frames = Frames(output);
    let mut written = Precompiled::default();
    let Some(tag) = frames.next() else {
        return Ok(written);
    };
    let tag = std::str::from_utf8(tag)
        .ok()
        .filter(|t| valid_tag(t))
        .ok_or_else(|| Error::Precompile("the compiler sent an invalid cache tag".into()))?;
    while let (Some(source), Some(pyc)) = (frames.next(), frames.next()) {
        let Some(target) = pyc_path(code_dir, source, tag) else {
            return Err(Error::Precompile(format!(
                "the compiler named {:?}, not a source file of the function",
                String::from_utf8_lossy(source)
            )));
        };
        if !checked_hash_pyc(pyc) {
            return Err(Error::Precompile(format!(
                "the compiler sent something other than a checked-hash .pyc for {}",
                target.display()
            )));
        }
        write_pyc(&target, pyc)?;
        written.written.push(target);
    }
    Ok(written)
}

/// Length-prefixed frames; a frame cut short (the output cap) ends the sequence.
struct Frames<'a>(&'a [u8]);

impl<'a> Iterator for Frames<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let header: [u8; 4] = self.0.get(..4)?.try_into().ok()?;
        let len = usize::try_from(u32::from_be_bytes(header)).ok()?;
        let body = self.0.get(4..4 + len)?;
        self.0 = &self.0[4 + len..];
        Some(body)
    }
}

fn valid_tag(tag: &str) -> bool {
    (1..=32).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Where the `.pyc` of `source` (relative to `code_dir`) goes, if `source` is a regular `.py`
/// file of `code_dir` reached through real directories only.
fn pyc_path(code_dir: &Path, source: &[u8], tag: &str) -> Option<PathBuf> {
    let source = Path::new(std::str::from_utf8(source).ok()?);
    let stem = source.file_name()?.to_str()?.strip_suffix(".py")?;
    if stem.is_empty()
        || !source
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return None;
    }
    let mut dir = code_dir.to_path_buf();
    for part in source.parent()?.components() {
        dir.push(part);
        if !fs::symlink_metadata(&dir).ok()?.is_dir() {
            return None;
        }
    }
    if !fs::symlink_metadata(code_dir.join(source)).ok()?.is_file() {
        return None;
    }
    Some(dir.join("__pycache__").join(format!("{stem}.{tag}.pyc")))
}

/// A `.pyc` whose header says: hash-based, checked against its source.
fn checked_hash_pyc(pyc: &[u8]) -> bool {
    pyc.len() >= 16
        && pyc[4..8]
            .try_into()
            .is_ok_and(|flags| u32::from_le_bytes(flags) == CHECKED_HASH)
}

/// Writes `pyc` at `target`, replacing a file there, never following a link; the directory
/// `__pycache__` must be a real one (made here if missing).
fn write_pyc(target: &Path, pyc: &[u8]) -> Result<()> {
    let dir = target.parent().expect("a pyc path has a directory");
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Error::Precompile(format!(
                "{} is not a directory",
                dir.display()
            )))
        }
        Err(_) => fs::create_dir(dir).map_err(Error::io(dir))?,
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).map_err(Error::io(dir))?;
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {
            return Err(Error::Precompile(format!(
                "{} is a directory",
                target.display()
            )))
        }
        Ok(_) => fs::remove_file(target).map_err(Error::io(target))?,
        Err(_) => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
        .map_err(Error::io(target))?;
    file.write_all(pyc).map_err(Error::io(target))?;
    // The umask may have narrowed the mode; the sandbox user must read it.
    fs::set_permissions(target, fs::Permissions::from_mode(0o644)).map_err(Error::io(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(out: &mut Vec<u8>, data: &[u8]) {
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        out.extend_from_slice(data);
    }

    fn pyc(flags: u32) -> Vec<u8> {
        let mut p = vec![0xa7, 0x0d, 0x0d, 0x0a];
        p.extend_from_slice(&flags.to_le_bytes());
        p.extend_from_slice(&[0; 8]);
        p.extend_from_slice(b"code");
        p
    }

    fn code_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("function.py"), "x = 1\n").unwrap();
        fs::create_dir(dir.path().join("pkg")).unwrap();
        fs::write(dir.path().join("pkg/mod.py"), "y = 2\n").unwrap();
        dir
    }

    #[test]
    fn writes_checked_pycs_beside_their_sources() {
        let dir = code_dir();
        let mut out = Vec::new();
        frame(&mut out, b"cpython-311");
        for source in ["function.py", "pkg/mod.py"] {
            frame(&mut out, source.as_bytes());
            frame(&mut out, &pyc(CHECKED_HASH));
        }
        let done = store(dir.path(), &out).unwrap();
        let expected = [
            dir.path().join("__pycache__/function.cpython-311.pyc"),
            dir.path().join("pkg/__pycache__/mod.cpython-311.pyc"),
        ];
        assert_eq!(done.written, expected);
        for path in &expected {
            assert_eq!(fs::read(path).unwrap(), pyc(CHECKED_HASH));
            let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644);
        }
    }

    #[test]
    fn refuses_paths_outside_the_sources() {
        let dir = code_dir();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("x.py"), "").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink("function.py", dir.path().join("alias.py")).unwrap();
        for bad in [
            "../x.py",
            "/etc/x.py",
            "link/x.py",
            "alias.py",
            "missing.py",
            "function.txt",
            "pkg",
            ".py",
        ] {
            let mut out = Vec::new();
            frame(&mut out, b"cpython-311");
            frame(&mut out, bad.as_bytes());
            frame(&mut out, &pyc(CHECKED_HASH));
            let e = store(dir.path(), &out).unwrap_err();
            assert!(matches!(e, Error::Precompile(_)), "{bad}: {e}");
        }
        assert!(!outside.path().join("__pycache__").exists());
        assert!(!dir.path().join("__pycache__").exists());
    }

    #[test]
    fn refuses_unchecked_pycs_and_bad_tags() {
        let dir = code_dir();
        for flags in [0, 0b01] {
            let mut out = Vec::new();
            frame(&mut out, b"cpython-311");
            frame(&mut out, b"function.py");
            frame(&mut out, &pyc(flags));
            assert!(store(dir.path(), &out).is_err(), "flags {flags}");
        }
        for tag in [&b"../x"[..], b"", b"a b"] {
            let mut out = Vec::new();
            frame(&mut out, tag);
            assert!(store(dir.path(), &out).is_err());
        }
        assert!(!dir.path().join("__pycache__").exists());
    }

    #[test]
    fn replaces_a_planted_link_without_following_it() {
        let dir = code_dir();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        fs::create_dir(dir.path().join("__pycache__")).unwrap();
        let target = dir.path().join("__pycache__/function.cpython-311.pyc");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        let mut out = Vec::new();
        frame(&mut out, b"cpython-311");
        frame(&mut out, b"function.py");
        frame(&mut out, &pyc(CHECKED_HASH));
        store(dir.path(), &out).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert!(fs::symlink_metadata(&target).unwrap().is_file());
    }

    #[test]
    fn a_cut_off_frame_ends_the_output() {
        let dir = code_dir();
        let mut out = Vec::new();
        frame(&mut out, b"cpython-311");
        frame(&mut out, b"function.py");
        frame(&mut out, &pyc(CHECKED_HASH));
        frame(&mut out, b"pkg/mod.py");
        let mut cut = pyc(CHECKED_HASH);
        frame(&mut out, &cut);
        out.truncate(out.len() - 3);
        cut.clear();
        let done = store(dir.path(), &out).unwrap();
        assert_eq!(done.written.len(), 1);
    }
}
