//! OpenAI-compatible HTTP API of the head (hyper 1).
//!
//! * `POST /v1/completions`, `POST /v1/chat/completions`: `max_tokens`, `temperature`,
//!   `top_p`, `stop` (string or list), `seed`, `stream` (SSE, `data: [DONE]` at the end,
//!   `stream_options.include_usage`), `usage` in non-streaming answers, and vLLM's
//!   `continue_final_message` / `add_generation_prompt` for chat and `ignore_eos` (keep
//!   generating through stop tokens until `max_tokens`; for benchmarks).
//! * `GET /health` (200 while the process runs; JSON with stage status), `GET /ready`
//!   (200 only when weights are loaded, a warm-up token went through the whole pipeline and
//!   every stage is connected; else 503), `GET /metrics` (Prometheus text), `GET /v1/models`.
//!
//! Errors are `{"error":{"message","type","code"}}`. A stream that fails after its headers
//! were sent gets an `error` event and is then aborted (no `[DONE]`), so a client or the
//! router sees a broken stream, not a clean end.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::engine::{Engine, Event, Finish, Job, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};

pub type RespBody = BoxBody<Bytes, std::io::Error>;

/// SmolLM2's default system prompt, as its chat template inserts it when the conversation
/// does not start with a system message.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

pub struct Api {
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    pub model_name: String,
    pub context_length: usize,
    pub default_system_prompt: Option<String>,
    pub max_body_bytes: usize,
}

static REQ_COUNTER: AtomicU64 = AtomicU64::new(0);

fn request_id(prefix: &str) -> String {
    let n = REQ_COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64;
    format!("{prefix}-{t:x}{n:04x}")
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).map_err(|n: Infallible| match n {}).boxed())
        .unwrap()
}

fn json_resp(status: StatusCode, v: &Value) -> Response<RespBody> {
    full(status, "application/json", serde_json::to_vec(v).unwrap())
}

pub struct ApiError {
    status: StatusCode,
    message: String,
    code: &'static str,
}

impl ApiError {
    fn bad(message: impl Into<String>, code: &'static str) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), code }
    }
    fn new(status: u16, message: impl Into<String>, code: &'static str) -> Self {
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: message.into(),
            code,
        }
    }
    fn body(&self) -> Value {
        let kind = if self.status.is_client_error() { "invalid_request_error" } else { "server_error" };
        json!({"error": {"message": self.message, "type": kind, "code": self.code}})
    }
    fn into_response(self) -> Response<RespBody> {
        let mut r = json_resp(self.status, &self.body());
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        r
    }
}

/// Serves HTTP until the process ends.
pub async fn serve(api: Arc<Api>, listener: TcpListener) {
    loop {
        let (stream, _peer): (_, SocketAddr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("head: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let api = api.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(handle(api, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(api: Arc<Api>, req: Request<Incoming>) -> Response<RespBody> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/health") => {
            let sh = &api.engine.shared;
            let stages = sh.stages.lock().unwrap().clone();
            let fatal = sh.fatal.lock().unwrap().clone();
            let head = *sh.head_layers.lock().unwrap();
            json_resp(
                StatusCode::OK,
                &json!({
                    "status": "ok",
                    "loaded": sh.loaded.load(Ordering::SeqCst),
                    "ready": api.engine.is_ready(),
                    "model": api.model_name,
                    "head_layers": head,
                    "pid": std::process::id(),
                    "stages": stages,
                    "error": fatal,
                }),
            )
        }
        (Method::GET, "/ready") => {
            if api.engine.is_ready() {
                json_resp(StatusCode::OK, &json!({"ready": true}))
            } else {
                let stages = api.engine.shared.stages.lock().unwrap().clone();
                let mut r = json_resp(StatusCode::SERVICE_UNAVAILABLE, &json!({"ready": false, "stages": stages}));
                r.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                r
            }
        }
        (Method::GET, "/metrics") => {
            full(StatusCode::OK, "text/plain; version=0.0.4", api.engine.shared.metrics.render())
        }
        (Method::GET, "/v1/models") => json_resp(
            StatusCode::OK,
            &json!({"object": "list", "data": [{"id": api.model_name, "object": "model", "created": 0,
                    "owned_by": "switchyard", "max_model_len": api.context_length}]}),
        ),
        (Method::POST, "/v1/completions") => match generate(api, req, false).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        },
        (Method::POST, "/v1/chat/completions") => match generate(api, req, true).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        },
        (_, "/health" | "/ready" | "/metrics" | "/v1/models" | "/v1/completions" | "/v1/chat/completions") => {
            ApiError::new(405, "method not allowed", "method_not_allowed").into_response()
        }
        _ => ApiError::new(404, format!("no route for {path}"), "not_found").into_response(),
    }
}

fn message_text(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    _ => return Err(ApiError::bad("only text content parts are supported", "invalid_content")),
                }
            }
            Ok(s)
        }
        _ => Err(ApiError::bad("message content must be a string or a list of text parts", "invalid_content")),
    }
}

/// Renders a conversation with the model's ChatML template (the structure of SmolLM2's
/// `tokenizer.chat_template`, including its default system prompt when the first message
/// is not a system message).
pub fn render_chat(
    messages: &[(String, String)],
    add_generation_prompt: bool,
    continue_final: bool,
    default_system: Option<&str>,
) -> String {
    let mut s = String::new();
    if let Some(sys) = default_system
        && messages.first().is_none_or(|m| m.0 != "system")
    {
        s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
    }
    for (i, (role, content)) in messages.iter().enumerate() {
        s.push_str("<|im_start|>");
        s.push_str(role);
        s.push('\n');
        s.push_str(content);
        if continue_final && i + 1 == messages.len() {
            return s; // the model continues this message
        }
        s.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

struct Parsed {
    prompt: Vec<u32>,
    max_tokens: usize,
    params: SamplingParams,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    model: String,
}

fn parse(api: &Api, body: &Value, chat: bool) -> Result<Parsed, ApiError> {
    let obj = body.as_object().ok_or_else(|| ApiError::bad("request body must be a JSON object", "invalid_json"))?;
    let f = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let num = |k: &str| -> Result<Option<f64>, ApiError> {
        match f(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::bad(format!("`{k}` must be a number"), "invalid_parameter")),
        }
    };
    if let Some(n) = num("n")?
        && n != 1.0
    {
        return Err(ApiError::bad("only n = 1 is supported", "invalid_parameter"));
    }
    let temperature = num("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad("`temperature` must be between 0 and 2", "invalid_parameter"));
    }
    let top_p = num("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("`top_p` must be in (0, 1]", "invalid_parameter"));
    }
    let seed = match f("seed") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_i64().map(|x| x as u64))
                .ok_or_else(|| ApiError::bad("`seed` must be an integer", "invalid_parameter"))?,
        ),
    };
    let stops = match f("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad("`stop` must be a string or a list of strings", "invalid_parameter"))?,
        Some(_) => return Err(ApiError::bad("`stop` must be a string or a list of strings", "invalid_parameter")),
    };
    let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
    let stream = f("stream").and_then(Value::as_bool).unwrap_or(false);
    let ignore_eos = match f("ignore_eos") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| ApiError::bad("`ignore_eos` must be a boolean", "invalid_parameter"))?,
    };
    let include_usage =
        f("stream_options").and_then(|o| o.get("include_usage")).and_then(Value::as_bool).unwrap_or(false);
    let model = f("model").and_then(Value::as_str).unwrap_or(&api.model_name).to_string();
    let tok = &api.tokenizer;

    let prompt: Vec<u32> = if chat {
        let msgs = f("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::bad("`messages` must be a non-empty list", "invalid_parameter"))?;
        if msgs.is_empty() {
            return Err(ApiError::bad("`messages` must be a non-empty list", "invalid_parameter"));
        }
        let mut conv = Vec::with_capacity(msgs.len());
        for m in msgs {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::bad("every message needs a `role`", "invalid_parameter"))?;
            conv.push((role.to_string(), message_text(m.get("content").unwrap_or(&Value::Null))?));
        }
        let continue_final = f("continue_final_message").and_then(Value::as_bool).unwrap_or(false);
        let add_gen = f("add_generation_prompt").and_then(Value::as_bool).unwrap_or(!continue_final);
        if continue_final && add_gen {
            return Err(ApiError::bad(
                "`continue_final_message` and `add_generation_prompt` cannot both be true",
                "invalid_parameter",
            ));
        }
        if continue_final && conv.last().is_none_or(|m| m.0 != "assistant") {
            return Err(ApiError::bad("`continue_final_message` needs a final assistant message", "invalid_parameter"));
        }
        let text = render_chat(&conv, add_gen, continue_final, api.default_system_prompt.as_deref());
        tok.encode(&text, true)
    } else {
        match f("prompt") {
            Some(Value::String(s)) => tok.encode(s, true),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => tok.encode(a[0].as_str().unwrap(), true),
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|v| v.is_u64()) => {
                let ids: Vec<u32> = a.iter().map(|v| v.as_u64().unwrap() as u32).collect();
                if ids.iter().any(|&i| i as usize >= tok.vocab_size()) {
                    return Err(ApiError::bad("prompt token id out of range", "invalid_parameter"));
                }
                ids
            }
            Some(Value::Array(_)) => {
                return Err(ApiError::bad(
                    "only a single prompt (string or token ids) is supported",
                    "invalid_parameter",
                ));
            }
            _ => return Err(ApiError::bad("`prompt` must be a string", "invalid_parameter")),
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty", "invalid_parameter"));
    }
    if prompt.len() >= api.context_length {
        return Err(ApiError::bad(
            format!(
                "This model's maximum context length is {} tokens, but the prompt has {} tokens; \
                 shorten the prompt",
                api.context_length,
                prompt.len()
            ),
            "context_length_exceeded",
        ));
    }
    let room = api.context_length - prompt.len();
    let max_tokens = match f("max_completion_tokens").or_else(|| f("max_tokens")) {
        None => {
            if chat {
                room
            } else {
                16
            }
        }
        Some(v) => {
            let n = v
                .as_u64()
                .ok_or_else(|| ApiError::bad("`max_tokens` must be a positive integer", "invalid_parameter"))?;
            if n == 0 {
                return Err(ApiError::bad("`max_tokens` must be at least 1", "invalid_parameter"));
            }
            if n as usize > room {
                return Err(ApiError::bad(
                    format!(
                        "This model's maximum context length is {} tokens; the prompt has {} tokens and \
                         max_tokens is {n}, which exceeds it",
                        api.context_length,
                        prompt.len()
                    ),
                    "context_length_exceeded",
                ));
            }
            n as usize
        }
    };
    Ok(Parsed {
        prompt,
        max_tokens,
        params: SamplingParams { temperature: temperature as f32, top_p: top_p as f32, seed, ignore_eos },
        stops,
        stream,
        include_usage,
        model,
    })
}

/// Detokenizes incrementally and applies stop strings, holding back any text that could be
/// the start of a stop string.
struct TextState {
    decoder: StreamDecoder,
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl TextState {
    fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        let delta = self.decoder.push(tok, id);
        self.feed(&delta)
    }
    fn feed(&mut self, delta: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.held.push_str(delta);
        if self.stops.is_empty() {
            return std::mem::take(&mut self.held);
        }
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.stopped = true;
            let out = self.held[..at].to_string();
            self.held.clear();
            return out;
        }
        // Longest suffix of `held` that is a proper prefix of a stop string.
        let mut keep = 0;
        for (i, _) in self.held.char_indices() {
            let suffix = &self.held[i..];
            if self.stops.iter().any(|s| s.starts_with(suffix)) {
                keep = self.held.len() - i;
                break;
            }
        }
        let emit_to = self.held.len() - keep;
        let out = self.held[..emit_to].to_string();
        self.held.drain(..emit_to);
        out
    }
    fn finish(&mut self) -> String {
        let rest = self.decoder.finish();
        let mut out = self.feed(&rest);
        if !self.stopped {
            out.push_str(&std::mem::take(&mut self.held));
        }
        out
    }
}

fn finish_str(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

async fn generate(api: Arc<Api>, req: Request<Incoming>, chat: bool) -> Result<Response<RespBody>, ApiError> {
    let arrived = Instant::now();
    let limited = http_body_util::Limited::new(req.into_body(), api.max_body_bytes);
    let bytes = limited
        .collect()
        .await
        .map_err(|e| ApiError::bad(format!("could not read the request body: {e}"), "invalid_body"))?
        .to_bytes();
    let body: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(format!("malformed JSON body: {e}"), "invalid_json"))?;
    let p = parse(&api, &body, chat)?;
    if !api.engine.is_ready() {
        return Err(ApiError::new(503, "the model replica is not ready", "not_ready"));
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let prompt_tokens = p.prompt.len();
    api.engine
        .submit(Job { prompt: p.prompt, max_tokens: p.max_tokens, params: p.params, events: tx, arrived })
        .map_err(|e| ApiError::new(503, e.to_string(), "engine_stopped"))?;
    let id = request_id(if chat { "chatcmpl" } else { "cmpl" });
    let created = now_secs();
    let mut text = TextState { decoder: StreamDecoder::default(), stops: p.stops, held: String::new(), stopped: false };
    let tok = api.tokenizer.clone();
    let model = p.model;
    let include_usage = p.include_usage;

    if !p.stream {
        let mut out = String::new();
        let mut generated = 0;
        loop {
            match rx.recv().await {
                Some(Event::Token(t)) => {
                    generated += 1;
                    out.push_str(&text.push(&tok, t));
                    if text.stopped {
                        // Stop string: done; dropping `rx` cancels the sequence in the engine.
                        return Ok(final_json(chat, &id, created, &model, &out, "stop", prompt_tokens, generated));
                    }
                }
                Some(Event::Done { finish, completion_tokens }) => {
                    out.push_str(&text.finish());
                    let reason = if text.stopped { "stop" } else { finish_str(finish) };
                    return Ok(final_json(chat, &id, created, &model, &out, reason, prompt_tokens, completion_tokens));
                }
                Some(Event::Failed { status, message }) => {
                    return Err(ApiError::new(status, message, "inference_failed"));
                }
                None => return Err(ApiError::new(503, "the engine dropped the request", "inference_failed")),
            }
        }
    }

    // Streaming (SSE).
    let (btx, brx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    tokio::spawn(async move {
        let object = if chat { "chat.completion.chunk" } else { "text_completion" };
        let chunk = |delta: Option<&str>, role: bool, finish: Option<&str>| -> Bytes {
            let choice = if chat {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = delta {
                    d.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            };
            let v = json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]});
            Bytes::from(format!("data: {}\n\n", v))
        };
        if chat && btx.send(Ok(chunk(Some(""), true, None))).await.is_err() {
            return;
        }
        let mut generated = 0usize;
        let finish;
        loop {
            match rx.recv().await {
                Some(Event::Token(t)) => {
                    generated += 1;
                    let d = text.push(&tok, t);
                    if !d.is_empty() && btx.send(Ok(chunk(Some(&d), false, None))).await.is_err() {
                        return; // client went away: dropping rx cancels the sequence
                    }
                    if text.stopped {
                        finish = "stop";
                        break;
                    }
                }
                Some(Event::Done { finish: f, completion_tokens }) => {
                    generated = completion_tokens;
                    let d = text.finish();
                    if !d.is_empty() && btx.send(Ok(chunk(Some(&d), false, None))).await.is_err() {
                        return;
                    }
                    finish = if text.stopped { "stop" } else { finish_str(f) };
                    break;
                }
                Some(Event::Failed { message, .. }) => {
                    let err =
                        json!({"error": {"message": message, "type": "server_error", "code": "inference_failed"}});
                    let _ = btx.send(Ok(Bytes::from(format!("data: {err}\n\n")))).await;
                    let _ = btx.send(Err(std::io::Error::other(message))).await;
                    return;
                }
                None => {
                    let _ = btx.send(Err(std::io::Error::other("engine dropped the request"))).await;
                    return;
                }
            }
        }
        drop(rx);
        let _ = btx.send(Ok(chunk(if chat { None } else { Some("") }, false, Some(finish)))).await;
        if include_usage {
            let v = json!({"id": id, "object": object, "created": created, "model": model, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                          "total_tokens": prompt_tokens + generated}});
            let _ = btx.send(Ok(Bytes::from(format!("data: {v}\n\n")))).await;
        }
        let _ = btx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(BoxBody::new(ChannelBody { rx: brx }))
        .unwrap())
}

#[allow(clippy::too_many_arguments)]
fn final_json(
    chat: bool,
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish: &str,
    prompt_tokens: usize,
    completion_tokens: usize,
) -> Response<RespBody> {
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens});
    let v = if chat {
        json!({"id": id, "object": "chat.completion", "created": created, "model": model,
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                            "logprobs": null, "finish_reason": finish}],
               "usage": usage})
    } else {
        json!({"id": id, "object": "text_completion", "created": created, "model": model,
               "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
               "usage": usage})
    };
    json_resp(StatusCode::OK, &v)
}

struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
