use std::time::Duration;

use switchyard_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_chunks_arrive_incrementally() {
    let up = Upstream::start("u").await;
    up.script(|s| {
        s.chunks = 5;
        s.chunk_gap = Duration::from_millis(250);
    });
    let router = Router::start(&config(&model("m", &[&up], ""))).await;
    let (status, frames, end) = post_stream(&router.url("/v1/chat/completions"), chat_body("m", true)).await;
    assert_eq!(status, 200);
    assert!(end.is_ok(), "{end:?}");
    let text: String = frames.iter().map(|(_, b)| String::from_utf8_lossy(b).into_owned()).collect();
    assert_eq!(text.matches("data: {").count(), 5, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    // Chunks come as the upstream sends them: the gaps survive the proxy.
    let chunk_times: Vec<_> = frames.iter().filter(|(_, b)| b.starts_with(b"data: {")).map(|(t, _)| *t).collect();
    assert_eq!(chunk_times.len(), 5, "each SSE event is its own frame");
    for pair in chunk_times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(150), "chunks were bunched: gap {gap:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_that_fails_before_its_first_chunk_is_retried_elsewhere() {
    let bad = Upstream::start("bad").await;
    let good = Upstream::start("good").await;
    bad.script(|s| s.status = 502);
    let router = Router::start(&config(&model(
        "m",
        &[&bad, &good],
        "health_check = { enabled = false }\noutlier = { consecutive_failures = 0 }",
    )))
    .await;
    for _ in 0..10 {
        let (status, frames, end) = post_stream(&router.url("/v1/chat/completions"), chat_body("m", true)).await;
        assert_eq!(status, 200);
        assert!(end.is_ok());
        let text: String = frames.iter().map(|(_, b)| String::from_utf8_lossy(b).into_owned()).collect();
        assert!(text.contains("\"served_by\":\"good\""), "{text}");
        assert!(text.contains("[DONE]"));
    }
    assert!(bad.hits() >= 1);
}

/// Reads a streaming response until `want` content events arrived, calls `cut`, then reads
/// to the end. Returns every SSE data payload and how the body ended.
async fn read_stream_cutting(
    url: &str,
    body: String,
    want: usize,
    cut: impl FnOnce(&http::HeaderMap),
) -> (Vec<String>, Result<(), String>) {
    use http_body_util::BodyExt;
    let res = client().request(post_req(url, body)).await.expect("stream request");
    assert_eq!(res.status(), 200);
    let headers = res.headers().clone();
    let mut body = res.into_body();
    let mut text = String::new();
    let mut cut = Some(cut);
    let end = loop {
        match body.frame().await {
            None => break Ok(()),
            Some(Err(e)) => break Err(format!("{e:?}")),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    text.push_str(&String::from_utf8_lossy(&d));
                }
            }
        }
        if text.matches("\"content\"").count() >= want
            && let Some(c) = cut.take()
        {
            c(&headers);
        }
    };
    let events = text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect();
    (events, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_upstream_dies_midway_is_continued_by_another() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    for u in [&a, &b] {
        u.script(|s| {
            s.chunks = 12;
            s.chunk_gap = Duration::from_millis(40);
        });
    }
    let router = Router::start(&config(&model("m", &[&a, &b], ""))).await;
    let body = r#"{"model":"m","stream":true,"max_tokens":12,"messages":[{"role":"user","content":"count"}]}"#;
    let ups = [&a, &b];
    let mut victim = None;
    let (events, end) = read_stream_cutting(&router.url("/v1/chat/completions"), body.to_string(), 4, |h| {
        let name = h["x-switchyard-endpoint"].to_str().unwrap().to_string();
        let up = ups.iter().find(|u| u.name() == name).unwrap();
        up.kill();
        victim = Some(name);
    })
    .await;
    end.expect("the client sees one stream, without an error");
    let victim = victim.expect("cut");
    let survivor = ups.iter().find(|u| u.name() != victim).unwrap();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    let chunks: Vec<serde_json::Value> = events.iter().filter(|e| *e != "[DONE]").map(|e| json(e.as_bytes())).collect();
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let served: Vec<&str> = chunks.iter().map(|c| c["served_by"].as_str().unwrap()).collect();
    // The first part came from the victim, the rest from the survivor, in one stream.
    let switch = served.iter().position(|s| *s != victim).expect("the survivor continued the stream");
    assert!(switch >= 4, "{served:?}");
    assert!(served[switch..].iter().all(|s| *s == survivor.name()), "{served:?}");
    // The survivor was asked to continue from exactly what the client had.
    let delivered: String =
        chunks[..switch].iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let asked = json(&survivor.last_body().unwrap());
    let msgs = asked["messages"].as_array().unwrap();
    assert_eq!(msgs.last().unwrap()["role"], "assistant");
    assert_eq!(msgs.last().unwrap()["content"], delivered.as_str());
    assert_eq!(asked["continue_final_message"], true);
    assert_eq!(asked["max_tokens"], 12 - switch as u64);
    assert!(content.starts_with(&delivered));
    assert_eq!(router.metric("switchyard_stream_resumes_total", &[("model", "m")]).await, Some(1.0));
}

/// The continuation of a stream whose replica died waits for a replica instead of cutting
/// the stream when, at that moment, no other one would take it (here the only other one
/// answers 503 for a while, as a replica still loading would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_replica_dies_waits_for_another_to_recover() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let a = Upstream::start("a").await;
    let b = Arc::new(Upstream::start("b").await);
    for u in [&a, &*b] {
        u.script(|s| {
            s.chunks = 12;
            s.chunk_gap = Duration::from_millis(40);
        });
    }
    b.script(|s| s.status = 503);
    let router = Router::start(&config(&model("m", &[&a, &*b], ""))).await;
    let cut = Arc::new(AtomicBool::new(false));
    let restore = {
        let (b, cut) = (b.clone(), cut.clone());
        tokio::spawn(async move {
            while !cut.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            b.script(|s| s.status = 200);
        })
    };
    let body = r#"{"model":"m","stream":true,"max_tokens":12,"messages":[{"role":"user","content":"count"}]}"#;
    let (events, end) = read_stream_cutting(&router.url("/v1/chat/completions"), body.to_string(), 4, |h| {
        assert_eq!(h["x-switchyard-endpoint"], "a", "b refuses, so a serves the stream");
        a.kill();
        cut.store(true, Ordering::SeqCst);
    })
    .await;
    restore.await.unwrap();
    end.expect("the client sees one stream, without an error");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let served: Vec<String> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| json(e.as_bytes())["served_by"].as_str().unwrap().to_string())
        .collect();
    let switch = served.iter().position(|s| s != "a").expect("b continued the stream");
    assert!(switch >= 4 && served[switch..].iter().all(|s| s == "b"), "{served:?}");
    assert_eq!(router.metric("switchyard_stream_resumes_total", &[("model", "m")]).await, Some(1.0));
}
