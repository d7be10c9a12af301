//! Switchyard: a high-availability, OpenAI-compatible router for self-hosted LLMs.
//!
//! The request path, module by module:
//! `listener` → `router` (dispatch) → `admission` → `select` → `forward` → `outcome`,
//! with `upstream` holding endpoint state (health, breaker, ejection, retry budget),
//! `client` the pooled keep-alive connections to model servers and `metrics` the
//! Prometheus registry.
#![deny(unsafe_code)]

pub mod admission;
pub mod body;
pub mod client;
pub mod config;
pub mod degraded;
pub mod error;
pub mod forward;
pub mod geo;
pub mod listener;
pub mod metrics;
pub mod outcome;
pub mod plugin;
pub mod ratelimit;
pub mod resume;
pub mod router;
pub mod select;
pub mod supervisor;
pub mod upstream;
