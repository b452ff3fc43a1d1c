//! Redis discovery end to end (issue 5): real `redis-server`, real `duplex worker --redis`
//! processes, a real `duplex serve --redis`, real WebSocket clients. Load and routing are read
//! back from each worker's own `GetCapabilities` counters, so the tests see where sessions
//! actually went.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::*;
use duplex::grpc::tts::TtsClient;
use duplex::grpc::ClientOptions;
use serde_json::Value;

/// Short registry TTL so expiry is observable in a test (heartbeat every TTL/3 = 1 s).
const TTL: &str = "3";

async fn registered_worker(redis: &RedisServer, name: &str) -> Worker {
    registered_worker_on(redis, name, free_addr()).await
}

async fn registered_worker_on(redis: &RedisServer, name: &str, addr: SocketAddr) -> Worker {
    registered_worker_with(redis, name, addr, &[]).await
}

async fn registered_worker_with(
    redis: &RedisServer,
    name: &str,
    addr: SocketAddr,
    extra: &[&str],
) -> Worker {
    let url = redis.url();
    let mut args = vec![
        "--redis",
        &url,
        "--name",
        name,
        "--registry-ttl",
        TTL,
        "--mock-frame-interval-ms",
        "5",
    ];
    args.extend_from_slice(extra);
    Worker::start_on(addr, &args).await
}

async fn discovering_server(redis: &RedisServer, extra: &[&str]) -> Server {
    let addr = free_addr();
    let admin = free_addr();
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        addr.to_string(),
        "--admin-listen".into(),
        admin.to_string(),
        "--redis".into(),
        redis.url(),
        "--registry-ttl".into(),
        TTL.into(),
        "--discovery-interval-ms".into(),
        "200".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut proc = Proc::spawn("serve", &args);
    proc.wait_accepting(addr, WAIT).await;
    Server { proc, addr, admin }
}

/// `/health` as JSON.
async fn health(server: &Server) -> Value {
    let r = http_get(server.admin, "/health").await;
    serde_json::from_str(&r.body).unwrap_or(Value::Null)
}

/// Addresses `/health` lists as reachable.
fn reachable(h: &Value) -> Vec<String> {
    h["checks"]["workers"]["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .filter(|w| w["reachable"] == true)
                .filter_map(|w| w["addr"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `/health` until `pred` holds; panics with the last body after `timeout`.
async fn wait_health(server: &Server, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let h = health(server).await;
        if pred(&h) {
            return h;
        }
        assert!(Instant::now() < deadline, "health never matched; last: {h}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Syntheses the worker has run so far (its own counter, via gRPC).
async fn syntheses(worker: &Worker) -> f64 {
    let client = TtsClient::connect(&worker.addr.to_string(), &ClientOptions::default())
        .await
        .expect("connect to worker");
    let caps = client
        .get_capabilities(Some(Duration::from_secs(2)))
        .await
        .expect("GetCapabilities");
    caps.metrics.get("syntheses_total").copied().unwrap_or(-1.0)
}

#[tokio::test]
async fn registered_workers_are_discovered_and_expire_with_their_ttl() {
    let redis = RedisServer::start();
    let w1 = registered_worker(&redis, "w1").await;
    let server = discovering_server(&redis, &[]).await;
    let addr1 = w1.addr.to_string();
    wait_health(&server, WAIT, |h| reachable(h).contains(&addr1)).await;

    let mut c = server.client("pacing=asap").await;
    c.say("Hello from a discovered worker.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);

    // The heartbeat keeps the record across several TTLs.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        redis.get("worker:w1").is_some(),
        "heartbeat must keep the record"
    );
    let h = health(&server).await;
    assert!(reachable(&h).contains(&addr1), "{h}");

    // A killed worker can't delete its record: it disappears when the TTL runs out.
    let mut w1 = w1;
    w1.proc.kill();
    let deadline = Instant::now() + Duration::from_secs(8);
    while redis.get("worker:w1").is_some() {
        assert!(Instant::now() < deadline, "record outlived its TTL");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_health(&server, WAIT, |h| {
        h["checks"]["workers"]["workers"]
            .as_array()
            .is_some_and(|ws| ws.is_empty())
    })
    .await;
    let mut c = server.client("").await;
    c.say("Nobody is there.").await;
    let (err, _) = c.recv_until(WAIT, |v| v["type"] == "error").await;
    assert_eq!(err["code"], "WORKER_UNAVAILABLE", "{err}");
}

#[tokio::test]
async fn sessions_balance_over_two_workers_and_follow_a_resident_model() {
    let redis = RedisServer::start();
    let a = registered_worker(&redis, "a").await;
    // b keeps an espeak voice resident (needs espeak-ng, which scripts/test-all.sh installs).
    let b = registered_worker_with(&redis, "b", free_addr(), &["--preload", "espeak-de"]).await;
    let server = discovering_server(&redis, &[]).await;
    let (addr_a, addr_b) = (a.addr.to_string(), b.addr.to_string());
    wait_health(&server, WAIT, |h| {
        let r = reachable(h);
        r.contains(&addr_a) && r.contains(&addr_b)
    })
    .await;

    // 20 concurrent sessions, one utterance each.
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(server.client("pacing=asap").await);
    }
    for c in &mut clients {
        c.say("Spread me.").await;
    }
    for c in &mut clients {
        c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
    }
    let (na, nb) = (syntheses(&a).await, syntheses(&b).await);
    assert_eq!(na + nb, 20.0, "a={na} b={nb}");
    assert!(
        (7.0..=13.0).contains(&na),
        "unbalanced: a={na} b={nb} (±30 % of 10)"
    );
    drop(clients);

    // A model resident only on `b` (both list it; only b has it loaded): every session
    // asking for it goes to `b`.
    assert!(
        redis
            .get("worker:b")
            .is_some_and(|r| r.contains("espeak-de")),
        "b publishes its resident voice"
    );
    let (na0, nb0) = (syntheses(&a).await, syntheses(&b).await);
    for _ in 0..6 {
        let mut c = server.client("pacing=asap&model=espeak-de").await;
        c.say("Hallo.").await;
        let u = c.collect_utterance(WAIT).await;
        assert!(u.others.is_empty(), "{:?}", u.others);
        assert!(!u.frames.is_empty());
    }
    assert_eq!(syntheses(&a).await - na0, 0.0, "a does not have the model");
    assert_eq!(syntheses(&b).await - nb0, 6.0);
}

#[tokio::test]
async fn killed_worker_fails_over_and_is_used_again_after_restart() {
    let redis = RedisServer::start();
    let a = registered_worker(&redis, "a").await;
    let b = registered_worker(&redis, "b").await;
    let server = discovering_server(&redis, &[]).await;
    let (addr_a, addr_b) = (a.addr, b.addr);
    wait_health(&server, WAIT, |h| {
        let r = reachable(h);
        r.contains(&addr_a.to_string()) && r.contains(&addr_b.to_string())
    })
    .await;
    let mut workers = [Some(a), Some(b)];

    // Realtime pacing so the utterance is still playing when its worker dies.
    let mut c = server.client("").await;
    c.say("Which worker am I on?").await;
    c.read_frames(3, WAIT).await;
    // Find the worker serving this session: the one with an active synthesis.
    let mut victim = None;
    for (i, w) in workers.iter().enumerate() {
        let w = w.as_ref().unwrap();
        let client = TtsClient::connect(&w.addr.to_string(), &ClientOptions::default())
            .await
            .unwrap();
        let caps = client
            .get_capabilities(Some(Duration::from_secs(2)))
            .await
            .unwrap();
        if caps.metrics.get("queue_depth").copied().unwrap_or(0.0) > 0.0 {
            victim = Some(i);
        }
    }
    let victim = victim.expect("one worker holds the session");
    let victim_addr = workers[victim].as_ref().unwrap().addr;
    workers[victim].as_mut().unwrap().proc.kill();

    let (err, _) = c.recv_until(WAIT, |v| v["type"] == "error").await;
    assert_eq!(err["code"], "SYNTHESIS_FAILED", "{err}");
    let (end, _) = c.recv_until(WAIT, |v| v["is_final"] == true).await;
    assert_eq!(end["pcm"], "");

    // The same session's next utterance plays on the surviving worker.
    c.say("And now?").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
    let survivor = workers[1 - victim].as_ref().unwrap();
    assert!(syntheses(survivor).await >= 1.0);

    // Restart the dead worker on its port: new sessions use it again.
    workers[victim] =
        Some(registered_worker_on(&redis, if victim == 0 { "a" } else { "b" }, victim_addr).await);
    wait_health(&server, WAIT, |h| {
        reachable(h).contains(&victim_addr.to_string())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // past the local failure backoff
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut c = server.client("pacing=asap").await;
        c.say("Round robin again.").await;
        clients.push(c);
    }
    for c in &mut clients {
        c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
    }
    let restarted = workers[victim].as_ref().unwrap();
    assert!(
        syntheses(restarted).await >= 1.0,
        "the restarted worker gets sessions again"
    );
}

#[tokio::test]
async fn redis_outage_keeps_routing_and_recovers_by_itself() {
    let redis_port = free_port();
    let mut redis = RedisServer::start_on(redis_port, &[]);
    let w = registered_worker(&redis, "w").await;
    let server = discovering_server(&redis, &[]).await;
    let addr = w.addr.to_string();
    wait_health(&server, WAIT, |h| {
        reachable(h).contains(&addr) && h["status"] == "healthy"
    })
    .await;
    let mut running = server.client("").await;
    running.say("Keep talking through the outage.").await;
    running.read_frames(2, WAIT).await;

    redis.kill();
    let h = wait_health(&server, WAIT, |h| h["checks"]["redis"]["status"] == "down").await;
    assert_eq!(h["status"], "degraded", "{h}");
    // The running utterance finishes; a new session works on the last snapshot.
    let rest = running.collect_utterance(WAIT).await;
    assert_eq!(rest.end_sequence, MOCK_FRAMES as u64 + 1);
    let mut c = server.client("pacing=asap").await;
    c.say("New session during the outage.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);

    // Redis comes back empty: the worker re-registers and discovery sees it, nothing restarted.
    let redis = RedisServer::start_on(redis_port, &[]);
    wait_health(&server, Duration::from_secs(15), |h| {
        h["checks"]["redis"]["status"] == "ok" && h["checks"]["redis"]["workers"] == 1
    })
    .await;
    assert!(redis.get("worker:w").is_some());
}

#[tokio::test]
async fn hand_written_records_route_and_broken_ones_are_skipped() {
    let redis = RedisServer::start();
    // A worker that does not register itself; its record is written by hand.
    let w = Worker::start(&["--mock-frame-interval-ms", "5"]).await;
    let now = duplex::registry::record::now_epoch_secs();
    let good = format!(
        r#"{{"name":"hand","addr":"grpc://{}","capabilities":{{"streaming":true,"zero_shot":false,"lora":false,"cpu_ok":true,"languages":["en"],"emotive_zero_prompt":false}},"resident_models":["mock-440hz"],"metrics":{{"rtf":0.1,"queue_depth":0}},"last_heartbeat_ts":{now}}}"#,
        w.addr
    );
    let extra_key = good
        .replacen("{", "{\"extra\":1,", 1)
        .replace("\"hand\"", "\"extra\"");
    for (key, value) in [
        ("worker:hand", good.as_str()),
        ("worker:garbage", "not json"),
        ("worker:extra", extra_key.as_str()),
        ("worker:missing", r#"{"name":"missing"}"#),
    ] {
        assert_eq!(
            redis.cli(&["SETEX", key, "30", value]).as_deref(),
            Some("OK")
        );
    }
    let server = discovering_server(&redis, &[]).await;
    let addr = w.addr.to_string();
    let h = wait_health(&server, WAIT, |h| reachable(h).contains(&addr)).await;
    assert_eq!(
        h["checks"]["redis"]["workers"], 1,
        "only the good record: {h}"
    );
    let mut c = server.client("pacing=asap").await;
    c.say("Routed by a hand-written record.").await;
    c.collect_utterance(WAIT).await.assert_complete(MOCK_FRAMES);
    let logs = server.proc.logs();
    for key in ["worker:garbage", "worker:extra", "worker:missing"] {
        assert!(logs.contains(key), "no warning naming {key}:\n{logs}");
    }
}
