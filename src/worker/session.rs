//! Worker sessions and their per-synthesis control state.
//!
//! A session is what StartSession registers (model id, options). Control commands
//! (PAUSE/RESUME/STOP) belong to the session's *current* Synthesize call only: each call gets
//! a fresh control channel, so a STOP aimed at one utterance can never leak into the next one
//! or into another session (a bug of the Python worker we replace).
//!
//! **Leases.** A session belongs to the HTTP/2 connection that opened it ([`ConnId`]): the
//! registry is keyed by (connection, session id), so another connection can neither see,
//! control, end nor synthesise on it (to that connection the id simply does not exist: Control
//! and EndSession answer `success: true` as for any unknown id, Synthesize NOT_FOUND), and two
//! connections may use the same id independently. When the connection closes its sessions end
//! ([`SessionRegistry::end_connection`]); a session with no Synthesize open for longer than
//! `--session-idle-secs` expires ([`SessionRegistry::expire_idle`]). Without these, sessions of
//! clients that vanished without EndSession held `--max-sessions` slots and model references
//! forever.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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

/// Identifies one HTTP/2 connection for the lifetime of the worker process (never reused).
pub type ConnId = u64;

/// Longest session id accepted: real ids are short (`ws-` plus 12 hex digits), and an
/// unbounded one times `--max-sessions` would be unbounded memory.
pub const MAX_SESSION_ID_BYTES: usize = 256;
/// Largest StartSession `options` map accepted (keys plus values, in bytes).
pub const MAX_OPTIONS_BYTES: usize = 4096;

/// Why StartSession was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartError {
    /// The request had no session id.
    MissingId,
    /// `--max-sessions` sessions are already open.
    Full(usize),
    /// The session id is longer than [`MAX_SESSION_ID_BYTES`].
    IdTooLong(usize),
    /// The options are larger than [`MAX_OPTIONS_BYTES`].
    OptionsTooLarge(usize),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::MissingId => f.write_str("session_id is required"),
            StartError::Full(max) => write!(
                f,
                "worker at capacity: {max} sessions open (--max-sessions); try another worker"
            ),
            StartError::IdTooLong(n) => write!(
                f,
                "session_id of {n} bytes refused: at most {MAX_SESSION_ID_BYTES} bytes"
            ),
            StartError::OptionsTooLarge(n) => write!(
                f,
                "options of {n} bytes refused: at most {MAX_OPTIONS_BYTES} bytes"
            ),
        }
    }
}

impl StartError {
    /// Checks what StartSession stores before anything is looked up or loaded.
    pub fn check(session_id: &str, options: &HashMap<String, String>) -> Result<(), StartError> {
        if session_id.is_empty() {
            return Err(StartError::MissingId);
        }
        if session_id.len() > MAX_SESSION_ID_BYTES {
            return Err(StartError::IdTooLong(session_id.len()));
        }
        let bytes: usize = options.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > MAX_OPTIONS_BYTES {
            return Err(StartError::OptionsTooLarge(bytes));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Session {
    model_id: String,
    #[allow(dead_code)] // kept for engines that honour options (voice, speed, ...)
    options: HashMap<String, String>,
    /// Distinguishes this session from an earlier one with the same key (ended, started
    /// again) so a late [`SynthesisRegistration`] drop never touches the newer one.
    generation: u64,
    current: Option<CurrentSynthesis>,
    /// Synthesize calls open on the session; it can expire only at zero.
    streams: usize,
    /// Last StartSession, or last Synthesize start or end.
    last_active: Instant,
}

#[derive(Debug)]
struct CurrentSynthesis {
    id: u64,
    control: Arc<watch::Sender<ControlState>>,
}

#[derive(Debug, Default)]
struct Table {
    by_conn: HashMap<ConnId, HashMap<String, Session>>,
    open: usize,
}

impl Table {
    fn get_mut(&mut self, conn: ConnId, id: &str) -> Option<&mut Session> {
        self.by_conn.get_mut(&conn)?.get_mut(id)
    }

    fn remove(&mut self, conn: ConnId, id: &str) -> Option<Session> {
        let sessions = self.by_conn.get_mut(&conn)?;
        let removed = sessions.remove(id)?;
        if sessions.is_empty() {
            self.by_conn.remove(&conn);
        }
        self.open -= 1;
        Some(removed)
    }
}

/// All open sessions of the worker. One short lock per RPC; the synthesis hot loop never
/// touches it (it holds its own control channel).
#[derive(Debug)]
pub struct SessionRegistry {
    table: Mutex<Table>,
    max_sessions: usize,
    next_id: AtomicU64,
}

impl SessionRegistry {
    /// An empty registry admitting at most `max_sessions` sessions.
    pub fn new(max_sessions: usize) -> SessionRegistry {
        SessionRegistry {
            table: Mutex::new(Table::default()),
            max_sessions,
            next_id: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every update is a few map operations that cannot panic; a poisoned table is still
        // consistent.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of open sessions (the `queue_depth` metric).
    pub fn len(&self) -> usize {
        self.lock().open
    }

    /// True when no session is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers (or re-registers, updating model and options) session `session_id` of
    /// connection `conn`. On a re-registration returns the model the session used before,
    /// whose reference the caller must release.
    pub fn start(
        &self,
        conn: ConnId,
        session_id: &str,
        model_id: &str,
        options: HashMap<String, String>,
    ) -> Result<Option<String>, StartError> {
        StartError::check(session_id, &options)?;
        let generation = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut table = self.lock();
        if let Some(s) = table.get_mut(conn, session_id) {
            let previous = std::mem::replace(&mut s.model_id, model_id.to_owned());
            s.options = options;
            s.last_active = Instant::now();
            return Ok(Some(previous));
        }
        if table.open >= self.max_sessions {
            return Err(StartError::Full(self.max_sessions));
        }
        table.open += 1;
        table.by_conn.entry(conn).or_default().insert(
            session_id.to_owned(),
            Session {
                model_id: model_id.to_owned(),
                options,
                generation,
                current: None,
                streams: 0,
                last_active: Instant::now(),
            },
        );
        Ok(None)
    }

    /// Removes a session of `conn`; returns its model if it existed (the caller releases
    /// that reference). A synthesis still running keeps its own control channel and finishes
    /// normally.
    pub fn end(&self, conn: ConnId, session_id: &str) -> Option<String> {
        self.lock().remove(conn, session_id).map(|s| s.model_id)
    }

    /// Removes every session of a closed connection; returns their models (one entry per
    /// session, for the caller to release).
    pub fn end_connection(&self, conn: ConnId) -> Vec<String> {
        let mut table = self.lock();
        let Some(sessions) = table.by_conn.remove(&conn) else {
            return Vec::new();
        };
        table.open -= sessions.len();
        sessions.into_values().map(|s| s.model_id).collect()
    }

    /// Removes every session with no Synthesize open and no activity for `idle` at `now`;
    /// returns their models (one entry per session, for the caller to release).
    pub fn expire_idle(&self, now: Instant, idle: Duration) -> Vec<String> {
        let mut table = self.lock();
        let mut models = Vec::new();
        table.by_conn.retain(|_, sessions| {
            sessions.retain(|_, s| {
                let expired =
                    s.streams == 0 && now.saturating_duration_since(s.last_active) >= idle;
                if expired {
                    models.push(std::mem::take(&mut s.model_id));
                }
                !expired
            });
            !sessions.is_empty()
        });
        table.open -= models.len();
        models
    }

    /// Makes a new synthesis the current one of session `session_id` of `conn` (replacing
    /// the control target of any earlier call). `None` if that connection has no such
    /// session.
    pub fn begin_synthesis(
        self: &Arc<Self>,
        conn: ConnId,
        session_id: &str,
    ) -> Option<SynthesisRegistration> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(ControlState::default());
        let control = Arc::new(tx);
        let mut table = self.lock();
        let session = table.get_mut(conn, session_id)?;
        session.current = Some(CurrentSynthesis {
            id,
            control: control.clone(),
        });
        session.streams += 1;
        session.last_active = Instant::now();
        Some(SynthesisRegistration {
            registry: self.clone(),
            conn,
            session_id: session_id.to_owned(),
            generation: session.generation,
            model_id: session.model_id.clone(),
            id,
            control: rx,
            _sender: control,
        })
    }

    /// Applies a Control command to the current synthesis of session `session_id` of
    /// `conn`. Returns a note for the response; unknown sessions (including those of other
    /// connections) and idle sessions are not errors (the command has nothing to act on).
    pub fn control(&self, conn: ConnId, session_id: &str, command: ControlCommand) -> String {
        let mut table = self.lock();
        match table.get_mut(conn, session_id) {
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
/// session's control target cleared, its idle clock restarted) on drop, whether the call
/// ended, failed or was cancelled.
#[derive(Debug)]
pub struct SynthesisRegistration {
    registry: Arc<SessionRegistry>,
    conn: ConnId,
    /// The session this synthesis speaks for.
    pub session_id: String,
    generation: u64,
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
        let mut table = self.registry.lock();
        if let Some(s) = table.get_mut(self.conn, &self.session_id) {
            if s.generation != self.generation {
                return;
            }
            s.streams = s.streams.saturating_sub(1);
            s.last_active = Instant::now();
            if s.current.as_ref().is_some_and(|c| c.id == self.id) {
                s.current = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: ConnId = 1;

    fn opts() -> HashMap<String, String> {
        HashMap::new()
    }

    #[test]
    fn capacity_is_enforced_but_restarts_are_free() {
        let r = SessionRegistry::new(2);
        r.start(C, "a", "mock", opts()).unwrap();
        r.start(C, "b", "mock", opts()).unwrap();
        assert_eq!(r.start(C, "c", "mock", opts()), Err(StartError::Full(2)));
        assert_eq!(
            r.start(2, "c", "mock", opts()),
            Err(StartError::Full(2)),
            "the cap is for the whole worker"
        );
        assert_eq!(
            r.start(C, "a", "mock-2", opts()).unwrap(),
            Some("mock".to_owned())
        );
        assert_eq!(r.len(), 2);
        assert_eq!(r.end(C, "a"), Some("mock-2".to_owned()));
        assert_eq!(r.end(C, "a"), None);
        r.start(C, "c", "mock", opts()).unwrap();
        assert_eq!(r.start(C, "", "mock", opts()), Err(StartError::MissingId));
    }

    #[test]
    fn oversized_ids_and_options_are_refused() {
        let r = SessionRegistry::new(10);
        let long = "s".repeat(MAX_SESSION_ID_BYTES + 1);
        assert_eq!(
            r.start(C, &long, "mock", opts()),
            Err(StartError::IdTooLong(257))
        );
        let big = HashMap::from([("k".to_owned(), "v".repeat(MAX_OPTIONS_BYTES))]);
        assert!(matches!(
            r.start(C, "a", "mock", big),
            Err(StartError::OptionsTooLarge(_))
        ));
        assert!(r.is_empty());
    }

    #[test]
    fn sessions_belong_to_their_connection() {
        let r = Arc::new(SessionRegistry::new(10));
        r.start(1, "a", "m1", opts()).unwrap();
        // Another connection sees nothing: no synthesis, no control, no end...
        assert!(r.begin_synthesis(2, "a").is_none());
        assert!(r.control(2, "a", ControlCommand::Stop).contains("unknown"));
        assert_eq!(r.end(2, "a"), None);
        // ... and may use the same id for its own session.
        assert_eq!(r.start(2, "a", "m2", opts()).unwrap(), None);
        assert_eq!(r.len(), 2);
        let s = r.begin_synthesis(1, "a").unwrap();
        assert_eq!(s.model_id, "m1");
        r.start(1, "b", "m1", opts()).unwrap();
        let mut gone = r.end_connection(1);
        gone.sort();
        assert_eq!(gone, vec!["m1".to_owned(), "m1".to_owned()]);
        assert_eq!(r.len(), 1);
        assert!(r.end_connection(1).is_empty());
        drop(s); // a registration outliving its session touches nothing
        assert_eq!(r.end(2, "a"), Some("m2".to_owned()));
        assert!(r.is_empty());
    }

    #[test]
    fn idle_sessions_expire_but_not_while_a_synthesis_is_open() {
        let r = Arc::new(SessionRegistry::new(10));
        r.start(C, "busy", "m", opts()).unwrap();
        r.start(C, "idle", "m", opts()).unwrap();
        let call = r.begin_synthesis(C, "busy").unwrap();
        let idle = Duration::from_secs(60);
        assert!(r.expire_idle(Instant::now(), idle).is_empty());
        let later = Instant::now() + Duration::from_secs(61);
        assert_eq!(r.expire_idle(later, idle), vec!["m".to_owned()]);
        assert_eq!(r.len(), 1);
        assert!(r.expire_idle(later, idle).is_empty(), "busy: kept");
        drop(call);
        // The end of the call restarted the idle clock.
        assert!(r.expire_idle(Instant::now(), idle).is_empty());
        let much_later = Instant::now() + Duration::from_secs(61);
        assert_eq!(r.expire_idle(much_later, idle).len(), 1);
        assert!(r.is_empty());
    }

    #[test]
    fn a_late_registration_drop_does_not_touch_a_restarted_session() {
        let r = Arc::new(SessionRegistry::new(10));
        r.start(C, "a", "m", opts()).unwrap();
        let old = r.begin_synthesis(C, "a").unwrap();
        r.end(C, "a");
        r.start(C, "a", "m", opts()).unwrap();
        let new = r.begin_synthesis(C, "a").unwrap();
        drop(old);
        // The new call still counts as open: the session cannot expire under it.
        let later = Instant::now() + Duration::from_secs(3600);
        assert!(r.expire_idle(later, Duration::from_secs(1)).is_empty());
        r.control(C, "a", ControlCommand::Stop);
        assert!(new.control.borrow().stopped);
    }

    #[test]
    fn control_reaches_only_the_current_synthesis_of_that_session() {
        let r = Arc::new(SessionRegistry::new(10));
        r.start(C, "a", "mock", opts()).unwrap();
        r.start(C, "b", "mock", opts()).unwrap();
        let a1 = r.begin_synthesis(C, "a").unwrap();
        let b1 = r.begin_synthesis(C, "b").unwrap();
        r.control(C, "a", ControlCommand::Stop);
        assert!(a1.control.borrow().stopped);
        assert!(!b1.control.borrow().stopped);
        drop(a1);
        // The next call of A starts clean.
        let a2 = r.begin_synthesis(C, "a").unwrap();
        assert_eq!(*a2.control.borrow(), ControlState::default());
        r.control(C, "a", ControlCommand::Pause);
        assert!(a2.control.borrow().paused);
        r.control(C, "a", ControlCommand::Resume);
        assert!(!a2.control.borrow().paused);
        assert!(r.begin_synthesis(C, "zzz").is_none());
        assert!(r
            .control(C, "zzz", ControlCommand::Stop)
            .contains("unknown"));
    }

    #[test]
    fn an_old_call_ending_does_not_clear_a_newer_one() {
        let r = Arc::new(SessionRegistry::new(10));
        r.start(C, "a", "mock", opts()).unwrap();
        let old = r.begin_synthesis(C, "a").unwrap();
        let new = r.begin_synthesis(C, "a").unwrap();
        drop(old);
        r.control(C, "a", ControlCommand::Stop);
        assert!(new.control.borrow().stopped);
    }

    #[test]
    fn session_end_mid_synthesis_keeps_the_channel_alive() {
        let r = Arc::new(SessionRegistry::new(10));
        r.start(C, "a", "mock", opts()).unwrap();
        let s = r.begin_synthesis(C, "a").unwrap();
        r.end(C, "a");
        assert!(s.control.has_changed().is_ok(), "sender must still exist");
    }
}
