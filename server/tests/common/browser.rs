//! A real browser for dashboard tests: headless Chromium driven through chromedriver's
//! WebDriver HTTP API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::request;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHART_JS: &str = "/usr/share/javascript/chart.js/chart.min.js";

/// What is missing for a browser test, if anything.
pub fn missing() -> Option<String> {
    [CHROMIUM, CHROMEDRIVER, CHART_JS]
        .iter()
        .find(|p| !Path::new(p).exists())
        .map(|p| {
            format!("{p} is not installed (apt install chromium chromium-driver libjs-chart.js)")
        })
}

/// A chromedriver process and one browser session, spoken to over WebDriver's HTTP API.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    pub fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
            || request("GET", &format!("{base}/status"), None, None).body["value"]["ready"] != true
        {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--window-size=1400,1700"
            ]}
        }}});
        let r = request(
            "POST",
            &format!("{base}/session"),
            None,
            Some(("application/json", serde_json::to_vec(&caps).unwrap())),
        );
        let session = r.body["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {r:?}"))
            .to_string();
        Browser {
            driver,
            base,
            session,
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let body =
            (method == "POST").then(|| ("application/json", serde_json::to_vec(&body).unwrap()));
        let r = request(method, &url, None, body);
        assert_eq!(r.status, 200, "{method} {path}: {r:?}");
        r.body["value"].clone()
    }

    pub fn go(&self, url: &str) {
        self.call("POST", "/url", json!({"url": url}));
    }

    pub fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    pub fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap()
            .to_string()
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            json!({"text": text}),
        );
    }

    pub fn click(&self, css: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/click"), json!({}));
    }

    /// Polls `script` (an expression) until it is true.
    pub fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.js(&format!("return !!({script});")) == json!(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: still not true: {script}; page says {}",
                self.js("return document.getElementById('problem').textContent + ' / ' + JSON.stringify(window.cloudfunc && window.cloudfunc.state.last && window.cloudfunc.state.last.metrics && window.cloudfunc.state.last.metrics.invocations)")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let png = self.call("GET", "/screenshot", Value::Null);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
        println!("screenshot: {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::panic::catch_unwind(|| request("DELETE", &url, None, None));
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Screenshots go to the repository's ignored output folder, kept as CI artifacts.
pub fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../out/dashboard")
}
