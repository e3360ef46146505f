//! The weight products of one decode step (or one prefill chunk) against the time it takes to read their
//! bytes, in the same run:
//!
//! ```sh
//! cargo run --release -p kvq-host --example matvec                        # SmolLM2, 1 thread, 1 token
//! cargo run --release -p kvq-host --example matvec -- -m gemma3-270m --threads 1,2 --tokens 1,64 --json
//! ```
//!
//! Each repetition runs every product of every layer and the output matrix, in the forward pass's order,
//! with the vector kernels (and, with `--portable`, the scalar ones), then reads as many bytes as the
//! weights hold from a buffer of that size (a plain sum of 64-bit words, split over the threads as the
//! products are): the read bound. A model larger than the last-level cache streams its weights from
//! memory in both, as decoding does. The table gives each kind of matrix's share of the step, the step's
//! time, GB/s of weights, and the share of the read bound it reaches (100%: as fast as reading the bytes);
//! medians over the repetitions.

use kvq_host::model::{Model, Weight};
use kvq_host::quants::Q16Act;
use rayon::prelude::*;
use std::time::Instant;

/// The options (see the module docs).
#[derive(clap::Parser)]
struct Opts {
    /// A GGUF file or a model's name (`kvq models`); fetched on first use.
    #[arg(short, long, default_value = "smollm2-135m")]
    model: String,
    /// Tokens per product: 1 is a decode step, more a prefill chunk.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    tokens: Vec<usize>,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    threads: Vec<usize>,
    /// Repetitions (medians are reported).
    #[arg(long, default_value_t = 9)]
    reps: usize,
    /// Also time the scalar kernels (at most 8 tokens).
    #[arg(long)]
    portable: bool,
    /// One JSON record per line instead of the table.
    #[arg(long)]
    json: bool,
}

/// The matrices of a step, in the forward pass's order, with the kind each belongs to.
fn matrices(m: &Model) -> Vec<(&'static str, &Weight)> {
    let mut v = Vec::new();
    for l in m.layers() {
        v.extend([("q", &l.wq), ("k", &l.wk), ("v", &l.wv), ("o", &l.wo)]);
        v.extend([("gate", &l.gate), ("up", &l.up), ("down", &l.down)]);
    }
    v.push(("output", m.output().0));
    v
}

fn bytes_of(w: &Weight) -> usize {
    w.ty.row_bytes(w.cols) * w.rows
}

/// A plain read of `buf`: 64-bit words summed in 8 lanes, in parallel on the current pool.
fn read_all(buf: &[u64]) -> u64 {
    buf.par_chunks(1 << 16)
        .map(|c| {
            let mut acc = [0u64; 8];
            for w in c.chunks_exact(8) {
                for (a, &x) in acc.iter_mut().zip(w) {
                    *a = a.wrapping_add(x);
                }
            }
            acc.iter().fold(0, |a, &b| a ^ b)
        })
        .reduce(|| 0, |a, b| a ^ b)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let o = <Opts as clap::Parser>::parse();
    anyhow::ensure!(o.reps > 0, "--reps must be at least 1");
    let path = if std::path::Path::new(&o.model).exists() {
        o.model.clone().into()
    } else {
        let named = kvq_host::fetch::named(&o.model)
            .ok_or_else(|| anyhow::anyhow!("{}: no such file, nor a model name", o.model))?;
        kvq_host::fetch::fetch(named, true)?
    };
    let mut model = Model::load(&path)?;
    let mats: Vec<(&'static str, Weight)> =
        matrices(&model).into_iter().map(|(k, w)| (k, w.clone())).collect();
    let total: usize = mats.iter().map(|(_, w)| bytes_of(w)).sum();
    let kinds: Vec<&'static str> = mats.iter().fold(Vec::new(), |mut v, (k, _)| {
        if !v.contains(k) {
            v.push(*k);
        }
        v
    });
    // Each matrix's kind as an index into `kinds`, found once rather than in the timed loop.
    let kind_of: Vec<usize> =
        mats.iter().map(|(k, _)| kinds.iter().position(|x| x == k).unwrap_or(0)).collect();
    let buf: Vec<u64> = (0..total.div_ceil(8) as u64).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
    let name = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    if !o.json {
        println!(
            "{name}: {} matrices, {:.1} MB of weights a step ({})",
            mats.len(),
            total as f64 / 1e6,
            model.kernel_name()
        );
    }
    let mut act = Q16Act::default();
    for &threads in &o.threads {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        for &n in &o.tokens {
            let maxc = mats.iter().map(|(_, w)| w.cols).max().unwrap_or(0);
            let maxr = mats.iter().map(|(_, w)| w.rows).max().unwrap_or(0);
            let x: Vec<f32> = (0..n * maxc).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let mut y = vec![0f32; n * maxr];
            let variants: &[bool] = if o.portable && n <= 8 { &[false, true] } else { &[false] };
            // Per variant and repetition: the time of each kind of matrix; then the read bound.
            let mut times: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); kinds.len() + 1]; variants.len()];
            let mut bound = Vec::new();
            let mut sink = 0u64;
            pool.install(|| {
                for rep in 0..=o.reps {
                    for (vi, &portable) in variants.iter().enumerate() {
                        model.set_portable(portable);
                        let mut per = vec![0f64; kinds.len()];
                        let t0 = Instant::now();
                        for ((_, w), &ki) in mats.iter().zip(&kind_of) {
                            let t = Instant::now();
                            model.matmul(w, &x[..n * w.cols], &mut y[..n * w.rows], &mut act);
                            per[ki] += t.elapsed().as_secs_f64();
                        }
                        let step = t0.elapsed().as_secs_f64();
                        // The first round warms the caches and the pool.
                        if rep > 0 {
                            for (i, p) in per.into_iter().enumerate() {
                                times[vi][i].push(p);
                            }
                            times[vi][kinds.len()].push(step);
                        }
                    }
                    let t = Instant::now();
                    sink ^= read_all(std::hint::black_box(&buf));
                    if rep > 0 {
                        bound.push(t.elapsed().as_secs_f64());
                    }
                }
            });
            std::hint::black_box(sink);
            let bound = median(bound);
            for (vi, &portable) in variants.iter().enumerate() {
                let kernel = if portable { "portable" } else { model.kernel_name() };
                let med: Vec<f64> = times[vi].iter().map(|v| median(v.clone())).collect();
                let step = med[kinds.len()];
                let gbs = total as f64 / step / 1e9;
                if o.json {
                    let parts: serde_json::Map<String, serde_json::Value> =
                        kinds.iter().zip(&med).map(|(k, &t)| ((*k).to_string(), (t * 1e3).into())).collect();
                    let rec = serde_json::json!({
                        "model": name, "threads": threads, "tokens": n, "kernel": kernel,
                        "step_ms": step * 1e3, "weight_bytes": total, "gb_s": gbs,
                        "read_bound_ms": bound * 1e3, "bound_share": bound / step, "kinds_ms": parts,
                    });
                    println!("{rec}");
                    continue;
                }
                println!(
                    "threads {threads}, tokens {n}, {kernel}: {:.3} ms a step, {gbs:.2} GB/s; read bound {:.3} ms \
                     ({:.1} GB/s): {:.0}% of it",
                    step * 1e3,
                    bound * 1e3,
                    total as f64 / bound / 1e9,
                    100.0 * bound / step
                );
                for (i, k) in kinds.iter().enumerate() {
                    let ws: Vec<&Weight> = mats.iter().filter(|(x, _)| x == k).map(|(_, w)| w).collect();
                    let b: usize = ws.iter().map(|w| bytes_of(w)).sum();
                    println!(
                        "  {k:7} {:5} {:>6}x{:<6} x{:<3} {:>9.3} ms {:>5.1}% {:>7.2} GB/s",
                        ws[0].ty.name(),
                        ws[0].rows,
                        ws[0].cols,
                        ws.len(),
                        med[i] * 1e3,
                        100.0 * med[i] / step,
                        b as f64 / med[i] / 1e9
                    );
                }
            }
        }
    }
    Ok(())
}
