//! Worker side of the registry: announce this worker in Redis and keep the announcement alive.
//!
//! The record is written with `SETEX <prefix><name> <ttl> <json>` and rewritten whole every
//! `ttl / 3` with fresh metrics, so a worker that dies silently disappears from the registry
//! within one TTL while a live one survives two missed heartbeats. The task never gives up:
//! when Redis is unreachable (at start or later) it retries with [`Backoff`](super::backoff) and
//! re-registers as soon as Redis answers again, so restarting Redis needs no restart of workers.
//! It logs once per state change (warn when lost, info when back), not once per attempt.
//!
//! ```no_run
//! # async fn demo() -> Result<(), duplex::registry::RegistryError> {
//! use duplex::registry::{spawn_registration, RegistrationConfig, WorkerRecord};
//! # fn current_record() -> WorkerRecord { unimplemented!() }
//! let cfg = RegistrationConfig::new("redis://127.0.0.1:6379", "worker-a");
//! let registration = spawn_registration(cfg, current_record)?;
//! // ... serve gRPC ...
//! registration.shutdown().await?; // on SIGTERM/SIGINT: the key is deleted
//! # Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};

use super::backoff::Backoff;
use super::record::{now_epoch_secs, WorkerRecord};
use super::{connect, open_client, redact_url, RegistryError, DEFAULT_PREFIX, DEFAULT_TTL};

/// Upper bound of [`Registration::shutdown`]: a dead Redis must not hold up process exit.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Where and how a worker registers (the `duplex worker --redis/--name/--registry-ttl` flags).
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    /// `redis://[user:pass@]host[:port][/db]`.
    pub redis_url: String,
    /// Key prefix; the key is `prefix + name` (default [`DEFAULT_PREFIX`], `worker:`).
    pub prefix: String,
    /// This worker's unique name; it is also written into the record's `name` field.
    pub name: String,
    /// Key lifetime without heartbeat (default [`DEFAULT_TTL`], 30 s). At least one second,
    /// because `SETEX` counts whole seconds; a fractional TTL is rounded up. The heartbeat runs
    /// every `ttl / 3`.
    pub ttl: Duration,
}

impl RegistrationConfig {
    /// A configuration with the default prefix and TTL.
    pub fn new(redis_url: impl Into<String>, name: impl Into<String>) -> Self {
        RegistrationConfig {
            redis_url: redis_url.into(),
            prefix: DEFAULT_PREFIX.to_string(),
            name: name.into(),
            ttl: DEFAULT_TTL,
        }
    }

    /// The Redis key of this worker's record.
    pub fn key(&self) -> String {
        format!("{}{}", self.prefix, self.name)
    }

    /// The TTL in whole seconds as `SETEX` takes it (rounded up).
    fn ttl_secs(&self) -> u64 {
        let whole = self.ttl.as_secs();
        if self.ttl.subsec_nanos() > 0 {
            whole + 1
        } else {
            whole
        }
    }

    fn validate(&self) -> Result<(), RegistryError> {
        if self.name.is_empty() {
            return Err(RegistryError::InvalidConfig(
                "worker name must not be empty".into(),
            ));
        }
        if self.ttl < Duration::from_secs(1) {
            return Err(RegistryError::InvalidConfig(format!(
                "registry TTL must be at least 1 s (SETEX counts seconds), got {:?}",
                self.ttl
            )));
        }
        Ok(())
    }
}

/// A running registration: the heartbeat task of one worker.
///
/// Call [`Registration::shutdown`] on clean exit so the key disappears at once. Dropping it
/// without shutdown stops the heartbeat but leaves the key to expire after its TTL (what a
/// crash looks like to readers).
pub struct Registration {
    key: String,
    registered: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), RegistryError>>>,
}

/// Starts the heartbeat of `cfg` on the caller's tokio runtime and returns at once.
///
/// `make_record` is called before every write so each heartbeat carries live figures
/// (`metrics.queue_depth` = open sessions, `metrics.rtf`, `resident_models` from the model
/// manager). The registration owns two fields and overwrites them on every write: `name`
/// (set to `cfg.name`, so the key and the record always agree) and `last_heartbeat_ts` (now).
/// Keep `make_record` cheap and non-blocking: it runs on the runtime's threads.
///
/// Errors only for misconfiguration (bad URL, empty name, TTL under 1 s) or when called outside
/// a tokio runtime; Redis being down is not an error (the task retries by itself).
pub fn spawn_registration(
    cfg: RegistrationConfig,
    make_record: impl Fn() -> WorkerRecord + Send + Sync + 'static,
) -> Result<Registration, RegistryError> {
    cfg.validate()?;
    let client = open_client(&cfg.redis_url)?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| RegistryError::NoRuntime)?;
    let key = cfg.key();
    let registered = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = oneshot::channel();
    let heartbeat = Heartbeat {
        client,
        url: redact_url(&cfg.redis_url),
        key: key.clone(),
        name: cfg.name.clone(),
        ttl_secs: cfg.ttl_secs(),
        period: cfg.ttl / 3,
        registered: registered.clone(),
    };
    let task = runtime.spawn(heartbeat.run(make_record, stop_rx));
    Ok(Registration {
        key,
        registered,
        stop: Some(stop_tx),
        task: Some(task),
    })
}

impl Registration {
    /// The Redis key this worker writes (`prefix + name`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// True when the last write reached Redis, i.e. orchestrators can see this worker now;
    /// handy for the worker's own health report.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Relaxed)
    }

    /// Stops the heartbeat and deletes the key (SIGTERM/SIGINT path), in at most about
    /// [`SHUTDOWN_TIMEOUT`]. An error means the key could not be deleted (Redis down); it then
    /// expires by its TTL, so callers usually just log it.
    pub async fn shutdown(mut self) -> Result<(), RegistryError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        // The task bounds its own delete by SHUTDOWN_TIMEOUT; the margin covers scheduling.
        match timeout(SHUTDOWN_TIMEOUT + Duration::from_millis(500), &mut task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(RegistryError::Redis(format!(
                "registration task ended abnormally: {join}"
            ))),
            Err(_) => {
                task.abort();
                Err(RegistryError::Redis(format!(
                    "deleting {} timed out; it will expire by its TTL",
                    self.key
                )))
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// State of the heartbeat task.
struct Heartbeat {
    client: redis::Client,
    url: String,
    key: String,
    name: String,
    ttl_secs: u64,
    period: Duration,
    registered: Arc<AtomicBool>,
}

impl Heartbeat {
    async fn run(
        self,
        make_record: impl Fn() -> WorkerRecord,
        mut stop: oneshot::Receiver<()>,
    ) -> Result<(), RegistryError> {
        let mut conn: Option<MultiplexedConnection> = None;
        let mut backoff = Backoff::new();
        // None until the first attempt, then whether Redis took the last write: logs fire
        // only when this changes.
        let mut up: Option<bool> = None;
        loop {
            let started = Instant::now();
            let write = self.write(&mut conn, &make_record);
            let result = tokio::select! {
                r = write => r,
                _ = &mut stop => break,
            };
            let next = match result {
                Ok(()) => {
                    match up {
                        None => {
                            tracing::info!(key = %self.key, ttl_s = self.ttl_secs, "registered in Redis")
                        }
                        Some(false) => {
                            tracing::info!(key = %self.key, "Redis reachable again, worker re-registered")
                        }
                        Some(true) => tracing::trace!(key = %self.key, "heartbeat written"),
                    }
                    up = Some(true);
                    self.registered.store(true, Ordering::Relaxed);
                    backoff.reset();
                    started + self.period
                }
                Err(e) => {
                    conn = None;
                    if up != Some(false) {
                        tracing::warn!(
                            key = %self.key, redis = %self.url, error = %e,
                            "Redis unreachable, worker not registered; retrying with backoff"
                        );
                    } else {
                        tracing::debug!(key = %self.key, error = %e, "registration retry failed");
                    }
                    up = Some(false);
                    self.registered.store(false, Ordering::Relaxed);
                    Instant::now() + backoff.next_delay()
                }
            };
            tokio::select! {
                _ = sleep_until(next) => {}
                _ = &mut stop => break,
            }
        }
        self.registered.store(false, Ordering::Relaxed);
        self.delete(conn).await
    }

    /// One heartbeat: connect if needed, then `SETEX` the whole fresh record. The connection is
    /// stored before the command is sent so that, if shutdown cancels us mid-write, the delete
    /// goes out on the same connection and Redis orders it after the write.
    async fn write(
        &self,
        conn: &mut Option<MultiplexedConnection>,
        make_record: &impl Fn() -> WorkerRecord,
    ) -> redis::RedisResult<()> {
        let c = match conn {
            Some(c) => c,
            None => conn.insert(connect(&self.client).await?),
        };
        let mut record = make_record();
        record.name.clone_from(&self.name);
        record.last_heartbeat_ts = now_epoch_secs();
        redis::cmd("SETEX")
            .arg(&self.key)
            .arg(self.ttl_secs)
            .arg(record.to_json())
            .query_async::<()>(c)
            .await
    }

    /// Deletes the key on shutdown, bounded by [`SHUTDOWN_TIMEOUT`].
    async fn delete(&self, conn: Option<MultiplexedConnection>) -> Result<(), RegistryError> {
        let del = async {
            let mut c = match conn {
                Some(c) => c,
                None => connect(&self.client).await?,
            };
            redis::cmd("DEL")
                .arg(&self.key)
                .query_async::<i64>(&mut c)
                .await
        };
        match timeout(SHUTDOWN_TIMEOUT, del).await {
            Ok(Ok(_)) => {
                tracing::info!(key = %self.key, "deregistered from Redis");
                Ok(())
            }
            Ok(Err(e)) => Err(RegistryError::Redis(format!(
                "cannot delete {}: {e}; it will expire by its TTL",
                self.key
            ))),
            Err(_) => Err(RegistryError::Redis(format!(
                "deleting {} timed out; it will expire by its TTL",
                self.key
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_rounded_up_to_whole_seconds() {
        let mut cfg = RegistrationConfig::new("redis://127.0.0.1:1", "w");
        assert_eq!(cfg.ttl_secs(), 30);
        cfg.ttl = Duration::from_millis(2500);
        assert_eq!(cfg.ttl_secs(), 3);
        cfg.ttl = Duration::from_secs(1);
        assert_eq!(cfg.ttl_secs(), 1);
        assert_eq!(cfg.key(), "worker:w");
    }

    #[test]
    fn rejects_bad_configuration() {
        let mut cfg = RegistrationConfig::new("redis://127.0.0.1:1", "");
        assert!(matches!(
            cfg.validate(),
            Err(RegistryError::InvalidConfig(m)) if m.contains("name")
        ));
        cfg.name = "w".into();
        cfg.ttl = Duration::from_millis(999);
        assert!(matches!(
            cfg.validate(),
            Err(RegistryError::InvalidConfig(m)) if m.contains("at least 1 s")
        ));
    }

    #[test]
    fn needs_a_runtime() {
        let cfg = RegistrationConfig::new("redis://127.0.0.1:1", "w");
        let r = spawn_registration(cfg, || unreachable!());
        assert!(matches!(r, Err(RegistryError::NoRuntime)));
    }

    #[tokio::test]
    async fn rejects_a_bad_url_up_front() {
        let cfg = RegistrationConfig::new("not a url", "w");
        let r = spawn_registration(cfg, || unreachable!());
        assert!(matches!(r, Err(RegistryError::InvalidUrl { .. })));
    }

    #[tokio::test]
    async fn unreachable_redis_is_retried_not_fatal_and_shutdown_is_bounded() {
        // Port 1 on loopback: connection refused at once.
        let mut cfg = RegistrationConfig::new("redis://127.0.0.1:1", "w");
        cfg.ttl = Duration::from_secs(3);
        let reg = spawn_registration(cfg, || WorkerRecord {
            name: String::new(),
            addr: "grpc://127.0.0.1:7001".into(),
            capabilities: Default::default(),
            resident_models: vec![],
            metrics: Default::default(),
            last_heartbeat_ts: 0.0,
        })
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!reg.is_registered());
        let r = tokio::time::timeout(Duration::from_secs(5), reg.shutdown())
            .await
            .unwrap();
        assert!(matches!(r, Err(RegistryError::Redis(_))), "{r:?}");
    }
}
