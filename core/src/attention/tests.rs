extern crate std;
use super::*;
use crate::cache::{CacheConfig, Overflow, QuantSpec};
use crate::testutil::{Rng, activations, f16r, group_bound};
use std::vec;
use std::vec::Vec;

const U: f64 = f32::EPSILON as f64 / 2.0; // unit roundoff of f32

/// `n u / (1 - n u)`: the relative error bound of an `n`-term f32 sum or dot product.
fn gamma(n: usize) -> f64 {
    n as f64 * U / (1.0 - n as f64 * U)
}

fn kernels() -> Vec<Kernel> {
    let mut k = vec![Kernel::PORTABLE];
    k.extend(Kernel::avx2());
    k
}

/// Plain attention in f64 over explicit keys and values `[t][d]` per KV head: the reference. Returns the
/// outputs and each query head's probabilities.
fn naive_p(
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    q_heads: usize,
    d: usize,
    scale: f32,
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let kv_heads = keys.len();
    let ratio = q_heads / kv_heads;
    let mut out = vec![0.0f64; q_heads * d];
    let mut probs = Vec::new();
    for hq in 0..q_heads {
        let (k, v) = (&keys[hq / ratio], &values[hq / ratio]);
        let t = k.len() / d;
        let s: Vec<f64> = (0..t)
            .map(|i| {
                (0..d).map(|c| f64::from(q[hq * d + c]) * f64::from(k[i * d + c])).sum::<f64>()
                    * f64::from(scale)
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        let p: Vec<f64> = e.iter().map(|x| x / sum).collect();
        for i in 0..t {
            for c in 0..d {
                out[hq * d + c] += p[i] * f64::from(v[i * d + c]);
            }
        }
        probs.push(p);
    }
    (out, probs)
}

fn dequantized(cache: &Cache<'_>, stream: Stream) -> Vec<Vec<f32>> {
    let cfg = cache.config();
    (0..cfg.kv_heads)
        .map(|h| {
            let mut out = vec![0.0; cache.held() * cfg.head_dim];
            cache.dequantize(stream, h, &mut out).unwrap();
            out
        })
        .collect()
}

/// A bound on `|z|`, the zero point of the group that holds element `(t, c)` of `x` (`[t][d]`): the zero
/// point lies at or below the group's minimum and within an f16 step of it, so `|z| <= max |x|` over the
/// group, plus f16 rounding.
fn zero_bounds(p: Precision, x: &[f32], d: usize) -> Vec<f64> {
    let t = x.len() / d;
    let mut z = vec![0.0f64; x.len()];
    match p {
        Precision::F16 => {}
        Precision::Quant(q) if q.axis == Axis::PerChannel => {
            for c in 0..d {
                let m = (0..t).map(|u| x[u * d + c].abs()).fold(0.0f32, f32::max);
                (0..t).for_each(|u| z[u * d + c] = f64::from(m));
            }
        }
        Precision::Quant(q) => {
            for u in 0..t {
                for g0 in (0..d).step_by(q.group) {
                    let m = x[u * d + g0..][..q.group].iter().fold(0.0f32, |a, v| a.max(v.abs()));
                    (g0..g0 + q.group).for_each(|c| z[u * d + c] = f64::from(m));
                }
            }
        }
    }
    z.iter().map(|v| v * (1.0 + 2f64.powi(-9))).collect()
}

/// The rounding-only tolerance, per output channel, between the fused kernels and exact attention over the
/// same dequantized cache (`k`, `v`: one KV head, `[t][d]`; `p`: the exact probabilities).
///
/// Scores: the kernel sums `d` products `(q_c s) code` and the bias `sum q_c z` in f32; every term is at
/// most `|q_c| (|code s| + |z|) <= |q_c| (|k_c| + 2|z|)` and the dequantized reference value itself carries
/// two roundings, so a score is off by at most `E_t = scale * gamma(d + 5) * sum_c |q_c| (|k_tc| + 2 z_tc)`.
/// Scores off by at most `E = max_t E_t` change each probability by a factor within `exp(+-2E)`; `exp`
/// (libm or the AVX2 polynomial, 2^-21 = 8u) and the normalizing sum (`gamma(t + 1)`, twice) add their
/// relative errors. The value sum over `t` tokens of terms `p (|code s| + |z|)` adds `gamma(t + 5)` of
/// `sum_t p_t (|v_tc| + 2 z_tc)`.
fn rounding_tolerance(cfg: &CacheConfig, q: &[f32], k: &[f32], v: &[f32], p: &[f64], scale: f32) -> Vec<f64> {
    let d = q.len();
    let t = k.len() / d;
    let zk = zero_bounds(cfg.keys, k, d);
    let zv = zero_bounds(cfg.values, v, d);
    let e = (0..t)
        .map(|u| {
            (0..d)
                .map(|c| f64::from(q[c].abs()) * (f64::from(k[u * d + c].abs()) + 2.0 * zk[u * d + c]))
                .sum::<f64>()
        })
        .fold(0.0, f64::max)
        * f64::from(scale)
        * gamma(d + 5);
    let rel = (2.0 * e + 8.0 * U + 2.0 * gamma(t + 1)).exp_m1();
    (0..d)
        .map(|c| {
            let pv: f64 = (0..t).map(|u| p[u] * f64::from(v[u * d + c].abs())).sum();
            let pz: f64 = (0..t).map(|u| p[u] * 2.0 * zv[u * d + c]).sum();
            rel * pv + gamma(t + 5) * (pv + pz) + f64::MIN_POSITIVE
        })
        .collect()
}

/// Checks `out` (`[q_heads][d]`) against the exact attention over `keys`/`values` within the rounding
/// tolerance of every output element.
#[allow(clippy::too_many_arguments)]
fn assert_rounding_close(
    what: &str,
    cfg: &CacheConfig,
    q: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    q_heads: usize,
    scale: f32,
    out: &[f32],
) {
    let d = cfg.head_dim;
    let ratio = q_heads / keys.len();
    let (want, probs) = naive_p(q, keys, values, q_heads, d, scale);
    for hq in 0..q_heads {
        let tol = rounding_tolerance(
            cfg,
            &q[hq * d..][..d],
            &keys[hq / ratio],
            &values[hq / ratio],
            &probs[hq],
            scale,
        );
        for c in 0..d {
            let (o, w) = (f64::from(out[hq * d + c]), want[hq * d + c]);
            assert!((o - w).abs() <= tol[c], "{what}: head {hq} channel {c}: {o} vs {w} (tol {:e})", tol[c]);
        }
    }
}

fn policies(
    g: usize,
    r: usize,
    s: usize,
    kv: usize,
    d: usize,
    cap: usize,
) -> Vec<(&'static str, CacheConfig)> {
    let kivi2 = CacheConfig::kivi(Width::B2, g, r, kv, d, cap).with_sinks(s);
    vec![
        ("fp16", CacheConfig::fp16(kv, d, cap).with_sinks(s)),
        ("kivi2", kivi2),
        ("kivi4", CacheConfig::kivi(Width::B4, g, r, kv, d, cap).with_sinks(s)),
        ("kivi8", CacheConfig::kivi(Width::B8, g, r, kv, d, cap).with_sinks(s)),
        ("kivi-ternary", CacheConfig::kivi(Width::Ternary, g, r, kv, d, cap).with_sinks(s)),
        ("kivi3", CacheConfig::kivi(Width::B3, g.max(32), r.max(32), kv, d, cap).with_sinks(s)),
        (
            "per-token-keys",
            CacheConfig { keys: Precision::Quant(QuantSpec::per_token(Width::B2, g)), ..kivi2 },
        ),
        ("fp16-keys", CacheConfig { keys: Precision::F16, ..kivi2 }),
    ]
}

/// (a) Attention over the cache equals plain attention over the dequantized cache to float rounding, for
/// every policy, G, R and S, at T = 1, R-1, R, R+1 and many times G, GQA 1, 3 and 7, head_dim 64 and 128,
/// with both kernels. (T = 0 is an error, checked in `bad_input`.)
#[test]
fn decode_equals_attention_over_the_dequantized_cache() {
    let mut rng = Rng::new(42);
    let mut cases = 0;
    let big = !cfg!(miri);
    let dims: &[usize] = if big { &[64, 128] } else { &[64] };
    let grs: &[(usize, usize)] = if big { &[(32, 32), (32, 64), (64, 128)] } else { &[(32, 32)] };
    for &d in dims {
        for &(g, r) in grs {
            let sinks: &[usize] = if big { &[0, 4] } else { &[2] };
            for &s in sinks {
                for (name, cfg) in policies(g, r, s, 2, d, 1024) {
                    let ts = [1, r - 1, r, r + 1, 5 * g + 3, 8 * g];
                    for (ti, &t) in ts.iter().enumerate() {
                        if !big && ti > 1 {
                            continue;
                        }
                        let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
                        let mut cache = Cache::new(cfg, &mut mem).unwrap();
                        let k = activations(&mut rng, t, 2, d);
                        let v = activations(&mut rng, t, 2, d);
                        cache.append(&k, &v).unwrap();
                        let keys = dequantized(&cache, Stream::Keys);
                        let values = dequantized(&cache, Stream::Values);
                        for ratio in [1usize, 3, 7] {
                            if !big && ratio != 3 {
                                continue;
                            }
                            let qh = 2 * ratio;
                            let q: Vec<f32> = (0..qh * d).map(|_| rng.unit() * 2.0).collect();
                            let scale = 1.0 / (d as f32).sqrt();
                            for kernel in kernels() {
                                let mut out = vec![0.0f32; qh * d];
                                let mut scratch = vec![0.0f32; decode_scratch_len(cfg.capacity, qh, 2, d)];
                                let probs =
                                    decode(&cache, &q, qh, scale, &mut out, &mut scratch, kernel).unwrap();
                                assert_eq!(probs.tokens(), t);
                                for h in 0..qh {
                                    let sum: f32 = probs.head(h).iter().sum();
                                    assert!((sum - 1.0).abs() < 1e-4, "{name}: probabilities sum to {sum}");
                                }
                                let what = std::format!(
                                    "{name} {} d {d} G {g} R {r} S {s} T {t} ratio {ratio}",
                                    kernel.name()
                                );
                                assert_rounding_close(&what, &cfg, &q, &keys, &values, qh, scale, &out);
                                cases += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(cases > if big { 1000 } else { 10 }, "{cases}");
}

/// Per-element error bounds of what the cache stores, `[t][d]` per head, from the quantizer's bound.
fn stored_bounds(cfg: &CacheConfig, stream: Stream, x: &[f32], t: usize) -> Vec<Vec<f32>> {
    let (heads, d) = (cfg.kv_heads, cfg.head_dim);
    let precision = if stream == Stream::Keys { cfg.keys } else { cfg.values };
    let body = t - cfg.sinks.min(t);
    let q_end = precision.residual().quantized_end(body, cfg.residual);
    let at = |u: usize, h: usize, c: usize| x[(u * heads + h) * d + c];
    (0..heads)
        .map(|h| {
            let mut b = vec![0.0f32; t * d];
            for u in 0..t {
                for c in 0..d {
                    let v = at(u, h, c);
                    let j = u.wrapping_sub(cfg.sinks);
                    let f16err = (v - f16r(v)).abs();
                    b[u * d + c] = match precision {
                        Precision::Quant(q) if u >= cfg.sinks && j < q_end => match q.axis {
                            Axis::PerChannel => {
                                let g0 = cfg.sinks + j - j % q.group;
                                let xs: Vec<f32> = (g0..g0 + q.group).map(|w| f16r(at(w, h, c))).collect();
                                group_bound(&xs, q.width) + f16err
                            }
                            Axis::PerToken => {
                                let g0 = c - c % q.group;
                                let xs: Vec<f32> = (g0..g0 + q.group).map(|w| f16r(at(u, h, w))).collect();
                                group_bound(&xs, q.width) + f16err
                            }
                        },
                        _ => f16err,
                    };
                }
            }
            b
        })
        .collect()
}

/// (b) Against attention over the unquantized keys and values, the error stays within what the quantizer's
/// bounds allow: a key error `e_k` moves score `t` by at most `scale * sum_c |q_c| e_k`; with `D` the
/// largest such move, each probability changes by a factor within `exp(+-2D)`, so the output moves by at
/// most `max_t e_v + (exp(2D) - 1) * max_t |v_t - mid|` per channel, plus float rounding.
#[test]
fn error_against_unquantized_attention_is_within_the_quantizer_bound() {
    let mut rng = Rng::new(5);
    let (kv, d, t) = (2usize, 64usize, if cfg!(miri) { 40 } else { 700 });
    let mut checked = 0;
    for (name, cfg) in policies(32, 64, 4, kv, d, 1024) {
        let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
        let mut cache = Cache::new(cfg, &mut mem).unwrap();
        let k = activations(&mut rng, t, kv, d);
        let v = activations(&mut rng, t, kv, d);
        cache.append(&k, &v).unwrap();
        let kb = stored_bounds(&cfg, Stream::Keys, &k, t);
        let vb = stored_bounds(&cfg, Stream::Values, &v, t);
        let split = |x: &[f32]| -> Vec<Vec<f32>> {
            (0..kv).map(|h| (0..t).flat_map(|u| x[(u * kv + h) * d..][..d].to_vec()).collect()).collect()
        };
        let (ko, vo) = (split(&k), split(&v));
        let qh = 3 * kv;
        let q: Vec<f32> = (0..qh * d).map(|_| rng.unit()).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let want = naive_p(&q, &ko, &vo, qh, d, scale).0;
        let (kd, vd) = (dequantized(&cache, Stream::Keys), dequantized(&cache, Stream::Values));
        let (_, pd) = naive_p(&q, &kd, &vd, qh, d, scale);
        for kernel in kernels() {
            let mut out = vec![0.0f32; qh * d];
            let mut scratch = vec![0.0f32; decode_scratch_len(cfg.capacity, qh, kv, d)];
            decode(&cache, &q, qh, scale, &mut out, &mut scratch, kernel).unwrap();
            let mut worst = 0.0f64;
            for hq in 0..qh {
                let h = hq / 3;
                let tol = rounding_tolerance(&cfg, &q[hq * d..][..d], &kd[h], &vd[h], &pd[hq], scale);
                let dmax = (0..t)
                    .map(|u| (0..d).map(|c| f64::from(q[hq * d + c].abs() * kb[h][u * d + c])).sum::<f64>())
                    .fold(0.0, f64::max)
                    * f64::from(scale);
                for c in 0..d {
                    let col = (0..t).map(|u| vo[h][u * d + c]);
                    let (lo, hi) = col
                        .clone()
                        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
                    let ev = (0..t).map(|u| vb[h][u * d + c]).fold(0.0f32, f32::max);
                    let bound = f64::from(ev) + (2.0 * dmax).exp_m1() * f64::from(hi - lo) / 2.0 + tol[c];
                    let err = (f64::from(out[hq * d + c]) - want[hq * d + c]).abs();
                    assert!(
                        err <= bound,
                        "{name} {}: head {hq} channel {c}: error {err} > bound {bound}",
                        kernel.name()
                    );
                    worst = worst.max(err / bound);
                }
            }
            checked += 1;
            if name == "fp16" {
                assert!(worst < 1.0);
            }
        }
    }
    assert!(checked >= 8);
}

/// Prefill equals running the chunk token by token where both attend in full precision: a chunk over an
/// fp16 cache with full-precision chunk rows matches plain causal attention over [dequantized cache, chunk].
#[test]
fn prefill_is_causal_attention_over_cache_and_chunk() {
    let mut rng = Rng::new(9);
    let (kv, d) = (2usize, 64usize);
    for (name, cfg) in policies(32, 64, 2, kv, d, 1024).into_iter().take(if cfg!(miri) { 2 } else { 8 }) {
        let shapes: &[(usize, usize)] =
            if cfg!(miri) { &[(0, 5), (40, 3)] } else { &[(0, 5), (1, 1), (100, 7), (300, 33)] };
        for &(held, n) in shapes {
            let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
            let mut cache = Cache::new(cfg, &mut mem).unwrap();
            let k0 = activations(&mut rng, held, kv, d);
            let v0 = activations(&mut rng, held, kv, d);
            cache.append(&k0, &v0).unwrap();
            let keys = dequantized(&cache, Stream::Keys);
            let values = dequantized(&cache, Stream::Values);
            let k = activations(&mut rng, n, kv, d);
            let v = activations(&mut rng, n, kv, d);
            for ratio in [1usize, 3] {
                let qh = kv * ratio;
                let q: Vec<f32> = (0..n * qh * d).map(|_| rng.unit()).collect();
                let scale = 0.125;
                for kernel in kernels() {
                    let mut out = vec![0.0f32; n * qh * d];
                    let mut scratch = vec![0.0f32; prefill_scratch_len(cfg.capacity, n, qh, kv, d)];
                    prefill(&cache, &q, &k, &v, qh, scale, &mut out, &mut scratch, kernel).unwrap();
                    for i in 0..n {
                        // position i sees the cache and chunk rows 0..=i
                        let ks: Vec<Vec<f32>> = (0..kv)
                            .map(|h| {
                                let mut x = keys[h].clone();
                                (0..=i).for_each(|j| x.extend_from_slice(&k[(j * kv + h) * d..][..d]));
                                x
                            })
                            .collect();
                        let vs: Vec<Vec<f32>> = (0..kv)
                            .map(|h| {
                                let mut x = values[h].clone();
                                (0..=i).for_each(|j| x.extend_from_slice(&v[(j * kv + h) * d..][..d]));
                                x
                            })
                            .collect();
                        let qi = &q[i * qh * d..][..qh * d];
                        // chunk rows are full precision: check them as an fp16-like (zero-free) stream
                        let what = std::format!("{name} {} held {held} n {n} pos {i}", kernel.name());
                        assert_rounding_close(
                            &what,
                            &cfg,
                            qi,
                            &ks,
                            &vs,
                            qh,
                            scale,
                            &out[i * qh * d..][..qh * d],
                        );
                    }
                }
            }
        }
    }
}

/// A sliding cache keeps attending correctly after wrapping its rings many times.
#[test]
fn decode_after_the_rings_wrap() {
    let mut rng = Rng::new(13);
    let cfg = CacheConfig::kivi(Width::B2, 32, 32, 1, 64, 200).with_sinks(3).with_overflow(Overflow::Slide);
    let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
    let mut cache = Cache::new(cfg, &mut mem).unwrap();
    let steps = if cfg!(miri) { 260 } else { 1500 };
    for step in 0..steps {
        let k = activations(&mut rng, 1, 1, 64);
        let v = activations(&mut rng, 1, 1, 64);
        cache.append(&k, &v).unwrap();
        if step % 97 == 0 || step == steps - 1 {
            let keys = dequantized(&cache, Stream::Keys);
            let values = dequantized(&cache, Stream::Values);
            let q: Vec<f32> = (0..3 * 64).map(|_| rng.unit()).collect();
            for kernel in kernels() {
                let mut out = vec![0.0f32; 3 * 64];
                let mut scratch = vec![0.0f32; decode_scratch_len(200, 3, 1, 64)];
                decode(&cache, &q, 3, 0.125, &mut out, &mut scratch, kernel).unwrap();
                assert_rounding_close(&std::format!("step {step}"), &cfg, &q, &keys, &values, 3, 0.125, &out);
            }
        }
    }
}

/// A full cache with GQA: the scratch sized by `decode_scratch_len(capacity, ..)` holds every head's scores,
/// and one float less is an error, not a panic.
#[test]
fn scratch_sizes_hold_at_full_capacity() {
    let mut rng = Rng::new(21);
    let cap = if cfg!(miri) { 40 } else { 300 };
    for cfg in [CacheConfig::kivi(Width::B2, 32, 32, 2, 64, cap), CacheConfig::fp16(2, 64, cap)] {
        let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
        let mut cache = Cache::new(cfg, &mut mem).unwrap();
        let k = activations(&mut rng, cap, 2, 64);
        cache.append(&k, &k).unwrap();
        let q: Vec<f32> = (0..14 * 64).map(|_| rng.unit()).collect();
        let mut out = vec![0.0f32; 14 * 64];
        for kernel in kernels() {
            let n = decode_scratch_len(cap, 14, 2, 64);
            let mut scratch = vec![0.0f32; n];
            assert!(decode(&cache, &q, 14, 0.125, &mut out, &mut scratch, kernel).is_ok());
            assert!(matches!(
                decode(&cache, &q, 14, 0.125, &mut out, &mut scratch[..n - 1], kernel),
                Err(Error::BufferTooSmall { .. })
            ));
            let n = prefill_scratch_len(cap, 3, 14, 2, 64);
            let mut scratch = vec![0.0f32; n];
            let qc: Vec<f32> = (0..3 * 14 * 64).map(|_| rng.unit()).collect();
            let kc = activations(&mut rng, 3, 2, 64);
            let mut oc = vec![0.0f32; 3 * 14 * 64];
            assert!(prefill(&cache, &qc, &kc, &kc, 14, 0.125, &mut oc, &mut scratch, kernel).is_ok());
            assert!(matches!(
                prefill(&cache, &qc, &kc, &kc, 14, 0.125, &mut oc, &mut scratch[..n - 1], kernel),
                Err(Error::BufferTooSmall { .. })
            ));
        }
    }
}

/// (d) Bad input is an error, never a panic, and writes nothing it should not.
#[test]
fn bad_input() {
    let cfg = CacheConfig::kivi(Width::B2, 32, 32, 2, 64, 256);
    let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
    let mut cache = Cache::new(cfg, &mut mem).unwrap();
    let q = vec![0.1f32; 6 * 64];
    let mut out = vec![0.0f32; 6 * 64];
    let mut scratch = vec![0.0f32; decode_scratch_len(256, 6, 2, 64)];
    let k = Kernel::detect();
    assert_eq!(
        decode(&cache, &q, 6, 0.1, &mut out, &mut scratch, k).err(),
        Some(Error::EmptyInput { what: "cache" })
    );
    cache.append(&[0.5; 128], &[0.5; 128]).unwrap();
    assert!(decode(&cache, &q, 6, 0.1, &mut out, &mut scratch, k).is_ok());
    let mut nan = q.clone();
    nan[70] = f32::NAN;
    assert_eq!(
        decode(&cache, &nan, 6, 0.1, &mut out, &mut scratch, k).err(),
        Some(Error::NonFinite { index: 70 })
    );
    assert_eq!(
        decode(&cache, &q, 6, f32::INFINITY, &mut out, &mut scratch, k).err(),
        Some(Error::NonFinite { index: 0 })
    );
    assert!(matches!(
        decode(&cache, &q[..5 * 64], 5, 0.1, &mut out, &mut scratch, k),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        decode(&cache, &q, 6, 0.1, &mut out[..64], &mut scratch, k),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        decode(&cache, &q, 6, 0.1, &mut out, &mut scratch[..100], k),
        Err(Error::BufferTooSmall { .. })
    ));
    let mut big = vec![0.0f32; prefill_scratch_len(256, 2, 6, 2, 64)];
    let kv = vec![0.5f32; 2 * 128];
    let mut out2 = vec![0.0f32; 2 * 6 * 64];
    let q2 = vec![0.1f32; 2 * 6 * 64];
    assert!(prefill(&cache, &q2, &kv, &kv, 6, 0.1, &mut out2, &mut big, k).is_ok());
    let mut bad = kv.clone();
    bad[3] = f32::NEG_INFINITY;
    assert_eq!(
        prefill(&cache, &q2, &bad, &kv, 6, 0.1, &mut out2, &mut big, k).err(),
        Some(Error::NonFinite { index: 3 })
    );
    assert!(matches!(
        prefill(&cache, &q2, &kv[..128], &kv, 6, 0.1, &mut out2, &mut big, k),
        Err(Error::ShapeMismatch { .. })
    ));
}

/// The AVX2 exponential is within its documented 2^-21 relative error of libm's over softmax's range.
#[cfg(target_arch = "x86_64")]
#[test]
fn vector_exp_matches_libm() {
    let Some(_) = Kernel::avx2() else {
        std::println!("skipped: this CPU has no AVX2/FMA/F16C");
        return;
    };
    let mut x: Vec<f32> =
        (0..if cfg!(miri) { 64 } else { 200_000 }).map(|i| -87.0 + i as f32 * 87.5 / 200_000.0).collect();
    x.extend([0.0, -1e-30, 1e-7, -87.3, 0.5]);
    let mut y = x.clone();
    y.resize(x.len().next_multiple_of(8), 0.0);
    // softmax of a one-hot-free row is exp(x - max) / sum; check exp through a row whose max is 0.
    for chunk in y.chunks_mut(8) {
        // SAFETY: the AVX2 kernel exists, so the CPU has the features.
        #[allow(unsafe_code)]
        let e = unsafe { exp_chunk(chunk) };
        chunk.copy_from_slice(&e);
    }
    for (&a, &b) in x.iter().zip(&y) {
        let want = libm::exp(f64::from(a));
        assert!((f64::from(b) - want).abs() <= want * 2f64.powi(-21), "exp({a}) = {b}, want {want}");
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma,f16c")]
fn exp_chunk(c: &[f32]) -> [f32; 8] {
    use core::arch::x86_64::*;
    let mut a = [0.0f32; 8];
    a.copy_from_slice(&c[..8]);
    // SAFETY: `a` holds 8 f32; unaligned load and store.
    let v = unsafe { _mm256_loadu_ps(a.as_ptr()) };
    let e = avx2::exp8(v);
    // SAFETY: as above.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), e) };
    a
}

/// Head ranges: decoding and prefilling head groups separately, each into its own output, gives exactly
/// the rows the whole call gives (threads may split a layer by heads); bad ranges are errors.
#[test]
fn head_ranges_compose() {
    let mut rng = Rng::new(29);
    let (kv, ratio, d) = (3, 3, 64);
    let qh = kv * ratio;
    let cfg = CacheConfig::kivi(Width::B2, 32, 64, kv, d, 300).with_sinks(2);
    let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
    let mut cache = Cache::new(cfg, &mut mem).unwrap();
    let n0 = if cfg!(miri) { 70 } else { 150 };
    cache.append(&activations(&mut rng, n0, kv, d), &activations(&mut rng, n0, kv, d)).unwrap();
    let q: Vec<f32> = (0..qh * d).map(|_| rng.unit()).collect();
    for kernel in kernels() {
        let mut whole = vec![0.0f32; qh * d];
        let mut scratch = vec![0.0f32; decode_scratch_len(300, qh, kv, d)];
        decode(&cache, &q, qh, 0.125, &mut whole, &mut scratch, kernel).unwrap();
        let mut parts = vec![0.0f32; qh * d];
        for heads in [0..2, 2..3] {
            let mut out = vec![f32::NAN; qh * d];
            decode_heads(&cache, heads.clone(), &q, qh, 0.125, &mut out, &mut scratch, kernel).unwrap();
            let rows = heads.start * ratio * d..heads.end * ratio * d;
            parts[rows.clone()].copy_from_slice(&out[rows]);
        }
        assert_eq!(parts, whole, "decode by head ranges");
        // Prefill of a chunk of 5 positions.
        let n = 5;
        let qc: Vec<f32> = (0..n * qh * d).map(|_| rng.unit()).collect();
        let (kc, vc) = (activations(&mut rng, n, kv, d), activations(&mut rng, n, kv, d));
        let mut ps = vec![0.0f32; prefill_scratch_len(300, n, qh, kv, d)];
        let mut whole = vec![0.0f32; n * qh * d];
        prefill(&cache, &qc, &kc, &vc, qh, 0.125, &mut whole, &mut ps, kernel).unwrap();
        let mut parts = vec![0.0f32; n * qh * d];
        for heads in [0..1, 1..3] {
            let mut out = vec![f32::NAN; n * qh * d];
            prefill_heads(&cache, heads.clone(), &qc, &kc, &vc, qh, 0.125, &mut out, &mut ps, kernel)
                .unwrap();
            for i in 0..n {
                let rows = (i * qh + heads.start * ratio) * d..(i * qh + heads.end * ratio) * d;
                parts[rows.clone()].copy_from_slice(&out[rows]);
            }
        }
        assert_eq!(parts, whole, "prefill by head ranges");
        for bad in [0..0, 2..4, 3..3] {
            let e = decode_heads(&cache, bad, &q, qh, 0.125, &mut whole[..qh * d], &mut scratch, kernel);
            assert!(matches!(e, Err(Error::ShapeMismatch { .. })));
        }
    }
}
