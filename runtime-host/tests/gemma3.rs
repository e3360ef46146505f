//! Gemma 3 270M (fetched on first use, 253 MB, as `kvq -m gemma3-270m` fetches it) against llama.cpp and an
//! independent numpy forward pass.
//!
//! Tokenizer: the ids of llama.cpp's `llama-tokenize` on prose, code, whitespace runs, tabs, newlines,
//! HTML-like tags, digits, accents, CJK, emoji and Gemma's turn markers, with and without special parsing
//! (`tests/data/make_gemma3_tok_ref.py`, outputs in `tests/data/gemma3_tok_ref.json`); and decoding gives the
//! text back.
//!
//! Logits: `tests/data/make_gemma3_ref.py` (outputs in `tests/data/gemma3_ref.json`), with tolerances from the
//! reference's own float32 and 16-bit-activation runs, as `logits.rs` derives them for SmolLM2. The long
//! prompt (600 tokens) crosses the local layers' 512-token window.

mod common;

use kvq_core::cache::CacheConfig;
use kvq_host::model::{self, MatMode, Model, Session};
use kvq_host::tokenizer::Tokenizer;
use std::sync::OnceLock;

fn model() -> Model {
    static P: OnceLock<std::path::PathBuf> = OnceLock::new();
    let p =
        P.get_or_init(|| kvq_host::fetch::fetch(&kvq_host::fetch::GEMMA3_270M, true).expect("Gemma 3 270M"));
    Model::load(p).expect("Gemma 3 270M loads")
}

#[test]
fn real_model_sentencepiece_ids_are_llama_cpp_s() {
    let m = model();
    let tok = Tokenizer::from_gguf(&m.gguf).unwrap();
    assert_eq!(tok.pre, "spm");
    let r: serde_json::Value = serde_json::from_str(include_str!("data/gemma3_tok_ref.json")).unwrap();
    let mut n = 0;
    for c in r["cases"].as_array().unwrap() {
        let text = c["text"].as_str().unwrap();
        let special = c["parse_special"].as_bool().unwrap();
        let want: Vec<u32> =
            c["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let got = tok.encode(text, true, special);
        assert_eq!(got, want, "{text:?} (parse_special {special})");
        if !special && !text.contains('\u{2581}') {
            // Without special parsing every id comes from the text, so decoding (after BOS) gives it back;
            // except a literal U+2581, which SentencePiece reads as its own space marker and llama.cpp
            // decodes as a space too.
            assert_eq!(tok.decode(&got[1..]), text, "decoding {text:?}");
        }
        n += 1;
    }
    assert!(n >= 70, "{n} cases");
}

fn check(mode: MatMode) {
    let mut m = model();
    m.mode = mode;
    let r: serde_json::Value = serde_json::from_str(include_str!("data/gemma3_ref.json")).unwrap();
    let sample: Vec<usize> =
        r["sample_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let u = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    for p in r["prompts"].as_array().unwrap() {
        let ids: Vec<u32> = p["ids"].as_array().unwrap().iter().map(|v| u(v) as u32).collect();
        let cfg = CacheConfig::fp16(m.cfg.n_kv_head, m.cfg.head_dim, 1024);
        let mut arenas = model::arenas(&m, &cfg).unwrap();
        let mut s = Session::new(&m, cfg, &mut arenas).unwrap();
        let mut at = 0;
        for row in p["rows"].as_array().unwrap() {
            let pos = u(&row["pos"]);
            let l = s.feed(&ids[at..=pos]).unwrap();
            at = pos + 1;
            let (worst, tol, top) = common::row_check(&l, row, &sample, mode);
            eprintln!("{} pos {pos}: max |kvq - ref| = {worst:.3e} (tolerance {tol:.3e})", p["name"]);
            assert!(worst <= tol, "{} pos {pos}: deviation {worst} exceeds {tol}", p["name"]);
            assert_eq!(kvq_host::sample::argmax(&l) as usize, top, "{} pos {pos}: top token", p["name"]);
        }
    }
}

#[test]
fn real_model_exact_mode_matches_the_numpy_reference() {
    check(MatMode::Exact);
}

#[test]
fn real_model_fast_mode_matches_the_quantized_reference() {
    check(MatMode::Fast);
}

/// The shape llama.cpp reads from this GGUF: local layers all but every sixth, window 512, the two RoPE
/// bases, the embedding scale, and a local cache that is a 512-token f16 ring.
#[test]
fn real_model_gemma3_shape_and_layer_kinds() {
    let m = model();
    let c = &m.cfg;
    assert_eq!((c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim), (18, 640, 4, 1, 256));
    assert_eq!((c.window, c.rope_base, c.rope_base_local), (512, 1e6, 1e4));
    let global: Vec<usize> = (0..c.n_layer).filter(|&l| !c.is_local(l)).collect();
    assert_eq!(global, [5, 11, 17]);
    assert!((c.embd_scale - 640f32.sqrt()).abs() < 1e-6);
    assert_eq!(c.attn_scale, 0.0625);
    let l = m.local_config().unwrap();
    assert_eq!((l.capacity, l.overflow), (512, kvq_core::cache::Overflow::Slide));
}
