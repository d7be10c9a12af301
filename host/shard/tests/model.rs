//! The layer-range forward pass (1, 2 and 3 pipeline stages, batched decode) against
//! candle-transformers' single-process quantized llama.
#![allow(clippy::needless_range_loop, clippy::explicit_counter_loop)]

mod common;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use switchyard_shard::model::{Chunk, SeqCache, Stage, read_gguf, split_layers};
use switchyard_shard::tokenizer::Tokenizer;

const STEPS: usize = 16;

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

struct Pipeline {
    stages: Vec<Stage>,
}

impl Pipeline {
    fn new(n: usize) -> Self {
        let path = common::model_path();
        let stages =
            split_layers(30, n).into_iter().map(|r| Stage::load(&path, Some(r), &Device::Cpu).unwrap()).collect();
        Self { stages }
    }
    fn caches(&self) -> Vec<SeqCache> {
        self.stages.iter().map(|s| s.new_cache()).collect()
    }
    /// One step over several sequences: (cache set, position, new tokens).
    fn step(&self, seqs: &mut [(&mut Vec<SeqCache>, usize, &[u32])]) -> Vec<Vec<f32>> {
        let ids: Vec<u32> = seqs.iter().flat_map(|s| s.2.iter().copied()).collect();
        let lens: Vec<usize> = seqs.iter().map(|s| s.2.len()).collect();
        let mut x = self.stages[0].embed(&ids).unwrap();
        for (si, stage) in self.stages.iter().enumerate() {
            let mut chunks: Vec<Chunk> = Vec::new();
            for s in seqs.iter_mut() {
                let (caches, pos, toks) = (&mut *s.0, s.1, s.2);
                chunks.push(Chunk { cache: &mut caches[si], pos, len: toks.len() });
            }
            x = stage.forward(&x, &mut chunks).unwrap();
        }
        self.stages.last().unwrap().logits(&x, &lens).unwrap().to_vec2().unwrap()
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let lo = b.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (d, hi - lo)
}

fn prompt() -> Vec<u32> {
    let (ct, _) = read_gguf(&common::model_path()).unwrap();
    let tok = Tokenizer::from_gguf(&ct).unwrap();
    tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", true)
}

fn reference(prompt: &[u32]) -> (Vec<Vec<f32>>, Vec<u32>) {
    let (ct, mut file) = read_gguf(&common::model_path()).unwrap();
    let mut m = ModelWeights::from_gguf(ct, &mut file, &Device::Cpu).unwrap();
    let mut all = Vec::new();
    let mut toks = Vec::new();
    let x = Tensor::new(prompt, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mut logits: Vec<f32> = m.forward(&x, 0).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    let mut pos = prompt.len();
    for _ in 0..STEPS {
        let t = argmax(&logits);
        all.push(logits);
        toks.push(t);
        let x = Tensor::new(&[t], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        logits = m.forward(&x, pos).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        pos += 1;
    }
    (all, toks)
}

#[test]
fn pipeline_matches_reference_for_1_2_3_stages_and_batching() {
    let prompt = prompt();
    let (ref_logits, ref_toks) = reference(&prompt);
    for n in 1..=3 {
        let p = Pipeline::new(n);
        let mut caches = p.caches();
        let mut logits = p.step(&mut [(&mut caches, 0, &prompt)]).remove(0);
        let mut pos = prompt.len();
        let mut toks = Vec::new();
        let mut worst = 0f32;
        for step in 0..STEPS {
            let (d, range) = max_diff(&logits, &ref_logits[step]);
            worst = worst.max(d / range);
            assert!(d <= 1e-4 * range, "N={n} step {step}: max |diff| {d} (logit range {range})");
            let t = argmax(&logits);
            toks.push(t);
            logits = p.step(&mut [(&mut caches, pos, &[t])]).remove(0);
            pos += 1;
        }
        assert_eq!(toks, ref_toks, "N={n}: greedy tokens differ");
        eprintln!("N={n}: 16 greedy tokens equal, worst relative logit diff {worst:e}");
    }

    // Batched decode (two sequences of different lengths in one step) and chunked prefill.
    let p = Pipeline::new(2);
    let other: Vec<u32> = prompt[..prompt.len() - 5].to_vec();
    let (mut a, mut b) = (p.caches(), p.caches());
    let la = p.step(&mut [(&mut a, 0, &prompt[..7])]).remove(0);
    let _ = la;
    let la = p.step(&mut [(&mut a, 7, &prompt[7..])]).remove(0);
    let (d, range) = max_diff(&la, &ref_logits[0]);
    assert!(d <= 1e-3 * range, "chunked prefill: {d} / {range}");
    let lb = p.step(&mut [(&mut b, 0, &other)]).remove(0);
    let (mut ta, mut tb) = (argmax(&la), argmax(&lb));
    // Sequential reference for `other`.
    let mut solo = p.caches();
    let mut sl = p.step(&mut [(&mut solo, 0, &other)]).remove(0);
    let (mut pa, mut pb) = (prompt.len(), other.len());
    for _ in 0..8 {
        let out = p.step(&mut [(&mut a, pa, &[ta]), (&mut b, pb, &[tb])]);
        let ts = argmax(&sl);
        assert_eq!(ts, tb);
        sl = p.step(&mut [(&mut solo, pb, &[ts])]).remove(0);
        assert_eq!(out[1], sl, "batched decode must equal single-sequence decode exactly");
        pa += 1;
        pb += 1;
        ta = argmax(&out[0]);
        tb = argmax(&out[1]);
    }
}

// ---------------------------------------------------------------------------- fused format

use candle_core::Module;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use switchyard_shard::kernel::{BlockMatrix, Isa, QActs, has_vnni, reference_matmul};
use switchyard_shard::model::WeightFormat;

/// Deterministic pseudo-random activations in [-2, 2).
fn activations(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// The kernel's instruction sets this CPU can run (the others are named as skipped).
fn isas() -> Vec<Isa> {
    let (yes, no): (Vec<Isa>, Vec<Isa>) =
        [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().partition(|i| i.available());
    if !no.is_empty() {
        eprintln!("{no:?} not available on this CPU, skipped");
    }
    yes
}

#[test]
fn fused_kernel_matches_dequantized_matmul_and_is_batch_invariant() {
    let (ct, mut file) = read_gguf(&common::model_path()).unwrap();
    let real = ct.tensor(&mut file, "blk.3.ffn_down.weight", &Device::Cpu).unwrap(); // Q4_1, 576 x 1536
    assert_eq!(real.dtype(), GgmlDType::Q4_1);
    let synth = |dtype, n, k| {
        let t = Tensor::from_vec(activations(n * k, n as u64), (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    };
    let tensors = [real, synth(GgmlDType::Q8_0, 80, 576), synth(GgmlDType::Q4_1, 48, 64)];
    for qt in &tensors {
        let b = BlockMatrix::from_qtensor(qt).unwrap().unwrap();
        let (n, k) = b.dims();
        let m = 11; // more rows than one pass of any kernel serves
        let x = activations(m * k, 7);
        let want = reference_matmul(qt, &x).unwrap();
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        for isa in isas() {
            let mut y = vec![0f32; m * n];
            b.matmul_isa(isa, &x, &mut y).unwrap();
            let d = y.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(d <= 1e-5 * scale, "{:?} {isa:?}: max |diff| {d} (scale {scale})", b.blocks());
            // Activations 4 bytes off a 64-byte boundary go through the kernel's aligned
            // copy: the same values, to the bit.
            let mut shifted = vec![0f32; m * k + 1];
            shifted[1..].copy_from_slice(&x);
            let mut y2 = vec![0f32; m * n];
            b.matmul_isa(isa, &shifted[1..], &mut y2).unwrap();
            assert_eq!(y2, y, "{isa:?}: misaligned activations changed the product");
            // Each row alone gives exactly the batched row.
            for r in [0, 5, m - 1] {
                let mut one = vec![0f32; n];
                b.matmul_isa(isa, &x[r * k..(r + 1) * k], &mut one).unwrap();
                assert_eq!(one, y[r * n..(r + 1) * n], "{isa:?}: row {r} differs when batched");
            }
        }
    }
}

/// The prompts the formats are checked on, tokenized.
fn test_prompts() -> Vec<Vec<u32>> {
    let (ct, _) = read_gguf(&common::model_path()).unwrap();
    let tok = Tokenizer::from_gguf(&ct).unwrap();
    let chat = |q: &str| format!("<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
    [
        chat("What is the capital of France?"),
        "The three primary colours are".into(),
        "fn main() {".into(),
        system_chat(),
    ]
    .iter()
    .map(|s| tok.encode(s, true))
    .collect()
}

/// A chat as the server renders it by default: SmolLM2's system prompt first (~40 tokens,
/// more rows in one prefill step than the short prompts).
fn system_chat() -> String {
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
     <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        .into()
}

/// Greedy decode of `prompt` for `steps` tokens through a pipeline: (logits, tokens).
fn greedy(p: &Pipeline, prompt: &[u32], steps: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut caches = p.caches();
    let mut logits = p.step(&mut [(&mut caches, 0, prompt)]).remove(0);
    let (mut all, mut toks, mut pos) = (Vec::new(), Vec::new(), prompt.len());
    for _ in 0..steps {
        let t = argmax(&logits);
        all.push(logits);
        toks.push(t);
        logits = p.step(&mut [(&mut caches, pos, &[t])]).remove(0);
        pos += 1;
    }
    (all, toks)
}

impl Pipeline {
    fn with_format(n: usize, fmt: WeightFormat) -> Self {
        let path = common::model_path();
        let stages = split_layers(30, n)
            .into_iter()
            .map(|r| Stage::load_with(&path, Some(r), &Device::Cpu, fmt).unwrap())
            .collect();
        Self { stages }
    }
}

/// Logits after the prompt and after each of `toks` (teacher forcing).
fn forced(p: &Pipeline, prompt: &[u32], toks: &[u32]) -> Vec<Vec<f32>> {
    let mut caches = p.caches();
    let mut out = vec![p.step(&mut [(&mut caches, 0, prompt)]).remove(0)];
    for (i, t) in toks.iter().enumerate() {
        out.push(p.step(&mut [(&mut caches, prompt.len() + i, &[*t])]).remove(0));
    }
    out
}

/// The `fused` format against the same model with candle's dequantized f32 weights (what
/// candle-transformers' quantized llama computes with CANDLE_DEQUANTIZE_ALL=1: the same math
/// up to summation order): the same greedy tokens, logits within 1e-4 of their range. Against
/// the quantized reference (which rounds activations to 8 bits) the logits, fed the same
/// tokens, stay within 5% of their range. 2 stages give exactly what 1 stage gives, and a
/// batched decode step exactly what single-sequence steps give.
#[test]
fn fused_format_tracks_the_reference() {
    const STEPS: usize = 8;
    let prompts = test_prompts();
    let fused = Pipeline::with_format(1, WeightFormat::Fused);
    let dense = Pipeline::with_format(1, WeightFormat::F32);
    for prompt in &prompts {
        let (f_logits, f_toks) = greedy(&fused, prompt, STEPS);
        let (d_logits, d_toks) = greedy(&dense, prompt, STEPS);
        assert_eq!(f_toks, d_toks, "fused vs dequantized f32: greedy tokens differ");
        let worst = (0..STEPS).map(|s| max_diff(&f_logits[s], &d_logits[s])).fold(0f32, |w, (d, r)| w.max(d / r));
        assert!(worst <= 1e-4, "fused vs dequantized f32: relative logit diff {worst}");
        let (ref_logits, ref_toks) = reference(prompt);
        let f_forced = forced(&fused, prompt, &ref_toks[..STEPS - 1]);
        let worst_ref = (0..STEPS).map(|s| max_diff(&f_forced[s], &ref_logits[s])).fold(0f32, |w, (d, r)| w.max(d / r));
        let agree = (0..STEPS).filter(|&s| argmax(&f_forced[s]) == ref_toks[s]).count();
        eprintln!(
            "fused: relative logit diff {worst:e} vs f32, {worst_ref:e} vs the quantized reference \
             (same argmax at {agree}/{STEPS} steps)"
        );
        assert!(worst_ref <= 5e-2, "fused vs quantized reference: relative logit diff {worst_ref}");
    }

    stages_and_batching_are_exact(WeightFormat::Fused, &fused, &prompts[0], &prompts[1]);
}

/// Two stages of format `fmt` give exactly what `one` (1 stage) gives, and two sequences
/// decoded in one step exactly what single-sequence steps give.
fn stages_and_batching_are_exact(fmt: WeightFormat, one: &Pipeline, a: &[u32], b: &[u32]) {
    let two = Pipeline::with_format(2, fmt);
    let (fa, _) = greedy(one, a, 3);
    let (fb, _) = greedy(one, b, 3);
    let (mut ca, mut cb) = (two.caches(), two.caches());
    let la = two.step(&mut [(&mut ca, 0, a)]).remove(0);
    let lb = two.step(&mut [(&mut cb, 0, b)]).remove(0);
    assert_eq!(la, fa[0], "{fmt}: 2 stages differ from 1");
    assert_eq!(lb, fb[0], "{fmt}: 2 stages differ from 1");
    let (mut ta, mut tb, mut pa, mut pb) = (argmax(&la), argmax(&lb), a.len(), b.len());
    for s in 1..3 {
        let out = two.step(&mut [(&mut ca, pa, &[ta]), (&mut cb, pb, &[tb])]);
        assert_eq!(out[0], fa[s], "{fmt}: batched decode differs from single-sequence decode");
        assert_eq!(out[1], fb[s], "{fmt}: batched decode differs from single-sequence decode");
        (ta, tb, pa, pb) = (argmax(&out[0]), argmax(&out[1]), pa + 1, pb + 1);
    }
}

// ------------------------------------------------------------------------- fused-q8 format

/// The tiled 8-bit kernel: every instruction set gives exactly the scalar code's numbers,
/// each row alone exactly its batched row, and the product is as close to candle's
/// dequantized f32 product as candle's own quantized kernel (which rounds the activations to
/// 8 bits too) is.
#[test]
fn q8_kernel_matches_scalar_reference_on_every_isa() {
    let (ct, mut file) = read_gguf(&common::model_path()).unwrap();
    let real = ct.tensor(&mut file, "blk.3.ffn_down.weight", &Device::Cpu).unwrap(); // Q4_1, 576 x 1536
    let head = ct.tensor(&mut file, "token_embd.weight", &Device::Cpu).unwrap(); // Q8_0, 49152 x 576
    assert_eq!((real.dtype(), head.dtype()), (GgmlDType::Q4_1, GgmlDType::Q8_0));
    let synth = |dtype, n, k| {
        let t = Tensor::from_vec(activations(n * k, n as u64), (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    };
    let tensors = [real, head, synth(GgmlDType::Q8_0, 80, 576), synth(GgmlDType::Q4_1, 48, 64)];
    for qt in tensors {
        let b = BlockMatrix::from_qtensor_tiled(&qt).unwrap().unwrap();
        assert!(b.tiled());
        let (n, k) = b.dims();
        let m = 11; // more rows than one pass of any kernel serves
        let x = activations(m * k, 7);
        let want = reference_matmul(&qt, &x).unwrap();
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let mut scalar = vec![0f32; m * n];
        b.matmul_isa(Isa::Scalar, &x, &mut scalar).unwrap();
        let rms =
            |y: &[f32]| (y.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / y.len() as f32).sqrt();
        let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
        let candle = QMatMul::from_qtensor(qt).unwrap().forward(&xt).unwrap();
        let candle: Vec<f32> = candle.flatten_all().unwrap().to_vec1().unwrap();
        let (ours, theirs) = (rms(&scalar), rms(&candle));
        eprintln!(
            "{:?} {n}x{k}: rms error {:.2e} of the scale, candle's kernel {:.2e}",
            b.blocks(),
            ours / scale,
            theirs / scale
        );
        assert!(ours <= 1.1 * theirs, "{:?}: rms error {ours}, candle's {theirs}", b.blocks());
        for isa in isas() {
            let mut y = vec![0f32; m * n];
            b.matmul_isa(isa, &x, &mut y).unwrap();
            assert!(y == scalar, "{:?} {isa:?} (vnni: {}): differs from the scalar code", b.blocks(), has_vnni());
            for r in [0, 5, m - 1] {
                let mut one = vec![0f32; n];
                b.matmul_isa(isa, &x[r * k..(r + 1) * k], &mut one).unwrap();
                assert_eq!(one, y[r * n..(r + 1) * n], "{isa:?}: row {r} differs when batched");
            }
        }
    }
}

/// Activations round as ggml's `q8_0` does: scale = max |x| / 127, values to nearest
/// (halves away from zero).
#[test]
fn q8_quantize_block_rounds_as_ggml() {
    let mut x = [0f32; 64];
    x[0] = -127.0; // max |x|: scale 1
    x[1] = 1.5; // rounds away from zero
    x[2] = -1.5;
    x[3] = 2.5; // 3, where rounding half to even would give 2
    x[4] = 0.49;
    // The second block is all zero: scale 0, values 0.
    let mut q = QActs::default();
    q.quantize_isa(Isa::Scalar, &x, 64);
    assert_eq!(q.d, [1.0, 0.0]);
    assert_eq!(&q.q[..6], &[-127, 2, -2, 3, 0, 0]);
    assert!(q.q[32..].iter().all(|&v| v == 0));
    assert_eq!(q.qs, [-127 + 2 - 2 + 3, 0]);
    assert_eq!(q.s, [(-127 + 2 - 2 + 3) as f32, 0.0]);
    // Any values, on every instruction set: as `f32::round` of `x / scale`.
    let x: Vec<f32> = activations(4096, 3).iter().enumerate().map(|(i, v)| v * (1 + i % 7) as f32).collect();
    for isa in isas() {
        q.quantize_isa(isa, &x, 4096);
        for (b, xb) in x.chunks_exact(32).enumerate() {
            let d = xb.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
            let want: Vec<i8> = xb.iter().map(|v| (v * (1.0 / d)).round() as i8).collect();
            assert_eq!((q.d[b], &q.q[b * 32..][..32]), (d, &want[..]), "{isa:?}: block {b}");
            assert_eq!(q.qs[b], want.iter().map(|&v| v as i32).sum::<i32>(), "{isa:?}: block {b}");
        }
    }
}

/// The tiled layout holds exactly the stored values: every row dequantizes as from the
/// file's own layout (the embedding lookup reads the tied head through it).
#[test]
fn q8_repacked_rows_dequantize_as_stored() {
    let (ct, mut file) = read_gguf(&common::model_path()).unwrap();
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.7.ffn_gate.weight"] {
        let qt = ct.tensor(&mut file, name, &Device::Cpu).unwrap();
        let rows = BlockMatrix::from_qtensor(&qt).unwrap().unwrap();
        let tiled = BlockMatrix::from_qtensor_tiled(&qt).unwrap().unwrap();
        let (n, k) = rows.dims();
        let (mut a, mut b) = (vec![0f32; k], vec![0f32; k]);
        for j in (0..n).step_by(7).chain([n - 1]) {
            rows.row(j, &mut a);
            tiled.row(j, &mut b);
            assert_eq!(a, b, "{name}: row {j}");
        }
    }
}

/// The `fused-q8` format rounds activations to 8 bits, as candle-transformers' quantized
/// llama does (with f32 instead of f16 scales, and other summation orders): measured against
/// the exact product of the same weights (the dequantized f32 model), fed the same tokens,
/// its logits are off by the same order as the quantized reference's (at most 1.5 times; the
/// worst step of a few is a noisy statistic), and its greedy tokens mostly agree with the
/// reference's. Stages and batching change nothing.
#[test]
fn fused_q8_format_tracks_the_reference() {
    const STEPS: usize = 8;
    let prompts = test_prompts();
    let q8 = Pipeline::with_format(1, WeightFormat::FusedQ8);
    let dense = Pipeline::with_format(1, WeightFormat::F32);
    let (mut agree_all, mut q8_err, mut ref_err) = (0, 0f32, 0f32);
    for prompt in &prompts {
        let (ref_logits, ref_toks) = reference(prompt);
        let forced_q8 = forced(&q8, prompt, &ref_toks[..STEPS - 1]);
        let forced_dense = forced(&dense, prompt, &ref_toks[..STEPS - 1]);
        let rel =
            |a: &[Vec<f32>]| (0..STEPS).map(|s| max_diff(&a[s], &forced_dense[s])).fold(0f32, |w, (d, r)| w.max(d / r));
        let (e_q8, e_ref) = (rel(&forced_q8), rel(&ref_logits));
        let agree = (0..STEPS).filter(|&s| argmax(&forced_q8[s]) == ref_toks[s]).count();
        eprintln!(
            "vs the f32 product: fused-q8 {e_q8:.2e}, quantized reference {e_ref:.2e} of the logit range \
             (fused-q8 and the reference pick the same token at {agree}/{STEPS} steps)"
        );
        (q8_err, ref_err, agree_all) = (q8_err.max(e_q8), ref_err.max(e_ref), agree_all + agree);
    }
    assert!(q8_err <= ref_err * 1.5, "fused-q8 is off the f32 product by {q8_err}, the reference by {ref_err}");
    assert!(agree_all + 2 >= STEPS * prompts.len(), "fused-q8 picks other tokens than the reference too often");
    stages_and_batching_are_exact(WeightFormat::FusedQ8, &q8, &prompts[0], &prompts[1]);
}

/// ULPs between two finite positive f32.
fn ulps(a: f32, b: f32) -> u32 {
    (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
}

#[test]
fn the_kernels_exp_is_within_two_ulp_and_the_mlp_gate_follows_it() {
    use switchyard_shard::kernel::{exp, silu_mul};
    let mut worst = (0u32, 0f32);
    let mut x = -87.0f32;
    while x <= 88.0 {
        let exact = (x as f64).exp() as f32;
        let u = ulps(exp(x), exact);
        if u > worst.0 {
            worst = (u, x);
        }
        x += 0.000_37;
    }
    assert!(worst.0 <= 2, "exp({}) is {} ulp off", worst.1, worst.0);
    assert_eq!(exp(0.0), 1.0);
    assert_eq!(exp(-1000.0), exp(-87.0), "clamped below, never a denormal or NaN");
    assert!(exp(1000.0).is_finite());
    // The gate on every instruction set and every length (vector bodies and tails alike).
    let a: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).collect();
    let b: Vec<f32> = (0..1000).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
    for n in [1, 7, 16, 33, 1000] {
        let mut y = vec![0f32; n];
        silu_mul(&a[..n], &b[..n], &mut y);
        for i in 0..n {
            let v = a[i] as f64;
            let want = (v / (1.0 + (-v).exp()) * b[i] as f64) as f32;
            assert!((y[i] - want).abs() <= want.abs() * 1e-6 + 1e-30, "silu({})·{}: {} vs {}", a[i], b[i], y[i], want);
        }
        // Element i does not depend on where it sits: batched rows equal single rows.
        let mut one = [0f32; 1];
        silu_mul(&a[n - 1..n], &b[n - 1..n], &mut one);
        assert_eq!(one[0], y[n - 1]);
    }
}
