//! Multi-region routing through real routers: three PoPs, the `geo` policy on the entry
//! router, a region going down and coming back.

use std::time::{Duration, Instant};

use switchyard_e2e::*;

const FAST_CHECKS: &str =
    r#"health_check = { interval = "100ms", max_latency = "500ms", unhealthy_after = 1, healthy_after = 1 }"#;

/// A PoP router serving model "m" from one upstream.
async fn pop(up: &Upstream) -> Router {
    Router::start(&config(&model("m", &[up], FAST_CHECKS))).await
}

/// Sends one request to `router` as a client in `region` (None: no header); returns the
/// endpoint that answered and the region the response names.
async fn ask(router: &Router, region: Option<&str>, hop: Option<&str>) -> (String, String) {
    let mut req = post_req(&router.url("/v1/chat/completions"), chat_body("m", false));
    if let Some(r) = region {
        req.headers_mut().insert("x-switchyard-client-region", r.parse().unwrap());
    }
    if let Some(h) = hop {
        req.headers_mut().insert("x-switchyard-hop", h.parse().unwrap());
    }
    let (status, headers, body) = send(&client(), req).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    (h("x-switchyard-endpoint"), h("x-switchyard-region"))
}

/// Polls until a client of `region` is served by `endpoint`.
async fn wait_served_by(router: &Router, region: &str, endpoint: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if ask(router, Some(region), None).await.0 == endpoint {
            return;
        }
        assert!(Instant::now() < deadline, "{region} clients never reached {endpoint}; log:\n{}", router.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_go_to_the_nearest_healthy_region_and_follow_it_down_and_back() {
    let (a_up, b_up, c_up) =
        (Upstream::start("dublin").await, Upstream::start("new-york").await, Upstream::start("chicago").await);
    let (b, c) = (pop(&b_up).await, pop(&c_up).await);
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("plugins")).unwrap();
    std::fs::copy(policy("geo"), dir.0.join("plugins/geo.wasm")).unwrap();
    let geo = format!(
        r#"[geo]
region = "eu-west"
probe_interval = "100ms"
probe_timeout = "500ms"
unhealthy_after = 1
healthy_after = 1

[[geo.regions]]
name = "eu-west"
latitude = 53.35
longitude = -6.26

[[geo.regions]]
name = "us-east"
latitude = 40.71
longitude = -74.01
router = "http://{}"

[[geo.regions]]
name = "us-central"
latitude = 41.88
longitude = -87.63
router = "http://{}"

[[geo.client_networks]]
cidr = "127.0.0.0/8"
region = "us-central"
"#,
        b.addr(),
        c.addr()
    );
    let a = Router::start_in(
        dir,
        &config(&format!("{geo}\n{}", model("m", &[&a_up], &format!("{FAST_CHECKS}\npolicy = {{ geo = \"geo\" }}")))),
    )
    .await;
    assert_eq!(a.plugin_status("geo").await["state"], "active", "{}", a.log());

    // Nearest region: European clients stay here, New York's go to us-east, and clients
    // without the header are placed by their address (127.0.0.0/8 → us-central).
    assert_eq!(ask(&a, Some("eu-west"), None).await, ("dublin".into(), "eu-west".into()));
    assert_eq!(ask(&a, Some("us-east"), None).await, ("new-york".into(), "us-east".into()));
    assert_eq!(ask(&a, None, None).await, ("chicago".into(), "us-central".into()));

    // us-east goes down (its only model server fails its health checks, so its router
    // is unready): its clients move to the next nearest region, Chicago, not to Dublin.
    b_up.script(|s| s.health_status = 500);
    a.wait_metric("switchyard_region_up", &[("region", "us-east")], Duration::from_secs(10), |v| v == 0.0).await;
    for _ in 0..20 {
        assert_eq!(ask(&a, Some("us-east"), None).await, ("chicago".into(), "us-central".into()));
    }

    // ... and come back when it recovers.
    b_up.script(|s| s.health_status = 200);
    wait_served_by(&a, "us-east", "new-york").await;
    assert_eq!(a.metric("switchyard_region_up", &[("region", "us-east")]).await, Some(1.0));
    assert!(
        a.metric("switchyard_geo_routed_total", &[("region", "us-central"), ("result", "forwarded")]).await
            >= Some(20.0)
    );

    // A request another router already forwarded is served here, never sent on.
    b_up.reset_hits();
    assert_eq!(ask(&a, Some("us-east"), Some("us-central")).await, ("dublin".into(), "eu-west".into()));
    assert_eq!(b_up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_cannot_be_reached_costs_no_request() {
    let (a_up, b_up) = (Upstream::start("here").await, Upstream::start("there").await);
    let b = pop(&b_up).await;
    let b_addr = b.addr();
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("plugins")).unwrap();
    std::fs::copy(policy("geo"), dir.0.join("plugins/geo.wasm")).unwrap();
    // Slow probes: the region still looks up when its router dies.
    let geo = format!(
        "[geo]\nregion = \"a\"\nprobe_interval = \"1h\"\n\n\
         [[geo.regions]]\nname = \"a\"\nlatitude = 0.0\nlongitude = 0.0\n\n\
         [[geo.regions]]\nname = \"b\"\nlatitude = 10.0\nlongitude = 10.0\nrouter = \"http://{b_addr}\"\n"
    );
    let a =
        Router::start_in(dir, &config(&format!("{geo}\n{}", model("m", &[&a_up], "policy = { geo = \"geo\" }")))).await;
    assert_eq!(ask(&a, Some("b"), None).await.0, "there");
    drop(b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The forward fails to connect: served here instead, and the region is marked down.
    assert_eq!(ask(&a, Some("b"), None).await, ("here".into(), "a".into()));
    assert_eq!(a.metric("switchyard_region_up", &[("region", "b")]).await, Some(0.0));
    assert!(
        a.metric("switchyard_geo_routed_total", &[("region", "b"), ("result", "forward-failed")]).await >= Some(1.0)
    );
}
