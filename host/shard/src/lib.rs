//! Switchyard shard server: serves a GGUF llama model (default SmolLM2-135M-Instruct) with
//! candle, as one process or as a pipeline of processes that each own a contiguous layer
//! range. See `README` section in `main.rs` docs and ARCHITECTURE.md.

pub mod engine;
pub mod fetch;
pub mod kernel;
pub mod metrics;
pub mod model;
pub mod server;
pub mod spawn;
pub mod stage;
pub mod tokenizer;
pub mod wire;
