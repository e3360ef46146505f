//! Matrix-vector speed of the default model's weights: `cargo run --release -p kvq-host --example matvec`.
//! Prints GB/s of weight bytes for one layer's matrices and the output matrix, at 1 token and 8 tokens.

use kvq_host::quants::Q16Act;
use std::time::Instant;

fn main() {
    l1();
    let path = kvq_host::fetch::default_model(false).unwrap();
    let m = kvq_host::model::Model::load(&path).unwrap();
    let mut act = Q16Act::default();
    for name in ["blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.0.attn_q.weight", "token_embd.weight"] {
        let w = m.weight(name).unwrap();
        for n in [1usize, 8] {
            let x: Vec<f32> = (0..n * w.cols).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
            let mut y = vec![0f32; n * w.rows];
            let bytes = w.ty.row_bytes(w.cols) * w.rows;
            let reps = (2_000_000_000 / bytes / n).max(3);
            m.matmul(&w, &x, &mut y, &mut act);
            let t = Instant::now();
            for _ in 0..reps {
                m.matmul(&w, &x, &mut y, &mut act);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{name:24} {} {:5}x{:5} n={n}: {:8.1} us  {:6.2} GB/s weights  {:6.1} GMAC/s",
                w.ty,
                w.rows,
                w.cols,
                s * 1e6,
                bytes as f64 / s / 1e9,
                (w.rows * w.cols * n) as f64 / s / 1e9
            );
        }
    }
}

/// One L1-resident row, many times: the kernel's own speed.
#[allow(dead_code)]
fn l1() {
    use kvq_host::gguf::TensorType;
    let row: Vec<u8> = (0..18 * 20).map(|i| (i * 37 % 251) as u8 & 0x3f).collect();
    let x: Vec<f32> = (0..576).map(|i| ((i * 7 % 13) as f32 - 6.0) / 5.0).collect();
    let mut a = Q16Act::default();
    a.quantize(&x);
    let avx2 = kvq_host::kernels::has_avx2();
    let reps = 2_000_000;
    let t = Instant::now();
    let mut s = 0f32;
    for _ in 0..reps {
        s += kvq_host::kernels::dot_q16(TensorType::Q4_1, std::hint::black_box(&row), &a, [0], avx2)[0];
    }
    let e = t.elapsed().as_secs_f64();
    println!("L1 row of 18 Q4_1 blocks: {:.2} ns per block ({s})", e / reps as f64 / 18.0 * 1e9);
}
