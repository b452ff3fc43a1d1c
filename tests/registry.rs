//! The Redis worker registry against a real `redis-server` (one per test, on a free loopback
//! port, killed on drop): registration, TTL expiry, heartbeat, shutdown, hand-written and broken
//! records, a Redis outage and restart, keyspace notifications.
//!
//! The tests are synchronous and own a tokio runtime for the worker side, so the blocking
//! discovery API (`wait_for_version`) is called from a plain thread as the orchestrator would at
//! startup. Every wait is bounded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::free_port;
use common::redis::RedisServer;
use duplex::registry::record::now_epoch_secs;
use duplex::registry::{
    spawn_registration, start_discovery_with, Capabilities, Discovery, DiscoveryConfig, Metrics,
    RegistrationConfig, Snapshot, WorkerRecord,
};

/// Polls `f` every 20 ms until it yields a value; panics naming `what` after `timeout`.
fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn record(addr: &str, models: &[&str], queue_depth: f64) -> WorkerRecord {
    WorkerRecord {
        name: "set-by-registration".into(),
        addr: addr.into(),
        capabilities: Capabilities {
            streaming: true,
            zero_shot: false,
            lora: false,
            cpu_ok: true,
            languages: vec!["en".into()],
            emotive_zero_prompt: false,
        },
        resident_models: models.iter().map(|s| s.to_string()).collect(),
        metrics: Metrics {
            rtf: 0.05,
            queue_depth,
            extra: Default::default(),
        },
        last_heartbeat_ts: 0.0,
    }
}

fn discovery(url: &str, interval_ms: u64) -> Arc<Discovery> {
    let mut cfg = DiscoveryConfig::new(url);
    cfg.interval = Duration::from_millis(interval_ms);
    start_discovery_with(cfg).unwrap()
}

fn names(s: &Snapshot) -> Vec<String> {
    s.workers.iter().map(|w| w.name.clone()).collect()
}

/// Waits until the discovery snapshot satisfies `pred` and returns it.
fn wait_snapshot(
    d: &Discovery,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    wait_until(what, timeout, || {
        let s = d.snapshot();
        pred(&s).then_some(s)
    })
}

/// A record in the exact wire format, as another system (or an operator with redis-cli)
/// would write it.
fn hand_json(name: &str, ts: f64) -> String {
    format!(
        r#"{{"name": "{name}", "addr": "grpc://10.1.2.3:7001", "capabilities": {{"streaming": true, "zero_shot": true, "lora": false, "cpu_ok": true, "languages": ["en", "de"], "emotive_zero_prompt": false}}, "resident_models": ["mock-440hz", "xtts"], "metrics": {{"rtf": 0.31, "queue_depth": 2, "gpu_util": 0.5}}, "last_heartbeat_ts": {ts}}}"#
    )
}

#[test]
fn registered_worker_is_discovered_and_shutdown_deletes_it() {
    let redis = RedisServer::start();
    let rt = runtime();
    let _enter = rt.enter();
    let reg = spawn_registration(RegistrationConfig::new(redis.url(), "w1"), || {
        record("grpc://127.0.0.1:7101", &["mock-440hz"], 4.0)
    })
    .unwrap();
    assert_eq!(reg.key(), "worker:w1");
    let d = discovery(&redis.url(), 100);

    let s = wait_snapshot(&d, "w1 is discovered", Duration::from_secs(10), |s| {
        s.by_name("w1").is_some()
    });
    assert!(s.redis_ok);
    assert!(s.version >= 1);
    let w = s.by_name("w1").unwrap();
    assert_eq!(w.addr, "grpc://127.0.0.1:7101");
    assert_eq!(w.resident_models, vec!["mock-440hz".to_string()]);
    assert_eq!(w.metrics.queue_depth, 4.0);
    assert!((now_epoch_secs() - w.last_heartbeat_ts).abs() < 60.0);
    assert!(reg.is_registered());

    // Written with SETEX and the default 30 s TTL.
    let ttl = redis.ttl("worker:w1");
    assert!((1..=30).contains(&ttl), "ttl {ttl}");

    rt.block_on(reg.shutdown()).unwrap();
    assert_eq!(redis.get("worker:w1"), None, "shutdown deletes the key");
    wait_snapshot(&d, "w1 is gone", Duration::from_secs(10), |s| {
        s.redis_ok && s.workers.is_empty()
    });
    d.stop();
}

#[test]
fn heartbeat_keeps_the_record_alive_with_fresh_metrics() {
    let redis = RedisServer::start();
    let rt = runtime();
    let _enter = rt.enter();
    let depth = Arc::new(AtomicU64::new(0));
    let mut cfg = RegistrationConfig::new(redis.url(), "hb");
    cfg.ttl = Duration::from_secs(2);
    let d2 = depth.clone();
    let reg = spawn_registration(cfg, move || {
        record(
            "grpc://127.0.0.1:7102",
            &[],
            d2.load(Ordering::Relaxed) as f64,
        )
    })
    .unwrap();
    let d = discovery(&redis.url(), 100);
    wait_snapshot(&d, "hb is discovered", Duration::from_secs(10), |s| {
        s.by_name("hb").is_some()
    });

    // Watch the key for 3.5 TTLs: it must never disappear, and its heartbeat must advance.
    let mut last_ts = 0.0;
    let mut advances = 0;
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        let value = redis
            .get("worker:hb")
            .expect("key expired despite heartbeat");
        let rec = duplex::registry::parse("worker:hb", value.as_bytes()).unwrap();
        if rec.last_heartbeat_ts > last_ts {
            advances += 1;
            last_ts = rec.last_heartbeat_ts;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(advances >= 4, "only {advances} heartbeats seen in 7 s");
    assert!(redis.ttl("worker:hb") <= 2);

    // Metrics are re-read for every heartbeat and reach the orchestrator.
    depth.store(9, Ordering::Relaxed);
    wait_snapshot(&d, "queue_depth 9 is seen", Duration::from_secs(10), |s| {
        s.by_name("hb").map(|w| w.metrics.queue_depth) == Some(9.0)
    });
    rt.block_on(reg.shutdown()).unwrap();
    d.stop();
}

#[test]
fn stopped_heartbeat_expires_with_the_ttl() {
    let redis = RedisServer::start();
    let rt = runtime();
    let _enter = rt.enter();
    let mut cfg = RegistrationConfig::new(redis.url(), "short");
    cfg.ttl = Duration::from_secs(2);
    let reg = spawn_registration(cfg, || record("grpc://127.0.0.1:7103", &[], 0.0)).unwrap();
    let d = discovery(&redis.url(), 100);
    wait_snapshot(&d, "short is discovered", Duration::from_secs(10), |s| {
        s.by_name("short").is_some()
    });

    // Dropping without shutdown is a crash as far as Redis knows: no delete, no heartbeat.
    drop(reg);
    assert!(
        redis.get("worker:short").is_some(),
        "the key outlives the heartbeat until its TTL"
    );
    wait_snapshot(&d, "short expires", Duration::from_secs(10), |s| {
        s.redis_ok && s.by_name("short").is_none()
    });
    assert_eq!(redis.get("worker:short"), None);
    d.stop();
}

#[test]
fn hand_written_records_are_read_and_broken_ones_skipped() {
    let redis = RedisServer::start();
    let now = now_epoch_secs();
    let good = hand_json("good", now);
    let set = |key: &str, value: &str| {
        assert_eq!(
            redis.cli(&["SET", key, value]).as_deref(),
            Some("OK"),
            "{key}"
        );
    };
    set("worker:good", &good);
    set("worker:notjson", "this is not json");
    set(
        "worker:extra",
        &good.replacen("\"name\"", "\"version\": 2, \"name\"", 1),
    );
    set(
        "worker:extracap",
        &good.replacen("\"lora\"", "\"gpu\": true, \"lora\"", 1),
    );
    set(
        "worker:missing",
        &good.replacen("\"resident_models\": [\"mock-440hz\", \"xtts\"], ", "", 1),
    );
    set(
        "worker:wrongtype",
        &good.replacen("\"streaming\": true", "\"streaming\": \"yes\"", 1),
    );
    set("worker:stale", &hand_json("stale", now - 3600.0));
    // Same format under another prefix: not a worker record of ours.
    set("other:good", &hand_json("other", now));

    let d = discovery(&redis.url(), 100);
    let s = d.wait_for_version(1, Duration::from_secs(10));
    assert!(s.redis_ok, "{:?}", s.error);
    assert_eq!(names(&s), vec!["good".to_string()]);
    let w = &s.workers[0];
    assert_eq!(w.addr, "grpc://10.1.2.3:7001");
    assert_eq!(w.authority(), Some("10.1.2.3:7001"));
    assert!(w.capabilities.zero_shot && !w.capabilities.lora);
    assert_eq!(w.capabilities.languages, vec!["en", "de"]);
    assert_eq!(w.resident_models, vec!["mock-440hz", "xtts"]);
    assert_eq!(w.metrics.rtf, 0.31);
    assert_eq!(w.metrics.queue_depth, 2.0);
    assert_eq!(w.metrics.extra.get("gpu_util"), Some(&0.5));

    // Skipping is not sticky: a repaired record is read on the next refresh.
    set("worker:extra", &hand_json("repaired", now_epoch_secs()));
    let s = wait_snapshot(&d, "repaired is read", Duration::from_secs(10), |s| {
        s.by_name("repaired").is_some()
    });
    assert_eq!(names(&s), vec!["good".to_string(), "repaired".to_string()]);
    d.stop();
}

#[test]
fn prefix_is_configurable_and_matched_literally() {
    let redis = RedisServer::start();
    let rt = runtime();
    let _enter = rt.enter();
    let mut cfg = RegistrationConfig::new(redis.url(), "p1");
    cfg.prefix = "tts*[a]:".into();
    let reg = spawn_registration(cfg, || record("grpc://127.0.0.1:7104", &[], 0.0)).unwrap();
    // Would match the prefix if `*` and `[a]` were taken as glob patterns.
    assert_eq!(
        redis
            .cli(&["SET", "ttsXa:p2", &hand_json("p2", now_epoch_secs())])
            .as_deref(),
        Some("OK")
    );
    let mut dcfg = DiscoveryConfig::new(redis.url());
    dcfg.prefix = "tts*[a]:".into();
    dcfg.interval = Duration::from_millis(100);
    let d = start_discovery_with(dcfg).unwrap();
    let s = wait_snapshot(&d, "p1 is discovered", Duration::from_secs(10), |s| {
        s.by_name("p1").is_some()
    });
    assert_eq!(names(&s), vec!["p1".to_string()]);
    assert!(redis.get("tts*[a]:p1").is_some());
    rt.block_on(reg.shutdown()).unwrap();
    d.stop();
}

#[test]
fn redis_outage_keeps_the_snapshot_and_everything_recovers_by_itself() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let rt = runtime();
    let _enter = rt.enter();
    let mut cfg = RegistrationConfig::new(redis.url(), "survivor");
    cfg.ttl = Duration::from_secs(3);
    let reg = spawn_registration(cfg, || record("grpc://127.0.0.1:7105", &["m"], 1.0)).unwrap();
    let d = discovery(&redis.url(), 100);
    let before = wait_snapshot(&d, "survivor is discovered", Duration::from_secs(10), |s| {
        s.redis_ok && s.by_name("survivor").is_some()
    });

    redis.kill();
    let down = wait_snapshot(
        &d,
        "discovery notices the outage",
        Duration::from_secs(10),
        |s| !s.redis_ok,
    );
    assert_eq!(
        names(&down),
        vec!["survivor".to_string()],
        "last workers kept"
    );
    assert!(down.version > before.version);
    assert!(down.error.is_some());
    assert!(down.refreshed_at.is_some() && down.refreshed_at >= before.refreshed_at);
    wait_until(
        "the worker notices the outage",
        Duration::from_secs(10),
        || (!reg.is_registered()).then_some(()),
    );
    // Still routable well past the records' TTL: nothing ages out while Redis is away.
    std::thread::sleep(Duration::from_secs(4));
    let still = d.snapshot();
    assert!(!still.redis_ok);
    assert_eq!(names(&still), vec!["survivor".to_string()]);
    assert_eq!(
        still.refreshed_at, down.refreshed_at,
        "no read succeeded meanwhile"
    );

    // A fresh, empty Redis on the same port: the worker re-registers, discovery reconnects.
    let redis = RedisServer::start_on(port, &[]);
    let back = wait_snapshot(&d, "discovery recovers", Duration::from_secs(15), |s| {
        s.redis_ok && s.by_name("survivor").is_some()
    });
    assert!(back.error.is_none());
    assert!(redis.get("worker:survivor").is_some(), "re-registered");
    wait_until(
        "the worker reports registered",
        Duration::from_secs(10),
        || reg.is_registered().then_some(()),
    );
    rt.block_on(reg.shutdown()).unwrap();
    assert_eq!(redis.get("worker:survivor"), None);
    d.stop();
}

#[test]
fn keyspace_notifications_make_changes_visible_before_the_interval() {
    let redis = RedisServer::start_on(free_port(), &["--notify-keyspace-events", "K$gx"]);
    let rt = runtime();
    let _enter = rt.enter();
    // A refresh interval far longer than the waits below: only notifications can explain a
    // change showing up within them.
    let d = discovery(&redis.url(), 120_000);
    let first = d.wait_for_version(1, Duration::from_secs(10));
    assert!(first.redis_ok && first.workers.is_empty());
    wait_until("discovery subscribed", Duration::from_secs(10), || {
        (redis.cli(&["PUBSUB", "NUMPAT"]).as_deref() == Some("1")).then_some(())
    });

    let reg = spawn_registration(RegistrationConfig::new(redis.url(), "fast"), || {
        record("grpc://127.0.0.1:7106", &[], 0.0)
    })
    .unwrap();
    wait_snapshot(&d, "fast appears", Duration::from_secs(20), |s| {
        s.by_name("fast").is_some()
    });
    rt.block_on(reg.shutdown()).unwrap();
    wait_snapshot(&d, "fast disappears", Duration::from_secs(20), |s| {
        s.workers.is_empty()
    });
    d.stop();
}
