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
    let raw: RawReply = serde_json::from_slice(body).map_err(|e| ProtocolError(e.to_string()))?;
    let recycle = raw.recycle;
    reply_of(raw).map(|reply| (reply, recycle))
}

fn reply_of(raw: RawReply) -> Result<Reply, ProtocolError> {
    if raw.ok && raw.ready {
        return Ok(Reply::Ready {
            handler: raw.handler.unwrap_or_default(),
            runtime: raw.runtime.unwrap_or_default(),
        });
    }
    if raw.ok {
        return Ok(Reply::Result(raw.result.unwrap_or(Value::Null)));
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
