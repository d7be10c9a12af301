//! Local replicas of the real model, supervised by the router.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use switchyard_e2e::*;

async fn replicas(router: &Router) -> Vec<serde_json::Value> {
    let (status, _, body) = get(&router.admin_url("/admin/replicas")).await;
    assert_eq!(status, 200);
    json(&body)["processes"].as_array().unwrap().clone()
}

/// A router running 2 local replicas of the real model with `shards` processes each (model
/// settings `extra`), returned once both replicas are healthy.
async fn two_local_replicas(shards: u16, extra: &str) -> Router {
    let base = free_port_range(2 * shards);
    let cfg = config(&format!(
        r#"[[models]]
name = "smollm2"
health_check = {{ interval = "200ms", max_latency = "1s", unhealthy_after = 1, healthy_after = 1 }}
{extra}
[models.local]
replicas = 2
shards = {shards}
model = "{}"
binary = "{}"
base_port = {base}
threads = 1
restart_backoff = "200ms"
"#,
        model_file().display(),
        shard_bin().display()
    ));
    let router = Router::start(&cfg).await;
    for r in 0..2 {
        let name = format!("smollm2-local-{r}");
        router
            .wait_metric("switchyard_endpoint_healthy", &[("endpoint", name.as_str())], Duration::from_secs(300), |v| {
                v == 1.0
            })
            .await;
    }
    router
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_shard_process_fails_over_is_restarted_and_serves_again() {
    let router = two_local_replicas(
        2,
        "retry = { max_attempts = 3, budget_ratio = 0.5, min_retries_per_sec = 20 }\n\
         outlier = { consecutive_failures = 2, base_ejection = \"500ms\" }\n\
         timeouts = { request = \"60s\" }",
    )
    .await;
    let procs = replicas(&router).await;
    assert_eq!(procs.len(), 4, "2 replicas × 2 shards: {procs:?}");

    let body = r#"{"model":"smollm2","prompt":"The capital of France is","max_tokens":2,"temperature":0}"#;
    let stop = Arc::new(AtomicBool::new(false));
    let url = router.url("/v1/completions");
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (stop, url) = (stop.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            let mut served = Vec::new();
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match send(&c, post_req(&url, body)).await {
                    Ok((s, h, b)) if s == 200 => {
                        assert!(json(&b)["choices"][0]["text"].as_str().is_some());
                        served.push((Instant::now(), h["x-switchyard-endpoint"].to_str().unwrap().to_string()));
                    }
                    Ok((s, _, b)) => errors.push(format!("{s}: {}", String::from_utf8_lossy(&b))),
                    Err(e) => errors.push(e),
                }
            }
            (served, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;

    // kill -9 the second shard of replica 0, mid-load.
    let victim = procs.iter().find(|p| p["replica"] == 0 && p["shard"] == 1).unwrap();
    let pid = victim["pid"].as_u64().unwrap();
    let killed_at = Instant::now();
    assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());

    // The supervisor restarts it...
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = replicas(&router).await.into_iter().find(|p| p["replica"] == 0 && p["shard"] == 1).unwrap();
        if p["restarts"].as_u64().unwrap() >= 1 && p["pid"].as_u64().is_some_and(|new| new != pid) {
            assert!(p["last_exit"].as_str().unwrap().contains("signal: 9"), "{p}");
            break;
        }
        assert!(Instant::now() < deadline, "never restarted: {p}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...the replica becomes ready again and takes traffic.
    let deadline = Instant::now() + Duration::from_secs(180);
    let c = client();
    loop {
        let (s, h, _) = send(&c, post_req(&url, body)).await.unwrap();
        assert_eq!(s, 200);
        if h["x-switchyard-endpoint"] == "smollm2-local-0" && killed_at.elapsed() > Duration::from_secs(1) {
            break;
        }
        assert!(Instant::now() < deadline, "replica 0 never served again");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    let mut before = 0;
    for w in workers {
        let (served, errs) = w.await.unwrap();
        errors.extend(errs);
        before += served.iter().filter(|(t, e)| *t < killed_at && e == "smollm2-local-0").count();
    }
    assert!(errors.is_empty(), "client-visible errors: {errors:?}");
    assert!(before > 0, "replica 0 served before the kill");
    assert!(
        router.metric("switchyard_local_restarts_total", &[("replica", "0"), ("shard", "1")]).await.unwrap() >= 1.0
    );

    // A router killed outright leaves no shard process behind holding its ports.
    let pids: Vec<u64> = replicas(&router).await.iter().filter_map(|p| p["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 4);
    router.signal("KILL");
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "shard processes outlived their router: {pids:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a process exists and is not a zombie.
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// A stream from the real model survives its replica being killed mid-stream: the router
/// continues it on the other replica from the text already delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_its_replica_being_killed() {
    use http_body_util::BodyExt;
    let router = two_local_replicas(1, "timeouts = { first_byte = \"60s\", idle = \"30s\" }").await;
    let body = r#"{"model":"smollm2","stream":true,"max_tokens":40,"temperature":0,
                   "messages":[{"role":"user","content":"Write a short poem about the sea."}]}"#;
    let res = client().request(post_req(&router.url("/v1/chat/completions"), body)).await.unwrap();
    assert_eq!(res.status(), 200);
    let served_by = res.headers()["x-switchyard-endpoint"].to_str().unwrap().to_string();
    let replica: u64 = served_by.rsplit('-').next().unwrap().parse().unwrap();
    let mut body = res.into_body();
    let mut text = String::new();
    let mut killed_after = None;
    let end = loop {
        match body.frame().await {
            None => break Ok(()),
            Some(Err(e)) => break Err(format!("{e:?}")),
            Some(Ok(f)) => text.push_str(&String::from_utf8_lossy(&f.into_data().unwrap_or_default())),
        }
        let content_events = text.matches("\"content\":\"").count();
        if killed_after.is_none() && content_events >= 6 {
            let procs = replicas(&router).await;
            let pid = procs.iter().find(|p| p["replica"] == replica).unwrap()["pid"].as_u64().unwrap();
            assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
            killed_after = Some(content_events);
        }
    };
    end.expect("the client sees no error");
    let killed_after = killed_after.expect("the stream was long enough to be cut");
    let events: Vec<&str> = text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "one well-formed stream ending in [DONE]: {text}");
    assert_eq!(events.iter().filter(|e| **e == "[DONE]").count(), 1);
    let chunks: Vec<serde_json::Value> =
        events.iter().filter(|e| **e != "[DONE]").map(|e| json(e.as_bytes())).collect();
    let ids: std::collections::HashSet<&str> = chunks.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "one stream id throughout: {ids:?}");
    let roles = chunks.iter().filter(|c| c["choices"][0]["delta"]["role"].is_string()).count();
    assert!(roles <= 1, "one role header at most");
    let content: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    let produced = content.iter().filter(|c| !c.is_empty()).count();
    assert!(produced > killed_after, "the other replica went on: {produced} content events, cut after {killed_after}");
    assert_eq!(router.metric("switchyard_stream_resumes_total", &[("model", "smollm2")]).await, Some(1.0));
    eprintln!("resumed stream: {:?}", content.concat());
}
