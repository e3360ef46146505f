extern crate std;
use super::*;
use crate::pack::Width;
use crate::testutil::{Rng, activations, f16r, group_bound};
use std::vec;
use std::vec::Vec;

fn arena(cfg: &CacheConfig) -> Vec<u32> {
    vec![0u32; cfg.layout().unwrap().total_words]
}

/// Every element the cache gives back is within its storage's bound of what went in: exact f16 for sinks,
/// windows and fp16 bodies; half a stored step (of the f16-rounded window for KIVI keys and windowed
/// values) for quantized ones.
fn check_against_input(cache: &Cache<'_>, keys: &[f32], values: &[f32], first: usize) {
    let cfg = *cache.config();
    let (heads, d) = (cfg.kv_heads, cfg.head_dim);
    let c = cache.counts();
    let held = cache.held();
    // token index (into the inputs) of each held row
    let tokens: Vec<usize> =
        (0..c.sinks).chain((c.base..c.n).map(|j| j + c.sinks)).map(|t| t + first).collect();
    assert_eq!(tokens.len(), held);
    let mut out = vec![0.0f32; held * d];
    for (stream, input) in [(Stream::Keys, keys), (Stream::Values, values)] {
        let precision = if stream == Stream::Keys { cfg.keys } else { cfg.values };
        let q_end = precision.residual().quantized_end(c.n, cfg.residual);
        let x = |t: usize, h: usize, ch: usize| input[(t * heads + h) * d + ch];
        for h in 0..heads {
            assert_eq!(cache.dequantize(stream, h, &mut out).unwrap(), held);
            for (row, &t) in tokens.iter().enumerate() {
                let j = t.wrapping_sub(first + c.sinks); // body index (huge for sinks)
                let quantized = row >= c.sinks && j < q_end && precision != Precision::F16;
                for ch in 0..d {
                    let got = out[row * d + ch];
                    let want = x(t, h, ch);
                    if !quantized {
                        assert_eq!(got, f16r(want), "{stream:?} head {h} token {t} channel {ch}");
                        continue;
                    }
                    let Precision::Quant(q) = precision else { unreachable!() };
                    let bound = match q.axis {
                        Axis::PerChannel => {
                            let g0 = j - j % q.group + first + c.sinks;
                            let xs: Vec<f32> = (g0..g0 + q.group).map(|u| f16r(x(u, h, ch))).collect();
                            group_bound(&xs, q.width) + (want - f16r(want)).abs()
                        }
                        Axis::PerToken => {
                            let g0 = ch - ch % q.group;
                            let round = |v: f32| if cfg.residual > 0 { f16r(v) } else { v };
                            let xs: Vec<f32> = (g0..g0 + q.group).map(|u| round(x(t, h, u))).collect();
                            group_bound(&xs, q.width) + (want - round(want)).abs()
                        }
                    };
                    assert!(
                        (got - want).abs() <= bound,
                        "{stream:?} head {h} token {t} channel {ch}: {got} vs {want}, bound {bound}"
                    );
                }
            }
        }
    }
}

fn configs() -> Vec<CacheConfig> {
    let kivi2 = CacheConfig::kivi(Width::B2, 32, 64, 2, 64, 1024);
    vec![
        CacheConfig::fp16(2, 64, 1024),
        kivi2,
        kivi2.with_sinks(3),
        CacheConfig::kivi(Width::B4, 32, 128, 2, 64, 1024),
        CacheConfig::kivi(Width::B8, 32, 32, 2, 64, 1024).with_sinks(1),
        CacheConfig::kivi(Width::Ternary, 64, 64, 2, 128, 1024),
        CacheConfig::kivi(Width::B3, 32, 32, 1, 64, 1024),
        // SKVQ-like: keys and values per token, FIFO window, sinks.
        CacheConfig {
            keys: Precision::Quant(QuantSpec::per_token(Width::B2, 32)),
            ..CacheConfig::kivi(Width::B2, 32, 32, 2, 64, 1024).with_sinks(2)
        },
        // No window at all for per-token streams, fp16 keys.
        CacheConfig { keys: Precision::F16, residual: 0, ..CacheConfig::kivi(Width::B4, 64, 32, 1, 64, 512) },
        // Clipped groups.
        CacheConfig {
            values: Precision::Quant(QuantSpec { clip: 0.9, ..QuantSpec::per_token(Width::B4, 32) }),
            ..kivi2
        },
    ]
}

#[test]
fn dequantized_cache_is_within_the_quantizer_bound() {
    let mut rng = Rng::new(7);
    // Under Miri (an interpreter, ~1000x slower) a sample of the configurations.
    let all = configs();
    let picked: Vec<CacheConfig> = if cfg!(miri) { vec![all[2], all[7], all[8]] } else { all };
    for cfg in picked {
        let clipped = matches!(cfg.values, Precision::Quant(QuantSpec { clip, .. }) if clip < 1.0);
        let ts: &[usize] = if cfg!(miri) { &[33] } else { &[1, 31, 32, 33, 64, 65, 300] };
        for &t in ts {
            let mut mem = arena(&cfg);
            let mut cache = Cache::new(cfg, &mut mem).unwrap();
            let k = activations(&mut rng, t, cfg.kv_heads, cfg.head_dim);
            let v = activations(&mut rng, t, cfg.kv_heads, cfg.head_dim);
            // Half as a prefill, the rest one token at a time.
            let hd = cfg.kv_heads * cfg.head_dim;
            let split = t / 2 * hd;
            cache.append(&k[..split], &v[..split]).unwrap();
            for (kt, vt) in k[split..].chunks(hd).zip(v[split..].chunks(hd)) {
                cache.append(kt, vt).unwrap();
            }
            assert_eq!(cache.held(), t);
            if clipped {
                // A clipped group trades its outer values' bound for the bulk's; `quant::uniform` tests that.
                continue;
            }
            check_against_input(&cache, &k, &v, 0);
        }
    }
}

/// methods.md §1.4: a prefill of T tokens leaves T - T mod R keys quantized (none if T < R) and all but the
/// last R values quantized (none if T <= R); decoding then keeps 0..R-1 keys and exactly R values in fp16.
#[test]
fn kivi_windows_follow_the_reference_rules() {
    let shapes: &[(usize, usize)] = if cfg!(miri) { &[(32, 32)] } else { &[(32, 32), (32, 128), (64, 128)] };
    for &(g, r) in shapes {
        let cfg = CacheConfig::kivi(Width::B2, g, r, 1, 64, 2048);
        for t in [0, 1, r - 1, r, r + 1, 3 * r + 5, 8 * g] {
            let mut mem = arena(&cfg);
            let mut cache = Cache::new(cfg, &mut mem).unwrap();
            let x = vec![0.5f32; t * 64];
            cache.append(&x, &x).unwrap();
            let keys = cache.view(Stream::Keys).q_end;
            let values = cache.view(Stream::Values).q_end;
            assert_eq!(keys, t - t % r, "G {g} R {r} T {t}");
            assert_eq!(values, t.saturating_sub(r), "G {g} R {r} T {t}");
            let u = cache.usage();
            assert_eq!(u.window_bytes, ((t - keys) + (t - values)) * 64 * 2);
            assert_eq!(cache.config().counts_after(t).unwrap(), cache.counts());
        }
    }
}

#[test]
fn stop_refuses_overflow_and_changes_nothing() {
    let cfg = CacheConfig::kivi(Width::B2, 32, 32, 1, 32, 100).with_sinks(4);
    let mut mem = arena(&cfg);
    let mut cache = Cache::new(cfg, &mut mem).unwrap();
    let mut rng = Rng::new(3);
    let k = activations(&mut rng, 100, 1, 32);
    let v = activations(&mut rng, 100, 1, 32);
    cache.append(&k[..90 * 32], &v[..90 * 32]).unwrap();
    let before = cache.counts();
    let mut snap = vec![0.0; 90 * 32];
    cache.dequantize(Stream::Keys, 0, &mut snap).unwrap();
    assert_eq!(
        cache.append(&k[90 * 32..], &[v[90 * 32..].to_vec(), vec![0.0; 32]].concat()),
        Err(Error::ShapeMismatch { what: "values length", expected: 320, got: 352 })
    );
    let eleven = [k[..10 * 32].to_vec(), vec![0.0; 32]].concat();
    assert_eq!(
        cache.append(&eleven, &eleven),
        Err(Error::ContextFull { held: 90, adding: 11, capacity: 100 })
    );
    assert_eq!(cache.counts(), before);
    let mut again = vec![0.0; 90 * 32];
    cache.dequantize(Stream::Keys, 0, &mut again).unwrap();
    assert_eq!(snap, again);
    cache.append(&k[90 * 32..], &v[90 * 32..]).unwrap();
    assert_eq!(cache.held(), 100);
    check_against_input(&cache, &k, &v, 0);
}

/// 100,000 tokens through a 256-token sliding cache: memory stays the arena's, the sinks stay, the newest
/// tokens are what was appended last, and the accounting matches the closed form.
#[test]
fn streaming_100k_tokens_slides_with_fixed_memory() {
    let total = if cfg!(miri) { 300 } else { 100_000 };
    for cfg in [
        CacheConfig::kivi(Width::B2, 32, 64, 1, 32, 256).with_sinks(4).with_overflow(Overflow::Slide),
        CacheConfig::fp16(1, 32, 200).with_sinks(2).with_overflow(Overflow::Slide),
        CacheConfig { keys: Precision::F16, ..CacheConfig::kivi(Width::B4, 32, 16, 1, 32, 100) }
            .with_overflow(Overflow::Slide),
    ] {
        let mut mem = arena(&cfg);
        let words = mem.len();
        let mut cache = Cache::new(cfg, &mut mem).unwrap();
        let mut rng = Rng::new(11);
        let chunk = 1000;
        let mut inputs_k = Vec::new();
        let mut inputs_v = Vec::new();
        let mut done = 0;
        while done < total {
            let n = chunk.min(total - done);
            let k = activations(&mut rng, n, 1, 32);
            let v = activations(&mut rng, n, 1, 32);
            for (kt, vt) in k.chunks(32).zip(v.chunks(32)) {
                cache.append(kt, vt).unwrap();
                assert!(cache.held() <= cfg.capacity);
                assert!(cache.usage().total_bytes() <= words * 4);
            }
            if done == 0 {
                inputs_k.extend_from_slice(&k);
                inputs_v.extend_from_slice(&v);
            }
            done += n;
            if done == total {
                // Check the end state against the inputs: sinks from the first chunk, body from this one.
                let c = cache.counts();
                assert_eq!(cfg.counts_after(total).unwrap(), c);
                assert!(cache.held() > cfg.capacity - cfg.slide_step());
                let mut sinks_and_tail_k = vec![0.0; total * 32];
                let mut sinks_and_tail_v = vec![0.0; total * 32];
                sinks_and_tail_k[..cfg.sinks * 32].copy_from_slice(&inputs_k[..cfg.sinks * 32]);
                sinks_and_tail_v[..cfg.sinks * 32].copy_from_slice(&inputs_v[..cfg.sinks * 32]);
                let tail = (total - n) * 32;
                sinks_and_tail_k[tail..].copy_from_slice(&k);
                sinks_and_tail_v[tail..].copy_from_slice(&v);
                check_against_input(&cache, &sinks_and_tail_k, &sinks_and_tail_v, 0);
            }
        }
    }
}

#[test]
fn bad_input_is_an_error_and_changes_nothing() {
    let cfg = CacheConfig::kivi(Width::B2, 32, 32, 2, 64, 128);
    let needed = cfg.arena_bytes();
    let mut small = vec![0u32; needed / 4 - 1];
    assert_eq!(Cache::new(cfg, &mut small).err(), Some(Error::ArenaTooSmall { needed, got: needed - 4 }));
    // A byte arena that is not 4-byte aligned loses its head to alignment.
    let mut bytes = vec![0u8; needed + 4];
    assert!(Cache::from_bytes(cfg, &mut bytes[1..]).is_ok());
    assert!(matches!(Cache::from_bytes(cfg, &mut bytes[1..needed + 1]), Err(Error::ArenaTooSmall { .. })));
    // head_dim the per-token layout cannot take
    let odd = CacheConfig { head_dim: 48, ..cfg };
    assert!(matches!(
        Cache::new(odd, &mut small),
        Err(Error::InvalidConfig { what: "head_dim (per-token groups must divide it)", .. })
    ));

    let mut mem = arena(&cfg);
    let mut cache = Cache::new(cfg, &mut mem).unwrap();
    let good = vec![0.25f32; 2 * 64];
    cache.append(&good, &good).unwrap();
    let mut bad = good.clone();
    bad[77] = f32::NAN;
    assert_eq!(cache.append(&good, &bad), Err(Error::NonFinite { index: 128 + 77 }));
    bad[77] = f32::INFINITY;
    assert_eq!(cache.append(&bad, &good), Err(Error::NonFinite { index: 77 }));
    bad[77] = 1e6;
    assert_eq!(cache.append(&bad, &good), Err(Error::ParamOverflow { value: 1e6, max: MAX_ABS }));
    assert_eq!(
        cache.append(&good[..100], &good[..100]),
        Err(Error::ShapeMismatch {
            what: "keys length (multiple of kv_heads*head_dim)",
            expected: 128,
            got: 100
        })
    );
    assert_eq!(cache.held(), 1);
    let mut out = vec![0.0; 64];
    assert_eq!(cache.dequantize(Stream::Keys, 2, &mut out), Err(Error::OutOfBounds { index: 2, len: 2 }));
    assert!(matches!(cache.dequantize(Stream::Keys, 0, &mut out[..10]), Err(Error::BufferTooSmall { .. })));
}

/// The note's figures: KIVI-2 and KIVI-4 (G = 32, R = 128) for the default model's layer shape.
#[test]
fn kivi_bits_per_element_at_1k_and_8k() {
    for (width, tokens, bits, bytes) in [
        (Width::B2, 1024, 3.8125, 187_392),
        (Width::B2, 8192, 3.1015625, 1_219_584),
        (Width::B4, 1024, 5.6875, 279_552),
        (Width::B4, 8192, 5.0859375, 1_999_872),
    ] {
        let cfg = CacheConfig::kivi(width, 32, 128, 3, 64, 8192);
        let u = cfg.usage(cfg.counts_after(tokens).unwrap());
        assert_eq!(u.total_bytes(), bytes);
        assert_eq!(u.bits_per_element(&cfg), bits);
    }
    let f = CacheConfig::fp16(3, 64, 8192);
    assert_eq!(f.usage(f.counts_after(8192).unwrap()).bits_per_element(&f), 16.0);
}

/// The generic formats under test: every ingredient alone and stacked, over `kv` heads of `d`.
pub(crate) fn generic_configs(kv: usize, d: usize, cap: usize) -> Vec<(&'static str, CacheConfig)> {
    use crate::quant::param::ParamFormat::Fp8E4M3;
    use crate::transform::{Pairing, Rope};
    let base = CacheConfig::kivi(Width::B2, 32, 32, kv, d, cap).with_sinks(2);
    let rope = |pairing| Some(Rope { base: 10_000.0, pairing });
    let t = Transform::NONE;
    let q = Precision::Quant;
    let ch = |w| QuantSpec::per_channel(w, 32);
    let tok = |w| QuantSpec::per_token(w, 32);
    vec![
        ("rot-kv", base.with_transform(Transform { rotate_keys: true, rotate_values: true, ..t })),
        (
            "rope-rot",
            base.with_transform(Transform {
                rope: rope(Pairing::Adjacent),
                rotate_keys: true,
                rotate_values: true,
                ..t
            }),
        ),
        (
            "rope-halves-center",
            base.with_transform(Transform { rope: rope(Pairing::Halves), center_keys: true, ..t }),
        ),
        ("balance", base.with_transform(Transform { balance_keys: true, ..t })),
        (
            "nuq2",
            CacheConfig {
                keys: q(ch(Width::B2).with_codebook()),
                values: q(tok(Width::B2).with_codebook()),
                ..base
            },
        ),
        (
            "nuq3-rope-outliers",
            CacheConfig {
                keys: q(ch(Width::B3).with_codebook().with_outliers(6)),
                values: q(tok(Width::B3).with_codebook().with_outliers(3)),
                ..base.with_transform(Transform { rope: rope(Pairing::Adjacent), ..t })
            },
        ),
        (
            "fp8",
            CacheConfig {
                keys: q(ch(Width::B2).with_params(Fp8E4M3)),
                values: q(tok(Width::B2).with_params(Fp8E4M3)),
                ..base
            },
        ),
        (
            "skvq-perm",
            CacheConfig {
                keys: q(QuantSpec { permuted: true, clip: 0.95, ..tok(Width::B2) }.with_params(Fp8E4M3)),
                values: q(QuantSpec { permuted: true, ..QuantSpec::per_token(Width::Ternary, 32) }),
                ..base
            },
        ),
        (
            "per-token-no-window",
            CacheConfig {
                keys: Precision::F16,
                values: q(tok(Width::B4).with_outliers(2)),
                residual: 0,
                ..base.with_transform(Transform { rotate_values: true, ..t })
            },
        ),
        ("tiers-b8", base.with_tiers(Tiers { keep: 3, width: Width::B8 })),
        (
            // MiKV's format (`mikv2`): balanced keys with FP8 parameters, which the KIVI kernels read a
            // block at a time, and 4-bit tiers.
            "mikv-fp8-tiers",
            CacheConfig {
                keys: q(ch(Width::B2).with_params(Fp8E4M3)),
                values: q(tok(Width::B2).with_params(Fp8E4M3)),
                ..base
                    .with_transform(Transform { balance_keys: true, ..t })
                    .with_tiers(Tiers { keep: 2, width: Width::B4 })
            },
        ),
        (
            // kvq2 until 2026-12-06: 3-bit keys in 64-token groups with FP8 parameters, 2-bit values in
            // 64-channel groups.
            "kvq2-k3g64",
            CacheConfig {
                keys: q(QuantSpec::per_channel(Width::B3, 64).with_params(Fp8E4M3)),
                values: q(QuantSpec::per_token(Width::B2, 64)),
                residual: 64,
                ..base.with_transform(Transform {
                    rope: rope(Pairing::Adjacent),
                    rotate_keys: true,
                    rotate_values: true,
                    ..t
                })
            },
        ),
        (
            // kvq2 since the evening of 2026-12-06: 3-bit keys in 64-token groups (f16 parameters), 2-bit
            // values in 64-channel groups with FP8 parameters, a 64-token window here (so that values are
            // quantized within the tests' lengths).
            "kvq2-k3g64-vp8",
            CacheConfig {
                keys: q(QuantSpec::per_channel(Width::B3, 64)),
                values: q(QuantSpec::per_token(Width::B2, 64).with_params(Fp8E4M3)),
                residual: 64,
                ..base.with_transform(Transform {
                    rope: rope(Pairing::Halves),
                    rotate_keys: true,
                    rotate_values: true,
                    ..t
                })
            },
        ),
        (
            // kvq2 on the afternoon of 2026-12-06: 3-bit keys in 128-token groups (f16 parameters), 2-bit
            // values in 64-channel groups, a 128-token window.
            "kvq2-k3g128",
            CacheConfig {
                keys: q(QuantSpec::per_channel(Width::B3, 128)),
                values: q(QuantSpec::per_token(Width::B2, 64)),
                residual: 128,
                ..base.with_transform(Transform {
                    rope: rope(Pairing::Halves),
                    rotate_keys: true,
                    rotate_values: true,
                    ..t
                })
            },
        ),
        (
            // 4-bit codebooks (the kernels' two-half lookups), 64-token key groups, 16-channel value groups.
            "nuq4-g64-outliers",
            CacheConfig {
                keys: q(QuantSpec::per_channel(Width::B4, 64).with_codebook().with_outliers(9)),
                values: q(QuantSpec::per_token(Width::B4, 16).with_codebook().with_outliers(2)),
                residual: 64,
                ..base.with_transform(Transform { rope: rope(Pairing::Halves), ..t })
            },
        ),
        (
            // 1-bit keys with FP8 parameters, ternary values in fixed groups (lookups over repeated levels).
            "b1-ternary",
            CacheConfig {
                keys: q(ch(Width::B1).with_params(Fp8E4M3)),
                values: q(tok(Width::Ternary).with_codebook()),
                ..base.with_transform(Transform { rotate_keys: true, rotate_values: true, ..t })
            },
        ),
        (
            // Per-token keys through every key transform, with codebooks and outliers.
            "token-keys-nuq3-center-rot-balance",
            CacheConfig {
                keys: q(tok(Width::B3).with_codebook().with_outliers(3)),
                values: q(tok(Width::B2)),
                ..base.with_transform(Transform {
                    center_keys: true,
                    rotate_keys: true,
                    balance_keys: true,
                    ..t
                })
            },
        ),
        (
            "kvq3-tiers",
            CacheConfig {
                keys: q(ch(Width::B3)),
                values: q(tok(Width::B3)),
                ..base
                    .with_transform(Transform { rope: rope(Pairing::Halves), rotate_keys: true, ..t })
                    .with_tiers(Tiers { keep: 2, width: Width::B4 })
            },
        ),
        (
            "tiers-b4-rope-rot-nuq",
            CacheConfig {
                keys: q(ch(Width::B2).with_codebook().with_outliers(4)),
                values: q(tok(Width::B2).with_params(Fp8E4M3)),
                ..base
                    .with_transform(Transform {
                        rope: rope(Pairing::Halves),
                        rotate_keys: true,
                        rotate_values: true,
                        ..t
                    })
                    .with_tiers(Tiers { keep: 32, width: Width::B4 })
            },
        ),
    ]
}

pub(crate) use crate::testing::{append_observed, fill_tables, fill_tables_into};

/// The stored basis of every quantized body row of `stream`, head `h`: what went in (turned forward as
/// the cache turns it) and what the kernels decode, in stored order, with each element's outlier status.
struct StoredRow {
    slot: usize,
    input: Vec<f32>,
    decoded: Vec<f32>,
    outlier: Vec<bool>,
}

fn stored_rows(cache: &Cache<'_>, stream: Stream, h: usize, x: &[f32]) -> Vec<StoredRow> {
    let cfg = *cache.config();
    let (heads, d) = (cfg.kv_heads, cfg.head_dim);
    let v = cache.view(stream);
    let l = v.layout;
    let Precision::Quant(q) = v.precision else { return Vec::new() };
    let c = cache.counts();
    let windowed = q.axis == Axis::PerChannel || cfg.residual > 0;
    let mut out = Vec::new();
    for j in c.base..v.q_end {
        let slot = j % l.ring;
        let t = j + c.sinks;
        let mut input: Vec<f32> =
            x[(t * heads + h) * d..][..d].iter().map(|&a| if windowed { f16r(a) } else { a }).collect();
        let offset = if q.axis == Axis::PerChannel { slot % q.group } else { 0 };
        cache.forward(stream, h, offset, &mut input);
        let mut decoded = vec![0.0f32; d];
        let mut outlier = vec![false; d];
        match q.axis {
            Axis::PerChannel => {
                let g0 = slot - slot % q.group;
                let mut rows = vec![0.0f32; q.group * d];
                crate::attention::generic::key_group_stored(&v, q, h, d, g0, &mut rows);
                decoded.copy_from_slice(&rows[(slot - g0) * d..][..d]);
                for o in &v.outliers[(h * l.row_groups + slot / q.group) * q.outliers..][..q.outliers] {
                    let i = usize::from(o.index);
                    if o.index != EMPTY_SLOT && i / d == slot - g0 {
                        outlier[i % d] = true;
                    }
                }
            }
            Axis::PerToken => {
                crate::attention::generic::token_stored(&v, q, h, d, slot, &mut decoded);
                let (perm, _) = v.tables.order(h, d, d / q.group);
                if !perm.is_empty() {
                    input = perm.iter().map(|&p| input[usize::from(p)]).collect();
                }
                for o in &v.outliers[slot * q.outliers..][..q.outliers] {
                    let i = usize::from(o.index);
                    if o.index != EMPTY_SLOT && i / d == h {
                        outlier[i % d] = true;
                    }
                }
            }
        }
        out.push(StoredRow { slot, input, decoded, outlier });
    }
    out
}

/// Every generic format stores each element within its quantizer's bound, in the stored basis: an outlier
/// to the f16 rounding of its correction; any other element (clamped to the key thresholds where there are
/// any) to half its group's step (uniform) or half the widest gap between adjacent levels times the scale
/// (codebook), with the step itself no wider than the group's range (outliers left out) asks for, after the
/// parameter format's rounding. A clipped group (SKVQ's keys) is held to its clipped range instead.
#[test]
fn generic_formats_store_within_their_bound() {
    let mut rng = Rng::new(99);
    let configs = generic_configs(2, 64, 1024);
    let picked: Vec<_> = if cfg!(miri) { configs.into_iter().step_by(3).collect() } else { configs };
    let mut checked = 0usize;
    for (name, cfg) in picked {
        let ts: &[usize] = if cfg!(miri) { &[70] } else { &[33, 64, 97, 300] };
        for &t in ts {
            let mut mem = arena(&cfg);
            let mut cache = Cache::new(cfg, &mut mem).unwrap();
            fill_tables(&mut cache, &mut rng);
            let (heads, d) = (cfg.kv_heads, cfg.head_dim);
            let k = activations(&mut rng, t, heads, d);
            let v = activations(&mut rng, t, heads, d);
            let split = t / 3 * heads * d;
            cache.append(&k[..split], &v[..split]).unwrap();
            for (kt, vt) in k[split..].chunks(heads * d).zip(v[split..].chunks(heads * d)) {
                cache.append(kt, vt).unwrap();
            }
            for (stream, x) in [(Stream::Keys, &k), (Stream::Values, &v)] {
                let sv = cache.view(stream);
                let Precision::Quant(q) = sv.precision else { continue };
                if !cfg.generic(stream == Stream::Values) {
                    continue;
                }
                let l = sv.layout;
                let fmt = q.params;
                let ulp = |a: f32| (2.0 * fmt.unit_roundoff() * a.abs()).max(fmt.subnormal_step());
                for h in 0..heads {
                    let rows = stored_rows(&cache, stream, h, x);
                    let mut bounds = vec![vec![0.0f32; d]; rows.len()];
                    let groups: Vec<(usize, std::ops::Range<usize>)> = match q.axis {
                        // (first row, channel range) per group: per channel, each channel over G rows.
                        Axis::PerChannel => (0..rows.len())
                            .step_by(q.group)
                            .flat_map(|r0| (0..d).map(move |c| (r0, c..c + 1)))
                            .collect(),
                        Axis::PerToken => {
                            let (_, bounds) = sv.tables.order(h, d, d / q.group);
                            (0..rows.len())
                                .flat_map(|r| {
                                    (0..d / q.group).map(move |gj| {
                                        (
                                            r,
                                            if bounds.is_empty() {
                                                gj * q.group..(gj + 1) * q.group
                                            } else {
                                                usize::from(bounds[gj])..usize::from(bounds[gj + 1])
                                            },
                                        )
                                    })
                                })
                                .collect()
                        }
                    };
                    for (r0, chans) in groups {
                        if chans.is_empty() {
                            continue;
                        }
                        let (row_range, unit, pi) = match q.axis {
                            Axis::PerChannel => {
                                let c = chans.start;
                                (
                                    r0..r0 + q.group,
                                    h * d + c,
                                    (h * l.row_groups + rows[r0].slot / q.group) * d + c,
                                )
                            }
                            Axis::PerToken => {
                                let gj = (0..d / q.group)
                                    .position(|gj| {
                                        let (_, b) = sv.tables.order(h, d, d / q.group);
                                        (if b.is_empty() { gj * q.group } else { usize::from(b[gj]) })
                                            == chans.start
                                            && (if b.is_empty() {
                                                (gj + 1) * q.group
                                            } else {
                                                usize::from(b[gj + 1])
                                            }) == chans.end
                                    })
                                    .unwrap();
                                (r0..r0 + 1, h, (h * l.row_groups + gj) * l.ring + rows[r0].slot)
                            }
                        };
                        let p = sv.params(fmt, pi);
                        let thresholds = if q.axis == Axis::PerChannel && q.outliers > 0 {
                            let th = sv.tables.thresholds;
                            Some((th[(h * d + chans.start) * 2], th[(h * d + chans.start) * 2 + 1]))
                        } else {
                            None
                        };
                        let clamp = |a: f32| thresholds.map_or(a, |(lo, hi)| a.clamp(lo, hi));
                        let kept: Vec<f32> = row_range
                            .clone()
                            .flat_map(|r| chans.clone().map(move |c| (r, c)))
                            .filter(|&(r, c)| !rows[r].outlier[c])
                            .map(|(r, c)| clamp(rows[r].input[c]))
                            .collect();
                        let (mn, mx) = kept
                            .iter()
                            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
                        let (mn, mx) = if kept.is_empty() { (0.0, 0.0) } else { (mn, mx) };
                        let spec = crate::quant::uniform::UniformSpec::new(q.width).with_clip(q.clip);
                        let (lo, hi) = spec.clip_range(mn, mx);
                        let levels = if q.codebook {
                            sv.tables.unit_levels(unit, q.width.levels() as usize)
                        } else {
                            None
                        };
                        let (step_need, half_err) = match levels {
                            None => {
                                let exact = (hi - lo) / f32::from(q.width.max_code());
                                let need =
                                    exact + ulp(lo) / f32::from(q.width.max_code()) + ulp(exact + ulp(lo));
                                (need, p.scale / 2.0)
                            }
                            Some((enc, dec)) => {
                                let half = (hi - lo) / 2.0;
                                let need = half + ulp((hi + lo) / 2.0) + ulp(half + ulp((hi + lo) / 2.0));
                                let gap = enc.windows(2).map(|w| w[1] - w[0]).fold(0.0f32, f32::max);
                                // The decode table's shift from the encode table adds its largest move.
                                let moved =
                                    enc.iter().zip(dec).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                                (need, p.scale * (gap / 2.0 + moved))
                            }
                        };
                        assert!(
                            p.scale <= step_need * (1.0 + 8.0 * f32::EPSILON),
                            "{name} {stream:?} T {t} head {h} group at row {r0}: scale {} > {step_need} ({fmt:?})",
                            p.scale
                        );
                        let reach = p.zero.abs() + (f32::from(q.width.max_code()) + 1.0) * p.scale.abs();
                        let slack = |a: f32| 8.0 * f32::EPSILON * (a.abs() + reach);
                        for r in row_range {
                            for c in chans.clone() {
                                let (got, want) = (rows[r].decoded[c], rows[r].input[c]);
                                let bound = if rows[r].outlier[c] {
                                    // the correction is f16: its rounding, of a delta no bigger than |want| + the grid's reach
                                    (want.abs() + reach) * 2f32.powi(-11) + slack(want)
                                } else {
                                    let w = clamp(want).clamp(lo, hi);
                                    (w - want).abs() + half_err + slack(want)
                                };
                                assert!(
                                    (got - want).abs() <= bound,
                                    "{name} {stream:?} T {t} head {h} row {r} ch {c}: {got} vs {want} (bound {bound}, {p:?})"
                                );
                                bounds[r][c] = bound;
                                checked += 1;
                            }
                        }
                    }
                    check_input_basis(&cache, stream, h, x, &rows, &bounds);
                }
            }
        }
    }
    assert!(checked > if cfg!(miri) { 100 } else { 100_000 }, "{checked}");
}

/// Back in the basis the tokens came in, [`Cache::dequantize`] is within the stored-basis bounds `b` of
/// each row: the transforms are orthonormal (RoPE, Hadamard) or scale by at most `bmax` (balance), so a
/// row's error has at most `bmax |b|` as its 2-norm, plus the transforms' own rounding (`2 (log2 d + 4) u`
/// of the row's norm). A mistake in the forward transform (a wrong RoPE offset, a missing balance) fails here.
fn check_input_basis(
    cache: &Cache<'_>,
    stream: Stream,
    h: usize,
    x: &[f32],
    rows: &[StoredRow],
    b: &[Vec<f32>],
) {
    let cfg = *cache.config();
    let (heads, d) = (cfg.kv_heads, cfg.head_dim);
    let mut deq = vec![0.0f32; cache.held() * d];
    cache.dequantize(stream, h, &mut deq).unwrap();
    let c = cache.counts();
    let bal = cache.view(Stream::Keys).tables.balance;
    let bmax = if stream == Stream::Keys && cfg.transform.balance_keys {
        bal[h * d..][..d].iter().fold(1.0f32, |a, &v| a.max(v).max(1.0 / v))
    } else {
        1.0
    };
    let windowed = match if stream == Stream::Keys { cfg.keys } else { cfg.values } {
        Precision::Quant(q) => q.axis == Axis::PerChannel || cfg.residual > 0,
        Precision::F16 => true,
    };
    let u = f32::EPSILON / 2.0;
    let l = d.trailing_zeros() as f32 + 4.0;
    for (r, (row, bound)) in rows.iter().zip(b).enumerate() {
        let j = c.base + r; // rows run over the quantized body oldest first
        let t = j + c.sinks;
        let held_row = c.sinks + (j - c.base);
        let got = &deq[held_row * d..][..d];
        let want: Vec<f32> =
            x[(t * heads + h) * d..][..d].iter().map(|&a| if windowed { f16r(a) } else { a }).collect();
        let err = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        let bnorm = bound.iter().map(|v| v * v).sum::<f32>().sqrt();
        let wnorm = want.iter().map(|v| v * v).sum::<f32>().sqrt()
            + row.decoded.iter().map(|v| v * v).sum::<f32>().sqrt();
        let lim = (bmax * bnorm + 2.0 * l * u * bmax * wnorm) * (1.0 + 1e-5);
        assert!(err <= lim, "{stream:?} head {h} token {t}: error norm {err} > {lim}");
    }
}

/// MiKV's tiers promote, per key group and head, exactly the `keep` tokens with the largest mean attention
/// received in the window; a promoted key or value is within the correction quantizer's bound (half a
/// step of its correction group, [`group_bound`] of the low-bit error, plus the f32 rounding of the sum),
/// and every other token decodes to the same bits as the same cache without tiers. The tier bytes are the
/// layout's.
#[test]
fn tiers_promote_the_most_attended_tokens() {
    for (d, width, keep, t) in [(64, Width::B4, 3, 300), (128, Width::B8, 1, 200), (64, Width::B2, 32, 130)] {
        let heads = 2;
        let plain = CacheConfig::kivi(Width::B2, 32, 64, heads, d, 512).with_sinks(2);
        let cfg = plain.with_tiers(Tiers { keep, width });
        let mut rng = Rng::new(5 + d as u64);
        let k = activations(&mut rng, t, heads, d);
        let v = activations(&mut rng, t, heads, d);
        // A fixed importance per (token, head); each step's observation is exactly it, so the mean is too.
        let imp: Vec<f32> = (0..t * heads).map(|_| rng.unit().abs() + 0.01).collect();
        let (mut ma, mut mb) = (arena(&cfg), arena(&plain));
        let mut tiered = Cache::new(cfg, &mut ma).unwrap();
        let mut base = Cache::new(plain, &mut mb).unwrap();
        let w = heads * d;
        for i in 0..t {
            tiered.append(&k[i * w..][..w], &v[i * w..][..w]).unwrap();
            base.append(&k[i * w..][..w], &v[i * w..][..w]).unwrap();
            let win = tiered.tier_window();
            let first = tiered.held() - win; // held order: window tokens last
            for h in 0..heads {
                let p: Vec<f32> = (first..first + win).map(|r| imp[r * heads + h]).collect();
                tiered.observe(h, &p).unwrap();
            }
        }
        let c = tiered.counts();
        let held = tiered.held();
        let tv = tier::TierView::of(&tiered).unwrap();
        let (mut got, mut want) = (vec![0.0f32; held * d], vec![0.0f32; held * d]);
        let mut promoted = 0;
        for (stream, x) in [(Stream::Keys, &k), (Stream::Values, &v)] {
            let q_end = tiered.view(stream).q_end;
            for h in 0..heads {
                tiered.dequantize(stream, h, &mut got).unwrap();
                base.dequantize(stream, h, &mut want).unwrap();
                for j in c.base..c.n {
                    let row = c.sinks + j - c.base;
                    let tok = j + c.sinks;
                    // Expected: the group's `keep` largest importances (ties cannot happen here).
                    let key_quantized = j < Residual::Block.quantized_end(c.n, 64);
                    let expect = key_quantized && {
                        // The token whose append quantizes the block has not been attended yet.
                        let g0 = j - j % 32;
                        let mut rank: Vec<usize> = (g0..g0 + 32).filter(|u| (u + 1) % 64 != 0).collect();
                        let at = |u: usize| imp[(u + c.sinks) * heads + h];
                        rank.sort_by(|a, b| at(*b).total_cmp(&at(*a)));
                        rank[..keep.min(rank.len())].contains(&j)
                    };
                    assert_eq!(tv.find(h, j).is_some(), expect, "{stream:?} d {d} head {h} token {j}");
                    let (g, b) = (&got[row * d..][..d], &want[row * d..][..d]);
                    if !(expect && j < q_end) {
                        assert!(
                            g.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{stream:?} token {j}"
                        );
                        continue;
                    }
                    promoted += 1;
                    let input: Vec<f32> = x[(tok * heads + h) * d..][..d].iter().map(|&a| f16r(a)).collect();
                    let tg = Tiers::group(d);
                    for c0 in (0..d).step_by(tg) {
                        let err: Vec<f32> = (c0..c0 + tg).map(|ch| input[ch] - b[ch]).collect();
                        let bound = group_bound(&err, width);
                        for ch in c0..c0 + tg {
                            let e = (g[ch] - input[ch]).abs();
                            let tol = bound + 2.0 * f32::EPSILON * input[ch].abs().max(b[ch].abs());
                            assert!(e <= tol, "{stream:?} d {d} token {j} ch {ch}: error {e} > {tol}");
                        }
                    }
                }
            }
        }
        assert!(promoted > 0);
        let u = tiered.usage();
        let groups = Residual::Block.quantized_end(c.n, 64) / 32;
        assert_eq!(
            u.tier_bytes,
            groups * heads * keep * Tiers { keep, width }.slot_words(d) * 4 + heads * 64 * 8
        );
        assert_eq!(u.total_bytes() - u.tier_bytes, base.usage().total_bytes());
        let l = tiered.layout();
        assert_eq!(l.tiers.slots.words, heads * (l.keys.ring / 32) * keep * l.tiers.slot_words);
        assert_eq!(l.total_words, l.tiers.seen.end());
    }
}

/// Bad tier settings and observations are refused with the setting named, and change nothing.
#[test]
fn tiers_refuse_bad_input() {
    let base = CacheConfig::kivi(Width::B2, 32, 64, 2, 64, 512);
    let tiers = Tiers { keep: 2, width: Width::B4 };
    let what = |cfg: CacheConfig| match cfg.validate() {
        Err(Error::InvalidConfig { what, .. }) => what,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        what(CacheConfig::fp16(2, 64, 512).with_tiers(tiers)),
        "tiers (keys and values must be quantized)"
    );
    assert_eq!(what(base.with_tiers(Tiers { keep: 0, ..tiers })), "tier keep (1 to G tokens per key group)");
    assert_eq!(what(base.with_tiers(Tiers { keep: 33, ..tiers })), "tier keep (1 to G tokens per key group)");
    assert_eq!(what(base.with_tiers(Tiers { width: Width::B3, ..tiers })), "tier width (2, 4 or 8 bits)");
    let per_token =
        CacheConfig { keys: Precision::Quant(QuantSpec::per_token(Width::B2, 32)), ..base }.with_tiers(tiers);
    assert_eq!(what(per_token), "tiers (keys must be per-channel groups)");
    let cfg = base.with_tiers(tiers);
    let mut mem = arena(&cfg);
    let mut cache = Cache::new(cfg, &mut mem).unwrap();
    let mut rng = Rng::new(3);
    let k = activations(&mut rng, 10, 2, 64);
    cache.append(&k, &k).unwrap();
    assert_eq!(cache.tier_window(), 10);
    let before = cache.arena.to_vec();
    assert!(matches!(cache.observe(0, &[0.1; 9]), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(cache.observe(2, &[0.1; 10]), Err(Error::OutOfBounds { .. })));
    let mut bad = [0.1f32; 10];
    bad[4] = f32::NAN;
    assert_eq!(cache.observe(0, &bad), Err(Error::NonFinite { index: 4 }));
    bad[4] = -1.0;
    assert_eq!(cache.observe(1, &bad), Err(Error::NonFinite { index: 4 }));
    assert_eq!(cache.arena.to_vec(), before);
    // A cache without tiers takes any observation as nothing.
    let mut m2 = arena(&base);
    let mut plain = Cache::new(base, &mut m2).unwrap();
    assert_eq!(plain.tier_window(), 0);
    assert_eq!(plain.observe(0, &[]), Ok(()));
}
