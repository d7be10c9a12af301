//! Benchmark of the shard server (`switchyard-shard`), run by `bench/shard.sh`.
//!
//! ```text
//! shard run [--formats fused-q8,fused,native] [--tokens 64] [--shards 1,2,3] [--streams 1,4,8] ...
//! shard reference --model M --tokens N     # one JSON line: candle-transformers, in process
//! shard kernel --weights W --batch 1,4,8   # in-process decode steps of `Stage` (no HTTP)
//! shard matmul --rows 1,8 [--q8]           # the fused kernel alone over all the projections
//! ```
//!
//! `run` measures, for each weight format, against baselines taken in the same run:
//!
//! * single-stream decode tokens/s of a replica of 1, 2 and 3 pipeline stages (real
//!   processes, HTTP streaming) vs the single-process reference, candle-transformers'
//!   `quantized_llama` on the same GGUF file, with the weights as stored (with
//!   `CANDLE_DEQUANTIZE_ALL(_F16)` for the f32 / f16 formats, so that the reference runs the
//!   same kind of kernels), on as many threads as `serve` uses;
//! * aggregate tokens/s of 1, 4 and 8 concurrent streams vs the same requests sent one at a
//!   time (sequential);
//! * time from process start to the `ready` line, and the replica's peak memory.
//!
//! Only ratios against the in-run baselines are meaningful across machines.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use switchyard_shard::model::{Chunk, Stage, WeightFormat, read_gguf};
use switchyard_shard::tokenizer::Tokenizer;

const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Prompt of the single-stream runs and of the reference (~20 tokens).
const PROMPT: &str = "Write a long story about a lighthouse keeper who finds a message in a bottle.";

#[derive(Parser)]
#[command(name = "shard-bench", about = "Benchmark of switchyard-shard (see bench/README.md)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole benchmark; prints a markdown report (and writes it with --out).
    Run(RunArgs),
    /// Single-process reference decode (candle-transformers quantized_llama); one JSON line.
    Reference {
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, default_value_t = 64)]
        tokens: usize,
    },
    /// In-process decode steps of `Stage` (no HTTP, no engine) at several batch sizes.
    Kernel {
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, default_value = "f32")]
        weights: String,
        #[arg(long, default_value = "1,4,8", value_delimiter = ',')]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 32)]
        tokens: usize,
    },
    /// Matmul micro-benchmark: the fused kernel over all the model's projections.
    Matmul {
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: PathBuf,
        #[arg(long, default_value = "1,2,4,8,16", value_delimiter = ',')]
        rows: Vec<usize>,
        /// The `fused-q8` layout (tiles, 8-bit activations) instead of `fused`'s.
        #[arg(long)]
        q8: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// switchyard-shard binary (default: the one cargo built next to this benchmark).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Weight formats to measure, in order.
    #[arg(long, default_value = "fused-q8,fused,native", value_delimiter = ',')]
    formats: Vec<String>,
    /// Completion tokens per request (all requests use ignore_eos, so exactly this many).
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Pipeline stage counts for the single-stream runs.
    #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
    shards: Vec<usize>,
    /// Concurrent stream counts (on a 1-stage replica).
    #[arg(long, default_value = "1,4,8", value_delimiter = ',')]
    streams: Vec<usize>,
    /// Single-stream repetitions per configuration (the best counts).
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Extra arguments for every `serve` (e.g. "--threads 2"), split on spaces.
    #[arg(long, default_value = "")]
    serve_args: String,
    /// Also write the report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Before each measurement, wait while other processes use more than this % of the CPUs...
    #[arg(long, default_value_t = 15.0)]
    quiet_busy_pct: f64,
    /// ... but at most this many seconds, then measure anyway.
    #[arg(long, default_value_t = 180)]
    quiet_timeout: u64,
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench` to harness-less targets; it is not ours.
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    match Cli::parse_from(args).cmd {
        Cmd::Run(a) => run(a),
        Cmd::Reference { model, tokens } => {
            let r = reference(&model, tokens)?;
            println!("{r}");
            Ok(())
        }
        Cmd::Kernel { model, weights, batch, tokens } => kernel(&model, weights.parse()?, &batch, tokens),
        Cmd::Matmul { model, rows, q8 } => matmul(&model, &rows, q8),
    }
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("[shard-bench {:>7.1}s] {msg}", START.get_or_init(Instant::now).elapsed().as_secs_f64());
}
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

// ------------------------------------------------------------------------------ reference

/// candle-transformers' quantized llama in this process: prefill PROMPT, then `tokens` greedy
/// decode steps; tokens/s counts the decode steps only.
fn reference(model: &Path, tokens: usize) -> Result<Value> {
    use candle_transformers::models::quantized_llama::ModelWeights;
    let t0 = Instant::now();
    let (ct, mut file) = read_gguf(model)?;
    let tok = Tokenizer::from_gguf(&ct)?;
    let mut m = ModelWeights::from_gguf(ct, &mut file, &Device::Cpu)?;
    let load_s = t0.elapsed().as_secs_f64();
    let prompt = tok.encode(PROMPT, true);
    let x = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let logits: Vec<f32> = m.forward(&x, 0)?.squeeze(0)?.to_vec1()?;
    let mut t = argmax(&logits);
    let t1 = Instant::now();
    for pos in prompt.len()..prompt.len() + tokens {
        let x = Tensor::new(&[t], &Device::Cpu)?.unsqueeze(0)?;
        let logits: Vec<f32> = m.forward(&x, pos)?.squeeze(0)?.to_vec1()?;
        t = argmax(&logits);
    }
    let secs = t1.elapsed().as_secs_f64();
    Ok(json!({"tok_s": tokens as f64 / secs, "tokens": tokens, "load_s": load_s, "prompt_tokens": prompt.len()}))
}

/// Runs `reference` in a child process (the dequantize switches are read from the
/// environment once per process).
fn reference_child(model: &Path, tokens: usize, fmt: WeightFormat) -> Result<(String, f64)> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("reference").arg("--model").arg(model).arg("--tokens").arg(tokens.to_string());
    // The thread count `serve` uses for one process (all cores), set as `serve` sets it.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).to_string();
    cmd.env("CANDLE_NUM_THREADS", &cores).env("RAYON_NUM_THREADS", &cores);
    let kind = match fmt {
        WeightFormat::F32 => {
            cmd.env("CANDLE_DEQUANTIZE_ALL", "1");
            "quantized_llama, CANDLE_DEQUANTIZE_ALL=1 (f32)"
        }
        WeightFormat::F16 => {
            cmd.env("CANDLE_DEQUANTIZE_ALL_F16", "1");
            "quantized_llama, CANDLE_DEQUANTIZE_ALL_F16=1 (f16)"
        }
        _ => "quantized_llama, weights as stored (Q4_1)",
    };
    let out = cmd.stderr(Stdio::inherit()).output()?;
    ensure!(out.status.success(), "reference run failed: {:?}", out.status);
    let v: Value = serde_json::from_slice(&out.stdout).context("reference output")?;
    Ok((kind.to_string(), v["tok_s"].as_f64().context("tok_s")?))
}

// ------------------------------------------------------------------------------ kernel

fn kernel(model: &Path, fmt: WeightFormat, batches: &[usize], tokens: usize) -> Result<()> {
    let t0 = Instant::now();
    let stage = Stage::load_with(model, None, &Device::Cpu, fmt)?;
    log(format_args!("{fmt}: loaded in {:.2?}", t0.elapsed()));
    let (ct, _) = read_gguf(model)?;
    let tok = Tokenizer::from_gguf(&ct)?;
    let prompt = tok.encode(PROMPT, true);
    for &b in batches {
        let mut caches: Vec<_> = (0..b).map(|_| stage.new_cache()).collect();
        // Prefill each sequence alone.
        let mut next = Vec::new();
        for c in caches.iter_mut() {
            let x = stage.embed(&prompt)?;
            let y = stage.forward(&x, &mut [Chunk { cache: c, pos: 0, len: prompt.len() }])?;
            let l = stage.logits(&y, &[prompt.len()])?.to_vec2::<f32>()?;
            next.push(argmax(&l[0]));
        }
        let t1 = Instant::now();
        for pos in prompt.len()..prompt.len() + tokens {
            let x = stage.embed(&next)?;
            let mut chunks: Vec<Chunk> = caches.iter_mut().map(|cache| Chunk { cache, pos, len: 1 }).collect();
            let y = stage.forward(&x, &mut chunks)?;
            let l = stage.logits(&y, &vec![1; b])?.to_vec2::<f32>()?;
            next = l.iter().map(|r| argmax(r)).collect();
        }
        let s = t1.elapsed().as_secs_f64();
        println!(
            "{fmt} batch {b}: {:.1} ms/step, {:.1} tok/s aggregate, {:.1} tok/s per sequence",
            s * 1e3 / tokens as f64,
            (b * tokens) as f64 / s,
            tokens as f64 / s
        );
    }
    Ok(())
}

fn matmul(model: &Path, rows: &[usize], q8: bool) -> Result<()> {
    use switchyard_shard::kernel::BlockMatrix;
    let (ct, mut file) = read_gguf(model)?;
    let mut mats = Vec::new();
    for name in ct.tensor_infos.keys() {
        if name.ends_with(".weight") && !name.contains("norm") {
            let qt = ct.tensor(&mut file, name, &Device::Cpu)?;
            let b = if q8 { BlockMatrix::from_qtensor_tiled(&qt)? } else { BlockMatrix::from_qtensor(&qt)? };
            if let Some(b) = b {
                mats.push(b);
            }
        }
    }
    let weights: usize = mats.iter().map(|b| b.dims().0 * b.dims().1).sum();
    for &m in rows {
        let xs: Vec<Vec<f32>> = mats.iter().map(|b| vec![0.5f32; m * b.dims().1]).collect();
        let mut ys: Vec<Vec<f32>> = mats.iter().map(|b| vec![0f32; m * b.dims().0]).collect();
        let pass = |ys: &mut Vec<Vec<f32>>| -> Result<()> {
            for ((b, x), y) in mats.iter().zip(&xs).zip(ys.iter_mut()) {
                b.matmul(x, y)?;
            }
            Ok(())
        };
        pass(&mut ys)?;
        let it = 20;
        let t = Instant::now();
        for _ in 0..it {
            pass(&mut ys)?;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / it as f64;
        println!(
            "{} matrices, {:.1} M weights, {m} rows: {ms:.2} ms per pass, {:.1} GFLOP/s",
            mats.len(),
            weights as f64 / 1e6,
            2.0 * (weights * m) as f64 / ms / 1e6
        );
        // By shape.
        let mut shapes: Vec<(usize, usize)> = mats.iter().map(|b| b.dims()).collect();
        shapes.sort();
        shapes.dedup();
        for (n, k) in shapes {
            let t = Instant::now();
            let mut w = 0;
            for _ in 0..it {
                for ((b, x), y) in mats.iter().zip(&xs).zip(ys.iter_mut()) {
                    if b.dims() == (n, k) {
                        b.matmul(x, y)?;
                        w += n * k;
                    }
                }
            }
            let s = t.elapsed().as_secs_f64();
            println!(
                "  {n}x{k}: {:.2} ms per pass, {:.1} GFLOP/s",
                s * 1e3 / it as f64,
                2.0 * (w * m) as f64 / s / 1e9
            );
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------ HTTP

struct Resp {
    status: u16,
    body: Vec<u8>,
}

fn connect(addr: &str, method: &str, path: &str, body: &str, timeout: Duration) -> Result<BufReader<TcpStream>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(BufReader::new(s))
}

/// Reads the status line and headers; returns (status, chunked).
fn read_head(r: &mut BufReader<TcpStream>) -> Result<(u16, bool)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line.split(' ').nth(1).context("no status line")?.parse()?;
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if line.to_ascii_lowercase().starts_with("transfer-encoding:") && line.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    Ok((status, chunked))
}

/// Next piece of the body: one chunk when chunked, else whatever arrived; None at the end.
fn read_piece(r: &mut BufReader<TcpStream>, chunked: bool) -> Result<Option<Vec<u8>>> {
    if !chunked {
        let mut buf = vec![0; 64 << 10];
        let n = r.read(&mut buf)?;
        buf.truncate(n);
        return Ok((n > 0).then_some(buf));
    }
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
        .with_context(|| format!("bad chunk size line {line:?}"))?;
    if size == 0 {
        return Ok(None);
    }
    let mut buf = vec![0; size + 2];
    r.read_exact(&mut buf)?;
    buf.truncate(size);
    Ok(Some(buf))
}

fn request(addr: &str, method: &str, path: &str, body: &str, timeout: Duration) -> Result<Resp> {
    let mut r = connect(addr, method, path, body, timeout)?;
    let (status, chunked) = read_head(&mut r)?;
    let mut out = Vec::new();
    while let Some(p) = read_piece(&mut r, chunked)? {
        out.extend_from_slice(&p);
    }
    Ok(Resp { status, body: out })
}

fn completion_body(prompt: &str, tokens: usize, stream: bool) -> String {
    json!({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": true, "stream": stream,
           "stream_options": {"include_usage": true}})
    .to_string()
}

/// One non-streamed completion; returns its completion tokens.
fn complete(addr: &str, prompt: &str, tokens: usize) -> Result<usize> {
    let r =
        request(addr, "POST", "/v1/completions", &completion_body(prompt, tokens, false), Duration::from_secs(900))?;
    ensure!(r.status == 200, "completion failed with {}: {}", r.status, String::from_utf8_lossy(&r.body));
    let v: Value = serde_json::from_slice(&r.body)?;
    Ok(v["usage"]["completion_tokens"].as_u64().context("usage")? as usize)
}

/// One streamed completion: decode tokens/s, from the first SSE event (the first token) to
/// the end of the stream, over the tokens after the first.
fn stream_rate(addr: &str, tokens: usize) -> Result<f64> {
    let mut r =
        connect(addr, "POST", "/v1/completions", &completion_body(PROMPT, tokens, true), Duration::from_secs(900))?;
    let (status, chunked) = read_head(&mut r)?;
    ensure!(status == 200, "streamed completion failed with {status}");
    let mut buf = Vec::new();
    let mut first = None;
    let mut usage = None;
    while let Some(p) = read_piece(&mut r, chunked)? {
        buf.extend_from_slice(&p);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let ev: Vec<u8> = buf.drain(..end + 2).collect();
            let ev = String::from_utf8_lossy(&ev);
            let data = ev.trim().strip_prefix("data: ").unwrap_or("");
            if data == "[DONE]" || data.is_empty() {
                continue;
            }
            first.get_or_insert_with(Instant::now);
            let v: Value = serde_json::from_str(data).with_context(|| format!("bad SSE event {data:?}"))?;
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
        }
    }
    let end = Instant::now();
    let n = usage.context("no usage in the stream")?;
    ensure!(n == tokens, "stream produced {n} tokens, asked for {tokens}");
    Ok((n - 1) as f64 / end.duration_since(first.context("empty stream")?).as_secs_f64())
}

// ------------------------------------------------------------------------------ server

struct Server {
    child: Child,
    addr: String,
    ready_s: f64,
}

impl Server {
    fn start(bin: &Path, model: &Path, shards: usize, fmt: WeightFormat, extra: &[String]) -> Result<Server> {
        let t0 = Instant::now();
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--weights", fmt.name(), "--model"]).arg(model);
        if shards > 1 {
            cmd.arg("--spawn-shards").arg(shards.to_string());
        }
        cmd.args(extra);
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("ready ") {
                    let _ = tx.send(a.to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                bail!("{} printed no ready line within 300 s", bin.display());
            }
        };
        Ok(Server { child, addr, ready_s: t0.elapsed().as_secs_f64() })
    }

    /// The head's pid and its stages'.
    fn pids(&self) -> Vec<u64> {
        let mut pids = vec![self.child.id() as u64];
        if let Ok(r) = request(&self.addr, "GET", "/health", "", Duration::from_secs(10))
            && let Ok(v) = serde_json::from_slice::<Value>(&r.body)
        {
            for s in v["stages"].as_array().into_iter().flatten() {
                pids.extend(s["pid"].as_u64());
            }
        }
        pids
    }

    /// Peak resident memory (VmHWM) of the head and its stages, MiB.
    fn peak_rss_mib(&self) -> f64 {
        self.pids().iter().filter_map(|p| vm_hwm_kib(*p)).sum::<u64>() as f64 / 1024.0
    }

    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn vm_hwm_kib(pid: u64) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

// ------------------------------------------------------------------------------ machine load

/// (busy, total) ticks of the whole machine.
fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// utime + stime of `pid` (and of its waited-for children with `children`).
fn proc_ticks(pid: u64, children: bool) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some(rest) = s.rsplit_once(')').map(|x| x.1) else { return 0 };
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // After the command: state(0) ... utime(11) stime(12) cutime(13) cstime(14).
    let own = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    if children { own + f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0) } else { own }
}

/// CPU use of processes outside the benchmark, as % of the machine, between two samples.
struct LoadMeter {
    pids: Vec<u64>,
    machine: (u64, u64),
    ours: u64,
}

impl LoadMeter {
    fn start(pids: Vec<u64>) -> Self {
        let ours = Self::ours(&pids);
        Self { pids, machine: machine_ticks(), ours }
    }
    fn ours(pids: &[u64]) -> u64 {
        proc_ticks(std::process::id() as u64, true) + pids.iter().map(|&p| proc_ticks(p, false)).sum::<u64>()
    }
    fn other_pct(&self) -> f64 {
        let (b1, t1) = machine_ticks();
        let ours = Self::ours(&self.pids);
        let total = t1.saturating_sub(self.machine.1).max(1);
        let other = (b1.saturating_sub(self.machine.0)).saturating_sub(ours.saturating_sub(self.ours));
        100.0 * other as f64 / total as f64
    }
}

/// Waits until other processes leave the CPUs alone for two seconds in a row.
fn wait_quiet(a: &RunArgs, pids: &[u64]) {
    let t0 = Instant::now();
    let mut quiet = 0;
    let mut last_note = 0;
    loop {
        let m = LoadMeter::start(pids.to_vec());
        std::thread::sleep(Duration::from_secs(1));
        let busy = m.other_pct();
        quiet = if busy <= a.quiet_busy_pct { quiet + 1 } else { 0 };
        if quiet >= 2 {
            return;
        }
        let waited = t0.elapsed().as_secs();
        if waited >= a.quiet_timeout {
            log(format_args!("WARNING: other load still {busy:.0}% after {waited} s; measuring anyway"));
            return;
        }
        if waited >= last_note + 15 {
            last_note = waited;
            log(format_args!("waiting for the machine to quiet down (other load {busy:.0}%)"));
        }
    }
}

// ------------------------------------------------------------------------------ run

struct ShardRow {
    shards: usize,
    tok_s: f64,
    ready_s: f64,
    rss_mib: f64,
}

struct FormatResult {
    fmt: WeightFormat,
    ref_kind: String,
    ref_tok_s: f64,
    shards: Vec<ShardRow>,
    sequential: f64,
    streams: Vec<(usize, f64)>,
    /// Highest CPU use of other processes during any measurement, % of the machine.
    other_load_pct: f64,
}

/// Prompts of the concurrent runs, one per stream (different lengths on purpose).
fn stream_prompt(i: usize) -> String {
    const TOPICS: [&str; 8] = [
        "a lighthouse keeper",
        "the history of bread",
        "how rivers form deltas",
        "a robot learning to paint",
        "the rules of chess",
        "a journey across the desert",
        "why the sky is blue",
        "a city under the sea",
    ];
    format!("Write a long essay about {}.", TOPICS[i % TOPICS.len()])
}

/// Runs `f` after waiting for a quiet machine; returns its result and the other load.
fn measured<T>(a: &RunArgs, pids: &[u64], worst: &mut f64, f: impl FnOnce() -> Result<T>) -> Result<T> {
    wait_quiet(a, pids);
    let m = LoadMeter::start(pids.to_vec());
    let r = f()?;
    let other = m.other_pct();
    if other > a.quiet_busy_pct {
        log(format_args!("note: other processes used {other:.0}% of the CPUs during this measurement"));
    }
    *worst = worst.max(other);
    Ok(r)
}

fn measure_format(a: &RunArgs, bin: &Path, fmt: WeightFormat, extra: &[String]) -> Result<FormatResult> {
    let mut worst = 0f64;
    log(format_args!("{fmt}: reference"));
    let (ref_kind, ref_tok_s) = measured(a, &[], &mut worst, || reference_child(&a.model, a.tokens, fmt))?;
    log(format_args!("{fmt}: reference {ref_tok_s:.2} tok/s ({ref_kind})"));
    let mut shards = Vec::new();
    let mut streams = Vec::new();
    let mut sequential = 0.0;
    for &n in &a.shards {
        wait_quiet(a, &[]);
        let srv = Server::start(bin, &a.model, n, fmt, extra)?;
        log(format_args!("{fmt}: {n} stage(s) ready in {:.2} s", srv.ready_s));
        let pids = srv.pids();
        // Warm-up: first requests allocate and fault in pages.
        complete(&srv.addr, PROMPT, 4)?;
        let mut best: f64 = 0.0;
        for _ in 0..a.repeat.max(1) {
            let r = measured(a, &pids, &mut worst, || stream_rate(&srv.addr, a.tokens))?;
            log(format_args!("{fmt}: {n} stage(s) single stream {r:.2} tok/s"));
            best = best.max(r);
        }
        if n == 1 {
            let max = a.streams.iter().copied().max().unwrap_or(1);
            sequential = measured(a, &pids, &mut worst, || {
                let t = Instant::now();
                let mut total = 0;
                for i in 0..max {
                    total += complete(&srv.addr, &stream_prompt(i), a.tokens)?;
                }
                Ok(total as f64 / t.elapsed().as_secs_f64())
            })?;
            log(format_args!("{fmt}: sequential ({max} requests) {sequential:.2} tok/s"));
            for &c in &a.streams {
                let agg = measured(a, &pids, &mut worst, || {
                    let t = Instant::now();
                    let handles: Vec<_> = (0..c)
                        .map(|i| {
                            let (addr, p, n) = (srv.addr.clone(), stream_prompt(i), a.tokens);
                            std::thread::spawn(move || complete(&addr, &p, n))
                        })
                        .collect();
                    let mut total = 0;
                    for h in handles {
                        total += h.join().unwrap()?;
                    }
                    Ok(total as f64 / t.elapsed().as_secs_f64())
                })?;
                log(format_args!("{fmt}: {c} concurrent streams {agg:.2} tok/s aggregate"));
                streams.push((c, agg));
            }
        }
        let rss_mib = srv.peak_rss_mib();
        shards.push(ShardRow { shards: n, tok_s: best, ready_s: srv.ready_s, rss_mib });
        srv.stop();
    }
    Ok(FormatResult { fmt, ref_kind, ref_tok_s, shards, sequential, streams, other_load_pct: worst })
}

fn run(a: RunArgs) -> Result<()> {
    START.get_or_init(Instant::now);
    let bin = a.bin.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_switchyard-shard")));
    ensure!(bin.exists(), "{} not found", bin.display());
    ensure!(a.model.exists(), "model {} not found (scripts/fetch-model.sh)", a.model.display());
    let extra: Vec<String> = a.serve_args.split_whitespace().map(str::to_string).collect();
    let formats: Vec<WeightFormat> = a.formats.iter().map(|f| f.parse()).collect::<Result<_>>()?;
    let mut results = Vec::new();
    for &fmt in &formats {
        results.push(measure_format(&a, &bin, fmt, &extra)?);
    }
    let report = report(&a, &results, &extra);
    println!("{report}");
    if let Some(p) = &a.out {
        std::fs::write(p, &report)?;
        log(format_args!("report written to {}", p.display()));
    }
    Ok(())
}

fn report(a: &RunArgs, results: &[FormatResult], extra: &[String]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let _ = writeln!(s, "## switchyard-shard benchmark\n");
    let _ = writeln!(
        s,
        "{cpu}, {cores} cores; model {}; {} completion tokens per request (ignore_eos), greedy; \
         serve args: `{}`.\n",
        a.model.display(),
        a.tokens,
        extra.join(" ")
    );
    let _ = writeln!(s, "### Single stream (decode tokens/s) vs the single-process reference\n");
    let _ = writeln!(
        s,
        "| weights | reference | reference tok/s | stages | tok/s | vs reference | vs 1 stage | ready s | peak RSS MiB |"
    );
    let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let one = r.shards.iter().find(|x| x.shards == 1).map(|x| x.tok_s);
        for x in &r.shards {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {} | {:.2} | {:.2}x | {} | {:.2} | {:.0} |",
                r.fmt,
                r.ref_kind,
                r.ref_tok_s,
                x.shards,
                x.tok_s,
                x.tok_s / r.ref_tok_s,
                one.map(|o| format!("{:.2}x", x.tok_s / o)).unwrap_or_default(),
                x.ready_s,
                x.rss_mib
            );
        }
    }
    let _ = writeln!(s, "\n### Concurrent streams (aggregate tokens/s, 1 stage) vs sequential\n");
    let _ = writeln!(s, "| weights | sequential tok/s | streams | aggregate tok/s | vs sequential |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for r in results {
        for &(c, agg) in &r.streams {
            let _ = writeln!(s, "| {} | {:.2} | {c} | {:.2} | {:.2}x |", r.fmt, r.sequential, agg, agg / r.sequential);
        }
    }
    let _ = writeln!(
        s,
        "\nOther processes used at most {:.0}% of the CPUs during any measurement (waited for <= {}% before each).",
        results.iter().map(|r| r.other_load_pct).fold(0.0, f64::max),
        a.quiet_busy_pct
    );
    let _ = writeln!(s, "\n### Targets\n");
    for r in results {
        let one = r.shards.iter().find(|x| x.shards == 1);
        let two = r.shards.iter().find(|x| x.shards == 2);
        if let (Some(o), Some(t)) = (one, two) {
            let cost = 1.0 - t.tok_s / o.tok_s;
            let _ = writeln!(
                s,
                "- {}: 2-stage single-stream cost {:.1}% (target <= 10%): {}",
                r.fmt,
                cost * 100.0,
                if cost <= 0.10 { "PASS" } else { "MISS" }
            );
        }
        if let Some(&(c, agg)) = r.streams.iter().find(|x| x.0 == 8) {
            let ratio = agg / r.sequential;
            let _ = writeln!(
                s,
                "- {}: {c} streams {:.2}x sequential (target >= 3x): {}",
                r.fmt,
                ratio,
                if ratio >= 3.0 { "PASS" } else { "MISS" }
            );
        }
    }
    s
}
