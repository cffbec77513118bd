//! The framing between the host and a sandbox's bootstrap.
//!
//! Each frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON. The host sends
//! one `init` frame, then one frame per invocation; the bootstrap answers each with one reply.
//! Everything read from a sandbox is untrusted: [`FrameReader`] caps frame sizes before
//! allocating and [`parse_reply`] rejects anything that is not a well-formed reply.

use serde::Deserialize;
use serde_json::Value;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Encodes one frame.
pub fn encode(value: &impl serde::Serialize) -> Vec<u8> {
    // The body is written in place after room for its length, which is filled in last.
    let mut frame = vec![0u8; HEADER_LEN];
    serde_json::to_writer(&mut frame, value).expect("a frame's value serialises");
    let len = u32::try_from(frame.len() - HEADER_LEN).expect("frames are far below 4 GiB");
    frame[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    frame
}

/// A frame that could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The announced length is over the limit.
    #[error("the sandbox announced a {announced}-byte reply; the limit is {limit}")]
    TooLarge { announced: usize, limit: usize },
}

/// Reassembles one frame from the bytes of a pipe.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    limit: usize,
}

impl FrameReader {
    /// A reader that refuses bodies over `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
        }
    }

    /// How many more bytes complete the current frame (at least one while it is incomplete).
    pub fn wanted(&self) -> usize {
        match self.announced() {
            None => HEADER_LEN - self.buf.len(),
            Some(n) => HEADER_LEN + n - self.buf.len(),
        }
    }

    fn announced(&self) -> Option<usize> {
        let head: [u8; HEADER_LEN] = self.buf.get(..HEADER_LEN)?.try_into().ok()?;
        Some(u32::from_be_bytes(head) as usize)
    }

    /// Adds bytes, which must not exceed [`FrameReader::wanted`]; returns the body when done.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
        debug_assert!(bytes.len() <= self.wanted());
        self.buf.extend_from_slice(bytes);
        let Some(len) = self.announced() else {
            return Ok(None);
        };
        if len > self.limit {
            return Err(FrameError::TooLarge {
                announced: len,
                limit: self.limit,
            });
        }
        if self.buf.len() < HEADER_LEN + len {
            self.buf.reserve_exact(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        let body = self.buf.split_off(HEADER_LEN);
        self.buf.clear();
        Ok(Some(body))
    }
}

/// What a function's error looks like, in any language.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct FunctionError {
    /// The exception's type (`ValueError`, `TypeError`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its message.
    pub message: String,
    /// The traceback or stack, as the runtime printed it.
    #[serde(default)]
    pub traceback: String,
}

/// A bootstrap's reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The handler is loaded.
    Ready { handler: String, runtime: String },
    /// The handler returned.
    Result(Value),
    /// The handler or the bootstrap reported a failure.
    Failed {
        kind: ReplyFailure,
        error: FunctionError,
    },
}

/// Which failure a bootstrap reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyFailure {
    /// The handler raised or rejected.
    Raised,
    /// The result is not JSON-serialisable.
    NotSerializable,
    /// The result is over the output limit.
    TooLarge,
    /// The handler could not be loaded.
    InitFailed,
}

/// A reply that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the sandbox sent a malformed reply: {0}")]
pub struct ProtocolError(pub String);

#[derive(Deserialize)]
struct RawReply {
    ok: bool,
    #[serde(default)]
    ready: bool,
    #[serde(default)]
    handler: Option<String>,
    #[serde(default)]
    runtime: Option<String>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    error: Option<FunctionError>,
    #[serde(default)]
    recycle: bool,
}

/// Parses one reply body.
pub fn parse_reply(body: &[u8]) -> Result<Reply, ProtocolError> {
    parse_reply_flagged(body).map(|(reply, _)| reply)
}

/// Parses one reply body, and says whether the bootstrap asked to be retired: the call left
/// something running that it could not end (a thread, an unreapable process).
pub fn parse_reply_flagged(body: &[u8]) -> Result<(Reply, bool), ProtocolError> {
    let raw: RawReply = match serde_json::from_slice(body) {
        Ok(raw) => raw,
        Err(e) => return unreadable_result(body).ok_or_else(|| ProtocolError(e.to_string())),
    };
    let recycle = raw.recycle;
    reply_of(raw).map(|reply| (reply, recycle))
}

/// How deep a result may nest arrays and objects. Every document that carries a result (a
/// task, a list of tasks, a chain's run) adds levels of its own, and JSON readers bound their
/// recursion (serde_json, the CLI's and many Rust clients', reads 128 levels): a result of at
/// most 100 stays readable inside any of them.
pub const MAX_RESULT_DEPTH: usize = 100;

/// A well-formed reply whose result is JSON the host will not take: the bootstraps encode
/// with their language's own JSON, which lets through any depth of nesting, a string holding
/// an unpaired UTF-16 surrogate (not Unicode), and integers of any size (Python's). That is
/// the function's failure to return JSON, and the sandbox is as sound as after any failed
/// call: neither a sandbox failure nor a reason to retire it. `None` when the reply is malformed apart from its
/// result (or its result is fine, and something else is not).
fn unreadable_result(body: &[u8]) -> Option<(Reply, bool)> {
    #[derive(Deserialize)]
    struct Shell<'a> {
        ok: bool,
        #[serde(default)]
        ready: bool,
        #[serde(borrow)]
        result: &'a serde_json::value::RawValue,
        #[serde(default)]
        recycle: bool,
    }
    // Reading a value raw checks its syntax without recursing, and leaves escapes undecoded.
    let shell: Shell = serde_json::from_slice(body).ok()?;
    if !shell.ok || shell.ready {
        return None;
    }
    let e = match serde_json::from_str::<Value>(shell.result.get()) {
        // Readable alone (127 levels), one level too many inside the reply's object.
        Ok(result) if deeper_than(&result, MAX_RESULT_DEPTH) => {
            return Some((not_json(too_deep()), shell.recycle))
        }
        Ok(_) => return None,
        Err(e) => e,
    };
    let message = match e.to_string() {
        m if m.starts_with("recursion limit exceeded") => too_deep(),
        m if m.contains("surrogate") || m.starts_with("unexpected end of hex escape") => {
            "the result holds a string with an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is not Unicode text".to_string()
        }
        m if m.starts_with("number out of range") => {
            "the result holds a number beyond a 64-bit float's range (about 1.8e308)".to_string()
        }
        m => format!("the result is not JSON: {m}"),
    };
    Some((not_json(message), shell.recycle))
}

fn too_deep() -> String {
    format!("the result nests arrays and objects more than {MAX_RESULT_DEPTH} levels deep")
}

fn not_json(message: String) -> Reply {
    let error = FunctionError {
        kind: "InvalidJson".into(),
        message,
        traceback: String::new(),
    };
    Reply::Failed {
        kind: ReplyFailure::NotSerializable,
        error,
    }
}

/// Whether `value` nests arrays and objects more than `limit` levels deep (a scalar is none).
/// A value read by serde_json is at most 127 deep, which bounds the recursion.
fn deeper_than(value: &Value, limit: usize) -> bool {
    let deeper = |child: &Value| deeper_than(child, limit - 1);
    match value {
        Value::Array(items) => limit == 0 || items.iter().any(deeper),
        Value::Object(fields) => limit == 0 || fields.values().any(deeper),
        _ => false,
    }
}

fn reply_of(raw: RawReply) -> Result<Reply, ProtocolError> {
    if raw.ok && raw.ready {
        return Ok(Reply::Ready {
            handler: raw.handler.unwrap_or_default(),
            runtime: raw.runtime.unwrap_or_default(),
        });
    }
    if raw.ok {
        let result = raw.result.unwrap_or(Value::Null);
        if deeper_than(&result, MAX_RESULT_DEPTH) {
            return Ok(not_json(too_deep()));
        }
        return Ok(Reply::Result(result));
    }
    let error = raw
        .error
        .ok_or_else(|| ProtocolError("a failure without an error".into()))?;
    let kind = match raw.kind.as_deref() {
        Some("raised") => ReplyFailure::Raised,
        Some("output_not_serializable") => ReplyFailure::NotSerializable,
        Some("output_too_large") => ReplyFailure::TooLarge,
        Some("init_failed") => ReplyFailure::InitFailed,
        other => return Err(ProtocolError(format!("unknown failure kind {other:?}"))),
    };
    Ok(Reply::Failed { kind, error })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read_all(reader: &mut FrameReader, mut bytes: &[u8]) -> Result<Option<Vec<u8>>, FrameError> {
        while !bytes.is_empty() {
            let n = reader.wanted().min(bytes.len());
            if let Some(body) = reader.feed(&bytes[..n])? {
                return Ok(Some(body));
            }
            bytes = &bytes[n..];
        }
        Ok(None)
    }

    #[test]
    fn frames_round_trip_byte_by_byte() {
        let frame = encode(&json!({"ok": true, "result": {"a": [1, 2, 3]}}));
        let mut reader = FrameReader::new(1024);
        let mut body = None;
        for byte in &frame {
            assert!(body.is_none());
            body = reader.feed(std::slice::from_ref(byte)).unwrap();
        }
        let reply = parse_reply(&body.unwrap()).unwrap();
        assert_eq!(reply, Reply::Result(json!({"a": [1, 2, 3]})));
    }

    fn nested(depth: usize) -> String {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    }

    fn not_serializable(body: &str) -> (String, bool) {
        match parse_reply_flagged(body.as_bytes()) {
            Ok((
                Reply::Failed {
                    kind: ReplyFailure::NotSerializable,
                    error,
                },
                recycle,
            )) => (error.message, recycle),
            other => panic!("{body:.80}: {other:?}"),
        }
    }

    #[test]
    fn a_result_the_host_cannot_read_is_the_functions_failure() {
        let (reply, _) =
            parse_reply_flagged(format!(r#"{{"ok":true,"result":{}}}"#, nested(100)).as_bytes())
                .unwrap();
        assert!(matches!(reply, Reply::Result(Value::Array(_))));
        let (reply, _) = parse_reply_flagged(
            format!(
                r#"{{"ok":true,"result":{{"a":[1,{{"b":{}}}]}}}}"#,
                nested(97)
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(matches!(reply, Reply::Result(Value::Object(_))));
        for depth in [101, 126, 127, 128] {
            let (message, recycle) =
                not_serializable(&format!(r#"{{"ok":true,"result":{}}}"#, nested(depth)));
            assert!(
                message.contains("more than 100 levels"),
                "{depth}: {message}"
            );
            assert!(!recycle);
        }
        let (message, _) = not_serializable(&format!(
            r#"{{"ok":true,"result":{{"a":[1,{{"b":{}}}]}}}}"#,
            nested(98)
        ));
        assert!(message.contains("100 levels"), "{message}");
        // Far deeper than any stack would take recursively: read raw, without recursing.
        let deep = format!(
            r#"{{"ok":true,"result":{},"recycle":true}}"#,
            nested(1 << 20)
        );
        let (message, recycle) = not_serializable(&deep);
        assert!(message.contains("100 levels"), "{message}");
        assert!(recycle, "the bootstrap's request to be retired still holds");
        for text in [r#""\ud800""#, r#"["a\udc00b"]"#, r#"{"k":"\ud83d x"}"#] {
            let (message, _) = not_serializable(&format!(r#"{{"ok":true,"result":{text}}}"#));
            assert!(
                message.contains("unpaired UTF-16 surrogate"),
                "{text}: {message}"
            );
        }
        let huge = format!(r#"{{"ok":true,"result":1{}}}"#, "0".repeat(400));
        let (message, _) = not_serializable(&huge);
        assert!(message.contains("64-bit float"), "{message}");
        // A pair is one character, and fine.
        let (reply, _) = parse_reply_flagged(br#"{"ok":true,"result":"\ud83d\ude00"}"#).unwrap();
        assert_eq!(reply, Reply::Result(json!("\u{1f600}")));
    }

    #[test]
    fn a_reply_malformed_beyond_its_result_is_still_refused() {
        for body in [
            r#"{"ok":true,"result":"\ud800""#.to_string(),
            r#"{"ok":true,"ready":true,"result":"\ud800"}"#.to_string(),
            r#"{"ok":false,"kind":"raised","result":"\ud800"}"#.to_string(),
            format!(
                r#"{{"ok":false,"kind":"raised","error":{{"type":"x","message":"y","traceback":{}}}}}"#,
                nested(200)
            ),
        ] {
            assert!(parse_reply_flagged(body.as_bytes()).is_err(), "{body:.80}");
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_allocation() {
        let mut reader = FrameReader::new(10);
        let err = read_all(&mut reader, &[0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                announced: u32::MAX as usize,
                limit: 10
            }
        );
    }

    #[test]
    fn replies_of_every_kind_parse() {
        let ready = parse_reply(
            br#"{"ok":true,"ready":true,"handler":"function.handler","runtime":"3.11"}"#,
        );
        assert!(matches!(ready, Ok(Reply::Ready { .. })));
        let raised = parse_reply(br#"{"ok":false,"kind":"raised","error":{"type":"ValueError","message":"bad","traceback":"tb"}}"#).unwrap();
        assert!(
            matches!(raised, Reply::Failed { kind: ReplyFailure::Raised, ref error } if error.kind == "ValueError")
        );
        assert!(
            parse_reply(br#"{"ok":false,"kind":"weird","error":{"type":"x","message":"y"}}"#)
                .is_err()
        );
        assert!(parse_reply(br#"{"ok":false}"#).is_err());
        assert!(parse_reply(b"garbage").is_err());
    }
}
