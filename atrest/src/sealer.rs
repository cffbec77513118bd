//! Data keys and sealed records.
//!
//! A sealed record is `CF 01`, the data key's id (4 bytes, little-endian), a random 24-byte
//! nonce (XChaCha20's extended nonce: random nonces stay safe for any number of records under
//! one key), then the ciphertext and its 16-byte tag. The associated data is the record's place
//! (column and row id), so a record cannot be moved to another place unnoticed.

use std::collections::HashMap;
use std::sync::Arc;

use chacha20poly1305::aead::{Aead, KeyInit, OsRng, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use parking_lot::RwLock;

use super::{AtRestError, Keyring};

const MAGIC: [u8; 2] = [0xCF, 0x01];
const HEADER: usize = 2 + 4 + 24;
const TAG: usize = 16;

/// One tenant's data key, unwrapped.
pub struct DataKey {
    id: u32,
    tenant: String,
    cipher: XChaCha20Poly1305,
    bytes: [u8; 32],
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataKey({} of {})", self.id, self.tenant)
    }
}

impl DataKey {
    /// Its id, as records name it.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Whose it is.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    fn new(id: u32, tenant: &str, bytes: [u8; 32]) -> DataKey {
        DataKey {
            id,
            tenant: tenant.to_string(),
            cipher: XChaCha20Poly1305::new(Key::from_slice(&bytes)),
            bytes,
        }
    }
}

/// A data key as stored: wrapped by the master key `master`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub id: u32,
    pub tenant: String,
    /// The id of the master key that wrapped it.
    pub master: String,
    pub wrapped: Vec<u8>,
    /// Replaced by a newer key of its tenant: it opens, it no longer seals.
    pub retired: bool,
}

#[derive(Debug, Default)]
struct Keys {
    by_id: HashMap<u32, Arc<DataKey>>,
    current: HashMap<String, Arc<DataKey>>,
}

/// Seals and opens records with the tenants' data keys, which it holds unwrapped.
#[derive(Debug)]
pub struct Sealer {
    keyring: RwLock<Keyring>,
    keys: RwLock<Keys>,
    seal: bool,
}

impl Sealer {
    /// A sealer wrapping with `keyring`; `seal: false` writes new records in plaintext (for
    /// measuring what sealing costs) and still opens sealed ones.
    pub fn new(keyring: Keyring, seal: bool) -> Sealer {
        Sealer {
            keyring: RwLock::new(keyring),
            keys: RwLock::new(Keys::default()),
            seal,
        }
    }

    /// Whether new records are sealed.
    pub fn seals(&self) -> bool {
        self.seal
    }

    /// The id of the master key that wraps.
    pub fn master_id(&self) -> String {
        self.keyring.read().current().id().to_string()
    }

    /// The keyring, for rotation.
    pub fn keyring(&self) -> parking_lot::RwLockWriteGuard<'_, Keyring> {
        self.keyring.write()
    }

    /// Unwraps the stored data keys and holds them. Returns those wrapped by a master key
    /// other than the current one, rewrapped by it, for the store to write back.
    pub fn admit(&self, stored: &[WrappedKey]) -> Result<Vec<WrappedKey>, AtRestError> {
        let ring = self.keyring.read();
        let mut rewrapped = Vec::new();
        let mut keys = self.keys.write();
        for w in stored {
            let master = ring.find(&w.master).ok_or_else(|| AtRestError::WrongKey {
                tenant: w.tenant.clone(),
                id: w.id,
                wanted: w.master.clone(),
                held: ring.ids(),
                source_desc: ring.source().describe(),
            })?;
            let raw = master.unwrap(&w.tenant, w.id, &w.wrapped).ok_or_else(|| {
                AtRestError::KeyTampered {
                    tenant: w.tenant.clone(),
                    id: w.id,
                    master: w.master.clone(),
                }
            })?;
            let bytes: [u8; 32] = raw.try_into().map_err(|_| AtRestError::KeyTampered {
                tenant: w.tenant.clone(),
                id: w.id,
                master: w.master.clone(),
            })?;
            let key = Arc::new(DataKey::new(w.id, &w.tenant, bytes));
            if w.master != ring.current().id() {
                rewrapped.push(WrappedKey {
                    master: ring.current().id().to_string(),
                    wrapped: ring.current().wrap(&w.tenant, w.id, &key.bytes),
                    ..w.clone()
                });
            }
            keys.by_id.insert(w.id, key.clone());
            if !w.retired {
                keys.current.insert(w.tenant.clone(), key);
            }
        }
        Ok(rewrapped)
    }

    /// Every held data key rewrapped by the current master key.
    pub fn rewrap_all(&self) -> Vec<WrappedKey> {
        let ring = self.keyring.read();
        let keys = self.keys.read();
        let mut out: Vec<WrappedKey> = keys
            .by_id
            .values()
            .map(|k| WrappedKey {
                id: k.id,
                tenant: k.tenant.clone(),
                master: ring.current().id().to_string(),
                wrapped: ring.current().wrap(&k.tenant, k.id, &k.bytes),
                retired: keys.current.get(&k.tenant).is_none_or(|c| c.id != k.id),
            })
            .collect();
        out.sort_by_key(|w| w.id);
        out
    }

    /// The data key that seals `tenant`'s records, if it has one yet.
    pub fn current(&self, tenant: &str) -> Option<Arc<DataKey>> {
        self.keys.read().current.get(tenant).cloned()
    }

    /// A new data key for `tenant` (an id no held key has), wrapped for storing. It seals
    /// nothing until [`Sealer::install`]ed, which the store does once it is committed.
    pub fn make_key(&self, tenant: &str) -> (Arc<DataKey>, WrappedKey) {
        let keys = self.keys.read();
        let id = loop {
            let id = rand::random::<u32>();
            if id != 0 && !keys.by_id.contains_key(&id) {
                break id;
            }
        };
        let bytes: [u8; 32] = XChaCha20Poly1305::generate_key(&mut OsRng).into();
        let key = Arc::new(DataKey::new(id, tenant, bytes));
        let ring = self.keyring.read();
        let wrapped = WrappedKey {
            id,
            tenant: tenant.to_string(),
            master: ring.current().id().to_string(),
            wrapped: ring.current().wrap(tenant, id, &bytes),
            retired: false,
        };
        (key, wrapped)
    }

    /// Holds `key` (stored now) as its tenant's sealing key.
    pub fn install(&self, key: Arc<DataKey>) {
        let mut keys = self.keys.write();
        keys.by_id.insert(key.id, key.clone());
        keys.current.insert(key.tenant.clone(), key);
    }

    /// Lets go of data key `id` (no record names it any more).
    pub fn forget(&self, id: u32) {
        let mut keys = self.keys.write();
        if let Some(k) = keys.by_id.remove(&id) {
            if keys.current.get(&k.tenant).is_some_and(|c| c.id == id) {
                keys.current.remove(&k.tenant);
            }
        }
    }

    /// Seals `plaintext` with `key`, bound to `place` (column and row).
    pub fn seal(&self, key: &DataKey, place: (&str, &str), plaintext: &[u8]) -> Vec<u8> {
        // From the thread's CSPRNG (ChaCha, seeded and reseeded from the OS): a system call
        // per record for 24 bytes cost more than the sealing itself on a warm call's record.
        let nonce = XNonce::from(rand::random::<[u8; 24]>());
        let aad = aad(place);
        let sealed = key
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("XChaCha20-Poly1305 seals any record that fits in memory");
        let mut out = Vec::with_capacity(HEADER + sealed.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&key.id.to_le_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a record [`Sealer::seal`] sealed at `place`.
    pub fn open(&self, sealed: &[u8], place: (&str, &str)) -> Result<Vec<u8>, AtRestError> {
        let id = key_of(sealed)?;
        let key = self
            .keys
            .read()
            .by_id
            .get(&id)
            .cloned()
            .ok_or(AtRestError::UnknownDataKey(id))?;
        let aad = aad(place);
        key.cipher
            .decrypt(
                XNonce::from_slice(&sealed[6..HEADER]),
                Payload {
                    msg: &sealed[HEADER..],
                    aad: &aad,
                },
            )
            .map_err(|_| AtRestError::Tampered)
    }
}

/// Whether `bytes` are in the sealed format (plaintext UTF-8 never is: its first byte cannot
/// be followed by the format's second).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(&MAGIC)
}

/// The data key a sealed record names.
pub fn key_of(sealed: &[u8]) -> Result<u32, AtRestError> {
    if sealed.len() < HEADER + TAG {
        return Err(AtRestError::Malformed("too short"));
    }
    if sealed[..2] != MAGIC {
        return Err(AtRestError::Malformed("unknown format"));
    }
    Ok(u32::from_le_bytes([
        sealed[2], sealed[3], sealed[4], sealed[5],
    ]))
}

fn aad((column, row): (&str, &str)) -> Vec<u8> {
    let mut aad = Vec::with_capacity(column.len() + 1 + row.len());
    aad.extend_from_slice(column.as_bytes());
    aad.push(0);
    aad.extend_from_slice(row.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::super::MasterKey;
    use super::*;

    fn sealer() -> Sealer {
        Sealer::new(Keyring::of(MasterKey::generate()), true)
    }

    #[test]
    fn a_record_opens_only_at_its_place_and_unaltered() {
        let s = sealer();
        let (key, _) = s.make_key("alice");
        s.install(key.clone());
        let sealed = s.seal(&key, ("tasks.payload", "tsk_1"), b"{\"secret\":1}");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            s.open(&sealed, ("tasks.payload", "tsk_1")).unwrap(),
            b"{\"secret\":1}"
        );
        assert!(matches!(
            s.open(&sealed, ("tasks.payload", "tsk_2")),
            Err(AtRestError::Tampered)
        ));
        assert!(matches!(
            s.open(&sealed, ("tasks.result", "tsk_1")),
            Err(AtRestError::Tampered)
        ));
        for i in [6, 20, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 0x40;
            assert!(
                matches!(
                    s.open(&bad, ("tasks.payload", "tsk_1")),
                    Err(AtRestError::Tampered)
                ),
                "byte {i}"
            );
        }
        let mut other_key = sealed.clone();
        other_key[2] ^= 1;
        assert!(matches!(
            s.open(&other_key, ("tasks.payload", "tsk_1")),
            Err(AtRestError::UnknownDataKey(_))
        ));
        assert!(matches!(
            s.open(b"plain", ("tasks.payload", "tsk_1")),
            Err(AtRestError::Malformed(_))
        ));
        // The same plaintext twice seals differently.
        assert_ne!(
            sealed,
            s.seal(&key, ("tasks.payload", "tsk_1"), b"{\"secret\":1}")
        );
    }

    #[test]
    fn stored_keys_are_admitted_by_their_master_key_and_rewrapped_after_a_rotation() {
        let old = MasterKey::generate();
        let s = Sealer::new(Keyring::of(old.clone()), true);
        let (key, wrapped) = s.make_key("alice");
        s.install(key.clone());
        let sealed = s.seal(&key, ("c", "r"), b"data");

        // Another process with the same master key opens it.
        let again = Sealer::new(Keyring::of(old.clone()), true);
        assert!(again
            .admit(std::slice::from_ref(&wrapped))
            .unwrap()
            .is_empty());
        assert_eq!(again.open(&sealed, ("c", "r")).unwrap(), b"data");
        assert_eq!(again.current("alice").unwrap().id(), key.id());

        // With the wrong master key it is a clear error, not garbage.
        let wrong = Sealer::new(Keyring::of(MasterKey::generate()), true);
        assert!(matches!(
            wrong.admit(std::slice::from_ref(&wrapped)),
            Err(AtRestError::WrongKey { .. })
        ));

        // After a rotation the key is rewrapped by the new master key and still opens.
        let mut ring = Keyring::of(old.clone());
        let new = ring.rotate().unwrap();
        let rotated = Sealer::new(ring, true);
        let rewrapped = rotated.admit(std::slice::from_ref(&wrapped)).unwrap();
        assert_eq!(rewrapped.len(), 1);
        assert_eq!(rewrapped[0].master, new.id());
        let only_new = Sealer::new(Keyring::of(new), true);
        only_new.admit(&rewrapped).unwrap();
        assert_eq!(only_new.open(&sealed, ("c", "r")).unwrap(), b"data");

        // A tampered wrapped key is refused.
        let mut bad = wrapped.clone();
        bad.wrapped[30] ^= 1;
        assert!(matches!(
            Sealer::new(Keyring::of(old), true).admit(&[bad]),
            Err(AtRestError::KeyTampered { .. })
        ));
    }
}
