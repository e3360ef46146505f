//! Decode-attention benchmark: one decode step over all 30 layers' caches of the default model's shape
//! (3 KV heads x 3 query heads, head_dim 64), per cache policy, against the fp16 cache in the same run.
//!
//! ```text
//! cargo run --release -p kvq-core --example decode_bench                  # table
//! cargo run --release -p kvq-core --example decode_bench -- --json        # one JSON record per line
//! options: --tokens 1024,4096,16384,65536  --specs fp16,kivi2,kivi4  --threads 1,2  --layers 30
//!          (specs: fp16, kivi2, kivi4, kivi8, any +int8 and/or +avx2 (the AVX2 kernels where AVX-512
//!          would run, to compare the two in one run); the presets kvq2, kvq3, kvquant2..4, skvq2, mikv2,
//!          and kvq2kp8 (`kvq2` until 2026-12-06), kvq2k2 (the all-2-bit `kvq2:k=2:kg=32:kp=f16`); the
//!          ingredients alone over KIVI-2: rot, rope, nuq, out, fp8, tier)
//!          --portable (also time the scalar kernels, up to 16k tokens)  --reps N
//!          --prefill N (time a prefill of an N-token chunk over the cache instead of a decode step)
//! ```
//!
//! Each step reads every layer's whole cache, as the model does, so at 16k tokens the fp16 caches
//! (377 MB) come from DRAM, not the 32 MiB L3. Specs are timed in alternation, one step each in turn, and
//! the median step is reported. The memory bandwidth is measured in two ways in the same run: once at the
//! start (the best of 5 reads of a 1 GiB buffer), and as each spec's **read bound**, a plain read of as
//! many bytes as that spec's step reads (per layer, split across threads the same way), timed right after
//! each of its steps in the same alternation, so that it meets the same machine as the step it bounds.
//! The table and `--json` give each spec's bound (`read_bound_ms`), the share of it the step reaches
//! (`bound_share`, bound over step: 1 means as fast as reading its bytes) and the ratio to fp16
//! (`speedup_vs_fp16`).

use kvq_core::attention::{Kernel, decode, decode_scratch_len, prefill, prefill_scratch_len};
use kvq_core::cache::{Cache, CacheConfig, Precision, QuantSpec, Tiers, Transform};
use kvq_core::pack::Width;
use kvq_core::quant::param::ParamFormat::Fp8E4M3;
use kvq_core::transform::{Pairing, Rope};
use rayon::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::time::Instant;

const KV_HEADS: usize = 3;
const Q_HEADS: usize = 9;
const HEAD_DIM: usize = 64;

struct Rng(u64);
impl Rng {
    fn unit(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn spec(name: &str, capacity: usize) -> Option<CacheConfig> {
    Some(match name {
        "fp16" => CacheConfig::fp16(KV_HEADS, HEAD_DIM, capacity),
        "kivi2" => CacheConfig::kivi(Width::B2, 32, 128, KV_HEADS, HEAD_DIM, capacity),
        "kivi4" => CacheConfig::kivi(Width::B4, 32, 128, KV_HEADS, HEAD_DIM, capacity),
        "kivi8" => CacheConfig::kivi(Width::B8, 32, 128, KV_HEADS, HEAD_DIM, capacity),
        // The method presets' formats (kvq's `--kv` presets, with the tables' default values: speed does
        // not depend on the calibrated numbers), and each ingredient alone over KIVI-2.
        // kvq2: 3-bit keys in 64-token groups, 2-bit values with FP8 parameters; kvq2g128: 3-bit keys in
        // 128-token groups, f16 value parameters (`kvq2` on the afternoon of 2026-12-06); kvq2kp8: FP8 key
        // parameters, f16 value parameters (`kvq2` until that morning); kvq2k2: the all-2-bit recipe
        // (`kvq2:k=2:kg=32:kp=f16:vp=f16`); kvq3: 3-bit keys and values.
        "kvq2" => kvq(
            capacity,
            QuantSpec::per_channel(Width::B3, 64),
            QuantSpec::per_token(Width::B2, 64).with_params(Fp8E4M3),
        ),
        "kvq2g128" => {
            kvq(capacity, QuantSpec::per_channel(Width::B3, 128), QuantSpec::per_token(Width::B2, 64))
        }
        "kvq2kp8" => kvq(
            capacity,
            QuantSpec::per_channel(Width::B3, 64).with_params(Fp8E4M3),
            QuantSpec::per_token(Width::B2, 64),
        ),
        "kvq2k2" => kvq(capacity, QuantSpec::per_channel(Width::B2, 32), QuantSpec::per_token(Width::B2, 64)),
        "kvq3" => kvq(capacity, QuantSpec::per_channel(Width::B3, 32), QuantSpec::per_token(Width::B3, 64)),
        "kvquant2" => kvquant(capacity, Width::B2),
        "kvquant3" => kvquant(capacity, Width::B3),
        "kvquant4" => kvquant(capacity, Width::B4),
        "skvq2" => CacheConfig {
            keys: Precision::Quant(
                QuantSpec { permuted: true, clip: 0.9, ..QuantSpec::per_token(Width::B2, 32) }
                    .with_params(Fp8E4M3),
            ),
            values: Precision::Quant(
                QuantSpec { permuted: true, clip: 0.9, ..QuantSpec::per_token(Width::Ternary, 32) }
                    .with_params(Fp8E4M3),
            ),
            ..kivi2(capacity).with_sinks(5)
        },
        "mikv2" => CacheConfig {
            keys: Precision::Quant(QuantSpec::per_channel(Width::B2, 32).with_params(Fp8E4M3)),
            values: Precision::Quant(QuantSpec::per_token(Width::B2, 32).with_params(Fp8E4M3)),
            ..kivi2(capacity)
                .with_sinks(4)
                .with_transform(Transform { balance_keys: true, ..Transform::NONE })
                .with_tiers(TIERS)
        },
        "tier" => kivi2(capacity).with_tiers(TIERS),
        "rot" => kivi2(capacity).with_transform(Transform {
            rotate_keys: true,
            rotate_values: true,
            ..Transform::NONE
        }),
        "rope" => kivi2(capacity).with_transform(Transform { rope: ROPE, ..Transform::NONE }),
        "nuq" => CacheConfig {
            keys: Precision::Quant(QuantSpec::per_channel(Width::B2, 32).with_codebook()),
            values: Precision::Quant(QuantSpec::per_token(Width::B2, 32).with_codebook()),
            ..kivi2(capacity)
        },
        "out" => CacheConfig {
            keys: Precision::Quant(QuantSpec::per_channel(Width::B2, 32).with_outliers(20)),
            values: Precision::Quant(QuantSpec::per_token(Width::B2, 32).with_outliers(2)),
            ..kivi2(capacity)
        },
        "fp8" => CacheConfig {
            keys: Precision::Quant(QuantSpec::per_channel(Width::B2, 32).with_params(Fp8E4M3)),
            values: Precision::Quant(QuantSpec::per_token(Width::B2, 32).with_params(Fp8E4M3)),
            ..kivi2(capacity)
        },
        _ => return None,
    })
}

/// MiKV's tiers as `mikv2` sets them: two tokens of each 32-token key group corrected at 4 bits.
const TIERS: Tiers = Tiers { keep: 2, width: Width::B4 };

const ROPE: Option<Rope> = Some(Rope { base: 100_000.0, pairing: Pairing::Adjacent });

/// KVQuant's format at `bits` as the `kvquantN` presets set it: keys relative to their group, codebook
/// levels, 1% outliers (20 slots per 32-token key group of 64 channels, 2 per token of 3 value heads), one
/// sink.
fn kvquant(capacity: usize, bits: Width) -> CacheConfig {
    CacheConfig {
        keys: Precision::Quant(QuantSpec::per_channel(bits, 32).with_codebook().with_outliers(20)),
        values: Precision::Quant(QuantSpec::per_token(bits, 32).with_codebook().with_outliers(2)),
        ..kivi2(capacity).with_sinks(1).with_transform(Transform { rope: ROPE, ..Transform::NONE })
    }
}

/// kvq's recipe over the given key and value formats: rotated, keys relative to their group, four sinks.
fn kvq(capacity: usize, keys: QuantSpec, values: QuantSpec) -> CacheConfig {
    let c = kivi2(capacity).with_sinks(4).with_transform(Transform {
        rope: ROPE,
        rotate_keys: true,
        rotate_values: true,
        ..Transform::NONE
    });
    CacheConfig { keys: Precision::Quant(keys), values: Precision::Quant(values), ..c }
}

fn kivi2(capacity: usize) -> CacheConfig {
    CacheConfig::kivi(Width::B2, 32, 128, KV_HEADS, HEAD_DIM, capacity)
}

/// One policy's caches for every layer, each over its own arena.
struct Model {
    name: String,
    /// Read with the int8 path (a spec named with `+int8`, e.g. `kivi2+int8`).
    int8: bool,
    /// Read with the AVX2 kernels where the run's are AVX-512 (a spec named with `+avx2`).
    avx2: bool,
    layers: Vec<Cache<'static>>,
}

impl Model {
    /// The kernel this spec runs in a round of `kernel`.
    fn kernel(&self, kernel: Kernel) -> Kernel {
        let k =
            if self.avx2 && kernel != Kernel::PORTABLE { Kernel::avx2().unwrap_or(kernel) } else { kernel };
        k.with_int8(self.int8)
    }

    fn bytes(&self) -> usize {
        self.layers.iter().map(|c| c.usage().total_bytes()).sum()
    }
}

/// The wrapping sum of `part`, eight lanes at a time: a plain read of every word.
fn sum_words(part: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in part.chunks_exact(8) {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(x);
        }
    }
    acc.iter().fold(0, |a, &b| a ^ b)
}

/// `f` over `items` on the calling thread, or over one part per thread of `pool` in parallel, the parts'
/// results xored.
fn xor_parts<T: Sync>(items: &[T], pool: Option<&ThreadPool>, f: impl Fn(&[T]) -> u64 + Sync) -> u64 {
    match pool {
        None => f(items),
        Some(p) => {
            let per = items.len().div_ceil(p.current_num_threads());
            p.install(|| items.par_chunks(per).map(&f).reduce(|| 0, |a, b| a ^ b))
        }
    }
}

/// Streams `buf` once per pass, summing it; returns the best of `passes` in GB/s.
fn membw(buf: &[u64], pool: Option<&ThreadPool>, passes: usize) -> f64 {
    let mut best = f64::INFINITY;
    let mut sink = 0u64;
    for _ in 0..passes {
        let t = Instant::now();
        sink ^= xor_parts(buf, pool, sum_words);
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (buf.len() * 8) as f64 / best / 1e9
}

/// A read bound's step: the first `words` of every layer's buffer (as many bytes as one layer's cache of
/// the spec it bounds holds), split across the pool's threads by layer as [`step`] splits the caches.
fn read_step(bufs: &[Vec<u64>], words: usize, pool: Option<&ThreadPool>) -> u64 {
    xor_parts(bufs, pool, |layers| layers.iter().fold(0, |a, b| a ^ sum_words(&b[..words])))
}

/// A prefill chunk's queries, keys and values (`[n][heads][head_dim]` each).
struct Chunk {
    q: Vec<f32>,
    kv: Vec<f32>,
}

/// One decode step over every layer (or, given a chunk, one prefill of it over every layer's cache), on
/// the calling thread or split by layer across a pool's threads (kept from step to step, as the runtime's
/// rayon pool is: a thread spawned per step cost about 80 us of a 2-layer step).
fn step(
    model: &Model,
    q: &[f32],
    chunk: Option<&Chunk>,
    scratch: &mut [Vec<f32>],
    outs: &mut [Vec<f32>],
    pool: Option<&ThreadPool>,
    kernel: Kernel,
) {
    let kernel = model.kernel(kernel);
    let work = |((layers, scr), out): ((&[Cache<'static>], &mut Vec<f32>), &mut Vec<f32>)| {
        for cache in layers {
            match chunk {
                None => decode(cache, q, Q_HEADS, 0.125, out, scr, kernel).map(drop),
                Some(c) => prefill(cache, &c.q, &c.kv, &c.kv, Q_HEADS, 0.125, out, scr, kernel),
            }
            .expect("attention");
        }
    };
    match pool {
        None => work(((&model.layers[..], &mut scratch[0]), &mut outs[0])),
        Some(p) => {
            let per = model.layers.len().div_ceil(p.current_num_threads());
            p.install(|| {
                model
                    .layers
                    .par_chunks(per)
                    .zip(scratch.par_iter_mut())
                    .zip(outs.par_iter_mut())
                    .for_each(work)
            });
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The benchmark's options (see the module docs).
#[derive(clap::Parser)]
struct Opts {
    /// Cache lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384,65536")]
    tokens: Vec<usize>,
    /// Specs to time (fp16 first gives the ratios).
    #[arg(long, value_delimiter = ',', default_value = "fp16,kivi2,kivi2+int8,kivi4")]
    specs: Vec<String>,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Layers per step.
    #[arg(long, default_value_t = 30)]
    layers: usize,
    /// Timed repetitions (default: by length).
    #[arg(long)]
    reps: Option<usize>,
    /// Time a prefill of an N-token chunk over the cache instead of a decode step.
    #[arg(long, value_name = "N")]
    prefill: Option<usize>,
    /// Also time the scalar kernels (up to 16k tokens).
    #[arg(long)]
    portable: bool,
    /// One JSON record per line instead of the table.
    #[arg(long)]
    json: bool,
}

fn main() {
    let opts = <Opts as clap::Parser>::parse();
    let Opts {
        tokens,
        specs,
        threads,
        layers: n_layers,
        reps,
        prefill: chunk_len,
        portable: with_portable,
        json,
    } = opts;
    assert!(!tokens.is_empty() && !threads.is_empty() && n_layers > 0, "--tokens, --threads and --layers");
    let capacity = *tokens.iter().max().expect("tokens") + 1;
    let fast = Kernel::detect();
    let mut kernels = vec![fast];
    if with_portable && fast != Kernel::PORTABLE {
        kernels.push(Kernel::PORTABLE);
    }

    let buf: Vec<u64> = (0..(1usize << 27)).map(|i| i as u64).collect(); // 1 GiB
    // A pool per thread count, kept for the whole run (one thread runs on the calling thread).
    let pools: Vec<(usize, Option<ThreadPool>)> = threads
        .iter()
        .map(|&t| (t, (t > 1).then(|| ThreadPoolBuilder::new().num_threads(t).build().expect("threads"))))
        .collect();
    let bw: Vec<(usize, f64)> = pools.iter().map(|(t, p)| (*t, membw(&buf, p.as_ref(), 5))).collect();
    drop(buf);
    if !json {
        for (t, b) in &bw {
            println!("memory bandwidth, {t} thread(s): {b:.1} GB/s (read, best of 5 passes over 1 GiB)");
        }
        println!("kernels: {}", kernels.iter().map(Kernel::name).collect::<Vec<_>>().join(", "));
    }

    let mut models: Vec<Model> = specs
        .iter()
        .map(|name| {
            let (mut base, mut int8, mut avx2) = (name.as_str(), false, false);
            loop {
                if let Some(b) = base.strip_suffix("+int8") {
                    (base, int8) = (b, true);
                } else if let Some(b) = base.strip_suffix("+avx2") {
                    (base, avx2) = (b, true);
                } else {
                    break;
                }
            }
            let cfg = spec(base, capacity).unwrap_or_else(|| panic!("unknown spec {name}"));
            let layers = (0..n_layers)
                .map(|_| {
                    let arena: &'static mut [u32] =
                        Vec::leak(vec![0u32; cfg.layout().expect("layout").total_words]);
                    Cache::new(cfg, arena).expect("cache")
                })
                .collect();
            Model { name: name.clone(), int8, avx2, layers }
        })
        .collect();

    // The read bounds: per layer a buffer as large as the largest spec's arena, of which each round reads,
    // after each spec's step, as many bytes as that step does, timed in the same alternation (so that each
    // bound meets the machine its step meets).
    let fp16_at = models.iter().position(|m| m.name == "fp16");
    let read_words_max = models
        .iter()
        .map(|m| m.layers[0].config().layout().expect("layout").total_words.div_ceil(2))
        .max()
        .unwrap_or(0);
    let read_bufs: Vec<Vec<u64>> = (0..n_layers).map(|_| (0..read_words_max as u64).collect()).collect();

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let hd = KV_HEADS * HEAD_DIM;
    let mut held = 0;
    let max_threads = *threads.iter().max().unwrap_or(&1);
    // The KIVI kernels' scratch, plus what the generic formats need.
    let scratch_len = models
        .iter()
        .map(|m| {
            let c = m.layers[0].config();
            match chunk_len {
                None => c.decode_scratch_len(Q_HEADS),
                Some(n) => c.prefill_scratch_len(n, Q_HEADS),
            }
        })
        .max()
        .unwrap_or(0)
        .max(match chunk_len {
            None => decode_scratch_len(capacity, Q_HEADS, KV_HEADS, HEAD_DIM),
            Some(n) => prefill_scratch_len(capacity, n, Q_HEADS, KV_HEADS, HEAD_DIM),
        });
    let mut scratch: Vec<Vec<f32>> = (0..max_threads).map(|_| vec![0.0; scratch_len]).collect();
    let rows = chunk_len.unwrap_or(1);
    let mut outs: Vec<Vec<f32>> = (0..max_threads).map(|_| vec![0.0; rows * Q_HEADS * HEAD_DIM]).collect();
    let chunk = chunk_len.map(|n| Chunk {
        q: (0..n * Q_HEADS * HEAD_DIM).map(|_| rng.unit()).collect(),
        kv: (0..n * hd).map(|_| rng.unit()).collect(),
    });
    if let (Some(n), false) = (chunk_len, json) {
        println!("prefill of a {n}-token chunk over the cache: us/step is per chunk, over every layer");
    }
    if !json {
        println!(
            "{:>6} {:>10} {:>3} {:>13} {:>12} {:>9} {:>10} {:>10} {:>8} {:>9}",
            "tokens",
            "spec",
            "thr",
            "kernel",
            "us/step",
            "MB/step",
            "GB/s",
            "bound us",
            "of bound",
            "vs fp16"
        );
    }
    let mut obs = Rng(0x5eed_0b5e);
    for &t in &tokens {
        // Grow every layer of every model to t tokens with the same keys and values.
        let mut k = vec![0.0f32; hd];
        let mut v = vec![0.0f32; hd];
        while held < t {
            for layer in 0..n_layers {
                for (i, x) in k.iter_mut().enumerate() {
                    *x = rng.unit() * if i % 17 == 3 { 8.0 } else { 1.0 } + (i % 5) as f32 * 0.3;
                }
                for x in v.iter_mut() {
                    *x = rng.unit();
                }
                for m in models.iter_mut() {
                    let c = &mut m.layers[layer];
                    c.append(&k, &v).expect("append");
                    // Tiered caches: attention received by the window, so that tokens get promoted.
                    for h in 0..KV_HEADS {
                        let p: Vec<f32> = (0..c.tier_window()).map(|_| obs.unit().abs()).collect();
                        c.observe(h, &p).expect("observe");
                    }
                }
            }
            held += 1;
        }
        let q: Vec<f32> = (0..Q_HEADS * HEAD_DIM).map(|_| rng.unit()).collect();
        for (th, pool) in &pools {
            let (th, pool) = (*th, pool.as_ref());
            for &kernel in &kernels {
                if kernel == Kernel::PORTABLE && t > 16384 {
                    continue;
                }
                let bytes: Vec<usize> = models.iter().map(Model::bytes).collect();
                // Enough alternating rounds for about a second of the slowest spec, at least 5.
                let t0 = Instant::now();
                step(&models[0], &q, chunk.as_ref(), &mut scratch, &mut outs, pool, kernel);
                let first = t0.elapsed().as_secs_f64();
                let rounds = reps.unwrap_or(((1.0 / (first * models.len() as f64)) as usize).clamp(5, 200));
                let mut times = vec![Vec::new(); models.len()];
                let mut reads = vec![Vec::new(); models.len()];
                let read_words: Vec<usize> =
                    models.iter().map(|m| m.layers[0].usage().total_bytes().div_ceil(8)).collect();
                let mut sink = 0;
                for _ in 0..rounds {
                    for (i, m) in models.iter().enumerate() {
                        let s = Instant::now();
                        step(m, &q, chunk.as_ref(), &mut scratch, &mut outs, pool, kernel);
                        times[i].push(s.elapsed().as_secs_f64());
                        let s = Instant::now();
                        sink ^= read_step(&read_bufs, read_words[i], pool);
                        reads[i].push(s.elapsed().as_secs_f64());
                    }
                }
                std::hint::black_box(sink);
                // Each spec's read bound: a plain read of its step's bytes (median), and fp16's in GB/s.
                let bound_s: Vec<f64> = reads.into_iter().map(median).collect();
                let read_gbs = fp16_at.map_or(f64::NAN, |i| bytes[i] as f64 / bound_s[i] / 1e9);
                let med: Vec<f64> = times.into_iter().map(median).collect();
                let base = fp16_at.map(|i| med[i]);
                let kname = |m: &Model| m.kernel(kernel).name();
                let bound = bw.iter().find(|(x, _)| *x == th).map_or(0.0, |b| b.1);
                for (i, m) in models.iter().enumerate() {
                    let gbs = bytes[i] as f64 / med[i] / 1e9;
                    let speedup = base.map_or(f64::NAN, |b| b / med[i]);
                    // The share of its read bound the step reaches (1: as fast as reading its bytes).
                    let share = bound_s[i] / med[i];
                    if json {
                        let record = serde_json::json!({
                            "spec": m.name,
                            "tokens": t,
                            "threads": th,
                            "kernel": kname(m),
                            "ns_per_step": (med[i] * 1e9).round(),
                            "gb_per_s": gbs,
                            "speedup_vs_fp16": speedup.is_finite().then_some(speedup),
                            "bytes_per_step": bytes[i],
                            "read_bound_ms": bound_s[i] * 1e3,
                            "bound_share": share,
                            "mem_bw_gb_per_s": bound,
                            "read_bound_gb_per_s": read_gbs.is_finite().then_some(read_gbs),
                            "layers": n_layers,
                            "prefill_chunk": chunk_len.unwrap_or(0),
                        });
                        println!("{record}");
                    } else {
                        println!(
                            "{t:>6} {:>10} {th:>3} {:>13} {:>12.1} {:>9.2} {:>10.2} {:>10.1} {:>7.0}% {:>8.2}x{}",
                            m.name,
                            kname(m),
                            med[i] * 1e6,
                            bytes[i] as f64 / 1e6,
                            gbs,
                            bound_s[i] * 1e6,
                            share * 100.0,
                            speedup,
                            if m.name == "fp16" {
                                format!(
                                    "   ({:.0}% of the read bound, {read_gbs:.1} GB/s; {:.0}% of {bound:.1})",
                                    gbs / read_gbs * 100.0,
                                    gbs / bound * 100.0
                                )
                            } else {
                                String::new()
                            }
                        );
                    }
                }
            }
        }
    }
}
