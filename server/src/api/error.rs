//! One JSON shape for every error: `{"error": {"code": ..., "message": ...}}`. A client's
//! mistake gets a 4xx that says what to fix; our own failure a 500 that leaks nothing and is
//! logged with its cause.

use serde_json::json;
use warp::http::StatusCode;

use crate::auth::AuthError;
use crate::platform::PlatformError;

/// An error with its status.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A short machine-readable code (`bad_request`, `not_found`, ...).
    pub code: &'static str,
    /// What went wrong and what to fix.
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with `status`, a short machine `code` and a message that says what to fix.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same error, telling the client to come back after `after` (at least a second).
    pub fn retry_after(self, after: std::time::Duration) -> Self {
        ApiError {
            retry_after: Some(after.as_secs().max(1)),
            ..self
        }
    }

    /// A 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A 401 for an authentication failure.
    pub fn unauthorized(e: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    }

    /// The error as a response: its status, the JSON body, and `WWW-Authenticate` or
    /// `Retry-After` where they belong.
    pub fn reply(&self) -> warp::reply::Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut response = super::router::json(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                "www-authenticate",
                warp::http::HeaderValue::from_static("Bearer"),
            );
        }
        if let Some(secs) = self.retry_after {
            if let Ok(v) = warp::http::HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert("retry-after", v);
            }
        }
        response
    }
}

impl From<PlatformError> for ApiError {
    fn from(e: PlatformError) -> Self {
        match e {
            PlatformError::BadRequest(m) => {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m)
            }
            PlatformError::Unprocessable(m) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "function_does_not_load",
                m,
            ),
            PlatformError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
            e @ PlatformError::Inactive(_) => {
                ApiError::new(StatusCode::CONFLICT, "function_inactive", e.to_string())
            }
            PlatformError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            PlatformError::InsufficientStorage(m) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage", m)
            }
            PlatformError::QuotaExceeded(m) => {
                ApiError::new(StatusCode::FORBIDDEN, "quota_exceeded", m)
            }
            PlatformError::TooBusy {
                message,
                retry_after,
            } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_busy", message)
                .retry_after(retry_after),
            PlatformError::Unavailable {
                message,
                retry_after,
            } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
                .retry_after(retry_after),
            PlatformError::Forbidden(m) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", m),
            PlatformError::Damaged(m) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "record_damaged",
                format!("{m}; it is not served (the rest of the data is unaffected)"),
            ),
            PlatformError::Internal(cause) => {
                tracing::error!(cause = format!("{cause:#}"), "internal error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server log",
                )
            }
        }
    }
}
