//! Choosing a worker for a new session: a pure function, so routing is testable without Redis
//! or sockets and the orchestrator can call it on any core.
//!
//! Order of preference (docs/PROTOCOL.md / issue 5):
//! 1. **healthy only**: fresh heartbeat (discovery already drops stale records) and no recent
//!    local failure (the caller knows that, see [`Candidate::healthy`]);
//! 2. **requested model resident** (`?model=`): a worker that has it loaded starts at once,
//!    others would have to load it; if none has it, any healthy worker will do;
//! 3. **language match**, preferred but not required, the same way;
//! 4. **least loaded** by *power of two choices*: two distinct random candidates of the best
//!    group, the less loaded wins. Unlike "always the global minimum" it does not send a burst
//!    of simultaneous sessions (from several cores or orchestrators reading the same stale
//!    load figures) all to the same worker, and unlike random it still avoids the busy ones.

use super::record::WorkerRecord;

/// One worker as the selection sees it. Borrows from the snapshot, so building the list per
/// session allocates nothing but the slice.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// `grpc://host:port` (identifies the worker to the caller; not used in the decision).
    pub addr: &'a str,
    /// Models loaded on the worker (empty for a static `--worker` with no registry record).
    pub resident_models: &'a [String],
    /// Languages the worker speaks (empty when unknown).
    pub languages: &'a [String],
    /// False when the caller saw this worker fail recently; unhealthy workers are never chosen.
    pub healthy: bool,
    /// Registry `queue_depth` plus this process's own in-flight sessions on the worker (the
    /// registry figure lags by up to one heartbeat, the local one does not).
    pub load: f64,
}

impl<'a> Candidate<'a> {
    /// A candidate from a registry record, with the caller's view of its health and its
    /// in-flight session count.
    pub fn from_record(record: &'a WorkerRecord, healthy: bool, local_in_flight: u32) -> Self {
        Candidate {
            addr: &record.addr,
            resident_models: &record.resident_models,
            languages: &record.capabilities.languages,
            healthy,
            load: record.metrics.queue_depth + f64::from(local_in_flight),
        }
    }

    /// A static `--worker` address with no registry record: no known models or languages, so
    /// it is chosen on health and load alone (and as the fallback of model/language
    /// preferences).
    pub fn from_static(addr: &'a str, healthy: bool, local_in_flight: u32) -> Self {
        Candidate {
            addr,
            resident_models: &[],
            languages: &[],
            healthy,
            load: f64::from(local_in_flight),
        }
    }

    fn has_model(&self, model: &str) -> bool {
        self.resident_models.iter().any(|m| m == model)
    }

    fn speaks(&self, language: &str) -> bool {
        self.languages.iter().any(|l| language_matches(language, l))
    }
}

/// Index into `candidates` of the worker a new session should use, or `None` when no candidate
/// is healthy (the caller answers `WORKER_UNAVAILABLE`).
///
/// `rng_seed` drives the power-of-two-choices draw; pass a fresh random or per-session value
/// (e.g. a counter hashed with the session id). The same inputs always give the same answer.
pub fn choose(
    candidates: &[Candidate<'_>],
    want_model: Option<&str>,
    want_language: Option<&str>,
    rng_seed: u64,
) -> Option<usize> {
    let mut group: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].healthy)
        .collect();
    if let Some(model) = want_model.filter(|m| !m.is_empty()) {
        narrow(&mut group, |i| candidates[i].has_model(model));
    }
    if let Some(language) = want_language.filter(|l| !l.is_empty()) {
        narrow(&mut group, |i| candidates[i].speaks(language));
    }
    match group.len() {
        0 => None,
        1 => Some(group[0]),
        n => {
            let mut rng = SplitMix64(rng_seed);
            let first = (rng.next() % n as u64) as usize;
            let mut second = (rng.next() % (n as u64 - 1)) as usize;
            if second >= first {
                second += 1;
            }
            let (a, b) = (group[first], group[second]);
            // Ties go to the first draw, which is itself random.
            if load_key(candidates[b].load) < load_key(candidates[a].load) {
                Some(b)
            } else {
                Some(a)
            }
        }
    }
}

/// Keeps only the members that satisfy `pred`, unless none does (a preference, not a filter).
fn narrow(group: &mut Vec<usize>, pred: impl Fn(usize) -> bool) {
    if group.iter().any(|&i| pred(i)) {
        group.retain(|&i| pred(i));
    }
}

/// NaN load (a broken metric) sorts as the busiest.
fn load_key(load: f64) -> f64 {
    if load.is_nan() {
        f64::INFINITY
    } else {
        load
    }
}

/// `want` matches `have` when equal ignoring case, or when their primary subtags are
/// (`en` matches `en-US`, `en-GB` matches `en`): a worker that speaks English serves any
/// English request better than a worker that does not.
pub fn language_matches(want: &str, have: &str) -> bool {
    fn primary(tag: &str) -> &str {
        tag.split(['-', '_']).next().unwrap_or(tag)
    }
    want.eq_ignore_ascii_case(have) || primary(want).eq_ignore_ascii_case(primary(have))
}

/// Tiny deterministic generator (SplitMix64): seeded selection without pulling an RNG into
/// a pure function.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct W {
        addr: String,
        models: Vec<String>,
        langs: Vec<String>,
        healthy: bool,
        load: f64,
    }

    fn w(addr: &str, models: &[&str], langs: &[&str], load: f64) -> W {
        W {
            addr: addr.into(),
            models: models.iter().map(|s| s.to_string()).collect(),
            langs: langs.iter().map(|s| s.to_string()).collect(),
            healthy: true,
            load,
        }
    }

    fn cands(ws: &[W]) -> Vec<Candidate<'_>> {
        ws.iter()
            .map(|w| Candidate {
                addr: &w.addr,
                resident_models: &w.models,
                languages: &w.langs,
                healthy: w.healthy,
                load: w.load,
            })
            .collect()
    }

    #[test]
    fn empty_or_all_unhealthy_is_none() {
        assert_eq!(choose(&[], None, None, 1), None);
        let mut ws = vec![w("a", &[], &[], 0.0), w("b", &[], &[], 0.0)];
        ws[0].healthy = false;
        ws[1].healthy = false;
        assert_eq!(choose(&cands(&ws), Some("m"), Some("en"), 1), None);
    }

    #[test]
    fn unhealthy_is_never_chosen() {
        let mut ws = vec![
            w("a", &["m"], &["en"], 0.0),
            w("b", &[], &[], 50.0),
            w("c", &[], &[], 0.0),
        ];
        ws[0].healthy = false;
        ws[2].healthy = false;
        let c = cands(&ws);
        for seed in 0..500 {
            assert_eq!(choose(&c, Some("m"), Some("en"), seed), Some(1));
        }
    }

    #[test]
    fn requested_model_goes_where_it_is_resident() {
        let ws = vec![
            w("a", &["mock-440hz"], &["en"], 10.0),
            w("b", &["big-model"], &["en"], 0.0),
            w("c", &["mock-440hz"], &["en"], 0.0),
        ];
        let c = cands(&ws);
        for seed in 0..500 {
            assert_eq!(choose(&c, Some("big-model"), None, seed), Some(1));
            let pick = choose(&c, Some("mock-440hz"), None, seed);
            assert!(matches!(pick, Some(0) | Some(2)), "{pick:?}");
        }
    }

    #[test]
    fn model_resident_nowhere_falls_back_to_any_healthy() {
        let ws = vec![w("a", &["x"], &[], 0.0), w("b", &["y"], &[], 0.0)];
        let c = cands(&ws);
        let picks: std::collections::HashSet<_> = (0..100)
            .map(|s| choose(&c, Some("z"), None, s).unwrap())
            .collect();
        assert_eq!(picks.len(), 2);
    }

    #[test]
    fn model_beats_language_and_language_beats_load() {
        let ws = vec![
            w("a", &["m"], &["de"], 5.0),
            w("b", &[], &["en-US"], 0.0),
            w("c", &["m"], &["en"], 9.0),
        ];
        let c = cands(&ws);
        for seed in 0..200 {
            assert_eq!(choose(&c, Some("m"), Some("en"), seed), Some(2));
            let upper = choose(&c, None, Some("EN"), seed).unwrap();
            assert!(upper == 1 || upper == 2, "{upper}");
            let lang_pick = choose(&c, None, Some("en-GB"), seed).unwrap();
            assert!(lang_pick == 1 || lang_pick == 2);
            // No language match for "fr": falls back to load among all.
            assert!(choose(&c, Some("m"), Some("fr"), seed).is_some());
        }
        assert!(language_matches("en", "en-US"));
        assert!(language_matches("pt_BR", "pt"));
        assert!(!language_matches("en", "de"));
    }

    #[test]
    fn the_most_loaded_of_three_is_never_chosen() {
        let ws = vec![
            w("a", &[], &[], 1.0),
            w("b", &[], &[], 2.0),
            w("c", &[], &[], 30.0),
        ];
        let c = cands(&ws);
        let mut counts = [0usize; 3];
        for seed in 0..1000 {
            counts[choose(&c, None, None, seed).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(counts[0] > counts[1], "{counts:?}");
    }

    #[test]
    fn two_equal_workers_split_1000_picks_within_10_percent() {
        let ws = vec![w("a", &[], &[], 3.0), w("b", &[], &[], 3.0)];
        let c = cands(&ws);
        let mut counts = [0usize; 2];
        for seed in 0..1000 {
            counts[choose(&c, None, None, seed).unwrap()] += 1;
        }
        assert!((450..=550).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn load_feedback_balances_exactly() {
        // As the orchestrator does: each pick adds one in-flight session to the chosen worker.
        let mut ws = vec![w("a", &[], &[], 0.0), w("b", &[], &[], 0.0)];
        for seed in 0..1000 {
            let i = choose(&cands(&ws), None, None, seed).unwrap();
            ws[i].load += 1.0;
        }
        assert!((ws[0].load - ws[1].load).abs() <= 1.0);
    }

    #[test]
    fn same_inputs_same_answer_and_nan_load_is_busiest() {
        let ws = vec![w("a", &[], &[], f64::NAN), w("b", &[], &[], 100.0)];
        let c = cands(&ws);
        for seed in 0..100 {
            assert_eq!(choose(&c, None, None, seed), Some(1));
            assert_eq!(choose(&c, None, None, seed), choose(&c, None, None, seed));
        }
    }

    #[test]
    fn from_record_adds_local_in_flight() {
        let rec = crate::registry::record::parse(
            "worker:a",
            br#"{"name":"a","addr":"grpc://h:1","capabilities":{"streaming":true,"zero_shot":false,
            "lora":false,"cpu_ok":true,"languages":["en"],"emotive_zero_prompt":false},
            "resident_models":["m"],"metrics":{"rtf":0.1,"queue_depth":4},"last_heartbeat_ts":1.0}"#,
        )
        .unwrap();
        let c = Candidate::from_record(&rec, true, 3);
        assert_eq!(c.load, 7.0);
        assert_eq!(c.addr, "grpc://h:1");
        assert!(c.has_model("m") && c.speaks("en-AU"));

        // Registry and static workers together: the model goes to the registry worker, a
        // request without preferences goes to the less loaded static one.
        let s = Candidate::from_static("grpc://127.0.0.1:7001", true, 1);
        assert_eq!(s.load, 1.0);
        let both = [c, s];
        for seed in 0..100 {
            assert_eq!(choose(&both, Some("m"), None, seed), Some(0));
            assert_eq!(choose(&both, None, None, seed), Some(1));
        }
    }
}
