use std::time::Duration;

use switchyard_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn assert_openai_error(body: &[u8], code: &str) -> serde_json::Value {
    let v = json(body);
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].as_str().is_some(), "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_input_gets_its_status_and_json_error() {
    let up = Upstream::start("u").await;
    let slow = Upstream::start("slow").await;
    slow.script(|s| s.delay = Duration::from_secs(3));
    let cfg = format!(
        "[limits]\nmax_body_bytes = 2048\nbody_read_timeout = \"300ms\"\n\n{}",
        config(
            &(model("m", &[&up], "")
                + &model("slowpoke", &[&slow], "timeouts = { request = \"300ms\" }\nretry = { max_attempts = 1 }")
                + "[[models]]\nname = \"dead\"\nhealth_check = { interval = \"50ms\", unhealthy_after = 1 }\n\
                   [[models.endpoints]]\nurl = \"http://127.0.0.1:9\"\n")
        )
    );
    let router = Router::start(&cfg).await;
    let url = router.url("/v1/chat/completions");

    let (status, headers, body) = post(&url, "{\"model\": \"m\", ").await;
    assert_eq!(status, 400);
    assert_eq!(headers["content-type"], "application/json");
    assert_openai_error(&body, "invalid_json");

    let (status, _, body) = post(&url, "{\"messages\": []}").await;
    assert_eq!(status, 404);
    assert_openai_error(&body, "model_not_found");

    let (status, _, body) = post(&url, chat_body("nope", false)).await;
    assert_eq!(status, 404);
    let v = assert_openai_error(&body, "model_not_found");
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"));

    let big = format!("{{\"model\":\"m\",\"prompt\":\"{}\"}}", "x".repeat(4096));
    let (status, _, body) = post(&router.url("/v1/completions"), big).await;
    assert_eq!(status, 413);
    assert_openai_error(&body, "request_too_large");
    assert_eq!(up.hits(), 0, "no bad request reached the upstream");

    // The dead model's only endpoint fails its health checks: 503 with Retry-After.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, headers, body) = post(&url, chat_body("dead", false)).await;
        if status == 503 {
            assert_openai_error(&body, "no_healthy_endpoint");
            let secs: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
            assert!((1..=30).contains(&secs));
            break;
        }
        assert_eq!(status, 502, "before it is marked down, the connect error is a 502");
        assert_openai_error(&body, "upstream_error");
        assert!(std::time::Instant::now() < deadline, "never marked unhealthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (status, _, body) = post(&url, chat_body("slowpoke", false)).await;
    assert_eq!(status, 504);
    assert_openai_error(&body, "upstream_timeout");

    let (status, _, body) = get(&router.url("/v1/nothing")).await;
    assert_eq!(status, 404);
    assert_openai_error(&body, "unknown_url");
    let (status, _, body) = get(&url).await;
    assert_eq!(status, 405);
    assert_openai_error(&body, "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_are_cut_off_by_read_timeouts() {
    let up = Upstream::start("u").await;
    let cfg = format!(
        "[limits]\nheader_read_timeout = \"300ms\"\nbody_read_timeout = \"300ms\"\n\n{}",
        config(&model("m", &[&up], ""))
    );
    let router = Router::start(&cfg).await;

    // Body stalls after a few bytes: 408 with a JSON error.
    let mut s = TcpStream::connect(router.addr()).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\"")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await.ok();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"request_timeout\""), "{text}");

    // Headers stall: the router closes the connection.
    let mut s = TcpStream::connect(router.addr()).await.unwrap();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the router must close a connection whose headers stall")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    assert_eq!(up.hits(), 0);
}
