//! The route table: each route's method, path template, whether it needs a token, its
//! handler and what the OpenAPI document says of it, in one [`Route`]. The same table
//! dispatches requests and writes the document, so every mounted route is documented and
//! every documented route is mounted.
//!
//! Dispatch matches the path against the templates (`{name}` is one percent-decoded
//! segment), answers 404 or 405 (with `Allow`) when nothing matches, checks the token, and
//! reads the body (capped; 413 from the headers when they announce too much) only then.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::Value;
use warp::http::{HeaderMap, HeaderValue, Method, StatusCode};
use warp::reply::Response;
use warp::Buf;

use super::{ApiError, AppState};
use crate::auth::{AuthError, Caller};

/// What a handler returns.
pub type Reply = Result<Response, ApiError>;

/// A handler: an `async fn(Ctx) -> Reply`, boxed (write `|c| Box::pin(handler(c))`).
pub type Handler = fn(Ctx) -> Pin<Box<dyn Future<Output = Reply> + Send>>;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health, this document, the dashboard's files).
    Public,
    /// A valid bearer token: the handler gets its [`Caller`].
    Token,
}

/// One route.
#[derive(Clone)]
pub struct Route {
    /// Its method.
    pub method: Method,
    /// Its path, as OpenAPI writes it: `/api/functions/{id}/run`.
    pub path: &'static str,
    /// Who may call it.
    pub access: Access,
    /// Whether it reads a request body.
    pub body: bool,
    /// What it does.
    pub handler: Handler,
    /// Its OpenAPI operation, without the errors every route of its kind has (see
    /// [`super::openapi`]).
    pub doc: fn() -> Value,
}

impl Route {
    /// The same operation at another path (another API's shape of it).
    pub fn at(mut self, path: &'static str) -> Route {
        self.path = path;
        self
    }

    /// The same operation under another method.
    pub fn with_method(mut self, method: Method) -> Route {
        self.method = method;
        self
    }
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(&'static str),
    Param,
}

/// The segments of a path, without a trailing slash (`/api/functions/` is `/api/functions`).
fn segments(path: &str) -> impl Iterator<Item = &str> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
    trimmed.split('/').filter(|_| !trimmed.is_empty())
}

fn template(path: &'static str) -> Vec<Segment> {
    segments(path)
        .map(|s| {
            if s.starts_with('{') && s.ends_with('}') {
                Segment::Param
            } else {
                Segment::Literal(s)
            }
        })
        .collect()
}

/// The table, its templates compiled.
#[derive(Debug)]
pub struct Table {
    routes: Vec<(Vec<Segment>, Route)>,
}

/// What matching a request's path and method found.
enum Found<'a> {
    Route(&'a Route, Vec<String>),
    /// The path is known, not with this method: these are.
    Method(Vec<Method>),
    NoRoute,
    /// A parameter is not UTF-8 once percent-decoded.
    BadSegment(String),
}

impl Table {
    /// The table of `routes`; panics on two routes with the same method and shape (a
    /// programming error the route tests catch).
    pub fn new(routes: Vec<Route>) -> Table {
        let mut seen = BTreeSet::new();
        for r in &routes {
            let shape: Vec<String> = template(r.path)
                .iter()
                .map(|s| match s {
                    Segment::Literal(l) => l.to_string(),
                    Segment::Param => "{}".into(),
                })
                .collect();
            assert!(
                seen.insert((r.method.to_string(), shape)),
                "two routes for {r:?}"
            );
        }
        Table {
            routes: routes.into_iter().map(|r| (template(r.path), r)).collect(),
        }
    }

    /// Every route.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter().map(|(_, r)| r)
    }

    fn find(&self, method: &Method, path: &str) -> Found<'_> {
        let parts: Vec<&str> = segments(path).collect();
        // HEAD is answered as GET (RFC 9110 9.3.2); hyper sends the head without the body.
        let method = if method == Method::HEAD {
            &Method::GET
        } else {
            method
        };
        let mut allowed = Vec::new();
        // A literal beats a parameter: among the routes that match, the one whose first
        // differing segment is literal wins (`/api/functions/deploy` over `{id}`).
        let mut best: Option<(&[Segment], &Route)> = None;
        for (tpl, route) in &self.routes {
            if tpl.len() != parts.len() {
                continue;
            }
            let fits = tpl.iter().zip(&parts).all(|(s, p)| match s {
                Segment::Literal(l) => l == p,
                Segment::Param => !p.is_empty(),
            });
            if !fits {
                continue;
            }
            if route.method != *method {
                allowed.push(route.method.clone());
                continue;
            }
            let better = match best {
                None => true,
                Some((other, _)) => tpl
                    .iter()
                    .zip(other)
                    .find(|(a, b)| a != b)
                    .is_some_and(|(a, _)| matches!(a, Segment::Literal(_))),
            };
            if better {
                best = Some((tpl, route));
            }
        }
        let Some((tpl, route)) = best else {
            return if allowed.is_empty() {
                Found::NoRoute
            } else {
                Found::Method(allowed)
            };
        };
        let mut params = Vec::new();
        for (s, p) in tpl.iter().zip(&parts) {
            if *s == Segment::Param {
                match percent_encoding::percent_decode_str(p).decode_utf8() {
                    Ok(decoded) => params.push(decoded.into_owned()),
                    Err(_) => return Found::BadSegment(p.to_string()),
                }
            }
        }
        Found::Route(route, params)
    }
}

/// What a handler is given: the request, taken apart, and the caller.
#[derive(Debug)]
pub struct Ctx {
    /// The server's state.
    pub state: AppState,
    caller: Option<Caller>,
    /// The path's parameters, in order, percent-decoded.
    pub params: Vec<String>,
    /// The query string (without `?`).
    pub query: String,
    /// The request's headers.
    pub headers: HeaderMap,
    /// The body (empty for routes that read none).
    pub body: Bytes,
}

impl Ctx {
    /// A context for a direct call of a handler (tests).
    pub fn new(state: AppState, caller: Option<Caller>) -> Ctx {
        Ctx {
            state,
            caller,
            params: Vec::new(),
            query: String::new(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    /// The caller of a route that needs a token.
    pub fn caller(&self) -> &Caller {
        self.caller
            .as_ref()
            .expect("only routes with Access::Token ask for their caller")
    }

    /// Path parameter `i`.
    pub fn param(&self, i: usize) -> &str {
        &self.params[i]
    }

    /// The query string as `T`; 400 naming the parameter, with serde's reason, if it does
    /// not fit.
    pub fn query<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let de =
            serde_urlencoded::Deserializer::new(url::form_urlencoded::parse(self.query.as_bytes()));
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            ApiError::bad_request(match path.as_str() {
                "." | "?" => format!("invalid query string: {}", e.inner()),
                _ => format!("query parameter {path}: {}", e.inner()),
            })
        })
    }

    /// The content type, if one was sent.
    pub fn content_type(&self) -> Option<&str> {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
    }
}

/// Reads `body` into memory, up to `limit` bytes, within the body timeouts of `http`: 408
/// when the client stops sending, or sends too slowly.
async fn read_body<S, B>(
    mut body: S,
    limit: u64,
    http: &crate::http::Limits,
) -> Result<Bytes, ApiError>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let mut out = BytesMut::new();
    let deadline = tokio::time::Instant::now() + http.body_timeout;
    loop {
        let wait = http
            .body_idle_timeout
            .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let chunk = match tokio::time::timeout(wait, body.next()).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request body did not arrive in time",
                ))
            }
        };
        let mut chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("the body could not be read: {e}")))?;
        if (out.len() + chunk.remaining()) as u64 > limit {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(out.freeze())
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "the body is over the server's size limit",
    )
}

/// `response` without its body, saying how long the body was where that is known: the answer
/// to a HEAD request, which the table answers as GET. hyper leaves the body out of an HTTP/1
/// answer to HEAD, not out of an HTTP/2 one, where a body after HEAD is a protocol error to
/// the client.
pub fn head_of(response: Response) -> Response {
    use warp::hyper::body::Body as _;
    let (mut parts, body) = response.into_parts();
    if let Some(n) = body.size_hint().exact() {
        parts.headers.insert("content-length", HeaderValue::from(n));
    }
    Response::from_parts(parts, Default::default())
}

/// Answers one request from the table (a HEAD request as GET: see [`head_of`]).
pub async fn dispatch<S, B>(
    table: Arc<Table>,
    state: AppState,
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
    body: S,
) -> Response
where
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let (route, params) = match table.find(&method, &path) {
        Found::Route(route, params) => (route, params),
        Found::Method(allowed) => {
            // OPTIONS asks what a path takes (RFC 9110 9.3.7): no route has it, so it lands
            // here, and is answered rather than refused.
            let mut response = if method == Method::OPTIONS {
                let mut ok = Response::new(Default::default());
                *ok.status_mut() = StatusCode::NO_CONTENT;
                ok
            } else {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "this route does not take that method",
                )
                .reply()
            };
            if let Ok(v) = HeaderValue::from_str(&allow(&allowed)) {
                response.headers_mut().insert("allow", v);
            }
            return response;
        }
        Found::NoRoute => {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                "no such route; GET /api/openapi.json lists them",
            )
            .reply()
        }
        Found::BadSegment(raw) => {
            return ApiError::bad_request(format!(
                "path segment {raw:?} is not UTF-8 once percent-decoded"
            ))
            .reply()
        }
    };
    let caller = match route.access {
        Access::Public => None,
        Access::Token => match authenticate(&state, &headers) {
            Ok(caller) => Some(caller),
            Err(e) => return ApiError::unauthorized(e).reply(),
        },
    };
    let body = if route.body {
        if let Some(coding) = encoded(&headers) {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("the body is sent with Content-Encoding {coding:?}; send it unencoded"),
            )
            .reply();
        }
        let limit = state.max_body_bytes;
        let announced = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > limit) {
            return too_large().reply();
        }
        match read_body(body, limit, &state.http).await {
            Ok(body) => body,
            Err(e) => return e.reply(),
        }
    } else {
        Bytes::new()
    };
    let ctx = Ctx {
        state,
        caller,
        params,
        query,
        headers,
        body,
    };
    match (route.handler)(ctx).await {
        Ok(response) => response,
        Err(e) => e.reply(),
    }
}

/// The `Allow` header of a path whose routes take `methods`: each once, HEAD wherever GET
/// is, and OPTIONS, which every known path answers.
fn allow(methods: &[Method]) -> String {
    let mut all: Vec<&str> = methods.iter().map(Method::as_str).collect();
    if methods.contains(&Method::GET) {
        all.push(Method::HEAD.as_str());
    }
    all.push(Method::OPTIONS.as_str());
    let mut seen = BTreeSet::new();
    all.retain(|m| seen.insert(*m));
    all.join(", ")
}

/// The content coding of a request's body, unless it is none (`identity`): the bodies read
/// here are JSON, ZIP or forms as sent, and a compressed one would only fail to parse.
fn encoded(headers: &HeaderMap) -> Option<String> {
    let coding = headers.get("content-encoding")?;
    let coding = String::from_utf8_lossy(coding.as_bytes())
        .trim()
        .to_string();
    (!coding.is_empty() && !coding.eq_ignore_ascii_case("identity")).then_some(coding)
}

/// The caller, from a valid bearer token.
fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, AuthError> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .ok_or(AuthError::Missing)?;
    let (token, now) = (token.trim(), crate::model::now_ms() / 1000);
    if let Some(caller) = state.keys.remembered(token, now) {
        return Ok(caller);
    }
    // Each algorithm is checked only against keys of its own kind.
    match (crate::jwks::algorithm(token).as_deref(), &state.jwks) {
        (Some("RS256" | "ES256"), Some(jwks)) => jwks.verify(token, now),
        _ => state.keys.verify(token, now),
    }
}

/// `body` as JSON with `status`.
pub fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let mut response = Response::new(serde_json::to_vec(body).unwrap_or_default().into());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: Method, path: &'static str) -> Route {
        Route {
            method,
            path,
            access: Access::Public,
            body: false,
            handler: |_| Box::pin(async { Err(ApiError::bad_request("unused")) }),
            doc: || Value::Null,
        }
    }

    #[test]
    fn literals_win_parameters_decode_and_methods_are_listed() {
        let table = Table::new(vec![
            route(Method::GET, "/api/functions/{id}"),
            route(Method::POST, "/api/functions/deploy"),
            route(Method::PUT, "/api/functions/{id}"),
            route(Method::GET, "/api/functions/"),
        ]);
        let found = |m: Method, p: &str| match table.find(&m, p) {
            Found::Route(r, params) => format!("{} {params:?}", r.path),
            Found::Method(allowed) => format!("405 {allowed:?}"),
            Found::NoRoute => "404".into(),
            Found::BadSegment(s) => format!("400 {s}"),
        };
        assert_eq!(
            found(Method::GET, "/api/functions/hello%401"),
            "/api/functions/{id} [\"hello@1\"]"
        );
        assert_eq!(
            found(Method::POST, "/api/functions/deploy"),
            "/api/functions/deploy []"
        );
        assert_eq!(found(Method::GET, "/api/functions"), "/api/functions/ []");
        assert_eq!(found(Method::GET, "/api/functions/"), "/api/functions/ []");
        assert_eq!(found(Method::DELETE, "/api/functions/x"), "405 [GET, PUT]");
        assert_eq!(
            found(Method::HEAD, "/api/functions/x"),
            "/api/functions/{id} [\"x\"]"
        );
        assert_eq!(
            found(Method::HEAD, "/api/functions/deploy"),
            "/api/functions/{id} [\"deploy\"]"
        );
        assert_eq!(found(Method::OPTIONS, "/api/functions/x"), "405 [GET, PUT]");
        assert_eq!(found(Method::GET, "/api/nothing"), "404");
        assert_eq!(found(Method::GET, "/api/functions/%ff"), "400 %ff");
        assert_eq!(found(Method::GET, "/api/functions//"), "404");
    }

    #[test]
    fn allow_lists_each_method_once_with_head_and_options() {
        assert_eq!(
            allow(&[Method::GET, Method::PUT, Method::GET]),
            "GET, PUT, HEAD, OPTIONS"
        );
        assert_eq!(allow(&[Method::POST]), "POST, OPTIONS");
    }

    #[test]
    fn only_an_identity_body_is_read() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("content-encoding", HeaderValue::from_static(v));
            encoded(&h)
        };
        assert_eq!(encoded(&HeaderMap::new()), None);
        assert_eq!(with("identity"), None);
        assert_eq!(with("Identity "), None);
        assert_eq!(with("gzip"), Some("gzip".to_string()));
        assert_eq!(with("br"), Some("br".to_string()));
    }

    #[test]
    #[should_panic(expected = "two routes")]
    fn two_routes_of_one_shape_are_refused() {
        Table::new(vec![
            route(Method::GET, "/a/{x}"),
            route(Method::GET, "/a/{y}"),
        ]);
    }
}
