//! AVX2 + FMA + F16C twins of [`super::portable`], for x86-64 CPUs that have them.
//!
//! Every function is `#[target_feature(enable = "avx2,fma,f16c")]`: callers outside this module hold a
//! [`super::Kernel`] with AVX2 set, which exists only where the CPU has the features. Inside, the only
//! `unsafe` is in the four load/store helpers, each of which reads or writes exactly the slice it is
//! given after a bounds-checked reslice. The vector path is what makes the quantized cache faster than
//! fp16 (the `decode_bench` example reports both kernels side by side).
//!
//! Code unpacking: a run of 32 codes starts on a word (`G * b` is a multiple of 32, runs start on a group),
//! so 2-bit codes are 2 words, 4-bit 4 words, 8-bit 8 words; each word is broadcast and shifted by a lane
//! vector (`vpsrlvd`), masked and converted, 8 codes to a register.
#![allow(unsafe_code)]

use super::{ChannelBody, Probs, Queries, Scores, TokenBody, portable};
use crate::pack::Width;
use core::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ld(s: &[f32]) -> __m256 {
    let s = &s[..8];
    // SAFETY: `s` holds 8 f32; `loadu` has no alignment requirement.
    unsafe { _mm256_loadu_ps(s.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn st(d: &mut [f32], v: __m256) {
    let d = &mut d[..8];
    // SAFETY: `d` holds 8 f32; `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_ps(d.as_mut_ptr(), v) }
}

/// Eight f16 values to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ld_ph(s: &[u16]) -> __m256 {
    let s = &s[..8];
    // SAFETY: `s` holds 8 u16 = 16 bytes; `loadu_si128` has no alignment requirement.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(s.as_ptr().cast()) })
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// 32 codes of `B` bits from the start of `w`, as four vectors of 8 f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack32<const B: u32>(w: &[u32]) -> [__m256; 4] {
    match B {
        2 => {
            let w = &w[..2];
            let lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
            let hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
            let m = _mm256_set1_epi32(3);
            let a = _mm256_set1_epi32(w[0] as i32);
            let b = _mm256_set1_epi32(w[1] as i32);
            [
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(a, lo), m)),
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(a, hi), m)),
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(b, lo), m)),
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(b, hi), m)),
            ]
        }
        4 => {
            let w = &w[..4];
            let sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
            let m = _mm256_set1_epi32(15);
            let f = |x: u32| _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(x as i32), sh), m));
            [f(w[0]), f(w[1]), f(w[2]), f(w[3])]
        }
        _ => {
            let w = &w[..8];
            let f = |a: u32, b: u32| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_setr_epi32(a as i32, b as i32, 0, 0)));
            [f(w[0], w[1]), f(w[2], w[3]), f(w[4], w[5]), f(w[6], w[7])]
        }
    }
}

/// See [`portable::dot_rows_f16`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn dot_rows_f16(rows: &[u16], n: usize, q: &Queries<'_>, out: &mut Scores<'_>) {
    let d = q.d;
    for (t, row) in rows.chunks_exact(d).take(n).enumerate() {
        for qi in 0..q.nq {
            let qr = q.row(qi);
            let mut acc = _mm256_setzero_ps();
            for (a, b) in qr.chunks_exact(8).zip(row.chunks_exact(8)) {
                acc = _mm256_fmadd_ps(ld(a), ld_ph(b), acc);
            }
            *out.at(qi, t) = hsum(acc);
        }
    }
}

/// See [`portable::axpy_rows_f16`]. `d % 32 == 0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn axpy_rows_f16(rows: &[u16], n: usize, p: &Probs<'_>, d: usize, out: &mut [f32]) {
    let nq = out.len() / d;
    for qb in (0..nq).step_by(3) {
        match nq - qb {
            1 => axpy_block::<1>(rows, n, p, d, out, qb),
            2 => axpy_block::<2>(rows, n, p, d, out, qb),
            _ => axpy_block::<3>(rows, n, p, d, out, qb),
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn axpy_block<const M: usize>(rows: &[u16], n: usize, p: &Probs<'_>, d: usize, out: &mut [f32], qb: usize) {
    const TILE: usize = 64;
    for t0 in (0..n).step_by(TILE) {
        let t1 = (t0 + TILE).min(n);
        for c0 in (0..d).step_by(32) {
            let mut acc = [[_mm256_setzero_ps(); 4]; M];
            for (m, a) in acc.iter_mut().enumerate() {
                for (k, v) in a.iter_mut().enumerate() {
                    *v = ld(&out[(qb + m) * d + c0 + 8 * k..]);
                }
            }
            for t in t0..t1 {
                let row = &rows[t * d + c0..][..32];
                let x = [ld_ph(&row[0..]), ld_ph(&row[8..]), ld_ph(&row[16..]), ld_ph(&row[24..])];
                for (m, a) in acc.iter_mut().enumerate() {
                    let pt = _mm256_set1_ps(p.at(qb + m, t));
                    for k in 0..4 {
                        a[k] = _mm256_fmadd_ps(pt, x[k], a[k]);
                    }
                }
            }
            for (m, a) in acc.iter().enumerate() {
                for (k, v) in a.iter().enumerate() {
                    st(&mut out[(qb + m) * d + c0 + 8 * k..], *v);
                }
            }
        }
    }
}

/// See [`portable::scores_f16_channel`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn scores_f16_channel(body: &[u16], ring: usize, start: usize, n: usize, q: &Queries<'_>, out: &mut Scores<'_>) {
    let whole = n - n % 32;
    for t0 in (0..whole).step_by(32) {
        for qb in (0..q.nq).step_by(3) {
            match q.nq - qb {
                1 => f16_chunk::<1>(body, ring, start + t0, q, out, qb, t0),
                2 => f16_chunk::<2>(body, ring, start + t0, q, out, qb, t0),
                _ => f16_chunk::<3>(body, ring, start + t0, q, out, qb, t0),
            }
        }
    }
    if whole < n {
        let mut rest = Scores { data: &mut *out.data, stride: out.stride, pos: out.pos + whole };
        portable::scores_f16_channel(body, ring, start + whole, n - whole, q, &mut rest);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_chunk<const M: usize>(body: &[u16], ring: usize, slot: usize, q: &Queries<'_>, out: &mut Scores<'_>, qb: usize, col: usize) {
    let mut acc = [[_mm256_setzero_ps(); 4]; M];
    for c in 0..q.d {
        let x = &body[c * ring + slot..][..32];
        let x = [ld_ph(&x[0..]), ld_ph(&x[8..]), ld_ph(&x[16..]), ld_ph(&x[24..])];
        for (m, a) in acc.iter_mut().enumerate() {
            let qc = _mm256_set1_ps(q.q[(qb + m) * q.d + c]);
            for k in 0..4 {
                a[k] = _mm256_fmadd_ps(qc, x[k], a[k]);
            }
        }
    }
    store_scores(&acc, out, qb, col);
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store_scores<const M: usize>(acc: &[[__m256; 4]; M], out: &mut Scores<'_>, qb: usize, col: usize) {
    for (m, a) in acc.iter().enumerate() {
        let at = (qb + m) * out.stride + out.pos + col;
        let dst = &mut out.data[at..][..32];
        for (k, v) in a.iter().enumerate() {
            st(&mut dst[8 * k..], *v);
        }
    }
}

/// See [`portable::scores_q_channel`]. Widths 2 (or ternary), 4 and 8 bits; `group % 32 == 0`, `d % 8 == 0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn scores_q_channel(
    b: &ChannelBody<'_>,
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    work: &mut [f32],
) {
    let (d, g, nq) = (q.d, b.group, q.nq);
    let (folded, bias) = work.split_at_mut(nq * d);
    for g0 in (start..start + n).step_by(g) {
        let gi = g0 / g;
        let scale = &b.scale[gi * d..][..d];
        let zero = &b.zero[gi * d..][..d];
        for qi in 0..nq {
            let qr = q.row(qi);
            let mut zacc = _mm256_setzero_ps();
            for c in (0..d).step_by(8) {
                let qv = ld(&qr[c..]);
                st(&mut folded[qi * d + c..], _mm256_mul_ps(qv, ld_ph(&scale[c..])));
                zacc = _mm256_fmadd_ps(qv, ld_ph(&zero[c..]), zacc);
            }
            bias[qi] = hsum(zacc);
        }
        let fq = Queries { q: folded, nq, d };
        for t0 in (g0..g0 + g).step_by(32) {
            let word = t0 / 32 * b.width.bits() as usize;
            let col = t0 - start;
            for qb in (0..nq).step_by(3) {
                let m = nq - qb;
                match b.width {
                    Width::B4 => q_chunk::<4>(b, word, &fq, bias, out, qb, col, m),
                    Width::B8 => q_chunk::<8>(b, word, &fq, bias, out, qb, col, m),
                    _ => q_chunk::<2>(b, word, &fq, bias, out, qb, col, m),
                }
            }
        }
    }
}

#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
fn q_chunk<const B: u32>(b: &ChannelBody<'_>, word: usize, fq: &Queries<'_>, bias: &[f32], out: &mut Scores<'_>, qb: usize, col: usize, m: usize) {
    match m {
        1 => q_chunk_m::<B, 1>(b, word, fq, bias, out, qb, col),
        2 => q_chunk_m::<B, 2>(b, word, fq, bias, out, qb, col),
        _ => q_chunk_m::<B, 3>(b, word, fq, bias, out, qb, col),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q_chunk_m<const B: u32, const M: usize>(b: &ChannelBody<'_>, word: usize, fq: &Queries<'_>, bias: &[f32], out: &mut Scores<'_>, qb: usize, col: usize) {
    let mut acc = [[_mm256_setzero_ps(); 4]; M];
    for (m, a) in acc.iter_mut().enumerate() {
        *a = [_mm256_set1_ps(bias[qb + m]); 4];
    }
    let d = fq.d;
    for c in 0..d {
        let x = unpack32::<B>(&b.codes[c * b.row_words + word..]);
        for (m, a) in acc.iter_mut().enumerate() {
            let qs = _mm256_set1_ps(fq.q[(qb + m) * d + c]);
            for k in 0..4 {
                a[k] = _mm256_fmadd_ps(qs, x[k], a[k]);
            }
        }
    }
    store_scores(&acc, out, qb, col);
}

/// See [`portable::values_q_token`]. Widths 2 (or ternary), 4 and 8 bits; `group % 32 == 0`, `d % 32 == 0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn values_q_token(b: &TokenBody<'_>, start: usize, n: usize, p: &Probs<'_>, d: usize, out: &mut [f32], work: &mut [f32]) {
    let nq = out.len() / d;
    let groups = d / b.group;
    // work: ps[qi][g][8] products p * scale for the current tile, zacc[qi][g][8] partial sums of p * zero
    let (ps, rest) = work.split_at_mut(nq * groups * 8);
    let zacc = &mut rest[..nq * groups * 8];
    zacc.fill(0.0);
    let whole = n - n % 8;
    for t0 in (0..whole).step_by(8) {
        let slot = start + t0;
        for gi in 0..groups {
            let s = ld_ph(&b.scale[gi * b.ring + slot..]);
            let z = ld_ph(&b.zero[gi * b.ring + slot..]);
            for qi in 0..nq {
                let pv = ld(&p.data[qi * p.stride + p.pos + t0..]);
                let at = (qi * groups + gi) * 8;
                st(&mut ps[at..], _mm256_mul_ps(pv, s));
                let acc = _mm256_fmadd_ps(pv, z, ld(&zacc[at..]));
                st(&mut zacc[at..], acc);
            }
        }
        for qb in (0..nq).step_by(3) {
            let m = nq - qb;
            match b.width {
                Width::B4 => v_tile::<4>(b, slot, d, ps, groups, out, qb, m),
                Width::B8 => v_tile::<8>(b, slot, d, ps, groups, out, qb, m),
                _ => v_tile::<2>(b, slot, d, ps, groups, out, qb, m),
            }
        }
    }
    // Zero-point terms: out[qi][c] += sum_t p_t z_{t, g(c)}.
    for qi in 0..nq {
        for gi in 0..groups {
            let z = hsum(ld(&zacc[(qi * groups + gi) * 8..]));
            for o in &mut out[qi * d + gi * b.group..][..b.group] {
                *o += z;
            }
        }
    }
    if whole < n {
        portable::values_q_token(b, start + whole, n - whole, &Probs { pos: p.pos + whole, ..*p }, d, out);
    }
}

#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
fn v_tile<const B: u32>(b: &TokenBody<'_>, slot: usize, d: usize, ps: &[f32], groups: usize, out: &mut [f32], qb: usize, m: usize) {
    match m {
        1 => v_tile_m::<B, 1>(b, slot, d, ps, groups, out, qb),
        2 => v_tile_m::<B, 2>(b, slot, d, ps, groups, out, qb),
        _ => v_tile_m::<B, 3>(b, slot, d, ps, groups, out, qb),
    }
}

/// Eight tokens from `slot`, all channels, queries `qb..qb + M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn v_tile_m<const B: u32, const M: usize>(b: &TokenBody<'_>, slot: usize, d: usize, ps: &[f32], groups: usize, out: &mut [f32], qb: usize) {
    for c0 in (0..d).step_by(32) {
        let gi = c0 / b.group;
        let mut acc = [[_mm256_setzero_ps(); 4]; M];
        for (m, a) in acc.iter_mut().enumerate() {
            for (k, v) in a.iter_mut().enumerate() {
                *v = ld(&out[(qb + m) * d + c0 + 8 * k..]);
            }
        }
        let word = c0 / 32 * B as usize;
        for t in 0..8 {
            let x = unpack32::<B>(&b.codes[(slot + t) * b.row_words + word..]);
            for (m, a) in acc.iter_mut().enumerate() {
                let pt = _mm256_set1_ps(ps[((qb + m) * groups + gi) * 8 + t]);
                for k in 0..4 {
                    a[k] = _mm256_fmadd_ps(pt, x[k], a[k]);
                }
            }
        }
        for (m, a) in acc.iter().enumerate() {
            for (k, v) in a.iter().enumerate() {
                st(&mut out[(qb + m) * d + c0 + 8 * k..], *v);
            }
        }
    }
}

/// `exp(x)` for eight lanes: Cephes' `expf` (range reduction by `ln 2` split in two constants, degree-5
/// polynomial), relative error within 2^-21 for `x` in `[-87.3, 88.7]`; inputs below clamp to `-87.3`
/// (an absolute error under 2^-126, below any probability softmax keeps).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3)), _mm256_set1_ps(88.7));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(x, _mm256_set1_ps(core::f32::consts::LOG2_E)));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

/// See [`portable::softmax`]; `exp` is [`exp8`] (the scalar tail uses `libm::expf`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn softmax(x: &mut [f32]) {
    let whole = x.len() - x.len() % 8;
    let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in x[..whole].chunks_exact(8) {
        mv = _mm256_max_ps(mv, ld(c));
    }
    let m = x[whole..].iter().fold(hmax(mv), |a, &b| a.max(b));
    let mb = _mm256_set1_ps(m);
    let mut sv = _mm256_setzero_ps();
    for c in x[..whole].chunks_exact_mut(8) {
        let e = exp8(_mm256_sub_ps(ld(c), mb));
        st(c, e);
        sv = _mm256_add_ps(sv, e);
    }
    let mut sum = hsum(sv);
    for v in &mut x[whole..] {
        *v = libm::expf(*v - m);
        sum += *v;
    }
    let inv = 1.0 / sum;
    let iv = _mm256_set1_ps(inv);
    for c in x[..whole].chunks_exact_mut(8) {
        st(c, _mm256_mul_ps(ld(c), iv));
    }
    for v in &mut x[whole..] {
        *v *= inv;
    }
}
