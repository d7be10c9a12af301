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
