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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_comes_back_is_not_held_out_by_its_old_ejection() {
    // A long ejection: without the reset, the endpoint would sit out a minute.
    let extra = format!(
        "{FAST_CHECKS}\noutlier = {{ consecutive_failures = 2, base_ejection = \"60s\", max_ejection = \"60s\", max_ejected_share = 0.5 }}"
    );
    let flaky = Upstream::start("flaky").await;
    let steady = Upstream::start("steady").await;
    let router = Router::start(&config(&model("m", &[&flaky, &steady], &extra))).await;
    let c = client();
    let ep = |name| [("model", "m"), ("endpoint", name)];
    let wait_health = |name: &'static str, up: bool| {
        let router = &router;
        async move {
            let want = if up { 1.0 } else { 0.0 };
            router.wait_metric("switchyard_endpoint_healthy", &ep(name), Duration::from_secs(10), |v| v == want).await
        }
    };

    // With `steady` out of rotation, `flaky` takes every request, fails them, and is ejected.
    steady.script(|s| s.health_status = 503);
    wait_health("steady", false).await;
    flaky.script(|s| s.status = 503);
    for _ in 0..4 {
        send(&c, post_req(&router.url("/v1/chat/completions"), chat_body("m", false))).await.unwrap();
    }
    assert_eq!(router.metric("switchyard_endpoint_ejections_total", &ep("flaky")).await, Some(1.0));
    // Then its process dies (checks fail too) while `steady` comes back.
    flaky.script(|s| s.health_status = 503);
    wait_health("flaky", false).await;
    steady.script(|s| s.health_status = 200);
    wait_health("steady", true).await;

    // `flaky` is restarted: checks pass, and it starts over instead of sitting out 60 s.
    flaky.script(|s| {
        s.status = 200;
        s.health_status = 200;
    });
    wait_health("flaky", true).await;
    assert_eq!(router.metric("switchyard_endpoint_ejected", &ep("flaky")).await, Some(0.0));

    // Now the other one fails: the recovered endpoint answers everything.
    steady.script(|s| s.status = 503);
    flaky.reset_hits();
    for _ in 0..20 {
        let (status, headers, _) =
            send(&c, post_req(&router.url("/v1/chat/completions"), chat_body("m", false))).await.unwrap();
        assert_eq!(status, 200, "the recovered endpoint must take over, not sit out its old ejection");
        assert_eq!(headers["x-switchyard-endpoint"], "flaky");
    }
    assert!(flaky.hits() >= 20);
}
