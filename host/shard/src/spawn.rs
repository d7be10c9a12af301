//! Convenience supervisor for `serve --spawn-shards N`: the head starts the downstream stage
//! processes itself (same binary, `stage` subcommand), restarts them with backoff when they
//! exit, and records their pids in the shared status (`GET /health`).
//!
//! Each child gets a fixed loopback port chosen once, so a restarted stage comes back at the
//! same address and the head's reconnect loop finds it. Children run with
//! `--exit-with-stdin`: when the head dies, their stdin pipe closes and they exit too.

use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::engine::Shared;

pub struct StageSpec {
    pub index: usize,
    pub layers: Range<usize>,
    pub addr: String,
}

/// Picks free loopback ports for `ranges` (stages 1..N).
pub fn plan(ranges: &[Range<usize>]) -> Result<Vec<StageSpec>> {
    let mut out = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        out.push(StageSpec { index: i + 1, layers: r.clone(), addr });
    }
    Ok(out)
}

#[derive(Clone, Default)]
pub struct Children(Arc<Mutex<Vec<(usize, u32)>>>);

impl Children {
    /// Kills every running child (on the head's shutdown).
    pub fn kill_all(&self) {
        for (_, pid) in self.0.lock().unwrap().drain(..) {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
    }
}

/// Options passed through to every spawned stage.
#[derive(Clone)]
pub struct StageOptions {
    pub model: PathBuf,
    pub device: String,
    pub weights: String,
    pub threads: Option<usize>,
}

pub fn start(opts: StageOptions, specs: Vec<StageSpec>, shared: Arc<Shared>, backoff: Duration) -> Result<Children> {
    let exe = std::env::current_exe()?;
    let children = Children::default();
    for spec in specs {
        let exe = exe.clone();
        let opts = opts.clone();
        let shared = shared.clone();
        let children = children.clone();
        std::thread::Builder::new().name(format!("stage-{}", spec.index)).spawn(move || {
            let mut delay = backoff;
            loop {
                let started = Instant::now();
                let mut cmd = Command::new(&exe);
                cmd.arg("stage")
                    .arg("--model")
                    .arg(&opts.model)
                    .arg("--layers")
                    .arg(format!("{}..{}", spec.layers.start, spec.layers.end))
                    .arg("--listen")
                    .arg(&spec.addr)
                    .arg("--index")
                    .arg(spec.index.to_string())
                    .arg("--device")
                    .arg(&opts.device)
                    .arg("--weights")
                    .arg(&opts.weights)
                    .arg("--exit-with-stdin")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit());
                if let Some(t) = opts.threads {
                    cmd.arg("--threads").arg(t.to_string());
                }
                match cmd.spawn() {
                    Ok(child) => {
                        run_child(child, &spec, &shared, &children);
                    }
                    Err(e) => eprintln!("head: starting stage {} failed: {e}", spec.index),
                }
                if started.elapsed() > Duration::from_secs(30) {
                    delay = backoff;
                }
                eprintln!("head: restarting stage {} in {:?}", spec.index, delay);
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        })?;
    }
    Ok(children)
}

fn run_child(mut child: Child, spec: &StageSpec, shared: &Shared, children: &Children) {
    let pid = child.id();
    children.0.lock().unwrap().push((spec.index, pid));
    if let Some(s) = shared.stages.lock().unwrap().get_mut(spec.index - 1) {
        s.pid = Some(pid);
    }
    eprintln!("head: started stage {} (pid {pid}, layers {:?}, {})", spec.index, spec.layers, spec.addr);
    // Keep stdin open for as long as the child should live.
    let _stdin = child.stdin.take();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            match line {
                Ok(l) => eprintln!("stage {}: {l}", spec.index),
                Err(_) => break,
            }
        }
    }
    let status = child.wait();
    children.0.lock().unwrap().retain(|&(_, p)| p != pid);
    if let Some(s) = shared.stages.lock().unwrap().get_mut(spec.index - 1)
        && s.pid == Some(pid)
    {
        s.pid = None;
    }
    eprintln!("head: stage {} (pid {pid}) exited: {status:?}", spec.index);
}
