//! The Redis worker registry record (`duplex::registry::record::parse`): the JSON value a
//! discovery scan reads under `<prefix><name>`, written by any worker (or anything else that
//! can write to that Redis).
//!
//! Promises checked:
//! - no panic;
//! - an error names the key it was read under;
//! - an accepted record has a non-empty name, an `addr` whose `authority()` is `host:port`
//!   with a non-zero port, finite numbers, and no `rtf`/`queue_depth` left in `extra`;
//! - `to_json()` of an accepted record is accepted again and reads back as the same record
//!   (floats to within serde_json's last-digit rounding).
#![no_main]

use duplex::registry::record::{parse, WorkerRecord};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "duplex:worker:fuzz";

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= a.abs().max(b.abs()) * 4.0 * f64::EPSILON
}

fn check_accepted(r: &WorkerRecord) {
    assert!(!r.name.is_empty());
    let auth = r.authority().expect("accepted record has an authority");
    let (host, port) = auth.rsplit_once(':').expect("host:port");
    assert!(!host.is_empty());
    assert!(port.parse::<u16>().is_ok_and(|p| p != 0), "{auth}");
    assert!(r.last_heartbeat_ts.is_finite());
    assert!(r.metrics.rtf.is_finite() && r.metrics.queue_depth.is_finite());
    assert!(r.metrics.extra.values().all(|v| v.is_finite()));
    assert!(!r.metrics.extra.contains_key("rtf"));
    assert!(!r.metrics.extra.contains_key("queue_depth"));
    let _ = r.age_secs(1.7e9);
}

fuzz_target!(|data: &[u8]| {
    match parse(KEY, data) {
        Err(e) => assert!(e.starts_with(&format!("{KEY}: ")), "{e}"),
        Ok(r) => {
            check_accepted(&r);
            let json = r.to_json();
            let back = parse(KEY, json.as_bytes())
                .unwrap_or_else(|e| panic!("own output {json} refused: {e}"));
            check_accepted(&back);
            assert_eq!(back.name, r.name);
            assert_eq!(back.addr, r.addr);
            assert_eq!(back.capabilities, r.capabilities);
            assert_eq!(back.resident_models, r.resident_models);
            assert!(close(back.last_heartbeat_ts, r.last_heartbeat_ts));
            assert!(close(back.metrics.rtf, r.metrics.rtf));
            assert!(close(back.metrics.queue_depth, r.metrics.queue_depth));
            assert_eq!(
                back.metrics.extra.keys().collect::<Vec<_>>(),
                r.metrics.extra.keys().collect::<Vec<_>>()
            );
            for (k, v) in &r.metrics.extra {
                assert!(close(back.metrics.extra[k], *v), "metrics.{k}");
            }
        }
    }
});
