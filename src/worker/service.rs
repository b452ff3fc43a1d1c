//! `tts.TTSService`: the eight RPCs of the worker, on top of the generic gRPC server.
//!
//! Unary RPCs answer from in-memory state without awaiting anything, so Control and the
//! GetCapabilities liveness probe answer immediately even when every synthesis is busy. The
//! exceptions are LoadModel and a StartSession whose model is not resident yet: they wait
//! for the model's warm-up (tens of milliseconds for espeak-ng), never under a lock.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::espeak::Espeak;
use super::metrics::WorkerMetrics;
use super::mock::MockTiming;
use super::models::{ManagerConfig, ModelError, ModelManager};
use super::session::SessionRegistry;
use super::synthesis::{self, SynthesisContext};
use crate::grpc::codec::decode;
use crate::grpc::server::reply;
use crate::grpc::tts::path;
use crate::grpc::{MethodKind, RequestStream, ResponseSender, Service, Status};
use crate::proto::{
    Capabilities, ControlCommand, ControlRequest, ControlResponse, EndSessionRequest,
    EndSessionResponse, GetCapabilitiesResponse, ListModelsResponse, LoadModelRequest,
    StartSessionRequest, StartSessionResponse, UnloadModelRequest,
};

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
}

/// The TTS worker's gRPC service: sessions, models, metrics.
#[derive(Debug)]
pub struct TtsService {
    config: ServiceConfig,
    sessions: Arc<SessionRegistry>,
    models: ModelManager,
    metrics: WorkerMetrics,
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
            config,
        })
    }

    /// The model manager (for the eviction task and tests).
    pub fn models(&self) -> &ModelManager {
        &self.models
    }

    /// Evicts idle models every quarter TTL until the service is dropped. Call once, inside
    /// the worker's runtime.
    pub fn spawn_eviction(self: &Arc<Self>) {
        let Some(every) = self.models.eviction_interval() else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(service) = weak.upgrade() else { break };
                service.models.evict_idle(std::time::Instant::now());
            }
        });
    }

    /// StartSession: takes a reference on the session's model (loading it if needed) and
    /// registers the session, or `success: false` with the reason.
    pub async fn start_session(&self, req: StartSessionRequest) -> StartSessionResponse {
        let refuse = |message: String| StartSessionResponse {
            success: false,
            message,
        };
        if req.session_id.is_empty() {
            return refuse(super::session::StartError::MissingId.to_string());
        }
        let model = match self.models.acquire(&req.model_id).await {
            Ok(m) => m,
            Err(e) => return refuse(e.to_string()),
        };
        let family = self.models.engine_for(&model).map_or("?", |e| e.family());
        match self.sessions.start(&req.session_id, &model, req.options) {
            Ok(previous) => {
                if let Some(previous) = previous {
                    self.models.release(&previous);
                }
                StartSessionResponse {
                    success: true,
                    message: format!(
                        "session {} started with {model} ({family} engine)",
                        req.session_id
                    ),
                }
            }
            Err(e) => {
                self.models.release(&model);
                refuse(e.to_string())
            }
        }
    }

    /// EndSession: always `success: true` (ending an unknown session is not an error: the
    /// caller's goal, no such session, holds). Releases the session's model.
    pub fn end_session(&self, req: EndSessionRequest) -> EndSessionResponse {
        if let Some(model) = self.sessions.end(&req.session_id) {
            self.models.release(&model);
        }
        EndSessionResponse { success: true }
    }

    /// Control: applies to the session's current synthesis; answers at once.
    pub fn control(&self, req: ControlRequest) -> ControlResponse {
        let timestamp_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        match ControlCommand::try_from(req.command) {
            Ok(command) => ControlResponse {
                success: true,
                message: self.sessions.control(&req.session_id, command),
                timestamp_ms,
            },
            Err(_) => ControlResponse {
                success: false,
                message: format!("unknown control command {}", req.command),
                timestamp_ms,
            },
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
}

impl Service for TtsService {
    fn method_kind(&self, method: &str) -> Option<MethodKind> {
        match method {
            path::SYNTHESIZE => Some(MethodKind::Streaming),
            path::START_SESSION
            | path::END_SESSION
            | path::CONTROL
            | path::LIST_MODELS
            | path::LOAD_MODEL
            | path::UNLOAD_MODEL
            | path::GET_CAPABILITIES => Some(MethodKind::Unary),
            _ => None,
        }
    }

    async fn unary(&self, method: &str, request: Bytes) -> Result<Bytes, Status> {
        match method {
            path::START_SESSION => reply(&self.start_session(decode(request)?).await),
            path::END_SESSION => reply(&self.end_session(decode(request)?)),
            path::CONTROL => reply(&self.control(decode(request)?)),
            path::LIST_MODELS => reply(&ListModelsResponse {
                models: self.models.list(),
            }),
            path::LOAD_MODEL => {
                let req: LoadModelRequest = decode(request)?;
                reply(&self.models.load(&req.model_id, req.preload_only).await)
            }
            path::UNLOAD_MODEL => {
                let req: UnloadModelRequest = decode(request)?;
                reply(&self.models.unload(&req.model_id))
            }
            path::GET_CAPABILITIES => reply(&self.capabilities()),
            other => Err(Status::unimplemented(format!("unknown method {other}"))),
        }
    }

    async fn streaming(
        &self,
        method: &str,
        requests: RequestStream,
        responses: ResponseSender,
    ) -> Result<(), Status> {
        if method != path::SYNTHESIZE {
            return Err(Status::unimplemented(format!("unknown method {method}")));
        }
        let ctx = SynthesisContext {
            sessions: &self.sessions,
            metrics: &self.metrics,
            models: &self.models,
            timing: self.config.timing,
        };
        synthesis::run(ctx, requests, responses).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    async fn service(max: usize) -> TtsService {
        TtsService::start(ServiceConfig {
            timing: MockTiming::default(),
            max_sessions: max,
            models: ManagerConfig::default(),
            espeak: None,
        })
        .await
        .unwrap()
    }

    async fn start_with(s: &TtsService, id: &str, model: &str) -> StartSessionResponse {
        s.start_session(StartSessionRequest {
            session_id: id.into(),
            model_id: model.into(),
            options: HashMap::new(),
        })
        .await
    }

    async fn start(s: &TtsService, id: &str) -> StartSessionResponse {
        start_with(s, id, "mock-440hz").await
    }

    #[tokio::test]
    async fn sessions_beyond_the_limit_are_refused_with_a_message() {
        let s = service(1).await;
        assert!(start(&s, "a").await.success);
        let r = start(&s, "b").await;
        assert!(!r.success);
        assert!(r.message.contains("capacity"), "{}", r.message);
        assert_eq!(s.capabilities().metrics["queue_depth"], 1.0);
        assert!(
            s.end_session(EndSessionRequest {
                session_id: "zzz".into()
            })
            .success
        );
    }

    #[tokio::test]
    async fn sessions_hold_a_reference_on_their_model() {
        let s = service(10).await;
        assert!(start_with(&s, "a", "mock-x").await.success);
        assert!(start_with(&s, "b", "mock-x").await.success);
        assert_eq!(s.models().refs("mock-x"), 2);
        // Re-registering with another model moves the reference.
        assert!(start_with(&s, "b", "mock-y").await.success);
        assert_eq!(s.models().refs("mock-x"), 1);
        assert_eq!(s.models().refs("mock-y"), 1);
        s.end_session(EndSessionRequest {
            session_id: "a".into(),
        });
        s.end_session(EndSessionRequest {
            session_id: "a".into(),
        });
        assert_eq!(
            s.models().refs("mock-x"),
            0,
            "a second EndSession releases nothing"
        );
        let r = start_with(&s, "c", "espeak-en-us").await;
        assert!(!r.success);
        assert!(r.message.contains("espeak-ng"), "{}", r.message);
        assert!(!start_with(&s, "", "mock-x").await.success);
        assert_eq!(
            s.models().refs("mock-x"),
            0,
            "a refused start holds nothing"
        );
    }

    #[tokio::test]
    async fn control_answers_success_for_unknown_sessions_with_a_timestamp() {
        let s = service(10).await;
        let r = s.control(ControlRequest {
            session_id: "nobody".into(),
            command: ControlCommand::Stop as i32,
        });
        assert!(r.success);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        assert!((now_ms - r.timestamp_ms).abs() < 60_000);
        let bad = s.control(ControlRequest {
            session_id: "nobody".into(),
            command: 42,
        });
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
}
