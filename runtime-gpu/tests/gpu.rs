//! The kernels on a GPU against kvq-core on the CPU. Without a GPU (CI) every test but the first prints
//! why it skips; `KVQ_REQUIRE_GPU=1` makes a missing GPU a failure instead (`scripts/gpu-check.sh` sets
//! it).
//!
//! - append: the device arena equals kvq-core's word for word after every append of random sizes, for
//!   fp16 and KIVI caches of several shapes, with sinks, windows and sliding;
//! - decode and prefill: within the bound derived in `tests/sim.rs` of the exact attention over
//!   kvq-core's dequantized rows, and of kvq-core's own attention, for tokens 1 to 128k, GQA 1, 3, 4 and
//!   8, head_dim 64, 128 and 256;
//! - the calibrated formats (kvq2, kvq3, KVQuant, SKVQ, MiKV, all at once), appended on the host and
//!   uploaded: decode and prefill within the same bound of the exact attention over kvq-core's rows;
//! - bad input: the errors kvq-core gives, and nothing on the device changes.

mod common;

use kvq_core::testing::{Rng, append_observed, fill_tables};

use std::sync::Arc;

use common::{Gen, check, check_exact, core_decode, core_prefill, rows, rows_and_chunk};
use kvq_core::cache::{Cache, CacheConfig, Overflow, Stream};
use kvq_core::pack::Width;
use kvq_gpu::{DeviceCache, Gpu, GpuError};

fn gpu() -> Option<Arc<Gpu>> {
    match Gpu::open(0) {
        Ok(g) => {
            eprintln!("GPU: {} ({})", g.name(), g.arch());
            Some(Arc::new(g))
        }
        Err(e) => {
            assert!(
                std::env::var_os("KVQ_REQUIRE_GPU").is_none(),
                "KVQ_REQUIRE_GPU is set but no GPU opened: {e}"
            );
            eprintln!("skipping: no GPU here ({e})");
            None
        }
    }
}

#[test]
fn no_gpu_is_an_error_not_a_panic() {
    match Gpu::open(0) {
        Ok(g) => eprintln!("a GPU is here: {} ({})", g.name(), g.arch()),
        Err(e @ (GpuError::NoDriver | GpuError::NoDevice(_) | GpuError::NoNvrtc)) => {
            assert!(!e.to_string().is_empty());
            eprintln!("no GPU, as expected on this machine: {e}");
        }
        Err(e) => panic!("unexpected error opening the GPU: {e}"),
    }
}

fn specs(heads: usize, d: usize, cap: usize) -> Vec<(&'static str, CacheConfig)> {
    vec![
        ("fp16", CacheConfig::fp16(heads, d, cap).with_sinks(4)),
        ("kivi2", CacheConfig::kivi(Width::B2, 32, 128, heads, d, cap).with_sinks(4)),
        ("kivi4", CacheConfig::kivi(Width::B4, 32, 128, heads, d, cap)),
        ("kivi8 g64", CacheConfig::kivi(Width::B8, 64, 64, heads, d, cap).with_sinks(2)),
        (
            "kivi2 slide",
            CacheConfig::kivi(Width::B2, 32, 64, heads, d, cap / 3)
                .with_sinks(4)
                .with_overflow(Overflow::Slide),
        ),
    ]
}

#[test]
fn device_append_equals_core_word_for_word() {
    let Some(gpu) = gpu() else { return };
    for (heads, d) in [(1usize, 64usize), (3, 128), (2, 256)] {
        for (name, cfg) in specs(heads, d, 3000) {
            let mut arena = vec![0u32; cfg.layout().unwrap().total_words];
            let mut cache = Cache::new(cfg, &mut arena).unwrap();
            let mut dev = DeviceCache::new(gpu.clone(), cfg).unwrap();
            let mut g = Gen(0x5eed ^ (heads * d) as u64);
            for (i, n) in [1usize, 2, 130, 1, 700, 64, 1500, 3, 900].into_iter().enumerate() {
                let n = if cfg.overflow == Overflow::Stop { n.min(cfg.capacity - cache.held()) } else { n };
                if n == 0 {
                    break;
                }
                let (k, v) = (g.rows(n, heads * d), g.rows(n, heads * d));
                cache.append(&k, &v).unwrap();
                dev.append(&k, &v).unwrap();
                assert_eq!(dev.counts(), cache.counts(), "{name} h{heads} d{d}: counts after append {i}");
                let got = dev.download().unwrap();
                if let Some(w) = (0..got.len()).find(|&w| got[w] != cache.words()[w]) {
                    panic!(
                        "{name} h{heads} d{d}: append {i} ({n}): word {w}: device {:#x}, core {:#x}",
                        got[w],
                        cache.words()[w]
                    );
                }
            }
        }
    }
}

fn decode_case(gpu: &Arc<Gpu>, name: &str, cfg: CacheConfig, ratio: usize, tokens: usize) {
    let (heads, d) = (cfg.kv_heads, cfg.head_dim);
    let q_heads = heads * ratio;
    let mut arena = vec![0u32; cfg.layout().unwrap().total_words];
    let mut cache = Cache::new(cfg, &mut arena).unwrap();
    let mut g = Gen(0xabcd ^ tokens as u64);
    let mut dev = DeviceCache::new(gpu.clone(), cfg).unwrap();
    let mut left = tokens;
    while left > 0 {
        let n = left.min(8192);
        let (k, v) = (g.rows(n, heads * d), g.rows(n, heads * d));
        cache.append(&k, &v).unwrap();
        dev.append(&k, &v).unwrap();
        left -= n;
    }
    let held = cache.held();
    let q = g.rows(1, q_heads * d);
    let scale = 1.0 / (d as f32).sqrt();
    let out = core_decode(&cache, &q, q_heads, scale);
    let got = dev.decode(&q, q_heads, scale).unwrap();
    let splits = dev.work(q_heads, 1).unwrap().splits().splits;
    for h in 0..heads {
        let (kr, vr) = (rows(&cache, Stream::Keys, h), rows(&cache, Stream::Values, h));
        for r in 0..ratio {
            let qh = h * ratio + r;
            let what = format!("{name}: {tokens} tokens, GQA {ratio}, d {d}, query head {qh}");
            let row = qh * d..(qh + 1) * d;
            check(&what, &got[row.clone()], &out[row.clone()], &kr, &vr, &q[row], scale, d, held, splits);
        }
    }
}

#[test]
fn device_decode_equals_core_within_the_bound() {
    let Some(gpu) = gpu() else { return };
    for d in [64usize, 128, 256] {
        for ratio in [1usize, 3, 4, 8] {
            let heads = if d == 256 { 1 } else { 2 };
            for (name, cfg) in specs(heads, d, 40_000) {
                for tokens in [1usize, 100, 4099, 40_000] {
                    decode_case(&gpu, name, cfg, ratio, tokens);
                }
            }
        }
    }
}

#[test]
fn device_decode_at_128k_tokens() {
    let Some(gpu) = gpu() else { return };
    for (name, cfg) in specs(1, 128, 131_072).into_iter().take(3) {
        decode_case(&gpu, name, cfg, 4, 131_072);
    }
}

#[test]
fn device_prefill_equals_core_within_the_bound() {
    let Some(gpu) = gpu() else { return };
    let (heads, ratio, d) = (2usize, 3usize, 128usize);
    let q_heads = heads * ratio;
    for (name, cfg) in specs(heads, d, 6000) {
        for (before, n) in [(0usize, 1usize), (0, 7), (500, 130), (3001, 64)] {
            let mut arena = vec![0u32; cfg.layout().unwrap().total_words];
            let mut cache = Cache::new(cfg, &mut arena).unwrap();
            let mut dev = DeviceCache::new(gpu.clone(), cfg).unwrap();
            let mut g = Gen(0xfeed ^ before as u64);
            if before > 0 {
                let (k, v) = (g.rows(before, heads * d), g.rows(before, heads * d));
                cache.append(&k, &v).unwrap();
                dev.append(&k, &v).unwrap();
            }
            let held = cache.held();
            let (ck, cv, q) = (g.rows(n, heads * d), g.rows(n, heads * d), g.rows(n, q_heads * d));
            let scale = 0.0884;
            let out = core_prefill(&cache, &q, &ck, &cv, q_heads, scale);
            let got = dev.prefill(&q, &ck, &cv, q_heads, scale).unwrap();
            let splits = dev.work(q_heads, n).unwrap().splits().splits;
            for h in 0..heads {
                let kr = rows_and_chunk(&cache, Stream::Keys, h, &ck);
                let vr = rows_and_chunk(&cache, Stream::Values, h, &cv);
                for i in 0..n {
                    for r in 0..ratio {
                        let row = (i * q_heads + h * ratio + r) * d;
                        let what =
                            format!("{name} prefill {n} after {before}: position {i}, head {h}, r {r}");
                        let q = &q[row..row + d];
                        check(
                            &what,
                            &got[row..row + d],
                            &out[row..row + d],
                            &kr,
                            &vr,
                            q,
                            scale,
                            d,
                            held + i + 1,
                            splits,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn device_reads_calibrated_formats_within_the_bound() {
    let Some(gpu) = gpu() else { return };
    for (heads, d) in [(3usize, 64usize), (1, 128), (1, 256)] {
        for (name, cfg) in common::calibrated_configs(heads, d, 6000) {
            for ratio in [1usize, 3, 8] {
                for tokens in [1usize, 100, 3001] {
                    let q_heads = heads * ratio;
                    let mut arena = vec![0u32; cfg.layout().unwrap().total_words];
                    let mut cache = Cache::new(cfg, &mut arena).unwrap();
                    let mut g = Gen(0xc0ffee ^ tokens as u64);
                    let mut rng = Rng::new(g.0);
                    fill_tables(&mut cache, &mut rng);
                    let (k, v) = (g.rows(tokens, heads * d), g.rows(tokens, heads * d));
                    append_observed(&mut cache, &k, &v, &mut rng);
                    let mut dev = DeviceCache::new(gpu.clone(), cfg).unwrap();
                    assert!(!dev.appends_on_device());
                    assert!(matches!(
                        dev.append(&k[..heads * d], &v[..heads * d]),
                        Err(GpuError::Unsupported { .. })
                    ));
                    let dev = DeviceCache::upload(gpu.clone(), cfg, cache.words(), cache.counts()).unwrap();
                    let held = cache.held();
                    let scale = 1.0 / (d as f32).sqrt();
                    // Decode, then a prefill chunk of 7 positions over the same cache.
                    let q = g.rows(1, q_heads * d);
                    let got = dev.decode(&q, q_heads, scale).unwrap();
                    let splits = dev.work(q_heads, 1).unwrap().splits().splits;
                    let n = 7;
                    let (ck, cv, qp) = (g.rows(n, heads * d), g.rows(n, heads * d), g.rows(n, q_heads * d));
                    let gotp = dev.prefill(&qp, &ck, &cv, q_heads, scale).unwrap();
                    let splits_p = dev.work(q_heads, n).unwrap().splits().splits;
                    for h in 0..heads {
                        let (kr, vr) = (rows(&cache, Stream::Keys, h), rows(&cache, Stream::Values, h));
                        let kc = rows_and_chunk(&cache, Stream::Keys, h, &ck);
                        let vc = rows_and_chunk(&cache, Stream::Values, h, &cv);
                        for r in 0..ratio {
                            let qh = h * ratio + r;
                            let what =
                                format!("{name}: {tokens} tokens, GQA {ratio}, d {d}, query head {qh}");
                            let row = qh * d..(qh + 1) * d;
                            check_exact(&what, &got[row.clone()], &kr, &vr, &q[row], scale, d, held, splits);
                            for i in 0..n {
                                let row = (i * q_heads + qh) * d..(i * q_heads + qh + 1) * d;
                                check_exact(
                                    &format!("{what}, prefill position {i}"),
                                    &gotp[row.clone()],
                                    &kc,
                                    &vc,
                                    &qp[row],
                                    scale,
                                    d,
                                    held + i + 1,
                                    splits_p,
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let Some(gpu) = gpu() else { return };
    let (heads, d) = (2usize, 64usize);
    let cfg = CacheConfig::kivi(Width::B2, 32, 64, heads, d, 300).with_sinks(4);
    let mut dev = DeviceCache::new(gpu, cfg).unwrap();
    let mut g = Gen(9);
    dev.append(&g.rows(100, heads * d), &g.rows(100, heads * d)).unwrap();
    let (before, counts) = (dev.download().unwrap(), dev.counts());
    let mut k = g.rows(10, heads * d);
    k[17] = f32::NAN;
    let v = g.rows(10, heads * d);
    assert!(matches!(dev.append(&k, &v), Err(GpuError::Core(kvq_core::Error::NonFinite { index: 17 }))));
    k[17] = 1e6;
    assert!(matches!(dev.append(&k, &v), Err(GpuError::Core(kvq_core::Error::ParamOverflow { .. }))));
    let (k, v) = (g.rows(201, heads * d), g.rows(201, heads * d));
    assert!(matches!(dev.append(&k, &v), Err(GpuError::Core(kvq_core::Error::ContextFull { .. }))));
    assert!(matches!(
        dev.append(&k[..5], &v[..5]),
        Err(GpuError::Core(kvq_core::Error::ShapeMismatch { .. }))
    ));
    let q = g.rows(1, 5 * d);
    assert!(dev.decode(&q, 5, 0.125).is_err());
    let q = g.rows(1, 2 * heads * d);
    assert!(matches!(
        dev.decode(&q, 2 * heads, f32::NAN),
        Err(GpuError::Core(kvq_core::Error::NonFinite { .. }))
    ));
    assert_eq!(dev.download().unwrap(), before);
    assert_eq!(dev.counts(), counts);
}
