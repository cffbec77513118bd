//! TLS for the API, with rustls (no OpenSSL): TLS 1.2 and 1.3 only, rustls's own modern
//! cipher suites, HTTP/2 offered by ALPN beside HTTP/1.1. The certificate chain and key come
//! from PEM files and are read again on SIGHUP (new connections get the new pair; open ones
//! keep theirs), or a self-signed certificate for localhost is made at start for local use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{path} holds no usable PEM private key: {why}")]
    BadKey { path: PathBuf, why: String },
    #[error("the certificate and key were refused: {0}")]
    Refused(String),
    #[error("making a self-signed certificate failed: {0}")]
    Generate(String),
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, TlsError>;

/// Where the certificate comes from.
#[derive(Debug, Clone)]
enum Source {
    Files { cert: PathBuf, key: PathBuf },
    SelfSigned,
}

/// The server's TLS: what new connections are accepted with.
pub struct Tls {
    source: Source,
    current: RwLock<(TlsAcceptor, String)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("source", &self.source)
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl Tls {
    /// TLS with the chain in `cert` and the key in `key` (PEM).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Tls> {
        let (acceptor, fingerprint) = load(cert, key)?;
        Ok(Tls {
            source: Source::Files {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            },
            current: RwLock::new((acceptor, fingerprint)),
        })
    }

    /// TLS with a new self-signed certificate for `localhost`, `127.0.0.1` and `::1`; its PEM
    /// is written to `cert_out` (for clients: `--ca-cert`), the key stays in memory.
    pub fn self_signed(cert_out: &Path) -> Result<Tls> {
        let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        let made = rcgen::generate_simple_self_signed(names)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let cert_pem = made.cert.pem();
        if let Some(dir) = cert_out.parent() {
            std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(cert_out, &cert_pem).map_err(|source| TlsError::Write {
            path: cert_out.to_path_buf(),
            source,
        })?;
        let certs = vec![made.cert.der().clone()];
        let key = PrivateKeyDer::try_from(made.key_pair.serialize_der())
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let fingerprint = fingerprint(&certs[0]);
        Ok(Tls {
            source: Source::SelfSigned,
            current: RwLock::new((acceptor(certs, key)?, fingerprint)),
        })
    }

    /// Reads the certificate and key files again; on a mistake the pair in use stays.
    pub fn reload(&self) -> Result<()> {
        if let Source::Files { cert, key } = &self.source {
            let fresh = load(cert, key)?;
            *self.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        }
        Ok(())
    }

    /// What to accept a new connection with.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// The SHA-256 fingerprint of the leaf certificate in use, as colon-separated hex.
    pub fn fingerprint(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

/// The SHA-256 of a certificate, `AB:CD:...`.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn load(cert: &Path, key: &Path) -> Result<(TlsAcceptor, String)> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(std::result::Result::ok)
        .collect();
    let leaf = certs
        .first()
        .ok_or_else(|| TlsError::NoCertificate(cert.to_path_buf()))?;
    let fingerprint = fingerprint(leaf);
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| TlsError::BadKey {
        path: key.to_path_buf(),
        why: e.to_string(),
    })?;
    Ok((acceptor(certs, key_der)?, fingerprint))
}

fn acceptor(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Refused(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Refused(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
