//! The dashboard: one HTML page, its script and style compiled in, and Chart.js read from
//! the host (Debian's `libjs-chart.js`, installed by the set-up script), never fetched from
//! the internet. The page holds no data; it calls the API with the token the user signs in
//! with.

use warp::filters::BoxedFilter;
use warp::http::HeaderValue;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::{with_state, ApiError, AppState};

const INDEX: &str = include_str!("../../ui/index.html");
const APP_JS: &str = include_str!("../../ui/app.js");
const APP_CSS: &str = include_str!("../../ui/app.css");

/// Where Debian's `libjs-chart.js` puts Chart.js.
pub const DEFAULT_CHART_JS: &str = "/usr/share/javascript/chart.js/chart.min.js";

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: impl Reply) -> Response {
    let mut response = body.into_response();
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

async fn chart_js(state: AppState) -> Result<Response, Rejection> {
    match tokio::fs::read(&state.chart_js).await {
        Ok(bytes) => Ok(asset("text/javascript; charset=utf-8", bytes)),
        Err(e) => Err(warp::reject::custom(ApiError::new(
            warp::http::StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "Chart.js is not at {} ({e}); install Debian's libjs-chart.js or pass --chart-js",
                state.chart_js.display()
            ),
        ))),
    }
}

/// `GET /` and the page's assets under `/ui/`; no token needed, the page asks for one.
pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let index = warp::path::end()
        .and(warp::get())
        .map(|| asset("text/html; charset=utf-8", INDEX));
    let app_js = warp::path!("ui" / "app.js")
        .and(warp::get())
        .map(|| asset("text/javascript; charset=utf-8", APP_JS));
    let app_css = warp::path!("ui" / "app.css")
        .and(warp::get())
        .map(|| asset("text/css; charset=utf-8", APP_CSS));
    let chart = warp::path!("ui" / "chart.js")
        .and(warp::get())
        .and(with_state(state))
        .and_then(chart_js);
    index
        .or(app_js)
        .unify()
        .or(app_css)
        .unify()
        .or(chart)
        .unify()
        .boxed()
}
