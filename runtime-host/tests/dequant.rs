//! Dequantization of every weight type against gguf-py (`tests/data/make_dequant_ref.py`, outputs in
//! `tests/data/dequant_ref.json`), and the vector integer dots against the dequantized rows.

use kvq_host::gguf::TensorType;
use kvq_host::quants;

fn ty_of(name: &str) -> TensorType {
    match name {
        "F32" => TensorType::F32,
        "F16" => TensorType::F16,
        "BF16" => TensorType::Bf16,
        "Q8_0" => TensorType::Q8_0,
        "Q4_0" => TensorType::Q4_0,
        "Q4_1" => TensorType::Q4_1,
        "Q5_0" => TensorType::Q5_0,
        "Q4_K" => TensorType::Q4K,
        "Q6_K" => TensorType::Q6K,
        n => panic!("unexpected type {n}"),
    }
}

fn cases() -> Vec<(TensorType, Vec<u8>, Vec<f32>)> {
    let r: serde_json::Value = serde_json::from_str(include_str!("data/dequant_ref.json")).unwrap();
    r.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let hex = c["bytes"].as_str().unwrap();
            let bytes =
                (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            let vals = c["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            (ty_of(c["type"].as_str().unwrap()), bytes, vals)
        })
        .collect()
}

#[test]
fn every_type_dequantizes_as_gguf_py() {
    let cases = cases();
    assert_eq!(cases.len(), 9);
    for (ty, bytes, want) in cases {
        let mut got = vec![0f32; want.len()];
        quants::dequant_row(ty, &bytes, &mut got);
        // Each value is at most two f32 products and a difference of terms bounded by the block's largest
        // magnitude: 3 roundings of at most twice that, in either implementation.
        let bl = ty.block_len().max(1);
        for (b, (g, w)) in got.chunks(bl).zip(want.chunks(bl)).enumerate() {
            let big = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            let tol = 12.0 * f32::EPSILON * big;
            for (i, (x, y)) in g.iter().zip(w).enumerate() {
                assert!((x - y).abs() <= tol, "{ty} block {b} element {i}: {x} vs gguf-py {y}");
            }
        }
    }
}

#[test]
fn integer_dots_agree_with_dequantized_rows() {
    for (ty, bytes, vals) in cases() {
        if !quants::uses_q16(ty) {
            continue;
        }
        let x: Vec<f32> = (0..vals.len()).map(|i| ((i * 31 % 17) as f32 - 8.0) / 3.0).collect();
        let mut a = quants::Q16Act::default();
        a.quantize(&x);
        // Exact products of the two dequantized sides, in f64.
        let exact: f64 =
            (0..vals.len()).map(|i| f64::from(vals[i]) * f64::from(a.d[i / 32]) * f64::from(a.q()[i])).sum();
        let mag: f64 = (0..vals.len())
            .map(|i| (f64::from(vals[i]) * f64::from(a.d[i / 32]) * f64::from(a.q()[i])).abs())
            .sum();
        let nb = vals.len() / 32;
        let tol = (nb as f64 + 12.0) * f64::from(f32::EPSILON) * mag;
        for avx2 in [false, kvq_host::kernels::has_avx2()] {
            let got = f64::from(kvq_host::kernels::dot_q16(ty, &bytes, &a, [0], avx2)[0]);
            assert!((got - exact).abs() <= tol, "{ty} avx2={avx2}: {got} vs {exact} (tol {tol})");
        }
    }
}
