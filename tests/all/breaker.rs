use std::time::Duration;

use switchyard_e2e::*;

const ONE_ENDPOINT_BREAKER: &str = "health_check = { enabled = false }\n\
    outlier = { consecutive_failures = 0 }\n\
    retry = { max_attempts = 1 }\n\
    circuit_breaker = { window = \"30s\", min_requests = 5, failure_ratio = 0.5, open_for = \"400ms\", half_open_probes = 1, close_after = 2 }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_on_5xx_not_on_4xx_then_recovers_through_half_open() {
    let up = Upstream::start("u").await;
    let router = Router::start(&config(&model("m", &[&up], ONE_ENDPOINT_BREAKER))).await;
    let url = router.url("/v1/chat/completions");
    let circuit = [("model", "m"), ("endpoint", "u")];
    let c = client();
    let call = || async { send(&c, post_req(&url, chat_body("m", false))).await.unwrap() };

    // 4xx are the client's fault: the circuit stays closed and every request reaches the upstream.
    up.script(|s| s.status = 400);
    for _ in 0..20 {
        assert_eq!(call().await.0, 400);
    }
    assert_eq!(up.hits(), 20);
    assert_eq!(router.metric("switchyard_endpoint_circuit_state", &circuit).await, Some(0.0));

    // 5xx: once half of the window failed, the circuit opens and requests stop reaching it.
    up.script(|s| s.status = 500);
    up.reset_hits();
    let mut rejected = 0;
    for _ in 0..40 {
        let (status, headers, body) = call().await;
        if status == 503 {
            assert_eq!(json(&body)["error"]["code"], "no_healthy_endpoint");
            assert!(headers.contains_key("retry-after"));
            rejected += 1;
        } else {
            assert_eq!(status, 500);
        }
    }
    assert_eq!(up.hits(), 20, "20 failures against 20 successes reach the 50% ratio");
    assert_eq!(rejected, 20);
    assert_eq!(router.metric("switchyard_endpoint_circuit_state", &circuit).await, Some(2.0));

    // Half-open: after open_for one probe is let through; it fails, so the circuit re-opens.
    tokio::time::sleep(Duration::from_millis(500)).await;
    up.reset_hits();
    assert_eq!(call().await.0, 500, "the probe reaches the upstream");
    assert_eq!(call().await.0, 503, "a failed probe re-opens the circuit");
    assert_eq!(up.hits(), 1);

    // Recovery: the upstream is fixed; probes succeed and the circuit closes.
    up.script(|s| s.status = 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(call().await.0, 200);
    assert_eq!(
        router.metric("switchyard_endpoint_circuit_state", &circuit).await,
        Some(1.0),
        "half-open after one success"
    );
    assert_eq!(call().await.0, 200);
    assert_eq!(
        router.metric("switchyard_endpoint_circuit_state", &circuit).await,
        Some(0.0),
        "closed after close_after successes"
    );
    for _ in 0..10 {
        assert_eq!(call().await.0, 200);
    }
    assert!(router.metric("switchyard_circuit_opened_total", &circuit).await.unwrap() >= 2.0);
}
