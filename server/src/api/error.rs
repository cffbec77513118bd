//! One JSON shape for every error: `{"error": {"code": ..., "message": ...}}`. A client's
//! mistake gets a 4xx that says what to fix; our own failure a 500 that leaks nothing and is
//! logged with its cause.

use std::convert::Infallible;

use serde_json::json;
use warp::http::StatusCode;
use warp::reject::Reject;
use warp::{Rejection, Reply};

use crate::auth::AuthError;
use crate::platform::PlatformError;

/// An error with its status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl Reject for ApiError {}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized(e: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    }

    pub fn reply(&self) -> warp::reply::Response {
        let body =
            warp::reply::json(&json!({"error": {"code": self.code, "message": self.message}}));
        let mut response = warp::reply::with_status(body, self.status).into_response();
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
            PlatformError::TooBusy {
                message,
                retry_after,
            } => ApiError {
                retry_after: Some(retry_after.as_secs().max(1)),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_busy", message)
            },
            PlatformError::Internal(cause) => {
                eprintln!("cloudfunc: internal error: {cause:#}");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server log",
                )
            }
        }
    }
}

/// Turns a platform result into a rejection the recover step renders.
pub fn reject(e: PlatformError) -> Rejection {
    warp::reject::custom(ApiError::from(e))
}

/// Renders every rejection as the one JSON shape.
pub async fn recover(rejection: Rejection) -> Result<warp::reply::Response, Infallible> {
    let error = if let Some(e) = rejection.find::<ApiError>() {
        return Ok(e.reply());
    } else if rejection.is_not_found() {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route; GET /api/openapi.json lists them",
        )
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the body is over the server's size limit",
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "send a Content-Length header with the body",
        )
    } else if rejection
        .find::<warp::reject::UnsupportedMediaType>()
        .is_some()
    {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "use application/json, application/zip or multipart/form-data as documented",
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    } else if let Some(e) = rejection.find::<warp::reject::InvalidQuery>() {
        ApiError::bad_request(format!("invalid query string: {e}"))
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request(format!("invalid header: {e}"))
    } else if let Some(e) = rejection.find::<warp::reject::MissingHeader>() {
        ApiError::bad_request(format!("missing header: {e}"))
    } else if let Some(e) = rejection.find::<warp::filters::body::BodyDeserializeError>() {
        ApiError::bad_request(format!("the body is not valid: {e}"))
    } else {
        eprintln!("cloudfunc: unhandled rejection: {rejection:?}");
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the request could not be handled as sent",
        )
    };
    Ok(error.reply())
}
