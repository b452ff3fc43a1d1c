//! gRPC server over raw HTTP/2 (`h2`), generic over a [`Service`].
//!
//! Phases of a call, each in its own function below:
//! 1. **accept** ([`serve`]): TCP accept, `TCP_NODELAY`, one task per connection;
//! 2. **connection** (`serve_connection`): h2 handshake, one task per stream, graceful GOAWAY on
//!    shutdown;
//! 3. **admission** (`handle_stream`): method POST, `content-type: application/grpc*`, route by
//!    `:path` (unknown → trailers-only UNIMPLEMENTED), parse `grpc-timeout`;
//! 4. **handler**: the service's unary or streaming method, raced against the deadline
//!    (→ DEADLINE_EXCEEDED) and against the client's RST_STREAM (→ the handler future is
//!    dropped, so its work stops at once — no frames generated into the void);
//! 5. **status**: `grpc-status` trailers, or a trailers-only response if nothing was sent.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::client::is_grpc_content_type;
use super::codec::{self, Decoder, DEFAULT_MAX_MESSAGE};
use super::status::Status;
use super::timeout;

/// Whether a method takes one request and returns one response, or streams (client, server
/// and bidi streaming look the same on the wire; the handler decides how many messages flow).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodKind {
    /// One request message, one response message.
    Unary,
    /// Any number of messages each way.
    Streaming,
}

/// What a gRPC service implements to be served by [`serve`]. Handlers work on raw payloads
/// plus typed helpers ([`codec::decode`], [`reply`], [`RequestStream::message`],
/// [`ResponseSender::send`]) so one trait serves any protobuf service without codegen.
pub trait Service: Send + Sync + 'static {
    /// The kind of the method at `path` (e.g. `/tts.TTSService/Control`), or `None` if the
    /// service has no such method (the server answers UNIMPLEMENTED).
    fn method_kind(&self, path: &str) -> Option<MethodKind>;

    /// Handles a unary call: `request` is the message payload (decode it with
    /// [`codec::decode`]); return an encoded response from [`reply`].
    fn unary(
        &self,
        path: &str,
        request: Bytes,
    ) -> impl Future<Output = Result<Bytes, Status>> + Send;

    /// Handles a streaming call. Return `Ok(())` for grpc-status OK. The future is dropped
    /// if the client cancels or the deadline passes, so work tied to it stops at once.
    fn streaming(
        &self,
        path: &str,
        requests: RequestStream,
        responses: ResponseSender,
    ) -> impl Future<Output = Result<(), Status>> + Send;
}

/// Encodes a unary handler's response message (the `Bytes` that [`Service::unary`] returns).
pub fn reply<M: Message>(msg: &M) -> Result<Bytes, Status> {
    codec::encode(msg)
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest accepted request message.
    pub max_message: usize,
    /// Per-stream receive window (what each client may send before we read).
    pub stream_window: u32,
    /// Connection receive window.
    pub connection_window: u32,
    /// How long a graceful shutdown waits for open calls before dropping them.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_message: DEFAULT_MAX_MESSAGE,
            stream_window: 1024 * 1024,
            connection_window: 4 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// Serves `service` on `listener` until `shutdown` completes, then stops accepting, sends
/// GOAWAY on every connection and waits up to `config.shutdown_grace` for open calls.
/// Transient accept errors (e.g. out of file descriptors) are logged and retried, never fatal.
pub async fn serve<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send,
) {
    let config = Arc::new(config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((socket, peer)) => {
                    if let Err(e) = socket.set_nodelay(true) {
                        warn!(%peer, "cannot set TCP_NODELAY: {e}");
                    }
                    debug!(%peer, "accepted gRPC connection");
                    connections.spawn(serve_connection(
                        socket,
                        service.clone(),
                        config.clone(),
                        stop_rx.clone(),
                    ));
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    info!("gRPC server shutting down");
    stop_tx.send_replace(true);
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            "{} connection(s) still open after {:?}: closing them",
            connections.len(),
            config.shutdown_grace
        );
        connections.shutdown().await;
    }
}

/// Drives one HTTP/2 connection: accepts streams and hands each to its own task.
async fn serve_connection<S: Service>(
    socket: TcpStream,
    service: Arc<S>,
    config: Arc<ServerConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let peer = socket.peer_addr().ok();
    let handshake = h2::server::Builder::new()
        .initial_window_size(config.stream_window)
        .initial_connection_window_size(config.connection_window)
        // Barge-in cancels streams all the time; h2's rapid-reset guard (20 streams reset
        // before we accepted them) would GOAWAY a busy orchestrator connection.
        .max_pending_accept_reset_streams(1024)
        .handshake::<_, Bytes>(socket);
    // A peer that connects and says nothing must not hold a task forever.
    let mut conn = tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(10), handshake) => match r {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                debug!(?peer, "HTTP/2 handshake failed: {e}");
                return;
            }
            Err(_) => {
                debug!(?peer, "HTTP/2 handshake timed out");
                return;
            }
        },
        _ = stop.wait_for(|s| *s) => return,
    };
    // Streams of this connection: aborted when the connection ends, so a handler never
    // outlives its transport.
    let mut streams = JoinSet::new();
    let mut stopping = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    streams.spawn(handle_stream(service.clone(), config.clone(), request, respond));
                }
                Some(Err(e)) => {
                    debug!(?peer, "connection error: {e}");
                    break;
                }
                None => break,
            },
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.graceful_shutdown();
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    debug!(?peer, "gRPC connection closed");
}

/// Admission, dispatch and status of one call.
async fn handle_stream<S: Service>(
    service: Arc<S>,
    config: Arc<ServerConfig>,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();

    if parts.method != Method::POST {
        send_http_error(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        return;
    }
    if !is_grpc_content_type(&parts.headers) {
        // gRPC spec: a non-gRPC content-type gets HTTP 415.
        send_http_error(&mut respond, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        return;
    }
    let Some(kind) = service.method_kind(&path) else {
        debug!(%path, "unknown method");
        send_trailers_only(
            &mut respond,
            &Status::unimplemented(format!("unknown method {path}")),
        );
        return;
    };
    let deadline = match parts.headers.get(timeout::GRPC_TIMEOUT) {
        None => None,
        Some(v) => match v
            .to_str()
            .map_err(|e| e.to_string())
            .and_then(timeout::parse)
        {
            Ok(t) => Some(Instant::now() + t),
            Err(e) => {
                send_trailers_only(&mut respond, &Status::internal(e));
                return;
            }
        },
    };

    let sender = ResponseSender::new(respond);
    let watcher = sender.shared.clone();
    let requests = RequestStream::new(body, config.max_message);
    let work = async {
        match kind {
            MethodKind::Unary => run_unary(&*service, &path, requests, sender).await,
            MethodKind::Streaming => service.streaming(&path, requests, sender).await,
        }
    };
    let outcome = tokio::select! {
        biased;
        r = work => r,
        reason = client_reset(&watcher) => {
            debug!(%path, "client cancelled the call ({reason})");
            return;
        }
        _ = sleep_until(deadline) => {
            debug!(%path, "deadline exceeded");
            Err(Status::deadline_exceeded(format!("{path}: deadline exceeded")))
        }
    };
    let status = outcome.err().unwrap_or_else(Status::ok);
    if !status.is_ok() {
        debug!(%path, %status, "call failed");
    }
    finish(&watcher, &status);
}

async fn run_unary<S: Service>(
    service: &S,
    path: &str,
    mut requests: RequestStream,
    mut sender: ResponseSender,
) -> Result<(), Status> {
    let request = requests
        .next_payload()
        .await?
        .ok_or_else(|| Status::internal(format!("{path}: unary call without a request message")))?;
    if requests.next_payload().await?.is_some() {
        return Err(Status::internal(format!(
            "{path}: unary call with more than one request message"
        )));
    }
    let response = service.unary(path, request).await?;
    sender.send_encoded(response).await
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn grpc_headers() -> HeaderMap {
    let mut h = HeaderMap::with_capacity(3);
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h
}

fn response_head(headers: HeaderMap) -> Response<()> {
    let mut response = Response::new(());
    *response.headers_mut() = headers;
    response
}

fn send_trailers_only(respond: &mut SendResponse<Bytes>, status: &Status) {
    let mut headers = grpc_headers();
    status.add_to_headers(&mut headers);
    if let Err(e) = respond.send_response(response_head(headers), true) {
        debug!("cannot send trailers-only response: {e}");
    }
}

fn send_http_error(respond: &mut SendResponse<Bytes>, code: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = code;
    if let Err(e) = respond.send_response(response, true) {
        debug!("cannot send HTTP error response: {e}");
    }
}

/// Response side of a call, shared between the handler (sending messages) and the server
/// (watching for RST_STREAM, sending the final status). Both run in the same task, so the
/// lock is never contended; it exists because the handler future must be `Send`.
struct SendState {
    respond: SendResponse<Bytes>,
    /// Present once the response headers went out.
    stream: Option<SendStream<Bytes>>,
}

fn lock(shared: &Mutex<SendState>) -> MutexGuard<'_, SendState> {
    // Every update of SendState is a single assignment; a poisoned lock is still consistent.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Resolves when the client resets the stream (or the connection dies).
async fn client_reset(shared: &Mutex<SendState>) -> String {
    std::future::poll_fn(|cx| {
        let mut st = lock(shared);
        let polled = match st.stream.as_mut() {
            Some(stream) => stream.poll_reset(cx),
            None => st.respond.poll_reset(cx),
        };
        match polled {
            Poll::Ready(Ok(reason)) => Poll::Ready(format!("RST_STREAM {reason:?}")),
            Poll::Ready(Err(e)) => Poll::Ready(e.to_string()),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Sends the final status: trailers after a body, or a trailers-only response.
fn finish(shared: &Mutex<SendState>, status: &Status) {
    let mut st = lock(shared);
    let result = match st.stream.as_mut() {
        Some(stream) => stream.send_trailers(status.to_header_map()),
        None => {
            let mut headers = grpc_headers();
            status.add_to_headers(&mut headers);
            st.respond
                .send_response(response_head(headers), true)
                .map(|_| ())
        }
    };
    if let Err(e) = result {
        debug!("cannot send status {status}: {e}");
    }
}

/// Sends response messages of a call. Sending waits for HTTP/2 flow-control capacity, so a
/// slow reader slows the handler down instead of making the server buffer without bound.
pub struct ResponseSender {
    shared: Arc<Mutex<SendState>>,
}

impl ResponseSender {
    fn new(respond: SendResponse<Bytes>) -> ResponseSender {
        ResponseSender {
            shared: Arc::new(Mutex::new(SendState {
                respond,
                stream: None,
            })),
        }
    }

    /// Encodes and sends one message (the response headers go out with the first one).
    pub async fn send<M: Message>(&mut self, msg: &M) -> Result<(), Status> {
        self.send_encoded(codec::encode(msg)?).await
    }

    /// Sends the response headers now instead of with the first message: tells the client
    /// the call was accepted (clients such as tonic time out a call whose headers are late,
    /// whatever the body does). After this, errors go in trailers instead of a trailers-only
    /// response. Idempotent.
    pub fn send_headers(&mut self) -> Result<(), Status> {
        let mut st = lock(&self.shared);
        if st.stream.is_none() {
            let stream = st
                .respond
                .send_response(response_head(grpc_headers()), false)
                .map_err(|e| Status::from_h2(&e))?;
            st.stream = Some(stream);
        }
        Ok(())
    }

    /// Sends one already-encoded message (5-byte prefix included).
    pub async fn send_encoded(&mut self, mut data: Bytes) -> Result<(), Status> {
        self.send_headers()?;
        while !data.is_empty() {
            let want = data.len();
            let capacity = std::future::poll_fn(|cx| {
                let mut st = lock(&self.shared);
                let Some(stream) = st.stream.as_mut() else {
                    return Poll::Ready(Err(Status::internal("response stream missing")));
                };
                stream.reserve_capacity(want);
                let now = stream.capacity();
                if now > 0 {
                    return Poll::Ready(Ok(now));
                }
                match stream.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(n))) => Poll::Ready(Ok(n)),
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Err(Status::from_h2(&e))),
                    Poll::Ready(None) => {
                        Poll::Ready(Err(Status::cancelled("response stream closed by peer")))
                    }
                    Poll::Pending => Poll::Pending,
                }
            })
            .await?;
            let chunk = data.split_to(capacity.min(data.len()));
            let mut st = lock(&self.shared);
            let Some(stream) = st.stream.as_mut() else {
                return Err(Status::internal("response stream missing"));
            };
            stream
                .send_data(chunk, false)
                .map_err(|e| Status::from_h2(&e))?;
        }
        Ok(())
    }
}

/// Request messages of a call, decoded as they arrive; flow-control window is released as
/// they are consumed.
pub struct RequestStream {
    body: RecvStream,
    decoder: Decoder,
    ended: bool,
}

impl RequestStream {
    fn new(body: RecvStream, max_message: usize) -> RequestStream {
        RequestStream {
            body,
            decoder: Decoder::new(max_message),
            ended: false,
        }
    }

    /// The next request message, `Ok(None)` when the client half-closed, `Err(CANCELLED)` when
    /// it reset the stream. Cancel-safe, so handlers can use it inside `tokio::select!`.
    pub async fn message<M: Message + Default>(&mut self) -> Result<Option<M>, Status> {
        match self.next_payload().await? {
            Some(payload) => codec::decode(payload).map(Some),
            None => Ok(None),
        }
    }

    /// The next raw payload (see [`RequestStream::message`]).
    pub async fn next_payload(&mut self) -> Result<Option<Bytes>, Status> {
        loop {
            if let Some(payload) = self.decoder.next_message()? {
                return Ok(Some(payload));
            }
            if self.ended {
                self.decoder.finish()?;
                return Ok(None);
            }
            match self.body.data().await {
                Some(Ok(chunk)) => {
                    let _ = self.body.flow_control().release_capacity(chunk.len());
                    self.decoder.push(chunk);
                }
                Some(Err(e)) => return Err(Status::from_h2(&e)),
                None => self.ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Our client against our server on loopback, with a tiny echo service.
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::grpc::client::{Client, ClientOptions};
    use crate::grpc::status::Code;
    use crate::proto::{AudioFrame, TextChunk};

    #[derive(Default)]
    struct Echo {
        /// Streaming handlers currently running (to observe cancellation).
        running: AtomicUsize,
    }

    struct Running<'a>(&'a AtomicUsize);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Service for Echo {
        fn method_kind(&self, path: &str) -> Option<MethodKind> {
            match path {
                "/t.Echo/Unary" | "/t.Echo/Fail" => Some(MethodKind::Unary),
                "/t.Echo/Stream" => Some(MethodKind::Streaming),
                _ => None,
            }
        }

        async fn unary(&self, path: &str, request: Bytes) -> Result<Bytes, Status> {
            let chunk: TextChunk = codec::decode(request)?;
            if path == "/t.Echo/Fail" {
                return Err(Status::not_found(format!("no {}: 100%", chunk.text)));
            }
            reply(&TextChunk {
                text: chunk.text.to_uppercase(),
                ..chunk
            })
        }

        async fn streaming(
            &self,
            _path: &str,
            mut requests: RequestStream,
            mut responses: ResponseSender,
        ) -> Result<(), Status> {
            self.running.fetch_add(1, Ordering::SeqCst);
            let _guard = Running(&self.running);
            let mut seq = 0;
            while let Some(chunk) = requests.message::<TextChunk>().await? {
                if chunk.text == "slow" {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                for _ in 0..chunk.sequence_number {
                    seq += 1;
                    responses
                        .send(&AudioFrame {
                            session_id: chunk.session_id.clone(),
                            audio_data: Bytes::from(vec![7u8; 1920]),
                            sequence_number: seq,
                            ..Default::default()
                        })
                        .await?;
                }
            }
            Ok(())
        }
    }

    async fn start() -> (Client, Arc<Echo>, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let echo = Arc::new(Echo::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(
            listener,
            echo.clone(),
            ServerConfig::default(),
            async {
                let _ = rx.await;
            },
        ));
        let client = Client::connect(&format!("grpc://{addr}"), &ClientOptions::default())
            .await
            .unwrap();
        (client, echo, tx)
    }

    fn chunk(text: &str, n: i64) -> TextChunk {
        TextChunk {
            session_id: "s".into(),
            text: text.into(),
            is_final: false,
            sequence_number: n,
        }
    }

    #[tokio::test]
    async fn unary_ok_error_and_unknown_method() {
        let (client, _echo, _stop) = start().await;
        let r: TextChunk = client
            .unary("/t.Echo/Unary", &chunk("hello", 0), None)
            .await
            .unwrap();
        assert_eq!(r.text, "HELLO");
        let e = client
            .unary::<_, TextChunk>("/t.Echo/Fail", &chunk("x", 0), None)
            .await
            .unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (Code::NotFound, "no x: 100%"));
        let e = client
            .unary::<_, TextChunk>("/t.Echo/Nope", &chunk("x", 0), None)
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::Unimplemented);
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn bidi_streaming_with_many_concurrent_calls() {
        let (client, _echo, _stop) = start().await;
        let mut calls = Vec::new();
        for i in 0..20 {
            let client = client.clone();
            calls.push(tokio::spawn(async move {
                let (mut tx, mut rx) = client
                    .streaming::<TextChunk, AudioFrame>("/t.Echo/Stream", None)
                    .await
                    .unwrap();
                tx.send(&chunk("a", 3)).unwrap();
                tx.send(&chunk("b", 2 + i)).unwrap();
                tx.finish().unwrap();
                let mut n = 0;
                while let Some(f) = rx.message().await.unwrap() {
                    n += 1;
                    assert_eq!(f.sequence_number, n);
                    assert_eq!(f.audio_data.len(), 1920);
                }
                assert_eq!(n, 5 + i);
            }));
        }
        for c in calls {
            tokio::time::timeout(Duration::from_secs(20), c)
                .await
                .unwrap()
                .unwrap();
        }
    }

    #[tokio::test]
    async fn deadline_is_enforced() {
        let (client, _echo, _stop) = start().await;
        let (mut tx, mut rx) = client
            .streaming::<TextChunk, AudioFrame>("/t.Echo/Stream", Some(Duration::from_millis(200)))
            .await
            .unwrap();
        tx.send(&chunk("slow", 1)).unwrap();
        let e = tokio::time::timeout(Duration::from_secs(10), rx.message())
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code, Code::DeadlineExceeded);
    }

    #[tokio::test]
    async fn dropping_the_response_stream_cancels_the_handler() {
        let (client, echo, _stop) = start().await;
        let (mut tx, rx) = client
            .streaming::<TextChunk, AudioFrame>("/t.Echo/Stream", None)
            .await
            .unwrap();
        tx.send(&chunk("slow", 1)).unwrap();
        let t0 = Instant::now();
        while echo.running.load(Ordering::SeqCst) == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "handler never started"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(rx);
        while echo.running.load(Ordering::SeqCst) != 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "handler not cancelled"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The connection is still fine for new calls.
        let r: TextChunk = client
            .unary("/t.Echo/Unary", &chunk("ok", 0), None)
            .await
            .unwrap();
        assert_eq!(r.text, "OK");
    }

    #[tokio::test]
    async fn server_shutdown_closes_the_client() {
        let (client, _echo, stop) = start().await;
        let _: TextChunk = client
            .unary("/t.Echo/Unary", &chunk("x", 0), None)
            .await
            .unwrap();
        stop.send(()).unwrap();
        let t0 = Instant::now();
        while !client.is_closed() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "client never noticed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let e = client
            .unary::<_, TextChunk>("/t.Echo/Unary", &chunk("x", 0), None)
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::Unavailable);
    }
}
