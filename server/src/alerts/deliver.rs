//! Delivery: what a notification looks like on each channel, the webhook signature, the
//! retry schedule, and the real senders (webhook and SMS over HTTP, email over SMTP). Senders
//! sit behind [`Channels`] so the platform's logic can be tested with a fake beside the real
//! tests.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;

use super::model::{Channel, Notification, Status, Subscription, WebhookFormat};
pub use super::target::check_target;

/// A delivery of one notification to one subscription, as the outbox keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// The notification's id and the subscription's: receivers de-duplicate on it.
    pub id: String,
    pub notification_id: String,
    pub subscription_id: String,
    pub tenant: String,
    pub channel: String,
    pub target: String,
    /// `pending`, `sent` or `failed` (given up).
    pub status: String,
    pub attempts: u32,
    /// When it is next tried (Unix ms).
    pub next_at: i64,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub summary: String,
}

impl Delivery {
    /// The delivery of `n` to `sub`, not tried yet: its id is the two ids, so enqueuing the
    /// same notification again makes no second one.
    pub fn pending(n: &Notification, sub: &Subscription) -> Delivery {
        Delivery {
            id: format!("{}.{}", n.id, sub.id),
            notification_id: n.id.clone(),
            subscription_id: sub.id.clone(),
            tenant: sub.tenant.clone(),
            channel: sub.spec.channel.kind().into(),
            target: sub.spec.channel.target().into(),
            status: "pending".into(),
            attempts: 0,
            next_at: n.at,
            last_error: None,
            created_at: n.at,
            finished_at: None,
            summary: n.summary.clone(),
        }
    }
}

/// Tries before a delivery is given up.
pub const MOST_ATTEMPTS: u32 = 10;

/// The wait before try `attempts + 1`: doubling from 1 s to at most 10 minutes, with up to
/// a fifth of it as jitter (so receivers coming back are not hit all at once).
pub fn backoff_ms(attempts: u32, jitter: f64) -> i64 {
    let base = 1000i64
        .saturating_mul(1i64 << attempts.min(20))
        .min(600_000);
    // At most a fifth of ten minutes: the cast is of a small non-negative number.
    #[allow(clippy::cast_possible_truncation)]
    let spread = (base as f64 * 0.2 * jitter.clamp(0.0, 1.0)) as i64;
    base + spread
}

/// Why a try failed, and whether another may succeed.
#[derive(Debug, Clone, PartialEq)]
pub struct SendError {
    pub retry: bool,
    pub message: String,
}

impl SendError {
    pub(super) fn retry(message: impl Into<String>) -> SendError {
        SendError {
            retry: true,
            message: message.into(),
        }
    }

    pub(super) fn fatal(message: impl Into<String>) -> SendError {
        SendError {
            retry: false,
            message: message.into(),
        }
    }
}

/// What delivers notifications.
pub trait Channels: Send + Sync + std::fmt::Debug {
    /// Sends `n` to `sub` as delivery `delivery_id` (the same id on every try).
    fn send(
        &self,
        sub: &Subscription,
        n: &Notification,
        delivery_id: &str,
    ) -> Result<(), SendError>;
}

/// How the senders reach the outside world.
#[derive(Debug, Clone, Default)]
pub struct ChannelConfig {
    /// Webhooks may go to loopback, private and link-local addresses (tests, private
    /// networks). Off by default: those are refused, cloud metadata addresses included.
    pub allow_private_targets: bool,
    /// `smtp://host:port`, `smtps://...` or `smtp://...?tls=required`, with optional
    /// `user:password@`; no email without it.
    pub smtp_url: Option<String>,
    pub smtp_from: String,
    /// The SMS provider's base URL (Twilio's REST shape), account, token and sender.
    pub sms_url: String,
    pub sms_account: Option<String>,
    pub sms_token: Option<String>,
    pub sms_from: Option<String>,
    /// Where the dashboard is, for links in messages.
    pub public_url: String,
    /// How long a receiver may take to answer, all in (`None`: 10 s).
    pub timeout: Option<Duration>,
}

impl ChannelConfig {
    /// Why these senders could never deliver to `channel`, if so: a channel the server was
    /// started without, or a webhook at an address written out that it refuses.
    pub fn undeliverable(&self, channel: &Channel) -> Option<String> {
        match channel {
            Channel::Webhook { url, .. } if !self.allow_private_targets => {
                super::target::refused_as_written(url)
            }
            Channel::Webhook { .. } => None,
            Channel::Email { .. } if self.smtp_url.is_none() => {
                Some("this server sends no email: it was started without --smtp-url".into())
            }
            Channel::Sms { .. }
                if self.sms_account.is_none()
                    || self.sms_token.is_none()
                    || self.sms_from.is_none() =>
            {
                Some(
                    "this server sends no SMS: it was started without --sms-account, --sms-token and --sms-from"
                        .into(),
                )
            }
            Channel::Email { .. } | Channel::Sms { .. } => None,
        }
    }
}

/// The real senders.
#[derive(Debug)]
pub struct RealChannels {
    config: ChannelConfig,
    http: ureq::Agent,
}

/// How long a receiver may take to answer, all in, by default.
const TIMEOUT: Duration = Duration::from_secs(10);

impl RealChannels {
    pub fn new(config: ChannelConfig) -> RealChannels {
        let timeout = config.timeout.unwrap_or(TIMEOUT);
        let settings = ureq::Agent::config_builder()
            .timeout_connect(Some(timeout.min(Duration::from_secs(5))))
            .timeout_global(Some(timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .build();
        let http = super::target::agent(settings, config.allow_private_targets);
        RealChannels { config, http }
    }

    fn webhook(
        &self,
        sub: &Subscription,
        url: &str,
        format: WebhookFormat,
        n: &Notification,
        delivery_id: &str,
    ) -> Result<(), SendError> {
        check_target(url, self.config.allow_private_targets)?;
        let body = match format {
            WebhookFormat::Cloudfunc => cloudfunc_payload(n, &self.config.public_url),
            WebhookFormat::Alertmanager => alertmanager_payload(n, &self.config.public_url),
        };
        let body = serde_json::to_vec(&body).map_err(|e| SendError::fatal(e.to_string()))?;
        let timestamp = n.at.max(crate::model::now_ms()) / 1000;
        let signature = sign(&sub.secret, delivery_id, timestamp, &body)
            .map_err(|e| SendError::fatal(e.to_string()))?;
        let response = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("user-agent", "cloudfunc-alerts")
            .header("webhook-id", delivery_id)
            .header("webhook-timestamp", &timestamp.to_string())
            .header("webhook-signature", &signature)
            .send(&body[..])
            .map_err(|e| SendError::retry(format!("{url}: {e}")))?;
        status_outcome(response.status().as_u16(), url)
    }

    fn email(&self, address: &str, n: &Notification) -> Result<(), SendError> {
        use lettre::Transport;
        let url = self
            .config
            .smtp_url
            .as_deref()
            .ok_or_else(|| SendError::fatal("no SMTP server is configured (--smtp-url)"))?;
        let transport = lettre::SmtpTransport::from_url(url)
            .map_err(|e| SendError::fatal(format!("--smtp-url: {e}")))?
            .timeout(Some(self.config.timeout.unwrap_or(TIMEOUT)))
            .build();
        let message = lettre::Message::builder()
            .from(
                self.config
                    .smtp_from
                    .parse()
                    .map_err(|e| SendError::fatal(format!("--smtp-from: {e}")))?,
            )
            .to(address
                .parse()
                .map_err(|e| SendError::fatal(format!("{address}: {e}")))?)
            .subject(n.headline())
            .message_id(Some(format!("<{}@cloudfunc>", n.id)))
            .header(lettre::message::header::ContentType::TEXT_PLAIN)
            .body(email_text(n, &self.config.public_url))
            .map_err(|e| SendError::fatal(e.to_string()))?;
        transport.send(&message).map_err(|e| {
            let permanent = e.is_permanent();
            SendError {
                retry: !permanent,
                message: format!("SMTP: {e}"),
            }
        })?;
        Ok(())
    }

    fn sms(&self, number: &str, n: &Notification) -> Result<(), SendError> {
        let (Some(account), Some(token), Some(from)) = (
            &self.config.sms_account,
            &self.config.sms_token,
            &self.config.sms_from,
        ) else {
            return Err(SendError::fatal(
                "no SMS provider is configured (--sms-account, --sms-token, --sms-from)",
            ));
        };
        let url = format!(
            "{}/2010-04-01/Accounts/{account}/Messages.json",
            self.config.sms_url.trim_end_matches('/')
        );
        let text = sms_text(n, &self.config.public_url);
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{account}:{token}"));
        let form = [("To", number), ("From", from.as_str()), ("Body", &text)];
        let response = self
            .http
            .post(&url)
            .header("authorization", &format!("Basic {auth}"))
            .send_form(form)
            .map_err(|e| SendError::retry(format!("SMS provider: {e}")))?;
        status_outcome(response.status().as_u16(), "the SMS provider")
    }
}

impl Channels for RealChannels {
    fn send(
        &self,
        sub: &Subscription,
        n: &Notification,
        delivery_id: &str,
    ) -> Result<(), SendError> {
        match &sub.spec.channel {
            Channel::Webhook { url, format } => self.webhook(sub, url, *format, n, delivery_id),
            Channel::Email { address } => self.email(address, n),
            Channel::Sms { number } => self.sms(number, n),
        }
    }
}

/// A receiver's answer: 2xx delivered; 408, 429 and 5xx worth another try; the rest not
/// (redirects are not followed).
fn status_outcome(status: u16, what: &str) -> Result<(), SendError> {
    match status {
        200..=299 => Ok(()),
        408 | 429 | 500..=599 => Err(SendError::retry(format!("{what} answered {status}"))),
        _ => Err(SendError::fatal(format!("{what} answered {status}"))),
    }
}

/// A new signing secret, in the Standard Webhooks form: `whsec_` and base64 of 32 bytes.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The Standard Webhooks signature: `v1,` and base64 of HMAC-SHA256, keyed with the
/// secret's bytes, over `id.timestamp.body`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|e| format!("the signing secret is not base64: {e}"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// cloudfunc's webhook body.
pub fn cloudfunc_payload(n: &Notification, public_url: &str) -> Value {
    json!({
        "id": n.id,
        "type": match n.status {
            Status::Firing => "alert.firing",
            Status::Resolved => "alert.resolved",
            Status::Event => "system.event",
        },
        "status": n.status,
        "severity": n.severity,
        "rule_id": n.rule_id,
        "rule": n.rule,
        "condition": n.condition,
        "summary": n.summary,
        "items": n.items,
        "at": n.at,
        "dashboard": dashboard_link(n, public_url),
    })
}

/// Alertmanager's webhook body (version 4): one alert per item.
pub fn alertmanager_payload(n: &Notification, public_url: &str) -> Value {
    let status = if n.status == Status::Resolved {
        "resolved"
    } else {
        "firing"
    };
    let rule = n.rule.clone().unwrap_or_else(|| n.condition.clone());
    let alerts: Vec<Value> = n
        .items
        .iter()
        .map(|i| {
            json!({
                "status": status,
                "labels": {"alertname": rule, "function": i.function, "severity": n.severity},
                "annotations": {"summary": n.summary, "value": i.value.to_string()},
                "startsAt": rfc3339(i.since),
                "endsAt": if n.status == Status::Resolved { rfc3339(n.at) } else { "0001-01-01T00:00:00Z".into() },
                "generatorURL": dashboard_link(n, public_url),
                "fingerprint": format!("{}:{}", n.rule_id.clone().unwrap_or_default(), i.function_id),
            })
        })
        .collect();
    json!({
        "version": "4",
        "groupKey": format!("{{}}:{{alertname=\"{rule}\"}}"),
        "status": status,
        "receiver": "cloudfunc",
        "groupLabels": {"alertname": rule},
        "commonLabels": {"alertname": rule, "severity": n.severity},
        "commonAnnotations": {"summary": n.summary},
        "externalURL": public_url,
        "alerts": alerts,
    })
}

/// Unix ms as RFC 3339 in UTC (whole seconds): NAB's `YYYY-MM-DD HH:MM:SS`, which the
/// anomaly crate already writes, with its `T` and `Z`.
fn rfc3339(ms: i64) -> String {
    let civil = cloudfunc_anomaly::nab::format_timestamp(ms.div_euclid(1000));
    format!("{}Z", civil.replacen(' ', "T", 1))
}

fn dashboard_link(n: &Notification, public_url: &str) -> String {
    let base = public_url.trim_end_matches('/');
    match n.items.first() {
        Some(i) if !i.function.is_empty() && n.items.len() == 1 => {
            format!("{base}/#/functions/{}", i.function)
        }
        _ => format!("{base}/"),
    }
}

/// An email's text.
pub fn email_text(n: &Notification, public_url: &str) -> String {
    let mut text = format!("{}\n\n", n.summary);
    if !n.condition.is_empty() {
        text.push_str(&format!("Condition: {}\n", n.condition));
    }
    text.push_str(&format!("Severity: {:?}\n", n.severity).to_lowercase());
    for i in &n.items {
        let who = if i.function.is_empty() {
            "system"
        } else {
            &i.function
        };
        text.push_str(&format!(
            "- {who}: {} (since {})\n",
            i.value,
            rfc3339(i.since)
        ));
    }
    text.push_str(&format!(
        "\n{}\nNotification {}\n",
        dashboard_link(n, public_url),
        n.id
    ));
    text
}

/// An SMS: one segment (160 plain characters, 70 otherwise), ending with the dashboard link.
pub fn sms_text(n: &Notification, public_url: &str) -> String {
    let link = dashboard_link(n, public_url);
    let head = n.headline();
    let limit: usize = if head.is_ascii() && link.is_ascii() {
        160
    } else {
        70
    };
    let room = limit.saturating_sub(link.chars().count() + 1);
    let mut text: String = head.chars().take(room).collect();
    if text.chars().count() < head.chars().count() && room > 1 {
        text = head.chars().take(room - 1).collect::<String>() + "…";
    }
    format!("{text} {link}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::model::{Item, Severity};

    fn notification() -> Notification {
        Notification {
            id: "n1".into(),
            tenant: "t".into(),
            status: Status::Firing,
            severity: Severity::Critical,
            rule_id: Some("r1".into()),
            rule: Some("errors".into()),
            condition: "error_rate > 0.1 for 60s".into(),
            summary: "errors: error_rate > 0.1 on hello".into(),
            items: vec![Item {
                function: "hello".into(),
                function_id: "fn_1".into(),
                value: 0.5,
                since: 1_700_000_000_000,
            }],
            at: 1_700_000_060_000,
        }
    }

    #[test]
    fn the_signature_is_standard_webhooks() {
        // The Standard Webhooks specification's own example.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body).unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(sign("whsec_%%%", "x", 1, b"").is_err());
        assert!(new_secret().starts_with("whsec_"));
    }

    #[test]
    fn retries_back_off_to_ten_minutes() {
        assert_eq!(backoff_ms(0, 0.0), 1000);
        assert_eq!(backoff_ms(3, 0.0), 8000);
        assert_eq!(backoff_ms(30, 0.0), 600_000);
        assert_eq!(backoff_ms(3, 1.0), 9600);
    }

    /// A receiver on loopback that reads the request, then does `then` with the socket.
    fn receiver(then: fn(std::net::TcpStream)) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    let _ = std::io::Read::read(&mut &stream, &mut buf);
                    then(stream);
                });
            }
        });
        url
    }

    fn subscription(url: &str) -> Subscription {
        Subscription {
            id: "sub_1".into(),
            tenant: "t".into(),
            spec: crate::alerts::SubscriptionSpec {
                channel: Channel::Webhook {
                    url: url.into(),
                    format: WebhookFormat::Cloudfunc,
                },
                alerts: Default::default(),
                min_severity: Severity::Info,
            },
            secret: new_secret(),
            admin: false,
            created_at: 0,
        }
    }

    #[test]
    fn hanging_redirecting_and_endless_receivers_hold_nothing() {
        let channels = RealChannels::new(ChannelConfig {
            allow_private_targets: true,
            timeout: Some(Duration::from_millis(500)),
            ..ChannelConfig::default()
        });
        let n = notification();
        // Never answers: a retryable failure once the timeout has passed.
        let hangs = receiver(|s| {
            std::thread::sleep(Duration::from_secs(5));
            drop(s);
        });
        let started = std::time::Instant::now();
        let e = channels.send(&subscription(&hangs), &n, "d1").unwrap_err();
        assert!(
            e.retry && started.elapsed() < Duration::from_secs(3),
            "{e:?}"
        );
        // A redirect is not followed, and not retried.
        let redirects = receiver(|mut s| {
            let _ = std::io::Write::write_all(
                &mut s,
                b"HTTP/1.1 302 Found\r\nlocation: http://169.254.169.254/\r\ncontent-length: 0\r\n\r\n",
            );
        });
        let e = channels
            .send(&subscription(&redirects), &n, "d2")
            .unwrap_err();
        assert!(!e.retry && e.message.contains("302"), "{e:?}");
        // A gigabyte answer: delivered at its status line; the body is never read.
        let endless = receiver(|mut s| {
            let _ = std::io::Write::write_all(
                &mut s,
                b"HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\n",
            );
            let chunk = vec![b'x'; 1 << 16];
            while std::io::Write::write_all(&mut s, &chunk).is_ok() {}
        });
        let started = std::time::Instant::now();
        channels.send(&subscription(&endless), &n, "d3").unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn texts_fit_their_channel() {
        let mut n = notification();
        let sms = sms_text(&n, "http://cf.example:8080");
        assert!(
            sms.chars().count() <= 160 && sms.ends_with("/#/functions/hello"),
            "{sms}"
        );
        n.summary = "x".repeat(500);
        assert_eq!(sms_text(&n, "http://cf.example").chars().count(), 160);
        n.summary = "é".repeat(500);
        assert_eq!(sms_text(&n, "http://cf.example").chars().count(), 70);
        let mail = email_text(&notification(), "http://cf.example");
        assert!(
            mail.contains("hello: 0.5 (since 2023-11-14T22:13:20Z)"),
            "{mail}"
        );
        let am = alertmanager_payload(&notification(), "http://cf.example");
        assert_eq!(am["version"], "4");
        assert_eq!(am["alerts"][0]["labels"]["function"], "hello");
        assert_eq!(am["alerts"][0]["startsAt"], "2023-11-14T22:13:20Z");
        assert!(status_outcome(503, "x").unwrap_err().retry);
        assert!(!status_outcome(302, "x").unwrap_err().retry);
    }
}
