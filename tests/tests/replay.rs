//! The host session against a core-only replay of the same tokens: the replay below runs the default
//! model token by token with nothing of [`Session`] (no chunks, no per-head tasks, no gathering of head
//! rows, no batched products): its own `kvq-core` caches over its own arenas, one
//! [`attention::decode`] over all heads per layer and token, and MiKV's received attention summed here.
//! The session, fed the same tokens in chunks of 64 with [`Prefill::AsDecode`] (every query attends to
//! the cache as stored), must give the same logits bit for bit, for the fp16 cache, a sliding 2-bit one
//! that evicts half the text, and a tiered one.

use kvq_core::attention::{self, Kernel};
use kvq_core::cache::{Cache, CacheConfig, Overflow};
use kvq_host::kvspec::KvSpec;
use kvq_host::model::{self, Model, Prefill, Session};
use kvq_host::quants::Q16Act;

/// Logits after every token, computed with the model's weights and `kvq-core` only.
fn replay(m: &Model, cfg: CacheConfig, tokens: &[u32]) -> Vec<f32> {
    let c = &m.cfg;
    let (e, d) = (c.n_embd, c.head_dim);
    let (qd, kvd) = (c.n_head * d, c.n_kv_head * d);
    let ratio = c.n_head / c.n_kv_head;
    let mut arenas: Vec<Vec<u32>> =
        (0..c.n_layer).map(|_| vec![0u32; cfg.arena_bytes().div_ceil(4)]).collect();
    let mut caches: Vec<Cache<'_>> = arenas.iter_mut().map(|a| Cache::new(cfg, a).unwrap()).collect();
    let mut scratch = vec![0f32; cfg.decode_scratch_len(c.n_head)];
    let kernel = Kernel::detect().with_int8(m.int8_attention);
    let scale = 1.0 / (d as f32).sqrt();
    let mut act = Q16Act::default();
    let (mut x, mut h) = (vec![0f32; e], vec![0f32; e]);
    let (mut q, mut k, mut v, mut att) = (vec![0f32; qd], vec![0f32; kvd], vec![0f32; kvd], vec![0f32; qd]);
    let (mut o, mut g, mut u) = (vec![0f32; e], vec![0f32; c.n_ff], vec![0f32; c.n_ff]);
    let (out_w, out_norm) = m.output();
    let mut logits = Vec::new();
    for (pos, &tok) in tokens.iter().enumerate() {
        m.embed(tok, &mut x).unwrap();
        let angles = m.rope_angles(pos);
        for (layer, cache) in m.layers().iter().zip(caches.iter_mut()) {
            model::rmsnorm(&x, &layer.attn_norm, c.eps, &mut h);
            m.matmul(&layer.wq, &h, &mut q, &mut act);
            m.matmul(&layer.wk, &h, &mut k, &mut act);
            m.matmul(&layer.wv, &h, &mut v, &mut act);
            for (buf, b) in [(&mut q, &layer.bq), (&mut k, &layer.bk), (&mut v, &layer.bv)] {
                if let Some(b) = b {
                    buf.iter_mut().zip(b).for_each(|(r, b)| *r += b);
                }
            }
            model::rope(&mut q, d, &angles, c.arch);
            model::rope(&mut k, d, &angles, c.arch);
            cache.append(&k, &v).unwrap();
            let window = cache.tier_window();
            let mut probs =
                attention::decode(cache, &q, c.n_head, scale, &mut att, &mut scratch, kernel).unwrap();
            let held = probs.tokens();
            let received: Vec<Vec<f32>> = (0..c.n_kv_head)
                .map(|kh| {
                    let mut r = vec![0f32; window];
                    for qh in kh * ratio..(kh + 1) * ratio {
                        for (a, &p) in r.iter_mut().zip(&probs.head(qh)[held - window..]) {
                            *a += p;
                        }
                    }
                    r
                })
                .collect();
            if window > 0 {
                for (kh, r) in received.iter().enumerate() {
                    cache.observe(kh, r).unwrap();
                }
            }
            m.matmul(&layer.wo, &att, &mut o, &mut act);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            model::rmsnorm(&x, &layer.ffn_norm, c.eps, &mut h);
            m.matmul(&layer.gate, &h, &mut g, &mut act);
            m.matmul(&layer.up, &h, &mut u, &mut act);
            g.iter_mut().zip(&u).for_each(|(g, u)| *g = model::silu(*g) * u);
            m.matmul(&layer.down, &g, &mut o, &mut act);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        }
        model::rmsnorm(&x, out_norm, c.eps, &mut h);
        let mut l = vec![0f32; c.n_vocab];
        m.matmul(out_w, &h, &mut l, &mut act);
        logits.extend(l);
    }
    logits
}

#[test]
fn real_model_the_session_and_a_core_only_replay_give_the_same_logits() {
    let (m, tok, text) = kvq_tests::default_model_and_text();
    let tokens = &tok.encode(&text, true, false)[..160];
    // 160 tokens through 80 slots: the sliding cache evicts half the text, sinks kept.
    for (spec, cap, overflow) in [
        ("f16", 160, Overflow::Stop),
        ("kivi2:s=4:r=32", 80, Overflow::Slide),
        ("kvq2:tier=2", 160, Overflow::Stop),
    ] {
        let cfg = m.cache_config(&KvSpec::parse(spec).unwrap(), cap, overflow).unwrap();
        let mut arenas = model::arenas(&m, &cfg).unwrap();
        let mut s = Session::new(&m, cfg, &mut arenas).unwrap();
        s.set_prefill(Prefill::AsDecode);
        let got = s.feed_all(tokens).unwrap();
        let want = replay(&m, cfg, tokens);
        assert_eq!(got.len(), want.len());
        let n = m.cfg.n_vocab;
        for (t, (g, w)) in got.chunks_exact(n).zip(want.chunks_exact(n)).enumerate() {
            if let Some(i) = g.iter().zip(w).position(|(a, b)| a.to_bits() != b.to_bits()) {
                panic!("{spec}: token {t}, logit {i}: session {} replay {}", g[i], w[i]);
            }
        }
        if overflow == Overflow::Slide {
            let c = s.caches()[0].counts();
            assert!(c.base >= 64 && s.held() <= cap, "{spec}: the cache slid ({c:?})");
        }
        eprintln!("{spec}: {} tokens, {} held, logits identical", tokens.len(), s.held());
    }
}
