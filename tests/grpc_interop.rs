//! Wire compatibility across independent gRPC implementations:
//! (a) a hand-rolled tonic client against the real `duplex worker` binary (itself served by
//!     tonic since the worker moved off the raw-h2 server): the contract as a generic client
//!     sees it, without our generated server code on the client side;
//! (b) our raw-h2 `Client` / `TtsClient` (the orchestrator's) against a tonic server stub in
//!     this process: our client speaks the same wire protocol as tonic.
//!
//! No codegen: the tonic side uses `tonic::client::Grpc` / `tonic::server::Grpc` with
//! `tonic_prost::ProstCodec` and hand-written routing, so both sides share only the prost
//! message types (the wire contract) and nothing else.

mod common;

use common::spawn::Spawned as Worker;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use duplex::grpc::tts::path;
use duplex::grpc::{ClientOptions, Code, TtsClient};
use duplex::proto::{
    AudioFrame, Capabilities, ControlCommand, ControlRequest, ControlResponse, EndSessionRequest,
    EndSessionResponse, GetCapabilitiesRequest, GetCapabilitiesResponse, ListModelsRequest,
    ListModelsResponse, LoadModelRequest, LoadModelResponse, ModelInfo, StartSessionRequest,
    StartSessionResponse, TextChunk, UnloadModelRequest, UnloadModelResponse,
};
use tokio::time::{timeout, Instant};
use tonic::codegen::{BoxFuture, Service, StdError};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// (a) tonic client -> our worker binary
// ---------------------------------------------------------------------------------------

/// Minimal typed tonic client (what tonic-build would generate, by hand).
struct TonicTts {
    grpc: tonic::client::Grpc<Channel>,
}

impl TonicTts {
    async fn connect(addr: &str) -> TonicTts {
        let channel = timeout(
            WAIT,
            Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect(),
        )
        .await
        .unwrap()
        .unwrap();
        TonicTts {
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    async fn unary<Req, Resp>(
        &mut self,
        path: &'static str,
        req: Request<Req>,
    ) -> Result<Resp, Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.grpc.ready().await.unwrap();
        let call = self.grpc.unary(
            req,
            http::uri::PathAndQuery::from_static(path),
            ProstCodec::<Req, Resp>::default(),
        );
        timeout(WAIT, call)
            .await
            .expect("tonic unary call timed out")
            .map(Response::into_inner)
    }

    async fn synthesize<S>(&mut self, req: Request<S>) -> Result<Streaming<AudioFrame>, Status>
    where
        S: tokio_stream::Stream<Item = TextChunk> + Send + 'static,
    {
        self.grpc.ready().await.unwrap();
        let call = self.grpc.streaming(
            req,
            http::uri::PathAndQuery::from_static(path::SYNTHESIZE),
            ProstCodec::<TextChunk, AudioFrame>::default(),
        );
        timeout(WAIT, call)
            .await
            .expect("tonic streaming call timed out")
            .map(Response::into_inner)
    }

    async fn capabilities(&mut self) -> GetCapabilitiesResponse {
        self.unary(
            path::GET_CAPABILITIES,
            Request::new(GetCapabilitiesRequest {}),
        )
        .await
        .unwrap()
    }

    async fn start(&mut self, session: &str) {
        let r: StartSessionResponse = self
            .unary(
                path::START_SESSION,
                Request::new(StartSessionRequest {
                    session_id: session.into(),
                    model_id: "mock-440hz".into(),
                    options: HashMap::from([("voice".into(), "a".into())]),
                }),
            )
            .await
            .unwrap();
        assert!(r.success, "{}", r.message);
    }
}

fn chunk(session: &str, text: &str, is_final: bool) -> TextChunk {
    TextChunk {
        session_id: session.into(),
        text: text.into(),
        is_final,
        sequence_number: 1,
    }
}

async fn next_frame(stream: &mut Streaming<AudioFrame>) -> Result<Option<AudioFrame>, Status> {
    timeout(WAIT, stream.message())
        .await
        .expect("frame timed out")
}

#[tokio::test]
async fn tonic_client_calls_all_eight_rpcs_of_our_worker() {
    let w = Worker::worker(&["--allow-model-management"]);
    let mut c = TonicTts::connect(&w.addr).await;

    c.start("t1").await;

    let caps = c.capabilities().await;
    let cap = caps.capabilities.clone().unwrap();
    assert!(cap.streaming && cap.cpu_ok);
    assert_eq!(cap.max_concurrent_sessions, 1000);
    assert_eq!(caps.metrics["queue_depth"], 1.0);
    assert!(caps.metrics.contains_key("rtf"));

    let models: ListModelsResponse = c
        .unary(path::LIST_MODELS, Request::new(ListModelsRequest {}))
        .await
        .unwrap();
    // The mock default is resident; espeak voices (when installed) are listed, not loaded.
    let default = models
        .models
        .iter()
        .find(|m| m.model_id == "mock-440hz")
        .expect("mock-440hz is listed");
    assert!(default.is_loaded);

    let loaded: LoadModelResponse = c
        .unary(
            path::LOAD_MODEL,
            Request::new(LoadModelRequest {
                model_id: "mock-2".into(),
                preload_only: false,
            }),
        )
        .await
        .unwrap();
    // mock-2 is an alias of the resident mock-440hz: nothing new is catalogued.
    assert!(loaded.success, "{}", loaded.message);
    assert!(loaded.message.contains("alias"), "{}", loaded.message);
    let in_use: UnloadModelResponse = c
        .unary(
            path::UNLOAD_MODEL,
            Request::new(UnloadModelRequest {
                model_id: "mock-2".into(),
            }),
        )
        .await
        .unwrap();
    assert!(!in_use.success, "session t1 uses the mock");
    assert!(in_use.message.contains("in use"), "{}", in_use.message);
    let unknown: UnloadModelResponse = c
        .unary(
            path::UNLOAD_MODEL,
            Request::new(UnloadModelRequest {
                model_id: "no-such-model".into(),
            }),
        )
        .await
        .unwrap();
    assert!(!unknown.success);
    assert!(
        unknown.message.contains("unknown model"),
        "{}",
        unknown.message
    );

    let ctl: ControlResponse = c
        .unary(
            path::CONTROL,
            Request::new(ControlRequest {
                session_id: "t1".into(),
                command: ControlCommand::Pause as i32,
            }),
        )
        .await
        .unwrap();
    assert!(ctl.success);
    assert!(ctl.timestamp_ms > 1_600_000_000_000);

    // Synthesize: 25 frames, sequence 1..25, last is_final (with audio), session echoed.
    let mut frames = c
        .synthesize(Request::new(tokio_stream::iter(vec![chunk(
            "t1",
            "Hello from tonic.",
            true,
        )])))
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Some(f) = next_frame(&mut frames).await.unwrap() {
        got.push(f);
    }
    assert_eq!(got.len(), 25);
    for (i, f) in got.iter().enumerate() {
        assert_eq!(f.sequence_number, i as i64 + 1);
        assert_eq!(f.session_id, "t1");
        assert_eq!(f.audio_data.len(), 1920);
        assert_eq!((f.sample_rate, f.frame_duration_ms), (48_000, 20));
        assert_eq!(f.is_final, i == 24);
    }

    let ended: EndSessionResponse = c
        .unary(
            path::END_SESSION,
            Request::new(EndSessionRequest {
                session_id: "t1".into(),
            }),
        )
        .await
        .unwrap();
    assert!(ended.success);
    assert_eq!(c.capabilities().await.metrics["queue_depth"], 0.0);

    // Errors reach tonic as proper statuses (trailers-only responses).
    let mut frames = c
        .synthesize(Request::new(tokio_stream::iter(vec![chunk(
            "gone", "x", true,
        )])))
        .await;
    let status = match &mut frames {
        Err(s) => s.clone(),
        Ok(stream) => next_frame(stream).await.unwrap_err(),
    };
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("gone"), "{status:?}");
    let err = c
        .unary::<_, EndSessionResponse>(
            "/tts.TTSService/DoesNotExist",
            Request::new(EndSessionRequest::default()),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn tonic_deadline_against_a_slow_worker_is_deadline_exceeded() {
    let w = Worker::worker(&["--mock-first-frame-ms", "2000"]);
    let mut c = TonicTts::connect(&w.addr).await;
    c.start("slow").await;
    let mut req = Request::new(tokio_stream::iter(vec![chunk("slow", "wait for it", true)]));
    // tonic enforces this locally only until the response headers arrive (it would report
    // CANCELLED "Timeout expired"); the worker answers with headers at once, so the
    // DEADLINE_EXCEEDED below is our server's enforcement of grpc-timeout.
    req.set_timeout(Duration::from_millis(300));
    let status = match c.synthesize(req).await {
        Err(s) => s,
        Ok(mut stream) => next_frame(&mut stream).await.unwrap_err(),
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    // The worker dropped the synthesis.
    let t0 = Instant::now();
    while c.capabilities().await.metrics["active_syntheses"] != 0.0 {
        assert!(t0.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tonic_dropping_the_stream_ends_the_worker_synthesis() {
    let w = Worker::worker(&["--mock-frame-interval-ms", "200"]);
    let mut c = TonicTts::connect(&w.addr).await;
    c.start("cx").await;
    let mut frames = c
        .synthesize(Request::new(tokio_stream::iter(vec![chunk(
            "cx", "long one", true,
        )])))
        .await
        .unwrap();
    let first = next_frame(&mut frames).await.unwrap().unwrap();
    assert_eq!(first.sequence_number, 1);
    assert_eq!(c.capabilities().await.metrics["active_syntheses"], 1.0);
    drop(frames);
    let t0 = Instant::now();
    loop {
        let m = c.capabilities().await.metrics;
        if m["active_syntheses"] == 0.0 {
            assert_eq!(m["syntheses_aborted"], 1.0);
            // 25 frames at 200 ms would need 5 s; the cancel stopped generation early.
            assert!(m["frames_total"] < 25.0, "{m:?}");
            break;
        }
        assert!(
            t0.elapsed() < WAIT,
            "synthesis still running after cancel: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// (b) our client -> tonic stub server
// ---------------------------------------------------------------------------------------

/// What the stub observed, for assertions.
#[derive(Default)]
struct StubState {
    /// Synthesize calls whose response stream was dropped by the transport (client cancel).
    cancelled: AtomicUsize,
    /// Last grpc-timeout header seen.
    last_timeout: Mutex<Option<String>>,
    /// Text chunks received by Synthesize, in order.
    texts: Mutex<Vec<String>>,
}

#[derive(Clone, Default)]
struct Stub {
    state: Arc<StubState>,
}

type HttpResponse = http::Response<tonic::body::Body>;

/// Serves one unary method with `f` through tonic's own server machinery.
fn unary<B, Req, Resp, F, Fut>(req: http::Request<B>, f: F) -> BoxFuture<HttpResponse, Infallible>
where
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
    Req: prost::Message + Default + Send + Sync + 'static,
    Resp: prost::Message + Send + Sync + 'static,
    F: FnMut(Request<Req>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Response<Resp>, Status>> + Send + 'static,
{
    Box::pin(async move {
        let mut grpc = tonic::server::Grpc::new(ProstCodec::<Resp, Req>::default());
        Ok(grpc.unary(Handler(f), req).await)
    })
}

/// Adapts a closure to tower's `Service` (tonic's Unary/StreamingService are blanket
/// implemented for those).
struct Handler<F>(F);

impl<F, Fut, Req, Resp> Service<Request<Req>> for Handler<F>
where
    F: FnMut(Request<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<Response<Resp>, Status>>,
{
    type Response = Response<Resp>;
    type Error = Status;
    type Future = Fut;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Req>) -> Fut {
        (self.0)(req)
    }
}

type FrameStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<AudioFrame, Status>> + Send>>;

/// Decrements nothing; counts a cancel when the response stream is dropped before the end.
struct CancelProbe {
    state: Arc<StubState>,
    finished: bool,
}

impl Drop for CancelProbe {
    fn drop(&mut self) {
        if !self.finished {
            self.state.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Stub {
    /// Synthesize stub: 3 frames per non-empty chunk ("slow" → 1 s between frames; "fail" →
    /// an error status after one frame; session "nobody" → NOT_FOUND before any frame).
    async fn synthesize(
        state: Arc<StubState>,
        req: Request<Streaming<TextChunk>>,
    ) -> Result<Response<FrameStream>, Status> {
        *state.last_timeout.lock().unwrap() = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no chunk"))?;
        if first.session_id == "nobody" {
            return Err(Status::not_found("session «nobody» does not exist: 100%"));
        }
        let session = first.session_id.clone();
        let out = async_stream(state, session, first, input);
        Ok(Response::new(Box::pin(out)))
    }
}

/// The frame stream of the stub, as an unfold over (pending chunk, input).
fn async_stream(
    state: Arc<StubState>,
    session: String,
    first: TextChunk,
    input: Streaming<TextChunk>,
) -> impl tokio_stream::Stream<Item = Result<AudioFrame, Status>> + Send {
    struct S {
        probe: CancelProbe,
        session: String,
        input: Option<Streaming<TextChunk>>,
        pending: Vec<(String, bool)>,
        seq: i64,
        done: bool,
        last_text: String,
    }
    let mut st = S {
        probe: CancelProbe {
            state: state.clone(),
            finished: false,
        },
        session,
        input: Some(input),
        pending: Vec::new(),
        seq: 0,
        done: false,
        last_text: String::new(),
    };
    state.texts.lock().unwrap().push(first.text.clone());
    let frames = if first.text.is_empty() { 0 } else { 3 };
    for i in 0..frames {
        st.pending
            .push((first.text.clone(), first.is_final && i == frames - 1));
    }
    if first.is_final {
        st.input = None;
    }
    futures_unfold(st, move |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            if !st.pending.is_empty() {
                let (text, is_final) = st.pending.remove(0);
                if text == "slow" {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                if text == "fail" && st.seq == 1 {
                    st.done = true;
                    st.probe.finished = true;
                    return Some((
                        Err(Status::resource_exhausted("stub says: trop de travail ✗")),
                        st,
                    ));
                }
                st.seq += 1;
                st.last_text = text;
                let frame = AudioFrame {
                    session_id: st.session.clone(),
                    audio_data: Bytes::from(vec![st.seq as u8; 1920]),
                    sample_rate: 48_000,
                    frame_duration_ms: 20,
                    sequence_number: st.seq,
                    is_final,
                };
                if is_final {
                    st.done = true;
                    st.probe.finished = true;
                }
                return Some((Ok(frame), st));
            }
            let Some(input) = st.input.as_mut() else {
                // Input closed without is_final: end marker.
                st.seq += 1;
                st.done = true;
                st.probe.finished = true;
                let marker = AudioFrame {
                    session_id: st.session.clone(),
                    sequence_number: st.seq,
                    is_final: true,
                    sample_rate: 48_000,
                    frame_duration_ms: 20,
                    ..Default::default()
                };
                return Some((Ok(marker), st));
            };
            match input.message().await {
                Ok(Some(c)) => {
                    st.probe.state.texts.lock().unwrap().push(c.text.clone());
                    let n = if c.text.is_empty() { 0 } else { 3 };
                    for i in 0..n {
                        st.pending.push((c.text.clone(), c.is_final && i == n - 1));
                    }
                    if c.is_final {
                        st.input = None;
                        if n == 0 {
                            st.pending.clear();
                        }
                    }
                }
                Ok(None) => st.input = None,
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
            }
        }
    })
}

/// `futures::stream::unfold` without depending on `futures` (tokio-stream has no unfold).
fn futures_unfold<T, F, Fut, Item>(init: T, f: F) -> impl tokio_stream::Stream<Item = Item> + Send
where
    T: Send + 'static,
    F: FnMut(T) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<(Item, T)>> + Send + 'static,
    Item: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Item>(1);
    let mut f = f;
    let task = tokio::spawn(async move {
        let mut state = init;
        loop {
            // Stop producing as soon as the consumer (the response body) is gone.
            let produced = tokio::select! {
                r = f(state) => r,
                _ = tx.closed() => return,
            };
            match produced {
                Some((item, next)) => {
                    if tx.send(item).await.is_err() {
                        return;
                    }
                    state = next;
                }
                None => return,
            }
        }
    });
    AbortOnDrop {
        inner: tokio_stream::wrappers::ReceiverStream::new(rx),
        task,
    }
}

/// Aborts the producer task when the stream is dropped (the probe in its state then counts
/// the cancel).
struct AbortOnDrop<S> {
    inner: S,
    task: tokio::task::JoinHandle<()>,
}

impl<S: tokio_stream::Stream + Unpin> tokio_stream::Stream for AbortOnDrop<S> {
    type Item = S::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<S::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl<S> Drop for AbortOnDrop<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<B> Service<http::Request<B>> for Stub
where
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = BoxFuture<HttpResponse, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let state = self.state.clone();
        match req.uri().path() {
            path::START_SESSION => unary(req, |r: Request<StartSessionRequest>| async move {
                let r = r.into_inner();
                Ok(Response::new(StartSessionResponse {
                    success: r.model_id == "stub-model",
                    message: format!(
                        "{}|{}",
                        r.session_id,
                        r.options.get("k").cloned().unwrap_or_default()
                    ),
                }))
            }),
            path::END_SESSION => unary(req, |r: Request<EndSessionRequest>| async move {
                Ok(Response::new(EndSessionResponse {
                    success: r.into_inner().session_id == "s",
                }))
            }),
            path::CONTROL => unary(req, |r: Request<ControlRequest>| async move {
                let r = r.into_inner();
                Ok(Response::new(ControlResponse {
                    success: true,
                    message: format!("{}:{:?}", r.session_id, ControlCommand::try_from(r.command)),
                    timestamp_ms: 1_234,
                }))
            }),
            path::LIST_MODELS => unary(req, |_: Request<ListModelsRequest>| async move {
                Ok(Response::new(ListModelsResponse {
                    models: vec![ModelInfo {
                        model_id: "stub-model".into(),
                        family: "stub".into(),
                        is_loaded: true,
                        languages: vec!["en".into(), "fr".into()],
                        metadata: HashMap::from([("k".into(), "v".into())]),
                    }],
                }))
            }),
            path::LOAD_MODEL => unary(req, |r: Request<LoadModelRequest>| async move {
                let r = r.into_inner();
                Ok(Response::new(LoadModelResponse {
                    success: r.preload_only,
                    message: r.model_id,
                    load_duration_ms: 42,
                }))
            }),
            path::UNLOAD_MODEL => unary(req, |r: Request<UnloadModelRequest>| async move {
                if r.get_ref().model_id == "locked" {
                    return Err(Status::failed_precondition("model is in use"));
                }
                Ok(Response::new(UnloadModelResponse {
                    success: true,
                    message: r.into_inner().model_id,
                }))
            }),
            path::GET_CAPABILITIES => unary(req, |_: Request<GetCapabilitiesRequest>| async move {
                Ok(Response::new(GetCapabilitiesResponse {
                    capabilities: Some(Capabilities {
                        streaming: true,
                        zero_shot: true,
                        lora: false,
                        cpu_ok: false,
                        languages: vec!["de".into()],
                        emotive_zero_prompt: true,
                        max_concurrent_sessions: 77,
                    }),
                    resident_models: vec!["stub-model".into()],
                    metrics: HashMap::from([("rtf".into(), 0.5), ("queue_depth".into(), 3.0)]),
                }))
            }),
            path::SYNTHESIZE => Box::pin(async move {
                let mut grpc =
                    tonic::server::Grpc::new(ProstCodec::<AudioFrame, TextChunk>::default());
                Ok(grpc
                    .streaming(
                        Handler(move |r: Request<Streaming<TextChunk>>| {
                            Stub::synthesize(state.clone(), r)
                        }),
                        req,
                    )
                    .await)
            }),
            _ => Box::pin(async { Ok(Status::unimplemented("stub: no such method").into_http()) }),
        }
    }
}

/// Starts the tonic stub on a free loopback port; stopped when the sender is dropped.
async fn start_stub() -> (String, Arc<StubState>, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let stub = Stub::default();
    let state = stub.state.clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(
                stub,
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = rx.await;
                },
            )
            .await
            .unwrap();
    });
    (addr, state, tx)
}

async fn our_client(addr: &str) -> TtsClient {
    timeout(WAIT, TtsClient::connect(addr, &ClientOptions::default()))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn our_client_calls_all_eight_rpcs_of_a_tonic_server() {
    let (addr, state, _stop) = start_stub().await;
    let c = our_client(&format!("grpc://{addr}")).await;
    let t = Some(WAIT);

    let r = c
        .start_session(
            &StartSessionRequest {
                session_id: "s".into(),
                model_id: "stub-model".into(),
                options: HashMap::from([("k".into(), "v€".into())]),
            },
            t,
        )
        .await
        .unwrap();
    assert!(r.success);
    assert_eq!(r.message, "s|v€");

    assert!(
        c.end_session(
            &EndSessionRequest {
                session_id: "s".into()
            },
            t
        )
        .await
        .unwrap()
        .success
    );

    let ctl = c
        .control(
            &ControlRequest {
                session_id: "s".into(),
                command: ControlCommand::Stop as i32,
            },
            t,
        )
        .await
        .unwrap();
    assert_eq!(ctl.message, "s:Ok(Stop)");
    assert_eq!(ctl.timestamp_ms, 1_234);

    let models = c.list_models(t).await.unwrap().models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].languages, vec!["en".to_owned(), "fr".to_owned()]);
    assert_eq!(models[0].metadata["k"], "v");

    let l = c
        .load_model(
            &LoadModelRequest {
                model_id: "m1".into(),
                preload_only: true,
            },
            t,
        )
        .await
        .unwrap();
    assert!(l.success);
    assert_eq!((l.message.as_str(), l.load_duration_ms), ("m1", 42));

    let u = c
        .unload_model(
            &UnloadModelRequest {
                model_id: "m1".into(),
            },
            t,
        )
        .await
        .unwrap();
    assert!(u.success);
    let err = c
        .unload_model(
            &UnloadModelRequest {
                model_id: "locked".into(),
            },
            t,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::FailedPrecondition);
    assert_eq!(err.message, "model is in use");

    let caps = c.get_capabilities(t).await.unwrap();
    let cap = caps.capabilities.unwrap();
    assert_eq!(cap.max_concurrent_sessions, 77);
    assert!(cap.zero_shot && cap.emotive_zero_prompt && !cap.cpu_ok);
    assert_eq!(caps.metrics["rtf"], 0.5);

    // Synthesize, streaming both ways: chunks go out while frames come back.
    let (mut tx, mut rx) = c.synthesize(t).await.unwrap();
    tx.send(&chunk("s", "one", false)).unwrap();
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(timeout(WAIT, rx.message()).await.unwrap().unwrap().unwrap());
    }
    tx.send(&chunk("", "two", true)).unwrap();
    while let Some(f) = timeout(WAIT, rx.message()).await.unwrap().unwrap() {
        frames.push(f);
    }
    assert_eq!(frames.len(), 6);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.sequence_number, i as i64 + 1);
        assert_eq!(f.audio_data, Bytes::from(vec![(i + 1) as u8; 1920]));
        assert_eq!(f.session_id, "s");
        assert_eq!(f.is_final, i == 5);
    }
    assert_eq!(*state.texts.lock().unwrap(), vec!["one", "two"]);

    // Half-close instead of is_final: the stub ends with an empty marker.
    let (mut tx, mut rx) = c.synthesize(t).await.unwrap();
    tx.send(&chunk("s", "three", false)).unwrap();
    tx.finish().unwrap();
    let mut n = 0;
    while let Some(f) = timeout(WAIT, rx.message()).await.unwrap().unwrap() {
        n += 1;
        assert_eq!(f.is_final, n == 4);
    }
    assert_eq!(n, 4);
}

#[tokio::test]
async fn our_client_reads_tonic_error_statuses() {
    let (addr, _state, _stop) = start_stub().await;
    let c = our_client(&addr).await;

    // Trailers-only error before any frame, with a percent-encoded non-ASCII message.
    let (mut tx, mut rx) = c.synthesize(Some(WAIT)).await.unwrap();
    tx.send(&chunk("nobody", "hi", true)).unwrap();
    let err = timeout(WAIT, rx.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code, Code::NotFound);
    assert_eq!(err.message, "session «nobody» does not exist: 100%");

    // Error in the trailers after a frame.
    let (mut tx, mut rx) = c.synthesize(Some(WAIT)).await.unwrap();
    tx.send(&chunk("s", "fail", true)).unwrap();
    let f = timeout(WAIT, rx.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(f.sequence_number, 1);
    let err = timeout(WAIT, rx.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code, Code::ResourceExhausted);
    assert_eq!(err.message, "stub says: trop de travail ✗");
    // Errors are sticky.
    assert_eq!(
        rx.message().await.unwrap_err().code,
        Code::ResourceExhausted
    );

    let err = c
        .client()
        .unary::<_, EndSessionResponse>(
            "/tts.TTSService/Nope",
            &EndSessionRequest::default(),
            Some(WAIT),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, Code::Unimplemented);
    assert!(!c.is_closed());
}

#[tokio::test]
async fn our_deadline_is_sent_as_grpc_timeout_and_enforced() {
    let (addr, state, _stop) = start_stub().await;
    let c = our_client(&addr).await;
    let (mut tx, mut rx) = c
        .synthesize(Some(Duration::from_millis(250)))
        .await
        .unwrap();
    tx.send(&chunk("s", "slow", true)).unwrap();
    let err = timeout(WAIT, rx.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code, Code::DeadlineExceeded, "{err}");
    let sent = state
        .last_timeout
        .lock()
        .unwrap()
        .clone()
        .expect("grpc-timeout header");
    let parsed = duplex::grpc::timeout::parse(&sent).unwrap();
    assert!(
        parsed <= Duration::from_millis(250) && parsed > Duration::from_millis(200),
        "{sent}"
    );
    // The call is cancelled on the wire, so the stub's stream is dropped.
    let t0 = Instant::now();
    while state.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < WAIT, "stub never saw the cancel");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn dropping_our_response_stream_cancels_the_tonic_call() {
    let (addr, state, _stop) = start_stub().await;
    let c = our_client(&addr).await;
    let (mut tx, mut rx) = c.synthesize(None).await.unwrap();
    tx.send(&chunk("s", "slow", false)).unwrap();
    tx.send(&chunk("s", "slow", true)).unwrap();
    let f = timeout(WAIT, rx.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(f.sequence_number, 1);
    assert_eq!(state.cancelled.load(Ordering::SeqCst), 0);
    drop(rx); // the sink stays alive: dropping the response stream alone must cancel
    let t0 = Instant::now();
    while state.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(t0.elapsed() < WAIT, "stub never saw the cancel");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        tx.send(&chunk("s", "more", true)).is_err(),
        "a cancelled call refuses sends"
    );
    // The connection survives the cancel.
    assert!(c.get_capabilities(Some(WAIT)).await.is_ok());
}
