//! A real PostgreSQL server for the tests: a cluster made by `initdb` in a temporary
//! directory, listening on a Unix socket there only, run as the `postgres` user when the
//! tests run as root (PostgreSQL refuses root), stopped and removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A running cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The user it runs as when the tests are root.
    run_as: Option<String>,
    port: u16,
    databases: AtomicU32,
}

/// The directory of PostgreSQL's programs: `CLOUDFUNC_PG_BIN`, else Debian's newest
/// `/usr/lib/postgresql/N/bin`, else wherever `pg_ctl` is on the PATH.
fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CLOUDFUNC_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("pg_ctl").exists() && d.join("initdb").exists())
    })
}

impl Postgres {
    /// Why PostgreSQL cannot be started here, if it cannot.
    pub fn unavailable() -> Option<String> {
        let Some(bin) = bin_dir() else {
            return Some("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on the PATH; apt-get install postgresql)".into());
        };
        if nix::unistd::geteuid().is_root()
            && nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .is_none()
        {
            return Some(format!(
                "the tests run as root and there is no postgres user to run {} as",
                bin.display()
            ));
        }
        None
    }

    /// Makes and starts a cluster; panics saying why if it cannot.
    pub fn start() -> Postgres {
        Postgres::start_with(None)
    }

    /// A cluster that also listens on 127.0.0.1, where it takes TLS connections only, with a
    /// self-signed certificate for `localhost`; returns it and the certificate's PEM file (the
    /// CA a client must trust).
    pub fn start_tls() -> (Postgres, PathBuf) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let pg = Postgres::start_with(Some(port));
        let ca = pg.dir.path().join("ca.pem");
        (pg, ca)
    }

    fn start_with(tcp_port: Option<u16>) -> Postgres {
        let bin = bin_dir().expect("PostgreSQL is installed");
        let dir = tempfile::Builder::new()
            .prefix("cfpg")
            .tempdir()
            .expect("a temporary directory");
        let run_as = nix::unistd::geteuid()
            .is_root()
            .then(|| "postgres".to_string());
        if let Some(user) = &run_as {
            let u = nix::unistd::User::from_name(user).unwrap().unwrap();
            nix::unistd::chown(dir.path(), Some(u.uid), Some(u.gid)).unwrap();
        }
        // Any port where only the Unix socket listens: its file name carries it, in a
        // directory of our own.
        let port = tcp_port.unwrap_or(5432);
        let pg = Postgres {
            dir,
            bin,
            run_as,
            port,
            databases: AtomicU32::new(0),
        };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        let listen = match tcp_port {
            Some(_) => {
                pg.serve_tls(&data);
                "-c listen_addresses=127.0.0.1 -c ssl=on"
            }
            None => "-c listen_addresses=''",
        };
        let options = format!(
            "-k {} -p {port} {listen} -c max_connections=200 -c fsync=off -c synchronous_commit=off",
            pg.dir.path().display()
        );
        pg.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                pg.dir.path().join("log").to_str().unwrap(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
        pg
    }

    /// A certificate for `localhost` and its key in the data directory, and a `pg_hba.conf`
    /// that takes TCP connections over TLS only.
    fn serve_tls(&self, data: &Path) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("a self-signed certificate");
        let files = [
            ("server.crt", made.cert.pem()),
            ("server.key", made.key_pair.serialize_pem()),
            (
                "pg_hba.conf",
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n".to_string(),
            ),
        ];
        for (name, text) in files {
            let path = data.join(name);
            std::fs::write(&path, text).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            if let Some(user) = &self.run_as {
                let u = nix::unistd::User::from_name(user).unwrap().unwrap();
                nix::unistd::chown(&path, Some(u.uid), Some(u.gid)).unwrap();
            }
        }
        std::fs::write(self.dir.path().join("ca.pem"), made.cert.pem()).unwrap();
    }

    /// The address of database `name` over TCP, by the name the certificate carries.
    pub fn tcp_url(&self, name: &str, more: &str) -> String {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={} user=postgres dbname={name} {more}",
            self.port
        )
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self.output(program, args);
        assert!(
            out.status.success(),
            "{program} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    fn output(&self, program: &str, args: &[&str]) -> std::process::Output {
        let exe = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()))
    }

    /// The connection string of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={name}",
            self.dir.path().display(),
            self.port
        )
    }

    /// A new, empty database; returns its connection string.
    pub fn database(&self) -> String {
        let name = format!("t{}", self.databases.fetch_add(1, Ordering::SeqCst));
        let mut admin = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .expect("connecting to the test cluster");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("creating a database");
        self.url(&name)
    }

    /// Its directory (the socket and the log are there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Postgres {
    /// `pg_ctl <verb>` on the cluster, shutting down in `mode` and waiting for it; the
    /// server a restart starts logs to the cluster's log (so it holds no pipe of ours).
    fn ctl(&self, verb: &str, mode: &str) -> std::process::Output {
        let (data, log) = (self.dir.path().join("data"), self.dir.path().join("log"));
        self.output(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-m",
                mode,
                "-w",
                verb,
            ],
        )
    }

    /// Restarts the server (a fast shutdown: every connection is closed), with the options
    /// it started with.
    pub fn restart(&self) {
        self.ctl_fast("restart");
    }

    /// Stops the server (a fast shutdown) until [`Postgres::start_again`].
    pub fn stop_for_now(&self) {
        self.ctl_fast("stop");
    }

    /// `pg_ctl <verb>` with a fast shutdown; panics saying why if it fails.
    fn ctl_fast(&self, verb: &str) {
        let done = self.ctl(verb, "fast");
        assert!(
            done.status.success(),
            "pg_ctl {verb} on the test PostgreSQL: {}",
            String::from_utf8_lossy(&done.stderr)
        );
    }

    /// Starts a server [`Postgres::stop_for_now`] stopped, with the options it first started
    /// with (a restart of a stopped server starts it so).
    pub fn start_again(&self) {
        self.restart();
    }

    /// Stops the server at once (the data goes with the directory).
    fn stop(&self) {
        let stopped = self.ctl("stop", "immediate");
        if !stopped.status.success() {
            eprintln!(
                "stopping the test PostgreSQL failed: {}",
                String::from_utf8_lossy(&stopped.stderr)
            );
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The cluster the servers of a test binary share when `CLOUDFUNC_TEST_STORE=postgres` (the
/// API suite run again on PostgreSQL); `None` otherwise.
static SHARED: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();

/// Whether this run keeps the servers' records in PostgreSQL.
pub fn wanted() -> bool {
    std::env::var("CLOUDFUNC_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// The `--database` flag for a server on `dir`: its own database in the shared cluster (the
/// same one when it restarts on `dir`), or nothing when the run uses SQLite.
pub fn server_args(dir: &Path) -> Vec<String> {
    if !wanted() {
        return Vec::new();
    }
    let remembered = dir.join("database.url");
    let url = match std::fs::read_to_string(&remembered) {
        Ok(url) => url,
        Err(_) => {
            let url = SHARED.get_or_init(Postgres::start).database();
            std::fs::write(&remembered, &url).unwrap();
            url
        }
    };
    vec!["--database".into(), url]
}

/// Stops the shared cluster, if one was started (statics are never dropped).
pub fn stop_shared() {
    if let Some(pg) = SHARED.get() {
        pg.stop();
        let _ = std::fs::remove_dir_all(pg.dir.path());
    }
}
