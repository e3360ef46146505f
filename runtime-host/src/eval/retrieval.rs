//! Long-context retrieval: passkey and LongChat-style lines, generated deterministically from a seed.

use super::log_softmax;
use crate::model::Session;
use crate::sample::{Rng, argmax};
use crate::tokenizer::Tokenizer;
use anyhow::{Result, bail, ensure};
use serde::Serialize;

/// A retrieval task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// A five-digit pass key hidden in prose.
    Passkey,
    /// LongChat's line retrieval: many `line <key>: REGISTER_CONTENT is <N>` lines, one asked for.
    Lines,
}

/// One generated retrieval case: the prompt (ending just before the answer) and the answer's tokens.
#[derive(Debug, Clone)]
pub struct Case {
    /// Prompt tokens (BOS first when the model asks for it).
    pub prompt: Vec<u32>,
    /// The answer's tokens (the digits).
    pub answer: Vec<u32>,
    /// The answer as text.
    pub answer_text: String,
    /// Where the needle starts, as a share of the haystack's tokens (0: first, near 1: last).
    pub needle_at: f64,
}

/// Lines of `haystack` text starting at a seeded offset, wrapped around, each ending with `\n`.
fn prose_lines<'t>(haystack: &'t str, rng: &mut Rng) -> impl Iterator<Item = &'t str> {
    let lines: Vec<&str> = haystack.split_inclusive('\n').collect();
    let start = rng.below(lines.len().max(1));
    (0..).map(move |i| lines[(start + i) % lines.len()])
}

const PASSKEY_INTRO: &str = "There is an important pass key hidden inside a lot of irrelevant text. Find it and \
    memorize it. I will quiz you about the pass key.\n\n";
const PASSKEY_QUESTION: &str = "\nWhat is the pass key? The pass key is ";
const LINES_INTRO: &str = "Below is a record of lines I want you to remember. Each line begins with 'line <line \
    index>' and contains a '<REGISTER_CONTENT>' at the end of the line as a numerical value. For each line index, \
    memorize its corresponding <REGISTER_CONTENT>. At the end of the record, I will ask you to retrieve the \
    corresponding <REGISTER_CONTENT> of a certain line index. Now the record start:\n\n";

/// Units from `next` while they fit in `room` tokens together (the first that does not fit is dropped).
fn fill(room: usize, mut next: impl FnMut() -> Vec<u32>) -> Vec<Vec<u32>> {
    let (mut units, mut used) = (Vec::new(), 0);
    loop {
        let t = next();
        if used + t.len() > room {
            return units;
        }
        used += t.len();
        units.push(t);
    }
}

/// Builds a case of `task` with at most `len` prompt tokens (filled to within one filler unit) and the
/// needle at `depth` (0 = right after the instruction, 1 = right before the question), from `seed`, over
/// `haystack` prose. The prompt is completion-style: it ends where the answer's digits begin.
///
/// - Passkey: the instruction, prose lines from a seeded offset of `haystack`, the needle sentence
///   `The pass key is N. Remember it. N is the pass key.` between two lines, then
///   `What is the pass key? The pass key is `.
/// - Lines (LongChat): the instruction, then lines `line <key>: REGISTER_CONTENT is <N>` with keys of two
///   words of `haystack` and five-digit values; the line at `depth` is asked for with
///   `line <key>: REGISTER_CONTENT is <`.
///
/// # Errors
/// A depth outside 0..1, an empty haystack, or a length too small to hold the instruction, needle and question.
pub fn make_case(
    tok: &Tokenizer,
    task: Task,
    haystack: &str,
    len: usize,
    depth: f64,
    seed: u64,
) -> Result<Case> {
    ensure!((0.0..=1.0).contains(&depth), "needle depth {depth} is outside 0..1");
    ensure!(!haystack.trim().is_empty(), "the haystack text is empty");
    let mut rng = Rng::new(seed ^ (len as u64).wrapping_mul(0x1000_0001) ^ depth.to_bits());
    let enc = |s: &str| tok.encode(s, false, false);
    let head =
        [tok.encode("", true, false), enc(if task == Task::Passkey { PASSKEY_INTRO } else { LINES_INTRO })]
            .concat();
    // Filler units up to the budget; the needle is a unit of its own (passkey) or one of them (lines).
    let (units, question, answer, at) = match task {
        Task::Passkey => {
            let key = 10_000 + rng.below(90_000);
            let needle = enc(&format!("\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"));
            let question = enc(PASSKEY_QUESTION);
            let fixed = head.len() + needle.len() + question.len();
            ensure!(
                len > fixed + 16,
                "a {len}-token prompt cannot hold the pass key task ({fixed} fixed tokens)"
            );
            let mut lines = prose_lines(haystack, &mut rng);
            let mut units = fill(len - fixed, || enc(lines.next().unwrap_or("\n")));
            let at = ((depth * units.len() as f64).round() as usize).min(units.len());
            units.insert(at, needle);
            (units, question, key, at)
        }
        Task::Lines => {
            // Keys: two words of the prose, lower case, joined by a hyphen, never repeated.
            let mut words: Vec<String> = haystack
                .split(|c: char| !c.is_ascii_alphabetic())
                .filter(|w| (4..=9).contains(&w.len()))
                .map(str::to_ascii_lowercase)
                .collect();
            words.sort_unstable();
            words.dedup();
            ensure!(words.len() > 100, "the haystack text has too few words for line keys");
            // Room for the question, which repeats the key.
            let fixed = head.len() + 40;
            ensure!(len > fixed + 32, "a {len}-token prompt cannot hold the line retrieval task");
            let mut seen = std::collections::HashSet::new();
            let mut lines = Vec::new();
            let mut units = fill(len - fixed, || {
                loop {
                    let key = format!("{}-{}", words[rng.below(words.len())], words[rng.below(words.len())]);
                    if seen.insert(key.clone()) {
                        let value = 10_000 + rng.below(90_000);
                        let t = enc(&format!("line {key}: REGISTER_CONTENT is <{value}>\n"));
                        lines.push((key, value));
                        return t;
                    }
                }
            });
            ensure!(units.len() >= 2, "a {len}-token prompt cannot hold the line retrieval task");
            let mut at = ((depth * (units.len() - 1) as f64).round() as usize).min(units.len() - 1);
            let (key, value) = lines[at].clone();
            let question = enc(&format!(
                "\nNow the record is over. Tell me the <REGISTER_CONTENT> in line {key}. I need the number.\n\
                 line {key}: REGISTER_CONTENT is <"
            ));
            // The question's length is known only now: drop lines (from the end, or the start when the
            // asked line is last) until the prompt fits.
            while head.len() + units.iter().map(Vec::len).sum::<usize>() + question.len() > len {
                ensure!(units.len() > 1, "a {len}-token prompt cannot hold the line retrieval task");
                if at + 1 < units.len() {
                    units.pop();
                } else {
                    units.remove(0);
                    at -= 1;
                }
            }
            (units, question, value, at)
        }
    };
    // Where the needle starts, as a share of the haystack (the tokens between instruction and question).
    let hay_len: usize = units.iter().map(Vec::len).sum();
    let before: usize = units[..at].iter().map(Vec::len).sum();
    let mut prompt = head;
    prompt.extend(units.concat());
    prompt.extend(question);
    let answer_text = answer.to_string();
    Ok(Case {
        needle_at: before as f64 / hay_len.max(1) as f64,
        prompt,
        answer: enc(&answer_text),
        answer_text,
    })
}

/// What one spec did on one case.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// Greedy decoding reproduces the answer's tokens.
    pub exact: bool,
    /// Teacher-forced log-probability of the answer's tokens (nats).
    pub logprob: f64,
}

/// Runs `case` in `s` (reset first): the prompt through the prefill a user's prompt takes (`progress(k)`
/// after each chunk of `k` tokens), then the answer
/// teacher-forced one token at a time, as decoding does. Exact match: greedy decoding would produce every
/// answer token.
///
/// # Errors
/// A forward-pass error (a prompt beyond the session's capacity).
pub fn run_case(s: &mut Session<'_>, case: &Case, progress: impl FnMut(usize)) -> Result<Outcome> {
    if case.answer.is_empty() {
        bail!("empty answer");
    }
    s.reset();
    let mut logits = s.feed_progress(&case.prompt, progress)?;
    let (mut exact, mut logprob) = (true, 0.0);
    let mut lp = Vec::new();
    for (i, &t) in case.answer.iter().enumerate() {
        log_softmax(&logits, &mut lp);
        logprob += lp[t as usize];
        exact &= argmax(&logits) == t;
        if i + 1 < case.answer.len() {
            logits = s.feed(&[t])?;
        }
    }
    Ok(Outcome { exact, logprob })
}
