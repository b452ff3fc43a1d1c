//! HTTP endpoints of the orchestrator.
//!
//! The public port (the WebSocket port) serves what browsers and load balancers need: the web
//! page, the upgrade, and a bare `/health` that says only whether this instance takes
//! sessions. Everything that tells more (worker addresses, Redis errors, metrics, drain) is on
//! the admin listener (`--admin-listen`, default the WebSocket port + 1), which a deployment
//! keeps private. The admin listener runs on its own thread with a small tokio runtime: a
//! scrape or a slow probe never runs on a core that paces audio.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::core::Shared;
use crate::ws::handshake::{self, response, Parsed, Request};

/// Answers a plain GET on the public port.
pub fn handle_public(shared: &Shared, req: &Request) -> Vec<u8> {
    if req.method != "GET" && req.method != "HEAD" {
        return response(405, "text/plain", b"only GET is supported\n");
    }
    match req.path.as_str() {
        "/health" => {
            let (ok, _) = health(shared);
            let ready = ok && !shared.is_draining();
            let body: &[u8] = if ready {
                br#"{"status":"ok"}"#
            } else {
                br#"{"status":"unavailable"}"#
            };
            response(if ready { 200 } else { 503 }, "application/json", body)
        }
        // The voices the workers offer, for the page's picker.
        "/voices" => {
            let voices = shared
                .voices
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let body = json!({ "voices": voices, "default": shared.config.model });
            response(200, "application/json", body.to_string().as_bytes())
        }
        // [speech] The web client: static files built into the binary (src/web).
        path => match crate::web::asset(path) {
            Some(asset) => response(200, asset.content_type, asset.body),
            None => response(404, "text/plain", b"not found\n"),
        },
    }
}

/// Answers one request on the admin listener.
pub fn handle_admin(shared: &Shared, req: &Request) -> Vec<u8> {
    let json = "application/json";
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/drain") => {
            shared.drain();
            response(202, json, br#"{"status":"draining"}"#)
        }
        (m, _) if m != "GET" && m != "HEAD" => {
            response(405, "text/plain", b"GET, or POST /drain\n")
        }
        (_, "/health") => {
            let (healthy, body) = health(shared);
            response(
                if healthy { 200 } else { 503 },
                json,
                body.to_string().as_bytes(),
            )
        }
        (_, "/readiness") => {
            let (healthy, _) = health(shared);
            let ready = healthy && !shared.is_draining();
            let body = json!({
                "status": if ready { "ready" } else { "not_ready" },
                "draining": shared.is_draining(),
            });
            response(
                if ready { 200 } else { 503 },
                json,
                body.to_string().as_bytes(),
            )
        }
        (_, "/liveness") => response(200, json, br#"{"status":"alive"}"#),
        (_, "/metrics") => {
            refresh_gauges(shared);
            response(
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                shared.metrics.render().as_bytes(),
            )
        }
        (_, "/metrics/summary") => response(
            200,
            json,
            shared.metrics.summary(shared).to_string().as_bytes(),
        ),
        _ => response(404, "text/plain", b"not found\n"),
    }
}

/// Healthy when at least one worker answered its last probe. With discovery, a Redis outage
/// makes the status `degraded` (still 200: the last snapshot keeps routing) as long as a
/// worker is reachable. The body carries the earlier Python system's fields too
/// (`uptime_seconds`, `checks.<name>.ok`, `redis`, `worker`) so its probes and dashboards work.
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
    // Workers kept through a registry gap (a Redis restart) still serve: count them.
    for a in shared.book.reachable_addrs() {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    let workers: Vec<_> = addrs
        .iter()
        .map(|a| json!({"addr": a, "reachable": shared.book.reachable(a)}))
        .collect();
    let reachable = addrs.iter().filter(|a| shared.book.reachable(a)).count();
    let refusing = addrs.iter().filter(|a| shared.book.refusing(a)).count();
    let healthy = reachable > 0;
    let redis = match &snapshot {
        None => json!({"status": "not_configured", "ok": true}),
        Some(s) if s.redis_ok => json!({"status": "ok", "ok": true, "workers": s.workers.len()}),
        Some(s) => json!({"status": "down", "ok": false, "error": s.error}),
    };
    let redis_down = snapshot.as_ref().is_some_and(|s| !s.redis_ok);
    // Degraded: still serving, but Redis is down or a worker refuses sessions (at capacity).
    let status = match (healthy, redis_down || refusing > 0) {
        (false, _) => "unhealthy",
        (true, true) => "degraded",
        (true, false) => "healthy",
    };
    let body = json!({
        "status": status,
        "uptime_seconds": shared.started.elapsed().as_secs_f64(),
        "draining": shared.is_draining(),
        "checks": {
            "workers": {
                "ok": healthy,
                "status": if healthy { "ok" } else { "down" },
                "reachable": reachable,
                "refusing_sessions": refusing,
                "workers": workers,
            },
            "redis": redis.clone(),
        },
        "redis": redis,
        "worker": { "ok": healthy, "reachable": reachable, "known": addrs.len() },
        "sessions_active": shared.connections.load(Ordering::Relaxed),
        "cores": shared.config.cores,
    });
    (healthy, body)
}

/// Sets the gauges that mirror state rather than count events, just before a scrape.
fn refresh_gauges(shared: &Shared) {
    let (_, h) = health(shared);
    let m = &shared.metrics;
    let n = |v: &serde_json::Value| v.as_i64().unwrap_or(0);
    m.workers_available.set(n(&h["worker"]["reachable"]));
    m.workers_known.set(n(&h["worker"]["known"]));
    if shared.discovery.is_some() {
        m.redis_up.set(i64::from(h["redis"]["ok"] == true));
    }
    m.max_connections
        .set(i64::try_from(shared.config.max_connections).unwrap_or(i64::MAX));
}

/// Longest an admin request may take to arrive.
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The admin listener's thread.
pub struct AdminServer {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl AdminServer {
    /// Serves `listener` on a new thread until [`AdminServer::stop`].
    pub fn start(listener: std::net::TcpListener, shared: Arc<Shared>) -> anyhow::Result<Self> {
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "admin listener failed");
                            return;
                        }
                    };
                    loop {
                        tokio::select! {
                            accepted = listener.accept() => match accepted {
                                Ok((stream, _)) => {
                                    tokio::spawn(serve_admin(stream, shared.clone()));
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "admin accept failed");
                                    tokio::time::sleep(Duration::from_millis(10)).await;
                                }
                            },
                            _ = &mut stopped => break,
                        }
                    }
                })
            })?;
        Ok(Self { stop, thread })
    }

    /// Stops the listener and joins its thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

async fn serve_admin(mut stream: tokio::net::TcpStream, shared: Arc<Shared>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 2048];
    let parsed = tokio::time::timeout(ADMIN_HEAD_TIMEOUT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            match handshake::parse(&head) {
                Parsed::Partial => continue,
                other => return Some(other),
            }
        }
    })
    .await;
    let reply = match parsed {
        Ok(Some(Parsed::Complete(req, _))) => handle_admin(&shared, &req),
        Ok(Some(Parsed::Invalid(reason))) => response(400, "text/plain", reason.as_bytes()),
        _ => return,
    };
    let _ = stream.write_all(&reply).await;
    let _ = stream.shutdown().await;
}
