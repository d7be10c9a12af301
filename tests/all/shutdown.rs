use std::time::Duration;

use switchyard_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_completes_an_in_flight_stream() {
    let up = Upstream::start("u").await;
    up.script(|s| {
        s.chunks = 10;
        s.chunk_gap = Duration::from_millis(100);
    });
    let mut router = Router::start(&config(&model("m", &[&up], ""))).await;
    let url = router.url("/v1/chat/completions");
    let stream = tokio::spawn(async move { post_stream(&url, chat_body("m", true)).await });
    // Let the stream start, then ask the router to stop.
    tokio::time::sleep(Duration::from_millis(250)).await;
    router.signal("TERM");

    // New connections are refused soon after the signal...
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(router.addr()).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...while the in-flight stream runs to its end.
    let (status, frames, end) = stream.await.unwrap();
    assert_eq!(status, 200);
    assert!(end.is_ok(), "stream was cut: {end:?}");
    let text: String = frames.iter().map(|(_, b)| String::from_utf8_lossy(b).into_owned()).collect();
    assert_eq!(text.matches("data: {").count(), 10);
    assert!(text.contains("[DONE]"));
    let exit = tokio::time::timeout(Duration::from_secs(10), router.child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "router exit: {exit:?}\n{}", router.log());
}
