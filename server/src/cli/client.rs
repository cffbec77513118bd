//! The CLI's HTTP client. By default it talks to the local server and signs its own token with
//! the local server's secret, so `cloudfunc deploy` works right after `cloudfunc serve`.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::auth::Keys;

/// A connection to a cloudfunc server.
#[derive(Debug)]
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

/// A reply: its status and JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    /// The body, or an error made of the server's error message.
    pub fn ok(self) -> Result<Value> {
        if (200..300).contains(&self.status) {
            return Ok(self.body);
        }
        let message = self.body["error"]["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| self.body.to_string());
        bail!("{} ({})", message, self.status)
    }
}

impl Client {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`) with `token`, or a token minted from
    /// the secret in `data_dir` for `tenant`.
    pub fn new(
        base: &str,
        token: Option<String>,
        data_dir: &Path,
        tenant: &str,
        ca_cert: Option<&Path>,
    ) -> Result<Client> {
        Client::with(base, token, data_dir, (tenant, false), ca_cert)
    }

    /// [`Client::new`], minting an admin token when `admin` (and none is given).
    pub fn with(
        base: &str,
        token: Option<String>,
        data_dir: &Path,
        (tenant, admin): (&str, bool),
        ca_cert: Option<&Path>,
    ) -> Result<Client> {
        let token = match token {
            Some(t) => t,
            None => {
                let path = crate::serve::secret_path(data_dir);
                let secret = std::fs::read(&path).with_context(|| {
                    format!("no token given (--token or CLOUDFUNC_TOKEN) and cannot read the local server's secret {}", path.display())
                })?;
                Keys::new(&secret)?.mint(tenant, admin, 3600)
            }
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(15 * 60)))
            .tls_config(tls_config(ca_cert)?)
            .build()
            .new_agent();
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            agent,
        })
    }

    fn finish(
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        url: &str,
    ) -> Result<Reply> {
        let mut response = response.with_context(|| {
            format!("cannot reach the cloudfunc server at {url} (is `cloudfunc serve` running?)")
        })?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(Reply { status, body })
    }

    /// GET `path`.
    pub fn get(&self, path: &str) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        Self::finish(
            self.agent
                .get(&url)
                .header("authorization", &format!("Bearer {}", self.token))
                .call(),
            &url,
        )
    }

    /// DELETE `path`.
    pub fn delete(&self, path: &str) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        Self::finish(
            self.agent
                .delete(&url)
                .header("authorization", &format!("Bearer {}", self.token))
                .call(),
            &url,
        )
    }

    /// PUT `path` with an empty body.
    pub fn put(&self, path: &str) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        Self::finish(
            self.agent
                .put(&url)
                .header("authorization", &format!("Bearer {}", self.token))
                .send_empty(),
            &url,
        )
    }

    /// PUT `path` with a JSON body.
    pub fn put_json(&self, path: &str, body: &Value) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        let text = serde_json::to_string(body)?;
        self.send(
            self.agent.put(&url),
            &url,
            "application/json",
            text.as_bytes(),
        )
    }

    /// POST `path` with a JSON body.
    pub fn post_json(&self, path: &str, body: &Value) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        let text = serde_json::to_string(body)?;
        self.send(
            self.agent.post(&url),
            &url,
            "application/json",
            text.as_bytes(),
        )
    }

    /// POST `path` with a JSON body under an idempotency key: sent again with the same key,
    /// the server answers with what the first made.
    pub fn post_json_once(&self, path: &str, body: &Value, key: &str) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        let text = serde_json::to_string(body)?;
        self.send(
            self.agent.post(&url).header("idempotency-key", key),
            &url,
            "application/json",
            text.as_bytes(),
        )
    }

    /// POST `path` with a ZIP body.
    pub fn post_zip(&self, path: &str, zip: &[u8]) -> Result<Reply> {
        let url = format!("{}{path}", self.base);
        self.send(self.agent.post(&url), &url, "application/zip", zip)
    }

    /// Sends `request` (to `url`) with the token and a body of `content_type`.
    fn send(
        &self,
        request: ureq::RequestBuilder<ureq::typestate::WithBody>,
        url: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<Reply> {
        Self::finish(
            request
                .header("authorization", &format!("Bearer {}", self.token))
                .header("content-type", content_type)
                .send(body),
            url,
        )
    }
}

/// Percent-encodes a query value.
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Certificates are always verified; `ca_cert` (PEM, one or more certificates) is trusted
/// instead of the web's roots when given.
pub fn tls_config(ca_cert: Option<&Path>) -> Result<ureq::tls::TlsConfig> {
    let mut builder = ureq::tls::TlsConfig::builder();
    if let Some(path) = ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            anyhow::bail!("{} holds no PEM certificate", path.display());
        }
        builder = builder.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    Ok(builder.build())
}
