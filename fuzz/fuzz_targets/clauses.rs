//! The clause splitter the worker speaks streamed text with
//! (`duplex::worker::clauses::ClauseSplitter`).
//!
//! Promises checked (module docs):
//! - no panic (char boundaries, abbreviations, closers, the length cap);
//! - nothing pronounceable is lost or reordered: the alphanumeric characters of the clauses,
//!   in order, are exactly those of the input, and the clauses' other non-whitespace
//!   characters appear in the input in the same order (only clauses with nothing to
//!   pronounce are dropped);
//! - every clause is trimmed and says something (has an alphanumeric character);
//! - a clause is at most `MAX_CLAUSE_CHARS` characters, not counting the closing quotes and
//!   brackets that follow its terminator;
//! - after `finish()` the splitter is empty;
//! - the clauses do not depend on how the text was cut into chunks.
#![no_main]

use duplex::worker::clauses::{ClauseSplitter, MAX_CLAUSE_CHARS};
use libfuzzer_sys::fuzz_target;

fn is_closer(c: char) -> bool {
    matches!(c, '"' | '\'' | ')' | ']' | '}' | '”' | '’' | '»')
}

fn clauses(chunks: &[&str]) -> Vec<String> {
    let mut s = ClauseSplitter::new();
    let mut out = Vec::new();
    for c in chunks {
        out.extend(s.push(c));
    }
    out.extend(s.finish());
    assert!(s.is_empty());
    out
}

fn check(text: &str, out: &[String]) {
    for c in out {
        assert_eq!(c.trim(), c, "clause not trimmed");
        assert!(c.chars().any(char::is_alphanumeric), "silent clause {c:?}");
        let body = c.trim_end_matches(is_closer);
        assert!(
            body.chars().count() <= MAX_CLAUSE_CHARS,
            "clause of {} chars",
            body.chars().count()
        );
    }
    let joined: String = out.concat();
    assert!(
        joined
            .chars()
            .filter(|c| c.is_alphanumeric())
            .eq(text.chars().filter(|c| c.is_alphanumeric())),
        "alphanumeric characters lost or reordered"
    );
    let mut input = text.chars().filter(|c| !c.is_whitespace());
    for c in joined.chars().filter(|c| !c.is_whitespace()) {
        assert!(input.any(|i| i == c), "{c:?} is not in the input in order");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let whole = clauses(&[&text]);
    check(&text, &whole);
    for variant in 0..2 {
        let chunks = duplex_fuzz::split_str(&text, variant);
        let got = clauses(&chunks);
        assert_eq!(got, whole, "clauses depend on the chunking ({variant})");
    }
});
