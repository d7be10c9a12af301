//! Llama forward pass over a contiguous layer range, loaded from a GGUF file.
//!
//! A [`Stage`] owns some of: the token embedding (the head), layers `[a, b)`, and the final
//! norm + output head (the tail; the output matrix falls back to `token_embd` when the file
//! ties them, as SmolLM2 does). One replica is a chain of stages covering `[0, n_layers)`.
//!
//! With the `native` weight format the ops are the ones of
//! `candle_transformers::models::quantized_llama` (same kernels, same order), so a pipeline of
//! stages reproduces the single-process logits exactly. Every op that mixes rows (attention)
//! runs per sequence against that sequence's own KV cache, every row-wise op (norms, the
//! projections, the MLP) runs once over the rows of all sequences of a step stacked together
//! (one matmul per projection per step); candle's CPU quantized matmul computes each row with
//! the same kernel whatever the row count, so batching does not change the numbers.
//!
//! The other [`WeightFormat`]s change only how the projections are stored and multiplied;
//! `fused` also replaces the attention's candle ops by [`Stage::attention_flat`]. `fused` is
//! batch-invariant too (see [`crate::kernel`]), and stages split anywhere give the same
//! numbers as one process for every format.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};

use crate::kernel::BlockMatrix;

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub n_layers: usize,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rope_base: f32,
    pub rms_eps: f64,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl ModelConfig {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let arch =
            ct.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if arch != "llama" {
            bail!("unsupported architecture {arch:?} (only llama)");
        }
        if ct.metadata.get("llama.expert_count").and_then(|v| v.to_u32().ok()).unwrap_or(0) > 1 {
            bail!("mixture-of-experts llama models are not supported");
        }
        let u = |k: &str| -> Result<usize> {
            Ok(ct.metadata.get(k).with_context(|| format!("GGUF metadata has no {k}"))?.to_u32()? as usize)
        };
        let hidden = u("llama.embedding_length")?;
        let n_head = u("llama.attention.head_count")?;
        let vocab_size = match ct.metadata.get("tokenizer.ggml.tokens") {
            Some(v) => v.to_vec()?.len(),
            None => u("llama.vocab_size")?,
        };
        Ok(Self {
            n_layers: u("llama.block_count")?,
            hidden,
            n_head,
            n_kv_head: u("llama.attention.head_count_kv")?,
            head_dim: hidden / n_head,
            rope_dim: u("llama.rope.dimension_count")?,
            rope_base: ct.metadata.get("llama.rope.freq_base").and_then(|v| v.to_f32().ok()).unwrap_or(10000.0),
            rms_eps: ct.metadata.get("llama.attention.layer_norm_rms_epsilon").context("no rms eps")?.to_f32()? as f64,
            context_length: u("llama.context_length").unwrap_or(4096),
            vocab_size,
        })
    }
}

/// A projection: candle's `QMatMul` (quantized kernels or dense f32/f16 gemm) or the
/// `fused` block kernel.
enum Proj {
    Candle(QMatMul),
    Fused(Arc<BlockMatrix>),
}

impl Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Proj::Candle(q) => q.forward(x)?,
            Proj::Fused(b) => x.contiguous()?.apply_op1_no_bwd(b.as_ref())?,
        })
    }
}

/// The token embedding table: dequantized to f32 at load, or (`fused`) kept in its blocks
/// and dequantized row by row; shared with a tied output head.
enum Embedding {
    Dense(Tensor),
    Blocks(Arc<BlockMatrix>),
}

struct Layer {
    wq: Proj,
    wk: Proj,
    wv: Proj,
    wo: Proj,
    attn_norm: Tensor,
    ffn_norm: Tensor,
    w1: Proj,
    w2: Proj,
    w3: Proj,
}

/// Per-sequence KV cache for the layers a stage owns.
#[derive(Default)]
pub struct SeqCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    /// `fused`: keys and values per layer, `[position][kv head][head_dim]`, appended in place.
    flat: Vec<(Vec<f32>, Vec<f32>)>,
    /// Number of positions cached.
    pub len: usize,
}

/// One sequence's slice of a step: `len` new tokens starting at position `pos`.
pub struct Chunk<'a> {
    pub cache: &'a mut SeqCache,
    pub pos: usize,
    pub len: usize,
}

pub struct Stage {
    pub cfg: ModelConfig,
    pub layers: Range<usize>,
    pub device: Device,
    embed: Option<Embedding>,
    blocks: Vec<Layer>,
    tail: Option<(Tensor, Proj)>,
    cos: Tensor,
    sin: Tensor,
    /// `fused`: the RoPE tables as plain vectors (`[position][head_dim / 2]`), and attention
    /// by [`Stage::attention_flat`] instead of candle ops.
    flat_rope: Option<(Vec<f32>, Vec<f32>)>,
    neg_inf: Tensor,
    /// Largest context any sequence may reach (bounded by the RoPE tables).
    pub max_positions: usize,
}

/// How quantized projection weights are kept in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// As stored in the file (bit-exact with candle-transformers' quantized llama).
    #[default]
    Native,
    /// Q4_1 tensors re-quantized to Q8_0 at load. candle has AVX2/NEON kernels for Q8_0 but
    /// only a scalar one for Q4_1, so this is several times faster on CPU; logits change by
    /// a re-quantization error (Q8_0 of Q4_1 values is nearly lossless), not bit-exact.
    Q8_0,
    /// Every projection and the output head dequantized to f32 at load (4 bytes a weight):
    /// decode steps run on candle's gemm-backed matmul, one matmul over all the rows of a step.
    /// Exact dequantized values and f32 activations (the quantized kernels round activations
    /// to 8 bits).
    F32,
    /// Like `F32` but kept as f16 (half the memory); activations are rounded to f16 for
    /// every matmul.
    F16,
    /// The blocks as stored (Q4_1, and Q8_0 for the output head), multiplied by switchyard's
    /// own kernel ([`crate::kernel`]): dequantized in registers, f32 activations, one pass over
    /// the weights for all the rows of a step, batch-invariant; attention by plain loops over
    /// flat KV caches ([`crate::kernel::attend`]). Other block types (and non-CPU devices)
    /// fall back to `native`'s kernels. The default of `serve` and `stage`.
    Fused,
    /// As `fused`, with the weights repacked in tiles of 16 output features and the
    /// activations rounded to 8 bits per block of 32 (as candle's and ggml's quantized kernels
    /// do), so a step's rows are multiplied by 8-bit integer dot products (`vpdpbusd` with
    /// AVX-512 VNNI): each further row of a batch costs a fraction of what it costs in f32.
    /// Batch-invariant and identical on every instruction set. Not the default: rounding the
    /// activations moves the logits as much as candle's quantized kernels do, enough to
    /// change the greedy answer of this small model to some prompts (tested against the
    /// reference, which changes it the same way).
    FusedQ8,
}

impl WeightFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Q8_0 => "q8_0",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Fused => "fused",
            Self::FusedQ8 => "fused-q8",
        }
    }

    /// Whether the projections run on switchyard's block kernel ([`crate::kernel`]).
    pub fn is_fused(self) -> bool {
        matches!(self, Self::Fused | Self::FusedQ8)
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "native" => Ok(Self::Native),
            "q8_0" | "q8-0" => Ok(Self::Q8_0),
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "fused" => Ok(Self::Fused),
            "fused-q8" | "fused_q8" => Ok(Self::FusedQ8),
            _ => bail!("unknown weight format {s:?} (fused-q8, fused, native, q8_0, f32, f16)"),
        }
    }
}

/// A projection in format `fmt`.
fn projection(qt: QTensor, fmt: WeightFormat, device: &Device) -> Result<Proj> {
    if fmt.is_fused()
        && let Some(b) = block_matrix(&qt, fmt)?
    {
        return Ok(Proj::Fused(Arc::new(b)));
    }
    Ok(Proj::Candle(match fmt {
        WeightFormat::Native | WeightFormat::Fused | WeightFormat::FusedQ8 => QMatMul::from_qtensor(qt)?,
        WeightFormat::Q8_0 if qt.dtype() == GgmlDType::Q4_1 => {
            let t = qt.dequantize(device)?;
            QMatMul::from_qtensor(QTensor::quantize(&t, GgmlDType::Q8_0)?)?
        }
        WeightFormat::Q8_0 => QMatMul::from_qtensor(qt)?,
        WeightFormat::F32 => QMatMul::Tensor(qt.dequantize(device)?),
        WeightFormat::F16 => QMatMul::TensorF16(qt.dequantize_f16(device)?),
    }))
}

/// `qt` in the block layout of a fused format, if the kernel takes its block type.
fn block_matrix(qt: &QTensor, fmt: WeightFormat) -> Result<Option<BlockMatrix>> {
    match fmt {
        WeightFormat::FusedQ8 => match BlockMatrix::from_qtensor_tiled(qt)? {
            Some(b) => Ok(Some(b)),
            None => BlockMatrix::from_qtensor(qt),
        },
        WeightFormat::Fused => BlockMatrix::from_qtensor(qt),
        _ => Ok(None),
    }
}

pub fn read_gguf(path: &std::path::Path) -> Result<(gguf_file::Content, std::fs::File)> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening model {}", path.display()))?;
    let ct = gguf_file::Content::read(&mut file).with_context(|| format!("reading GGUF {}", path.display()))?;
    Ok((ct, file))
}

impl Stage {
    /// Loads the parts of the model one stage needs: the embedding when `layers.start == 0`,
    /// the output head when `layers.end == n_layers`.
    pub fn load(path: &std::path::Path, layers: Option<Range<usize>>, device: &Device) -> Result<Self> {
        Self::load_with(path, layers, device, WeightFormat::Native)
    }

    pub fn load_with(
        path: &std::path::Path,
        layers: Option<Range<usize>>,
        device: &Device,
        fmt: WeightFormat,
    ) -> Result<Self> {
        let (ct, mut file) = read_gguf(path)?;
        let cfg = ModelConfig::from_gguf(&ct)?;
        let layers = layers.unwrap_or(0..cfg.n_layers);
        ensure!(
            layers.start <= layers.end && layers.end <= cfg.n_layers,
            "layer range {}..{} is outside 0..{}",
            layers.start,
            layers.end,
            cfg.n_layers
        );
        let t = |file: &mut std::fs::File, name: &str| {
            ct.tensor(file, name, device).with_context(|| format!("loading tensor {name}"))
        };
        let embed = if layers.start == 0 {
            let e = t(&mut file, "token_embd.weight")?;
            let blocks = block_matrix(&e, fmt)?;
            Some(match blocks {
                Some(b) => Embedding::Blocks(Arc::new(b)),
                None => Embedding::Dense(e.dequantize(device)?),
            })
        } else {
            None
        };
        let mut blocks = Vec::with_capacity(layers.len());
        for i in layers.clone() {
            let p = format!("blk.{i}");
            let q = |file: &mut std::fs::File, n: &str| -> Result<Proj> {
                projection(t(file, &format!("{p}.{n}.weight"))?, fmt, device)
            };
            blocks.push(Layer {
                wq: q(&mut file, "attn_q")?,
                wk: q(&mut file, "attn_k")?,
                wv: q(&mut file, "attn_v")?,
                wo: q(&mut file, "attn_output")?,
                w1: q(&mut file, "ffn_gate")?,
                w2: q(&mut file, "ffn_down")?,
                w3: q(&mut file, "ffn_up")?,
                attn_norm: t(&mut file, &format!("{p}.attn_norm.weight"))?.dequantize(device)?,
                ffn_norm: t(&mut file, &format!("{p}.ffn_norm.weight"))?.dequantize(device)?,
            });
        }
        let tail = if layers.end == cfg.n_layers {
            let norm = t(&mut file, "output_norm.weight")?.dequantize(device)?;
            let out = match ct.tensor(&mut file, "output.weight", device) {
                Ok(w) => projection(w, fmt, device)?,
                // Tied: a single-stage replica already holds the table for the embedding.
                Err(_) => match (&embed, fmt) {
                    (Some(Embedding::Blocks(b)), _) => Proj::Fused(b.clone()),
                    (Some(Embedding::Dense(e)), WeightFormat::F32) => Proj::Candle(QMatMul::Tensor(e.clone())),
                    _ => projection(t(&mut file, "token_embd.weight")?, fmt, device)?,
                },
            };
            Some((norm, out))
        } else {
            None
        };
        let max_positions = cfg.context_length;
        let (cos, sin) = rope_tables(cfg.rope_dim, cfg.rope_base, max_positions, device)?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, device)?;
        let flat_rope = if fmt.is_fused() && device.is_cpu() && cfg.rope_dim == cfg.head_dim {
            Some((cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?))
        } else {
            None
        };
        Ok(Self {
            cfg,
            layers,
            device: device.clone(),
            embed,
            blocks,
            tail,
            cos,
            sin,
            flat_rope,
            neg_inf,
            max_positions,
        })
    }

    pub fn is_head(&self) -> bool {
        self.embed.is_some()
    }

    pub fn is_tail(&self) -> bool {
        self.tail.is_some()
    }

    pub fn new_cache(&self) -> SeqCache {
        let n = self.blocks.len();
        SeqCache { kv: (0..n).map(|_| None).collect(), flat: (0..n).map(|_| Default::default()).collect(), len: 0 }
    }

    /// Token embeddings, `[ids.len(), hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        match self.embed.as_ref().context("this stage has no embedding (not the head)")? {
            Embedding::Dense(e) => {
                let ids = Tensor::new(ids, &self.device)?;
                Ok(e.index_select(&ids, 0)?)
            }
            Embedding::Blocks(b) => {
                let (n, k) = b.dims();
                let mut out = vec![0f32; ids.len() * k];
                for (row, &id) in out.chunks_exact_mut(k).zip(ids) {
                    ensure!((id as usize) < n, "token id {id} outside the vocabulary ({n})");
                    b.row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), k), &self.device)?)
            }
        }
    }

    /// Runs this stage's layers over `x` (`[T, hidden]`, the rows of all chunks in order).
    pub fn forward(&self, x: &Tensor, chunks: &mut [Chunk<'_>]) -> Result<Tensor> {
        let total: usize = chunks.iter().map(|c| c.len).sum();
        let (rows, hidden) = x.dims2()?;
        ensure!(rows == total && hidden == self.cfg.hidden, "hidden states {rows}x{hidden} do not match the chunks");
        for c in chunks.iter() {
            ensure!(c.len > 0, "empty chunk");
            ensure!(c.pos == c.cache.len, "chunk starts at position {} but the cache holds {}", c.pos, c.cache.len);
            ensure!(
                c.pos + c.len <= self.max_positions,
                "sequence exceeds the context window ({})",
                self.max_positions
            );
        }
        let mut x = x.unsqueeze(0)?;
        for (li, layer) in self.blocks.iter().enumerate() {
            let residual = &x;
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.cfg.rms_eps as f32)?;
            let attn = match &self.flat_rope {
                Some(rope) => self.attention_flat(li, layer, &h, chunks, rope)?,
                None => self.attention(li, layer, &h, chunks)?,
            };
            let x1 = (attn + residual)?;
            let residual = &x1;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, self.cfg.rms_eps as f32)?;
            let w1 = layer.w1.forward(&h)?;
            let w3 = layer.w3.forward(&h)?;
            let gate = if self.device.is_cpu() && matches!(layer.w1, Proj::Fused(_)) {
                w1.apply_op2_no_bwd(&w3, &crate::kernel::SiluMul)?
            } else {
                (candle_nn::ops::silu(&w1)? * w3)?
            };
            let mlp = layer.w2.forward(&gate)?;
            x = (mlp + residual)?;
        }
        for c in chunks.iter_mut() {
            c.cache.len = c.pos + c.len;
        }
        Ok(x.squeeze(0)?)
    }

    fn attention(&self, li: usize, layer: &Layer, h: &Tensor, chunks: &mut [Chunk<'_>]) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let q_all = layer.wq.forward(h)?;
        let k_all = layer.wk.forward(h)?;
        let v_all = layer.wv.forward(h)?;
        let mut outs = Vec::with_capacity(chunks.len());
        let mut off = 0;
        for c in chunks.iter_mut() {
            let (pos, len) = (c.pos, c.len);
            let q = q_all.narrow(1, off, len)?.reshape((1, len, nh, hd))?.transpose(1, 2)?;
            let k = k_all.narrow(1, off, len)?.reshape((1, len, nkv, hd))?.transpose(1, 2)?;
            let v = v_all.narrow(1, off, len)?.reshape((1, len, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            off += len;
            let cos = self.cos.narrow(0, pos, len)?;
            let sin = self.sin.narrow(0, pos, len)?;
            let q = candle_nn::rotary_emb::rope_i(&q.contiguous()?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k.contiguous()?, &cos, &sin)?;
            let slot = &mut c.cache.kv[li];
            let (k, v) = match slot.as_ref() {
                Some((kc, vc)) if pos > 0 => (Tensor::cat(&[kc, &k], 2)?, Tensor::cat(&[vc, &v], 2)?),
                _ => (k, v),
            };
            *slot = Some((k.clone(), v.clone()));
            let k = candle_transformers::utils::repeat_kv(k, nh / nkv)?;
            let v = candle_transformers::utils::repeat_kv(v, nh / nkv)?;
            let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
            let att = if len > 1 {
                let mask = candle_transformers::utils::build_causal_mask(len, pos, &self.device)?;
                let mask = mask.broadcast_as(att.shape())?;
                mask.where_cond(&self.neg_inf.broadcast_as(att.shape().dims())?, &att)?
            } else {
                att
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v.contiguous()?)?;
            outs.push(y.transpose(1, 2)?.reshape((1, len, nh * hd))?);
        }
        let y = if outs.len() == 1 { outs.pop().unwrap() } else { Tensor::cat(&outs, 1)? };
        layer.wo.forward(&y)
    }

    /// Attention of the `fused` format: RoPE, the KV caches (plain vectors, appended in place)
    /// and the attention itself by plain loops ([`crate::simd::attend`]) rather than ~15
    /// candle ops per sequence and layer; every (row, head) is independent of the others, so
    /// the result does not depend on the batch. The rows' heads are spread over the threads.
    fn attention_flat(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        chunks: &mut [Chunk<'_>],
        (cos, sin): &(Vec<f32>, Vec<f32>),
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim);
        let (qw, kvw, half) = (nh * hd, nkv * hd, hd / 2);
        let mut q: Vec<f32> = layer.wq.forward(h)?.flatten_all()?.to_vec1()?;
        let mut k: Vec<f32> = layer.wk.forward(h)?.flatten_all()?.to_vec1()?;
        let v: Vec<f32> = layer.wv.forward(h)?.flatten_all()?.to_vec1()?;
        let rows = q.len() / qw;
        // (chunk, position) of every row.
        let mut at = Vec::with_capacity(rows);
        for (ci, c) in chunks.iter_mut().enumerate() {
            let (kc, vc) = &mut c.cache.flat[li];
            for i in 0..c.len {
                let (r, pos) = (at.len(), c.pos + i);
                let (cs, sn) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
                for x in
                    q[r * qw..(r + 1) * qw].chunks_exact_mut(hd).chain(k[r * kvw..(r + 1) * kvw].chunks_exact_mut(hd))
                {
                    rope_interleaved(x, cs, sn);
                }
                kc.extend_from_slice(&k[r * kvw..(r + 1) * kvw]);
                vc.extend_from_slice(&v[r * kvw..(r + 1) * kvw]);
                at.push((ci, pos));
            }
        }
        let caches: Vec<(&[f32], &[f32])> =
            chunks.iter().map(|c| (c.cache.flat[li].0.as_slice(), c.cache.flat[li].1.as_slice())).collect();
        let mut out = vec![0f32; rows * qw];
        let dst = SyncPtr(out.as_mut_ptr());
        let isa = crate::kernel::Isa::detect();
        let n_rep = nh / nkv;
        // One item: the query heads of one row that share a key/value head.
        let work = |items: Range<usize>| {
            let dst = &dst;
            let mut scores = Vec::new();
            for it in items {
                let (r, g) = (it / nkv, it % nkv);
                let (ci, pos) = at[r];
                let (keys, values) = caches[ci];
                scores.resize(n_rep * (pos + 1), 0f32);
                let span = r * qw + g * n_rep * hd..r * qw + (g + 1) * n_rep * hd;
                // SAFETY: every item writes its own values of `out`, which outlives this.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.0.add(span.start), span.len()) };
                crate::kernel::attend(isa, &q[span], hd, pos + 1, keys, values, kvw, g * hd, &mut scores, o);
            }
        };
        let positions: usize = at.iter().map(|a| a.1 + 1).sum();
        if positions * nh * hd < 1 << 15 {
            work(0..rows * nkv);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(rows * nkv, work);
        }
        let y = Tensor::from_vec(out, (1, rows, qw), &self.device)?;
        layer.wo.forward(&y)
    }

    /// Logits of the last row of each chunk: `[chunks, vocab]`.
    pub fn logits(&self, x: &Tensor, chunk_lens: &[usize]) -> Result<Tensor> {
        let (norm, out) = self.tail.as_ref().context("this stage has no output head (not the tail)")?;
        let mut idx = Vec::with_capacity(chunk_lens.len());
        let mut end = 0u32;
        for &l in chunk_lens {
            end += l as u32;
            idx.push(end - 1);
        }
        let idx = Tensor::new(idx.as_slice(), &self.device)?;
        let last = x.index_select(&idx, 0)?;
        let h = candle_nn::ops::rms_norm(&last, norm, self.cfg.rms_eps as f32)?;
        Ok(out.forward(&h)?.to_dtype(DType::F32)?)
    }
}

/// candle's `rope_i` on one head: pairs `(2j, 2j + 1)` rotated by angle `j`.
fn rope_interleaved(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (p, (c, s)) in x.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
        let (x0, x1) = (p[0], p[1]);
        p[0] = x0 * c - x1 * s;
        p[1] = x0 * s + x1 * c;
    }
}

struct SyncPtr(*mut f32);
// SAFETY: used only to write disjoint elements from several threads (`attention_flat`).
unsafe impl Sync for SyncPtr {}
unsafe impl Send for SyncPtr {}

fn rope_tables(dim: usize, base: f32, n: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..dim).step_by(2).map(|i| 1f32 / base.powf(i as f32 / dim as f32)).collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let idx = Tensor::arange(0, n as u32, device)?.to_dtype(DType::F32)?.reshape((n, 1))?;
    let freqs = idx.matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Even split of `n_layers` over `n` stages: stage i gets `[i*n_layers/n, (i+1)*n_layers/n)`.
pub fn split_layers(n_layers: usize, n: usize) -> Vec<Range<usize>> {
    (0..n).map(|i| i * n_layers / n..(i + 1) * n_layers / n).collect()
}

/// Parses `A..B` (or `A-B`).
pub fn parse_range(s: &str) -> Result<Range<usize>> {
    let (a, b) = s
        .split_once("..")
        .or_else(|| s.split_once('-'))
        .with_context(|| format!("bad layer range {s:?}, want A..B"))?;
    let r = a.trim().parse()?..b.trim().parse()?;
    ensure!(r.start < r.end, "empty layer range {s:?}");
    Ok(r)
}

/// Device for stage `index`: CPU, or with the `cuda` feature, GPU `index`.
pub fn device_for(spec: &str, index: usize) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            // candle's `cuda_is_available` only says whether the feature was compiled in:
            // opening the device is the real test. A host without a GPU i (or without a
            // driver) runs this stage on the CPU.
            #[cfg(feature = "cuda")]
            match Device::new_cuda(index) {
                Ok(d) => return Ok(d),
                Err(e) => eprintln!("stage {index}: no CUDA device {index} ({e}); using the CPU"),
            }
            let _ = index;
            Ok(Device::Cpu)
        }
        s if s.starts_with("cuda") => {
            #[cfg(feature = "cuda")]
            {
                let ord = s.strip_prefix("cuda:").map(|n| n.parse()).transpose()?.unwrap_or(index);
                return Device::new_cuda(ord).with_context(|| format!("--device {s}: cannot open CUDA device {ord}"));
            }
            #[cfg(not(feature = "cuda"))]
            bail!("device {s} requested but switchyard-shard was built without the `cuda` feature")
        }
        s => bail!("unknown device {s:?} (cpu, auto, cuda, cuda:N)"),
    }
}
