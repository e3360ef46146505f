//! The attention kernels' decomposition (`kvq_gpu::sim`: splits, four warps of 32-token tiles, online
//! softmax, warp and split merges) against kvq-core's attention, without a GPU.
//!
//! # The bound
//!
//! Both results are f32 computations of the same attention over the same dequantized rows; each is
//! compared with the exact (f64) attention over those rows. With `u = 2^-24` and `γ_n = n u / (1 - n u)`:
//!
//! - **Scores.** A score is a sum of `d` products of the scaled query with a key element. kvq-core folds
//!   each group's scale and zero point into the query (`Σ (q s) code + Σ q z`), so its terms are bounded
//!   by `|q| (|code s| + |z|)`. The zero point is a value of its group (code 0 is the group's minimum) and
//!   `code s = k - z`, so every term is at most `3 |q_c| K_c`, with `K_c` the largest `|k|` of channel `c`
//!   over the held rows. Summed in any order with the query's scaling and the fold's two roundings:
//!   `|Δs| <= E = γ_{d+4} Σ_c 3 |q_c scale| K_c`.
//! - **Weights.** `exp(s - m)` is off by `|Δs| + |Δm| <= 2E`, plus the subtraction's rounding (`u` times
//!   the largest `|s|`, `S`) and `exp`'s (2 ulp); the online softmax rescales at most once per tile
//!   (`T/32` times) and the merges four and `splits` times more, each a rounding of its own. So each
//!   weight's relative error is at most `ρ = 2E + 2uS + 4u (T/32 + splits + 8)`, counted twice (numerator
//!   and denominator): `e^{2ρ} - 1`.
//! - **Outputs.** `o_c = Σ w_t v_tc` over `T` tokens: the weight errors contribute `(e^{2ρ} - 1) Σ w |v|`,
//!   the summation `γ_{T+8} Σ w |v|`; kvq-core folds values as it folds keys, so `|v|` is bounded by
//!   `3 V_c` as above. Hence `|Δo_c| <= (e^{2ρ} - 1 + γ_{T+8}) 3 V_c`.
//!
//! The simulation and kvq-core each stay within this of the exact result, so within twice it of each
//! other. Moving one value or key element of the dominant token by one quantization level breaks it.

mod common;

use kvq_core::testing::{Rng, append_observed, fill_tables};

use common::{Gen, bound, check, core_decode, core_prefill, exact, rows, rows_and_chunk};
use kvq_core::cache::{Cache, CacheConfig, Overflow, Stream};
use kvq_core::pack::Width;
use kvq_gpu::abi::Splits;
use kvq_gpu::sim;

fn configs(heads: usize, d: usize, cap: usize) -> Vec<(&'static str, CacheConfig)> {
    vec![
        ("fp16", CacheConfig::fp16(heads, d, cap).with_sinks(4)),
        ("kivi2", CacheConfig::kivi(Width::B2, 32, 64, heads, d, cap).with_sinks(4)),
        ("kivi4", CacheConfig::kivi(Width::B4, 32, 96, heads, d, cap)),
        (
            "kivi2 slide",
            CacheConfig::kivi(Width::B2, 32, 64, heads, d, cap / 2)
                .with_sinks(4)
                .with_overflow(Overflow::Slide),
        ),
    ]
}

/// One decode over a cache of `cfg` holding `tokens` tokens (calibration-like tables and MiKV
/// observations where the format has them): the simulation at several splits against kvq-core.
fn decode_case(name: &str, cfg: CacheConfig, ratio: usize, tokens: usize) {
    let (heads, d) = (cfg.kv_heads, cfg.head_dim);
    let q_heads = heads * ratio;
    let mut arena = vec![0u32; cfg.layout().unwrap().total_words];
    let mut cache = Cache::new(cfg, &mut arena).unwrap();
    let mut g = Gen(0x1234_5678_9abc_def1 ^ tokens as u64);
    let mut rng = Rng::new(g.0);
    fill_tables(&mut cache, &mut rng);
    let (k, v) = (g.rows(tokens, heads * d), g.rows(tokens, heads * d));
    append_observed(&mut cache, &k, &v, &mut rng);
    let held = cache.held();
    let q = g.rows(1, q_heads * d);
    let scale = 1.0 / (d as f32).sqrt();
    let out = core_decode(&cache, &q, q_heads, scale);
    for h in 0..heads {
        let (kr, vr) = (rows(&cache, Stream::Keys, h), rows(&cache, Stream::Values, h));
        let qg = &q[h * ratio * d..(h + 1) * ratio * d];
        // The split the device picks for a few blocks per multiprocessor, and smaller ones.
        for split in [Splits::new(held, heads, 1, 132 * 4).split, 128, 256] {
            let got = sim::attend(&kr, &vr, qg, scale, d, held, split);
            for r in 0..ratio {
                let qh = h * ratio + r;
                check(
                    &format!("{name} {tokens} tokens (held {held}) h{h} q{qh} d{d} split {split}"),
                    &got[r * d..(r + 1) * d],
                    &out[qh * d..(qh + 1) * d],
                    &kr,
                    &vr,
                    &qg[r * d..(r + 1) * d],
                    scale,
                    d,
                    held,
                    held.div_ceil(split),
                );
            }
        }
    }
}

#[test]
fn split_decode_equals_core_decode_within_the_bound() {
    for (heads, ratio, d) in [(2usize, 1usize, 64usize), (2, 3, 96), (1, 4, 128), (3, 8, 32)] {
        for (name, cfg) in configs(heads, d, 1700) {
            for tokens in [1usize, 37, 300, 1500] {
                decode_case(name, cfg, ratio, tokens);
            }
        }
    }
}

/// The calibrated formats through the same decomposition: the generic kernels rebuild kvq-core's rows bit
/// for bit (`tests/header.rs`), so the decomposition over those rows is what the device computes; kvq-core
/// scores these formats in their stored basis, and stays within the same bound.
#[test]
fn split_decode_over_calibrated_formats_equals_core_decode_within_the_bound() {
    for (heads, ratio, d) in [(3usize, 3usize, 64usize), (1, 8, 128)] {
        for (name, cfg) in common::calibrated_configs(heads, d, 1700) {
            for tokens in [1usize, 300, 1500] {
                decode_case(name, cfg, ratio, tokens);
            }
        }
    }
}

#[test]
fn split_prefill_equals_core_prefill_within_the_bound() {
    let (heads, ratio, d) = (2usize, 3usize, 64usize);
    let q_heads = heads * ratio;
    for (name, cfg) in configs(heads, d, 1200) {
        for (before, n) in [(0usize, 5usize), (200, 40), (700, 130)] {
            let mut arena = vec![0u32; cfg.layout().unwrap().total_words];
            let mut cache = Cache::new(cfg, &mut arena).unwrap();
            let mut g = Gen(0xdead_beef_0bad_cafe ^ before as u64);
            if before > 0 {
                cache.append(&g.rows(before, heads * d), &g.rows(before, heads * d)).unwrap();
            }
            let held = cache.held();
            let (ck, cv, q) = (g.rows(n, heads * d), g.rows(n, heads * d), g.rows(n, q_heads * d));
            let scale = 0.125;
            let out = core_prefill(&cache, &q, &ck, &cv, q_heads, scale);
            let split = 128;
            for h in 0..heads {
                let kr = rows_and_chunk(&cache, Stream::Keys, h, &ck);
                let vr = rows_and_chunk(&cache, Stream::Values, h, &cv);
                for i in 0..n {
                    let tokens = held + i + 1;
                    let qg = &q[(i * q_heads + h * ratio) * d..][..ratio * d];
                    let got = sim::attend(&kr, &vr, qg, scale, d, tokens, split);
                    for r in 0..ratio {
                        let row = i * q_heads + h * ratio + r;
                        check(
                            &format!("{name} prefill {n} after {before}: position {i} h{h} r{r}"),
                            &got[r * d..(r + 1) * d],
                            &out[row * d..(row + 1) * d],
                            &kr,
                            &vr,
                            &qg[r * d..(r + 1) * d],
                            scale,
                            d,
                            tokens,
                            tokens.div_ceil(split),
                        );
                    }
                }
            }
        }
    }
}

/// The bound is tight enough to see one quantization level: a token given about half the attention (its
/// key along the query), then one of its value elements, or its key element on the query's largest
/// channel, moved by its group's step, puts the simulation outside the bound of the unperturbed exact
/// attention.
#[test]
fn one_level_on_a_heavy_token_breaks_the_bound() {
    let (heads, d, tokens, hot) = (1usize, 64usize, 600usize, 100usize);
    let cfg = CacheConfig::kivi(Width::B2, 32, 64, heads, d, 1024);
    let mut g = Gen(77);
    let (k0, v) = (g.rows(tokens, d), g.rows(tokens, d));
    let q = g.rows(1, d);
    let scale = 0.15;
    // The hot key's magnitude: the first that gives the hot token a weight between 0.3 and 0.7.
    let mut found = None;
    for step in 1..300 {
        let a = step as f32 * 0.02;
        let mut k = k0.clone();
        for c in 0..d {
            k[hot * d + c] = q[c].signum() * a;
        }
        let mut arena = vec![0u32; cfg.layout().unwrap().total_words];
        let mut cache = Cache::new(cfg, &mut arena).unwrap();
        cache.append(&k, &v).unwrap();
        let (kr, vr) = (rows(&cache, Stream::Keys, 0), rows(&cache, Stream::Values, 0));
        let s: Vec<f64> =
            (0..tokens).map(|t| (0..d).map(|c| f64::from(q[c] * scale * kr[t * d + c])).sum()).collect();
        let m = s.iter().cloned().fold(f64::MIN, f64::max);
        let w = (s[hot] - m).exp() / s.iter().map(|x| (x - m).exp()).sum::<f64>();
        if (0.3..0.7).contains(&w) {
            found = Some((kr, vr));
            break;
        }
    }
    let (kr, vr) = found.expect("no magnitude gives the hot token half the weight");
    let ex = exact(&kr, &vr, &q, scale, d, tokens);
    let b = bound(&kr, &vr, &q, scale, d, tokens, tokens.div_ceil(128));
    let base = sim::attend(&kr, &vr, &q, scale, d, tokens, 128);
    assert!((0..d).all(|c| (f64::from(base[c]) - ex[c]).abs() <= b[c]));
    let outside = |o: &[f32]| (0..d).filter(|&c| (f64::from(o[c]) - ex[c]).abs() > b[c]).count();
    // One value level: the hot token's group of channels 0..32 has step range / 3 at 2 bits.
    let group = &vr[hot * d..hot * d + 32];
    let step = (group.iter().cloned().fold(f32::MIN, f32::max)
        - group.iter().cloned().fold(f32::MAX, f32::min))
        / 3.0;
    let mut v2 = vr.clone();
    v2[hot * d + 5] += step;
    assert!(
        outside(&sim::attend(&kr, &v2, &q, scale, d, tokens, 128)) > 0,
        "a value level stays inside the bound"
    );
    // One key level on the query's largest channel: the step of that channel's key group (tokens 96..128).
    let c = (0..d).max_by(|&a, &b| q[a].abs().total_cmp(&q[b].abs())).unwrap();
    let col: Vec<f32> = (96..128).map(|t| kr[t * d + c]).collect();
    let kstep =
        (col.iter().cloned().fold(f32::MIN, f32::max) - col.iter().cloned().fold(f32::MAX, f32::min)) / 3.0;
    let mut k2 = kr.clone();
    k2[hot * d + c] -= kstep * q[c].signum();
    assert!(
        outside(&sim::attend(&k2, &vr, &q, scale, d, tokens, 128)) > 0,
        "a key level stays inside the bound"
    );
}
