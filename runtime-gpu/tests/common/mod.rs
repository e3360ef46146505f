//! Helpers shared by the attention tests: a deterministic generator, the exact attention in f64 and the
//! bound derived in `tests/sim.rs`.
#![allow(dead_code, unreachable_pub)]

use kvq_core::attention::{self, Kernel};
use kvq_core::cache::{Cache, CacheConfig, Stream};

pub const U: f64 = 1.0 / (1u64 << 24) as f64;

pub fn gamma(n: usize) -> f64 {
    n as f64 * U / (1.0 - n as f64 * U)
}

pub struct Gen(pub u64);

impl Gen {
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn rows(&mut self, n: usize, width: usize) -> Vec<f32> {
        (0..n * width).map(|i| self.next() * if i % 13 == 5 { 4.0 } else { 1.0 }).collect()
    }
}

/// A KV head's dequantized rows, held tokens first.
pub fn rows(cache: &Cache<'_>, s: Stream, h: usize) -> Vec<f32> {
    let mut r = vec![0.0f32; cache.held() * cache.config().head_dim];
    cache.dequantize(s, h, &mut r).unwrap();
    r
}

/// kvq-core's prefill attention (portable, exact f32 path) of queries `q` with the chunk `ck`, `cv`.
pub fn core_prefill(
    cache: &Cache<'_>,
    q: &[f32],
    ck: &[f32],
    cv: &[f32],
    q_heads: usize,
    scale: f32,
) -> Vec<f32> {
    let n = ck.len() / (cache.config().kv_heads * cache.config().head_dim);
    let mut out = vec![0.0f32; q.len()];
    let mut scratch = vec![0.0f32; cache.config().prefill_scratch_len(n, q_heads)];
    attention::prefill(cache, q, ck, cv, q_heads, scale, &mut out, &mut scratch, Kernel::PORTABLE).unwrap();
    out
}

/// kvq-core's decode attention (portable, exact f32 path).
pub fn core_decode(cache: &Cache<'_>, q: &[f32], q_heads: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; q.len()];
    let mut scratch = vec![0.0f32; cache.config().decode_scratch_len(q_heads)];
    attention::decode(cache, q, q_heads, scale, &mut out, &mut scratch, Kernel::PORTABLE).unwrap();
    out
}

/// A KV head's rows followed by the chunk's (`[n][kv_heads][d]` keys or values of a prefill).
pub fn rows_and_chunk(cache: &Cache<'_>, s: Stream, h: usize, chunk: &[f32]) -> Vec<f32> {
    let (heads, d) = (cache.config().kv_heads, cache.config().head_dim);
    let mut r = rows(cache, s, h);
    for tok in chunk.chunks_exact(heads * d) {
        r.extend_from_slice(&tok[h * d..(h + 1) * d]);
    }
    r
}

/// Exact attention of one query over `tokens` rows, in f64.
pub fn exact(k: &[f32], v: &[f32], q: &[f32], scale: f32, d: usize, tokens: usize) -> Vec<f64> {
    let s: Vec<f64> = (0..tokens)
        .map(|t| (0..d).map(|c| f64::from(q[c]) * f64::from(scale) * f64::from(k[t * d + c])).sum())
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let l: f64 = p.iter().sum();
    (0..d).map(|c| (0..tokens).map(|t| p[t] * f64::from(v[t * d + c])).sum::<f64>() / l).collect()
}

/// The bound of the module docs for one query over `tokens` rows in `splits` splits.
pub fn bound(
    k: &[f32],
    v: &[f32],
    q: &[f32],
    scale: f32,
    d: usize,
    tokens: usize,
    splits: usize,
) -> Vec<f64> {
    let kmax: Vec<f64> =
        (0..d).map(|c| (0..tokens).map(|t| f64::from(k[t * d + c].abs())).fold(0.0, f64::max)).collect();
    let vmax: Vec<f64> =
        (0..d).map(|c| (0..tokens).map(|t| f64::from(v[t * d + c].abs())).fold(0.0, f64::max)).collect();
    let e = gamma(d + 4) * (0..d).map(|c| 3.0 * f64::from((q[c] * scale).abs()) * kmax[c]).sum::<f64>();
    let smax = (0..d).map(|c| f64::from((q[c] * scale).abs()) * kmax[c]).sum::<f64>();
    let rho = 2.0 * e + 2.0 * U * smax + 4.0 * U * (tokens as f64 / 32.0 + splits as f64 + 8.0);
    let f = (2.0 * rho).exp_m1() + gamma(tokens + 8);
    vmax.iter().map(|vm| f * 3.0 * vm).collect()
}

/// Checks one query head's result (the simulation's or the device's) against the exact attention over
/// the rows `k`, `v`, within the bound.
#[allow(clippy::too_many_arguments)]
pub fn check_exact(
    what: &str,
    got: &[f32],
    k: &[f32],
    v: &[f32],
    q: &[f32],
    scale: f32,
    d: usize,
    tokens: usize,
    splits: usize,
) -> (Vec<f64>, Vec<f64>) {
    let ex = exact(k, v, q, scale, d, tokens);
    let b = bound(k, v, q, scale, d, tokens, splits);
    for c in 0..d {
        let g = f64::from(got[c]);
        assert!((g - ex[c]).abs() <= b[c], "{what} c{c}: result {g} vs exact {}, bound {}", ex[c], b[c]);
    }
    (ex, b)
}

/// Checks one query head's result against the exact attention and kvq-core's.
#[allow(clippy::too_many_arguments)]
pub fn check(
    what: &str,
    got: &[f32],
    core: &[f32],
    k: &[f32],
    v: &[f32],
    q: &[f32],
    scale: f32,
    d: usize,
    tokens: usize,
    splits: usize,
) {
    let (ex, b) = check_exact(what, got, k, v, q, scale, d, tokens, splits);
    for c in 0..d {
        let (g, co, e) = (f64::from(got[c]), f64::from(core[c]), ex[c]);
        assert!((co - e).abs() <= b[c], "{what} c{c}: core {co} vs exact {e}, bound {}", b[c]);
        assert!((g - co).abs() <= 2.0 * b[c], "{what} c{c}: result {g} vs core {co}");
    }
}

/// The calibrated formats as kvq's presets build them, over `heads` KV heads of `d` channels (a power of
/// two where a stream is rotated), and every ingredient stacked: the generic reader's test cases.
pub fn calibrated_configs(heads: usize, d: usize, cap: usize) -> Vec<(&'static str, CacheConfig)> {
    use kvq_core::cache::{Precision, QuantSpec, Tiers, Transform};
    use kvq_core::pack::Width;
    use kvq_core::quant::param::ParamFormat::Fp8E4M3;
    use kvq_core::transform::{Pairing, Rope};
    let rope = |pairing| Some(Rope { base: 10_000.0, pairing });
    let t = Transform::NONE;
    let q = Precision::Quant;
    let base = CacheConfig::kivi(Width::B2, 32, 64, heads, d, cap);
    vec![
        (
            // kvq2 (SmolLM2): 3-bit keys in 64-token groups before RoPE, rotated; 2-bit values in
            // 64-channel groups with FP8 parameters, rotated.
            "kvq2",
            CacheConfig {
                keys: q(QuantSpec::per_channel(Width::B3, 64)),
                values: q(QuantSpec::per_token(Width::B2, 64).with_params(Fp8E4M3)),
                ..base.with_sinks(4).with_transform(Transform {
                    rope: rope(Pairing::Adjacent),
                    rotate_keys: true,
                    rotate_values: true,
                    ..t
                })
            },
        ),
        (
            // kvq3 on a key-norm model (Gemma 3): keys not rotated, NeoX pairing.
            "kvq3 halves",
            CacheConfig {
                keys: q(QuantSpec::per_channel(Width::B3, 32)),
                values: q(QuantSpec::per_token(Width::B3, 64)),
                ..base.with_sinks(4).with_transform(Transform {
                    rope: rope(Pairing::Halves),
                    rotate_values: true,
                    ..t
                })
            },
        ),
        (
            // kvquant2: codebooks and outliers on both streams, keys before RoPE, one sink.
            "kvquant2",
            CacheConfig {
                keys: q(QuantSpec::per_channel(Width::B2, 32).with_codebook().with_outliers(5)),
                values: q(QuantSpec::per_token(Width::B2, 32).with_codebook().with_outliers(3)),
                ..base.with_sinks(1).with_transform(Transform { rope: rope(Pairing::Halves), ..t })
            },
        ),
        (
            "kvquant4",
            CacheConfig {
                keys: q(QuantSpec::per_channel(Width::B4, 32).with_codebook().with_outliers(4)),
                values: q(QuantSpec::per_token(Width::B4, 16).with_codebook().with_outliers(2)),
                ..base.with_sinks(1).with_transform(Transform { rope: rope(Pairing::Adjacent), ..t })
            },
        ),
        (
            // skvq2: per-token keys and values over calibrated permutations with uneven groups, clipped,
            // FP8 parameters, five sinks.
            "skvq2",
            CacheConfig {
                keys: q(QuantSpec { permuted: true, clip: 0.9, ..QuantSpec::per_token(Width::B2, 32) }
                    .with_params(Fp8E4M3)),
                values: q(QuantSpec { permuted: true, clip: 0.95, ..QuantSpec::per_token(Width::B2, 32) }
                    .with_params(Fp8E4M3)),
                ..base.with_sinks(5)
            },
        ),
        (
            // mikv2: balanced keys, FP8 parameters, 4-bit tier corrections of two tokens a key group.
            "mikv2",
            CacheConfig {
                keys: q(QuantSpec::per_channel(Width::B2, 32).with_params(Fp8E4M3)),
                values: q(QuantSpec::per_token(Width::B2, 32).with_params(Fp8E4M3)),
                ..base
                    .with_sinks(4)
                    .with_transform(Transform { balance_keys: true, ..t })
                    .with_tiers(Tiers { keep: 2, width: Width::B4 })
            },
        ),
        (
            // Every key transform at once, tiers over codebooks with outliers, permuted values with outliers,
            // sliding.
            "stacked slide",
            CacheConfig {
                keys: q(QuantSpec::per_channel(Width::B2, 32).with_codebook().with_outliers(4)),
                values: q(QuantSpec { permuted: true, ..QuantSpec::per_token(Width::B3, 32) }
                    .with_params(Fp8E4M3)
                    .with_outliers(2)),
                ..base
                    .with_sinks(2)
                    .with_overflow(kvq_core::cache::Overflow::Slide)
                    .with_transform(Transform {
                        rope: rope(Pairing::Halves),
                        rotate_keys: true,
                        rotate_values: true,
                        center_keys: true,
                        balance_keys: true,
                    })
                    .with_tiers(Tiers { keep: 5, width: Width::B8 })
            },
        ),
    ]
}
