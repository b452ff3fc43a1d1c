//! Worker sessions and their per-synthesis control state.
//!
//! A session is what StartSession registers (model id, options). Control commands
//! (PAUSE/RESUME/STOP) belong to the session's *current* Synthesize call only: each call gets
//! a fresh control channel, so a STOP aimed at one utterance can never leak into the next one
//! or into another session (a bug of the Python worker we replace).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::proto::ControlCommand;

/// Control state of one synthesis, as set by Control RPCs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlState {
    /// No frames are produced while set (RESUME clears it).
    pub paused: bool,
    /// The synthesis must end now with its final marker.
    pub stopped: bool,
}

impl ControlState {
    /// Applies a command; returns a note for the Control response.
    fn apply(&mut self, command: ControlCommand) -> &'static str {
        match command {
            ControlCommand::Pause => {
                self.paused = true;
                "paused"
            }
            ControlCommand::Resume => {
                self.paused = false;
                "resumed"
            }
            ControlCommand::Stop => {
                self.stopped = true;
                "stopped"
            }
            ControlCommand::Reload => "reload: nothing to reload (models reload on LoadModel)",
        }
    }
}

/// Why StartSession was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// The request had no session id.
    MissingId,
    /// `--max-sessions` sessions are already open.
    Full(usize),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::MissingId => f.write_str("session_id is required"),
            StartError::Full(max) => write!(
                f,
                "worker at capacity: {max} sessions open (--max-sessions); try another worker"
            ),
        }
    }
}

#[derive(Debug)]
struct Session {
    model_id: String,
    #[allow(dead_code)] // kept for engines that honour options (voice, speed, ...)
    options: HashMap<String, String>,
    current: Option<CurrentSynthesis>,
}

#[derive(Debug)]
struct CurrentSynthesis {
    id: u64,
    control: Arc<watch::Sender<ControlState>>,
}

/// All open sessions of the worker. One short lock per RPC; the synthesis hot loop never
/// touches it (it holds its own control channel).
#[derive(Debug)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<String, Session>>,
    max_sessions: usize,
    next_synthesis: AtomicU64,
}

impl SessionRegistry {
    /// An empty registry admitting at most `max_sessions` sessions.
    pub fn new(max_sessions: usize) -> SessionRegistry {
        SessionRegistry {
            sessions: Mutex::new(HashMap::new()),
            max_sessions,
            next_synthesis: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        // Every update is a single map operation; a poisoned map is still consistent.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of open sessions (the `queue_depth` metric).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers (or re-registers, updating model and options) a session. On a
    /// re-registration returns the model the session used before, whose reference the caller
    /// must release.
    pub fn start(
        &self,
        session_id: &str,
        model_id: &str,
        options: HashMap<String, String>,
    ) -> Result<Option<String>, StartError> {
        if session_id.is_empty() {
            return Err(StartError::MissingId);
        }
        let mut sessions = self.lock();
        if let Some(s) = sessions.get_mut(session_id) {
            let previous = std::mem::replace(&mut s.model_id, model_id.to_owned());
            s.options = options;
            return Ok(Some(previous));
        }
        if sessions.len() >= self.max_sessions {
            return Err(StartError::Full(self.max_sessions));
        }
        sessions.insert(
            session_id.to_owned(),
            Session {
                model_id: model_id.to_owned(),
                options,
                current: None,
            },
        );
        Ok(None)
    }

    /// Removes a session; returns its model if it existed (the caller releases that
    /// reference). A synthesis still running keeps its own control channel and finishes
    /// normally.
    pub fn end(&self, session_id: &str) -> Option<String> {
        self.lock().remove(session_id).map(|s| s.model_id)
    }

    /// Makes a new synthesis the session's current one (replacing the control target of any
    /// earlier call). `None` if the session does not exist.
    pub fn begin_synthesis(self: &Arc<Self>, session_id: &str) -> Option<SynthesisRegistration> {
        let id = self.next_synthesis.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(ControlState::default());
        let control = Arc::new(tx);
        let mut sessions = self.lock();
        let session = sessions.get_mut(session_id)?;
        session.current = Some(CurrentSynthesis {
            id,
            control: control.clone(),
        });
        Some(SynthesisRegistration {
            registry: self.clone(),
            session_id: session_id.to_owned(),
            model_id: session.model_id.clone(),
            id,
            control: rx,
            _sender: control,
        })
    }

    /// Applies a Control command to the session's current synthesis. Returns a note for the
    /// response; unknown sessions and idle sessions are not errors (the command has nothing
    /// to act on).
    pub fn control(&self, session_id: &str, command: ControlCommand) -> String {
        let sessions = self.lock();
        match sessions.get(session_id) {
            None => format!("unknown session {session_id:?}: nothing to control"),
            Some(Session { current: None, .. }) => {
                format!("session {session_id:?} has no synthesis in progress")
            }
            Some(Session {
                current: Some(c), ..
            }) => {
                let mut note = "";
                c.control.send_modify(|state| note = state.apply(command));
                note.to_owned()
            }
        }
    }
}

/// A running synthesis' link to its session: the control receiver, released (and the
/// session's control target cleared) on drop, whether the call ended, failed or was cancelled.
#[derive(Debug)]
pub struct SynthesisRegistration {
    registry: Arc<SessionRegistry>,
    /// The session this synthesis speaks for.
    pub session_id: String,
    /// The session's model at the time the call started.
    pub model_id: String,
    id: u64,
    /// Control commands for this synthesis.
    pub control: watch::Receiver<ControlState>,
    /// Keeps the channel open even if the session ends mid-call.
    _sender: Arc<watch::Sender<ControlState>>,
}

impl Drop for SynthesisRegistration {
    fn drop(&mut self) {
        let mut sessions = self.registry.lock();
        if let Some(s) = sessions.get_mut(&self.session_id) {
            if s.current.as_ref().is_some_and(|c| c.id == self.id) {
                s.current = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_is_enforced_but_restarts_are_free() {
        let r = SessionRegistry::new(2);
        r.start("a", "mock", HashMap::new()).unwrap();
        r.start("b", "mock", HashMap::new()).unwrap();
        assert_eq!(
            r.start("c", "mock", HashMap::new()),
            Err(StartError::Full(2))
        );
        assert_eq!(
            r.start("a", "mock-2", HashMap::new()).unwrap(),
            Some("mock".to_owned())
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r.end("a"), Some("mock-2".to_owned()));
        assert_eq!(r.end("a"), None);
        r.start("c", "mock", HashMap::new()).unwrap();
        assert_eq!(
            r.start("", "mock", HashMap::new()),
            Err(StartError::MissingId)
        );
    }

    #[test]
    fn control_reaches_only_the_current_synthesis_of_that_session() {
        let r = Arc::new(SessionRegistry::new(10));
        r.start("a", "mock", HashMap::new()).unwrap();
        r.start("b", "mock", HashMap::new()).unwrap();
        let a1 = r.begin_synthesis("a").unwrap();
        let b1 = r.begin_synthesis("b").unwrap();
        r.control("a", ControlCommand::Stop);
        assert!(a1.control.borrow().stopped);
        assert!(!b1.control.borrow().stopped);
        drop(a1);
        // The next call of A starts clean.
        let a2 = r.begin_synthesis("a").unwrap();
        assert_eq!(*a2.control.borrow(), ControlState::default());
        r.control("a", ControlCommand::Pause);
        assert!(a2.control.borrow().paused);
        r.control("a", ControlCommand::Resume);
        assert!(!a2.control.borrow().paused);
        assert!(r.begin_synthesis("zzz").is_none());
        assert!(r.control("zzz", ControlCommand::Stop).contains("unknown"));
    }

    #[test]
    fn an_old_call_ending_does_not_clear_a_newer_one() {
        let r = Arc::new(SessionRegistry::new(10));
        r.start("a", "mock", HashMap::new()).unwrap();
        let old = r.begin_synthesis("a").unwrap();
        let new = r.begin_synthesis("a").unwrap();
        drop(old);
        r.control("a", ControlCommand::Stop);
        assert!(new.control.borrow().stopped);
    }

    #[test]
    fn session_end_mid_synthesis_keeps_the_channel_alive() {
        let r = Arc::new(SessionRegistry::new(10));
        r.start("a", "mock", HashMap::new()).unwrap();
        let s = r.begin_synthesis("a").unwrap();
        r.end("a");
        assert!(s.control.has_changed().is_ok(), "sender must still exist");
    }
}
