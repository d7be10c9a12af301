use std::time::Duration;

use switchyard_e2e::*;

const FAST_CHECKS: &str =
    r#"health_check = { interval = "100ms", max_latency = "200ms", unhealthy_after = 2, healthy_after = 2 }"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_marked_unhealthy_and_receives_no_traffic_until_it_recovers() {
    let slow = Upstream::start("slow").await;
    let fast = Upstream::start("fast").await;
    let router = Router::start(&config(&model("m", &[&slow, &fast], FAST_CHECKS))).await;
    let healthy = |name| [("model", "m"), ("endpoint", name)];

    // Answers inference fine, but its health answers exceed the latency bound.
    slow.script(|s| s.health_delay = Duration::from_millis(400));
    router.wait_metric("switchyard_endpoint_healthy", &healthy("slow"), Duration::from_secs(10), |v| v == 0.0).await;
    assert_eq!(router.metric("switchyard_endpoint_healthy", &healthy("fast")).await, Some(1.0));

    slow.reset_hits();
    let c = client();
    for _ in 0..60 {
        let (status, headers, _) =
            send(&c, post_req(&router.url("/v1/chat/completions"), chat_body("m", false))).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(headers["x-switchyard-endpoint"], "fast");
    }
    assert_eq!(slow.hits(), 0, "an unhealthy endpoint gets no traffic");

    // Automatic recovery: fast health answers bring it back.
    slow.script(|s| s.health_delay = Duration::ZERO);
    router.wait_metric("switchyard_endpoint_healthy", &healthy("slow"), Duration::from_secs(10), |v| v == 1.0).await;
    for _ in 0..60 {
        send(&c, post_req(&router.url("/v1/chat/completions"), chat_body("m", false))).await.unwrap();
    }
    assert!(slow.hits() > 0, "a recovered endpoint takes traffic again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_endpoint_health() {
    let up = Upstream::start("only").await;
    let router = Router::start(&config(&model("m", &[&up], FAST_CHECKS))).await;
    assert_eq!(get(&router.url("/readyz")).await.0, 200);
    assert_eq!(get(&router.url("/healthz")).await.0, 200);
    up.script(|s| s.health_status = 500);
    router
        .wait_metric("switchyard_endpoint_healthy", &[("endpoint", "only")], Duration::from_secs(10), |v| v == 0.0)
        .await;
    let (status, _, body) = get(&router.url("/readyz")).await;
    assert_eq!(status, 503);
    assert_eq!(json(&body)["error"]["code"], "not_ready");
    assert_eq!(get(&router.url("/healthz")).await.0, 200, "liveness is not readiness");
}
