//! Memory probe behind docs/decode-speed.md's account of the fp16 decode step: how fast one core reads a buffer
//! of fp16 caches' size (377 MB, 30 layers at 16k tokens) sequentially, in the fp16 value kernel's order
//! (passes of 16 channels over 64-token tiles of 128-byte rows) with its old and new prefetch hints, and
//! while doing multiply-adds on what it reads (which shows how little arithmetic and DRAM reads overlap);
//! and, first, the core's clock under load from the rate of independent FMAs.
//!
//! ```text
//! cargo run --release -p kvq-core --example overlap_probe            # --mb 377 (buffer size)
//! ```
//!
//! Each figure is the best of 5 passes, in GB/s of the buffer read. x86-64 with AVX2 and FMA only.
// The probes are `target_feature` functions with raw vector loads, called after run-time detection.
#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod probe {
    use core::arch::x86_64::*;

    /// Values (u16) of one fp16 value row (head_dim 64) and tokens of one value tile, as in `avx2::axpy_block`.
    const ROW: usize = 64;
    const TILE: usize = 64;

    /// Reads `buf` 32 bytes at a time in address order; with `K > 0`, each read also feeds `K`
    /// multiply-adds spread over 8 independent chains (the fp16 step does 6 per 32 bytes).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn stream<const K: usize>(buf: &[u16]) -> u64 {
        let mut sum = _mm256_setzero_si256();
        let mut f = [_mm256_set1_ps(1.0); 8];
        let m = _mm256_set1_ps(0.999);
        for c in buf.chunks_exact(16) {
            // SAFETY: `c` holds 16 u16 = 32 bytes; `loadu` has no alignment requirement.
            let v = unsafe { _mm256_loadu_si256(c.as_ptr().cast()) };
            sum = _mm256_add_epi16(sum, v);
            let x = _mm256_and_ps(_mm256_castsi256_ps(v), m);
            for k in 0..K {
                f[k % 8] = _mm256_fmadd_ps(f[k % 8], m, x);
            }
        }
        let mut s = f[0];
        for v in &f[1..] {
            s = _mm256_add_ps(s, *v);
        }
        let s = _mm256_add_epi64(sum, _mm256_castps_si256(s));
        _mm256_extract_epi64::<0>(s) as u64 ^ _mm256_extract_epi64::<2>(s) as u64
    }

    /// `n` rounds of eight independent FMA chains (latency 4, two FMAs a cycle on Zen 3, so eight chains keep
    /// both pipes busy): the time per FMA gives the clock under load.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn fma_chains(n: usize) -> f32 {
        let m = _mm256_set1_ps(0.999);
        let mut f = [_mm256_set1_ps(1.0); 8];
        for _ in 0..n {
            for v in f.iter_mut() {
                *v = _mm256_fmadd_ps(*v, m, m);
            }
        }
        let mut s = f[0];
        for v in &f[1..] {
            s = _mm256_add_ps(s, *v);
        }
        _mm256_cvtss_f32(s)
    }

    /// Reads `buf` as fp16 value rows in the value kernel's order: per tile of 64 rows, 4 passes of 16
    /// channels (32 bytes of each row). `sweep` hints the tile two ahead one line per row in address
    /// order (the kernel now); otherwise the row 32 ahead at the pass's channels (the kernel before).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn value_order(buf: &[u16], sweep: bool) -> u64 {
        let mut sum = _mm256_setzero_si256();
        let rows = buf.len() / ROW;
        let p = buf.as_ptr();
        for t0 in (0..rows - rows % TILE).step_by(TILE) {
            for pass in 0..ROW / 16 {
                let ahead = p.wrapping_add((t0 + 2 * TILE) * ROW).cast::<u8>();
                for t in t0..t0 + TILE {
                    let line = pass * TILE + t - t0;
                    if sweep && line < 2 * ROW {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64).cast());
                    } else if !sweep {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add((t + 32) * ROW + pass * 16).cast());
                    }
                    let c = &buf[t * ROW + pass * 16..][..16];
                    // SAFETY: `c` holds 16 u16 = 32 bytes; `loadu` has no alignment requirement.
                    sum = _mm256_add_epi16(sum, unsafe { _mm256_loadu_si256(c.as_ptr().cast()) });
                }
            }
        }
        _mm256_extract_epi64::<0>(sum) as u64
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    use std::time::Instant;
    if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
        println!("overlap_probe: this CPU has no AVX2/FMA; nothing to measure");
        return;
    }
    let Opts { mb } = <Opts as clap::Parser>::parse();
    let big: Vec<u16> = (0..mb << 19).map(|i| (i as u16).wrapping_mul(40503) & 0x3bff).collect();
    let small = &big[..128 << 10];
    let best = |buf: &[u16], f: &dyn Fn(&[u16]) -> u64| {
        let reps = if buf.len() == small.len() { 2000 } else { 1 };
        let mut t_best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(f(std::hint::black_box(buf)));
            }
            t_best = t_best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        (buf.len() * 2) as f64 / t_best / 1e9
    };
    let names = [
        "read",
        "read + 6 FMA / 32 B",
        "read + 8 FMA / 32 B",
        "read + 16 FMA / 32 B",
        "value order, row hints",
        "value order, tile sweep",
    ];
    let run = |i: usize, b: &[u16]| {
        // SAFETY: AVX2 and FMA were detected above, which is all the probes' `target_feature` needs.
        unsafe {
            match i {
                0 => probe::stream::<0>(b),
                1 => probe::stream::<6>(b),
                2 => probe::stream::<8>(b),
                3 => probe::stream::<16>(b),
                4 => probe::value_order(b, false),
                _ => probe::value_order(b, true),
            }
        }
    };
    let n = 50_000_000;
    let mut ns = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        // SAFETY: AVX2 and FMA were detected above.
        std::hint::black_box(unsafe { probe::fma_chains(std::hint::black_box(n)) });
        ns = ns.min(t.elapsed().as_secs_f64() * 1e9 / (8 * n) as f64);
    }
    println!("FMA: one every {ns:.3} ns over 8 chains; at two a cycle, a clock of {:.2} GHz", 0.5 / ns);
    println!("{:<26} {:>12} {:>14}", "GB/s, 1 thread", format!("{mb} MB"), "256 KB (L2)");
    for (i, name) in names.iter().enumerate() {
        println!("{name:<26} {:>12.1} {:>14.1}", best(&big, &|b| run(i, b)), best(small, &|b| run(i, b)));
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("overlap_probe: x86-64 only");
}

/// The probe's options.
#[derive(clap::Parser)]
struct Opts {
    /// Size of the large buffer in MB (the weights' size by default).
    #[arg(long, default_value_t = 377)]
    mb: usize,
}
