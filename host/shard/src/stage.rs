//! A downstream pipeline stage process (`switchyard-shard stage`): owns layers `[a, b)` (and
//! the output head when `b` is the last layer) and serves [`crate::wire`] frames.
//!
//! Connections are served on their own threads and share one model and one KV cache table;
//! a `Hello` (a head (re)connecting) drops every cache. A connection that never says `Hello`
//! (a supervisor's TCP probe) changes nothing.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

use crate::engine::sample_with;
use crate::model::{Chunk, SeqCache, Stage};
use crate::wire::{Msg, PROTOCOL_VERSION, SampleSpec, read_msg, write_msg};

struct State {
    stage: Stage,
    caches: HashMap<u64, SeqCache>,
    model_bytes: u64,
}

pub fn serve(stage: Stage, model_bytes: u64, listener: TcpListener) -> Result<()> {
    let state = Arc::new(Mutex::new(State { stage, caches: HashMap::new(), model_bytes }));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("stage: accept failed: {e}");
                continue;
            }
        };
        let state = state.clone();
        std::thread::spawn(move || {
            let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            if let Err(e) = handle(conn, &state) {
                eprintln!("stage: connection {peer} ended: {e:#}");
            }
        });
    }
    Ok(())
}

fn handle(conn: TcpStream, state: &Mutex<State>) -> Result<()> {
    conn.set_nodelay(true)?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = BufWriter::new(conn);
    while let Some(msg) = read_msg(&mut r)? {
        let reply = match msg {
            Msg::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    Msg::Error { message: format!("protocol version {version} unsupported (want {PROTOCOL_VERSION})") }
                } else {
                    let mut st = state.lock().unwrap();
                    st.caches.clear();
                    let s = &st.stage;
                    Msg::HelloAck {
                        start: s.layers.start as u32,
                        end: s.layers.end as u32,
                        n_layers: s.cfg.n_layers as u32,
                        hidden: s.cfg.hidden as u32,
                        vocab: s.cfg.vocab_size as u32,
                        model_bytes: st.model_bytes,
                    }
                }
            }
            Msg::Forward { release, chunks, rows, cols, data, sample } => {
                let mut st = state.lock().unwrap();
                for s in release {
                    st.caches.remove(&s);
                }
                match forward(&mut st, &chunks, rows as usize, cols as usize, data, &sample) {
                    Ok(m) => m,
                    Err(e) => Msg::Error { message: format!("{e:#}") },
                }
            }
            Msg::Release { seqs } => {
                let mut st = state.lock().unwrap();
                for s in seqs {
                    st.caches.remove(&s);
                }
                Msg::Ack
            }
            Msg::Ping => Msg::Ack,
            other => Msg::Error { message: format!("unexpected frame {other:?}") },
        };
        write_msg(&mut w, &reply)?;
    }
    Ok(())
}

fn forward(
    st: &mut State,
    chunks: &[crate::wire::ChunkHdr],
    rows: usize,
    cols: usize,
    data: Vec<f32>,
    sample: &[Option<SampleSpec>],
) -> Result<Msg> {
    let State { stage, caches, .. } = st;
    if cols != stage.cfg.hidden {
        bail!("hidden size {cols} does not match the model's {}", stage.cfg.hidden);
    }
    if !sample.is_empty() && (!stage.is_tail() || sample.len() != chunks.len()) {
        bail!(
            "sampling asked of a stage that {}",
            if stage.is_tail() { "got a different number of chunks" } else { "is not the tail" }
        );
    }
    // Take the caches out of the table so that several can be borrowed mutably at once.
    let mut taken: Vec<(u64, SeqCache)> = Vec::with_capacity(chunks.len());
    for c in chunks {
        if taken.iter().any(|(s, _)| *s == c.seq) {
            bail!("sequence {} appears twice in one step", c.seq);
        }
        let cache =
            if c.pos == 0 { stage.new_cache() } else { caches.remove(&c.seq).unwrap_or_else(|| stage.new_cache()) };
        taken.push((c.seq, cache));
    }
    let result = (|| -> Result<Msg> {
        let x = Tensor::from_vec(data, (rows, cols), &stage.device)?;
        let mut cs: Vec<Chunk> = taken
            .iter_mut()
            .zip(chunks)
            .map(|((_, cache), h)| Chunk { cache, pos: h.pos as usize, len: h.len as usize })
            .collect();
        let y = stage.forward(&x, &mut cs).context("stage forward")?;
        let y = if stage.is_tail() {
            let lens: Vec<usize> = chunks.iter().map(|c| c.len as usize).collect();
            stage.logits(&y, &lens)?
        } else {
            y
        };
        if !sample.is_empty() {
            // The tail picks the tokens: one id per chunk goes back instead of its logits.
            let logits = y.to_vec2::<f32>()?;
            let ids = logits.iter().zip(sample).map(|(row, spec)| spec.map_or(u32::MAX, |p| sample_with(row, &p)));
            return Ok(Msg::Tokens { ids: ids.collect() });
        }
        let (r, c) = y.dims2()?;
        let data = y.flatten_all()?.to_vec1::<f32>()?;
        Ok(Msg::Output { rows: r as u32, cols: c as u32, data })
    })();
    if result.is_ok() {
        for (seq, cache) in taken {
            caches.insert(seq, cache);
        }
    }
    result
}
