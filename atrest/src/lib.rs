//! Encryption at rest: everything stored that holds a tenant's data (code archives, task
//! payloads, results, errors and logs, chain runs' data, function settings with their
//! `env`, secrets) is sealed with XChaCha20-Poly1305 under a data key of its tenant.
//!
//! Envelope encryption: each tenant has a data key (several once re-encrypted: the newest
//! seals, the older ones still open what they sealed), stored only wrapped by the master key
//! ([`master`]), which lives outside the database: a key file (0600, made on first start) or
//! an environment variable. Rotating the master key rewraps the data keys and rewrites no
//! data; re-encrypting moves a tenant's records to a fresh data key.
//!
//! A sealed record ([`Sealer::seal`]) names its data key and is bound to its place (the
//! column and the row's id, as associated data): a flipped byte, or a ciphertext copied into
//! another record, fails its authentication tag and is reported for that record, never served
//! as garbage. This module knows no SQL: the store keeps the wrapped keys and the records.

pub mod master;
mod sealer;

pub use master::{KeySource, Keyring, MasterKey};
pub use sealer::{is_sealed, DataKey, Sealer, WrappedKey};

/// What can go wrong with keys and sealed records.
#[derive(Debug, thiserror::Error)]
pub enum AtRestError {
    /// The key file or variable is not a master key.
    #[error("{0}")]
    BadKey(String),
    /// The database holds data keys but no master key was given.
    #[error("the database holds data keys wrapped by master key {wanted}, but {source_desc} does not exist: restore the key file (or set CLOUDFUNC_MASTER_KEY); cloudfunc will not start with a new key and leave the data unreadable")]
    MissingKey { wanted: String, source_desc: String },
    /// A data key is wrapped by a master key the keyring does not hold.
    #[error("tenant {tenant}'s data key {id} is wrapped by master key {wanted}, which {source_desc} does not hold (it holds {held}): wrong key file?")]
    WrongKey {
        tenant: String,
        id: u32,
        wanted: String,
        held: String,
        source_desc: String,
    },
    /// A wrapped data key failed its authentication tag.
    #[error("tenant {tenant}'s data key {id} does not unwrap with master key {master}: the key or the database was tampered with")]
    KeyTampered {
        tenant: String,
        id: u32,
        master: String,
    },
    /// A record names a data key that is not stored.
    #[error("it is sealed by data key {0}, which is not stored")]
    UnknownDataKey(u32),
    /// A record is not in the sealed format.
    #[error("it is not a sealed record ({0})")]
    Malformed(&'static str),
    /// A record failed its authentication tag.
    #[error("it failed its integrity check (tampered with, or damaged on disk)")]
    Tampered,
    /// The key file could not be read or written.
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Rotation needs a key file to write.
    #[error("the master key comes from {0}, which cloudfunc cannot rewrite: set the new key in front of the old one there (comma-separated) and restart; the data keys are rewrapped at start")]
    NotRotatable(String),
}
