//! The host image: the host's own `/usr`, read-only, under a generated skeleton.
//!
//! The skeleton holds only empty mount points, the top-level links of a merged-`/usr` system,
//! a minimal `/etc` of our own (no host users leak in) and the bootstraps, the Python one also
//! compiled by the host's Python. It is written once per content version (which includes that
//! interpreter) into `<images dir>/host-<hash>/rootfs`, atomically, so concurrent callers and
//! older sandboxes still running on a previous version never see a partial one.

use std::collections::hash_map::DefaultHasher;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::runtime::{compile_python_bootstrap, Runtime, BOOTSTRAP_DIR};
use crate::{io_err, BindMount, Error, PreparedImage, Result};

/// Mount points every sandbox needs inside its root.
const MOUNT_POINTS: &[&str] = &[
    "usr",
    "etc",
    "tmp",
    "proc",
    "dev",
    "sys",
    "code",
    "cloudfunc",
];

/// Bumped when the skeleton's shape changes without its listed contents changing (modes).
const SKELETON_VERSION: u32 = 2;

/// Top-level directories that a merged-`/usr` host links into `/usr`; on a host where one is
/// a real directory it is bind-mounted instead.
const USR_ALIASES: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Host files the dynamic loader and the runtimes read, bind-mounted read-only when present.
const HOST_ETC_FILES: &[&str] = &["etc/ld.so.cache", "etc/localtime"];

/// The sandbox's `/etc/passwd`: the function runs as `sandbox` (65534).
const PASSWD: &str = "root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:65534:65534:cloudfunc sandbox:/tmp:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nsandbox:x:65534:\n";
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nhosts: files\n";

/// The host image, built from a host root (normally `/`).
#[derive(Debug, Clone)]
pub struct HostImage {
    host_root: PathBuf,
    images_dir: PathBuf,
}

impl HostImage {
    /// An image whose skeletons live under `images_dir`, taking `/usr` from the real host.
    pub fn new(images_dir: impl Into<PathBuf>) -> Self {
        Self::with_host_root(images_dir, "/")
    }

    /// As [`HostImage::new`], with another host root (for tests).
    pub fn with_host_root(images_dir: impl Into<PathBuf>, host_root: impl Into<PathBuf>) -> Self {
        Self {
            host_root: host_root.into(),
            images_dir: images_dir.into(),
        }
    }

    /// Writes the skeleton if this version is not there yet and says what to mount into it.
    pub fn prepare(&self) -> Result<PreparedImage> {
        let usr = self.host_root.join("usr");
        if !usr.is_dir() {
            return Err(Error::HostMissing(usr));
        }
        let layout = self.layout()?;
        let dir = self
            .images_dir
            .join(format!("host-{:016x}", layout.digest()));
        let rootfs = dir.join("rootfs");
        if !rootfs.join(".complete").exists() {
            let python = layout.python.map(|_| self.python());
            write_atomically(&self.images_dir, &dir, &layout, python.as_deref())?;
        }
        let mut mounts = vec![BindMount {
            source: usr,
            destination: "/usr".into(),
        }];
        for name in &layout.bound_dirs {
            mounts.push(BindMount {
                source: self.host_root.join(name),
                destination: Path::new("/").join(name),
            });
        }
        for file in &layout.etc_files {
            mounts.push(BindMount {
                source: self.host_root.join(file),
                destination: Path::new("/").join(file),
            });
        }
        Ok(PreparedImage { rootfs, mounts })
    }

    fn layout(&self) -> Result<Layout> {
        let mut layout = Layout::default();
        for name in USR_ALIASES {
            let path = self.host_root.join(name);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = fs::read_link(&path).map_err(io_err(&path))?;
                    layout.links.push((name.to_string(), target));
                }
                Ok(meta) if meta.is_dir() => layout.bound_dirs.push(name.to_string()),
                _ => {}
            }
        }
        for file in HOST_ETC_FILES {
            if self.host_root.join(file).is_file() {
                layout.etc_files.push(file.to_string());
            }
        }
        layout.python = fs::metadata(self.python())
            .ok()
            .filter(|m| m.is_file())
            .map(|m| (m.len(), m.mtime(), m.ino()));
        Ok(layout)
    }

    /// The host's Python, which the sandboxes run through the `/usr` mount.
    fn python(&self) -> PathBuf {
        self.host_root
            .join(Runtime::Python.interpreter().trim_start_matches('/'))
    }
}

/// What the skeleton holds; its hash names the version on disk.
#[derive(Debug, Default, Hash)]
struct Layout {
    links: Vec<(String, PathBuf)>,
    bound_dirs: Vec<String>,
    etc_files: Vec<String>,
    /// The host's Python (size, modification time, inode), which compiles the bootstrap: an
    /// upgraded interpreter gets a new version of the image, compiled by itself.
    python: Option<(u64, i64, u64)>,
}

impl Layout {
    fn digest(&self) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.hash(&mut hasher);
        (
            SKELETON_VERSION,
            MOUNT_POINTS,
            PASSWD,
            GROUP,
            HOSTS,
            NSSWITCH,
        )
            .hash(&mut hasher);
        for runtime in Runtime::ALL {
            runtime.bootstrap().hash(&mut hasher);
        }
        hasher.finish()
    }
}

fn write_atomically(
    images_dir: &Path,
    dir: &Path,
    layout: &Layout,
    python: Option<&Path>,
) -> Result<()> {
    fs::create_dir_all(images_dir).map_err(io_err(images_dir))?;
    let staging = images_dir.join(format!(
        ".staging-{}-{:x}",
        std::process::id(),
        layout.digest()
    ));
    let _ = fs::remove_dir_all(&staging);
    if let Err(e) = write_skeleton(&staging, layout, python) {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    match fs::rename(&staging, dir) {
        Ok(()) => Ok(()),
        // Another process finished the same version first: theirs is identical.
        Err(_) if dir.join("rootfs/.complete").exists() => {
            let _ = fs::remove_dir_all(&staging);
            Ok(())
        }
        Err(source) => Err(Error::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Writes the skeleton into `staging/rootfs`.
fn write_skeleton(staging: &Path, layout: &Layout, python: Option<&Path>) -> Result<()> {
    let rootfs = staging.join("rootfs");
    let dir_mode =
        |p: &Path| fs::set_permissions(p, fs::Permissions::from_mode(0o755)).map_err(io_err(p));
    fs::create_dir_all(&rootfs).map_err(io_err(&rootfs))?;
    dir_mode(staging)?;
    dir_mode(&rootfs)?;
    let bound = layout.bound_dirs.iter().map(String::as_str);
    for name in MOUNT_POINTS.iter().copied().chain(bound) {
        let path = rootfs.join(name);
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        dir_mode(&path)?;
    }
    // Like any root filesystem's: runc keeps a tmpfs mountpoint's own mode over `mode=`.
    let tmp = rootfs.join("tmp");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777)).map_err(io_err(&tmp))?;
    for (name, target) in &layout.links {
        let path = rootfs.join(name);
        symlink(target, &path).map_err(io_err(&path))?;
    }
    let etc = rootfs.join("etc");
    for (name, content) in [
        ("passwd", PASSWD),
        ("group", GROUP),
        ("hosts", HOSTS),
        ("nsswitch.conf", NSSWITCH),
    ] {
        write_file(&etc.join(name), content)?;
    }
    for file in &layout.etc_files {
        write_file(&rootfs.join(file), "")?;
    }
    let boot = rootfs.join(BOOTSTRAP_DIR.trim_start_matches('/'));
    for runtime in Runtime::ALL {
        let (name, source) = runtime.bootstrap();
        write_file(&boot.join(name), source)?;
    }
    // Without a Python on the host there is no Python runtime to start.
    if let Some(python) = python {
        let source = boot.join(Runtime::Python.bootstrap().0);
        compile_python_bootstrap(python, &source, &boot.join(Runtime::Python.entry()))?;
    }
    write_file(&rootfs.join(".complete"), "")
}

fn write_file(path: &Path, content: &str) -> Result<()> {
    fs::write(path, content).map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_host(merged: bool) -> tempfile::TempDir {
        let host = tempfile::tempdir().unwrap();
        fs::create_dir_all(host.path().join("usr/bin")).unwrap();
        fs::create_dir_all(host.path().join("etc")).unwrap();
        fs::write(host.path().join("etc/ld.so.cache"), "cache").unwrap();
        if merged {
            symlink("usr/bin", host.path().join("bin")).unwrap();
            symlink("usr/lib", host.path().join("lib")).unwrap();
        } else {
            fs::create_dir_all(host.path().join("bin")).unwrap();
        }
        host
    }

    #[test]
    fn merged_usr_host_gets_links_and_usr_mount() {
        let host = fake_host(true);
        let images = tempfile::tempdir().unwrap();
        let image = HostImage::with_host_root(images.path(), host.path())
            .prepare()
            .unwrap();
        assert_eq!(
            fs::read_link(image.rootfs.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert_eq!(
            fs::read_link(image.rootfs.join("lib")).unwrap(),
            Path::new("usr/lib")
        );
        for point in MOUNT_POINTS {
            assert!(image.rootfs.join(point).is_dir(), "{point} missing");
        }
        let tmp_mode = fs::metadata(image.rootfs.join("tmp"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(tmp_mode, 0o1777);
        let dests: Vec<_> = image.mounts.iter().map(|m| m.destination.clone()).collect();
        assert_eq!(
            dests,
            vec![PathBuf::from("/usr"), PathBuf::from("/etc/ld.so.cache")]
        );
        let passwd = fs::read_to_string(image.rootfs.join("etc/passwd")).unwrap();
        assert!(passwd.contains("sandbox:x:65534"));
        assert_eq!(
            fs::read_to_string(image.rootfs.join("cloudfunc/bootstrap.py")).unwrap(),
            crate::runtime::PYTHON_BOOTSTRAP
        );
    }

    #[test]
    fn split_usr_host_binds_the_real_directories() {
        let host = fake_host(false);
        let images = tempfile::tempdir().unwrap();
        let image = HostImage::with_host_root(images.path(), host.path())
            .prepare()
            .unwrap();
        assert!(image.rootfs.join("bin").is_dir());
        assert!(image
            .mounts
            .iter()
            .any(|m| m.destination == Path::new("/bin")));
    }

    #[test]
    fn prepare_is_idempotent_and_versioned() {
        let host = fake_host(true);
        let images = tempfile::tempdir().unwrap();
        let a = HostImage::with_host_root(images.path(), host.path())
            .prepare()
            .unwrap();
        let b = HostImage::with_host_root(images.path(), host.path())
            .prepare()
            .unwrap();
        assert_eq!(a, b);
        let entries = fs::read_dir(images.path()).unwrap().count();
        assert_eq!(entries, 1, "no staging directory may be left behind");
    }

    #[test]
    fn a_host_without_usr_is_refused() {
        let host = tempfile::tempdir().unwrap();
        let images = tempfile::tempdir().unwrap();
        let err = HostImage::with_host_root(images.path(), host.path())
            .prepare()
            .unwrap_err();
        assert!(matches!(err, Error::HostMissing(_)));
    }

    /// A stand-in `python3` on a fake host: a shell script run with the compile's arguments.
    fn fake_python(host: &Path, script: &str) {
        let python = host.join("usr/bin/python3");
        fs::write(&python, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&python, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn the_python_bootstrap_is_compiled_by_the_hosts_python() {
        let host = fake_host(true);
        // Arguments: -I -S -c <program> <source> <compiled> <name in tracebacks>.
        fake_python(host.path(), r#"echo "$7 from $5" > "$6""#);
        let images = tempfile::tempdir().unwrap();
        let image = HostImage::with_host_root(images.path(), host.path())
            .prepare()
            .unwrap();
        let compiled = image.rootfs.join("cloudfunc/bootstrap.pyc");
        let written = fs::read_to_string(&compiled).unwrap();
        assert!(
            written.contains("/cloudfunc/bootstrap.py from"),
            "{written}"
        );
        assert!(
            written.trim_end().ends_with("/cloudfunc/bootstrap.py"),
            "{written}"
        );
        // Another interpreter (a new size here) gets an image of its own.
        fake_python(host.path(), r#"echo "a newer python: $7" > "$6""#);
        let newer = HostImage::with_host_root(images.path(), host.path())
            .prepare()
            .unwrap();
        assert_ne!(newer.rootfs, image.rootfs);
        assert!(
            fs::read_to_string(newer.rootfs.join("cloudfunc/bootstrap.pyc"))
                .unwrap()
                .starts_with("a newer python")
        );
    }

    #[test]
    fn a_host_without_python_gets_no_compiled_bootstrap() {
        let host = fake_host(true);
        let images = tempfile::tempdir().unwrap();
        let image = HostImage::with_host_root(images.path(), host.path())
            .prepare()
            .unwrap();
        assert!(image.rootfs.join("cloudfunc/bootstrap.py").is_file());
        assert!(!image.rootfs.join("cloudfunc/bootstrap.pyc").exists());
    }

    #[test]
    fn a_python_that_cannot_compile_fails_the_image_and_leaves_nothing() {
        let host = fake_host(true);
        fake_python(host.path(), "echo 'SyntaxError: boom' >&2; exit 1");
        let images = tempfile::tempdir().unwrap();
        let err = HostImage::with_host_root(images.path(), host.path())
            .prepare()
            .unwrap_err();
        match err {
            Error::Compile { detail, .. } => assert_eq!(detail, "SyntaxError: boom"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            fs::read_dir(images.path()).unwrap().count(),
            0,
            "no partial image"
        );
    }
}
