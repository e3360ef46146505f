//! Batched evaluation equals token-by-token decoding: with [`Prefill::AsDecode`] a chunk's keys and values
//! enter the quantized cache one at a time and each query attends to the cache as stored, so the logits of
//! `feed_all` over many tokens are those of feeding the tokens one by one. With the chunked prefill they are
//! not (the chunk sees its own keys and values at full precision), which the test also shows, so it can fail.
//! Run on the tiny models of every architecture (random weights, made in Rust): Gemma 3's local layers
//! slide their 32-token rings inside the prompt.

mod common;

use kvq_core::cache::Overflow;
use kvq_host::kvspec::KvSpec;
use kvq_host::model::{self, Model, Prefill, Session};

#[test]
fn batched_as_decode_equals_token_by_token() {
    for arch in common::TINY_ARCHS {
        check(&Model::load(&common::tiny_path(arch)).unwrap(), arch);
    }
}

fn check(m: &Model, arch: &str) {
    let text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, \
                must be in want of a wife. However little known the feelings or views of such a man may be \
                on his first entering a neighbourhood, this truth is so well fixed in the minds of the \
                surrounding families, that he is considered the rightful property of some one or other of \
                their daughters. \"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that \
                Netherfield Park is let at last?\" Mr. Bennet replied that he had not.";
    let ids = kvq_host::tokenizer::Tokenizer::from_gguf(&m.gguf).unwrap().encode(text, false, false);
    let ids = &ids[..ids.len().min(110)];
    assert!(ids.len() >= 100, "{arch}: {} tokens", ids.len());
    let v = m.cfg.n_vocab;
    // Small groups and window so that key blocks and value tokens are quantized inside every 64-token chunk;
    // sinks; and a sliding cache that overflows partway.
    for (spec, cap, overflow) in [
        ("kivi2:g=16:r=16:s=4", 256, Overflow::Stop),
        ("kivi4:g=16:r=32", 256, Overflow::Stop),
        ("kivi2:g=16:r=16:s=4", 64, Overflow::Slide),
        ("f16", 256, Overflow::Stop),
        ("kvq2:kg=32:r=32", 256, Overflow::Stop),
    ] {
        let cfg = m.cache_config(&KvSpec::parse(spec).unwrap(), cap, overflow).unwrap();
        let run = |prefill: Option<Prefill>| -> Vec<f32> {
            let mut arenas = model::arenas(m, &cfg).unwrap();
            let mut s = Session::new(m, cfg, &mut arenas).unwrap();
            match prefill {
                Some(p) => {
                    s.set_prefill(p);
                    s.feed_all(ids).unwrap()
                }
                None => ids.iter().flat_map(|&t| s.feed(&[t]).unwrap()).collect(),
            }
        };
        let one_by_one = run(None);
        let batched = run(Some(Prefill::AsDecode));
        assert_eq!(batched.len(), ids.len() * v);
        let max = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        // The products are the same arithmetic whether one token or four share a weight decode, and
        // attention is the same call: equal bit for bit.
        let d = max(&batched, &one_by_one);
        assert!(d == 0.0, "{arch} {spec}: batched AsDecode differs from token-by-token decoding by {d}");
        if spec != "f16" && overflow == Overflow::Stop {
            let chunked = run(Some(Prefill::Chunked));
            let d = max(&chunked, &one_by_one);
            assert!(
                d > 1e-3,
                "{arch} {spec}: the chunked prefill should differ from decoding, differs by {d}"
            );
        }
    }
}
