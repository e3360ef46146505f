//! Quality of a KV-cache spec against the `f16` cache, measured in one run: perplexity (llama.cpp's
//! `llama-perplexity` protocol) with KL divergence and top-1 agreement, and long-context retrieval
//! (passkey and LongChat-style lines) generated deterministically from a seed.
//!
//! Perplexity runs every spec's session in lockstep over the same tokens, 64 at a time, so the `f16`
//! distribution each spec is compared with is at hand without storing a chunk of logits. Sessions attend
//! with [`Prefill::AsDecode`]: every key and value enters the cache before its query attends to the cache as
//! stored, so the quantized cache shapes every prediction as in decoding (`tests/as_decode.rs` shows the
//! batched result equals token-by-token decoding bit for bit).

use crate::kvspec::KvSpec;
use crate::model::{self, CHUNK, Model, Prefill, Session};
use crate::sample::{Rng, argmax};
use crate::tokenizer::Tokenizer;
use anyhow::{Result, bail, ensure};
use kvq_core::cache::{CacheConfig, Overflow};
use serde::Serialize;

/// One spec's perplexity record (`kvq perplexity --json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PplRecord {
    /// The `--kv` spec.
    pub spec: String,
    /// Perplexity over the scored tokens.
    pub ppl: f64,
    /// Its standard error (llama.cpp's: `ppl * sqrt(var(nll) / (n - 1))`).
    pub ppl_stderr: f64,
    /// Mean KL divergence `KL(f16 || spec)` of the next-token distribution, in nats.
    pub kld: f64,
    /// Standard error of the mean KL divergence.
    pub kld_stderr: f64,
    /// Share of scored positions whose most likely token equals the `f16` cache's.
    pub top1_agree: f64,
    /// Average bits per cached element with a full chunk held.
    pub bits_per_element: f64,
    /// KV bytes (all layers) with a full chunk held.
    pub kv_bytes: usize,
    /// Predictions scored.
    pub scored: usize,
}

/// The baseline every spec is compared with.
pub const BASELINE: &str = "f16";

#[derive(Default, Clone)]
struct Acc {
    nll: f64,
    nll2: f64,
    kld: f64,
    kld2: f64,
    agree: usize,
    n: usize,
}

/// `log_softmax(logits)` in f64, written into `out`.
pub fn log_softmax(logits: &[f32], out: &mut Vec<f64>) {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let s: f64 = logits.iter().map(|&x| (x as f64 - m).exp()).sum();
    let ls = m + s.ln();
    out.clear();
    out.extend(logits.iter().map(|&x| x as f64 - ls));
}

/// Perplexity of `tokens` under each spec, in one run. `specs` must hold the `f16` baseline (it is added
/// first when missing). `progress(done, total)` is called after each step of 64 tokens.
///
/// The protocol is llama.cpp's `llama-perplexity`: non-overlapping chunks of `ctx` tokens (at most
/// `chunks`), the first token of each replaced by BOS when the model's metadata asks for BOS, each chunk
/// from an empty cache, and the predictions of the second half scored (`ctx/2 .. ctx-1`, `ctx - 1 - ctx/2`
/// tokens per chunk).
///
/// # Errors
/// Fewer tokens than one chunk, a spec that does not fit the model, a forward-pass error.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    bos: Option<u32>,
    ctx: usize,
    chunks: Option<usize>,
    specs: &[KvSpec],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<PplRecord>> {
    ensure!(ctx >= 4, "a context of {ctx} tokens is too small to score");
    ensure!(chunks != Some(0), "--chunks must be at least 1");
    let n_chunk = (tokens.len() / ctx).min(chunks.unwrap_or(usize::MAX));
    ensure!(
        n_chunk > 0,
        "the text has {} tokens, fewer than one chunk of {ctx} (lower -c or use a longer text)",
        tokens.len()
    );
    let mut specs = specs.to_vec();
    if !specs.iter().any(|s| s.name == BASELINE) {
        specs.insert(0, KvSpec::parse(BASELINE).map_err(anyhow::Error::msg)?);
    }
    let base = specs.iter().position(|s| s.name == BASELINE).unwrap_or(0);
    let cfgs: Vec<CacheConfig> =
        specs.iter().map(|s| model.cache_config(s, ctx, Overflow::Stop)).collect::<Result<_>>()?;
    let mut arenas: Vec<Vec<Vec<u32>>> =
        cfgs.iter().map(|cfg| model::arenas(model, cfg)).collect::<Result<_>>()?;
    let mut sessions: Vec<Session<'_>> = Vec::new();
    for (cfg, a) in cfgs.iter().zip(arenas.iter_mut()) {
        let mut s = Session::new(model, *cfg, a)?;
        s.set_prefill(Prefill::AsDecode);
        sessions.push(s);
    }
    let first = ctx / 2;
    let v = model.cfg.n_vocab;
    let mut acc = vec![Acc::default(); specs.len()];
    let steps_per_chunk = ctx.div_ceil(CHUNK);
    let total = n_chunk * steps_per_chunk;
    let (mut lp_base, mut lp) = (Vec::new(), Vec::new());
    let mut p_base: Vec<f64> = Vec::new();
    for ci in 0..n_chunk {
        let mut batch = tokens[ci * ctx..(ci + 1) * ctx].to_vec();
        if let Some(b) = bos {
            batch[0] = b;
        }
        for s in &mut sessions {
            s.reset();
        }
        for (step, start) in (0..ctx).step_by(CHUNK).enumerate() {
            let end = (start + CHUNK).min(ctx);
            let sub = &batch[start..end];
            // Rows `start..end` predict tokens `start+1..end+1`; those at `first..ctx-1` are scored.
            let scored = start.max(first)..end.min(ctx - 1);
            let mut logits = Vec::with_capacity(sessions.len());
            for s in &mut sessions {
                if scored.is_empty() {
                    s.feed(sub)?;
                    logits.push(Vec::new());
                } else {
                    logits.push(s.feed_all(sub)?);
                }
            }
            for j in scored {
                let at = (j - start) * v..(j - start + 1) * v;
                let target = batch[j + 1] as usize;
                let lb = &logits[base][at.clone()];
                log_softmax(lb, &mut lp_base);
                p_base.clear();
                p_base.extend(lp_base.iter().map(|&x| if x > -700.0 { x.exp() } else { 0.0 }));
                let top_base = argmax(lb);
                for (si, l) in logits.iter().enumerate() {
                    let r = &l[at.clone()];
                    log_softmax(r, &mut lp);
                    let nll = -lp[target];
                    let kld: f64 =
                        p_base.iter().zip(&lp_base).zip(&lp).map(|((&pb, &lb), &p)| pb * (lb - p)).sum();
                    let a = &mut acc[si];
                    a.nll += nll;
                    a.nll2 += nll * nll;
                    a.kld += kld;
                    a.kld2 += kld * kld;
                    a.agree += usize::from(argmax(r) == top_base);
                    a.n += 1;
                }
            }
            progress(ci * steps_per_chunk + step + 1, total);
        }
    }
    // Every chunk ends with `ctx` tokens held: the last one's usage is every chunk's.
    let usage: Vec<(f64, usize)> = sessions.iter().map(|s| (s.bits_per_element(), s.kv_bytes())).collect();
    Ok(specs
        .iter()
        .zip(&acc)
        .zip(&usage)
        .map(|((s, a), &(bits, bytes))| {
            let n = a.n as f64;
            let (mean, mean2) = (a.nll / n, a.nll2 / n);
            let ppl = mean.exp();
            let sd = |m: f64, m2: f64| if a.n > 1 { ((m2 - m * m).max(0.0) / (n - 1.0)).sqrt() } else { 0.0 };
            let (kmean, kmean2) = (a.kld / n, a.kld2 / n);
            PplRecord {
                spec: s.name.clone(),
                ppl,
                ppl_stderr: ppl * sd(mean, mean2),
                kld: kmean,
                kld_stderr: sd(kmean, kmean2),
                top1_agree: a.agree as f64 / n,
                bits_per_element: bits,
                kv_bytes: bytes,
                scored: a.n,
            }
        })
        .collect())
}

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

/// The fact `kvq demo` plants in its document.
pub const DEMO_FACT: &str = "A note pinned inside the Kellynch Hall library reads: the key to the old piano is kept in the blue teapot on the kitchen shelf.";
/// The question `kvq demo` asks about [`DEMO_FACT`].
pub const DEMO_QUESTION: &str = "Where is the key to the old piano kept?";
/// The word a right answer to [`DEMO_QUESTION`] holds.
pub const DEMO_ANSWER: &str = "teapot";

/// `kvq demo`'s document: whole paragraphs of `prose` from its start while they fit in `doc_tokens`
/// (counted with `tok`, two tokens per paragraph break), with [`DEMO_FACT`] before the paragraph that crosses
/// the halfway mark.
pub fn demo_document(tok: &Tokenizer, prose: &str, doc_tokens: usize) -> String {
    planted_document(tok, prose, 0, doc_tokens, &[(DEMO_FACT, doc_tokens / 2)]).0
}

/// Whole paragraphs of `prose`, from its `skip`-th on, while they fit in `doc_tokens` (counted with `tok`,
/// two tokens per paragraph break). Each `(text, mark)` of `facts`, in order, goes on a line of its own in
/// parentheses before the first paragraph that crosses `mark` tokens, at most one per paragraph. Returns
/// the document and how many facts it holds.
pub fn planted_document(
    tok: &Tokenizer,
    prose: &str,
    skip: usize,
    doc_tokens: usize,
    facts: &[(&str, usize)],
) -> (String, usize) {
    let mut doc = String::new();
    let mut used = 0;
    let mut planted = 0;
    for para in prose.split("\n\n").filter(|p| !p.trim().is_empty()).skip(skip) {
        let t = tok.encode(para, false, false).len() + 2;
        if used + t > doc_tokens {
            break;
        }
        if let Some((fact, mark)) = facts.get(planted)
            && used + t > *mark
        {
            doc.push_str(&format!("\n({fact})\n\n"));
            planted += 1;
        }
        doc.push_str(para.trim_matches('\n'));
        doc.push_str("\n\n");
        used += t;
    }
    (doc, planted)
}
