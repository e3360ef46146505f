extern crate std;
use super::*;
use crate::cache::{CacheConfig, Overflow, QuantSpec};
use crate::quant::param::ParamFormat::Fp8E4M3;
use crate::testutil::{Rng, activations, f16r, group_bound};
use std::vec;
use std::vec::Vec;

const U: f64 = f32::EPSILON as f64 / 2.0; // unit roundoff of f32

/// `n u / (1 - n u)`: the relative error bound of an `n`-term f32 sum or dot product.
fn gamma(n: usize) -> f64 {
    n as f64 * U / (1.0 - n as f64 * U)
}

/// The portable kernels and every vector set this CPU runs (AVX2; AVX-512 where present, else a line says
/// why it is skipped, once per test binary).
fn kernels() -> Vec<Kernel> {
    let mut k = vec![Kernel::PORTABLE];
    k.extend(Kernel::avx2());
    match Kernel::avx512() {
        Some(x) => k.push(x),
        None => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                std::println!("AVX-512 kernels skipped: this CPU lacks one of AVX-512 F, BW, VL, VNNI, VBMI")
            });
        }
    }
    k
}

/// The vector kernels' outputs (AVX2's first) are the same bits: the AVX-512 kernels sum what the AVX2
/// ones sum, in the same order.
fn same_bits(outs: &[Vec<f32>], what: &str) {
    for o in outs.iter().skip(1) {
        for (c, (a, b)) in outs[0].iter().zip(o).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "{what} out {c}: {a} vs {b}");
        }
    }
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
/// with every kernel; the AVX-512 kernels give the AVX2 kernels' bits. (T = 0 is an error, checked in
/// `bad_input`.)
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
                            let mut vector_outs = std::vec::Vec::new();
                            for kernel in kernels() {
                                let mut out = vec![0.0f32; qh * d];
                                let mut scratch = vec![0.0f32; decode_scratch_len(cfg.capacity, qh, 2, d)];
                                let mut probs =
                                    decode(&cache, &q, qh, scale, &mut out, &mut scratch, kernel).unwrap();
                                if kernel != Kernel::PORTABLE {
                                    vector_outs.push(out.clone());
                                }
                                assert_eq!(probs.tokens(), t);
                                for h in 0..qh {
                                    let row = probs.head(h).to_vec();
                                    let sum: f32 = row.iter().sum();
                                    assert!((sum - 1.0).abs() < 1e-4, "{name}: probabilities sum to {sum}");
                                    // Divided once: asking again hands back the same row.
                                    assert_eq!(probs.head(h), &row[..], "{name}: head {h} divided twice");
                                }
                                assert!(probs.head(qh).is_empty());
                                let what = std::format!(
                                    "{name} {} d {d} G {g} R {r} S {s} T {t} ratio {ratio}",
                                    kernel.name()
                                );
                                assert_rounding_close(&what, &cfg, &q, &keys, &values, qh, scale, &out);
                                cases += 1;
                            }
                            same_bits(&vector_outs, &std::format!("{name} d {d} T {t} ratio {ratio}"));
                        }
                    }
                }
            }
        }
    }
    assert!(cases > if big { 1000 } else { 10 }, "{cases}");
}

/// Key blocks smaller than 256 tokens (a ring too small to round up to whole 256-token blocks): attention
/// still equals attention over the dequantized cache with every kernel, across block boundaries, for
/// blocks of 32, 64, 128 and 256 tokens, and with the ring wrapped (sliding).
#[test]
fn small_key_blocks_read_like_large_ones() {
    let mut rng = Rng::new(7);
    let d = 64;
    let mut seen = [false; 4];
    let caps: &[usize] = if cfg!(miri) { &[160] } else { &[160, 288, 384, 1024] };
    for &cap in caps {
        for width in [Width::B2, Width::B4] {
            for slide in [false, true] {
                let mut cfg = CacheConfig::kivi(width, 32, 32, 2, d, cap);
                if slide {
                    cfg = cfg.with_overflow(Overflow::Slide);
                }
                let l = cfg.layout().unwrap();
                seen[l.keys.block.trailing_zeros() as usize - 5] = true;
                let ts: &[usize] = if slide { &[cap + 3 * 32 + 5] } else { &[cap / 2 + 7, cap] };
                for &t in ts {
                    let mut mem = vec![0u32; l.total_words];
                    let mut cache = Cache::new(cfg, &mut mem).unwrap();
                    for _ in 0..t {
                        cache
                            .append(&activations(&mut rng, 1, 2, d), &activations(&mut rng, 1, 2, d))
                            .unwrap();
                    }
                    let keys = dequantized(&cache, Stream::Keys);
                    let values = dequantized(&cache, Stream::Values);
                    let qh = 6;
                    let q: Vec<f32> = (0..qh * d).map(|_| rng.unit() * 2.0).collect();
                    let scale = 1.0 / (d as f32).sqrt();
                    for kernel in kernels() {
                        let mut out = vec![0.0f32; qh * d];
                        let mut scratch = vec![0.0f32; decode_scratch_len(cfg.capacity, qh, 2, d)];
                        decode(&cache, &q, qh, scale, &mut out, &mut scratch, kernel).unwrap();
                        let what = std::format!(
                            "{width:?} cap {cap} block {} slide {slide} T {t} {}",
                            l.keys.block,
                            kernel.name()
                        );
                        assert_rounding_close(&what, &cfg, &q, &keys, &values, qh, scale, &out);
                    }
                }
            }
        }
    }
    assert!(cfg!(miri) || seen == [true; 4], "block sizes covered: {seen:?}");
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

/// The AVX2 key kernel's FP8 decoding without a table gives the table's bits for every byte (NaN included).
#[test]
#[cfg(target_arch = "x86_64")]
fn fp8_bytes_decode_without_a_table_as_with_it() {
    let Some(_) = Kernel::avx2() else {
        std::println!("skipped: this CPU has no AVX2/FMA/F16C");
        return;
    };
    let table = crate::quant::param::fp8_e4m3_table();
    for b0 in (0..256).step_by(8) {
        let bytes: [u8; 8] = core::array::from_fn(|i| (b0 + i) as u8);
        // SAFETY: the AVX2 kernel exists, so the CPU has the features.
        #[allow(unsafe_code)]
        let got = unsafe { fp8_chunk(&bytes) };
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.to_bits(), table[b0 + i].to_bits(), "byte {:#04x}", b0 + i);
        }
    }
    // As f16 bits, every byte, with a tail of 5 through the table.
    let all: Vec<u8> = (0..=255u8).chain(250..=254).collect();
    let mut f16 = vec![0u16; all.len()];
    // SAFETY: as above.
    #[allow(unsafe_code)]
    unsafe {
        avx2::fp8_to_f16(&all, &mut f16)
    };
    for (&b, &h) in all.iter().zip(&f16) {
        assert_eq!(h, crate::quant::param::FP8_E4M3_F16[usize::from(b)], "byte {b:#04x}");
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma,f16c")]
fn fp8_chunk(bytes: &[u8; 8]) -> [f32; 8] {
    use core::arch::x86_64::*;
    let mut a = [0.0f32; 8];
    // SAFETY: `bytes` holds 8 bytes and `a` 8 f32; unaligned load and store.
    unsafe { _mm256_storeu_ps(a.as_mut_ptr(), avx2::fp8_ps(_mm_loadl_epi64(bytes.as_ptr().cast()))) };
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

/// The int8 path's AVX2 and AVX-512 kernels give the same bits as their portable twins: key scores and
/// value sums (from the same probabilities) over 2-bit, ternary and 4-bit bodies and 3-bit values (beside
/// 2-bit keys; 2- and 3-bit values also with FP8 parameters, as `kvq2` and `kvq3` store them, and 2- and
/// 4-bit keys with FP8 parameters, as `mikv2` stores them), G 32 and 64, R, S, head_dim 64,
/// 128 and 256, GQA 1, 3, 4, 5 and 7 (the AVX-512 keys go by blocks of 4 queries, sharing each tile's
/// unpacking above 4 up to head_dim 128), token counts that leave partial value tiles, rings that have
/// wrapped, and key blocks of 64 to 256 tokens (rings of 300, 600 and 1,056 slots).
#[test]
fn int8_kernels_equal_their_portable_twin_bit_for_bit() {
    let Some(avx2) = Kernel::avx2() else {
        std::println!("skipped: this CPU has no AVX2 (the portable twin is the only int8 path)");
        return;
    };
    let mut fast = vec![avx2];
    match Kernel::avx512() {
        Some(k) => fast.push(k),
        None => std::println!("AVX-512 kernels skipped: this CPU lacks one of AVX-512 F, BW, VL, VNNI, VBMI"),
    }
    let mut rng = Rng::new(7);
    let mut cases = 0;
    for d in [64usize, 128, 256] {
        // (value width, G, R, S, FP8 value parameters, FP8 key parameters)
        for (width, g, r, s, fp8, kp8) in [
            (Width::B2, 32, 32, 0, false, false),
            (Width::B2, 32, 128, 3, false, false),
            (Width::B2, 64, 64, 1, false, false),
            (Width::B2, 64, 64, 1, true, false),
            (Width::B2, 32, 32, 2, true, true),
            (Width::Ternary, 32, 32, 2, false, false),
            (Width::B4, 32, 32, 0, false, false),
            (Width::B4, 64, 128, 3, false, true),
            (Width::B3, 32, 32, 2, false, false),
            (Width::B3, 64, 64, 1, true, false),
        ] {
            for (t, cap, slide) in [
                (1usize, 600, false),
                (r + 1, 600, false),
                (5 * g + 3, 600, false),
                (8 * g + 17, 600, false),
                (700, 300, true),
                (600, 1056, false),
            ] {
                // 3-bit keys stay off the int8 path: 3-bit values go beside 2-bit keys.
                let kw = if width == Width::B3 { Width::B2 } else { width };
                let mut cfg = CacheConfig::kivi(kw, g, r, 2, d, cap).with_sinks(s);
                if slide {
                    cfg = cfg.with_overflow(Overflow::Slide);
                }
                cfg.values = Precision::Quant(QuantSpec::per_token(width, g));
                if fp8 {
                    cfg.values = Precision::Quant(QuantSpec::per_token(width, g).with_params(Fp8E4M3));
                }
                if kp8 {
                    cfg.keys = Precision::Quant(QuantSpec::per_channel(kw, g).with_params(Fp8E4M3));
                }
                let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
                let mut cache = Cache::new(cfg, &mut mem).unwrap();
                for _ in 0..t.div_ceil(100) {
                    let n = 100.min(t - cache.counts().n.min(t)).max(1);
                    let k = activations(&mut rng, n, 2, d);
                    let v = activations(&mut rng, n, 2, d);
                    cache.append(&k, &v).unwrap();
                }
                let held = cache.held();
                // Only the quantized body takes the int8 path: compare its scores, and weight only its tokens.
                let c = cache.counts();
                let body = |sv: &StreamView<'_>| c.sinks..c.sinks + (sv.q_end.max(c.base) - c.base);
                let (kb, vb) = (body(&cache.view(Stream::Keys)), body(&cache.view(Stream::Values)));
                for ratio in [1usize, 3, 4, 5, 7] {
                    let nq = ratio;
                    let q: Vec<f32> = (0..nq * d).map(|_| rng.unit() * 0.3).collect();
                    let qv = Queries { q: &q, nq, d };
                    let p: Vec<f32> = (0..nq * held)
                        .map(|i| {
                            if vb.contains(&(i % held)) {
                                rng.unit().abs() * rng.unit().abs() / 16.0
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let mut got = Vec::new();
                    let kernels = core::iter::once(Kernel::PORTABLE).chain(fast.iter().copied());
                    for kernel in kernels.map(|k| k.with_int8(true)) {
                        let mut buf = vec![0.0f32; work_len(nq, d) + generic_work(&cfg, nq)];
                        let (work, mut gw) = GenericWork::split(&cfg, nq, &mut buf);
                        let mut scores = vec![0.0f32; nq * held];
                        for h in 0..2 {
                            key_scores(
                                &cache,
                                &cache.view(Stream::Keys),
                                h,
                                &qv,
                                &mut scores,
                                held,
                                work,
                                &mut gw,
                                kernel,
                            );
                        }
                        let mut out = vec![0.5f32; nq * d];
                        let pr = Probs { data: &p, stride: held, pos: 0 };
                        value_sums(
                            &cache,
                            &cache.view(Stream::Values),
                            1,
                            &pr,
                            nq,
                            &mut out,
                            work,
                            &mut gw,
                            kernel,
                        );
                        got.push((scores, out));
                    }
                    for (k, kernel) in fast.iter().enumerate() {
                        let what = std::format!(
                            "{} {width:?} d {d} G {g} R {r} S {s} T {t} ratio {ratio}",
                            kernel.name()
                        );
                        let (a, b) = (&got[0], &got[k + 1]);
                        for (i, (a, b)) in
                            a.0.iter().zip(&b.0).enumerate().filter(|(i, _)| kb.contains(&(i % held)))
                        {
                            assert_eq!(a.to_bits(), b.to_bits(), "{what}: score {i}: {a} vs {b}");
                        }
                        for (i, (a, b)) in a.1.iter().zip(&b.1).enumerate() {
                            assert_eq!(a.to_bits(), b.to_bits(), "{what}: value sum {i}: {a} vs {b}");
                        }
                    }
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 3 * 10 * 6 * 5);
}

/// The AVX2 int8 kernels' 16-bit sums at their largest: every key code 3 against a query rounded to
/// `q8_key_max` in every channel (`d * 3 * qmax`, 32,640 at `head_dim` 128), and value codes 3 in every even
/// channel of every token against weights all at [`Q8_VALUE_MAX`] (AVX2 widens a tile's sums after each 32
/// of its 64 token pairs, `32 * 2 * 3 * 127` = 24,384; the whole tile, 48,768, would wrap). A wider
/// rounding or a longer span would wrap the sums, and the twins would part. The AVX-512 kernels (dword
/// sums, where the CPU has them) must give the same bits. At 4 bits (codes 15 against queries and weights
/// of 127) AVX2 widens its 16-bit sums every 8 pairs (`8 * 2 * 15 * 127`, 30,480): widening every 16
/// would wrap them. 3-bit values (codes 7, beside 2-bit keys) widen every 16 pairs (`16 * 2 * 7 * 127`,
/// 28,448): every 32 would wrap.
#[test]
fn int8_sums_at_their_largest_stay_exact() {
    let Some(fast) = Kernel::avx2() else {
        std::println!("skipped: this CPU has no AVX2 (the portable twin is the only int8 path)");
        return;
    };
    let cases = [(Width::B2, 64usize), (Width::B2, 128), (Width::B4, 64), (Width::B4, 128), (Width::B3, 64)];
    for (width, d) in cases {
        let kw = if width == Width::B3 { Width::B2 } else { width };
        let mut cfg = CacheConfig::kivi(kw, 32, 32, 1, d, 1024);
        cfg.values = Precision::Quant(QuantSpec::per_token(width, 32));
        let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
        let mut cache = Cache::new(cfg, &mut mem).unwrap();
        // Keys: every channel 1 at even tokens, -1 at odd (codes 3 and 0, one scale for all channels).
        // Values: 1 in even channels, 0 in odd, at every token (codes 3 and 0, one scale for all tokens).
        let v: Vec<f32> = (0..d).map(|c| if c % 2 == 0 { 1.0 } else { 0.0 }).collect();
        for t in 0..4 * Q8_TILE + 40 {
            let k = vec![if t % 2 == 0 { 1.0 } else { -1.0 }; d];
            cache.append(&k, &v).unwrap();
        }
        let held = cache.held();
        let c = cache.counts();
        let body = |sv: &StreamView<'_>| c.sinks..c.sinks + (sv.q_end.max(c.base) - c.base);
        let (kb, vb) = (body(&cache.view(Stream::Keys)), body(&cache.view(Stream::Values)));
        assert!(vb.len() >= 4 * Q8_TILE, "the body holds whole value tiles");
        let nq = 3;
        let q = vec![0.25f32; nq * d];
        let qv = Queries { q: &q, nq, d };
        let p: Vec<f32> =
            (0..nq * held).map(|i| if vb.contains(&(i % held)) { 1.0 / held as f32 } else { 0.0 }).collect();
        let mut got = Vec::new();
        let kernels = [Kernel::PORTABLE, fast].into_iter().chain(Kernel::avx512());
        for kernel in kernels.map(|k| k.with_int8(true)) {
            let mut buf = vec![0.0f32; work_len(nq, d) + generic_work(&cfg, nq)];
            let (work, mut gw) = GenericWork::split(&cfg, nq, &mut buf);
            let mut scores = vec![0.0f32; nq * held];
            key_scores(&cache, &cache.view(Stream::Keys), 0, &qv, &mut scores, held, work, &mut gw, kernel);
            let mut out = vec![0.0f32; nq * d];
            let pr = Probs { data: &p, stride: held, pos: 0 };
            value_sums(&cache, &cache.view(Stream::Values), 0, &pr, nq, &mut out, work, &mut gw, kernel);
            got.push((scores, out));
        }
        for other in &got[1..] {
            for (i, (a, b)) in
                got[0].0.iter().zip(&other.0).enumerate().filter(|(i, _)| kb.contains(&(i % held)))
            {
                assert_eq!(a.to_bits(), b.to_bits(), "{width:?} d {d}: score {i}: {a} vs {b}");
            }
            for (i, (a, b)) in got[0].1.iter().zip(&other.1).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{width:?} d {d}: value sum {i}: {a} vs {b}");
            }
        }
        // The even channels' sums are the body's weight, the odd ones' nothing (to the f16 rounding of
        // the scales and zero points and the weights' own rounding, both well under 1%).
        let w = vb.len() as f32 / held as f32;
        for (i, &o) in got[0].1.iter().enumerate() {
            let want = if i % 2 == 0 { w } else { 0.0 };
            assert!((o - want).abs() <= 0.01 * w, "{width:?} d {d}: output {i}: {o} vs {want}");
        }
    }
}

/// The int8 path (its portable twin; the AVX2 kernels equal it bit for bit, above) computes what its
/// definition says, rebuilt here from the cache's codes, scales and zero points: per key group,
/// `score = delta * sum_c rint(q_c s_c / delta) code_c + sum_c q_c z_c` with `delta = max |q_c s_c| / qmax`;
/// per value tile of [`Q8_TILE`] tokens from the start of each body run,
/// `out_c += delta * sum_t rint(p_t s_t / delta) code_tc` with `delta = max p_t s_t / Q8_VALUE_MAX`, plus
/// `sum_t p_t z_t`. Integer parts are exact, so the only tolerance is the f32 rounding of the float sums.
#[test]
fn int8_path_follows_its_definition() {
    use crate::cache::layout::KEY_BLOCK;
    use crate::pack;
    let f = |b: u16| half::f16::from_bits(b).to_f32();
    let mut rng = Rng::new(11);
    let kernel = Kernel::PORTABLE.with_int8(true);
    let mut checked = 0usize;
    for (width, g, r, d, t, cap, slide) in [
        (Width::B2, 32, 32, 64, 300, 600, false),
        (Width::B2, 64, 128, 128, 517, 600, false),
        (Width::Ternary, 32, 64, 64, 260, 600, false),
        (Width::B1, 32, 32, 64, 200, 600, false),
        (Width::B2, 32, 32, 64, 640, 250, true),
        (Width::B4, 32, 64, 64, 300, 600, false),
        (Width::B3, 32, 32, 64, 300, 600, false),
    ]
    .into_iter()
    .take(if cfg!(miri) { 1 } else { 7 })
    {
        // 3-bit values go beside 2-bit keys (3-bit keys stay off the int8 path).
        let vw = width;
        let width = if vw == Width::B3 { Width::B2 } else { vw };
        let mut cfg = CacheConfig::kivi(width, g, r, 1, d, cap).with_sinks(2);
        cfg.values = Precision::Quant(QuantSpec::per_token(vw, g));
        if slide {
            cfg = cfg.with_overflow(Overflow::Slide);
        }
        let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
        let mut cache = Cache::new(cfg, &mut mem).unwrap();
        for _ in 0..t {
            cache.append(&activations(&mut rng, 1, 1, d), &activations(&mut rng, 1, 1, d)).unwrap();
        }
        let held = cache.held();
        let nq = 3;
        let q: Vec<f32> = (0..nq * d).map(|_| rng.unit() * 0.4).collect();
        let p: Vec<f32> = (0..nq * held).map(|_| rng.unit().abs().powi(3)).collect();
        let mut buf = vec![0.0f32; work_len(nq, d) + generic_work(&cfg, nq)];
        let (work, mut gw) = GenericWork::split(&cfg, nq, &mut buf);
        let mut scores = vec![0.0f32; nq * held];
        let (ks, vs) = (cache.view(Stream::Keys), cache.view(Stream::Values));
        key_scores(&cache, &ks, 0, &Queries { q: &q, nq, d }, &mut scores, held, work, &mut gw, kernel);
        let mut out = vec![0.0f32; nq * d];
        value_sums(
            &cache,
            &vs,
            0,
            &Probs { data: &p, stride: held, pos: 0 },
            nq,
            &mut out,
            work,
            &mut gw,
            kernel,
        );
        let qmax = q8_key_max(d, width);
        let mut codes = vec![0u8; KEY_BLOCK];
        // Keys: every body token's score.
        for seg in segments(&cache, &ks).filter(|s| s.part == Part::Body) {
            for i in 0..seg.len {
                let slot = seg.start + i;
                let gi = slot / g;
                for qi in 0..nq {
                    let qr = &q[qi * d..][..d];
                    let qs: Vec<f32> = (0..d).map(|c| qr[c] * f(ks.scale[gi * d + c])).collect();
                    let m = qs.iter().fold(0.0f32, |a, x| a.max(x.abs()));
                    let (inv, delta) = (qmax / m, m / qmax);
                    let (mut int, mut bias, mut mag) = (0i64, 0f64, 0f64);
                    for c in 0..d {
                        let row = &ks.codes[ks.layout.key_row(slot, c, d)..];
                        pack::unpack_bits(row, width, ks.layout.key_col(slot), &mut codes[..1]);
                        let qc = (qs[c] * inv).round_ties_even();
                        assert!(qc.abs() <= qmax);
                        int += qc as i64 * i64::from(codes[0]);
                        let z = f64::from(qr[c]) * f64::from(f(ks.zero[gi * d + c]));
                        bias += z;
                        mag += z.abs();
                    }
                    let want = f64::from(delta) * int as f64 + bias;
                    let got = f64::from(scores[qi * held + seg.pos + i]);
                    let tol = gamma(d + 3) * (f64::from(delta) * (int as f64).abs() + mag);
                    assert!(
                        (got - want).abs() <= tol,
                        "{width:?} G {g} d {d}: score {}: {got} vs {want}",
                        seg.pos + i
                    );
                    checked += 1;
                }
            }
        }
        // Values: the body's sum; sinks and window add exact f32 terms, checked with the same tolerance.
        let dq = dequantized(&cache, Stream::Values);
        let mut want = vec![0f64; nq * d];
        let mut mag = vec![0f64; nq * d];
        let groups = d / g;
        let ring = vs.layout.ring;
        for seg in segments(&cache, &vs) {
            if seg.part != Part::Body {
                for i in 0..seg.len {
                    for qi in 0..nq {
                        let pt = f64::from(p[qi * held + seg.pos + i]);
                        for c in 0..d {
                            let x = pt * f64::from(dq[0][(seg.pos + i) * d + c]);
                            want[qi * d + c] += x;
                            mag[qi * d + c] += x.abs();
                        }
                    }
                }
                continue;
            }
            for t0 in (0..seg.len).step_by(Q8_TILE) {
                let len = (seg.len - t0).min(Q8_TILE);
                for qi in 0..nq {
                    for gi in 0..groups {
                        let ps: Vec<f32> = (0..len)
                            .map(|i| {
                                p[qi * held + seg.pos + t0 + i] * f(vs.scale[gi * ring + seg.start + t0 + i])
                            })
                            .collect();
                        let m = ps.iter().fold(0.0f32, |a, &x| a.max(x));
                        let vmax = Q8_VALUE_MAX;
                        let (inv, delta) = (vmax / m, m / vmax);
                        for c in gi * g..(gi + 1) * g {
                            let mut int = 0i64;
                            for (i, &x) in ps.iter().enumerate() {
                                let slot = seg.start + t0 + i;
                                pack::unpack_bits(
                                    &vs.codes[slot * vs.layout.row_words..],
                                    vw,
                                    c,
                                    &mut codes[..1],
                                );
                                int += (x * inv).round_ties_even() as i64 * i64::from(codes[0]);
                                let z = f64::from(p[qi * held + seg.pos + t0 + i])
                                    * f64::from(f(vs.zero[gi * ring + slot]));
                                want[qi * d + c] += z;
                                mag[qi * d + c] += z.abs();
                            }
                            let x = f64::from(delta) * int as f64;
                            want[qi * d + c] += x;
                            mag[qi * d + c] += x.abs();
                        }
                    }
                }
            }
        }
        for (i, (&o, &w)) in out.iter().zip(&want).enumerate() {
            let tol = gamma(held + 4) * 2.0 * mag[i] + 1e-30;
            assert!(
                (f64::from(o) - w).abs() <= tol,
                "{vw:?} G {g} d {d}: value {i}: {o} vs {w} (tol {tol:e})"
            );
        }
    }
    assert!(checked > if cfg!(miri) { 300 } else { 3000 }, "{checked}");
}

/// The int8 path stays within the bound its definition gives, against plain attention over the same
/// dequantized cache. A key group's rounded query moves a score by at most `delta_g / 2` per unit of code,
/// so by `E = max_g delta_g * cmax * d / 2` (`cmax` the largest stored code, 3 or 15); that scales each
/// probability by a factor within `exp(+-2E)`. A value tile's rounded weights move output `c` by at most
/// `delta_tile / 2 * sum_t code_tc <= delta_tile * cmax * len / 2`, `delta_tile = max_t p_t s_t /
/// Q8_VALUE_MAX`, with the kernel's `p` at most `exp(2E)` times the exact one. Float rounding adds
/// [`rounding_tolerance`].
#[test]
fn int8_attention_is_within_its_bound() {
    let mut rng = Rng::new(5);
    let mut kernels: Vec<Kernel> = vec![Kernel::PORTABLE.with_int8(true)];
    kernels.extend(Kernel::avx2().map(|k| k.with_int8(true)));
    kernels.extend(Kernel::avx512().map(|k| k.with_int8(true)));
    let mut worst = 0.0f64;
    // Those marked true: FP8 value parameters (as `kvq2` and `kvq3` store them), which every kernel decodes
    // to f16 a tile at a time and reads on the int8 path (the portable twin on x86-64; elsewhere the
    // generic f32 path), inside the same bound. 4-bit codes: the same bound with the largest code 15 for 3;
    // 3-bit values (beside 2-bit keys) with 7.
    let cases = [
        (Width::B2, 64usize, 32, 32, 0, 200usize, false),
        (Width::B2, 64, 32, 128, 4, 517, false),
        (Width::B2, 128, 64, 64, 2, 300, false),
        (Width::B2, 64, 64, 64, 4, 599, true),
        (Width::B2, 128, 32, 32, 0, 333, true),
        (Width::B4, 64, 32, 32, 0, 300, false),
        (Width::B4, 128, 32, 128, 2, 517, false),
        (Width::B3, 64, 32, 32, 2, 517, false),
        (Width::B3, 128, 64, 64, 0, 300, true),
    ];
    // The last two again as MiKV stores keys: FP8 parameters and 4-bit tiers (attention observed, so that
    // tokens are promoted), the tiers' corrections exact f32 terms beside the rounded body.
    let mikv = [(Width::B2, 64usize, 32, 32, 4, 517usize, true), (Width::B4, 64, 32, 64, 0, 300, false)];
    let all = cases.into_iter().map(|c| (c, false)).chain(mikv.into_iter().map(|c| (c, true)));
    for ((vw, d, g, r, s, t, fp8), kp8) in all.take(if cfg!(miri) { 1 } else { 11 }) {
        let width = if vw == Width::B3 { Width::B2 } else { vw };
        let mut cfg = CacheConfig::kivi(width, g, r, 1, d, 600).with_sinks(s);
        cfg.values = Precision::Quant(QuantSpec::per_token(vw, g));
        if fp8 {
            cfg.values = Precision::Quant(QuantSpec::per_token(vw, g).with_params(Fp8E4M3));
        }
        if kp8 {
            cfg.keys = Precision::Quant(QuantSpec::per_channel(width, g).with_params(Fp8E4M3));
            cfg = cfg.with_tiers(crate::cache::config::Tiers { keep: 2, width: Width::B4 });
        }
        let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
        let mut cache = Cache::new(cfg, &mut mem).unwrap();
        let (k, v) = (activations(&mut rng, t, 1, d), activations(&mut rng, t, 1, d));
        if kp8 {
            crate::cache::tests::append_observed(&mut cache, &k, &v, &mut rng);
            assert!((0..t).any(|j| cache.is_promoted(0, j)), "no token promoted");
        } else {
            cache.append(&k, &v).unwrap();
        }
        let (keys, values) = (dequantized(&cache, Stream::Keys), dequantized(&cache, Stream::Values));
        let (ks, vs) = (cache.view(Stream::Keys), cache.view(Stream::Values));
        let (kparams, vparams) = (cfg.key_spec().unwrap().params, cfg.value_spec().unwrap().params);
        let qh = 3;
        let scale = 1.0 / (d as f32).sqrt();
        let q: Vec<f32> = (0..qh * d).map(|_| rng.unit() * 2.0).collect();
        let (want, probs) = naive_p(&q, &keys, &values, qh, d, scale);
        let qmax = f64::from(q8_key_max(d, width));
        let (cmax, vmax) = (f64::from(width.max_code()), f64::from(vw.max_code()));
        for kernel in &kernels {
            let mut out = vec![0.0f32; qh * d];
            let mut scratch = vec![0.0f32; cfg.decode_scratch_len(qh)];
            decode(&cache, &q, qh, scale, &mut out, &mut scratch, *kernel).unwrap();
            for hq in 0..qh {
                let qr = &q[hq * d..][..d];
                let mut e = 0.0f64;
                for seg in segments(&cache, &ks).filter(|x| x.part == Part::Body) {
                    for gi in seg.start / g..(seg.start + seg.len) / g {
                        let m = (0..d)
                            .map(|c| {
                                let s = ks.params(kparams, gi * d + c).scale;
                                (f64::from(qr[c] * scale) * f64::from(s)).abs()
                            })
                            .fold(0.0, f64::max);
                        e = e.max(m / qmax * (1.0 + 1e-6) * cmax * d as f64 / 2.0);
                    }
                }
                let grow = (2.0 * e).exp();
                let tol = rounding_tolerance(&cfg, qr, &keys[0], &values[0], &probs[hq], scale);
                let mut tiles = vec![0.0f64; d];
                for seg in segments(&cache, &vs).filter(|x| x.part == Part::Body) {
                    for t0 in (0..seg.len).step_by(Q8_TILE) {
                        let len = (seg.len - t0).min(Q8_TILE);
                        for gi in 0..d / g {
                            let m = (0..len)
                                .map(|i| {
                                    probs[hq][seg.pos + t0 + i]
                                        * grow
                                        * f64::from(
                                            vs.params(vparams, gi * vs.layout.ring + seg.start + t0 + i)
                                                .scale,
                                        )
                                })
                                .fold(0.0, f64::max);
                            for x in &mut tiles[gi * g..(gi + 1) * g] {
                                *x += m / f64::from(Q8_VALUE_MAX) * (1.0 + 1e-6) * vmax * len as f64 / 2.0;
                            }
                        }
                    }
                }
                for c in 0..d {
                    let pv: f64 = (0..probs[hq].len())
                        .map(|u| probs[hq][u] * f64::from(values[0][u * d + c].abs()))
                        .sum();
                    let bound = tol[c] + (grow - 1.0) * pv + tiles[c] * grow;
                    let err = (f64::from(out[hq * d + c]) - want[hq * d + c]).abs();
                    assert!(
                        err <= bound,
                        "{} {vw:?} d {d} G {g} T {t}: head {hq} channel {c}: {err} > {bound}",
                        kernel.name()
                    );
                    worst = worst.max(err / bound);
                }
            }
        }
    }
    std::println!("int8 attention: worst error / bound = {worst:.3}");
    assert!(worst > 0.0);
}

/// The rounding-only tolerance for the generic formats, where keys and values pass through a transform
/// (Hadamard: `L = log2 d + 1` roundings per element; RoPE, balance and centring: a few more) and the value
/// sums run in the stored basis.
///
/// Scores. The transforms are orthonormal, the balance scales by at most `bmax` and the centre adds `|mu|`,
/// so the stored-basis query has 2-norm at most `Q = bmax |q|` and key row `t` at most
/// `K_t = bmax (|k_t| + |mu|)`; `K` is the largest `K_t`. A zero point, scaled code or tier correction of a
/// group is at most `2.2 K` (FP8 rounds a parameter by 1/16 at most). The kernel's score of token `t` is
/// off from the exact `q . k_t` over the reference keys by at most the sum of:
/// - the dot product and the centring, outlier and tier terms, `gamma(d + 2L + 10) Q K_t`;
/// - the dequantization, two roundings of `z + s level` per stored element plus the tier correction's:
///   `2u sum_c |q'_c| (|k'_tc| + 3 * 2.2 K) <= 2u Q (K_t + 6.6 sqrt(d) K)`;
/// - the query's transform, `gamma(L + 5) Q` per element, against `|k'_t|_1 <= sqrt(d) K_t`;
/// - the reference keys, turned back by `dequantize` through the same transforms in f32: each element
///   within `gamma(L + 5) K_t`, against `|q|_1 <= sqrt(d) Q`.
///
/// So a score is off by at most `E = scale Q K (gamma(d + 2L + 10) + 2u (1 + 6.6 sqrt(d)) + 2 sqrt(d)
/// gamma(L + 5))`, and an output element by at most `(exp(2E + 8u + 2 gamma(t + 1)) - 1) sum_t p_t |v_tc|`
/// (the probabilities' error) plus `gamma(t + 2L + 8) sum_t p_t V_t` (the sums: a rotated value row's
/// stored elements are each at most its norm and mix into every output channel with weights 1/sqrt(d), so
/// `V_t = 3 sqrt(d) |v_t|`; an unrotated one's are at most three times its largest element).
///
/// Before 2026-12-06 the score term bounded `sum_c |q'_c| |k'_tc|` by `d` times the largest elements
/// (`3 d Q K`), some 50 times looser; [`generic_tolerance_notices_a_key_code_one_level_off`] shows this one
/// sees a single code one level off.
fn generic_tolerance(
    cache: &Cache<'_>,
    h: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    p: &[f64],
    scale: f32,
) -> Vec<f64> {
    let cfg = cache.config();
    let d = q.len();
    let t = k.len() / d;
    let tables = cache.view(Stream::Keys).tables;
    let bmax = if cfg.transform.balance_keys {
        tables.balance[h * d..][..d].iter().fold(1.0f32, |a, &b| a.max(b).max(1.0 / b))
    } else {
        1.0
    };
    let mu = if cfg.transform.center_keys { norm(&tables.center[h * d..][..d]) } else { 0.0 };
    let l = d.trailing_zeros() as usize + 1;
    let qn = f64::from(bmax) * f64::from(norm(q));
    let kn = (0..t)
        .map(|u| f64::from(bmax) * (f64::from(norm(&k[u * d..][..d])) + f64::from(mu)))
        .fold(0.0, f64::max);
    let sd = (d as f64).sqrt();
    let e = f64::from(scale)
        * qn
        * kn
        * (gamma(d + 2 * l + 10) + 2.0 * U * (1.0 + 6.6 * sd) + 2.0 * sd * gamma(l + 5));
    let rel = (2.0 * e + 8.0 * U + 2.0 * gamma(t + 1)).exp_m1();
    let vmag = |u: usize| {
        let row = &v[u * d..][..d];
        if cfg.transform.rotate_values {
            3.0 * f64::from(norm(row)) * (d as f64).sqrt()
        } else {
            3.0 * f64::from(row.iter().fold(0.0f32, |a, x| a.max(x.abs())))
        }
    };
    let sums: f64 = (0..t).map(|u| p[u] * vmag(u)).sum::<f64>() * gamma(t + 2 * l + 8);
    (0..d)
        .map(|c| {
            rel * (0..t).map(|u| p[u] * f64::from(v[u * d + c].abs())).sum::<f64>() + sums + f64::MIN_POSITIVE
        })
        .collect()
}

/// [`generic_tolerance`] notices a key code one level off: for every generic format with quantized
/// per-channel keys, moving one code of the most attended quantized token (in the channel where it shows
/// most) by one level puts decode's output outside the tolerance of the unmoved cache's exact attention.
#[test]
fn generic_tolerance_notices_a_key_code_one_level_off() {
    one_level_off(Stream::Keys, 78);
}

/// The same for values: one code of the most attended quantized value row moved by one level, channel by
/// channel, moves the output beyond [`generic_tolerance`] (its bound is not so loose that a wrong value
/// code passes), for every generic format with per-token values.
#[test]
fn generic_tolerance_notices_a_value_code_one_level_off() {
    one_level_off(Stream::Values, 79);
}

/// The body of the two tests above: for every generic format whose `stream` is quantized (keys per
/// channel, values per token), one code of the most attended quantized row of that stream is moved by one
/// level, channel by channel, and decode's output must leave [`generic_tolerance`].
fn one_level_off(stream: Stream, seed: u64) {
    let mut rng = Rng::new(seed);
    let (d, t, ratio) = (64usize, 97usize, 3usize);
    let mut checked = 0;
    for (name, cfg) in crate::cache::tests::generic_configs(2, d, 1024) {
        let (p, axis) = match stream {
            Stream::Keys => (cfg.keys, crate::cache::Axis::PerChannel),
            Stream::Values => (cfg.values, crate::cache::Axis::PerToken),
        };
        let Precision::Quant(q) = p else { continue };
        if q.axis != axis || cfg.residual == 0 {
            continue;
        }
        let mut mem = Vec::new();
        let mut cache = observed_cache(cfg, &mut mem, t, &mut rng);
        let (keys, values) = (dequantized(&cache, Stream::Keys), dequantized(&cache, Stream::Values));
        let qh = 2 * ratio;
        let q: Vec<f32> = (0..qh * d).map(|_| rng.unit() * 2.0).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let (want, probs) = naive_p(&q, &keys, &values, qh, d, scale);
        let tol = generic_tolerance(&cache, 0, &q[..d], &keys[0], &values[0], &probs[0], scale);
        // Held rows: the sinks, then body slots 0.. (nothing slid); the quantized ones end at `q_end`.
        let (sinks, q_end) = (cache.counts().sinks, cache.view(stream).q_end);
        let Some(slot) = (0..q_end).max_by(|&a, &b| probs[0][sinks + a].total_cmp(&probs[0][sinks + b]))
        else {
            continue;
        };
        let shift = |cache: &mut Cache<'_>, c: usize, delta: i32| match stream {
            Stream::Keys => cache.shift_key_code(0, slot, c, delta),
            Stream::Values => cache.shift_value_code(0, slot, c, delta),
        };
        for kernel in kernels() {
            let mut worst = 0.0f64;
            for c in 0..d {
                let delta = if shift(&mut cache, c, 1) { 1 } else { -1 };
                if delta < 0 {
                    assert!(shift(&mut cache, c, -1));
                }
                let mut out = vec![0.0f32; qh * d];
                let mut scratch = vec![0.0f32; cfg.decode_scratch_len(qh)];
                decode(&cache, &q, qh, scale, &mut out, &mut scratch, kernel).unwrap();
                assert!(shift(&mut cache, c, -delta));
                for (i, &tl) in tol.iter().enumerate() {
                    worst = worst.max((f64::from(out[i]) - want[i]).abs() / tl);
                }
            }
            std::println!(
                "{name} {}: a {stream:?} code one level off (token p = {:.3}) is {worst:.1} times the tolerance",
                kernel.name(),
                probs[0][sinks + slot]
            );
            assert!(
                worst > 1.0,
                "{name} {}: one level off stays within the tolerance ({worst:.3})",
                kernel.name()
            );
            checked += 1;
        }
    }
    assert!(checked >= 8, "{checked} formats checked");
}

/// A cache of format `cfg` (two KV heads) over `mem`, with calibration-like tables, holding `t` tokens of
/// activations appended as the model would (attention observed for the tiers).
fn observed_cache<'m>(cfg: CacheConfig, mem: &'m mut Vec<u32>, t: usize, rng: &mut Rng) -> Cache<'m> {
    *mem = vec![0u32; cfg.layout().unwrap().total_words];
    let mut cache = Cache::new(cfg, mem).unwrap();
    crate::cache::tests::fill_tables(&mut cache, rng);
    let k = activations(rng, t, 2, cfg.head_dim);
    let v = activations(rng, t, 2, cfg.head_dim);
    crate::cache::tests::append_observed(&mut cache, &k, &v, rng);
    cache
}

fn norm(x: &[f32]) -> f32 {
    x.iter().map(|a| a * a).sum::<f32>().sqrt() * (1.0 + 1e-6)
}

/// Decode and prefill over every generic format (RoPE at read, rotations, centring, balance, codebooks,
/// FP8 parameters, outliers, permuted variable groups, ternary values) equal exact attention over
/// [`Cache::dequantize`] within [`generic_tolerance`], with calibration-like tables, at lengths around
/// the group and window sizes, GQA 1, 3 and 7, head_dim 64 and 128, with every kernel; in decode the
/// AVX-512 kernels give the AVX2 kernels' bits.
#[test]
fn generic_formats_attend_as_their_dequantized_cache() {
    let mut rng = Rng::new(77);
    let big = !cfg!(miri);
    let mut cases = 0;
    for &d in if big { &[64usize, 128][..] } else { &[64][..] } {
        let configs = crate::cache::tests::generic_configs(2, d, 1024);
        let picked: Vec<_> = if big { configs } else { configs.into_iter().step_by(3).collect() };
        for (name, cfg) in picked {
            let ts: &[usize] = if big { &[1, 31, 32, 33, 97, 300] } else { &[40] };
            for &t in ts {
                let mut mem = Vec::new();
                let cache = observed_cache(cfg, &mut mem, t, &mut rng);
                let keys = dequantized(&cache, Stream::Keys);
                let values = dequantized(&cache, Stream::Values);
                for ratio in [1usize, 3, 7] {
                    if !big && ratio != 3 {
                        continue;
                    }
                    let qh = 2 * ratio;
                    let q: Vec<f32> = (0..qh * d).map(|_| rng.unit() * 2.0).collect();
                    let scale = 1.0 / (d as f32).sqrt();
                    let (want, probs) = naive_p(&q, &keys, &values, qh, d, scale);
                    let mut vector_outs = std::vec::Vec::new();
                    for kernel in kernels() {
                        let mut out = vec![0.0f32; qh * d];
                        let mut scratch = vec![0.0f32; cfg.decode_scratch_len(qh)];
                        decode(&cache, &q, qh, scale, &mut out, &mut scratch, kernel).unwrap();
                        if kernel != Kernel::PORTABLE {
                            vector_outs.push(out.clone());
                        }
                        for hq in 0..qh {
                            let h = hq / ratio;
                            let qr = &q[hq * d..][..d];
                            let tol =
                                generic_tolerance(&cache, h, qr, &keys[h], &values[h], &probs[hq], scale);
                            for c in 0..d {
                                let (o, w) = (f64::from(out[hq * d + c]), want[hq * d + c]);
                                assert!(
                                    (o - w).abs() <= tol[c],
                                    "{name} {} d {d} T {t} ratio {ratio} head {hq} ch {c}: {o} vs {w} (tol {:e})",
                                    kernel.name(),
                                    tol[c]
                                );
                            }
                        }
                        cases += 1;
                    }
                    same_bits(&vector_outs, &std::format!("{name} d {d} T {t} ratio {ratio}"));
                }
                // Prefill of a chunk over the same cache: position i sees the cache and chunk rows 0..=i.
                if t % 3 != 0 && big {
                    continue;
                }
                // 6 tokens of 3 queries per KV head reach the per-channel keys' dequantizing prefill path
                // (`generic::DEQUANT_QUERIES`), 5 stay on the offset queries: the long cache (with promoted
                // tokens where there are tiers) takes the former.
                let n = 5 + usize::from(t >= 100);
                let kc = activations(&mut rng, n, 2, d);
                let vc = activations(&mut rng, n, 2, d);
                let qh = 6;
                let q: Vec<f32> = (0..n * qh * d).map(|_| rng.unit()).collect();
                for kernel in kernels() {
                    let mut out = vec![0.0f32; n * qh * d];
                    let mut scratch = vec![0.0f32; cfg.prefill_scratch_len(n, qh)];
                    prefill(&cache, &q, &kc, &vc, qh, 0.125, &mut out, &mut scratch, kernel).unwrap();
                    for i in 0..n {
                        let with = |base: &[Vec<f32>], x: &[f32]| -> Vec<Vec<f32>> {
                            (0..2)
                                .map(|h| {
                                    let mut r = base[h].clone();
                                    (0..=i).for_each(|j| r.extend_from_slice(&x[(j * 2 + h) * d..][..d]));
                                    r
                                })
                                .collect()
                        };
                        let (ks, vs) = (with(&keys, &kc), with(&values, &vc));
                        let qi = &q[i * qh * d..][..qh * d];
                        let (want, probs) = naive_p(qi, &ks, &vs, qh, d, 0.125);
                        for hq in 0..qh {
                            let h = hq / 3;
                            let tol = generic_tolerance(
                                &cache,
                                h,
                                &qi[hq * d..][..d],
                                &ks[h],
                                &vs[h],
                                &probs[hq],
                                0.125,
                            );
                            for c in 0..d {
                                let (o, w) = (f64::from(out[(i * qh + hq) * d + c]), want[hq * d + c]);
                                assert!(
                                    (o - w).abs() <= tol[c],
                                    "prefill {name} {} d {d} T {t} pos {i} head {hq} ch {c}: {o} vs {w} (tol {:e})",
                                    kernel.name(),
                                    tol[c]
                                );
                            }
                        }
                    }
                    cases += 1;
                }
            }
        }
    }
    assert!(cases > if big { 300 } else { 3 }, "{cases}");
}

/// The AVX2 and AVX-512 offset queries (RoPE and Hadamard stages in registers) equal the portable loops bit
/// for bit, over both pairings, with and without each transform, every head size the kernels take (their
/// sweeps of one to four later stages, none at 8 channels) and key groups of one to eight runs. A
/// butterfly's operands swapped, a stage skipped or a wrong sine sign fails it.
#[test]
fn vector_offset_queries_equal_the_portable_loops_bit_for_bit() {
    use crate::cache::Transform;
    use crate::transform::{Pairing, Rope};
    // (vector, avx512) of `generic::offset_queries` for each kernel set this CPU has.
    let mut sets = std::vec::Vec::new();
    match Kernel::avx2() {
        Some(_) => sets.push((true, false)),
        None => std::println!("AVX2 kernel skipped: this CPU lacks one of AVX2, FMA, F16C"),
    }
    match Kernel::avx512() {
        Some(_) => sets.push((true, true)),
        None => std::println!("AVX-512 kernel skipped: this CPU lacks one of AVX-512 F, BW, VL, VNNI, VBMI"),
    }
    if sets.is_empty() {
        return;
    }
    let mut rng = Rng::new(5);
    let mut cases = 0;
    for d in [8usize, 16, 32, 64, 128, 256] {
        for g in [16usize, 32, 64, 128] {
            for (rope, rotate) in [
                (Some(Pairing::Adjacent), true),
                (Some(Pairing::Halves), true),
                (Some(Pairing::Halves), false),
                (None, true),
            ] {
                let t = Transform {
                    rope: rope.map(|pairing| Rope { base: 10_000.0, pairing }),
                    rotate_keys: rotate,
                    ..Transform::NONE
                };
                // Value groups fill whole words: 8 channels of 2 bits do not.
                let vw = if d < 16 { Width::B4 } else { Width::B2 };
                let cfg = CacheConfig {
                    values: Precision::Quant(QuantSpec::per_token(vw, d.min(32))),
                    ..CacheConfig::kivi(Width::B2, g, g, 1, d, 512)
                }
                .with_transform(t);
                let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
                let cache = Cache::new(cfg, &mut mem).unwrap();
                for nq in [1usize, 3, 5] {
                    let q: Vec<f32> = (0..nq * d).map(|_| rng.unit() * 3.0).collect();
                    let queries = Queries { q: &q, nq, d };
                    let run = |(vector, avx512)| {
                        let (mut oq, mut bias) = (vec![f32::NAN; nq * d * g], vec![f32::NAN; nq * g]);
                        generic::offset_queries(&cache, 0, g, &queries, &mut oq, &mut bias, vector, avx512);
                        (oq, bias)
                    };
                    let (want, _) = run((false, false));
                    for &set in &sets {
                        // The AVX-512 kernel takes head dimensions of a multiple of 16 only.
                        if set.1 && d % 16 != 0 {
                            continue;
                        }
                        let (oq, bias) = run(set);
                        let what = std::format!("{set:?} d {d} g {g} rope {rope:?} rotate {rotate} nq {nq}");
                        for (i, (a, b)) in want.iter().zip(&oq).enumerate() {
                            assert_eq!(a.to_bits(), b.to_bits(), "{what} oq {i}: {a} vs {b}");
                        }
                        assert!(bias.iter().all(|&b| b == 0.0), "{what}: bias");
                        cases += 1;
                    }
                }
            }
        }
    }
    let per_set = |avx512: bool| if avx512 { 5 * 4 * 4 * 3 } else { 6 * 4 * 4 * 3 };
    assert_eq!(cases, sets.iter().map(|&(_, avx512)| per_set(avx512)).sum::<usize>());
}

/// The AVX-512 FP8-to-f16 conversion gives the exact table's bits for every byte, over runs of every
/// length from 0 to 100 (whole vectors and tails) at every offset of a 64-byte buffer.
#[test]
fn fp8_parameters_convert_as_the_table() {
    let Some(k) = Kernel::avx512() else {
        std::println!("skipped: this CPU lacks one of AVX-512 F, BW, VL, VNNI, VBMI");
        return;
    };
    let t = &crate::quant::param::FP8_E4M3_F16;
    let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    for len in 0..=100usize {
        for off in [0usize, 1, 7, 33, 200] {
            let src = &all[off..][..len.min(all.len() - off)];
            let mut dst = vec![0xdeadu16; src.len()];
            fp8_f16(src, &mut dst, k);
            for (i, (&x, &y)) in src.iter().zip(&dst).enumerate() {
                assert_eq!(y, t[usize::from(x)], "len {len} off {off}: byte {i} = {x:#x}");
            }
        }
    }
}

/// [`Q8Levels`] puts each codebook level within half a step of `base + step * byte`, bytes in
/// `0..=Q8_LEVEL_MAX` with the lowest level at 0 and the highest at the top; one level, equal levels and
/// ternary tables work; a non-finite level or span gives `None`.
#[test]
fn codebook_levels_become_integers_within_half_a_step() {
    let mut rng = Rng::new(41);
    let mut tables: Vec<Vec<f32>> = vec![vec![0.25], vec![-1.0, -1.0, -1.0, -1.0], vec![-0.9, 0.1, 1.0]];
    for n in [2usize, 3, 4, 8, 16] {
        for _ in 0..50 {
            let mut t: Vec<f32> = (0..n).map(|_| rng.unit() * 3.0 + 0.5).collect();
            t.sort_by(f32::total_cmp);
            tables.push(t);
        }
    }
    for dec in &tables {
        let lv = Q8Levels::of(dec).unwrap();
        let (lo, hi) = (
            dec.iter().copied().fold(f32::INFINITY, f32::min),
            dec.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        );
        assert_eq!(lv.base, lo);
        for (k, &x) in dec.iter().enumerate() {
            let b = lv.bytes[k];
            assert!(f32::from(b) <= Q8_LEVEL_MAX);
            let err = (f64::from(lv.base) + f64::from(lv.step) * f64::from(b) - f64::from(x)).abs();
            assert!(err <= f64::from(lv.step) * (0.5 + 1e-5), "{dec:?}: level {k}: {err} > step/2");
        }
        assert!(lv.bytes[dec.len()..].iter().all(|&b| b == lv.bytes[dec.len() - 1]));
        if hi > lo {
            assert_eq!(f32::from(lv.bytes[dec.iter().position(|&x| x == hi).unwrap()]), Q8_LEVEL_MAX);
        }
    }
    for bad in [&[0.0, f32::NAN][..], &[f32::NEG_INFINITY, 1.0], &[-3e38, 3e38], &[]] {
        assert_eq!(Q8Levels::of(bad), None, "{bad:?}");
    }
    // Shifted zero points: software and F16C round alike, over a partial 8 too; one past f16's range is
    // reported (its tile then takes the generic path).
    let h = |x: f32| half::f16::from_f32(x).to_bits();
    let scale: Vec<u16> = (0..13).map(|i| h(0.01 + 0.37 * i as f32)).collect();
    let zero: Vec<u16> = (0..13).map(|i| h(-2.0 + 0.29 * i as f32)).collect();
    let mut runs = vec![(false, zero.clone())];
    runs.extend(Kernel::avx2().map(|_| (true, zero.clone())));
    for (f16c, z) in &mut runs {
        assert!(shift_zeros(&scale, z, -0.731, *f16c));
    }
    for (i, &z) in runs[0].1.iter().enumerate() {
        let f = |b: u16| half::f16::from_bits(b).to_f32();
        assert_eq!(z, h(libm::fmaf(f(scale[i]), -0.731, f(zero[i]))), "{i}");
        assert!(runs.iter().all(|r| r.1[i] == z), "{i}: F16C and software differ");
    }
    for (f16c, _) in runs {
        let mut z = vec![h(1.0); 9];
        assert!(!shift_zeros(&[h(60000.0); 9], &mut z, 2.0, f16c), "an infinite zero point passes");
    }
}

/// Codebook values on the int8 path (`kvquantN`'s: per-token codebooks, outliers, F16 or FP8 parameters):
/// the AVX-512 kernels give the portable twin's bits (where the CPU has them), and the twin stays within
/// the bound its definition gives of exact sums over the dequantized cache. For output channel `c`, per
/// value tile of [`Q8_TILE`] tokens and channel group, the weight `p_t s_t` is rounded to `P_t delta`
/// (`delta = max_t p_t s_t / Q8_VALUE_MAX`), off by at most `min(delta / 2, p_t s_t)` (a weight below
/// half a step rounds to 0), and meets the level byte `B_tc` read as `step * B_tc`; the level itself is
/// off by at most `s_t step / 2` ([`Q8Levels`]); the shifted zero point `f16(fma(s_t, base, z_t))` by at
/// most `2^-11 + 2^-23` of its size; float sums add `gamma(t + 16)` of twice the terms' magnitudes. So
/// `|out_c - sum_t p_t v_tc| <= sum_t (min(delta / 2, p_t s_t) step B_tc + p_t s_t step / 2 +
/// p_t (|z_t| + s_t |base|) (2^-11 + 2^-23) 1.001) + rounding`. With one token holding half the weight
/// and the rest tiny, a code of that token moved by one level leaves the bound. Only body tokens are
/// weighed (the sinks and window are f16 rows that each kernel sums in its own order).
#[test]
fn codebook_int8_values_equal_their_twin_and_stay_within_their_bound() {
    let fast = Kernel::avx512().map(|k| k.with_int8(true));
    if fast.is_none() {
        std::println!("AVX-512 twin check skipped: this CPU lacks one of AVX-512 F, BW, VL, VNNI, VBMI");
    }
    let portable = Kernel::PORTABLE.with_int8(true);
    let mut rng = Rng::new(43);
    let (mut cases, mut worst, mut moved, mut least) = (0, 0.0f64, 0, f64::INFINITY);
    // (value width, G, outliers per token, FP8 parameters, head_dim, tokens, capacity, sliding)
    let all = [
        (Width::B2, 32, 2, false, 64, 300, 1024, false),
        (Width::B2, 32, 0, false, 64, 1, 1024, false),
        (Width::B2, 64, 2, true, 128, 517, 1024, false),
        (Width::B3, 32, 3, false, 64, 97, 1024, false),
        (Width::B4, 32, 2, false, 128, 300, 1024, false),
        (Width::Ternary, 32, 1, true, 64, 260, 1024, false),
        (Width::B2, 32, 2, false, 64, 700, 400, true),
    ];
    for (w, g, o, fp8, d, t, cap, slide) in all.into_iter().take(if cfg!(miri) { 1 } else { 7 }) {
        let mut cfg = CacheConfig::kivi(Width::B2, 32, 32, 2, d, cap).with_sinks(2);
        if slide {
            cfg = cfg.with_overflow(Overflow::Slide);
        }
        let mut spec = QuantSpec::per_token(w, g).with_codebook().with_outliers(o);
        if fp8 {
            spec = spec.with_params(Fp8E4M3);
        }
        cfg.values = Precision::Quant(spec);
        let mut mem = Vec::new();
        let mut cache = observed_cache(cfg, &mut mem, t, &mut rng);
        let held = cache.held();
        let dq = dequantized(&cache, Stream::Values);
        for (nq, heavy) in [(1usize, false), (3, false), (5, false), (7, false), (3, true)] {
            let body: Vec<Segment> =
                segments(&cache, &cache.view(Stream::Values)).filter(|s| s.part == Part::Body).collect();
            let Some(first) = body.first().copied() else { continue };
            // Weights: random, or half on one body token and the rest tiny.
            let in_body = |u: usize| body.iter().any(|s| (s.pos..s.pos + s.len).contains(&u));
            let p: Vec<f32> = (0..nq * held)
                .map(|i| {
                    let u = rng.unit().abs();
                    match heavy {
                        // Sinks and window are summed in f32 by other kernels: only the body is weighed.
                        _ if !in_body(i % held) => 0.0,
                        false => u * u / 8.0,
                        true if i % held == first.pos + first.len / 2 => 0.5,
                        true => u * 1e-4,
                    }
                })
                .collect();
            let pr = Probs { data: &p, stride: held, pos: 0 };
            let run = |cache: &Cache<'_>, h: usize, kernel: Kernel| {
                let mut buf = vec![0.0f32; work_len(nq, d) + generic_work(&cfg, nq)];
                let (work, mut gw) = GenericWork::split(&cfg, nq, &mut buf);
                let mut out = vec![0.0f32; nq * d];
                value_sums(cache, &cache.view(Stream::Values), h, &pr, nq, &mut out, work, &mut gw, kernel);
                out
            };
            for (h, dq) in dq.iter().enumerate() {
                let got = run(&cache, h, portable);
                if let Some(k) = fast {
                    for (i, (a, b)) in got.iter().zip(&run(&cache, h, k)).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "{w:?} G {g} d {d} T {t} nq {nq} h {h}: {i}");
                    }
                }
                let vs = cache.view(Stream::Values);
                let lv = Q8Levels::of(vs.coder(spec, h).levels.unwrap().1).unwrap();
                let (step, base) = (f64::from(lv.step), f64::from(lv.base));
                let mut codes = [0u8; 1];
                let mut bound = vec![0.0f64; nq * d];
                let mut want = vec![0.0f64; nq * d];
                let mut mag = vec![0.0f64; nq * d];
                for qi in 0..nq {
                    for u in 0..held {
                        let pu = f64::from(p[qi * held + u]);
                        for c in 0..d {
                            want[qi * d + c] += pu * f64::from(dq[u * d + c]);
                            mag[qi * d + c] += 2.0 * pu * f64::from(dq[u * d + c].abs());
                        }
                    }
                    for seg in &body {
                        for t0 in (0..seg.len).step_by(Q8_TILE) {
                            let len = (seg.len - t0).min(Q8_TILE);
                            for gi in 0..d / g {
                                let at = |i: usize| {
                                    (h * vs.layout.row_groups + gi) * vs.layout.ring + seg.start + t0 + i
                                };
                                let pp = |i: usize| p[qi * held + seg.pos + t0 + i];
                                let ps: Vec<f32> =
                                    (0..len).map(|i| pp(i) * vs.params(spec.params, at(i)).scale).collect();
                                let delta =
                                    f64::from(ps.iter().fold(0.0f32, |a, &x| a.max(x)) / Q8_VALUE_MAX)
                                        * (1.0 + 1e-6);
                                for (i, &x) in ps.iter().enumerate() {
                                    let gp = vs.params(spec.params, at(i));
                                    let (s, z, pt) =
                                        (f64::from(gp.scale), f64::from(gp.zero), f64::from(pp(i)));
                                    let slot = seg.start + t0 + i;
                                    for c in gi * g..(gi + 1) * g {
                                        let row =
                                            &vs.codes[(h * vs.layout.ring + slot) * vs.layout.row_words..];
                                        crate::pack::unpack_bits(row, w, c, &mut codes);
                                        let b = f64::from(lv.bytes[usize::from(codes[0])]);
                                        let e = (delta / 2.0).min(f64::from(x) * (1.0 + 1e-6)) * step * b
                                            + pt * s * step / 2.0 * (1.0 + 1e-5)
                                            + pt * (z.abs() + s * base.abs())
                                                * (2f64.powi(-11) + 2f64.powi(-23))
                                                * 1.001;
                                        bound[qi * d + c] += e;
                                        mag[qi * d + c] += 2.0
                                            * pt
                                            * (s * (base.abs() + step * b) + 2.0 * z.abs() + s * base.abs());
                                    }
                                }
                            }
                        }
                    }
                }
                let tol: Vec<f64> =
                    bound.iter().zip(&mag).map(|(b, m)| b + gamma(held + 16) * m + 1e-30).collect();
                if !heavy {
                    for (i, (&o, &x)) in got.iter().zip(&want).enumerate() {
                        let err = (f64::from(o) - x).abs();
                        assert!(
                            err <= tol[i],
                            "{w:?} G {g} d {d} T {t} nq {nq} h {h}: out {i}: {o} vs {x} (tol {:e})",
                            tol[i]
                        );
                        worst = worst.max(err / tol[i]);
                    }
                    cases += 1;
                    continue;
                }
                // The heavy token's code one level off, channel by channel, must leave the bound.
                let slot = first.start + first.len / 2;
                let mut far = 0.0f64;
                for c in 0..d {
                    let delta = if cache.shift_value_code(h, slot, c, 1) { 1 } else { -1 };
                    if delta < 0 {
                        assert!(cache.shift_value_code(h, slot, c, -1));
                    }
                    let off = run(&cache, h, portable);
                    assert!(cache.shift_value_code(h, slot, c, -delta));
                    far = far.max(
                        (0..nq)
                            .map(|qi| (f64::from(off[qi * d + c]) - want[qi * d + c]).abs() / tol[qi * d + c])
                            .fold(0.0, f64::max),
                    );
                }
                assert!(
                    far > 1.0,
                    "{w:?} G {g} d {d} T {t} h {h}: one level off stays within the bound ({far:.3})"
                );
                least = least.min(far);
                moved += 1;
            }
        }
    }
    std::println!("codebook int8 values: worst error / bound = {worst:.3}");
    std::println!("codebook int8 values: one level off is at least {least:.1} times the bound");
    assert!(worst > 0.0);
    assert!(
        cases >= if cfg!(miri) { 4 } else { 48 } && moved >= if cfg!(miri) { 1 } else { 12 },
        "{cases} {moved}"
    );
}

/// SKVQ's bodies on the int8 path: per-token keys of 2-bit (and ternary) codes and per-token values, both
/// in a calibrated permutation's groups of any sizes (bounds off the 4-channel quads, an empty group),
/// with F16 or FP8 parameters, key outliers, fixed groups too, head_dim 64 to 256, GQA 1 to 7 (two passes
/// of 4 queries), lengths that leave partial 16-token key blocks and value tiles, a wrapped ring.
///
/// Twins: the AVX-512 keys, and the AVX2 and AVX-512 values, equal the portable twin bit for bit (AVX2
/// keys keep the f32 path), and the keys' scores are their definition, rebuilt here from the codes and
/// the query rounded here (to float rounding; without outliers). Bounds, from the definitions: a key
/// group's query elements are rounded on the step `delta_g = max_{c in g} |q_c| / 127`, so a score moves
/// by at most
/// `sum_g s_g delta_g / 2 * sum_{c in g} code_c`; a value tile's weights `p_t s_t` (its own group's `s`)
/// by at most `min(delta / 2, p_t s_t)` per unit of code, `delta = max_t p_t s_t / Q8_VALUE_MAX`; float
/// sums add `gamma(d + 16)` (scores) and `gamma(t + 16)` (sums) of twice the terms' magnitudes. A key
/// code one level off (queries with one channel far above the rest), and a value code one level off in
/// a token holding half the weight, leave the bounds.
#[test]
fn grouped_int8_keys_and_values_equal_their_twins_and_stay_within_their_bounds() {
    let portable = Kernel::PORTABLE.with_int8(true);
    if Kernel::avx512().is_none() {
        std::println!("AVX-512 twin checks skipped: this CPU lacks one of AVX-512 F, BW, VL, VNNI, VBMI");
    }
    if Kernel::avx2().is_none() {
        std::println!("AVX2 twin checks skipped: this CPU lacks one of AVX2, FMA, F16C");
    }
    // Keys and values, every int8 kernel set against the portable twin.
    let twins: Vec<Kernel> =
        Kernel::avx2().into_iter().chain(Kernel::avx512()).map(|k| k.with_int8(true)).collect();
    let mut rng = Rng::new(47);
    let (mut worst_k, mut worst_v, mut least_k, mut least_v) = (0f64, 0f64, f64::INFINITY, f64::INFINITY);
    let mut cases = 0;
    // (key width, value width, G, FP8, permuted, key outliers, head_dim, tokens, capacity, sliding)
    let all = [
        (Width::B2, Width::Ternary, 32, true, true, 0, 64, 300, 1024, false),
        (Width::B2, Width::B2, 16, false, true, 0, 64, 97, 1024, false),
        (Width::Ternary, Width::B4, 32, true, true, 0, 128, 517, 1024, false),
        (Width::B2, Width::B2, 32, false, false, 2, 64, 200, 1024, false),
        (Width::B2, Width::Ternary, 64, true, true, 0, 256, 130, 1024, false),
        (Width::B2, Width::Ternary, 32, true, true, 0, 64, 700, 400, true),
    ];
    for (kw, vw, g, fp8, permuted, ko, d, t, cap, slide) in
        all.into_iter().take(if cfg!(miri) { 1 } else { 6 })
    {
        let fmt = if fp8 { Fp8E4M3 } else { crate::quant::param::ParamFormat::F16 };
        let spec = |w| QuantSpec { permuted, ..QuantSpec::per_token(w, g) }.with_params(fmt);
        let mut cfg = CacheConfig::kivi(Width::B2, 32, 32, 2, d, cap).with_sinks(2);
        if slide {
            cfg = cfg.with_overflow(Overflow::Slide);
        }
        cfg.keys = Precision::Quant(spec(kw).with_outliers(ko));
        cfg.values = Precision::Quant(spec(vw));
        let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
        let mut cache = Cache::new(cfg, &mut mem).unwrap();
        crate::testing::fill_tables(&mut cache, &mut rng);
        let groups = d / g;
        if permuted {
            // Bounds off the quads, and an empty group where there are four or more.
            let mut bounds: Vec<u16> = (0..=groups).map(|j| (j * d / groups) as u16).collect();
            bounds[1] = (d / groups / 2 - 3) as u16;
            if groups >= 4 {
                bounds[2] = bounds[1];
                bounds[3] += 1;
            }
            for h in 0..2 {
                let mut perm: Vec<u16> = (0..d as u16).collect();
                for i in (1..d).rev() {
                    perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
                for s in [Stream::Keys, Stream::Values] {
                    cache.set_permutation(s, h, &perm, &bounds).unwrap();
                }
            }
        }
        let (k, v) = (activations(&mut rng, t, 2, d), activations(&mut rng, t, 2, d));
        cache.append(&k, &v).unwrap();
        let held = cache.held();
        let (keys, values) = (dequantized(&cache, Stream::Keys), dequantized(&cache, Stream::Values));
        let body_of = |cache: &Cache<'_>, s| -> Vec<Segment> {
            segments(cache, &cache.view(s)).filter(|x| x.part == Part::Body).collect()
        };
        let (kbody, vbody) = (body_of(&cache, Stream::Keys), body_of(&cache, Stream::Values));
        let in_body = |b: &[Segment], u: usize| b.iter().any(|s| (s.pos..s.pos + s.len).contains(&u));
        let what = std::format!("{kw:?}/{vw:?} G {g} FP8 {fp8} perm {permuted} d {d} T {t}");
        for (nq, spike) in [(1usize, false), (3, false), (5, false), (7, false), (3, true)] {
            // A spike: one channel of each query far above the rest, so that one code of it one level off
            // shows beyond the bound summed over every group.
            let q: Vec<f32> = (0..nq * d)
                .map(|i| {
                    if !spike {
                        rng.unit() * 0.4
                    } else if i % d == 7 {
                        1.0
                    } else {
                        rng.unit() * 0.01
                    }
                })
                .collect();
            let qv = Queries { q: &q, nq, d };
            let run_keys = |cache: &Cache<'_>, h: usize, kernel: Kernel| {
                let mut buf = vec![0.0f32; work_len(nq, d) + generic_work(&cfg, nq)];
                let (work, mut gw) = GenericWork::split(&cfg, nq, &mut buf);
                let mut scores = vec![0.0f32; nq * held];
                key_scores(
                    cache,
                    &cache.view(Stream::Keys),
                    h,
                    &qv,
                    &mut scores,
                    held,
                    work,
                    &mut gw,
                    kernel,
                );
                scores
            };
            for (h, keys) in keys.iter().enumerate() {
                let got = run_keys(&cache, h, portable);
                for &k in &twins {
                    let other = run_keys(&cache, h, k);
                    for i in (0..nq * held).filter(|i| in_body(&kbody, i % held)) {
                        let at = std::format!("{what} nq {nq} h {h} {}: score {i}", k.name());
                        assert_eq!(got[i].to_bits(), other[i].to_bits(), "{at}");
                    }
                }
                // The bound, per body token and query.
                let ks = cache.view(Stream::Keys);
                let (perm, bounds) = ks.tables.order(h, d, groups);
                let lo = |j: usize| if bounds.is_empty() { j * g } else { usize::from(bounds[j]) };
                let stored = |c: usize| if perm.is_empty() { c } else { usize::from(perm[c]) };
                let mut codes = [0u8; 1];
                let mut tol = vec![0f64; nq * held];
                let mut want = vec![0f64; nq * held];
                for seg in &kbody {
                    for i in 0..seg.len {
                        let (slot, u) = (seg.start + i, seg.pos + i);
                        for m in 0..nq {
                            let qr = &q[m * d..][..d];
                            let (mut e, mut mag) = (0f64, 0f64);
                            for c in 0..d {
                                let x = f64::from(qr[c]) * f64::from(keys[u * d + c]);
                                want[m * held + u] += x;
                                mag += x.abs();
                            }
                            // The definition, from the codes and a rounding of the query done here.
                            let (mut def, mut dmag) = (0f64, 0f64);
                            for j in 0..groups {
                                let gp =
                                    ks.params(fmt, (h * ks.layout.row_groups + j) * ks.layout.ring + slot);
                                let top =
                                    (lo(j)..lo(j + 1)).map(|c| qr[stored(c)].abs()).fold(0f32, f32::max);
                                let (mut sum, mut int, mut qsum) = (0f64, 0f64, 0f64);
                                for c in lo(j)..lo(j + 1) {
                                    let row = &ks.codes[(h * ks.layout.ring + slot) * ks.layout.row_words..];
                                    crate::pack::unpack_bits(row, kw, c, &mut codes);
                                    sum += f64::from(codes[0]);
                                    let x = qr[stored(c)];
                                    int += f64::from((x * (127.0 / top)).round_ties_even())
                                        * f64::from(codes[0]);
                                    qsum += f64::from(x);
                                    mag +=
                                        2.0 * f64::from(x.abs()) * f64::from(gp.zero.abs() + 3.0 * gp.scale);
                                }
                                e += f64::from(gp.scale) * f64::from(top) / 127.0 * (1.0 + 1e-6) / 2.0 * sum;
                                if top > 0.0 {
                                    let x = f64::from(gp.scale) * f64::from(top / 127.0) * int;
                                    def += x + f64::from(gp.zero) * qsum;
                                    dmag += x.abs() + (f64::from(gp.zero) * qsum).abs();
                                }
                            }
                            let i = m * held + u;
                            if ko == 0 {
                                let tol = gamma(d + 16) * 4.0 * dmag + 1e-30;
                                let err = (f64::from(got[i]) - def).abs();
                                assert!(
                                    err <= tol,
                                    "{what} nq {nq} h {h}: score {i}: {} vs its definition {def}",
                                    got[i]
                                );
                            }
                            tol[i] = e + gamma(d + 16) * 2.0 * mag + 1e-30;
                        }
                    }
                }
                for i in (0..nq * held).filter(|i| in_body(&kbody, i % held)) {
                    let err = (f64::from(got[i]) - want[i]).abs();
                    assert!(
                        err <= tol[i],
                        "{what} nq {nq} h {h}: score {i}: {} vs {} (tol {:e})",
                        got[i],
                        want[i],
                        tol[i]
                    );
                    worst_k = worst_k.max(err / tol[i]);
                }
                // With the spike, one key code of the first body token one level off, channel by channel.
                if spike {
                    let (slot, u) = (kbody[0].start, kbody[0].pos);
                    let mut far = 0f64;
                    for c in 0..d {
                        let step = if cache.shift_key_code(h, slot, c, 1) { 1 } else { -1 };
                        if step < 0 {
                            assert!(cache.shift_key_code(h, slot, c, -1));
                        }
                        let off = run_keys(&cache, h, portable);
                        assert!(cache.shift_key_code(h, slot, c, -step));
                        for m in 0..nq {
                            let i = m * held + u;
                            far = far.max((f64::from(off[i]) - want[i]).abs() / tol[i]);
                        }
                    }
                    assert!(
                        far > 1.0,
                        "{what} h {h}: a key code one level off stays within the bound ({far:.3})"
                    );
                    least_k = least_k.min(far);
                }
            }
            // Values: every int8 kernel set, weights on body tokens only (random, or half on one token).
            for heavy in [false, true] {
                if spike {
                    continue;
                }
                let first = vbody[0];
                let p: Vec<f32> = (0..nq * held)
                    .map(|i| match (in_body(&vbody, i % held), heavy) {
                        (false, _) => 0.0,
                        (true, false) => rng.unit().abs().powi(2) / 8.0,
                        (true, true) if i % held == first.pos + first.len / 2 => 0.5,
                        (true, true) => rng.unit().abs() * 1e-4,
                    })
                    .collect();
                let pr = Probs { data: &p, stride: held, pos: 0 };
                let run_values = |cache: &Cache<'_>, h: usize, kernel: Kernel| {
                    let mut buf = vec![0.0f32; work_len(nq, d) + generic_work(&cfg, nq)];
                    let (work, mut gw) = GenericWork::split(&cfg, nq, &mut buf);
                    let mut out = vec![0.0f32; nq * d];
                    value_sums(
                        cache,
                        &cache.view(Stream::Values),
                        h,
                        &pr,
                        nq,
                        &mut out,
                        work,
                        &mut gw,
                        kernel,
                    );
                    out
                };
                for (h, values) in values.iter().enumerate() {
                    let got = run_values(&cache, h, portable);
                    for k in &twins {
                        for (i, (a, b)) in got.iter().zip(&run_values(&cache, h, *k)).enumerate() {
                            assert_eq!(
                                a.to_bits(),
                                b.to_bits(),
                                "{what} {} nq {nq} h {h}: sum {i}",
                                k.name()
                            );
                        }
                    }
                    let vs = cache.view(Stream::Values);
                    let (perm, bounds) = vs.tables.order(h, d, groups);
                    let lo = |j: usize| if bounds.is_empty() { j * g } else { usize::from(bounds[j]) };
                    let orig = |c: usize| if perm.is_empty() { c } else { usize::from(perm[c]) };
                    let (mut want, mut tol) = (vec![0f64; nq * d], vec![0f64; nq * d]);
                    let mut codes = [0u8; 1];
                    for m in 0..nq {
                        let mut mag = vec![0f64; d];
                        for u in 0..held {
                            let pu = f64::from(p[m * held + u]);
                            for c in 0..d {
                                want[m * d + c] += pu * f64::from(values[u * d + c]);
                                mag[c] += 2.0 * pu * f64::from(values[u * d + c].abs());
                            }
                        }
                        for seg in &vbody {
                            for t0 in (0..seg.len).step_by(Q8_TILE) {
                                let len = (seg.len - t0).min(Q8_TILE);
                                for j in 0..groups {
                                    let at = |i: usize| {
                                        (h * vs.layout.row_groups + j) * vs.layout.ring + seg.start + t0 + i
                                    };
                                    let pp = |i: usize| p[m * held + seg.pos + t0 + i];
                                    let ps: Vec<f32> =
                                        (0..len).map(|i| pp(i) * vs.params(fmt, at(i)).scale).collect();
                                    let delta =
                                        f64::from(ps.iter().fold(0f32, |a, &x| a.max(x)) / Q8_VALUE_MAX)
                                            * (1.0 + 1e-6);
                                    for (i, &x) in ps.iter().enumerate() {
                                        let gp = vs.params(fmt, at(i));
                                        for c in lo(j)..lo(j + 1) {
                                            let row = &vs.codes[(h * vs.layout.ring + seg.start + t0 + i)
                                                * vs.layout.row_words..];
                                            crate::pack::unpack_bits(row, vw, c, &mut codes);
                                            let oc = orig(c);
                                            tol[m * d + oc] += (delta / 2.0).min(f64::from(x) * (1.0 + 1e-6))
                                                * f64::from(codes[0]);
                                            mag[oc] += 2.0
                                                * f64::from(pp(i))
                                                * f64::from(gp.zero.abs() + gp.scale * 15.0);
                                        }
                                    }
                                }
                            }
                        }
                        for c in 0..d {
                            tol[m * d + c] += gamma(held + 16) * mag[c] + 1e-30;
                        }
                    }
                    if !heavy {
                        for (i, (&o, &w)) in got.iter().zip(&want).enumerate() {
                            let err = (f64::from(o) - w).abs();
                            assert!(
                                err <= tol[i],
                                "{what} nq {nq} h {h}: sum {i}: {o} vs {w} (tol {:e})",
                                tol[i]
                            );
                            worst_v = worst_v.max(err / tol[i]);
                        }
                        cases += 1;
                        continue;
                    }
                    if nq != 3 {
                        continue;
                    }
                    let slot = first.start + first.len / 2;
                    let mut far = 0f64;
                    for c in 0..d {
                        let step = if cache.shift_value_code(h, slot, c, 1) { 1 } else { -1 };
                        if step < 0 {
                            assert!(cache.shift_value_code(h, slot, c, -1));
                        }
                        let off = run_values(&cache, h, portable);
                        assert!(cache.shift_value_code(h, slot, c, -step));
                        for i in 0..nq * d {
                            far = far.max((f64::from(off[i]) - want[i]).abs() / tol[i]);
                        }
                    }
                    assert!(
                        far > 1.0,
                        "{what} h {h}: a value code one level off stays within the bound ({far:.3})"
                    );
                    least_v = least_v.min(far);
                }
            }
        }
    }
    std::println!("grouped int8: worst error / bound {worst_k:.3} (keys), {worst_v:.3} (values)");
    std::println!(
        "grouped int8: one level off at least {least_k:.1} (keys), {least_v:.1} (values) times the bound"
    );
    assert!(worst_k > 0.0 && worst_v > 0.0);
    assert!(cases >= if cfg!(miri) { 8 } else { 48 }, "{cases}");
}

/// The AVX2 tier kernels (4-bit corrections in groups of 64 channels decoded in registers) give the
/// portable loops' bits: every promoted token's key score correction and value sum, over head sizes of
/// one to four correction groups, one to eight queries, and ranges that start and end inside key groups.
/// Two codes of a word swapped, or the lanes summed in another order, fails it. (A fused multiply-add in
/// the decode would not: a 4-bit code times an f16 scale is exact in f32.)
#[test]
fn tier_corrections_on_avx2_equal_the_portable_loops_bit_for_bit() {
    use crate::cache::tier::TierView;
    if Kernel::avx2().is_none() {
        std::println!("skipped: this CPU lacks one of AVX2, FMA, F16C");
        return;
    }
    let mut rng = Rng::new(23);
    let mut promoted = 0;
    for (d, nq) in [(64usize, 3usize), (128, 1), (192, 8), (256, 5)] {
        let g = 32;
        let mut cfg = CacheConfig::kivi(Width::B2, g, 32, 1, d, 400).with_sinks(4);
        cfg.keys = Precision::Quant(QuantSpec::per_channel(Width::B2, g).with_params(Fp8E4M3));
        cfg = cfg.with_tiers(crate::cache::config::Tiers { keep: 2, width: Width::B4 });
        let mut mem = vec![0u32; cfg.layout().unwrap().total_words];
        let mut cache = Cache::new(cfg, &mut mem).unwrap();
        let t = 300;
        let (k, v) = (activations(&mut rng, t, 1, d), activations(&mut rng, t, 1, d));
        crate::cache::tests::append_observed(&mut cache, &k, &v, &mut rng);
        let tv = TierView::of(&cache).unwrap();
        assert!(tv.b4_in_64s());
        let q: Vec<f32> = (0..nq * d).map(|_| rng.unit() * 2.0).collect();
        let queries = Queries { q: &q, nq, d };
        let p: Vec<f32> = (0..nq * t).map(|_| rng.unit().abs()).collect();
        let probs = Probs { data: &p, stride: t, pos: 0 };
        for (j0, n) in [(0usize, t - 40), (37, 150), (101, 3)] {
            promoted += tv.promoted(0, j0, n).count();
            let mut runs = Vec::new();
            for vector in [false, true] {
                let mut s: Vec<f32> = (0..nq * t).map(|i| i as f32 * 0.25).collect();
                let mut scores = Scores { data: &mut s, stride: t, pos: 0 };
                generic::tier_key_scores_flat(&tv, 0, j0, n, &queries, &mut scores, vector);
                let mut acc: Vec<f32> = (0..nq * d).map(|i| i as f32 * 0.5).collect();
                generic::tier_value_sums(&tv, 0, j0, n, &probs, d, &mut acc, vector);
                runs.push((s, acc));
            }
            let what = std::format!("d {d} nq {nq} tokens {j0}..{}", j0 + n);
            for (a, b) in runs[0].0.iter().zip(&runs[1].0) {
                assert_eq!(a.to_bits(), b.to_bits(), "{what}: key scores {a} vs {b}");
            }
            for (a, b) in runs[0].1.iter().zip(&runs[1].1) {
                assert_eq!(a.to_bits(), b.to_bits(), "{what}: value sums {a} vs {b}");
            }
        }
    }
    assert!(promoted >= 50, "{promoted} promoted tokens");
}
