//! End-to-end tests: the real `switchyard` binary, real sockets, scripted upstreams.
//! One test binary, one file per concern.

mod admission;
mod api;
mod balancing;
mod breaker;
mod canary;
mod cli;
mod failover;
mod fallback;
mod geo;
mod health;
mod local;
mod plugins;
mod shutdown;
mod streaming;
mod tls;
