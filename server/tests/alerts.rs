//! Alerts end to end on a real server: a function starts failing, its rule fires after its
//! window, and one signed webhook, one email (in a real SMTP server's mailbox, Debian's
//! aiosmtpd) and one SMS request (at a Twilio-shaped endpoint) arrive; it recovers and each
//! gets the resolution. A receiver that is down gets the message once it is back, even
//! across a `kill -9` of the server. Bad input is refused with what to fix, and tenants see
//! only their own.

mod common;

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use common::receiver::{Got, Receiver};
use common::*;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const PYTHON: &str = "/usr/bin/python3";

/// Fails when asked to.
const FLAKY_PY: &str = "def handler(event):\n    if event.get('fail'):\n        raise ValueError('asked to fail')\n    return 'ok'\n";

fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    let aiosmtpd = Command::new(PYTHON)
        .args(["-c", "import aiosmtpd"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!aiosmtpd).then(|| "python3-aiosmtpd is not installed (apt install python3-aiosmtpd)".into())
}

fn main() {
    let tests: Vec<(&'static str, fn())> = vec![
        (
            "failing_function_fires_then_resolves_on_every_channel",
            whole_path,
        ),
        ("a_receiver_down_gets_it_later_even_across_kill_9", durable),
        ("bad_input_is_refused_and_tenants_are_apart", bad_input),
    ];
    common::run_tests("alerting tests", tests, missing());
}

/// Debian's aiosmtpd writing what it receives to a maildir.
struct Smtp {
    child: Child,
    port: u16,
    maildir: PathBuf,
}

impl Smtp {
    fn start(dir: &Path) -> Smtp {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let maildir = dir.join("maildir");
        let child = Command::new(PYTHON)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(&maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Smtp {
            child,
            port,
            maildir,
        }
    }

    /// Every message in the mailbox.
    fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            for e in std::fs::read_dir(self.maildir.join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                out.push(std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks a Standard Webhooks signature as a receiver would.
fn verify(secret: &str, got: &Got) {
    let id = &got.headers["webhook-id"];
    let ts = &got.headers["webhook-timestamp"];
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(&got.body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    assert_eq!(got.headers["webhook-signature"], expected, "bad signature");
    let age = cloudfunc_server::model::now_ms() / 1000 - ts.parse::<i64>().unwrap();
    assert!((0..300).contains(&age), "timestamp {age} s old");
}

fn server_flags(smtp: u16, sms: &Receiver) -> Vec<String> {
    vec![
        "--alert-interval-ms".into(),
        "300".into(),
        "--alert-allow-private-targets".into(),
        "--smtp-url".into(),
        format!("smtp://127.0.0.1:{smtp}"),
        "--smtp-from".into(),
        "cloudfunc <alerts@cloudfunc.test>".into(),
        "--sms-url".into(),
        sms.url(""),
        "--sms-account".into(),
        "AC123".into(),
        "--sms-token".into(),
        "tok3n".into(),
        "--sms-from".into(),
        "+15550000000".into(),
        "--public-url".into(),
        "http://dash.example".into(),
    ]
}

fn start(dir: &Path, tag: &str, flags: &[String]) -> Server {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start_in(dir, tag, 0, &flags)
}

fn post(s: &Server, path: &str, token: &str, body: &Value) -> Reply {
    post_json(s, path, token, body)
}

fn whole_path() {
    let dir = tempfile::tempdir().unwrap();
    let (hooks, sms) = (Receiver::start(), Receiver::start());
    let smtp = Smtp::start(dir.path());
    let s = start(dir.path(), "alerts", &server_flags(smtp.port, &sms));
    let t = s.token("acme", false);
    assert_eq!(
        deploy(&s, &t, "flaky", &[("function.py", FLAKY_PY)]).status,
        201
    );
    let r = post(
        &s,
        "/api/alerts/rules",
        &t,
        &json!({"name": "flaky failing", "function": "flaky", "metric": "error_rate", "op": "above",
                "threshold": 0.5, "for_s": 1, "severity": "critical"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let rule = r.body["id"].as_str().unwrap().to_string();
    let hook = post(
        &s,
        "/api/notifications/subscribe",
        &t,
        &json!({"channel": "webhook", "url": hooks.url("/hook"), "alerts": {"rule": rule}}),
    );
    assert_eq!(hook.status, 201, "{hook:?}");
    let secret = hook.body["secret"].as_str().unwrap().to_string();
    for spec in [
        json!({"channel": "email", "address": "ops@example.com", "alerts": {"function": "flaky"}}),
        json!({"channel": "sms", "number": "+14155550123", "alerts": {"rule": rule}, "min_severity": "critical"}),
    ] {
        let r = post(&s, "/api/notifications/subscribe", &t, &spec);
        assert_eq!(r.status, 201, "{r:?}");
        assert!(r.body.get("secret").is_none());
    }
    let subs = get(&s, "/api/notifications/subscriptions", &t);
    assert_eq!(subs.body["subscriptions"].as_array().unwrap().len(), 3);
    assert!(
        !subs.body.to_string().contains(&secret),
        "a secret is shown once only"
    );

    // It starts failing: the rule is pending, then fires once its window has passed.
    for _ in 0..4 {
        let r = post(
            &s,
            "/api/functions/flaky/invoke",
            &t,
            &json!({"fail": true}),
        );
        assert_eq!(r.status, 200);
    }
    wait_until("the rule fires", Duration::from_secs(20), || {
        get(&s, &format!("/api/alerts/rules/{rule}"), &t).body["state"] == "firing"
    });
    wait_until("one webhook", Duration::from_secs(20), || {
        hooks.got("/hook").len() == 1
    });
    wait_until("one email", Duration::from_secs(20), || {
        smtp.messages().len() == 1
    });
    let sms_path = "/2010-04-01/Accounts/AC123/Messages.json";
    wait_until("one SMS", Duration::from_secs(20), || {
        sms.got(sms_path).len() == 1
    });
    let got = hooks.got("/hook").remove(0);
    verify(&secret, &got);
    let body: Value = serde_json::from_slice(&got.body).unwrap();
    assert_eq!(body["type"], "alert.firing");
    assert_eq!(body["rule_id"], rule);
    assert_eq!(body["items"][0]["function"], "flaky");
    assert_eq!(body["items"][0]["value"], 1.0);
    assert_eq!(body["dashboard"], "http://dash.example/#/functions/flaky");
    let mail = &smtp.messages()[0];
    assert!(
        mail.contains("ops@example.com") && mail.contains("[FIRING] flaky failing"),
        "{mail}"
    );
    let text = String::from_utf8(sms.got(sms_path)[0].body.clone()).unwrap();
    let form: HashMap<String, String> = url::form_urlencoded::parse(text.as_bytes())
        .into_owned()
        .collect();
    assert_eq!(form["To"], "+14155550123");
    assert_eq!(form["From"], "+15550000000");
    assert!(form["Body"].starts_with("[FIRING] flaky failing") && form["Body"].len() <= 160);
    let auth = &sms.got(sms_path)[0].headers["authorization"];
    assert_eq!(
        auth,
        &format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("AC123:tok3n")
        )
    );

    // Still failing: nothing more on each evaluation.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(hooks.got("/hook").len(), 1);

    // It recovers: one resolution on each channel.
    for _ in 0..12 {
        let r = post(&s, "/api/functions/flaky/invoke", &t, &json!({}));
        assert_eq!(r.status, 200);
    }
    wait_until("resolved webhook", Duration::from_secs(20), || {
        hooks.got("/hook").len() == 2
    });
    wait_until("resolved email", Duration::from_secs(20), || {
        smtp.messages().len() == 2
    });
    wait_until("resolved SMS", Duration::from_secs(20), || {
        sms.got(sms_path).len() == 2
    });
    let resolved: Value = serde_json::from_slice(&hooks.got("/hook")[1].body).unwrap();
    assert_eq!(resolved["type"], "alert.resolved");
    verify(&secret, &hooks.got("/hook")[1]);
    assert_eq!(
        get(&s, &format!("/api/alerts/rules/{rule}"), &t).body["state"],
        "ok"
    );
    let history = get(&s, "/api/notifications/history", &t);
    let sent: Vec<&Value> = history.body["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(sent.len(), 6, "{history:?}");
    assert!(sent
        .iter()
        .all(|d| d["status"] == "sent" && d["attempts"] == 1));

    // System events: a deactivation reaches a subscriber to them; an admin hears the whole
    // system's.
    let ev = post(
        &s,
        "/api/notifications/subscribe",
        &t,
        &json!({"channel": "webhook", "url": hooks.url("/events"), "alerts": {"system_events": true}}),
    );
    assert_eq!(ev.status, 201);
    let r = request(
        "PUT",
        &format!("{}/api/functions/flaky/deactivate", s.url),
        Some(&t),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    wait_until("deactivation event", Duration::from_secs(20), || {
        hooks.got("/events").len() == 1
    });
    let e: Value = serde_json::from_slice(&hooks.got("/events")[0].body).unwrap();
    assert_eq!(e["type"], "system.event");
    assert_eq!(e["condition"], "deactivated");
    s.stop();
}

fn durable() {
    let dir = tempfile::tempdir().unwrap();
    let sms = Receiver::start();
    let smtp = Smtp::start(dir.path());
    let flags = server_flags(smtp.port, &sms);
    let mut s = start(dir.path(), "alerts-durable", &flags);
    let t = s.token("acme", false);
    assert_eq!(
        deploy(&s, &t, "flaky", &[("function.py", FLAKY_PY)]).status,
        201
    );
    // The receiver answers 503 for now.
    let hooks = Receiver::start();
    hooks.status.store(503, Ordering::SeqCst);
    let r = post(
        &s,
        "/api/notifications/subscribe",
        &t,
        &json!({"channel": "webhook", "url": hooks.url("/hook"), "format": "alertmanager"}),
    );
    assert_eq!(r.status, 201);
    let r = post(
        &s,
        "/api/alerts/rules",
        &t,
        &json!({"name": "any error", "metric": "errors", "op": "above", "threshold": 0, "for_s": 0}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = post(
        &s,
        "/api/functions/flaky/invoke",
        &t,
        &json!({"fail": true}),
    );
    assert_eq!(r.status, 200);
    wait_until("two refused tries", Duration::from_secs(20), || {
        hooks.got("/hook").len() >= 2
    });
    let h = get(&s, "/api/notifications/history", &t);
    let d = &h.body["notifications"][0];
    assert_eq!(d["status"], "pending", "{h:?}");
    assert!(d["last_error"].as_str().unwrap().contains("503"));
    let id = d["id"].as_str().unwrap().to_string();

    // The server dies while the notification waits; the receiver comes back meanwhile.
    s.kill9();
    hooks.status.store(200, Ordering::SeqCst);
    let before = hooks.got("/hook").len();
    let s = start(dir.path(), "alerts-durable", &flags);
    wait_until(
        "delivered after the restart",
        Duration::from_secs(30),
        || {
            let h = get(&s, "/api/notifications/history", &t);
            h.body["notifications"][0]["status"] == "sent"
        },
    );
    let all = hooks.got("/hook");
    assert!(all.len() > before);
    // Every try carried the same id, so the receiver can de-duplicate.
    assert!(all.iter().all(|g| g.headers["webhook-id"] == id));
    let am: Value = serde_json::from_slice(&all.last().unwrap().body).unwrap();
    assert_eq!(am["version"], "4");
    assert_eq!(am["alerts"][0]["labels"]["function"], "flaky");
    assert_eq!(am["alerts"][0]["status"], "firing");
    s.stop();
}

fn bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path(), "alerts-bad", 0, &[]);
    let (t, other) = (s.token("acme", false), s.token("globex", false));
    assert_eq!(
        deploy(&s, &t, "mine", &[("function.py", FLAKY_PY)]).status,
        201
    );
    let rule = |body: Value| post(&s, "/api/alerts/rules", &t, &body);
    for (body, says) in [
        (
            json!({"name": "x", "metric": "latency", "op": "above", "threshold": 1}),
            "unknown variant",
        ),
        (
            json!({"name": "x", "metric": "error_rate", "op": "above", "threshold": 2}),
            "between 0 and 1",
        ),
        (
            json!({"name": "x", "metric": "invocations", "op": "below", "threshold": 0}),
            "never below 0",
        ),
        (
            json!({"name": "x", "metric": "queue_depth", "op": "above", "threshold": 5}),
            "only an admin",
        ),
        (
            json!({"name": "x", "metric": "error_rate", "op": "above", "threshold": 0.1, "for_s": 9999999}),
            "at most a week",
        ),
        (
            json!({"name": "x", "function": "nope", "metric": "error_rate", "op": "above", "threshold": 0.1}),
            "no function",
        ),
    ] {
        let r = rule(body.clone());
        assert!((400..500).contains(&r.status), "{body}: {r:?}");
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains(says),
            "{body}: {r:?}"
        );
    }
    let sub = |body: Value| post(&s, "/api/notifications/subscribe", &t, &body);
    for body in [
        json!({"channel": "webhook", "url": "ftp://x.example"}),
        json!({"channel": "webhook", "url": "https://u:p@x.example"}),
        json!({"channel": "email", "address": "not-an-address"}),
        json!({"channel": "sms", "number": "555-0123"}),
        json!({"channel": "pager", "to": "x"}),
        json!({"channel": "webhook", "url": "https://x.example", "alerts": {"rule": "rule_nope"}}),
    ] {
        let r = sub(body.clone());
        assert!((400..500).contains(&r.status), "{body}: {r:?}");
    }
    // What this server could never deliver is refused when subscribed, saying why: it was
    // started without SMTP or an SMS provider, and without private webhook targets.
    for (body, says) in [
        (
            json!({"channel": "email", "address": "a@b.example"}),
            "--smtp-url",
        ),
        (
            json!({"channel": "sms", "number": "+14155550123"}),
            "--sms-account",
        ),
        (
            json!({"channel": "webhook", "url": "http://127.0.0.1:9/x"}),
            "--alert-allow-private-targets",
        ),
        (
            json!({"channel": "webhook", "url": "http://169.254.169.254/latest"}),
            "link-local",
        ),
    ] {
        let r = sub(body.clone());
        assert_eq!(r.status, 400, "{body}: {r:?}");
        let why = r.body["error"]["message"].as_str().unwrap();
        assert!(why.contains(says), "{body}: {why}");
    }
    assert_eq!(
        get(&s, "/api/notifications/subscriptions", &t).body["subscriptions"],
        json!([])
    );
    assert_eq!(get(&s, "/api/alerts/rules", &t).body["rules"], json!([]));

    // Another tenant's rule and subscription are not there for it.
    let r = rule(
        json!({"name": "mine", "function": "mine", "metric": "error_rate", "op": "above", "threshold": 0.1}),
    );
    let id = r.body["id"].as_str().unwrap().to_string();
    let sid = sub(json!({"channel": "webhook", "url": "https://hooks.example.com/a"})).body
        ["subscription_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        get(&s, &format!("/api/alerts/rules/{id}"), &other).status,
        404
    );
    assert_eq!(
        request(
            "DELETE",
            &format!("{}/api/alerts/rules/{id}", s.url),
            Some(&other),
            None
        )
        .status,
        404
    );
    let r = post(
        &s,
        "/api/notifications/unsubscribe",
        &other,
        &json!({"subscription_id": sid}),
    );
    assert_eq!(r.status, 404);
    assert_eq!(
        get(&s, "/api/alerts/rules", &other).body["rules"],
        json!([])
    );
    // The owner can: by channel and target.
    let r = post(
        &s,
        "/api/notifications/unsubscribe",
        &t,
        &json!({"channel": "webhook", "url": "https://hooks.example.com/a"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["removed"], 1);
    let r = post(
        &s,
        "/api/alerts/rules/{id}/silence",
        &t,
        &json!({"for_s": 60}),
    );
    assert_eq!(r.status, 404);
    let r = post(
        &s,
        &format!("/api/alerts/rules/{id}/silence"),
        &t,
        &json!({"for_s": 60}),
    );
    assert_eq!(r.body["silenced"], true, "{r:?}");

    // The same from the command line.
    let cli = |args: &[&str]| {
        let out = s.cli("acme").arg("alerts").args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = cli(&[
        "create",
        "--name",
        "slow",
        "--function",
        "mine",
        "--metric",
        "duration_p95_ms",
        "--above",
        "500",
        "--for",
        "5m",
    ]);
    assert!(
        ok && text.contains("created rule_") && text.contains("(duration_p95_ms > 500 for 300s)"),
        "{text}"
    );
    let (ok, text) = cli(&["list"]);
    assert!(
        ok && text.contains("mine") && text.contains("silenced") && text.contains("slow"),
        "{text}"
    );
    let (ok, text) = cli(&[
        "create",
        "--name",
        "bad",
        "--metric",
        "error_rate",
        "--above",
        "3",
    ]);
    assert!(!ok && text.contains("between 0 and 1"), "{text}");
    let (ok, text) = cli(&["subscribe", "--webhook", "https://hooks.example.com/x"]);
    assert!(
        ok && text.contains("webhook signing secret (shown once): whsec_"),
        "{text}"
    );
    // A deleted function's rules go with it: a new function of its name is another, which
    // they would not watch.
    let r = request(
        "DELETE",
        &format!("{}/api/functions/mine", s.url),
        Some(&t),
        None,
    );
    assert_eq!(r.status, 200, "{r:?}");
    let left: Vec<Value> = get(&s, "/api/alerts/rules", &t).body["rules"]
        .as_array()
        .unwrap()
        .clone();
    assert!(left.iter().all(|r| r["function"].is_null()), "{left:?}");
    s.stop();
}
