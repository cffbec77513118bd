//! The REST API. Handlers parse and validate, then call the [`Platform`]; they never touch
//! the kernel. Every route is a row of one table ([`router`]), which both dispatches and
//! writes the OpenAPI document ([`openapi`]); [`routes`] builds the warp filter over it so
//! that tests can drive it without a socket (`warp::test::request()`).
//!
//! Canonical routes live under `/api` (seed 000): [`functions`], [`tasks`], [`system`],
//! [`anomalies`], [`alerts`] (notifications and alert rules), [`chains`].
//! Two other shapes of the same calls sit beside them: the `/functions` JSON API
//! ([`functions_json`], `/execute/{id}`, `/metrics/...`) and the multipart upload API
//! ([`upload`], a Python file and the function's name).

pub mod alerts;
pub mod anomalies;
pub mod body;
pub mod chains;
pub mod dashboard;
mod error;
pub mod functions;
pub mod functions_json;
pub mod openapi;
pub mod router;
mod secrets;
pub mod system;
pub mod tasks;
pub mod upload;

use std::sync::Arc;

use warp::filters::BoxedFilter;
use warp::Filter;

use crate::auth::Keys;
use crate::platform::Platform;

pub use error::ApiError;
pub use router::{Access, Ctx, Route, Table};

/// What every handler needs.
#[derive(Debug, Clone)]
pub struct AppState {
    pub platform: Platform,
    pub keys: Keys,
    /// An identity provider's keys, for RS256 and ES256 tokens.
    pub jwks: Option<Arc<crate::jwks::Jwks>>,
    /// Largest request body (archives included).
    pub max_body_bytes: u64,
    /// Chart.js, served to the dashboard.
    pub chart_js: std::path::PathBuf,
    /// How long a request body may take (the rest of the client limits are the HTTP
    /// server's).
    pub http: crate::http::Limits,
}

/// A submission's `Idempotency-Key` header, if it sent one.
fn idempotency_key(c: &Ctx) -> Result<Option<&str>, ApiError> {
    c.headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str().map_err(|_| {
                ApiError::bad_request("Idempotency-Key must be visible ASCII characters")
            })
        })
        .transpose()
}

/// Marks the reply to a submission sent again under its idempotency key.
fn replayed(response: &mut warp::reply::Response, replayed: bool) {
    if replayed {
        response.headers_mut().insert(
            "idempotent-replayed",
            warp::http::HeaderValue::from_static("true"),
        );
    }
}

/// Every route of the API.
pub fn table() -> Table {
    let mut routes = Vec::new();
    routes.extend(system::routes());
    routes.extend(functions::routes());
    routes.extend(tasks::routes());
    routes.extend(anomalies::routes());
    routes.extend(alerts::routes());
    routes.extend(chains::routes());
    routes.extend(secrets::routes());
    routes.extend(functions_json::routes());
    routes.extend(upload::routes());
    routes.extend(dashboard::routes());
    Table::new(routes)
}

/// The whole API as one warp filter.
pub fn routes(state: AppState) -> BoxedFilter<(warp::reply::Response,)> {
    let table = Arc::new(table());
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    warp::method()
        .and(warp::path::full())
        .and(query)
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(
            move |method, path: warp::path::FullPath, query, headers, body| {
                let (table, state) = (table.clone(), state.clone());
                async move {
                    let head = method == warp::http::Method::HEAD;
                    let response = router::dispatch(
                        table,
                        state,
                        method,
                        path.as_str().to_string(),
                        query,
                        headers,
                        Box::pin(body),
                    )
                    .await;
                    if head {
                        router::head_of(response)
                    } else {
                        response
                    }
                }
            },
        )
        .boxed()
}
