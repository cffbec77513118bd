//! The data directory's modes. It holds every tenant's code, payloads, results and logs and
//! the token secret: the directory is 0700 and the files at its top (the database with its
//! write-ahead log and shared memory, which SQLite creates with the database's mode, and the
//! JWT secret) are 0600, made that way when they are created. A looser mode found at start is
//! tightened, and said in the log. (The code tree below keeps the modes sandboxes need to read
//! it, behind the directory's 0700.)

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The database's file name in the data directory.
pub const DATABASE: &str = "cloudfunc.db";

/// Creates `dir` (0700) and an empty database file (0600) if missing, and tightens what is
/// looser. Returns what it tightened, one line each, for the log.
pub fn secure(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut tightened = private_dir(dir)?;
    let db = dir.join(DATABASE);
    if !db.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&db)?;
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            tighten(&entry.path(), 0o600, &mut tightened)?;
        }
    }
    Ok(tightened)
}

/// Creates `dir` (0700) if missing, and tightens it if it lets the group or others in.
/// Returns what it tightened, for the log.
pub fn private_dir(dir: &Path) -> std::io::Result<Vec<String>> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut tightened = Vec::new();
    tighten(dir, 0o700, &mut tightened)?;
    Ok(tightened)
}

/// Sets `path` to `mode` if it grants anything to the group or others.
fn tighten(path: &Path, mode: u32, tightened: &mut Vec<String>) -> std::io::Result<()> {
    let was = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if was & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        tightened.push(format!("{}: {was:o} -> {mode:o}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn made_private_and_looser_modes_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("data");
        assert!(secure(&dir).unwrap().is_empty());
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(DATABASE)), 0o600);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.join("cloudfunc.db-wal"), b"").unwrap();
        std::fs::set_permissions(
            dir.join("cloudfunc.db-wal"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::fs::create_dir(dir.join("code")).unwrap();
        std::fs::set_permissions(dir.join("code"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let fixed = secure(&dir).unwrap();
        assert_eq!(fixed.len(), 2, "{fixed:?}");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("cloudfunc.db-wal")), 0o600);
        // The code tree keeps what sandboxes need; the directory above shuts others out.
        assert_eq!(mode(&dir.join("code")), 0o755);
    }
}
