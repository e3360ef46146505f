//! Logits of fixed prompts against an independent numpy forward pass (`tests/data/make_logits_ref.py`, outputs
//! in `tests/data/logits_ref.json`).
//!
//! Tolerances come from the reference itself. It ran each prompt three times: in float64 (the reference
//! values), in float32, and in float64 with kvq's 16-bit activation quantization. `f32_dev` = max |f32 - f64| over
//! the whole vocabulary is how far one float32 evaluation of this network strays from exact arithmetic;
//! kvq's exact mode is another float32 evaluation (different summation order, f32 FMA dots of up to 1536
//! terms, a polynomial exp within 2^-21 in the softmax), so its distance from f64 is of the same order: the
//! test allows 2 x `f32_dev` (the two evaluations' errors are independent and of one size) plus 1e-4, the f32
//! resolution of logits near 10 summed over the few hundred roundings of the last layers. The fast mode
//! quantizes activations to 16 bits per block of 32; `q16_dev` = max |q16 - f64| is that quantization's own
//! effect, and kvq's fast logits must stay within 2 x `q16_dev` + 2 x `f32_dev` (its f32 arithmetic and its
//! rounding decisions at half steps add noise of the same sizes) and pick the same top token as the
//! reference.

mod common;

use kvq_core::cache::CacheConfig;
use kvq_host::model::{self, MatMode, Model, Session};

fn logits_at(m: &Model, ids: &[u32], pos: &[usize]) -> Vec<Vec<f32>> {
    let cfg = CacheConfig::fp16(m.cfg.n_kv_head, m.cfg.head_dim, 512);
    let mut arenas = model::arenas(m, &cfg).unwrap();
    let mut s = Session::new(m, cfg, &mut arenas).unwrap();
    let all = s.feed_all(ids).unwrap();
    let v = m.cfg.n_vocab;
    pos.iter().map(|&p| all[p * v..(p + 1) * v].to_vec()).collect()
}

fn check(mode: MatMode) {
    let mut m = common::model();
    m.mode = mode;
    let r: serde_json::Value = serde_json::from_str(include_str!("data/logits_ref.json")).unwrap();
    let sample: Vec<usize> =
        r["sample_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let u = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    for p in r["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = p["ids"].as_array().unwrap().iter().map(|v| u(v) as u32).collect();
        let rows = p["rows"].as_array().unwrap();
        let pos: Vec<usize> = rows.iter().map(|row| u(&row["pos"])).collect();
        let got = logits_at(&m, &ids, &pos);
        for (row, l) in rows.iter().zip(&got) {
            let (worst, tol, top) = common::row_check(l, row, &sample, mode);
            let argmax = kvq_host::sample::argmax(l) as usize;
            eprintln!(
                "{} pos {}: max |kvq - ref| = {worst:.3e} (tolerance {tol:.3e})",
                p["name"], row["pos"]
            );
            assert!(worst <= tol, "{} pos {}: deviation {worst} exceeds {tol}", p["name"], row["pos"]);
            assert_eq!(argmax, top, "{} pos {}: top token", p["name"], row["pos"]);
        }
    }
}

#[test]
fn real_model_exact_mode_matches_reference() {
    check(MatMode::Exact);
}

#[test]
fn real_model_fast_mode_matches_quantized_reference() {
    check(MatMode::Fast);
}
