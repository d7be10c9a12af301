//! Graceful degradation: primary → fallback model → rule-based answer, within the budget,
//! natively and under the fallback-stage plugin.

use std::time::{Duration, Instant};

use switchyard_e2e::*;

const RULES: &str = r#"
[degraded]
default_answer = "Degraded: please retry later."

[[degraded.rules]]
keywords = ["refund"]
answer = "Refunds are handled at example.com/refunds."
"#;

fn content_of_stream(frames: &[(Instant, bytes::Bytes)]) -> (String, bool) {
    let text: String = frames.iter().map(|(_, b)| String::from_utf8_lossy(b).into_owned()).collect();
    let mut content = String::new();
    let mut done = false;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v = json(data.as_bytes());
        assert!(!done, "data after [DONE]");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
    }
    (content, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_primary_is_answered_by_the_fallback_model_within_the_budget() {
    let big = Upstream::start("big-0").await;
    big.script(|s| s.delay = Duration::from_secs(5));
    let small = Upstream::start("small-0").await;
    let cfg = config(
        &(model(
            "big",
            &[&big],
            "fallback = { models = [\"small\"], primary_timeout = \"400ms\", budget = \"3s\" }\nretry = { max_attempts = 1 }",
        ) + &model("small", &[&small], "")),
    );
    let router = Router::start(&cfg).await;
    let url = router.url("/v1/chat/completions");

    let t = Instant::now();
    let (status, headers, body) = post(&url, chat_body("big", false)).await;
    let took = t.elapsed();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-switchyard-degraded"], "fallback-model");
    assert_eq!(json(&body)["model"], "small", "the body names the model that served it");
    assert!(took >= Duration::from_millis(400), "the primary had its share: {took:?}");
    assert!(took < Duration::from_millis(2500), "answered within the budget: {took:?}");
    // The fallback model was asked in its own name.
    assert_eq!(json(&small.last_body().unwrap())["model"], "small");

    // Streams degrade the same way.
    let (status, frames, end) = post_stream(&url, chat_body("big", true)).await;
    assert_eq!(status, 200);
    end.unwrap();
    let (content, done) = content_of_stream(&frames);
    assert!(done && content.starts_with("tok0"), "{content:?}");

    // Once the primary is healthy again, its answers are not degraded.
    big.script(|s| s.delay = Duration::ZERO);
    let (status, headers, body) = post(&url, chat_body("big", false)).await;
    assert_eq!(status, 200);
    assert!(!headers.contains_key("x-switchyard-degraded"));
    assert_eq!(json(&body)["model"], "big");
    let n = router.metric("switchyard_degraded_total", &[("model", "big"), ("mode", "fallback-model")]).await;
    assert_eq!(n, Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_model_down_the_rules_answer_with_200_and_the_degraded_header() {
    let big = Upstream::start("big-0").await;
    let small = Upstream::start("small-0").await;
    big.script(|s| s.status = 500);
    small.script(|s| s.status = 503);
    let cfg = format!(
        "{RULES}\n{}",
        config(
            &(model("big", &[&big], "fallback = { models = [\"small\"] }\nretry = { max_attempts = 1 }")
                + &model("small", &[&small], "retry = { max_attempts = 1 }"))
        )
    );
    let router = Router::start(&cfg).await;

    let body = r#"{"model":"big","messages":[{"role":"user","content":"I want a refund for order 7"}]}"#;
    let (status, headers, b) = post(&router.url("/v1/chat/completions"), body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(headers["x-switchyard-degraded"], "rule-based");
    let v = json(&b);
    assert_eq!(v["model"], "rule-based");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Refunds are handled at example.com/refunds.");
    assert!(big.hits() >= 1 && small.hits() >= 1, "both models were tried first");

    // No rule matches: the default answer, streamed as a well-formed SSE stream.
    let (status, frames, end) = post_stream(&router.url("/v1/chat/completions"), chat_body("big", true)).await;
    assert_eq!(status, 200);
    end.unwrap();
    let (content, done) = content_of_stream(&frames);
    assert_eq!(content, "Degraded: please retry later.");
    assert!(done, "the stream ends with [DONE]");

    // The completions API gets a text completion.
    let (status, headers, b) = post(&router.url("/v1/completions"), r#"{"model":"big","prompt":"refund?"}"#).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-switchyard-degraded"], "rule-based");
    assert_eq!(json(&b)["choices"][0]["text"], "Refunds are handled at example.com/refunds.");

    // A model without a chain still reports its failure.
    let (status, _, _) = post(&router.url("/v1/chat/completions"), chat_body("small", false)).await;
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_plugin_decides_the_chain() {
    let slow = Upstream::start("slow").await;
    slow.script(|s| s.delay = Duration::from_millis(800));
    let slow2 = Upstream::start("slow2").await;
    slow2.script(|s| s.delay = Duration::from_millis(800));
    let small = Upstream::start("small-0").await;
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("plugins")).unwrap();
    std::fs::copy(policy("fallback"), dir.0.join("plugins/fallback.wasm")).unwrap();
    // Both models are limited to one request at a time and fall back to `small`; only
    // `planned` runs the plugin, which answers overload from the rules at once.
    let chain = "max_in_flight = 1\nfallback = { models = [\"small\"] }";
    let cfg = format!(
        "{RULES}\n[plugins.settings.fallback]\noverload = \"rule-based\"\n\n{}",
        config(
            &(model("planned", &[&slow], &format!("{chain}\npolicy = {{ fallback = \"fallback\" }}"))
                + &model("native", &[&slow2], chain)
                + &model("small", &[&small], ""))
        )
    );
    let router = Router::start_in(dir, &cfg).await;
    assert_eq!(router.plugin_status("fallback").await["state"], "active");
    let url = router.url("/v1/chat/completions");

    for (name, expect) in [("planned", "rule-based"), ("native", "fallback-model")] {
        let busy = {
            let url = url.clone();
            let body = chat_body(name, false);
            tokio::spawn(async move { post(&url, body).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, headers, body) = post(&url, chat_body(name, false)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(headers["x-switchyard-degraded"], expect, "model {name}");
        let (status, headers, _) = busy.await.unwrap();
        assert_eq!(status, 200);
        assert!(!headers.contains_key("x-switchyard-degraded"));
    }
    assert_eq!(small.hits(), 1, "only the native chain used the fallback model");
    let status = router.plugin_status("fallback").await;
    assert!(status["calls"].as_u64().unwrap() >= 1, "{status}");
    assert_eq!(status["faults"], 0);
}
