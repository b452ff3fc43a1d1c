//! Connections from one core to its TTS workers.
//!
//! Each core keeps its own HTTP/2 connection per worker (sessions multiplex streams on it),
//! so no lock or cross-thread wake-up sits between a session and its worker. The gRPC
//! transport is a plain `tokio::net::TcpStream` driven by `h2` inside the core's runtime: a
//! few long-lived connections don't need io_uring, and this module is the one place to change
//! if that choice changes.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::grpc::tts::{AudioPayload, TtsClient};
use crate::grpc::{ClientOptions, RequestSink, ResponseStream, Status};
use crate::proto;
use crate::registry::{choose, Candidate, Discovery, WorkerRecord};

/// How long a worker that vanished from the registry but still answers its probes keeps
/// getting sessions: a worker re-registers within a heartbeat (TTL/3, 10 s by default) after
/// Redis restarts empty.
const VANISH_GRACE: Duration = Duration::from_secs(15);

/// Connect attempts per [`Upstream::client`] call before the worker counts as failed.
const CONNECT_ATTEMPTS: u32 = 3;

/// How long a worker that just failed is skipped when choosing one for a new utterance.
const FAILURE_BACKOFF: Duration = Duration::from_secs(2);
/// Deadline of the small unary calls (session setup, control); a worker slower than this is
/// treated as unavailable rather than letting a client wait.
pub const UNARY_TIMEOUT: Duration = Duration::from_secs(2);

/// Process-wide reachability of one worker, read by `/health` and by every core's choice.
pub struct WorkerHealth {
    pub addr: String,
    pub reachable: AtomicBool,
    /// The worker refused a session since its last good probe (at capacity).
    pub refusing: AtomicBool,
}

/// Reachability of every worker this process has heard of, by `host:port`. Touched when a
/// worker first appears and by `/health`, never per frame.
#[derive(Default)]
pub struct HealthBook {
    workers: Mutex<HashMap<String, Arc<WorkerHealth>>>,
}

impl HealthBook {
    /// The health cell of `addr`, created (unreachable until proven otherwise) if new.
    pub fn get(&self, addr: &str) -> Arc<WorkerHealth> {
        let mut map = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(addr.to_string())
            .or_insert_with(|| {
                Arc::new(WorkerHealth {
                    addr: addr.to_string(),
                    reachable: AtomicBool::new(false),
                    refusing: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// Whether `addr` refused a session since its last good probe.
    pub fn refusing(&self, addr: &str) -> bool {
        let map = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        map.get(addr)
            .is_some_and(|h| h.refusing.load(Ordering::Relaxed))
    }

    /// Addresses of the workers that answered their last probe (and were not dropped since).
    pub fn reachable_addrs(&self) -> Vec<String> {
        let map = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        map.values()
            .filter(|h| h.reachable.load(Ordering::Relaxed))
            .map(|h| h.addr.clone())
            .collect()
    }

    /// Whether `addr` answered its last probe.
    pub fn reachable(&self, addr: &str) -> bool {
        let map = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        map.get(addr)
            .is_some_and(|h| h.reachable.load(Ordering::Relaxed))
    }
}

/// One worker as seen from one core.
struct Target {
    addr: String,
    client: RefCell<Option<TtsClient>>,
    failed_at: Cell<Option<Instant>>,
    health: Arc<WorkerHealth>,
    /// Static (`--worker`) or present in the latest registry snapshot; unlisted targets keep
    /// serving the sessions already on them but get no new ones.
    listed: Cell<bool>,
    is_static: bool,
    /// The worker's registry record (models, languages, load), if discovered.
    record: RefCell<Option<Rc<WorkerRecord>>>,
    /// Sessions of this core using the worker (part of its load).
    in_flight: Cell<u32>,
    /// Held while one task connects, so a burst of sessions makes one connection, not one
    /// each (the others wait here, then use it).
    connecting: Rc<tokio::sync::Mutex<()>>,
    /// When a discovered worker last left the registry while still answering its probes.
    vanished_at: Cell<Option<Instant>>,
}

/// The core's worker connections.
pub struct Upstream {
    /// Indexes are stable for the process lifetime (sessions hold them); never removed.
    targets: RefCell<Vec<Target>>,
    discovery: Option<Arc<Discovery>>,
    book: Arc<HealthBook>,
    seen_version: Cell<u64>,
    options: ClientOptions,
    picks: Cell<u64>,
    /// How long a worker that left the registry but answers its probes stays listed.
    vanish_grace: Duration,
    /// Worker sessions to end (worker, session id), sent by one task a batch at a time
    /// (see [`Upstream::queue_end_session`]).
    ending: RefCell<VecDeque<(usize, String)>>,
    /// The task sending `ending` runs.
    ending_sender: Cell<bool>,
}

impl Upstream {
    /// `statics`: `--worker` addresses; `discovery`: the process's registry reader, if any.
    pub fn new(
        statics: &[String],
        discovery: Option<Arc<Discovery>>,
        book: Arc<HealthBook>,
        authorization: Option<crate::grpc::tts::WorkerAuth>,
        tls: Option<Arc<rustls::ClientConfig>>,
        ping_timeout: Duration,
    ) -> Self {
        let up = Self {
            targets: RefCell::new(Vec::new()),
            discovery,
            book,
            seen_version: Cell::new(0),
            options: ClientOptions {
                authorization,
                tls,
                keepalive_timeout: ping_timeout,
                ..ClientOptions::default()
            },
            picks: Cell::new(0),
            vanish_grace: VANISH_GRACE,
            ending: RefCell::new(VecDeque::new()),
            ending_sender: Cell::new(false),
        };
        for addr in statics {
            up.add_target(addr, true);
        }
        up
    }

    fn add_target(&self, addr: &str, is_static: bool) -> usize {
        let mut targets = self.targets.borrow_mut();
        targets.push(Target {
            addr: addr.to_string(),
            client: RefCell::new(None),
            failed_at: Cell::new(None),
            health: self.book.get(addr),
            listed: Cell::new(true),
            is_static,
            record: RefCell::new(None),
            in_flight: Cell::new(0),
            connecting: Rc::new(tokio::sync::Mutex::new(())),
            vanished_at: Cell::new(None),
        });
        targets.len() - 1
    }

    /// Applies a new registry snapshot, if there is one: new workers become targets, vanished
    /// ones stop getting new sessions, records (models, load) are refreshed.
    pub fn sync(&self) {
        let Some(discovery) = &self.discovery else {
            return;
        };
        let snap = discovery.snapshot();
        if snap.version != self.seen_version.get() {
            self.seen_version.set(snap.version);
            let mut present = Vec::with_capacity(snap.workers.len());
            for rec in &snap.workers {
                let Some(addr) = rec.authority() else {
                    continue;
                };
                let existing = self.targets.borrow().iter().position(|t| t.addr == addr);
                let i = existing.unwrap_or_else(|| {
                    tracing::info!(worker = %rec.name, %addr, "discovered worker");
                    self.add_target(addr, false)
                });
                *self.targets.borrow()[i].record.borrow_mut() = Some(Rc::new(rec.clone()));
                present.push(i);
            }
            let now = Instant::now();
            for (i, t) in self.targets.borrow().iter().enumerate() {
                if t.is_static || present.contains(&i) {
                    t.vanished_at.set(None);
                    t.listed.set(true);
                } else if t.listed.get() && t.vanished_at.get().is_none() {
                    // Gone from the registry. A worker that still answers its probes most
                    // likely lost its record with a Redis restart and re-registers within
                    // seconds: keep it for a grace period instead of refusing sessions.
                    if t.health.reachable.load(Ordering::Relaxed) {
                        tracing::info!(addr = %t.addr, "worker left the registry but answers; keeping it for the grace period");
                        t.vanished_at.set(Some(now));
                    } else {
                        tracing::info!(addr = %t.addr, "worker left the registry");
                        t.listed.set(false);
                        t.health.reachable.store(false, Ordering::Relaxed);
                    }
                }
            }
        }
        let now = Instant::now();
        for t in self.targets.borrow().iter() {
            if let Some(at) = t.vanished_at.get() {
                let reachable = t.health.reachable.load(Ordering::Relaxed);
                if !reachable || now.duration_since(at) >= self.vanish_grace {
                    tracing::info!(addr = %t.addr, "worker left the registry");
                    t.vanished_at.set(None);
                    t.listed.set(false);
                    t.health.reachable.store(false, Ordering::Relaxed);
                }
            }
        }
    }

    /// Number of targets ever known to this core.
    pub fn len(&self) -> usize {
        self.targets.borrow().len()
    }

    /// True when no worker is known.
    pub fn is_empty(&self) -> bool {
        self.targets.borrow().is_empty()
    }

    /// Address of worker `i`.
    pub fn addr(&self, i: usize) -> String {
        self.targets
            .borrow()
            .get(i)
            .map_or_else(|| "?".to_string(), |t| t.addr.clone())
    }

    /// Whether worker `i` is currently listed (static or in the registry).
    pub fn is_listed(&self, i: usize) -> bool {
        self.targets.borrow().get(i).is_some_and(|t| t.listed.get())
    }

    /// Chooses a worker for a new session (and counts the session against it): healthy
    /// first, the requested model resident first, then the less loaded of two random
    /// choices (registry `queue_depth` + this core's sessions on it). When none looks
    /// healthy it still tries a listed one, so a restarted worker is found without waiting
    /// for a probe.
    pub fn pick(&self, model: &str) -> Option<usize> {
        self.sync();
        let targets = self.targets.borrow();
        let now = Instant::now();
        let listed: Vec<usize> = (0..targets.len())
            .filter(|&i| targets[i].listed.get())
            .collect();
        if listed.is_empty() {
            return None;
        }
        let records: Vec<_> = listed
            .iter()
            .map(|&i| targets[i].record.borrow().clone())
            .collect();
        let candidates: Vec<Candidate<'_>> = listed
            .iter()
            .zip(&records)
            .map(|(&i, rec)| {
                let t = &targets[i];
                let recently_failed = t
                    .failed_at
                    .get()
                    .is_some_and(|f| now.duration_since(f) < FAILURE_BACKOFF);
                let healthy = !recently_failed && t.health.reachable.load(Ordering::Relaxed);
                match rec {
                    Some(r) => Candidate::from_record(r.as_ref(), healthy, t.in_flight.get()),
                    None => Candidate::from_static(&t.addr, healthy, t.in_flight.get()),
                }
            })
            .collect();
        let n = self.picks.get().wrapping_add(1);
        self.picks.set(n);
        let seed = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ rand::random::<u64>();
        let chosen = choose(&candidates, Some(model), None, seed)
            .map(|c| listed[c])
            .unwrap_or_else(|| listed[(n as usize) % listed.len()]);
        let t = &targets[chosen];
        t.in_flight.set(t.in_flight.get() + 1);
        Some(chosen)
    }

    /// A session stopped using worker `i`.
    pub fn release(&self, i: usize) {
        if let Some(t) = self.targets.borrow().get(i) {
            t.in_flight.set(t.in_flight.get().saturating_sub(1));
        }
    }

    /// The live connection to worker `i`, connecting if there is none.
    ///
    /// Single-flight: one connect at a time per (core, worker); sessions arriving meanwhile
    /// wait for it and share the result. A failed connect is retried (jittered backoff)
    /// within `CONNECT_ATTEMPTS` before the worker counts as failed, so a burst on a busy
    /// machine is not turned into a wall of WORKER_UNAVAILABLE by one slow handshake.
    pub async fn client(&self, i: usize) -> Result<TtsClient, Status> {
        if let Some(c) = self.live_client(i)? {
            return Ok(c);
        }
        let lock = {
            let targets = self.targets.borrow();
            let target = targets
                .get(i)
                .ok_or_else(|| Status::unavailable("no such worker"))?;
            target.connecting.clone()
        };
        let _guard = lock.lock().await;
        // Whoever held the lock may have connected meanwhile.
        if let Some(c) = self.live_client(i)? {
            return Ok(c);
        }
        let addr = self.addr(i);
        let mut last = Status::unavailable("not connected");
        for attempt in 0..CONNECT_ATTEMPTS {
            if attempt > 0 {
                let base = 25u64 << attempt;
                let jitter = rand::random::<u64>() % base;
                tokio::time::sleep(Duration::from_millis(base + jitter)).await;
            }
            match TtsClient::connect(&addr, &self.options).await {
                Ok(c) => {
                    if let Some(t) = self.targets.borrow().get(i) {
                        *t.client.borrow_mut() = Some(c.clone());
                    }
                    return Ok(c);
                }
                Err(e) => last = e,
            }
        }
        self.mark_failed(i);
        Err(last)
    }

    /// The open connection to worker `i`, if it has one.
    fn live_client(&self, i: usize) -> Result<Option<TtsClient>, Status> {
        let targets = self.targets.borrow();
        let target = targets
            .get(i)
            .ok_or_else(|| Status::unavailable("no such worker"))?;
        let client = target.client.borrow();
        Ok(client.as_ref().filter(|c| !c.is_closed()).cloned())
    }

    /// Records that worker `i` failed: new sessions avoid it for a while and its connection
    /// is rebuilt on next use.
    pub fn mark_failed(&self, i: usize) {
        if let Some(t) = self.targets.borrow().get(i) {
            t.failed_at.set(Some(Instant::now()));
            t.health.reachable.store(false, Ordering::Relaxed);
            if t.client.borrow().as_ref().is_some_and(|c| c.is_closed()) {
                t.client.borrow_mut().take();
            }
        }
    }

    /// True when worker `i` failed within the last `FAILURE_BACKOFF`.
    pub fn recently_failed(&self, i: usize) -> bool {
        let now = Instant::now();
        self.targets.borrow().get(i).is_some_and(|t| {
            t.failed_at
                .get()
                .is_some_and(|f| now.duration_since(f) < FAILURE_BACKOFF)
        })
    }

    /// Records that worker `i` refused a session (at capacity): new sessions avoid it for a
    /// while and `/health` says degraded.
    pub fn mark_refusing(&self, i: usize) {
        if let Some(t) = self.targets.borrow().get(i) {
            t.failed_at.set(Some(Instant::now()));
            t.health.refusing.store(true, Ordering::Relaxed);
        }
    }

    /// Records that worker `i` opened a session (it has capacity again).
    pub fn mark_accepting(&self, i: usize) {
        if let Some(t) = self.targets.borrow().get(i) {
            t.health.refusing.store(false, Ordering::Relaxed);
        }
    }

    /// Queues an EndSession call for session `id` on worker `worker`. Returns true when the
    /// caller must start the task that sends them ([`Upstream::next_end_batch`] in a loop).
    ///
    /// Why a queue: thousands of clients closing at once (a load balancer restart, a mass
    /// disconnect) each ended their worker session with a call of their own, all started in
    /// the same loop turn; the core then spent a long stretch on HTTP/2 work for them, and a
    /// session still playing on the core heard a 100 ms gap. One task sending a bounded batch
    /// at a time keeps that work in slices the pacer can run between.
    pub fn queue_end_session(&self, worker: usize, id: String) -> bool {
        self.ending.borrow_mut().push_back((worker, id));
        !self.ending_sender.replace(true)
    }

    /// Up to `max` queued EndSession calls; empty when none is left, and then the sending
    /// task must end (the next [`Upstream::queue_end_session`] starts a new one).
    pub fn next_end_batch(&self, max: usize) -> Vec<(usize, String)> {
        let mut q = self.ending.borrow_mut();
        let n = q.len().min(max);
        let batch: Vec<_> = q.drain(..n).collect();
        if batch.is_empty() {
            self.ending_sender.set(false);
        }
        batch
    }

    /// Records a successful probe of worker `i`.
    pub fn mark_ok(&self, i: usize) {
        if let Some(t) = self.targets.borrow().get(i) {
            t.failed_at.set(None);
            t.health.reachable.store(true, Ordering::Relaxed);
        }
    }
}

/// Why StartSession did not open a session.
#[derive(Debug)]
pub enum StartError {
    /// The worker does not offer the model (`success:false`, "unknown model ...").
    UnknownModel,
    /// The worker refused (at capacity, draining): try another later.
    Refused(String),
    /// The call failed (connection, deadline).
    Failed(Status),
}

/// Registers the session on the worker (required before Synthesize).
pub async fn start_session(
    client: &TtsClient,
    session_id: &str,
    model: &str,
) -> Result<(), StartError> {
    let req = proto::StartSessionRequest {
        session_id: session_id.to_string(),
        model_id: model.to_string(),
        options: Default::default(),
    };
    let resp = client
        .start_session(&req, Some(UNARY_TIMEOUT))
        .await
        .map_err(|e| match e.code {
            crate::grpc::Code::NotFound => StartError::UnknownModel,
            _ => StartError::Failed(e),
        })?;
    if resp.success {
        Ok(())
    } else if resp.message.starts_with("unknown model") || resp.message.starts_with("model id of") {
        Err(StartError::UnknownModel)
    } else {
        Err(StartError::Refused(resp.message))
    }
}

/// Opens the bidirectional synthesis stream.
pub async fn synthesize(
    client: &TtsClient,
) -> Result<(RequestSink<proto::TextChunk>, ResponseStream<AudioPayload>), Status> {
    client.synthesize_audio(None).await
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

/// The model ids a worker lists (empty when it doesn't answer in time).
pub async fn models(client: &TtsClient) -> Vec<String> {
    match client.list_models(Some(Duration::from_secs(1))).await {
        Ok(r) => r.models.into_iter().map(|m| m.model_id).collect(),
        Err(_) => Vec::new(),
    }
}

/// `grpc.health.v1.HealthCheckRequest` (the standard health service's wire message).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    pub service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HealthCheckResponse {
    /// 1 = SERVING, 2 = NOT_SERVING (draining), 0 = UNKNOWN.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const SERVING: i32 = 1;

/// Probes a worker: the standard `grpc.health.v1` Check (a draining worker answers
/// NOT_SERVING and gets no new sessions), falling back to GetCapabilities for workers without
/// the health service (the earlier Python worker).
pub async fn probe(client: &TtsClient) -> Result<(), Status> {
    let timeout = Some(Duration::from_secs(1));
    let req = HealthCheckRequest {
        service: String::new(),
    };
    match client
        .client()
        .unary::<_, HealthCheckResponse>(HEALTH_CHECK, &req, timeout)
        .await
    {
        Ok(r) if r.status == SERVING => Ok(()),
        Ok(r) => Err(Status::unavailable(format!(
            "worker health status {} (not serving)",
            r.status
        ))),
        Err(e) if e.code == crate::grpc::Code::Unimplemented => {
            client.get_capabilities(timeout).await?;
            Ok(())
        }
        Err(e) => Err(e),
    }
}
