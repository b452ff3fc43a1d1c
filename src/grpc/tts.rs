//! Typed client of `tts.TTSService` (proto/tts.proto) and its method paths.
//!
//! The orchestrator codes against these methods instead of raw paths so a typo in a method
//! name or a mismatched message type is a compile error, not an UNIMPLEMENTED at run time.

use std::time::Duration;

use super::client::{Client, ClientOptions, RequestSink, ResponseStream};
use super::status::Status;
use crate::proto::{
    AudioFrame, ControlRequest, ControlResponse, EndSessionRequest, EndSessionResponse,
    GetCapabilitiesRequest, GetCapabilitiesResponse, ListModelsRequest, ListModelsResponse,
    LoadModelRequest, LoadModelResponse, StartSessionRequest, StartSessionResponse, TextChunk,
    UnloadModelRequest, UnloadModelResponse,
};

/// The orchestrator's view of an [`AudioFrame`]: the same wire message with `session_id`
/// (field 1), `sample_rate` and `frame_duration_ms` left out.
///
/// Why: decoding `session_id` into a `String` was the one allocation left per forwarded frame
/// (the PCM is already a slice of the h2 buffer). Fields missing here are unknown to prost and
/// skipped in place, so decoding a frame allocates nothing; the worker still sends, and other
/// clients still read, the whole `AudioFrame`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AudioPayload {
    /// `AudioFrame.audio_data`: 20 ms of s16le PCM, a slice of the received buffer.
    #[prost(bytes = "bytes", tag = "2")]
    pub audio_data: bytes::Bytes,
    /// `AudioFrame.sequence_number`.
    #[prost(int64, tag = "5")]
    pub sequence_number: i64,
    /// `AudioFrame.is_final`: the end marker of the synthesis.
    #[prost(bool, tag = "6")]
    pub is_final: bool,
}

/// The worker token as the `authorization: Bearer <token>` header the orchestrator sends on
/// every call to a worker started with `--worker-token-file` (docs/PROTOCOL.md §5). Built once
/// (validated, marked sensitive so HPACK never indexes it); its `Debug` hides the secret.
#[derive(Clone)]
pub struct WorkerAuth {
    header: http::HeaderValue,
}

impl std::fmt::Debug for WorkerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerAuth(<redacted>)")
    }
}

impl WorkerAuth {
    /// From the token text; surrounding whitespace (a file's trailing newline) is ignored.
    /// The token must be non-empty visible ASCII without spaces (what the worker accepts).
    pub fn bearer(token: &str) -> Result<WorkerAuth, String> {
        let token = token.trim();
        if token.is_empty() {
            return Err("the worker token is empty".into());
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the worker token must be visible ASCII without spaces".into());
        }
        let mut header = http::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the worker token is not a valid header value".to_owned())?;
        header.set_sensitive(true);
        Ok(WorkerAuth { header })
    }

    /// Reads the token from a file (the orchestrator's `--worker-token-file`). Errors name
    /// the file, never its content.
    pub fn from_file(path: &std::path::Path) -> Result<WorkerAuth, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read worker token file {}: {e}", path.display()))?;
        WorkerAuth::bearer(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The header value.
    pub fn header(&self) -> &http::HeaderValue {
        &self.header
    }
}

/// HTTP/2 `:path` of every RPC of `tts.TTSService` (shared by client and worker).
pub mod path {
    /// `StartSession(StartSessionRequest) -> StartSessionResponse`.
    pub const START_SESSION: &str = "/tts.TTSService/StartSession";
    /// `EndSession(EndSessionRequest) -> EndSessionResponse`.
    pub const END_SESSION: &str = "/tts.TTSService/EndSession";
    /// `Synthesize(stream TextChunk) -> stream AudioFrame`.
    pub const SYNTHESIZE: &str = "/tts.TTSService/Synthesize";
    /// `Control(ControlRequest) -> ControlResponse`.
    pub const CONTROL: &str = "/tts.TTSService/Control";
    /// `ListModels(ListModelsRequest) -> ListModelsResponse`.
    pub const LIST_MODELS: &str = "/tts.TTSService/ListModels";
    /// `LoadModel(LoadModelRequest) -> LoadModelResponse`.
    pub const LOAD_MODEL: &str = "/tts.TTSService/LoadModel";
    /// `UnloadModel(UnloadModelRequest) -> UnloadModelResponse`.
    pub const UNLOAD_MODEL: &str = "/tts.TTSService/UnloadModel";
    /// `GetCapabilities(GetCapabilitiesRequest) -> GetCapabilitiesResponse`.
    pub const GET_CAPABILITIES: &str = "/tts.TTSService/GetCapabilities";
}

/// A [`Client`] that knows the `tts.TTSService` methods. Cheap to clone, like `Client`.
#[derive(Clone, Debug)]
pub struct TtsClient {
    client: Client,
}

impl From<Client> for TtsClient {
    fn from(client: Client) -> Self {
        TtsClient { client }
    }
}

impl TtsClient {
    /// Connects to a worker at `"host:port"` or `"grpc://host:port"` (see [`Client::connect`]).
    pub async fn connect(addr: &str, opts: &ClientOptions) -> Result<TtsClient, Status> {
        Client::connect(addr, opts).await.map(TtsClient::from)
    }

    /// The underlying untyped client (for custom paths or sharing the connection).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// True once the connection is dead (see [`Client::is_closed`]).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Registers a session (model id and options) on the worker.
    pub async fn start_session(
        &self,
        req: &StartSessionRequest,
        timeout: Option<Duration>,
    ) -> Result<StartSessionResponse, Status> {
        self.client.unary(path::START_SESSION, req, timeout).await
    }

    /// Forgets a session (succeeds for unknown ids too).
    pub async fn end_session(
        &self,
        req: &EndSessionRequest,
        timeout: Option<Duration>,
    ) -> Result<EndSessionResponse, Status> {
        self.client.unary(path::END_SESSION, req, timeout).await
    }

    /// Opens a synthesis: send [`TextChunk`]s (the first carries the session id), read
    /// [`AudioFrame`]s until the one with `is_final`. Dropping the stream cancels it.
    pub async fn synthesize(
        &self,
        timeout: Option<Duration>,
    ) -> Result<(RequestSink<TextChunk>, ResponseStream<AudioFrame>), Status> {
        self.client.streaming(path::SYNTHESIZE, timeout).await
    }

    /// [`TtsClient::synthesize`] reading each frame as an [`AudioPayload`] (no allocation per
    /// frame): what the orchestrator forwards with.
    pub async fn synthesize_audio(
        &self,
        timeout: Option<Duration>,
    ) -> Result<(RequestSink<TextChunk>, ResponseStream<AudioPayload>), Status> {
        self.client.streaming(path::SYNTHESIZE, timeout).await
    }

    /// PAUSE / RESUME / STOP / RELOAD the session's current synthesis.
    pub async fn control(
        &self,
        req: &ControlRequest,
        timeout: Option<Duration>,
    ) -> Result<ControlResponse, Status> {
        self.client.unary(path::CONTROL, req, timeout).await
    }

    /// Models the worker knows, loaded or not.
    pub async fn list_models(
        &self,
        timeout: Option<Duration>,
    ) -> Result<ListModelsResponse, Status> {
        self.client
            .unary(path::LIST_MODELS, &ListModelsRequest {}, timeout)
            .await
    }

    /// Makes a model resident.
    pub async fn load_model(
        &self,
        req: &LoadModelRequest,
        timeout: Option<Duration>,
    ) -> Result<LoadModelResponse, Status> {
        self.client.unary(path::LOAD_MODEL, req, timeout).await
    }

    /// Evicts a resident model.
    pub async fn unload_model(
        &self,
        req: &UnloadModelRequest,
        timeout: Option<Duration>,
    ) -> Result<UnloadModelResponse, Status> {
        self.client.unary(path::UNLOAD_MODEL, req, timeout).await
    }

    /// Capabilities, resident models and load metrics; also the liveness probe.
    pub async fn get_capabilities(
        &self,
        timeout: Option<Duration>,
    ) -> Result<GetCapabilitiesResponse, Status> {
        self.client
            .unary(path::GET_CAPABILITIES, &GetCapabilitiesRequest {}, timeout)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn worker_auth_is_a_sensitive_bearer_header() {
        let a = WorkerAuth::bearer("tok3n\n").unwrap();
        assert_eq!(a.header().as_bytes(), b"Bearer tok3n");
        assert!(a.header().is_sensitive());
        assert_eq!(format!("{a:?}"), "WorkerAuth(<redacted>)");
        assert!(WorkerAuth::bearer("").is_err());
        assert!(WorkerAuth::bearer("a b").is_err());
        let e = WorkerAuth::from_file(std::path::Path::new("/nonexistent/tok")).unwrap_err();
        assert!(e.contains("/nonexistent/tok"), "{e}");
    }

    #[test]
    fn payload_reads_the_audio_frame_wire_format() {
        let frame = AudioFrame {
            session_id: "ws-0123456789ab".into(),
            audio_data: bytes::Bytes::from_static(&[1, 2, 3, 4]),
            sample_rate: 48_000,
            frame_duration_ms: 20,
            sequence_number: 7,
            is_final: true,
        };
        let wire = bytes::Bytes::from(frame.encode_to_vec());
        let p = AudioPayload::decode(wire.clone()).unwrap();
        assert_eq!(&p.audio_data[..], &[1, 2, 3, 4]);
        assert_eq!(p.sequence_number, 7);
        assert!(p.is_final);
        // The PCM is a slice of the received buffer, not a copy.
        assert!(wire.as_ptr_range().contains(&p.audio_data.as_ptr()));
    }
}
