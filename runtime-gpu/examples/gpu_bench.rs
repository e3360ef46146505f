//! Decode attention on the GPU per step, over all layers of a model's shape, fp16 against KIVI-2 and
//! KIVI-4 (and `kvq2`, read by the generic kernels) in the same run, with the device's copy bandwidth
//! measured in the same run.
//!
//! ```text
//! cargo run --release -p kvq-gpu --example gpu_bench -- [--tokens 4096,16384,65536,131072]
//!     [--model smollm2,gemma3] [--specs fp16,kivi2,kivi4,kvq2] [--reps 50] [--json]
//! ```
//!
//! Shapes: SmolLM2-135M (30 layers, 3 KV heads, 9 query heads, head_dim 64) and Gemma 3 270M (18 layers,
//! 1 KV head, 4 query heads, head_dim 256; its 3 global layers hold the context in the spec, its 15 local
//! layers an fp16 window of 512 tokens). The caches are filled with synthetic keys and values through
//! the device append; `kvq2` (the model's recipe, uncalibrated tables) is filled by kvq-core on the host
//! and uploaded. Bytes read are the bytes the caches hold (kvq-core's accounting).

mod support;

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use kvq_core::cache::{Cache, CacheConfig, Overflow, Precision, QuantSpec, Transform};
use kvq_core::pack::Width;
use kvq_core::quant::param::ParamFormat;
use kvq_core::transform::{Pairing, Rope};
use kvq_gpu::{DeviceCache, Gpu};
use support::rows;

#[derive(Parser)]
struct Args {
    /// Context lengths.
    #[arg(long, value_delimiter = ',', default_value = "4096,16384,65536,131072")]
    tokens: Vec<usize>,
    /// Model shapes: smollm2, gemma3.
    #[arg(long, value_delimiter = ',', default_value = "smollm2,gemma3")]
    model: Vec<String>,
    /// Caches: fp16, kivi2, kivi4, kvq2.
    #[arg(long, value_delimiter = ',', default_value = "fp16,kivi2,kivi4,kvq2")]
    specs: Vec<String>,
    /// Timed steps.
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

struct Shape {
    layers: usize,
    local: usize,
    window: usize,
    kv_heads: usize,
    q_heads: usize,
    d: usize,
}

fn shape(name: &str) -> Result<Shape> {
    Ok(match name {
        "smollm2" => Shape { layers: 30, local: 0, window: 0, kv_heads: 3, q_heads: 9, d: 64 },
        "gemma3" => Shape { layers: 18, local: 15, window: 512, kv_heads: 1, q_heads: 4, d: 256 },
        _ => anyhow::bail!("unknown model shape {name} (smollm2, gemma3)"),
    })
}

fn config(spec: &str, model: &str, heads: usize, d: usize, cap: usize) -> Result<CacheConfig> {
    Ok(match spec {
        "fp16" => CacheConfig::fp16(heads, d, cap),
        "kivi2" => CacheConfig::kivi(Width::B2, 32, 128, heads, d, cap),
        "kivi4" => CacheConfig::kivi(Width::B4, 32, 128, heads, d, cap),
        "kvq2" => {
            // kvq's 2-bit recipe (kvq-host's `kvq2` preset): 3-bit keys in 64-token groups before RoPE,
            // 2-bit values in 64-channel groups with FP8 parameters, 4 sinks; values rotated, and keys
            // too except on a model whose keys pass a per-head norm (Gemma 3).
            let gemma = model == "gemma3";
            let rope = if gemma {
                Rope { base: 1_000_000.0, pairing: Pairing::Halves }
            } else {
                Rope { base: 10_000.0, pairing: Pairing::Adjacent }
            };
            CacheConfig {
                keys: Precision::Quant(QuantSpec::per_channel(Width::B3, 64)),
                values: Precision::Quant(
                    QuantSpec::per_token(Width::B2, 64).with_params(ParamFormat::Fp8E4M3),
                ),
                ..CacheConfig::kivi(Width::B2, 32, 128, heads, d, cap).with_sinks(4).with_transform(
                    Transform {
                        rope: Some(rope),
                        rotate_keys: !gemma,
                        rotate_values: true,
                        ..Transform::NONE
                    },
                )
            }
        }
        _ => anyhow::bail!("unknown spec {spec} (fp16, kivi2, kivi4, kvq2)"),
    })
}

/// A cache of `cfg` filled with `tokens` synthetic tokens: on the device, or for a format the device does
/// not append, by kvq-core on the host and uploaded.
fn filled(gpu: &Arc<Gpu>, cfg: CacheConfig, tokens: usize) -> Result<DeviceCache> {
    let hd = cfg.kv_heads * cfg.head_dim;
    let (mut seed, mut left) = (0x9e37_79b9_7f4a_7c15u64, tokens);
    // The next (up to) 8192 tokens' keys and values.
    let mut next = || {
        let n = left.min(8192);
        left -= n;
        (n > 0).then(|| (rows(&mut seed, n * hd), rows(&mut seed, n * hd)))
    };
    let mut dev = DeviceCache::new(gpu.clone(), cfg)?;
    if dev.appends_on_device() {
        while let Some((k, v)) = next() {
            dev.append(&k, &v)?;
        }
        return Ok(dev);
    }
    // Uploaded whole at the end: no device arena until then.
    drop(dev);
    let mut arena = vec![0u32; cfg.layout()?.total_words];
    let mut host = Cache::new(cfg, &mut arena)?;
    while let Some((k, v)) = next() {
        host.append(&k, &v)?;
    }
    Ok(DeviceCache::upload(gpu.clone(), cfg, host.words(), host.counts())?)
}

/// Copy bandwidth in GB/s (bytes read plus bytes written), over 512 MiB.
fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let words = 128 << 20;
    let src = gpu.stream().alloc_zeros::<u32>(words)?;
    let mut dst = gpu.stream().alloc_zeros::<u32>(words)?;
    gpu.launch_copy(&src, &mut dst, words / 4)?;
    gpu.stream().synchronize()?;
    let reps = 20;
    let t = Instant::now();
    for _ in 0..reps {
        gpu.launch_copy(&src, &mut dst, words / 4)?;
    }
    gpu.stream().synchronize()?;
    Ok(2.0 * (words * 4 * reps) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let gpu = Arc::new(Gpu::open(0).context("gpu_bench needs an NVIDIA GPU")?);
    let bw = copy_bandwidth(&gpu)?;
    if !a.json {
        println!("{} ({}), {} SMs: copy {bw:.1} GB/s", gpu.name(), gpu.arch(), gpu.multiprocessors());
        println!(
            "{:<8} {:>7} {:<6} {:>10} {:>10} {:>8} {:>7} {:>8}",
            "model", "tokens", "spec", "us/step", "MB read", "GB/s", "% copy", "vs fp16"
        );
    }
    for m in &a.model {
        let s = shape(m)?;
        for &tokens in &a.tokens {
            let mut fp16_us = None;
            for spec in &a.specs {
                let global = filled(&gpu, config(spec, m, s.kv_heads, s.d, tokens + 1)?, tokens)?;
                let local = if s.local > 0 {
                    let cfg = CacheConfig::fp16(s.kv_heads, s.d, s.window).with_overflow(Overflow::Slide);
                    Some(filled(&gpu, cfg, tokens.min(s.window))?)
                } else {
                    None
                };
                let mut layers = Vec::new();
                for l in 0..s.layers {
                    let src = if l < s.local { local.as_ref().unwrap() } else { &global };
                    layers.push(src.try_clone()?);
                }
                drop((global, local));
                let bytes: usize = layers.iter().map(|c| c.usage().total_bytes()).sum();
                let mut seed = 7u64;
                let q = gpu.stream().clone_htod(&rows(&mut seed, s.q_heads * s.d))?;
                let mut out = gpu.stream().alloc_zeros::<f32>(s.q_heads * s.d)?;
                let mut work: Vec<_> =
                    layers.iter().map(|c| c.work(s.q_heads, 1)).collect::<Result<_, _>>()?;
                let scale = 1.0 / (s.d as f32).sqrt();
                let mut step = |work: &mut Vec<kvq_gpu::AttendWork>| -> Result<()> {
                    for (c, w) in layers.iter().zip(work.iter_mut()) {
                        c.attend_device(&q, None, s.q_heads, scale, w, &mut out)?;
                    }
                    Ok(())
                };
                step(&mut work)?;
                gpu.stream().synchronize()?;
                let t = Instant::now();
                for _ in 0..a.reps {
                    step(&mut work)?;
                }
                gpu.stream().synchronize()?;
                let us = t.elapsed().as_secs_f64() * 1e6 / a.reps as f64;
                let gbs = bytes as f64 / us / 1e3;
                if spec == "fp16" {
                    fp16_us = Some(us);
                }
                let vs = fp16_us.map(|f| f / us);
                if a.json {
                    println!(
                        "{{\"device\":\"{}\",\"arch\":\"{}\",\"model\":\"{m}\",\"tokens\":{tokens},\"spec\":\"{spec}\",\"us_per_step\":{us:.2},\"bytes\":{bytes},\"gbps\":{gbs:.2},\"copy_gbps\":{bw:.2},\"bandwidth_share\":{:.4},\"speedup_vs_fp16\":{}}}",
                        gpu.name(),
                        gpu.arch(),
                        gbs / bw,
                        vs.map_or("null".into(), |v| format!("{v:.3}"))
                    );
                } else {
                    println!(
                        "{m:<8} {tokens:>7} {spec:<6} {us:>10.1} {:>10.2} {gbs:>8.1} {:>6.1}% {:>8}",
                        bytes as f64 / 1e6,
                        100.0 * gbs / bw,
                        vs.map_or("".into(), |v| format!("{v:.2}x"))
                    );
                }
            }
        }
    }
    Ok(())
}
