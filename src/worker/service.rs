//! `tts.TTSService`: the eight RPCs of the worker, on top of the generic gRPC server.
//!
//! Unary RPCs answer from in-memory state without awaiting anything, so Control and the
//! GetCapabilities liveness probe answer immediately even when every synthesis is busy.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::metrics::WorkerMetrics;
use super::mock::MockTiming;
use super::models::{ModelManager, LANGUAGES};
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
    /// A worker with no sessions and the default model resident.
    pub fn new(config: ServiceConfig) -> TtsService {
        TtsService {
            sessions: Arc::new(SessionRegistry::new(config.max_sessions)),
            models: ModelManager::new(),
            metrics: WorkerMetrics::default(),
            config,
        }
    }

    /// StartSession: registers the session, or `success: false` with the reason.
    pub fn start_session(&self, req: StartSessionRequest) -> StartSessionResponse {
        let model = if req.model_id.is_empty() {
            super::models::DEFAULT_MODEL.to_owned()
        } else {
            req.model_id
        };
        let engine = self.models.engine_for(&model);
        match self.sessions.start(&req.session_id, &model, req.options) {
            Ok(()) => StartSessionResponse {
                success: true,
                message: format!(
                    "session {} started with {model} ({} engine)",
                    req.session_id,
                    engine.family()
                ),
            },
            Err(e) => StartSessionResponse {
                success: false,
                message: e.to_string(),
            },
        }
    }

    /// EndSession: always `success: true` (ending an unknown session is not an error: the
    /// caller's goal, no such session, holds).
    pub fn end_session(&self, req: EndSessionRequest) -> EndSessionResponse {
        self.sessions.end(&req.session_id);
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
                languages: LANGUAGES.iter().map(|s| (*s).to_owned()).collect(),
                emotive_zero_prompt: false,
                max_concurrent_sessions: i32::try_from(self.config.max_sessions)
                    .unwrap_or(i32::MAX),
            }),
            resident_models: self.models.resident(),
            metrics: self
                .metrics
                .snapshot(self.sessions.len(), self.config.max_sessions),
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
            path::START_SESSION => reply(&self.start_session(decode(request)?)),
            path::END_SESSION => reply(&self.end_session(decode(request)?)),
            path::CONTROL => reply(&self.control(decode(request)?)),
            path::LIST_MODELS => reply(&ListModelsResponse {
                models: self.models.list(),
            }),
            path::LOAD_MODEL => {
                let req: LoadModelRequest = decode(request)?;
                reply(&self.models.load(&req.model_id, req.preload_only))
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
            timing: self.config.timing,
        };
        synthesis::run(ctx, requests, responses).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn service(max: usize) -> TtsService {
        TtsService::new(ServiceConfig {
            timing: MockTiming::default(),
            max_sessions: max,
        })
    }

    fn start(s: &TtsService, id: &str) -> StartSessionResponse {
        s.start_session(StartSessionRequest {
            session_id: id.into(),
            model_id: "mock-440hz".into(),
            options: HashMap::new(),
        })
    }

    #[test]
    fn sessions_beyond_the_limit_are_refused_with_a_message() {
        let s = service(1);
        assert!(start(&s, "a").success);
        let r = start(&s, "b");
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

    #[test]
    fn control_answers_success_for_unknown_sessions_with_a_timestamp() {
        let s = service(10);
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

    #[test]
    fn capabilities_report_config_and_models() {
        let s = service(7);
        let c = s.capabilities();
        let caps = c.capabilities.unwrap();
        assert!(caps.streaming && caps.cpu_ok);
        assert_eq!(caps.languages, vec!["en".to_owned()]);
        assert_eq!(caps.max_concurrent_sessions, 7);
        assert_eq!(c.resident_models, vec!["mock-440hz".to_owned()]);
        assert!(c.metrics.contains_key("rtf"));
        assert!(c.metrics.contains_key("queue_depth"));
    }
}
