//! Bearer tokens: HS256 JWTs whose subject is the tenant.
//!
//! Verification is deliberately narrow: the header must say `HS256` (so `alg: none` and
//! algorithm confusion are refused), the signature is checked in constant time, and `exp` is
//! required and must be in the future. A `role` of `admin` sees every tenant.

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The shortest secret the server accepts.
pub const MIN_SECRET_BYTES: usize = 32;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The tenant (the token's `sub`).
    pub tenant: String,
    /// Whether the caller may see every tenant.
    pub admin: bool,
}

impl Caller {
    /// The tenant filter for the store: `None` for an admin.
    pub fn scope(&self) -> Option<&str> {
        (!self.admin).then_some(self.tenant.as_str())
    }
}

/// The claims cloudfunc reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "missing bearer token: send 'Authorization: Bearer <token>' (cloudfunc token mints one)"
    )]
    Missing,
    #[error("the token is malformed")]
    Malformed,
    #[error(
        "the token's algorithm must be HS256 (or RS256 or ES256 with --jwks-file or --jwks-url)"
    )]
    Algorithm,
    #[error("the token's signature is wrong")]
    Signature,
    #[error("the token has no expiry (exp)")]
    NoExpiry,
    #[error("the token has expired")]
    Expired,
    #[error("the token's subject (tenant) is empty or invalid")]
    Subject,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's issuer (iss) is not the one this server trusts")]
    Issuer,
    #[error("the token's audience (aud) does not name this server")]
    Audience,
    #[error("the token's signing key (kid) is not in the key set; retry in a moment if it was just rotated")]
    UnknownKey,
}

/// Whether `tenant` is a usable tenant name (a token's subject).
pub fn valid_tenant(tenant: &str) -> bool {
    (1..=128).contains(&tenant.len())
        && tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.@".contains(c))
}

/// Signs and verifies tokens with one secret.
#[derive(Clone)]
pub struct Keys {
    /// HMAC keyed with the secret once (its padded key hashed), cloned for each token.
    keyed: HmacSha256,
    /// Tokens this secret verified lately (shared by the clones).
    remembered: Arc<Remembered>,
}

/// The most tokens remembered; the memory is emptied when full.
const REMEMBERED: usize = 4096;

/// Tokens verified lately, with who they name and when they expire: a client sends the same
/// token with every call, and decoding, parsing and checking it again each time was about
/// 4 % of a warm call's CPU. Only tokens that passed every check are here, and their expiry
/// is checked at each use. The secret never changes while the server runs, so nothing
/// remembered can go stale but by expiring.
#[derive(Default)]
struct Remembered {
    tokens: parking_lot::Mutex<HashMap<Box<str>, (Caller, i64)>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(<secret>)")
    }
}

/// Why a secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the JWT secret must be at least {MIN_SECRET_BYTES} bytes and not a repeated character")]
pub struct WeakSecret;

impl Keys {
    /// Keys from a secret, refusing empty or weak ones.
    pub fn new(secret: &[u8]) -> Result<Keys, WeakSecret> {
        let trimmed = secret.trim_ascii();
        let distinct = trimmed
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len();
        if trimmed.len() < MIN_SECRET_BYTES || distinct < 8 {
            return Err(WeakSecret);
        }
        Ok(Keys {
            keyed: HmacSha256::new_from_slice(trimmed).expect("HMAC takes keys of any length"),
            remembered: Arc::default(),
        })
    }

    /// A fresh random secret, hex-encoded (what the server writes on first start).
    pub fn generate_secret() -> String {
        let bytes: [u8; 32] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn mac(&self) -> HmacSha256 {
        self.keyed.clone()
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialise"));
        let signing_input = format!("{header}.{payload}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signing_input}.{sig}")
    }

    /// A token for `tenant` valid for `ttl_secs`.
    pub fn mint(&self, tenant: &str, admin: bool, ttl_secs: i64) -> String {
        let now = crate::model::now_ms() / 1000;
        self.sign(&Claims {
            sub: tenant.to_string(),
            exp: now + ttl_secs,
            iat: Some(now),
            role: admin.then(|| "admin".to_string()),
        })
    }

    /// Verifies a token at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<Caller, AuthError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(h)
                .map_err(|_| AuthError::Malformed)?,
        )
        .map_err(|_| AuthError::Malformed)?;
        if header.get("alg").and_then(|a| a.as_str()) != Some("HS256") {
            return Err(AuthError::Algorithm);
        }
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| AuthError::Malformed)?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(p.as_bytes());
        mac.verify_slice(&sig).map_err(|_| AuthError::Signature)?;
        let claims: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(p)
                .map_err(|_| AuthError::Malformed)?,
        )
        .map_err(|_| AuthError::Malformed)?;
        let exp = claims
            .get("exp")
            .ok_or(AuthError::NoExpiry)?
            .as_i64()
            .ok_or(AuthError::NoExpiry)?;
        if exp <= now {
            return Err(AuthError::Expired);
        }
        let sub = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .unwrap_or_default();
        if !valid_tenant(sub) {
            return Err(AuthError::Subject);
        }
        let caller = Caller {
            tenant: sub.to_string(),
            admin: claims.get("role").and_then(|r| r.as_str()) == Some("admin"),
        };
        let mut tokens = self.remembered.tokens.lock();
        if tokens.len() >= REMEMBERED {
            tokens.clear();
        }
        tokens.insert(token.into(), (caller.clone(), exp));
        Ok(caller)
    }

    /// The caller of a token [`Keys::verify`] accepted lately, while it has not expired at
    /// `now` (Unix seconds); `None` for any other token, which must then be verified.
    pub fn remembered(&self, token: &str, now: i64) -> Option<Caller> {
        match self.remembered.tokens.lock().get(token) {
            Some((caller, exp)) if *exp > now => Some(caller.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(Keys::generate_secret().as_bytes()).unwrap()
    }

    #[test]
    fn minted_tokens_verify() {
        let k = keys();
        let now = crate::model::now_ms() / 1000;
        let caller = k.verify(&k.mint("alice", false, 60), now).unwrap();
        assert_eq!(
            caller,
            Caller {
                tenant: "alice".into(),
                admin: false
            }
        );
        assert!(k.verify(&k.mint("root", true, 60), now).unwrap().admin);
    }

    #[test]
    fn bad_tokens_are_refused() {
        let k = keys();
        let now = crate::model::now_ms() / 1000;
        assert_eq!(
            k.verify(&k.mint("alice", false, -1), now),
            Err(AuthError::Expired)
        );
        assert_eq!(
            keys().verify(&k.mint("alice", false, 60), now),
            Err(AuthError::Signature)
        );
        // alg=none with no signature.
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let payload = URL_SAFE_NO_PAD.encode(format!(r#"{{"sub":"alice","exp":{}}}"#, now + 60));
        assert_eq!(
            k.verify(&format!("{header}.{payload}."), now),
            Err(AuthError::Algorithm)
        );
        // No exp.
        let t = k.sign(&Claims {
            sub: "alice".into(),
            exp: 0,
            iat: None,
            role: None,
        });
        let (h, rest) = t.split_once('.').unwrap();
        let _ = rest;
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"alice"}"#);
        let mut mac = k.mac();
        mac.update(format!("{h}.{payload}").as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        assert_eq!(
            k.verify(&format!("{h}.{payload}.{sig}"), now),
            Err(AuthError::NoExpiry)
        );
        assert_eq!(k.verify("not-a-token", now), Err(AuthError::Malformed));
        assert_eq!(
            k.verify(&k.mint("../x", false, 60), now),
            Err(AuthError::Subject)
        );
    }

    #[test]
    fn verified_tokens_are_remembered_until_they_expire_and_no_others() {
        let k = keys();
        let now = crate::model::now_ms() / 1000;
        let token = k.mint("alice", true, 60);
        assert_eq!(k.remembered(&token, now), None);
        let caller = k.verify(&token, now).unwrap();
        assert_eq!(k.remembered(&token, now), Some(caller.clone()));
        // A clone shares the memory; the expiry still holds.
        assert_eq!(k.clone().remembered(&token, now + 59), Some(caller));
        assert_eq!(k.remembered(&token, now + 60), None);
        // Refused tokens are not remembered: another secret's, an expired one.
        let other = keys().mint("alice", false, 60);
        assert!(k.verify(&other, now).is_err());
        assert_eq!(k.remembered(&other, now), None);
        let expired = k.mint("bob", false, -1);
        assert!(k.verify(&expired, now).is_err());
        assert_eq!(k.remembered(&expired, now - 10), None);
        // Bounded: the memory is emptied when full.
        for i in 0..=REMEMBERED {
            k.verify(&k.mint(&format!("t{i}"), false, 60), now).unwrap();
        }
        assert!(k.remembered.tokens.lock().len() <= REMEMBERED);
    }

    #[test]
    fn weak_secrets_are_refused() {
        assert!(Keys::new(b"").is_err());
        assert!(Keys::new(b"short").is_err());
        assert!(Keys::new(&[b'a'; 64]).is_err());
        assert!(Keys::new(Keys::generate_secret().as_bytes()).is_ok());
    }
}
