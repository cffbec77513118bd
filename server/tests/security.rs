//! The platform's own security, end to end on a real server: HTTPS with a certificate from
//! files (HTTP/2 and HTTP/1.1, TLS 1.2 and newer only, reloaded on SIGHUP, a broken pair
//! refused while the old one stays), the CLI trusting it with --ca-cert (and refusing it
//! without), a self-signed certificate for local use, the warning for plain HTTP off loopback,
//! and a data directory no other local user can read.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, BIN};

/// A certificate for localhost and 127.0.0.1: (certificate PEM, key PEM).
fn certificate() -> (String, String) {
    let made =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    (made.cert.pem(), made.key_pair.serialize_pem())
}

/// An agent that trusts only the certificate in `ca` (PEM).
fn agent(ca: &Path) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .tls_config(cloudfunc_server::cli::client::tls_config(Some(ca)).unwrap())
        .build()
        .new_agent()
}

/// The health route's status through `agent`, or the error's text.
fn health(agent: &ureq::Agent, url: &str) -> Result<u16, String> {
    agent
        .get(&format!("{url}/api/system/health"))
        .call()
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn curl(args: &[&str]) -> Option<(bool, String)> {
    let out = Command::new("curl").args(args).output().ok()?;
    Some((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    ))
}

fn https_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a_cert, a_key) = certificate();
    let (cert, key) = (
        write(dir.path(), "tls.pem", &a_cert),
        write(dir.path(), "tls.key", &a_key),
    );
    let a_ca = write(dir.path(), "a.pem", &a_cert);
    let s = Server::start_in(
        dir.path(),
        "tls",
        0,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(s.url.starts_with("https://127.0.0.1:"), "{}", s.url);
    assert_eq!(health(&agent(&a_ca), &s.url), Ok(200));
    // Plain HTTP gets nothing from a TLS port.
    let plain = s.url.replace("https://", "http://");
    let answered = ureq::get(&format!("{plain}/api/system/health")).call();
    assert!(answered.is_err(), "plain HTTP was answered: {answered:?}");

    // The CLI verifies the certificate: refused without --ca-cert, trusted with it.
    let out = s.cli("acme").arg("list").output().unwrap();
    assert!(!out.status.success(), "an unknown CA was trusted");
    let out = s
        .cli("acme")
        .args(["--ca-cert", a_ca.to_str().unwrap(), "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    match curl(&["--version"]) {
        None => println!("SKIPPED the HTTP/2 and TLS-version checks: curl is not installed"),
        Some(_) => {
            let url = format!("{}/api/system/health", s.url);
            let ca = a_ca.to_str().unwrap();
            let (ok, text) = curl(&[
                "-sS",
                "--http2",
                "--cacert",
                ca,
                "-o",
                "/dev/null",
                "-w",
                "%{http_version}",
                &url,
            ])
            .unwrap();
            assert!(ok && text.trim() == "2", "HTTP/2 over TLS: {text}");
            // HEAD over HTTP/2 ends the stream with the head: a body after it is a protocol
            // error to the client (curl fails the transfer).
            let (ok, text) = curl(&["-sS", "--http2", "--head", "--cacert", ca, &url]).unwrap();
            assert!(
                ok && text.starts_with("HTTP/2 200"),
                "HEAD over HTTP/2: {text}"
            );
            assert!(
                text.contains("content-length: "),
                "HEAD over HTTP/2: {text}"
            );
            let (ok, text) = curl(&[
                "-sS",
                "--http1.1",
                "--cacert",
                ca,
                "-o",
                "/dev/null",
                "-w",
                "%{http_version}",
                &url,
            ])
            .unwrap();
            assert!(ok && text.trim() == "1.1", "HTTP/1.1 over TLS: {text}");
            let (ok, text) =
                curl(&["-sS", "--tlsv1.0", "--tls-max", "1.1", "--cacert", ca, &url]).unwrap();
            assert!(!ok, "TLS 1.1 was accepted: {text}");
        }
    }

    // A new pair in the same files, then SIGHUP: new connections get it.
    let (b_cert, b_key) = certificate();
    let b_ca = write(dir.path(), "b.pem", &b_cert);
    write(dir.path(), "tls.pem", &b_cert);
    write(dir.path(), "tls.key", &b_key);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(s.child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&agent(&b_ca), &s.url) != Ok(200) {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not taken"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        health(&agent(&a_ca), &s.url).is_err(),
        "the old certificate is still served"
    );

    // A broken pair is refused at the reload; the one in use stays.
    write(dir.path(), "tls.key", "not a key");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
        if log.contains("could not be reloaded") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no word of the failed reload: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(health(&agent(&b_ca), &s.url), Ok(200));
    s.stop();
    s.remove_files();
}

fn self_signed_for_local_use() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path(), "tlsself", 0, &["--tls-self-signed"]);
    let ca = dir.path().join("data/tls/self-signed.pem");
    assert!(ca.is_file());
    assert_eq!(health(&agent(&ca), &s.url), Ok(200));
    let localhost = s.url.replace("127.0.0.1", "localhost");
    assert_eq!(health(&agent(&ca), &localhost), Ok(200));
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    let fingerprint = log
        .lines()
        .find_map(|l| l.split("\"fingerprint\":\"").nth(1))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no fingerprint in the log: {log}"));
    assert_eq!(fingerprint.len(), 32 * 3 - 1, "{fingerprint}");
    s.stop();
    s.remove_files();
}

/// Starts a server on all addresses with `extra`, returns what it wrote to stderr by the time
/// it listened.
fn stderr_of_open_server(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--cgroup-parent",
            "cf-tls-open",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--images-dir")
        .arg(dir.path().join("images"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.starts_with("cloudfunc listening on http://0.0.0.0:"),
        "{line}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn plain_http_off_loopback_warns() {
    let warned = stderr_of_open_server(&[]);
    assert!(
        warned.contains("WARNING: serving plain HTTP on 0.0.0.0"),
        "{warned}"
    );
    let quiet = stderr_of_open_server(&["--insecure-http"]);
    assert!(!quiet.contains("WARNING: serving plain HTTP"), "{quiet}");
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn the_data_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    // Reachable by anyone down to the data directory, as /var/lib is.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Server::start_in(dir.path(), "modes", 0, &[]);
    let t = s.token("acme", false);
    assert_eq!(
        common::deploy(&s, &t, "hello", &[("function.py", common::HELLO_PY)]).status,
        201
    );
    let canary = "canary-8d3f0a";
    let r = common::post_json(
        &s,
        "/api/functions/hello/invoke",
        &t,
        &serde_json::json!({"name": canary}),
    );
    assert_eq!(r.status, 200);
    let data = dir.path().join("data");
    assert_eq!(mode(&data), 0o700);
    for file in [
        "cloudfunc.db",
        "cloudfunc.db-wal",
        "cloudfunc.db-shm",
        "jwt.secret",
    ] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    // Another local user reads none of it.
    for file in ["cloudfunc.db", "cloudfunc.db-wal", "jwt.secret"] {
        let out = Command::new("cat")
            .arg(data.join(file))
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert!(!out.status.success(), "uid 65534 read {file}");
    }
    s.stop();
    drop(s);
    // Loosened by hand: tightened at the next start, and said so.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        data.join("cloudfunc.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let s = Server::start_in(dir.path(), "modes", 0, &[]);
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("cloudfunc.db")), 0o600);
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("tightened") && log.contains("755 -> 700"),
        "{log}"
    );
    s.stop();
    s.remove_files();
}

fn rate_limits_and_quotas() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(
        dir.path(),
        "quotas",
        0,
        &[
            "--invocations-per-second",
            "1",
            "--invocation-burst",
            "2",
            "--deploys-per-minute",
            "60",
            "--deploy-burst",
            "2",
            "--max-functions-per-tenant",
            "3",
            "--max-code-mb-per-tenant",
            "1",
        ],
    );
    let (a, b) = (s.token("tenant-a", false), s.token("tenant-b", false));
    let admin = s.token("ops", true);
    let deploy =
        |t: &str, name: &str| common::deploy(&s, t, name, &[("function.py", common::HELLO_PY)]);
    let retry_after = |r: &common::Reply| {
        r.headers
            .iter()
            .find(|(k, _)| k == "retry-after")
            .map(|(_, v)| v.parse::<u64>().unwrap())
    };
    assert_eq!(deploy(&a, "f1").status, 201);
    assert_eq!(deploy(&a, "f2").status, 201);
    let r = deploy(&a, "f3");
    assert_eq!(r.status, 429, "{r:?}");
    assert!(retry_after(&r).is_some_and(|s| s >= 1), "{r:?}");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("deploy rate"));
    // Another tenant has its own bucket.
    assert_eq!(deploy(&b, "g1").status, 201);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(deploy(&a, "f3").status, 201);
    std::thread::sleep(Duration::from_millis(1100));
    // A fourth function passes the cap of three; a new version of one does not.
    let r = deploy(&a, "f4");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body["error"]["code"], "quota_exceeded");
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(deploy(&a, "f1").status, 201);
    // More code than the tenant's 1 MiB: refused, and nothing of it stored.
    std::thread::sleep(Duration::from_millis(1100));
    let big = "x".repeat(2 << 20);
    let r = common::deploy(
        &s,
        &b,
        "huge",
        &[("function.py", common::HELLO_PY), ("blob.txt", &big)],
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("MiB"),
        "{r:?}"
    );
    assert_eq!(common::get(&s, "/api/functions/huge", &b).status, 404);
    // Invocations: a burst of two, then the rate; per tenant; admins are not limited.
    let call = |t: &str, name: &str| {
        common::post_json(
            &s,
            &format!("/api/functions/{name}/invoke"),
            t,
            &serde_json::json!({}),
        )
    };
    assert_eq!(call(&a, "f1").status, 200);
    assert_eq!(call(&a, "f1").status, 200);
    let r = call(&a, "f1");
    assert_eq!(r.status, 429, "{r:?}");
    assert!(retry_after(&r).is_some());
    assert_eq!(call(&b, "g1").status, 200);
    for _ in 0..5 {
        assert_eq!(call(&admin, "f1").status, 200);
    }
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(call(&a, "f1").status, 200);
    s.stop();
    s.remove_files();
}

/// An ES256 key: (its JWK under `kid`, a signer of tokens).
fn es256(kid: &str) -> (serde_json::Value, impl Fn(serde_json::Value) -> String) {
    use base64::Engine;
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING as ALG};
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ALG, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&ALG, pkcs8.as_ref(), &rng).unwrap();
    let point = key.public_key().as_ref().to_vec();
    let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "x": b64(&point[1..33]), "y": b64(&point[33..])});
    let kid = kid.to_string();
    let sign = move |claims: serde_json::Value| {
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
        let input = format!(
            "{}.{}",
            b64(&serde_json::to_vec(&header).unwrap()),
            b64(&serde_json::to_vec(&claims).unwrap())
        );
        let sig = key
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", b64(sig.as_ref()))
    };
    (jwk, sign)
}

fn tokens_from_an_identity_provider() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let (jwk1, sign1) = es256("k1");
    let keys = dir.path().join("idp");
    std::fs::create_dir_all(&keys).unwrap();
    std::fs::write(keys.join("jwks.json"), json!({"keys": [jwk1]}).to_string()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut idp = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&keys)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/jwks.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while ureq::get(&url).call().is_err() {
        assert!(Instant::now() < deadline, "the key server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = Server::start_in(
        dir.path(),
        "jwks",
        0,
        &[
            "--jwks-url",
            &url,
            "--jwt-issuer",
            "https://id.test/",
            "--jwt-audience",
            "cloudfunc",
            "--jwt-tenant-claim",
            "org",
        ],
    );
    let exp = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
        + 300;
    let claims = |org: &str, iss: &str| json!({"iss": iss, "aud": "cloudfunc", "org": org, "sub": "user-1", "exp": exp});
    let good = sign1(claims("acme", "https://id.test/"));
    assert_eq!(
        common::deploy(&s, &good, "hello", &[("function.py", common::HELLO_PY)]).status,
        201
    );
    // The tenant is the org claim: the built-in token of tenant acme sees the same function.
    let builtin = s.token("acme", false);
    assert_eq!(
        common::get(&s, "/api/functions/hello", &builtin).status,
        200
    );
    assert_eq!(
        common::get(&s, "/api/functions/hello", &s.token("user-1", false)).status,
        404
    );
    let r = common::get(
        &s,
        "/api/functions/hello",
        &sign1(claims("acme", "https://evil.test/")),
    );
    assert_eq!(r.status, 401, "{r:?}");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("issuer"),
        "{r:?}"
    );
    // A rotated key: unknown at first, taken once the set is read again.
    let (jwk2, sign2) = es256("k2");
    std::fs::write(keys.join("jwks.json"), json!({"keys": [jwk2]}).to_string()).unwrap();
    let rotated = sign2(claims("acme", "https://id.test/"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = common::get(&s, "/api/functions/hello", &rotated);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 401);
        assert!(
            Instant::now() < deadline,
            "the rotated key was never taken: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = idp.kill();
    let _ = idp.wait();
    s.stop();
    s.remove_files();
}

fn main() {
    let tests: Vec<(&'static str, fn())> = vec![
        ("https_from_files_reloaded_on_sighup", https_from_files),
        (
            "a_self_signed_certificate_for_local_use",
            self_signed_for_local_use,
        ),
        (
            "plain_http_off_loopback_warns",
            plain_http_off_loopback_warns,
        ),
        (
            "the_data_directory_is_private",
            the_data_directory_is_private,
        ),
        ("rate_limits_and_quotas", rate_limits_and_quotas),
        (
            "tokens_from_an_identity_provider",
            tokens_from_an_identity_provider,
        ),
    ];
    common::run_tests("security tests", tests, common::sandboxes_missing());
}
