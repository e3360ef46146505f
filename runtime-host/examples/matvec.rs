//! Matrix-vector speed of the default model's weights, AVX2 against the portable kernels in the same run:
//! `cargo run --release -p kvq-host --example matvec` (set `RAYON_NUM_THREADS=1` for one thread).
//! Prints microseconds and GB/s of weight bytes per product at 1, 8 and 64 tokens (a prefill chunk).

use kvq_host::quants::Q16Act;
use std::time::Instant;

fn main() {
    let path = kvq_host::fetch::default_model(false).unwrap();
    let mut m = kvq_host::model::Model::load(&path).unwrap();
    let mut act = Q16Act::default();
    println!(
        "{:24} {:5} {:>11} {:>3} {:>10} {:>9} {:>10} {:>9} {:>7}",
        "tensor", "type", "rows x cols", "n", "avx2 us", "GB/s", "portable", "GB/s", "ratio"
    );
    for name in ["blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight", "token_embd.weight"] {
        let w = m.weight(name).unwrap();
        for n in [1usize, 8, 64] {
            let x: Vec<f32> = (0..n * w.cols).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let mut y = vec![0f32; n * w.rows];
            let bytes = w.ty.row_bytes(w.cols) * w.rows;
            let mut time = |portable: bool| {
                m.set_portable(portable);
                let reps = if portable { 3 } else { (500_000_000 / bytes / n).max(3) };
                m.matmul(&w, &x, &mut y, &mut act);
                let t = Instant::now();
                for _ in 0..reps {
                    m.matmul(&w, &x, &mut y, &mut act);
                }
                t.elapsed().as_secs_f64() / reps as f64
            };
            let v = time(false);
            // The portable kernels at 64 tokens would take minutes; that row shows the AVX2 speed only.
            let p = if n <= 8 { time(true) } else { f64::NAN };
            println!(
                "{name:24} {:5} {:>5}x{:<5} {n:>3} {:>10.1} {:>9.2} {:>10.1} {:>9.2} {:>6.1}x",
                w.ty.name(),
                w.rows,
                w.cols,
                v * 1e6,
                bytes as f64 / v / 1e9,
                p * 1e6,
                bytes as f64 / p / 1e9,
                p / v
            );
        }
    }
}
