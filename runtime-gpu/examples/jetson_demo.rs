//! A long token stream through a model-shaped set of caches on the GPU: prefill in chunks (attention
//! over the cache plus the chunk, then append), then decode steps (append one token, attend), printing
//! the cache's bytes, bits per element and the step times. Built for Jetson boards
//! (`aarch64-unknown-linux-gnu`; see the README), runs on any NVIDIA GPU.
//!
//! ```text
//! jetson-demo [--model smollm2|gemma3] [--tokens 32768] [--kv fp16,kivi2,kivi4] [--chunk 512] [--decode 64]
//! ```
//!
//! The keys, values and queries are synthetic (with outlier channels, as real keys have): the demo
//! measures the cache, not a model's text.

mod support;

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use kvq_core::cache::{CacheConfig, Overflow};
use kvq_core::pack::Width;
use kvq_gpu::{DeviceCache, Gpu};
use support::rows;

#[derive(Parser)]
#[command(name = "jetson-demo")]
struct Args {
    /// Model shape: smollm2 (30 layers, 3 KV heads, head_dim 64) or gemma3 (18 layers, 1 KV head,
    /// head_dim 256, 15 local layers over 512 tokens).
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Tokens to stream in (prefill).
    #[arg(long, default_value_t = 32768)]
    tokens: usize,
    /// Caches to compare.
    #[arg(long, value_delimiter = ',', default_value = "fp16,kivi2,kivi4")]
    kv: Vec<String>,
    /// Prefill chunk.
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Decode steps after the prefill.
    #[arg(long, default_value_t = 64)]
    decode: usize,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let (layers, local, kv_heads, q_heads, d) = match a.model.as_str() {
        "smollm2" => (30, 0, 3, 9, 64),
        "gemma3" => (18, 15, 1, 4, 256),
        m => bail!("unknown model shape {m} (smollm2, gemma3)"),
    };
    if a.chunk == 0 || a.tokens == 0 {
        bail!("--chunk and --tokens must be positive");
    }
    let gpu = Arc::new(Gpu::open(0).context("jetson-demo needs an NVIDIA GPU and its driver")?);
    println!(
        "{} ({}), {} SMs; {} shape, {} tokens then {} decode steps",
        gpu.name(),
        gpu.arch(),
        gpu.multiprocessors(),
        a.model,
        a.tokens,
        a.decode
    );
    let cap = a.tokens + a.decode;
    let scale = 1.0 / (d as f32).sqrt();
    for spec in &a.kv {
        let global = match spec.as_str() {
            "fp16" => CacheConfig::fp16(kv_heads, d, cap),
            "kivi2" => CacheConfig::kivi(Width::B2, 32, 128, kv_heads, d, cap).with_sinks(4),
            "kivi4" => CacheConfig::kivi(Width::B4, 32, 128, kv_heads, d, cap).with_sinks(4),
            s => bail!("unknown cache {s} (fp16, kivi2, kivi4)"),
        };
        let window = CacheConfig::fp16(kv_heads, d, 512).with_overflow(Overflow::Slide);
        let mut caches = (0..layers)
            .map(|l| DeviceCache::new(gpu.clone(), if l < local { window } else { global }))
            .collect::<Result<Vec<_>, _>>()?;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let (hd, qd) = (kv_heads * d, q_heads * d);
        let t = Instant::now();
        let mut done = 0;
        while done < a.tokens {
            let n = a.chunk.min(a.tokens - done);
            let (k, v, q) = (rows(&mut seed, n * hd), rows(&mut seed, n * hd), rows(&mut seed, n * qd));
            for c in &mut caches {
                c.prefill(&q, &k, &v, q_heads, scale)?;
                c.append(&k, &v)?;
            }
            done += n;
        }
        gpu.stream().synchronize()?;
        let prefill = t.elapsed().as_secs_f64();
        let mut steps = Vec::with_capacity(a.decode);
        for _ in 0..a.decode {
            let (k, v, q) = (rows(&mut seed, hd), rows(&mut seed, hd), rows(&mut seed, qd));
            let t = Instant::now();
            for c in &mut caches {
                c.append(&k, &v)?;
                c.decode(&q, q_heads, scale)?;
            }
            steps.push(t.elapsed().as_secs_f64() * 1e3);
        }
        steps.sort_by(f64::total_cmp);
        let (bytes, elems): (usize, usize) = caches
            .iter()
            .map(|c| (c.usage().total_bytes(), c.usage().tokens * 2 * kv_heads * d))
            .fold((0, 0), |(b, e), (x, y)| (b + x, e + y));
        println!(
            "{spec:<6} KV {:>8.2} MiB, {:>5.2} bits/element | prefill {:>8.0} tokens/s (attention + append) | decode step {:>7.2} ms median, {:>7.2} ms worst (append + attention, {layers} layers, host copies included)",
            bytes as f64 / (1 << 20) as f64,
            8.0 * bytes as f64 / elems.max(1) as f64,
            a.tokens as f64 / prefill,
            steps.get(steps.len() / 2).copied().unwrap_or(0.0),
            steps.last().copied().unwrap_or(0.0),
        );
    }
    Ok(())
}
