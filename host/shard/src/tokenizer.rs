//! Byte-level BPE tokenizer built from the GGUF metadata (`tokenizer.ggml.*`).
//!
//! Why not candle's GGUF tokenizer helper: for SmolLM2 (`tokenizer.ggml.pre = "smollm"`)
//! it mis-tokenizes the first word. This is a small, self-contained GPT-2 style
//! byte-level BPE that reproduces the original Hugging Face pipeline of the model:
//!
//! 1. special tokens (GGUF token type 3 "control" or 4 "user defined", e.g. `<|im_start|>`)
//!    are matched first and become single ids;
//! 2. pre-tokenization: every numeric char is its own piece (HF `Digits(individual_digits)`),
//!    then the GPT-2 split regex
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`,
//!    hand-written as a scanner because the `regex` crate has no look-ahead;
//! 3. bytes are mapped to printable chars with the GPT-2 byte-to-unicode table and merged by
//!    merge rank (lowest rank first, leftmost on ties).
//!
//! `\p{L}` is approximated by `char::is_alphabetic() && !char::is_numeric()`; that differs from
//! the Unicode letter category only for some combining marks, which are rare in prompts.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file;

pub struct Tokenizer {
    /// id -> token string (in the byte-mapped alphabet).
    tokens: Vec<String>,
    vocab: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens, longest first, for greedy matching.
    specials: Vec<(String, u32)>,
    is_special: Vec<bool>,
    byte_to_char: [char; 256],
    char_to_byte: HashMap<char, u8>,
    /// Id of each single byte (as a mapped char) in the vocabulary; a few control bytes have
    /// none and are dropped, as Hugging Face's BPE does without an unknown token.
    byte_ids: [Option<u32>; 256],
    pub bos_id: Option<u32>,
    pub eos_id: u32,
    /// Token ids that end generation (eos plus `<|endoftext|>` where present).
    pub stop_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

/// GPT-2's reversible byte -> printable char table.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (b'!' as u32..=b'~' as u32).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            let c = char::from_u32(256 + n).unwrap();
            n += 1;
            c
        };
    }
    table
}

fn is_letter(c: char) -> bool {
    c.is_alphabetic() && !c.is_numeric()
}

/// GPT-2 pre-tokenizer regex as a scanner over `s[from..to]`; pushes byte ranges of `s`.
fn split_gpt2(s: &str, from: usize, to: usize, out: &mut Vec<(usize, usize)>) {
    let chars: Vec<(usize, char)> = s[from..to].char_indices().map(|(i, c)| (from + i, c)).collect();
    let n = chars.len();
    let pos = |i: usize| if i < n { chars[i].0 } else { to };
    let mut i = 0;
    while i < n {
        let c = chars[i].1;
        // Contractions (case-sensitive, as in GPT-2).
        if c == '\'' && i + 1 < n {
            let c1 = chars[i + 1].1;
            let c2 = if i + 2 < n { Some(chars[i + 2].1) } else { None };
            let len = match (c1, c2) {
                ('r', Some('e')) | ('v', Some('e')) | ('l', Some('l')) => 3,
                ('s' | 't' | 'm' | 'd', _) => 2,
                _ => 0,
            };
            if len > 0 {
                out.push((pos(i), pos(i + len)));
                i += len;
                continue;
            }
        }
        let j = if c == ' ' { i + 1 } else { i };
        if j < n {
            let cj = chars[j].1;
            let class: Option<fn(char) -> bool> = if is_letter(cj) {
                Some(is_letter)
            } else if cj.is_numeric() {
                Some(char::is_numeric)
            } else if !cj.is_whitespace() {
                Some(|x: char| !x.is_whitespace() && !is_letter(x) && !x.is_numeric())
            } else {
                None
            };
            if let Some(class) = class {
                let mut k = j + 1;
                while k < n && class(chars[k].1) {
                    k += 1;
                }
                out.push((pos(i), pos(k)));
                i = k;
                continue;
            }
        }
        // Whitespace run starting at i.
        let mut k = i;
        while k < n && chars[k].1.is_whitespace() {
            k += 1;
        }
        debug_assert!(k > i);
        let end = if k < n && k - i >= 2 { k - 1 } else { k };
        out.push((pos(i), pos(end)));
        i = end;
    }
}

/// Digits(individual_digits = true) followed by the GPT-2 split; byte ranges of `s`.
fn pre_tokenize(s: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, c) in s.char_indices() {
        if c.is_numeric() {
            if start < i {
                split_gpt2(s, start, i, &mut out);
            }
            start = i + c.len_utf8();
            out.push((i, start));
        }
    }
    if start < s.len() {
        split_gpt2(s, start, s.len(), &mut out);
    }
    out
}

impl Tokenizer {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let md = |k: &str| ct.metadata.get(k).with_context(|| format!("GGUF metadata has no {k}"));
        let model = md("tokenizer.ggml.model")?.to_string()?.clone();
        if model != "gpt2" {
            bail!("unsupported tokenizer model {model:?} (only byte-level BPE \"gpt2\" is supported)");
        }
        let tokens: Vec<String> = md("tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(|v| v.to_i32()).collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let merges_raw: Vec<String> = md("tokenizer.ggml.merges")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        let get_id = |k: &str| ct.metadata.get(k).and_then(|v| v.to_u32().ok());
        let eos_id = get_id("tokenizer.ggml.eos_token_id").context("GGUF metadata has no eos token id")?;
        let bos_id = get_id("tokenizer.ggml.bos_token_id");
        let chat_template = ct.metadata.get("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();

        let mut vocab = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        let mut merges = HashMap::with_capacity(merges_raw.len());
        for (rank, m) in merges_raw.iter().enumerate() {
            let (a, b) = m.split_once(' ').with_context(|| format!("bad merge {m:?}"))?;
            let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) else { continue };
            let Some(&im) = vocab.get(&format!("{a}{b}")) else { continue };
            merges.entry((ia, ib)).or_insert((rank as u32, im));
        }
        let is_special: Vec<bool> = (0..tokens.len()).map(|i| matches!(types.get(i), Some(3) | Some(4))).collect();
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .enumerate()
            .filter(|(i, t)| is_special[*i] && !t.is_empty())
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let byte_to_char = bytes_to_unicode();
        let char_to_byte = byte_to_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        let mut byte_ids = [None; 256];
        for (b, id) in byte_ids.iter_mut().enumerate() {
            *id = vocab.get(&byte_to_char[b].to_string()).copied();
        }
        let mut stop_ids = vec![eos_id];
        if let Some(&id) = vocab.get("<|endoftext|>")
            && id != eos_id
        {
            stop_ids.push(id);
        }
        Ok(Self {
            tokens,
            vocab,
            merges,
            specials,
            is_special,
            byte_to_char,
            char_to_byte,
            byte_ids,
            bos_id,
            eos_id,
            stop_ids,
            chat_template,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.vocab.get(s).copied()
    }

    pub fn is_special(&self, id: u32) -> bool {
        self.is_special.get(id as usize).copied().unwrap_or(false)
    }

    /// Encodes `text`; when `allow_special`, special-token strings in the text become their
    /// single ids (as vLLM does for rendered chat prompts and plain prompts).
    pub fn encode(&self, text: &str, allow_special: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        if !allow_special {
            self.encode_ordinary(text, &mut ids);
            return ids;
        }
        let mut rest = text;
        'outer: while !rest.is_empty() {
            // Find the earliest special token occurrence (longest on ties).
            let mut best: Option<(usize, usize, u32)> = None;
            for (s, id) in &self.specials {
                if let Some(p) = rest.find(s.as_str())
                    && best.is_none_or(|(bp, bl, _)| p < bp || (p == bp && s.len() > bl))
                {
                    best = Some((p, s.len(), *id));
                }
            }
            match best {
                Some((p, l, id)) => {
                    self.encode_ordinary(&rest[..p], &mut ids);
                    ids.push(id);
                    rest = &rest[p + l..];
                }
                None => {
                    self.encode_ordinary(rest, &mut ids);
                    break 'outer;
                }
            }
        }
        ids
    }

    fn encode_ordinary(&self, text: &str, ids: &mut Vec<u32>) {
        for (a, b) in pre_tokenize(text) {
            self.bpe(&text.as_bytes()[a..b], ids);
        }
    }

    fn bpe(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut syms: Vec<u32> = bytes.iter().filter_map(|&b| self.byte_ids[b as usize]).collect();
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = self.merges.get(&(syms[i], syms[i + 1]))
                    && best.is_none_or(|(r, _, _)| rank < r)
                {
                    best = Some((rank, i, merged));
                }
            }
            let Some((_, i, merged)) = best else { break };
            syms[i] = merged;
            syms.remove(i + 1);
        }
        out.extend_from_slice(&syms);
    }

    /// Raw bytes of one token; special tokens give their text, or nothing when skipped.
    pub fn token_bytes(&self, id: u32, skip_special: bool, out: &mut Vec<u8>) {
        let Some(tok) = self.tokens.get(id as usize) else { return };
        if self.is_special(id) {
            if !skip_special {
                out.extend_from_slice(tok.as_bytes());
            }
            return;
        }
        for c in tok.chars() {
            match self.char_to_byte.get(&c) {
                Some(&b) => out.push(b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            self.token_bytes(id, skip_special, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[doc(hidden)]
    pub fn byte_char(&self, b: u8) -> char {
        self.byte_to_char[b as usize]
    }
}

/// Incremental detokenizer for streaming: yields only complete UTF-8 text.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        tok.token_bytes(id, true, &mut self.pending);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap());
                    match e.error_len() {
                        // Incomplete sequence at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
        out
    }

    /// Whatever is left at the end of the stream.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(s: &str) -> Vec<&str> {
        pre_tokenize(s).into_iter().map(|(a, b)| &s[a..b]).collect()
    }

    #[test]
    fn gpt2_split() {
        assert_eq!(pieces("Hello world"), ["Hello", " world"]);
        assert_eq!(pieces("I'm  fine!!\n\nOk"), ["I", "'m", " ", " fine", "!!", "\n", "\n", "Ok"]);
        assert_eq!(pieces("a   b"), ["a", "  ", " b"]);
        assert_eq!(pieces("x 123y"), ["x", " ", "1", "2", "3", "y"]);
        assert_eq!(pieces("end  "), ["end", "  "]);
        assert_eq!(pieces(" \nHi"), [" ", "\n", "Hi"]);
    }
}
