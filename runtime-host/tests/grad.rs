//! The backward pass (`kvq_host::grad`) on the real models: its forward loss is the runtime's, and the
//! gradient it gives every layer's keys and values is the slope of the loss itself, measured by central
//! finite differences, at the first, a middle and the last layer, for SmolLM2 (Llama) and Gemma 3 (query
//! and key norms, post-norms, GELU, sliding-window layers).

mod common;

use kvq_core::cache::CacheConfig;
use kvq_host::grad::{Dense, Nudge};
use kvq_host::model::{self, MatMode, Model, Session};
use kvq_host::tokenizer::Tokenizer;

fn tokens(m: &Model, n: usize) -> Vec<u32> {
    let tok = Tokenizer::from_gguf(&m.gguf).unwrap();
    let text = kvq_host::eval::texts::text("emma", true).unwrap();
    let cut = text.char_indices().nth(2_000).map_or(text.len(), |c| c.0);
    tok.encode(&text[..cut], true, false)[..n].to_vec()
}

/// The runtime's own mean next-token loss (exact weights, f16 cache) over `tokens`.
fn runtime_loss(m: &mut Model, tokens: &[u32]) -> f64 {
    m.mode = MatMode::Exact;
    let cfg = CacheConfig::fp16(m.cfg.n_kv_head, m.cfg.head_dim, tokens.len());
    let mut arenas = model::arenas(m, &cfg).unwrap();
    let mut s = Session::new(m, cfg, &mut arenas).unwrap();
    let logits = s.feed_all(tokens).unwrap();
    let v = m.cfg.n_vocab;
    let mut nll = 0.0;
    for (t, row) in logits.chunks_exact(v).take(tokens.len() - 1).enumerate() {
        let mx = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let lse = f64::from(mx) + row.iter().map(|&z| f64::from(z - mx).exp()).sum::<f64>().ln();
        nll += lse - f64::from(row[tokens[t + 1] as usize]);
    }
    nll / (tokens.len() - 1) as f64
}

/// `window`: a sliding window for the finite differences shorter than the sequence (Gemma's 512 would
/// need a long, slow sequence to show its mask).
fn check(mut m: Model, n: usize, window: Option<usize>) {
    let toks = tokens(&m, n);
    let reference = runtime_loss(&mut m, &toks);
    let loss = Dense::new(&m).unwrap().pass(&toks).unwrap().loss;
    // The same function: the runtime's cache rounds keys and values to f16 (relative 2^-11 each), which
    // moves a loss of a few nats by well under 1e-3.
    eprintln!("loss: backward pass {loss:.6}, runtime {reference:.6}");
    assert!((loss - reference).abs() < 1e-3 * reference, "{loss} vs {reference}");
    if let Some(w) = window {
        m.cfg.window = w;
    }
    let dense = Dense::new(&m).unwrap();
    let pass = dense.pass(&toks).unwrap();
    let last = m.cfg.n_layer - 1;
    for layer in [0, m.cfg.n_layer / 2, last] {
        for keys in [true, false] {
            let lg = &pass.layers[layer];
            let (x, g) = if keys { (&lg.k, &lg.gk) } else { (&lg.v, &lg.gv) };
            assert_eq!((x.len(), g.len()), (n * m.cfg.n_kv_head * m.cfg.head_dim, x.len()));
            // The three elements with the largest gradient, a step of 1% of the layer's RMS: the central
            // difference's error is O(step^2) of the curvature, and f32 rounding of the loss (about
            // 1e-7 of a few nats) over the step stays far below 2% of these slopes.
            let rms = (x.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>() / x.len() as f64).sqrt() as f32;
            let mut idx: Vec<usize> = (0..g.len()).collect();
            idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
            for &i in &idx[..3] {
                let step = 0.01 * rms.max(1e-3);
                let at =
                    |delta: f32| dense.loss(&toks, Some(Nudge { layer, keys, index: i, delta })).unwrap();
                let fd = (at(step) - at(-step)) / (2.0 * f64::from(step));
                let an = f64::from(g[i]);
                eprintln!(
                    "layer {layer} {} [{i}]: backward {an:.4e}, finite difference {fd:.4e}",
                    if keys { "k" } else { "v" }
                );
                assert!((fd - an).abs() <= 0.02 * an.abs(), "layer {layer} keys={keys} [{i}]: {an} vs {fd}");
            }
        }
    }
}

#[test]
fn real_model_smollm2_gradients_are_the_loss_slope() {
    check(common::model(), 48, None);
}

#[test]
fn real_model_gemma3_gradients_are_the_loss_slope() {
    let p = kvq_host::fetch::fetch(&kvq_host::fetch::GEMMA3_270M, true).expect("Gemma 3 270M");
    check(Model::load(&p).unwrap(), 48, Some(16));
}
