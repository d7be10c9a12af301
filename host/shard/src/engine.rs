//! The head's scheduler: continuous batching over a pipeline of stages.
//!
//! One OS thread owns the head stage (embedding + first layers), the connections to the
//! downstream stages and every live sequence. Each loop iteration is one step:
//!
//! * requests that arrived join (up to `max_batch` sequences); finished or cancelled ones
//!   leave, and their KV caches are released on every stage (piggy-backed on the next frame);
//! * the step's rows are the next prompt chunk of each sequence still in prefill (a shared
//!   budget of `prefill_chunk` tokens per step, so that long prompts cannot stall decoding) and
//!   the last sampled token of every decoding sequence; all rows go through every layer's
//!   projections and MLP as one matrix, attention runs per sequence against its own cache;
//! * each sequence's next token is sampled where the logits are: in the tail stage (or here
//!   when this process is the whole model). The RNG stays here: the head draws each token's
//!   uniform number and sends it with the temperature and top-p, so a seeded request gives
//!   the same tokens whatever the number of stages, and only token ids travel back.
//!
//! A broken stage connection fails every sequence at once (HTTP 503, no hang), marks the
//! replica unready, and the loop keeps trying to reconnect; when every stage answers again
//! (with its caches reset), a warm-up step runs and the replica is ready again.

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, BufWriter};
use std::net::{TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use candle_core::Tensor;

use crate::metrics::Metrics;
use crate::model::{Chunk, SeqCache, Stage};
use crate::wire::{ChunkHdr, Msg, PROTOCOL_VERSION, SampleSpec, read_msg, write_msg};

#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    /// Do not finish on a stop token (vLLM's `ignore_eos`): generate exactly `max_tokens`.
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token (end of turn / end of text) was sampled.
    Stop,
    /// `max_tokens` reached, or the context window is full.
    Length,
}

#[derive(Debug)]
pub enum Event {
    Token(u32),
    Done { finish: Finish, completion_tokens: usize },
    Failed { status: u16, message: String },
}

pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
    pub arrived: Instant,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct StageStatus {
    pub index: usize,
    pub addr: String,
    pub connected: bool,
    pub layers: Option<(usize, usize)>,
    pub pid: Option<u32>,
    pub last_error: Option<String>,
}

pub struct Shared {
    pub loaded: AtomicBool,
    pub ready: AtomicBool,
    pub stages: Mutex<Vec<StageStatus>>,
    pub metrics: Metrics,
    pub head_layers: Mutex<Option<(usize, usize)>>,
    pub fatal: Mutex<Option<String>>,
}

pub struct EngineConfig {
    pub head_layers: Option<Range<usize>>,
    pub weights: crate::model::WeightFormat,
    pub device: candle_core::Device,
    pub stage_addrs: Vec<String>,
    pub max_batch: usize,
    pub prefill_chunk: usize,
    pub stage_timeout: Duration,
    pub stop_ids: Vec<u32>,
    pub context_length: usize,
}

/// Handle used by the HTTP side.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    pub shared: Arc<Shared>,
}

impl Engine {
    /// Starts the engine thread; loading the head stage happens on that thread, so the HTTP
    /// server can answer `/health` meanwhile.
    pub fn start(model: std::path::PathBuf, cfg: EngineConfig) -> Engine {
        let shared = Arc::new(Shared {
            loaded: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            stages: Mutex::new(
                cfg.stage_addrs
                    .iter()
                    .enumerate()
                    .map(|(i, a)| StageStatus {
                        index: i + 1,
                        addr: a.clone(),
                        connected: false,
                        layers: None,
                        pid: None,
                        last_error: None,
                    })
                    .collect(),
            ),
            metrics: Metrics::new(),
            head_layers: Mutex::new(None),
            fatal: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel();
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let stage = match Stage::load_with(&model, cfg.head_layers.clone(), &cfg.device, cfg.weights) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("head: loading the model failed: {e:#}");
                        *sh.fatal.lock().unwrap() = Some(format!("{e:#}"));
                        return;
                    }
                };
                *sh.head_layers.lock().unwrap() = Some((stage.layers.start, stage.layers.end));
                sh.loaded.store(true, Ordering::SeqCst);
                let mut core = Core::new(stage, cfg, sh, rx);
                core.run();
            })
            .expect("spawn engine thread");
        Engine { tx, shared }
    }

    pub fn submit(&self, job: Job) -> Result<()> {
        self.shared.metrics.queue_depth.inc();
        self.tx.send(job).map_err(|_| anyhow!("engine stopped"))
    }

    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst)
    }
}

struct Link {
    addr: String,
    io: Option<(BufReader<TcpStream>, BufWriter<TcpStream>)>,
    layers: Option<Range<usize>>,
    next_try: Instant,
    release: Vec<u64>,
}

struct Seq {
    id: u64,
    prompt: Vec<u32>,
    /// Tokens fed into the model so far (= KV cache length).
    fed: usize,
    /// Token to feed next while decoding.
    next: Option<u32>,
    generated: usize,
    max_tokens: usize,
    params: SamplingParams,
    rng: Rng,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    arrived: Instant,
}

struct Core {
    stage: Stage,
    cfg: EngineConfig,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Job>,
    links: Vec<Link>,
    caches: HashMap<u64, SeqCache>,
    waiting: VecDeque<Seq>,
    active: Vec<Seq>,
    next_id: u64,
    warmed: bool,
    last_ping: Instant,
    rate_window: VecDeque<(Instant, usize)>,
}

const RECONNECT_EVERY: Duration = Duration::from_millis(200);
const PING_EVERY: Duration = Duration::from_millis(200);

impl Core {
    fn new(stage: Stage, cfg: EngineConfig, shared: Arc<Shared>, rx: mpsc::Receiver<Job>) -> Self {
        let links = cfg
            .stage_addrs
            .iter()
            .map(|a| Link { addr: a.clone(), io: None, layers: None, next_try: Instant::now(), release: Vec::new() })
            .collect();
        Self {
            stage,
            cfg,
            shared,
            rx,
            links,
            caches: HashMap::new(),
            waiting: VecDeque::new(),
            active: Vec::new(),
            next_id: 1,
            warmed: false,
            last_ping: Instant::now(),
            rate_window: VecDeque::new(),
        }
    }

    fn run(&mut self) {
        loop {
            // Intake.
            if self.active.is_empty() && self.waiting.is_empty() {
                match self.rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(job) => self.accept(job),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.accept(job);
            }
            self.maintain_links();
            let connected = self.chain_ok();
            if !connected || !self.warmed {
                self.set_ready(false);
                if connected {
                    self.warm_up();
                }
            }
            if !self.shared.ready.load(Ordering::SeqCst) {
                self.fail_all(503, "replica not ready: a pipeline stage is unavailable");
                self.update_rate(0);
                continue;
            }
            self.active.retain(|s| {
                if s.events.is_closed() {
                    // Cancelled by the client (disconnect, stop string): release below.
                    false
                } else {
                    true
                }
            });
            self.collect_released();
            while self.active.len() < self.cfg.max_batch {
                match self.waiting.pop_front() {
                    Some(s) if s.events.is_closed() => continue,
                    Some(s) => self.active.push(s),
                    None => break,
                }
            }
            self.shared.metrics.queue_depth.set(self.waiting.len() as i64);
            self.shared.metrics.active.set(self.active.len() as i64);
            if self.active.is_empty() {
                self.idle_ping();
                self.update_rate(0);
                continue;
            }
            self.step();
        }
    }

    fn accept(&mut self, job: Job) {
        let id = self.next_id;
        self.next_id += 1;
        let seed = job.params.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64 ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
        self.shared.metrics.prompt_tokens.inc_by(job.prompt.len() as u64);
        self.waiting.push_back(Seq {
            id,
            prompt: job.prompt,
            fed: 0,
            next: None,
            generated: 0,
            max_tokens: job.max_tokens,
            params: job.params,
            rng: Rng::new(seed),
            events: job.events,
            arrived: job.arrived,
        });
    }

    /// Releases caches of sequences that are no longer active (finished, cancelled, failed).
    fn collect_released(&mut self) {
        let live: std::collections::HashSet<u64> = self.active.iter().map(|s| s.id).collect();
        let gone: Vec<u64> = self.caches.keys().copied().filter(|k| !live.contains(k)).collect();
        for id in gone {
            self.caches.remove(&id);
            for l in &mut self.links {
                l.release.push(id);
            }
        }
    }

    fn set_ready(&self, ready: bool) {
        if self.shared.ready.swap(ready, Ordering::SeqCst) != ready {
            eprintln!("head: replica {}", if ready { "ready" } else { "not ready" });
        }
        self.shared.metrics.ready.set(ready as i64);
    }

    fn fail_all(&mut self, status: u16, message: &str) {
        let n = self.active.len() + self.waiting.len();
        for s in self.active.drain(..).chain(self.waiting.drain(..)) {
            let _ = s.events.send(Event::Failed { status, message: message.to_string() });
        }
        if n > 0 {
            self.shared.metrics.requests.with_label_values(&["failed"]).inc_by(n as u64);
        }
        self.caches.clear();
        self.shared.metrics.queue_depth.set(0);
        self.shared.metrics.active.set(0);
    }

    fn chain_ok(&self) -> bool {
        let mut end = self.stage.layers.end;
        for l in &self.links {
            match (&l.io, &l.layers) {
                (Some(_), Some(r)) if r.start == end => end = r.end,
                _ => return false,
            }
        }
        end == self.stage.cfg.n_layers
    }

    fn maintain_links(&mut self) {
        let now = Instant::now();
        let mut changed = false;
        for i in 0..self.links.len() {
            if self.links[i].io.is_some() || now < self.links[i].next_try {
                continue;
            }
            self.links[i].next_try = now + RECONNECT_EVERY;
            match self.connect(i) {
                Ok(()) => {
                    changed = true;
                    self.warmed = false;
                    let l = &self.links[i];
                    eprintln!("head: connected to stage {} at {} (layers {:?})", i + 1, l.addr, l.layers);
                }
                Err(e) => self.note_error(i, format!("{e:#}")),
            }
        }
        if changed {
            self.publish_links();
        }
    }

    fn connect(&mut self, i: usize) -> Result<()> {
        let l = &mut self.links[i];
        let addr = l.addr.to_socket_addrs()?.next().with_context(|| format!("cannot resolve {}", l.addr))?;
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut r = BufReader::new(s.try_clone()?);
        let mut w = BufWriter::new(s.try_clone()?);
        write_msg(&mut w, &Msg::Hello { version: PROTOCOL_VERSION })?;
        match read_msg(&mut r)? {
            Some(Msg::HelloAck { start, end, n_layers, hidden, .. }) => {
                if n_layers as usize != self.stage.cfg.n_layers || hidden as usize != self.stage.cfg.hidden {
                    bail!("stage at {} serves a different model ({n_layers} layers, hidden {hidden})", l.addr);
                }
                l.layers = Some(start as usize..end as usize);
            }
            Some(Msg::Error { message }) => bail!("stage refused: {message}"),
            other => bail!("unexpected handshake reply {other:?}"),
        }
        s.set_read_timeout(Some(self.cfg.stage_timeout))?;
        l.io = Some((r, w));
        l.release.clear();
        Ok(())
    }

    fn note_error(&mut self, i: usize, e: String) {
        let mut st = self.shared.stages.lock().unwrap();
        if let Some(s) = st.get_mut(i)
            && s.last_error.as_deref() != Some(e.as_str())
        {
            s.last_error = Some(e);
        }
    }

    fn publish_links(&self) {
        let mut st = self.shared.stages.lock().unwrap();
        let mut n = 0;
        for (i, l) in self.links.iter().enumerate() {
            if let Some(s) = st.get_mut(i) {
                s.connected = l.io.is_some();
                s.layers = l.layers.as_ref().map(|r| (r.start, r.end));
                if s.connected {
                    s.last_error = None;
                    n += 1;
                }
            }
        }
        self.shared.metrics.stages_connected.set(n);
    }

    /// A broken link: drop every connection (each stage resets its caches on reconnect) and
    /// every sequence.
    fn link_failed(&mut self, i: usize, e: anyhow::Error) {
        let addr = self.links[i].addr.clone();
        eprintln!("head: stage {} at {addr} failed: {e:#}", i + 1);
        self.note_error(i, format!("{e:#}"));
        for l in &mut self.links {
            l.io = None;
            l.next_try = Instant::now();
        }
        self.warmed = false;
        self.set_ready(false);
        self.publish_links();
        self.fail_all(503, &format!("pipeline stage {} ({addr}) failed: {e}", i + 1));
    }

    fn idle_ping(&mut self) {
        if self.last_ping.elapsed() < PING_EVERY {
            return;
        }
        self.last_ping = Instant::now();
        for i in 0..self.links.len() {
            let release = std::mem::take(&mut self.links[i].release);
            let msg = if release.is_empty() { Msg::Ping } else { Msg::Release { seqs: release } };
            if let Err(e) = self.call(i, &msg) {
                self.link_failed(i, e);
                return;
            }
        }
    }

    fn call(&mut self, i: usize, msg: &Msg) -> Result<Msg> {
        let (r, w) = self.links[i].io.as_mut().context("not connected")?;
        write_msg(w, msg)?;
        match read_msg(r)? {
            Some(Msg::Error { message }) => bail!("stage error: {message}"),
            Some(m) => Ok(m),
            None => bail!("connection closed"),
        }
    }

    fn warm_up(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        let chunks = vec![(id, 0usize, vec![self.cfg.stop_ids.first().copied().unwrap_or(0)])];
        let greedy = SampleSpec { temperature: 0.0, top_p: 1.0, u: 0.0 };
        match self.forward(&chunks, &[Some(greedy)]) {
            Ok(_) => {
                self.caches.remove(&id);
                for l in &mut self.links {
                    l.release.push(id);
                }
                self.warmed = true;
                self.set_ready(true);
            }
            Err(StepError::Link(i, e)) => self.link_failed(i, e),
            Err(StepError::Local(e)) => {
                eprintln!("head: warm-up failed: {e:#}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }

    fn step(&mut self) {
        let t0 = Instant::now();
        let mut budget = self.cfg.prefill_chunk.max(1);
        let mut plan: Vec<(u64, usize, Vec<u32>)> = Vec::with_capacity(self.active.len());
        for s in &self.active {
            if s.fed < s.prompt.len() {
                if budget == 0 {
                    continue;
                }
                let n = (s.prompt.len() - s.fed).min(budget);
                budget -= n;
                plan.push((s.id, s.fed, s.prompt[s.fed..s.fed + n].to_vec()));
            } else if let Some(t) = s.next {
                plan.push((s.id, s.fed, vec![t]));
            }
        }
        if plan.is_empty() {
            return;
        }
        self.shared.metrics.batch_size.observe(plan.len() as f64);
        // A token for every chunk that reaches the end of its prompt (or is a decode step),
        // with this step's draw from the sequence's RNG when it samples at random.
        let specs: Vec<Option<SampleSpec>> = plan
            .iter()
            .map(|(id, pos, toks)| {
                let s = self.active.iter_mut().find(|s| s.id == *id).unwrap();
                (pos + toks.len() >= s.prompt.len()).then(|| SampleSpec {
                    temperature: s.params.temperature,
                    top_p: s.params.top_p,
                    u: if is_greedy(s.params.temperature) { 0.0 } else { s.rng.next_f64() },
                })
            })
            .collect();
        let tokens = match self.forward(&plan, &specs) {
            Ok(l) => l,
            Err(StepError::Link(i, e)) => return self.link_failed(i, e),
            Err(StepError::Local(e)) => {
                eprintln!("head: step failed: {e:#}");
                let ids: Vec<u64> = plan.iter().map(|p| p.0).collect();
                let msg = format!("inference failed: {e}");
                self.active.retain(|s| {
                    if ids.contains(&s.id) {
                        let _ = s.events.send(Event::Failed { status: 500, message: msg.clone() });
                        false
                    } else {
                        true
                    }
                });
                self.collect_released();
                return;
            }
        };
        let mut produced = 0;
        let ctx = self.cfg.context_length.min(self.stage.max_positions);
        let metrics = &self.shared.metrics;
        let stop_ids = &self.cfg.stop_ids;
        let mut done_ids = Vec::new();
        for ((id, _, toks), token) in plan.iter().zip(tokens) {
            let s = self.active.iter_mut().find(|s| s.id == *id).unwrap();
            s.fed += toks.len();
            let Some(t) = token else {
                continue; // more prompt to go
            };
            s.generated += 1;
            produced += 1;
            metrics.tokens_generated.inc();
            if s.generated == 1 {
                metrics.ttft.observe(s.arrived.elapsed().as_secs_f64());
            }
            let finish = if !s.params.ignore_eos && stop_ids.contains(&t) {
                Some(Finish::Stop)
            } else {
                if s.events.send(Event::Token(t)).is_err() {
                    done_ids.push(s.id);
                    continue;
                }
                if s.generated >= s.max_tokens || s.fed + 1 >= ctx { Some(Finish::Length) } else { None }
            };
            s.next = Some(t);
            if let Some(finish) = finish {
                let _ = s.events.send(Event::Done { finish, completion_tokens: s.generated });
                metrics.requests.with_label_values(&["ok"]).inc();
                done_ids.push(s.id);
            }
        }
        self.active.retain(|s| !done_ids.contains(&s.id));
        self.collect_released();
        self.shared.metrics.step_seconds.observe(t0.elapsed().as_secs_f64());
        self.update_rate(produced);
    }

    fn update_rate(&mut self, produced: usize) {
        let now = Instant::now();
        self.rate_window.push_back((now, produced));
        while let Some(&(t, _)) = self.rate_window.front() {
            if now.duration_since(t) > Duration::from_secs(3) {
                self.rate_window.pop_front();
            } else {
                break;
            }
        }
        let total: usize = self.rate_window.iter().map(|x| x.1).sum();
        let span = self.rate_window.front().map(|x| now.duration_since(x.0).as_secs_f64()).unwrap_or(0.0);
        let rate = if total == 0 || span <= 0.0 { 0.0 } else { total as f64 / span.max(0.05) };
        self.shared.metrics.tokens_per_second.set(rate);
    }

    /// Runs one step through the whole pipeline; returns the token sampled for each chunk
    /// with a `specs` entry.
    fn forward(
        &mut self,
        plan: &[(u64, usize, Vec<u32>)],
        specs: &[Option<SampleSpec>],
    ) -> Result<Vec<Option<u32>>, StepError> {
        let ids: Vec<u32> = plan.iter().flat_map(|p| p.2.iter().copied()).collect();
        let lens: Vec<usize> = plan.iter().map(|p| p.2.len()).collect();
        let local = |core: &mut Core| -> Result<Tensor> {
            let x = core.stage.embed(&ids)?;
            let mut taken: Vec<SeqCache> = plan
                .iter()
                .map(|(id, pos, _)| {
                    if *pos == 0 {
                        core.stage.new_cache()
                    } else {
                        core.caches.remove(id).unwrap_or_else(|| core.stage.new_cache())
                    }
                })
                .collect();
            let mut chunks: Vec<Chunk> = taken
                .iter_mut()
                .zip(plan)
                .map(|(cache, (_, pos, t))| Chunk { cache, pos: *pos, len: t.len() })
                .collect();
            let y = core.stage.forward(&x, &mut chunks);
            drop(chunks);
            for (cache, (id, _, _)) in taken.into_iter().zip(plan) {
                core.caches.insert(*id, cache);
            }
            let y = y?;
            if core.stage.is_tail() { core.stage.logits(&y, &lens) } else { Ok(y) }
        };
        let y = local(self).map_err(StepError::Local)?;
        if self.links.is_empty() {
            let logits = y.to_vec2::<f32>().map_err(|e| StepError::Local(e.into()))?;
            return Ok(logits.iter().zip(specs).map(|(row, spec)| spec.map(|p| sample_with(row, &p))).collect());
        }
        let (mut rows, mut cols) = y.dims2().map_err(|e| StepError::Local(e.into()))?;
        let mut data: Vec<f32> = y.flatten_all().and_then(|t| t.to_vec1()).map_err(|e| StepError::Local(e.into()))?;
        let hdrs: Vec<ChunkHdr> =
            plan.iter().map(|(id, pos, t)| ChunkHdr { seq: *id, pos: *pos as u32, len: t.len() as u32 }).collect();
        // Each stage in turn; the last one also gets the sampling instructions and answers
        // with the tokens.
        let tail = self.links.len() - 1;
        for i in 0..=tail {
            let msg = Msg::Forward {
                release: std::mem::take(&mut self.links[i].release),
                chunks: hdrs.clone(),
                rows: rows as u32,
                cols: cols as u32,
                data,
                sample: if i == tail { specs.to_vec() } else { Vec::new() },
            };
            match self.call(i, &msg) {
                Ok(Msg::Output { rows: r, cols: c, data: d }) if i < tail => {
                    rows = r as usize;
                    cols = c as usize;
                    data = d;
                }
                Ok(Msg::Tokens { ids }) if i == tail => {
                    if ids.len() != plan.len() {
                        let n = plan.len();
                        return Err(StepError::Local(anyhow!("tail returned {} tokens for {n} sequences", ids.len())));
                    }
                    return Ok(ids.into_iter().zip(specs).map(|(id, spec)| spec.map(|_| id)).collect());
                }
                Ok(other) => return Err(StepError::Link(i, anyhow!("unexpected reply {other:?}"))),
                Err(e) => return Err(StepError::Link(i, e)),
            }
        }
        unreachable!("the tail's answer returns from the loop")
    }
}

enum StepError {
    Link(usize, anyhow::Error),
    Local(anyhow::Error),
}

/// SplitMix64: small, seedable, good enough for sampling.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Whether a temperature means greedy decoding (no random draw).
pub fn is_greedy(temperature: f32) -> bool {
    temperature <= 1e-5
}

/// Picks the next token: greedy when `temperature` is ~0; otherwise softmax with
/// temperature and nucleus (top-p), using the uniform draw `p.u` the head took from the
/// request's RNG. The same function runs in the head or in the tail stage.
pub fn sample_with(logits: &[f32], p: &SampleSpec) -> u32 {
    if is_greedy(p.temperature) {
        return argmax(logits);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / p.temperature as f64;
    let mut probs: Vec<(u32, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i as u32, ((l - max) as f64 * inv_t).exp())).collect();
    let total: f64 = probs.iter().map(|x| x.1).sum();
    if p.top_p < 1.0 {
        probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        let cut = p.top_p as f64 * total;
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, x) in probs.iter().enumerate() {
            acc += x.1;
            if acc >= cut {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().map(|x| x.1).sum();
    let mut u = p.u * total;
    for &(i, w) in &probs {
        if u < w {
            return i;
        }
        u -= w;
    }
    probs.last().map(|x| x.0).unwrap_or(0)
}
