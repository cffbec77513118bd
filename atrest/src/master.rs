//! Master keys: where they come from, how they are written, and how they wrap data keys.
//!
//! A key is 32 random bytes, written `cfk1:` and base64. A key file holds one key per line,
//! the first being the one that wraps; the others are kept only while data keys wrapped by
//! them are rewrapped (a rotation cut short by a crash leaves both, and the next start
//! finishes it). The environment variable holds the same list, comma-separated.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use sha2::Digest as _;

use super::AtRestError;

/// The key file's name in the data directory.
pub const KEY_FILE: &str = "master.key";

/// The environment variable that may hold the master key(s) instead of the file.
pub const KEY_ENV: &str = "CLOUDFUNC_MASTER_KEY";

const PREFIX: &str = "cfk1:";
const NONCE: usize = 24;

/// One master key.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    cipher: XChaCha20Poly1305,
    bytes: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

impl MasterKey {
    /// A new random key.
    pub fn generate() -> MasterKey {
        MasterKey::from_bytes(XChaCha20Poly1305::generate_key(&mut OsRng).into())
    }

    fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        let digest = sha2::Sha256::new()
            .chain_update(b"cloudfunc master key id\0")
            .chain_update(bytes)
            .finalize();
        let id = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        MasterKey {
            id,
            cipher: XChaCha20Poly1305::new(Key::from_slice(&bytes)),
            bytes,
        }
    }

    /// Reads `cfk1:<base64 of 32 bytes>`.
    pub fn parse(text: &str) -> Result<MasterKey, AtRestError> {
        let bad = |why: &str| {
            AtRestError::BadKey(format!("not a master key ({why}): expected cfk1: and the base64 of 32 bytes, as `cloudfunc keys generate` writes"))
        };
        let b64 = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("no cfk1: prefix"))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad("not base64"))?;
        let bytes: [u8; 32] = raw.try_into().map_err(|_| bad("not 32 bytes"))?;
        Ok(MasterKey::from_bytes(bytes))
    }

    /// The key as a line of a key file.
    pub fn encode(&self) -> String {
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(self.bytes)
        )
    }

    /// A short fingerprint that names the key (in the database, beside what it wrapped).
    pub fn id(&self) -> &str {
        &self.id
    }

    fn aad(tenant: &str, data_key: u32) -> Vec<u8> {
        format!("cloudfunc data key\0{tenant}\0{data_key}").into_bytes()
    }

    /// Wraps data key `id` of `tenant`.
    pub(super) fn wrap(&self, tenant: &str, id: u32, key: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = MasterKey::aad(tenant, id);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: key,
                    aad: &aad,
                },
            )
            .expect("XChaCha20-Poly1305 seals any message of this size");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// Unwraps what [`MasterKey::wrap`] wrapped; `None` if the tag does not match.
    pub(super) fn unwrap(&self, tenant: &str, id: u32, wrapped: &[u8]) -> Option<Vec<u8>> {
        if wrapped.len() < NONCE {
            return None;
        }
        let (nonce, sealed) = wrapped.split_at(NONCE);
        let aad = MasterKey::aad(tenant, id);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .ok()
    }
}

/// Where the master keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A key file (made, 0600, when missing and nothing needs an older key).
    File(PathBuf),
    /// The value of [`KEY_ENV`].
    Env(String),
    /// A key made in memory and lost at exit (tests of the store).
    Ephemeral,
}

impl KeySource {
    /// The file in `data_dir`, unless `env` (the variable's value) gives the keys.
    pub fn of(data_dir: &Path, env: Option<String>) -> KeySource {
        match env {
            Some(v) if !v.trim().is_empty() => KeySource::Env(v),
            _ => KeySource::File(data_dir.join(KEY_FILE)),
        }
    }

    /// The source, for messages.
    pub fn describe(&self) -> String {
        match self {
            KeySource::File(p) => format!("the key file {}", p.display()),
            KeySource::Env(_) => format!("the variable {KEY_ENV}"),
            KeySource::Ephemeral => "the in-memory key".into(),
        }
    }
}

/// The master keys in use: the first wraps, the rest only unwrap.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<MasterKey>,
    source: KeySource,
}

impl Keyring {
    /// The keys of `source`. A missing key file is made with a new key, unless `needed`
    /// names a master key that existing data keys are wrapped by: then it is an error.
    pub fn open(source: KeySource, needed: Option<&str>) -> Result<Keyring, AtRestError> {
        let keys = match &source {
            KeySource::Env(value) => parse_list(value.split(','))?,
            KeySource::Ephemeral => vec![MasterKey::generate()],
            KeySource::File(path) => match std::fs::read_to_string(path) {
                Ok(text) => parse_list(text.lines())?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Some(wanted) = needed {
                        return Err(AtRestError::MissingKey {
                            wanted: wanted.to_string(),
                            source_desc: source.describe(),
                        });
                    }
                    let key = MasterKey::generate();
                    write_keys(path, std::slice::from_ref(&key))?;
                    tracing::info!(key = key.id(), file = %path.display(), "made a new master key");
                    vec![key]
                }
                Err(e) => {
                    return Err(AtRestError::Io {
                        what: "reading",
                        path: path.display().to_string(),
                        source: e,
                    })
                }
            },
        };
        if keys.is_empty() {
            return Err(AtRestError::BadKey(format!(
                "{} holds no key",
                source.describe()
            )));
        }
        Ok(Keyring { keys, source })
    }

    /// A keyring of one given key (tests).
    pub fn of(key: MasterKey) -> Keyring {
        Keyring {
            keys: vec![key],
            source: KeySource::Ephemeral,
        }
    }

    /// The key that wraps.
    pub fn current(&self) -> &MasterKey {
        &self.keys[0]
    }

    /// The key named `id`.
    pub fn find(&self, id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The ids held, for messages.
    pub fn ids(&self) -> String {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.id()).collect();
        ids.join(", ")
    }

    /// Where the keys come from.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// Puts a new key in front, written to the key file before it wraps anything; the old
    /// ones stay until [`Keyring::forget_old`].
    pub fn rotate(&mut self) -> Result<MasterKey, AtRestError> {
        let key = MasterKey::generate();
        let mut keys = vec![key.clone()];
        keys.extend(self.keys.iter().cloned());
        match &self.source {
            KeySource::File(path) => write_keys(path, &keys)?,
            KeySource::Ephemeral => {}
            KeySource::Env(_) => return Err(AtRestError::NotRotatable(self.source.describe())),
        }
        self.keys = keys;
        Ok(key)
    }

    /// Keeps only the current key (once nothing is wrapped by the others).
    pub fn forget_old(&mut self) -> Result<(), AtRestError> {
        if self.keys.len() == 1 {
            return Ok(());
        }
        let keys = vec![self.keys[0].clone()];
        if let KeySource::File(path) = &self.source {
            write_keys(path, &keys)?;
        }
        self.keys = keys;
        Ok(())
    }
}

fn parse_list<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Vec<MasterKey>, AtRestError> {
    lines
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(MasterKey::parse)
        .collect()
}

/// Replaces the key file, 0600, through a synced temporary file: a crash leaves the old
/// file or the new one.
fn write_keys(path: &Path, keys: &[MasterKey]) -> Result<(), AtRestError> {
    let io = |what, source| AtRestError::Io {
        what,
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("key.new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("writing", e))?;
    let mut text = String::from(
        "# cloudfunc master keys: the first wraps the data keys. Keep a copy apart from the data.\n",
    );
    for k in keys {
        text.push_str(&k.encode());
        text.push('\n');
    }
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io("writing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("replacing", e))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_survives_its_text_and_bad_text_is_refused() {
        let k = MasterKey::generate();
        let back = MasterKey::parse(&k.encode()).unwrap();
        assert_eq!(back.id(), k.id());
        assert_eq!(k.id().len(), 12);
        for bad in ["", "cfk1:", "cfk1:!!!", "abc", "cfk1:AAAA"] {
            assert!(MasterKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wrapping_is_bound_to_the_tenant_and_the_key_id() {
        let k = MasterKey::generate();
        let dek = [7u8; 32];
        let w = k.wrap("alice", 5, &dek);
        assert_eq!(k.unwrap("alice", 5, &w).unwrap(), dek);
        assert!(k.unwrap("bob", 5, &w).is_none());
        assert!(k.unwrap("alice", 6, &w).is_none());
        assert!(MasterKey::generate().unwrap("alice", 5, &w).is_none());
        let mut flipped = w.clone();
        flipped[30] ^= 1;
        assert!(k.unwrap("alice", 5, &flipped).is_none());
    }

    #[test]
    fn the_file_is_made_0600_rotated_and_a_missing_one_is_refused_when_needed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let source = KeySource::File(path.clone());
        assert!(matches!(
            Keyring::open(source.clone(), Some("abc")),
            Err(AtRestError::MissingKey { .. })
        ));
        assert!(!path.exists(), "no key made when one is needed");
        let mut ring = Keyring::open(source.clone(), None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let first = ring.current().id().to_string();
        assert_eq!(
            Keyring::open(source.clone(), None).unwrap().current().id(),
            first
        );
        let new = ring.rotate().unwrap();
        let again = Keyring::open(source.clone(), None).unwrap();
        assert_eq!(again.current().id(), new.id());
        assert!(
            again.find(&first).is_some(),
            "the old key stays until forgotten"
        );
        ring.forget_old().unwrap();
        let again = Keyring::open(source, None).unwrap();
        assert!(again.find(&first).is_none());
        assert_eq!(again.ids(), new.id());
    }

    #[test]
    fn the_variable_holds_a_list_and_cannot_be_rotated() {
        let (a, b) = (MasterKey::generate(), MasterKey::generate());
        let mut ring = Keyring::open(
            KeySource::Env(format!("{}, {}", a.encode(), b.encode())),
            None,
        )
        .unwrap();
        assert_eq!(ring.current().id(), a.id());
        assert!(ring.find(b.id()).is_some());
        assert!(matches!(ring.rotate(), Err(AtRestError::NotRotatable(_))));
        assert!(Keyring::open(KeySource::Env("nope".into()), None).is_err());
    }
}
