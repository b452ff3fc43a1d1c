//! Admin endpoints served on the WebSocket port (a GET without `Upgrade`): health probes for
//! load balancers and orchestration, Prometheus metrics, and the web client ([`crate::web`]).

use std::sync::atomic::Ordering;

use serde_json::json;

use crate::runtime::Shared;
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

/// Healthy when at least one worker answered its last probe.
fn health(shared: &Shared) -> (bool, serde_json::Value) {
    let workers: Vec<_> = shared
        .workers
        .iter()
        .map(|w| json!({"addr": w.addr, "reachable": w.reachable.load(Ordering::Relaxed)}))
        .collect();
    let healthy = shared
        .workers
        .iter()
        .any(|w| w.reachable.load(Ordering::Relaxed));
    let body = json!({
        "status": if healthy { "healthy" } else { "unhealthy" },
        "checks": {
            "workers": { "status": if healthy { "ok" } else { "down" }, "workers": workers },
            "redis": { "status": "not_configured" },
        },
        "sessions_active": shared.connections.load(Ordering::Relaxed),
        "cores": shared.config.cores,
    });
    (healthy, body)
}
