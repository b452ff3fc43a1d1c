//! Logging discipline of the registry against a real `redis-server`: a bad record is reported
//! once per key and reason (not every refresh), and a Redis outage is reported once when lost
//! and once when back, by both the worker and the orchestrator side, however many retries
//! happen in between.
//!
//! Its own test binary because it installs a global `tracing` subscriber that captures output.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::redis::RedisServer;
use duplex::registry::record::now_epoch_secs;
use duplex::registry::{
    spawn_registration, start_discovery_with, Capabilities, DiscoveryConfig, Metrics,
    RegistrationConfig, WorkerRecord,
};

/// Shared capture buffer for log lines.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn count(&self, needle: &str) -> usize {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines().filter(|l| l.contains(needle)).count()
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn bad_records_and_outages_are_logged_once_per_change() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .unwrap();

    let port = common::free_port();
    let mut redis = RedisServer::start_on(port, &[]);
    let url = format!("redis://127.0.0.1:{port}");
    assert_eq!(
        redis
            .cli(&["SET", "worker:bad", "not json at all"])
            .as_deref(),
        Some("OK")
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let mut cfg = RegistrationConfig::new(&url, "logger");
    cfg.ttl = Duration::from_secs(3);
    let reg = spawn_registration(cfg, || WorkerRecord {
        name: String::new(),
        addr: "grpc://127.0.0.1:7201".into(),
        capabilities: Capabilities {
            languages: vec!["en".into()],
            ..Default::default()
        },
        resident_models: vec![],
        metrics: Metrics::default(),
        last_heartbeat_ts: 0.0,
    })
    .unwrap();
    let mut dcfg = DiscoveryConfig::new(&url);
    dcfg.interval = Duration::from_millis(50);
    let d = start_discovery_with(dcfg).unwrap();

    // Twenty refreshes with the same bad record: one warning.
    let s = d.wait_for_version(20, Duration::from_secs(30));
    assert!(s.version >= 20 && s.redis_ok);
    assert_eq!(
        capture.count("skipping bad worker record: worker:bad: not valid JSON"),
        1
    );

    // A different problem with the same key is a new warning, again only once.
    let extra = format!(
        r#"{{"name":"bad","addr":"grpc://h:1","capabilities":{{"streaming":true,"zero_shot":false,"lora":false,"cpu_ok":true,"languages":[],"emotive_zero_prompt":false}},"resident_models":[],"metrics":{{"rtf":0,"queue_depth":0}},"last_heartbeat_ts":{},"extra":1}}"#,
        now_epoch_secs()
    );
    assert_eq!(
        redis.cli(&["SET", "worker:bad", &extra]).as_deref(),
        Some("OK")
    );
    let v = d.snapshot().version;
    d.wait_for_version(v + 20, Duration::from_secs(30));
    assert_eq!(capture.count("worker:bad: unexpected key \"extra\""), 1);
    assert_eq!(capture.count("skipping bad worker record"), 2);

    // Outage: many retries on both sides, one warning each.
    wait_until("registered", Duration::from_secs(10), || {
        reg.is_registered()
    });
    redis.kill();
    wait_until("both sides see the outage", Duration::from_secs(10), || {
        !d.snapshot().redis_ok && !reg.is_registered()
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        capture.count("Redis unreachable, routing on the last registry snapshot"),
        1
    );
    assert_eq!(capture.count("Redis unreachable, worker not registered"), 1);

    // Back: one info each.
    let _redis = RedisServer::start_on(port, &[]);
    wait_until("both sides recover", Duration::from_secs(15), || {
        d.snapshot().redis_ok && reg.is_registered()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        capture.count("Redis reachable again, registry refreshed"),
        1
    );
    assert_eq!(
        capture.count("Redis reachable again, worker re-registered"),
        1
    );
    assert_eq!(capture.count("Redis unreachable"), 2);

    rt.block_on(reg.shutdown()).unwrap();
    d.stop();
}
