//! The `qwen2` architecture (half-split RoPE, Q/K/V biases, separate output) on a tiny synthetic GGUF with
//! Q8_0, F16 and F32 tensors, against an independent numpy forward pass (`tests/data/make_qwen2_ref.py`,
//! which wrote the committed `qwen2_ref.json`; the GGUF itself is rebuilt by the same seeded script on first
//! use and checked by sha256). Tolerance as in `logits.rs`: 2 x the reference's own float32-vs-float64
//! deviation plus 1e-4.

mod common;

use kvq_core::cache::CacheConfig;
use kvq_host::model::{self, Arch, MatMode, Model, Session};

#[test]
fn download_tiny_qwen2_matches_reference() {
    let r: serde_json::Value = serde_json::from_str(include_str!("data/qwen2_ref.json")).unwrap();
    let p =
        common::python_fixture("make_qwen2_ref.py", "qwen2-tiny.gguf", r["gguf_sha256"].as_str().unwrap());
    let mut m = Model::load(&p).unwrap();
    assert_eq!(m.cfg.arch, Arch::Qwen2);
    m.mode = MatMode::Exact;
    let ids: Vec<u32> = r["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let tol = 2.0 * r["f32_dev"].as_f64().unwrap() + 1e-4;
    let cfg = CacheConfig::fp16(m.cfg.n_kv_head, m.cfg.head_dim, 64);
    let mut arenas = model::arenas(&m, &cfg).unwrap();
    let mut s = Session::new(&m, cfg, &mut arenas).unwrap();
    let got = s.feed_all(&ids).unwrap();
    let v = m.cfg.n_vocab;
    let mut worst = 0f64;
    for (t, row) in r["logits"].as_array().unwrap().iter().enumerate() {
        for (i, want) in row.as_array().unwrap().iter().enumerate() {
            worst = worst.max((f64::from(got[t * v + i]) - want.as_f64().unwrap()).abs());
        }
    }
    eprintln!("max |kvq - ref| = {worst:.3e} (tolerance {tol:.3e})");
    assert!(worst <= tol, "deviation {worst} exceeds {tol}");
}
