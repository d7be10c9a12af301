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
