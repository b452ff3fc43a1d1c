//! gRPC client over one raw HTTP/2 connection (`h2`: prior knowledge over TCP, or ALPN `h2`
//! over TLS when [`ClientOptions::tls`] is set).
//!
//! One [`Client`] is one TCP connection carrying many concurrent calls (HTTP/2 streams);
//! cloning it is cheap. The connection is driven by a task spawned with `tokio::spawn`, so the
//! client works both in a multi-thread tokio runtime and inside a `tokio_uring` runtime (a
//! current-thread tokio runtime with a `LocalSet`): every future here is `Send` because the
//! socket is a plain `tokio::net::TcpStream`.
//!
//! Life of a call: [`Client::streaming`] sends the request headers and returns a
//! [`RequestSink`] (synchronous `send`, because h2 buffers DATA frames and the orchestrator
//! pushes text from sync code) and a [`ResponseStream`] (async `message`). Dropping the
//! response stream of an unfinished call resets the stream with `RST_STREAM(CANCEL)`, which
//! is how a barge-in tells the worker to stop synthesising.
//!
//! Liveness: HTTP/2 PINGs every `keepalive_interval` while no call is open, and one PING when
//! open calls have received nothing for `active_ping_interval`; a PONG missing for
//! `keepalive_timeout` tears the connection down, failing every open call with UNAVAILABLE
//! and flipping [`Client::is_closed`]. A dead worker is noticed by its socket at once; a
//! SIGSTOPped or frozen one keeps its socket open, and the PING sent when its calls go quiet
//! is what notices it, about a second after its last frame. A PONG does not depend on the model: the worker's HTTP/2
//! layer answers it while a slow synthesis computes, so a slow model is not mistaken for a
//! frozen process (the per-frame stall deadline above this layer handles hung models).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use prost::Message;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::codec::{self, Decoder, DEFAULT_MAX_MESSAGE};
use super::status::{Code, Status};
use super::timeout;

/// Per-stream receive window: about 5 s of 48 kHz audio frames per call before the worker
/// has to wait for us, so flow control never throttles a healthy stream.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// Connection receive window: the largest HTTP/2 allows, so the connection never limits a
/// stream before its own window does.
///
/// *Changed after measuring:* it was 4 MiB. Sessions stop reading a stream once 500 frames
/// (~1 MiB) wait for playback, and unread bytes hold the *connection's* window too, so four
/// fast long utterances on one core's connection filled it and every new session's first
/// frame waited behind them (23–58 ms with 6–20 such sessions, 0.5 ms with 3). Flow control
/// per stream alone bounds memory: at most one stream window per session.
pub const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// Connection settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Budget for the TCP connect plus HTTP/2 handshake. Workers sit on the same LAN, so a
    /// connect slower than 1 s means the worker is gone and the caller should try another.
    pub connect_timeout: Duration,
    /// Time between keepalive PINGs while no call is open (`Duration::ZERO` disables
    /// keepalive). 5 s bounds how long an idle dead worker goes unnoticed at the cost of one
    /// 17-byte frame per interval.
    pub keepalive_interval: Duration,
    /// How long open calls may receive nothing before the connection gets a PING (one per
    /// quiet stretch, see `keepalive`): a frozen worker is then noticed within this plus
    /// `keepalive_timeout` of its last frame, before a listener hears much silence.
    pub active_ping_interval: Duration,
    /// How long to wait for the PONG before declaring the connection dead. The worker's
    /// HTTP/2 layer answers PINGs whatever its model is doing, so 1 s is far past a healthy
    /// answer even on a loaded machine (a PONG takes well under a millisecond on loopback).
    pub keepalive_timeout: Duration,
    /// Sent as `authorization` on every call: the worker token (`duplex worker
    /// --worker-token-file`); `None` sends nothing.
    pub authorization: Option<super::tts::WorkerAuth>,
    /// Speak TLS (`grpcs://`) trusting this configuration's roots; `None`: plain TCP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(5),
            active_ping_interval: Duration::from_millis(250),
            keepalive_timeout: Duration::from_secs(1),
            authorization: None,
            tls: None,
        }
    }
}

/// A TLS configuration for workers (`--worker-ca`): trusts the PEM certificates in `ca`,
/// offers ALPN `h2`.
pub fn tls_config(ca: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    crate::trust::client_config(ca, b"h2")
}

/// Handle to one HTTP/2 connection to a gRPC server; cheap to clone (all clones share the
/// connection and its streams).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    send: SendRequest<Bytes>,
    /// `host:port` used for the `:authority` pseudo-header.
    authority: http::uri::Authority,
    /// The `authorization` header of every call, built once (cloning it per call is a
    /// reference-count increment).
    authorization: Option<HeaderValue>,
    /// `https` over TLS, else `http` (the `:scheme` pseudo-header).
    scheme: &'static str,
    /// Becomes true when the connection task ends (peer gone, keepalive timeout, error).
    dead: watch::Receiver<bool>,
    /// Set when the server refused a new stream because it is going away (GOAWAY): existing
    /// calls may finish, but the client must not be used for new ones.
    draining: AtomicBool,
    /// Open calls and messages received, watched by the keepalive task.
    activity: Arc<Activity>,
}

impl Client {
    /// True when both handles share one HTTP/2 connection (worker sessions are tied to the
    /// connection that opened them, so a caller that reconnected must open its session again).
    pub fn same_connection(&self, other: &Client) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("authority", &self.inner.authority)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Splits `"grpc://host:port"`, `"grpcs://host:port"`, `"http(s)://host:port"` or
/// `"host:port"` into the authority (whether TLS is spoken is [`ClientOptions::tls`]'s call).
fn parse_addr(addr: &str) -> Result<http::uri::Authority, Status> {
    let rest = ["grpc://", "grpcs://", "http://", "https://"]
        .iter()
        .find_map(|p| addr.strip_prefix(p))
        .unwrap_or(addr);
    let rest = rest.trim_end_matches('/');
    let authority: http::uri::Authority = rest
        .parse()
        .map_err(|e| Status::invalid_argument(format!("invalid worker address {addr:?}: {e}")))?;
    if authority.port_u16().is_none() {
        return Err(Status::invalid_argument(format!(
            "invalid worker address {addr:?}: expected host:port"
        )));
    }
    Ok(authority)
}

/// The HTTP/2 connection future, boxed so plain and TLS connections are one type (one
/// indirection per poll of the connection task, not per frame).
type ConnFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), h2::Error>> + Send>>;

/// The HTTP/2 handshake over `io` with our settings.
async fn h2_handshake<T>(
    io: T,
    target: &str,
) -> Result<(SendRequest<Bytes>, Option<h2::PingPong>, ConnFuture), Status>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .enable_push(false)
        // Every barge-in resets a stream; remember enough of them to ignore the
        // frames still in flight for each (h2's default is 50).
        .max_concurrent_reset_streams(1024)
        // h2 closes the connection after 1,024 streams it reset itself (a guard for
        // servers facing hostile clients). Dropping an unfinished call is how a STOP
        // cancels synthesis, so one client's STOP flood would tear down the
        // connection every session on the core shares; the peer is our worker, and
        // a client's STOPs are bounded by its message rate limit instead.
        .max_local_error_reset_streams(None)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| Status::unavailable(format!("HTTP/2 handshake with {target}: {e}")))?;
    let ping_pong = conn.ping_pong();
    Ok((send, ping_pong, Box::pin(conn)))
}

impl Client {
    /// Opens the TCP connection (TCP_NODELAY: without it the small frames of an audio stream
    /// stall on delayed ACKs) and the HTTP/2 connection with prior knowledge. Refused, timed
    /// out or failed connections are UNAVAILABLE so the caller can try another worker.
    pub async fn connect(addr: &str, opts: &ClientOptions) -> Result<Client, Status> {
        let authority = parse_addr(addr)?;
        let target = authority.as_str().to_owned();
        let handshake = async {
            let tcp = TcpStream::connect(&target)
                .await
                .map_err(|e| Status::unavailable(format!("cannot connect to {target}: {e}")))?;
            tcp.set_nodelay(true)
                .map_err(|e| Status::unavailable(format!("cannot set TCP_NODELAY: {e}")))?;
            match &opts.tls {
                None => h2_handshake(tcp, &target).await,
                Some(tls) => {
                    let host = authority
                        .host()
                        .trim_start_matches('[')
                        .trim_end_matches(']');
                    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                        .map_err(|e| Status::invalid_argument(format!("TLS name {host:?}: {e}")))?;
                    let io = tokio_rustls::TlsConnector::from(tls.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| Status::unavailable(format!("TLS with {target}: {e}")))?;
                    h2_handshake(io, &target).await
                }
            }
        };
        let (send, ping_pong, conn) = tokio::time::timeout(opts.connect_timeout, handshake)
            .await
            .map_err(|_| {
                Status::unavailable(format!(
                    "connecting to {target} timed out after {:?}",
                    opts.connect_timeout
                ))
            })??;

        let (dead_tx, dead_rx) = watch::channel(false);
        let mut conn = conn;
        let activity = Arc::new(Activity::default());
        let pings = Pings {
            interval: opts.keepalive_interval,
            active_interval: opts.active_ping_interval,
            timeout: opts.keepalive_timeout,
            activity: activity.clone(),
        };
        let peer = target.clone();
        tokio::spawn(async move {
            let keepalive = keepalive(ping_pong, pings);
            let reason = tokio::select! {
                r = &mut conn => match r {
                    Ok(()) => "connection closed".to_owned(),
                    Err(e) => format!("connection error: {e}"),
                },
                r = keepalive => r,
            };
            // Dropping `conn` here fails every stream still open (h2 reports EOF to them).
            drop(conn);
            debug!(peer = %peer, %reason, "gRPC connection ended");
            dead_tx.send_replace(true);
        });

        Ok(Client {
            inner: Arc::new(Inner {
                send,
                authority,
                authorization: opts.authorization.as_ref().map(|a| a.header().clone()),
                scheme: if opts.tls.is_some() { "https" } else { "http" },
                dead: dead_rx,
                draining: AtomicBool::new(false),
                activity,
            }),
        })
    }

    /// True once the connection can no longer carry new calls: the peer closed it, sent
    /// GOAWAY, or stopped answering keepalive PINGs. The orchestrator then reconnects or
    /// picks another worker.
    pub fn is_closed(&self) -> bool {
        *self.inner.dead.borrow() || self.inner.draining.load(Ordering::Relaxed)
    }

    /// One request, one response. `timeout` is sent as `grpc-timeout` and enforced locally.
    pub async fn unary<Req: Message, Resp: Message + Default>(
        &self,
        path: &str,
        req: &Req,
        timeout: Option<Duration>,
    ) -> Result<Resp, Status> {
        let (mut sink, mut stream) = self.streaming::<Req, Resp>(path, timeout).await?;
        if let Err(send_err) = sink.send(req).and_then(|()| sink.finish()) {
            // The server may already have answered (e.g. UNIMPLEMENTED, trailers-only) and
            // reset the stream; its status explains the failure better than ours.
            return Err(match stream.message().await {
                Err(status) => status,
                Ok(_) => send_err,
            });
        }
        let msg = stream
            .message()
            .await?
            .ok_or_else(|| Status::internal(format!("{path}: server sent no response message")))?;
        match stream.message().await? {
            None => Ok(msg),
            Some(_) => Err(Status::internal(format!(
                "{path}: server sent more than one response message to a unary call"
            ))),
        }
    }

    /// Starts a streaming call (client, server or bidi streaming are all this on the wire).
    /// The request headers go out at once; the server's verdict (e.g. UNIMPLEMENTED) arrives
    /// through [`ResponseStream::message`]. `timeout` bounds the whole call.
    pub async fn streaming<Req: Message, Resp: Message + Default>(
        &self,
        path: &str,
        timeout: Option<Duration>,
    ) -> Result<(RequestSink<Req>, ResponseStream<Resp>), Status> {
        let deadline = timeout.map(|t| Instant::now() + t);
        if *self.inner.dead.borrow() {
            return Err(Status::unavailable("connection is closed"));
        }
        let request = self.build_request(path, timeout)?;

        let mut dead = self.inner.dead.clone();
        let ready = self.inner.send.clone().ready();
        let send = tokio::select! {
            biased;
            r = ready => r.map_err(|e| self.conn_error(&e)),
            _ = dead.wait_for(|d| *d) => Err(Status::unavailable("connection is closed")),
            _ = sleep_until(deadline) => Err(Status::deadline_exceeded(format!(
                "{path}: deadline exceeded waiting for a free HTTP/2 stream"
            ))),
        };
        let mut send = send?;
        let (response, stream) = send
            .send_request(request, false)
            .map_err(|e| self.conn_error(&e))?;
        let call = Arc::new(Mutex::new(CallSend {
            stream,
            finished: false,
            cancelled: false,
        }));
        let open = OpenCall::new(&self.inner.activity);
        Ok((
            RequestSink {
                call: call.clone(),
                _marker: PhantomData,
            },
            ResponseStream {
                state: RecvState::Headers(response),
                decoder: Decoder::new(DEFAULT_MAX_MESSAGE),
                call,
                deadline,
                dead: self.inner.dead.clone(),
                path: path.to_owned(),
                open,
                _marker: PhantomData,
            },
        ))
    }

    fn build_request(&self, path: &str, timeout: Option<Duration>) -> Result<Request<()>, Status> {
        let uri = Uri::builder()
            .scheme(self.inner.scheme)
            .authority(self.inner.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| Status::invalid_argument(format!("invalid method path {path:?}: {e}")))?;
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(http::header::USER_AGENT, "duplex-grpc/0.1");
        if let Some(t) = timeout {
            builder = builder.header(timeout::GRPC_TIMEOUT, timeout::format(t));
        }
        if let Some(auth) = &self.inner.authorization {
            builder = builder.header(http::header::AUTHORIZATION, auth.clone());
        }
        builder
            .body(())
            .map_err(|e| Status::internal(format!("cannot build request: {e}")))
    }

    /// Maps an error of `ready`/`send_request` and remembers a GOAWAY.
    fn conn_error(&self, err: &h2::Error) -> Status {
        if err.is_go_away() || err.is_io() {
            self.inner.draining.store(true, Ordering::Relaxed);
        }
        let mut status = Status::from_h2(err);
        if status.code != Code::Unavailable && (err.is_go_away() || err.is_io()) {
            status.code = Code::Unavailable;
        }
        status
    }
}

/// When the keepalive task PINGs (see [`ClientOptions`]).
struct Pings {
    interval: Duration,
    active_interval: Duration,
    timeout: Duration,
    activity: Arc<Activity>,
}

/// What the keepalive task knows of the calls on its connection.
#[derive(Default)]
struct Activity {
    /// Calls whose response stream is alive.
    open_calls: AtomicUsize,
    /// Messages received on any call (wrapping; only changes matter).
    received: AtomicU64,
}

impl Activity {
    /// One message arrived. A plain load and store, not a locked add: the count only has to
    /// change, and this runs once per audio frame.
    fn message(&self) {
        let n = self.received.load(Ordering::Relaxed);
        self.received.store(n.wrapping_add(1), Ordering::Relaxed);
    }
}

/// Sends PINGs; returns (with the reason) when one is not answered in time.
///
/// While no call is open: one PING every `interval`. While calls are open, arriving messages
/// prove the worker alive; after `active_interval` without any, one PING, and no other until
/// messages flow again or `interval` has passed. That notices a frozen worker within
/// `active_interval + timeout` of its last frame, and keeps us within what gRPC's C core
/// (the Python workers) tolerates: it closes a connection that receives more than two PINGs
/// between the frames it sends (`too_many_pings`), and each PING here follows a frame the
/// worker sent, or one of its answers to the 1 s health probe, or 5 s of quiet.
async fn keepalive(ping_pong: Option<h2::PingPong>, pings: Pings) -> String {
    let Some(mut ping_pong) = ping_pong.filter(|_| !pings.interval.is_zero()) else {
        return std::future::pending().await;
    };
    let tick = if pings.active_interval.is_zero() {
        pings.interval
    } else {
        pings.active_interval.min(pings.interval)
    };
    let mut last_ping = Instant::now();
    let mut seen = pings.activity.received.load(Ordering::Relaxed);
    // Whether this quiet stretch (calls open, no message) has had its PING.
    let mut quiet_pinged = false;
    loop {
        tokio::time::sleep(tick).await;
        let received = pings.activity.received.load(Ordering::Relaxed);
        let flowing = received != seen;
        seen = received;
        let active = pings.activity.open_calls.load(Ordering::Relaxed) > 0;
        if flowing || !active {
            quiet_pinged = false;
        }
        let due = if active && !flowing {
            !quiet_pinged || last_ping.elapsed() >= pings.interval
        } else {
            !active && last_ping.elapsed() >= pings.interval
        };
        if !due {
            continue;
        }
        quiet_pinged = active;
        last_ping = Instant::now();
        let ping = ping_pong.ping(h2::Ping::opaque());
        tokio::pin!(ping);
        let answer = match tokio::time::timeout(pings.timeout, &mut ping).await {
            Ok(answer) => Some(answer),
            // A core that was busy past the deadline wakes this timer in the same turn as
            // the socket with the PONG waiting in it, and may run the timer first. Let the
            // connection task read the socket (a yield lets the runtime poll its I/O driver)
            // before calling the worker frozen.
            Err(_) => {
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                tokio::time::timeout(Duration::ZERO, &mut ping).await.ok()
            }
        };
        match answer {
            Some(Ok(_pong)) => {}
            Some(Err(e)) => return format!("keepalive PING failed: {e}"),
            None => {
                warn!(
                    timeout = ?pings.timeout,
                    active,
                    "no PING ack in time: closing the connection"
                );
                return format!("keepalive timeout: no PING ack within {:?}", pings.timeout);
            }
        }
    }
}

/// Counts one open call for as long as its [`ResponseStream`] lives.
struct OpenCall(Arc<Activity>);

impl OpenCall {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.open_calls.fetch_add(1, Ordering::Relaxed);
        OpenCall(activity.clone())
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        self.0.open_calls.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Send half of a call, shared by the sink (sending) and the response stream (cancelling).
struct CallSend {
    stream: SendStream<Bytes>,
    finished: bool,
    cancelled: bool,
}

fn lock(call: &Mutex<CallSend>) -> MutexGuard<'_, CallSend> {
    // A panic while holding this lock cannot leave CallSend inconsistent (every update is a
    // single assignment), so a poisoned lock is safe to reuse.
    call.lock().unwrap_or_else(|p| p.into_inner())
}

/// The request half of a call. `send` is synchronous: h2 queues the DATA frame and the
/// connection task writes it, so sync code (the orchestrator's session state machine) can
/// push text chunks without awaiting.
pub struct RequestSink<Req> {
    call: Arc<Mutex<CallSend>>,
    _marker: PhantomData<fn(&Req)>,
}

impl<Req: Message> RequestSink<Req> {
    /// Queues one message. Fails after `finish`, after the call was cancelled, or when the
    /// stream was reset (the server ended the call or the connection died).
    pub fn send(&mut self, msg: &Req) -> Result<(), Status> {
        let data = codec::encode(msg)?;
        let mut call = lock(&self.call);
        if call.cancelled {
            return Err(Status::cancelled("call was cancelled"));
        }
        if call.finished {
            return Err(Status::internal("send after finish"));
        }
        call.stream
            .send_data(data, false)
            .map_err(|e| Status::from_h2(&e))
    }

    /// Half-closes the request side (END_STREAM): the server sees the end of the request
    /// stream. Idempotent.
    pub fn finish(&mut self) -> Result<(), Status> {
        let mut call = lock(&self.call);
        if call.finished || call.cancelled {
            return Ok(());
        }
        call.finished = true;
        call.stream
            .send_data(Bytes::new(), true)
            .map_err(|e| Status::from_h2(&e))
    }
}

impl<Req> Drop for RequestSink<Req> {
    /// A dropped sink means "no more requests": half-close so the server can finish.
    fn drop(&mut self) {
        let mut call = lock(&self.call);
        if !call.finished && !call.cancelled {
            call.finished = true;
            let _ = call.stream.send_data(Bytes::new(), true);
        }
    }
}

enum RecvState {
    /// Waiting for the response headers.
    Headers(ResponseFuture),
    /// Reading DATA frames.
    Body(RecvStream),
    /// The call is over; repeat its outcome to further `message` calls.
    Done(Result<(), Status>),
}

/// The response half of a call. Dropping it before the call ended cancels the call on the
/// wire (RST_STREAM CANCEL) so the server stops working for nobody.
pub struct ResponseStream<Resp> {
    state: RecvState,
    decoder: Decoder,
    call: Arc<Mutex<CallSend>>,
    deadline: Option<Instant>,
    dead: watch::Receiver<bool>,
    path: String,
    /// Counts this call as open and its messages as signs of life for the keepalive task.
    open: OpenCall,
    _marker: PhantomData<fn() -> Resp>,
}

impl<Resp: Message + Default> ResponseStream<Resp> {
    /// The next response message. `Ok(None)`: the call ended with grpc-status OK. `Err`: a
    /// non-OK status from the server, UNAVAILABLE when the connection died, or
    /// DEADLINE_EXCEEDED when the call's timeout passed (the call is then cancelled).
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn message(&mut self) -> Result<Option<Resp>, Status> {
        match self.next_payload().await {
            Ok(Some(payload)) => match codec::decode(payload) {
                Ok(msg) => Ok(Some(msg)),
                Err(status) => {
                    self.fail(status.clone());
                    Err(status)
                }
            },
            Ok(None) => Ok(None),
            Err(status) => Err(status),
        }
    }

    /// Next raw message payload; on error the call is marked done and cancelled.
    async fn next_payload(&mut self) -> Result<Option<Bytes>, Status> {
        if let RecvState::Done(outcome) = &self.state {
            return outcome.clone().map(|()| None);
        }
        enum Wake {
            Deadline,
            Read(Result<Option<Bytes>, Status>),
            Dead,
        }
        // Split borrows: the read, the deadline and the liveness watch run side by side
        // without cloning anything per message (this is the per-frame hot path).
        let ResponseStream {
            state,
            decoder,
            deadline,
            dead,
            ..
        } = self;
        // Deadline first: once it has passed the call has failed, even if a message (or the
        // server's own verdict on the expired call) is already waiting.
        let wake = tokio::select! {
            biased;
            _ = sleep_until(*deadline) => Wake::Deadline,
            r = read_payload(state, decoder) => Wake::Read(r),
            _ = dead.wait_for(|d| *d) => Wake::Dead,
        };
        let result = match wake {
            Wake::Read(r) => r,
            Wake::Deadline => Err(Status::deadline_exceeded(format!(
                "{}: deadline exceeded",
                self.path
            ))),
            Wake::Dead => Err(Status::unavailable(format!(
                "{}: connection lost",
                self.path
            ))),
        };
        match result {
            Ok(Some(p)) => {
                self.open.0.message();
                Ok(Some(p))
            }
            Ok(None) => {
                self.state = RecvState::Done(Ok(()));
                Ok(None)
            }
            Err(status) => {
                self.fail(status.clone());
                Err(status)
            }
        }
    }

    /// Ends the call with an error and resets the stream so the server stops.
    fn fail(&mut self, status: Status) {
        self.state = RecvState::Done(Err(status));
        self.cancel();
    }

    fn cancel(&mut self) {
        let mut call = lock(&self.call);
        if !call.cancelled {
            call.cancelled = true;
            call.stream.send_reset(h2::Reason::CANCEL);
        }
    }
}

impl<Resp> Drop for ResponseStream<Resp> {
    fn drop(&mut self) {
        if !matches!(self.state, RecvState::Done(Ok(()))) {
            let mut call = lock(&self.call);
            if !call.cancelled {
                call.cancelled = true;
                call.stream.send_reset(h2::Reason::CANCEL);
            }
        }
    }
}

/// Reads until a whole message is decoded or the stream ends. Cancel-safe: every await is
/// on h2 and state only changes after it returns.
async fn read_payload(
    state: &mut RecvState,
    decoder: &mut Decoder,
) -> Result<Option<Bytes>, Status> {
    loop {
        if let Some(payload) = decoder.next_message()? {
            return Ok(Some(payload));
        }
        match state {
            RecvState::Headers(fut) => {
                let response = fut.await.map_err(|e| Status::from_h2(&e))?;
                let (parts, body) = response.into_parts();
                check_response_headers(&parts)?;
                if body.is_end_stream() {
                    // Trailers-only response: the status is in the headers.
                    let status = Status::from_header_map(&parts.headers)
                        .ok_or_else(|| Status::internal("response ended without grpc-status"))?;
                    return status_to_end(status);
                }
                *state = RecvState::Body(body);
            }
            RecvState::Body(body) => match body.data().await {
                Some(Ok(chunk)) => {
                    // Release the window now: the decoder holds at most this chunk, and the
                    // caller consumes it before we pull the next one.
                    let _ = body.flow_control().release_capacity(chunk.len());
                    decoder.push(chunk);
                }
                Some(Err(e)) => return Err(Status::from_h2(&e)),
                None => {
                    let trailers = body.trailers().await.map_err(|e| Status::from_h2(&e))?;
                    decoder.finish()?;
                    let status = trailers
                        .as_ref()
                        .and_then(Status::from_header_map)
                        .ok_or_else(|| {
                            Status::internal("response ended without grpc-status trailer")
                        })?;
                    return status_to_end(status);
                }
            },
            RecvState::Done(outcome) => return outcome.clone().map(|()| None),
        }
    }
}

fn status_to_end(status: Status) -> Result<Option<Bytes>, Status> {
    if status.is_ok() {
        Ok(None)
    } else {
        Err(status)
    }
}

/// Validates HTTP status and content-type of a response, mapping failures per the gRPC
/// HTTP-to-gRPC status mapping.
fn check_response_headers(parts: &http::response::Parts) -> Result<(), Status> {
    if parts.status != http::StatusCode::OK {
        let detail = Status::from_header_map(&parts.headers)
            .map(|s| s.message)
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| format!("HTTP status {}", parts.status));
        return Err(Status::new(
            Code::from_http_status(parts.status),
            format!("server answered HTTP {}: {detail}", parts.status.as_u16()),
        ));
    }
    if !is_grpc_content_type(&parts.headers) {
        // A trailers-only error from a gRPC server may omit content-type; trust its status.
        if let Some(status) = Status::from_header_map(&parts.headers) {
            return if status.is_ok() { Ok(()) } else { Err(status) };
        }
        return Err(Status::unknown(format!(
            "response content-type {:?} is not application/grpc",
            parts.headers.get(http::header::CONTENT_TYPE)
        )));
    }
    Ok(())
}

/// True for `application/grpc` and its `+proto`-style variants.
pub(crate) fn is_grpc_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .is_some_and(|ct| {
            ct == "application/grpc"
                || ct.starts_with("application/grpc+")
                || ct.starts_with("application/grpc;")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_accept_scheme_or_plain() {
        assert_eq!(
            parse_addr("grpc://10.0.0.1:7001").unwrap().as_str(),
            "10.0.0.1:7001"
        );
        assert_eq!(parse_addr("http://w1:7001/").unwrap().as_str(), "w1:7001");
        assert_eq!(parse_addr("grpcs://w1:7443").unwrap().as_str(), "w1:7443");
        assert_eq!(
            parse_addr("localhost:7001").unwrap().as_str(),
            "localhost:7001"
        );
        assert_eq!(parse_addr("[::1]:7001").unwrap().as_str(), "[::1]:7001");
        for bad in ["", "grpc://", "host", "host:port", "a b:1"] {
            assert_eq!(
                parse_addr(bad).unwrap_err().code,
                Code::InvalidArgument,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn grpc_content_types() {
        let mut h = HeaderMap::new();
        assert!(!is_grpc_content_type(&h));
        for (ct, ok) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc; charset=x", true),
            ("application/json", false),
            ("application/grpcx", false),
        ] {
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc_content_type(&h), ok, "{ct}");
        }
    }

    #[test]
    fn default_options() {
        let o = ClientOptions::default();
        assert_eq!(o.connect_timeout, Duration::from_secs(1));
        assert_eq!(o.keepalive_interval, Duration::from_secs(5));
        assert_eq!(o.active_ping_interval, Duration::from_millis(250));
        assert_eq!(o.keepalive_timeout, Duration::from_secs(1));
        assert!(o.authorization.is_none());
    }

    #[test]
    fn call_futures_are_send() {
        // The orchestrator may drive calls from a multi-thread runtime: every future and
        // handle of a call must be Send.
        fn assert_send<T: Send>(_: &T) {}
        use crate::proto::{AudioFrame, TextChunk};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let opts = ClientOptions::default();
        let connect = Client::connect("127.0.0.1:1", &opts);
        assert_send(&connect);
        fn with_client(c: &Client) {
            assert_send(&c.unary::<TextChunk, AudioFrame>("/x/y", &TextChunk::default(), None));
            assert_send(&c.streaming::<TextChunk, AudioFrame>("/x/y", None));
        }
        fn with_call(tx: RequestSink<TextChunk>, mut rx: ResponseStream<AudioFrame>) {
            assert_send(&tx);
            assert_send(&rx.message());
            assert_send(&rx);
        }
        let _ = (with_client as fn(&Client), with_call as fn(_, _));
    }

    /// A bare h2 server answering every request with `status` and `content_type`.
    async fn raw_h2_server(status: u16, content_type: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                let response = http::Response::builder()
                    .status(status)
                    .header("content-type", content_type)
                    .body(())
                    .unwrap();
                let mut body = respond.send_response(response, false).unwrap();
                body.send_data(Bytes::from_static(b"<html>nope</html>"), true)
                    .unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn non_grpc_answers_map_to_grpc_codes() {
        use crate::proto::TextChunk;
        for (http_status, ct, code) in [
            (503, "text/html", Code::Unavailable),
            (404, "text/html", Code::Unimplemented),
            (401, "text/plain", Code::Unauthenticated),
            (500, "text/html", Code::Unknown),
            (200, "text/html", Code::Unknown),
        ] {
            let addr = raw_h2_server(http_status, ct).await;
            let client = Client::connect(&addr, &ClientOptions::default())
                .await
                .unwrap();
            let err = client
                .unary::<_, TextChunk>("/a/b", &TextChunk::default(), Some(Duration::from_secs(10)))
                .await
                .unwrap_err();
            assert_eq!(err.code, code, "HTTP {http_status}: {err}");
        }
    }

    #[tokio::test]
    async fn connect_refused_is_unavailable() {
        // Bind then drop to get a port that (almost certainly) refuses.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let err = Client::connect(&format!("127.0.0.1:{port}"), &ClientOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::Unavailable, "{err}");
    }
}
