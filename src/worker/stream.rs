//! The two ends of a Synthesize call as the synthesis code sees them, and the response
//! stream handed to tonic.
//!
//! Why the synthesis future lives *inside* the response stream ([`SynthesisStream`]) instead
//! of a spawned task: tonic drops the response stream when the client resets the call or the
//! connection dies, and dropping the stream drops the future, so a cancelled call stops
//! producing at once (the espeak-ng process is killed, the mock loop ends) and nothing can
//! outlive its caller. A spawned task would keep synthesising into a closed channel until it
//! next tried to send, and would need its own cancellation plumbing.
//!
//! The stream also enforces the client's deadline (`grpc-timeout`) for the whole call: tonic's
//! own timeout only covers the handler until it returns the response headers, not the frames
//! that follow.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tonic::Status;

use crate::proto::{AudioFrame, TextChunk};

/// The incoming `TextChunk`s of one call.
pub struct RequestStream {
    inner: Pin<Box<dyn Stream<Item = Result<TextChunk, Status>> + Send>>,
}

impl RequestStream {
    /// Wraps any stream of chunks (tonic's `Streaming<TextChunk>`, or a test's).
    pub fn new(inner: impl Stream<Item = Result<TextChunk, Status>> + Send + 'static) -> Self {
        RequestStream {
            inner: Box::pin(inner),
        }
    }

    /// The next chunk, `None` once the client half-closed. Cancel-safe (the stream keeps its
    /// state), so it can sit in a `select!`.
    pub async fn message(&mut self) -> Result<Option<TextChunk>, Status> {
        std::future::poll_fn(|cx| self.inner.as_mut().poll_next(cx))
            .await
            .transpose()
    }
}

/// Where the synthesis puts its frames; [`SynthesisStream`] hands them to tonic.
pub struct ResponseSender {
    tx: mpsc::Sender<AudioFrame>,
}

impl ResponseSender {
    /// Queues one frame. Waits while the client is not reading (HTTP/2 flow control reaches
    /// back through the small channel), so a slow reader slows production instead of growing
    /// a buffer.
    pub async fn send(&mut self, frame: AudioFrame) -> Result<(), Status> {
        self.tx
            .send(frame)
            .await
            .map_err(|_| Status::cancelled("the client went away"))
    }
}

/// Frames queued between the synthesis and HTTP/2: two keep the next frame ready while one is
/// written, without buffering audio the client may cancel.
const CHANNEL_FRAMES: usize = 2;

/// The boxed synthesis of one call.
pub type SynthesisFuture = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

/// The response stream of a Synthesize call: drives the synthesis future and yields its frames,
/// then its error status if it failed; ends with DEADLINE_EXCEEDED at the client's deadline.
pub struct SynthesisStream {
    run: Option<SynthesisFuture>,
    frames: mpsc::Receiver<AudioFrame>,
    deadline: Option<Pin<Box<Sleep>>>,
    failed: Option<Status>,
    /// An `is_final` frame went out: the call ended by the protocol's rules.
    saw_final: bool,
    done: bool,
    _open: OpenStream,
}

impl SynthesisStream {
    /// A stream running `make(sender)`. `open` counts the call until the stream is dropped
    /// (the drain waits for it); `deadline` is the client's.
    pub fn new(
        make: impl FnOnce(ResponseSender) -> SynthesisFuture,
        deadline: Option<Instant>,
        open: OpenStream,
    ) -> SynthesisStream {
        let (tx, frames) = mpsc::channel(CHANNEL_FRAMES);
        SynthesisStream {
            run: Some(make(ResponseSender { tx })),
            frames,
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            failed: None,
            saw_final: false,
            done: false,
            _open: open,
        }
    }
}

impl Stream for SynthesisStream {
    type Item = Result<AudioFrame, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(deadline) = &mut this.deadline {
            if deadline.as_mut().poll(cx).is_ready() {
                // Dropping the future stops the synthesis (counted as aborted).
                this.run = None;
                this.done = true;
                return Poll::Ready(Some(Err(Status::deadline_exceeded(
                    "Synthesize: deadline exceeded",
                ))));
            }
        }
        loop {
            if let Poll::Ready(Some(frame)) = this.frames.poll_recv(cx) {
                this.saw_final |= frame.is_final;
                return Poll::Ready(Some(Ok(frame)));
            }
            match &mut this.run {
                Some(run) => match run.as_mut().poll(cx) {
                    Poll::Ready(result) => {
                        // Its sender is gone with it: drain what it queued, then end.
                        this.run = None;
                        this.failed = result.err();
                    }
                    Poll::Pending => return Poll::Pending,
                },
                None => {
                    this.done = true;
                    if this.failed.is_none() && !this.saw_final {
                        // docs/PROTOCOL.md §2: every synthesis ends with exactly one is_final
                        // frame. The engines always send one; should one ever return
                        // without, the client gets an error, never a silent OK with no end.
                        this.failed = Some(Status::internal(
                            "Synthesize: the synthesis ended without its final frame",
                        ));
                    }
                    return Poll::Ready(this.failed.take().map(Err));
                }
            }
        }
    }
}

/// Counts open Synthesize calls so a draining worker knows when they have all finished.
#[derive(Debug, Clone)]
pub struct StreamTracker {
    open: watch::Sender<usize>,
}

impl Default for StreamTracker {
    fn default() -> Self {
        StreamTracker {
            open: watch::Sender::new(0),
        }
    }
}

impl StreamTracker {
    /// Counts one call until the returned guard is dropped.
    pub fn open(&self) -> OpenStream {
        self.open.send_modify(|n| *n += 1);
        OpenStream {
            open: self.open.clone(),
        }
    }

    /// Calls open now.
    pub fn count(&self) -> usize {
        *self.open.borrow()
    }

    /// Resolves once no call is open.
    pub async fn idle(&self) {
        let mut rx = self.open.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// One open Synthesize call (see [`StreamTracker::open`]).
#[derive(Debug)]
pub struct OpenStream {
    open: watch::Sender<usize>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.open.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::time::Duration;

    fn frame(n: i64, is_final: bool) -> AudioFrame {
        AudioFrame {
            sequence_number: n,
            is_final,
            ..AudioFrame::default()
        }
    }

    #[tokio::test]
    async fn frames_then_the_error_status_then_the_end() {
        let tracker = StreamTracker::default();
        let mut s = SynthesisStream::new(
            |mut tx| {
                Box::pin(async move {
                    tx.send(frame(1, false)).await?;
                    tx.send(frame(2, false)).await?;
                    tx.send(frame(3, true)).await?;
                    Err(Status::internal("engine died"))
                })
            },
            None,
            tracker.open(),
        );
        assert_eq!(tracker.count(), 1);
        for n in 1..=3 {
            assert_eq!(s.next().await.unwrap().unwrap().sequence_number, n);
        }
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(s.next().await.is_none());
        drop(s);
        assert_eq!(tracker.count(), 0);
        tracker.idle().await;
    }

    #[tokio::test]
    async fn ending_without_a_final_frame_is_an_error_not_a_silent_ok() {
        let mut s = SynthesisStream::new(
            |_tx| Box::pin(async { Ok(()) }),
            None,
            StreamTracker::default().open(),
        );
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(s.next().await.is_none());
        let mut s = SynthesisStream::new(
            |mut tx| Box::pin(async move { tx.send(frame(1, true)).await }),
            None,
            StreamTracker::default().open(),
        );
        assert!(s.next().await.unwrap().unwrap().is_final);
        assert!(s.next().await.is_none(), "a final frame then OK");
    }

    #[tokio::test]
    async fn the_deadline_ends_the_call_and_drops_the_synthesis() {
        let tracker = StreamTracker::default();
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let mut s = SynthesisStream::new(
            move |_tx| {
                Box::pin(async move {
                    let _guard = dropped_tx; // dropped with the future
                    std::future::pending::<()>().await;
                    Ok(())
                })
            },
            Some(Instant::now() + Duration::from_millis(20)),
            tracker.open(),
        );
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert!(
            dropped_rx.await.is_err(),
            "the synthesis future was dropped"
        );
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn request_stream_reads_chunks_then_none() {
        let chunks = futures_util::stream::iter(vec![Ok(TextChunk {
            text: "a".into(),
            ..TextChunk::default()
        })]);
        let mut r = RequestStream::new(chunks);
        assert_eq!(r.message().await.unwrap().unwrap().text, "a");
        assert!(r.message().await.unwrap().is_none());
    }
}
