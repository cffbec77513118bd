//! Reading what clients send: deploy bodies (a multipart form or a raw ZIP with settings in
//! the query), payloads, and time ranges.

use std::collections::HashMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use warp::http::StatusCode;

use super::ApiError;
use crate::platform::{Code, Settings};

/// The body of a deploy, whatever its content type.
#[derive(Debug)]
pub struct DeployBody {
    /// Settings from the form's fields or the query string.
    pub settings: Settings,
    /// The code.
    pub code: Code,
}

/// Settings from text fields; 400 with what to fix.
pub fn settings_from_fields(fields: &HashMap<String, String>) -> Result<Settings, ApiError> {
    Settings::from_fields(fields).map_err(ApiError::bad_request)
}

/// A file of a multipart form: its field, its file name, its bytes.
pub type FormFile = (String, Option<String>, Bytes);

/// Reads a multipart form: text fields, and files by field name.
pub async fn read_form(
    content_type: &str,
    body: Bytes,
    limit: u64,
) -> Result<(HashMap<String, String>, Vec<FormFile>), ApiError> {
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::bad_request(format!("bad multipart content type: {e}")))?;
    let stream = futures_util::stream::once(async move { Ok::<_, std::convert::Infallible>(body) });
    let constraints =
        multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(limit));
    let mut form = multer::Multipart::with_constraints(stream, boundary, constraints);
    let mut fields = HashMap::new();
    let mut files = Vec::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(format!("bad multipart body: {e}")))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().map(String::from);
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::bad_request(format!("bad multipart body: {e}")))?;
        if filename.is_some() {
            files.push((name, filename, data));
        } else {
            let text = String::from_utf8(data.to_vec()).map_err(|_| {
                ApiError::bad_request(format!("form field {name:?} is not UTF-8 text"))
            })?;
            fields.insert(name, text);
        }
    }
    Ok((fields, files))
}

/// Whether `data` starts like a ZIP archive.
pub fn looks_like_zip(data: &[u8]) -> bool {
    data.starts_with(b"PK\x03\x04") || data.starts_with(b"PK\x05\x06")
}

/// The deploy body: a multipart form (a ZIP under any file field, or single code files, plus
/// settings fields) or a raw `application/zip` body with settings in the query string.
pub async fn deploy_body(
    content_type: Option<&str>,
    query: &HashMap<String, String>,
    body: Bytes,
    limit: u64,
) -> Result<DeployBody, ApiError> {
    let ct = content_type.unwrap_or_default();
    if ct.starts_with("multipart/form-data") {
        let (fields, files) = read_form(ct, body, limit).await?;
        let mut settings = settings_from_fields(&fields)?;
        let zip = files.iter().find(|(_, filename, data)| {
            filename.as_deref().is_some_and(|f| f.ends_with(".zip")) || looks_like_zip(data)
        });
        let code = match zip {
            Some((_, _, data)) => Code::Zip(data.clone()),
            None if !files.is_empty() => Code::Files(
                files
                    .iter()
                    .map(|(field, filename, data)| {
                        let name = filename.clone().unwrap_or_else(|| field.clone());
                        let name = std::path::Path::new(&name)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or(name);
                        (name, data.to_vec())
                    })
                    .collect(),
            ),
            None => {
                return Err(ApiError::bad_request(
                    "the form has no file: send the ZIP (or a code file) as a file field",
                ))
            }
        };
        if settings.name.is_none() {
            settings.name = files
                .iter()
                .find_map(|(_, f, _)| f.as_deref().and_then(name_of_file));
        }
        return Ok(DeployBody { settings, code });
    }
    if ct.starts_with("application/zip")
        || ct.starts_with("application/octet-stream")
        || ct.starts_with("application/x-zip")
    {
        if body.is_empty() {
            return Err(ApiError::bad_request(
                "the body is empty: send the ZIP archive",
            ));
        }
        return Ok(DeployBody {
            settings: settings_from_fields(query)?,
            code: Code::Zip(body),
        });
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "send the ZIP as multipart/form-data (field 'file') or as an application/zip body",
    ))
}

/// A function name made of a file's name: `My Func.zip` is `my_func`.
pub fn name_of_file(filename: &str) -> Option<String> {
    let stem = std::path::Path::new(filename).file_stem()?;
    crate::model::name_from(&stem.to_string_lossy())
}

/// The JSON text of a body: a leading UTF-8 byte order mark, which JSON forbids senders to
/// add and lets parsers ignore (RFC 8259 8.1), is left out. Some clients add one (Windows
/// PowerShell writing UTF-8, for one).
pub fn json_text(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body)
}

/// A run's payload: any JSON value; an empty body means `{}`.
pub fn payload(body: &Bytes) -> Result<Value, ApiError> {
    let text = json_text(body);
    if text.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(text)
        .map_err(|e| ApiError::bad_request(format!("the payload must be JSON: {e}")))
}

/// A body holding one JSON object, `{}` when empty. Anything else is refused: serde would
/// read an array into a struct's fields by position (`[null, null, "x"]` as its third).
pub fn json_or_empty<T: serde::de::DeserializeOwned>(
    body: &Bytes,
    what: &str,
) -> Result<T, ApiError> {
    let text = json_text(body);
    let text: &[u8] = match text.iter().find(|b| !b.is_ascii_whitespace()) {
        None => b"{}",
        Some(b'{') => text,
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "{what}: must be a JSON object, as {{\"field\": value, ...}}"
            )))
        }
    };
    from_json(text).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
}

/// `T` from JSON `text`; an error names the field where it failed (`limits.memory_mb:
/// invalid type...`), as serde alone does not.
fn from_json<T: serde::de::DeserializeOwned>(text: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// A time range: `since`/`until` in Unix milliseconds, or `range` like `15m`, `1h`, `7d`;
/// and a `step` for series, like `1m`, `1h`, `1d`.
#[derive(Debug, Deserialize, Default)]
pub struct RangeQuery {
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub range: Option<String>,
    pub step: Option<String>,
}

/// A span like `15m`, `1h` or `7d` in milliseconds.
pub fn span_ms(what: &str, text: &str) -> Result<i64, ApiError> {
    // Split off the last character, not the last byte: the text may be any UTF-8.
    let cut = text.char_indices().last().map_or(0, |(i, _)| i);
    let (n, unit) = text.split_at(cut);
    let n: i64 = n.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
        ApiError::bad_request(format!("{what} {text:?} must look like 15m, 1h or 7d"))
    })?;
    let ms = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(ApiError::bad_request(format!(
                "{what} {text:?} must end in s, m, h or d"
            )))
        }
    };
    Ok(n.saturating_mul(ms))
}

impl RangeQuery {
    /// The step in milliseconds, when one is asked for.
    pub fn step(&self) -> Result<Option<i64>, ApiError> {
        self.step.as_deref().map(|s| span_ms("step", s)).transpose()
    }

    /// The range as `[since, until)` in Unix milliseconds (the last day by default).
    pub fn resolve(&self) -> Result<(i64, i64), ApiError> {
        let out_of_range = || {
            ApiError::bad_request("since and until are Unix milliseconds between 0 and year 9999")
        };
        const MAX_MS: i64 = 253_402_300_799_999;
        let valid = |ms: i64| (0..=MAX_MS).contains(&ms);
        let until = self.until.unwrap_or_else(|| crate::model::now_ms() + 1);
        if !valid(until) {
            return Err(out_of_range());
        }
        let since = match (&self.since, &self.range) {
            (Some(s), _) => *s,
            (None, Some(r)) => until.saturating_sub(span_ms("range", r)?).max(0),
            (None, None) => until.saturating_sub(86_400_000).max(0),
        };
        if !valid(since) {
            return Err(out_of_range());
        }
        if since >= until {
            return Err(ApiError::bad_request("since must be before until"));
        }
        Ok((since, until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_order_mark_before_json_is_ignored() {
        let bom = |text: &str| Bytes::from([b"\xef\xbb\xbf".as_slice(), text.as_bytes()].concat());
        assert_eq!(payload(&bom(r#"{"a": 1}"#)).unwrap(), json!({"a": 1}));
        assert_eq!(payload(&bom("")).unwrap(), json!({}));
        let empty: Value = json_or_empty(&bom(" "), "settings").unwrap();
        assert_eq!(empty, json!({}));
        // An object only: an array would fill a struct's fields by position.
        for other in ["[null, \"x\"]", "[]", "3", "\"a\"", "null"] {
            let e = json_or_empty::<Value>(&Bytes::from(other), "the rule").unwrap_err();
            assert!(
                format!("{e:?}").contains("must be a JSON object"),
                "{other}: {e:?}"
            );
        }
        // Only at the start: inside the text it is not JSON.
        assert!(payload(&Bytes::from_static(b"[1, \xef\xbb\xbf2]")).is_err());
    }

    #[test]
    fn spans_parse_and_odd_text_is_refused_not_panicked_on() {
        assert_eq!(span_ms("step", "5m").unwrap(), 300_000);
        assert_eq!(span_ms("range", "7d").unwrap(), 7 * 86_400_000);
        for bad in [
            "", "m", "0m", "-1h", "5", "5x", "\u{80}", "1\u{80}", "5€", "€m",
        ] {
            assert!(span_ms("step", bad).is_err(), "{bad:?}");
        }
        let q = RangeQuery {
            range: Some("\u{80}".into()),
            ..RangeQuery::default()
        };
        assert!(q.resolve().is_err());
    }
}
