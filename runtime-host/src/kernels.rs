//! Weight dot-product kernels: AVX2/FMA integer dots of 32-element ggml blocks against 8-bit activations,
//! and f32 dots, chosen at run time; the scalar versions in [`crate::quants`] are the reference.
//!
//! Measured on this machine kind (2 vCPU Zen 3, SmolLM2-135M, `kvq bench`-style decode): the scalar integer
//! dot runs at a fraction of memory bandwidth, the AVX2 one near it, so the `unsafe` pays here. Each vector
//! load reads through a pointer into a slice whose length is asserted first.
#![allow(unsafe_code)]

use crate::gguf::TensorType;
use crate::quants::{self, Q8Act};

/// Whether the AVX2/FMA kernels run on this CPU.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `row` (blocks of a 32-element type) · activations `a` from block `b0`.
pub fn dot_q8(ty: TensorType, row: &[u8], a: &Q8Act, b0: usize, avx2: bool) -> f32 {
    let nb = row.len() / ty.block_bytes();
    assert!(
        a.q.len() >= (b0 + nb) * 32 && a.d.len() >= b0 + nb && a.s.len() >= b0 + nb,
        "activations shorter than the row"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is only true when `has_avx2()` said the CPU has AVX2 and FMA; lengths checked above.
        return unsafe { x86::dot_q8(ty, row, a, b0) };
    }
    let _ = avx2;
    quants::dot_q8_ref(ty, row, a, b0)
}

/// `w · x` in f32.
pub fn dot_f32(w: &[f32], x: &[f32], avx2: bool) -> f32 {
    assert_eq!(w.len(), x.len(), "dot of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: as in `dot_q8`; equal lengths checked above.
        return unsafe { x86::dot_f32(w, x) };
    }
    let _ = avx2;
    dot_f32_ref(w, x)
}

/// Scalar f32 dot with 8 partial sums (the order the vector kernel uses).
pub fn dot_f32_ref(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let wc = w.chunks_exact(8);
    let xc = x.chunks_exact(8);
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (a, b) in wc.zip(xc) {
        for k in 0..8 {
            acc[k] = a[k].mul_add(b[k], acc[k]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in wr.iter().zip(xr) {
        s += a * b;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Sum of products of 32 signed bytes `x` and `y`, as 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn mul_i8(x: __m256i, y: __m256i) -> __m256 {
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        let p16 = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// 16 bytes of nibbles to 32 bytes: low nibbles (elements 0..16), then high (16..32).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn nibbles(p: *const u8) -> __m256i {
        // SAFETY: callers pass a pointer with 16 readable bytes.
        let x = unsafe { _mm_loadu_si128(p.cast()) };
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(x), x);
        _mm256_and_si256(both, _mm256_set1_epi8(15))
    }

    /// The 32 bits of `qh` spread to bytes: byte j is 0x10 where bit j is set, else 0.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn bits_to_bytes(qh: u32) -> __m256i {
        let shuf = _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
        let mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
        let on = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, mask), _mm256_set1_epi64x(-1));
        _mm256_and_si256(on, _mm256_set1_epi8(0x10))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `a` holds blocks `b0..b0 + row.len() / block_bytes`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_q8(ty: TensorType, row: &[u8], a: &Q8Act, b0: usize) -> f32 {
        let bb = ty.block_bytes();
        let nb = row.len() / bb;
        let (rp, yp) = (row.as_ptr(), a.q.as_ptr());
        let mut acc = _mm256_setzero_ps();
        let mut offs = 0f32;
        for i in 0..nb {
            // SAFETY: block i lies in `row` (i < nb), activation block b0 + i in `a.q` (caller's contract).
            unsafe {
                let b = rp.add(i * bb);
                let y = _mm256_loadu_si256(yp.add((b0 + i) * 32).cast());
                let dw = f16_at(b);
                let dy = *a.d.get_unchecked(b0 + i);
                let p = match ty {
                    TensorType::Q8_0 => mul_i8(_mm256_loadu_si256(b.add(2).cast()), y),
                    TensorType::Q4_0 => mul_i8(_mm256_sub_epi8(nibbles(b.add(2)), _mm256_set1_epi8(8)), y),
                    TensorType::Q4_1 => {
                        offs += f16_at(b.add(2)) * *a.s.get_unchecked(b0 + i);
                        let q = nibbles(b.add(4));
                        let p16 = _mm256_maddubs_epi16(q, y);
                        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
                    }
                    TensorType::Q5_0 => {
                        let qh = u32::from_le_bytes([*b.add(2), *b.add(3), *b.add(4), *b.add(5)]);
                        let q = _mm256_or_si256(nibbles(b.add(6)), bits_to_bytes(qh));
                        mul_i8(_mm256_sub_epi8(q, _mm256_set1_epi8(16)), y)
                    }
                    _ => unreachable!("dot_q8 takes 32-element block types only"),
                };
                acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * dy), p, acc);
            }
        }
        hsum(acc) + offs
    }

    /// # Safety
    /// `b` points at two readable bytes.
    #[inline]
    unsafe fn f16_at(b: *const u8) -> f32 {
        // SAFETY: caller's contract.
        let bits = unsafe { u16::from_le_bytes([*b, *b.add(1)]) };
        half::f16::from_bits(bits).to_f32()
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `w.len() == x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
        let n = w.len();
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 8k + 8 <= n for both slices.
                unsafe {
                    *a = _mm256_fmadd_ps(
                        _mm256_loadu_ps(wp.add(i + 8 * k)),
                        _mm256_loadu_ps(xp.add(i + 8 * k)),
                        *a,
                    );
                }
            }
            i += 32;
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            unsafe {
                acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0])
            };
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        for k in i..n {
            s += w[k] * x[k];
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn rand_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 33) as u8
            })
            .collect()
    }

    #[test]
    fn vector_integer_dots_match_scalar() {
        if !has_avx2() {
            eprintln!("skipped: this CPU has no AVX2/FMA, only the scalar path exists");
            return;
        }
        for ty in [TensorType::Q8_0, TensorType::Q4_0, TensorType::Q4_1, TensorType::Q5_0] {
            for nb in [1usize, 2, 3, 5, 18, 48] {
                let mut row = rand_bytes(nb * ty.block_bytes(), nb as u64 * 31 + 7);
                for b in row.chunks_exact_mut(ty.block_bytes()) {
                    let d = f16::from_f32(f32::from(b[0]) / 997.0 + 0.01).to_le_bytes();
                    b[0..2].copy_from_slice(&d);
                    if ty == TensorType::Q4_1 {
                        let m = f16::from_f32(f32::from(b[2]) / -512.0).to_le_bytes();
                        b[2..4].copy_from_slice(&m);
                    }
                }
                let x: Vec<f32> = (0..(nb + 1) * 32).map(|i| ((i * 53 % 97) as f32 - 48.0) / 9.0).collect();
                let mut a = Q8Act::default();
                a.quantize(&x);
                for b0 in [0, 1] {
                    let r = quants::dot_q8_ref(ty, &row, &a, b0);
                    let v = dot_q8(ty, &row, &a, b0, true);
                    // Integer sums are exact in both; they differ only in the order of the f32 block sums:
                    // at most nb + 8 roundings of partial sums bounded by the sum of |block terms|.
                    let mag: f32 = (0..nb)
                        .map(|i| {
                            let one = quants::dot_q8_ref(
                                ty,
                                &row[i * ty.block_bytes()..][..ty.block_bytes()],
                                &a,
                                b0 + i,
                            );
                            one.abs() + 1.0
                        })
                        .sum();
                    let tol = (nb as f32 + 10.0) * f32::EPSILON * mag;
                    assert!((r - v).abs() <= tol, "{ty} nb={nb} b0={b0}: {r} vs {v} (tol {tol})");
                }
            }
        }
    }

    #[test]
    fn vector_f32_dot_matches_scalar() {
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 64, 576, 1000] {
            let w: Vec<f32> = (0..n).map(|i| ((i * 17 % 23) as f32 - 11.0) / 3.0).collect();
            let x: Vec<f32> = (0..n).map(|i| ((i * 13 % 29) as f32 - 14.0) / 5.0).collect();
            let exact: f64 = w.iter().zip(&x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            let mag: f64 = w.iter().zip(&x).map(|(a, b)| (f64::from(*a) * f64::from(*b)).abs()).sum();
            // Sequential f32 summation: |error| <= n * eps * sum |terms| (Higham's gamma_n).
            let tol = (n as f64 + 1.0) * f64::from(f32::EPSILON) * mag + 1e-30;
            for avx in [false, has_avx2()] {
                let got = f64::from(dot_f32(&w, &x, avx));
                assert!((got - exact).abs() <= tol, "n={n} avx={avx}: {got} vs {exact}");
            }
        }
    }
}
