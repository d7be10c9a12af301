//! `loadgen`: the load generator and the stand-in model server used by `bench/router.sh`.
//!
//! * `upstream` — a minimal HTTP/1.1 server answering OpenAI-style completions with a fixed
//!   body, so that what is measured is the proxy in front of it, not the model.
//! * `rate` — open-loop load at a fixed rate; latency is measured from the *scheduled* send
//!   time, so a stalled system under test cannot hide its stalls (no coordinated omission).
//! * `max` — closed-loop load: every connection sends back-to-back, to find the throughput.

mod client;
mod max;
mod rate;
mod stats;
mod upstream;

use std::net::SocketAddr;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loadgen", about = "HTTP load generator and fast fake upstream for Switchyard benchmarks")]
struct Cli {
    /// Tokio worker threads of the load generator itself (1 = current-thread runtime),
    /// kept small so that it does not take the CPU away from the system under test.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve fixed OpenAI-style completions on POST /v1/chat/completions and /v1/completions,
    /// and 200 on GET /health. Prints `listening on http://ADDR` once bound.
    Upstream {
        /// Address to bind; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Runtime worker threads of the server (1 = current-thread runtime).
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
    /// Open-loop load at a fixed request rate; latency counted from the scheduled send time.
    Rate {
        /// Target URL; a bare `http://host:port` posts to /v1/chat/completions.
        #[arg(long)]
        url: String,
        /// Requests per second.
        #[arg(long)]
        rate: f64,
        /// Measured seconds (after the warm-up).
        #[arg(long)]
        duration: f64,
        /// Keep-alive HTTP/1.1 connections; each carries one request at a time.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Seconds of load at the same rate before measuring starts (not recorded).
        #[arg(long, default_value_t = 0.0)]
        warmup: f64,
        /// Print one JSON line instead of the human-readable report.
        #[arg(long)]
        json: bool,
    },
    /// Closed-loop load: every connection sends back-to-back for the duration.
    Max {
        /// Target URL; a bare `http://host:port` posts to /v1/chat/completions.
        #[arg(long)]
        url: String,
        /// Measured seconds (after the warm-up).
        #[arg(long)]
        duration: f64,
        /// Concurrent keep-alive HTTP/1.1 connections.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Seconds of load before measuring starts (not recorded).
        #[arg(long, default_value_t = 0.0)]
        warmup: f64,
        /// Print one JSON line instead of the human-readable report.
        #[arg(long)]
        json: bool,
    },
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?
    };
    Ok(rt)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Upstream { listen, workers } => runtime(workers)?.block_on(upstream::serve(listen)),
        Command::Rate { url, rate, duration, connections, warmup, json } => {
            anyhow::ensure!(rate > 0.0, "--rate must be positive");
            anyhow::ensure!(duration > 0.0, "--duration must be positive");
            anyhow::ensure!(warmup >= 0.0, "--warmup must not be negative");
            anyhow::ensure!(connections >= 1, "--connections must be at least 1");
            let target = client::Target::parse(&url)?;
            let report = runtime(cli.threads)?.block_on(rate::run(rate::Params {
                target,
                rate,
                duration,
                connections,
                warmup,
            }))?;
            report.print(json);
            Ok(())
        }
        Command::Max { url, duration, connections, warmup, json } => {
            anyhow::ensure!(duration > 0.0, "--duration must be positive");
            anyhow::ensure!(warmup >= 0.0, "--warmup must not be negative");
            anyhow::ensure!(connections >= 1, "--connections must be at least 1");
            let target = client::Target::parse(&url)?;
            let report =
                runtime(cli.threads)?.block_on(max::run(max::Params { target, duration, connections, warmup }))?;
            report.print(json);
            Ok(())
        }
    }
}
