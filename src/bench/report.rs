//! The report: one table per scenario (figure, seed target + PASS/FAIL, our target +
//! PASS/FAIL), the header with the definitions, and the JSON document with every number.
//!
//! Why the two target columns: the seed's targets are what the system we replace promised (and
//! mostly missed); ours are what this design should reach. Showing both beside the same figure
//! keeps either from being quietly dropped.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value as Json;

/// The definitions printed in the report header and written to the JSON.
pub const DEFINITIONS: &[(&str, &str)] = &[
    (
        "FAL",
        "first-audio latency: text sent (instant before the socket write) -> first audio frame \
         received (instant the socket read that completed it returned); not the whole utterance",
    ),
    (
        "jitter",
        "|inter-arrival - 20 ms| between consecutive frames of one utterance, after its first \
         frame (realtime pacing); frames that arrive in one burst count 20 ms each",
    ),
    (
        "late frame",
        "a frame received more than 20 ms after its slot on the utterance's absolute schedule \
         (first frame + (seq-1) x 20 ms; the schedule re-anchors after a late frame)",
    ),
    (
        "barge-in",
        "PAUSE sent -> last audio frame received (0 if no frame arrived after PAUSE)",
    ),
    (
        "floor",
        "the same client's round trip to a trivial WebSocket server in this process that answers \
         each text with one pre-built audio frame: the physical floor for FAL on this machine now",
    ),
    (
        "timestamps",
        "per session, taken at the socket read (one read can complete several frames)",
    ),
    (
        "CPU %",
        "CPU time (user+system) / wall time x 100, so 100 % = one core; from /proc/<pid>/stat \
         for the orchestrator, getrusage for the generator",
    ),
];

/// How a figure compares with its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Cmp {
    /// Must be below.
    #[serde(rename = "<")]
    Lt,
    /// Must be at most.
    #[serde(rename = "<=")]
    Le,
    /// Must be above.
    #[serde(rename = ">")]
    Gt,
    /// Must be at least.
    #[serde(rename = ">=")]
    Ge,
}

/// A target: comparison and threshold, in the row's unit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Target {
    /// The comparison.
    pub cmp: Cmp,
    /// The threshold.
    pub threshold: f64,
}

impl Target {
    /// `< x`
    pub fn lt(x: f64) -> Option<Target> {
        Some(Target {
            cmp: Cmp::Lt,
            threshold: x,
        })
    }
    /// `<= x`
    pub fn le(x: f64) -> Option<Target> {
        Some(Target {
            cmp: Cmp::Le,
            threshold: x,
        })
    }
    /// `> x`
    pub fn gt(x: f64) -> Option<Target> {
        Some(Target {
            cmp: Cmp::Gt,
            threshold: x,
        })
    }
    /// `>= x`
    pub fn ge(x: f64) -> Option<Target> {
        Some(Target {
            cmp: Cmp::Ge,
            threshold: x,
        })
    }

    /// Whether `v` meets the target.
    pub fn passes(&self, v: f64) -> bool {
        match self.cmp {
            Cmp::Lt => v < self.threshold,
            Cmp::Le => v <= self.threshold,
            Cmp::Gt => v > self.threshold,
            Cmp::Ge => v >= self.threshold,
        }
    }
}

/// The unit of a row (drives formatting only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// Milliseconds.
    Ms,
    /// A plain count.
    Count,
    /// A ratio (×).
    Ratio,
    /// Percent of one core.
    Percent,
    /// KiB.
    Kib,
    /// Per second.
    PerSec,
    /// Microseconds.
    Us,
}

fn fmt_num(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Ms if v < 10.0 => format!("{v:.3} ms"),
        Unit::Ms => format!("{v:.1} ms"),
        Unit::Count if v.fract() == 0.0 => format!("{v:.0}"),
        Unit::Count => format!("{v:.2}"),
        Unit::Ratio => format!("{v:.1}x"),
        Unit::Percent => format!("{v:.1} %"),
        Unit::Kib if v >= 1024.0 => format!("{:.1} MiB", v / 1024.0),
        Unit::Kib => format!("{v:.1} KiB"),
        Unit::PerSec => format!("{v:.1}/s"),
        Unit::Us => format!("{v:.1} µs"),
    }
}

fn fmt_target(t: &Target, unit: Unit) -> String {
    let op = match t.cmp {
        Cmp::Lt => "<",
        Cmp::Le => "<=",
        Cmp::Gt => ">",
        Cmp::Ge => ">=",
    };
    format!("{op} {}", fmt_num(t.threshold, unit))
}

/// One line of a scenario table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// What is measured.
    pub metric: String,
    /// The figure, if there is one (else see `text`).
    pub value: Option<f64>,
    /// Its unit.
    pub unit: Unit,
    /// Text shown instead of / beside the number (e.g. "unsupported", "n/a").
    pub text: Option<String>,
    /// The seed's target for this figure.
    pub seed: Option<Target>,
    /// Our stricter target.
    pub ours: Option<Target>,
}

impl Row {
    /// A figure with optional targets.
    pub fn new(
        metric: impl Into<String>,
        value: Option<f64>,
        unit: Unit,
        seed: Option<Target>,
        ours: Option<Target>,
    ) -> Row {
        Row {
            metric: metric.into(),
            value,
            unit,
            text: None,
            seed,
            ours,
        }
    }

    /// A row without a number (e.g. "unsupported", "n/a (external target)").
    pub fn text(metric: impl Into<String>, text: impl Into<String>) -> Row {
        Row {
            metric: metric.into(),
            value: None,
            unit: Unit::Count,
            text: Some(text.into()),
            seed: None,
            ours: None,
        }
    }

    /// `PASS`/`FAIL` against a target, `None` if there is no target or no figure.
    pub fn verdict(&self, t: &Option<Target>) -> Option<bool> {
        Some(t.as_ref()?.passes(self.value?))
    }

    fn value_text(&self) -> String {
        match (&self.value, &self.text) {
            (Some(v), Some(t)) => format!("{} ({t})", fmt_num(*v, self.unit)),
            (Some(v), None) => fmt_num(*v, self.unit),
            (None, Some(t)) => t.clone(),
            (None, None) => "n/a".to_string(),
        }
    }

    fn target_text(&self, t: &Option<Target>) -> String {
        match t {
            None => String::new(),
            Some(tt) => {
                let verdict = match self.verdict(t) {
                    Some(true) => "PASS",
                    Some(false) => "FAIL",
                    None => "n/a",
                };
                format!("{} {verdict}", fmt_target(tt, self.unit))
            }
        }
    }
}

/// Outcome of a scenario.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", content = "detail", rename_all = "snake_case")]
pub enum Status {
    /// It ran.
    Ok,
    /// The target lacks something it needs (reported, never a failure).
    Unsupported(String),
    /// It could not run (connection refused, server died, ...).
    Error(String),
}

/// One scenario's results.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioReport {
    /// Stable name (`fal_single`, ...).
    pub name: &'static str,
    /// How it was run (sessions, utterances, format, pacing, mock settings).
    pub setup: String,
    /// Whether it ran.
    #[serde(flatten)]
    pub status: Status,
    /// The table.
    pub rows: Vec<Row>,
    /// Correctness problems (lost frames, wrong sequences, missing end markers, errors).
    pub problems: Vec<String>,
    /// Remarks printed under the table.
    pub notes: Vec<String>,
    /// Every number, for the JSON report.
    pub data: Json,
    /// Wall time the scenario took (s).
    pub wall_s: f64,
    /// The generator's own CPU use during the scenario (% of one core).
    pub generator_cpu_percent: f64,
    /// Share of the CPU time this VM wanted during the scenario that the host took (steal, %).
    pub host_steal_percent: Option<f64>,
}

impl ScenarioReport {
    /// An empty report for `name`.
    pub fn new(name: &'static str, setup: impl Into<String>) -> Self {
        Self {
            name,
            setup: setup.into(),
            status: Status::Ok,
            rows: Vec::new(),
            problems: Vec::new(),
            notes: Vec::new(),
            data: Json::Object(Default::default()),
            wall_s: 0.0,
            generator_cpu_percent: 0.0,
            host_steal_percent: None,
        }
    }

    /// Adds a row.
    pub fn row(&mut self, r: Row) {
        self.rows.push(r);
    }

    /// Stores a number or object under `key` in the JSON data.
    pub fn put(&mut self, key: &str, v: impl Serialize) {
        if let Json::Object(m) = &mut self.data {
            m.insert(
                key.to_string(),
                serde_json::to_value(v).unwrap_or(Json::Null),
            );
        }
    }

    /// Renders the table as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "\n== {} == {}", self.name, self.setup);
        match &self.status {
            Status::Ok => {}
            Status::Unsupported(why) => {
                let _ = writeln!(out, "  unsupported: {why}");
            }
            Status::Error(e) => {
                let _ = writeln!(out, "  ERROR: {e}");
            }
        }
        if !self.rows.is_empty() {
            let w0 = self
                .rows
                .iter()
                .map(|r| r.metric.len())
                .max()
                .unwrap_or(0)
                .max(6);
            let vals: Vec<String> = self.rows.iter().map(Row::value_text).collect();
            let w1 = vals.iter().map(String::len).max().unwrap_or(0).max(5);
            let seeds: Vec<String> = self.rows.iter().map(|r| r.target_text(&r.seed)).collect();
            let w2 = seeds.iter().map(String::len).max().unwrap_or(0).max(11);
            let _ = writeln!(
                out,
                "  {:<w0$}  {:>w1$}  {:<w2$}  our target",
                "metric", "value", "seed target"
            );
            for ((r, v), s) in self.rows.iter().zip(&vals).zip(&seeds) {
                let line = format!(
                    "  {:<w0$}  {:>w1$}  {:<w2$}  {}",
                    r.metric,
                    v,
                    s,
                    r.target_text(&r.ours)
                );
                let _ = writeln!(out, "{}", line.trim_end());
            }
        }
        if self.problems.is_empty() {
            if self.status == Status::Ok {
                let _ = writeln!(out, "  correctness: ok");
            }
        } else {
            let _ = writeln!(out, "  correctness: FAILED");
            for p in &self.problems {
                let _ = writeln!(out, "    - {p}");
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "  note: {n}");
        }
        let steal = self
            .host_steal_percent
            .map(|p| format!(", host steal {p:.1} % of the CPU time the VM wanted"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  ({:.1} s, generator CPU {:.0} % of a core{steal})",
            self.wall_s, self.generator_cpu_percent
        );
        out
    }
}

/// The before/after table of a `--baseline-bin` / `--baseline-serve-arg` run: every figure that
/// both runs produced, side by side, with after / before.
///
/// Why every row rather than a chosen few: a comparison that only shows what improved is an
/// advertisement; regressions must be as visible as gains.
pub fn render_comparison(before: &[ScenarioReport], after: &[ScenarioReport]) -> String {
    let mut lines: Vec<[String; 4]> = Vec::new();
    for a in after {
        let Some(b) = before.iter().find(|b| b.name == a.name) else {
            continue;
        };
        for row in &a.rows {
            let Some(va) = row.value else {
                continue;
            };
            let Some(vb) = b
                .rows
                .iter()
                .find(|r| r.metric == row.metric)
                .and_then(|r| r.value)
            else {
                continue;
            };
            let ratio = if vb != 0.0 {
                format!("{:.2}x", va / vb)
            } else if va == 0.0 {
                "=".to_string()
            } else {
                "-".to_string()
            };
            lines.push([
                format!("{} · {}", a.name, row.metric),
                fmt_num(vb, row.unit),
                fmt_num(va, row.unit),
                ratio,
            ]);
        }
        // The host's share beside the figures: a tail that moved while the steal moved is the
        // host's, not the code's.
        if let (Some(sb), Some(sa)) = (b.host_steal_percent, a.host_steal_percent) {
            lines.push([
                format!("{} · host steal during the scenario", a.name),
                fmt_num(sb, Unit::Percent),
                fmt_num(sa, Unit::Percent),
                String::new(),
            ]);
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n== before / after == the same scenarios in one command, before first; \
         after/before < 1 is lower (better for latency, jitter, CPU, memory; worse for counts \
         of completed work)"
    );
    if lines.is_empty() {
        let _ = writeln!(out, "  (no figure was produced by both runs)");
        return out;
    }
    let head = [
        "metric".to_string(),
        "before".to_string(),
        "after".to_string(),
        "after/before".to_string(),
    ];
    let w: Vec<usize> = (0..4)
        .map(|i| {
            lines
                .iter()
                .chain(std::iter::once(&head))
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for l in std::iter::once(&head).chain(&lines) {
        let _ = writeln!(
            out,
            "  {:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}",
            l[0],
            l[1],
            l[2],
            l[3],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        );
    }
    out
}

/// The report header: definitions, machine, mode.
pub fn render_header(machine: &super::procfs::Machine, mode: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "duplex bench — {mode}");
    let _ = writeln!(
        out,
        "machine: {} cores ({}), {} MiB, kernel {}, build {}, load avg {}",
        machine.cores,
        machine.cpu_model,
        machine.mem_total_mib,
        machine.kernel,
        machine.profile,
        machine.loadavg_at_start
    );
    let _ = writeln!(out, "definitions:");
    for (k, v) in DEFINITIONS {
        let _ = writeln!(out, "  {k}: {v}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_compare() {
        assert!(Target::lt(1.0).unwrap().passes(0.5));
        assert!(!Target::lt(1.0).unwrap().passes(1.0));
        assert!(Target::le(1.0).unwrap().passes(1.0));
        assert!(Target::gt(20.0).unwrap().passes(21.0));
        assert!(Target::ge(20.0).unwrap().passes(20.0));
    }

    #[test]
    fn rows_render_pass_fail_and_na() {
        let mut r = ScenarioReport::new("fal_single", "1 session");
        r.row(Row::new(
            "FAL p95",
            Some(0.5),
            Unit::Ms,
            Target::lt(300.0),
            None,
        ));
        r.row(Row::new(
            "FAL p99",
            Some(1.5),
            Unit::Ms,
            None,
            Target::lt(1.0),
        ));
        r.row(Row::new("RSS", None, Unit::Kib, None, Target::lt(16384.0)));
        r.row(Row::text("PAUSE", "unsupported"));
        let s = r.render();
        assert!(s.contains("== fal_single == 1 session"), "{s}");
        assert!(s.contains("0.500 ms  < 300.0 ms PASS"), "{s}");
        assert!(s.contains("< 1.000 ms FAIL"), "{s}");
        assert!(s.contains("< 16.0 MiB n/a"), "{s}");
        assert!(s.contains("unsupported"), "{s}");
        assert!(s.contains("correctness: ok"), "{s}");
    }

    #[test]
    fn problems_and_status_render() {
        let mut r = ScenarioReport::new("x", "");
        r.problems.push("3 frames missing".into());
        r.status = Status::Error("connect refused".into());
        let s = r.render();
        assert!(s.contains("ERROR: connect refused"));
        assert!(s.contains("correctness: FAILED"));
        assert!(s.contains("3 frames missing"));
    }

    #[test]
    fn json_has_status_rows_and_data() {
        let mut r = ScenarioReport::new("x", "setup");
        r.put("fal", 1.5);
        r.row(Row::new("a", Some(1.0), Unit::Ms, Target::lt(2.0), None));
        r.status = Status::Unsupported("no PAUSE".into());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["status"], "unsupported");
        assert_eq!(v["detail"], "no PAUSE");
        assert_eq!(v["data"]["fal"], 1.5);
        assert_eq!(v["rows"][0]["seed"]["cmp"], "<");
    }

    #[test]
    fn comparison_pairs_rows_by_scenario_and_metric() {
        let mk = |fal: f64, cpu: Option<f64>| {
            let mut r = ScenarioReport::new("scale", "");
            r.row(Row::new("N=1 FAL p99", Some(fal), Unit::Ms, None, None));
            r.row(Row::new("N=1 CPU", cpu, Unit::Percent, None, None));
            r.row(Row::text("orchestrator resources", "n/a"));
            r
        };
        let mut before = mk(2.0, None);
        before.host_steal_percent = Some(30.0);
        let mut after = mk(1.0, Some(3.0));
        after.host_steal_percent = Some(0.5);
        let s = render_comparison(&[before], &[after]);
        assert!(s.contains("scale · host steal during the scenario"), "{s}");
        assert!(s.contains("30.0 %"), "{s}");
        assert!(s.contains("scale · N=1 FAL p99"), "{s}");
        assert!(s.contains("2.000 ms"), "{s}");
        assert!(s.contains("1.000 ms"), "{s}");
        assert!(s.contains("0.50x"), "{s}");
        // A figure only one side has is left out rather than shown against nothing.
        assert!(!s.contains("N=1 CPU"), "{s}");
        let none = render_comparison(&[], &[mk(1.0, None)]);
        assert!(
            none.contains("no figure was produced by both runs"),
            "{none}"
        );
    }

    #[test]
    fn units_format() {
        assert_eq!(fmt_num(0.1234, Unit::Ms), "0.123 ms");
        assert_eq!(fmt_num(145.0, Unit::Ms), "145.0 ms");
        assert_eq!(fmt_num(3.0, Unit::Count), "3");
        assert_eq!(fmt_num(20480.0, Unit::Kib), "20.0 MiB");
        assert_eq!(fmt_num(2.26, Unit::Ratio), "2.3x");
        assert_eq!(fmt_num(150.0, Unit::PerSec), "150.0/s");
        assert_eq!(fmt_num(17.34, Unit::Us), "17.3 µs");
    }
}
