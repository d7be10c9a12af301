//! Policy benchmark: per-decision cost of each standard balancer, the WebAssembly guest
//! against the same Rust compiled natively, at 8 and 64 endpoints; and the time from a
//! rename into the plugin folder to the new version serving.
//!
//! Needs the components: `scripts/build-policies.sh` first (they are read from `plugins/`,
//! or from `$POLICY_DIR`). Run: `cargo bench -p switchyard --bench policy`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::plugin::engine::PluginEngine;
use switchyard::plugin::loader::{Loader, sha256_hex};
use switchyard::plugin::runtime::{Shared, wit};
use switchyard_policy::Policy;

const POLICIES: [&str; 4] = ["round-robin", "weighted-round-robin", "least-request", "consistent-hash"];

fn policy_dir() -> PathBuf {
    std::env::var_os("POLICY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../plugins"))
}

/// A decision to time: called with a running counter.
type Case<'a> = Box<dyn FnMut(u32) + 'a>;

/// Times every case in rounds, taking turns within each round, so a slow spell of a
/// shared machine lands on all cases alike instead of on whichever ran then; each case's
/// result is the median over rounds, in nanoseconds per call.
fn measure_interleaved(cases: &mut [Case<'_>], iters: u32, rounds: usize) -> Vec<f64> {
    for f in cases.iter_mut() {
        for i in 0..iters / 10 {
            f(i);
        }
    }
    let mut per: Vec<Vec<f64>> = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        for (f, out) in cases.iter_mut().zip(per.iter_mut()) {
            let t = Instant::now();
            for i in 0..iters {
                f(i);
            }
            out.push(t.elapsed().as_nanos() as f64 / iters as f64);
        }
    }
    per.into_iter()
        .map(|mut v| {
            v.sort_by(f64::total_cmp);
            v[rounds / 2]
        })
        .collect()
}

fn native_topology(n: usize) -> switchyard_policy::Topology {
    switchyard_policy::Topology {
        model: "bench".into(),
        endpoints: (0..n)
            .map(|i| switchyard_policy::EndpointInfo {
                name: format!("ep-{i}"),
                region: 0,
                version: 0,
                weight: 1 + (i % 3) as u32,
                labels: vec![],
            })
            .collect(),
        regions: vec![],
        local_region: 0,
        versions: vec![],
        fallback_models: vec![],
    }
}

fn wit_topology(n: usize) -> wit::Topology {
    wit::Topology {
        model: "bench".into(),
        endpoints: (0..n)
            .map(|i| wit::EndpointInfo {
                name: format!("ep-{i}"),
                region: 0,
                version: 0,
                weight: 1 + (i % 3) as u32,
                labels: vec![],
            })
            .collect(),
        regions: vec![],
        local_region: 0,
        versions: vec![],
        fallback_models: vec![],
    }
}

fn native_states(n: usize, k: u32) -> Vec<switchyard_policy::EndpointState> {
    (0..n)
        .map(|i| switchyard_policy::EndpointState {
            healthy: i % 7 != 3,
            circuit: switchyard_policy::CircuitState::Closed,
            in_flight: (i as u32 * 7 + k) % 5,
            ewma_latency_us: 1_000 + (i as u32 * 37 + k) % 500,
            error_rate_ppm: 0,
        })
        .collect()
}

fn wit_states(n: usize, k: u32) -> Vec<wit::EndpointState> {
    native_states(n, k)
        .into_iter()
        .map(|s| wit::EndpointState {
            healthy: s.healthy,
            circuit: wit::CircuitState::Closed,
            in_flight: s.in_flight,
            ewma_latency_us: s.ewma_latency_us,
            error_rate_ppm: s.error_rate_ppm,
        })
        .collect()
}

fn native_request(k: u32) -> switchyard_policy::Request {
    switchyard_policy::Request {
        tenant: 1,
        client_region: u32::MAX,
        prefix_hash: (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        streaming: false,
        attempt: 0,
        prompt_tokens: 100,
    }
}

fn wit_request(k: u32) -> wit::Request {
    let r = native_request(k);
    wit::Request {
        tenant: r.tenant,
        client_region: r.client_region,
        prefix_hash: r.prefix_hash,
        streaming: false,
        attempt: 0,
        prompt_tokens: r.prompt_tokens,
    }
}

fn native_case(name: &str, n: usize) -> Case<'static> {
    // 16 precomputed state vectors, cycled, so the decision sees changing load.
    let states: Vec<_> = (0..16).map(|k| native_states(n, k)).collect();
    macro_rules! case {
        ($t:ty) => {{
            let mut p = <$t>::new("{}").unwrap();
            p.set_topology(native_topology(n));
            Box::new(move |i| {
                let r = p.balance(&native_request(i), &states[(i % 16) as usize]);
                std::hint::black_box(r);
            })
        }};
    }
    match name {
        "round-robin" => case!(policy_round_robin::RoundRobin),
        "weighted-round-robin" => case!(policy_weighted_round_robin::WeightedRoundRobin),
        "least-request" => case!(policy_least_request::LeastRequest),
        "consistent-hash" => case!(policy_consistent_hash::ConsistentHash),
        _ => unreachable!(),
    }
}

fn wasm_case(loader: &Loader, name: &str, bytes: &[u8], n: usize) -> Case<'static> {
    let sha = sha256_hex(bytes);
    let loaded = loader.load(name, bytes, &sha, "{}", 0).expect("component loads");
    // Every binding needs its own uid: the warm instance of a thread is found by it.
    static UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000);
    let uid = UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let binding = Arc::new(loaded.bind(uid, wit_topology(n), Duration::from_millis(5), Shared::new(None)));
    // The router packs the snapshot per request; so does the benchmark, inside the loop.
    let states: Vec<_> = (0..16).map(|k| wit_states(n, k)).collect();
    let mut packed = Vec::with_capacity(n * switchyard::plugin::runtime::STATE_WORDS);
    Box::new(move |i| {
        packed.clear();
        for s in &states[(i % 16) as usize] {
            switchyard::plugin::runtime::pack_state(&mut packed, s);
        }
        let r = binding.balance(wit_request(i), &packed).expect("no fault");
        std::hint::black_box(r);
    })
}

fn swap_bench(dir: &std::path::Path) {
    use switchyard::config::Config;
    let work = std::env::temp_dir().join(format!("switchyard-swap-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("plugins")).unwrap();
    let cfg_text = "[[listeners]]\naddr = \"127.0.0.1:0\"\n[plugins]\ndir = \"plugins\"\ndebounce = \"50ms\"\n\
        [[models]]\nname = \"m\"\npolicy = { balance = \"bal\" }\n\
        [[models.endpoints]]\nurl = \"http://127.0.0.1:9\"\n[[models.endpoints]]\nurl = \"http://127.0.0.1:10\"\n";
    let cfg_path = work.join("switchyard.toml");
    std::fs::write(&cfg_path, cfg_text).unwrap();
    let cfg = Config::load(&cfg_path).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let registry = prometheus::Registry::new();
    let host = switchyard::plugin::PluginHost::new(&cfg, &registry).unwrap();
    rt.block_on(host.start()).unwrap();
    let files = ["round-robin", "least-request", "weighted-round-robin", "consistent-hash"];
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for round in 0..24 {
        let name = files[round % files.len()];
        let src = dir.join(format!("{name}.wasm"));
        let want = sha256_hex(&std::fs::read(&src).unwrap());
        let tmp = work.join("plugins/.bal.wasm.tmp");
        std::fs::copy(&src, &tmp).unwrap();
        let t = Instant::now();
        std::fs::rename(&tmp, work.join("plugins/bal.wasm")).unwrap();
        loop {
            if host.current().balancer(0).is_some_and(|b| b.sha256 == want) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "swap to {name} never happened");
            std::thread::sleep(Duration::from_micros(200));
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if round < files.len() {
            cold.push(ms)
        } else {
            warm.push(ms)
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() - 1])
    };
    let (cold_med, cold_max) = stats(&mut cold);
    let (warm_med, warm_max) = stats(&mut warm);
    println!("\n## Rename into plugins/ → new version serving (debounce 50 ms)\n");
    println!("| case | median | max |\n|---|---|---|");
    println!("| first load (compile) | {cold_med:.1} ms | {cold_max:.1} ms |");
    println!("| reload (artifact cached by sha256) | {warm_med:.1} ms | {warm_max:.1} ms |");
    println!("\ntarget ≤ 250 ms: {}", if cold_max <= 250.0 && warm_max <= 250.0 { "PASS" } else { "MISS" });
    drop(rt);
    let _ = std::fs::remove_dir_all(&work);
}

fn main() {
    let dir = policy_dir();
    let missing: Vec<_> = POLICIES.iter().filter(|p| !dir.join(format!("{p}.wasm")).exists()).collect();
    if !missing.is_empty() {
        eprintln!("missing components {missing:?} in {}: run scripts/build-policies.sh first", dir.display());
        std::process::exit(2);
    }
    let iters: u32 = std::env::var("ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    let engine = PluginEngine::new(16 << 20, 64).unwrap();
    let cache = std::env::temp_dir().join(format!("switchyard-bench-cache-{}", std::process::id()));
    let loader = Loader::new(engine, cache.clone(), Duration::from_millis(5)).unwrap();
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    println!(
        "## Per-decision cost (median of {rounds} rounds × {iters} decisions; the cases take turns within each round)\n"
    );
    println!("| policy | endpoints | native | wasm | wasm/native | target ≤ 1 µs at 8 |");
    println!("|---|---|---|---|---|---|");
    // ONLY=round-robin,least-request limits the table (and skips the swap timing).
    let only: Option<Vec<String>> = std::env::var("ONLY").ok().map(|v| v.split(',').map(str::to_string).collect());
    let policies: Vec<&str> =
        POLICIES.into_iter().filter(|p| only.as_ref().is_none_or(|o| o.iter().any(|x| x == p))).collect();
    for n in [8usize, 64] {
        let mut cases: Vec<Case<'_>> = Vec::new();
        for p in &policies {
            let bytes = std::fs::read(dir.join(format!("{p}.wasm"))).unwrap();
            cases.push(native_case(p, n));
            cases.push(wasm_case(&loader, p, &bytes, n));
        }
        let ns = measure_interleaved(&mut cases, iters, rounds);
        for (p, r) in policies.iter().zip(ns.chunks_exact(2)) {
            let (native, wasm) = (r[0], r[1]);
            let verdict = if n == 8 { if wasm <= 1_000.0 { "PASS" } else { "MISS" } } else { "" };
            println!("| {p} | {n} | {native:.0} ns | {wasm:.0} ns | {:.1}× | {verdict} |", wasm / native);
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
    if only.is_none() {
        swap_bench(&dir);
    }
}
