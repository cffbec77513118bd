//! Safe extraction of a function's ZIP archive.
//!
//! Nothing in the archive is trusted: names with `..`, absolute paths, backslashes or NUL are
//! refused, and so are symlinks and every other entry that is not a plain file or directory
//! (a hardlink or device written with Unix mode bits). Sizes are counted as bytes actually
//! decompressed, never as the archive declares them, so a zip bomb stops at the cap. The
//! archive is extracted into a staging directory and moved into place only when whole.

use std::fs;
use std::io::{Cursor, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Caps on what one archive may hold.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveLimits {
    /// Entries, files and directories together.
    pub max_entries: usize,
    /// Decompressed bytes of one file.
    pub max_file_bytes: u64,
    /// Decompressed bytes of all files.
    pub max_total_bytes: u64,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        ArchiveLimits {
            max_entries: 2000,
            max_file_bytes: 20 * 1024 * 1024,
            max_total_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the upload is not a readable ZIP archive ({0})")]
    Corrupt(String),
    #[error("the archive has more than {0} entries")]
    TooManyEntries(usize),
    #[error("the archive entry {0:?} has an unsafe path (absolute, '..', backslash or NUL)")]
    UnsafePath(String),
    #[error("the archive entry {0:?} is a symlink, hardlink or special file; only plain files and directories are accepted")]
    NotAFile(String),
    #[error("the archive entry {name:?} decompresses to more than {limit} bytes")]
    FileTooLarge { name: String, limit: u64 },
    #[error("the archive decompresses to more than {0} bytes in all")]
    TooLarge(u64),
    #[error("the archive holds the entry {0:?} twice")]
    Duplicate(String),
    #[error("the archive holds no files")]
    Empty,
    #[error("cannot write the extracted code")]
    Io(#[from] std::io::Error),
}

const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;

fn safe_relative(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('\\') || name.contains('\0') || name.starts_with('/') {
        return None;
    }
    let path = Path::new(name);
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Extracts `bytes` into `dest` (which must not exist yet). Returns the number of files.
pub fn extract(bytes: &[u8], dest: &Path, limits: ArchiveLimits) -> Result<usize, ArchiveError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
    if zip.len() > limits.max_entries {
        return Err(ArchiveError::TooManyEntries(limits.max_entries));
    }
    let parent = dest
        .parent()
        .ok_or_else(|| std::io::Error::other("destination has no parent"))?;
    fs::create_dir_all(parent)?;
    let staging = parent.join(format!(
        ".staging-{}-{:x}",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        rand::random::<u32>()
    ));
    let result = extract_into(&mut zip, &staging, limits);
    match result {
        Ok(files) => {
            let root = single_top_dir(&staging)?;
            fs::rename(&root, dest)?;
            let _ = fs::remove_dir_all(&staging);
            fs::set_permissions(dest, fs::Permissions::from_mode(0o755))?;
            Ok(files)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn extract_into(
    zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
    staging: &Path,
    limits: ArchiveLimits,
) -> Result<usize, ArchiveError> {
    fs::create_dir_all(staging)?;
    let mut total: u64 = 0;
    let mut files = 0usize;
    let mut seen = std::collections::HashSet::new();
    let mut buf = vec![0u8; 64 * 1024];
    for i in 0..zip.len() {
        let mut entry = zip
            .by_index(i)
            .map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
        let name = entry.name().to_string();
        let rel = safe_relative(&name).ok_or_else(|| ArchiveError::UnsafePath(name.clone()))?;
        if !seen.insert(rel.clone()) {
            return Err(ArchiveError::Duplicate(name));
        }
        let kind = entry.unix_mode().map(|m| m & S_IFMT).filter(|k| *k != 0);
        let is_dir = entry.is_dir() || kind == Some(S_IFDIR);
        if entry.is_symlink()
            || kind.is_some_and(|k| k != S_IFREG && k != S_IFDIR)
            || (is_dir && kind == Some(S_IFREG))
        {
            return Err(ArchiveError::NotAFile(name));
        }
        let target = staging.join(&rel);
        if is_dir {
            fs::create_dir_all(&target)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
            continue;
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
            fs::set_permissions(parent, fs::Permissions::from_mode(0o755))?;
        }
        let mut out = fs::File::options()
            .write(true)
            .create_new(true)
            .open(&target)?;
        let mut written: u64 = 0;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| ArchiveError::Corrupt(format!("{name}: {e}")))?;
            if n == 0 {
                break;
            }
            written += n as u64;
            total += n as u64;
            if written > limits.max_file_bytes {
                return Err(ArchiveError::FileTooLarge {
                    name,
                    limit: limits.max_file_bytes,
                });
            }
            if total > limits.max_total_bytes {
                return Err(ArchiveError::TooLarge(limits.max_total_bytes));
            }
            out.write_all(&buf[..n])?;
        }
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644))?;
        files += 1;
    }
    if files == 0 {
        return Err(ArchiveError::Empty);
    }
    Ok(files)
}

/// Archives made by zipping a folder hold one top directory; the code is inside it.
fn single_top_dir(staging: &Path) -> std::io::Result<PathBuf> {
    let entries: Vec<_> = fs::read_dir(staging)?.flatten().collect();
    if let [only] = entries.as_slice() {
        if only.file_type()?.is_dir() {
            let inner = staging.join(format!("{}.inner", rand::random::<u32>()));
            fs::rename(only.path(), &inner)?;
            return Ok(inner);
        }
    }
    let moved = staging.with_extension("root");
    fs::rename(staging, &moved)?;
    fs::create_dir_all(staging)?;
    Ok(moved)
}

/// Builds a ZIP in memory (tests and the CLI's deploy of a directory).
pub fn zip_dir(dir: &Path) -> std::io::Result<Vec<u8>> {
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&current)?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let rel = path
                .strip_prefix(dir)
                .map_err(std::io::Error::other)?
                .to_string_lossy()
                .into_owned();
            let ty = entry.file_type()?;
            if ty.is_dir() {
                if matches!(
                    entry.file_name().to_str(),
                    Some("__pycache__" | "node_modules/.cache" | ".git")
                ) {
                    continue;
                }
                writer
                    .add_directory(format!("{rel}/"), options)
                    .map_err(std::io::Error::other)?;
                stack.push(path);
            } else if ty.is_file() {
                writer
                    .start_file(rel, options)
                    .map_err(std::io::Error::other)?;
                writer.write_all(&fs::read(&path)?)?;
            }
        }
    }
    Ok(writer.finish().map_err(std::io::Error::other)?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    fn archive(build: impl FnOnce(&mut zip::ZipWriter<Cursor<Vec<u8>>>)) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        build(&mut w);
        w.finish().unwrap().into_inner()
    }

    fn file(w: &mut zip::ZipWriter<Cursor<Vec<u8>>>, name: &str, data: &[u8]) {
        w.start_file(name, SimpleFileOptions::default()).unwrap();
        w.write_all(data).unwrap();
    }

    #[test]
    fn plain_archives_extract() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = archive(|w| {
            file(w, "function.py", b"def handler(e): return 1\n");
            file(w, "lib/util.py", b"X = 1\n");
        });
        let dest = dir.path().join("code/1");
        assert_eq!(extract(&bytes, &dest, ArchiveLimits::default()).unwrap(), 2);
        assert!(dest.join("function.py").is_file());
        assert!(dest.join("lib/util.py").is_file());
        let mode = fs::metadata(dest.join("function.py"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn a_single_top_folder_is_unwrapped() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = archive(|w| file(w, "hello_fn/function.py", b"x"));
        let dest = dir.path().join("v1");
        extract(&bytes, &dest, ArchiveLimits::default()).unwrap();
        assert!(dest.join("function.py").is_file());
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no staging left"
        );
    }

    #[test]
    fn traversal_absolute_and_links_are_refused() {
        for name in ["../evil.py", "a/../../evil.py", "/etc/passwd", "a\\b.py"] {
            let dir = tempfile::tempdir().unwrap();
            let bytes = archive(|w| file(w, name, b"x"));
            let err = extract(&bytes, &dir.path().join("d"), ArchiveLimits::default()).unwrap_err();
            assert!(
                matches!(err, ArchiveError::UnsafePath(_) | ArchiveError::Corrupt(_)),
                "{name}: {err:?}"
            );
            assert_eq!(
                fs::read_dir(dir.path()).unwrap().count(),
                0,
                "{name}: nothing written"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let bytes = archive(|w| {
            w.add_symlink("link", "/etc/shadow", SimpleFileOptions::default())
                .unwrap();
        });
        assert!(matches!(
            extract(&bytes, &dir.path().join("d"), ArchiveLimits::default()),
            Err(ArchiveError::NotAFile(_))
        ));
        // The zip crate writes only permission bits, so set a FIFO's mode in the central
        // directory's external attributes by hand, as a hostile archive would.
        let mut bytes = archive(|w| file(w, "fifo", b""));
        let central = bytes
            .windows(4)
            .position(|w| w == [0x50, 0x4b, 0x01, 0x02])
            .unwrap();
        let attrs = (0o010_644u32 << 16).to_le_bytes();
        bytes[central + 38..central + 42].copy_from_slice(&attrs);
        bytes[central + 5] = 3; // "version made by": Unix, so the mode is read
        assert!(matches!(
            extract(&bytes, &dir.path().join("d"), ArchiveLimits::default()),
            Err(ArchiveError::NotAFile(_))
        ));
    }

    #[test]
    fn bombs_stop_at_the_real_byte_count() {
        let dir = tempfile::tempdir().unwrap();
        let zeros = vec![0u8; 4 * 1024 * 1024];
        let bytes = archive(|w| {
            w.start_file(
                "big",
                SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated),
            )
            .unwrap();
            for _ in 0..8 {
                w.write_all(&zeros).unwrap();
            }
        });
        assert!(bytes.len() < 200 * 1024, "compresses well: {}", bytes.len());
        let limits = ArchiveLimits {
            max_file_bytes: 10 << 20,
            ..ArchiveLimits::default()
        };
        let err = extract(&bytes, &dir.path().join("d"), limits).unwrap_err();
        assert!(matches!(err, ArchiveError::FileTooLarge { .. }), "{err:?}");
        let limits = ArchiveLimits {
            max_total_bytes: 1 << 20,
            ..ArchiveLimits::default()
        };
        assert!(matches!(
            extract(&bytes, &dir.path().join("d"), limits),
            Err(ArchiveError::TooLarge(_))
        ));
        let many = archive(|w| (0..20).for_each(|i| file(w, &format!("f{i}"), b"x")));
        let limits = ArchiveLimits {
            max_entries: 10,
            ..ArchiveLimits::default()
        };
        assert!(matches!(
            extract(&many, &dir.path().join("d"), limits),
            Err(ArchiveError::TooManyEntries(10))
        ));
        assert!(matches!(
            extract(
                b"PK\x03\x04garbage",
                &dir.path().join("d"),
                ArchiveLimits::default()
            ),
            Err(ArchiveError::Corrupt(_))
        ));
        assert!(matches!(
            extract(
                &archive(|_| {}),
                &dir.path().join("d"),
                ArchiveLimits::default()
            ),
            Err(ArchiveError::Empty)
        ));
    }

    #[test]
    fn zip_dir_round_trips() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("index.js"), "exports.handler = () => 1;").unwrap();
        fs::create_dir(src.path().join("lib")).unwrap();
        fs::write(src.path().join("lib/a.js"), "x").unwrap();
        let bytes = zip_dir(src.path()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        extract(&bytes, &dir.path().join("d"), ArchiveLimits::default()).unwrap();
        assert!(dir.path().join("d/lib/a.js").is_file());
    }
}
