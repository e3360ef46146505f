//! AVX2 + FMA + F16C twins of [`super::portable`], for x86-64 CPUs that have them.
//!
//! Every function is `#[target_feature(enable = "avx2,fma,f16c")]`: callers outside this module hold a
//! [`super::Kernel`] with AVX2 set, which exists only where the CPU has the features. Inside, `unsafe`
//! appears in three forms, each block with its `SAFETY` comment:
//! - the load/store helpers (`ld`, `st`, `ld_ph`, `ldn`, `stn`), which read or write exactly the slice they are given after
//!   a bounds-checked reslice;
//! - `unsafe fn` inner-loop helpers that read through raw pointers (`unpack16`, `unpack16_b3`, `ldn_ph`,
//!   `fma_bcast`, `axpy_pass`, `code_pairs`, `madd_pairs`, the int8 tiles, `GroupRun::fast_run`, the
//!   offset queries' `sweep`): each states in `# Safety` the range it reads, and its callers check that
//!   whole range once before the loop;
//! - a few `get_unchecked` reads in inner loops whose indices the loop bounds already limit.
//!
//! What the pointer walks bought is in `docs/decode-speed-history.md` (for the int8 step, counted with
//! callgrind: from 130 to 113 instructions per token and KV head with other changes of that commit); the
//! portable twins in [`super::portable`] and [`super::generic`] are the reference the tests hold these to.
//!
//! Code unpacking: a run of 16 codes starts on a word (`G * b` is a multiple of 32 and `G` of 16, runs
//! start on a group), so 2-bit codes are 1 word, 4-bit 2 words, 8-bit 4 words; each word is broadcast and
//! shifted by a lane vector (`vpsrlvd`), masked and converted, 8 codes to a register.
//!
//! Register blocking: a GQA group's 3 queries share each unpacked vector. Accumulators must stay in
//! registers (a spilled one turns each FMA into a store-forwarding round trip, measured 2x slower), so the
//! blocks are 16 tokens or channels by 3 queries (6 accumulators) where codes are unpacked, and 24 tokens
//! by 3 (9) for fp16 keys.
#![allow(unsafe_code)]

use super::{ChannelBody, Probs, Q8_VALUE_MAX, Queries, Scores, TokenBody, portable};
use crate::cache::layout::{KEY_BLOCK, KEY_BLOCK_F16, key_f16, key_row};
use crate::pack::Width;
use core::arch::x86_64::*;

pub(crate) mod avx512;

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

/// `8 * J` f32 as `J` vectors.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ldn<const J: usize>(s: &[f32]) -> [__m256; J] {
    core::array::from_fn(|j| ld(&s[8 * j..]))
}

/// `J` vectors to `8 * J` f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn stn<const J: usize>(d: &mut [f32], v: [__m256; J]) {
    for (j, v) in v.into_iter().enumerate() {
        st(&mut d[8 * j..], v);
    }
}

/// `8 * J` f16 values at `r` to f32, as `J` vectors.
///
/// # Safety
/// The `8 * J` `u16` at `r..r + 8 * J` must be readable; no alignment is required.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ldn_ph<const J: usize>(r: *const u16) -> [__m256; J] {
    // SAFETY: the caller guarantees 8 * J readable u16 (J 16-byte unaligned loads).
    core::array::from_fn(|j| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(r.add(8 * j).cast())) })
}

/// `acc[m] += s[m * stride] * x` for `m < M`: `M` scalars `stride` apart, each broadcast against the same
/// `8 * J` values (queries against a key row, probabilities against a value row).
///
/// # Safety
/// `s.add(m * stride)` is readable for every `m < M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma_bcast<const M: usize, const J: usize>(
    acc: &mut [[__m256; J]; M],
    s: *const f32,
    stride: usize,
    x: [__m256; J],
) {
    for (m, a) in acc.iter_mut().enumerate() {
        // SAFETY: the caller's contract.
        let b = _mm256_set1_ps(unsafe { s.add(m * stride).read() });
        for (v, x) in a.iter_mut().zip(x) {
            *v = _mm256_fmadd_ps(b, x, *v);
        }
    }
}

/// Stores `M` rows of 16 scores: query `qb + m`, columns `col..col + 16` of `out`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store_scores<const M: usize>(acc: &[[__m256; 2]; M], out: &mut Scores<'_>, qb: usize, col: usize) {
    for (m, a) in acc.iter().enumerate() {
        let at = (qb + m) * out.stride + out.pos + col;
        stn(&mut out.data[at..][..16], *a);
    }
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

/// 16 codes of `B` bits from the words at `p`, as two vectors of 8 f32: 2-bit codes are one word
/// broadcast and shifted per lane (`vpsrlvd`), masked and converted; 4-bit two words; 8-bit four words
/// zero-extended (`vpmovzxbd`).
///
/// # Safety
/// `p` must point at `B / 2` readable `u32`s.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack16<const B: u32>(p: *const u32) -> [__m256; 2] {
    match B {
        2 => {
            // SAFETY: the caller guarantees one word (B / 2) at `p`.
            let a = _mm256_set1_epi32(unsafe { p.read_unaligned() } as i32);
            let m = _mm256_set1_epi32(3);
            let lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
            let hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
            [
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(a, lo), m)),
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(a, hi), m)),
            ]
        }
        4 => {
            let sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
            let m = _mm256_set1_epi32(15);
            // SAFETY: the caller guarantees two words (B / 2) at `p`.
            let (w0, w1) = unsafe { (p.read_unaligned(), p.add(1).read_unaligned()) };
            [
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w0 as i32), sh), m)),
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w1 as i32), sh), m)),
            ]
        }
        _ => {
            // SAFETY: the caller guarantees four words (B / 2) at `p`; each load reads two, unaligned.
            let (a, b) = unsafe { (_mm_loadl_epi64(p.cast()), _mm_loadl_epi64(p.add(2).cast())) };
            [_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b))]
        }
    }
}

/// Run `r` of 16 three-bit codes (bits `48 r..48 r + 48`) of a row of `row_words` words at `p`, as two
/// vectors of 8 f32: the 8 bytes from the run's first byte, or the row's last 8 where those would pass
/// its end, read as one `u64` and shifted down to the run; then 8 codes per 24 bits, each a per-lane
/// shift of a broadcast word, masked and converted.
///
/// # Safety
/// `p` must point at `row_words` readable `u32`s, with `row_words >= 2` and `48 (r + 1) <= 32 row_words`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack16_b3(p: *const u32, row_words: usize, r: usize) -> [__m256; 2] {
    let off = 6 * r;
    let at = off.min(4 * row_words - 8);
    // SAFETY: at + 8 <= 4 * row_words bytes, all readable by the caller's contract; unaligned read.
    let x = unsafe { p.cast::<u8>().add(at).cast::<u64>().read_unaligned() } >> (8 * (off - at));
    let sh = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
    let m = _mm256_set1_epi32(7);
    let lanes =
        |w: u64| _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w as i32), sh), m));
    [lanes(x), lanes(x >> 24)]
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

/// See [`portable::axpy_rows_f16`]. `d % 16 == 0`.
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

/// Tokens a value pass runs over before its accumulators go back to `out`.
const TILE: usize = 64;

/// Up to 3 queries over tiles of [`TILE`] tokens, in passes of 24 or 16 channels (9 or 6 accumulators:
/// 9 hide the FMA latency, 12 would spill). `d % 16 == 0`, so `d` splits into passes of 16 and 24.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn axpy_block<const M: usize>(rows: &[u16], n: usize, p: &Probs<'_>, d: usize, out: &mut [f32], qb: usize) {
    // Reads u16 `t * d + c` (c < d) of `rows` and entry `(qb + m) * stride + pos + t` of the probabilities
    // for t < n, m < M: checked once here, then read through pointers.
    let pbase = qb * p.stride + p.pos;
    // Guaranteed by the callers' slicing; a failure is a bug in this crate, never the input's.
    assert!(
        n * d <= rows.len() && d.is_multiple_of(16) && pbase + (M - 1) * p.stride + n <= p.data.len(),
        "fp16 value rows shorter than their layout"
    );
    // `d / 8 = 2 * narrow + 3 * wide` with the fewest 16-channel passes, which go first.
    let narrow = [0, 2, 1][d / 8 % 3];
    for t0 in (0..n).step_by(TILE) {
        let t1 = (t0 + TILE).min(n);
        let (mut c0, mut pass) = (0, 0);
        while c0 < d {
            let at = Pass { t0, t1, c0, pbase, first_line: pass * TILE };
            if pass >= narrow {
                // SAFETY: t1 <= n, c0 + 24 <= d and the probabilities' extent are checked above.
                unsafe { axpy_pass::<M, 3>(rows, p, d, out, qb, at) };
                c0 += 24;
            } else {
                // SAFETY: as above, with c0 + 16 <= d.
                unsafe { axpy_pass::<M, 2>(rows, p, d, out, qb, at) };
                c0 += 16;
            }
            pass += 1;
        }
    }
}

/// Where one value pass runs: tokens `t0..t1`, channels from `c0`, probabilities from `pbase`, and the
/// first line of the tile two ahead that it hints.
#[derive(Clone, Copy)]
struct Pass {
    t0: usize,
    t1: usize,
    c0: usize,
    pbase: usize,
    first_line: usize,
}

/// `8 * J` channels from `at.c0` by `M` queries over tokens `at.t0..at.t1`, accumulated into `out`.
///
/// Hints: a tile is `2 * d` lines (64 tokens of `2 * d` bytes); the passes hint the tile two ahead one line
/// per token, in address order, until it is covered, so DRAM is read sequentially however the passes
/// stride through a row (a prefetch never faults, so the address may lie past the slice).
///
/// # Safety
/// `at.t1 * d <= rows.len()`, `at.c0 + 8 * J <= d`, `at.pbase + (M - 1) * p.stride + at.t1 <= p.data.len()`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_pass<const M: usize, const J: usize>(
    rows: &[u16],
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    qb: usize,
    at: Pass,
) {
    let Pass { t0, t1, c0, pbase, first_line } = at;
    let mut acc: [[__m256; J]; M] = core::array::from_fn(|m| ldn(&out[(qb + m) * d + c0..][..8 * J]));
    let (rp, pp) = (rows.as_ptr(), p.data.as_ptr());
    let ahead = rp.wrapping_add((t0 + 2 * TILE) * d).cast::<u8>();
    let lines = 2 * d;
    for t in t0..t1 {
        let line = first_line + t - t0;
        if line < lines {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64).cast());
        }
        // SAFETY: t < t1 and c0 + 8 * J <= d (the caller's contract), so the 8 * J values at t * d + c0 lie
        // in `rows`; unaligned 16-byte loads.
        let x = unsafe { ldn_ph::<J>(rp.add(t * d + c0)) };
        // SAFETY: pbase + m * stride + t < pbase + (M - 1) * stride + t1 <= p.data.len() (the contract).
        unsafe { fma_bcast(&mut acc, pp.add(pbase + t), p.stride, x) };
    }
    for (m, a) in acc.into_iter().enumerate() {
        stn(&mut out[(qb + m) * d + c0..][..8 * J], a);
    }
}

/// See [`portable::scores_f16_channel`]. The run is cut at key blocks; within a block, 16 tokens by up to
/// 3 queries accumulate in 6 registers, each f16 vector converted straight from memory.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn scores_f16_channel(
    body: &[u16],
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
) {
    let d = q.d;
    let mut t = 0;
    while t < n {
        let slot = start + t;
        let seg = (n - t).min(KEY_BLOCK_F16 - slot % KEY_BLOCK_F16);
        let whole = seg - seg % 16;
        let base = key_f16(slot, 0, d);
        for t0 in (0..whole).step_by(16) {
            // Blocks of 6 queries where prefill has them (12 accumulators hide the FMA latency, and each
            // row is converted once per 6), else of up to 3 (decode's GQA group).
            let mut qb = 0;
            while qb < q.nq {
                qb += match q.nq - qb {
                    1 => f16_chunk::<1>(&body[base + t0..], q, out, qb, t + t0),
                    2 => f16_chunk::<2>(&body[base + t0..], q, out, qb, t + t0),
                    3..6 => f16_chunk::<3>(&body[base + t0..], q, out, qb, t + t0),
                    _ => f16_chunk::<6>(&body[base + t0..], q, out, qb, t + t0),
                };
            }
        }
        if whole < seg {
            // A last run of fewer than 16 tokens: through the vector kernel where its 16-token reads stay
            // in `body` (the last block of the arena may end before), else the portable loop.
            let off = base + whole;
            if off + (d - 1) * KEY_BLOCK_F16 + 16 <= body.len() {
                f16_tail(&body[off..], seg - whole, q, out, t + whole);
            } else {
                let mut rest = Scores { data: &mut *out.data, stride: out.stride, pos: out.pos + t + whole };
                portable::scores_f16_channel(body, slot + whole, seg - whole, q, &mut rest);
            }
        }
        t += seg;
    }
}

/// Scores of the first `n < 16` tokens of each channel row at `body` (rows `KEY_BLOCK_F16` apart) into
/// columns `col..col + n`: [`f16_chunk`] over 16 tokens into a scratch row per query, of which the first
/// `n` are kept. The other 12 to 15 lanes read the row's later tokens or the next row's first ones, stale
/// or another channel's, and are thrown away (each lane's sums are its own). Before, these ran the
/// portable loop, a scalar multiply and add per channel: 3% of Gemma 3's decode step at short contexts
/// (`perf`, `kvq bench -m gemma3-270m -t 1 --depths 0`, head dimension 256).
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_tail(body: &[u16], n: usize, q: &Queries<'_>, out: &mut Scores<'_>, col: usize) {
    let d = q.d;
    let mut tmp = [0.0f32; 6 * 16];
    let mut qb = 0;
    while qb < q.nq {
        let sub = Queries { q: &q.q[qb * d..], nq: q.nq - qb, d };
        let mut s = Scores { data: &mut tmp, stride: 16, pos: 0 };
        let took = match q.nq - qb {
            1 => f16_chunk::<1>(body, &sub, &mut s, 0, 0),
            2 => f16_chunk::<2>(body, &sub, &mut s, 0, 0),
            3..6 => f16_chunk::<3>(body, &sub, &mut s, 0, 0),
            _ => f16_chunk::<6>(body, &sub, &mut s, 0, 0),
        };
        for (m, row) in tmp.chunks_exact(16).take(took).enumerate() {
            for (k, &v) in row[..n].iter().enumerate() {
                *out.at(qb + m, col + k) = v;
            }
        }
        qb += took;
    }
}

/// 16 tokens of every channel row of an fp16 key block (rows `KEY_BLOCK_F16` apart), queries `qb..qb + M`;
/// returns `M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f16_chunk<const M: usize>(
    body: &[u16],
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    qb: usize,
    col: usize,
) -> usize {
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    let d = q.d;
    let qs = &q.q[qb * d..][..M * d];
    // Reads u16 `c * KEY_BLOCK_F16 + k` (k < 16) of `body` and entry `m * d + c` of `qs` for c < d, m < M:
    // checked once here, then read through pointers (as in `q_chunk_m`).
    // The layout guarantees this; a failure is a bug in this crate, never a property of the input.
    assert!(d > 0 && body.len() >= (d - 1) * KEY_BLOCK_F16 + 16, "fp16 key block shorter than its layout");
    let (bp, qp) = (body.as_ptr(), qs.as_ptr());
    for c in 0..d {
        // SAFETY: c < d, so the 16 values at c * KEY_BLOCK_F16 lie in `body` (checked above); unaligned
        // 16-byte loads.
        let x = unsafe { ldn_ph::<2>(bp.add(c * KEY_BLOCK_F16)) };
        // Hint the same channel row one block ahead into the cache (fp16 keys stream from DRAM; a prefetch
        // never faults, so the address may lie past the slice).
        _mm_prefetch::<_MM_HINT_T0>(bp.wrapping_add(c * KEY_BLOCK_F16 + 2 * d * KEY_BLOCK_F16).cast());
        // SAFETY: m * d + c < M * d = qs.len().
        unsafe { fma_bcast(&mut acc, qp.add(c), d, x) };
    }
    store_scores(&acc, out, qb, col);
    M
}

/// See [`portable::scores_q_channel`]. Widths 2 (or ternary), 4 and 8 bits; `group % 16 == 0`, `d % 8 == 0`.
///
/// 16 tokens by up to 3 queries: 6 accumulators, 3 broadcast queries, 2 code vectors and the unpack
/// constants fit the 16 registers (12 accumulators do not, and a spilled accumulator turns each FMA into a
/// store-forwarding round trip, measured 2x slower overall). With more than 3 queries (prefill) each chunk
/// is unpacked once for all of them ([`unpack_runs`]), and they run 6 at a time ([`shared_chunk`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn scores_q_channel(
    b: &ChannelBody<'_>,
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    work: &mut [f32],
    avx512: bool,
) {
    if q.nq > 3 && q.d <= MAX_UNPACKED {
        let mut unpacked = [_mm256_setzero_ps(); 2 * MAX_UNPACKED];
        return channel_scores::<true>(b, start, n, q, out, work, &mut unpacked[..2 * q.d], false);
    }
    channel_scores::<false>(b, start, n, q, out, work, &mut [], avx512);
}

/// [`scores_q_channel`]'s loops: `S` (shared) unpacks each chunk once into `unpacked` (`2 * d` vectors)
/// for every block of queries, else each block unpacks it in place (decode's path, a const parameter so
/// that its loop carries no test of it).
#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
fn channel_scores<const S: bool>(
    b: &ChannelBody<'_>,
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    work: &mut [f32],
    unpacked: &mut [__m256],
    avx512: bool,
) {
    let (d, g, nq) = (q.d, b.group, q.nq);
    let (folded, bias) = work.split_at_mut(nq * d);
    for g0 in (start..start + n).step_by(g) {
        let gi = g0 / g;
        let (scale, zero) = b.group_params(gi, d);
        for qi in 0..nq {
            let qr = q.row(qi);
            let fr = &mut folded[qi * d..][..d];
            let mut zacc = _mm256_setzero_ps();
            for c in (0..d).step_by(8) {
                let qv = ld(&qr[c..]);
                st(&mut fr[c..], _mm256_mul_ps(qv, ld_ph(&scale[c..])));
                zacc = _mm256_fmadd_ps(qv, ld_ph(&zero[c..]), zacc);
            }
            bias[qi] = hsum(zacc);
        }
        if avx512 && !S {
            // SAFETY: `avx512` comes from a `Kernel` with AVX-512 set, which exists only where the CPU has
            // AVX-512 F, BW, VL, VNNI and VBMI (`Kernel::avx512`).
            unsafe { avx512::key_chunks(b, g0, start, d, folded, &bias[..nq], out) };
            continue;
        }
        for t0 in (g0..g0 + g).step_by(16) {
            let word = key_row(t0, 0, d, b.block, b.block_words)
                + (t0 & (b.block - 1)) / 16 * b.width.bits() as usize / 2;
            prefetch_next_block::<16>(b, t0, d);
            let col = t0 - start;
            if S {
                let (raw, w) = (&b.codes[word..], b.block_words);
                match b.width {
                    Width::B4 => unpack_runs::<4>(raw, w, unpacked),
                    Width::B8 => unpack_runs::<8>(raw, w, unpacked),
                    _ => unpack_runs::<2>(raw, w, unpacked),
                }
                let mut qb = 0;
                while qb < nq {
                    let m = (nq - qb).min(6);
                    shared_chunk(unpacked, &folded[qb * d..][..m * d], &bias[qb..][..m], out, qb, col);
                    qb += m;
                }
                continue;
            }
            for qb in (0..nq).step_by(3) {
                let m = nq - qb;
                let fq = &folded[qb * d..][..m.min(3) * d];
                match b.width {
                    Width::B4 => q_chunk::<4>(b, word, fq, bias, out, qb, col, m),
                    Width::B8 => q_chunk::<8>(b, word, fq, bias, out, qb, col, m),
                    _ => q_chunk::<2>(b, word, fq, bias, out, qb, col, m),
                }
            }
        }
    }
}

#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
fn q_chunk<const B: u32>(
    b: &ChannelBody<'_>,
    word: usize,
    fq: &[f32],
    bias: &[f32],
    out: &mut Scores<'_>,
    qb: usize,
    col: usize,
    m: usize,
) {
    match m {
        1 => q_chunk_m::<B, 1>(b, word, fq, bias, out, qb, col),
        2 => q_chunk_m::<B, 2>(b, word, fq, bias, out, qb, col),
        _ => q_chunk_m::<B, 3>(b, word, fq, bias, out, qb, col),
    }
}

/// 16 tokens from word `word` of every channel row of a key block, queries `qb..qb + M` (`fq`: their
/// folded queries, `M` rows of `d`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q_chunk_m<const B: u32, const M: usize>(
    b: &ChannelBody<'_>,
    word: usize,
    fq: &[f32],
    bias: &[f32],
    out: &mut Scores<'_>,
    qb: usize,
    col: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    for (m, a) in acc.iter_mut().enumerate() {
        *a = [_mm256_set1_ps(bias[qb + m]); 2];
    }
    let h = B as usize / 2; // words per 16 codes
    let d = fq.len() / M;
    let w = b.block_words;
    // The loop reads word `c * w + k` (k < h) of `codes` and entry `m * d + c` of `fq` for c < d, m < M:
    // check both ranges once, then read through pointers (bounds checks per access doubled the loop's
    // instruction count, measured with callgrind).
    let codes = &b.codes[word..];
    // The layout guarantees these; a failure is a bug in this crate, never a property of the input.
    assert!(
        d > 0 && codes.len() >= (d - 1) * w + h && fq.len() >= M * d,
        "key block shorter than its layout"
    );
    let (cp, qp) = (codes.as_ptr(), fq.as_ptr());
    for c in 0..d {
        // SAFETY: c < d, so the h words at c * w end within `codes` and m * d + c < M * d <= fq.len()
        // (checked above).
        let x = unsafe { unpack16::<B>(cp.add(c * w)) };
        // SAFETY: as above.
        unsafe { fma_bcast(&mut acc, qp.add(c), d, x) };
    }
    store_scores(&acc, out, qb, col);
}

/// 16 codes of `B` bits from each of `out.len() / 2` runs `stride` words apart from the start of `raw`, run
/// `i` as `out[2 i..2 i + 2]` ([`unpack16`]): prefill unpacks a key chunk (the runs are channel rows) or 16
/// channels of a value tile (the runs are token rows) once for all its query blocks.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack_runs<const B: u32>(raw: &[u32], stride: usize, out: &mut [__m256]) {
    let (n, h) = (out.len() / 2, B as usize / 2);
    // The layout guarantees this; a failure is a bug in this crate, never a property of the input.
    assert!(n > 0 && raw.len() >= (n - 1) * stride + h, "code runs shorter than their layout");
    for (i, u) in out.chunks_exact_mut(2).enumerate() {
        // SAFETY: i < n, so the h words at i * stride end within `raw` (checked above).
        u.copy_from_slice(&unsafe { unpack16::<B>(raw.as_ptr().add(i * stride)) });
    }
}

/// [`unpack_runs`] for 3-bit codes: code run `r` (see [`unpack16_b3`]) of each of `out.len() / 2` rows of
/// `row_words` words at the start of `rows`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack_runs_b3(rows: &[u32], row_words: usize, r: usize, out: &mut [__m256]) {
    let n = out.len() / 2;
    // The layout guarantees this; a failure is a bug in this crate, never a property of the input.
    assert!(n > 0 && row_words >= 2 && 48 * (r + 1) <= 32 * row_words && rows.len() >= n * row_words);
    for (i, u) in out.chunks_exact_mut(2).enumerate() {
        // SAFETY: i < n, so row i's row_words words lie within `rows` (checked above), as does run r.
        u.copy_from_slice(&unsafe { unpack16_b3(rows.as_ptr().add(i * row_words), row_words, r) });
    }
}

/// An unpacked chunk's 16 tokens (see [`unpack_runs`]) by up to 6 queries from `qb` (`fq`: their folded
/// queries, `bias`: their zero-point terms).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn shared_chunk(unpacked: &[__m256], fq: &[f32], bias: &[f32], out: &mut Scores<'_>, qb: usize, col: usize) {
    match bias.len() {
        1 => shared_chunk_m::<1>(unpacked, fq, bias, out, qb, col),
        2 => shared_chunk_m::<2>(unpacked, fq, bias, out, qb, col),
        3 => shared_chunk_m::<3>(unpacked, fq, bias, out, qb, col),
        4 => shared_chunk_m::<4>(unpacked, fq, bias, out, qb, col),
        5 => shared_chunk_m::<5>(unpacked, fq, bias, out, qb, col),
        _ => shared_chunk_m::<6>(unpacked, fq, bias, out, qb, col),
    }
}

/// [`shared_chunk`] for `M` queries: 12 accumulators at 6, which hide the FMA latency (unpacking in place
/// leaves registers for 6 only).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn shared_chunk_m<const M: usize>(
    unpacked: &[__m256],
    fq: &[f32],
    bias: &[f32],
    out: &mut Scores<'_>,
    qb: usize,
    col: usize,
) {
    let d = unpacked.len() / 2;
    let mut acc: [[__m256; 2]; M] = core::array::from_fn(|m| [_mm256_set1_ps(bias[m]); 2]);
    // Reads entry `m * d + c` of `fq` for c < d, m < M: checked once, then read through the pointer.
    assert!(fq.len() >= M * d, "folded queries shorter than their rows");
    let qp = fq.as_ptr();
    for (c, x) in unpacked.chunks_exact(2).enumerate() {
        // SAFETY: m * d + c < M * d <= fq.len() (checked above).
        unsafe { fma_bcast(&mut acc, qp.add(c), d, [x[0], x[1]]) };
    }
    store_scores(&acc, out, qb, col);
}

/// See [`portable::values_q_token`]. Widths 2 (or ternary), 3, 4 and 8 bits; `group % 16 == 0`; for 3 bits
/// `d >= 32` (rows of at least two words).
///
/// Tiles of 32 tokens: the products `p_t * s_t` are formed 8 at a time (a group's scales are contiguous
/// over tokens), then 16 channels by up to 3 queries accumulate in 6
/// registers while the tile's rows stream past. With more than 3 queries (prefill) each 16 channels of a
/// tile are unpacked once for all of them ([`unpack_runs`]), and they run 6 at a time ([`VTile`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn values_q_token(
    b: &TokenBody<'_>,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
    avx512: bool,
) {
    debug_assert!(b.levels.is_none(), "integer levels are the int8 path's");
    if out.len() / d > 3 {
        let mut unpacked = [_mm256_setzero_ps(); 2 * VALUE_TILE];
        return token_values::<true>(b, start, n, p, d, out, work, &mut unpacked, false);
    }
    token_values::<false>(b, start, n, p, d, out, work, &mut [], avx512);
}

/// Tokens per tile of the f32 value path.
const VALUE_TILE: usize = 32;

/// [`values_q_token`]'s loops: `S` (shared) unpacks each 16 channels of a tile once into `unpacked`
/// (`2 * VALUE_TILE` vectors) for every block of queries, else each block unpacks them in place (decode's
/// path, a const parameter so that its loop carries no test of it).
#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
fn token_values<const S: bool>(
    b: &TokenBody<'_>,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
    unpacked: &mut [__m256],
    avx512: bool,
) {
    const TILE: usize = VALUE_TILE;
    let nq = out.len() / d;
    let groups = d / b.group;
    // work: ps[g][qi][t] products p * scale for the current tile; zacc[qi][g][8] partial sums of p * zero.
    let (ps, rest) = work.split_at_mut(groups * TILE * nq);
    let (zacc, spare) = rest.split_at_mut(nq * groups * 8);
    zacc.fill(0.0);
    let whole = n - n % TILE;
    // A last tile of fewer tokens: the whole tile that ends with the body, its tokens before `whole` (which
    // the tiles before it summed) weighted 0 through a copy of the probabilities in `spare` (`work_len`
    // leaves at least `64 nq` floats there). Adding `0 * s * code` and `0 * z` leaves every sum as it was.
    // A body shorter than a tile takes the portable twin instead.
    let overlap = whole < n && n >= TILE;
    if overlap {
        let skip = whole - (n - TILE);
        for (qi, row) in spare[..nq * TILE].chunks_exact_mut(TILE).enumerate() {
            row[..skip].fill(0.0);
            row[skip..].copy_from_slice(&p.data[qi * p.stride + p.pos + whole..][..n - whole]);
        }
    }
    let tail = Probs { data: &spare[..if overlap { nq * TILE } else { 0 }], stride: TILE, pos: 0 };
    for k in 0..whole / TILE + usize::from(overlap) {
        // Tile k's first ring slot, and its probabilities with the position of its first token.
        let (slot, p, t0) =
            if k * TILE < whole { (start + k * TILE, p, k * TILE) } else { (start + n - TILE, &tail, 0) };
        for gi in 0..groups {
            for t8 in (0..TILE).step_by(8) {
                let s = ld_ph(&b.scale[gi * b.ring + slot + t8..]);
                let z = ld_ph(&b.zero[gi * b.ring + slot + t8..]);
                for qi in 0..nq {
                    let pv = ld(&p.data[qi * p.stride + p.pos + t0 + t8..]);
                    st(&mut ps[(gi * nq + qi) * TILE + t8..], _mm256_mul_ps(pv, s));
                    let at = (qi * groups + gi) * 8;
                    let acc = _mm256_fmadd_ps(pv, z, ld(&zacc[at..]));
                    st(&mut zacc[at..], acc);
                }
            }
        }
        let rows = &b.codes[slot * b.row_words..][..TILE * b.row_words];
        if S {
            for c0 in (0..d).step_by(16) {
                let (raw, u) = (
                    &rows[(c0 / 16 * b.width.bits() as usize / 2).min(rows.len())..],
                    &mut unpacked[..2 * TILE],
                );
                match b.width {
                    Width::B3 => unpack_runs_b3(rows, b.row_words, c0 / 16, u),
                    Width::B4 => unpack_runs::<4>(raw, b.row_words, u),
                    Width::B8 => unpack_runs::<8>(raw, b.row_words, u),
                    _ => unpack_runs::<2>(raw, b.row_words, u),
                }
                let vt = VTile { tile: TILE, group: b.group, c0, codes: unpacked };
                let mut qb = 0;
                while qb < nq {
                    qb += vt.block(d, ps, nq, out, qb);
                }
            }
            continue;
        }
        if avx512 && d.is_multiple_of(32) {
            // SAFETY: `avx512` comes from a `Kernel` with AVX-512 set, which exists only where the CPU has
            // AVX-512 F, BW, VL, VNNI and VBMI (`Kernel::avx512`).
            unsafe { avx512::value_tiles(rows, b, d, ps, nq, out) };
            continue;
        }
        for qb in (0..nq).step_by(3) {
            let m = nq - qb;
            match (b.width, m) {
                (Width::B3, 1) => v_tile::<3, 1>(rows, b, d, ps, nq, out, qb),
                (Width::B3, 2) => v_tile::<3, 2>(rows, b, d, ps, nq, out, qb),
                (Width::B3, _) => v_tile::<3, 3>(rows, b, d, ps, nq, out, qb),
                (Width::B4, 1) => v_tile::<4, 1>(rows, b, d, ps, nq, out, qb),
                (Width::B4, 2) => v_tile::<4, 2>(rows, b, d, ps, nq, out, qb),
                (Width::B4, _) => v_tile::<4, 3>(rows, b, d, ps, nq, out, qb),
                (Width::B8, 1) => v_tile::<8, 1>(rows, b, d, ps, nq, out, qb),
                (Width::B8, 2) => v_tile::<8, 2>(rows, b, d, ps, nq, out, qb),
                (Width::B8, _) => v_tile::<8, 3>(rows, b, d, ps, nq, out, qb),
                (_, 1) => v_tile::<2, 1>(rows, b, d, ps, nq, out, qb),
                (_, 2) => v_tile::<2, 2>(rows, b, d, ps, nq, out, qb),
                (_, _) => v_tile::<2, 3>(rows, b, d, ps, nq, out, qb),
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
    if whole < n && !overlap {
        portable::values_q_token(b, start + whole, n - whole, &Probs { pos: p.pos + whole, ..*p }, d, out);
    }
}

/// Channels `c0..c0 + 16` of a value tile of `tile` tokens, their codes unpacked ([`unpack_runs`]).
struct VTile<'a> {
    tile: usize,
    group: usize,
    c0: usize,
    codes: &'a [__m256],
}

impl VTile<'_> {
    /// The next block of queries from `qb` (see [`Self::run`]); returns how many it took: up to 6 (12
    /// accumulators, enough to hide the FMA latency; unpacking in place, as [`v_tile`] does, leaves
    /// registers for 6 only).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block(&self, d: usize, ps: &[f32], nq: usize, out: &mut [f32], qb: usize) -> usize {
        let m = (nq - qb).min(6);
        match m {
            1 => self.run::<1>(d, ps, nq, out, qb),
            2 => self.run::<2>(d, ps, nq, out, qb),
            3 => self.run::<3>(d, ps, nq, out, qb),
            4 => self.run::<4>(d, ps, nq, out, qb),
            5 => self.run::<5>(d, ps, nq, out, qb),
            _ => self.run::<6>(d, ps, nq, out, qb),
        }
        m
    }

    /// Queries `qb..qb + M`: adds `sum_t (p_t s_t) code_t` over the tile's tokens into `out`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn run<const M: usize>(&self, d: usize, ps: &[f32], nq: usize, out: &mut [f32], qb: usize) {
        let (tile, c0) = (self.tile, self.c0);
        let gi = c0 / self.group;
        let mut acc: [[__m256; 2]; M] = core::array::from_fn(|m| ldn(&out[(qb + m) * d + c0..][..16]));
        let pg = &ps[(gi * nq + qb) * tile..][..M * tile];
        let pp = pg.as_ptr();
        for (t, x) in self.codes[..2 * tile].chunks_exact(2).enumerate() {
            // SAFETY: m * tile + t < M * tile = pg.len().
            unsafe { fma_bcast(&mut acc, pp.add(t), tile, [x[0], x[1]]) };
        }
        for (m, a) in acc.iter().enumerate() {
            stn(&mut out[(qb + m) * d + c0..][..16], *a);
        }
    }
}

/// A tile's `rows` (one per token), all channels 16 at a time, queries `qb..qb + M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn v_tile<const B: u32, const M: usize>(
    rows: &[u32],
    b: &TokenBody<'_>,
    d: usize,
    ps: &[f32],
    nq: usize,
    out: &mut [f32],
    qb: usize,
) {
    let h = B as usize / 2; // words per 16 codes (3-bit runs are read by `unpack16_b3`)
    let tile = rows.len() / b.row_words;
    for c0 in (0..d).step_by(16) {
        let gi = c0 / b.group;
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        for (m, a) in acc.iter_mut().enumerate() {
            let o = &out[(qb + m) * d + c0..][..16];
            *a = ldn(o);
        }
        let word = c0 / 16 * h;
        let pg = &ps[(gi * nq + qb) * tile..][..M * tile];
        // Reads word `t * row_words + word + k` (k < h) of `rows` (for 3 bits, run `c0 / 16` of row `t`)
        // and entry `m * tile + t` of `pg` for t < tile, m < M: both ranges checked here, then read
        // through pointers (as in `q_chunk_m`).
        // The layout guarantees this; a failure is a bug in this crate, never a property of the input.
        let fits = if B == 3 {
            b.row_words >= 2 && 48 * (c0 / 16 + 1) <= 32 * b.row_words
        } else {
            word + h <= b.row_words
        };
        assert!(tile > 0 && fits, "value row shorter than its layout");
        let (rp, pp) = (rows.as_ptr(), pg.as_ptr());
        for t in 0..tile {
            // SAFETY: t < tile = rows.len() / row_words and the run lies in its row (checked above), so
            // the words lie in `rows`; m * tile + t < M * tile = pg.len().
            let x = unsafe {
                if B == 3 {
                    unpack16_b3(rp.add(t * b.row_words), b.row_words, c0 / 16)
                } else {
                    unpack16::<B>(rp.add(t * b.row_words + word))
                }
            };
            // SAFETY: as above.
            unsafe { fma_bcast(&mut acc, pp.add(t), tile, x) };
        }
        for (m, a) in acc.iter().enumerate() {
            let o = &mut out[(qb + m) * d + c0..][..16];
            stn(o, *a);
        }
    }
}

/// `exp(x)` for eight lanes, `x` in `[-87.3, 0.5]` (softmax's `x - max` is at most 0): `exp(x) =
/// 2^n 2^f` with `n = round(x log2 e)` and `f = x log2 e - n` in `[-1/2, 1/2]`, formed with `log2 e`
/// split in two constants (the first product exact in an FMA), then `2^f` by a degree-5 polynomial
/// fitted for relative error (`scripts/exp2_poly.py`: 9.2e-8, 1.9e-7 evaluated in f32). Relative error
/// within 2^-21 (`vector_exp_matches_libm`); inputs below `-87.3` clamp to it (an absolute error under
/// 2^-126, below any probability softmax keeps). Five FMAs for the polynomial against Cephes' seven
/// multiplies and FMAs: the softmax loop is bound by the two FMA pipes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn exp8(x: __m256) -> __m256 {
    const LOG2E_HI: f32 = core::f32::consts::LOG2_E;
    // log2(e) - LOG2E_HI, so that the two constants carry log2(e) to about 48 bits.
    const LOG2E_LO: f32 = 1.925_963e-8;
    // 1.5 * 2^23 + 127: a sum with it in [2^23, 2^24) has a unit ulp, so adding it rounds to an integer,
    // and the sum's low 9 bits are that integer plus 127.
    const SHIFTER_BIASED: f32 = 12_583_039.0;
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
    // `x log2 e` lies in [-126, 0.73]: `r - SHIFTER_BIASED` is `n`, an integer within 1/2 of it (exactly, in
    // one rounding), and the low 9 bits of `r` are `n + 127` in [1, 128], the biased exponent of `2^n`
    // (no `vroundps`, no `vcvtps2dq`).
    let r = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E_HI), _mm256_set1_ps(SHIFTER_BIASED));
    let n = _mm256_sub_ps(r, _mm256_set1_ps(SHIFTER_BIASED));
    let f = _mm256_fmsub_ps(x, _mm256_set1_ps(LOG2E_HI), n);
    let f = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E_LO), f);
    let mut y = _mm256_set1_ps(1.326_172_6e-3);
    for c in [9.671_512e-3, 5.550_744e-2, 2.402_224_2e-1, 6.931_469_4e-1, 1.0] {
        y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(c));
    }
    let e = _mm256_slli_epi32::<23>(_mm256_castps_si256(r));
    _mm256_mul_ps(y, _mm256_castsi256_ps(e))
}

/// See [`portable::exp_shifted`]; `exp` is [`exp8`] (the scalar tail uses `libm::expf`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn exp_shifted(x: &mut [f32]) -> f32 {
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
    sum
}

/// `x *= k`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn scale(x: &mut [f32], k: f32) {
    let whole = x.len() - x.len() % 8;
    let kv = _mm256_set1_ps(k);
    for c in x[..whole].chunks_exact_mut(8) {
        st(c, _mm256_mul_ps(ld(c), kv));
    }
    for v in &mut x[whole..] {
        *v *= k;
    }
}

/// Sixteen i32 (two vectors) saturated to i8 and laid out as eight dwords, each a pair of neighbouring
/// bytes (`x[2j]`, `x[2j + 1]`) twice: the second operand of `vpmaddubsw` for pair `j`, broadcast.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn byte_pairs(a: __m256i, b: __m256i) -> __m256i {
    // packs_epi32 interleaves the 128-bit lanes ([0-3, 8-11 | 4-7, 12-15]); the permute restores order.
    let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
    let x = _mm256_packs_epi16(w, w); // [0-7, 0-7 | 8-15, 8-15]
    _mm256_unpacklo_epi16(x, x)
}

/// Lane `i`: `v[i]`'s eight lanes reduced by `op` (`add` or `max`) in [`portable::hsum_tree`]'s order,
/// `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`: eight horizontal reductions in one transpose, so
/// that a batch of folds waits on one short chain rather than eight.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn reduce8(v: &[__m256; 8], max: bool) -> __m256 {
    let op = |a: __m256, b: __m256| if max { _mm256_max_ps(a, b) } else { _mm256_add_ps(a, b) };
    // Halves first: x = [v_i lanes 0-3 + lanes 4-7 | v_{i+4} ...] = s_i for inputs i and i + 4.
    let h: [__m256; 4] = core::array::from_fn(|i| {
        op(_mm256_permute2f128_ps::<0x20>(v[i], v[i + 4]), _mm256_permute2f128_ps::<0x31>(v[i], v[i + 4]))
    });
    // (s0 + s2), (s1 + s3) of inputs (0, 1 | 4, 5) and (2, 3 | 6, 7).
    let a = op(_mm256_unpacklo_ps(h[0], h[1]), _mm256_unpackhi_ps(h[0], h[1]));
    let b = op(_mm256_unpacklo_ps(h[2], h[3]), _mm256_unpackhi_ps(h[2], h[3]));
    op(_mm256_shuffle_ps::<0b01_00_01_00>(a, b), _mm256_shuffle_ps::<0b11_10_11_10>(a, b))
}

/// Up to eight int8-path key folds waiting for their horizontal reductions (see [`reduce8`]): the maxima
/// of `|q_c s_c|` and the zero-point lanes of consecutive folds from `base` on, and where their scales
/// go (one entry per fold of the batch).
struct Pending<'a> {
    mx: [__m256; 8],
    za: [__m256; 8],
    k: usize,
    base: usize,
    /// The largest rounded integer ([`super::q8_key_max`]).
    top: f32,
    delta: &'a mut [f32],
    inv: &'a mut [f32],
    bias: &'a mut [f32],
}

impl<'a> Pending<'a> {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn new(top: f32, delta: &'a mut [f32], inv: &'a mut [f32], bias: &'a mut [f32]) -> Self {
        let z = _mm256_setzero_ps();
        Pending { mx: [z; 8], za: [z; 8], k: 0, base: 0, top, delta, inv, bias }
    }

    /// Adds fold `base + k`; flushes when eight are waiting.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn push(&mut self, mx: __m256, za: __m256) {
        self.mx[self.k] = mx;
        self.za[self.k] = za;
        self.k += 1;
        if self.k == 8 {
            self.flush();
        }
    }

    /// Each waiting fold's scale, `m = max |q_c s_c|`, `delta = m / top` and `inv = top / m` (0 and 0 where
    /// `m == 0`, so that everything rounds to 0), and its zero-point sum.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn flush(&mut self) {
        if self.k == 0 {
            return;
        }
        let m = reduce8(&self.mx, true);
        let t = _mm256_set1_ps(self.top);
        let zero = _mm256_cmp_ps::<_CMP_EQ_OQ>(m, _mm256_setzero_ps());
        let mut buf = [0f32; 8];
        let r = self.base..self.base + self.k;
        st(&mut buf, _mm256_div_ps(m, t));
        self.delta[r.clone()].copy_from_slice(&buf[..self.k]);
        st(&mut buf, _mm256_andnot_ps(zero, _mm256_div_ps(t, m)));
        self.inv[r.clone()].copy_from_slice(&buf[..self.k]);
        st(&mut buf, reduce8(&self.za, false));
        self.bias[r].copy_from_slice(&buf[..self.k]);
        self.base += self.k;
        self.k = 0;
    }
}

/// Folds one key group's scales into queries `qb..qb + M` (see [`portable::fold_query_q8`], the same
/// bits): `qs[m * d + c] = q_c s_c`, and per query the maxima of `|q_c s_c|` and the zero-point lanes
/// `sum q_c z_c` (`c % 8`), handed unreduced to `pend`. The group's scales and zero points are converted
/// once for all `M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn fold_keys<const M: usize>(
    q: &Queries<'_>,
    qb: usize,
    scale: &[u16],
    zero: &[u16],
    qs: &mut [f32],
    pend: &mut Pending<'_>,
) {
    let d = q.d;
    let rows = &q.q[qb * d..(qb + M) * d];
    // Checked once, then read and written through pointers (this loop is a third of the int8 key
    // path, and the per-access checks measured a quarter of it).
    assert!(d.is_multiple_of(8) && scale.len() >= d && zero.len() >= d && qs.len() >= M * d);
    let (sp, zp, qp, op) = (scale.as_ptr(), zero.as_ptr(), rows.as_ptr(), qs.as_mut_ptr());
    let sign = _mm256_set1_ps(-0.0);
    let mut mx = [_mm256_setzero_ps(); M];
    let mut za = [_mm256_setzero_ps(); M];
    for c in (0..d).step_by(8) {
        // SAFETY: c + 8 <= d, and scale, zero hold d u16 (checked above); unaligned 16-byte reads.
        let (s, z) = unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(sp.add(c).cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(zp.add(c).cast())),
            )
        };
        for m in 0..M {
            // SAFETY: m * d + c + 8 <= M * d, the length of `rows` and at most that of `qs` (checked above).
            let qv = unsafe { _mm256_loadu_ps(qp.add(m * d + c)) };
            let v = _mm256_mul_ps(qv, s);
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(op.add(m * d + c), v) };
            mx[m] = _mm256_max_ps(mx[m], _mm256_andnot_ps(sign, v));
            za[m] = _mm256_add_ps(za[m], _mm256_mul_ps(qv, z));
        }
    }
    for (m, z) in mx.into_iter().zip(za) {
        pend.push(m, z);
    }
}

/// Each row of `d = x.len() / inv.len()` floats of `x` times its `inv` rounded to integers (`vcvtps2dq`, to
/// nearest even, as `rintf`) as [`byte_pairs`]: `d / 2` dwords of `pairs` per row, `d % 16 == 0`. One
/// loop over a batch's rows: with a call per row, each call's checks and slicing cost half as many
/// instructions again as its 64 roundings (callgrind).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn round_pairs(x: &[f32], inv: &[f32], pairs: &mut [u32]) {
    let n = x.len();
    assert!(!inv.is_empty() && n.is_multiple_of(16 * inv.len()) && pairs.len() >= n / 2);
    let d = n / inv.len();
    let (xp, pp) = (x.as_ptr(), pairs.as_mut_ptr());
    for (r, &iv) in inv.iter().enumerate() {
        let iv = _mm256_set1_ps(iv);
        for c in (r * d..(r + 1) * d).step_by(16) {
            // SAFETY: c + 16 <= (r + 1) d <= n = x.len() and c / 2 + 8 <= n / 2 <= pairs.len() (checked
            // above).
            unsafe {
                let a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp.add(c)), iv));
                let b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xp.add(c + 8)), iv));
                _mm256_storeu_si256(pp.add(c / 2).cast(), byte_pairs(a, b));
            }
        }
    }
}

/// Eight u32 to `d[..8]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn sti(d: &mut [u32], v: __m256i) {
    let d = &mut d[..8];
    // SAFETY: `d` holds 8 u32; `storeu` has no alignment requirement.
    unsafe { _mm256_storeu_si256(d.as_mut_ptr().cast(), v) }
}

/// See [`portable::scores_q8_channel`] (the same bits). 2-bit codes, `group % 32 == 0`, `d % 16 == 0`; 4-bit
/// codes take the same loops with [`nibble_pairs`] and [`madd_wide_pairs`].
///
/// Per key block the groups' queries are folded ([`fold_keys`], reductions batched in [`Pending`]) and
/// rounded ([`round_pairs`]); then per group 32 tokens (two words of each channel row) by up to 3
/// queries: a channel pair's codes are unpacked to bytes and interleaved channel by channel
/// ([`code_pairs`]), and multiplied by the query pair with `vpmaddubsw` into 16-bit sums, 6
/// accumulators. With more than 3
/// queries (prefill) a tile is unpacked once ([`unpack_code_pairs`]) for all its blocks of 3. The next key
/// block's rows are hinted a tile at a time ([`prefetch_next_block`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn scores_q8_channel(
    b: &ChannelBody<'_>,
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    work: &mut [f32],
) {
    if q.nq > 3 && q.d <= MAX_UNPACKED {
        let mut unpacked = [_mm256_setzero_si256(); MAX_UNPACKED];
        return q8_channel_scores::<true>(b, start, n, q, out, work, &mut unpacked[..q.d]);
    }
    q8_channel_scores::<false>(b, start, n, q, out, work, &mut []);
}

/// [`scores_q8_channel`]'s loops: `S` (shared) unpacks each tile once into `unpacked` (`d` vectors) for
/// every block of queries, else each block unpacks it in place (decode's path, a const parameter so that
/// its loop carries no test of it).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_channel_scores<const S: bool>(
    b: &ChannelBody<'_>,
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    work: &mut [f32],
    unpacked: &mut [__m256i],
) {
    let (d, g, nq) = (q.d, b.group, q.nq);
    let (batch, KeyWork { qs, packed: pairs, delta, bias, inv }) = KeyWork::split(b, q, work);
    let pairs: &mut [u32] = bytemuck::cast_slice_mut(pairs);
    for b0 in (start..start + n).step_by(batch * g) {
        let groups = (start + n - b0).min(batch * g) / g;
        fold_batch(b, q, b0, groups, qs, delta, inv, bias);
        round_pairs(&qs[..groups * nq * d], &inv[..groups * nq], &mut pairs[..groups * nq * d / 2]);
        let kt = KeyTiles {
            b,
            d,
            b0,
            tiles: groups * g / 32,
            col: b0 - start,
            nq,
            packed: pairs,
            delta: &*delta,
            bias: &*bias,
        };
        if b.width == Width::B4 {
            kt.run::<S, 4>(out, unpacked);
        } else {
            kt.run::<S, 2>(out, unpacked);
        }
    }
}

/// The int8 key path's `work` for one batch of up to a key block's groups, entry `j * nq + qi` for group
/// `j` and query `qi`: the folded queries (`d` each), their rounded bytes (`packed`, `d / 2` floats' room
/// each: the AVX2 kernels' pairs, the AVX-512 kernels' quads in half of it), and `delta`, `bias` and
/// `inv` (one each).
pub(super) struct KeyWork<'w> {
    pub(super) qs: &'w mut [f32],
    pub(super) packed: &'w mut [f32],
    pub(super) delta: &'w mut [f32],
    pub(super) bias: &'w mut [f32],
    pub(super) inv: &'w mut [f32],
}

impl<'w> KeyWork<'w> {
    /// `work` split for batches of as many groups as a key block holds (fewer where `work` is short),
    /// with that batch size.
    pub(super) fn split(b: &ChannelBody<'_>, q: &Queries<'_>, work: &'w mut [f32]) -> (usize, Self) {
        let (d, nq) = (q.d, q.nq);
        let batch = (KEY_BLOCK / b.group).min(work.len() / super::q8_key_work(nq, d, 1)).max(1);
        let np = batch * nq;
        let (qs, rest) = work.split_at_mut(np * d);
        let (packed, rest) = rest.split_at_mut(np * d / 2);
        let (delta, rest) = rest.split_at_mut(np);
        let (bias, rest) = rest.split_at_mut(np);
        (batch, KeyWork { qs, packed, delta, bias, inv: &mut rest[..np] })
    }
}

/// Folds `groups` key groups from ring slot `b0` into every query ([`fold_keys`], blocks of 3) and
/// their scales into `delta`, `inv` and `bias` ([`Pending`], flushed at the end).
#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn fold_batch(
    b: &ChannelBody<'_>,
    q: &Queries<'_>,
    b0: usize,
    groups: usize,
    qs: &mut [f32],
    delta: &mut [f32],
    inv: &mut [f32],
    bias: &mut [f32],
) {
    let (d, g, nq) = (q.d, b.group, q.nq);
    let mut pend = Pending::new(super::q8_key_max(d, b.width), delta, inv, bias);
    for j in 0..groups {
        let (scale, zero) = b.group_params(b0 / g + j, d);
        for qb in (0..nq).step_by(3) {
            let qs = &mut qs[(j * nq + qb) * d..];
            match nq - qb {
                1 => fold_keys::<1>(q, qb, scale, zero, qs, &mut pend),
                2 => fold_keys::<2>(q, qb, scale, zero, qs, &mut pend),
                _ => fold_keys::<3>(q, qb, scale, zero, qs, &mut pend),
            }
        }
    }
    pend.flush();
}

/// Hints the next key block's channel rows, a part of them per tile of `STEP` tokens: the tile at `t0`
/// hints rows `d * j / parts..d * (j + 1) / parts` (`parts = block / STEP`, `j = t0 % block / STEP`),
/// every line of each. A 256-token block is one 4 KiB page at 2 bits (two at 4 bits), and the hardware
/// prefetchers stop at a page's end, so without the hints each block's first tile waited on all its rows'
/// line misses at once. A block's rows are consecutive, so the part is one run of lines. `STEP` is a
/// constant and the block a power of two, so that the divisions are shifts and masks (with `div`s, four
/// per tile, the hints were a tenth of the int8 key kernel's instructions). A prefetch never faults, so
/// the address may lie past the codes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn prefetch_next_block<const STEP: usize>(b: &ChannelBody<'_>, t0: usize, d: usize) {
    let shift = (b.block / STEP).trailing_zeros();
    let j = (t0 & (b.block - 1)) / STEP;
    let next =
        b.codes.as_ptr().wrapping_add(key_row(t0 + b.block, 0, d, b.block, b.block_words)).cast::<u8>();
    let row_bytes = 4 * b.block_words;
    let (mut at, end) = (((d * j) >> shift) * row_bytes, ((d * (j + 1)) >> shift) * row_bytes);
    while at < end {
        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(at).cast());
        at += 64;
    }
}

/// Largest `head_dim` whose unpacked key tile (one int8 vector per channel, 4 KiB at 128; two f32 vectors
/// per channel, 8 KiB) prefill keeps on the stack to share among its query blocks; larger heads unpack the
/// tile once per block of 3 queries.
const MAX_UNPACKED: usize = 128;

/// The 32 2-bit codes at `rp` (two words) and the 32 at `rp + stride`, unpacked to bytes and interleaved
/// into 16-bit lanes that pair the two runs' codes at the same position, the `vpmaddubsw` operands of the
/// int8 path: vector `h`, 128-bit lane `l`, lane `m` holds code `4 m + 2 l + h` of both runs. Each word
/// pair is broadcast and shifted by (0, 0, 2, 2, 4, 4, 6, 6) (`vpsrlvd`), masked and interleaved. Keys
/// pair the channel rows `c`, `c + 1` of 32 tokens (codes 0, 4, .., 28 | 2, 6, .., 30 in the first vector,
/// the odd ones in the second); values pair the rows of tokens `t`, `t + 1` over 32 channels
/// ([`v8_channel`]).
///
/// # Safety
/// Words `0..2` and `stride..stride + 2` of `rp` are readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn code_pairs(rp: *const u32, stride: usize) -> [__m256i; 2] {
    let sh = _mm256_setr_epi32(0, 0, 2, 2, 4, 4, 6, 6);
    let m3 = _mm256_set1_epi8(3);
    // SAFETY: the caller's contract; unaligned reads.
    let (x0, x1) =
        unsafe { (rp.cast::<i64>().read_unaligned(), rp.add(stride).cast::<i64>().read_unaligned()) };
    let xa = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi64x(x0), sh), m3);
    let xb = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi64x(x1), sh), m3);
    [_mm256_unpacklo_epi8(xa, xb), _mm256_unpackhi_epi8(xa, xb)]
}

/// [`code_pairs`] of the runs at `2 i stride` and `(2 i + 1) stride` words from the start of `raw` as
/// `codes[2 i..2 i + 2]`, for `i < codes.len() / 2`: prefill unpacks a key tile (channel rows `c`, `c + 1`)
/// or a value tile's word pair (token rows `t`, `t + 1`) once for all its query blocks ([`madd_pairs`]
/// reads them where `S`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack_code_pairs<const B: u32>(raw: &[u32], stride: usize, codes: &mut [__m256i]) {
    let n = codes.len() / 2;
    let bw = B as usize;
    // Reads words `r * stride + k` (k < B) of `raw` for r < 2 n: checked once, then read through pointers.
    assert!(n > 0 && raw.len() >= (2 * n - 1) * stride + bw, "code rows shorter than their layout");
    for (i, yz) in codes.chunks_exact_mut(2).enumerate() {
        let rp = raw.as_ptr().wrapping_add(2 * i * stride);
        // SAFETY: 2 i + 1 < 2 n, so the words read, up to (2 i + 1) stride + B - 1, lie in `raw` (checked
        // above).
        yz.copy_from_slice(&unsafe {
            match B {
                4 => nibble_pairs(rp, stride),
                3 => triple_pairs(rp, stride),
                _ => code_pairs(rp, stride),
            }
        });
    }
}

/// The 32 4-bit codes at `rp` (four words) and the 32 at `rp + stride`, unpacked to bytes and interleaved
/// into 16-bit lanes that pair the two runs' codes at the same position, as [`code_pairs`] pairs 2-bit
/// ones, in another order: vector 0 holds the even positions (128-bit lane `l`, lane `m`: position
/// `16 l + 2 m`), vector 1 the odd ones (`16 l + 2 m + 1`). The low nibbles are the even positions, the
/// high ones the odd; `vpermq` puts each run's first eight bytes beside the other's in lane 0 (the last
/// eight in lane 1), and `vpshufb` interleaves them.
///
/// # Safety
/// Words `0..4` and `stride..stride + 4` of `rp` are readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibble_pairs(rp: *const u32, stride: usize) -> [__m256i; 2] {
    // SAFETY: the caller's contract; unaligned reads.
    let x = unsafe { _mm256_loadu2_m128i(rp.add(stride).cast(), rp.cast()) };
    let m = _mm256_set1_epi8(15);
    let idx = _mm256_setr_epi8(
        0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14,
        7, 15,
    );
    let pair = |v: __m256i| _mm256_shuffle_epi8(_mm256_permute4x64_epi64::<0b11_01_10_00>(v), idx);
    [pair(_mm256_and_si256(x, m)), pair(_mm256_and_si256(_mm256_srli_epi16::<4>(x), m))]
}

/// `vpshufb` indices and `vpsrlvd` counts of [`triple_pairs`]: vector `k`, 128-bit lane `l`, dword `i` takes
/// position `p = 16 l + 4 k + i` of both runs. Lane `l` holds bytes `4 l..4 l + 8` of the first run and the
/// same of the second (8 bytes after), so the dword gathers the two bytes `b, b + 1` (`b = 3 p / 8 - 4 l`)
/// that hold the first run's code, then the second run's, and a shift of `3 p % 8` brings both codes
/// down. A byte past the lane's 8 (only `b + 1` for position 31, whose code lies in its byte `b`) is
/// taken as zero.
const fn triple_consts() -> ([[u8; 32]; 4], [[u32; 8]; 4]) {
    let (mut idx, mut sh) = ([[0u8; 32]; 4], [[0u32; 8]; 4]);
    let mut k = 0;
    while k < 4 {
        let mut j = 0;
        while j < 8 {
            let (l, i) = (j / 4, j % 4);
            let p = 16 * l + 4 * k + i;
            let b = 3 * p / 8 - 4 * l;
            // b <= 7; the byte after b = 7 lies past the lane's first run.
            let next = if b < 7 { b as u8 + 1 } else { 0x80 };
            idx[k][16 * l + 4 * i] = b as u8;
            idx[k][16 * l + 4 * i + 1] = next;
            idx[k][16 * l + 4 * i + 2] = b as u8 | 8;
            idx[k][16 * l + 4 * i + 3] = next | 8;
            sh[k][j] = (3 * p % 8) as u32;
            j += 1;
        }
        k += 1;
    }
    (idx, sh)
}

const TRIPLE: ([[u8; 32]; 4], [[u32; 8]; 4]) = triple_consts();

/// The 32 3-bit codes at `rp` (three words) and the 32 at `rp + stride`, unpacked to bytes and interleaved
/// into 16-bit lanes that pair the two runs' codes at the same position, as [`code_pairs`] and
/// [`nibble_pairs`] pair theirs: vector 0 holds positions 0-7 in its low 128-bit lane and 16-23 in its high
/// one, vector 1 positions 8-15 and 24-31, in order. A code may straddle two bytes, so each run's bytes
/// 0-7 and 4-11 go into the low and high lanes; per position a dword gathers the two bytes that hold the
/// code from each run ([`triple_consts`]), one shift per dword and a mask leave the two codes in its two
/// 16-bit halves, and `vpackuswb` narrows four such vectors to the two of byte pairs.
///
/// # Safety
/// Words `0..3` and `stride..stride + 3` of `rp` are readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn triple_pairs(rp: *const u32, stride: usize) -> [__m256i; 2] {
    // SAFETY: the caller's contract: words 0-1 and 1-2 of each run; unaligned reads.
    let v = unsafe {
        let r = |p: *const u32| p.cast::<i64>().read_unaligned();
        _mm256_setr_epi64x(r(rp), r(rp.add(stride)), r(rp.add(1)), r(rp.add(stride + 1)))
    };
    let m = _mm256_set1_epi32(0x0007_0007);
    let (idx, sh) = &TRIPLE;
    // SAFETY: each constant holds 32 bytes; unaligned reads.
    let q = |k: usize| unsafe {
        let i = _mm256_loadu_si256(idx[k].as_ptr().cast());
        let s = _mm256_loadu_si256(sh[k].as_ptr().cast());
        _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, i), s), m)
    };
    [_mm256_packus_epi16(q(0), q(1)), _mm256_packus_epi16(q(2), q(3))]
}

/// [`madd_pairs`] for 4-bit codes ([`nibble_pairs`]) and 3-bit ones ([`triple_pairs`]), whose pair
/// products (up to `2 * 15 * 127` and `2 * 7 * 127`) let 16-bit sums take 8 pairs and 16 (at most
/// 30,480 and 28,448): that many pairs at a time, each run's sums widened into dwords. Returns per query
/// the dword sums of vector 0's low and high 128-bit lanes, then vector 1's: at 4 bits positions 0-14
/// even, 16-30 even, 1-15 odd and 17-31 odd; at 3 bits 0-7, 16-23, 8-15 and 24-31.
///
/// # Safety
/// As [`madd_pairs`], with words `0..B` of each run; `n` a multiple of 16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn madd_wide_pairs<const M: usize, const S: bool, const B: u32>(
    codes: &[__m256i],
    rp: *const u32,
    stride: usize,
    pp: *const u32,
    n: usize,
) -> [[__m256i; 4]; M] {
    let span = if B == 4 { 8 } else { 16 };
    let mut wide = [[_mm256_setzero_si256(); 4]; M];
    for i0 in (0..n).step_by(span) {
        // SAFETY: the caller's contract, for pairs i0..i0 + span of n.
        let acc = unsafe { madd_pairs::<M, S, B>(codes, rp, stride, pp, n, i0..i0 + span) };
        for (w, a) in wide.iter_mut().zip(&acc) {
            for (h, &v) in a.iter().enumerate() {
                let lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v));
                let hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(v));
                w[2 * h] = _mm256_add_epi32(w[2 * h], lo);
                w[2 * h + 1] = _mm256_add_epi32(w[2 * h + 1], hi);
            }
        }
    }
    wide
}

/// The dword sums of [`madd_wide_pairs`] at 4 bits (evens 0-14, evens 16-30, odds 1-15, odds 17-31), each
/// through `f`, in position order: four vectors of 8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn nibble_order(w: &[__m256i; 4], f: impl Fn(__m256i) -> __m256) -> [__m256; 4] {
    let [e0, e1, o0, o1] = [f(w[0]), f(w[1]), f(w[2]), f(w[3])];
    // (0, 1, 2, 3 | 8, 9, 10, 11) and (4, 5, 6, 7 | 12, 13, 14, 15) of each half.
    let (a, b) = (_mm256_unpacklo_ps(e0, o0), _mm256_unpackhi_ps(e0, o0));
    let (c, d) = (_mm256_unpacklo_ps(e1, o1), _mm256_unpackhi_ps(e1, o1));
    [
        _mm256_permute2f128_ps::<0x20>(a, b),
        _mm256_permute2f128_ps::<0x31>(a, b),
        _mm256_permute2f128_ps::<0x20>(c, d),
        _mm256_permute2f128_ps::<0x31>(c, d),
    ]
}

/// `M` queries' 16-bit sums over code pairs `span` of `n` (`span` of even bounds): pair `i`'s two
/// `vpmaddubsw` operands, from `codes[2 i..2 i + 2]` where `S` ([`unpack_code_pairs`]) or else from
/// [`code_pairs`] (`B = 2`) or [`nibble_pairs`] (`B = 4`) at `rp + 2 i stride` with `stride` apart, each
/// multiplied by query `m`'s byte pair `pp[m * n + i]` broadcast ([`byte_pairs`]) and added into `acc[m]`.
/// The key tile's pairs are channel pairs, the value tile's token pairs. The rows are walked by pointer, so
/// that the loop computes no row offsets (two `imul`s a pair, a fifth of its instructions, when it did),
/// and two pairs go per iteration, so that the counter and pointer steps are paid once for both.
///
/// # Safety
/// For `i` in `span` and `m < M`: entry `m * n + i` of `pp` is readable; where `S`, `codes.len() >= 2 n`,
/// else words `0..B` and `stride..stride + B` of `rp + 2 i stride` are readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn madd_pairs<const M: usize, const S: bool, const B: u32>(
    codes: &[__m256i],
    rp: *const u32,
    stride: usize,
    pp: *const u32,
    n: usize,
    span: core::ops::Range<usize>,
) -> [[__m256i; 2]; M] {
    let mut acc = [[_mm256_setzero_si256(); 2]; M];
    let mut rp = rp.wrapping_add(2 * span.start * stride);
    for i2 in span.step_by(2) {
        for i in i2..i2 + 2 {
            let [y, z] = if S {
                // SAFETY: 2 i + 1 < 2 n <= codes.len() (the caller's contract).
                unsafe { [*codes.get_unchecked(2 * i), *codes.get_unchecked(2 * i + 1)] }
            } else if B == 4 {
                // SAFETY: `rp` is `rp + 2 i stride` of the call (the caller's contract).
                unsafe { nibble_pairs(rp, stride) }
            } else if B == 3 {
                // SAFETY: as above.
                unsafe { triple_pairs(rp, stride) }
            } else {
                // SAFETY: as above.
                unsafe { code_pairs(rp, stride) }
            };
            rp = rp.wrapping_add(2 * stride);
            for (m, a) in acc.iter_mut().enumerate() {
                // SAFETY: m * n + i < M * n (the caller's contract).
                let w = _mm256_set1_epi32(unsafe { pp.add(m * n + i).read() } as i32);
                a[0] = _mm256_add_epi16(a[0], _mm256_maddubs_epi16(y, w));
                a[1] = _mm256_add_epi16(a[1], _mm256_maddubs_epi16(z, w));
            }
        }
    }
    acc
}

/// One query's 32 scores of a key tile in token order from its 16-bit sums `a` ([`madd_pairs`]: vector
/// `h`, 128-bit lane `l`, lane `m` holds token `4 m + 2 l + h`): `delta * sum + bias`, four vectors of 8.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn key_scores32(a: &[__m256i; 2], delta: f32, bias: f32) -> [__m256; 4] {
    let (dl, bs) = (_mm256_set1_ps(delta), _mm256_set1_ps(bias));
    let idx = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let f = |x: __m128i| _mm256_add_ps(_mm256_mul_ps(dl, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(x))), bs);
    // Pairs of tokens (t, t + 1) in dwords, then in order: tokens 0..16 and 16..32.
    let lo = _mm256_permutevar8x32_epi32(_mm256_unpacklo_epi16(a[0], a[1]), idx);
    let hi = _mm256_permutevar8x32_epi32(_mm256_unpackhi_epi16(a[0], a[1]), idx);
    [
        f(_mm256_castsi256_si128(lo)),
        f(_mm256_extracti128_si256::<1>(lo)),
        f(_mm256_castsi256_si128(hi)),
        f(_mm256_extracti128_si256::<1>(hi)),
    ]
}

/// The key tiles of one batch (up to a key block of groups): `tiles` tiles of 32 tokens from ring slot
/// `b0`, written from column `col` of the scores, with the batch's rounded queries (`packed`: pairs, `d / 2`
/// per entry, for these kernels; quads, `d / 4`, for the AVX-512 ones), scales (`delta`) and zero-point
/// sums (`bias`), entry `j * nq + qi` for group `j` and query `qi`.
/// The ranges every tile reads and writes are checked once for the batch, and the tiles then walk by
/// pointer: a tile's own checks, slicing and index arithmetic, with a call per rounded row
/// ([`round_pairs`]), were 6% of the int8 key kernel's instructions (callgrind over `decode_bench` at 16k
/// tokens: 30.5M before, 29.0M now, with prefill's shared unpacking in the same loop).
struct KeyTiles<'a> {
    b: &'a ChannelBody<'a>,
    d: usize,
    b0: usize,
    tiles: usize,
    col: usize,
    nq: usize,
    packed: &'a [u32],
    delta: &'a [f32],
    bias: &'a [f32],
}

impl KeyTiles<'_> {
    /// Checks once what every tile of the batch reads and writes: the codes up to the last tile's rows,
    /// `per_entry` words of `packed` and one `delta` and `bias` per entry of the batch's groups, and the
    /// scores; `unpacked` says whether the shared unpacking's room suffices. The layout and the batch's
    /// split guarantee these; a failure is a bug in this crate.
    #[inline]
    fn check(&self, per_entry: usize, unpacked: bool, out: &Scores<'_>) {
        let (b, d, nq) = (self.b, self.d, self.nq);
        let (w, per_group) = (b.block_words, b.group / 32);
        // A tile's row is 32 codes: as many words as the codes have bits.
        let bits = b.width.bits() as usize;
        // The last tile's codes start furthest on (a tile's first word grows with its slot), and the last
        // group's entries come last.
        let last = self.b0 + 32 * (self.tiles - 1);
        let last_word = key_row(last, 0, d, b.block, w) + (last & (b.block - 1)) * bits / 32;
        let entries = ((self.tiles - 1) / per_group.max(1) + 1) * nq;
        assert!(
            d >= 4
                && d.is_multiple_of(4)
                && per_group > 0
                && b.codes.len() >= last_word + (d - 1) * w + bits
                && unpacked
                && self.packed.len() >= entries * per_entry
                && self.delta.len() >= entries
                && self.bias.len() >= entries
                && out.data.len() >= out.pos + self.col + (nq - 1) * out.stride + 32 * self.tiles,
            "key batch shorter than its layout"
        );
    }

    /// Every tile by every block of up to 3 queries; where `S` (prefill), each tile's codes are unpacked
    /// once into `unpacked` (`d` vectors, [`unpack_code_pairs`]) for all the blocks, else each block
    /// unpacks them in place.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn run<const S: bool, const B: u32>(&self, out: &mut Scores<'_>, unpacked: &mut [__m256i]) {
        let (b, d, nq) = (self.b, self.d, self.nq);
        let (w, per_group) = (b.block_words, b.group / 32);
        if self.tiles == 0 {
            return;
        }
        self.check(d / 2, !S || unpacked.len() >= d, out);
        for k in 0..self.tiles {
            let t0 = self.b0 + 32 * k;
            let word = key_row(t0, 0, d, b.block, w) + (t0 & (b.block - 1)) * B as usize / 32;
            prefetch_next_block::<32>(b, t0, d);
            if S {
                unpack_code_pairs::<B>(&b.codes[word..], w, unpacked);
            }
            let at = k / per_group * nq;
            for qb in (0..nq).step_by(3) {
                // SAFETY: word <= last_word, at + qb + 3 <= entries wherever qb + 3 <= nq (and
                // at + nq <= entries otherwise), k < tiles (all checked above).
                unsafe {
                    match nq - qb {
                        1 => self.tile::<1, S, B>(k, word, at + qb, qb, unpacked, out),
                        2 => self.tile::<2, S, B>(k, word, at + qb, qb, unpacked, out),
                        _ => self.tile::<3, S, B>(k, word, at + qb, qb, unpacked, out),
                    }
                }
            }
        }
    }

    /// Tile `k` (codes from word `word`) by queries `qb..qb + M` (entries `e..e + M`).
    ///
    /// # Safety
    /// What [`Self::run`] checks: `word` at most the last tile's first word, `e + M` at most the batch's
    /// entries, `qb + M <= nq`, `k < tiles`, and `codes` holds `d` vectors where `S`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const M: usize, const S: bool, const B: u32>(
        &self,
        k: usize,
        word: usize,
        e: usize,
        qb: usize,
        codes: &[__m256i],
        out: &mut Scores<'_>,
    ) {
        let h = self.d / 2;
        if B == 4 {
            // SAFETY: as below, with four words per channel row (`check` took the codes' width); h is a
            // multiple of 8 (d of 16).
            let acc = unsafe {
                madd_wide_pairs::<M, S, 4>(
                    codes,
                    self.b.codes.as_ptr().add(word),
                    self.b.block_words,
                    self.packed.as_ptr().add(e * h),
                    h,
                )
            };
            let op = out.data.as_mut_ptr();
            for (m, a) in acc.iter().enumerate() {
                // SAFETY: e + m < the batch's entries <= delta.len(), bias.len() (the caller's contract).
                let (dl, bs) = unsafe { (*self.delta.get_unchecked(e + m), *self.bias.get_unchecked(e + m)) };
                let (dl, bs) = (_mm256_set1_ps(dl), _mm256_set1_ps(bs));
                let at = out.pos + self.col + (qb + m) * out.stride + 32 * k;
                let f = |x: __m256i| _mm256_add_ps(_mm256_mul_ps(dl, _mm256_cvtepi32_ps(x)), bs);
                for (j, v) in nibble_order(a, f).into_iter().enumerate() {
                    // SAFETY: at + 8 j + 8 <= pos + col + (nq - 1) stride + 32 tiles <= out.data.len() (the
                    // caller's contract); an unaligned store.
                    unsafe { _mm256_storeu_ps(op.add(at + 8 * j), v) };
                }
            }
            return;
        }
        // SAFETY: channel pair i's rows (words word + 2 i w + {0, 1} and word + (2 i + 1) w + {0, 1},
        // 2 i + 1 < d) lie in the codes; the pairs read, (e + m) h + i for m < M, i < h, lie in `pairs`; `codes`
        // holds d = 2 h vectors where S (the caller's contract); h is even.
        let acc = unsafe {
            madd_pairs::<M, S, 2>(
                codes,
                self.b.codes.as_ptr().add(word),
                self.b.block_words,
                self.packed.as_ptr().add(e * h),
                h,
                0..h,
            )
        };
        let op = out.data.as_mut_ptr();
        for (m, a) in acc.iter().enumerate() {
            // SAFETY: e + m < the batch's entries <= delta.len(), bias.len() (the caller's contract).
            let (dl, bs) = unsafe { (*self.delta.get_unchecked(e + m), *self.bias.get_unchecked(e + m)) };
            let at = out.pos + self.col + (qb + m) * out.stride + 32 * k;
            for (j, v) in key_scores32(a, dl, bs).into_iter().enumerate() {
                // SAFETY: at + 8 j + 8 <= pos + col + (nq - 1) stride + 32 tiles <= out.data.len() (the
                // caller's contract); an unaligned store.
                unsafe { _mm256_storeu_ps(op.add(at + 8 * j), v) };
            }
        }
    }
}

/// Channel (within its 64-channel chunk) of entry `r` of the int8 value path's permuted sums: `r = j * 32
/// + h * 16 + l * 8 + m` holds the codes [`code_pairs`] unpacks from word pair `j` into vector `h`,
/// 128-bit lane `l`, lane `m`: byte `m` of the pair's 8, shifted by `4 l + 2 h` bits.
#[inline]
#[cfg_attr(not(test), allow(dead_code))]
const fn v8_channel(r: usize) -> usize {
    let (j, h, l, m) = (r / 32, r / 16 % 2, r / 8 % 2, r % 8);
    32 * j + 4 * m + 2 * l + h
}

/// See [`portable::values_q8_token`] (the same bits). 2-bit codes, `group % 32 == 0`, `d % 64 == 0`; 4-bit
/// and 3-bit codes take the same loops with [`nibble_pairs`] or [`triple_pairs`] and [`madd_wide_pairs`]
/// (four or three words per 32 channels), their sums in channel order.
///
/// Per tile of [`super::Q8_TILE`] tokens, the weights `p_t s_t` of each channel group and query are rounded
/// ([`portable::value_tile_q8`]) and laid out as [`byte_pairs`] over token pairs; then, for each chunk of
/// 64 channels (a row's 4 words) and each of its two word pairs (32 channels, one group), a token pair's
/// codes are unpacked and interleaved token by token ([`code_pairs`], as the keys' channel pairs) and
/// multiplied by the group's weight pair with `vpmaddubsw` into 16-bit sums (6 accumulators for 3
/// queries, one weight broadcast per query), which the tile's scales take into f32; with more than 3
/// queries (prefill) the codes are unpacked once ([`unpack_code_pairs`]) for all blocks of 3. The sums are
/// kept in a channel-permuted order ([`v8_channel`]) and put back in order once; a last partial tile runs
/// as a zero-padded whole one ([`q8_tile`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn values_q8_token(
    b: &TokenBody<'_>,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
) {
    debug_assert!(b.levels.is_none(), "integer levels run on AVX-512 or the portable twin");
    if out.len() / d > 3 {
        let mut unpacked = [_mm256_setzero_si256(); super::Q8_TILE];
        let u = &mut unpacked;
        return match b.width {
            Width::B4 => q8_token_values::<true, 4>(b, start, n, p, d, out, work, u),
            Width::B3 => q8_token_values::<true, 3>(b, start, n, p, d, out, work, u),
            _ => q8_token_values::<true, 2>(b, start, n, p, d, out, work, u),
        };
    }
    match b.width {
        Width::B4 => q8_token_values::<false, 4>(b, start, n, p, d, out, work, &mut []),
        Width::B3 => q8_token_values::<false, 3>(b, start, n, p, d, out, work, &mut []),
        _ => q8_token_values::<false, 2>(b, start, n, p, d, out, work, &mut []),
    }
}

/// [`values_q8_token`]'s loops: `S` (shared) unpacks each word pair of a tile once into
/// `unpacked` ([`super::Q8_TILE`] vectors) for every block of queries, else each block unpacks them in
/// place (decode's path, a const parameter so that its loop carries no test of it).
#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
fn q8_token_values<const S: bool, const B: u32>(
    b: &TokenBody<'_>,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
    unpacked: &mut [__m256i],
) {
    const T: usize = super::Q8_TILE;
    let nq = out.len() / d;
    let g = b.group;
    let groups = d / g;
    let ValueWork { l, zl, tile, lp, packed, pad } = ValueWork::split(work, nq, d, groups);
    let pairs: &mut [u32] = bytemuck::cast_slice_mut(&mut packed[..groups * nq * T / 2]);
    let (delta, spare) = tile.split_at_mut(groups * nq);
    // 3- and 4-bit sums come in channel order, straight into `l`; 2-bit ones go permuted into `lp`.
    let sums: &mut [f32] = if B == 2 { &mut *lp } else { &mut *l };
    sums.fill(0.0);
    zl.fill(0.0);
    let vmax = Q8_VALUE_MAX;
    for t0 in (0..n).step_by(T) {
        let (b, p, slot, t0) = q8_tile(b, p, start, t0, n, nq, groups, &mut *pad, &mut *spare);
        let (b, p) = (&b, &p);
        for gi in 0..groups {
            // The group's scales and zero points over the tile, converted once for every query.
            // Each resliced once to its tile, so that the loads below carry no bounds checks (they were
            // a third of this loop's instructions).
            let at = gi * b.ring + slot;
            let (sr, zr) = (&b.scale[at..][..T], &b.zero[at..][..T]);
            let sv: [__m256; T / 8] = core::array::from_fn(|k| ld_ph(&sr[8 * k..]));
            // Zero-point lanes first, every query's chain interleaved with the others' (one query's 16
            // dependent adds at a time were a latency chain); the same lane sums in the same order.
            for qb in (0..nq).step_by(3) {
                match nq - qb {
                    1 => zero_lanes::<1>(zr, p, t0, zl, groups, gi, qb),
                    2 => zero_lanes::<2>(zr, p, t0, zl, groups, gi, qb),
                    _ => zero_lanes::<3>(zr, p, t0, zl, groups, gi, qb),
                }
            }
            for qi in 0..nq {
                let pr = &p.data[qi * p.stride + p.pos + t0..][..T];
                let mut ps = [_mm256_setzero_ps(); T / 8];
                let mut mx = _mm256_setzero_ps();
                for (k, v) in ps.iter_mut().enumerate() {
                    // p >= 0 and s >= 0, so p s is its own absolute value.
                    *v = _mm256_mul_ps(ld(&pr[8 * k..]), sv[k]);
                    mx = _mm256_max_ps(mx, *v);
                }
                let m = hmax(mx);
                let pq = &mut pairs[(gi * nq + qi) * T / 2..][..T / 2];
                if m == 0.0 {
                    pq.fill(0);
                    delta[gi * nq + qi] = 0.0;
                    continue;
                }
                let inv = _mm256_set1_ps(vmax / m);
                for (h, o) in pq.chunks_exact_mut(16).enumerate() {
                    let r: [__m256i; 4] =
                        core::array::from_fn(|k| _mm256_cvtps_epi32(_mm256_mul_ps(ps[4 * h + k], inv)));
                    sti(&mut o[..8], byte_pairs(r[0], r[1]));
                    sti(&mut o[8..], byte_pairs(r[2], r[3]));
                }
                delta[gi * nq + qi] = m / vmax;
            }
        }
        let rows = &b.codes[slot * b.row_words..][..T * b.row_words];
        // 32 channels (one group or more) are `B` words of each row; only those the caller reads.
        let (c_lo, c_hi) = b.reads.map_or((0, d), |(a, e)| (a / 32 * 32, e.div_ceil(32).min(d / 32) * 32));
        for c0 in (c_lo..c_hi).step_by(32) {
            let word = c0 * B as usize / 32;
            let v = Q8Values { rows, row_words: b.row_words, word, group: c0 / g, nq, pairs, delta };
            if S {
                unpack_code_pairs::<B>(&rows[v.word..], b.row_words, unpacked);
            }
            for qb in (0..nq).step_by(3) {
                let lq = &mut sums[qb * d..];
                match nq - qb {
                    1 => v.tile::<1, S, B>(unpacked, lq, d, qb, c0),
                    2 => v.tile::<2, S, B>(unpacked, lq, d, qb, c0),
                    _ => v.tile::<3, S, B>(unpacked, lq, d, qb, c0),
                }
            }
        }
    }
    if B != 2 {
        return portable::finish_values_q8(g, d, l, zl, out);
    }
    for (lr, pr) in l.chunks_exact_mut(d).zip(lp.chunks_exact(d)) {
        for (lc, pc) in lr.chunks_exact_mut(32).zip(pr.chunks_exact(32)) {
            unpermute32(pc, lc);
        }
    }
    portable::finish_values_q8(g, d, l, zl, out);
}

/// The int8 value path's `work` ([`super::q8_value_work`] floats): the outputs `l` (`[nq][d]`), the
/// zero-point lanes `zl` (8 per query and group), the portable tail's `tile` (its first `groups * nq`
/// floats the current tile's scales `delta`, the rest a partial tile's probabilities), the permuted sums
/// `lp` (`[nq][d]`, these kernels only), the rounded weights (`packed`: pairs, `Q8_TILE / 2` per group and
/// query, here; quads, `Q8_TILE / 4`, for the AVX-512 kernels), and a partial tile's codes and parameters
/// (`pad`, see [`pad_tile`]).
pub(super) struct ValueWork<'w> {
    pub(super) l: &'w mut [f32],
    pub(super) zl: &'w mut [f32],
    pub(super) tile: &'w mut [f32],
    pub(super) lp: &'w mut [f32],
    pub(super) packed: &'w mut [f32],
    pub(super) pad: &'w mut [f32],
}

impl<'w> ValueWork<'w> {
    pub(super) fn split(work: &'w mut [f32], nq: usize, d: usize, groups: usize) -> Self {
        const T: usize = super::Q8_TILE;
        let (l, rest) = work.split_at_mut(nq * d);
        let (zl, rest) = rest.split_at_mut(nq * groups * 8);
        let (tile, rest) = rest.split_at_mut(nq * d + groups * nq * (T + 1));
        let (lp, rest) = rest.split_at_mut(nq * d);
        let (packed, pad) = rest.split_at_mut(groups * nq * T / 2);
        ValueWork { l, zl, tile, lp, packed, pad }
    }
}

/// Tile `t0` of an int8 value body of `n` tokens from ring slot `start` (`nq` queries, `groups` channel
/// groups), as the vector kernels read it: the body and probabilities with the tile's first ring slot
/// and position, or, for a last tile of fewer than [`super::Q8_TILE`] tokens, its zero-padded copy
/// ([`pad_tile`]) from slot and position 0.
#[allow(clippy::too_many_arguments)]
pub(super) fn q8_tile<'a>(
    b: &TokenBody<'a>,
    p: &Probs<'a>,
    start: usize,
    t0: usize,
    n: usize,
    nq: usize,
    groups: usize,
    pad: &'a mut [f32],
    spare: &'a mut [f32],
) -> (TokenBody<'a>, Probs<'a>, usize, usize) {
    if t0 + super::Q8_TILE <= n {
        return (*b, *p, start + t0, t0);
    }
    let (b, p) = pad_tile(b, start + t0, n - t0, p, t0, nq, groups, pad, spare);
    (b, p, 0, 0)
}

/// The last tile of an int8 value body when it holds fewer than [`super::Q8_TILE`] tokens, copied into
/// whole-tile buffers with zeros after its tokens, so that the vector kernels run it as a whole tile: its
/// code rows, scales and zero points into `pad` (`Q8_TILE * (row_words + groups)` floats of scratch), each
/// query's probabilities into `probs` (`nq * Q8_TILE`). That gives the portable twin's bits, which sums
/// only the tile's tokens: a zero probability rounds to a zero weight (the tile's largest weight, and so
/// its scale, are unchanged; the integer sums are exact), and adds `0 * 0 = +0` to a zero-point lane,
/// which leaves it as it is (a lane is never -0: it starts at +0, and a sum that cancels rounds to +0).
/// Before this the tile ran the portable twin, which at 1,120 tokens took more than half of `kivi2`'s
/// int8 step and made it slower than fp16 (`decode_bench`, Zen 4).
///
/// Takes the `len` tokens from ring slot `slot` of `b` (`groups` channel groups) and positions
/// `t0..t0 + len` of `p`'s rows; returns them as a body whose tile starts at slot 0 and probabilities
/// whose tile starts at position 0.
#[allow(clippy::too_many_arguments)]
pub(super) fn pad_tile<'a>(
    b: &TokenBody<'a>,
    slot: usize,
    len: usize,
    p: &Probs<'_>,
    t0: usize,
    nq: usize,
    groups: usize,
    pad: &'a mut [f32],
    probs: &'a mut [f32],
) -> (TokenBody<'a>, Probs<'a>) {
    const T: usize = super::Q8_TILE;
    let rw = b.row_words;
    let (codes, params) = pad.split_at_mut(T * rw);
    let params: &mut [u16] = bytemuck::cast_slice_mut(&mut params[..T * groups]);
    let (scale, zero) = params.split_at_mut(T * groups);
    codes[..len * rw].copy_from_slice(bytemuck::cast_slice(&b.codes[slot * rw..][..len * rw]));
    codes[len * rw..].fill(0.0);
    for gi in 0..groups {
        for (dst, src) in [(&mut *scale, b.scale), (&mut *zero, b.zero)] {
            let dst = &mut dst[gi * T..][..T];
            dst[..len].copy_from_slice(&src[gi * b.ring + slot..][..len]);
            dst[len..].fill(0);
        }
    }
    let probs = &mut probs[..nq * T];
    for (qi, row) in probs.chunks_exact_mut(T).enumerate() {
        row[..len].copy_from_slice(&p.data[qi * p.stride + p.pos + t0..][..len]);
        row[len..].fill(0.0);
    }
    let body = TokenBody { codes: bytemuck::cast_slice(codes), scale, zero, ring: T, ..*b };
    (body, Probs { data: probs, stride: T, pos: 0 })
}

/// Adds `p_t z_t` over a value tile (`zr`: the group's zero points over its `Q8_TILE` tokens from `t0`)
/// into lanes `t % 8` of `zl` for group `gi` and queries `qb..qb + M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn zero_lanes<const M: usize>(
    zr: &[u16],
    p: &Probs<'_>,
    t0: usize,
    zl: &mut [f32],
    groups: usize,
    gi: usize,
    qb: usize,
) {
    const T: usize = super::Q8_TILE;
    let base = qb * p.stride + p.pos + t0;
    // Reads entries `base + m * stride + t` (t < T) of the probabilities and the T zero points: checked
    // once, then read through pointers (the per-load checks cost as much as the sums).
    assert!(
        zr.len() >= T && base + (M - 1) * p.stride + T <= p.data.len(),
        "value tile shorter than its layout"
    );
    let (zp, pp) = (zr.as_ptr(), p.data.as_ptr());
    let mut za: [__m256; M] = core::array::from_fn(|m| ld(&zl[((qb + m) * groups + gi) * 8..]));
    for k in (0..T).step_by(8) {
        // SAFETY: k + 8 <= T <= zr.len() (checked above); an unaligned 16-byte read.
        let z = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(zp.add(k).cast()) });
        for (m, a) in za.iter_mut().enumerate() {
            // SAFETY: base + m * stride + k + 8 <= base + (M - 1) * stride + T <= p.data.len() (checked above).
            let pv = unsafe { _mm256_loadu_ps(pp.add(base + m * p.stride + k)) };
            *a = _mm256_add_ps(*a, _mm256_mul_ps(pv, z));
        }
    }
    for (m, a) in za.into_iter().enumerate() {
        st(&mut zl[((qb + m) * groups + gi) * 8..], a);
    }
}

/// One tile's rows and rounded weights, for one run of 32 channels of one group (a word pair at 2 bits).
struct Q8Values<'a> {
    rows: &'a [u32],
    row_words: usize,
    /// The run's first word in each row (`B` words of 32 channels).
    word: usize,
    /// The channel group of its 32 channels.
    group: usize,
    nq: usize,
    pairs: &'a [u32],
    delta: &'a [f32],
}

impl Q8Values<'_> {
    /// Queries `qb..qb + M`: adds the tile's sums, scaled, into `lq` (`M` rows of `d`, permuted at 2 bits);
    /// the codes come unpacked from `codes` where `S` (see [`unpack_code_pairs`]), else straight from the rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tile<const M: usize, const S: bool, const B: u32>(
        &self,
        codes: &[__m256i],
        lq: &mut [f32],
        d: usize,
        qb: usize,
        c0: usize,
    ) {
        const T: usize = super::Q8_TILE;
        let rw = self.row_words;
        if B != 2 {
            let p0 = (self.group * self.nq + qb) * T / 2;
            // Reads words `t * rw + word + i` (i < B) of `rows` for t < T (or entries i < T of `codes`) and
            // entries `p0 + i` (i < M * T / 2) of `pairs`: checked once here. The layout guarantees this; a
            // failure is a bug in this crate.
            assert!(
                self.rows.len() >= T * rw
                    && self.word + B as usize <= rw
                    && (!S || codes.len() >= T)
                    && self.pairs.len() >= p0 + M * T / 2
                    && lq.len() >= (M - 1) * d + c0 + 32,
                "value rows shorter than their layout"
            );
            // SAFETY: token pair tp's rows start at word 2 tp rw of `rows[word..]` and 2 tp + 1 < T, word + B
            // <= rw, so the words read lie in `rows`; `pairs[p0..]` holds M * T / 2 entries; `codes` T where
            // S (all checked above); T / 2 is a multiple of 16.
            let acc = unsafe {
                madd_wide_pairs::<M, S, B>(
                    codes,
                    self.rows[self.word..].as_ptr(),
                    rw,
                    self.pairs[p0..].as_ptr(),
                    T / 2,
                )
            };
            for (m, a) in acc.iter().enumerate() {
                let dl = _mm256_set1_ps(self.delta[self.group * self.nq + qb + m]);
                let o = &mut lq[m * d + c0..][..32];
                let f = |x: __m256i| _mm256_mul_ps(dl, _mm256_cvtepi32_ps(x));
                // 3-bit sums come as positions 0-7, 16-23, 8-15, 24-31 ([`triple_pairs`]).
                let xs = if B == 4 { nibble_order(a, f) } else { [f(a[0]), f(a[2]), f(a[1]), f(a[3])] };
                for (j, x) in xs.into_iter().enumerate() {
                    let y = _mm256_add_ps(ld(&o[8 * j..]), x);
                    st(&mut o[8 * j..], y);
                }
            }
            return;
        }
        // Reads words `t * rw + word + i` (i < 2) of `rows` for t < T (or entries i < T of `codes`) and
        // entries `(group * nq + qb + m) * T / 2 + i` (i < T / 2) of `pairs` for m < M: checked once here,
        // then read through pointers. The layout guarantees this; a failure is a bug in this crate.
        let p0 = (self.group * self.nq + qb) * T / 2;
        assert!(
            self.rows.len() >= T * rw
                && self.word + 2 <= rw
                && (!S || codes.len() >= T)
                && self.pairs.len() >= p0 + M * T / 2,
            "value rows shorter than their layout"
        );
        // Two halves of the tile's 64 token pairs, each at most `32 * 2 * 3 * 127` = 24,384 in 16 bits,
        // widened and added in dwords (the whole tile would pass 2^15).
        // SAFETY: token pair tp's rows start at word 2 tp rw of `rows[word..]` and 2 tp + 1 < T, word + 2 <=
        // rw, so the words read lie in `rows`; `pairs[p0..]` holds M * T / 2 entries; `codes` T where S (all
        // checked above); T / 4 is even.
        let half = |span: core::ops::Range<usize>| unsafe {
            madd_pairs::<M, S, 2>(
                codes,
                self.rows[self.word..].as_ptr(),
                rw,
                self.pairs[p0..].as_ptr(),
                T / 2,
                span,
            )
        };
        let (a0, a1) = (half(0..T / 4), half(T / 4..T / 2));
        for (m, (ac0, ac1)) in a0.iter().zip(&a1).enumerate() {
            let dl = _mm256_set1_ps(self.delta[self.group * self.nq + qb + m]);
            let o = &mut lq[m * d + self.word * 16..][..32];
            for (h, (&v0, &v1)) in ac0.iter().zip(ac1).enumerate() {
                let lanes = |v: __m256i| [_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v)];
                for (l, (e0, e1)) in lanes(v0).into_iter().zip(lanes(v1)).enumerate() {
                    let sum = _mm256_add_epi32(_mm256_cvtepi16_epi32(e0), _mm256_cvtepi16_epi32(e1));
                    let x = _mm256_mul_ps(dl, _mm256_cvtepi32_ps(sum));
                    let at = 16 * h + 8 * l;
                    let y = _mm256_add_ps(ld(&o[at..]), x);
                    st(&mut o[at..], y);
                }
            }
        }
    }
}

/// Eight codes of `B` bits (1 to 4) from the low `8 B` bits of `x`, one per 32-bit lane, code `k` in the
/// low bits of lane `k` with the following codes' bits above it (unmasked: [`lookup8`] reads only the
/// code's own bits).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn codes8<const B: i32>(x: u32) -> __m256i {
    let sh = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    _mm256_srlv_epi32(_mm256_set1_epi32(x as i32), sh)
}

/// `table[code]` per lane for codes of `B` bits, up to 4, in the low bits of each lane (bits above the
/// code are ignored): `vpermps` reads a lane's low 3 bits, so 3-bit codes index the table's first half
/// directly, and 1- and 2-bit codes do too because the table repeats its levels with their period (the
/// next code's bits in the index land on a copy); 4-bit codes pick between both halves on their fourth
/// bit, shifted into the sign bit for `vblendvps`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lookup8<const B: i32>(lo: __m256, hi: __m256, codes: __m256i) -> __m256 {
    let a = _mm256_permutevar8x32_ps(lo, codes);
    if B <= 3 {
        return a;
    }
    let b = _mm256_permutevar8x32_ps(hi, codes);
    _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(codes)))
}

/// The first `2 B` bytes of `bytes[off..]` (16 codes of `B` bits) as the low bits of a `u64`.
#[inline(always)]
fn read16<const B: i32>(bytes: &[u8], off: usize) -> u64 {
    let n = 2 * B as usize;
    match bytes.get(off..off + 8) {
        Some(s) => u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]),
        None => {
            let mut a = [0u8; 8];
            a[..n].copy_from_slice(&bytes[off..off + n]);
            u64::from_le_bytes(a)
        }
    }
}

/// Key groups of the generic per-channel path (see `generic::channel_key_groups`) in one pass: for each
/// group's `g` tokens (`g % 16 == 0`) and the `nq` queries, the score `bias[qi * g + t] + sum_c w(qi, c, t)
/// * table_c[code(c, t)]`, with `w(qi, c, t)` the offset query at `oq[oq_at(qi, c, t, ..)]`, written to
/// `out`. Each group is `(word, col, at)`: its channel `c`'s codes are the row at `word + c * row_words` of
/// `codes`, from code `col` (`col % 8 == 0`), and its scores go to columns `at..at + g`; its tables are the
/// next `d` of `tables` (entry `k` is the reconstruction of code `k % levels`, see [`lookup8`]).
///
/// Blocks of 16 tokens by up to 4 queries keep 8 accumulators in registers; a run of 16 codes is unpacked
/// by a broadcast and per-lane shifts and looked up with `vpermps`. The groups are the inner loop, so each
/// block's offset queries (12 KiB for 3 queries of 64 channels) are read from L1 for every group of the
/// batch instead of streaming the whole `[G][nq][d]` set (48 KiB at G = 64) from L2 once per group.
pub(crate) struct GroupRun<'a> {
    pub(crate) codes: &'a [u32],
    pub(crate) row_words: usize,
    pub(crate) groups: &'a [(usize, usize, usize)],
    pub(crate) tables: &'a [[f32; 16]],
    pub(crate) d: usize,
    pub(crate) g: usize,
    pub(crate) oq: &'a [f32],
    pub(crate) bias: &'a [f32],
}

impl GroupRun<'_> {
    /// Every group's scores for codes of `bits` bits (1 to 4).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn scores(&self, bits: u32, out: &mut Scores<'_>) {
        let nq = self.bias.len() / self.g;
        let mut qb = 0;
        while qb < nq {
            let m = (nq - qb).min(4);
            match bits {
                1 => self.block_any::<1>(out, qb, m),
                2 => self.block_any::<2>(out, qb, m),
                3 => self.block_any::<3>(out, qb, m),
                _ => self.block_any::<4>(out, qb, m),
            }
            qb += m;
        }
    }

    /// Queries `qb..qb + m` (`m` at most 4) for `B`-bit codes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_any<const B: i32>(&self, out: &mut Scores<'_>, qb: usize, m: usize) {
        match m {
            1 => self.block::<B, 1>(out, qb),
            2 => self.block::<B, 2>(out, qb),
            3 => self.block::<B, 3>(out, qb),
            _ => self.block::<B, 4>(out, qb),
        }
    }

    /// Queries `qb..qb + M` for `B`-bit codes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block<const B: i32, const M: usize>(&self, out: &mut Scores<'_>, qb: usize) {
        let (g, d) = (self.g, self.d);
        let nq = self.bias.len() / g;
        let bytes: &[u8] = bytemuck::cast_slice(self.codes);
        let b = B as usize;
        let rw = self.row_words * 4;
        for t0 in (0..g).step_by(16) {
            let oq = &self.oq[crate::attention::generic::oq_at(qb, 0, t0, nq, d, g)..][..M * d * 16];
            for (&(word, col, at), tables) in self.groups.iter().zip(self.tables.chunks_exact(d)) {
                let mut a: [[__m256; 2]; M] =
                    core::array::from_fn(|m| ldn::<2>(&self.bias[(qb + m) * g + t0..][..16]));
                let off = word * 4 + (col + t0) * b / 8;
                // The last channel's second read ends 4 bytes after its byte `b`; where that is inside
                // `bytes` (every group but possibly the last of the buffer), the reads go unchecked.
                if d > 0 && off + (d - 1) * rw + b + 4 <= bytes.len() {
                    // SAFETY: `fast_run` reads 4 bytes at `off + c * rw` and at `off + c * rw + b` for
                    // `c < d` (inside `bytes`, checked just above) and the `M * d * 16` floats of `oq`
                    // (sliced to that length above); AVX2, FMA and F16C are enabled here.
                    unsafe {
                        Self::fast_run::<B, M>(bytes.as_ptr().add(off), rw, tables, oq.as_ptr(), d, &mut a)
                    };
                    store_scores(&a, out, qb, at + t0);
                    continue;
                }
                for (c, table) in tables.iter().enumerate() {
                    let at = off + c * self.row_words * 4;
                    let x = read16::<B>(bytes, at);
                    let lo = ld(&table[..8]);
                    let hi = if B < 4 { lo } else { ld(&table[8..]) };
                    let v = [
                        lookup8::<B>(lo, hi, codes8::<B>(x as u32)),
                        lookup8::<B>(lo, hi, codes8::<B>((x >> (8 * b)) as u32)),
                    ];
                    for (m, am) in a.iter_mut().enumerate() {
                        let w = ldn::<2>(&oq[(m * d + c) * 16..][..16]);
                        am[0] = _mm256_fmadd_ps(w[0], v[0], am[0]);
                        am[1] = _mm256_fmadd_ps(w[1], v[1], am[1]);
                    }
                }
                store_scores(&a, out, qb, at + t0);
            }
        }
    }

    /// One run of 16 tokens of one group, its `d` channels against queries `0..M` of the block: channel
    /// `c`'s 16 codes are the `2 B` bytes at `codes + c * rw`, read as two 4-byte words (at byte 0 and at
    /// byte `B`, 8 codes each; bits past a code are ignored by [`lookup8`]), each broadcast and shifted
    /// per lane; the offset queries are `oq[(m * d + c) * 16..][..16]`.
    ///
    /// # Safety
    /// The 4 bytes at `codes + c * rw` and at `codes + c * rw + B` are readable for every `c < d`, as are
    /// the `M * d * 16` floats at `oq`; `tables` holds `d` tables.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fast_run<const B: i32, const M: usize>(
        codes: *const u8,
        rw: usize,
        tables: &[[f32; 16]],
        oq: *const f32,
        d: usize,
        a: &mut [[__m256; 2]; M],
    ) {
        let b = B as usize;
        let sh = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
        let mut row = codes;
        for (c, table) in tables[..d].iter().enumerate() {
            let lo = ld(&table[..8]);
            let hi = if B < 4 { lo } else { ld(&table[8..]) };
            // SAFETY: the caller's contract: 4 readable bytes at `row` and at `row + b`.
            let (x0, x1) =
                unsafe { (row.cast::<i32>().read_unaligned(), row.add(b).cast::<i32>().read_unaligned()) };
            let v0 = lookup8::<B>(lo, hi, _mm256_srlv_epi32(_mm256_set1_epi32(x0), sh));
            let v1 = lookup8::<B>(lo, hi, _mm256_srlv_epi32(_mm256_set1_epi32(x1), sh));
            for (m, am) in a.iter_mut().enumerate() {
                // SAFETY: `(m * d + c) * 16 + 16 <= M * d * 16` floats at `oq`, the caller's contract.
                let w = unsafe { oq.add((m * d + c) * 16) };
                // SAFETY: as just above.
                let (w0, w1) = unsafe { (_mm256_loadu_ps(w), _mm256_loadu_ps(w.add(8))) };
                am[0] = _mm256_fmadd_ps(w0, v0, am[0]);
                am[1] = _mm256_fmadd_ps(w1, v1, am[1]);
            }
            // `wrapping_add`: past the last channel the pointer is not read.
            row = row.wrapping_add(rw);
        }
    }
}

/// Queries per KV head [`tier_key_dots`] takes at once (GQA groups up to 8 queries).
pub(crate) const TIER_QUERIES: usize = 8;

/// Channel group `gi` (64 channels, as 8 vectors) of a promoted token's 4-bit correction (`part`: `d / 64`
/// parameter words, f16 scale low and zero high, then `d / 8` words of codes, 8 to a word from the low
/// bits): each code `f32(code) * scale + zero`, the product and then the sum rounded, as
/// `GroupParams::decode` forms it.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn tier_group_b4(part: &[u32], d: usize, gi: usize) -> [__m256; 8] {
    let (params, codes) = part.split_at(d / 64);
    let ps = _mm256_cvtph_ps(_mm_set1_epi32(params[gi] as i32));
    // Lanes 0 and 1 of `ps` hold the scale and the zero point.
    let scale = _mm256_permutevar8x32_ps(ps, _mm256_set1_epi32(0));
    let zero = _mm256_permutevar8x32_ps(ps, _mm256_set1_epi32(1));
    let sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    let m = _mm256_set1_epi32(15);
    let cw = &codes[gi * 8..][..8];
    core::array::from_fn(|j| {
        let c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(cw[j] as i32), sh), m);
        _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(c), scale), zero)
    })
}

/// `s[qi] = q_qi . c` for a promoted token's 4-bit correction `c` in groups of 64 channels (see
/// [`tier_group_b4`]) and queries `qi < q.nq` (at most [`TIER_QUERIES`]), `d % 64 == 0`: `super::dot`'s
/// sums (8 lanes, each `acc + x * y` in channel order, then the lanes in order), the same bits, with the
/// correction decoded in registers instead of stored and read back once per query.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn tier_key_dots(part: &[u32], q: &Queries<'_>, s: &mut [f32; TIER_QUERIES]) {
    let (d, nq) = (q.d, q.nq);
    assert!(d.is_multiple_of(64) && nq <= TIER_QUERIES, "tier dots: shapes outside the kernel's");
    let mut acc = [_mm256_setzero_ps(); TIER_QUERIES];
    for gi in 0..d / 64 {
        let c = tier_group_b4(part, d, gi);
        for (qi, a) in acc[..nq].iter_mut().enumerate() {
            let qr = &q.row(qi)[gi * 64..][..64];
            for (j, &cj) in c.iter().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(ld(&qr[8 * j..]), cj));
            }
        }
    }
    // `dot`'s tail: the sum of no remainder.
    let tail: f32 = core::iter::empty::<f32>().sum();
    for (s, a) in s.iter_mut().zip(&acc[..nq]) {
        let mut lanes = [0.0f32; 8];
        st(&mut lanes, *a);
        *s = lanes.iter().sum::<f32>() + tail;
    }
}

/// `acc[qi] += p[qi][t] * c` for a promoted token's 4-bit correction `c` in groups of 64 channels (see
/// [`tier_group_b4`]), `d % 64 == 0`: each lane `acc + p * x`, as the portable loop forms it.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn tier_value_axpy(part: &[u32], p: &Probs<'_>, t: usize, d: usize, acc: &mut [f32]) {
    assert!(d.is_multiple_of(64), "tier sums: head dimension outside the kernel's");
    for gi in 0..d / 64 {
        let c = tier_group_b4(part, d, gi);
        for (qi, a) in acc.chunks_exact_mut(d).enumerate() {
            let pt = _mm256_set1_ps(p.at(qi, t));
            let a = &mut a[gi * 64..][..64];
            for (j, &cj) in c.iter().enumerate() {
                let v = _mm256_add_ps(ld(&a[8 * j..]), _mm256_mul_ps(pt, cj));
                st(&mut a[8 * j..], v);
            }
        }
    }
}

/// Largest `head_dim` [`offset_queries`] takes: its run's RoPE angles (two vectors per channel pair) stay on
/// the stack, 16 KiB at 256.
pub(crate) const OQ_MAX_D: usize = 256;

/// [`generic::offset_queries`](super::generic::offset_queries) in AVX2 registers, the same bits, for runs
/// of 16 offsets, `head_dim` a multiple of 8 up to [`OQ_MAX_D`], keys neither balanced nor centred (`bias`
/// is zero): the AVX-512 kernel's scheme (see `avx512::offset_queries`) on half runs. A vector holds one
/// channel of 8 offsets, the first or second half of a run as `oq` lays them out.
///
/// The compiled portable loops sweep the whole `[d][16]` block once per RoPE step and once per Hadamard
/// stage, a load and a store of every vector each time (a third of `kvq2`'s step at 1k tokens on Zen 3).
/// Here a block of 8 channels is rotated by RoPE in registers and takes the first three stages there
/// (they mix only channels within aligned blocks of 8), and each later sweep takes up to three stages over
/// 8 channels `2^k` apart: two sweeps at `d = 64` instead of seven. Every butterfly is the same addition
/// or subtraction of the same two floats in the same order of stages, and RoPE and the final scaling the
/// same products, so the results are the portable loops' bits. The run's cosines and sines are
/// transposed into channel vectors once for every query.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn offset_queries(
    rope: Option<(crate::transform::Rope, &[f32])>,
    rotate: bool,
    g: usize,
    queries: &Queries<'_>,
    oq: &mut [f32],
    bias: &mut [f32],
) {
    use super::generic::oq_at;
    const RUN: usize = 16;
    let (d, nq) = (queries.d, queries.nq);
    assert!(
        d.is_multiple_of(8)
            && d <= OQ_MAX_D
            && (!rotate || d.is_power_of_two())
            && g.is_multiple_of(RUN)
            && oq.len() >= nq * d * g
            && bias.len() >= nq * g
            && queries.q.len() >= nq * d
            && rope.is_none_or(|(_, t)| t.len() >= g * d),
        "offset queries: shapes outside this kernel's"
    );
    let norm = _mm256_set1_ps(1.0 / libm::sqrtf(d as f32));
    let neg = _mm256_set1_epi32(i32::MIN);
    // Channel `c` after RoPE is `q[c] * cos[h][c] + q[partner[c]] * sin[h][c]` per lane of half run `h`
    // (see below), with the run's cosine and signed sine of `c`'s pair. Left uninitialized (zeroing both,
    // 32 KiB a call, showed in `perf`): each run writes every channel's entries before they are read.
    let mut cos = [[core::mem::MaybeUninit::<__m256>::uninit(); OQ_MAX_D]; 2];
    let mut sin = [[core::mem::MaybeUninit::<__m256>::uninit(); OQ_MAX_D]; 2];
    let mut partner = [0usize; OQ_MAX_D];
    if let Some((r, _)) = rope {
        for (c, p) in partner[..d].iter_mut().enumerate() {
            let (i, first) = r.pair_of(c, d);
            let (a, b) = r.pair(i, d);
            *p = if first { b } else { a };
        }
    }
    // Stages left after the first three, in sweeps of up to three.
    let later = d.trailing_zeros().saturating_sub(3);
    for o0 in (0..g).step_by(RUN) {
        if let Some((r, table)) = rope {
            // Offsets o0..o0 + 16 are 16 rows of `d` floats (cosine, sine per pair); each 8 columns of 8
            // of them, transposed, are 8 column vectors of a half run, put at the channels of their pair.
            // The portable loops form a pair `(a, b)` as `qa c - qb s` and `qa s + qb c` with `s` the
            // negated table sine; `x - y` is `x + (-y)` exactly and the sum commutes, so channel `a` is
            // `qa c + qb (-s)` and `b` is `qb c + qa s`: `sin[a]` is the table's sine, `sin[b]` its negation.
            let rows = &table[o0 * d..][..RUN * d];
            for (h, half) in rows.chunks_exact(8 * d).enumerate() {
                for c0 in (0..d).step_by(8) {
                    let t = transpose8(core::array::from_fn(|l| ld(&half[l * d + c0..])));
                    for (j, pv) in t.chunks_exact(2).enumerate() {
                        let (a, b) = r.pair((c0 + 2 * j) / 2, d);
                        let minus = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(pv[1]), neg));
                        cos[h][a].write(pv[0]);
                        cos[h][b].write(pv[0]);
                        sin[h][a].write(pv[1]);
                        sin[h][b].write(minus);
                    }
                }
            }
        }
        for qi in 0..nq {
            let q = &queries.row(qi)[..d];
            let x = &mut oq[oq_at(qi, 0, o0, nq, d, g)..][..d * RUN];
            for h in 0..2 {
                // Channel `c`'s half `h` is the 8 floats at `xh + c * 16`.
                let xh = x[8 * h..].as_mut_ptr();
                for blk in (0..d).step_by(8) {
                    let mut v = [_mm256_setzero_ps(); 8];
                    for (j, v) in v.iter_mut().enumerate() {
                        let c = blk + j;
                        let qc = _mm256_set1_ps(q[c]);
                        *v = match rope {
                            Some(_) => {
                                // SAFETY: with RoPE, this run's loop above wrote both channels of every
                                // pair `i < d / 2` for both halves, and the pairs cover channels `0..d`.
                                let (cv, sv) = unsafe { (cos[h][c].assume_init(), sin[h][c].assume_init()) };
                                _mm256_add_ps(
                                    _mm256_mul_ps(qc, cv),
                                    _mm256_mul_ps(_mm256_set1_ps(q[partner[c]]), sv),
                                )
                            }
                            None => qc,
                        };
                    }
                    if rotate {
                        butterflies(&mut v);
                    }
                    for (j, v) in v.iter().enumerate() {
                        // SAFETY: channel blk + j < d of the run's `d * 16` floats at `x`, half `h` of it
                        // (8 floats from `xh + (blk + j) * 16`); unaligned stores.
                        unsafe { _mm256_storeu_ps(xh.add((blk + j) * RUN), *v) };
                    }
                }
                if rotate {
                    let (mut hh, mut left) = (8, later);
                    while left > 0 {
                        let k = left.min(3);
                        left -= k;
                        let last = left == 0;
                        // SAFETY: `d` is a power of two (asserted above) and `hh << k <= d`, so the sweep
                        // touches channels below `d`, each 8 floats from `xh + c * 16`, inside `x`.
                        unsafe {
                            match k {
                                1 => sweep::<2>(xh, d, hh, last.then_some(norm)),
                                2 => sweep::<4>(xh, d, hh, last.then_some(norm)),
                                _ => sweep::<8>(xh, d, hh, last.then_some(norm)),
                            }
                        }
                        hh <<= k;
                    }
                    if later == 0 {
                        // `d = 8`: the block's stages were all; the scaling is left.
                        // SAFETY: as for the stores above.
                        unsafe { sweep::<1>(xh, d, 1, Some(norm)) };
                    }
                }
            }
        }
    }
    bias[..nq * g].fill(0.0);
}

/// The Hadamard stages `1, 2, .., N / 2` (in vector positions) on `v`: `(v_j, v_{j+s}) <- (v_j + v_{j+s},
/// v_j - v_{j+s})`, the portable butterflies' order of operands.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn butterflies<const N: usize>(v: &mut [__m256; N]) {
    let mut s = 1;
    while s < N {
        for blk in (0..N).step_by(2 * s) {
            for j in blk..blk + s {
                let (a, b) = (v[j], v[j + s]);
                (v[j], v[j + s]) = (_mm256_add_ps(a, b), _mm256_sub_ps(a, b));
            }
        }
        s *= 2;
    }
}

/// The Hadamard stages `hh, 2 hh, .., N hh / 2` of a half run's `d` channel vectors (8 floats at `x + c *
/// 16` for channel `c`), `N` channels `hh` apart at a time, scaled by `norm` where given (the last sweep).
///
/// # Safety
/// The 8 floats at `x + c * 16` are writable for every `c < d`, and `N * hh` divides `d`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sweep<const N: usize>(x: *mut f32, d: usize, hh: usize, norm: Option<__m256>) {
    for blk in (0..d).step_by(N * hh) {
        for r in blk..blk + hh {
            // SAFETY: channels r + j hh < blk + N hh <= d (the caller's contract); unaligned accesses.
            let mut v: [__m256; N] =
                core::array::from_fn(|j| unsafe { _mm256_loadu_ps(x.add((r + j * hh) * 16)) });
            butterflies(&mut v);
            for (j, v) in v.iter().enumerate() {
                let v = match norm {
                    Some(n) => _mm256_mul_ps(*v, n),
                    None => *v,
                };
                // SAFETY: as above.
                unsafe { _mm256_storeu_ps(x.add((r + j * hh) * 16), v) };
            }
        }
    }
}

/// The transpose of 8 rows of 8 floats: lane `j` of vector `i` is lane `i` of row `j` (unpacking pairs,
/// then quads, then swapping 128-bit halves).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t: [__m256; 8] = core::array::from_fn(|i| {
        let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
        if i % 2 == 0 { _mm256_unpacklo_ps(a, b) } else { _mm256_unpackhi_ps(a, b) }
    });
    // t[0] = r0_0 r1_0 r0_1 r1_1 | r0_4 r1_4 r0_5 r1_5; t[1] the lanes 2, 3 | 6, 7; t[2], t[3] rows 2 and 3.
    let u: [__m256; 8] = core::array::from_fn(|i| {
        let (blk, k) = (i / 4, i % 4);
        let (a, b) = (t[4 * blk + k / 2], t[4 * blk + 2 + k / 2]);
        if k % 2 == 0 {
            _mm256_shuffle_ps::<0b01_00_01_00>(a, b)
        } else {
            _mm256_shuffle_ps::<0b11_10_11_10>(a, b)
        }
    });
    // u[k] (k < 4) = rows 0-3 at lanes k | k + 4; u[4 + k] the same for rows 4-7.
    core::array::from_fn(|i| {
        let (a, b) = (u[i % 4], u[4 + i % 4]);
        if i < 4 { _mm256_permute2f128_ps::<0x20>(a, b) } else { _mm256_permute2f128_ps::<0x31>(a, b) }
    })
}

/// Per-token value rows of the generic path (see `generic::token_value_sums_in`) in one pass:
/// `acc[qi * d + c] += sum_t p[qi][t] * table_{t, c / group}[code(t, c)]` over the tokens of `codes`
/// (row `t` at word `t * row_words`, `bits` per code), each token's `d / group` tables in turn in `tables`
/// (entry `k` the reconstruction of code `k % levels`, see [`lookup8`]).
///
/// Blocks of 16 channels by up to 4 queries keep 8 accumulators in registers while the tile's rows stream
/// past; a run of 16 codes is unpacked by a broadcast and per-lane shifts and looked up with `vpermps`.
pub(crate) struct ValueRun<'a> {
    pub(crate) codes: &'a [u32],
    pub(crate) row_words: usize,
    pub(crate) tables: &'a [[f32; 16]],
    pub(crate) group: usize,
    pub(crate) p: &'a Probs<'a>,
}

impl ValueRun<'_> {
    /// Adds the tile's sums into `acc` (`[nq][d]`) for codes of `bits` bits (1 to 4; ternary is 2).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn sums(&self, bits: u32, d: usize, acc: &mut [f32]) {
        let nq = acc.len() / d;
        let mut qb = 0;
        while qb < nq {
            let m = (nq - qb).min(4);
            match bits {
                1 => self.block_any::<1>(d, acc, qb, m),
                2 => self.block_any::<2>(d, acc, qb, m),
                3 => self.block_any::<3>(d, acc, qb, m),
                _ => self.block_any::<4>(d, acc, qb, m),
            }
            qb += m;
        }
    }

    /// The tile's rows reconstructed into `rows` (`[t][d]`), for codes of `bits` bits.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn rows(&self, bits: u32, d: usize, rows: &mut [f32]) {
        match bits {
            1 => self.rows_b::<1>(d, rows),
            2 => self.rows_b::<2>(d, rows),
            3 => self.rows_b::<3>(d, rows),
            _ => self.rows_b::<4>(d, rows),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn rows_b<const B: i32>(&self, d: usize, rows: &mut [f32]) {
        let bytes: &[u8] = bytemuck::cast_slice(self.codes);
        let b = B as usize;
        let groups = d / self.group;
        for (t, row) in rows.chunks_exact_mut(d).enumerate() {
            for c0 in (0..d).step_by(16) {
                let at = t * self.row_words * 4 + c0 * b / 8;
                let x = read16::<B>(bytes, at);
                let table = &self.tables[t * groups + c0 / self.group];
                let lo = ld(&table[..8]);
                let hi = if B < 4 { lo } else { ld(&table[8..]) };
                st(&mut row[c0..], lookup8::<B>(lo, hi, codes8::<B>(x as u32)));
                st(&mut row[c0 + 8..], lookup8::<B>(lo, hi, codes8::<B>((x >> (8 * b)) as u32)));
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_any<const B: i32>(&self, d: usize, acc: &mut [f32], qb: usize, m: usize) {
        match m {
            1 => self.block::<B, 1>(d, acc, qb),
            2 => self.block::<B, 2>(d, acc, qb),
            3 => self.block::<B, 3>(d, acc, qb),
            _ => self.block::<B, 4>(d, acc, qb),
        }
    }

    /// Queries `qb..qb + M` for `B`-bit codes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block<const B: i32, const M: usize>(&self, d: usize, acc: &mut [f32], qb: usize) {
        let bytes: &[u8] = bytemuck::cast_slice(self.codes);
        let b = B as usize;
        let groups = d / self.group;
        let nt = self.tables.len() / groups;
        let p = self.p;
        for c0 in (0..d).step_by(16) {
            let gj = c0 / self.group;
            let mut a: [[__m256; 2]; M] = core::array::from_fn(|m| ldn::<2>(&acc[(qb + m) * d + c0..][..16]));
            for t in 0..nt {
                let at = t * self.row_words * 4 + c0 * b / 8;
                let x = read16::<B>(bytes, at);
                let table = &self.tables[t * groups + gj];
                let lo = ld(&table[..8]);
                let hi = if B < 4 { lo } else { ld(&table[8..]) };
                let v = [
                    lookup8::<B>(lo, hi, codes8::<B>(x as u32)),
                    lookup8::<B>(lo, hi, codes8::<B>((x >> (8 * b)) as u32)),
                ];
                for (m, am) in a.iter_mut().enumerate() {
                    let w = _mm256_set1_ps(p.at(qb + m, t));
                    am[0] = _mm256_fmadd_ps(w, v[0], am[0]);
                    am[1] = _mm256_fmadd_ps(w, v[1], am[1]);
                }
            }
            for (m, am) in a.iter().enumerate() {
                stn(&mut acc[(qb + m) * d + c0..][..16], *am);
            }
        }
    }
}

/// [`fill_table`] for `tables.len()` channels (a multiple of 8) from their f16 or FP8 scales and zero
/// points: 8 channels' parameters converted at once (F16C, or [`fp8_ps`], both exact) and broadcast a lane
/// at a time, each table formed as [`fill_table`] forms it (the same bits). Only the first 8 entries where
/// not `full` (codes of up to 3 bits read no others). One conversion per channel and parameter, each
/// waiting on the last through the register it merged into, was a fifth of `kvq2`'s step on Zen 3.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn fill_tables(
    tables: &mut [[f32; 16]],
    levels: &[[f32; 16]],
    params: TableParams<'_>,
    full: bool,
) {
    let d = tables.len();
    assert!(d.is_multiple_of(8) && levels.len() >= d && params.len() >= d);
    for c0 in (0..d).step_by(8) {
        let (s, z) = match params {
            TableParams::F16(scale, zero) => (ld_ph(&scale[c0..]), ld_ph(&zero[c0..])),
            TableParams::Fp8(scale, zero) => {
                let (sr, zr) = (&scale[c0..][..8], &zero[c0..][..8]);
                // SAFETY: `sr` and `zr` hold 8 bytes each; unaligned 8-byte reads.
                unsafe {
                    (fp8_ps(_mm_loadl_epi64(sr.as_ptr().cast())), fp8_ps(_mm_loadl_epi64(zr.as_ptr().cast())))
                }
            }
        };
        for (k, (t, lv)) in tables[c0..c0 + 8].iter_mut().zip(&levels[c0..c0 + 8]).enumerate() {
            lane_table(t, s, z, k, ld(&lv[..8]), full.then(|| ld(&lv[8..])));
        }
    }
}

/// `t = zero + scale * levels` (a product and then a sum, each rounded, as [`fill_table`] forms it) with
/// the scale and zero point lane `k` of `s` and `z`, for the table's first 8 levels `lo` and, where given,
/// its last 8 `hi`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn lane_table(t: &mut [f32; 16], s: __m256, z: __m256, k: usize, lo: __m256, hi: Option<__m256>) {
    let i = _mm256_set1_epi32(k as i32);
    let (sk, zk) = (_mm256_permutevar8x32_ps(s, i), _mm256_permutevar8x32_ps(z, i));
    st(&mut t[..8], _mm256_add_ps(zk, _mm256_mul_ps(sk, lo)));
    if let Some(hi) = hi {
        st(&mut t[8..], _mm256_add_ps(zk, _mm256_mul_ps(sk, hi)));
    }
}

/// The per-token tables of [`ValueRun`] for `nt` tokens (`tables[t * groups + gj]`, `gj < groups`):
/// `zero + scale * levels` from token `t`'s f16 parameters of group `gj`, `scale[gj * ring + t]` and
/// `zero[gj * ring + t]`, formed as [`fill_table`] forms them (the same bits), 8 tokens' parameters
/// converted at once. A conversion per token and parameter, each merging into the register the last
/// left, was a tenth of KVQuant's step on Zen 3.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn fill_token_tables(
    tables: &mut [[f32; 16]],
    levels: &[f32; 16],
    scale: &[u16],
    zero: &[u16],
    ring: usize,
    groups: usize,
    nt: usize,
) {
    assert!(tables.len() >= nt * groups, "token tables shorter than the tile");
    let (lo, hi) = (ld(&levels[..8]), ld(&levels[8..]));
    for gj in 0..groups {
        let (sr, zr) = (&scale[gj * ring..][..nt], &zero[gj * ring..][..nt]);
        for t0 in (0..nt).step_by(8) {
            let k = (nt - t0).min(8);
            let (s, z) = (ld_ph_padded(&sr[t0..t0 + k]), ld_ph_padded(&zr[t0..t0 + k]));
            for i in 0..k {
                lane_table(&mut tables[(t0 + i) * groups + gj], s, z, i, lo, Some(hi));
            }
        }
    }
}

/// Up to 8 f16 values to f32 ([`ld_ph`]), fewer padded with zeros.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn ld_ph_padded(x: &[u16]) -> __m256 {
    if x.len() >= 8 {
        return ld_ph(x);
    }
    let mut b = [0u16; 8];
    b[..x.len()].copy_from_slice(x);
    ld_ph(&b)
}

/// The scales and zero points [`fill_tables`] reads, channel by channel.
#[derive(Clone, Copy)]
pub(crate) enum TableParams<'a> {
    /// f16 bits.
    F16(&'a [u16], &'a [u16]),
    /// FP8 (E4M3) bytes.
    Fp8(&'a [u8], &'a [u8]),
}

impl TableParams<'_> {
    /// Channels held (the shorter of the two).
    fn len(&self) -> usize {
        match self {
            Self::F16(s, z) => s.len().min(z.len()),
            Self::Fp8(s, z) => s.len().min(z.len()),
        }
    }
}

/// A group's lookup table (see [`lookup8`]): entry `k` is `zero + scale * levels[k]`, a product and then a
/// sum, each rounded, as the portable paths form a reconstruction.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn fill_table(table: &mut [f32; 16], levels: &[f32; 16], scale: f32, zero: f32) {
    let (s, z) = (_mm256_set1_ps(scale), _mm256_set1_ps(zero));
    st(&mut table[..8], _mm256_add_ps(z, _mm256_mul_ps(s, ld(&levels[..8]))));
    st(&mut table[8..], _mm256_add_ps(z, _mm256_mul_ps(s, ld(&levels[8..]))));
}

/// Zero points shifted by a codebook's lowest level ([`super::Q8Levels`]): `zero[i]` becomes
/// `f16(zero[i] + scale[i] * base)` (one fused multiply-add in f32, then rounded to the nearest f16; F16C),
/// 8 at a time, a last partial 8 through a padded copy. `scale` and `zero` are f16 bits of equal length.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn shift_zeros(scale: &[u16], zero: &mut [u16], base: f32) {
    let b = _mm256_set1_ps(base);
    let shift = |s: &[u16], z: &mut [u16]| {
        // SAFETY: `s` and `z` hold 8 u16 each (16 bytes); unaligned accesses.
        unsafe {
            let sv = _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast()));
            let zv = _mm256_cvtph_ps(_mm_loadu_si128(z.as_ptr().cast()));
            let r = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_fmadd_ps(sv, b, zv));
            _mm_storeu_si128(z.as_mut_ptr().cast(), r);
        }
    };
    let n = scale.len().min(zero.len());
    let whole = n - n % 8;
    for (s, z) in scale[..whole].chunks_exact(8).zip(zero[..whole].chunks_exact_mut(8)) {
        shift(s, z);
    }
    if whole < n {
        let (mut s, mut z) = ([0u16; 8], [0u16; 8]);
        s[..n - whole].copy_from_slice(&scale[whole..n]);
        z[..n - whole].copy_from_slice(&zero[whole..n]);
        shift(&s, &mut z);
        zero[whole..n].copy_from_slice(&z[..n - whole]);
    }
}

/// An f16 (its bits) as f32, with F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// Scores of the `g` tokens of a dequantized key group against every query: `cols` holds the keys channel
/// by channel (`[d][g]`, `g % 16 == 0`), and query `qi`'s scores go to columns `at..at + g` of `out`.
/// Blocks of 16 tokens by up to 6 queries keep 12 accumulators in registers; each channel's 16 keys are
/// loaded once per block and every query's element is broadcast against them.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn scores_rows_f32(cols: &[f32], g: usize, q: &Queries<'_>, out: &mut Scores<'_>, at: usize) {
    let mut qb = 0;
    while qb < q.nq {
        let m = (q.nq - qb).min(6);
        match m {
            1 => rows_block::<1>(cols, g, q, out, at, qb),
            2 => rows_block::<2>(cols, g, q, out, at, qb),
            3 => rows_block::<3>(cols, g, q, out, at, qb),
            4 => rows_block::<4>(cols, g, q, out, at, qb),
            5 => rows_block::<5>(cols, g, q, out, at, qb),
            _ => rows_block::<6>(cols, g, q, out, at, qb),
        }
        qb += m;
    }
}

/// [`scores_rows_f32`] for queries `qb..qb + M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn rows_block<const M: usize>(
    cols: &[f32],
    g: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    at: usize,
    qb: usize,
) {
    let d = q.d;
    let qs = &q.q[qb * d..][..M * d];
    for t0 in (0..g).step_by(16) {
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        for c in 0..d {
            let x = ldn::<2>(&cols[c * g + t0..][..16]);
            for (m, a) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_ps(qs[m * d + c]);
                a[0] = _mm256_fmadd_ps(b, x[0], a[0]);
                a[1] = _mm256_fmadd_ps(b, x[1], a[1]);
            }
        }
        store_scores(&acc, out, qb, at + t0);
    }
}

/// `acc[qi * d + c] += sum_t p[qi][t] * rows[t * d + c]` over the `rows.len() / d` f32 rows (`d % 16 ==
/// 0`): blocks of 16 channels by up to 6 queries keep 12 accumulators in registers while the rows stream
/// past.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn sums_rows_f32(rows: &[f32], p: &Probs<'_>, d: usize, acc: &mut [f32]) {
    let nq = acc.len() / d;
    let mut qb = 0;
    while qb < nq {
        let m = (nq - qb).min(6);
        match m {
            1 => sums_block::<1>(rows, p, d, acc, qb),
            2 => sums_block::<2>(rows, p, d, acc, qb),
            3 => sums_block::<3>(rows, p, d, acc, qb),
            4 => sums_block::<4>(rows, p, d, acc, qb),
            5 => sums_block::<5>(rows, p, d, acc, qb),
            _ => sums_block::<6>(rows, p, d, acc, qb),
        }
        qb += m;
    }
}

/// [`sums_rows_f32`] for queries `qb..qb + M`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn sums_block<const M: usize>(rows: &[f32], p: &Probs<'_>, d: usize, acc: &mut [f32], qb: usize) {
    for c0 in (0..d).step_by(16) {
        let mut a: [[__m256; 2]; M] = core::array::from_fn(|m| ldn::<2>(&acc[(qb + m) * d + c0..][..16]));
        for (t, row) in rows.chunks_exact(d).enumerate() {
            let x = ldn::<2>(&row[c0..][..16]);
            for (m, am) in a.iter_mut().enumerate() {
                let w = _mm256_set1_ps(p.at(qb + m, t));
                am[0] = _mm256_fmadd_ps(w, x[0], am[0]);
                am[1] = _mm256_fmadd_ps(w, x[1], am[1]);
            }
        }
        for (m, am) in a.iter().enumerate() {
            stn(&mut acc[(qb + m) * d + c0..][..16], *am);
        }
    }
}

/// Per-token rows of the generic path (see `generic::token_key_scores_lookup` and
/// `generic::token_value_sums_rows`), and for keys a block of queries in the stored basis and order: a
/// row's codes at its word offset of `codes`, `bits` each; `levels` the coder's levels repeated for the
/// lookups ([`lookup8`]); channel `i` in group `lane_group[i]` (at most 8 groups, permuted ones of any
/// sizes); `queries` `[m][d]` with their `bias` (empty for values).
pub(crate) struct TokenRows<'a> {
    pub(crate) codes: &'a [u32],
    pub(crate) row_words: usize,
    pub(crate) levels: &'a [f32; 16],
    pub(crate) lane_group: &'a [u32],
    pub(crate) queries: &'a [f32],
    pub(crate) bias: &'a [f32],
}

impl TokenRows<'_> {
    /// The row at word `word` reconstructed into `row` (`d` floats): each lane `zero[g] + scale[g] *
    /// level(code)` with `g` its group, a product and then a sum as the portable path forms it.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn row(&self, bits: u32, word: usize, zero: &[f32; 8], scale: &[f32; 8], row: &mut [f32]) {
        match bits {
            1 => self.row_b::<1>(word, zero, scale, row),
            2 => self.row_b::<2>(word, zero, scale, row),
            3 => self.row_b::<3>(word, zero, scale, row),
            _ => self.row_b::<4>(word, zero, scale, row),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn row_b<const B: i32>(&self, word: usize, zero: &[f32; 8], scale: &[f32; 8], row: &mut [f32]) {
        let bytes: &[u8] = bytemuck::cast_slice(&self.codes[word..][..self.row_words]);
        let b = B as usize;
        let (z, s) = (ld(zero), ld(scale));
        let (lo, hi) = (ld(&self.levels[..8]), ld(&self.levels[8..]));
        for c0 in (0..row.len()).step_by(16) {
            let x = read16::<B>(bytes, c0 * b / 8);
            for (k, w) in [x as u32, (x >> (8 * b)) as u32].into_iter().enumerate() {
                let at = c0 + 8 * k;
                let level = lookup8::<B>(lo, hi, codes8::<B>(w));
                // SAFETY: `lane_group[at..at + 8]` is 8 u32 (sliced, so bounds-checked); unaligned load.
                let g = unsafe { _mm256_loadu_si256(self.lane_group[at..at + 8].as_ptr().cast()) };
                let v = _mm256_add_ps(
                    _mm256_permutevar8x32_ps(z, g),
                    _mm256_mul_ps(_mm256_permutevar8x32_ps(s, g), level),
                );
                st(&mut row[at..], v);
            }
        }
    }

    /// `put(j, bias[j] + queries[j] . row)` for every query of the block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn dots(&self, row: &[f32], mut put: impl FnMut(usize, f32)) {
        let d = row.len();
        for (j, (qr, &b)) in self.queries.chunks_exact(d).zip(self.bias).enumerate() {
            let mut acc = [_mm256_setzero_ps(); 2];
            for c0 in (0..d).step_by(16) {
                let (x, w) = (ldn::<2>(&row[c0..][..16]), ldn::<2>(&qr[c0..][..16]));
                acc[0] = _mm256_fmadd_ps(w[0], x[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(w[1], x[1], acc[1]);
            }
            put(j, b + hsum(_mm256_add_ps(acc[0], acc[1])));
        }
    }
}

/// The AVX2 kernel of [`super::generic::token_key_scores_q8`] (SKVQ's keys on the int8 path), equal bit for
/// bit to its portable twin [`super::generic::TokenQueriesQ8::scores`]: scores of `blocks` blocks of
/// [`super::generic::Q8_TOKEN_BLOCK`] (16) rows of 2-bit codes at `codes` (`row_words` apart) for the
/// queries of `kq`, written at `out`'s rows `q0..` and columns `0..16 * blocks`.
///
/// Tokens go across lanes, a token per dword in two halves of 8. For every 16 bytes of the 8 rows of a
/// half, two rounds of byte and word unpacking transpose them (a vector per 4 byte positions, the 4 rows of
/// each lane in a dword), the four 2-bit planes are split off, and two more rounds give a vector per quad
/// (4 channels) whose dword `t` holds row `t`'s four codes, a byte each ([`chunk_quads`]). Per query and
/// quad, `vpmaddubsw` with the query's four bytes broadcast adds pairs into 16 bits (at most
/// `2 * 3 * 127 = 762` a quad, so 32 quads stay under `i16::MAX`), and every 32 quads `vpmaddwd` by ones
/// widens them into the group's exact 32-bit sums. A quad two groups share counts in each, the other
/// group's query bytes zero. FP8 parameters are decoded by [`fp8_ps`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn token_keys_q8(
    kq: &super::generic::TokenQueriesQ8<'_>,
    codes: &[u32],
    row_words: usize,
    blocks: usize,
    params: super::generic::BlockParams<'_>,
    out: &mut Scores<'_>,
    q0: usize,
) {
    assert!(kq.fits(codes, row_words, blocks, &params, out, q0, 0), "key blocks shorter than their layout");
    let mut quads = [[_mm256_setzero_si256(); 16]; 2];
    for b in 0..blocks {
        let (codes, params) = (&codes[b * 16 * row_words..], params.advanced(b * 16));
        let q = &mut quads;
        // SAFETY: block b of the blocks checked above.
        unsafe {
            match kq.bias.len() {
                1 => keys_q8_m::<1>(kq, codes, row_words, params, out, q0, 16 * b, q),
                2 => keys_q8_m::<2>(kq, codes, row_words, params, out, q0, 16 * b, q),
                3 => keys_q8_m::<3>(kq, codes, row_words, params, out, q0, 16 * b, q),
                _ => keys_q8_m::<4>(kq, codes, row_words, params, out, q0, 16 * b, q),
            }
        }
    }
}

/// One block of [`token_keys_q8`] for `M` queries, at column `t0`; `quads` the scratch of [`chunk_quads`].
///
/// # Safety
/// The block's layout fits (`TokenQueriesQ8::fits` for this block holds; [`token_keys_q8`] checks it for
/// every block, once a call): the parameters are read through pointers.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn keys_q8_m<const M: usize>(
    kq: &super::generic::TokenQueriesQ8<'_>,
    codes: &[u32],
    row_words: usize,
    params: super::generic::BlockParams<'_>,
    out: &mut Scores<'_>,
    q0: usize,
    t0: usize,
    quads: &mut [[__m256i; 16]; 2],
) {
    use super::generic::BlockParams;
    const T: usize = super::generic::Q8_TOKEN_BLOCK;
    let groups = kq.groups;
    let row_bytes = row_words * 4;
    let (_, ring) = params.extent();
    debug_assert_eq!(kq.bias.len(), M);
    let bytes: &[u8] = bytemuck::cast_slice(&codes[..T * row_words]);
    // The quads of the 16 bytes a row at `16 * chunk`, made when a group's span first reaches them (spans
    // go up with the groups, so each chunk is made once).
    let mut chunk = usize::MAX;
    let ones = _mm256_set1_epi16(1);
    let mut score: [[__m256; 2]; M] = core::array::from_fn(|m| [_mm256_set1_ps(kq.bias[m]); 2]);
    for g in 0..groups {
        let (a, b) = kq.span[g];
        let mut acc = [[_mm256_setzero_si256(); 2]; M];
        for c0 in (a..b).step_by(32) {
            let mut w16 = [[_mm256_setzero_si256(); 2]; M];
            for c in c0..b.min(c0 + 32) {
                if c / 16 != chunk {
                    chunk = c / 16;
                    chunk_quads(bytes, row_bytes, chunk, quads);
                }
                let v = [quads[0][c % 16], quads[1][c % 16]];
                for (m, wm) in w16.iter_mut().enumerate() {
                    let q = &kq.q8[m * kq.stride + kq.at[g] + 4 * (c - a)..][..4];
                    let w = _mm256_set1_epi32(i32::from_le_bytes([
                        q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8,
                    ]));
                    wm[0] = _mm256_add_epi16(wm[0], _mm256_maddubs_epi16(v[0], w));
                    wm[1] = _mm256_add_epi16(wm[1], _mm256_maddubs_epi16(v[1], w));
                }
            }
            for (am, wm) in acc.iter_mut().zip(&w16) {
                am[0] = _mm256_add_epi32(am[0], _mm256_madd_epi16(wm[0], ones));
                am[1] = _mm256_add_epi32(am[1], _mm256_madd_epi16(wm[1], ones));
            }
        }
        // SAFETY: the group's 16 parameters from entry g ring lie in the slices (`token_keys_q8` checked
        // every block's); unaligned 16-byte (f16) or 8-byte (FP8) reads.
        let (s, z) = unsafe {
            match params {
                BlockParams::F16 { scale, zero, .. } => {
                    let (sp, zp) = (scale.as_ptr().add(g * ring), zero.as_ptr().add(g * ring));
                    (
                        [
                            _mm256_cvtph_ps(_mm_loadu_si128(sp.cast())),
                            _mm256_cvtph_ps(_mm_loadu_si128(sp.add(8).cast())),
                        ],
                        [
                            _mm256_cvtph_ps(_mm_loadu_si128(zp.cast())),
                            _mm256_cvtph_ps(_mm_loadu_si128(zp.add(8).cast())),
                        ],
                    )
                }
                BlockParams::Fp8 { scale, zero, .. } => {
                    let get = |p: *const u8| fp8_ps(_mm_loadl_epi64(p.cast()));
                    let (sp, zp) = (scale.as_ptr().add(g * ring), zero.as_ptr().add(g * ring));
                    ([get(sp), get(sp.add(8))], [get(zp), get(zp.add(8))])
                }
            }
        };
        for (m, sc) in score.iter_mut().enumerate() {
            let (dl, qs) =
                (_mm256_set1_ps(kq.delta[m * groups + g]), _mm256_set1_ps(kq.qsum[m * groups + g]));
            for h in 0..2 {
                let x = _mm256_mul_ps(_mm256_mul_ps(s[h], dl), _mm256_cvtepi32_ps(acc[m][h]));
                sc[h] = _mm256_add_ps(sc[h], x);
                sc[h] = _mm256_add_ps(sc[h], _mm256_mul_ps(z[h], qs));
            }
        }
    }
    for (m, sc) in score.iter().enumerate() {
        let at = (q0 + m) * out.stride + out.pos + t0;
        st(&mut out.data[at..][..8], sc[0]);
        st(&mut out.data[at + 8..][..8], sc[1]);
    }
}

/// [`token_keys_q8`]'s codes of quads `16 * chunk..16 * chunk + 16` of 16 rows (`row_bytes` apart in
/// `bytes`) into `quads`: entry `[h][c]` holds in dword `t` the four codes of quad `16 * chunk + c` of
/// row `8 h + t`, a byte each.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn chunk_quads(bytes: &[u8], row_bytes: usize, chunk: usize, quads: &mut [[__m256i; 16]; 2]) {
    assert!(
        16 * chunk + 16 <= row_bytes && bytes.len() >= 16 * row_bytes,
        "key block shorter than its layout"
    );
    let three = _mm256_set1_epi8(3);
    for (h, half) in quads.iter_mut().enumerate() {
        let pair = |r: usize| {
            let at = |r: usize| (8 * h + r) * row_bytes + 16 * chunk;
            // SAFETY: rows 8 h + r and + 4 (< 16) hold `row_bytes` bytes from `at(r)` - 16 chunk, and
            // 16 chunk + 16 <= row_bytes (checked above); unaligned reads.
            unsafe {
                let lo = _mm_loadu_si128(bytes.as_ptr().add(at(r)).cast());
                let hi = _mm_loadu_si128(bytes.as_ptr().add(at(r + 4)).cast());
                _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi)
            }
        };
        // Rows 0-3 in the low lane, 4-7 in the high one: bytes of two rows interleaved, then of four, so
        // that dword j of `bytes4[k]` holds byte 4 k + j of the lane's four rows.
        let (a, b, c, e) = (pair(0), pair(1), pair(2), pair(3));
        let (s0, s1) = (_mm256_unpacklo_epi8(a, b), _mm256_unpackhi_epi8(a, b));
        let (s2, s3) = (_mm256_unpacklo_epi8(c, e), _mm256_unpackhi_epi8(c, e));
        let bytes4 = [
            _mm256_unpacklo_epi16(s0, s2),
            _mm256_unpackhi_epi16(s0, s2),
            _mm256_unpacklo_epi16(s1, s3),
            _mm256_unpackhi_epi16(s1, s3),
        ];
        // Each byte's four codes as planes, interleaved back so that a dword holds one row's quad.
        for (k, &x) in bytes4.iter().enumerate() {
            let p0 = _mm256_and_si256(x, three);
            let p1 = _mm256_and_si256(_mm256_srli_epi16::<2>(x), three);
            let p2 = _mm256_and_si256(_mm256_srli_epi16::<4>(x), three);
            let p3 = _mm256_and_si256(_mm256_srli_epi16::<6>(x), three);
            let (l01, h01) = (_mm256_unpacklo_epi8(p0, p1), _mm256_unpackhi_epi8(p0, p1));
            let (l23, h23) = (_mm256_unpacklo_epi8(p2, p3), _mm256_unpackhi_epi8(p2, p3));
            half[4 * k] = _mm256_unpacklo_epi16(l01, l23);
            half[4 * k + 1] = _mm256_unpackhi_epi16(l01, l23);
            half[4 * k + 2] = _mm256_unpacklo_epi16(h01, h23);
            half[4 * k + 3] = _mm256_unpackhi_epi16(h01, h23);
        }
    }
}

/// The values of the 8 E4M3 bytes in the low half of `x`, as [`crate::quant::param::ParamFormat::decode`]
/// gives them (NaN for both NaN patterns), without a table: a byte's magnitude bits shifted into an
/// f32's exponent and mantissa fields (bias 127, so exponent field 0 is an f32 subnormal as it is an E4M3
/// one) and scaled by `2^(127 - 7)`, exact as a product by a power of two; then the sign. On Zen 3 the
/// gathers through the table were a quarter of SKVQ's AVX2 key kernel.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn fp8_ps(x: __m128i) -> __m256 {
    let x = _mm256_cvtepu8_epi32(x);
    let mag = _mm256_and_si256(x, _mm256_set1_epi32(0x7f));
    let v = _mm256_mul_ps(
        _mm256_castsi256_ps(_mm256_slli_epi32::<20>(mag)),
        _mm256_set1_ps(f32::from_bits(247 << 23)),
    );
    let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(x, _mm256_set1_epi32(0x80)));
    let v = _mm256_or_ps(v, _mm256_castsi256_ps(sign));
    let nan = _mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f));
    _mm256_blendv_ps(v, _mm256_set1_ps(f32::NAN), _mm256_castsi256_ps(nan))
}

/// FP8 (E4M3) bytes as f16 bits, equal to [`crate::quant::param::FP8_E4M3_F16`], 16 at a time in bytes;
/// a tail of fewer through the table. Every E4M3 value is an f16 value. For a magnitude `x & 0x7f` with
/// exponent field `e >= 1` the f16 bits are `(x << 7) + (8 << 10)` (the bias goes from 7 to 15): high
/// byte `(x >> 1) + 0x20`, low byte `(x & 1) << 7`; a subnormal (`e = 0`, `m = x & 7`) is `m * 2^-9`, an
/// f16 with a low byte of zero and a high byte that `vpshufb` looks up by `m`; the sign goes in the high
/// byte, and the NaN magnitude `0x7f` gives the table's unsigned `0x7e00`. The table read a byte at a time
/// was 4% of `skvq2`'s decode step on Zen 3 (the value path stages FP8 parameters as f16).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn fp8_to_f16(src: &[u8], dst: &mut [u16]) {
    let t = &crate::quant::param::FP8_E4M3_F16;
    let n = src.len();
    let dst = &mut dst[..n];
    let whole = n - n % 16;
    // High bytes of the f16 bits of m * 2^-9 for m < 8 (exponents 6, 7, 7, 8, ...; low bytes are 0).
    let sub_hi = _mm_setr_epi8(0, 0x18, 0x1c, 0x1e, 0x20, 0x21, 0x22, 0x23, 0, 0, 0, 0, 0, 0, 0, 0);
    let (low7, top, one) = (_mm_set1_epi8(0x7f), _mm_set1_epi8(-128), _mm_set1_epi8(1));
    for i in (0..whole).step_by(16) {
        // SAFETY: i + 16 <= n = src.len() = dst.len(); unaligned 16-byte read and two 16-byte writes.
        unsafe {
            let x = _mm_loadu_si128(src.as_ptr().add(i).cast());
            let mag = _mm_and_si128(x, low7);
            let normal_hi = _mm_add_epi8(
                _mm_and_si128(_mm_srli_epi16::<1>(mag), _mm_set1_epi8(0x3f)),
                _mm_set1_epi8(0x20),
            );
            let normal_lo = _mm_slli_epi16::<7>(_mm_and_si128(mag, one));
            let sub = _mm_cmpeq_epi8(_mm_and_si128(mag, _mm_set1_epi8(0x78)), _mm_setzero_si128());
            let nan = _mm_cmpeq_epi8(mag, low7);
            let hi = _mm_blendv_epi8(normal_hi, _mm_shuffle_epi8(sub_hi, mag), sub);
            let hi = _mm_or_si128(hi, _mm_and_si128(x, top));
            let hi = _mm_blendv_epi8(hi, _mm_set1_epi8(0x7e), nan);
            let lo = _mm_andnot_si128(_mm_or_si128(sub, nan), normal_lo);
            _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), _mm_unpacklo_epi8(lo, hi));
            _mm_storeu_si128(dst.as_mut_ptr().add(i + 8).cast(), _mm_unpackhi_epi8(lo, hi));
        }
    }
    for (d, &x) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = t[usize::from(x)];
    }
}

/// 32 sums of [`values_q8_token`] from the order of [`v8_channel`] back into channel order:
/// `dst[v8_channel(r)] = src[r]` for `r < 32`. Within 32, `r = 8 (2 h + l) + m` goes to `4 m + 2 l + h`: a
/// transpose of four vectors of 8 (taken in the order `2 l + h`) into 8 runs of 4, by unpacks, shuffles and
/// lane swaps. The scalar loop it replaces was a fifth of the kernel where it runs a tile at a time (SKVQ's
/// grouped values, Zen 3).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpermute32(src: &[f32], dst: &mut [f32]) {
    let a = [ld(&src[..8]), ld(&src[16..24]), ld(&src[8..16]), ld(&src[24..32])];
    let (t0, t1) = (_mm256_unpacklo_ps(a[0], a[1]), _mm256_unpackhi_ps(a[0], a[1]));
    let (t2, t3) = (_mm256_unpacklo_ps(a[2], a[3]), _mm256_unpackhi_ps(a[2], a[3]));
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
    st(&mut dst[..8], _mm256_permute2f128_ps::<0x20>(u0, u1));
    st(&mut dst[8..16], _mm256_permute2f128_ps::<0x20>(u2, u3));
    st(&mut dst[16..24], _mm256_permute2f128_ps::<0x31>(u0, u1));
    st(&mut dst[24..32], _mm256_permute2f128_ps::<0x31>(u2, u3));
}

#[cfg(test)]
mod tests {
    /// [`super::unpermute32`] puts every entry where [`super::v8_channel`] says.
    #[test]
    fn unpermute32_is_v8_channel() {
        if super::super::Kernel::avx2().is_none() {
            std::println!("skipped: this CPU has no AVX2/FMA/F16C");
            return;
        }
        let src: [f32; 64] = core::array::from_fn(|r| r as f32);
        let mut dst = [0f32; 64];
        for (s, d) in src.chunks_exact(32).zip(dst.chunks_exact_mut(32)) {
            // SAFETY: the AVX2 kernel exists, so the CPU has the features.
            unsafe { super::unpermute32(s, d) };
        }
        for r in 0..64 {
            assert_eq!(dst[super::v8_channel(r)], r as f32, "entry {r}");
        }
    }
}
