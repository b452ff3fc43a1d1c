//! The worker record stored in Redis (docs/PROTOCOL.md §3): what a worker says about itself.
//!
//! The record is shared with another system whose readers reject records with extra or missing
//! keys, so this module is strict in both directions: [`WorkerRecord::to_json`] writes exactly
//! the keys of the contract, and [`parse`] accepts exactly those keys with exactly those types.
//! Parsing is done by hand over a [`serde_json::Value`] rather than with `serde(deny_unknown_fields)`
//! because serde's type errors do not name the offending field, and the operator reading the
//! warning needs to know which key of which record is wrong.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Number, Value};

/// Top-level keys of a record (the contract's order; readers must not depend on key order).
const RECORD_KEYS: [&str; 6] = [
    "name",
    "addr",
    "capabilities",
    "resident_models",
    "metrics",
    "last_heartbeat_ts",
];

/// Keys of the `capabilities` object.
const CAPABILITY_KEYS: [&str; 6] = [
    "streaming",
    "zero_shot",
    "lora",
    "cpu_ok",
    "languages",
    "emotive_zero_prompt",
];

/// The scheme every `addr` carries: workers speak gRPC, and readers dial `host:port` after it.
pub const ADDR_SCHEME: &str = "grpc://";
/// The scheme of a worker that serves gRPC over TLS (`duplex worker --tls-cert`); readers dial
/// it with their `--worker-ca`.
pub const TLS_ADDR_SCHEME: &str = "grpcs://";

/// `host:port` after either scheme.
fn strip_scheme(addr: &str) -> Option<&str> {
    addr.strip_prefix(ADDR_SCHEME)
        .or_else(|| addr.strip_prefix(TLS_ADDR_SCHEME))
}

/// One worker's entry in the registry: where to reach it, what it can do, how busy it is.
///
/// The orchestrator routes sessions with it (model residency, language, load), so every field
/// is part of the routing decision; `last_heartbeat_ts` lets readers drop a record whose writer
/// stopped refreshing it even when the key itself has not expired.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    /// Unique worker name; the key is `<prefix><name>`.
    pub name: String,
    /// Where the worker's gRPC service listens, `grpc://host:port` (see [`WorkerRecord::authority`]).
    pub addr: String,
    /// What the worker's engine supports; used to match a session's needs.
    pub capabilities: Capabilities,
    /// Models loaded right now: a session asking for one of them starts without a load delay.
    pub resident_models: Vec<String>,
    /// Live load figures, refreshed with every heartbeat.
    pub metrics: Metrics,
    /// When the record was written, float seconds since the Unix epoch (writer's clock).
    pub last_heartbeat_ts: f64,
}

/// The `capabilities` object of a record: engine features a session may require.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Audio is produced while text still streams in.
    pub streaming: bool,
    /// Voice cloning from a reference clip without training.
    pub zero_shot: bool,
    /// LoRA adapters can be applied per session.
    pub lora: bool,
    /// The engine runs acceptably without a GPU.
    pub cpu_ok: bool,
    /// Languages the worker can speak (BCP-47-ish tags such as `en`, `de-DE`).
    pub languages: Vec<String>,
    /// Emotive speech without a prompt clip.
    pub emotive_zero_prompt: bool,
}

/// The `metrics` object of a record: numbers only, with `rtf` and `queue_depth` always present
/// because routing needs them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Real-time factor of recent synthesis (compute time / audio time; below 1 is faster than
    /// real time).
    pub rtf: f64,
    /// Open sessions on the worker: the load figure selection balances on.
    pub queue_depth: f64,
    /// Any other numeric metric the worker publishes (kept so readers can show them).
    pub extra: BTreeMap<String, f64>,
}

impl WorkerRecord {
    /// The record as the JSON object of the contract: exactly the six top-level keys and the six
    /// capability keys, nothing else.
    ///
    /// JSON has no NaN or infinity, and a `null` in `metrics` would make every strict reader drop
    /// the worker, so a non-finite number (e.g. an `rtf` computed as 0/0 before the first
    /// synthesis) is written as `0`.
    pub fn to_json(&self) -> String {
        self.to_value().to_string()
    }

    /// The record as a [`serde_json::Value`] (see [`WorkerRecord::to_json`]).
    pub fn to_value(&self) -> Value {
        let mut caps = Map::new();
        caps.insert("streaming".into(), Value::Bool(self.capabilities.streaming));
        caps.insert("zero_shot".into(), Value::Bool(self.capabilities.zero_shot));
        caps.insert("lora".into(), Value::Bool(self.capabilities.lora));
        caps.insert("cpu_ok".into(), Value::Bool(self.capabilities.cpu_ok));
        caps.insert(
            "languages".into(),
            strings_value(&self.capabilities.languages),
        );
        caps.insert(
            "emotive_zero_prompt".into(),
            Value::Bool(self.capabilities.emotive_zero_prompt),
        );

        let mut metrics = Map::new();
        for (k, v) in &self.metrics.extra {
            metrics.insert(k.clone(), metric_number(*v));
        }
        // The two required metrics win over a same-named entry in `extra`.
        metrics.insert("rtf".into(), metric_number(self.metrics.rtf));
        metrics.insert(
            "queue_depth".into(),
            metric_number(self.metrics.queue_depth),
        );

        let ts = if self.last_heartbeat_ts.is_finite() {
            self.last_heartbeat_ts
        } else {
            0.0
        };
        let mut rec = Map::new();
        rec.insert("name".into(), Value::String(self.name.clone()));
        rec.insert("addr".into(), Value::String(self.addr.clone()));
        rec.insert("capabilities".into(), Value::Object(caps));
        rec.insert(
            "resident_models".into(),
            strings_value(&self.resident_models),
        );
        rec.insert("metrics".into(), Value::Object(metrics));
        rec.insert(
            "last_heartbeat_ts".into(),
            Number::from_f64(ts).map_or(Value::from(0.0), Value::Number),
        );
        Value::Object(rec)
    }

    /// The record a worker publishes, built from its own `GetCapabilities` answer so the
    /// registry and the gRPC liveness probe can never disagree. `name` and
    /// `last_heartbeat_ts` are left empty: [`spawn_registration`](super::spawn_registration)
    /// fills them on every write. `metrics.rtf` and `metrics.queue_depth` come from the
    /// response's metrics (0 when absent), the other metrics are kept, and
    /// `max_concurrent_sessions` (not a capability key of the record) is published as a
    /// metric when set.
    pub fn from_capabilities(
        addr: impl Into<String>,
        response: &crate::proto::GetCapabilitiesResponse,
    ) -> WorkerRecord {
        let caps = response.capabilities.clone().unwrap_or_default();
        let mut extra: BTreeMap<String, f64> = response
            .metrics
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let rtf = extra.remove("rtf").unwrap_or(0.0);
        let queue_depth = extra.remove("queue_depth").unwrap_or(0.0);
        if caps.max_concurrent_sessions > 0 {
            extra.insert(
                "max_concurrent_sessions".into(),
                f64::from(caps.max_concurrent_sessions),
            );
        }
        WorkerRecord {
            name: String::new(),
            addr: addr.into(),
            capabilities: Capabilities {
                streaming: caps.streaming,
                zero_shot: caps.zero_shot,
                lora: caps.lora,
                cpu_ok: caps.cpu_ok,
                languages: caps.languages,
                emotive_zero_prompt: caps.emotive_zero_prompt,
            },
            resident_models: response.resident_models.clone(),
            metrics: Metrics {
                rtf,
                queue_depth,
                extra,
            },
            last_heartbeat_ts: 0.0,
        }
    }

    /// `host:port` of [`WorkerRecord::addr`], what a gRPC client dials. Records that pass
    /// [`parse`] always have one; `None` only for a hand-built record with a bad address.
    pub fn authority(&self) -> Option<&str> {
        strip_scheme(&self.addr)
    }

    /// Seconds since the record was written, by the reader's clock (negative if the writer's
    /// clock is ahead). Used to drop records whose writer stopped heartbeating.
    pub fn age_secs(&self, now_epoch_secs: f64) -> f64 {
        now_epoch_secs - self.last_heartbeat_ts
    }

    /// True when `model` is loaded on this worker.
    pub fn has_model(&self, model: &str) -> bool {
        self.resident_models.iter().any(|m| m == model)
    }
}

/// Current time as float seconds since the Unix epoch, the unit of `last_heartbeat_ts`.
pub fn now_epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Parses the value stored under `key` into a record.
///
/// Rejects (with a message that names `key` and the offending field) anything but a JSON object
/// with exactly the keys of docs/PROTOCOL.md §3: a missing or extra key at the top level or inside
/// `capabilities`, a value of the wrong type, a non-number in `metrics`, a `metrics` without
/// `rtf` or `queue_depth`, an `addr` that is not `grpc://host:port`, or an empty `name`.
/// Integers are accepted where floats are expected (`last_heartbeat_ts`, metrics).
pub fn parse(key: &str, bytes: &[u8]) -> Result<WorkerRecord, String> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("{key}: not valid JSON ({e})"))?;
    let Value::Object(obj) = value else {
        return Err(format!(
            "{key}: record must be a JSON object, got {}",
            type_name(&value)
        ));
    };
    exact_keys(key, "", &obj, &RECORD_KEYS)?;

    let name = string_field(key, "name", &obj["name"])?;
    if name.is_empty() {
        return Err(format!("{key}: field \"name\" must not be empty"));
    }
    let addr = string_field(key, "addr", &obj["addr"])?;
    check_addr(key, &addr)?;

    let Value::Object(caps) = &obj["capabilities"] else {
        return Err(wrong_type(
            key,
            "capabilities",
            "an object",
            &obj["capabilities"],
        ));
    };
    exact_keys(key, "capabilities.", caps, &CAPABILITY_KEYS)?;
    let capabilities = Capabilities {
        streaming: bool_field(key, "capabilities.streaming", &caps["streaming"])?,
        zero_shot: bool_field(key, "capabilities.zero_shot", &caps["zero_shot"])?,
        lora: bool_field(key, "capabilities.lora", &caps["lora"])?,
        cpu_ok: bool_field(key, "capabilities.cpu_ok", &caps["cpu_ok"])?,
        languages: strings_field(key, "capabilities.languages", &caps["languages"])?,
        emotive_zero_prompt: bool_field(
            key,
            "capabilities.emotive_zero_prompt",
            &caps["emotive_zero_prompt"],
        )?,
    };

    let resident_models = strings_field(key, "resident_models", &obj["resident_models"])?;

    let Value::Object(m) = &obj["metrics"] else {
        return Err(wrong_type(key, "metrics", "an object", &obj["metrics"]));
    };
    let mut extra = BTreeMap::new();
    for (k, v) in m {
        let n = number_field(key, &format!("metrics.{k}"), v)?;
        extra.insert(k.clone(), n);
    }
    let rtf = extra
        .remove("rtf")
        .ok_or_else(|| format!("{key}: missing key \"metrics.rtf\""))?;
    let queue_depth = extra
        .remove("queue_depth")
        .ok_or_else(|| format!("{key}: missing key \"metrics.queue_depth\""))?;

    let last_heartbeat_ts = number_field(key, "last_heartbeat_ts", &obj["last_heartbeat_ts"])?;

    Ok(WorkerRecord {
        name,
        addr,
        capabilities,
        resident_models,
        metrics: Metrics {
            rtf,
            queue_depth,
            extra,
        },
        last_heartbeat_ts,
    })
}

/// Fails on the first missing key (in contract order) or, failing that, the first extra key.
fn exact_keys(
    key: &str,
    path: &str,
    obj: &Map<String, Value>,
    expected: &[&str],
) -> Result<(), String> {
    if let Some(missing) = expected.iter().find(|k| !obj.contains_key(**k)) {
        return Err(format!("{key}: missing key \"{path}{missing}\""));
    }
    if let Some(extra) = obj.keys().find(|k| !expected.contains(&k.as_str())) {
        return Err(format!("{key}: unexpected key \"{path}{extra}\""));
    }
    Ok(())
}

/// `addr` must be `grpc://host:port` (or `grpcs://`) with a non-empty host and a non-zero port.
fn check_addr(key: &str, addr: &str) -> Result<(), String> {
    let bad = || format!("{key}: field \"addr\" must look like \"grpc://host:port\", got {addr:?}");
    let rest = strip_scheme(addr).ok_or_else(bad)?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty() && !host.contains('/') && !host.contains(char::is_whitespace);
    match port.parse::<u16>() {
        Ok(p) if p != 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

fn string_field(key: &str, field: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        other => Err(wrong_type(key, field, "a string", other)),
    }
}

fn bool_field(key: &str, field: &str, v: &Value) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        other => Err(wrong_type(key, field, "a bool", other)),
    }
}

fn number_field(key: &str, field: &str, v: &Value) -> Result<f64, String> {
    v.as_f64()
        .ok_or_else(|| wrong_type(key, field, "a number", v))
}

fn strings_field(key: &str, field: &str, v: &Value) -> Result<Vec<String>, String> {
    let Value::Array(items) = v else {
        return Err(wrong_type(key, field, "an array of strings", v));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(wrong_type(key, &format!("{field}[{i}]"), "a string", other)),
        })
        .collect()
}

fn wrong_type(key: &str, field: &str, expected: &str, got: &Value) -> String {
    format!(
        "{key}: field \"{field}\" must be {expected}, got {}",
        type_name(got)
    )
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn strings_value(items: &[String]) -> Value {
    Value::Array(items.iter().cloned().map(Value::String).collect())
}

/// A metric as JSON: integral values as integers (`"queue_depth": 3`, what a Python reader
/// expects for a count), others as floats, non-finite as `0`.
fn metric_number(v: f64) -> Value {
    if !v.is_finite() {
        return Value::from(0);
    }
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        // Exact: |v| < 2^53, so the cast neither rounds nor saturates.
        return Value::from(v as i64);
    }
    Number::from_f64(v).map_or(Value::from(0), Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> WorkerRecord {
        WorkerRecord {
            name: "w1".into(),
            addr: "grpc://10.0.0.5:7001".into(),
            capabilities: Capabilities {
                streaming: true,
                zero_shot: false,
                lora: false,
                cpu_ok: true,
                languages: vec!["en".into(), "de".into()],
                emotive_zero_prompt: false,
            },
            resident_models: vec!["mock-440hz".into()],
            metrics: Metrics {
                rtf: 0.25,
                queue_depth: 3.0,
                extra: BTreeMap::from([("gpu_mem_mb".to_string(), 512.5)]),
            },
            last_heartbeat_ts: 1_712_345_678.25,
        }
    }

    fn good_value() -> Value {
        json!({
            "name": "w1",
            "addr": "grpc://10.0.0.5:7001",
            "capabilities": {
                "streaming": true, "zero_shot": false, "lora": false, "cpu_ok": true,
                "languages": ["en", "de"], "emotive_zero_prompt": false
            },
            "resident_models": ["mock-440hz"],
            "metrics": {"rtf": 0.25, "queue_depth": 3, "gpu_mem_mb": 512.5},
            "last_heartbeat_ts": 1712345678.25
        })
    }

    fn parse_value(v: &Value) -> Result<WorkerRecord, String> {
        parse("worker:w1", v.to_string().as_bytes())
    }

    /// Applies `edit` to a good record and returns the parse error.
    fn broken(edit: impl FnOnce(&mut Value)) -> String {
        let mut v = good_value();
        edit(&mut v);
        match parse_value(&v) {
            Ok(r) => panic!("accepted a broken record: {r:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn serializes_exactly_the_contract_keys() {
        let v: Value = serde_json::from_str(&sample().to_json()).unwrap();
        let obj = v.as_object().unwrap();
        let mut keys: Vec<_> = obj.keys().cloned().collect();
        keys.sort();
        let mut want: Vec<_> = RECORD_KEYS.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(keys, want);
        let caps = obj["capabilities"].as_object().unwrap();
        let mut ckeys: Vec<_> = caps.keys().cloned().collect();
        ckeys.sort();
        let mut cwant: Vec<_> = CAPABILITY_KEYS.iter().map(|s| s.to_string()).collect();
        cwant.sort();
        assert_eq!(ckeys, cwant);
        assert_eq!(v, good_value());
    }

    #[test]
    fn heartbeat_is_a_float_and_counts_are_integers() {
        let mut r = sample();
        r.last_heartbeat_ts = 1_700_000_000.0;
        let text = r.to_json();
        assert!(
            text.contains("\"last_heartbeat_ts\":1700000000.0"),
            "{text}"
        );
        assert!(text.contains("\"queue_depth\":3"), "{text}");
        assert!(!text.contains("\"queue_depth\":3.0"), "{text}");
    }

    #[test]
    fn round_trips() {
        let r = sample();
        assert_eq!(parse("worker:w1", r.to_json().as_bytes()).unwrap(), r);
    }

    #[test]
    fn non_finite_metrics_are_written_as_zero_and_stay_parseable() {
        let mut r = sample();
        r.metrics.rtf = f64::NAN;
        r.metrics.queue_depth = f64::INFINITY;
        r.metrics.extra.insert("x".into(), f64::NEG_INFINITY);
        let back = parse("worker:w1", r.to_json().as_bytes()).unwrap();
        assert_eq!(back.metrics.rtf, 0.0);
        assert_eq!(back.metrics.queue_depth, 0.0);
        assert_eq!(back.metrics.extra["x"], 0.0);
    }

    #[test]
    fn parses_the_hand_written_format() {
        let r = parse_value(&good_value()).unwrap();
        assert_eq!(r, sample());
        assert_eq!(r.authority(), Some("10.0.0.5:7001"));
        assert!(r.has_model("mock-440hz"));
        assert!(!r.has_model("other"));
    }

    #[test]
    fn accepts_integer_timestamp_and_empty_arrays() {
        let mut v = good_value();
        v["last_heartbeat_ts"] = json!(1712345678);
        v["resident_models"] = json!([]);
        v["capabilities"]["languages"] = json!([]);
        v["metrics"] = json!({"rtf": 1, "queue_depth": 0});
        let r = parse_value(&v).unwrap();
        assert_eq!(r.last_heartbeat_ts, 1_712_345_678.0);
        assert!(r.resident_models.is_empty());
        assert!(r.metrics.extra.is_empty());
    }

    #[test]
    fn rejects_non_json_and_non_objects() {
        let e = parse("worker:x", b"not json").unwrap_err();
        assert!(e.starts_with("worker:x: not valid JSON"), "{e}");
        let e = parse("worker:x", b"[1,2]").unwrap_err();
        assert!(e.contains("must be a JSON object, got an array"), "{e}");
        let e = parse("worker:x", b"").unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn rejects_each_missing_top_level_key() {
        for k in RECORD_KEYS {
            let e = broken(|v| {
                v.as_object_mut().unwrap().remove(k);
            });
            assert_eq!(e, format!("worker:w1: missing key \"{k}\""));
        }
    }

    #[test]
    fn rejects_each_missing_capability_key() {
        for k in CAPABILITY_KEYS {
            let e = broken(|v| {
                v["capabilities"].as_object_mut().unwrap().remove(k);
            });
            assert_eq!(e, format!("worker:w1: missing key \"capabilities.{k}\""));
        }
    }

    #[test]
    fn rejects_extra_keys() {
        let e = broken(|v| v["version"] = json!(2));
        assert_eq!(e, "worker:w1: unexpected key \"version\"");
        let e = broken(|v| v["capabilities"]["gpu"] = json!(true));
        assert_eq!(e, "worker:w1: unexpected key \"capabilities.gpu\"");
    }

    #[test]
    fn rejects_missing_required_metrics() {
        let e = broken(|v| {
            v["metrics"].as_object_mut().unwrap().remove("rtf");
        });
        assert_eq!(e, "worker:w1: missing key \"metrics.rtf\"");
        let e = broken(|v| {
            v["metrics"].as_object_mut().unwrap().remove("queue_depth");
        });
        assert_eq!(e, "worker:w1: missing key \"metrics.queue_depth\"");
    }

    #[test]
    fn rejects_wrong_types_naming_the_field() {
        type Edit = Box<dyn FnOnce(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("name", Box::new(|v| v["name"] = json!(7))),
            ("addr", Box::new(|v| v["addr"] = json!(null))),
            ("capabilities", Box::new(|v| v["capabilities"] = json!([]))),
            (
                "capabilities.streaming",
                Box::new(|v| v["capabilities"]["streaming"] = json!("yes")),
            ),
            (
                "capabilities.zero_shot",
                Box::new(|v| v["capabilities"]["zero_shot"] = json!(1)),
            ),
            (
                "capabilities.lora",
                Box::new(|v| v["capabilities"]["lora"] = json!(null)),
            ),
            (
                "capabilities.cpu_ok",
                Box::new(|v| v["capabilities"]["cpu_ok"] = json!("true")),
            ),
            (
                "capabilities.languages",
                Box::new(|v| v["capabilities"]["languages"] = json!("en")),
            ),
            (
                "capabilities.languages[1]",
                Box::new(|v| v["capabilities"]["languages"] = json!(["en", 5])),
            ),
            (
                "capabilities.emotive_zero_prompt",
                Box::new(|v| v["capabilities"]["emotive_zero_prompt"] = json!({})),
            ),
            (
                "resident_models",
                Box::new(|v| v["resident_models"] = json!({"a": 1})),
            ),
            (
                "resident_models[0]",
                Box::new(|v| v["resident_models"] = json!([null])),
            ),
            ("metrics", Box::new(|v| v["metrics"] = json!(3))),
            (
                "metrics.queue_depth",
                Box::new(|v| v["metrics"]["queue_depth"] = json!("3")),
            ),
            (
                "metrics.gpu_mem_mb",
                Box::new(|v| v["metrics"]["gpu_mem_mb"] = json!(true)),
            ),
            (
                "last_heartbeat_ts",
                Box::new(|v| v["last_heartbeat_ts"] = json!("1712345678.2")),
            ),
        ];
        for (field, edit) in cases {
            let e = broken(edit);
            assert!(
                e.starts_with(&format!("worker:w1: field \"{field}\" must be")),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn rejects_bad_addresses_and_empty_name() {
        for addr in [
            "10.0.0.5:7001",
            "http://10.0.0.5:7001",
            "grpc://10.0.0.5",
            "grpc://:7001",
            "grpc://h:0",
            "grpc://h:70000",
            "grpc://h:port",
            "grpc://h/x:1",
        ] {
            let e = broken(|v| v["addr"] = json!(addr));
            assert!(e.contains("field \"addr\" must look like"), "{addr}: {e}");
        }
        let mut v = good_value();
        v["addr"] = json!("grpc://[::1]:7001");
        assert_eq!(parse_value(&v).unwrap().authority(), Some("[::1]:7001"));
        // A TLS worker's record.
        v["addr"] = json!("grpcs://w1:7443");
        assert_eq!(parse_value(&v).unwrap().authority(), Some("w1:7443"));
        let e = broken(|v| v["addr"] = json!("grpcs://w1"));
        assert!(e.contains("must look like"), "{e}");
        let e = broken(|v| v["name"] = json!(""));
        assert_eq!(e, "worker:w1: field \"name\" must not be empty");
    }

    #[test]
    fn builds_from_the_get_capabilities_answer() {
        use crate::proto;
        let response = proto::GetCapabilitiesResponse {
            capabilities: Some(proto::Capabilities {
                streaming: true,
                cpu_ok: true,
                languages: vec!["en".into()],
                max_concurrent_sessions: 64,
                ..Default::default()
            }),
            resident_models: vec!["mock-440hz".into()],
            metrics: [("rtf".to_string(), 0.02), ("queue_depth".to_string(), 5.0)]
                .into_iter()
                .collect(),
        };
        let mut r = WorkerRecord::from_capabilities("grpc://127.0.0.1:7001", &response);
        assert_eq!(r.metrics.rtf, 0.02);
        assert_eq!(r.metrics.queue_depth, 5.0);
        assert_eq!(r.metrics.extra["max_concurrent_sessions"], 64.0);
        assert!(r.capabilities.streaming && !r.capabilities.lora);
        assert_eq!(r.resident_models, vec!["mock-440hz"]);
        r.name = "w".into();
        // A value with a short exact decimal form: serde_json's default float parser may be
        // one ULP off for arbitrary timestamps, which says nothing about the record format.
        r.last_heartbeat_ts = 1_795_000_000.25;
        assert_eq!(parse("worker:w", r.to_json().as_bytes()).unwrap(), r);

        let bare = WorkerRecord::from_capabilities(
            "grpc://h:1",
            &proto::GetCapabilitiesResponse::default(),
        );
        assert_eq!(bare.metrics, Metrics::default());
        assert_eq!(bare.capabilities, Capabilities::default());
    }

    #[test]
    fn age_is_measured_against_the_reader_clock() {
        let r = sample();
        assert_eq!(r.age_secs(r.last_heartbeat_ts + 4.0), 4.0);
        assert!(now_epoch_secs() > 1.6e9);
    }
}
