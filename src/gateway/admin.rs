//! Admin endpoints served on the WebSocket port (a GET without `Upgrade`): health probes for
//! load balancers and orchestration, Prometheus metrics, and the web client ([`crate::web`]).

use std::sync::atomic::Ordering;

use serde_json::json;

use super::core::Shared;
use crate::ws::handshake::{response, Request};

/// Answers one admin request with a complete HTTP response.
pub fn handle(shared: &Shared, req: &Request) -> Vec<u8> {
    if req.method != "GET" && req.method != "HEAD" {
        return response(405, "text/plain", b"only GET is supported\n");
    }
    match req.path.as_str() {
        "/health" | "/readiness" => {
            let (healthy, body) = health(shared);
            response(
                if healthy { 200 } else { 503 },
                "application/json",
                body.to_string().as_bytes(),
            )
        }
        "/liveness" => response(200, "application/json", br#"{"status":"alive"}"#),
        "/metrics" => response(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.render().as_bytes(),
        ),
        // [speech] The web client: static files built into the binary (src/web).
        path => match crate::web::asset(path) {
            Some(asset) => response(200, asset.content_type, asset.body),
            None => response(404, "text/plain", b"not found\n"),
        },
    }
}

/// Healthy when at least one worker answered its last probe. With discovery, a Redis outage
/// makes the status `degraded` (still 200: the last snapshot keeps routing) as long as a
/// worker is reachable.
fn health(shared: &Shared) -> (bool, serde_json::Value) {
    let mut addrs: Vec<String> = shared.config.workers.clone();
    let snapshot = shared.discovery.as_ref().map(|d| d.snapshot());
    if let Some(snap) = &snapshot {
        for rec in &snap.workers {
            if let Some(a) = rec.authority() {
                if !addrs.iter().any(|x| x == a) {
                    addrs.push(a.to_string());
                }
            }
        }
    }
    let workers: Vec<_> = addrs
        .iter()
        .map(|a| json!({"addr": a, "reachable": shared.book.reachable(a)}))
        .collect();
    let healthy = addrs.iter().any(|a| shared.book.reachable(a));
    let redis = match &snapshot {
        None => json!({"status": "not_configured"}),
        Some(s) if s.redis_ok => json!({"status": "ok", "workers": s.workers.len()}),
        Some(s) => json!({"status": "down", "error": s.error}),
    };
    let redis_down = snapshot.as_ref().is_some_and(|s| !s.redis_ok);
    let status = match (healthy, redis_down) {
        (false, _) => "unhealthy",
        (true, true) => "degraded",
        (true, false) => "healthy",
    };
    let body = json!({
        "status": status,
        "checks": {
            "workers": { "status": if healthy { "ok" } else { "down" }, "workers": workers },
            "redis": redis,
        },
        "sessions_active": shared.connections.load(Ordering::Relaxed),
        "cores": shared.config.cores,
    });
    (healthy, body)
}
