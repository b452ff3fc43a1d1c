//! Connections from one core to its TTS workers.
//!
//! Each core keeps its own HTTP/2 connection per worker (sessions multiplex streams on it),
//! so no lock or cross-thread wake-up sits between a session and its worker. The gRPC
//! transport is a plain `tokio::net::TcpStream` driven by `h2` inside the core's runtime: a
//! few long-lived connections don't need io_uring, and this module is the one place to change
//! if that choice changes.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::grpc::tts::TtsClient;
use crate::grpc::{ClientOptions, RequestSink, ResponseStream, Status};
use crate::proto;

/// How long a worker that just failed is skipped when choosing one for a new utterance.
const FAILURE_BACKOFF: Duration = Duration::from_secs(2);
/// Deadline of the small unary calls (session setup, control); a worker slower than this is
/// treated as unavailable rather than letting a client wait.
pub const UNARY_TIMEOUT: Duration = Duration::from_secs(2);

/// Process-wide reachability of each configured worker, read by `/health`.
pub struct WorkerHealth {
    pub addr: String,
    pub reachable: AtomicBool,
}

/// One worker as seen from one core.
struct Target {
    addr: String,
    client: RefCell<Option<TtsClient>>,
    failed_at: Cell<Option<Instant>>,
    health: Arc<WorkerHealth>,
}

/// The core's worker connections.
pub struct Upstream {
    targets: Vec<Target>,
    next: Cell<usize>,
    options: ClientOptions,
}

impl Upstream {
    pub fn new(health: &[Arc<WorkerHealth>]) -> Self {
        Self {
            targets: health
                .iter()
                .map(|h| Target {
                    addr: h.addr.clone(),
                    client: RefCell::new(None),
                    failed_at: Cell::new(None),
                    health: h.clone(),
                })
                .collect(),
            next: Cell::new(0),
            options: ClientOptions::default(),
        }
    }

    /// Number of configured workers.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// True when no worker is configured.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Address of worker `i`.
    pub fn addr(&self, i: usize) -> &str {
        self.targets.get(i).map_or("?", |t| t.addr.as_str())
    }

    /// Chooses a worker for a new session: round robin over those that have not failed
    /// recently (all of them if every one has).
    pub fn pick(&self) -> Option<usize> {
        let n = self.targets.len();
        if n == 0 {
            return None;
        }
        let start = self.next.get();
        self.next.set((start + 1) % n);
        let now = Instant::now();
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| {
                self.targets[i]
                    .failed_at
                    .get()
                    .is_none_or(|t| now.duration_since(t) > FAILURE_BACKOFF)
            })
            .or(Some(start % n))
    }

    /// The live connection to worker `i`, connecting if there is none.
    pub async fn client(&self, i: usize) -> Result<TtsClient, Status> {
        let target = self
            .targets
            .get(i)
            .ok_or_else(|| Status::unavailable("no such worker"))?;
        if let Some(c) = target.client.borrow().as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        match TtsClient::connect(&target.addr, &self.options).await {
            Ok(c) => {
                *target.client.borrow_mut() = Some(c.clone());
                target.failed_at.set(None);
                target.health.reachable.store(true, Ordering::Relaxed);
                Ok(c)
            }
            Err(e) => {
                self.mark_failed(i);
                Err(e)
            }
        }
    }

    /// Records that worker `i` failed: new sessions avoid it for a while and its connection
    /// is rebuilt on next use.
    pub fn mark_failed(&self, i: usize) {
        if let Some(t) = self.targets.get(i) {
            t.failed_at.set(Some(Instant::now()));
            t.health.reachable.store(false, Ordering::Relaxed);
            if t.client.borrow().as_ref().is_some_and(|c| c.is_closed()) {
                t.client.borrow_mut().take();
            }
        }
    }

    /// Records a successful probe of worker `i`.
    pub fn mark_ok(&self, i: usize) {
        if let Some(t) = self.targets.get(i) {
            t.failed_at.set(None);
            t.health.reachable.store(true, Ordering::Relaxed);
        }
    }
}

/// Registers the session on the worker (required before Synthesize).
pub async fn start_session(client: &TtsClient, session_id: &str, model: &str) -> Result<(), Status> {
    let req = proto::StartSessionRequest {
        session_id: session_id.to_string(),
        model_id: model.to_string(),
        options: Default::default(),
    };
    let resp = client.start_session(&req, Some(UNARY_TIMEOUT)).await?;
    if resp.success {
        Ok(())
    } else {
        Err(Status::unavailable(format!(
            "worker refused the session: {}",
            resp.message
        )))
    }
}

/// Opens the bidirectional synthesis stream.
pub async fn synthesize(
    client: &TtsClient,
) -> Result<
    (
        RequestSink<proto::TextChunk>,
        ResponseStream<proto::AudioFrame>,
    ),
    Status,
> {
    client.synthesize(None).await
}

/// Sends a playback command for the session's current synthesis.
pub async fn control(
    client: &TtsClient,
    session_id: &str,
    command: proto::ControlCommand,
) -> Result<(), Status> {
    let req = proto::ControlRequest {
        session_id: session_id.to_string(),
        command: command as i32,
    };
    client.control(&req, Some(UNARY_TIMEOUT)).await?;
    Ok(())
}

/// Releases the session on the worker.
pub async fn end_session(client: &TtsClient, session_id: &str) -> Result<(), Status> {
    let req = proto::EndSessionRequest {
        session_id: session_id.to_string(),
    };
    client.end_session(&req, Some(UNARY_TIMEOUT)).await?;
    Ok(())
}

/// Liveness probe (GetCapabilities answers at once on a healthy worker).
pub async fn probe(client: &TtsClient) -> Result<(), Status> {
    client.get_capabilities(Some(Duration::from_secs(1))).await?;
    Ok(())
}
