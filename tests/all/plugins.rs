//! Policy plugins through the real binary: the standard balancers' distributions, hot swap
//! under load, adversarial components, quarantine, unloading and the offline checker.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use switchyard_e2e::*;

/// Three upstreams and a router whose model `m` runs plugin `bal` in the balance stage,
/// with `initial` already in `plugins/` at start.
async fn setup(initial: Option<&str>, model_extra: &str, plugin_settings: &str) -> (Vec<Upstream>, Router) {
    let ups = vec![Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("plugins")).unwrap();
    if let Some(p) = initial {
        std::fs::copy(policy(p), dir.0.join("plugins/bal.wasm")).unwrap();
    }
    let refs: Vec<&Upstream> = ups.iter().collect();
    let extra = format!("policy = {{ balance = \"bal\" }}\n{model_extra}");
    let cfg = format!(
        "[plugins]\ndebounce = \"30ms\"\nrescan_interval = \"1s\"\n{plugin_settings}\n\n{}",
        config(&model("m", &refs, &extra))
    );
    let router = Router::start_in(dir, &cfg).await;
    (ups, router)
}

async fn served_by(router: &Router, c: &HttpClient, body: String) -> String {
    let (status, headers, body) = send(c, post_req(&router.url("/v1/chat/completions"), body)).await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    headers["x-switchyard-endpoint"].to_str().unwrap().to_string()
}

async fn distribution(router: &Router, n: usize, body: impl Fn(usize) -> String) -> HashMap<String, usize> {
    let c = client();
    let mut counts = HashMap::new();
    for i in 0..n {
        *counts.entry(served_by(router, &c, body(i)).await).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let (_ups, router) = setup(Some("round-robin"), "", "").await;
    assert_eq!(router.plugin_status("bal").await["state"], "active");
    let counts = distribution(&router, 300, |_| chat_body("m", false)).await;
    // Each worker thread keeps its own instance (and counter), so the split is near-even.
    for name in ["a", "b", "c"] {
        let got = counts.get(name).copied().unwrap_or(0);
        assert!((75..=125).contains(&got), "{counts:?}");
    }
    let status = router.plugin_status("bal").await;
    assert!(status["calls"].as_u64().unwrap() >= 300, "{status}");
    assert_eq!(status["faults"], 0);
    assert_eq!(status["version"], "1.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_follows_weights() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await, Upstream::start("c").await];
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.0.join("plugins")).unwrap();
    std::fs::copy(policy("weighted-round-robin"), dir.0.join("plugins/bal.wasm")).unwrap();
    let mut models = "[[models]]\nname = \"m\"\npolicy = { balance = \"bal\" }\n".to_string();
    for (u, w) in ups.iter().zip([4, 1, 1]) {
        models.push_str(&format!(
            "[[models.endpoints]]\nurl = \"{}\"\nname = \"{}\"\nweight = {w}\n",
            u.url(),
            u.name()
        ));
    }
    let router = Router::start_in(dir, &config(&models)).await;
    let counts = distribution(&router, 300, |_| chat_body("m", false)).await;
    let a = counts.get("a").copied().unwrap_or(0);
    let (b, c) = (counts.get("b").copied().unwrap_or(0), counts.get("c").copied().unwrap_or(0));
    assert!((170..=230).contains(&a), "weight 4 of 6 → ~200: {counts:?}");
    assert!((30..=70).contains(&b) && (30..=70).contains(&c), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_avoids_a_slow_endpoint() {
    let (ups, router) = setup(Some("least-request"), "", "").await;
    ups[1].script(|s| s.delay = Duration::from_millis(60));
    ups[0].script(|s| s.delay = Duration::from_millis(2));
    ups[2].script(|s| s.delay = Duration::from_millis(2));
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (c, url) = (c.clone(), router.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            for _ in 0..40 {
                let (status, _, _) = send(&c, post_req(&url, chat_body("m", false))).await.unwrap();
                assert_eq!(status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total: u64 = ups.iter().map(|u| u.hits()).sum();
    assert_eq!(total, 240);
    assert!(ups[1].hits() < 30, "slow endpoint got {} of 240", ups[1].hits());
    assert!(ups[0].hits() > 80 && ups[2].hits() > 80, "{} {}", ups[0].hits(), ups[2].hits());
}

fn prefixed(prefix: usize) -> String {
    format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"system\",\"content\":\"tenant prompt number {prefix} {}\"}},{{\"role\":\"user\",\"content\":\"q{}\"}}]}}",
        "x".repeat(300),
        fastrand_like(prefix)
    )
}

fn fastrand_like(i: usize) -> usize {
    i.wrapping_mul(2654435761) % 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_prefixes_on_their_endpoint_and_moves_only_the_failed_ones() {
    let (ups, router) = setup(
        Some("consistent-hash"),
        r#"health_check = { interval = "100ms", max_latency = "200ms", unhealthy_after = 1, healthy_after = 1 }"#,
        "",
    )
    .await;
    let c = client();
    let mut home = HashMap::new();
    for p in 0..40 {
        let first = served_by(&router, &c, prefixed(p)).await;
        for _ in 0..3 {
            assert_eq!(served_by(&router, &c, prefixed(p)).await, first, "prefix {p} moved");
        }
        home.insert(p, first);
    }
    let used: std::collections::HashSet<_> = home.values().collect();
    assert_eq!(used.len(), 3, "40 prefixes use all three endpoints: {home:?}");

    // b goes down: only b's prefixes move.
    ups[1].script(|s| s.health_status = 503);
    router
        .wait_metric("switchyard_endpoint_healthy", &[("endpoint", "b")], Duration::from_secs(10), |v| v == 0.0)
        .await;
    for p in 0..40 {
        let now = served_by(&router, &c, prefixed(p)).await;
        if home[&p] == "b" {
            assert_ne!(now, "b");
        } else {
            assert_eq!(now, home[&p], "prefix {p} moved although its endpoint is fine");
        }
    }
    // b recovers: its prefixes come back.
    ups[1].script(|s| s.health_status = 200);
    router
        .wait_metric("switchyard_endpoint_healthy", &[("endpoint", "b")], Duration::from_secs(10), |v| v == 1.0)
        .await;
    for p in 0..40 {
        assert_eq!(served_by(&router, &c, prefixed(p)).await, home[&p]);
    }
}

/// Steady load from `workers` tasks until `stop`; returns (ok, failures).
fn load(router: &Router, workers: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    let url = router.url("/v1/chat/completions");
    tokio::spawn(async move {
        let c = client();
        let ok = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (c, url, stop, ok) = (c.clone(), url.clone(), stop.clone(), ok.clone());
            tasks.push(tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match send(&c, post_req(&url, chat_body("m", false))).await {
                        Ok((s, _, _)) if s == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok((s, _, b)) => failures.push(format!("{s}: {}", String::from_utf8_lossy(&b))),
                        Err(e) => failures.push(e),
                    }
                }
                failures
            }));
        }
        let mut failures = Vec::new();
        for t in tasks {
            failures.extend(t.await.unwrap());
        }
        (ok.load(Ordering::Relaxed), failures)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swaps_under_load_without_a_failed_request() {
    let (_ups, router) = setup(Some("testkit-pin0"), "", "").await;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let loader = load(&router, 12, stop.clone());
    let c = client();
    let plugins = router.plugin_dir();
    for swap in 0..20 {
        let (file, expect) = if swap % 2 == 0 { ("testkit-pin2", "c") } else { ("testkit-pin0", "a") };
        publish_plugin(&plugins, "bal", &policy(file));
        let deadline = Instant::now() + Duration::from_secs(5);
        // The new behaviour is observed: every request goes to the pinned endpoint.
        loop {
            let mut all = true;
            for _ in 0..5 {
                all &= served_by(&router, &c, chat_body("m", false)).await == expect;
            }
            if all {
                break;
            }
            assert!(Instant::now() < deadline, "swap {swap} to {file} never took effect");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = loader.await.unwrap();
    let rate = ok as f64 / started.elapsed().as_secs_f64();
    assert!(failures.is_empty(), "failed requests during swaps: {failures:?}");
    assert!(rate >= 500.0, "load was {rate:.0} req/s ({ok} requests)");
    let status = router.plugin_status("bal").await;
    assert_eq!(status["faults"], 0, "{status}");
    assert!(status["load_attempts"].as_u64().unwrap() >= 20, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversarial_components_never_fail_a_request_nor_replace_the_working_plugin() {
    let (_ups, router) = setup(Some("testkit-pin0"), "", "").await;
    let good = router.plugin_status("bal").await;
    assert_eq!(good["state"], "active");
    let good_sha = good["sha256"].clone();
    let stop = Arc::new(AtomicBool::new(false));
    let loader = load(&router, 4, stop.clone());
    let plugins = router.plugin_dir();

    let truncated = router.dir.0.join("truncated.wasm");
    let bytes = std::fs::read(policy("round-robin")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();

    let cases: [(&str, std::path::PathBuf, &str); 6] = [
        ("infinite loop", policy("testkit-infinite-loop"), "deadline exceeded"),
        ("memory bomb", policy("testkit-memory-bomb"), "trap"),
        ("trap", policy("testkit-trap"), "unreachable"),
        ("out-of-range answer", policy("testkit-out-of-range"), "only 4 exist"),
        ("WASI import", policy("testkit-wasi"), "imports `wasi:"),
        ("truncated file", truncated, "not a valid WebAssembly component"),
    ];
    let c = client();
    for (what, file, reason) in cases {
        publish_plugin(&plugins, "bal", &file);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            let s = router.plugin_status("bal").await;
            if s["last_error"].as_str().is_some_and(|e| e.contains(reason)) {
                break s;
            }
            assert!(Instant::now() < deadline, "{what}: never rejected with {reason:?}: {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(status["sha256"], good_sha, "{what} replaced the working plugin: {status}");
        assert_eq!(status["state"], "active (last update rejected)", "{what}");
        for _ in 0..5 {
            assert_eq!(served_by(&router, &c, chat_body("m", false)).await, "a", "{what}: pin0 still decides");
        }
    }

    // A file rewritten slowly in place: partial contents are never published.
    let target = plugins.join("bal.wasm");
    let new = std::fs::read(policy("testkit-pin2")).unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&target).unwrap();
        for chunk in new.chunks(new.len().div_ceil(8)) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            tokio::time::sleep(Duration::from_millis(80)).await;
            let s = router.plugin_status("bal").await;
            assert_eq!(s["sha256"], good_sha, "a partial file was published: {s}");
        }
    }
    // Once complete, it is a valid plugin and may take over.
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_by(&router, &c, chat_body("m", false)).await != "c" {
        assert!(Instant::now() < deadline, "the completed rewrite never took effect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = loader.await.unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(ok > 100);
    assert!(
        router.metric("switchyard_plugin_loads_total", &[("plugin", "bal"), ("result", "rejected")]).await.unwrap()
            >= 6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_keeps_faulting_is_quarantined_and_the_last_good_restored() {
    let (_ups, router) = setup(Some("testkit-pin0"), "", "").await;
    publish_plugin(&router.plugin_dir(), "bal", &policy("testkit-time-bomb"));
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    // The time bomb passes the self-test, then traps on real traffic: every request still
    // succeeds (the native policy decides), until the version is quarantined.
    let status = loop {
        let (status, _, body) =
            send(&c, post_req(&router.url("/v1/chat/completions"), chat_body("m", false))).await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let s = router.plugin_status("bal").await;
        if s["state"] == "quarantined" {
            break s;
        }
        assert!(Instant::now() < deadline, "never quarantined: {s}");
    };
    assert!(status["last_error"].as_str().unwrap().contains("quarantined"), "{status}");
    assert_eq!(status["version"], "0.0.1");
    // pin0 is back.
    for _ in 0..10 {
        assert_eq!(served_by(&router, &c, chat_body("m", false)).await, "a");
    }
    assert!(router.metric("switchyard_plugin_fallbacks_total", &[("model", "m")]).await.unwrap() >= 5.0);
    assert_eq!(router.metric("switchyard_plugin_quarantines_total", &[("plugin", "bal")]).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_are_cached_across_restarts_and_deleting_the_file_unloads_it() {
    let (_ups, router) = setup(Some("testkit-pin0"), "", "").await;
    let cache = router.plugin_dir().join(".cache");
    let artifacts: Vec<_> = std::fs::read_dir(&cache).unwrap().filter_map(|e| e.ok()).collect();
    assert_eq!(artifacts.len(), 1, "one compiled artifact, named by content hash");
    let sha = router.plugin_status("bal").await["sha256"].as_str().unwrap().to_string();
    assert_eq!(artifacts[0].file_name().to_string_lossy(), format!("{sha}.cwasm"));

    assert_eq!(router.plugin_status("bal").await["compiled"], "fresh");

    // A restart reuses the artifact instead of compiling again.
    let compiled_at = std::fs::metadata(artifacts[0].path()).unwrap().modified().unwrap();
    let router = router.restart().await;
    let status = router.plugin_status("bal").await;
    assert_eq!(status["compiled"], "cache", "{status}");
    assert_eq!(status["sha256"], sha.as_str());
    assert_eq!(std::fs::metadata(artifacts[0].path()).unwrap().modified().unwrap(), compiled_at);

    std::fs::remove_file(router.plugin_dir().join("bal.wasm")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while router.plugin_status("bal").await["state"] != "removed" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counts = distribution(&router, 60, |_| chat_body("m", false)).await;
    assert!(counts.len() >= 2, "native policy spreads traffic again: {counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_plugin_folder_is_only_rescanned_on_the_interval() {
    // Every scan opens the folder, and the watcher sees that open: were opens counted as
    // changes, each scan would schedule the next (20 a second at this debounce).
    let (_ups, router) = setup(Some("round-robin"), "", "").await;
    let first = router.plugin_status("bal").await;
    assert_eq!(first["state"], "active");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = router.metric("switchyard_plugin_scans_total", &[]).await.expect("scan counter");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = router.metric("switchyard_plugin_scans_total", &[]).await.unwrap();
    // `rescan_interval = "1s"`: three periodic scans, one more for timer slack.
    assert!(after - before <= 4.0, "{before} -> {after} scans in 3 s of an unchanged folder");

    // A real change is still picked up through the watcher, well before the next rescan
    // would find it.
    std::fs::copy(policy("testkit-pin0"), router.plugin_dir().join("bal.wasm.tmp")).unwrap();
    std::fs::rename(router.plugin_dir().join("bal.wasm.tmp"), router.plugin_dir().join("bal.wasm")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while router.plugin_status("bal").await["sha256"] == first["sha256"] {
        assert!(Instant::now() < deadline, "the swapped file was never loaded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn plugin_check_validates_offline_and_says_why() {
    let run = |file: &std::path::Path| {
        std::process::Command::new(router_bin()).args(["plugin", "check"]).arg(file).output().unwrap()
    };
    let out = run(&policy("least-request"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("least-request 1.0.0"));

    let out = run(&policy("testkit-wasi"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("imports `wasi:") && err.contains("outside the policy contract"), "{err}");

    // The plugin's settings reach its init, and a refusal is reported.
    let out = std::process::Command::new(router_bin())
        .args(["plugin", "check", "--config", r#"{"decay": 7}"#])
        .arg(policy("least-request"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("init failed: decay must be a number in (0, 1]"), "{err}");

    let out = run(&policy("testkit-infinite-loop"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("deadline exceeded"));
}
