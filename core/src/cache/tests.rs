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
