//! `tts.TTSService`: the eight RPCs of the worker, served by tonic ([`Grpc`] implements the
//! generated trait on top of [`TtsService`], which holds the logic and is testable without a
//! network).
//!
//! Unary RPCs answer from in-memory state without awaiting anything, so Control and the
//! GetCapabilities liveness probe answer immediately even when every synthesis is busy. The
//! exceptions are LoadModel and a StartSession whose model is not resident yet: they wait
//! for the model's warm-up (tens of milliseconds for espeak-ng), never under a lock.
//!
//! Every session operation takes the caller's connection ([`ConnId`], see
//! [`super::session`]): what one connection opened, no other connection can touch or see.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status, Streaming};

use super::espeak::Espeak;
use super::metrics::WorkerMetrics;
use super::mock::MockTiming;
use super::models::{ManagerConfig, ModelError, ModelManager};
use super::server::ConnectionInfo;
use super::session::{ConnId, SessionRegistry, StartError};
use super::stream::{RequestStream, StreamTracker, SynthesisStream};
use super::synthesis::{self, SynthesisContext};
use crate::proto::tts_service_server::TtsService as TtsServiceRpc;
use crate::proto::{
    Capabilities, ControlCommand, ControlRequest, ControlResponse, EndSessionRequest,
    EndSessionResponse, GetCapabilitiesRequest, GetCapabilitiesResponse, ListModelsRequest,
    ListModelsResponse, LoadModelRequest, LoadModelResponse, StartSessionRequest,
    StartSessionResponse, TextChunk, UnloadModelRequest, UnloadModelResponse,
};

/// Default time a session may sit with no Synthesize open before it expires.
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(60);

/// Worker settings the service needs (from `WorkerArgs`).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Mock model timing.
    pub timing: MockTiming,
    /// StartSession refuses sessions beyond this.
    pub max_sessions: usize,
    /// Default model, preloads, TTL, resident cap.
    pub models: ManagerConfig,
    /// The espeak-ng installation, if there is one (else the worker is mock-only).
    pub espeak: Option<Arc<Espeak>>,
    /// Sessions with no Synthesize open for this long expire.
    pub session_idle: Duration,
    /// `--allow-model-management`: LoadModel / UnloadModel are served (else PERMISSION_DENIED).
    pub allow_model_management: bool,
}

impl ServiceConfig {
    /// Defaults for tests: mock only, default limits.
    pub fn mock(max_sessions: usize) -> ServiceConfig {
        ServiceConfig {
            timing: MockTiming::default(),
            max_sessions,
            models: ManagerConfig::default(),
            espeak: None,
            session_idle: DEFAULT_SESSION_IDLE,
            allow_model_management: false,
        }
    }
}

/// The TTS worker's service state: sessions, models, metrics, drain.
#[derive(Debug)]
pub struct TtsService {
    config: ServiceConfig,
    sessions: Arc<SessionRegistry>,
    models: ModelManager,
    metrics: WorkerMetrics,
    streams: StreamTracker,
    draining: AtomicBool,
}

impl TtsService {
    /// A worker with no sessions and the default model (and `--preload` models) resident.
    /// Fails when one of those cannot be loaded.
    pub async fn start(config: ServiceConfig) -> Result<TtsService, ModelError> {
        let models = ModelManager::new(config.models.clone(), config.espeak.clone());
        models.start().await?;
        Ok(TtsService {
            sessions: Arc::new(SessionRegistry::new(config.max_sessions)),
            models,
            metrics: WorkerMetrics::default(),
            streams: StreamTracker::default(),
            draining: AtomicBool::new(false),
            config,
        })
    }

    /// The model manager (for the eviction task and tests).
    pub fn models(&self) -> &ModelManager {
        &self.models
    }

    /// Open Synthesize calls (the drain waits for them).
    pub fn streams(&self) -> &StreamTracker {
        &self.streams
    }

    /// From now on StartSession and new Synthesize calls are refused with UNAVAILABLE; open
    /// calls go on. Irreversible: a draining worker is on its way out.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// True once [`TtsService::begin_drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Runs, until the service is dropped, the periodic clean-ups: evicting idle models
    /// (every quarter model TTL) and expiring idle sessions (every quarter idle time). Call
    /// once, inside the worker's runtime.
    pub fn spawn_maintenance(self: &Arc<Self>) {
        if let Some(every) = self.models.eviction_interval() {
            self.every(every, |s| {
                s.models.evict_idle(Instant::now());
            });
        }
        let every = (self.config.session_idle / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(10));
        self.every(every, |s| {
            s.expire_idle_sessions(Instant::now());
        });
    }

    fn every(self: &Arc<Self>, period: Duration, f: impl Fn(&TtsService) + Send + 'static) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(service) = weak.upgrade() else { break };
                f(&service);
            }
        });
    }

    /// Ends the sessions idle for `--session-idle-secs` at `now`; returns how many.
    pub fn expire_idle_sessions(&self, now: Instant) -> usize {
        let models = self.sessions.expire_idle(now, self.config.session_idle);
        for m in &models {
            self.models.release(m);
        }
        if !models.is_empty() {
            tracing::info!(sessions = models.len(), "idle sessions expired");
        }
        models.len()
    }

    /// Ends every session of a connection that closed.
    pub fn end_connection(&self, conn: ConnId) {
        let models = self.sessions.end_connection(conn);
        for m in &models {
            self.models.release(m);
        }
        if !models.is_empty() {
            tracing::debug!(
                conn,
                sessions = models.len(),
                "connection closed: sessions ended"
            );
        }
    }

    /// StartSession: takes a reference on the session's model (loading it if needed) and
    /// registers the session for connection `conn`, or `success: false` with the reason
    /// (unknown model, capacity, bad id). UNAVAILABLE while draining: the caller should pick
    /// another worker, which a `success: false` would not say.
    pub async fn start_session(
        &self,
        conn: ConnId,
        req: StartSessionRequest,
    ) -> Result<StartSessionResponse, Status> {
        if self.is_draining() {
            return Err(Status::unavailable(
                "worker is draining (shutting down): start the session on another worker",
            ));
        }
        let refuse = |message: String| {
            Ok(StartSessionResponse {
                success: false,
                message,
            })
        };
        if let Err(e) = StartError::check(&req.session_id, &req.options) {
            return refuse(e.to_string());
        }
        let model = match self.models.acquire(&req.model_id).await {
            Ok(m) => m,
            Err(e) => return refuse(e.to_string()),
        };
        let family = self.models.engine_for(&model).map_or("?", |e| e.family());
        match self
            .sessions
            .start(conn, &req.session_id, &model, req.options)
        {
            Ok(previous) => {
                if let Some(previous) = previous {
                    self.models.release(&previous);
                }
                Ok(StartSessionResponse {
                    success: true,
                    message: format!(
                        "session {} started with {model} ({family} engine)",
                        req.session_id
                    ),
                })
            }
            Err(e) => {
                self.models.release(&model);
                refuse(e.to_string())
            }
        }
    }

    /// EndSession: always `success: true` (ending an unknown session, or one of another
    /// connection, is not an error: the caller's goal, no such session of its own, holds).
    /// Releases the session's model.
    pub fn end_session(&self, conn: ConnId, req: EndSessionRequest) -> EndSessionResponse {
        if let Some(model) = self.sessions.end(conn, &req.session_id) {
            self.models.release(&model);
        }
        EndSessionResponse { success: true }
    }

    /// Control: applies to the current synthesis of the caller's session; answers at once.
    pub fn control(&self, conn: ConnId, req: ControlRequest) -> ControlResponse {
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        match ControlCommand::try_from(req.command) {
            Ok(command) => ControlResponse {
                success: true,
                message: self.sessions.control(conn, &req.session_id, command),
                timestamp_ms,
            },
            Err(_) => ControlResponse {
                success: false,
                message: format!("unknown control command {}", req.command),
                timestamp_ms,
            },
        }
    }

    fn check_model_management(&self, rpc: &str) -> Result<(), Status> {
        if self.config.allow_model_management {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{rpc} is disabled on this worker: start it with --allow-model-management \
                 to let clients load and unload models"
            )))
        }
    }

    /// LoadModel, when model management is allowed (PERMISSION_DENIED otherwise: loading
    /// evicts other models and spawns processes, not something any client may do).
    pub async fn load_model(&self, req: LoadModelRequest) -> Result<LoadModelResponse, Status> {
        self.check_model_management("LoadModel")?;
        Ok(self.models.load(&req.model_id, req.preload_only).await)
    }

    /// UnloadModel, when model management is allowed (PERMISSION_DENIED otherwise).
    pub fn unload_model(&self, req: UnloadModelRequest) -> Result<UnloadModelResponse, Status> {
        self.check_model_management("UnloadModel")?;
        Ok(self.models.unload(&req.model_id))
    }

    /// ListModels: the fixed catalogue.
    pub fn list_models(&self) -> ListModelsResponse {
        ListModelsResponse {
            models: self.models.list(),
        }
    }

    /// GetCapabilities: static capabilities plus live metrics.
    pub fn capabilities(&self) -> GetCapabilitiesResponse {
        GetCapabilitiesResponse {
            capabilities: Some(Capabilities {
                streaming: true,
                zero_shot: false,
                lora: false,
                cpu_ok: true,
                languages: self.models.languages(),
                emotive_zero_prompt: false,
                max_concurrent_sessions: i32::try_from(self.config.max_sessions)
                    .unwrap_or(i32::MAX),
            }),
            resident_models: self.models.resident(),
            metrics: {
                let mut m = self
                    .metrics
                    .snapshot(self.sessions.len(), self.config.max_sessions);
                m.extend(self.models.metrics().map(|(k, v)| (k.to_owned(), v)));
                m
            },
        }
    }

    fn synthesis_context(&self) -> SynthesisContext<'_> {
        SynthesisContext {
            sessions: &self.sessions,
            metrics: &self.metrics,
            models: &self.models,
            timing: self.config.timing,
        }
    }

    /// Synthesize: validates the call in the handler (errors are plain statuses), then
    /// returns the stream that runs it (see [`super::stream`]).
    pub async fn synthesize(
        self: &Arc<Self>,
        conn: ConnId,
        requests: RequestStream,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<SynthesisStream, Status> {
        let open = self.streams.open();
        if self.is_draining() {
            return Err(Status::unavailable(
                "worker is draining (shutting down): synthesise on another worker",
            ));
        }
        let mut requests = requests;
        let prepared = synthesis::prepare(&self.synthesis_context(), conn, &mut requests).await?;
        let service = self.clone();
        Ok(SynthesisStream::new(
            move |responses| {
                Box::pin(async move {
                    synthesis::run(service.synthesis_context(), prepared, requests, responses).await
                })
            },
            deadline,
            open,
        ))
    }
}

/// The tonic face of [`TtsService`].
#[derive(Debug, Clone)]
pub struct Grpc(pub Arc<TtsService>);

/// The connection a request came on (set by the worker's accept loop, see
/// [`super::server`]). A request without one (never the case when served by
/// [`super::server::serve`]) counts as connection 0.
fn conn_of<T>(request: &Request<T>) -> ConnId {
    let ext = request.extensions();
    ext.get::<ConnectionInfo>()
        .or_else(|| {
            // Over TLS tonic wraps the accept loop's info.
            ext.get::<tonic::transport::server::TlsConnectInfo<ConnectionInfo>>()
                .map(|t| t.get_ref())
        })
        .map_or(0, |c| c.id)
}

/// The client's deadline from `grpc-timeout`, if it sent a valid one.
fn deadline_of<T>(request: &Request<T>) -> Option<tokio::time::Instant> {
    let value = request
        .metadata()
        .get(crate::grpc::timeout::GRPC_TIMEOUT)?
        .to_str()
        .ok()?;
    let timeout = crate::grpc::timeout::parse(value).ok()?;
    tokio::time::Instant::now().checked_add(timeout)
}

#[tonic::async_trait]
impl TtsServiceRpc for Grpc {
    async fn start_session(
        &self,
        request: Request<StartSessionRequest>,
    ) -> Result<Response<StartSessionResponse>, Status> {
        let conn = conn_of(&request);
        self.0
            .start_session(conn, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn end_session(
        &self,
        request: Request<EndSessionRequest>,
    ) -> Result<Response<EndSessionResponse>, Status> {
        let conn = conn_of(&request);
        Ok(Response::new(
            self.0.end_session(conn, request.into_inner()),
        ))
    }

    type SynthesizeStream = SynthesisStream;

    async fn synthesize(
        &self,
        request: Request<Streaming<TextChunk>>,
    ) -> Result<Response<SynthesisStream>, Status> {
        let conn = conn_of(&request);
        let deadline = deadline_of(&request);
        let requests = RequestStream::new(request.into_inner());
        self.0
            .synthesize(conn, requests, deadline)
            .await
            .map(Response::new)
    }

    async fn control(
        &self,
        request: Request<ControlRequest>,
    ) -> Result<Response<ControlResponse>, Status> {
        let conn = conn_of(&request);
        Ok(Response::new(self.0.control(conn, request.into_inner())))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(self.0.list_models()))
    }

    async fn load_model(
        &self,
        request: Request<LoadModelRequest>,
    ) -> Result<Response<LoadModelResponse>, Status> {
        self.0
            .load_model(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn unload_model(
        &self,
        request: Request<UnloadModelRequest>,
    ) -> Result<Response<UnloadModelResponse>, Status> {
        self.0.unload_model(request.into_inner()).map(Response::new)
    }

    async fn get_capabilities(
        &self,
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        Ok(Response::new(self.0.capabilities()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::collections::HashMap;

    const C: ConnId = 7;

    async fn service_with(config: ServiceConfig) -> Arc<TtsService> {
        Arc::new(TtsService::start(config).await.unwrap())
    }

    async fn service(max: usize) -> Arc<TtsService> {
        service_with(ServiceConfig::mock(max)).await
    }

    async fn start_with(s: &TtsService, id: &str, model: &str) -> StartSessionResponse {
        s.start_session(
            C,
            StartSessionRequest {
                session_id: id.into(),
                model_id: model.into(),
                options: HashMap::new(),
            },
        )
        .await
        .unwrap()
    }

    async fn start(s: &TtsService, id: &str) -> StartSessionResponse {
        start_with(s, id, "mock-440hz").await
    }

    fn end(s: &TtsService, id: &str) -> bool {
        s.end_session(
            C,
            EndSessionRequest {
                session_id: id.into(),
            },
        )
        .success
    }

    fn chunks(items: Vec<TextChunk>) -> RequestStream {
        RequestStream::new(futures_util::stream::iter(items.into_iter().map(Ok)))
    }

    fn chunk(session: &str, text: &str) -> TextChunk {
        TextChunk {
            session_id: session.into(),
            text: text.into(),
            is_final: true,
            sequence_number: 1,
        }
    }

    #[tokio::test]
    async fn sessions_beyond_the_limit_are_refused_with_a_message() {
        let s = service(1).await;
        assert!(start(&s, "a").await.success);
        let r = start(&s, "b").await;
        assert!(!r.success);
        assert!(r.message.contains("capacity"), "{}", r.message);
        assert_eq!(s.capabilities().metrics["queue_depth"], 1.0);
        assert!(end(&s, "zzz"));
    }

    #[tokio::test]
    async fn sessions_hold_a_reference_on_their_model() {
        let s = service(10).await;
        assert!(start_with(&s, "a", "mock-x").await.success);
        assert!(start_with(&s, "b", "mock-y").await.success);
        assert_eq!(s.models().refs("mock-440hz"), 2, "two aliases, one model");
        end(&s, "a");
        end(&s, "a");
        assert_eq!(
            s.models().refs("mock-440hz"),
            1,
            "a second EndSession releases nothing"
        );
        let r = start_with(&s, "c", "espeak-en-us").await;
        assert!(!r.success);
        assert!(r.message.contains("espeak-ng"), "{}", r.message);
        assert!(!start_with(&s, "", "mock-x").await.success);
        assert_eq!(
            s.models().refs("mock-440hz"),
            1,
            "a refused start holds nothing"
        );
    }

    #[tokio::test]
    async fn unknown_and_oversized_models_are_refused_and_never_listed() {
        let s = service(30).await;
        let r = start_with(&s, "a", "made-up-voice").await;
        assert!(!r.success);
        assert!(r.message.starts_with("unknown model"), "{}", r.message);
        let r = start_with(&s, "a", &"m".repeat(129)).await;
        assert!(!r.success);
        assert!(r.message.contains("at most 128 bytes"), "{}", r.message);
        for i in 0..20 {
            assert!(
                start_with(&s, &format!("s{i}"), &format!("mock-{i}"))
                    .await
                    .success
            );
        }
        assert_eq!(s.list_models().models.len(), 1);
        assert_eq!(s.capabilities().resident_models, vec!["mock-440hz"]);
        assert_eq!(s.capabilities().metrics["queue_depth"], 20.0);
    }

    #[tokio::test]
    async fn model_management_needs_the_flag() {
        let s = service(10).await;
        let e = s
            .load_model(LoadModelRequest {
                model_id: "mock-440hz".into(),
                preload_only: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("--allow-model-management"));
        let e = s
            .unload_model(UnloadModelRequest {
                model_id: "mock-440hz".into(),
            })
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let s = service_with(ServiceConfig {
            allow_model_management: true,
            ..ServiceConfig::mock(10)
        })
        .await;
        let r = s
            .load_model(LoadModelRequest {
                model_id: "mock-440hz".into(),
                preload_only: false,
            })
            .await
            .unwrap();
        assert!(r.success, "{}", r.message);
    }

    #[tokio::test]
    async fn control_answers_success_for_unknown_sessions_with_a_timestamp() {
        let s = service(10).await;
        let r = s.control(
            C,
            ControlRequest {
                session_id: "nobody".into(),
                command: ControlCommand::Stop as i32,
            },
        );
        assert!(r.success);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((now_ms - r.timestamp_ms).abs() < 60_000);
        let bad = s.control(
            C,
            ControlRequest {
                session_id: "nobody".into(),
                command: 42,
            },
        );
        assert!(!bad.success);
    }

    #[tokio::test]
    async fn capabilities_report_config_and_models() {
        let s = service(7).await;
        let c = s.capabilities();
        let caps = c.capabilities.unwrap();
        assert!(caps.streaming && caps.cpu_ok);
        assert_eq!(caps.languages, vec!["en".to_owned()]);
        assert_eq!(caps.max_concurrent_sessions, 7);
        assert_eq!(c.resident_models, vec!["mock-440hz".to_owned()]);
        assert!(c.metrics.contains_key("rtf"));
        assert!(c.metrics.contains_key("queue_depth"));
        assert_eq!(c.metrics["resident_models"], 1.0);
    }

    #[tokio::test]
    async fn closed_connections_and_idle_sessions_release_everything() {
        let s = service_with(ServiceConfig {
            session_idle: Duration::from_secs(60),
            ..ServiceConfig::mock(10)
        })
        .await;
        assert!(start(&s, "a").await.success);
        assert!(start(&s, "b").await.success);
        assert_eq!(s.models().refs("mock-440hz"), 2);
        s.end_connection(C);
        assert_eq!(s.capabilities().metrics["queue_depth"], 0.0);
        assert_eq!(s.models().refs("mock-440hz"), 0);
        assert!(start(&s, "c").await.success);
        assert_eq!(s.expire_idle_sessions(Instant::now()), 0);
        let later = Instant::now() + Duration::from_secs(61);
        assert_eq!(s.expire_idle_sessions(later), 1);
        assert_eq!(s.models().refs("mock-440hz"), 0);
    }

    #[tokio::test]
    async fn synthesis_only_on_sessions_of_the_same_connection() {
        let s = service(10).await;
        assert!(start(&s, "a").await.success);
        let e = s
            .synthesize(C + 1, chunks(vec![chunk("a", "hi")]), None)
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let stream = s
            .synthesize(C, chunks(vec![chunk("a", "hi")]), None)
            .await
            .unwrap();
        let frames: Vec<_> = stream.collect().await;
        assert_eq!(frames.len(), 25);
        assert!(frames.iter().all(|f| f.is_ok()));
        assert_eq!(s.streams().count(), 0);
    }

    #[tokio::test]
    async fn empty_text_still_ends_with_one_final_frame() {
        let s = service(10).await;
        assert!(start(&s, "a").await.success);
        for text in ["", "   ", "..."] {
            let frames: Vec<_> = s
                .synthesize(C, chunks(vec![chunk("a", text)]), None)
                .await
                .unwrap()
                .collect()
                .await;
            let last = frames.last().unwrap().as_ref().unwrap();
            assert!(last.is_final, "{text:?}");
        }
    }

    #[tokio::test]
    async fn draining_refuses_new_sessions_and_calls_with_unavailable() {
        let s = service(10).await;
        assert!(start(&s, "a").await.success);
        s.begin_drain();
        let e = s
            .start_session(
                C,
                StartSessionRequest {
                    session_id: "b".into(),
                    ..StartSessionRequest::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        let e = s
            .synthesize(C, chunks(vec![chunk("a", "hi")]), None)
            .await
            .err()
            .unwrap();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert_eq!(s.streams().count(), 0);
    }
}
