//! Admission control: per-tenant rate and token limits, model and router capacity, and
//! the admin API's bearer token.

use std::time::{Duration, Instant};

use switchyard_e2e::*;

fn assert_error(status: http::StatusCode, headers: &http::HeaderMap, body: &[u8], want: u16, code: &str) {
    assert_eq!(status, want, "{}", String::from_utf8_lossy(body));
    assert_eq!(json(body)["error"]["code"], code);
    let secs: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&secs), "retry-after {secs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_over_its_rate_gets_429_while_another_is_unaffected() {
    let up = Upstream::start("u").await;
    let cfg = format!("[admission.tenant]\nrequests_per_second = 1\nburst = 3\n\n{}", config(&model("m", &[&up], "")));
    let router = Router::start(&cfg).await;
    let url = router.url("/v1/chat/completions");

    let mut ok = 0;
    for i in 0..6 {
        let (status, headers, body) = post_as("sk-greedy", &url, chat_body("m", false)).await;
        if i < 3 {
            assert_eq!(status, 200, "request {i} within the burst");
            ok += 1;
        } else {
            assert_error(status, &headers, &body, 429, "rate_limit_exceeded");
        }
    }
    assert_eq!(up.hits(), ok, "rejected requests never reach an upstream");
    // Another tenant has its own budget.
    for _ in 0..3 {
        let (status, _, body) = post_as("sk-polite", &url, chat_body("m", false)).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    let shed = router.metric("switchyard_admission_rejected_total", &[("reason", "tenant_requests")]).await;
    assert_eq!(shed, Some(3.0));
    // The bucket refills at one request a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _, _) = post_as("sk-greedy", &url, chat_body("m", false)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_is_corrected_from_the_answers_usage() {
    let up = Upstream::start("u").await;
    // Each answer reports 900 tokens although the request asks for 10.
    up.script(|s| s.usage_tokens = Some(900));
    let cfg = format!("[admission.tenants.sk-small]\ntokens_per_minute = 1000\n\n{}", config(&model("m", &[&up], "")));
    let router = Router::start(&cfg).await;
    let url = router.url("/v1/chat/completions");
    let body = r#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;

    // 1000 left → 100 after the first answer's usage → in debt after the second.
    for _ in 0..2 {
        let (status, _, b) = post_as("sk-small", &url, body).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&b));
    }
    let (status, headers, b) = post_as("sk-small", &url, body).await;
    assert_error(status, &headers, &b, 429, "rate_limit_exceeded");
    assert!(json(&b)["error"]["message"].as_str().unwrap().contains("tokens per minute"));
    // Without the correction the estimate (a dozen tokens) would have let ~80 through.
    // Tenants without an override are not limited.
    let (status, _, _) = post_as("sk-other", &url, body).await;
    assert_eq!(status, 200);
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budget_is_corrected_from_what_a_stream_delivered() {
    let up = Upstream::start("u").await;
    let cfg = format!("[admission.tenants.sk-small]\ntokens_per_minute = 1000\n\n{}", config(&model("m", &[&up], "")));
    let router = Router::start(&cfg).await;
    let url = router.url("/v1/chat/completions");
    // Each request may cost 600 tokens, but the stream delivers 3 content events.
    let body = r#"{"model":"m","stream":true,"max_tokens":600,"messages":[{"role":"user","content":"hi"}]}"#;
    for i in 0..6 {
        let mut req = post_req(&url, body);
        req.headers_mut().insert("authorization", "Bearer sk-small".parse().unwrap());
        let (status, _, b) = send(&client(), req).await.unwrap();
        // Charged at the estimate only, the third request would find the bucket in debt.
        assert_eq!(status, 200, "request {i}: {}", String::from_utf8_lossy(&b));
        assert!(String::from_utf8_lossy(&b).ends_with("data: [DONE]\n\n"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_model_sheds_with_503_and_admitted_requests_complete() {
    let slow = Upstream::start("slow").await;
    slow.script(|s| s.delay = Duration::from_millis(600));
    let fast = Upstream::start("fast").await;
    let cfg = config(&(model("busy", &[&slow], "max_in_flight = 2") + &model("other", &[&fast], "")));
    let router = Router::start(&cfg).await;
    let url = router.url("/v1/chat/completions");

    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = post(&url, chat_body("busy", false)).await;
                (r, t.elapsed())
            })
        })
        .collect();
    let mut admitted = 0;
    let mut shed = 0;
    for t in tasks {
        let ((status, headers, body), took) = t.await.unwrap();
        match status.as_u16() {
            200 => admitted += 1,
            503 => {
                assert_error(status, &headers, &body, 503, "overloaded");
                assert!(took < Duration::from_millis(400), "shed requests are answered at once, took {took:?}");
                shed += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!((admitted, shed), (2, 3));
    // The limit is per model: another model is unaffected.
    let (status, _, _) = post(&url, chat_body("other", false)).await;
    assert_eq!(status, 200);
    let n = router.metric("switchyard_admission_rejected_total", &[("reason", "model_concurrency")]).await;
    assert_eq!(n, Some(3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_sheds_beyond_its_capacity_before_reading_bodies() {
    let slow = Upstream::start("slow").await;
    slow.script(|s| s.delay = Duration::from_millis(600));
    let cfg = format!("[admission]\nmax_in_flight = 1\n\n{}", config(&model("m", &[&slow], "")));
    let router = Router::start(&cfg).await;
    let url = router.url("/v1/chat/completions");
    let first = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, chat_body("m", false)).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (status, headers, body) = post(&url, chat_body("m", false)).await;
    assert_error(status, &headers, &body, 503, "overloaded");
    assert_eq!(first.await.unwrap().0, 200, "the admitted request completes");
    // Capacity is released with the answer.
    let (status, _, _) = post(&url, chat_body("m", false)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_requires_its_bearer_token_when_one_is_configured() {
    let up = Upstream::start("u").await;
    let cfg = config(&model("m", &[&up], "")).replace("[admin]\n", "[admin]\ntoken = \"s3cret\"\n");
    let router = Router::start(&cfg).await;
    let url = router.admin_url("/admin/endpoints");

    let (status, headers, body) = get(&url).await;
    assert_eq!(status, 401);
    assert!(headers.contains_key("www-authenticate"));
    assert_eq!(json(&body)["error"]["code"], "invalid_api_key");
    let with = |token: &str| {
        let mut req = http::Request::get(&url).body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    };
    let (status, _, _) = send(&client(), with("s3cre7")).await.unwrap();
    assert_eq!(status, 401);
    let (status, _, body) = send(&client(), with("s3cret")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(json(&body)["models"][0]["model"], "m");
    // The public listener is not behind the admin token.
    let (status, _, _) = post(&router.url("/v1/chat/completions"), chat_body("m", false)).await;
    assert_eq!(status, 200);
}
