//! Everything `cloudfunc serve` can be told, with the one place its defaults live
//! ([`defaults`]): the flags, their environment variables, and the pool's and platform's
//! configurations built from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use cloudfunc_sandbox::BackendKind;

use crate::archive::ArchiveLimits;
use crate::isolation::Isolation;
use crate::platform::{Bounds, PlatformConfig, Retention};
use crate::pool::PoolConfig;

/// The embedded defaults.
pub mod defaults {
    /// Where the database, the code and the JWT secret live.
    pub const DATA_DIR: &str = "/var/lib/cloudfunc";
    /// Where container state lives.
    pub const STATE_DIR: &str = "/run/cloudfunc";
    /// Where image skeletons are written.
    pub const IMAGES_DIR: &str = "/var/lib/cloudfunc/images";
    /// The API's address.
    pub const LISTEN: &str = "127.0.0.1:8080";
    /// Sandboxes live under `/<this>` in every cgroup hierarchy.
    pub const CGROUP_PARENT: &str = "cloudfunc";
    /// gVisor's runtime.
    pub const RUNSC: &str = "/usr/bin/runsc";
    /// Queue worker slots: the tasks a node holds claimed at once. A slot's cycle includes
    /// the commit that ends its task and claims the next, so the run rate grows with the
    /// slots while the store's round trips, not the CPU, bound it (on a 2-vCPU VM,
    /// PostgreSQL drained 4,600-4,900 tasks/s with 16 and 5,700-10,100 with 64; SQLite
    /// 9,900-16,400 against 17,200-26,900). What runs at once stays capped by each
    /// function's `max_instances` and the pool's caps; a slot beyond them holds a task
    /// waiting for an instance, which a graceful stop gives back to the queue unstarted.
    /// The price is that a crash interrupts up to this many tasks.
    pub const WORKERS: usize = 64;
    /// MiB of payloads the queue's claimed tasks may hold: a function's default 8 instances'
    /// worth of the largest bodies (32 MiB), where 64 slots could otherwise hold 2 GiB of them.
    pub const QUEUE_MEMORY_MB: u64 = 256;
    /// A function's calls at once when it sets no `max_instances`.
    pub const MAX_INSTANCES: u32 = 8;
    /// Largest request body, MiB.
    pub const MAX_BODY_MB: u64 = 32;
    /// Days finished tasks are kept.
    pub const RETENTION_DAYS: f64 = 7.0;
    /// Days per-minute rollups are kept.
    pub const MINUTE_ROLLUPS_DAYS: f64 = 30.0;
    /// Days per-hour rollups are kept.
    pub const HOUR_ROLLUPS_DAYS: f64 = 365.0;
    /// Days per-day rollups are kept (0: forever).
    pub const DAY_ROLLUPS_DAYS: f64 = 0.0;
    /// Stem cells per runtime and isolation level.
    pub const STEM_CELLS: usize = 1;
    /// Sync callers that may wait for a busy function.
    pub const MAX_WAITING: usize = 64;
    /// Longest a sync caller waits for a busy function, seconds.
    pub const MAX_WAIT_S: u64 = 10;
    /// Sandboxes the pool holds at once.
    pub const MAX_SANDBOXES: usize = 1024;
    /// Per-call timeout when a function sets none, ms.
    pub const TIMEOUT_MS: u64 = 30_000;
    /// Longest timeout a function may ask for, ms.
    pub const MAX_TIMEOUT_MS: u64 = 15 * 60 * 1000;
    /// Memory limit when a function sets none, MiB.
    pub const MEMORY_MB: u64 = 256;
    /// Largest memory limit a function may ask for, MiB.
    pub const MAX_MEMORY_MB: u64 = 4096;
    /// CPU limit when a function sets none, millicores.
    pub const CPU_MILLICORES: u32 = 1000;
    /// Seconds a sandbox stays warm after a call (seed 003's 60 s).
    pub const KEEP_WARM_S: u64 = 60;
    /// Chart.js, where Debian's `libjs-chart.js` puts it.
    pub const CHART_JS: &str = "/usr/share/javascript/chart.js/chart.min.js";
    /// Seconds from a request's first byte to its last header.
    pub const HEADER_TIMEOUT_S: f64 = 10.0;
    /// Seconds an idle keep-alive connection is kept.
    pub const KEEP_ALIVE_S: f64 = 75.0;
    /// Seconds a response may wait for its client to read it.
    pub const WRITE_TIMEOUT_S: f64 = 30.0;
    /// Seconds between two chunks of a request body.
    pub const BODY_IDLE_TIMEOUT_S: f64 = 30.0;
    /// Seconds for a whole request body.
    pub const BODY_TIMEOUT_S: f64 = 300.0;
    /// Connections one client address may hold.
    pub const MAX_CONNECTIONS_PER_CLIENT: usize = 256;
    /// Connections at once.
    pub const MAX_CONNECTIONS: usize = 16_384;
    /// MiB of the data directory's disk kept free: below, new work is refused (507).
    pub const MIN_FREE_MB: u64 = 256;
    /// Deploys per minute a tenant may make (floods of deploys, each compiling in a sandbox,
    /// are the cheapest way to load a server).
    pub const DEPLOYS_PER_MINUTE: f64 = 300.0;
    /// Deploys at once above that.
    pub const DEPLOY_BURST: f64 = 50.0;
    /// Functions per tenant.
    pub const MAX_FUNCTIONS_PER_TENANT: u32 = 1000;
    /// MiB of stored code per tenant.
    pub const MAX_CODE_MB_PER_TENANT: u64 = 1024;
    /// MiB the WAL may reach before a checkpoint waits for readers to cut it back.
    pub const WAL_LIMIT_MB: u64 = 64;
}

/// `cloudfunc serve`'s flags; each has an embedded default.
#[derive(Debug, Clone, Args)]
pub struct ServeConfig {
    /// The server's data directory (database with the sealed code, JWT secret, master key).
    #[arg(skip = PathBuf::from(defaults::DATA_DIR))]
    pub data_dir: PathBuf,
    /// The API's address.
    #[arg(long, env = "CLOUDFUNC_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// Serve HTTPS with this certificate chain (PEM; with --tls-key). Read again on SIGHUP.
    #[arg(long, env = "CLOUDFUNC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "CLOUDFUNC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS with a certificate for localhost made at start (written to
    /// <data dir>/tls/self-signed.pem for clients' --ca-cert; its fingerprint is printed).
    #[arg(long, conflicts_with = "tls_cert")]
    pub tls_self_signed: bool,
    /// Serve plain HTTP on a non-loopback address without the warning: tokens and payloads
    /// then cross the network in clear.
    #[arg(long)]
    pub insecure_http: bool,
    /// Also take RS256/ES256 tokens signed by the keys of this JWKS document (https, or
    /// http on loopback): read at start, every ten minutes, and for an unknown key id.
    #[arg(long, env = "CLOUDFUNC_JWKS_URL", conflicts_with = "jwks_file")]
    pub jwks_url: Option<String>,
    /// Also take RS256/ES256 tokens signed by the keys of this JWKS file.
    #[arg(long, env = "CLOUDFUNC_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// The issuer (iss) JWKS-signed tokens must name.
    #[arg(long, env = "CLOUDFUNC_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// A value JWKS-signed tokens' audience (aud) must hold.
    #[arg(long, env = "CLOUDFUNC_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The claim of JWKS-signed tokens that names the tenant.
    #[arg(long, env = "CLOUDFUNC_JWT_TENANT_CLAIM", default_value = "sub")]
    pub jwt_tenant_claim: String,
    /// Invocations (sync, async, chain runs) per second per tenant (0: unlimited). Admin
    /// tokens are not limited.
    #[arg(long, env = "CLOUDFUNC_INVOCATIONS_PER_SECOND", default_value_t = 0.0)]
    pub invocations_per_second: f64,
    /// Invocations a tenant may make at once above its rate (default: twice the rate).
    #[arg(long)]
    pub invocation_burst: Option<f64>,
    /// Deploys per minute per tenant (0: unlimited).
    #[arg(long, env = "CLOUDFUNC_DEPLOYS_PER_MINUTE", default_value_t = defaults::DEPLOYS_PER_MINUTE)]
    pub deploys_per_minute: f64,
    /// Deploys a tenant may make at once above its rate.
    #[arg(long, default_value_t = defaults::DEPLOY_BURST)]
    pub deploy_burst: f64,
    /// Functions a tenant may have.
    #[arg(long, env = "CLOUDFUNC_MAX_FUNCTIONS_PER_TENANT", default_value_t = defaults::MAX_FUNCTIONS_PER_TENANT)]
    pub max_functions_per_tenant: u32,
    /// MiB of code (every version kept) a tenant may store.
    #[arg(long, env = "CLOUDFUNC_MAX_CODE_MB_PER_TENANT", default_value_t = defaults::MAX_CODE_MB_PER_TENANT)]
    pub max_code_mb_per_tenant: u64,
    /// Container state.
    #[arg(long, env = "CLOUDFUNC_STATE_DIR", default_value = defaults::STATE_DIR)]
    pub state_dir: PathBuf,
    /// Image skeletons.
    #[arg(long, env = "CLOUDFUNC_IMAGES_DIR", default_value = defaults::IMAGES_DIR)]
    pub images_dir: PathBuf,
    /// Sandboxes live under /<this> in every cgroup hierarchy.
    #[arg(long, env = "CLOUDFUNC_CGROUP_PARENT", default_value = defaults::CGROUP_PARENT)]
    pub cgroup_parent: String,
    /// HS256 secret; refused if weak. Default: generated into the data directory.
    #[arg(long, env = "CLOUDFUNC_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// The master key(s) that wrap the data keys (`cfk1:...`, the first wraps; several,
    /// comma-separated, while a rotation is finished at start). Default: the key file
    /// master.key in the data directory, made on first start.
    #[arg(long, env = "CLOUDFUNC_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// Write new records in plaintext (to measure what encryption costs): sealed records
    /// are still read, and secrets are always sealed.
    #[arg(long)]
    pub no_encryption_at_rest: bool,
    /// Queue workers.
    #[arg(long, env = "CLOUDFUNC_WORKERS", default_value_t = defaults::WORKERS)]
    pub workers: usize,
    /// MiB of payloads the queue's claimed tasks may hold in memory at once (one task's
    /// payload past it at most): a claim takes only what fits.
    #[arg(long, env = "CLOUDFUNC_QUEUE_MEMORY_MB", default_value_t = defaults::QUEUE_MEMORY_MB)]
    pub queue_memory_mb: u64,
    /// A function's calls at once (its max_instances) when it sets none.
    #[arg(long, env = "CLOUDFUNC_CONCURRENCY", default_value_t = defaults::MAX_INSTANCES)]
    pub concurrency: u32,
    /// Largest request body, MiB.
    #[arg(long, default_value_t = defaults::MAX_BODY_MB)]
    pub max_body_mb: u64,
    /// Days finished tasks (results, logs, usage), ended chain runs and sent or failed
    /// notifications are kept.
    #[arg(long, env = "CLOUDFUNC_RETENTION_DAYS", default_value_t = defaults::RETENTION_DAYS)]
    pub retention_days: f64,
    /// Days per-minute metrics rollups are kept (0: forever).
    #[arg(long, default_value_t = defaults::MINUTE_ROLLUPS_DAYS)]
    pub minute_rollups_days: f64,
    /// Days per-hour metrics rollups are kept (0: forever).
    #[arg(long, default_value_t = defaults::HOUR_ROLLUPS_DAYS)]
    pub hour_rollups_days: f64,
    /// Days per-day metrics rollups are kept (0: forever). Prometheus counters are read
    /// from these, so pruning them makes counters drop.
    #[arg(long, default_value_t = defaults::DAY_ROLLUPS_DAYS)]
    pub day_rollups_days: f64,
    /// The runtime behind `container` isolation: libcontainer, runc or crun.
    #[arg(
        long,
        env = "CLOUDFUNC_CONTAINER_RUNTIME",
        default_value = "libcontainer"
    )]
    pub container_runtime: BackendKind,
    /// Isolation of functions that do not choose: container or gvisor.
    #[arg(long, env = "CLOUDFUNC_ISOLATION", default_value = "container")]
    pub isolation: Isolation,
    /// gVisor's runsc, for gvisor isolation.
    #[arg(long, env = "CLOUDFUNC_RUNSC", default_value = defaults::RUNSC)]
    pub runsc: PathBuf,
    /// Sandboxes started ahead of need, per runtime and isolation level (0: none).
    #[arg(long, env = "CLOUDFUNC_STEM_CELLS", default_value_t = defaults::STEM_CELLS)]
    pub stem_cells: usize,
    /// Sync calls that may wait for a function at its max_instances before getting 429.
    #[arg(long, env = "CLOUDFUNC_MAX_WAITING", default_value_t = defaults::MAX_WAITING)]
    pub max_waiting: usize,
    /// Chart.js for the dashboard (Debian's libjs-chart.js puts it here).
    #[arg(long, env = "CLOUDFUNC_CHART_JS", default_value = defaults::CHART_JS)]
    pub chart_js: PathBuf,
    /// Sandboxes the warm pool holds at once (idle, busy, starting and stem cells).
    #[arg(long, env = "CLOUDFUNC_MAX_SANDBOXES", default_value_t = defaults::MAX_SANDBOXES)]
    pub max_sandboxes: usize,
    /// MiB the pool's sandboxes' memory limits may commit together (0: 4x the host's memory).
    #[arg(long, env = "CLOUDFUNC_POOL_MEMORY_MB", default_value_t = 0)]
    pub pool_memory_mb: u64,
    /// Seconds from a request's first byte to its last header.
    #[arg(long, default_value_t = defaults::HEADER_TIMEOUT_S)]
    pub header_timeout_s: f64,
    /// Seconds an idle keep-alive connection is kept.
    #[arg(long, default_value_t = defaults::KEEP_ALIVE_S)]
    pub keep_alive_s: f64,
    /// Seconds a response may wait for its client to read it.
    #[arg(long, default_value_t = defaults::WRITE_TIMEOUT_S)]
    pub write_timeout_s: f64,
    /// Seconds between two chunks of a request body (then 408).
    #[arg(long, default_value_t = defaults::BODY_IDLE_TIMEOUT_S)]
    pub body_idle_timeout_s: f64,
    /// Seconds for a whole request body (then 408).
    #[arg(long, default_value_t = defaults::BODY_TIMEOUT_S)]
    pub body_timeout_s: f64,
    /// Connections one client address may hold at once.
    #[arg(long, env = "CLOUDFUNC_MAX_CONNECTIONS_PER_CLIENT", default_value_t = defaults::MAX_CONNECTIONS_PER_CLIENT)]
    pub max_connections_per_client: usize,
    /// Connections at once, all clients together.
    #[arg(long, env = "CLOUDFUNC_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// MiB of the data directory's disk kept free: below, deploys, calls and async runs are
    /// refused with 507 and the queue pauses (0: never refuse).
    #[arg(long, env = "CLOUDFUNC_MIN_FREE_MB", default_value_t = defaults::MIN_FREE_MB)]
    pub min_free_mb: u64,
    /// The anomaly score (0 to 1) at which a series' minute opens an anomaly event; higher
    /// reports fewer, larger anomalies.
    #[arg(long, env = "CLOUDFUNC_ANOMALY_THRESHOLD", default_value_t = crate::anomalies::watcher::DEFAULT_THRESHOLD)]
    pub anomaly_threshold: f64,
    /// How often alert rules are evaluated, milliseconds.
    #[arg(long, env = "CLOUDFUNC_ALERT_INTERVAL_MS", default_value_t = 15_000)]
    pub alert_interval_ms: u64,
    /// Let webhooks go to loopback, private and link-local addresses (refused by default:
    /// a tenant could otherwise reach the host's own services or cloud metadata).
    #[arg(long, env = "CLOUDFUNC_ALERT_ALLOW_PRIVATE_TARGETS")]
    pub alert_allow_private_targets: bool,
    /// The SMTP server for email notifications: smtp://host:port (STARTTLS when offered),
    /// smtp://host:port?tls=required, or smtps://host:port; user:password@ for auth.
    #[arg(long, env = "CLOUDFUNC_SMTP_URL")]
    pub smtp_url: Option<String>,
    /// The From address of notification emails.
    #[arg(
        long,
        env = "CLOUDFUNC_SMTP_FROM",
        default_value = "cloudfunc <cloudfunc@localhost>"
    )]
    pub smtp_from: String,
    /// The SMS provider's API (Twilio's REST shape).
    #[arg(
        long,
        env = "CLOUDFUNC_SMS_URL",
        default_value = "https://api.twilio.com"
    )]
    pub sms_url: String,
    /// The SMS provider's account id.
    #[arg(long, env = "CLOUDFUNC_SMS_ACCOUNT")]
    pub sms_account: Option<String>,
    /// The SMS provider's token (prefer the environment variable to the flag).
    #[arg(long, env = "CLOUDFUNC_SMS_TOKEN", hide_env_values = true)]
    pub sms_token: Option<String>,
    /// The number SMS notifications are sent from (E.164).
    #[arg(long, env = "CLOUDFUNC_SMS_FROM")]
    pub sms_from: Option<String>,
    /// The dashboard's address as users reach it, for links in notifications
    /// (default: http:// and --listen).
    #[arg(long, env = "CLOUDFUNC_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Where the records are kept: `sqlite` (a file in the data directory) or a PostgreSQL
    /// server (`postgres://user:password@host:port/database`, or `host=... dbname=...`),
    /// which several nodes may share.
    #[arg(
        long,
        env = "CLOUDFUNC_DATABASE_URL",
        default_value = "sqlite",
        hide_env_values = true
    )]
    pub database: String,
    /// A PEM file of the CA that signed the PostgreSQL server's certificate: connections then
    /// use TLS, the certificate verified against it (`sslmode=require` in the address alone
    /// verifies against the public web roots).
    #[arg(long, env = "CLOUDFUNC_DATABASE_CA")]
    pub database_ca: Option<std::path::PathBuf>,
    /// This node's id among those sharing a PostgreSQL database: stable across its restarts
    /// (a restart ends what it left running at once). Default: the host's name.
    #[arg(long, env = "CLOUDFUNC_NODE_ID")]
    pub node_id: Option<String>,
    /// Seconds a node that stopped heartbeating keeps its running tasks before another node
    /// ends them (requeued where their function allows retries, else failed `interrupted`).
    #[arg(long, env = "CLOUDFUNC_NODE_LEASE_S", default_value_t = 15)]
    pub node_lease_s: u64,
    /// Connections to PostgreSQL this node opens at most.
    #[arg(long, env = "CLOUDFUNC_DATABASE_CONNECTIONS", default_value_t = crate::store::postgres::CONNECTIONS)]
    pub database_connections: usize,
    /// MiB the SQLite database's write-ahead log may reach before a checkpoint waits for
    /// readers to cut it back.
    #[arg(long, env = "CLOUDFUNC_WAL_LIMIT_MB", default_value_t = defaults::WAL_LIMIT_MB)]
    pub wal_limit_mb: u64,
}

/// Days as a retention period: `None` (forever) for 0.
fn keep(flag: &str, days: f64) -> Result<Option<Duration>> {
    if !days.is_finite() || days < 0.0 {
        bail!("--{flag} must be 0 (forever) or a positive number of days");
    }
    Ok((days > 0.0).then(|| Duration::from_secs_f64(days * 86_400.0)))
}

impl ServeConfig {
    /// What the flags' defaults give, with data under `data_dir`.
    pub fn with_defaults(data_dir: PathBuf) -> ServeConfig {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            serve: ServeConfig,
        }
        let mut config = <Only as clap::Parser>::parse_from(["serve"]).serve;
        config.data_dir = data_dir;
        config
    }

    /// Checks what no flag's type can: workers, the queue's memory, retention periods.
    pub fn validate(&self) -> Result<()> {
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        if self.queue_memory_mb == 0 {
            bail!("--queue-memory-mb must be at least 1: with none the queue could claim nothing");
        }
        if self.postgres().is_none() && self.database != "sqlite" {
            bail!(
                "--database {:?} is neither sqlite nor a PostgreSQL address (postgres://user:password@host/database, or host=... dbname=...)",
                crate::store::postgres::redacted(&self.database)
            );
        }
        if self.database_ca.is_some() && self.postgres().is_none() {
            bail!("--database-ca is for a PostgreSQL --database; SQLite is a local file");
        }
        if self.database_connections < 2 {
            bail!("--database-connections must be at least 2");
        }
        if self.node_lease_s == 0 {
            bail!("--node-lease-s must be at least 1");
        }
        if let Some(url) = &self.smtp_url {
            if let Err(e) = lettre::SmtpTransport::from_url(url) {
                bail!("--smtp-url {url:?}: {e}");
            }
        }
        if self.smtp_from.parse::<lettre::message::Mailbox>().is_err() {
            bail!("--smtp-from {:?} is not an email address", self.smtp_from);
        }
        if url::Url::parse(&self.sms_url).is_err() {
            bail!("--sms-url {:?} is not a URL", self.sms_url);
        }
        if !(self.anomaly_threshold > 0.0 && self.anomaly_threshold <= 1.0) {
            bail!("--anomaly-threshold must be a score above 0 and at most 1");
        }
        self.retention()?;
        self.http()?;
        Ok(())
    }

    /// The PostgreSQL server's address, when the records are kept there.
    pub fn postgres(&self) -> Option<&str> {
        let d = self.database.trim();
        let url = d.starts_with("postgres://") || d.starts_with("postgresql://");
        let pairs = d.contains('=') && (d.contains("host=") || d.contains("dbname="));
        (url || pairs).then_some(d)
    }

    /// The identity provider's key set, if one is configured (read now).
    pub fn jwks(&self) -> Result<Option<std::sync::Arc<crate::jwks::Jwks>>> {
        use anyhow::Context;
        if self.jwks_url.is_none() && self.jwks_file.is_none() {
            return Ok(None);
        }
        let config = crate::jwks::JwksConfig {
            url: self.jwks_url.clone(),
            file: self.jwks_file.clone(),
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            tenant_claim: self.jwt_tenant_claim.clone(),
        };
        Ok(Some(
            crate::jwks::Jwks::load(config).context("loading the JWKS")?,
        ))
    }

    /// Whether the API is served over TLS.
    pub fn tls_wanted(&self) -> bool {
        self.tls_cert.is_some() || self.tls_self_signed
    }

    /// The API's TLS, if asked for.
    pub fn tls(&self) -> Result<Option<crate::tls::Tls>> {
        use anyhow::Context;
        if self.tls_self_signed {
            let path = self.data_dir.join("tls").join("self-signed.pem");
            return Ok(Some(
                crate::tls::Tls::self_signed(&path).context("--tls-self-signed")?,
            ));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(
                crate::tls::Tls::from_files(cert, key).context("--tls-cert/--tls-key")?,
            )),
            _ => Ok(None),
        }
    }

    /// The HTTP server's timeouts and connection caps.
    pub fn http(&self) -> Result<crate::http::Limits> {
        let secs = |flag: &str, s: f64| -> Result<Duration> {
            if !s.is_finite() || s <= 0.0 || s > 86_400.0 {
                bail!("--{flag} must be a number of seconds between 0 and 86400");
            }
            Ok(Duration::from_secs_f64(s))
        };
        if self.max_connections_per_client == 0 || self.max_connections == 0 {
            bail!("--max-connections and --max-connections-per-client must be at least 1");
        }
        Ok(crate::http::Limits {
            header_timeout: secs("header-timeout-s", self.header_timeout_s)?,
            keep_alive_timeout: secs("keep-alive-s", self.keep_alive_s)?,
            write_timeout: secs("write-timeout-s", self.write_timeout_s)?,
            body_idle_timeout: secs("body-idle-timeout-s", self.body_idle_timeout_s)?,
            body_timeout: secs("body-timeout-s", self.body_timeout_s)?,
            max_connections_per_client: self.max_connections_per_client,
            max_connections: self.max_connections,
            ..crate::http::Limits::default()
        })
    }

    /// Largest request body.
    pub fn max_body_bytes(&self) -> u64 {
        self.max_body_mb.saturating_mul(1024 * 1024)
    }

    /// How long finished tasks and each resolution of rollups are kept.
    pub fn retention(&self) -> Result<Retention> {
        if !self.retention_days.is_finite() || self.retention_days <= 0.0 {
            bail!("--retention-days must be a positive number");
        }
        Ok(Retention {
            tasks: Duration::from_secs_f64(self.retention_days * 86_400.0),
            minute_rollups: keep("minute-rollups-days", self.minute_rollups_days)?,
            hour_rollups: keep("hour-rollups-days", self.hour_rollups_days)?,
            day_rollups: keep("day-rollups-days", self.day_rollups_days)?,
        })
    }

    /// The pool's configuration.
    pub fn pool(&self) -> PoolConfig {
        let defaults = PoolConfig::default();
        PoolConfig {
            stem_cells: self.stem_cells,
            max_waiting: self.max_waiting,
            max_sandboxes: self.max_sandboxes,
            max_memory_bytes: match self.pool_memory_mb {
                0 => defaults.max_memory_bytes,
                mb => mb.saturating_mul(1024 * 1024),
            },
            ..defaults
        }
    }

    /// The platform's configuration.
    pub fn platform(&self) -> PlatformConfig {
        let mut config = PlatformConfig::new(&self.data_dir);
        // Extracted code is plaintext: it lives in the state directory, outside the data
        // directory, rebuilt from the sealed archives after a restart.
        config.code_dir = self.state_dir.join("code");
        config.bounds.default_max_instances = self.concurrency;
        config.min_free_bytes = self.min_free_mb.saturating_mul(1024 * 1024);
        config.anomalies.threshold = self.anomaly_threshold;
        config.alerts = crate::platform::AlertConfig {
            interval: Duration::from_millis(self.alert_interval_ms.max(100)),
            channels: crate::alerts::deliver::ChannelConfig {
                allow_private_targets: self.alert_allow_private_targets,
                smtp_url: self.smtp_url.clone(),
                smtp_from: self.smtp_from.clone(),
                sms_url: self.sms_url.clone(),
                sms_account: self.sms_account.clone(),
                sms_token: self.sms_token.clone(),
                sms_from: self.sms_from.clone(),
                public_url: self
                    .public_url
                    .clone()
                    .unwrap_or_else(|| format!("http://{}", self.listen)),
                timeout: None,
            },
        };
        let rate = |per_second: f64, burst: f64| {
            (per_second > 0.0).then_some(crate::ratelimit::Limit {
                per_second,
                burst: burst.max(1.0),
            })
        };
        config.quotas = crate::platform::Quotas {
            invocations: rate(
                self.invocations_per_second,
                self.invocation_burst
                    .unwrap_or((self.invocations_per_second * 2.0).ceil()),
            ),
            deploys: rate(self.deploys_per_minute / 60.0, self.deploy_burst),
            max_functions: self.max_functions_per_tenant,
            max_code_bytes: self.max_code_mb_per_tenant.saturating_mul(1 << 20),
        };
        config
    }
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            default_timeout_ms: defaults::TIMEOUT_MS,
            max_timeout_ms: defaults::MAX_TIMEOUT_MS,
            default_memory_mb: defaults::MEMORY_MB,
            max_memory_mb: defaults::MAX_MEMORY_MB,
            default_cpu_millicores: defaults::CPU_MILLICORES,
            default_keep_warm_s: defaults::KEEP_WARM_S,
            default_max_instances: defaults::MAX_INSTANCES,
        }
    }
}

impl PlatformConfig {
    /// Defaults with code under `data_dir/code`.
    pub fn new(data_dir: &std::path::Path) -> Self {
        PlatformConfig {
            data_dir: data_dir.to_path_buf(),
            min_free_bytes: defaults::MIN_FREE_MB * 1024 * 1024,
            code_dir: data_dir.join("code"),
            bounds: Bounds::default(),
            archive: ArchiveLimits::default(),
            clock: Arc::new(crate::wall::SystemWall),
            anomalies: crate::anomalies::WatchConfig::default(),
            alerts: crate::platform::AlertConfig::default(),
            quotas: crate::platform::Quotas::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_flags_defaults() {
        let c = ServeConfig::with_defaults("/d".into());
        assert_eq!(c.workers, defaults::WORKERS);
        assert_eq!(c.queue_memory_mb, defaults::QUEUE_MEMORY_MB);
        assert_eq!(c.listen.to_string(), defaults::LISTEN);
        assert_eq!(c.pool().max_sandboxes, PoolConfig::default().max_sandboxes);
        assert_eq!(c.platform().bounds, Bounds::default());
        assert_eq!(
            c.platform().code_dir,
            PathBuf::from(defaults::STATE_DIR).join("code")
        );
        c.validate().unwrap();
    }

    #[test]
    fn a_queue_with_no_memory_is_refused() {
        let mut c = ServeConfig::with_defaults("/d".into());
        c.queue_memory_mb = 0;
        let refused = c.validate().unwrap_err().to_string();
        assert!(refused.contains("--queue-memory-mb"), "{refused}");
    }

    #[test]
    fn a_database_ca_needs_postgresql() {
        let mut c = ServeConfig::with_defaults("/d".into());
        c.database_ca = Some("/ca.pem".into());
        let refused = c.validate().unwrap_err().to_string();
        assert!(refused.contains("--database-ca"), "{refused}");
        c.database = "postgres://db.example/cloudfunc".into();
        c.validate().unwrap();
    }
}
