//! Orchestrator side of the registry: a background thread that keeps an immutable snapshot of
//! every live worker record, for routing code to read without ever waiting on Redis.
//!
//! **Why its own thread.** The orchestrator's cores run tokio-uring event loops that must only
//! ever do frame-path work; a Redis round trip (or a Redis outage) must not delay a frame. So
//! discovery runs on a dedicated OS thread with its own current-thread tokio runtime, and hands
//! results over as an `Arc<Snapshot>` that is never mutated after publication.
//!
//! **Why `Mutex<Arc<Snapshot>>` and not `arc-swap`.** A read is one uncontended lock, one
//! reference-count increment and an unlock (tens of nanoseconds), done once per new session
//! (selection), never per frame; the writer takes the lock once per refresh to swap a pointer
//! and drops the old snapshot after unlocking. That is cheap enough that an extra dependency
//! buys nothing measurable; the lock is never held across I/O or allocation-heavy work. A
//! `Condvar` beside it lets startup code and tests wait for the next snapshot.
//!
//! **Refresh.** Every `interval` (default 1 s): `SCAN <prefix>* COUNT 500` until the cursor is
//! back to 0 (never `KEYS`, which blocks Redis), then `MGET` in batches of 500. When the Redis
//! server has keyspace notifications enabled (`notify-keyspace-events` containing `K` and `$`,
//! `g`, `x`), a subscriber on `__keyspace@<db>__:<prefix>*` triggers a refresh within
//! milliseconds of a worker appearing or leaving; without them nothing changes but latency.
//! Records that do not parse are skipped with a warning naming the key, once per key and reason;
//! records whose `last_heartbeat_ts` is older than `max_age` are dropped even if the key exists.
//!
//! **Outage.** When Redis is unreachable the snapshot keeps the last known workers with
//! `redis_ok = false` (so `/health` can report degraded while routing continues), and the
//! thread reconnects with backoff by itself; staleness is not applied to that frozen list,
//! because the orchestrator's own connection failures are the better health signal then.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use tokio::sync::{watch, Notify};

use super::backoff::Backoff;
use super::record::{now_epoch_secs, parse, WorkerRecord};
use super::{
    connect, glob_escape, open_client, redact_url, RegistryError, CONNECT_TIMEOUT,
    DEFAULT_DISCOVERY_INTERVAL, DEFAULT_PREFIX, DEFAULT_TTL,
};

/// `COUNT` hint of each `SCAN` step and batch size of each `MGET`: large enough that a
/// registry of a few hundred workers is one round trip, small enough not to stall Redis.
const BATCH: usize = 500;
/// Bound on `SCAN` steps in one refresh, against a misbehaving server that never returns
/// cursor 0.
const MAX_SCAN_STEPS: usize = 100_000;
/// Coalesces a burst of keyspace events into one refresh.
const NOTIFY_DEBOUNCE: Duration = Duration::from_millis(10);
/// How long [`Discovery::stop`] waits for the thread to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);

/// What discovery reads and how often (the `duplex serve --redis` settings).
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// `redis://[user:pass@]host[:port][/db]`.
    pub redis_url: String,
    /// Key prefix of worker records (default [`DEFAULT_PREFIX`], `worker:`).
    pub prefix: String,
    /// Time between two full reads (default [`DEFAULT_DISCOVERY_INTERVAL`], 1 s).
    pub interval: Duration,
    /// Records whose heartbeat is older than this are dropped even if their key still exists
    /// (default [`DEFAULT_TTL`], 30 s: the workers' default TTL). Set it to the workers'
    /// `--registry-ttl` when that differs: it must exceed their heartbeat period (TTL / 3) or
    /// live workers would flap. Compared with this host's clock, so hosts need roughly
    /// synchronised clocks (NTP).
    pub max_age: Duration,
    /// Subscribe to keyspace notifications for faster updates (default true; harmless when
    /// the server does not publish them).
    pub keyspace_events: bool,
}

impl DiscoveryConfig {
    /// Defaults for everything but the URL.
    pub fn new(redis_url: impl Into<String>) -> Self {
        DiscoveryConfig {
            redis_url: redis_url.into(),
            prefix: DEFAULT_PREFIX.to_string(),
            interval: DEFAULT_DISCOVERY_INTERVAL,
            max_age: DEFAULT_TTL,
            keyspace_events: true,
        }
    }
}

/// The registry as last seen: immutable once published, shared by every reader.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Live workers, sorted by name. Kept from the previous snapshot while Redis is down.
    pub workers: Vec<WorkerRecord>,
    /// Whether the last read of Redis succeeded (`/health` reports degraded when false).
    pub redis_ok: bool,
    /// When this snapshot was published.
    pub updated_at: Instant,
    /// When Redis was last read successfully (`None` before the first success): the age of
    /// `workers`.
    pub refreshed_at: Option<Instant>,
    /// Increases by one with every published snapshot (0 = nothing read yet), so readers can
    /// cache anything derived from a snapshot and recompute only when it changes.
    pub version: u64,
    /// Why Redis is considered down, when `redis_ok` is false.
    pub error: Option<String>,
}

impl Snapshot {
    fn initial() -> Self {
        Snapshot {
            workers: Vec::new(),
            redis_ok: false,
            updated_at: Instant::now(),
            refreshed_at: None,
            version: 0,
            error: Some("registry not read yet".into()),
        }
    }

    /// The worker record with this `name`.
    pub fn by_name(&self, name: &str) -> Option<&WorkerRecord> {
        self.workers.iter().find(|w| w.name == name)
    }

    /// The worker record with this `addr` (`grpc://host:port`).
    pub fn by_addr(&self, addr: &str) -> Option<&WorkerRecord> {
        self.workers.iter().find(|w| w.addr == addr)
    }
}

/// A running discovery thread and its latest snapshot.
pub struct Discovery {
    shared: Arc<Shared>,
    stop_tx: watch::Sender<bool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// State shared between the discovery thread and readers.
struct Shared {
    current: Mutex<Arc<Snapshot>>,
    published: Condvar,
    refresh: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Arc<Snapshot>> {
        // Nothing panics while holding the lock (clone or swap of an Arc), so a poisoned lock
        // still holds a consistent snapshot.
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, make: impl FnOnce(&Snapshot) -> Snapshot) {
        let mut guard = self.lock();
        let next = Arc::new(make(&guard));
        let old = std::mem::replace(&mut *guard, next);
        drop(guard);
        self.published.notify_all();
        drop(old);
    }
}

/// Starts discovery with the default `max_age` and keyspace notifications on; see
/// [`start_discovery_with`].
pub fn start_discovery(
    redis_url: &str,
    prefix: &str,
    interval: Duration,
) -> Result<Arc<Discovery>, RegistryError> {
    start_discovery_with(DiscoveryConfig {
        prefix: prefix.to_string(),
        interval,
        ..DiscoveryConfig::new(redis_url)
    })
}

/// Starts the discovery thread and returns at once (the first snapshot, version 1, follows
/// within one Redis round trip; until then [`Discovery::snapshot`] is empty with
/// `redis_ok = false`). Call it once per process and share the `Arc`.
///
/// Errors only for misconfiguration (bad URL, zero interval) or when the OS refuses a thread;
/// Redis being down is not an error.
pub fn start_discovery_with(cfg: DiscoveryConfig) -> Result<Arc<Discovery>, RegistryError> {
    if cfg.interval.is_zero() {
        return Err(RegistryError::InvalidConfig(
            "discovery interval must be positive".into(),
        ));
    }
    let client = open_client(&cfg.redis_url)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RegistryError::Thread)?;
    let shared = Arc::new(Shared {
        current: Mutex::new(Arc::new(Snapshot::initial())),
        published: Condvar::new(),
        refresh: Notify::new(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let refresher = Refresher {
        db: client.get_connection_info().redis.db,
        client,
        url: redact_url(&cfg.redis_url),
        pattern: format!("{}*", glob_escape(&cfg.prefix)),
        cfg,
        shared: shared.clone(),
        warned: WarnOnce::default(),
    };
    let thread = std::thread::Builder::new()
        .name("duplex-discovery".into())
        .spawn(move || runtime.block_on(refresher.run(stop_rx)))
        .map_err(RegistryError::Thread)?;
    Ok(Arc::new(Discovery {
        shared,
        stop_tx,
        thread: Mutex::new(Some(thread)),
    }))
}

impl Discovery {
    /// The latest snapshot. Cheap (a lock held only to clone an `Arc`), callable from any
    /// thread; call it per new session, not per frame.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.lock().clone()
    }

    /// Blocks until a snapshot with `version >= min_version` is published or `timeout`
    /// passes, and returns the latest snapshot either way. For startup (wait for the first
    /// read before accepting clients) and tests; never call it on a core's event loop.
    pub fn wait_for_version(&self, min_version: u64, timeout: Duration) -> Arc<Snapshot> {
        let guard = self.shared.lock();
        let (guard, _) = self
            .shared
            .published
            .wait_timeout_while(guard, timeout, |s| s.version < min_version)
            .unwrap_or_else(|p| p.into_inner());
        guard.clone()
    }

    /// Asks for a refresh now instead of at the next interval (e.g. after a worker failed,
    /// to learn sooner whether it re-registered). Never blocks.
    pub fn refresh_now(&self) {
        self.shared.refresh.notify_one();
    }

    /// Stops the thread and waits (at most a few seconds) for it to finish. The last snapshot
    /// stays readable. Idempotent. Blocking: call it at shutdown, not on a core's event loop
    /// (dropping the last `Arc<Discovery>` also stops the thread, without waiting).
    pub fn stop(&self) {
        let _ = self.stop_tx.send(true);
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(handle) = handle else { return };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            tracing::warn!("discovery thread did not stop in time; leaving it detached");
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        // Signal only: Drop may run on a core, which must not block on a join.
        let _ = self.stop_tx.send(true);
    }
}

/// The discovery thread's state.
struct Refresher {
    client: redis::Client,
    db: i64,
    url: String,
    pattern: String,
    cfg: DiscoveryConfig,
    shared: Arc<Shared>,
    warned: WarnOnce,
}

impl Refresher {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        // Bumped each time Redis comes back, so the keyspace subscriber reconnects too.
        let (epoch_tx, epoch_rx) = watch::channel(0u64);
        let listener = self.cfg.keyspace_events.then(|| {
            let channel = format!("__keyspace@{}__:{}", self.db, self.pattern);
            tokio::spawn(keyspace_listener(
                self.client.clone(),
                channel,
                self.shared.clone(),
                epoch_rx,
            ))
        });

        let mut conn: Option<MultiplexedConnection> = None;
        let mut backoff = Backoff::new();
        let mut up: Option<bool> = None;
        while !*stop.borrow() {
            let read = async {
                let c = match &mut conn {
                    Some(c) => c,
                    None => conn.insert(connect(&self.client).await?),
                };
                fetch(c, &self.pattern).await
            };
            let result = tokio::select! {
                r = read => r,
                _ = stop.changed() => break,
            };
            let wait = match result {
                Ok(entries) => {
                    let workers = self.build(entries);
                    if up == Some(false) {
                        tracing::info!(redis = %self.url, workers = workers.len(), "Redis reachable again, registry refreshed");
                        epoch_tx.send_modify(|e| *e += 1);
                    } else if up.is_none() {
                        tracing::info!(redis = %self.url, workers = workers.len(), "registry discovery started");
                    }
                    up = Some(true);
                    backoff.reset();
                    let now = Instant::now();
                    self.shared.publish(|prev| Snapshot {
                        workers,
                        redis_ok: true,
                        updated_at: now,
                        refreshed_at: Some(now),
                        version: prev.version + 1,
                        error: None,
                    });
                    self.cfg.interval
                }
                Err(e) => {
                    conn = None;
                    if up != Some(false) {
                        let kept = self.shared.lock().workers.len();
                        tracing::warn!(
                            redis = %self.url, error = %e, workers_kept = kept,
                            "Redis unreachable, routing on the last registry snapshot; retrying with backoff"
                        );
                        let error = e.to_string();
                        self.shared.publish(|prev| Snapshot {
                            workers: prev.workers.clone(),
                            redis_ok: false,
                            updated_at: Instant::now(),
                            refreshed_at: prev.refreshed_at,
                            version: prev.version + 1,
                            error: Some(error),
                        });
                    } else {
                        tracing::debug!(error = %e, "registry read retry failed");
                    }
                    up = Some(false);
                    backoff.next_delay()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.refresh.notified() => {
                    tokio::time::sleep(NOTIFY_DEBOUNCE).await;
                }
                _ = stop.changed() => break,
            }
        }
        if let Some(task) = listener {
            task.abort();
        }
        tracing::debug!("registry discovery stopped");
    }

    /// Parses fetched records, skipping bad and stale ones (warning once per key and reason).
    fn build(&mut self, entries: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Vec<WorkerRecord> {
        let now = now_epoch_secs();
        let max_age = self.cfg.max_age.as_secs_f64();
        let mut present = Vec::with_capacity(entries.len());
        let mut workers = Vec::with_capacity(entries.len());
        for (raw_key, value) in entries {
            // The key vanished between SCAN and MGET (expired or deleted): not an error.
            let Some(value) = value else { continue };
            let key = String::from_utf8_lossy(&raw_key).into_owned();
            match parse(&key, &value) {
                Ok(record) if record.age_secs(now) > max_age => {
                    if self.warned.first(&key, "stale") {
                        tracing::warn!(
                            key = %key, age_s = record.age_secs(now), max_age_s = max_age,
                            "skipping worker record with a stale heartbeat"
                        );
                    }
                }
                Ok(record) => {
                    if self.warned.clear(&key) {
                        tracing::info!(key = %key, "worker record valid again");
                    }
                    workers.push(record);
                }
                Err(reason) => {
                    if self.warned.first(&key, &reason) {
                        tracing::warn!(key = %key, "skipping bad worker record: {reason}");
                    }
                }
            }
            present.push(key);
        }
        self.warned.retain(&present);
        workers.sort_by(|a, b| a.name.cmp(&b.name));
        workers
    }
}

/// All `(key, value)` pairs under `pattern`: `SCAN` to the end, then `MGET` in batches. A
/// value is `None` when its key disappeared in between.
async fn fetch(
    conn: &mut MultiplexedConnection,
    pattern: &str,
) -> redis::RedisResult<Vec<(Vec<u8>, Option<Vec<u8>>)>> {
    let mut keys = BTreeSet::new();
    let mut cursor: u64 = 0;
    for step in 0.. {
        if step >= MAX_SCAN_STEPS {
            return Err(redis::RedisError::from((
                redis::ErrorKind::ResponseError,
                "SCAN did not finish",
            )));
        }
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(BATCH)
            .query_async(conn)
            .await?;
        // SCAN may return a key more than once; the set dedupes.
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    let keys: Vec<Vec<u8>> = keys.into_iter().collect();
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(BATCH) {
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(chunk).query_async(conn).await?;
        out.extend(chunk.iter().cloned().zip(values));
    }
    Ok(out)
}

/// Wakes the refresh loop whenever a key under the prefix changes (set, deleted, expired).
/// Purely an accelerator: errors are retried quietly, the periodic refresh is the guarantee.
async fn keyspace_listener(
    client: redis::Client,
    channel: String,
    shared: Arc<Shared>,
    mut epoch: watch::Receiver<u64>,
) {
    let mut backoff = Backoff::new();
    loop {
        epoch.mark_unchanged();
        let session = async {
            let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            pubsub
                .psubscribe(&channel)
                .await
                .map_err(|e| e.to_string())?;
            tracing::debug!(%channel, "subscribed to keyspace notifications");
            let mut messages = pubsub.on_message();
            while messages.next().await.is_some() {
                shared.refresh.notify_one();
            }
            Ok::<(), String>(())
        };
        let outcome = tokio::select! {
            r = session => r,
            // Redis came back: the old subscription may be a half-open connection.
            _ = epoch.changed() => Ok(()),
        };
        match outcome {
            Ok(()) => backoff.reset(),
            Err(e) => tracing::debug!(error = %e, "keyspace subscription failed"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Remembers which keys were already reported for which reason, so a bad record is logged
/// once, not every second, and again only when its problem changes.
#[derive(Debug, Default)]
struct WarnOnce {
    reported: HashMap<String, String>,
}

impl WarnOnce {
    /// True the first time `key` is seen with `reason` (and records it).
    fn first(&mut self, key: &str, reason: &str) -> bool {
        match self.reported.get(key) {
            Some(r) if r == reason => false,
            _ => {
                self.reported.insert(key.to_string(), reason.to_string());
                true
            }
        }
    }

    /// Forgets `key` (its record is valid now); true if it had been reported.
    fn clear(&mut self, key: &str) -> bool {
        self.reported.remove(key).is_some()
    }

    /// Forgets keys that no longer exist, so memory stays bounded by the live key set.
    fn retain(&mut self, present: &[String]) {
        if self.reported.is_empty() {
            return;
        }
        let present: std::collections::HashSet<&str> = present.iter().map(String::as_str).collect();
        self.reported.retain(|k, _| present.contains(k.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Discovery>();
        assert_send_sync::<Snapshot>();
    }

    #[test]
    fn warns_once_per_key_and_reason() {
        let mut w = WarnOnce::default();
        assert!(w.first("worker:a", "not JSON"));
        assert!(!w.first("worker:a", "not JSON"));
        assert!(w.first("worker:b", "not JSON"));
        assert!(w.first("worker:a", "missing key"));
        assert!(!w.first("worker:a", "missing key"));
        assert!(w.clear("worker:a"));
        assert!(!w.clear("worker:a"));
        assert!(w.first("worker:a", "missing key"));
        w.retain(&["worker:a".to_string()]);
        assert!(w.first("worker:b", "not JSON"), "b was forgotten");
        assert!(!w.first("worker:a", "missing key"));
    }

    #[test]
    fn rejects_zero_interval_and_bad_url() {
        let mut cfg = DiscoveryConfig::new("redis://127.0.0.1:1");
        cfg.interval = Duration::ZERO;
        assert!(matches!(
            start_discovery_with(cfg),
            Err(RegistryError::InvalidConfig(_))
        ));
        assert!(matches!(
            start_discovery("nope", "worker:", Duration::from_secs(1)),
            Err(RegistryError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn unreachable_redis_publishes_a_down_snapshot_and_stops() {
        let d =
            start_discovery("redis://127.0.0.1:1", "worker:", Duration::from_millis(50)).unwrap();
        let s = d.wait_for_version(1, Duration::from_secs(10));
        assert_eq!(s.version, 1);
        assert!(!s.redis_ok);
        assert!(s.workers.is_empty());
        assert!(s.error.is_some());
        assert!(s.refreshed_at.is_none());
        d.stop();
        d.stop();
        assert_eq!(
            d.snapshot().version,
            1,
            "one down snapshot, not one per retry"
        );
    }
}
