//! Plain scalar kernels: the reference twins of [`super::avx2`], and the path Miri and the firmware run.
//!
//! Each reads the cache's packed codes directly and folds the dequantization into the arithmetic
//! (methods.md §1.6): per-channel keys fold each group's scale into the query
//! (`score = sum_c (q_c s_c) code_c + sum_c q_c z_c`), per-token values fold the probability into the scale
//! (`out_c = sum_t (p_t s_t) code_tc + sum_t p_t z_t`).

use super::{ChannelBody, Probs, Queries, Scores, TokenBody};
use crate::cache::config::MAX_GROUP;
use crate::cache::layout::{key_f16, key_row};
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
    for g0 in (start..start + n).step_by(g) {
        let gi = g0 / g;
        let col0 = g0 - start;
        let (scale, zero) = b.group_params(gi, d);
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
        add_group_codes(b, g0, d, q.nq, folded, out, col0);
    }
}

/// `out[qi][col0 + t] += qf[qi * d + c] * code(c, g0 + t)` over the channels `c` of key group `g0`, channel
/// by channel: the sums of the f32 and int8 per-channel key paths.
fn add_group_codes(
    b: &ChannelBody<'_>,
    g0: usize,
    d: usize,
    nq: usize,
    qf: &[f32],
    out: &mut Scores<'_>,
    col0: usize,
) {
    let g = b.group;
    let mut codes = [0u8; MAX_GROUP];
    for c in 0..d {
        let row = &b.codes[key_row(g0, c, d, b.block, b.block_words)..][..b.block_words];
        pack::unpack_bits(row, b.width, g0 & (b.block - 1), &mut codes[..g]);
        for qi in 0..nq {
            let qs = qf[qi * d + c];
            for (t, &code) in codes[..g].iter().enumerate() {
                *out.at(qi, col0 + t) += qs * f32::from(code);
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

/// The numerator of a numerically stable softmax in place, `x_i = exp(x_i - max)`; returns
/// `sum_j exp(x_j - max)` (at least 1, the maximum's own term), by which the caller divides.
pub(crate) fn exp_shifted(x: &mut [f32]) -> f32 {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = libm::expf(*v - m);
        sum += *v;
    }
    sum
}

/// `x *= k` (the scalar tail of `avx2::scale` multiplies alike).
pub(crate) fn scale(x: &mut [f32], k: f32) {
    for v in x {
        *v *= k;
    }
}

/// The sum of eight lanes in the order `avx2::hsum` adds them, so the two paths round alike.
#[inline]
pub(crate) fn hsum_tree(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// Folds one key group's scales into a query row and rounds it to integers (the int8 path, see
/// [`super::Kernel::with_int8`]): `qf[c] = rint(q_c s_c / delta)` with `delta = max_c |q_c s_c| / qmax`, so
/// `|qf[c]| <= qmax`. Returns `(delta, bias)`, `bias = sum_c q_c z_c` in eight lanes (`c % 8`), as the AVX2
/// twin sums it.
pub(crate) fn fold_query_q8(
    qr: &[f32],
    scale: &[u16],
    zero: &[u16],
    qmax: f32,
    qf: &mut [f32],
) -> (f32, f32) {
    let mut lanes = [0f32; 8];
    let mut m = 0f32;
    for (c, ((o, &a), (&s, &z))) in qf.iter_mut().zip(qr).zip(scale.iter().zip(zero)).enumerate() {
        *o = a * f(s);
        m = m.max(libm::fabsf(*o));
        lanes[c % 8] += a * f(z);
    }
    (round_on_scale(qf, m, qmax), hsum_tree(&lanes))
}

/// Rounds `x`, whose largest magnitude is `m`, to integers of at most `top`: `x = rint(x * (top / m))`.
/// Returns the step `m / top`, or 0 with `x` zeroed where `m == 0`.
fn round_on_scale(x: &mut [f32], m: f32, top: f32) -> f32 {
    if m == 0.0 {
        x.fill(0.0);
        return 0.0;
    }
    let inv = top / m;
    for o in x.iter_mut() {
        *o = libm::rintf(*o * inv);
    }
    m / top
}

/// [`scores_q_channel`] on the int8 path: per group, `score = delta * sum_c qf_c code_c + bias` with the
/// query rounded by [`fold_query_q8`]. The integer sums are exact (they stay below 2^15, see
/// [`super::q8_key_max`], and f32 holds integers to 2^24). `work` holds `nq * (d + 2)` floats.
pub(crate) fn scores_q8_channel(
    b: &ChannelBody<'_>,
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    work: &mut [f32],
) {
    let (d, g, nq) = (q.d, b.group, q.nq);
    let qmax = super::q8_key_max(d, b.width);
    let (qf, rest) = work.split_at_mut(nq * d);
    let (delta, bias) = rest[..2 * nq].split_at_mut(nq);
    for g0 in (start..start + n).step_by(g) {
        let gi = g0 / g;
        let col0 = g0 - start;
        let (scale, zero) = b.group_params(gi, d);
        for qi in 0..nq {
            (delta[qi], bias[qi]) = fold_query_q8(q.row(qi), scale, zero, qmax, &mut qf[qi * d..][..d]);
            for t in 0..g {
                *out.at(qi, col0 + t) = 0.0;
            }
        }
        add_group_codes(b, g0, d, nq, qf, out, col0);
        for qi in 0..nq {
            for t in 0..g {
                let s = out.at(qi, col0 + t);
                *s = delta[qi] * *s + bias[qi];
            }
        }
    }
}

/// [`values_q_token`] on the int8 path: tiles of [`super::Q8_TILE`] tokens (see [`value_tile_q8`]), then
/// [`finish_values_q8`]. `work` holds [`super::q8_value_work`] floats.
pub(crate) fn values_q8_token(
    b: &TokenBody<'_>,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
) {
    let nq = out.len() / d;
    let groups = d / b.group;
    let (l, rest) = work.split_at_mut(nq * d);
    let (zl, tile) = rest.split_at_mut(nq * groups * 8);
    l.fill(0.0);
    zl.fill(0.0);
    for t0 in (0..n).step_by(super::Q8_TILE) {
        value_tile_q8(b, start, t0, (n - t0).min(super::Q8_TILE), p, d, l, zl, tile);
    }
    finish_values_q8(b.group, d, l, zl, out);
}

/// One tile of `len` tokens, `start + t0..`, of the int8 value path. Per channel group and query, the
/// products `p_t s_t` are rounded to integers `P_t = rint(p_t s_t / delta)` with
/// `delta = max_t p_t s_t / vmax` (`vmax` = [`super::Q8_VALUE_MAX`]); the exact integer sums
/// `sum_t P_t code_tc` (at most `Q8_TILE * 127 * 3` = 48,768 at 2 bits, `* 7` at 3, `* 15` at 4; with
/// [`super::Q8Levels`], of the codes' integer levels, at most `* 127`, and `delta` times their step)
/// scaled by `delta` are added to `l` (`[nq][d]`), and `p_t z_t` to lane `(t0 + t) % 8` of `zl`
/// (`[nq][groups][8]`). `tile` holds `nq * d + groups * nq * (Q8_TILE + 1)` floats.
#[allow(clippy::too_many_arguments)]
pub(crate) fn value_tile_q8(
    b: &TokenBody<'_>,
    start: usize,
    t0: usize,
    len: usize,
    p: &Probs<'_>,
    d: usize,
    l: &mut [f32],
    zl: &mut [f32],
    tile: &mut [f32],
) {
    const T: usize = super::Q8_TILE;
    let g = b.group;
    let groups = d / g;
    let nq = l.len() / d;
    let (iacc, rest) = tile.split_at_mut(nq * d);
    let (pq, rest) = rest.split_at_mut(groups * nq * T);
    let delta = &mut rest[..groups * nq];
    // Levels: the integer sums are of levels `step` apart.
    let step = b.levels.map_or(1.0, |l| l.step);
    for gi in 0..groups {
        for qi in 0..nq {
            let pr = &mut pq[(gi * nq + qi) * T..][..len];
            let mut m = 0f32;
            for (t, o) in pr.iter_mut().enumerate() {
                let slot = start + t0 + t;
                let pt = p.at(qi, t0 + t);
                *o = pt * f(b.scale[gi * b.ring + slot]);
                m = m.max(libm::fabsf(*o));
                let lane = &mut zl[(qi * groups + gi) * 8 + (t0 + t) % 8];
                *lane += pt * f(b.zero[gi * b.ring + slot]);
            }
            delta[gi * nq + qi] = round_on_scale(pr, m, super::Q8_VALUE_MAX) * step;
        }
    }
    iacc.fill(0.0);
    let mut codes = [0u8; MAX_GROUP];
    for t in 0..len {
        let row = &b.codes[(start + t0 + t) * b.row_words..][..b.row_words];
        for (gi, c0) in (0..d).step_by(g).enumerate() {
            pack::unpack_bits(row, b.width, c0, &mut codes[..g]);
            if let Some(lv) = b.levels {
                for c in &mut codes[..g] {
                    *c = lv.bytes[usize::from(*c)];
                }
            }
            for qi in 0..nq {
                let pt = pq[(gi * nq + qi) * T + t];
                for (a, &code) in iacc[qi * d + c0..][..g].iter_mut().zip(&codes[..g]) {
                    *a += pt * f32::from(code);
                }
            }
        }
    }
    for qi in 0..nq {
        for c in 0..d {
            let i = qi * d + c;
            l[i] += delta[(c / g) * nq + qi] * iacc[i];
        }
    }
}

/// Ends the int8 value path: `out += l`, then each channel's group zero-point sum (`zl`'s lanes added in
/// [`hsum_tree`]'s order).
pub(crate) fn finish_values_q8(g: usize, d: usize, l: &[f32], zl: &[f32], out: &mut [f32]) {
    let groups = d / g;
    for ((o, l), zq) in out.chunks_exact_mut(d).zip(l.chunks_exact(d)).zip(zl.chunks_exact(groups * 8)) {
        for ((o, l), z) in o.chunks_exact_mut(g).zip(l.chunks_exact(g)).zip(zq.chunks_exact(8)) {
            let z = hsum_tree(&core::array::from_fn(|k| z[k]));
            for (o, &l) in o.iter_mut().zip(l) {
                *o += l;
                *o += z;
            }
        }
    }
}
