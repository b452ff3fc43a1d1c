//! One client connection: the HTTP request head, then either an HTTP answer (the web page,
//! `/health`) or the WebSocket upgrade and the session's reader and writer.
//!
//! The reader feeds bytes through tungstenite's protocol state machine ([`Decoder`]) and
//! hands each message to the session; the writer drains the session's output queue into the
//! socket with vectored io_uring writes. They meet only in the session's output queue.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_uring::net::TcpStream;

use super::config::{Config, Pacing};
use super::core::Core;
use super::listener::Sessions;
use super::session::{Options, Session};
use super::vad;
use super::wire::{Wire, MAX_IOV};
use crate::protocol::{CloseReason, Format, ServerEvent};
use crate::ws::codec::{Decoder, Inbound};
use crate::ws::handshake::{self, Parsed};

/// Bytes read per `read` on a client socket.
const READ_BUF: usize = 4096;
/// How long a session the server closed waits for the client to close its side.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Serves one accepted connection to its end.
pub async fn serve(core: Rc<Core>, sessions: Rc<Sessions>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let shared = core.shared.clone();
    let stream = match shared.tls.current() {
        None => Wire::plain(tcp),
        Some(config) => match Wire::tls(tcp, config) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "TLS session setup failed");
                return;
            }
        },
    };
    // Read the request head, bounded in size and in time counted from accept (bytes or not),
    // so a connection that sends nothing can't hold a file descriptor. With TLS the
    // handshake runs inside these reads, under the same deadline.
    let mut head = Vec::with_capacity(1024);
    let mut buf = vec![0u8; READ_BUF];
    let deadline = super::limits::secs(shared.config.limits.head_timeout_secs);
    let parsed = tokio::time::timeout(deadline, async {
        loop {
            let (res, b) = stream.read(buf).await;
            buf = b;
            match res {
                Ok(0) => return None,
                Err(e) => {
                    if stream.is_tls() {
                        shared.metrics.tls_failure();
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    return None;
                }
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            match handshake::parse(&head) {
                Parsed::Partial => continue,
                other => return Some(other),
            }
        }
    })
    .await;
    let (req, consumed) = match parsed {
        Ok(Some(Parsed::Complete(req, len))) => (req, len),
        Ok(Some(Parsed::Invalid(reason))) => {
            let _ = stream
                .write_all(handshake::response(400, "text/plain", reason.as_bytes()))
                .await;
            return;
        }
        Ok(None) | Ok(Some(Parsed::Partial)) => return,
        Err(_) => {
            // The read still in flight holds the socket open until it completes; shutting the
            // socket down completes it, so the descriptor is freed now, not when the peer
            // finally sends something.
            shared.metrics.limited("head_timeout");
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
    };
    if !req.is_upgrade() {
        let _ = stream
            .write_all(super::admin::handle_public(&shared, &req))
            .await;
        stream.close_write().await;
        return;
    }
    let refuse = |status: u16, body: &'static str| {
        handshake::response(status, "text/plain", body.as_bytes())
    };
    let grant = match shared.auth.check(&req) {
        Ok(g) => g,
        Err(refusal) => {
            shared.metrics.auth_failure(refusal.as_str());
            tracing::info!(%peer, reason = refusal.as_str(), "upgrade refused");
            let (status, body) = refusal.response();
            let _ = stream.write_all(refuse(status, body)).await;
            return;
        }
    };
    let mut opts = match session_options(&shared.config, &req) {
        Ok(o) => o,
        Err(reason) => {
            let _ = stream
                .write_all(handshake::response(400, "text/plain", reason.as_bytes()))
                .await;
            return;
        }
    };
    if let Some(models) = &grant.models {
        if !models.contains(&opts.model) {
            shared
                .metrics
                .auth_failure(super::auth::Refusal::Model.as_str());
            let (status, body) = super::auth::Refusal::Model.response();
            let _ = stream.write_all(refuse(status, body)).await;
            return;
        }
    }
    opts.max_session = match (shared.config.max_session, grant.max_session) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let Some(ip_slot) = shared
        .per_ip
        .acquire(peer.ip(), shared.config.limits.max_connections_per_ip)
    else {
        shared.metrics.limited("connections_per_ip");
        let _ = stream
            .write_all(refuse(429, "too many sessions from this address\n"))
            .await;
        return;
    };
    // Reserve a connection slot before answering the upgrade.
    let prev = shared.connections.fetch_add(1, Ordering::AcqRel);
    if prev >= shared.config.max_connections {
        shared.connections.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.rejected_connections.inc();
        let _ = stream
            .write_all(refuse(503, "server busy; try again\n"))
            .await;
        return;
    }
    let key_str = req.ws_key.clone().unwrap_or_default();
    let res = stream.write_all(handshake::accept_response(&key_str)).await;
    if res.is_ok() {
        if let Some(sub) = &grant.subject {
            tracing::debug!(%peer, subject = ?sub, "authenticated");
        }
        run_session(&core, &sessions, stream, opts, head.split_off(consumed)).await;
    }
    drop(ip_slot);
    shared.connections.fetch_sub(1, Ordering::AcqRel);
}

/// Longest model id accepted from a client.
pub const MAX_MODEL_ID: usize = 128;

/// True for ids made of letters, digits and `-_.:/@+` (what model catalogues use): anything
/// else (control characters, spaces, quotes) is refused at the door, so it can't reach a log
/// line or a worker.
fn valid_model_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MODEL_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/@+".contains(&b))
}

fn session_options(config: &Config, req: &handshake::Request) -> Result<Options, String> {
    let format = match req.query.get("format").map(String::as_str) {
        None => config.format,
        Some("json") => Format::Json,
        Some("binary") => Format::Binary,
        Some(other) => return Err(format!("unknown format {other:?} (json or binary)\n")),
    };
    let pacing = match req.query.get("pacing").map(String::as_str) {
        None => config.pacing,
        Some("realtime") => Pacing::Realtime,
        Some("asap") => Pacing::Asap,
        Some(other) => return Err(format!("unknown pacing {other:?} (realtime or asap)\n")),
    };
    let model = match req.query.get("model") {
        Some(m) if !m.is_empty() => {
            if !valid_model_id(m) {
                return Err(format!(
                    "invalid model id: at most {MAX_MODEL_ID} letters, digits or -_.:/@+\n"
                ));
            }
            m.clone()
        }
        _ => config.model.clone(),
    };
    let input_rate = match req.query.get("input_rate") {
        None => vad::DEFAULT_INPUT_RATE,
        Some(r) => match r.parse::<u32>() {
            Ok(n) if vad::INPUT_RATES.contains(&n) => n,
            _ => {
                return Err(format!(
                    "unsupported input_rate {r:?} (one of {:?})\n",
                    vad::INPUT_RATES
                ))
            }
        },
    };
    Ok(Options {
        format,
        pacing,
        model,
        input_rate,
        max_session: config.max_session,
    })
}

fn new_session_id() -> String {
    let n: u64 = rand::random();
    format!("ws-{:012x}", n & 0xffff_ffff_ffff)
}

async fn run_session(
    core: &Rc<Core>,
    sessions: &Sessions,
    stream: Wire,
    opts: Options,
    leftover: Vec<u8>,
) {
    let shared = &core.shared;
    let stream = Rc::new(stream);
    let session = {
        let mut sessions = sessions.borrow_mut();
        let entry = sessions.vacant_entry();
        let s = Rc::new(Session::new(
            entry.key(),
            new_session_id(),
            opts,
            core.clone(),
        ));
        entry.insert(s.clone());
        s
    };
    shared.metrics.sessions_active.inc();
    shared.metrics.sessions_total.inc();
    let core_gauge = shared.metrics.core_sessions(core.index);
    core_gauge.inc();
    tracing::info!(parent: &session.span, format = session.opts.format.as_str(),
        pacing = session.opts.pacing.as_str(), model = ?session.opts.model, "session open");

    session.send_event(&ServerEvent::SessionStart {
        session_id: session.id.clone(),
        format: Some(session.opts.format),
        pacing: Some(session.opts.pacing),
        model: Some(session.opts.model.clone()),
        sample_rate: Some(crate::audio::SAMPLE_RATE),
        frame_ms: Some(crate::audio::FRAME_MS),
        protocol: Some(1),
    });
    session.output.attach_socket(stream.clone());
    let writer = tokio_uring::spawn(writer(session.clone(), stream.clone()));
    if shared.config.idle_timeout.is_some()
        || shared.config.worker_idle.is_some()
        || session.opts.max_session.is_some()
    {
        session.own_task(tokio_uring::spawn(watchdog(session.clone())));
    }

    let mut decoder = Decoder::new(shared.config.max_message_bytes, leftover);
    let mut buf = vec![0u8; READ_BUF];
    'read: loop {
        loop {
            match decoder.next_message() {
                Inbound::Message(tungstenite::Message::Text(t)) => {
                    session.on_client_text(t.as_str())
                }
                Inbound::Message(tungstenite::Message::Binary(b)) => session.on_client_binary(&b),
                Inbound::Message(_) => {}
                Inbound::NeedMore => break,
                Inbound::Closed => {
                    if let Some(reply) = decoder.take_replies() {
                        session.send(Bytes::from(reply));
                    }
                    session.output.finish();
                    break 'read;
                }
                Inbound::Violation(code, reason) => {
                    tracing::info!(parent: &session.span, code, %reason, "protocol violation");
                    session.close_with(CloseReason::from_violation(code));
                    break 'read;
                }
            }
        }
        if let Some(reply) = decoder.take_replies() {
            session.send(Bytes::from(reply));
        }
        // After the server starts a close (a limit, a drain, a timeout) the client's input is
        // still read (and dropped by the session) until the client closes too or the writer
        // ends the linger (see `writer`).
        let (res, b) = stream.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => break,
            Ok(n) => decoder.feed(&buf[..n]),
        }
    }
    let turn = super::session::close_turn().await;
    session.output.reader_done();
    session.close();
    // Let the writer flush a close frame, bounded so a stuck peer can't pin the session.
    session.output.finish();
    drop(turn);
    if tokio::time::timeout(CLOSE_LINGER + Duration::from_secs(1), writer)
        .await
        .is_err()
    {
        session.output.dead();
    }
    let _turn = super::session::close_turn().await;
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let last = {
        let mut sessions = sessions.borrow_mut();
        sessions.try_remove(session.key);
        sessions.is_empty()
    };
    shared.metrics.sessions_active.dec();
    shared
        .metrics
        .session_duration
        .observe(session.age(Instant::now()).as_secs_f64());
    core_gauge.dec();
    tracing::info!(parent: &session.span, "session closed");
    if last {
        core.trim();
    }
}

/// Drains the session's output queue into the socket with vectored writes; closes the socket
/// once the session has finished its output.
async fn writer(session: Rc<Session>, stream: Rc<Wire>) {
    let mut batch: Vec<Bytes> = Vec::with_capacity(64);
    loop {
        let done = session.output.take(&mut batch, MAX_IOV);
        if batch.is_empty() {
            if done {
                break;
            }
            session.output.ready().await;
            continue;
        }
        if let Err(e) = stream.write_batch(&mut batch).await {
            tracing::debug!(parent: &session.span, error = %e, "write failed");
            session.output.dead();
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
    // Half-close: the client reads everything (the close frame last), then closes its side,
    // which ends the reader. Closing both at once would make the kernel answer input still
    // arriving with a reset, which can destroy the `session_end` and close frame on their way
    // to the client. A client that doesn't close within CLOSE_LINGER has its input cut off
    // (SHUT_RD completes the reader's pending read).
    stream.close_write().await;
    tokio::select! {
        _ = session.output.reader_stopped() => {}
        _ = tokio::time::sleep(CLOSE_LINGER) => {
            let _ = stream.shutdown(std::net::Shutdown::Read);
        }
    }
}

/// Ends sessions that are idle or too old, and releases the worker session of one that has
/// been idle `--worker-idle-secs`.
async fn watchdog(session: Rc<Session>) {
    let config = session.config().clone();
    loop {
        let now = Instant::now();
        let mut wait = Duration::from_secs(3600);
        let idle_for = session.idle_for(now);
        if let Some(idle) = config.idle_timeout {
            if idle_for >= idle {
                session.close_with(CloseReason::IdleTimeout);
                return;
            }
            wait = wait.min(idle - idle_for);
        }
        if let Some(release) = config.worker_idle {
            if idle_for >= release {
                if session.holds_worker() {
                    session.release_idle_worker();
                }
                // Look again one period after the next utterance may have opened one.
                wait = wait.min(release);
            } else {
                wait = wait.min(release - idle_for);
            }
        }
        if let Some(max) = session.opts.max_session {
            let age = session.age(now);
            if age >= max {
                session.close_with(CloseReason::MaxDuration);
                return;
            }
            wait = wait.min(max - age);
        }
        tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
    }
}
