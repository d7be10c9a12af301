//! Admission: read the request body within its size and time limits, and parse it just
//! far enough to route (model, stream, user). The bytes are forwarded unchanged.
//! Rate limits and load shedding join here.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::Incoming;
use serde::Deserialize;

use crate::body::CollectError;
use crate::error::ApiError;

/// The routing-relevant head of an OpenAI request body. serde skips every other field
/// without allocating, but still validates that the whole body is JSON.
#[derive(Debug, Deserialize)]
pub struct RequestHead<'a> {
    #[serde(borrow, default)]
    pub model: Option<Cow<'a, str>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(borrow, default)]
    pub user: Option<Cow<'a, str>>,
    /// Chat messages or completion prompt, unparsed: only their first bytes are hashed.
    #[serde(borrow, default)]
    pub messages: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, default)]
    pub prompt: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
}

/// Bytes of the prompt that identify a shared prefix (system prompt, few-shot examples).
const PREFIX_BYTES: usize = 256;

impl RequestHead<'_> {
    fn prompt_text(&self) -> &str {
        self.messages.or(self.prompt).map(|r| r.get()).unwrap_or("")
    }

    /// Hash of the start of the prompt: requests sharing it share a KV-cache prefix.
    pub fn prefix_hash(&self) -> u64 {
        let text = self.prompt_text().as_bytes();
        hash64(&text[..text.len().min(PREFIX_BYTES)])
    }

    /// A rough token estimate (4 bytes a token), corrected later from the answer's usage.
    pub fn prompt_tokens(&self) -> u32 {
        (self.prompt_text().len() / 4).min(u32::MAX as usize) as u32
    }

    /// What the request may cost in tokens, for the tenant's tokens-per-minute budget:
    /// the prompt estimate plus the completion it asks for (256 when it does not say).
    /// (prompt, completion) tokens the request may cost: the prompt's estimate plus the
    /// completion it asks for at most (256 when it does not say).
    pub fn token_estimate(&self) -> (u32, u32) {
        (self.prompt_tokens(), self.max_completion_tokens.or(self.max_tokens).unwrap_or(256))
    }
}

/// The tenant is the API key of `Authorization: Bearer ...`, kept only as a hash.
pub fn tenant_of(headers: &HeaderMap) -> u64 {
    bearer(headers).map(crate::ratelimit::key_hash).unwrap_or(0)
}

/// The token of `Authorization: Bearer <token>`, trimmed.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
}

/// 64-bit FNV-1a with a final mix: stable across restarts and routers.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

pub async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    // Refuse early when the client announces a body over the limit.
    if let Some(len) =
        headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        && len > max_bytes as u64
    {
        return Err(ApiError::body_too_large(max_bytes));
    }
    match tokio::time::timeout(timeout, crate::body::collect_limited(body, max_bytes)).await {
        Err(_) => Err(ApiError::body_timeout()),
        Ok(Err(CollectError::TooLarge)) => Err(ApiError::body_too_large(max_bytes)),
        Ok(Err(CollectError::Body(e))) => Err(ApiError::body_read(e)),
        Ok(Ok(bytes)) => Ok(bytes),
    }
}

pub fn parse_head(body: &[u8]) -> Result<RequestHead<'_>, ApiError> {
    let head: RequestHead<'_> = serde_json::from_slice(body).map_err(ApiError::invalid_json)?;
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_routing_fields_and_ignores_the_rest() {
        let body =
            br#"{"messages":[{"role":"user","content":"hi \"there\""}],"model":"m","stream":true,"user":"u","n":1}"#;
        let head = parse_head(body).unwrap();
        assert_eq!(head.model.as_deref(), Some("m"));
        assert_eq!(head.stream, Some(true));
        assert_eq!(head.user.as_deref(), Some("u"));
    }

    #[test]
    fn rejects_malformed_json_and_non_objects() {
        assert_eq!(parse_head(b"{\"model\": ").unwrap_err().status, 400);
        assert_eq!(parse_head(b"[1,2]").unwrap_err().status, 400);
        assert_eq!(parse_head(b"{\"model\": 3}").unwrap_err().status, 400);
    }

    #[test]
    fn prefix_hash_follows_the_start_of_the_prompt() {
        let long = "x".repeat(400);
        let a = format!(
            r#"{{"model":"m","messages":[{{"role":"system","content":"{long}"}},{{"role":"user","content":"a"}}]}}"#
        );
        let b = format!(
            r#"{{"model":"m","messages":[{{"role":"system","content":"{long}"}},{{"role":"user","content":"b"}}]}}"#
        );
        let c = r#"{"model":"m","messages":[{"role":"user","content":"other"}]}"#;
        let (ha, hb, hc) =
            (parse_head(a.as_bytes()).unwrap(), parse_head(b.as_bytes()).unwrap(), parse_head(c.as_bytes()).unwrap());
        assert_eq!(ha.prefix_hash(), hb.prefix_hash(), "same 256-byte prefix");
        assert_ne!(ha.prefix_hash(), hc.prefix_hash());
        assert!(ha.prompt_tokens() > 100);
    }

    #[test]
    fn tenant_is_a_hash_of_the_bearer_key() {
        let mut h = HeaderMap::new();
        assert_eq!(tenant_of(&h), 0);
        h.insert("authorization", "Bearer sk-1".parse().unwrap());
        let t = tenant_of(&h);
        assert_ne!(t, 0);
        h.insert("authorization", "Bearer sk-2".parse().unwrap());
        assert_ne!(tenant_of(&h), t);
    }

    #[test]
    fn missing_model_is_none() {
        assert!(parse_head(b"{\"prompt\":\"x\"}").unwrap().model.is_none());
    }
}
