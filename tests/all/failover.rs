use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use switchyard_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_one_upstream_under_load_without_client_errors() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    for u in &ups {
        // Slow enough that requests are in flight at the victim when it dies.
        u.script(|s| s.delay = Duration::from_millis(5));
    }
    let refs: Vec<&Upstream> = ups.iter().collect();
    let router =
        Router::start(&config(&model("m", &refs, r#"health_check = { interval = "200ms", max_latency = "200ms" }"#)))
            .await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let c = client();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (c, url, stop, ok, retried) =
            (c.clone(), router.url("/v1/chat/completions"), stop.clone(), ok.clone(), retried.clone());
        workers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match send(&c, post_req(&url, chat_body("m", false))).await {
                    Ok((status, headers, body)) if status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if headers.contains_key("x-switchyard-attempts") {
                            retried.fetch_add(1, Ordering::Relaxed);
                        }
                        assert_eq!(json(&body)["object"], "chat.completion");
                    }
                    Ok((status, _, body)) => errors.push(format!("{status}: {}", String::from_utf8_lossy(&body))),
                    Err(e) => errors.push(e),
                }
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let victim_before = ups[1].hits();
    ups[1].kill();
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in workers {
        errors.extend(w.await.unwrap());
    }
    assert!(errors.is_empty(), "client-visible errors: {errors:?}");
    assert!(victim_before > 20, "the victim took traffic before it died ({victim_before})");
    assert!(ok.load(Ordering::Relaxed) > 300, "steady load ran ({} ok)", ok.load(Ordering::Relaxed));
    assert!(retried.load(Ordering::Relaxed) >= 1, "some requests failed over to another endpoint");
    // The dead endpoint is taken out: by ejection or by the health checker.
    let ejected = router.metric("switchyard_endpoint_ejected", &[("endpoint", "b")]).await.unwrap();
    let healthy = router.metric("switchyard_endpoint_healthy", &[("endpoint", "b")]).await.unwrap();
    assert!(ejected == 1.0 || healthy == 0.0, "ejected={ejected} healthy={healthy}");
    assert!(router.metric("switchyard_retries_total", &[("model", "m")]).await.unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_a_5xx_on_another_endpoint_and_reports_attempts() {
    let bad = Upstream::start("bad").await;
    let good = Upstream::start("good").await;
    bad.script(|s| s.status = 503);
    let router = Router::start(&config(&model(
        "m",
        &[&bad, &good],
        "health_check = { enabled = false }\noutlier = { consecutive_failures = 0 }",
    )))
    .await;
    for _ in 0..20 {
        let (status, headers, _) = post(&router.url("/v1/chat/completions"), chat_body("m", false)).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-switchyard-endpoint"], "good");
        if headers.contains_key("x-switchyard-attempts") {
            assert_eq!(headers["x-switchyard-attempts"], "2");
        }
    }
    assert!(bad.hits() >= 1, "the failing endpoint was tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_amplification_when_everything_fails() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    for u in &ups {
        u.script(|s| s.status = 500);
    }
    let refs: Vec<&Upstream> = ups.iter().collect();
    let router = Router::start(&config(&model(
        "m",
        &refs,
        "health_check = { enabled = false }\noutlier = { consecutive_failures = 0 }\n\
         circuit_breaker = { min_requests = 1000000 }\n\
         retry = { max_attempts = 3, budget_ratio = 0.1, min_retries_per_sec = 1 }",
    )))
    .await;
    let c = client();
    for _ in 0..200 {
        let (status, _, body) =
            send(&c, post_req(&router.url("/v1/chat/completions"), chat_body("m", false))).await.unwrap();
        assert_eq!(status, 500, "the last upstream error is passed through");
        assert!(String::from_utf8_lossy(&body).contains("scripted 500"));
    }
    let total: u64 = ups.iter().map(|u| u.hits()).sum();
    // Without a budget this would be 600 attempts; the budget allows ~10% plus a small floor.
    assert!(total <= 200 + 20 + 15, "attempts {total}");
    assert!(total > 200, "some retries were allowed ({total})");
    assert!(router.metric("switchyard_retry_budget_exhausted_total", &[("model", "m")]).await.unwrap() > 0.0);
}
