//! Attention over generic cache bodies: codebook levels, FP8 parameters, outlier slots, permuted groups and
//! transformed bases ([`crate::cache::Transform`]), the formats of KVQuant, SKVQ and kvq's own recipes.
//!
//! Each reads the packed codes in place and never stores a dequantized history:
//!
//! - **Per-channel keys**, one key group (`G` tokens) at a time: the group's codes become values
//!   `zero + scale * level(code)` in a `[G][d]` buffer, the group's outlier corrections are added, and
//!   each row is dotted with the query turned into the stored basis of its offset within the group
//!   ([`offset_queries`], once per step). The buffer is reused group after group.
//! - **Per-token keys**: the same per token, then the row is un-permuted and turned back.
//! - **Per-token values**: rows stay in the stored basis; `sum_t p_t v_t` is accumulated there and turned
//!   back once per query at the end ([`finish_values`]), since the inverse transform is linear.
//!
//! These are the portable twins (Miri's and the firmware's path); see `avx2` for the vector ones.

use super::{Probs, Queries, Scores};
use crate::cache::{Cache, EMPTY_SLOT, QuantSpec, Stream, StreamView, config::MAX_HEAD_DIM, layout};
use crate::pack;

/// The values of key group `gi` (starting at ring slot `g0`) of KV head `h` in the stored basis, outliers
/// added, into `rows` (`[G][d]`).
pub(crate) fn key_group_stored(
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    d: usize,
    g0: usize,
    rows: &mut [f32],
) {
    let (l, g) = (sv.layout, q.group);
    let gi = g0 / g;
    let mut codes = [0u8; crate::cache::config::MAX_GROUP];
    for c in 0..d {
        let words =
            &sv.codes[h * l.key_head_words(d) + layout::key_row(g0, c, d, l.row_words)..][..l.row_words];
        pack::unpack_bits(words, q.width, g0 % layout::KEY_BLOCK, &mut codes[..g]);
        let p = sv.params(q.params, (h * l.row_groups + gi) * d + c);
        let coder = sv.coder(q, h * d + c);
        for (t, &code) in codes[..g].iter().enumerate() {
            rows[t * d + c] = coder.decode(&p, code);
        }
    }
    if q.outliers > 0 {
        for o in &sv.outliers[(h * l.row_groups + gi) * q.outliers..][..q.outliers] {
            if o.index != EMPTY_SLOT {
                rows[usize::from(o.index)] += o.delta();
            }
        }
    }
}

/// The queries of a generic per-channel key body, one set per offset within a key group: a stored row
/// `k_s` at offset `o` is the key `R(o) (H (k_s + mu)) / b` (see [`Cache::inverse`]), so its score is
/// `q_o . k_s + q_o . mu` with `q_o = H (R(-o) q / b)`. `oq` receives `[G][nq][d]`, `bias` `[G][nq]`.
/// Turning the `G * nq` queries once per step replaces turning every key row back.
pub(crate) fn offset_queries(
    cache: &Cache<'_>,
    h: usize,
    g: usize,
    queries: &Queries<'_>,
    oq: &mut [f32],
    bias: &mut [f32],
) {
    let cfg = cache.config();
    let (d, t) = (queries.d, cfg.transform);
    let tables = cache.view(Stream::Keys).tables;
    for o in 0..g {
        for qi in 0..queries.nq {
            let row = &mut oq[(o * queries.nq + qi) * d..][..d];
            row.copy_from_slice(queries.row(qi));
            if let Some(rope) = t.rope {
                rope.rotate(row, &tables.rope[o * d..][..d], true);
            }
            if t.balance_keys {
                for (x, &b) in row.iter_mut().zip(&tables.balance[h * d..][..d]) {
                    *x /= b;
                }
            }
            if t.rotate_keys {
                crate::transform::hadamard(row);
            }
            bias[o * queries.nq + qi] =
                if t.center_keys { super::dot(row, &tables.center[h * d..][..d]) } else { 0.0 };
        }
    }
}

/// Scores of body tokens at ring slots `start..start + n` (group-aligned) of per-channel keys of KV head
/// `h`, against the offset queries `oq` and `bias` of [`offset_queries`]. `rows` holds `G * d` floats.
#[allow(clippy::too_many_arguments)]
pub(crate) fn channel_key_scores(
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    nq: usize,
    d: usize,
    oq: &[f32],
    bias: &[f32],
    out: &mut Scores<'_>,
    rows: &mut [f32],
) {
    let g = q.group;
    let rows = &mut rows[..g * d];
    for g0 in (start..start + n).step_by(g) {
        key_group_stored(sv, q, h, d, g0, rows);
        for (t, row) in rows.chunks_exact(d).enumerate() {
            for qi in 0..nq {
                *out.at(qi, g0 - start + t) =
                    super::dot(&oq[(t * nq + qi) * d..][..d], row) + bias[t * nq + qi];
            }
        }
    }
}

/// One token row of a per-token stream of KV head `h` at ring slot `slot`, in the stored basis and order
/// (permuted positions), outliers added.
pub(crate) fn token_stored(
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    d: usize,
    slot: usize,
    row: &mut [f32],
) {
    let l = sv.layout;
    let groups = d / q.group;
    let (_, bounds) = sv.tables.order(h, d, groups);
    let words = &sv.codes[(h * l.ring + slot) * l.row_words..][..l.row_words];
    let mut codes = [0u8; MAX_HEAD_DIM];
    pack::unpack_bits(words, q.width, 0, &mut codes[..d]);
    let coder = sv.coder(q, h);
    for gj in 0..groups {
        let range = if bounds.is_empty() {
            gj * q.group..(gj + 1) * q.group
        } else {
            usize::from(bounds[gj])..usize::from(bounds[gj + 1])
        };
        let p = sv.params(q.params, (h * l.row_groups + gj) * l.ring + slot);
        for i in range {
            row[i] = coder.decode(&p, codes[i]);
        }
    }
    if q.outliers > 0 {
        for o in &sv.outliers[slot * q.outliers..][..q.outliers] {
            let i = usize::from(o.index);
            if o.index != EMPTY_SLOT && i / d == h {
                row[i % d] += o.delta();
            }
        }
    }
}

/// Undoes a permuted stream's order: `row[perm[i]] = stored[i]`.
fn unpermute(sv: &StreamView<'_>, q: QuantSpec, h: usize, stored: &[f32], row: &mut [f32]) {
    let d = row.len();
    let (perm, _) = sv.tables.order(h, d, d / q.group);
    if perm.is_empty() {
        row.copy_from_slice(stored);
    } else {
        for (&p, &x) in perm.iter().zip(stored) {
            row[usize::from(p)] = x;
        }
    }
}

/// Scores of body tokens at ring slots `start..start + n` of per-token keys of KV head `h` against the raw
/// (scaled) queries.
#[allow(clippy::too_many_arguments)]
pub(crate) fn token_key_scores(
    cache: &Cache<'_>,
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    queries: &Queries<'_>,
    out: &mut Scores<'_>,
) {
    let d = queries.d;
    let (mut stored, mut row) = ([0.0f32; MAX_HEAD_DIM], [0.0f32; MAX_HEAD_DIM]);
    for t in 0..n {
        token_stored(sv, q, h, d, start + t, &mut stored[..d]);
        unpermute(sv, q, h, &stored[..d], &mut row[..d]);
        cache.inverse(Stream::Keys, h, 0, &mut row[..d]);
        for qi in 0..queries.nq {
            *out.at(qi, t) = super::dot(queries.row(qi), &row[..d]);
        }
    }
}

/// `acc[qi] += sum_t p[qi][t] * v_t` over body tokens at ring slots `start..start + n` of per-token values
/// of KV head `h`, with `v_t` in the stored basis and order (turn `acc` back with [`finish_values`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn token_value_sums(
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    acc: &mut [f32],
) {
    let mut stored = [0.0f32; MAX_HEAD_DIM];
    for t in 0..n {
        token_stored(sv, q, h, d, start + t, &mut stored[..d]);
        for (qi, a) in acc.chunks_exact_mut(d).enumerate() {
            let pt = p.at(qi, t);
            for (a, &x) in a.iter_mut().zip(&stored[..d]) {
                *a += pt * x;
            }
        }
    }
}

/// Adds the stored-basis sums `acc` (`[nq][d]`) of KV head `h`'s value body, turned back (un-permuted, then
/// the inverse value transform), into `out`.
pub(crate) fn finish_values(cache: &Cache<'_>, sv: &StreamView<'_>, h: usize, acc: &[f32], out: &mut [f32]) {
    let d = cache.config().head_dim;
    let q = cache.config().value_spec();
    let mut row = [0.0f32; MAX_HEAD_DIM];
    for (a, o) in acc.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        match q {
            Some(q) if q.permuted => unpermute(sv, q, h, a, &mut row[..d]),
            _ => row[..d].copy_from_slice(a),
        }
        cache.inverse(Stream::Values, h, 0, &mut row[..d]);
        for (o, &x) in o.iter_mut().zip(&row[..d]) {
            *o += x;
        }
    }
}
