//! Mid-stream failover: a stream whose upstream dies after tokens reached the client is
//! continued from another endpoint, inside the same SSE response.
//!
//! While a stream is relayed, `SseLog` follows it event by event: it passes only whole SSE
//! events to the client (so a failure never leaves half an event on the wire) and keeps
//! the text delivered so far, the number of content events and the stream's `id`. When
//! the upstream fails (reset, error, silence), `continuation` rewrites the original
//! request to ask another endpoint to go on from that text — for chat, the partial answer
//! as a final assistant message with `continue_final_message` (the vLLM convention the
//! shard server follows); for completions, the prompt plus the partial text — with
//! `max_tokens` reduced by what was delivered. The new upstream's events are then rewritten
//! (`Splice`) so the client keeps seeing one stream: the same `id`, no second role header.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::client::PooledBody;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request};
use http_body_util::Full;

use crate::router::Model;
use crate::select::{PowerOfTwoChoices, RequestFacts, Selector, sanitize};
use crate::upstream::{Attempt, Outcome, now_ms};

/// What a resumed stream needs from its request, captured when the stream starts.
pub struct ResumeContext {
    pub model: &'static Model,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub chat: bool,
    /// Endpoints that already failed this request.
    pub tried: Vec<u32>,
    /// Resumptions still allowed.
    pub left: u32,
}

/// The delivered part of a stream, followed event by event.
#[derive(Default)]
pub struct SseLog {
    partial: BytesMut,
    pub text: String,
    pub content_events: u32,
    pub id: Option<String>,
    pub done: bool,
    /// `usage.total_tokens` of the stream's usage event, when the upstream sent one.
    pub usage_total: Option<u32>,
}

#[derive(serde::Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    choices: Vec<ChunkChoice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(serde::Deserialize)]
struct Usage {
    total_tokens: u32,
}

#[derive(serde::Deserialize)]
struct ChunkChoice<'a> {
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    text: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<std::borrow::Cow<'a, str>>,
}

fn event_end(b: &[u8]) -> Option<usize> {
    b.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2)
}

impl SseLog {
    /// Takes upstream bytes and returns what may go to the client now: every complete
    /// event, in order. A trailing partial event waits for the rest. Not yet observed.
    pub fn cut(&mut self, data: Bytes) -> Bytes {
        if self.partial.is_empty() && data.ends_with(b"\n\n") {
            return data;
        }
        self.partial.extend_from_slice(&data);
        match event_end(&self.partial) {
            Some(end) => self.partial.split_to(end).freeze(),
            None => Bytes::new(),
        }
    }

    /// `cut`, then follows what goes out.
    pub fn accept(&mut self, data: Bytes) -> Bytes {
        let out = self.cut(data);
        self.observe(&out);
        out
    }

    /// Bytes held back when the stream ends normally (a final event without its blank line).
    pub fn flush(&mut self) -> Bytes {
        let rest = self.partial.split().freeze();
        self.observe(&rest);
        rest
    }

    /// Whether bytes are held back waiting for the end of an event.
    pub fn holds_partial(&self) -> bool {
        !self.partial.is_empty()
    }

    pub fn observe(&mut self, events: &[u8]) {
        for line in events.split(|&b| b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else { continue };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                self.done = true;
                continue;
            }
            let Ok(chunk) = serde_json::from_slice::<Chunk<'_>>(data) else { continue };
            if self.id.is_none() {
                self.id = chunk.id.map(|c| c.into_owned());
            }
            if let Some(u) = chunk.usage {
                self.usage_total = Some(u.total_tokens);
            }
            if let Some(c) = chunk.choices.first() {
                let piece = c.delta.as_ref().and_then(|d| d.content.as_deref()).or(c.text.as_deref());
                if let Some(p) = piece.filter(|p| !p.is_empty()) {
                    self.text.push_str(p);
                    self.content_events += 1;
                }
            }
        }
    }
}

/// The request that asks another endpoint to go on from `log`. `None` when the request
/// cannot be continued (not JSON, a prompt that is not a string); `Some(None)` when the
/// token budget was already used up (the stream only lacked its end).
pub fn continuation(body: &[u8], chat: bool, log: &SseLog) -> Option<Option<Bytes>> {
    let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body).ok()?;
    for key in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = v.get(key).and_then(|n| n.as_u64()) {
            let left = n.saturating_sub(log.content_events as u64);
            if left == 0 {
                return Some(None);
            }
            v.insert(key.into(), left.into());
        }
    }
    if chat {
        let messages = v.get_mut("messages")?.as_array_mut()?;
        messages.push(serde_json::json!({"role": "assistant", "content": log.text}));
        v.insert("continue_final_message".into(), true.into());
        v.insert("add_generation_prompt".into(), false.into());
    } else {
        let prompt = v.get("prompt")?.as_str()?.to_string();
        v.insert("prompt".into(), serde_json::Value::String(prompt + &log.text));
    }
    Some(Some(Bytes::from(serde_json::to_vec(&v).ok()?)))
}

/// Rewrites a continuation's events to fit the stream the client is reading: the original
/// `id`, and no role-only opening chunk.
pub struct Splice {
    pub id: Option<String>,
}

impl Splice {
    pub fn rewrite(&self, events: Bytes) -> Bytes {
        let mut out = Vec::with_capacity(events.len() + 32);
        for event in events.split_inclusive(|&b| b == b'\n') {
            let line = event.strip_suffix(b"\n").unwrap_or(event);
            let Some(data) = line.strip_prefix(b"data:").map(|d| d.trim_ascii()) else {
                out.extend_from_slice(event);
                continue;
            };
            if data == b"[DONE]" {
                out.extend_from_slice(event);
                continue;
            }
            let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(data) else {
                out.extend_from_slice(event);
                continue;
            };
            let delta = &v["choices"][0]["delta"];
            let role_only = delta.get("role").is_some()
                && delta.get("content").is_none_or(|c| c.as_str().is_some_and(str::is_empty))
                && v["choices"][0]["finish_reason"].is_null();
            if role_only {
                // Drop the event and the blank line that ends it.
                continue;
            }
            if let (Some(id), Some(obj)) = (&self.id, v.as_object_mut()) {
                obj.insert("id".into(), id.clone().into());
            }
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&serde_json::to_vec(&v).unwrap_or_default());
            out.push(b'\n');
        }
        // Dropped events leave their blank separator lines; collapse runs of them.
        let mut cleaned = Vec::with_capacity(out.len());
        let mut blank_run = 0;
        for line in out.split_inclusive(|&b| b == b'\n') {
            if line == b"\n" {
                blank_run += 1;
                if blank_run > 1 || cleaned.is_empty() {
                    continue;
                }
            } else {
                blank_run = 0;
            }
            cleaned.extend_from_slice(line);
        }
        Bytes::from(cleaned)
    }
}

pub type Resumed = Pin<Box<dyn Future<Output = Option<(PooledBody, Attempt)>> + Send>>;

/// Starts the continuation on another endpoint: the future answers with the new stream
/// once it has sent its headers with 2xx, or `None` when no endpoint took it within
/// `first_byte`.
///
/// The client already holds part of the answer, so giving up costs more here than anywhere
/// else: an endpoint this stream has not failed on is tried first; when there is none (the
/// other replicas down, ejected or out of retry budget) the continuation waits for one,
/// polling every 100 ms, and an endpoint that failed this stream earlier may serve it again
/// once it is available (a supervised replica restarted after a crash is a new process).
pub fn resume(ctx: &mut ResumeContext, body: Bytes, first_byte: Duration) -> Resumed {
    const POLL: Duration = Duration::from_millis(100);
    let model = ctx.model;
    let path = ctx.path_and_query.clone();
    let headers = ctx.headers.clone();
    let mut tried = std::mem::take(&mut ctx.tried);
    Box::pin(async move {
        let pool = &model.pool;
        let deadline = tokio::time::Instant::now() + first_byte;
        let mut snapshot = Vec::with_capacity(pool.endpoints.len());
        loop {
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            snapshot.clear();
            pool.snapshot_into(now_ms(), &mut snapshot);
            let facts =
                RequestFacts { stream: true, attempt: tried.len() as u32, ..RequestFacts::anonymous(&pool.model) };
            let mut ranked = Vec::new();
            let _ = PowerOfTwoChoices.select(&facts, &snapshot, &mut ranked);
            sanitize(&mut ranked, &snapshot);
            let fresh = ranked.iter().find(|i| !tried.contains(i)).copied();
            let Some(index) = fresh.or_else(|| ranked.first().copied()) else {
                tokio::time::sleep(POLL).await;
                continue;
            };
            if fresh.is_none() {
                // Only endpoints that failed this stream are left: give them a moment.
                tokio::time::sleep(POLL).await;
            }
            if !pool.budget.try_withdraw(now_ms()) {
                model.metrics.budget_exhausted.inc();
                tokio::time::sleep(POLL).await;
                continue;
            }
            if fresh.is_some() {
                tried.push(index);
            }
            let endpoint = &pool.endpoints[index as usize];
            let Some(attempt) = pool.start(endpoint) else { continue };
            let uri = format!("{}{}", endpoint.url, path);
            let Ok(mut req) = Request::post(uri).body(Full::new(body.clone())) else { return None };
            *req.headers_mut() = headers.clone();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, model.client().request(req)).await {
                Ok(Ok(res)) if res.status().is_success() => return Some((res.into_body(), attempt)),
                Ok(Ok(res)) => {
                    let outcome =
                        if res.status().is_client_error() { Outcome::ClientError } else { Outcome::ServerFailure };
                    attempt.finish(outcome, None);
                    if outcome == Outcome::ClientError {
                        return None;
                    }
                }
                _ => attempt.finish(Outcome::ServerFailure, None),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str) -> String {
        format!("data: {{\"id\":\"c1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}}}}]}}\n\n")
    }

    #[test]
    fn only_whole_events_pass_and_the_text_is_kept() {
        let mut log = SseLog::default();
        let a = chunk("Hel");
        let b = chunk("lo");
        assert_eq!(log.accept(Bytes::from(a.clone())), a.as_bytes());
        // An event split across frames waits for its end.
        let (b1, b2) = b.split_at(10);
        assert!(log.accept(Bytes::from(b1.to_string())).is_empty());
        assert_eq!(log.accept(Bytes::from(b2.to_string())), b.as_bytes());
        assert_eq!(log.text, "Hello");
        assert_eq!(log.content_events, 2);
        assert_eq!(log.id.as_deref(), Some("c1"));
        assert!(!log.done);
        assert_eq!(log.usage_total, None);
        log.accept(Bytes::from_static(
            b"data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
        ));
        assert_eq!(log.usage_total, Some(7), "a usage event is read for the token budget");
        log.accept(Bytes::from_static(b"data: [DONE]\n\n"));
        assert!(log.done);
    }

    #[test]
    fn continuation_appends_the_partial_answer_and_reduces_max_tokens() {
        let mut log = SseLog::default();
        log.accept(Bytes::from(chunk("A, B,")));
        let chat = br#"{"model":"m","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"abc"}]}"#;
        let v: serde_json::Value = serde_json::from_slice(&continuation(chat, true, &log).unwrap().unwrap()).unwrap();
        assert_eq!(v["messages"][1]["role"], "assistant");
        assert_eq!(v["messages"][1]["content"], "A, B,");
        assert_eq!(v["continue_final_message"], true);
        assert_eq!(v["max_tokens"], 9);
        let comp = br#"{"model":"m","stream":true,"prompt":"Count: ","max_tokens":1}"#;
        assert_eq!(continuation(comp, false, &log), Some(None), "budget used up");
        let comp = br#"{"model":"m","stream":true,"prompt":"Count: "}"#;
        let v: serde_json::Value = serde_json::from_slice(&continuation(comp, false, &log).unwrap().unwrap()).unwrap();
        assert_eq!(v["prompt"], "Count: A, B,");
    }

    #[test]
    fn splice_keeps_the_id_and_drops_the_second_role_header() {
        let s = Splice { id: Some("orig".into()) };
        let events = "data: {\"id\":\"new\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n\
                      data: {\"id\":\"new\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" C\"},\"finish_reason\":null}]}\n\n\
                      data: [DONE]\n\n";
        let out = String::from_utf8(s.rewrite(Bytes::from(events)).to_vec()).unwrap();
        assert!(!out.contains("\"role\""), "{out}");
        assert!(out.contains("\"id\":\"orig\""), "{out}");
        assert!(out.starts_with("data: {"), "{out:?}");
        assert!(out.ends_with("data: [DONE]\n\n"), "{out:?}");
        assert_eq!(out.matches("\n\n").count(), 2, "{out:?}");
    }
}
