//! Active health checks: every endpoint is asked `GET <health path>` at an interval; a check
//! fails on a non-2xx answer, a transport error, or an answer slower than `max_latency`.
//! Consecutive results flip the endpoint's health with hysteresis.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;

use super::{Endpoint, Pool, now_ms};
use crate::config::HealthCheckConfig;
use crate::forward::UpstreamClient;

/// Spawns one checker per endpoint; they stop when `stop` flips to true.
pub fn spawn(pool: Arc<Pool>, cfg: HealthCheckConfig, client: UpstreamClient, stop: watch::Receiver<bool>) {
    if !cfg.enabled {
        return;
    }
    for ep in pool.endpoints.clone() {
        let (pool, cfg, client, mut stop) = (pool.clone(), cfg.clone(), client.clone(), stop.clone());
        tokio::spawn(async move {
            let mut passes = 0u32;
            let mut fails = 0u32;
            let mut tick = tokio::time::interval(cfg.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let ok = check(&client, &ep, &cfg).await;
                if ok {
                    ep.metrics.check_ok.inc();
                    passes += 1;
                    fails = 0;
                    if passes >= cfg.healthy_after {
                        ep.set_healthy(true);
                    }
                } else {
                    ep.metrics.check_failed.inc();
                    fails += 1;
                    passes = 0;
                    if fails >= cfg.unhealthy_after {
                        ep.set_healthy(false);
                    }
                }
                pool.refresh_gauges(now_ms());
            }
        });
    }
}

async fn check(client: &UpstreamClient, ep: &Endpoint, cfg: &HealthCheckConfig) -> bool {
    let uri = format!("{}{}", ep.url, ep.health_path.as_deref().unwrap_or(&cfg.path));
    let req = match http::Request::get(uri).body(Full::new(Bytes::new())) {
        Ok(r) => r,
        Err(_) => return false,
    };
    let started = Instant::now();
    let res = tokio::time::timeout(cfg.max_latency, async {
        let res = client.request(req).await.ok()?;
        let ok = res.status().is_success();
        // Drain the body so the connection goes back to the pool.
        res.into_body().collect().await.ok()?;
        Some(ok)
    })
    .await;
    matches!(res, Ok(Some(true))) && started.elapsed() <= cfg.max_latency
}
