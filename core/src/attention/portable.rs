//! Plain scalar kernels: the reference twins of [`super::avx2`], and the path Miri and the firmware run.
//!
//! Each reads the cache's packed codes directly and folds the dequantization into the arithmetic
//! (methods.md §1.6): per-channel keys fold each group's scale into the query
//! (`score = sum_c (q_c s_c) code_c + sum_c q_c z_c`), per-token values fold the probability into the scale
//! (`out_c = sum_t (p_t s_t) code_tc + sum_t p_t z_t`).

use super::{ChannelBody, Probs, Queries, Scores, TokenBody};
use crate::cache::config::MAX_GROUP;
use crate::cache::layout::{KEY_BLOCK, key_f16, key_row};
use crate::pack;
use half::f16;

#[inline]
fn f(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// `out[qi][t] = q_qi . row_t` for `n` token-major f16 rows of `d`.
pub(crate) fn dot_rows_f16(rows: &[u16], n: usize, q: &Queries<'_>, out: &mut Scores<'_>) {
    let d = q.d;
    for (t, row) in rows.chunks_exact(d).take(n).enumerate() {
        for qi in 0..q.nq {
            let qr = q.row(qi);
            let mut acc = 0.0f32;
            for (&a, &b) in qr.iter().zip(row) {
                acc += a * f(b);
            }
            *out.at(qi, t) = acc;
        }
    }
}

/// `out[qi] += sum_t p[qi][t] * row_t` for `n` token-major f16 rows of `d`.
pub(crate) fn axpy_rows_f16(rows: &[u16], n: usize, p: &Probs<'_>, d: usize, out: &mut [f32]) {
    for (t, row) in rows.chunks_exact(d).take(n).enumerate() {
        for (qi, o) in out.chunks_exact_mut(d).enumerate() {
            let pt = p.at(qi, t);
            for (o, &b) in o.iter_mut().zip(row) {
                *o += pt * f(b);
            }
        }
    }
}

/// Scores of tokens `start..start + n` of an fp16 key body in key blocks (`cache::layout::key_f16`).
pub(crate) fn scores_f16_channel(
    body: &[u16],
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
) {
    for t in 0..n {
        let slot = start + t;
        for qi in 0..q.nq {
            let mut acc = 0.0f32;
            for (c, &a) in q.row(qi).iter().enumerate() {
                acc += a * f(body[key_f16(slot, c, q.d)]);
            }
            *out.at(qi, t) = acc;
        }
    }
}

/// Scores of tokens `start..start + n` (group-aligned) of a per-channel quantized body.
pub(crate) fn scores_q_channel(
    b: &ChannelBody<'_>,
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    folded: &mut [f32],
) {
    let (d, g) = (q.d, b.group);
    let mut codes = [0u8; MAX_GROUP];
    for g0 in (start..start + n).step_by(g) {
        let gi = g0 / g;
        let col0 = g0 - start;
        let scale = &b.scale[gi * d..][..d];
        let zero = &b.zero[gi * d..][..d];
        for qi in 0..q.nq {
            let qr = q.row(qi);
            let mut bias = 0.0f32;
            for c in 0..d {
                folded[qi * d + c] = qr[c] * f(scale[c]);
                bias += qr[c] * f(zero[c]);
            }
            for t in 0..g {
                *out.at(qi, col0 + t) = bias;
            }
        }
        for c in 0..d {
            let row = &b.codes[key_row(g0, c, d, b.block_words)..][..b.block_words];
            pack::unpack_bits(row, b.width, g0 % KEY_BLOCK, &mut codes[..g]);
            for qi in 0..q.nq {
                let qs = folded[qi * d + c];
                for (t, &code) in codes[..g].iter().enumerate() {
                    *out.at(qi, col0 + t) += qs * f32::from(code);
                }
            }
        }
    }
}

/// Scores of tokens `start..start + n` of a per-token quantized body:
/// `score = sum_g s_g (sum_{c in g} q_c code_c) + z_g (sum_{c in g} q_c)`.
pub(crate) fn scores_q_token(
    b: &TokenBody<'_>,
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
) {
    let (d, g) = (q.d, b.group);
    let mut codes = [0u8; MAX_GROUP];
    for t in 0..n {
        let slot = start + t;
        let row = &b.codes[slot * b.row_words..][..b.row_words];
        for qi in 0..q.nq {
            *out.at(qi, t) = 0.0;
        }
        for (gi, c0) in (0..d).step_by(g).enumerate() {
            pack::unpack_bits(row, b.width, c0, &mut codes[..g]);
            let s = f(b.scale[gi * b.ring + slot]);
            let z = f(b.zero[gi * b.ring + slot]);
            for qi in 0..q.nq {
                let qr = &q.row(qi)[c0..c0 + g];
                let mut dot = 0.0f32;
                let mut sum = 0.0f32;
                for (&a, &code) in qr.iter().zip(&codes[..g]) {
                    dot += a * f32::from(code);
                    sum += a;
                }
                *out.at(qi, t) += s * dot + z * sum;
            }
        }
    }
}

/// `out[qi] += sum_t p[qi][t] * v_t` over tokens `start..start + n` of a per-token quantized body.
pub(crate) fn values_q_token(
    b: &TokenBody<'_>,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
) {
    let g = b.group;
    let mut codes = [0u8; MAX_GROUP];
    for t in 0..n {
        let slot = start + t;
        let row = &b.codes[slot * b.row_words..][..b.row_words];
        for (gi, c0) in (0..d).step_by(g).enumerate() {
            pack::unpack_bits(row, b.width, c0, &mut codes[..g]);
            let s = f(b.scale[gi * b.ring + slot]);
            let z = f(b.zero[gi * b.ring + slot]);
            for (qi, o) in out.chunks_exact_mut(d).enumerate() {
                let pt = p.at(qi, t);
                let (ps, pz) = (pt * s, pt * z);
                for (o, &code) in o[c0..c0 + g].iter_mut().zip(&codes[..g]) {
                    *o += ps * f32::from(code) + pz;
                }
            }
        }
    }
}

/// Numerically stable softmax in place: `x_i = exp(x_i - max) / sum_j exp(x_j - max)`.
pub(crate) fn softmax(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = libm::expf(*v - m);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}
