//! The REST API. Handlers parse and validate, then call the [`Platform`]; they never touch
//! the kernel. [`routes`] builds the whole tree so tests can drive it without a socket.
//!
//! Canonical routes live under `/api` (seed 000). Seed 002's and seed 004's routes are thin
//! adapters over the same platform calls ([`compat`]).

mod compat;
pub mod dashboard;
mod error;
mod functions;
mod monitor;
pub mod openapi;

use std::convert::Infallible;

use warp::filters::BoxedFilter;
use warp::{Filter, Rejection, Reply};

use crate::auth::{AuthError, Caller, Keys};
use crate::platform::Platform;

pub use error::ApiError;

/// What every handler needs.
#[derive(Debug, Clone)]
pub struct AppState {
    pub platform: Platform,
    pub keys: Keys,
    /// Largest request body (archives included).
    pub max_body_bytes: u64,
    /// Chart.js, served to the dashboard.
    pub chart_js: std::path::PathBuf,
}

fn with_state(state: AppState) -> impl Filter<Extract = (AppState,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// One path segment, percent-decoded (clients may send `name%401` for `name@1`); 400 if it
/// is not UTF-8 once decoded.
fn segment() -> impl Filter<Extract = (String,), Error = Rejection> + Clone {
    warp::path::param::<String>().and_then(|raw: String| async move {
        percent_encoding::percent_decode_str(&raw)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| {
                warp::reject::custom(ApiError::bad_request(format!(
                    "path segment {raw:?} is not UTF-8 once percent-decoded"
                )))
            })
    })
}

/// The caller, from a valid bearer token; 401 otherwise.
fn caller(keys: Keys) -> impl Filter<Extract = (Caller,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization").and_then(move |header: Option<String>| {
        let keys = keys.clone();
        async move {
            let token = header
                .as_deref()
                .and_then(|h| {
                    h.strip_prefix("Bearer ")
                        .or_else(|| h.strip_prefix("bearer "))
                })
                .ok_or(AuthError::Missing)
                .map_err(|e| warp::reject::custom(ApiError::unauthorized(e)))?;
            let now = crate::model::now_ms() / 1000;
            keys.verify(token.trim(), now)
                .map_err(|e| warp::reject::custom(ApiError::unauthorized(e)))
        }
    })
}

/// Every route.
pub fn routes(state: AppState) -> BoxedFilter<(warp::reply::Response,)> {
    let health = warp::path!("api" / "system" / "health")
        .and(warp::get())
        .and(with_state(state.clone()))
        .and_then(functions::health);
    let openapi = warp::path!("api" / "openapi.json")
        .and(warp::get())
        .map(|| warp::reply::json(&openapi::document()));
    let authed = functions::routes(state.clone())
        .or(monitor::routes(state.clone()))
        .unify()
        .or(compat::routes(state.clone()))
        .unify();
    health
        .map(Reply::into_response)
        .or(openapi.map(Reply::into_response))
        .unify()
        .or(dashboard::routes(state.clone()))
        .unify()
        .or(authed)
        .unify()
        .recover(error::recover)
        .unify()
        .boxed()
}
