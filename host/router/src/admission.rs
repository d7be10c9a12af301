//! Admission: read the request body within its size and time limits, and parse it just
//! far enough to route (model, stream, user). The bytes are forwarded unchanged.
//! Rate limits and load shedding join here.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

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
}

pub async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    // Refuse early when the client announces a body over the limit.
    if let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max_bytes as u64
    {
        return Err(ApiError::body_too_large(max_bytes));
    }
    match tokio::time::timeout(timeout, Limited::new(body, max_bytes).collect()).await {
        Err(_) => Err(ApiError::body_timeout()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(ApiError::body_too_large(max_bytes)),
        Ok(Err(e)) => Err(ApiError::body_read(e)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
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
        let body = br#"{"messages":[{"role":"user","content":"hi \"there\""}],"model":"m","stream":true,"user":"u","n":1}"#;
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
    fn missing_model_is_none() {
        assert!(parse_head(b"{\"prompt\":\"x\"}").unwrap().model.is_none());
    }
}
