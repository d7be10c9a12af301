use std::time::Duration;

use switchyard_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spreads_load_over_healthy_endpoints() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    for u in &ups {
        u.script(|s| s.delay = Duration::from_millis(2));
    }
    let refs: Vec<&Upstream> = ups.iter().collect();
    let router = Router::start(&config(&model("m", &refs, ""))).await;

    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url) = (c.clone(), router.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let mut served = Vec::new();
            for _ in 0..40 {
                let (status, headers, _) = send(&c, post_req(&url, chat_body("m", false))).await.unwrap();
                assert_eq!(status, 200);
                served.push(headers["x-switchyard-endpoint"].to_str().unwrap().to_string());
            }
            served
        }));
    }
    let mut served = Vec::new();
    for t in tasks {
        served.extend(t.await.unwrap());
    }
    assert_eq!(served.len(), 320);
    for u in &ups {
        let by_header = served.iter().filter(|s| *s == u.name()).count();
        assert_eq!(by_header as u64, u.hits(), "header and upstream count agree for {}", u.name());
        assert!(u.hits() >= 32, "endpoint {} got {} of 320 requests", u.name(), u.hits());
    }
    assert_eq!(
        router.metric("switchyard_requests_total", &[("model", "m"), ("endpoint", "a"), ("status", "200")]).await,
        Some(ups[0].hits() as f64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_the_body_unchanged_and_lists_models() {
    let up = Upstream::start("a").await;
    let router = Router::start(&config(&(model("m1", &[&up], "") + &model("m2", &[&up], "")))).await;
    let body = r#"{"model":"m1","messages":[{"role":"user","content":"h\u00e9llo \"q\""}],"temperature":0.5,"x_vendor":{"k":[1,2]}}"#;
    let (status, headers, _) = post(&router.url("/v1/chat/completions"), body).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-switchyard-endpoint"], "a");
    assert!(headers.get("x-switchyard-attempts").is_none());
    assert_eq!(up.last_body().unwrap(), body.as_bytes());

    let (status, _, body) = get(&router.url("/v1/models")).await;
    assert_eq!(status, 200);
    let v = json(&body);
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["m1", "m2"]);
    assert_eq!(v["object"], "list");
}
