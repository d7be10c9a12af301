//! Closed-loop load: each connection sends its next request as soon as the previous
//! response is complete. The request rate is whatever the system under test sustains.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::{Conn, Target};
use crate::stats::{Stats, json_status_map, json_str, json_str_list, pct};

pub struct Params {
    pub target: Target,
    pub duration: f64,
    pub connections: usize,
    pub warmup: f64,
}

pub struct Report {
    params: Params,
    stats: Stats,
    elapsed: f64,
}

pub async fn run(p: Params) -> anyhow::Result<Report> {
    let mut conns = Vec::with_capacity(p.connections);
    for _ in 0..p.connections {
        let mut c = Conn::new(p.target.clone());
        c.connect().await?;
        conns.push(c);
    }

    let stats = Arc::new(Mutex::new(Stats::new()));
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(p.warmup);
    let deadline = measure_from + Duration::from_secs_f64(p.duration);

    let mut workers = Vec::with_capacity(conns.len());
    for mut conn in conns {
        let stats = stats.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let sent = Instant::now();
                if sent >= deadline {
                    break;
                }
                let result = conn.send().await;
                let done = Instant::now();
                // Only requests that start and finish inside the window count, so the
                // rate is not inflated by work done during the warm-up.
                if sent >= measure_from && done <= deadline {
                    stats.lock().unwrap().record(&result, done - sent, done);
                }
                if result.is_err() {
                    // Avoid a hot loop against a dead target.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let stats = Arc::try_unwrap(stats).map_err(|_| anyhow::anyhow!("stats still shared"))?.into_inner().unwrap();
    Ok(Report { elapsed: p.duration, params: p, stats })
}

impl Report {
    pub fn print(&self, json: bool) {
        let s = &self.stats;
        let h = &s.latency;
        let p = &self.params;
        let rps = s.ok() as f64 / self.elapsed;
        if json {
            println!(
                concat!(
                    "{{\"mode\":\"max\",\"url\":{},\"duration_s\":{},\"warmup_s\":{},",
                    "\"connections\":{},\"responses\":{},\"ok\":{},\"rps\":{:.1},",
                    "\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},",
                    "\"mean_us\":{:.1},\"non_2xx\":{},\"non_2xx_by_status\":{},\"errors\":{},",
                    "\"error_samples\":{}}}"
                ),
                json_str(&p.target.url),
                p.duration,
                p.warmup,
                p.connections,
                s.responses,
                s.ok(),
                rps,
                pct(h, 50.0),
                pct(h, 90.0),
                pct(h, 99.0),
                pct(h, 99.9),
                h.max(),
                h.mean(),
                s.non_2xx_total(),
                json_status_map(&s.non_2xx),
                s.errors,
                json_str_list(&s.error_samples),
            );
            return;
        }
        println!(
            "closed loop: {} for {} s (+{} s warm-up), {} connections",
            p.target.url, p.duration, p.warmup, p.connections
        );
        println!(
            "  {:.1} req/s (2xx)  responses {}  non-2xx {}  errors {}",
            rps,
            s.responses,
            s.non_2xx_total(),
            s.errors
        );
        println!(
            "  latency, µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            pct(h, 50.0),
            pct(h, 90.0),
            pct(h, 99.0),
            pct(h, 99.9),
            h.max()
        );
        print!("{}", s.problems());
    }
}
