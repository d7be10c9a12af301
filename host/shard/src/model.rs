//! Llama forward pass over a contiguous layer range, loaded from a GGUF file.
//!
//! A [`Stage`] owns some of: the token embedding (the head), layers `[a, b)`, and the final
//! norm + output head (the tail; the output matrix falls back to `token_embd` when the file
//! ties them, as SmolLM2 does). One replica is a chain of stages covering `[0, n_layers)`.
//!
//! The ops are the ones of `candle_transformers::models::quantized_llama` (same kernels, same
//! order), so a pipeline of stages reproduces the single-process logits exactly. Every op
//! that mixes rows (attention) runs per sequence against that sequence's own KV cache, every
//! row-wise op (norms, the quantized projections, the MLP) runs once over the rows of all
//! sequences of a step stacked together; candle's CPU quantized matmul computes each row
//! with the same kernel whatever the row count, so batching does not change the numbers.

use std::ops::Range;

use anyhow::{Context, Result, bail, ensure};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};

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

struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    attn_norm: Tensor,
    ffn_norm: Tensor,
    w1: QMatMul,
    w2: QMatMul,
    w3: QMatMul,
}

/// Per-sequence KV cache for the layers a stage owns.
#[derive(Default)]
pub struct SeqCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
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
    embed: Option<Tensor>,
    blocks: Vec<Layer>,
    tail: Option<(Tensor, QMatMul)>,
    cos: Tensor,
    sin: Tensor,
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
}

impl std::str::FromStr for WeightFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "native" => Ok(Self::Native),
            "q8_0" | "q8-0" => Ok(Self::Q8_0),
            _ => bail!("unknown weight format {s:?} (native, q8_0)"),
        }
    }
}

fn convert(qt: QTensor, fmt: WeightFormat, device: &Device) -> Result<QTensor> {
    if fmt == WeightFormat::Q8_0 && qt.dtype() == GgmlDType::Q4_1 {
        let t = qt.dequantize(device)?;
        return Ok(QTensor::quantize(&t, GgmlDType::Q8_0)?);
    }
    Ok(qt)
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
        let embed = if layers.start == 0 { Some(t(&mut file, "token_embd.weight")?.dequantize(device)?) } else { None };
        let mut blocks = Vec::with_capacity(layers.len());
        for i in layers.clone() {
            let p = format!("blk.{i}");
            let q = |file: &mut std::fs::File, n: &str| -> Result<QMatMul> {
                Ok(QMatMul::from_qtensor(convert(t(file, &format!("{p}.{n}.weight"))?, fmt, device)?)?)
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
                Ok(w) => w,
                Err(_) => t(&mut file, "token_embd.weight")?,
            };
            Some((norm, QMatMul::from_qtensor(out)?))
        } else {
            None
        };
        let max_positions = cfg.context_length;
        let (cos, sin) = rope_tables(cfg.rope_dim, cfg.rope_base, max_positions, device)?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, device)?;
        Ok(Self { cfg, layers, device: device.clone(), embed, blocks, tail, cos, sin, neg_inf, max_positions })
    }

    pub fn is_head(&self) -> bool {
        self.embed.is_some()
    }

    pub fn is_tail(&self) -> bool {
        self.tail.is_some()
    }

    pub fn new_cache(&self) -> SeqCache {
        SeqCache { kv: (0..self.blocks.len()).map(|_| None).collect(), len: 0 }
    }

    /// Token embeddings, `[ids.len(), hidden]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let e = self.embed.as_ref().context("this stage has no embedding (not the head)")?;
        let ids = Tensor::new(ids, &self.device)?;
        Ok(e.index_select(&ids, 0)?)
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
            let attn = self.attention(li, layer, &h, chunks)?;
            let x1 = (attn + residual)?;
            let residual = &x1;
            let h = candle_nn::ops::rms_norm(&x1, &layer.ffn_norm, self.cfg.rms_eps as f32)?;
            let w1 = layer.w1.forward(&h)?;
            let w3 = layer.w3.forward(&h)?;
            let mlp = layer.w2.forward(&(candle_nn::ops::silu(&w1)? * w3)?)?;
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
        Ok(layer.wo.forward(&y)?)
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
            #[cfg(feature = "cuda")]
            {
                if candle_core::utils::cuda_is_available() {
                    return Ok(Device::new_cuda(index)?);
                }
            }
            let _ = index;
            Ok(Device::Cpu)
        }
        s if s.starts_with("cuda") => {
            #[cfg(feature = "cuda")]
            {
                let ord = s.strip_prefix("cuda:").map(|n| n.parse()).transpose()?.unwrap_or(index);
                return Ok(Device::new_cuda(ord)?);
            }
            #[cfg(not(feature = "cuda"))]
            bail!("device {s} requested but switchyard-shard was built without the `cuda` feature")
        }
        s => bail!("unknown device {s:?} (cpu, auto, cuda, cuda:N)"),
    }
}
