//! Attention over generic cache bodies: codebook levels, FP8 parameters, outlier slots, permuted groups and
//! transformed bases ([`crate::cache::Transform`]), the formats of KVQuant, SKVQ and kvq's own recipes.
//!
//! Each reads the packed codes in place and never stores a dequantized history:
//!
//! - **Per-channel keys**, one key group (`G` tokens) at a time, one channel at a time: the channel's
//!   codes become values `zero + scale * level(code)`, multiplied lane by lane (a lane per token of the
//!   group) with each query turned into the stored basis of that token's offset within the group
//!   ([`offset_queries`], once per step); the group's outlier corrections are added after.
//! - **Per-token keys**: the same per token, then the row is un-permuted and turned back.
//! - **Per-token values**: rows stay in the stored basis; `sum_t p_t v_t` is accumulated there and turned
//!   back once per query at the end ([`finish_values`]), since the inverse transform is linear.
//!
//! These are the portable twins (Miri's and the firmware's path); see `avx2` for the vector ones.

use super::{Probs, Queries, Scores};
use crate::cache::tier::TierView;
use crate::cache::{Cache, EMPTY_SLOT, QuantSpec, Stream, StreamView, config::MAX_HEAD_DIM};
use crate::pack;

/// The values of key group `gi` (starting at ring slot `g0`) of KV head `h` in the stored basis, outliers
/// added, into `rows` (`[G][d]`).
#[cfg(any(test, target_arch = "x86_64"))]
#[inline(always)]
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
        let words = &sv.codes[h * l.key_head_words(d) + l.key_row(g0, c, d)..][..l.row_words];
        pack::unpack_bits(words, q.width, l.key_col(g0), &mut codes[..g]);
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
/// `q_o . k_s + q_o . mu` with `q_o = H (R(-o) q / b)`. `oq` receives them transposed, with offsets side
/// by side as a key group's codes lie (see [`oq_at`]), `bias` `[nq][G]`.
/// Turning the `G * nq` queries once per step replaces turning every key row back. Where `avx512` or
/// `vector` (and the shapes fit: runs of 16 offsets, keys neither balanced nor centred) the AVX-512 or the
/// AVX2 kernel forms them, the same bits.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(crate) fn offset_queries(
    cache: &Cache<'_>,
    h: usize,
    g: usize,
    queries: &Queries<'_>,
    oq: &mut [f32],
    bias: &mut [f32],
    vector: bool,
    avx512: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        let (d, t) = (queries.d, cache.config().transform);
        // A rotation needs a power of two (`hadamard_len_ok`), as both kernels' sweeps do.
        let rotate = t.rotate_keys && crate::transform::hadamard_len_ok(d);
        let rope = t.rope.map(|r| (r, cache.view(Stream::Keys).tables.rope));
        let fits = oq_run(g) == 16 && !t.balance_keys && !t.center_keys;
        if fits && avx512 && d.is_multiple_of(16) && d <= super::avx2::avx512::OQ_MAX_D {
            // SAFETY: `avx512` comes from an AVX-512 `Kernel`, which exists only where the CPU has the
            // features the kernel enables (see the note above the dispatchers in `attention`).
            return unsafe { super::avx2::avx512::offset_queries(rope, rotate, g, queries, oq, bias) };
        }
        if fits && d.is_multiple_of(8) && d <= super::avx2::OQ_MAX_D {
            // SAFETY: `vector` comes from an AVX2 `Kernel`, which exists only where the CPU has AVX2, FMA
            // and F16C (see the note above the dispatchers in `attention`).
            return unsafe { super::avx2::offset_queries(rope, rotate, g, queries, oq, bias) };
        }
        // SAFETY: as just above.
        return unsafe { offset_queries_avx2(cache, h, g, queries, oq, bias) };
    }
    let _ = (vector, avx512);
    offset_queries_in(cache, h, g, queries, oq, bias)
}

/// [`offset_queries_in`] compiled for AVX2 (the same code; the compiler widens the rotations).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn offset_queries_avx2(
    cache: &Cache<'_>,
    h: usize,
    g: usize,
    queries: &Queries<'_>,
    oq: &mut [f32],
    bias: &mut [f32],
) {
    offset_queries_in(cache, h, g, queries, oq, bias)
}

/// [`offset_queries`]' loops, a run of offsets at a time with the offsets side by side (as they lie in
/// `oq`): each channel of a run is a row of `run` lanes, so RoPE, balance and the Hadamard butterflies are
/// the same elementwise operations as [`crate::transform::Rope::rotate`] and
/// [`crate::transform::hadamard`] apply to one row, run across the lanes (which the compiler widens),
/// instead of one offset's row at a time.
#[inline(always)]
fn offset_queries_in(
    cache: &Cache<'_>,
    h: usize,
    g: usize,
    queries: &Queries<'_>,
    oq: &mut [f32],
    bias: &mut [f32],
) {
    let cfg = cache.config();
    let (d, t, nq) = (queries.d, cfg.transform, queries.nq);
    let tables = cache.view(Stream::Keys).tables;
    let run = oq_run(g);
    let norm = 1.0 / libm::sqrtf(d as f32);
    let (mut cos, mut sin) =
        ([0.0f32; crate::cache::config::MAX_GROUP], [0.0f32; crate::cache::config::MAX_GROUP]);
    for o0 in (0..g).step_by(run) {
        // The inverse rotation by each offset, `R(-o) q` (see `Rope::rotate`): per channel pair, the run's
        // angles gathered once for every query.
        if let Some(rope) = t.rope {
            for i in 0..d / 2 {
                for l in 0..run {
                    let cs = &tables.rope[(o0 + l) * d + 2 * i..][..2];
                    (cos[l], sin[l]) = (cs[0], -cs[1]);
                }
                let (a, b) = rope.pair(i, d);
                for qi in 0..nq {
                    let (qa, qb) = (queries.row(qi)[a], queries.row(qi)[b]);
                    let x = &mut oq[oq_at(qi, 0, o0, nq, d, g)..][..d * run];
                    let (xa, xb) = if a < b {
                        let (lo, hi) = x.split_at_mut(b * run);
                        (&mut lo[a * run..][..run], &mut hi[..run])
                    } else {
                        let (lo, hi) = x.split_at_mut(a * run);
                        (&mut hi[..run], &mut lo[b * run..][..run])
                    };
                    for (((xa, xb), &c), &s) in xa.iter_mut().zip(xb).zip(&cos[..run]).zip(&sin[..run]) {
                        *xa = qa * c - qb * s;
                        *xb = qa * s + qb * c;
                    }
                }
            }
        }
        for qi in 0..nq {
            let q = queries.row(qi);
            let x = &mut oq[oq_at(qi, 0, o0, nq, d, g)..][..d * run];
            if t.rope.is_none() {
                for (c, &v) in q.iter().enumerate() {
                    x[c * run..][..run].fill(v);
                }
            }
            if t.balance_keys {
                for (c, &b) in tables.balance[h * d..][..d].iter().enumerate() {
                    for v in &mut x[c * run..][..run] {
                        *v /= b;
                    }
                }
            }
            if t.rotate_keys && crate::transform::hadamard_len_ok(d) {
                // `hadamard`'s butterflies, channel rows for elements.
                let mut hh = 1;
                while hh < d {
                    for blk in (0..d).step_by(2 * hh) {
                        for c in blk..blk + hh {
                            let (lo, hi) = x.split_at_mut((c + hh) * run);
                            for (u, v) in lo[c * run..][..run].iter_mut().zip(&mut hi[..run]) {
                                let (p, m) = (*u + *v, *u - *v);
                                (*u, *v) = (p, m);
                            }
                        }
                    }
                    hh *= 2;
                }
                for v in x.iter_mut() {
                    *v *= norm;
                }
            }
            let bias = &mut bias[qi * g + o0..][..run];
            bias.fill(0.0);
            if t.center_keys {
                for (c, &m) in tables.center[h * d..][..d].iter().enumerate() {
                    for (b, &v) in bias.iter_mut().zip(&x[c * run..][..run]) {
                        *b += v * m;
                    }
                }
            }
        }
    }
}

/// Offsets per run of the offset queries' layout ([`oq_at`]): 16 where the key group is a multiple of 16
/// tokens, else the whole group.
#[inline(always)]
pub(crate) const fn oq_run(g: usize) -> usize {
    if g.is_multiple_of(16) { 16 } else { g }
}

/// Index in [`offset_queries`]' output of query `qi`'s weight of channel `c` at offset `o` (of `nq` queries,
/// head_dim `d`, key groups of `g`): runs of [`oq_run`] offsets, run-major, then query, then channel
/// (`[g / run][nq][d][run]`), so that a block of 16 tokens reads its weights for every channel and query
/// in one sequential sweep (a `[nq][d][g]` layout strides them `4 g` bytes apart, and at `g = 64` the
/// queries alias in the L1 cache).
#[inline(always)]
pub(crate) const fn oq_at(qi: usize, c: usize, o: usize, nq: usize, d: usize, g: usize) -> usize {
    let run = oq_run(g);
    ((o / run * nq + qi) * d + c) * run + o % run
}

/// Codes `start..start + out.len()` of a per-channel key row: word by word with constant shifts where no
/// code straddles a word and the run starts on a word (1, 2, 4 and 8 bits; key groups start on one), the
/// serial unpacker otherwise.
#[inline(always)]
fn row_codes(words: &[u32], width: pack::Width, start: usize, out: &mut [u8]) {
    match width.bits() {
        1 => word_codes::<1>(words, start, out),
        2 => word_codes::<2>(words, start, out),
        4 => word_codes::<4>(words, start, out),
        8 => word_codes::<8>(words, start, out),
        3 => triple_codes(words, start, out),
        _ => pack::unpack_bits(words, width, start, out),
    }
}

/// Three-bit codes in blocks of 32 (three words, 96 bits): codes 0..21 of a block lie in its first two
/// words read as one `u64`, codes 21..32 in its last two (code 21 starts at bit 63, the high word's bit
/// 31), so every code is one constant shift of one of two `u64`s. Runs that start off a block or end
/// inside one use the serial unpacker.
#[inline(always)]
fn triple_codes(words: &[u32], start: usize, out: &mut [u8]) {
    if !start.is_multiple_of(32) || !out.len().is_multiple_of(32) {
        return pack::unpack_bits(words, pack::Width::B3, start, out);
    }
    for (o, w) in out.chunks_exact_mut(32).zip(words[start * 3 / 32..].chunks_exact(3)) {
        let lo = u64::from(w[0]) | u64::from(w[1]) << 32;
        let hi = u64::from(w[1]) | u64::from(w[2]) << 32;
        for (k, x) in o.iter_mut().enumerate() {
            let v = if k < 21 { lo >> (3 * k) } else { hi >> (3 * k - 32) };
            *x = (v & 7) as u8;
        }
    }
}

#[inline(always)]
fn word_codes<const B: usize>(words: &[u32], start: usize, out: &mut [u8]) {
    let per = 32 / B;
    if !(start * B).is_multiple_of(32) || !out.len().is_multiple_of(per) {
        let w = match B {
            1 => pack::Width::B1,
            2 => pack::Width::B2,
            4 => pack::Width::B4,
            _ => pack::Width::B8,
        };
        return pack::unpack_bits(words, w, start, out);
    }
    let mask = (1u32 << B) - 1;
    for (o, &w) in out.chunks_exact_mut(per).zip(&words[start * B / 32..]) {
        for (k, x) in o.iter_mut().enumerate() {
            *x = ((w >> (k * B)) & mask) as u8;
        }
    }
}

/// `out[i] = table[codes[i]]` for codes of `bits` bits (at most 4). Two-bit codes pick among the four
/// entries with two levels of selects, which compile to vector blends where a table load per element would
/// stay scalar; wider codes load.
#[inline(always)]
fn lookup(bits: u32, table: &[f32; 16], codes: &[u8], out: &mut [f32]) {
    if bits == 2 {
        let [t0, t1, t2, t3] = [table[0], table[1], table[2], table[3]];
        for (x, &k) in out.iter_mut().zip(codes) {
            let odd = k & 1 != 0;
            let (lo, hi) = if odd { (t1, t3) } else { (t0, t2) };
            *x = if k & 2 != 0 { hi } else { lo };
        }
    } else {
        for (x, &k) in out.iter_mut().zip(codes) {
            *x = table[usize::from(k) & 15];
        }
    }
}

/// Scores of body tokens at ring slots `start..start + n` (group-aligned) of per-channel keys of KV head
/// `h`, against the offset queries `oq` and `bias` of [`offset_queries`]. One key group at a time, one
/// channel at a time: the channel's `G` codes become stored values `zero + scale * level(code)` and every
/// query's `G` offset weights for that channel multiply them, lane by lane (the token within the group is
/// the lane); outlier corrections are added to the tokens they belong to. `acc` holds `nq * G` floats.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn channel_key_scores_in(
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
    acc: &mut [f32],
) {
    // KIVI's and kvq's key groups of 32 and 64 with the group length a constant, so that the loops over a group's
    // lanes compile to whole vectors; any other group with it read at run time.
    if q.group == 32 {
        channel_key_groups::<32>(sv, q, h, start, n, nq, d, oq, bias, out, acc)
    } else if q.group == 64 {
        channel_key_groups::<64>(sv, q, h, start, n, nq, d, oq, bias, out, acc)
    } else {
        channel_key_groups::<0>(sv, q, h, start, n, nq, d, oq, bias, out, acc)
    }
}

/// [`channel_key_scores_in`] for groups of `G` tokens (`G = 0`: the spec's group, read at run time).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn channel_key_groups<const G: usize>(
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
    acc: &mut [f32],
) {
    let (l, g) = (sv.layout, if G == 0 { q.group } else { G });
    let acc = &mut acc[..nq * g];
    let mut codes = [0u8; crate::cache::config::MAX_GROUP];
    let mut col = [0.0f32; crate::cache::config::MAX_GROUP];
    for g0 in (start..start + n).step_by(g) {
        let gi = g0 / g;
        acc.copy_from_slice(&bias[..nq * g]);
        for c in 0..d {
            let words = &sv.codes[h * l.key_head_words(d) + l.key_row(g0, c, d)..][..l.row_words];
            row_codes(words, q.width, l.key_col(g0), &mut codes[..g]);
            let p = sv.params(q.params, (h * l.row_groups + gi) * d + c);
            match sv.coder(q, h * d + c).levels {
                None => {
                    for (x, &k) in col[..g].iter_mut().zip(&codes[..g]) {
                        *x = p.zero + f32::from(k) * p.scale;
                    }
                }
                Some((_, dec)) => {
                    let mut table = [0.0f32; 16];
                    for (x, &level) in table.iter_mut().zip(dec) {
                        *x = p.zero + p.scale * level;
                    }
                    lookup(q.width.bits(), &table, &codes[..g], &mut col[..g]);
                }
            }
            let run = oq_run(g);
            for qi in 0..nq {
                for t0 in (0..g).step_by(run) {
                    let w = &oq[oq_at(qi, c, t0, nq, d, g)..][..run];
                    for ((a, &x), &wq) in acc[qi * g + t0..][..run].iter_mut().zip(&col[t0..][..run]).zip(w) {
                        *a += wq * x;
                    }
                }
            }
        }
        finish_key_group(sv, q, h, g0 - start, gi, nq, d, oq, out, acc);
    }
}

/// The end of a per-channel key group's scores: `acc` (`[nq][G]`, the group's scores without outliers)
/// stored as the scores of body tokens `at..at + G`, then the group's outlier corrections added there.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn finish_key_group(
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    at: usize,
    gi: usize,
    nq: usize,
    d: usize,
    oq: &[f32],
    out: &mut Scores<'_>,
    acc: &[f32],
) {
    let g = q.group;
    for qi in 0..nq {
        for t in 0..g {
            *out.at(qi, at + t) = acc[qi * g + t];
        }
    }
    key_group_outliers(sv, q, h, at, gi, nq, d, oq, out);
}

/// Adds key group `gi`'s outlier corrections to the scores of body tokens `at..at + G`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn key_group_outliers(
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    at: usize,
    gi: usize,
    nq: usize,
    d: usize,
    oq: &[f32],
    out: &mut Scores<'_>,
) {
    let (l, g) = (sv.layout, q.group);
    if q.outliers > 0 {
        for o in &sv.outliers[(h * l.row_groups + gi) * q.outliers..][..q.outliers] {
            if o.index != EMPTY_SLOT {
                let (t, c) = (usize::from(o.index) / d, usize::from(o.index) % d);
                let delta = o.delta();
                for qi in 0..nq {
                    *out.at(qi, at + t) += oq[oq_at(qi, c, t, nq, d, g)] * delta;
                }
            }
        }
    }
}

/// The scale and zero point at parameter index `i` (as [`StreamView::params`]), f16 ones converted with
/// F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn params_f16c(sv: &StreamView<'_>, fmt: crate::quant::param::ParamFormat, i: usize) -> (f32, f32) {
    use super::avx2::f16_to_f32;
    match fmt {
        crate::quant::param::ParamFormat::F16 => (f16_to_f32(sv.scale[i]), f16_to_f32(sv.zero[i])),
        _ => {
            let p = sv.params(fmt, i);
            (p.scale, p.zero)
        }
    }
}

/// The levels of a coder as a lookup table's 16 entries: entry `k` is the level of code `k % 2^bits`
/// (the codebook's, or the code itself for the uniform grid; a ternary codebook's missing fourth level
/// repeats its third).
#[cfg(target_arch = "x86_64")]
fn repeated_levels(coder: &super::super::cache::group::GroupCoder<'_>, bits: u32) -> [f32; 16] {
    let mask = (1usize << bits) - 1;
    core::array::from_fn(|k| match coder.levels {
        None => f32::from((k & mask) as u8),
        Some((_, dec)) => dec[(k & mask).min(dec.len() - 1)],
    })
}

/// Floats of the tile of dequantized value rows [`token_value_sums_lookup`] holds for prefill.
#[cfg(target_arch = "x86_64")]
const VALUE_ROWS: usize = 8192;

/// Channel tables [`channel_key_scores_lookup`] holds at once: its batches of key groups take
/// `LOOKUP_TABLES / d` groups.
#[cfg(target_arch = "x86_64")]
const LOOKUP_TABLES: usize = 256;

/// Whether [`channel_key_scores_lookup`] takes a per-channel key body of spec `q`: codes of 1 to 4 bits
/// (not ternary) in groups of a multiple of 16 tokens.
#[cfg(target_arch = "x86_64")]
fn lookup_path(q: QuantSpec, d: usize) -> bool {
    !matches!(q.width, pack::Width::Ternary | pack::Width::B8)
        && q.group.is_multiple_of(16)
        && d <= LOOKUP_TABLES
}

/// [`channel_key_scores_in`] with hand-written AVX2 for the groups' codes (see
/// [`super::avx2::GroupRun::scores`]): per batch of key groups, each channel's reconstruction of every
/// code is formed once (`zero + scale * level`, as the portable path forms it), then the scores are table
/// lookups and FMAs in registers, written straight to `out`; outliers are added after, as the portable path
/// adds them. `d <= LOOKUP_TABLES`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments, unsafe_code)]
fn channel_key_scores_lookup(
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
    avx512: bool,
) {
    let (l, g) = (sv.layout, q.group);
    let mut levels = [[0.0f32; 16]; LOOKUP_TABLES];
    for (c, lv) in levels[..d].iter_mut().enumerate() {
        *lv = repeated_levels(&sv.coder(q, h * d + c), q.width.bits());
    }
    let mut tables = [[0.0f32; 16]; LOOKUP_TABLES];
    let batch = LOOKUP_TABLES / d;
    let mut groups = [(0usize, 0usize, 0usize); LOOKUP_TABLES];
    let mut g0 = start;
    while g0 < start + n {
        let nb = ((start + n - g0) / g).min(batch);
        for (b, grp) in groups[..nb].iter_mut().enumerate() {
            let s0 = g0 + b * g;
            let gi = s0 / g;
            let (i0, tb) = ((h * l.row_groups + gi) * d, &mut tables[b * d..][..d]);
            if avx512 && d.is_multiple_of(16) {
                use crate::quant::param::ParamFormat;
                let lv = &levels[..d];
                match q.params {
                    // SAFETY: as for `group_scores` below.
                    ParamFormat::F16 => unsafe {
                        super::avx2::avx512::fill_tables(tb, lv, &sv.scale[i0..], &sv.zero[i0..])
                    },
                    // SAFETY: as for `group_scores` below.
                    ParamFormat::Fp8E4M3 => unsafe {
                        super::avx2::avx512::fill_tables_fp8(tb, lv, &sv.scale8[i0..], &sv.zero8[i0..])
                    },
                }
            } else if d.is_multiple_of(8) {
                use super::avx2::TableParams;
                use crate::quant::param::ParamFormat;
                let params = match q.params {
                    ParamFormat::F16 => TableParams::F16(&sv.scale[i0..], &sv.zero[i0..]),
                    ParamFormat::Fp8E4M3 => TableParams::Fp8(&sv.scale8[i0..], &sv.zero8[i0..]),
                };
                super::avx2::fill_tables(tb, &levels[..d], params, q.width.bits() > 3);
            } else {
                for (c, (table, lv)) in tb.iter_mut().zip(&levels[..d]).enumerate() {
                    let (scale, zero) = params_f16c(sv, q.params, i0 + c);
                    super::avx2::fill_table(table, lv, scale, zero);
                }
            }
            *grp = (h * l.key_head_words(d) + l.key_row(s0, 0, d), l.key_col(s0), s0 - start);
        }
        let run = super::avx2::GroupRun {
            codes: sv.codes,
            row_words: l.row_words,
            groups: &groups[..nb],
            tables: &tables[..nb * d],
            d,
            g,
            oq,
            bias: &bias[..nq * g],
        };
        if avx512 {
            // SAFETY: `avx512` comes from a `Kernel` with AVX-512 set, which exists only where the CPU has
            // AVX-512 F, BW, VL, VNNI and VBMI (`Kernel::avx512`).
            unsafe { super::avx2::avx512::group_scores(&run, q.width.bits(), out) };
        } else {
            run.scores(q.width.bits(), out);
        }
        for &(_, _, at) in &groups[..nb] {
            key_group_outliers(sv, q, h, at, (start + at) / g, nq, d, oq, out);
        }
        g0 += nb * g;
    }
}

/// Query heads per KV head from which a per-channel key body is scored by
/// [`channel_key_scores_dequant`] (prefill's chunks) rather than by offset queries (decode).
pub(crate) const DEQUANT_QUERIES: usize = 16;
// The generic test's prefill puts 15 and 18 queries on a KV head, one on each side of the threshold.
const _: () = assert!(15 < DEQUANT_QUERIES && DEQUANT_QUERIES <= 18);

/// Whether [`channel_key_scores_dequant`] takes `nq` queries over a per-channel key body of spec `q`:
/// prefill's many queries (whose scratch, [`super::GenericWork`], holds a group's rows twice over) and
/// groups of a multiple of 16.
pub(crate) fn dequant_path(q: QuantSpec, nq: usize, vector: bool) -> bool {
    cfg!(target_arch = "x86_64") && vector && nq >= DEQUANT_QUERIES && q.group.is_multiple_of(16)
}

/// Scores of body tokens at ring slots `start..start + n` (group-aligned) of per-channel keys of KV head
/// `h` against the raw queries, for prefill's many queries: each key group is dequantized once into the
/// queries' basis (stored rows, outliers added, turned back with [`Cache::inverse`]) and laid out channel by
/// channel (`[d][G]` in `buf`, which holds `2 G d` floats), promoted tokens' tier corrections added in
/// the stored basis (`tiers`: the view and the segment's first logical body index), then every query is
/// dotted with it in registers ([`super::avx2::scores_rows_f32`]). A decode step's few queries use the offset queries instead, which
/// read the codes without a dequantized copy; here the copy costs about one key's inverse transform per
/// token, against `nq` dot products.
#[allow(clippy::too_many_arguments, unsafe_code)]
pub(crate) fn channel_key_scores_dequant(
    cache: &Cache<'_>,
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    queries: &Queries<'_>,
    out: &mut Scores<'_>,
    buf: &mut [f32],
    tiers: Option<(TierView<'_>, usize)>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `dequant_path` admitted this call only with `vector`, which comes from an AVX2 `Kernel`,
        // which exists only where the CPU has AVX2, FMA and F16C (see the note above the dispatchers in
        // `attention`).
        unsafe { channel_key_scores_dequant_avx2(cache, sv, q, h, start, n, queries, out, buf, tiers) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (cache, sv, q, h, start, n, queries, out, buf, tiers);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn channel_key_scores_dequant_avx2(
    cache: &Cache<'_>,
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    queries: &Queries<'_>,
    out: &mut Scores<'_>,
    buf: &mut [f32],
    tiers: Option<(TierView<'_>, usize)>,
) {
    let (d, g) = (queries.d, q.group);
    let (rows, cols) = buf[..2 * g * d].split_at_mut(g * d);
    let mut corr = [0.0f32; MAX_HEAD_DIM];
    for g0 in (start..start + n).step_by(g) {
        key_group_stored(sv, q, h, d, g0, rows);
        if let Some((tv, j0)) = &tiers {
            for (t, slot) in tv.promoted(h, j0 + (g0 - start), g) {
                tv.correction(slot, Stream::Keys, &mut corr[..d]);
                for (x, &c) in rows[t * d..][..d].iter_mut().zip(&corr[..d]) {
                    *x += c;
                }
            }
        }
        for (o, row) in rows.chunks_exact_mut(d).enumerate() {
            cache.inverse(Stream::Keys, h, o, row);
            for (c, &x) in row.iter().enumerate() {
                cols[c * g + o] = x;
            }
        }
        super::avx2::scores_rows_f32(cols, g, queries, out, g0 - start);
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
    // Rows start on a word, so whole words unpack at once.
    row_codes(words, q.width, 0, &mut codes[..d]);
    let coder = sv.coder(q, h);
    // Each group's reconstructions of every code (at most 16 for widths up to 4 bits) are computed once,
    // then the row is a table lookup per element; 8-bit codes decode one by one.
    let levels = q.width.levels() as usize;
    let mut table = [0.0f32; 16];
    for gj in 0..groups {
        let range = if bounds.is_empty() {
            gj * q.group..(gj + 1) * q.group
        } else {
            usize::from(bounds[gj])..usize::from(bounds[gj + 1])
        };
        let p = sv.params(q.params, (h * l.row_groups + gj) * l.ring + slot);
        if levels <= table.len() {
            for (k, x) in table[..levels].iter_mut().enumerate() {
                *x = coder.decode(&p, k as u8);
            }
            lookup(q.width.bits(), &table, &codes[range.clone()], &mut row[range]);
        } else {
            for (x, &k) in row[range.clone()].iter_mut().zip(&codes[range]) {
                *x = coder.decode(&p, k);
            }
        }
    }
    for (c, delta) in token_outliers(sv, q, h, d, slot) {
        row[c] += delta;
    }
}

/// The outliers of KV head `h` in the per-token row at ring slot `slot`: each as its channel (in the stored
/// order) and the value to add there.
#[inline(always)]
fn token_outliers<'a>(
    sv: &StreamView<'a>,
    q: QuantSpec,
    h: usize,
    d: usize,
    slot: usize,
) -> impl Iterator<Item = (usize, f32)> + 'a {
    let slots = &sv.outliers[slot * q.outliers..][..q.outliers];
    // Head `h`'s channels are indices `h d..h d + d`: a subtraction and one compare (a division by `d`
    // here was a third of `kvquant2`'s value time at 8k tokens, `perf` on Zen 4).
    let lo = h * d;
    slots.iter().filter_map(move |o| {
        let c = usize::from(o.index).wrapping_sub(lo);
        (o.index != EMPTY_SLOT && c < d).then(|| (c, o.delta()))
    })
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
#[inline(always)]
fn token_key_scores_in(
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
#[inline(always)]
fn token_value_sums_in(
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

/// Whether [`token_value_sums_lookup`] takes a per-token value body of spec `q`: codes of 1 to 4 bits (or
/// ternary) in fixed groups (not permuted) of a multiple of 16 channels.
#[cfg(target_arch = "x86_64")]
fn value_lookup_path(q: QuantSpec, d: usize) -> bool {
    q.width != pack::Width::B8 && !q.permuted && q.group.is_multiple_of(16) && d.is_multiple_of(q.group)
}

/// [`token_value_sums_in`] with hand-written AVX2 (see [`super::avx2::ValueRun`]): per tile of tokens, each
/// token's group reconstructions of every code are formed once (`zero + scale * level`, as
/// [`token_stored`] forms them), then the sums are table lookups and FMAs in registers; outliers are added
/// after, token by token.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments, unsafe_code)]
fn token_value_sums_lookup(
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    acc: &mut [f32],
    avx512: bool,
) {
    let l = sv.layout;
    let groups = d / q.group;
    let levels = repeated_levels(&sv.coder(q, h), q.width.bits());
    let mut tables = [[0.0f32; 16]; LOOKUP_TABLES];
    // Prefill's many queries: each tile is dequantized once into `rows` and every query's sums are
    // products with it; a decode step's few reconstruct codes in registers.
    let nq = acc.len() / d;
    let mut rows = [0.0f32; VALUE_ROWS];
    let dequant = nq >= DEQUANT_QUERIES && d <= VALUE_ROWS;
    let tile =
        if dequant { (LOOKUP_TABLES / groups).min(VALUE_ROWS / d) } else { LOOKUP_TABLES / groups }.max(1);
    for t0 in (0..n).step_by(tile) {
        let nt = tile.min(n - t0);
        if avx512 && q.params == crate::quant::param::ParamFormat::F16 {
            let at = h * l.row_groups * l.ring + start + t0;
            let (sc, ze) = (&sv.scale[at..], &sv.zero[at..]);
            // SAFETY: `avx512` comes from a `Kernel` with AVX-512 set, which exists only where the CPU has
            // AVX-512 F, BW, VL, VNNI and VBMI (`Kernel::avx512`).
            unsafe {
                super::avx2::avx512::fill_token_tables(&mut tables, &levels, sc, ze, l.ring, groups, nt)
            };
        } else if q.params == crate::quant::param::ParamFormat::F16 {
            let at = h * l.row_groups * l.ring + start + t0;
            let (sc, ze) = (&sv.scale[at..], &sv.zero[at..]);
            super::avx2::fill_token_tables(&mut tables, &levels, sc, ze, l.ring, groups, nt);
        } else {
            for (t, row) in tables[..nt * groups].chunks_exact_mut(groups).enumerate() {
                for (gj, table) in row.iter_mut().enumerate() {
                    let (scale, zero) =
                        params_f16c(sv, q.params, (h * l.row_groups + gj) * l.ring + start + t0 + t);
                    super::avx2::fill_table(table, &levels, scale, zero);
                }
            }
        }
        let run = super::avx2::ValueRun {
            codes: &sv.codes[(h * l.ring + start + t0) * l.row_words..][..nt * l.row_words],
            row_words: l.row_words,
            tables: &tables[..nt * groups],
            group: q.group,
            p: &Probs { pos: p.pos + t0, ..*p },
        };
        if dequant {
            let rows = &mut rows[..nt * d];
            run.rows(q.width.bits(), d, rows);
            for t in 0..nt {
                for (c, delta) in token_outliers(sv, q, h, d, start + t0 + t) {
                    rows[t * d + c] += delta;
                }
            }
            super::avx2::sums_rows_f32(rows, &Probs { pos: p.pos + t0, ..*p }, d, acc);
            continue;
        }
        if avx512 {
            // SAFETY: as above.
            unsafe { super::avx2::avx512::value_run_sums(&run, q.width.bits(), d, acc) };
        } else {
            run.sums(q.width.bits(), d, acc);
        }
        add_token_outliers(sv, q, h, d, start + t0, nt, &Probs { pos: p.pos + t0, ..*p }, acc, avx512);
    }
}

/// Adds the outliers of KV head `h` in the per-token rows at ring slots `slot..slot + n`, each times its
/// token's probability (position `t` of `p` for slot `slot + t`), into the sums `acc` (`[nq][d]`), token
/// by token in slot order (every kernel gives the same bits).
///
/// In two passes over runs of slots: the first keeps head `h`'s outliers (place, channel, delta) without
/// a branch (sixteen slots at a time on AVX-512, [`super::avx2::avx512::keep_outliers`]; else an entry is
/// always written and kept where it is head `h`'s), the second adds them. A branch per slot mispredicted
/// about every other slot (the heads' outliers are interleaved), and adding a miss as `p * 0` to channel 0
/// chained every slot through one float in memory; either way this loop was a third of `kvquant2`'s decode
/// step once its values ran on the int8 path (`perf`, 8k tokens, Zen 4).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments, unsafe_code)]
pub(crate) fn add_token_outliers(
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    d: usize,
    slot: usize,
    n: usize,
    p: &Probs<'_>,
    acc: &mut [f32],
    avx512: bool,
) {
    const RUN: usize = 256;
    let k = q.outliers;
    if k == 0 {
        return;
    }
    let nq = acc.len() / d;
    let lo = h * d;
    let (mut at, mut chan, mut w) = ([0u32; RUN + 15], [0u32; RUN + 15], [0f32; RUN + 15]);
    let shift = k.is_power_of_two().then(|| k.trailing_zeros());
    for (r, run) in sv.outliers[slot * k..][..n * k].chunks(RUN).enumerate() {
        let m = if avx512 {
            // SAFETY: `avx512` comes from a `Kernel` with AVX-512 set, which exists only where the CPU has
            // AVX-512 F, BW, VL, VNNI and VBMI (`Kernel::avx512`).
            unsafe { super::avx2::avx512::keep_outliers(run, lo, d, &mut at, &mut chan, &mut w) }
        } else {
            keep_outliers(run, lo, d, &mut at, &mut chan, &mut w)
        };
        for i in 0..m {
            let place = r * RUN + at[i] as usize;
            let t = match shift {
                Some(b) => place >> b,
                None => place / k,
            };
            for qi in 0..nq {
                acc[qi * d + chan[i] as usize] += p.at(qi, t) * w[i];
            }
        }
    }
}

/// [`super::avx2::avx512::keep_outliers`]'s entries a slot at a time: each slot is written at the next
/// free entry, which moves on only where the slot is one of channels `lo..lo + d`.
#[cfg(target_arch = "x86_64")]
fn keep_outliers(
    slots: &[crate::quant::outliers::Outlier],
    lo: usize,
    d: usize,
    at: &mut [u32],
    chan: &mut [u32],
    w: &mut [f32],
) -> usize {
    let mut m = 0;
    for (i, o) in slots.iter().enumerate() {
        let c = usize::from(o.index).wrapping_sub(lo);
        (at[m], chan[m], w[m]) = (i as u32, c as u32, o.delta());
        m += usize::from((c < d) & (o.index != EMPTY_SLOT));
    }
    m
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

/// Adds the tier corrections of KV head `h`'s promoted keys among logical body tokens `j0..j0 + n` (a run
/// of whole key groups) to their scores: `q_o . c` with the offset query `q_o` of the token's offset within
/// its group (see [`offset_queries`]) and the decoded correction `c`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tier_key_scores(
    tv: &TierView<'_>,
    h: usize,
    j0: usize,
    n: usize,
    nq: usize,
    d: usize,
    g: usize,
    oq: &[f32],
    out: &mut Scores<'_>,
) {
    let mut corr = [0.0f32; MAX_HEAD_DIM];
    for (t, slot) in tv.promoted(h, j0, n) {
        tv.correction(slot, Stream::Keys, &mut corr[..d]);
        let o = (j0 + t) % g;
        for qi in 0..nq {
            let s: f32 = corr[..d].iter().enumerate().map(|(c, &x)| oq[oq_at(qi, c, o, nq, d, g)] * x).sum();
            *out.at(qi, t) += s;
        }
    }
}

/// [`tier_key_scores`] where every offset of a key group has the same query (no RoPE by offset): `q` holds
/// the stored-basis queries, one row of `d` per query. Compiled for AVX2 where `vector` says the CPU has
/// it (the same code, so the same bits).
#[allow(unsafe_code)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn tier_key_scores_flat(
    tv: &TierView<'_>,
    h: usize,
    j0: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    vector: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: `vector` comes from an AVX2 `Kernel`, which exists only where the CPU has AVX2, FMA and
        // F16C (see the note above the dispatchers in `attention`).
        return unsafe { tier_key_scores_flat_avx2(tv, h, j0, n, q, out) };
    }
    let _ = vector;
    tier_key_scores_flat_in(tv, h, j0, n, q, out);
}

/// [`tier_key_scores_flat_in`] compiled for AVX2; 4-bit corrections in groups of 64 channels (`mikv2`'s)
/// are decoded in registers and dotted there ([`super::avx2::tier_key_dots`]), the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn tier_key_scores_flat_avx2(
    tv: &TierView<'_>,
    h: usize,
    j0: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
) {
    if q.d.is_multiple_of(64) && q.nq <= super::avx2::TIER_QUERIES && tv.b4_in_64s() {
        for (t, slot) in tv.promoted(h, j0, n) {
            let mut s = [0.0f32; super::avx2::TIER_QUERIES];
            super::avx2::tier_key_dots(tv.part(slot, Stream::Keys), q, &mut s);
            for (qi, s) in s[..q.nq].iter().enumerate() {
                *out.at(qi, t) += s;
            }
        }
        return;
    }
    tier_key_scores_flat_in(tv, h, j0, n, q, out);
}

#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn tier_key_scores_flat_in(
    tv: &TierView<'_>,
    h: usize,
    j0: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
) {
    let d = q.d;
    let mut corr = [0.0f32; MAX_HEAD_DIM];
    for (t, slot) in tv.promoted(h, j0, n) {
        tv.correction(slot, Stream::Keys, &mut corr[..d]);
        for (qi, row) in q.q.chunks_exact(d).take(q.nq).enumerate() {
            *out.at(qi, t) += super::dot(row, &corr[..d]);
        }
    }
}

/// Adds `p_t * c_t` for KV head `h`'s promoted values among logical body tokens `j0..j0 + n` into the
/// stored-basis sums `acc` (`[nq][d]`), `c_t` the decoded correction. Compiled for AVX2 where `vector`
/// says the CPU has it (the same code, so the same bits).
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(crate) fn tier_value_sums(
    tv: &TierView<'_>,
    h: usize,
    j0: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    acc: &mut [f32],
    vector: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: as in `tier_key_scores_flat`.
        return unsafe { tier_value_sums_avx2(tv, h, j0, n, p, d, acc) };
    }
    let _ = vector;
    tier_value_sums_in(tv, h, j0, n, p, d, acc);
}

/// [`tier_value_sums_in`] compiled for AVX2; 4-bit corrections in groups of 64 channels are decoded in
/// registers and added from there ([`super::avx2::tier_value_axpy`]), the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn tier_value_sums_avx2(
    tv: &TierView<'_>,
    h: usize,
    j0: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    acc: &mut [f32],
) {
    if d.is_multiple_of(64) && tv.b4_in_64s() {
        for (t, slot) in tv.promoted(h, j0, n) {
            super::avx2::tier_value_axpy(tv.part(slot, Stream::Values), p, t, d, acc);
        }
        return;
    }
    tier_value_sums_in(tv, h, j0, n, p, d, acc);
}

#[inline(always)]
fn tier_value_sums_in(
    tv: &TierView<'_>,
    h: usize,
    j0: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    acc: &mut [f32],
) {
    let mut corr = [0.0f32; MAX_HEAD_DIM];
    for (t, slot) in tv.promoted(h, j0, n) {
        tv.correction(slot, Stream::Values, &mut corr[..d]);
        for (qi, a) in acc.chunks_exact_mut(d).enumerate() {
            let pt = p.at(qi, t);
            for (a, &x) in a.iter_mut().zip(&corr[..d]) {
                *a += pt * x;
            }
        }
    }
}

/// [`channel_key_scores_in`], compiled for AVX2 where `vector` says the CPU has it (the loops are the same code; the
/// compiler widens them to eight lanes), else as is.
#[allow(clippy::too_many_arguments, unsafe_code)]
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
    acc: &mut [f32],
    vector: bool,
    avx512: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if vector && lookup_path(q, d) {
        // SAFETY: `vector` comes from an AVX2 `Kernel`, which exists only where the CPU has AVX2, FMA and
        // F16C (see the note above the dispatchers in `attention`); `avx512` from one with AVX-512 too.
        return unsafe { channel_key_scores_lookup(sv, q, h, start, n, nq, d, oq, bias, out, avx512) };
    }
    let _ = avx512;
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: as above.
        return unsafe { channel_key_scores_avx2(sv, q, h, start, n, nq, d, oq, bias, out, acc) };
    }
    let _ = vector;
    channel_key_scores_in(sv, q, h, start, n, nq, d, oq, bias, out, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(unsafe_code)]
#[allow(clippy::too_many_arguments)]
unsafe fn channel_key_scores_avx2(
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
    acc: &mut [f32],
) {
    channel_key_scores_in(sv, q, h, start, n, nq, d, oq, bias, out, acc)
}

/// [`token_key_scores_in`], compiled for AVX2 where `vector` says the CPU has it (the loops are the same code; the
/// compiler widens them to eight lanes), else as is.
#[allow(clippy::too_many_arguments, unsafe_code)]
pub(crate) fn token_key_scores(
    cache: &Cache<'_>,
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    queries: &Queries<'_>,
    out: &mut Scores<'_>,
    vector: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if vector && token_lookup_path(q, queries.d) {
        // SAFETY: `vector` comes from an AVX2 `Kernel`, which exists only where the CPU has AVX2, FMA and
        // F16C (see the note above the dispatchers in `attention`).
        return unsafe { token_key_scores_lookup(cache, sv, q, h, start, n, queries, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: as above.
        return unsafe { token_key_scores_avx2(cache, sv, q, h, start, n, queries, out) };
    }
    let _ = vector;
    token_key_scores_in(cache, sv, q, h, start, n, queries, out)
}

/// Whether [`token_key_scores_lookup`] takes a per-token key body of spec `q` with head_dim `d`: codes of
/// 1 to 4 bits (or ternary), at most 8 groups a row (permuted ones of any sizes), `d` a multiple of 16.
#[cfg(target_arch = "x86_64")]
fn token_lookup_path(q: QuantSpec, d: usize) -> bool {
    q.width != pack::Width::B8 && d.is_multiple_of(16) && d <= LOOKUP_TABLES && d / q.group <= 8
}

/// The first channel of channel group `g` (of `d / q.group`, or `g == groups` for the row's end) of a
/// per-token row in the stored order: fixed groups of `q.group`, or a permuted stream's `bounds`.
#[cfg(target_arch = "x86_64")]
pub(crate) fn group_start(q: QuantSpec, bounds: &[u16], g: usize) -> usize {
    if bounds.is_empty() { g * q.group } else { usize::from(bounds[g]) }
}

/// Each channel's group in a per-token row (stored order): fixed groups of `q.group`, or a permuted
/// stream's `bounds`.
#[cfg(target_arch = "x86_64")]
fn lane_groups(q: QuantSpec, bounds: &[u16], out: &mut [u32]) {
    for (i, g) in out.iter_mut().enumerate() {
        *g = if bounds.is_empty() {
            (i / q.group) as u32
        } else {
            bounds[1..].iter().take_while(|&&b| usize::from(b) <= i).count() as u32
        };
    }
}

/// [`token_value_sums_in`] for rows [`token_value_sums_lookup`] does not take (permuted groups of any
/// sizes, at most 8 a row): each tile of rows is reconstructed in registers ([`super::avx2::TokenRows`]),
/// outliers added, and every query's sums are products with it ([`super::avx2::sums_rows_f32`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn token_value_sums_rows(
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    acc: &mut [f32],
) {
    let l = sv.layout;
    let groups = d / q.group;
    let (_, bounds) = sv.tables.order(h, d, groups);
    let mut lane_group = [0u32; LOOKUP_TABLES];
    lane_groups(q, bounds, &mut lane_group[..d]);
    let levels = repeated_levels(&sv.coder(q, h), q.width.bits());
    let rows_of = super::avx2::TokenRows {
        codes: sv.codes,
        row_words: l.row_words,
        levels: &levels,
        lane_group: &lane_group[..d],
        queries: &[],
        bias: &[],
    };
    let mut rows = [0.0f32; VALUE_ROWS];
    let tile = VALUE_ROWS / d;
    let (mut zero, mut scale) = ([0.0f32; 8], [0.0f32; 8]);
    for t0 in (0..n).step_by(tile) {
        let nt = tile.min(n - t0);
        for (t, row) in rows[..nt * d].chunks_exact_mut(d).enumerate() {
            let slot = start + t0 + t;
            for gj in 0..groups {
                (scale[gj], zero[gj]) = params_f16c(sv, q.params, (h * l.row_groups + gj) * l.ring + slot);
            }
            rows_of.row(q.width.bits(), (h * l.ring + slot) * l.row_words, &zero, &scale, row);
            for (c, delta) in token_outliers(sv, q, h, d, slot) {
                row[c] += delta;
            }
        }
        super::avx2::sums_rows_f32(&rows[..nt * d], &Probs { pos: p.pos + t0, ..*p }, d, acc);
    }
}

/// Queries [`token_key_scores_lookup`] turns into the stored basis at once.
#[cfg(target_arch = "x86_64")]
const TOKEN_QUERIES: usize = 16;

/// [`token_key_scores_in`] with hand-written AVX2 (see [`super::avx2::TokenRows`]). The queries are turned
/// into the stored basis and order once per block of [`TOKEN_QUERIES`] instead of every key row back:
/// a row's key is `k = H (unperm(s) + mu) / b` ([`Cache::inverse`] at offset 0), so the score
/// `q . k = q' . unperm(s) + q' . mu` with `q' = H (q / b)`, and `q' . unperm(s) = sum_i q'[perm[i]] s[i]`.
/// Each row is then
/// reconstructed in registers, its lanes' group parameters picked with `vpermps`, and dotted with every
/// query of the block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
fn token_key_scores_lookup(
    cache: &Cache<'_>,
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    queries: &Queries<'_>,
    out: &mut Scores<'_>,
) {
    let (d, l) = (queries.d, sv.layout);
    let t = cache.config().transform;
    let groups = d / q.group;
    let (perm, bounds) = sv.tables.order(h, d, groups);
    let mut lane_group = [0u32; LOOKUP_TABLES];
    lane_groups(q, bounds, &mut lane_group[..d]);
    let levels = repeated_levels(&sv.coder(q, h), q.width.bits());
    let mut qs = [0.0f32; TOKEN_QUERIES * LOOKUP_TABLES];
    let mut bias = [0.0f32; TOKEN_QUERIES];
    let mut row = [0.0f32; LOOKUP_TABLES];
    for q0 in (0..queries.nq).step_by(TOKEN_QUERIES) {
        let m = TOKEN_QUERIES.min(queries.nq - q0);
        for j in 0..m {
            let dst = &mut qs[j * d..][..d];
            bias[j] = stored_token_query(sv, t, h, perm, queries.row(q0 + j), &mut row[..d], dst);
        }
        let keys = super::avx2::TokenRows {
            codes: sv.codes,
            row_words: l.row_words,
            levels: &levels,
            lane_group: &lane_group[..d],
            queries: &qs[..m * d],
            bias: &bias[..m],
        };
        let mut zero = [0.0f32; 8];
        let mut scale = [0.0f32; 8];
        for tt in 0..n {
            let slot = start + tt;
            for gj in 0..groups {
                (scale[gj], zero[gj]) = params_f16c(sv, q.params, (h * l.row_groups + gj) * l.ring + slot);
            }
            let r = &mut row[..d];
            keys.row(q.width.bits(), (h * l.ring + slot) * l.row_words, &zero, &scale, r);
            for (c, delta) in token_outliers(sv, q, h, d, slot) {
                r[c] += delta;
            }
            keys.dots(r, |j, x| *out.at(q0 + j, tt) = x);
        }
    }
}

/// Query `q` of KV head `h` in a per-token key body's stored basis and order (`dst`): divided by the
/// balancing factors, rotated, then permuted by `perm` (`row`: scratch of `d` floats); returns its
/// centring term `q' . mu` (0 without centring).
#[cfg(target_arch = "x86_64")]
fn stored_token_query(
    sv: &StreamView<'_>,
    t: crate::cache::Transform,
    h: usize,
    perm: &[u16],
    q: &[f32],
    row: &mut [f32],
    dst: &mut [f32],
) -> f32 {
    let d = row.len();
    row.copy_from_slice(q);
    if t.balance_keys {
        for (x, &b) in row.iter_mut().zip(&sv.tables.balance[h * d..][..d]) {
            *x /= b;
        }
    }
    if t.rotate_keys {
        crate::transform::hadamard(row);
    }
    let bias = if t.center_keys { super::dot(row, &sv.tables.center[h * d..][..d]) } else { 0.0 };
    if perm.is_empty() {
        dst.copy_from_slice(row);
    } else {
        for (x, &p) in dst.iter_mut().zip(perm) {
            *x = row[usize::from(p)];
        }
    }
    bias
}

/// Queries per pass of [`token_key_scores_q8`].
#[cfg(target_arch = "x86_64")]
const Q8_TOKEN_QUERIES: usize = 4;

/// Tokens per block of [`token_key_scores_q8`]'s kernels (a vector's dwords on AVX-512, two on AVX2).
#[cfg(target_arch = "x86_64")]
pub(crate) const Q8_TOKEN_BLOCK: usize = 16;

/// Whether decode's per-token key body of spec `q` (SKVQ's) takes the int8 path [`token_key_scores_q8`]:
/// uniform 2-bit (or ternary) codes, `head_dim` a multiple of 64 up to 256, at most 8 groups a row
/// (permuted ones of any sizes).
#[cfg(target_arch = "x86_64")]
pub(crate) fn q8_token_keys(q: QuantSpec, d: usize) -> bool {
    q.width.bits() == 2 && !q.codebook && d.is_multiple_of(64) && d <= 256 && d / q.group <= 8
}

/// One KV head's group parameters of a per-token body from a block's first token: group `g`'s for the
/// block's tokens from entry `g * ring`, f16 or FP8 (E4M3) bits.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) enum BlockParams<'a> {
    F16 { scale: &'a [u16], zero: &'a [u16], ring: usize },
    Fp8 { scale: &'a [u8], zero: &'a [u8], ring: usize },
}

#[cfg(target_arch = "x86_64")]
impl<'a> BlockParams<'a> {
    /// The parameters of `sv` from entry `at` in place, in its format `fmt`.
    fn of(sv: &StreamView<'a>, fmt: crate::quant::param::ParamFormat, at: usize, ring: usize) -> Self {
        let (s16, z16, s8, z8) = (sv.scale, sv.zero, sv.scale8, sv.zero8);
        match fmt {
            crate::quant::param::ParamFormat::F16 => Self::F16 { scale: &s16[at..], zero: &z16[at..], ring },
            _ => Self::Fp8 { scale: &s8[at..], zero: &z8[at..], ring },
        }
    }

    /// The parameters of the tokens `n` on from these (each group's slices advanced by `n`).
    pub(crate) fn advanced(self, n: usize) -> Self {
        match self {
            Self::F16 { scale, zero, ring } => Self::F16 { scale: &scale[n..], zero: &zero[n..], ring },
            Self::Fp8 { scale, zero, ring } => Self::Fp8 { scale: &scale[n..], zero: &zero[n..], ring },
        }
    }

    /// The entries its scale and zero slices both hold, and the distance between groups.
    pub(crate) fn extent(&self) -> (usize, usize) {
        match *self {
            Self::F16 { scale, zero, ring } => (scale.len().min(zero.len()), ring),
            Self::Fp8 { scale, zero, ring } => (scale.len().min(zero.len()), ring),
        }
    }

    /// The first `nt` tokens of each of `groups` groups copied into `pad`, zeros after, as a whole block
    /// (groups [`Q8_TOKEN_BLOCK`] apart).
    fn padded<'p>(&self, nt: usize, groups: usize, pad: &'p mut PadParams) -> BlockParams<'p> {
        const T: usize = Q8_TOKEN_BLOCK;
        fn copy<X: Copy>(src: &[X], ring: usize, nt: usize, groups: usize, dst: &mut [X]) {
            for g in 0..groups {
                dst[g * T..][..nt].copy_from_slice(&src[g * ring..][..nt]);
            }
        }
        match *self {
            Self::F16 { scale, zero, ring } => {
                copy(scale, ring, nt, groups, &mut pad.s16);
                copy(zero, ring, nt, groups, &mut pad.z16);
                BlockParams::F16 { scale: &pad.s16, zero: &pad.z16, ring: T }
            }
            Self::Fp8 { scale, zero, ring } => {
                copy(scale, ring, nt, groups, &mut pad.s8);
                copy(zero, ring, nt, groups, &mut pad.z8);
                BlockParams::Fp8 { scale: &pad.s8, zero: &pad.z8, ring: T }
            }
        }
    }
}

/// A zero-padded block's parameters ([`BlockParams::padded`]): up to 8 groups of [`Q8_TOKEN_BLOCK`].
#[cfg(target_arch = "x86_64")]
struct PadParams {
    s16: [u16; 8 * Q8_TOKEN_BLOCK],
    z16: [u16; 8 * Q8_TOKEN_BLOCK],
    s8: [u8; 8 * Q8_TOKEN_BLOCK],
    z8: [u8; 8 * Q8_TOKEN_BLOCK],
}

/// A block of queries as the int8 per-token key kernels read them: `span[g]` the quads (4 channels) that
/// channel group `g` (stored order) touches; per query `m` and group `g`, the query rounded to integers of
/// at most 127 on its own step `delta[m][g]` over the group's quads, zero on the channels of a shared quad
/// outside the group (`q8[m * stride + at[g]..]`, 4 bytes a quad from quad `span[g].0`), the exact sum of
/// its elements in the group (`qsum[m][g]`), and its centring `bias[m]`.
#[cfg(target_arch = "x86_64")]
pub(crate) struct TokenQueriesQ8<'a> {
    pub(crate) q8: &'a [i8],
    pub(crate) at: &'a [usize],
    pub(crate) stride: usize,
    pub(crate) delta: &'a [f32],
    pub(crate) qsum: &'a [f32],
    pub(crate) bias: &'a [f32],
    pub(crate) span: &'a [(usize, usize)],
    pub(crate) d: usize,
    pub(crate) groups: usize,
}

#[cfg(target_arch = "x86_64")]
impl TokenQueriesQ8<'_> {
    /// Whether a vector kernel's `blocks` blocks of [`Q8_TOKEN_BLOCK`] rows fit the layout it reads: 1 to
    /// 4 queries, `head_dim` a multiple of 64 up to 256 in 2-bit rows of `row_words` (`codes` holding the
    /// blocks), every group's quads within the row and its rounded query within `stride`, the blocks'
    /// parameters in `params`, and their scores (rows `q0..`, columns `t0..t0 + 16 * blocks`) in `out`. The
    /// kernels assert it once a call and then read through pointers; a failure is a bug in this crate.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fits(
        &self,
        codes: &[u32],
        row_words: usize,
        blocks: usize,
        params: &BlockParams<'_>,
        out: &Scores<'_>,
        q0: usize,
        t0: usize,
    ) -> bool {
        let t = Q8_TOKEN_BLOCK * blocks;
        let (d, groups, nq) = (self.d, self.groups, self.bias.len());
        let (plen, ring) = params.extent();
        d.is_multiple_of(64)
            && d <= 256
            && row_words * 16 == d
            && codes.len() >= t * row_words
            && (1..=Q8_TOKEN_QUERIES).contains(&nq)
            && self.q8.len() >= nq * self.stride
            && self.at.len() >= groups
            && self.delta.len() >= nq * groups
            && self.qsum.len() >= nq * groups
            && self.span.len() >= groups
            && self.span[..groups]
                .iter()
                .zip(self.at)
                .all(|(&(a, b), &at)| a <= b && b <= d / 4 && at + 4 * (b - a) <= self.stride)
            && groups > 0
            && plen >= (groups - 1) * ring + t
            && out.data.len() >= (q0 + nq - 1) * out.stride + out.pos + t0 + t
    }

    /// The portable twin of the AVX-512 and AVX2 block kernels: scores of the `n` rows of 2-bit codes at `codes`
    /// (`row_words` apart) with group parameters `scale[g * Q8_TOKEN_BLOCK + t]`, `zero[..]`, given to
    /// `put(m, t, score)`. Per query and row, the integer sums `I_g = sum_c q8[m][g][c] code_c` are exact;
    /// then from `bias[m]`, for each group in order, `+ (s_g delta[m][g]) I_g` and `+ z_g qsum[m][g]`, each
    /// product and sum rounded in f32, as the vector kernel forms them.
    pub(crate) fn scores(
        &self,
        codes: &[u32],
        row_words: usize,
        n: usize,
        scale: &[f32],
        zero: &[f32],
        mut put: impl FnMut(usize, usize, f32),
    ) {
        let (d, groups) = (self.d, self.groups);
        let nq = self.bias.len();
        let mut row = [0u8; 256];
        for t in 0..n {
            pack::unpack_bits(&codes[t * row_words..][..row_words], pack::Width::B2, 0, &mut row[..d]);
            for m in 0..nq {
                let mut acc = self.bias[m];
                for g in 0..groups {
                    let (a, b) = self.span[g];
                    let q8 = &self.q8[m * self.stride + self.at[g]..][..4 * (b - a)];
                    let int: i32 =
                        q8.iter().zip(&row[4 * a..4 * b]).map(|(&q, &c)| i32::from(q) * i32::from(c)).sum();
                    let (s, z) = (scale[g * Q8_TOKEN_BLOCK + t], zero[g * Q8_TOKEN_BLOCK + t]);
                    acc += (s * self.delta[m * groups + g]) * int as f32;
                    acc += z * self.qsum[m * groups + g];
                }
                put(m, t, acc);
            }
        }
    }
}

/// `x` rounded to the nearest integer, ties to even, as `rintf` (under the default rounding mode), for
/// `|x| < 2^22` (and NaN stays NaN; a result of zero is +0 where `rintf` may give -0, the same integer):
/// past `1.5 * 2^23` a float's unit is 1, so the sum rounds and the difference is exact. Inlined and
/// vectorized where `rintf`, a call each, was 1.5% of `skvq2`'s step.
#[cfg(target_arch = "x86_64")]
#[inline]
fn rint_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (x + MAGIC) - MAGIC
}

/// The kernel set [`token_key_scores_q8`] runs: the AVX-512 or the AVX2 block kernel, or the portable twin.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Q8Keys {
    Portable,
    Avx2,
    Avx512,
}

/// Decode's scores of body tokens at ring slots `start..start + n` of a per-token key body of 2-bit codes
/// ([`q8_token_keys`]; SKVQ's keys) on the int8 path, with the AVX-512 or AVX2 block kernel as `kernels`
/// says (blocks of [`Q8_TOKEN_BLOCK`] tokens reading their parameters in place, a last partial one
/// zero-padded), else by [`TokenQueriesQ8::scores`], the same bits.
///
/// Per query, in the stored basis and order (transformed and permuted as [`token_key_scores_lookup`]
/// forms it), each channel group's elements are rounded to integers of at most 127 on the group's step
/// `delta = max |q_c| / 127`; a score is then `sum_g (s_g delta_g) I_g + z_g qsum_g` with the exact
/// integer sums `I_g` of the rounded query against the codes, so it moves by at most
/// `sum_g s_g delta_g / 2 * sum_{c in g} code_c` from the f32 path's (the bound the tests derive). The
/// f32 path reconstructs every row and takes each query's dot product with it: with SKVQ's permuted
/// groups that was four fifths of `skvq2`'s decode step (`perf`, 8k tokens, Zen 4).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments, unsafe_code)]
pub(crate) fn token_key_scores_q8(
    cache: &Cache<'_>,
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    queries: &Queries<'_>,
    out: &mut Scores<'_>,
    kernels: Q8Keys,
) {
    const M: usize = Q8_TOKEN_QUERIES;
    const T: usize = Q8_TOKEN_BLOCK;
    let (d, l) = (queries.d, sv.layout);
    let t = cache.config().transform;
    let groups = d / q.group;
    let (perm, bounds) = sv.tables.order(h, d, groups);
    let lo = |g: usize| group_start(q, bounds, g);
    let (mut span, mut at, mut stride) = ([(0usize, 0usize); 8], [0usize; 8], 0);
    for g in 0..groups {
        span[g] = (lo(g) / 4, lo(g + 1).div_ceil(4));
        at[g] = stride;
        stride += 4 * (span[g].1 - span[g].0);
    }
    // Each group's quads, at most one shared with each neighbour: d + 4 * 7 bytes a query.
    let mut q8 = [0i8; M * (256 + 28)];
    let (mut delta, mut qsum, mut bias) = ([0f32; M * 8], [0f32; M * 8], [0f32; M]);
    let mut row = [0f32; 256];
    let mut qs = [0f32; M * 256];
    let (mut scale, mut zero) = ([0f32; 8 * T], [0f32; 8 * T]);
    for q0 in (0..queries.nq).step_by(M) {
        let m = M.min(queries.nq - q0);
        for j in 0..m {
            let dst = &mut qs[j * d..][..d];
            bias[j] = stored_token_query(sv, t, h, perm, queries.row(q0 + j), &mut row[..d], dst);
            for g in 0..groups {
                let (a, b) = (lo(g), lo(g + 1));
                let part = &dst[a..b];
                let top = part.iter().fold(0f32, |x, &y| x.max(y.abs()));
                let q8g = &mut q8[j * stride + at[g]..][..4 * (span[g].1 - span[g].0)];
                q8g.fill(0);
                let inv = if top > 0.0 { 127.0 / top } else { 0.0 };
                for (o, &x) in q8g[a - 4 * span[g].0..].iter_mut().zip(part) {
                    *o = rint_small(x * inv) as i8;
                }
                delta[j * groups + g] = top / 127.0;
                qsum[j * groups + g] = part.iter().sum();
            }
        }
        let kq = TokenQueriesQ8 {
            q8: &q8[..m * stride],
            at: &at[..groups],
            stride,
            delta: &delta[..m * groups],
            qsum: &qsum[..m * groups],
            bias: &bias[..m],
            span: &span[..groups],
            d,
            groups,
        };
        // Whole blocks in one call of a vector kernel; a last partial one, or every block of the twin, after.
        let full = if kernels == Q8Keys::Portable { 0 } else { n / T * T };
        if full > 0 {
            let codes = &sv.codes[(h * l.ring + start) * l.row_words..][..full * l.row_words];
            let params = BlockParams::of(sv, q.params, h * l.row_groups * l.ring + start, l.ring);
            q8_key_blocks(kernels, &kq, codes, l.row_words, full / T, params, out, q0);
        }
        for t0 in (full..n).step_by(T) {
            let nt = T.min(n - t0);
            let codes = &sv.codes[(h * l.ring + start + t0) * l.row_words..][..nt * l.row_words];
            if kernels != Q8Keys::Portable {
                // A last partial block, copied into a whole one with zeros after its rows (each row's
                // scores are its own lanes'; the padding's are dropped): the portable twin took a block's
                // time per row, a tenth of `skvq2`'s step at 1k tokens.
                let params = BlockParams::of(sv, q.params, h * l.row_groups * l.ring + start + t0, l.ring);
                let rw = l.row_words;
                let mut rows = [0u32; Q8_TOKEN_BLOCK * 16];
                rows[..nt * rw].copy_from_slice(codes);
                let mut pad = PadParams { s16: [0; 8 * T], z16: [0; 8 * T], s8: [0; 8 * T], z8: [0; 8 * T] };
                let params = params.padded(nt, groups, &mut pad);
                let mut scores = [0f32; Q8_TOKEN_QUERIES * T];
                let mut o = Scores { data: &mut scores, stride: T, pos: 0 };
                q8_key_blocks(kernels, &kq, &rows, rw, 1, params, &mut o, 0);
                for j in 0..m {
                    for tt in 0..nt {
                        *out.at(q0 + j, t0 + tt) = scores[j * T + tt];
                    }
                }
            } else {
                for g in 0..groups {
                    for t in 0..nt {
                        let p = sv.params(q.params, (h * l.row_groups + g) * l.ring + start + t0 + t);
                        (scale[g * T + t], zero[g * T + t]) = (p.scale, p.zero);
                    }
                }
                let mut put = |j: usize, tt: usize, x: f32| *out.at(q0 + j, t0 + tt) = x;
                kq.scores(codes, l.row_words, nt, &scale, &zero, &mut put);
            }
        }
        if q.outliers > 0 {
            for tt in 0..n {
                for (c, w) in token_outliers(sv, q, h, d, start + tt) {
                    for j in 0..m {
                        *out.at(q0 + j, tt) += qs[j * d + c] * w;
                    }
                }
            }
        }
    }
}

/// `blocks` whole blocks of [`token_key_scores_q8`] (rows `codes`, parameters from `params`, scores to
/// columns `0..16 * blocks` of `out`) with the AVX-512 or AVX2 kernel, as `kernels` says (not `Portable`).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments, unsafe_code)]
fn q8_key_blocks(
    kernels: Q8Keys,
    kq: &TokenQueriesQ8<'_>,
    codes: &[u32],
    row_words: usize,
    blocks: usize,
    params: BlockParams<'_>,
    out: &mut Scores<'_>,
    q0: usize,
) {
    const T: usize = Q8_TOKEN_BLOCK;
    if kernels == Q8Keys::Avx512 {
        for b in 0..blocks {
            let codes = &codes[b * T * row_words..];
            // SAFETY: `Avx512` comes from a `Kernel` with AVX-512 set, which exists only where the CPU has
            // AVX-512 F, BW, VL, VNNI and VBMI (`Kernel::avx512`).
            unsafe {
                super::avx2::avx512::token_keys_q8(
                    kq,
                    codes,
                    row_words,
                    params.advanced(b * T),
                    out,
                    q0,
                    b * T,
                )
            }
        }
    } else {
        debug_assert_eq!(kernels, Q8Keys::Avx2);
        // SAFETY: `Avx2` comes from a `Kernel` with AVX2 set, which exists only where the CPU has AVX2,
        // FMA and F16C (`Kernel::avx2`).
        unsafe { super::avx2::token_keys_q8(kq, codes, row_words, blocks, params, out, q0) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(unsafe_code)]
#[allow(clippy::too_many_arguments)]
unsafe fn token_key_scores_avx2(
    cache: &Cache<'_>,
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    queries: &Queries<'_>,
    out: &mut Scores<'_>,
) {
    token_key_scores_in(cache, sv, q, h, start, n, queries, out)
}

/// [`token_value_sums_in`], compiled for AVX2 where `vector` says the CPU has it (the loops are the same code; the
/// compiler widens them to eight lanes), else as is.
#[allow(clippy::too_many_arguments, unsafe_code)]
pub(crate) fn token_value_sums(
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    acc: &mut [f32],
    vector: bool,
    avx512: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if vector && value_lookup_path(q, d) {
        // SAFETY: `vector` comes from an AVX2 `Kernel`, which exists only where the CPU has AVX2, FMA and
        // F16C (see the note above the dispatchers in `attention`); `avx512` from one with AVX-512 too.
        return unsafe { token_value_sums_lookup(sv, q, h, start, n, p, d, acc, avx512) };
    }
    let _ = avx512;
    #[cfg(target_arch = "x86_64")]
    if vector && token_lookup_path(q, d) {
        // SAFETY: as above.
        return unsafe { token_value_sums_rows(sv, q, h, start, n, p, d, acc) };
    }
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: as above.
        return unsafe { token_value_sums_avx2(sv, q, h, start, n, p, d, acc) };
    }
    let _ = vector;
    token_value_sums_in(sv, q, h, start, n, p, d, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(unsafe_code)]
#[allow(clippy::too_many_arguments)]
unsafe fn token_value_sums_avx2(
    sv: &StreamView<'_>,
    q: QuantSpec,
    h: usize,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    acc: &mut [f32],
) {
    token_value_sums_in(sv, q, h, start, n, p, d, acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pack::Width;

    /// The word-at-a-time unpackers against the bit-by-bit reference, for every width, at word-aligned
    /// and unaligned starts and at lengths that end on and off a word (the fast paths and their fallback).
    #[test]
    fn row_codes_match_the_reference() {
        let mut words = [0u32; 64];
        let mut x = 0x9e37_79b9_u32;
        for w in &mut words {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *w = x;
        }
        for width in Width::ALL {
            let n_max = 64 * 32 / width.bits() as usize;
            for start in [0, 1, 5, 16, 31, 32, 33, 64, 96] {
                for len in [0, 1, 7, 16, 31, 32, 33, 64, 96, 128] {
                    if start + len > n_max {
                        continue;
                    }
                    let (mut got, mut want) = ([0u8; 128], [0u8; 128]);
                    row_codes(&words, width, start, &mut got[..len]);
                    pack::unpack_ref(&words, width, start, &mut want[..len]);
                    assert_eq!(got[..len], want[..len], "{width:?} start {start} len {len}");
                }
            }
        }
    }

    /// `rint_small` is `rintf` over every float of magnitude below 2^22 the int8 queries can meet (a
    /// sweep of steps of a sixteenth around each integer up to 128, halves included), and keeps NaN.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn rint_small_is_rintf() {
        for k in -2048..=2048 {
            let x = k as f32 / 16.0;
            for y in [x, x.next_up(), x.next_down()] {
                assert_eq!(rint_small(y), libm::rintf(y), "{y}");
            }
        }
        for y in [4_194_303.5f32, -4_194_302.5, 1e-30, -1e-30] {
            assert_eq!(rint_small(y), libm::rintf(y), "{y}");
        }
        assert!(rint_small(f32::NAN).is_nan());
    }

    /// `lookup` is `table[code]`, for the select tree of two-bit codes and the loads of wider ones.
    #[test]
    fn lookup_is_the_table() {
        let mut table = [0.0f32; 16];
        for (i, t) in table.iter_mut().enumerate() {
            *t = (i as f32 - 7.5) * 0.37;
        }
        for bits in [1u32, 2, 3, 4] {
            let codes: [u8; 40] = core::array::from_fn(|i| ((i * 7 + 3) % (1 << bits)) as u8);
            let mut out = [0.0f32; 40];
            lookup(bits, &table, &codes, &mut out);
            for (&c, &o) in codes.iter().zip(&out) {
                assert_eq!(o.to_bits(), table[usize::from(c)].to_bits(), "{bits} bits, code {c}");
            }
        }
    }
}
