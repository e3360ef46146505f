//! Calibration on the real model: the tables it measures are what the cache formats accept, they survive
//! the file round trip, a calibrated cache attends with them, and a file for another model is refused.

mod common;

use kvq_core::cache::{Overflow, Stream};
use kvq_host::calib::{self, Calibration};
use kvq_host::kvspec::KvSpec;
use kvq_host::model::{self, Session};
use kvq_host::tokenizer::Tokenizer;

#[test]
fn real_model_calibrate_apply_and_reload() {
    let m = common::model();
    let tok = Tokenizer::from_gguf(&m.gguf).unwrap();
    let text = kvq_host::eval::texts::text("emma", true).unwrap();
    let cut = text.char_indices().nth(4_000).map_or(text.len(), |c| c.0);
    let tokens = tok.encode(&text[..cut], true, false);
    let ctx = 128;
    let c =
        calib::calibrate(&m, &tokens[..2 * ctx], ctx, "emma (test)", calib::Weighting::Uniform, &|_, _| {})
            .unwrap();
    assert_eq!((c.tokens, c.layers.len(), c.version), (2 * ctx, m.cfg.n_layer, calib::VERSION));
    assert!(calib::CLIPS.contains(&c.clip));
    let (h, d) = (m.cfg.n_kv_head, m.cfg.head_dim);
    for l in &c.layers {
        for k in &l.keys {
            // 1% of the elements lie beyond the thresholds: lower <= upper everywhere.
            assert!(k.lower.iter().zip(&k.upper).all(|(a, b)| a <= b));
            assert!(k.perm.len() == h * d && k.bounds.len() == h * (d / calib::GROUP + 1));
        }
        assert!(l.balance.iter().all(|b| (1.0 / 64.0..=64.0).contains(b)));
    }
    let dir = std::env::temp_dir().join(format!("kvq-calib-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.json");
    std::fs::write(&path, serde_json::to_vec(&c).unwrap()).unwrap();
    let back = Calibration::load(&path, &m).unwrap();
    for (li, (a, b)) in back.layers.iter().zip(&c.layers).enumerate() {
        for (i, (x, y)) in a.keys.iter().zip(&b.keys).enumerate() {
            assert!(x.mean == y.mean && x.lower == y.lower && x.upper == y.upper, "layer {li} key basis {i}");
            assert!(
                x.codebooks == y.codebooks && x.perm == y.perm && x.bounds == y.bounds,
                "layer {li} key basis {i}"
            );
        }
        assert!(a.values == b.values && a.balance == b.balance, "layer {li}");
        assert!(a.clip_error == b.clip_error, "layer {li}: {:?} {:?}", a.clip_error, b.clip_error);
    }
    assert!(back == c, "the file round trip changes the calibration");
    // Every calibrated preset builds its caches with the tables and attends.
    let p = path.display().to_string();
    for spec in [
        "kvquant2",
        "kvquant3",
        "kvquant4",
        "skvq2",
        "kivi2:center=1:rot=kv:rope=1:kout=0.01",
        "kivi2:balance=1",
        "mikv2",
    ] {
        let spec = KvSpec::parse(&format!("{spec}:calib={p}")).unwrap();
        let cfg = m.cache_config(&spec, 256, Overflow::Stop).unwrap();
        if spec.clip_calibrated {
            assert_eq!(cfg.key_spec().unwrap().clip, c.clip);
        }
        let mut ar = model::arenas(&m, &cfg).unwrap();
        let mut s = Session::new(&m, cfg, &mut ar).unwrap();
        let logits = s.feed(&tokens[..100]).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()), "{}", spec.name);
        let mut out = vec![0.0f32; 100 * d];
        s.caches()[0].dequantize(Stream::Keys, 0, &mut out).unwrap();
        assert!(out.iter().all(|x| x.is_finite()));
    }
    // MiKV's tiers: a chunk goes in token by token (the same state as feeding it one token at a time),
    // and every quantized key group of every head has exactly `keep` promoted tokens (softmax gives each
    // attended token a positive weight), never the one whose append quantized the block.
    let spec = KvSpec::parse(&format!("mikv2:calib={p}")).unwrap();
    let cfg = m.cache_config(&spec, 512, Overflow::Stop).unwrap();
    let keep = cfg.tiers.unwrap().keep;
    let mut ar = model::arenas(&m, &cfg).unwrap();
    let mut s = Session::new(&m, cfg, &mut ar).unwrap();
    let n = 300;
    let chunked = s.feed(&tokens[..n]).unwrap();
    let mut ar2 = model::arenas(&m, &cfg).unwrap();
    let mut s2 = Session::new(&m, cfg, &mut ar2).unwrap();
    let mut stepped = Vec::new();
    for &t in &tokens[..n] {
        stepped = s2.feed(&[t]).unwrap();
    }
    assert_eq!(chunked, stepped);
    let body = n - cfg.sinks;
    let quantized = body - body % cfg.residual;
    for (li, cache) in s.caches().iter().enumerate() {
        for head in 0..cfg.kv_heads {
            for g0 in (0..quantized).step_by(32) {
                let promoted: Vec<usize> = (g0..g0 + 32).filter(|&j| cache.is_promoted(head, j)).collect();
                assert_eq!(promoted.len(), keep, "layer {li} head {head} group {g0}: {promoted:?}");
                assert!(promoted.iter().all(|j| (j + 1) % cfg.residual != 0));
            }
        }
    }
    // Another model's file, another version, a truncated file: refused with the reason.
    let mut other = c.clone();
    other.model_sha256 = "0".repeat(64);
    std::fs::write(&path, serde_json::to_vec(&other).unwrap()).unwrap();
    let e = Calibration::load(&path, &m).unwrap_err().to_string();
    assert!(e.contains("not this one"), "{e}");
    other = c.clone();
    other.version = 99;
    std::fs::write(&path, serde_json::to_vec(&other).unwrap()).unwrap();
    assert!(Calibration::load(&path, &m).unwrap_err().to_string().contains("version"));
    std::fs::write(&path, &serde_json::to_vec(&c).unwrap()[..1000]).unwrap();
    assert!(Calibration::load(&path, &m).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn real_model_fisher_calibration_weighs_the_codebooks() {
    // The same text, uniform and Fisher-weighted: thresholds, permutations and balance come from the same
    // keys (the backward pass's f32 forward against the runtime's, within rounding), while the codebooks move
    // toward the elements the loss is sensitive to; every Fisher codebook is still a valid table.
    let m = common::model();
    let tok = Tokenizer::from_gguf(&m.gguf).unwrap();
    let text = kvq_host::eval::texts::text("emma", true).unwrap();
    let cut = text.char_indices().nth(4_000).map_or(text.len(), |c| c.0);
    let tokens = tok.encode(&text[..cut], true, false);
    let ctx = 256;
    let u = calib::calibrate(&m, &tokens[..ctx], ctx, "emma (test)", calib::Weighting::Uniform, &|_, _| {})
        .unwrap();
    let f = calib::calibrate(&m, &tokens[..ctx], ctx, "emma (test)", calib::Weighting::Fisher, &|_, _| {})
        .unwrap();
    assert_eq!((u.weighting, f.weighting), (calib::Weighting::Uniform, calib::Weighting::Fisher));
    let mut moved = 0usize;
    let mut total = 0usize;
    for (lu, lf) in u.layers.iter().zip(&f.layers) {
        for (ku, kf) in lu.keys.iter().zip(&lf.keys) {
            let worst = ku.mean.iter().zip(&kf.mean).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 0.05, "key means differ by {worst}");
            for (a, b) in ku.codebooks.b2.chunks_exact(8).zip(kf.codebooks.b2.chunks_exact(8)) {
                assert!(
                    b[..4].windows(2).all(|p| p[0] < p[1]) && b[..4].iter().all(|x| (-1.0..=1.0).contains(x))
                );
                total += 1;
                moved += usize::from(a[..4].iter().zip(&b[..4]).any(|(x, y)| (x - y).abs() > 0.01));
            }
        }
    }
    eprintln!("{moved} of {total} 2-bit key codebooks moved by more than 0.01");
    assert!(moved * 4 > total, "Fisher weights moved only {moved} of {total} codebooks");
    // The file says how it was fitted; a file from before weighting existed reads as uniform.
    let mut j = serde_json::to_value(&f).unwrap();
    assert_eq!(j["weighting"], "fisher");
    j.as_object_mut().unwrap().remove("weighting");
    let old: Calibration = serde_json::from_value(j).unwrap();
    assert_eq!(old.weighting, calib::Weighting::Uniform);
}
