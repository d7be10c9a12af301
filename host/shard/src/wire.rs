//! Activation transport between pipeline stages: length-prefixed binary frames over TCP.
//!
//! Topology is a star driven by the head: the head sends a step's hidden states to stage 1,
//! gets stage 1's output back, sends it to stage 2, and so on. The head sends the tail, with
//! the hidden states, how to pick each chunk's next token (temperature, top-p and the
//! uniform draw from the request's RNG, which stays in the head); the tail applies its
//! final norm and output head, samples, and answers with one token id per chunk instead of
//! a 196 KB row of logits. Sampling is the same function on the same inputs wherever it
//! runs, so a token does not depend on the number of stages. The extra loopback hop per
//! stage (576 floats per token) is small next to the layers' compute, and it keeps every
//! stage a plain server that a supervisor can start, stop and restart in any order.
//!
//! Frame: `u32 len` (little-endian, bytes after this field) `u8 kind` payload.
//! All integers little-endian; f32 arrays are raw little-endian floats.

use std::io::{self, Read, Write};

use anyhow::{Result, bail};

/// 2: `Forward` carries sampling instructions for the tail, which answers `Tokens`.
pub const PROTOCOL_VERSION: u32 = 2;
/// Refuse frames larger than this (a corrupt length would otherwise allocate wildly).
const MAX_FRAME: usize = 1 << 30;

#[derive(Debug, Clone, PartialEq)]
pub struct ChunkHdr {
    pub seq: u64,
    pub pos: u32,
    pub len: u32,
}

/// How the tail picks one chunk's next token (see `engine::sample_with`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSpec {
    pub temperature: f32,
    pub top_p: f32,
    /// The uniform draw in [0, 1) the sampler uses (unused when greedy).
    pub u: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    /// head -> stage: start of a session; the stage drops every KV cache it holds.
    Hello {
        version: u32,
    },
    /// stage -> head
    HelloAck {
        start: u32,
        end: u32,
        n_layers: u32,
        hidden: u32,
        vocab: u32,
        model_bytes: u64,
    },
    /// head -> stage: free these sequences, then run `chunks` (rows of `data` in order).
    /// `sample` is empty for an inner stage; for the tail it has one entry per chunk (`None`:
    /// the chunk ends inside its prompt, no token wanted) and the tail answers `Tokens`.
    Forward {
        release: Vec<u64>,
        chunks: Vec<ChunkHdr>,
        rows: u32,
        cols: u32,
        data: Vec<f32>,
        sample: Vec<Option<SampleSpec>>,
    },
    /// tail -> head: the token picked for each chunk (`u32::MAX` where none was wanted).
    Tokens {
        ids: Vec<u32>,
    },
    /// stage -> head: hidden states (inner stage) or logits (tail), `rows x cols`.
    Output {
        rows: u32,
        cols: u32,
        data: Vec<f32>,
    },
    Release {
        seqs: Vec<u64>,
    },
    Ping,
    Ack,
    Error {
        message: String,
    },
}

struct W(Vec<u8>);
impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn f32(&mut self, v: f32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn f32s(&mut self, v: &[f32]) {
        // A tail's logits are ~200 KB a step: one copy, not an append per value.
        let at = self.0.len();
        self.0.resize(at + v.len() * 4, 0);
        for (o, x) in self.0[at..].chunks_exact_mut(4).zip(v) {
            o.copy_from_slice(&x.to_le_bytes());
        }
    }
}

struct R<'a>(&'a [u8]);
impl R<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            bail!("truncated frame");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn f32(&mut self) -> Result<f32> {
        Ok(f32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn f32s(&mut self, n: usize) -> Result<Vec<f32>> {
        let b = self.take(n.checked_mul(4).ok_or_else(|| anyhow::anyhow!("bad length"))?)?;
        let mut out = vec![0f32; n];
        for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(out)
    }
    fn u64s(&mut self) -> Result<Vec<u64>> {
        let n = self.u32()? as usize;
        (0..n).map(|_| self.u64()).collect()
    }
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W(vec![0, 0, 0, 0]);
        match self {
            Msg::Hello { version } => {
                w.u8(1);
                w.u32(*version);
            }
            Msg::HelloAck { start, end, n_layers, hidden, vocab, model_bytes } => {
                w.u8(2);
                for v in [*start, *end, *n_layers, *hidden, *vocab] {
                    w.u32(v);
                }
                w.u64(*model_bytes);
            }
            Msg::Forward { release, chunks, rows, cols, data, sample } => {
                w.u8(3);
                w.u32(release.len() as u32);
                for s in release {
                    w.u64(*s);
                }
                w.u32(chunks.len() as u32);
                for c in chunks {
                    w.u64(c.seq);
                    w.u32(c.pos);
                    w.u32(c.len);
                }
                w.u32(*rows);
                w.u32(*cols);
                w.f32s(data);
                w.u32(sample.len() as u32);
                for spec in sample {
                    match spec {
                        None => w.u8(0),
                        Some(SampleSpec { temperature, top_p, u }) => {
                            w.u8(1);
                            w.f32(*temperature);
                            w.f32(*top_p);
                            w.f64(*u);
                        }
                    }
                }
            }
            Msg::Tokens { ids } => {
                w.u8(9);
                w.u32(ids.len() as u32);
                for id in ids {
                    w.u32(*id);
                }
            }
            Msg::Output { rows, cols, data } => {
                w.u8(4);
                w.u32(*rows);
                w.u32(*cols);
                w.f32s(data);
            }
            Msg::Release { seqs } => {
                w.u8(5);
                w.u32(seqs.len() as u32);
                for s in seqs {
                    w.u64(*s);
                }
            }
            Msg::Ping => w.u8(6),
            Msg::Ack => w.u8(7),
            Msg::Error { message } => {
                w.u8(8);
                w.0.extend_from_slice(message.as_bytes());
            }
        }
        let len = (w.0.len() - 4) as u32;
        w.0[..4].copy_from_slice(&len.to_le_bytes());
        w.0
    }

    pub fn decode(body: &[u8]) -> Result<Msg> {
        let mut r = R(body);
        let m = match r.u8()? {
            1 => Msg::Hello { version: r.u32()? },
            2 => Msg::HelloAck {
                start: r.u32()?,
                end: r.u32()?,
                n_layers: r.u32()?,
                hidden: r.u32()?,
                vocab: r.u32()?,
                model_bytes: r.u64()?,
            },
            3 => {
                let release = r.u64s()?;
                let n = r.u32()? as usize;
                let chunks = (0..n)
                    .map(|_| Ok(ChunkHdr { seq: r.u64()?, pos: r.u32()?, len: r.u32()? }))
                    .collect::<Result<Vec<_>>>()?;
                let rows = r.u32()?;
                let cols = r.u32()?;
                let data = r.f32s(rows as usize * cols as usize)?;
                let n = r.u32()? as usize;
                let sample = (0..n)
                    .map(|_| {
                        Ok(match r.u8()? {
                            0 => None,
                            1 => Some(SampleSpec { temperature: r.f32()?, top_p: r.f32()?, u: r.f64()? }),
                            k => bail!("bad sample tag {k}"),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Msg::Forward { release, chunks, rows, cols, data, sample }
            }
            9 => {
                let n = r.u32()? as usize;
                Msg::Tokens { ids: (0..n).map(|_| r.u32()).collect::<Result<Vec<_>>>()? }
            }
            4 => {
                let rows = r.u32()?;
                let cols = r.u32()?;
                let data = r.f32s(rows as usize * cols as usize)?;
                Msg::Output { rows, cols, data }
            }
            5 => Msg::Release { seqs: r.u64s()? },
            6 => Msg::Ping,
            7 => Msg::Ack,
            8 => Msg::Error { message: String::from_utf8_lossy(r.0).into_owned() },
            k => bail!("unknown frame kind {k}"),
        };
        Ok(m)
    }
}

pub fn write_msg(w: &mut impl Write, m: &Msg) -> io::Result<()> {
    w.write_all(&m.encode())?;
    w.flush()
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
pub fn read_msg(r: &mut impl Read) -> Result<Option<Msg>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        bail!("bad frame length {len}");
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(Some(Msg::decode(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let msgs = [
            Msg::Hello { version: 1 },
            Msg::HelloAck { start: 3, end: 9, n_layers: 30, hidden: 576, vocab: 49152, model_bytes: 123 },
            Msg::Forward {
                release: vec![7, 8],
                chunks: vec![ChunkHdr { seq: 1, pos: 0, len: 2 }],
                rows: 2,
                cols: 2,
                data: vec![1.0, -2.5, 3.25, f32::MIN],
                sample: vec![],
            },
            Msg::Forward {
                release: vec![],
                chunks: vec![ChunkHdr { seq: 1, pos: 4, len: 1 }, ChunkHdr { seq: 2, pos: 0, len: 1 }],
                rows: 2,
                cols: 1,
                data: vec![0.5, 0.75],
                sample: vec![Some(SampleSpec { temperature: 0.7, top_p: 0.9, u: 0.123456789 }), None],
            },
            Msg::Tokens { ids: vec![17, u32::MAX] },
            Msg::Output { rows: 1, cols: 3, data: vec![0.5, 0.25, 0.125] },
            Msg::Release { seqs: vec![42] },
            Msg::Ping,
            Msg::Ack,
            Msg::Error { message: "boom".into() },
        ];
        for m in msgs {
            let bytes = m.encode();
            let got = read_msg(&mut &bytes[..]).unwrap().unwrap();
            assert_eq!(got, m);
        }
        assert!(read_msg(&mut &[][..]).unwrap().is_none());
    }
}
