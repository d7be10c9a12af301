//! Open-loop load at a fixed rate.
//!
//! A dedicated pacing thread releases request "tickets" at exact multiples of 1/rate
//! (OS sleep with a 1 ns timer slack, not tokio's millisecond timer wheel). Idle
//! connections take tickets from a shared queue. Latency is the time from a ticket's
//! *scheduled* instant to the end of its response, so a request that had to wait for a free
//! connection, or that the generator itself dispatched late, is charged in full: a stall in
//! the system under test shows up in the percentiles instead of silently lowering the rate
//! (no coordinated omission). How late dispatching was is reported separately
//! (`lag_*`) to tell the generator's own noise apart.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use crate::client::{Conn, Target};
use crate::stats::{self, Stats, json_status_map, json_str, json_str_list, micros, pct};

pub struct Params {
    pub target: Target,
    pub rate: f64,
    pub duration: f64,
    pub connections: usize,
    pub warmup: f64,
}

struct Ticket {
    scheduled: Instant,
    record: bool,
}

pub struct Report {
    params: Params,
    stats: Stats,
    lag: Histogram<u64>,
    scheduled: u64,
    achieved_rps: f64,
}

pub async fn run(p: Params) -> anyhow::Result<Report> {
    // Open every connection before the clock starts.
    let mut conns = Vec::with_capacity(p.connections);
    for _ in 0..p.connections {
        let mut c = Conn::new(p.target.clone());
        c.connect().await?;
        conns.push(c);
    }

    let (tx, rx) = mpsc::unbounded_channel::<Ticket>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let stats = Arc::new(Mutex::new(Stats::new()));
    let lag = Arc::new(Mutex::new(stats::histogram()));

    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + Duration::from_secs_f64(p.warmup);
    let total = ((p.warmup + p.duration) * p.rate).round() as u64;
    let scheduled = total - (p.warmup * p.rate).round() as u64;
    let interval_ns = 1e9 / p.rate;
    let pacer = std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || pace(tx, start, measure_from, total, interval_ns))?;

    let mut workers = Vec::with_capacity(conns.len());
    for mut conn in conns {
        let rx = rx.clone();
        let stats = stats.clone();
        let lag = lag.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let ticket = { rx.lock().await.recv().await };
                let Some(ticket) = ticket else { break };
                if ticket.record {
                    let dispatched = Instant::now();
                    lag.lock()
                        .unwrap()
                        .saturating_record(micros(dispatched.saturating_duration_since(ticket.scheduled)));
                }
                let result = conn.send().await;
                let done = Instant::now();
                if ticket.record {
                    stats.lock().unwrap().record(&result, done - ticket.scheduled, done);
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    pacer.join().map_err(|_| anyhow::anyhow!("pacing thread panicked"))?;

    let stats = Arc::try_unwrap(stats).map_err(|_| anyhow::anyhow!("stats still shared"))?.into_inner().unwrap();
    let lag = Arc::try_unwrap(lag).map_err(|_| anyhow::anyhow!("lag still shared"))?.into_inner().unwrap();
    let window =
        stats.last_done.map(|d| d.saturating_duration_since(measure_from).as_secs_f64()).unwrap_or(0.0).max(p.duration);
    let achieved_rps = stats.responses as f64 / window;
    Ok(Report { params: p, stats, lag, scheduled, achieved_rps })
}

/// Runs on its own OS thread: sends ticket `i` at `start + i * interval`.
fn pace(tx: mpsc::UnboundedSender<Ticket>, start: Instant, measure_from: Instant, total: u64, interval_ns: f64) {
    // The default 50 µs timer slack would let every wake-up come up to 50 µs late.
    // SAFETY: prctl with PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    for i in 0..total {
        let scheduled = start + Duration::from_nanos((i as f64 * interval_ns) as u64);
        loop {
            let now = Instant::now();
            if now >= scheduled {
                break;
            }
            std::thread::sleep(scheduled - now);
        }
        let ticket = Ticket { scheduled, record: scheduled >= measure_from };
        if tx.send(ticket).is_err() {
            return;
        }
    }
}

impl Report {
    pub fn print(&self, json: bool) {
        let s = &self.stats;
        let h = &s.latency;
        let p = &self.params;
        if json {
            println!(
                concat!(
                    "{{\"mode\":\"rate\",\"url\":{},\"rate\":{},\"duration_s\":{},\"warmup_s\":{},",
                    "\"connections\":{},\"scheduled\":{},\"responses\":{},\"ok\":{},",
                    "\"achieved_rps\":{:.1},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},",
                    "\"p999_us\":{},\"max_us\":{},\"mean_us\":{:.1},\"non_2xx\":{},",
                    "\"non_2xx_by_status\":{},\"errors\":{},\"error_samples\":{},",
                    "\"lag_p50_us\":{},\"lag_p99_us\":{},\"lag_max_us\":{}}}"
                ),
                json_str(&p.target.url),
                p.rate,
                p.duration,
                p.warmup,
                p.connections,
                self.scheduled,
                s.responses,
                s.ok(),
                self.achieved_rps,
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
                pct(&self.lag, 50.0),
                pct(&self.lag, 99.0),
                self.lag.max(),
            );
            return;
        }
        println!(
            "open loop: {} at {} req/s for {} s (+{} s warm-up), {} connections",
            p.target.url, p.rate, p.duration, p.warmup, p.connections
        );
        println!(
            "  scheduled {}  responses {} (2xx {}, non-2xx {})  errors {}  achieved {:.1} req/s",
            self.scheduled,
            s.responses,
            s.ok(),
            s.non_2xx_total(),
            s.errors,
            self.achieved_rps
        );
        println!(
            "  latency from scheduled send, µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {:.1}",
            pct(h, 50.0),
            pct(h, 90.0),
            pct(h, 99.0),
            pct(h, 99.9),
            h.max(),
            h.mean()
        );
        println!(
            "  loadgen dispatch lag, µs: p50 {}  p99 {}  max {}",
            pct(&self.lag, 50.0),
            pct(&self.lag, 99.0),
            self.lag.max()
        );
        print!("{}", s.problems());
    }
}
