//! Serving the worker with tonic: `tts.TTSService`, `grpc.health.v1.Health` and server
//! reflection (v1 and v1alpha) on one port, connection leases, the worker token, and the drain.
//!
//! - **Accept loop** (`incoming`): `TCP_NODELAY` (20 ms frames must not wait for Nagle),
//!   and each connection gets a [`ConnectionInfo`] (a process-unique id, seen by every request
//!   as an extension) and a lease whose drop, when the connection closes, ends the sessions
//!   it opened (see [`super::session`]).
//! - **Token** ([`TokenCheck`]): with `--worker-token-file`, `tts.TTSService` and reflection
//!   need `authorization: Bearer <token>` (UNAUTHENTICATED otherwise; compared in constant
//!   time). Health stays open: Kubernetes' gRPC probes and load balancers cannot send
//!   metadata, and SERVING / NOT_SERVING reveals nothing. Reflection is closed because it
//!   lists what the worker can do to anyone who asks.
//! - **Drain** ([`serve`]): when `stop` completes, health turns NOT_SERVING and `on_drain`
//!   runs (the Redis record is deleted) at once, StartSession and new Synthesize calls get
//!   UNAVAILABLE, open Synthesize calls run to their final frame for up to the drain time,
//!   then GOAWAY and a short grace.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::Stream;
use subtle::ConstantTimeEq as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::server::Connected;
use tonic::{Request, Status};
use tonic_health::ServingStatus;
use tracing::{debug, info, warn};

use super::service::{Grpc, TtsService};
use super::session::ConnId;
use crate::proto::tts_service_server::{TtsServiceServer, SERVICE_NAME};

/// The encoded `FileDescriptorSet` of proto/tts.proto (written by build.rs), for reflection.
pub const TTS_DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tts_descriptor.bin"));

/// Time between the server's HTTP/2 PINGs: a client that vanished without closing TCP (host
/// died, network cut) is noticed, its connection closed and its sessions ended.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection is considered dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// After the drain, how long GOAWAY'd connections get to close before the runtime drops them.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What every request knows about its connection (a request extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Unique for the life of the process, never reused (the session lease key).
    pub id: ConnId,
    /// The peer's address, for logs.
    pub remote: Option<SocketAddr>,
}

/// Ends the connection's sessions when dropped (the IO is dropped when the connection closes).
struct Lease {
    id: ConnId,
    service: Weak<TtsService>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(service) = self.service.upgrade() {
            service.end_connection(self.id);
        }
    }
}

/// A TCP connection with its [`ConnectionInfo`] and `Lease`.
pub struct LeasedConn {
    io: TcpStream,
    info: ConnectionInfo,
    _lease: Lease,
}

impl Connected for LeasedConn {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info
    }
}

impl AsyncRead for LeasedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for LeasedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepted connections, each leased to `service`. Accept errors (out of file descriptors,
/// a connection reset before accept) are logged and retried after a short pause, never
/// yielded: tonic would just skip them, and a busy loop on EMFILE would burn a core.
fn incoming(
    listener: TcpListener,
    service: Weak<TtsService>,
) -> impl Stream<Item = Result<LeasedConn, std::io::Error>> {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
    futures_util::stream::unfold((listener, service), |(listener, service)| async move {
        loop {
            match listener.accept().await {
                Ok((io, peer)) => {
                    if let Err(e) = io.set_nodelay(true) {
                        warn!(%peer, "cannot set TCP_NODELAY: {e}");
                    }
                    let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
                    debug!(%peer, conn = id, "accepted gRPC connection");
                    let conn = LeasedConn {
                        io,
                        info: ConnectionInfo {
                            id,
                            remote: Some(peer),
                        },
                        _lease: Lease {
                            id,
                            service: service.clone(),
                        },
                    };
                    return Some((Ok(conn), (listener, service)));
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    })
}

/// The shared secret of `--worker-token-file`, as the exact `authorization` value expected.
#[derive(Clone)]
pub struct WorkerToken {
    expected: Arc<[u8]>,
}

impl std::fmt::Debug for WorkerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerToken(<redacted>)")
    }
}

impl WorkerToken {
    /// A token from its text: surrounding whitespace (a trailing newline) is ignored; it must
    /// be non-empty visible ASCII (it travels in an HTTP/2 header).
    pub fn new(token: &str) -> anyhow::Result<WorkerToken> {
        let token = token.trim();
        if token.is_empty() {
            anyhow::bail!("the worker token is empty");
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!("the worker token must be visible ASCII without spaces");
        }
        Ok(WorkerToken {
            expected: format!("Bearer {token}").into_bytes().into(),
        })
    }

    /// Reads the token from `path` (see [`WorkerToken::new`]); errors name the file, never
    /// its content.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<WorkerToken> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --worker-token-file {}", path.display()))?;
        WorkerToken::new(&text)
            .with_context(|| format!("bad --worker-token-file {}", path.display()))
    }

    /// True when `authorization` is exactly `Bearer <token>` (constant time in the content).
    pub fn accepts(&self, authorization: &[u8]) -> bool {
        bool::from(self.expected.ct_eq(authorization))
    }
}

/// The interceptor in front of the token-protected services (a no-op without a token).
#[derive(Debug, Clone)]
pub struct TokenCheck {
    token: Option<WorkerToken>,
}

impl TokenCheck {
    /// Checks against `token`; `None` lets every request through.
    pub fn new(token: Option<WorkerToken>) -> TokenCheck {
        TokenCheck { token }
    }
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        match presented {
            Some(value) if token.accepts(value) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid worker token")),
            None => Err(Status::unauthenticated(
                "missing worker token: send authorization: Bearer <token> \
                 (the worker runs with --worker-token-file)",
            )),
        }
    }
}

/// How [`serve`] runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// `--worker-token-file`, if any.
    pub token: Option<WorkerToken>,
    /// `--tls-cert`/`--tls-key`: serve gRPC over TLS.
    pub tls: Option<tonic::transport::Identity>,
    /// `--drain-secs`: the longest wait for open Synthesize calls after `stop`.
    pub drain: Duration,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
}

impl ServeOptions {
    /// Streams per connection for `max_sessions` sessions: the orchestrator multiplexes every
    /// session of one core on one connection, each with a Synthesize and a few unary calls.
    pub fn streams_for(max_sessions: usize) -> u32 {
        u32::try_from(max_sessions.saturating_mul(2).saturating_add(100)).unwrap_or(u32::MAX)
    }
}

/// Serves `service` on `listener` until `stop` completes, then drains (see the module docs);
/// `on_drain` runs as the drain starts. Returns once the server has stopped.
pub async fn serve<D>(
    listener: TcpListener,
    service: Arc<TtsService>,
    options: ServeOptions,
    stop: impl Future<Output = ()> + Send,
    on_drain: D,
) -> anyhow::Result<()>
where
    D: Future<Output = ()> + Send,
{
    let (health, health_service) = tonic_health::server::health_reporter();
    let check = TokenCheck::new(options.token.clone());
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(TTS_DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(TTS_DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("cannot build the reflection service")?;
    // The same 4 MiB cap as our client: far above any real TextChunk, and a corrupt or hostile
    // length prefix cannot make the worker allocate more.
    let tts = TtsServiceServer::from_arc(Arc::new(Grpc(service.clone())))
        .max_decoding_message_size(crate::grpc::codec::DEFAULT_MAX_MESSAGE);

    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = &options.tls {
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity.clone()))
            .context("the worker's TLS certificate and key")?;
    }
    let server = builder
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(options.max_concurrent_streams))
        .initial_stream_window_size(Some(1024 * 1024))
        .initial_connection_window_size(Some(4 * 1024 * 1024))
        // Barge-in cancels streams all the time; h2's rapid-reset guard (20 streams reset
        // before they were accepted) would GOAWAY a busy orchestrator connection.
        .http2_max_pending_accept_reset_streams(Some(1024))
        .add_service(health_service)
        .add_service(InterceptedService::new(tts, check.clone()))
        .add_service(InterceptedService::new(reflection_v1, check.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, check))
        .serve_with_incoming_shutdown(incoming(listener, Arc::downgrade(&service)), async {
            let _ = close_rx.await;
        });
    let mut server = tokio::spawn(server);

    // Models are loaded before this is called: the worker can speak.
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;

    tokio::select! {
        () = stop => {}
        ended = &mut server => {
            // Only an accept-loop failure ends the server by itself.
            return match ended {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("the gRPC server failed")),
                Err(e) => Err(anyhow::anyhow!("the gRPC server task failed: {e}")),
            };
        }
    }

    service.begin_drain();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    let open = service.streams().count();
    info!(
        open_syntheses = open,
        "draining: refusing new sessions, waiting up to {:?} for open syntheses", options.drain
    );
    let drained = async {
        tokio::time::timeout(options.drain, service.streams().idle())
            .await
            .is_ok()
    };
    let ((), drained) = tokio::join!(on_drain, drained);
    if !drained {
        warn!(
            open_syntheses = service.streams().count(),
            "drain time over: closing the open syntheses"
        );
    }
    let _ = close_tx.send(());
    if tokio::time::timeout(CLOSE_GRACE, &mut server)
        .await
        .is_err()
    {
        debug!("connections still open after GOAWAY: dropping them");
        server.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_trimmed_checked_and_compared_exactly() {
        let t = WorkerToken::new("s3cret\n").unwrap();
        assert!(t.accepts(b"Bearer s3cret"));
        assert!(!t.accepts(b"Bearer s3cre"));
        assert!(!t.accepts(b"Bearer s3cret "));
        assert!(!t.accepts(b"bearer s3cret"));
        assert!(!t.accepts(b""));
        assert!(WorkerToken::new(" \n").is_err());
        assert!(WorkerToken::new("two words").is_err());
        assert!(WorkerToken::new("caf\u{e9}").is_err());
        assert_eq!(format!("{t:?}"), "WorkerToken(<redacted>)");
    }

    #[test]
    fn token_files_name_the_file_not_the_secret() {
        let e = WorkerToken::from_file(std::path::Path::new("/nonexistent/token")).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/token"));
    }

    #[test]
    fn the_interceptor_wants_the_bearer_token() {
        let mut open = TokenCheck::new(None);
        assert!(open.call(Request::new(())).is_ok());
        let mut check = TokenCheck::new(Some(WorkerToken::new("tok").unwrap()));
        let e = check.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(
            check.call(req).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", "Bearer tok".parse().unwrap());
        assert!(check.call(req).is_ok());
    }

    #[test]
    fn stream_limit_grows_with_sessions() {
        assert_eq!(ServeOptions::streams_for(1000), 2100);
        assert_eq!(ServeOptions::streams_for(usize::MAX), u32::MAX);
    }
}
