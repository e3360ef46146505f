//! Perplexity (llama.cpp's `llama-perplexity` protocol) with KL divergence and top-1 agreement against the
//! `f16` cache, every spec in one run.
//!
//! Perplexity runs every spec's session in lockstep over the same tokens, 64 at a time, so the `f16`
//! distribution each spec is compared with is at hand without storing a chunk of logits. Sessions attend
//! with [`Prefill::AsDecode`]: every key and value enters the cache before its query attends to the cache as
//! stored, so the quantized cache shapes every prediction as in decoding (`tests/as_decode.rs` shows the
//! batched result equals token-by-token decoding bit for bit).

use crate::kvspec::KvSpec;
use crate::model::{self, CHUNK, Model, Prefill, Session};
use crate::sample::argmax;
use anyhow::{Result, ensure};
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
    let cfgs: Vec<CacheConfig> = specs
        .iter()
        .map(|s| model.cache_config(s, ctx, Overflow::Stop))
        .collect::<crate::error::Result<_>>()?;
    let mut arenas: Vec<Vec<Vec<u32>>> =
        cfgs.iter().map(|cfg| model::arenas(model, cfg)).collect::<crate::error::Result<_>>()?;
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
