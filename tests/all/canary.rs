//! Canary rollout through the real binary and the `canary` policy component: automatic
//! rollback, promotion in steps, stickiness per tenant and the operator's admin actions.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use switchyard_e2e::*;

/// A model "m" with a stable (v1) and a canary (v2) endpoint, the canary policy bound to
/// it with `settings`, and the round-robin-free native balancer.
async fn canary_router(stable: &Upstream, canary: &Upstream, settings: &str) -> Router {
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("plugins")).unwrap();
    std::fs::copy(policy("canary"), dir.0.join("plugins/canary.wasm")).unwrap();
    let models = format!(
        "[plugins.settings.canary]\nstable = \"v1\"\ncanary = \"v2\"\n{settings}\n\n\
         [[models]]\nname = \"m\"\npolicy = {{ canary = \"canary\" }}\n\
         [[models.endpoints]]\nurl = \"{}\"\nname = \"{}\"\nlabels = {{ version = \"v1\" }}\n\
         [[models.endpoints]]\nurl = \"{}\"\nname = \"{}\"\nlabels = {{ version = \"v2\" }}\n",
        stable.url(),
        stable.name(),
        canary.url(),
        canary.name()
    );
    let router = Router::start_in(dir, &config(&models)).await;
    assert_eq!(router.plugin_status("canary").await["state"], "active", "{}", router.log());
    router
}

async fn canary_state(router: &Router) -> serde_json::Value {
    let (status, _, body) = get(&router.admin_url("/admin/canary")).await;
    assert_eq!(status, 200);
    json(&body)["canaries"][0].clone()
}

async fn admin_post(router: &Router, path: &str) -> (http::StatusCode, serde_json::Value) {
    let (status, _, body) = post(&router.admin_url(path), "").await;
    (status, json(&body))
}

/// One request as tenant `key`; returns the endpoint that answered.
async fn ask(router: &Router, key: &str) -> String {
    let (status, headers, body) = post_as(key, &router.url("/v1/chat/completions"), chat_body("m", false)).await;
    assert_eq!(status, 200, "tenant {key}: {}", String::from_utf8_lossy(&body));
    headers["x-switchyard-endpoint"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_is_rolled_back_without_an_operator_and_no_client_sees_its_errors() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    canary.script(|s| s.status = 500);
    let router = canary_router(&stable, &canary, "steps_percent = [30, 100]\nmin_requests = 20").await;

    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while canary_state(&router).await["phase"] != "rolled-back" {
        assert!(Instant::now() < deadline, "never rolled back: {}", canary_state(&router).await);
        for _ in 0..20 {
            // A canary failure is retried on stable: the client never sees it.
            assert_eq!(ask(&router, &format!("tenant-{n}")).await, "stable");
            n += 1;
        }
    }
    let state = canary_state(&router).await;
    assert_eq!(state["share_percent"], 0.0, "{state}");
    assert!(state["reason"].as_str().unwrap().contains("error"), "the reason names the error rate: {state}");
    let v2 = &state["versions"][1];
    assert_eq!(v2["version"], "v2");
    assert!(v2["errors"].as_u64().unwrap() >= 1, "{state}");
    assert_eq!(router.metric("switchyard_canary_share_permille", &[("model", "m")]).await, Some(0.0));
    assert!(
        router.metric("switchyard_canary_transitions_total", &[("model", "m"), ("phase", "rolled-back")]).await
            >= Some(1.0)
    );

    // Rolled back means rolled back: even once healthy again, the canary gets nothing.
    canary.script(|s| s.status = 200);
    canary.reset_hits();
    for i in 0..60 {
        assert_eq!(ask(&router, &format!("after-{i}")).await, "stable");
    }
    assert_eq!(canary.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_is_promoted_to_all_traffic_in_steps() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    let router =
        canary_router(&stable, &canary, "steps_percent = [10, 40, 70, 100]\nmin_requests = 15\nmin_step_ms = 300")
            .await;

    let mut shares = Vec::new();
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let state = canary_state(&router).await;
        if let Some(share) = state["share_percent"].as_f64()
            && shares.last() != Some(&share)
        {
            shares.push(share);
        }
        if state["phase"] == "promoted" {
            break;
        }
        assert!(Instant::now() < deadline, "never promoted; shares seen {shares:?}; {state}");
        for _ in 0..10 {
            ask(&router, &format!("tenant-{n}")).await;
            n += 1;
        }
    }
    assert_eq!(shares, vec![10.0, 40.0, 70.0, 100.0], "raised step by step, never lowered");
    assert_eq!(router.metric("switchyard_canary_share_permille", &[("model", "m")]).await, Some(1000.0));

    stable.reset_hits();
    for i in 0..40 {
        assert_eq!(ask(&router, &format!("late-{i}")).await, "canary");
    }
    assert_eq!(stable.hits(), 0, "a promoted canary takes all traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignment_is_sticky_per_tenant_and_operators_can_promote_pause_and_roll_back() {
    let stable = Upstream::start("stable").await;
    let canary = Upstream::start("canary").await;
    // Never judged automatically: only the operator moves this rollout.
    let router = canary_router(&stable, &canary, "steps_percent = [20, 100]\nmin_requests = 1000000").await;

    let mut by_tenant: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for t in 0..100 {
            let key = format!("tenant-{t}");
            let got = ask(&router, &key).await;
            if round == 0 {
                by_tenant.insert(key, got);
            } else {
                assert_eq!(by_tenant[&key], got, "{key} moved between versions");
            }
        }
    }
    let on_canary = by_tenant.values().filter(|v| *v == "canary").count();
    assert!((5..=40).contains(&on_canary), "about 20% of tenants on the canary, got {on_canary}");

    let (status, state) = admin_post(&router, "/admin/canary/m/promote").await;
    assert_eq!(status, 200);
    assert_eq!((state["phase"].as_str(), state["share_percent"].as_f64()), (Some("promoted"), Some(100.0)), "{state}");
    for t in 0..20 {
        assert_eq!(ask(&router, &format!("tenant-{t}")).await, "canary");
    }

    let (_, state) = admin_post(&router, "/admin/canary/m/rollback").await;
    assert_eq!((state["phase"].as_str(), state["share_percent"].as_f64()), (Some("rolled-back"), Some(0.0)), "{state}");
    assert!(state["reason"].as_str().unwrap().contains("operator"), "{state}");
    for t in 0..20 {
        assert_eq!(ask(&router, &format!("tenant-{t}")).await, "stable");
    }

    // Resume restarts the rollout at its first step; pause holds it there.
    let (_, state) = admin_post(&router, "/admin/canary/m/resume").await;
    assert_eq!((state["phase"].as_str(), state["share_percent"].as_f64()), (Some("ramping"), Some(20.0)), "{state}");
    let (_, state) = admin_post(&router, "/admin/canary/m/pause").await;
    assert_eq!((state["phase"].as_str(), state["share_percent"].as_f64()), (Some("paused"), Some(20.0)), "{state}");
    for t in 0..100 {
        let key = format!("tenant-{t}");
        assert_eq!(ask(&router, &key).await, by_tenant[&key], "the same tenants are back on the canary");
    }

    let (status, body) = admin_post(&router, "/admin/canary/m/explode").await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("promote"));
    assert_eq!(admin_post(&router, "/admin/canary/nope/promote").await.0, 404);
}
