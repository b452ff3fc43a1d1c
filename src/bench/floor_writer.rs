//! The paced-writer floor (`duplex floor-writer`, spawned by the bench's `floor_writer`
//! scenario): the least a process can do to deliver what the orchestrator delivers.
//!
//! It accepts plain TCP connections and writes one 1,932-byte frame (a binary audio message:
//! 12-byte header + 20 ms of PCM) to each every 20 ms, with the orchestrator's own pieces —
//! one io_uring thread, the per-core `timerfd` pacer, a writer task per connection woken per
//! frame — and nothing else: no WebSocket, no protocol, no sessions, no worker. With
//! `--upstream ADDR` it also reads every frame it sends from one TCP stream (as the orchestrator
//! reads them from its worker's HTTP/2 connection), each frame a zero-copy slice of the read
//! buffer: the *forwarder's* floor. The bench divides the orchestrator's CPU per frame by these
//! to say how far above the floor it is, measured in the same run on the same machine.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;
use tokio_uring::net::{TcpListener, TcpStream};

use crate::gateway::pacer::{Pacer, DEFAULT_COALESCE};

/// Bytes of one frame: a binary audio message (8-byte header + 4-byte sequence) + 20 ms PCM.
pub const FRAME: usize = 12 + crate::audio::FRAME_BYTES;
/// The frame period.
pub const PERIOD: Duration = Duration::from_millis(crate::audio::FRAME_MS as u64);

/// Flags of `duplex floor-writer`.
#[derive(Debug, Clone, clap::Args)]
pub struct FloorWriterArgs {
    /// Where readers connect.
    #[arg(long)]
    pub listen: String,
    /// Read every frame sent from one TCP stream at this address (the forwarder's floor).
    #[arg(long)]
    pub upstream: Option<String>,
}

/// One reader connection: the frame waiting for its writer.
struct Conn {
    /// Unique per connection: the pacer's entries carry it, so an entry of a closed
    /// connection whose slab key was reused is recognised and dropped.
    id: u64,
    slot: RefCell<Option<Bytes>>,
    ready: Notify,
    dead: Cell<bool>,
}

/// Runs the floor writer until killed.
pub fn run(args: FloorWriterArgs) -> Result<()> {
    let addr: std::net::SocketAddr = args
        .listen
        .parse()
        .with_context(|| format!("--listen {}", args.listen))?;
    tokio_uring::start(async move {
        let listener = TcpListener::bind(addr).context("bind")?;
        let pacer = Rc::new(Pacer::new(DEFAULT_COALESCE)?);
        let conns: Rc<RefCell<slab::Slab<Rc<Conn>>>> = Rc::default();
        let frames: Rc<RefCell<VecDeque<Bytes>>> = Rc::default();
        let upstream = match &args.upstream {
            Some(u) => {
                let a: std::net::SocketAddr =
                    u.parse().with_context(|| format!("--upstream {u}"))?;
                let s = TcpStream::connect(a).await.context("connect upstream")?;
                tokio_uring::spawn(read_upstream(s, frames.clone()));
                true
            }
            None => false,
        };
        let fixed = Bytes::from(vec![0u8; FRAME]);
        tokio_uring::spawn(pace(pacer.clone(), conns.clone(), frames, fixed, upstream));
        let mut next_id = 0u64;
        loop {
            let (stream, _) = listener.accept().await.context("accept")?;
            let _ = stream.set_nodelay(true);
            next_id += 1;
            let conn = Rc::new(Conn {
                id: next_id,
                slot: RefCell::new(None),
                ready: Notify::new(),
                dead: Cell::new(false),
            });
            let key = conns.borrow_mut().insert(conn.clone());
            // Spread first frames over the period, as sessions starting at random times are.
            let offset = PERIOD.mul_f64(rand::random::<f64>());
            pacer.schedule(Instant::now() + offset, key, next_id);
            tokio_uring::spawn(write_loop(conn, stream, conns.clone(), key));
        }
    })
}

/// Reads the upstream stream into a buffer and cuts it into frames (slices, no copy).
async fn read_upstream(stream: TcpStream, frames: Rc<RefCell<VecDeque<Bytes>>>) {
    let mut pending = BytesMut::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (res, b) = stream.read(buf).await;
        buf = b;
        let n = match res {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // One copy from the read buffer, as h2 copies a DATA frame out of its read buffer.
        pending.extend_from_slice(&buf[..n]);
        let mut q = frames.borrow_mut();
        while pending.len() >= FRAME {
            q.push_back(pending.split_to(FRAME).freeze());
        }
    }
}

/// The pacer loop: hands each due connection its next frame and schedules the one after.
async fn pace(
    pacer: Rc<Pacer>,
    conns: Rc<RefCell<slab::Slab<Rc<Conn>>>>,
    frames: Rc<RefCell<VecDeque<Bytes>>>,
    fixed: Bytes,
    upstream: bool,
) {
    let mut due = Vec::with_capacity(1024);
    loop {
        if pacer.next_due(&mut due).await.is_err() {
            return;
        }
        for (at, key, id) in due.drain(..) {
            let Some(conn) = conns.borrow().get(key).cloned() else {
                continue;
            };
            if conn.dead.get() || conn.id != id {
                continue;
            }
            let frame = if upstream {
                frames.borrow_mut().pop_front()
            } else {
                Some(fixed.clone())
            };
            if let Some(f) = frame {
                *conn.slot.borrow_mut() = Some(f);
                conn.ready.notify_one();
            }
            pacer.schedule(at + PERIOD, key, id);
        }
    }
}

/// A connection's writer: one `write` per frame.
async fn write_loop(
    conn: Rc<Conn>,
    stream: TcpStream,
    conns: Rc<RefCell<slab::Slab<Rc<Conn>>>>,
    key: usize,
) {
    loop {
        conn.ready.notified().await;
        let Some(frame) = conn.slot.borrow_mut().take() else {
            continue;
        };
        let (res, _) = stream.write_all(frame).await;
        if res.is_err() {
            break;
        }
    }
    conn.dead.set(true);
    conns.borrow_mut().try_remove(key);
}
