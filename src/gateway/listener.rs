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
use super::core::{Core, Shared};
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
    let listener = tokio_uring::net::TcpListener::from_std(listener);
    let mut shutdown = shared.shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio_uring::spawn(conn::serve(core.clone(), sessions.clone(), stream, peer));
                }
                Err(e) => {
                    tracing::warn!(core = index, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    let open: Vec<_> = sessions.borrow().iter().map(|(_, s)| s.clone()).collect();
    for s in &open {
        s.close_with(CloseReason::Shutdown);
    }
    // Give writers a moment to flush `session_end` and the close frame.
    let deadline = Instant::now() + Duration::from_millis(500);
    while !sessions.borrow().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
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

/// Probes every worker once a second so `/health` and worker choice know who is up, and a
/// restarted worker is reconnected before a client needs it.
async fn probe_loop(core: Rc<Core>) {
    loop {
        core.upstream.sync();
        for i in (0..core.upstream.len()).filter(|&i| core.upstream.is_listed(i)) {
            let result = match core.upstream.client(i).await {
                Ok(c) => upstream::probe(&c).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => core.upstream.mark_ok(i),
                Err(_) => core.upstream.mark_failed(i),
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
