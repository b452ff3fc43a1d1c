//! Cutting streamed text into clauses, the unit a real engine synthesises at a time.
//!
//! Why: first-audio latency must not grow with text length, and streamed text (LLM tokens,
//! `is_final:false` chunks) should start speaking as soon as a clause is complete. So text is
//! spoken clause by clause: a clause ends at sentence punctuation (`.`, `!`, `?`, `;`, `:`, …)
//! that is followed by whitespace, at a line break, at a comma once the clause is long enough
//! to be worth a breath, or at a hard length cap (at the last space before it).
//!
//! A terminator at the very end of the text seen so far is *not* a boundary yet: the next
//! chunk may continue it ("3." + "14", "e.g." + …). [`ClauseSplitter::finish`] flushes the
//! rest when the input ends.

/// A comma ends a clause only when the clause before it has at least this many characters
/// (shorter comma phrases, "Well, …", keep their prosody).
pub const MIN_COMMA_CLAUSE_CHARS: usize = 40;
/// A clause longer than this is cut at its last space (or here, if it has none), so one
/// unpunctuated wall of text cannot delay the first audio.
pub const MAX_CLAUSE_CHARS: usize = 240;
/// Closing quotes and brackets after a terminator that still belong to its clause; a longer
/// run means the terminator does not end the clause. Bounds how far past a terminator
/// `boundary` looks, so waiting for the character after them is bounded too.
pub const MAX_CLOSERS: usize = 8;

/// Abbreviations whose trailing dot does not end a sentence (lowercase, without the dot).
const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "no", "fig",
    "approx", "inc", "ltd", "co", "mt",
];

/// Buffers text chunks and hands out complete clauses, in order.
#[derive(Debug, Default, Clone)]
pub struct ClauseSplitter {
    pending: String,
}

impl ClauseSplitter {
    /// An empty splitter.
    pub fn new() -> ClauseSplitter {
        ClauseSplitter::default()
    }

    /// Adds a chunk; returns the clauses it completed (possibly none). Linear in the chunk's
    /// length: a 1 MiB message costs one scan, not one per clause.
    pub fn push(&mut self, text: &str) -> Vec<String> {
        self.pending.push_str(text);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(len) = boundary(&self.pending[start..]) {
            if let Some(c) = speakable(&self.pending[start..start + len]) {
                out.push(c);
            }
            start += len;
        }
        self.pending.drain(..start);
        out
    }

    /// The input ended: returns whatever is left as a last clause (if it says anything).
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        speakable(&rest)
    }

    /// True when no text is waiting for a boundary.
    pub fn is_empty(&self) -> bool {
        self.pending.trim().is_empty()
    }
}

/// Trimmed clause, or `None` when it has nothing to pronounce (only spaces/punctuation).
fn speakable(clause: &str) -> Option<String> {
    let t = clause.trim();
    t.chars().any(char::is_alphanumeric).then(|| t.to_owned())
}

fn is_terminator(c: char) -> bool {
    matches!(
        c,
        '.' | '!' | '?' | ';' | ':' | '…' | '。' | '！' | '？' | '；'
    )
}

fn is_closer(c: char) -> bool {
    matches!(c, '"' | '\'' | ')' | ']' | '}' | '”' | '’' | '»')
}

/// Byte length of the first clause in `s`, if `s` holds a complete one. Looks at no more than
/// [`MAX_CLAUSE_CHARS`] characters (plus up to [`MAX_CLOSERS`] closing quotes and the
/// character after them, past a terminator).
fn boundary(s: &str) -> Option<usize> {
    let mut clause_chars = 0usize;
    let mut last_space: Option<usize> = None;
    let mut chars = s.char_indices();
    while let Some((pos, c)) = chars.next() {
        clause_chars += 1;
        if c == '\n' {
            return Some(pos + c.len_utf8());
        }
        if c.is_whitespace() {
            last_space = Some(pos);
        }
        let sentence_end = is_terminator(c) && !(c == '.' && is_abbreviation(&s[..pos]));
        let comma_end = c == ',' && clause_chars >= MIN_COMMA_CLAUSE_CHARS;
        if sentence_end || comma_end {
            // Closing quotes and brackets belong to the clause they close.
            let mut look = chars.clone();
            let mut next = look.next();
            let mut closers = 0;
            while closers <= MAX_CLOSERS && next.is_some_and(|(_, n)| is_closer(n)) {
                closers += 1;
                next = look.next();
            }
            match next {
                _ if closers > MAX_CLOSERS => {}
                Some((next_pos, n)) if n.is_whitespace() => return Some(next_pos),
                // CJK full stops need no space after them.
                Some((next_pos, _)) if matches!(c, '。' | '！' | '？') => return Some(next_pos),
                // The text seen so far ends before the character that decides: wait for it
                // rather than let the length cap below cut elsewhere (the clauses must not
                // depend on how the text was chunked).
                None => return None,
                _ => {}
            }
        }
        if clause_chars >= MAX_CLAUSE_CHARS {
            return Some(match last_space {
                Some(sp) if sp > 0 => sp,
                _ => pos + c.len_utf8(),
            });
        }
    }
    None
}

/// True when the word right before a dot is a known abbreviation or a single letter
/// ("Dr.", "e.g.", "J. Smith").
fn is_abbreviation(before_dot: &str) -> bool {
    let word = before_dot
        .rsplit(|c: char| c.is_whitespace() || c == '(' || c == '"')
        .next()
        .unwrap_or("");
    if word.is_empty() {
        return false;
    }
    let lower = word.to_lowercase();
    let letters = lower.chars().filter(|c| c.is_alphabetic()).count();
    (letters == 1 && lower.chars().count() == 1) || ABBREVIATIONS.contains(&lower.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&str]) -> Vec<String> {
        let mut s = ClauseSplitter::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(s.push(c));
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn sentences_are_clauses() {
        assert_eq!(
            split_all(&["Hello world. How are you? Fine!"]),
            vec!["Hello world.", "How are you?", "Fine!"]
        );
    }

    #[test]
    fn a_terminator_at_the_end_waits_for_more_text() {
        let mut s = ClauseSplitter::new();
        assert!(s.push("Pi is 3.").is_empty());
        assert!(s.push("14 roughly.").is_empty());
        assert_eq!(s.push(" Next"), vec!["Pi is 3.14 roughly."]);
        assert_eq!(s.finish().as_deref(), Some("Next"));
        assert!(s.is_empty());
    }

    #[test]
    fn streamed_tokens_complete_a_clause_as_soon_as_it_is_whole() {
        let mut s = ClauseSplitter::new();
        let mut got = Vec::new();
        for tok in ["The", " cat", " sat", ".", " It", " slept", "."] {
            got.push(s.push(tok));
        }
        assert_eq!(
            got[4],
            vec!["The cat sat."],
            "complete at the following space"
        );
        assert_eq!(s.finish().as_deref(), Some("It slept."));
    }

    #[test]
    fn abbreviations_and_initials_do_not_end_sentences() {
        assert_eq!(
            split_all(&["Dr. Smith met J. Doe, e.g. at noon. Then left."]),
            vec!["Dr. Smith met J. Doe, e.g. at noon.", "Then left."]
        );
    }

    #[test]
    fn closing_quotes_stay_with_their_clause() {
        assert_eq!(
            split_all(&["He said \"stop.\" She didn't."]),
            vec!["He said \"stop.\"", "She didn't."]
        );
    }

    #[test]
    fn long_comma_clauses_split_short_ones_do_not() {
        assert_eq!(
            split_all(&["Well, yes."]),
            vec!["Well, yes."],
            "a short comma phrase keeps its prosody"
        );
        let long = "This first part of the sentence is quite long indeed, and this is the rest.";
        assert_eq!(
            split_all(&[long]),
            vec![
                "This first part of the sentence is quite long indeed,",
                "and this is the rest."
            ]
        );
    }

    #[test]
    fn unpunctuated_walls_of_text_are_capped_at_a_space() {
        let wall = "word ".repeat(200);
        let clauses = split_all(&[&wall]);
        assert!(clauses.len() >= 4, "{}", clauses.len());
        for c in &clauses {
            assert!(c.chars().count() <= MAX_CLAUSE_CHARS, "{}", c.len());
            assert!(
                c.split(' ').all(|w| w == "word"),
                "cut inside a word: {c:?}"
            );
        }
        let joined: usize = clauses.iter().map(|c| c.split(' ').count()).sum();
        assert_eq!(joined, 200);
    }

    #[test]
    fn a_wall_without_spaces_is_cut_on_a_char_boundary() {
        let wall = "é".repeat(MAX_CLAUSE_CHARS * 2 + 5);
        let clauses = split_all(&[&wall]);
        assert_eq!(clauses.len(), 3);
        assert_eq!(clauses[0].chars().count(), MAX_CLAUSE_CHARS);
    }

    #[test]
    fn line_breaks_end_clauses_and_silent_clauses_are_dropped() {
        assert_eq!(
            split_all(&["first line\nsecond line\n\n... !\nthird"]),
            vec!["first line", "second line", "third"]
        );
        assert!(split_all(&["  ", "?!", " "]).is_empty());
    }

    #[test]
    fn a_huge_message_splits_into_bounded_clauses_in_order() {
        let sentence = "Sentence number one, with a comma. ";
        let text = sentence.repeat(30_000); // ~1 MiB in one chunk
        let mut s = ClauseSplitter::new();
        let clauses = s.push(text.trim_end());
        assert_eq!(clauses.len(), 30_000 - 1, "the last waits for more text");
        assert!(clauses.iter().all(|c| c == sentence.trim()));
        assert_eq!(s.finish().as_deref(), Some(sentence.trim()));
        // A 1 MiB wall with no spaces at all: cut at the cap, nothing lost.
        let wall = "x".repeat(1 << 20);
        let mut s = ClauseSplitter::new();
        let mut clauses = s.push(&wall);
        clauses.extend(s.finish());
        assert_eq!(clauses.iter().map(String::len).sum::<usize>(), 1 << 20);
        assert!(clauses.iter().all(|c| c.len() <= MAX_CLAUSE_CHARS));
    }

    #[test]
    fn a_terminator_at_the_length_cap_waits_for_the_next_chunk() {
        // Found by fuzz/fuzz_targets/clauses.rs: the '.' is the 240th character and the
        // chunk ends right after it; the cap used to cut at the last space instead of waiting
        // to see whether the '.' ends the clause, so the clauses depended on the chunking.
        let sentence = format!("{} {}.", "x".repeat(10), "y".repeat(MAX_CLAUSE_CHARS - 12));
        assert_eq!(sentence.chars().count(), MAX_CLAUSE_CHARS);
        let whole = split_all(&[&format!("{sentence} Next.")]);
        assert_eq!(whole, vec![sentence.clone(), "Next.".to_string()]);
        assert_eq!(split_all(&[&sentence, " Next."]), whole);
        let quoted = format!("{sentence}\")");
        assert_eq!(
            split_all(&[&quoted[..quoted.len() - 1], ")", " Next."]),
            split_all(&[&format!("{quoted} Next.")]),
        );
    }

    #[test]
    fn a_long_run_of_closers_is_not_part_of_the_clause_end() {
        let text = format!("Hi.{} there. Next", ")".repeat(MAX_CLOSERS + 1));
        assert_eq!(
            split_all(&[&text]),
            vec![
                format!("Hi.{} there.", ")".repeat(MAX_CLOSERS + 1)),
                "Next".into()
            ]
        );
        assert_eq!(
            split_all(&["Hi.\"))]]'\" there."]),
            vec!["Hi.\"))]]'\"", "there."]
        );
        // Streamed one closer at a time, the wait for the deciding character is bounded.
        let mut s = ClauseSplitter::new();
        assert!(s.push(&format!("{}.", "y".repeat(200))).is_empty());
        let mut out = Vec::new();
        for _ in 0..1000 {
            out.extend(s.push(")"));
        }
        assert!(!out.is_empty());
        assert!(s.pending.chars().count() <= MAX_CLAUSE_CHARS);
    }

    #[test]
    fn cjk_full_stops_need_no_space() {
        assert_eq!(split_all(&["你好。再见。"]), vec!["你好。", "再见。"]);
    }
}
