//! The dashboard: one HTML page, its script and style compiled in, and Chart.js read from
//! the host (Debian's `libjs-chart.js`, installed by the set-up script), never fetched from
//! the internet. The page holds no data; it calls the API with the token the user signs in
//! with.

use serde_json::Value;
use warp::http::{HeaderValue, Method, StatusCode};
use warp::reply::Response;

use super::openapi::op_text;
use super::router::{Access, Ctx, Handler, Reply, Route};
use super::ApiError;

const INDEX: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const CHAINS_JS: &str = include_str!("../../ui/chains.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: impl Into<warp::hyper::body::Bytes>) -> Response {
    let mut response = Response::new(body.into().into());
    let headers = response.headers_mut();
    for (name, value) in [
        ("content-type", content_type),
        ("cache-control", "no-cache"),
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn chart_js(c: Ctx) -> Reply {
    match tokio::fs::read(&c.state.chart_js).await {
        Ok(bytes) => Ok(asset("text/javascript; charset=utf-8", bytes)),
        Err(e) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "Chart.js is not at {} ({e}); install Debian's libjs-chart.js or pass --chart-js",
                c.state.chart_js.display()
            ),
        )),
    }
}

fn public(path: &'static str, handler: Handler, doc: fn() -> Value) -> Route {
    Route {
        method: Method::GET,
        path,
        access: Access::Public,
        body: false,
        handler,
        doc,
    }
}

/// `GET /` and the page's assets under `/ui/`; no token needed, the page asks for one.
pub fn routes() -> Vec<Route> {
    vec![
        public(
            "/",
            |_| Box::pin(async { Ok(asset("text/html; charset=utf-8", INDEX)) }),
            || op_text("The dashboard (it asks for a token)", "text/html", &[]),
        ),
        public(
            "/ui/app.js",
            |_| Box::pin(async { Ok(asset("text/javascript; charset=utf-8", APP_JS)) }),
            || op_text("The dashboard's script", "text/javascript", &[]),
        ),
        public(
            "/ui/chains.js",
            |_| Box::pin(async { Ok(asset("text/javascript; charset=utf-8", CHAINS_JS)) }),
            || op_text("The dashboard's chain pages", "text/javascript", &[]),
        ),
        public(
            "/ui/app.css",
            |_| Box::pin(async { Ok(asset("text/css; charset=utf-8", APP_CSS)) }),
            || op_text("The dashboard's style", "text/css", &[]),
        ),
        public(
            "/ui/chart.js",
            |c| Box::pin(chart_js(c)),
            || op_text("Chart.js, read from the host", "text/javascript", &["404"]),
        ),
    ]
}
