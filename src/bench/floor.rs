//! The physical floor: a trivial WebSocket server, run inside the bench on its own thread, that
//! answers every text message at once with one pre-built audio frame.
//!
//! Why: a latency figure means little without the cost of the round trip itself on this machine
//! right now (loopback TCP, two wake-ups, WebSocket framing, our client's parsing). The floor is
//! measured by the same client code as FAL, so `FAL / floor` is what the orchestrator adds,
//! expressed in units of "the least any server could do".

use std::net::SocketAddr;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

/// A running echo server; stopped and joined on drop.
pub struct EchoServer {
    /// Where it listens (127.0.0.1, ephemeral port).
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The reply: a JSON audio frame exactly like the orchestrator's (2560 base64 chars).
pub fn audio_frame_json(sequence: u32) -> String {
    use base64::Engine as _;
    let pcm = base64::engine::general_purpose::STANDARD.encode([0u8; crate::audio::FRAME_BYTES]);
    serde_json::json!({
        "type": "audio",
        "pcm": pcm,
        "sample_rate": crate::audio::SAMPLE_RATE,
        "frame_ms": crate::audio::FRAME_MS,
        "sequence": sequence,
    })
    .to_string()
}

impl EchoServer {
    /// Binds 127.0.0.1:0 and serves on a dedicated thread with its own runtime.
    pub fn start() -> Result<EchoServer> {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("floor: bind 127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("floor: runtime")?;
        let thread = std::thread::Builder::new()
            .name("bench-floor".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!("floor server: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = stop_rx => {}
                        _ = accept_loop(listener) => {}
                    }
                });
            })
            .context("floor: thread")?;
        Ok(EchoServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

async fn accept_loop(listener: tokio::net::TcpListener) {
    let reply = Message::text(audio_frame_json(1));
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let _ = sock.set_nodelay(true);
        let reply = reply.clone();
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(sock).await else {
                return;
            };
            let hello =
                serde_json::json!({"type": "session_start", "session_id": "ws-f100f100f100"});
            if ws.send(Message::text(hello.to_string())).await.is_err() {
                return;
            }
            while let Some(Ok(m)) = ws.next().await {
                if m.is_text() && ws.send(reply.clone()).await.is_err() {
                    return;
                }
                if m.is_close() {
                    return;
                }
            }
        });
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::client::{Conn, EventKind, WsUrl, PCM_B64_LEN};

    #[test]
    fn reply_frame_has_protocol_size() {
        let v: serde_json::Value = serde_json::from_str(&audio_frame_json(3)).unwrap();
        assert_eq!(v["pcm"].as_str().unwrap().len(), PCM_B64_LEN);
        assert_eq!(v["sequence"], 3);
    }

    #[tokio::test]
    async fn answers_text_with_one_frame() {
        let srv = EchoServer::start().unwrap();
        let url = WsUrl::parse(&format!("ws://{}/", srv.addr)).unwrap();
        let dl = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let (mut c, id, _) = Conn::open(&url, dl).await.unwrap();
        assert!(id.starts_with("ws-"));
        for _ in 0..3 {
            let sent = c.send_text("hi", true).await.unwrap();
            let ev = c.next_event(dl).await.unwrap().unwrap();
            assert!(ev.at >= sent);
            assert!(matches!(
                ev.kind,
                EventKind::Audio {
                    seq: 1,
                    size_ok: true,
                    ..
                }
            ));
        }
        c.close().await;
    }
}
