//! The rule-based responder: the last step of graceful degradation, when every model in a
//! request's chain has failed. It answers from operator-written rules (keywords or a regex
//! over the user's last message → an answer), or with a default "service degraded" answer,
//! as a well-formed OpenAI response — streamed as SSE when the request streamed — so
//! clients keep working while the models are down.
//!
//! Every degraded answer says so: `x-switchyard-degraded: rule-based` (or `fallback-model`
//! for an answer from a fallback model) and, in the body, `"model": "rule-based"`.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use regex::Regex;
use serde::Deserialize;

use crate::body::{ResBody, boxed_full};
use crate::config::DegradedConfig;

pub const HEADER: &str = "x-switchyard-degraded";
/// What the body's `model` field says for a rule-based answer.
pub const RULE_MODEL: &str = "rule-based";

struct Rule {
    keywords: Vec<String>,
    regex: Option<Regex>,
    answer: String,
}

pub struct Responder {
    rules: Vec<Rule>,
    default_answer: String,
}

/// What the responder needs from the request body.
#[derive(Deserialize)]
struct Question {
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    prompt: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: serde_json::Value,
}

impl Responder {
    /// Builds the rules; the config was validated, so regexes compile.
    pub fn new(cfg: &DegradedConfig) -> anyhow::Result<Responder> {
        let rules = cfg
            .rules
            .iter()
            .map(|r| {
                Ok(Rule {
                    keywords: r.keywords.iter().map(|k| k.to_lowercase()).collect(),
                    regex: r.regex.as_ref().map(|re| Regex::new(re.get_ref())).transpose()?,
                    answer: r.answer.clone(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Responder { rules, default_answer: cfg.default_answer.clone() })
    }

    /// The answer for a question: the first rule that matches, else the default.
    pub fn answer_for(&self, question: &str) -> &str {
        let lower = question.to_lowercase();
        self.rules
            .iter()
            .find(|r| {
                r.keywords.iter().any(|k| lower.contains(k.as_str()))
                    || r.regex.as_ref().is_some_and(|re| re.is_match(question))
            })
            .map_or(self.default_answer.as_str(), |r| r.answer.as_str())
    }

    /// A complete OpenAI response for the request `body` on `path`.
    pub fn respond(&self, path: &str, body: &[u8], stream: bool) -> Response<ResBody> {
        let chat = path.ends_with("/chat/completions");
        let question = serde_json::from_slice::<Question>(body).map(|q| last_question(&q)).unwrap_or_default();
        let answer = self.answer_for(&question);
        let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let id = format!("{}-degraded-{:x}", if chat { "chatcmpl" } else { "cmpl" }, fastrand::u64(..));
        let completion_tokens = answer.split_whitespace().count();
        let usage = serde_json::json!({"prompt_tokens": 0, "completion_tokens": completion_tokens,
                                       "total_tokens": completion_tokens});
        let (bytes, content_type) = if stream {
            let frame = |delta: serde_json::Value, finish: Option<&str>| {
                let choice = if chat {
                    serde_json::json!({"index": 0, "delta": delta, "finish_reason": finish})
                } else {
                    serde_json::json!({"index": 0, "text": delta.get("content").cloned().unwrap_or_default(),
                                       "finish_reason": finish})
                };
                let obj = if chat { "chat.completion.chunk" } else { "text_completion" };
                let v = serde_json::json!({"id": id, "object": obj, "created": created, "model": RULE_MODEL,
                                           "choices": [choice]});
                format!("data: {v}\n\n")
            };
            let mut s = String::new();
            if chat {
                s.push_str(&frame(serde_json::json!({"role": "assistant", "content": ""}), None));
            }
            s.push_str(&frame(serde_json::json!({"content": answer}), None));
            s.push_str(&frame(serde_json::json!({}), Some("stop")));
            s.push_str("data: [DONE]\n\n");
            (Bytes::from(s), "text/event-stream")
        } else {
            let v = if chat {
                serde_json::json!({"id": id, "object": "chat.completion", "created": created, "model": RULE_MODEL,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": "stop"}],
                    "usage": usage})
            } else {
                serde_json::json!({"id": id, "object": "text_completion", "created": created, "model": RULE_MODEL,
                    "choices": [{"index": 0, "text": answer, "finish_reason": "stop"}], "usage": usage})
            };
            (Bytes::from(serde_json::to_vec(&v).expect("json value serialises")), "application/json")
        };
        let mut res = Response::new(boxed_full(bytes));
        *res.status_mut() = StatusCode::OK;
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        h.insert(HEADER, HeaderValue::from_static("rule-based"));
        res
    }
}

/// The user's last message (chat) or the prompt (completions), as text.
fn last_question(q: &Question) -> String {
    if let Some(m) = q.messages.iter().rev().find(|m| m.role == "user") {
        return content_text(&m.content);
    }
    match &q.prompt {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join("\n"),
        _ => String::new(),
    }
}

/// Message content is a string or a list of parts (`{"type":"text","text":...}`).
fn content_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(parts) => {
            parts.iter().filter_map(|p| p.get("text").and_then(|t| t.as_str())).collect::<Vec<_>>().join("\n")
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleConfig;

    fn responder() -> Responder {
        Responder::new(&DegradedConfig {
            default_answer: "degraded".into(),
            rules: vec![
                RuleConfig { keywords: vec!["Refund".into()], regex: None, answer: "refunds: see /help".into() },
                RuleConfig {
                    keywords: vec![],
                    regex: Some(toml::Spanned::new(0..0, r"order\s+#?\d+".into())),
                    answer: "orders: see /orders".into(),
                },
            ],
        })
        .unwrap()
    }

    #[test]
    fn first_matching_rule_answers_else_the_default() {
        let r = responder();
        assert_eq!(r.answer_for("how do I get a REFUND?"), "refunds: see /help");
        assert_eq!(r.answer_for("where is order #123"), "orders: see /orders");
        assert_eq!(r.answer_for("hello"), "degraded");
    }

    #[test]
    fn the_question_is_the_last_user_message() {
        let q: Question = serde_json::from_str(
            r#"{"messages":[{"role":"user","content":"refund"},{"role":"assistant","content":"x"},
                {"role":"user","content":[{"type":"text","text":"order 7"}]}]}"#,
        )
        .unwrap();
        assert_eq!(last_question(&q), "order 7");
    }
}
