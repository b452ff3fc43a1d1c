//! One core's main loop: accept connections on the core's own `SO_REUSEPORT` listener, drive
//! the core's pacer, probe the workers, and end every session on shutdown.
//!
//! The core's sessions live here, in a slab indexed by the key the pacer's entries carry, so
//! a pacer wake-up finds its session without a lookup structure shared with anything else.

use std::cell::RefCell;
use std::net::TcpListener as StdListener;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::conn;
use super::core::{Core, Phase, Shared};
use super::session::Session;
use super::upstream;
use crate::protocol::CloseReason;

/// The sessions of one core, by slab key.
pub type Sessions = RefCell<Slab<Rc<Session>>>;

/// Runs core `index` until shutdown.
pub async fn run(index: usize, listener: StdListener, shared: Arc<Shared>) {
    let core = match Core::new(index, shared.clone()) {
        Ok(c) => Rc::new(c),
        Err(e) => {
            tracing::error!(core = index, error = %e, "cannot create the pacing timer");
            return;
        }
    };
    let sessions: Rc<Sessions> = Rc::new(RefCell::new(Slab::new()));
    tokio_uring::spawn(pacer_loop(core.clone(), sessions.clone()));
    if index == 0 {
        tokio_uring::spawn(probe_loop(core.clone()));
    }
    tokio_uring::spawn(output_guard(core.clone(), sessions.clone()));
    let listener = tokio_uring::net::TcpListener::from_std(listener);
    let mut phase = shared.phase();
    // The accept in flight is kept across loop turns and awaited after the listener is shut
    // down: an io_uring accept dropped after it completed would leak its connection (accepted,
    // never served, reset only when the process exits).
    let mut accept = Box::pin(listener.accept());
    {
        // `wait_for` looks at the current phase first: a drain that began before this core
        // started must stop it too.
        let draining = phase.wait_for(|p| *p != Phase::Running);
        tokio::pin!(draining);
        loop {
            tokio::select! {
                accepted = &mut accept => {
                    serve_accepted(&core, &sessions, accepted).await;
                    accept = Box::pin(listener.accept());
                }
                _ = &mut draining => break,
            }
        }
    }
    // Stop listening: shutdown(2) on the listening socket completes the accept in flight (an
    // error, or a connection that came in meanwhile, which is served like any other), and the
    // kernel sends new connections to the other listeners on the port (a replacement started
    // with --takeover).
    {
        use std::os::fd::{AsRawFd, BorrowedFd};
        // SAFETY: the listener owns this fd and outlives the borrow (it is dropped below).
        let fd = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
        let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
    }
    if let Ok(Ok((stream, peer))) = tokio::time::timeout(Duration::from_secs(1), &mut accept).await
    {
        tokio_uring::spawn(conn::serve(core.clone(), sessions.clone(), stream, peer));
    }
    drop(accept);
    drop(listener);
    let deadline = match *phase.borrow() {
        Phase::Draining { deadline } => deadline,
        Phase::Running => Instant::now(),
    };
    drain(&sessions, deadline).await;
}

/// Serves one accepted connection (or backs off briefly after an accept error).
async fn serve_accepted(
    core: &Rc<Core>,
    sessions: &Rc<Sessions>,
    accepted: std::io::Result<(tokio_uring::net::TcpStream, std::net::SocketAddr)>,
) {
    match accepted {
        Ok((stream, peer)) => {
            tokio_uring::spawn(conn::serve(core.clone(), sessions.clone(), stream, peer));
        }
        Err(e) => {
            tracing::warn!(core = core.index, error = %e, "accept failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// How often a draining core looks for sessions that have finished speaking.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Closes each session as soon as it has nothing left to say; at `deadline` cuts the rest
/// (`interrupted` reason `shutdown` + end marker), then waits (bounded) for the writers to
/// flush `session_end` and the close frames.
async fn drain(sessions: &Sessions, deadline: Instant) {
    loop {
        let open: Vec<_> = sessions.borrow().iter().map(|(_, s)| s.clone()).collect();
        if open.is_empty() {
            return;
        }
        let cut = Instant::now() >= deadline;
        for s in &open {
            if cut {
                s.cut(CloseReason::Shutdown);
            } else if !s.busy() {
                s.close_with(CloseReason::Shutdown);
            }
        }
        if cut {
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let flush = Instant::now() + Duration::from_secs(2);
    while !sessions.borrow().is_empty() && Instant::now() < flush {
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// The core's pacing loop: every wake-up serves all sessions with a frame due.
async fn pacer_loop(core: Rc<Core>, sessions: Rc<Sessions>) {
    let mut due = Vec::with_capacity(256);
    loop {
        due.clear();
        if let Err(e) = core.pacer.next_due(&mut due).await {
            tracing::error!(core = core.index, error = %e, "pacer failed");
            return;
        }
        let now = Instant::now();
        for &(_, key, generation) in &due {
            let session = sessions.borrow().get(key).cloned();
            if let Some(s) = session {
                s.on_timer(generation, now);
            }
        }
    }
}

/// Keeps the core's clients within their share of `--max-queued-output-bytes`: when they
/// hold more, the client with the most unread output is cut off first, until they fit. A
/// client that reads keeps its queue near zero, so only those that stopped reading go.
async fn output_guard(core: Rc<Core>, sessions: Rc<Sessions>) {
    loop {
        core.output_budget.over.notified().await;
        while core.output_budget.exceeded() {
            let slowest = sessions
                .borrow()
                .iter()
                .map(|(_, s)| s.clone())
                .max_by_key(|s| s.output.queued_bytes());
            let Some(s) = slowest.filter(|s| s.output.queued_bytes() > 0) else {
                break;
            };
            core.shared.metrics.limited("queued_output");
            tracing::warn!(parent: &s.span, queued = s.output.queued_bytes(),
                "the clients of this core hold too much unread audio; cutting off the slowest");
            s.output.cut_off();
        }
    }
}

/// Probes every worker once a second so `/health` and worker choice know who is up, and a
/// restarted worker is reconnected before a client needs it.
async fn probe_loop(core: Rc<Core>) {
    loop {
        core.upstream.sync();
        let mut voices = Vec::new();
        for i in (0..core.upstream.len()).filter(|&i| core.upstream.is_listed(i)) {
            let client = core.upstream.client(i).await;
            let result = match &client {
                Ok(c) => upstream::probe(c).await,
                Err(e) => Err(e.clone()),
            };
            match result {
                Ok(()) => {
                    core.upstream.mark_ok(i);
                    if let Ok(c) = &client {
                        voices.extend(upstream::models(c).await);
                    }
                }
                Err(_) => core.upstream.mark_failed(i),
            }
        }
        voices.sort();
        voices.dedup();
        *core.shared.voices.lock().unwrap_or_else(|e| e.into_inner()) = voices;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
