//! Tokens from an identity provider: RS256 and ES256 JWTs verified against a JSON Web Key
//! Set, from a file or a URL (fetched at start, again every ten minutes, and when a token
//! names a key id the set lacks, at most every 5 s), with the issuer and audience checked
//! and the tenant read from a configurable claim. An RS256 or ES256 token is only ever checked
//! against a public key of its own kind, and an HS256 one only against the server's secret
//! ([`crate::auth::Keys`]): no algorithm confusion.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::Value;

use crate::auth::{AuthError, Caller};

/// Where the keys come from and what a token must say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JwksConfig {
    /// A JWKS document's URL (https, or http on loopback).
    pub url: Option<String>,
    /// A JWKS document's file.
    pub file: Option<PathBuf>,
    /// The `iss` a token must carry, if set.
    pub issuer: Option<String>,
    /// A value the token's `aud` (a string or a list) must hold, if set.
    pub audience: Option<String>,
    /// The claim naming the tenant.
    pub tenant_claim: String,
}

/// Why the key set could not be had.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("reading {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("fetching {0}: {1}")]
    Fetch(String, String),
    #[error("the key set is not a JWKS document: {0}")]
    Invalid(String),
}

/// One public key.
#[derive(Debug, Clone, PartialEq)]
enum Key {
    Rsa {
        kid: Option<String>,
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// P-256, as the uncompressed point `04 || x || y`.
    Ec { kid: Option<String>, point: Vec<u8> },
}

impl Key {
    fn kid(&self) -> Option<&str> {
        match self {
            Key::Rsa { kid, .. } | Key::Ec { kid, .. } => kid.as_deref(),
        }
    }
}

/// The verifier.
#[derive(Debug)]
pub struct Jwks {
    config: JwksConfig,
    keys: RwLock<Vec<Key>>,
    /// When the set was last fetched or asked to be.
    fetched: Mutex<Instant>,
}

/// How often the URL is read again in any case.
const REFRESH: Duration = Duration::from_secs(600);
/// The least time between two reads for an unknown key id.
const MIN_REFETCH: Duration = Duration::from_secs(5);

impl Jwks {
    /// Loads the key set now (a start-up error if it cannot be had).
    pub fn load(config: JwksConfig) -> Result<Arc<Jwks>, JwksError> {
        let keys = read(&config)?;
        Ok(Arc::new(Jwks {
            config,
            keys: RwLock::new(keys),
            fetched: Mutex::new(Instant::now()),
        }))
    }

    /// Reads the set again; on failure the set in use stays.
    pub fn refresh(&self) -> Result<usize, JwksError> {
        *self.fetched.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let keys = read(&self.config)?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(n)
    }

    /// Reads the set again every ten minutes (a URL's).
    pub fn refresh_periodically(self: &Arc<Self>) {
        if self.config.url.is_none() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH).await;
                let t = this.clone();
                match tokio::task::spawn_blocking(move || t.refresh()).await {
                    Ok(Ok(n)) => tracing::debug!(keys = n, "JWKS refreshed"),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %cloudfunc_sandbox::error_chain(&e), "the JWKS could not be refreshed; the keys in use stay")
                    }
                    Err(_) => {}
                }
            }
        });
    }

    /// Verifies an RS256 or ES256 token at `now` (Unix seconds).
    pub fn verify(self: &Arc<Self>, token: &str, now: i64) -> Result<Caller, AuthError> {
        let (header, claims, signed, signature) = split(token)?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let rsa = match alg {
            "RS256" => true,
            "ES256" => false,
            _ => return Err(AuthError::Algorithm),
        };
        let kid = header.get("kid").and_then(Value::as_str);
        let verified = {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            let candidates: Vec<&Key> = keys
                .iter()
                .filter(|k| matches!(k, Key::Rsa { .. }) == rsa)
                .filter(|k| kid.is_none() || k.kid() == kid)
                .collect();
            if candidates.is_empty() {
                None
            } else {
                Some(
                    candidates
                        .iter()
                        .any(|k| check(k, signed.as_bytes(), &signature)),
                )
            }
        };
        match verified {
            Some(true) => {}
            Some(false) => return Err(AuthError::Signature),
            None => {
                self.refetch_soon();
                return Err(AuthError::UnknownKey);
            }
        }
        self.claims(&claims, now)
    }

    /// A token named a key the set lacks: read a URL's set again, in the background.
    fn refetch_soon(self: &Arc<Self>) {
        if self.config.url.is_none() {
            return;
        }
        {
            let mut fetched = self.fetched.lock().unwrap_or_else(|e| e.into_inner());
            if fetched.elapsed() < MIN_REFETCH {
                return;
            }
            *fetched = Instant::now();
        }
        let this = self.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn_blocking(move || {
                if let Err(e) = this.refresh() {
                    tracing::warn!(error = %cloudfunc_sandbox::error_chain(&e), "the JWKS could not be read again for an unknown key id");
                }
            });
        }
    }

    fn claims(&self, claims: &Value, now: i64) -> Result<Caller, AuthError> {
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or(AuthError::NoExpiry)?;
        if exp <= now {
            return Err(AuthError::Expired);
        }
        if claims
            .get("nbf")
            .and_then(Value::as_i64)
            .is_some_and(|nbf| nbf > now)
        {
            return Err(AuthError::NotYetValid);
        }
        if let Some(iss) = &self.config.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(iss.as_str()) {
                return Err(AuthError::Issuer);
            }
        }
        if let Some(aud) = &self.config.audience {
            let holds = match claims.get("aud") {
                Some(Value::String(s)) => s == aud,
                Some(Value::Array(list)) => list.iter().any(|v| v.as_str() == Some(aud.as_str())),
                _ => false,
            };
            if !holds {
                return Err(AuthError::Audience);
            }
        }
        let tenant = claims
            .get(&self.config.tenant_claim)
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !crate::auth::valid_tenant(tenant) {
            return Err(AuthError::Subject);
        }
        Ok(Caller {
            tenant: tenant.to_string(),
            admin: claims.get("role").and_then(Value::as_str) == Some("admin"),
        })
    }
}

/// Verifies `token` against the key set in `jwks_text` (no issuer or audience), at `now`:
/// for fuzzing the parsers of both.
pub fn verify_with_set(token: &str, jwks_text: &str, now: i64) -> Result<Caller, AuthError> {
    let keys = parse(jwks_text).map_err(|_| AuthError::Malformed)?;
    let jwks = Arc::new(Jwks {
        config: JwksConfig {
            tenant_claim: "sub".into(),
            ..JwksConfig::default()
        },
        keys: RwLock::new(keys),
        fetched: Mutex::new(Instant::now()),
    });
    jwks.verify(token, now)
}

/// The `alg` a token's header names, if it has a readable header.
pub fn algorithm(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = URL_SAFE_NO_PAD.decode(header).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("alg")?.as_str().map(String::from)
}

/// A token's header and claims (parsed), its signing input and its signature.
fn split(token: &str) -> Result<(Value, Value, String, Vec<u8>), AuthError> {
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let json = |part: &str| -> Result<Value, AuthError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| AuthError::Malformed)?;
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)
    };
    let signature = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| AuthError::Malformed)?;
    Ok((json(h)?, json(p)?, format!("{h}.{p}"), signature))
}

fn check(key: &Key, signed: &[u8], signature: &[u8]) -> bool {
    use ring::signature;
    match key {
        Key::Rsa { n, e, .. } => signature::RsaPublicKeyComponents { n, e }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, signature)
            .is_ok(),
        Key::Ec { point, .. } => {
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(signed, signature)
                .is_ok()
        }
    }
}

fn read(config: &JwksConfig) -> Result<Vec<Key>, JwksError> {
    let text = match (&config.file, &config.url) {
        (Some(file), _) => {
            std::fs::read_to_string(file).map_err(|e| JwksError::Read(file.clone(), e))?
        }
        (None, Some(url)) => fetch(url)?,
        (None, None) => return Err(JwksError::Invalid("no --jwks-file or --jwks-url".into())),
    };
    let keys = parse(&text)?;
    if keys.is_empty() {
        return Err(JwksError::Invalid(
            "it holds no RSA or P-256 signing key".into(),
        ));
    }
    Ok(keys)
}

fn fetch(url: &str) -> Result<String, JwksError> {
    let parsed = url::Url::parse(url).map_err(|e| JwksError::Fetch(url.into(), e.to_string()))?;
    let loopback = matches!(parsed.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    if parsed.scheme() != "https" && !(parsed.scheme() == "http" && loopback) {
        return Err(JwksError::Fetch(
            url.into(),
            "a JWKS URL must be https (http only on loopback)".into(),
        ));
    }
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .new_agent();
    agent
        .get(url)
        .call()
        .map_err(|e| JwksError::Fetch(url.into(), e.to_string()))?
        .body_mut()
        .with_config()
        .limit(1 << 20)
        .read_to_string()
        .map_err(|e| JwksError::Fetch(url.into(), e.to_string()))
}

fn parse(text: &str) -> Result<Vec<Key>, JwksError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| JwksError::Invalid(e.to_string()))?;
    let list = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| JwksError::Invalid("no \"keys\" list".into()))?;
    let b64 = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
    };
    let mut keys = Vec::new();
    for k in list {
        // Keys for encryption, or for algorithms we do not take, are skipped.
        if k.get("use")
            .and_then(Value::as_str)
            .is_some_and(|u| u != "sig")
        {
            continue;
        }
        let kid = k.get("kid").and_then(Value::as_str).map(String::from);
        match k.get("kty").and_then(Value::as_str) {
            Some("RSA") => {
                if let (Some(n), Some(e)) = (b64(k.get("n")), b64(k.get("e"))) {
                    keys.push(Key::Rsa { kid, n, e });
                }
            }
            Some("EC") if k.get("crv").and_then(Value::as_str) == Some("P-256") => {
                if let (Some(x), Some(y)) = (b64(k.get("x")), b64(k.get("y"))) {
                    if x.len() == 32 && y.len() == 32 {
                        let mut point = vec![4u8];
                        point.extend(x);
                        point.extend(y);
                        keys.push(Key::Ec { kid, point });
                    }
                }
            }
            _ => {}
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn token(header: Value, claims: Value, sign: &dyn Fn(&[u8]) -> Vec<u8>) -> String {
        let input = format!(
            "{}.{}",
            b64(&serde_json::to_vec(&header).unwrap()),
            b64(&serde_json::to_vec(&claims).unwrap())
        );
        let sig = sign(input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }

    struct Ec(EcdsaKeyPair);
    impl Ec {
        fn new() -> Ec {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            Ec(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap())
        }
        fn jwk(&self, kid: &str) -> Value {
            let point = self.0.public_key().as_ref();
            json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "x": b64(&point[1..33]), "y": b64(&point[33..65])})
        }
        fn sign(&self, input: &[u8]) -> Vec<u8> {
            self.0
                .sign(&SystemRandom::new(), input)
                .unwrap()
                .as_ref()
                .to_vec()
        }
    }

    /// An RSA key from openssl (ring makes none); `None` where openssl is missing.
    fn rsa() -> Option<RsaKeyPair> {
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-outform",
                "DER",
            ])
            .output()
            .ok()?;
        let der = out.status.success().then_some(out.stdout)?;
        Some(
            RsaKeyPair::from_pkcs8(&der)
                .or_else(|_| RsaKeyPair::from_der(&der))
                .unwrap(),
        )
    }

    fn rsa_jwk(k: &RsaKeyPair, kid: &str) -> Value {
        let public = signature::RsaPublicKeyComponents::<Vec<u8>>::from(k.public());
        json!({"kty": "RSA", "kid": kid, "n": b64(&public.n), "e": b64(&public.e)})
    }

    fn rsa_sign(k: &RsaKeyPair, input: &[u8]) -> Vec<u8> {
        let mut sig = vec![0; k.public().modulus_len()];
        k.sign(
            &signature::RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            input,
            &mut sig,
        )
        .unwrap();
        sig
    }

    fn verifier(keys: Vec<Value>) -> Arc<Jwks> {
        Arc::new(Jwks {
            config: JwksConfig {
                issuer: Some("https://id.example.com/".into()),
                audience: Some("cloudfunc".into()),
                tenant_claim: "org".into(),
                ..JwksConfig::default()
            },
            keys: RwLock::new(parse(&json!({"keys": keys}).to_string()).unwrap()),
            fetched: Mutex::new(Instant::now()),
        })
    }

    const NOW: i64 = 1_800_000_000;

    fn claims() -> Value {
        json!({"iss": "https://id.example.com/", "aud": ["other", "cloudfunc"], "org": "acme", "exp": NOW + 60})
    }

    #[test]
    fn es256_and_rs256_tokens_verify_and_the_claims_are_checked() {
        let ec = Ec::new();
        let mut keys = vec![ec.jwk("ec1")];
        let rsa = rsa();
        if let Some(r) = &rsa {
            keys.push(rsa_jwk(r, "rsa1"));
        } else {
            println!("openssl is missing: RS256 is not checked");
        }
        let v = verifier(keys);
        let es = |claims: Value| {
            token(json!({"alg": "ES256", "kid": "ec1"}), claims, &|i| {
                ec.sign(i)
            })
        };
        let caller = v.verify(&es(claims()), NOW).unwrap();
        assert_eq!((caller.tenant.as_str(), caller.admin), ("acme", false));
        if let Some(r) = &rsa {
            let t = token(json!({"alg": "RS256", "kid": "rsa1"}), claims(), &|i| {
                rsa_sign(r, i)
            });
            assert_eq!(v.verify(&t, NOW).unwrap().tenant, "acme");
            // Without a kid, every key of its kind is tried.
            let t = token(json!({"alg": "RS256"}), claims(), &|i| rsa_sign(r, i));
            assert_eq!(v.verify(&t, NOW).unwrap().tenant, "acme");
        }
        let with = |k: &str, val: Value| {
            let mut c = claims();
            c[k] = val;
            c
        };
        assert_eq!(
            v.verify(&es(with("iss", json!("https://evil/"))), NOW)
                .unwrap_err(),
            AuthError::Issuer
        );
        assert_eq!(
            v.verify(&es(with("aud", json!("someone-else"))), NOW)
                .unwrap_err(),
            AuthError::Audience
        );
        assert_eq!(
            v.verify(&es(with("exp", json!(NOW - 1))), NOW).unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            v.verify(&es(with("nbf", json!(NOW + 30))), NOW)
                .unwrap_err(),
            AuthError::NotYetValid
        );
        assert_eq!(
            v.verify(&es(with("org", json!("../x"))), NOW).unwrap_err(),
            AuthError::Subject
        );
        let mut no_exp = claims();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(v.verify(&es(no_exp), NOW).unwrap_err(), AuthError::NoExpiry);
    }

    #[test]
    fn wrong_keys_and_algorithm_confusion_are_refused() {
        let (ec, other) = (Ec::new(), Ec::new());
        let v = verifier(vec![ec.jwk("ec1")]);
        // Signed by a key the set does not hold, under a kid it does.
        let t = token(json!({"alg": "ES256", "kid": "ec1"}), claims(), &|i| {
            other.sign(i)
        });
        assert_eq!(v.verify(&t, NOW).unwrap_err(), AuthError::Signature);
        // A kid the set lacks.
        let t = token(json!({"alg": "ES256", "kid": "nope"}), claims(), &|i| {
            ec.sign(i)
        });
        assert_eq!(v.verify(&t, NOW).unwrap_err(), AuthError::UnknownKey);
        // RS256 claimed over an EC key: no RSA key to check it against.
        let t = token(json!({"alg": "RS256", "kid": "ec1"}), claims(), &|i| {
            ec.sign(i)
        });
        assert_eq!(v.verify(&t, NOW).unwrap_err(), AuthError::UnknownKey);
        // HS256 keyed with the public key's bytes (the classic confusion), and none.
        let public = ec.jwk("ec1").to_string();
        let hs = token(json!({"alg": "HS256", "kid": "ec1"}), claims(), &|i| {
            use hmac::Mac;
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(public.as_bytes()).unwrap();
            mac.update(i);
            mac.finalize().into_bytes().to_vec()
        });
        assert_eq!(v.verify(&hs, NOW).unwrap_err(), AuthError::Algorithm);
        let keys = crate::auth::Keys::new(crate::auth::Keys::generate_secret().as_bytes()).unwrap();
        assert_eq!(keys.verify(&hs, NOW).unwrap_err(), AuthError::Signature);
        let none = token(json!({"alg": "none"}), claims(), &|_| Vec::new());
        assert_eq!(v.verify(&none, NOW).unwrap_err(), AuthError::Algorithm);
        assert_eq!(algorithm(&none).as_deref(), Some("none"));
    }

    #[test]
    fn a_key_set_parses_what_it_can_use() {
        let ec = Ec::new();
        let text = json!({"keys": [
            ec.jwk("a"),
            {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "oct", "k": "c2VjcmV0"},
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},
        ]})
        .to_string();
        assert_eq!(parse(&text).unwrap().len(), 1);
        assert!(parse("{}").is_err());
        assert!(parse("not json").is_err());
    }
}
