//! Evaluation: perplexity follows llama-perplexity's protocol and equals an independent token-by-token
//! computation; retrieval cases are deterministic and well formed, and the f16 cache finds a short pass key.

mod common;

use kvq_core::cache::Overflow;
use kvq_host::eval::{self, Task};
use kvq_host::kvspec::KvSpec;
use kvq_host::model::{self, Session};
use kvq_host::tokenizer::Tokenizer;

fn log_softmax(l: &[f32]) -> Vec<f64> {
    let m = l.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let z = m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    l.iter().map(|&x| x as f64 - z).collect()
}

#[test]
fn real_model_perplexity_equals_token_by_token_scoring() {
    let m = common::model();
    let tok = Tokenizer::from_gguf(&m.gguf).unwrap();
    let text = kvq_host::eval::texts::text("prideprejudice", true).unwrap();
    let cut = text.char_indices().nth(20_000).map_or(text.len(), |c| c.0);
    let tokens = tok.encode(&text[..cut], true, false);
    let (ctx, chunks) = (96, 2);
    let specs = [KvSpec::parse("kivi2:g=16:r=16").unwrap()];
    let mut calls = 0;
    let recs = eval::perplexity(&m, &tokens, None, ctx, Some(chunks), &specs, |_, _| calls += 1).unwrap();
    // f16 is added first as the baseline.
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].spec, "f16");
    assert_eq!(calls, chunks * ctx.div_ceil(64));
    let first = ctx / 2;
    assert!(recs.iter().all(|r| r.scored == chunks * (ctx - 1 - first)));
    // Independent scoring: fresh sessions fed one token at a time, llama-perplexity's positions.
    let v = m.cfg.n_vocab;
    let mut sums = [(0f64, 0f64, 0f64, 0usize); 2];
    for ci in 0..chunks {
        let batch = &tokens[ci * ctx..(ci + 1) * ctx];
        let mut logits = Vec::new();
        for spec in ["f16", "kivi2:g=16:r=16"] {
            let cfg = m.cache_config(&KvSpec::parse(spec).unwrap(), ctx, Overflow::Stop).unwrap();
            let mut ar = model::arenas(&m, &cfg).unwrap();
            let mut s = Session::new(&m, cfg, &mut ar).unwrap();
            logits.push(batch.iter().flat_map(|&t| s.feed(&[t]).unwrap()).collect::<Vec<f32>>());
        }
        for j in first..ctx - 1 {
            let lb = log_softmax(&logits[0][j * v..(j + 1) * v]);
            let top = |l: &[f64]| l.iter().enumerate().fold(0, |b, (i, &x)| if x > l[b] { i } else { b });
            for si in 0..2 {
                let l = log_softmax(&logits[si][j * v..(j + 1) * v]);
                let kl: f64 = lb.iter().zip(&l).map(|(&b, &x)| b.exp() * (b - x)).sum();
                sums[si].0 += -l[batch[j + 1] as usize];
                sums[si].1 += kl;
                sums[si].2 += f64::from(u8::from(top(&l) == top(&lb)));
                sums[si].3 += 1;
            }
        }
    }
    for (r, s) in recs.iter().zip(&sums) {
        let n = s.3 as f64;
        let ppl = (s.0 / n).exp();
        assert!((r.ppl - ppl).abs() <= 1e-9 * ppl, "{}: ppl {} vs token-by-token {ppl}", r.spec, r.ppl);
        assert!((r.kld - s.1 / n).abs() <= 1e-9, "{}: kld {} vs {}", r.spec, r.kld, s.1 / n);
        assert!((r.top1_agree - s.2 / n).abs() <= 1e-12, "{}: top-1 {} vs {}", r.spec, r.top1_agree, s.2 / n);
    }
    assert_eq!((recs[0].kld, recs[0].top1_agree, recs[0].bits_per_element), (0.0, 1.0, 16.0));
    // Quantization costs something, and the standard error is a real spread.
    assert!(
        recs[1].kld > 1e-3 && recs[1].top1_agree < 1.0 && recs[1].bits_per_element < 16.0,
        "{:?}",
        recs[1]
    );
    assert!(recs[0].ppl_stderr > 0.0 && recs[0].ppl_stderr < recs[0].ppl, "{:?}", recs[0]);
    // Too short a text is an error, not an empty result.
    let e = eval::perplexity(&m, &tokens[..50], None, 96, None, &specs, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("fewer than one chunk"), "{e}");
    assert!(eval::perplexity(&m, &tokens, None, 96, Some(0), &specs, |_, _| {}).is_err());
    assert!(eval::perplexity(&m, &tokens, None, 2, None, &specs, |_, _| {}).is_err());
}

#[test]
fn real_model_retrieval_cases_are_deterministic_and_well_formed() {
    let m = common::model();
    let tok = Tokenizer::from_gguf(&m.gguf).unwrap();
    let hay = kvq_host::eval::texts::text("persuasion", true).unwrap();
    for task in [Task::Passkey, Task::Lines] {
        for len in [300, 1000] {
            for depth in [0.0, 0.5, 1.0] {
                let a = eval::make_case(&tok, task, &hay, len, depth, 7).unwrap();
                let b = eval::make_case(&tok, task, &hay, len, depth, 7).unwrap();
                let c = eval::make_case(&tok, task, &hay, len, depth, 8).unwrap();
                assert_eq!((&a.prompt, &a.answer), (&b.prompt, &b.answer), "{task:?} not deterministic");
                assert_ne!(a.prompt, c.prompt, "{task:?}: seeds 7 and 8 give the same prompt");
                assert!(
                    a.prompt.len() <= len && a.prompt.len() + 60 >= len,
                    "{task:?} {len}: {} tokens",
                    a.prompt.len()
                );
                assert_eq!(a.answer_text.len(), 5);
                assert_eq!(tok.decode(&a.answer), a.answer_text);
                let text = tok.decode(&a.prompt);
                assert!(text.contains(&a.answer_text), "{task:?}: the prompt lacks its answer");
                // The needle sits near the requested depth (the instruction and question take some room).
                assert!(
                    (a.needle_at - depth).abs() < 0.2,
                    "{task:?} {len} {depth}: needle at {}",
                    a.needle_at
                );
            }
        }
    }
    assert!(eval::make_case(&tok, Task::Passkey, &hay, 40, 0.5, 1).is_err());
    assert!(eval::make_case(&tok, Task::Passkey, &hay, 500, 1.5, 1).is_err());
    assert!(eval::make_case(&tok, Task::Passkey, "", 500, 0.5, 1).is_err());
    assert!(eval::make_case(&tok, Task::Lines, "too few words", 500, 0.5, 1).is_err());
}

#[test]
fn real_model_f16_cache_finds_a_short_pass_key() {
    let m = common::model();
    let tok = Tokenizer::from_gguf(&m.gguf).unwrap();
    let hay = kvq_host::eval::texts::text("persuasion", true).unwrap();
    let cfg = m.cache_config(&KvSpec::parse("f16").unwrap(), 600, Overflow::Stop).unwrap();
    let mut ar = model::arenas(&m, &cfg).unwrap();
    let mut s = Session::new(&m, cfg, &mut ar).unwrap();
    for seed in 0..2 {
        let case = eval::make_case(&tok, Task::Passkey, &hay, 512, 0.5, seed).unwrap();
        let o = eval::run_case(&mut s, &case, |_| {}).unwrap();
        assert!(o.exact && o.logprob > -2.0, "seed {seed}: {o:?}");
        // A wrong answer scores far lower.
        let mut wrong = case.clone();
        wrong.answer = tok.encode("99999", false, false);
        let w = eval::run_case(&mut s, &wrong, |_| {}).unwrap();
        assert!(!w.exact && w.logprob < o.logprob - 5.0, "seed {seed}: wrong answer {w:?} vs {o:?}");
    }
}
