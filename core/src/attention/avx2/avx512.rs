//! AVX-512 twins of some AVX2 kernels (the int8 path's key and value tiles, the generic lookups, the f32 value
//! tiles and KIVI's f32 keys), for CPUs with AVX-512 F, BW, VL, VNNI and VBMI.
//!
//! The key groups are folded and their scales batched exactly as in the parent module ([`fold_batch`],
//! [`KeyWork`]); only the rounding's layout and the multiply loop differ. The AVX2 loop multiplies a
//! channel pair of 32 tokens by a query pair with `vpmaddubsw` and adds the 16-bit sums (4 instructions per
//! 4 channels and 16 tokens and query, after unpacking 2 rows at a time). Here one `vpdpbusd` multiplies
//! four channels of 16 tokens by a query's four bytes and adds the dword sums in place, so a tile of 32
//! tokens costs two per four channels and query:
//!
//! - the query's rounded bytes are kept in channel order, four to a dword ([`round_quads`]), and one is
//!   broadcast per four channels;
//! - four channel rows of a tile (32 tokens, 64 bits each) are read into one 256-bit vector, and `vpermb`
//!   puts byte `b` of the four rows side by side in a dword, the same 4 dwords in each 128-bit lane (one
//!   permute for bytes 0-3, one for bytes 4-7); a shift of `2 k` bits in lane `k` and a mask leave in dword
//!   `b` of lane `k` the four channels' codes of token `4 b + k` ([`code_quads`]);
//! - the sums come out in that order (lane `4 k + b` holds token `4 b + k`), and one `vpermps` per 16 scores
//!   puts them back in token order after `delta * sum + bias`.
//!
//! The int8 path's value tiles take the same step along tokens: a tile's weights `p_t s_t` are rounded
//! as the AVX2 path rounds them, kept four tokens to a dword, and four token rows of 32 channels are
//! transposed by the same `vpermb` so that one `vpdpbusd` adds four tokens' products for 16 channels
//! ([`values_q8_token`]).
//!
//! 4-bit codes (`kivi4`) take the same int8 loops: four rows of 32 codes are 16 bytes each, one 128-bit
//! lane apiece, and `vpermb` puts the byte holding position `i` of each row in dword `i`, whose odd
//! positions a shift of 4 bits brings down ([`code_quads`]), so the sums come out in order and need no
//! permute. Value weights are rounded to 127 levels at every width ([`Q8_VALUE_MAX`]).
//!
//! 3-bit values (`kvq3`) too: a row's 32 codes are 12 bytes, loaded masked into a 128-bit lane apiece;
//! `vpermb` puts the two bytes that hold positions `2 k` and `2 k + 1` of each row side by side in qword
//! `k`, and `vpmultishiftqb` takes each code's bits from there into its byte, so the sums come out in
//! order as well ([`code_quads`]).
//!
//! The generic per-channel key path (`kvq2`, `kvq3`, KVQuant, MiKV: [`group_scores`]) takes 16 tokens a
//! vector: a channel's 16 codes are one broadcast and per-lane shift, and its reconstruction table of 16
//! entries fits one register, so a code's value is one `vpermps` (AVX2 needs two per 16 codes, and a
//! blend for 4-bit codes); the multiply-adds per channel, query and token are the AVX2 path's, in the same
//! order, so the scores are the same bits.
//!
//! The f32 value path (every per-token value body that is not on the int8 path: `kvq2`'s FP8-parameter
//! values, 3-, 4- and 8-bit values) takes 32 channels of a token a step, two vectors, against each query's
//! weight `p_t s_t` broadcast ([`value_tiles`]); each output lane sums its tokens in the AVX2 path's
//! order, so the outputs are the same bits.
//!
//! The generic per-token value path (codebook values: KVQuant) takes the same 16-lane lookups
//! ([`value_run_sums`]), its per-token tables filled 16 tokens at a time ([`fill_token_tables`]).
//!
//! The generic per-channel path's offset queries (RoPE by each offset of a key group, then the Hadamard
//! rotation: [`offset_queries`]) take a channel of 16 offsets a vector, RoPE and the first three Hadamard
//! stages in registers, the later stages four at a time.
//!
//! KIVI's f32 per-channel keys (`kivi4`, and `kivi2` under `--f32-attention`) take 16 tokens a vector and
//! two runs of 16 at a time ([`key_chunks`]): six chains of FMAs for three queries, each token's sum over
//! the channels in the AVX2 path's order.
//!
//! The integer sums are exact (the same bound as the AVX2 path's 16-bit sums, [`super::super::q8_key_max`],
//! keeps them far inside a dword), the rounding is the same instruction on the same floats, and the
//! scores are `delta * sum + bias` with the same two roundings, so every bit equals the AVX2 kernel's and
//! the portable twin's (`int8_kernels_equal_their_portable_twin_bit_for_bit`).
//!
//! `unsafe` here takes the parent's forms: pointer reads in the multiply loop whose whole range [`KeyTiles::check`]
//! checks once, and the loads of the permute indices.

use super::super::{ChannelBody, Probs, Q8_TILE, Q8_VALUE_MAX, Queries, Scores, TokenBody, portable};
use super::{
    GroupRun, KeyTiles, KeyWork, ValueRun, ValueWork, fold_batch, prefetch_next_block, q8_tile, read16,
    zero_lanes,
};
use crate::cache::layout::key_row;
use crate::pack::Width;
use core::arch::x86_64::*;

/// FP8 (E4M3) parameters to their f16 bits, 32 at a time (`dst[i]` = `FP8_E4M3_F16[src[i]]`, the same
/// bits): the exact table's first 128 entries (the magnitudes) are four vectors, two `vpermt2w` lookups and
/// a blend on bit 6 of the byte pick the magnitude's, and the sign bit moves to bit 15 (both formats are
/// sign and magnitude; the table's NaN has none). The table read a byte at a time was 6% of `mikv2`'s
/// decode samples at 1k tokens.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn fp8_to_f16(src: &[u8], dst: &mut [u16]) {
    let t = &crate::quant::param::FP8_E4M3_F16;
    let n = src.len();
    let dst = &mut dst[..n];
    // SAFETY: the table holds 256 u16, so entries 32 k..32 k + 32 for k < 4 lie in it; unaligned reads.
    let tv: [__m512i; 4] =
        core::array::from_fn(|k| unsafe { _mm512_loadu_si512(t[32 * k..].as_ptr().cast()) });
    let (low7, b6, b7) = (_mm512_set1_epi16(0x7f), _mm512_set1_epi16(0x40), _mm512_set1_epi16(0x80));
    let whole = n - n % 32;
    for i in (0..whole).step_by(32) {
        // SAFETY: i + 32 <= n = src.len() = dst.len(); unaligned accesses.
        unsafe {
            let x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(src.as_ptr().add(i).cast()));
            let mag = _mm512_and_si512(x, low7);
            // Index bits 0-5 choose among the pair's 64 entries.
            let lo = _mm512_permutex2var_epi16(tv[0], mag, tv[1]);
            let hi = _mm512_permutex2var_epi16(tv[2], mag, tv[3]);
            let v = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(mag, b6), lo, hi);
            let sign = _mm512_slli_epi16::<8>(_mm512_and_si512(x, b7));
            // The table's NaNs (magnitude 0x7f) are one positive NaN: no sign there.
            let sign = _mm512_maskz_mov_epi16(_mm512_cmpneq_epi16_mask(mag, low7), sign);
            _mm512_storeu_si512(dst.as_mut_ptr().add(i).cast(), _mm512_or_si512(v, sign));
        }
    }
    for (d, &x) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = t[usize::from(x)];
    }
}

/// `vpermb` indices of [`code_quads`] at 2 bits: byte `16 k + 4 b + j` of the result is byte `8 j + b + OFF`
/// of the four rows (row `j` is the `j`-th 64-bit lane of the source), for every 128-bit lane `k`.
const fn quad_index<const OFF: usize>() -> [u8; 64] {
    let mut idx = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let (b, j) = (i % 16 / 4, i % 4);
        idx[i] = (8 * j + b + OFF) as u8;
        i += 1;
    }
    idx
}

const QUAD_LO: [u8; 64] = quad_index::<0>();
const QUAD_HI: [u8; 64] = quad_index::<4>();

/// `vpermb` indices of [`code_quads`] at 4 bits: byte `4 i + j` of the result is byte `16 j + i / 2 + OFF` of
/// the four rows (row `j` is the `j`-th 128-bit lane of the source): the byte that holds code `i`
/// (`2 OFF + i`) of row `j`.
const fn nibble_index<const OFF: usize>() -> [u8; 64] {
    let mut idx = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        idx[i] = (16 * (i % 4) + i / 8 + OFF) as u8;
        i += 1;
    }
    idx
}

const NIBBLE_LO: [u8; 64] = nibble_index::<0>();
const NIBBLE_HI: [u8; 64] = nibble_index::<8>();

/// `vpermb` indices of [`code_quads`] at 3 bits, for positions `OFF..OFF + 16`: qword `k` of the result holds
/// positions `OFF + 2 k` and `OFF + 2 k + 1` of the four rows, and its bytes `2 j`, `2 j + 1` are bytes `b`,
/// `b + 1` of row `j` (the `j`-th 128-bit lane of the source), `b = 3 (OFF + 2 k) / 8`: the 16 bits that
/// hold both codes (a row's bytes past its 12 are loaded as zeros).
const fn triple_index<const OFF: usize>() -> [u8; 64] {
    let mut idx = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let (k, j, e) = (i / 8, i % 8 / 2, i % 2);
        idx[i] = (16 * j + 3 * (OFF + 2 * k) / 8 + e) as u8;
        i += 1;
    }
    idx
}

const TRIPLE_LO: [u8; 64] = triple_index::<0>();
const TRIPLE_HI: [u8; 64] = triple_index::<16>();

/// `vpmultishiftqb` offsets of [`code_quads`] at 3 bits: byte `4 h + j` of qword `k` (row `j`'s code at
/// position `2 k + h`, the same for positions 16 on, which start 6 bytes later) takes the bits from
/// `16 j + 3 (2 k) % 8 + 3 h` of [`triple_index`]'s qword.
const fn triple_shift() -> [u8; 64] {
    let mut sh = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let (k, h, j) = (i / 8, i % 8 / 4, i % 4);
        sh[i] = (16 * j + 3 * (2 * k) % 8 + 3 * h) as u8;
        i += 1;
    }
    sh
}

const TRIPLE_SHIFT: [u8; 64] = triple_shift();

/// Largest `head_dim` whose unpacked key tile (two 64-byte vectors per four channels, 4 KiB at 128) is
/// kept on the stack to share among blocks of queries (more than 4 queries: prefill); larger heads
/// unpack the tile once per block of 4.
const MAX_UNPACKED: usize = 128;

/// See [`super::scores_q8_channel`] (the same bits). 2- or 4-bit codes, `group % 32 == 0`, `d % 16 == 0`.
///
/// # Safety (of calling it)
/// The CPU has AVX2, FMA, F16C and AVX-512 F, BW, VL, VNNI and VBMI (a [`super::super::Kernel`] with
/// `avx512` set).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn scores_q8_channel(
    b: &ChannelBody<'_>,
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    work: &mut [f32],
) {
    let four = b.width == Width::B4;
    if q.nq > 4 && q.d <= MAX_UNPACKED {
        let mut unpacked = [_mm512_setzero_si512(); MAX_UNPACKED / 2];
        let u = &mut unpacked[..q.d / 2];
        if four {
            return channel_scores::<true, 4>(b, start, n, q, out, work, u);
        }
        return channel_scores::<true, 2>(b, start, n, q, out, work, u);
    }
    if four {
        return channel_scores::<false, 4>(b, start, n, q, out, work, &mut []);
    }
    channel_scores::<false, 2>(b, start, n, q, out, work, &mut []);
}

/// [`scores_q8_channel`]'s loops: the parent's batching (up to a key block of groups folded together),
/// then [`KeyTiles::run512`]. `S`: more than 4 queries share each tile's unpacking (`unpacked`, `d / 2`
/// vectors).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn channel_scores<const S: bool, const B: u32>(
    b: &ChannelBody<'_>,
    start: usize,
    n: usize,
    q: &Queries<'_>,
    out: &mut Scores<'_>,
    work: &mut [f32],
    unpacked: &mut [__m512i],
) {
    let (d, g, nq) = (q.d, b.group, q.nq);
    // The AVX2 path's split of `work`; the quads take half of its pairs' room.
    let (batch, KeyWork { qs, packed: quads, delta, bias, inv }) = KeyWork::split(b, q, work);
    let quads: &mut [u32] = bytemuck::cast_slice_mut(quads);
    for b0 in (start..start + n).step_by(batch * g) {
        let groups = (start + n - b0).min(batch * g) / g;
        fold_batch(b, q, b0, groups, qs, delta, inv, bias);
        round_quads(&qs[..groups * nq * d], &inv[..groups * nq], &mut quads[..groups * nq * d / 4]);
        let tiles = KeyTiles {
            b,
            d,
            b0,
            tiles: groups * g / 32,
            col: b0 - start,
            nq,
            packed: quads,
            delta: &*delta,
            bias: &*bias,
        };
        tiles.run512::<S, B>(out, unpacked);
    }
}

/// Each row of `d = x.len() / inv.len()` floats of `x` times its `inv`, rounded to integers as the AVX2
/// path rounds them (`vcvtps2dq`, to nearest even) and narrowed with signed saturation to bytes in
/// channel order, four to a `quads` dword: `d / 4` dwords per row, `d % 16 == 0`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn round_quads(x: &[f32], inv: &[f32], quads: &mut [u32]) {
    let n = x.len();
    assert!(!inv.is_empty() && n.is_multiple_of(16 * inv.len()) && quads.len() >= n / 4);
    let d = n / inv.len();
    let (xp, pp) = (x.as_ptr(), quads.as_mut_ptr());
    for (r, &iv) in inv.iter().enumerate() {
        let iv = _mm512_set1_ps(iv);
        for c in (r * d..(r + 1) * d).step_by(16) {
            // SAFETY: c + 16 <= (r + 1) d <= n = x.len() and c / 4 + 4 <= n / 4 <= quads.len() (checked
            // above); unaligned accesses.
            unsafe {
                let a = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xp.add(c)), iv));
                _mm_storeu_si128(pp.add(c / 4).cast(), _mm512_cvtsepi32_epi8(a));
            }
        }
    }
}

/// The `B`-bit codes (2, 3 or 4) of 32 positions of four rows (`rp`, `rp + w`, `rp + 2 w`, `rp + 3 w`, `B`
/// words each) as bytes, the four rows' codes of each position in one dword: positions 0-15 in the first
/// vector, 16-31 in the second. The rows' bytes go side by side (2 bits: 8 bytes each in a 256-bit
/// vector; 4 bits: 16 bytes each, a 128-bit lane apiece) and `vpermb` ([`indices`]) gathers the four rows'
/// bytes of each dword; a shift per dword and a mask leave the codes. At 2 bits dword `b` of 128-bit lane
/// `k` holds position `4 b + k` (shifts of `2 k`); at 4 bits dword `i` holds position `i`, the byte that
/// holds it shifted by 4 where `i` is odd. At 3 bits (12 bytes a row, a 128-bit lane apiece, the lane's
/// last 4 bytes zero) dword `i` holds position `i` too: `vpermb` puts each row's two bytes that hold
/// positions `2 k` and `2 k + 1` in qword `k` ([`triple_index`]) and `vpmultishiftqb` takes each code's
/// bits from them ([`triple_shift`]).
///
/// # Safety
/// Words `0..B` of `rp + j w` are readable for `j < 4`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn code_quads<const B: u32>(
    rp: *const u32,
    w: usize,
    lo_idx: __m512i,
    hi_idx: __m512i,
) -> [__m512i; 2] {
    if B == 3 {
        // SAFETY: the caller's contract; each read takes bytes 0..12 of a row, the rest of its lane zeroed
        // (masked off, never read).
        let rows = unsafe {
            let row = |j: usize| _mm_maskz_loadu_epi8(0x0fff, rp.add(j * w).cast());
            let r = _mm512_castsi128_si512(row(0));
            let r = _mm512_inserti32x4::<1>(r, row(1));
            let r = _mm512_inserti32x4::<2>(r, row(2));
            _mm512_inserti32x4::<3>(r, row(3))
        };
        // SAFETY: the constant holds 64 bytes; an unaligned read.
        let sh = unsafe { _mm512_loadu_si512(TRIPLE_SHIFT.as_ptr().cast()) };
        let m = _mm512_set1_epi8(7);
        let code = |idx: __m512i| {
            _mm512_and_si512(_mm512_multishift_epi64_epi8(sh, _mm512_permutexvar_epi8(idx, rows)), m)
        };
        return [code(lo_idx), code(hi_idx)];
    }
    // SAFETY: the caller's contract; unaligned reads.
    let rows = unsafe {
        if B == 4 {
            let r = _mm512_castsi128_si512(_mm_loadu_si128(rp.cast()));
            let r = _mm512_inserti32x4::<1>(r, _mm_loadu_si128(rp.add(w).cast()));
            let r = _mm512_inserti32x4::<2>(r, _mm_loadu_si128(rp.add(2 * w).cast()));
            _mm512_inserti32x4::<3>(r, _mm_loadu_si128(rp.add(3 * w).cast()))
        } else {
            _mm512_zextsi256_si512(_mm256_setr_epi64x(
                rp.cast::<i64>().read_unaligned(),
                rp.add(w).cast::<i64>().read_unaligned(),
                rp.add(2 * w).cast::<i64>().read_unaligned(),
                rp.add(3 * w).cast::<i64>().read_unaligned(),
            ))
        }
    };
    let (sh, m) = if B == 4 {
        (_mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4), _mm512_set1_epi8(15))
    } else {
        (_mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6), _mm512_set1_epi8(3))
    };
    let lo = _mm512_permutexvar_epi8(lo_idx, rows);
    let hi = _mm512_permutexvar_epi8(hi_idx, rows);
    [_mm512_and_si512(_mm512_srlv_epi32(lo, sh), m), _mm512_and_si512(_mm512_srlv_epi32(hi, sh), m)]
}

/// [`code_quads`]' codes as their integer levels where `L` (`vpshufb` with `levels`, a codebook's
/// [`crate::attention::Q8Levels`] bytes in each 128-bit lane), else as they are.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn level_quads<const L: bool>(q: [__m512i; 2], levels: __m512i) -> [__m512i; 2] {
    if L { [_mm512_shuffle_epi8(levels, q[0]), _mm512_shuffle_epi8(levels, q[1])] } else { q }
}

/// The permute indices of [`code_quads`] for `B`-bit codes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn indices<const B: u32>() -> (__m512i, __m512i) {
    let (lo, hi) = match B {
        4 => (&NIBBLE_LO, &NIBBLE_HI),
        3 => (&TRIPLE_LO, &TRIPLE_HI),
        _ => (&QUAD_LO, &QUAD_HI),
    };
    // SAFETY: each constant holds 64 bytes; unaligned reads.
    unsafe { (_mm512_loadu_si512(lo.as_ptr().cast()), _mm512_loadu_si512(hi.as_ptr().cast())) }
}

/// `M` queries' dword sums over `n` quads: quad `i`'s two vectors of codes, from `codes[2 i..2 i + 2]` where
/// `S` or else from [`code_quads`] at `rp + 4 i stride` (rows `stride` apart, `B`-bit codes), each multiplied
/// by query `m`'s four bytes `qp[m * n + i]` broadcast and added with `vpdpbusd`. The key tiles' quads are
/// four channel rows of 32 tokens, the value tiles' four token rows of 32 channels.
///
/// # Safety
/// For `i < n` and `m < M`: entry `m * n + i` of `qp` is readable; where `S`, `codes.len() >= 2 n`, else
/// words `0..B` of `rp + (4 i + j) stride` are readable for `j < 4`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn dp_quads<const M: usize, const S: bool, const B: u32, const L: bool>(
    codes: &[__m512i],
    mut rp: *const u32,
    stride: usize,
    qp: *const u32,
    n: usize,
    idx: [__m512i; 3],
) -> [[__m512i; 2]; M] {
    let mut acc = [[_mm512_setzero_si512(); 2]; M];
    for i in 0..n {
        let [lo, hi] = if S {
            // SAFETY: 2 i + 1 < 2 n <= codes.len() (the caller's contract).
            unsafe { [*codes.get_unchecked(2 * i), *codes.get_unchecked(2 * i + 1)] }
        } else {
            // SAFETY: rows 4 i..4 i + 4 at `rp` (the caller's contract).
            level_quads::<L>(unsafe { code_quads::<B>(rp, stride, idx[0], idx[1]) }, idx[2])
        };
        rp = rp.wrapping_add(4 * stride);
        for (m, a) in acc.iter_mut().enumerate() {
            // SAFETY: m n + i < M n (the caller's contract).
            let x = _mm512_set1_epi32(unsafe { qp.add(m * n + i).read() } as i32);
            a[0] = _mm512_dpbusd_epi32(a[0], lo, x);
            a[1] = _mm512_dpbusd_epi32(a[1], hi, x);
        }
    }
    acc
}

/// The first 16 floats of `s`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn ld16(s: &[f32]) -> __m512 {
    let s = &s[..16];
    // SAFETY: `s` holds 16 floats; an unaligned read.
    unsafe { _mm512_loadu_ps(s.as_ptr()) }
}

/// The `vpermps` indices that put [`code_quads`]' sums in order: lane `4 k + b` holds position `4 b + k`
/// (a token of a key tile, a channel of a value tile), so position `t` comes from lane `4 (t % 4) + t / 4`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn quad_order() -> __m512i {
    _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)
}

/// The parent's key tiles with `packed` holding quads (`d / 4` per entry), on 64-byte vectors.
impl KeyTiles<'_> {
    /// Every tile by every block of up to 4 queries; where `S`, each tile's codes are unpacked once into
    /// `unpacked` (`d / 2` vectors) for all the blocks, else each block unpacks them in place.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    fn run512<const S: bool, const B: u32>(&self, out: &mut Scores<'_>, unpacked: &mut [__m512i]) {
        let (b, d, nq) = (self.b, self.d, self.nq);
        let (w, per_group) = (b.block_words, b.group / 32);
        if self.tiles == 0 {
            return;
        }
        self.check(d / 4, !S || unpacked.len() >= d / 2, out);
        let (lo_idx, hi_idx) = indices::<B>();
        for k in 0..self.tiles {
            let t0 = self.b0 + 32 * k;
            let word = key_row(t0, 0, d, b.block, w) + (t0 & (b.block - 1)) * B as usize / 32;
            prefetch_next_block::<32>(b, t0, d);
            if S {
                for (i, v) in unpacked[..d / 2].chunks_exact_mut(2).enumerate() {
                    // SAFETY: rows 4 i..4 i + 4 < d of this tile lie in the codes (checked above).
                    v.copy_from_slice(&unsafe {
                        code_quads::<B>(b.codes.as_ptr().add(word + 4 * i * w), w, lo_idx, hi_idx)
                    });
                }
            }
            let at = k / per_group * nq;
            for qb in (0..nq).step_by(4) {
                // SAFETY: word <= last_word, at + qb + 4 <= entries wherever qb + 4 <= nq (and
                // at + nq <= entries otherwise), k < tiles (all checked above).
                unsafe {
                    match nq - qb {
                        1 => self.tile512::<1, S, B>(k, word, at + qb, qb, unpacked, out, lo_idx, hi_idx),
                        2 => self.tile512::<2, S, B>(k, word, at + qb, qb, unpacked, out, lo_idx, hi_idx),
                        3 => self.tile512::<3, S, B>(k, word, at + qb, qb, unpacked, out, lo_idx, hi_idx),
                        _ => self.tile512::<4, S, B>(k, word, at + qb, qb, unpacked, out, lo_idx, hi_idx),
                    }
                }
            }
        }
    }

    /// Tile `k` (codes from word `word`) by queries `qb..qb + M` (entries `e..e + M`).
    ///
    /// # Safety
    /// What [`Self::run`] checks: `word` at most the last tile's first word, `e + M` at most the batch's
    /// entries, `qb + M <= nq`, `k < tiles`, and `codes` holds `d / 2` vectors where `S`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    unsafe fn tile512<const M: usize, const S: bool, const B: u32>(
        &self,
        k: usize,
        word: usize,
        e: usize,
        qb: usize,
        codes: &[__m512i],
        out: &mut Scores<'_>,
        lo_idx: __m512i,
        hi_idx: __m512i,
    ) {
        let (w, h) = (self.b.block_words, self.d / 4);
        // SAFETY: the tile's rows from `word` (quads of channel rows 4 i..4 i + 4 < d, w apart) lie in the
        // codes, entries e..e + M of `quads` (h each) in it, and `codes` holds d / 2 = 2 h vectors where S
        // (the caller's contract).
        let acc = unsafe {
            dp_quads::<M, S, B, false>(
                codes,
                self.b.codes.as_ptr().add(word),
                w,
                self.packed.as_ptr().add(e * h),
                h,
                [lo_idx, hi_idx, lo_idx],
            )
        };
        let order = quad_order();
        let op = out.data.as_mut_ptr();
        for (m, a) in acc.iter().enumerate() {
            // SAFETY: e + m < the batch's entries <= delta.len(), bias.len() (the caller's contract).
            let (dl, bs) = unsafe { (*self.delta.get_unchecked(e + m), *self.bias.get_unchecked(e + m)) };
            let (dl, bs) = (_mm512_set1_ps(dl), _mm512_set1_ps(bs));
            let at = out.pos + self.col + (qb + m) * out.stride + 32 * k;
            for (j, v) in a.iter().enumerate() {
                let s = _mm512_add_ps(_mm512_mul_ps(dl, _mm512_cvtepi32_ps(*v)), bs);
                // 4-bit quads come in token order.
                let s = if B == 4 { s } else { _mm512_permutexvar_ps(order, s) };
                // SAFETY: at + 16 j + 16 <= pos + col + (nq - 1) stride + 32 tiles <= out.data.len() (the
                // caller's contract); an unaligned store.
                unsafe { _mm512_storeu_ps(op.add(at + 16 * j), s) };
            }
        }
    }
}

/// See [`super::values_q8_token`] (the same bits). 2- or 4-bit codes (32 channels being four words of a row
/// at 4 bits, [`code_quads`] their unpacking, in channel order), `group % 32 == 0`, `d % 64 == 0`.
///
/// Per tile of [`Q8_TILE`] tokens: the weights `p_t s_t` of each channel group and query are rounded as
/// the AVX2 path rounds them and narrowed to bytes in token order, four to a dword; the zero-point lanes
/// are the AVX2 path's ([`zero_lanes`]). Then for each 32 channels (a row's word pair, one group) and each
/// four tokens, [`code_quads`] puts the four tokens' codes of each channel in a dword, and one `vpdpbusd`
/// per 16 channels and query adds the four products. The sums are put in channel order once per tile
/// (`vpermps`), scaled by the tile's `delta` and added to the query's output, as the AVX2 path adds them;
/// a last partial tile runs as a zero-padded whole one ([`q8_tile`]). A body with codebook levels
/// (`b.levels`; the portable twin's bits, AVX2 has no such kernel) reads each code as its integer level,
/// one `vpshufb` per 64 codes after [`code_quads`], and folds the levels' step into `delta`.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn values_q8_token(
    b: &TokenBody<'_>,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
) {
    if b.levels.is_some() {
        return token_values_any::<true>(b, start, n, p, d, out, work);
    }
    token_values_any::<false>(b, start, n, p, d, out, work)
}

/// [`values_q8_token`] for codes read as themselves or, where `L`, as their codebook's integer levels.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn token_values_any<const L: bool>(
    b: &TokenBody<'_>,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
) {
    if out.len() / d > 4 {
        let mut unpacked = [_mm512_setzero_si512(); Q8_TILE / 2];
        let u = &mut unpacked;
        return match b.width {
            Width::B4 => token_values::<true, 4, L>(b, start, n, p, d, out, work, u),
            Width::B3 => token_values::<true, 3, L>(b, start, n, p, d, out, work, u),
            _ => token_values::<true, 2, L>(b, start, n, p, d, out, work, u),
        };
    }
    match b.width {
        Width::B4 => token_values::<false, 4, L>(b, start, n, p, d, out, work, &mut []),
        Width::B3 => token_values::<false, 3, L>(b, start, n, p, d, out, work, &mut []),
        _ => token_values::<false, 2, L>(b, start, n, p, d, out, work, &mut []),
    }
}

/// [`values_q8_token`]'s loops; `S`: more than 4 queries share each word pair's unpacking (`unpacked`,
/// `Q8_TILE / 2` vectors).
#[inline]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn token_values<const S: bool, const B: u32, const L: bool>(
    b: &TokenBody<'_>,
    start: usize,
    n: usize,
    p: &Probs<'_>,
    d: usize,
    out: &mut [f32],
    work: &mut [f32],
    unpacked: &mut [__m512i],
) {
    const T: usize = Q8_TILE;
    let nq = out.len() / d;
    let g = b.group;
    let groups = d / g;
    // The AVX2 path's split of `work`; its permuted sums are not needed (these go in channel order), and
    // the quads take half of its pairs' room.
    let ValueWork { l, zl, tile, packed, pad, .. } = ValueWork::split(work, nq, d, groups);
    let quads: &mut [u32] = bytemuck::cast_slice_mut(&mut packed[..groups * nq * T / 4]);
    let (delta, spare) = tile.split_at_mut(groups * nq);
    l.fill(0.0);
    zl.fill(0.0);
    let (lo_idx, hi_idx) = indices::<B>();
    let vmax = Q8_VALUE_MAX;
    // A codebook's levels in every 128-bit lane, and the step its integer levels are in.
    let (levels, step) = match b.levels {
        Some(lv) => {
            // SAFETY: `lv.bytes` holds 16 bytes; an unaligned read.
            (_mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(lv.bytes.as_ptr().cast()) }), lv.step)
        }
        None => (_mm512_setzero_si512(), 1.0),
    };
    for t0 in (0..n).step_by(T) {
        let (b, p, slot, t0) = q8_tile(b, p, start, t0, n, nq, groups, &mut *pad, &mut *spare);
        let (b, p) = (&b, &p);
        for gi in 0..groups {
            let at = gi * b.ring + slot;
            let (sr, zr) = (&b.scale[at..][..T], &b.zero[at..][..T]);
            for qb in (0..nq).step_by(3) {
                match nq - qb {
                    1 => zero_lanes::<1>(zr, p, t0, zl, groups, gi, qb),
                    2 => zero_lanes::<2>(zr, p, t0, zl, groups, gi, qb),
                    _ => zero_lanes::<3>(zr, p, t0, zl, groups, gi, qb),
                }
            }
            let sv: [__m512; T / 16] = core::array::from_fn(|k| {
                let h = &sr[16 * k..][..16];
                // SAFETY: `h` holds 16 u16; an unaligned 32-byte read.
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(h.as_ptr().cast()) })
            });
            for qi in 0..nq {
                let pr = &p.data[qi * p.stride + p.pos + t0..][..T];
                let mut ps = [_mm512_setzero_ps(); T / 16];
                let mut mx = _mm512_setzero_ps();
                for (k, v) in ps.iter_mut().enumerate() {
                    // SAFETY: 16 k + 16 <= T = pr.len(); an unaligned read.
                    // p >= 0 and s >= 0, so p s is its own absolute value.
                    *v = _mm512_mul_ps(unsafe { _mm512_loadu_ps(pr[16 * k..].as_ptr()) }, sv[k]);
                    mx = _mm512_max_ps(mx, *v);
                }
                let m = _mm512_reduce_max_ps(mx);
                let pq = &mut quads[(gi * nq + qi) * T / 4..][..T / 4];
                if m == 0.0 {
                    pq.fill(0);
                    delta[gi * nq + qi] = 0.0;
                    continue;
                }
                let inv = _mm512_set1_ps(vmax / m);
                for (k, o) in pq.chunks_exact_mut(4).enumerate() {
                    let r = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(ps[k], inv)));
                    // SAFETY: `o` holds 4 u32, 16 bytes; an unaligned store.
                    unsafe { _mm_storeu_si128(o.as_mut_ptr().cast(), r) };
                }
                // `L`: the integer sums are of levels, each `step` apart (a product with 1 otherwise).
                delta[gi * nq + qi] = m / vmax * step;
            }
        }
        let rw = b.row_words;
        let rows = &b.codes[slot * rw..][..T * rw];
        // The next tile's rows, hinted a line at a time (a prefetch never faults, so the address may lie
        // past the codes).
        let next = rows.as_ptr().wrapping_add(T * rw).cast::<u8>();
        for at in (0..4 * T * rw).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(at).cast());
        }
        // 32 channels (one group or more) are `B` words of each row.
        for c0 in (0..d).step_by(32) {
            let (word, group) = (c0 * B as usize / 32, c0 / g);
            // The layout guarantees these; a failure is a bug in this crate.
            assert!(
                word + B as usize <= rw && quads.len() >= (group + 1) * nq * T / 4,
                "value rows shorter than their layout"
            );
            if S {
                for (i, v) in unpacked[..T / 2].chunks_exact_mut(2).enumerate() {
                    // SAFETY: rows 4 i..4 i + 4 < T of the tile, words word..word + 2 < rw of each (checked
                    // above and by the reslice of `rows`).
                    v.copy_from_slice(&level_quads::<L>(
                        unsafe { code_quads::<B>(rows.as_ptr().add(4 * i * rw + word), rw, lo_idx, hi_idx) },
                        levels,
                    ));
                }
            }
            let v = ValueTile {
                rows: &rows[word..],
                rw,
                quads: &quads[group * nq * T / 4..],
                delta: &delta[group * nq..],
            };
            for qb in (0..nq).step_by(4) {
                let o = &mut l[qb * d + c0..];
                let idx = [lo_idx, hi_idx, levels];
                match nq - qb {
                    1 => v.add::<1, S, B, L>(qb, unpacked, o, d, idx),
                    2 => v.add::<2, S, B, L>(qb, unpacked, o, d, idx),
                    3 => v.add::<3, S, B, L>(qb, unpacked, o, d, idx),
                    _ => v.add::<4, S, B, L>(qb, unpacked, o, d, idx),
                }
            }
        }
    }
    portable::finish_values_q8(g, d, l, zl, out);
}

/// One tile's token rows from one word pair on (32 channels of one group), with the group's rounded
/// weights (`quads`, `Q8_TILE / 4` per query from the group's first) and scales (`delta`, one per query).
struct ValueTile<'a> {
    rows: &'a [u32],
    rw: usize,
    quads: &'a [u32],
    delta: &'a [f32],
}

impl ValueTile<'_> {
    /// Queries `qb..qb + M`: adds the tile's 32 channel sums, scaled, into `o` (query `m`'s at `m * d`); the
    /// codes come unpacked from `codes` where `S`, else straight from the rows (`idx`: [`indices`], then
    /// the levels that `L` reads them as).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    fn add<const M: usize, const S: bool, const B: u32, const L: bool>(
        &self,
        qb: usize,
        codes: &[__m512i],
        o: &mut [f32],
        d: usize,
        idx: [__m512i; 3],
    ) {
        const T: usize = Q8_TILE;
        let rw = self.rw;
        // Reads words `t * rw + i` (i < B) of `rows` for t < T (or T / 2 vectors of `codes`) and entries
        // `(qb + m) * T / 4 + i` (i < T / 4) of `quads` for m < M: checked once here, then read through
        // pointers. The layout guarantees this; a failure is a bug in this crate.
        assert!(
            self.rows.len() >= (T - 1) * rw + B as usize
                && (!S || codes.len() >= T / 2)
                && self.quads.len() >= (qb + M) * T / 4
                && self.delta.len() >= qb + M
                && o.len() >= (M - 1) * d + 32,
            "value rows shorter than their layout"
        );
        // SAFETY: token rows 4 i..4 i + 4 < T (B words each) lie in `rows`, entries qb..qb + M of `quads`
        // (T / 4 each) in it, and `codes` holds T / 2 vectors where S (checked above).
        let acc = unsafe {
            dp_quads::<M, S, B, L>(
                codes,
                self.rows.as_ptr(),
                rw,
                self.quads[qb * T / 4..].as_ptr(),
                T / 4,
                idx,
            )
        };
        let order = quad_order();
        for (m, a) in acc.iter().enumerate() {
            let dl = _mm512_set1_ps(self.delta[qb + m]);
            let om = &mut o[m * d..][..32];
            for (h, v) in a.iter().enumerate() {
                let x = _mm512_mul_ps(dl, _mm512_cvtepi32_ps(*v));
                // 3- and 4-bit quads come in channel order.
                let x = if B == 2 { _mm512_permutexvar_ps(order, x) } else { x };
                let oh = &mut om[16 * h..][..16];
                // SAFETY: `oh` holds 16 floats; unaligned accesses.
                unsafe { _mm512_storeu_ps(oh.as_mut_ptr(), _mm512_add_ps(_mm512_loadu_ps(oh.as_ptr()), x)) };
            }
        }
    }
}

/// [`GroupRun::scores`] on 64-byte vectors (the same bits): every group's scores for codes of `bits` bits
/// (1 to 4), blocks of 16 tokens by up to 4 queries.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn group_scores(run: &GroupRun<'_>, bits: u32, out: &mut Scores<'_>) {
    let nq = run.bias.len() / run.g;
    let mut qb = 0;
    while qb < nq {
        let m = (nq - qb).min(4);
        match bits {
            1 => group_block_any::<1>(run, out, qb, m),
            2 => group_block_any::<2>(run, out, qb, m),
            3 => group_block_any::<3>(run, out, qb, m),
            _ => group_block_any::<4>(run, out, qb, m),
        }
        qb += m;
    }
}

/// Queries `qb..qb + m` (`m` at most 4) for `B`-bit codes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn group_block_any<const B: i32>(run: &GroupRun<'_>, out: &mut Scores<'_>, qb: usize, m: usize) {
    match m {
        1 => group_block::<B, 1>(run, out, qb),
        2 => group_block::<B, 2>(run, out, qb),
        3 => group_block::<B, 3>(run, out, qb),
        _ => group_block::<B, 4>(run, out, qb),
    }
}

/// Queries `qb..qb + M` for `B`-bit codes: per 16 tokens of each group, `bias + sum_c w(c, t) table_c[code]`
/// with one FMA per channel and query in channel order, as the AVX2 path sums them. Two groups go
/// together ([`channel_sums`]): they share each channel's offset queries, and their six chains of FMAs
/// hide each other's latency.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn group_block<const B: i32, const M: usize>(run: &GroupRun<'_>, out: &mut Scores<'_>, qb: usize) {
    let (g, d) = (run.g, run.d);
    let nq = run.bias.len() / g;
    let bytes: &[u8] = bytemuck::cast_slice(run.codes);
    let (b, rw4) = (B as usize, run.row_words * 4);
    let ng = run.groups.len();
    assert!(d > 0 && qb + M <= nq && run.tables.len() >= ng * d, "key groups shorter than their layout");
    for t0 in (0..g).step_by(16) {
        let oq = &run.oq[super::super::generic::oq_at(qb, 0, t0, nq, d, g)..][..M * d * 16];
        let bias: [__m512; M] = core::array::from_fn(|m| ld16(&run.bias[(qb + m) * g + t0..]));
        // Group j's first code byte of channel 0, and whether all its channels' 8-byte reads lie in the
        // codes (only a group at the very end of the arena may fail this; it takes the checked reads).
        let at = |j: usize| {
            let (word, col, _) = run.groups[j];
            let off = word * 4 + (col + t0) * b / 8;
            (off, off + (d - 1) * rw4 + 8 <= bytes.len())
        };
        let mut j = 0;
        while j < ng {
            let (o0, fast0) = at(j);
            // Four groups a pass where their reads are whole (each offset query load serves four), else
            // two, else one; a group at the arena's end takes the checked reads.
            let n = match () {
                _ if fast0 && j + 3 < ng && at(j + 3).1 => 4,
                _ if fast0 && j + 1 < ng && at(j + 1).1 => 2,
                _ => 1,
            };
            let offs: [usize; 4] = core::array::from_fn(|k| if k < n { at(j + k).0 } else { o0 });
            let sums: [[__m512; M]; 4] = if fast0 {
                // SAFETY: the `n` groups' reads lie in the codes (checked by `at`: the last group's reads
                // end furthest), their tables are entries j d..(j + n) d of `tables` (checked above), and
                // `oq` holds M d runs of 16 (resliced).
                unsafe {
                    match n {
                        4 => group_sums::<B, M, 4>(run, bytes, offs, j, oq, bias),
                        2 => {
                            let [a, b] = group_sums::<B, M, 2>(run, bytes, [offs[0], offs[1]], j, oq, bias);
                            [a, b, a, b]
                        }
                        _ => [group_sums::<B, M, 1>(run, bytes, [o0], j, oq, bias)[0]; 4],
                    }
                }
            } else {
                let mut a = bias;
                for (c, table) in run.tables[j * d..][..d].iter().enumerate() {
                    let x = read16::<B>(bytes, o0 + c * rw4);
                    let v = lookup16::<B>(x, ld16(table));
                    for (m, am) in a.iter_mut().enumerate() {
                        *am = _mm512_fmadd_ps(ld16(&oq[(m * d + c) * 16..]), v, *am);
                    }
                }
                [a; 4]
            };
            for (k, s) in sums.iter().enumerate().take(n) {
                let (_, _, col) = run.groups[j + k];
                for (m, am) in s.iter().enumerate() {
                    let o = &mut out.data[(qb + m) * out.stride + out.pos + col + t0..][..16];
                    // SAFETY: `o` holds 16 floats; an unaligned store.
                    unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *am) };
                }
            }
            j += n;
        }
    }
}

/// [`channel_sums`] of `NG` key groups from `j` (their first code bytes at `offs` in `bytes`, their tables
/// `run.tables[(j + k) d..]`), 16 tokens against the offset queries `oq`, from `bias`.
///
/// # Safety
/// As [`channel_sums`]: each group's `d` channel reads (8 bytes at `offs[k] + c * row_words * 4`) lie in
/// `bytes`, its tables in `run.tables`, and `oq` holds `M d` runs of 16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn group_sums<const B: i32, const M: usize, const NG: usize>(
    run: &GroupRun<'_>,
    bytes: &[u8],
    offs: [usize; NG],
    j: usize,
    oq: &[f32],
    bias: [__m512; M],
) -> [[__m512; M]; NG] {
    let d = run.d;
    // SAFETY: the caller's contract.
    unsafe {
        channel_sums::<B, M, NG>(
            offs.map(|o| bytes.as_ptr().add(o)),
            run.row_words * 4,
            core::array::from_fn(|k| run.tables[(j + k) * d..].as_ptr().cast()),
            oq.as_ptr(),
            d,
            [bias; NG],
        )
    }
}

/// The 16 codes of `B` bits in the low `16 B` bits of `x`, looked up in a channel's 16-entry `table`:
/// lanes 0-7 take codes 0-7, lanes 8-15 codes 8-15, each shifted to the low bits of its lane. `vpermps`
/// reads a lane's low 4 bits: 4-bit codes index the 16 entries, shorter codes a table that repeats its
/// levels with their period (the next code's bits land on a copy).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn lookup16<const B: i32>(x: u64, table: __m512) -> __m512 {
    let sh = _mm512_setr_epi32(
        0,
        B,
        2 * B,
        3 * B,
        4 * B,
        5 * B,
        6 * B,
        7 * B,
        0,
        B,
        2 * B,
        3 * B,
        4 * B,
        5 * B,
        6 * B,
        7 * B,
    );
    let both = _mm512_inserti64x4::<1>(
        _mm512_set1_epi32(x as u32 as i32),
        _mm256_set1_epi32((x >> (8 * B)) as u32 as i32),
    );
    _mm512_permutexvar_ps(_mm512_srlv_epi32(both, sh), table)
}

/// `NG` key groups' sums over 16 tokens from `a`: per channel `c` in order, each group's codes (8 bytes at
/// `codes[k] + c * rw4`) looked up in its table (`tables[k] + 16 c`) and, for each query `m`, multiplied by
/// the offset queries at `oq + (m d + c) 16` and added to `a[k][m]`.
///
/// # Safety
/// For `c < d` and `k < NG`: 8 bytes at `codes[k] + c * rw4` and 16 floats at `tables[k] + 16 c` are
/// readable, and `M d` runs of 16 floats at `oq`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn channel_sums<const B: i32, const M: usize, const NG: usize>(
    mut codes: [*const u8; NG],
    rw4: usize,
    mut tables: [*const f32; NG],
    oq: *const f32,
    d: usize,
    mut a: [[__m512; M]; NG],
) -> [[__m512; M]; NG] {
    let mut w = oq;
    for _ in 0..d {
        let mut v = [_mm512_setzero_ps(); NG];
        for k in 0..NG {
            // SAFETY: the caller's contract: channel c's codes and table, unaligned reads.
            v[k] =
                unsafe { lookup16::<B>(codes[k].cast::<u64>().read_unaligned(), _mm512_loadu_ps(tables[k])) };
            codes[k] = codes[k].wrapping_add(rw4);
            tables[k] = tables[k].wrapping_add(16);
        }
        for m in 0..M {
            // SAFETY: the caller's contract: query m's run of channel c, at w + m d 16.
            let wm = unsafe { _mm512_loadu_ps(w.add(m * d * 16)) };
            for (ak, vk) in a.iter_mut().zip(v) {
                ak[m] = _mm512_fmadd_ps(wm, vk, ak[m]);
            }
        }
        w = w.wrapping_add(16);
    }
    a
}

/// [`super::fill_table`] for `d = tables.len()` channels at once (`d % 16 == 0`), from their f16 scales and
/// zero points: each table is `zero + scale * levels`, multiplied and added as the AVX2 path does (the same
/// bits), with 16 channels' parameters converted in one instruction and broadcast a lane at a time.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn fill_tables(tables: &mut [[f32; 16]], levels: &[[f32; 16]], scale: &[u16], zero: &[u16]) {
    let d = tables.len();
    assert!(d.is_multiple_of(16) && levels.len() >= d && scale.len() >= d && zero.len() >= d);
    for c0 in (0..d).step_by(16) {
        let (sr, zr) = (&scale[c0..][..16], &zero[c0..][..16]);
        // SAFETY: `sr` and `zr` hold 16 u16; unaligned 32-byte reads.
        let (s, z) = unsafe {
            (
                _mm512_cvtph_ps(_mm256_loadu_si256(sr.as_ptr().cast())),
                _mm512_cvtph_ps(_mm256_loadu_si256(zr.as_ptr().cast())),
            )
        };
        fill16(&mut tables[c0..c0 + 16], &levels[c0..c0 + 16], s, z);
    }
}

/// [`fill_tables`] from FP8 (E4M3) scales and zero points: 16 channels' bytes decoded at once through the
/// exact E4M3 table (`vgatherdps`), as `ParamFormat::decode` reads it.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn fill_tables_fp8(tables: &mut [[f32; 16]], levels: &[[f32; 16]], scale: &[u8], zero: &[u8]) {
    let d = tables.len();
    assert!(d.is_multiple_of(16) && levels.len() >= d && scale.len() >= d && zero.len() >= d);
    let fp8 = crate::quant::param::fp8_e4m3_table();
    for c0 in (0..d).step_by(16) {
        let (sr, zr) = (&scale[c0..][..16], &zero[c0..][..16]);
        // SAFETY: `sr` and `zr` hold 16 bytes (unaligned reads); every gathered index is a byte, under the
        // table's 256 entries.
        let (s, z) = unsafe {
            let (si, zi) = (
                _mm512_cvtepu8_epi32(_mm_loadu_si128(sr.as_ptr().cast())),
                _mm512_cvtepu8_epi32(_mm_loadu_si128(zr.as_ptr().cast())),
            );
            (_mm512_i32gather_ps::<4>(si, fp8.as_ptr()), _mm512_i32gather_ps::<4>(zi, fp8.as_ptr()))
        };
        fill16(&mut tables[c0..c0 + 16], &levels[c0..c0 + 16], s, z);
    }
}

/// Tables `zero_k + scale_k * levels[k]` for 16 channels `k`, their parameters in the lanes of `s`, `z`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn fill16(tables: &mut [[f32; 16]], levels: &[[f32; 16]], s: __m512, z: __m512) {
    for (k, (t, lv)) in tables.iter_mut().zip(levels).take(16).enumerate() {
        let i = _mm512_set1_epi32(k as i32);
        let (sk, zk) = (_mm512_permutexvar_ps(i, s), _mm512_permutexvar_ps(i, z));
        // SAFETY: `t` and `lv` hold 16 floats each; unaligned accesses.
        unsafe {
            _mm512_storeu_ps(
                t.as_mut_ptr(),
                _mm512_add_ps(zk, _mm512_mul_ps(sk, _mm512_loadu_ps(lv.as_ptr()))),
            )
        };
    }
}

/// 16 codes of `B` bits (2, 3, 4 or 8) of run `r` (channels `16 r..16 r + 16`) of the row at `p`
/// (`row_words` words) as 16 f32: the AVX2 path's [`super::unpack16`] and [`super::unpack16_b3`] in one
/// vector, lanes 8-15 from the second half of the run's bits.
///
/// # Safety
/// `p` points at `row_words` readable words, and run `r` lies in them (for 3 bits, `row_words >= 2`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn unpack_run<const B: u32>(p: *const u32, row_words: usize, r: usize) -> __m512 {
    let halves = |lo: u32, hi: u32, step: i32, mask: i32| {
        let both = _mm512_inserti64x4::<1>(_mm512_set1_epi32(lo as i32), _mm256_set1_epi32(hi as i32));
        let s = step;
        let sh = _mm512_setr_epi32(
            0,
            s,
            2 * s,
            3 * s,
            4 * s,
            5 * s,
            6 * s,
            7 * s,
            0,
            s,
            2 * s,
            3 * s,
            4 * s,
            5 * s,
            6 * s,
            7 * s,
        );
        _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srlv_epi32(both, sh), _mm512_set1_epi32(mask)))
    };
    match B {
        2 => {
            // SAFETY: the caller's contract: word r of the row.
            let w = unsafe { p.add(r).read_unaligned() };
            halves(w, w >> 16, 2, 3)
        }
        3 => {
            // As `unpack16_b3`: the 8 bytes from the run's first, or the row's last 8 where those would
            // pass its end, shifted down to the run.
            let off = 6 * r;
            let at = off.min(4 * row_words - 8);
            // SAFETY: at + 8 <= 4 row_words bytes (the caller's contract); an unaligned read.
            let x = unsafe { p.cast::<u8>().add(at).cast::<u64>().read_unaligned() } >> (8 * (off - at));
            halves(x as u32, (x >> 24) as u32, 3, 7)
        }
        4 => {
            // SAFETY: the caller's contract: words 2 r and 2 r + 1 of the row.
            let (w0, w1) = unsafe { (p.add(2 * r).read_unaligned(), p.add(2 * r + 1).read_unaligned()) };
            halves(w0, w1, 4, 15)
        }
        _ => {
            // SAFETY: the caller's contract: words 4 r..4 r + 4 of the row; an unaligned read.
            let x = unsafe { _mm_loadu_si128(p.add(4 * r).cast()) };
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x))
        }
    }
}

/// The AVX2 path's `v_tile` for every query of a tile on 64-byte vectors (the same bits): `out[qi][c] +=
/// sum_t ps[g(c)][qi][t] code_t[c]` over the tile's `rows`, 32 channels by up to 3 queries at a time (six
/// chains of FMAs), each lane's tokens in order. `d % 32 == 0`.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn value_tiles(rows: &[u32], b: &TokenBody<'_>, d: usize, ps: &[f32], nq: usize, out: &mut [f32]) {
    for qb in (0..nq).step_by(3) {
        match (b.width, nq - qb) {
            (Width::B3, 1) => value_tile::<3, 1>(rows, b, d, ps, nq, out, qb),
            (Width::B3, 2) => value_tile::<3, 2>(rows, b, d, ps, nq, out, qb),
            (Width::B3, _) => value_tile::<3, 3>(rows, b, d, ps, nq, out, qb),
            (Width::B4, 1) => value_tile::<4, 1>(rows, b, d, ps, nq, out, qb),
            (Width::B4, 2) => value_tile::<4, 2>(rows, b, d, ps, nq, out, qb),
            (Width::B4, _) => value_tile::<4, 3>(rows, b, d, ps, nq, out, qb),
            (Width::B8, 1) => value_tile::<8, 1>(rows, b, d, ps, nq, out, qb),
            (Width::B8, 2) => value_tile::<8, 2>(rows, b, d, ps, nq, out, qb),
            (Width::B8, _) => value_tile::<8, 3>(rows, b, d, ps, nq, out, qb),
            (_, 1) => value_tile::<2, 1>(rows, b, d, ps, nq, out, qb),
            (_, 2) => value_tile::<2, 2>(rows, b, d, ps, nq, out, qb),
            (_, _) => value_tile::<2, 3>(rows, b, d, ps, nq, out, qb),
        }
    }
}

/// Queries `qb..qb + M` of [`value_tiles`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn value_tile<const B: u32, const M: usize>(
    rows: &[u32],
    b: &TokenBody<'_>,
    d: usize,
    ps: &[f32],
    nq: usize,
    out: &mut [f32],
    qb: usize,
) {
    let rw = b.row_words;
    let tile = rows.len() / rw;
    // Every run of every row lies in its row: the layout guarantees this; a failure is a bug in this
    // crate, never a property of the input.
    let fits = if B == 3 { rw >= 2 && 48 * (d / 16) <= 32 * rw } else { d / 16 * B as usize / 2 <= rw };
    assert!(
        tile > 0 && fits && d.is_multiple_of(32) && b.group.is_multiple_of(16),
        "value row shorter than its layout"
    );
    for c0 in (0..d).step_by(32) {
        // The two runs' groups (a group is a multiple of 16 channels, so a run lies in one).
        let (g0, g1) = (c0 / b.group, (c0 + 16) / b.group);
        let mut acc: [[__m512; 2]; M] =
            core::array::from_fn(|m| [ld16(&out[(qb + m) * d + c0..]), ld16(&out[(qb + m) * d + c0 + 16..])]);
        let (p0, p1) = (&ps[(g0 * nq + qb) * tile..][..M * tile], &ps[(g1 * nq + qb) * tile..][..M * tile]);
        let (pp0, pp1) = (p0.as_ptr(), p1.as_ptr());
        let r = c0 / 16;
        for t in 0..tile {
            // SAFETY: t < tile = rows.len() / rw, so row t's words lie in `rows`, and runs r, r + 1 lie in
            // it (checked above); m * tile + t < M * tile = p0.len() = p1.len().
            unsafe {
                let rp = rows.as_ptr().add(t * rw);
                let x = [unpack_run::<B>(rp, rw, r), unpack_run::<B>(rp, rw, r + 1)];
                for (m, a) in acc.iter_mut().enumerate() {
                    let w0 = _mm512_set1_ps(pp0.add(m * tile + t).read());
                    let w1 = _mm512_set1_ps(pp1.add(m * tile + t).read());
                    a[0] = _mm512_fmadd_ps(w0, x[0], a[0]);
                    a[1] = _mm512_fmadd_ps(w1, x[1], a[1]);
                }
            }
        }
        for (m, a) in acc.iter().enumerate() {
            for (h, v) in a.iter().enumerate() {
                let o = &mut out[(qb + m) * d + c0 + 16 * h..][..16];
                // SAFETY: `o` holds 16 floats; an unaligned store.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *v) };
            }
        }
    }
}

/// The AVX2 path's decode loop over one key group's tokens for KIVI's f32 per-channel keys, on 64-byte
/// vectors (the same bits): `bias[qi] + sum_c folded[qi][c] code(c, t)`, 32 tokens at a time where the group
/// has them (two runs of 16, six chains of FMAs for three queries), else 16. `folded` holds the group's
/// folded queries (`nq` rows of `d`), `bias` their zero-point sums; scores go to column `t - start`.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn key_chunks(
    b: &ChannelBody<'_>,
    g0: usize,
    start: usize,
    d: usize,
    folded: &[f32],
    bias: &[f32],
    out: &mut Scores<'_>,
) {
    let nq = bias.len();
    let mut t0 = g0;
    while t0 < g0 + b.group {
        let two = t0 + 32 <= g0 + b.group;
        prefetch_next_block::<16>(b, t0, d);
        if two {
            prefetch_next_block::<16>(b, t0 + 16, d);
        }
        let word = key_row(t0, 0, d, b.block, b.block_words)
            + (t0 & (b.block - 1)) / 16 * b.width.bits() as usize / 2;
        for qb in (0..nq).step_by(3) {
            let m = (nq - qb).min(3);
            let c = KeyChunk {
                b,
                word,
                fq: &folded[qb * d..][..m * d],
                bias: &bias[qb..][..m],
                qb,
                col: t0 - start,
            };
            match (b.width.bits(), two) {
                (4, true) => c.run_m::<4, 2>(m, out),
                (4, false) => c.run_m::<4, 1>(m, out),
                (8, true) => c.run_m::<8, 2>(m, out),
                (8, false) => c.run_m::<8, 1>(m, out),
                (_, true) => c.run_m::<2, 2>(m, out),
                (_, false) => c.run_m::<2, 1>(m, out),
            }
        }
        t0 += if two { 32 } else { 16 };
    }
}

/// `NC` runs of 16 tokens from word `word` of every channel row of a key block, for the queries whose
/// folded rows are `fq` (first `qb`) and zero-point sums `bias`; scores from column `col`.
struct KeyChunk<'a> {
    b: &'a ChannelBody<'a>,
    word: usize,
    fq: &'a [f32],
    bias: &'a [f32],
    qb: usize,
    col: usize,
}

impl KeyChunk<'_> {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    fn run_m<const B: u32, const NC: usize>(&self, m: usize, out: &mut Scores<'_>) {
        match m {
            1 => self.run::<B, NC, 1>(out),
            2 => self.run::<B, NC, 2>(out),
            _ => self.run::<B, NC, 3>(out),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    fn run<const B: u32, const NC: usize, const M: usize>(&self, out: &mut Scores<'_>) {
        let h = B as usize / 2; // words per 16 codes
        let d = self.fq.len() / M;
        let w = self.b.block_words;
        let codes = &self.b.codes[self.word..];
        // The layout guarantees these; a failure is a bug in this crate, never a property of the input.
        assert!(
            d > 0 && codes.len() >= (d - 1) * w + NC * h && self.fq.len() >= M * d && self.bias.len() >= M,
            "key block shorter than its layout"
        );
        let mut acc: [[__m512; NC]; M] = core::array::from_fn(|m| [_mm512_set1_ps(self.bias[m]); NC]);
        let (cp, qp) = (codes.as_ptr(), self.fq.as_ptr());
        for c in 0..d {
            // SAFETY: c < d, so the NC h words at c w end within `codes`, and m d + c < M d <= fq.len()
            // (checked above).
            unsafe {
                let x: [__m512; NC] = core::array::from_fn(|k| unpack_run::<B>(cp.add(c * w), w, k));
                for (m, a) in acc.iter_mut().enumerate() {
                    let q = _mm512_set1_ps(qp.add(m * d + c).read());
                    for (ak, xk) in a.iter_mut().zip(x) {
                        *ak = _mm512_fmadd_ps(q, xk, *ak);
                    }
                }
            }
        }
        for (m, a) in acc.iter().enumerate() {
            for (k, v) in a.iter().enumerate() {
                let at = (self.qb + m) * out.stride + out.pos + self.col + 16 * k;
                let o = &mut out.data[at..][..16];
                // SAFETY: `o` holds 16 floats; an unaligned store.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *v) };
            }
        }
    }
}

/// The per-token tables of [`ValueRun`] for `nt` tokens (`tables[t * groups + gj]`, `gj < groups`):
/// `zero + scale * levels` from each token's f16 parameters of group `gj`, `scale[gj * ring + t]` and
/// `zero[gj * ring + t]`, multiplied and added as [`super::fill_table`] does (the same bits), 16 tokens'
/// parameters converted at once.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
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
    // SAFETY: `levels` holds 16 floats; an unaligned read.
    let lv = unsafe { _mm512_loadu_ps(levels.as_ptr()) };
    for gj in 0..groups {
        let (sr, zr) = (&scale[gj * ring..][..nt], &zero[gj * ring..][..nt]);
        let mut t0 = 0;
        while t0 < nt {
            let k = (nt - t0).min(16);
            let (mut sb, mut zb) = ([0u16; 16], [0u16; 16]);
            sb[..k].copy_from_slice(&sr[t0..t0 + k]);
            zb[..k].copy_from_slice(&zr[t0..t0 + k]);
            // SAFETY: `sb` and `zb` hold 16 u16; unaligned reads.
            let (s, z) = unsafe {
                (
                    _mm512_cvtph_ps(_mm256_loadu_si256(sb.as_ptr().cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(zb.as_ptr().cast())),
                )
            };
            for i in 0..k {
                let ix = _mm512_set1_epi32(i as i32);
                let (si, zi) = (_mm512_permutexvar_ps(ix, s), _mm512_permutexvar_ps(ix, z));
                let t = &mut tables[(t0 + i) * groups + gj];
                // SAFETY: `t` holds 16 floats; an unaligned store.
                unsafe { _mm512_storeu_ps(t.as_mut_ptr(), _mm512_add_ps(zi, _mm512_mul_ps(si, lv))) };
            }
            t0 += k;
        }
    }
}

/// [`ValueRun::sums`] on 64-byte vectors (the same bits): 16 channels of a token a step, its table in one
/// register and the codes looked up with one `vpermps`, for up to 4 queries at a time.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn value_run_sums(run: &ValueRun<'_>, bits: u32, d: usize, acc: &mut [f32]) {
    let nq = acc.len() / d;
    let mut qb = 0;
    while qb < nq {
        let m = (nq - qb).min(4);
        match (bits, m) {
            (1, 1) => value_run_block::<1, 1>(run, d, acc, qb),
            (1, 2) => value_run_block::<1, 2>(run, d, acc, qb),
            (1, 3) => value_run_block::<1, 3>(run, d, acc, qb),
            (1, _) => value_run_block::<1, 4>(run, d, acc, qb),
            (2, 1) => value_run_block::<2, 1>(run, d, acc, qb),
            (2, 2) => value_run_block::<2, 2>(run, d, acc, qb),
            (2, 3) => value_run_block::<2, 3>(run, d, acc, qb),
            (2, _) => value_run_block::<2, 4>(run, d, acc, qb),
            (3, 1) => value_run_block::<3, 1>(run, d, acc, qb),
            (3, 2) => value_run_block::<3, 2>(run, d, acc, qb),
            (3, 3) => value_run_block::<3, 3>(run, d, acc, qb),
            (3, _) => value_run_block::<3, 4>(run, d, acc, qb),
            (_, 1) => value_run_block::<4, 1>(run, d, acc, qb),
            (_, 2) => value_run_block::<4, 2>(run, d, acc, qb),
            (_, 3) => value_run_block::<4, 3>(run, d, acc, qb),
            (_, _) => value_run_block::<4, 4>(run, d, acc, qb),
        }
        qb += m;
    }
}

/// Queries `qb..qb + M` of [`value_run_sums`] for `B`-bit codes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn value_run_block<const B: i32, const M: usize>(run: &ValueRun<'_>, d: usize, acc: &mut [f32], qb: usize) {
    let bytes: &[u8] = bytemuck::cast_slice(run.codes);
    let b = B as usize;
    let groups = d / run.group;
    let nt = run.tables.len() / groups;
    let p = run.p;
    for c0 in (0..d).step_by(16) {
        let gj = c0 / run.group;
        let mut a: [__m512; M] = core::array::from_fn(|m| ld16(&acc[(qb + m) * d + c0..]));
        for t in 0..nt {
            let x = read16::<B>(bytes, t * run.row_words * 4 + c0 * b / 8);
            let v = lookup16::<B>(x, ld16(&run.tables[t * groups + gj]));
            for (m, am) in a.iter_mut().enumerate() {
                *am = _mm512_fmadd_ps(_mm512_set1_ps(p.at(qb + m, t)), v, *am);
            }
        }
        for (m, am) in a.iter().enumerate() {
            let o = &mut acc[(qb + m) * d + c0..][..16];
            // SAFETY: `o` holds 16 floats; an unaligned store.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *am) };
        }
    }
}

/// Largest `head_dim` [`offset_queries`] takes: its run's RoPE angles (two vectors per channel pair) stay on
/// the stack, 16 KiB at 256.
pub(crate) const OQ_MAX_D: usize = 256;

/// [`generic::offset_queries`](super::super::generic::offset_queries) on 64-byte vectors, the same bits, for
/// runs of 16 offsets, `head_dim` a multiple of 16 up to [`OQ_MAX_D`], keys neither balanced nor centred
/// (`bias` is zero). A vector holds one channel of a run's 16 offsets, as `oq` lays them out.
///
/// The portable loops sweep the whole `[d][16]` block once per RoPE step and once per Hadamard stage
/// (`log2 d` stages, each a load and a store of every vector). Here a block of 8 channels is rotated by
/// RoPE in registers and takes the first three stages there (they mix only channels within aligned
/// blocks of 8), and each later sweep takes up to four stages over 16 channels `2^k` apart: two sweeps
/// at `d = 64` instead of seven. Every butterfly is the same addition or subtraction of the same two
/// floats, and RoPE and the final scaling the same products, so the results are the portable loops' bits.
/// The run's cosines and sines are transposed into channel vectors once for every query.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn offset_queries(
    rope: Option<(crate::transform::Rope, &[f32])>,
    rotate: bool,
    g: usize,
    queries: &Queries<'_>,
    oq: &mut [f32],
    bias: &mut [f32],
) {
    use super::super::generic::oq_at;
    const RUN: usize = 16;
    let (d, nq) = (queries.d, queries.nq);
    assert!(
        d.is_multiple_of(16)
            && d <= OQ_MAX_D
            && g.is_multiple_of(RUN)
            && oq.len() >= nq * d * g
            && bias.len() >= nq * g
            && queries.q.len() >= nq * d
            && rope.is_none_or(|(_, t)| t.len() >= g * d),
        "offset queries: shapes outside this kernel's"
    );
    let norm = _mm512_set1_ps(1.0 / libm::sqrtf(d as f32));
    let neg = _mm512_set1_epi32(i32::MIN);
    let mut cs = [_mm512_setzero_ps(); OQ_MAX_D];
    // Stages left after the first three, in sweeps of up to four.
    let later = d.trailing_zeros().saturating_sub(3);
    for o0 in (0..g).step_by(RUN) {
        if let Some((_, table)) = rope {
            // Offsets o0..o0 + 16 are 16 rows of `d` floats (cosine, sine per pair); each 16 columns of
            // them, transposed, are 16 channel vectors of the run.
            let rows = &table[o0 * d..][..RUN * d];
            for c0 in (0..d).step_by(16) {
                let t = transpose16(core::array::from_fn(|l| ld16(&rows[l * d + c0..])));
                for (j, v) in t.into_iter().enumerate() {
                    // The portable loops' `sin = -table[..]`: a sign flip, exact.
                    cs[c0 + j] = if j % 2 == 0 {
                        v
                    } else {
                        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), neg))
                    };
                }
            }
        }
        for qi in 0..nq {
            let q = queries.row(qi);
            let x = &mut oq[oq_at(qi, 0, o0, nq, d, g)..][..d * RUN];
            let xp = x.as_mut_ptr();
            for blk in (0..d).step_by(8) {
                let mut v: [__m512; 8] = core::array::from_fn(|j| rope_lane(rope, &cs, q, blk + j));
                if rotate {
                    butterflies(&mut v);
                }
                for (j, v) in v.iter().enumerate() {
                    // SAFETY: channel blk + j < d of the run's `d * 16` floats at `xp`; unaligned stores.
                    unsafe { _mm512_storeu_ps(xp.add((blk + j) * RUN), *v) };
                }
            }
            if rotate {
                let (mut hh, mut left) = (8, later);
                while left > 0 {
                    let k = left.min(4);
                    left -= k;
                    let last = left == 0;
                    // SAFETY: every channel touched is below d (sweep's contract).
                    unsafe {
                        match k {
                            1 => sweep::<2>(xp, d, hh, last.then_some(norm)),
                            2 => sweep::<4>(xp, d, hh, last.then_some(norm)),
                            3 => sweep::<8>(xp, d, hh, last.then_some(norm)),
                            _ => sweep::<16>(xp, d, hh, last.then_some(norm)),
                        }
                    }
                    hh <<= k;
                }
            }
        }
    }
    bias[..nq * g].fill(0.0);
}

/// Channel `c`'s 16 lanes of a run after RoPE (`cs`: the run's cosine and negated sine vectors per pair):
/// `qa cos - qb sin` for the pair's first channel, `qa sin + qb cos` for its second, as the portable
/// loops form them; without RoPE, `q_c` in every lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn rope_lane(rope: Option<(crate::transform::Rope, &[f32])>, cs: &[__m512], q: &[f32], c: usize) -> __m512 {
    let Some((r, _)) = rope else { return _mm512_set1_ps(q[c]) };
    let d = q.len();
    let (i, first) = r.pair_of(c, d);
    let (a, b) = r.pair(i, d);
    let (qa, qb) = (_mm512_set1_ps(q[a]), _mm512_set1_ps(q[b]));
    let (cv, sv) = (cs[2 * i], cs[2 * i + 1]);
    if first {
        _mm512_sub_ps(_mm512_mul_ps(qa, cv), _mm512_mul_ps(qb, sv))
    } else {
        _mm512_add_ps(_mm512_mul_ps(qa, sv), _mm512_mul_ps(qb, cv))
    }
}

/// The Hadamard stages `1, 2, .., N / 2` (in vector positions) on `v`: `(v_j, v_{j+s}) <- (v_j + v_{j+s},
/// v_j - v_{j+s})`, the portable butterflies' order of operands.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn butterflies<const N: usize>(v: &mut [__m512; N]) {
    let mut s = 1;
    while s < N {
        for blk in (0..N).step_by(2 * s) {
            for j in blk..blk + s {
                let (a, b) = (v[j], v[j + s]);
                (v[j], v[j + s]) = (_mm512_add_ps(a, b), _mm512_sub_ps(a, b));
            }
        }
        s *= 2;
    }
}

/// The Hadamard stages `hh, 2 hh, .., N hh / 2` of a run's `d` channel vectors at `x` (16 floats each), `N`
/// channels `hh` apart at a time, scaled by `norm` where given (the last sweep).
///
/// # Safety
/// `x` holds `d * 16` floats, and `N * hh` divides `d`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
unsafe fn sweep<const N: usize>(x: *mut f32, d: usize, hh: usize, norm: Option<__m512>) {
    for blk in (0..d).step_by(N * hh) {
        for r in blk..blk + hh {
            // SAFETY: channels r + j hh < blk + N hh <= d (the caller's contract); unaligned accesses.
            let mut v: [__m512; N] =
                core::array::from_fn(|j| unsafe { _mm512_loadu_ps(x.add((r + j * hh) * 16)) });
            butterflies(&mut v);
            for (j, v) in v.iter().enumerate() {
                let v = match norm {
                    Some(n) => _mm512_mul_ps(*v, n),
                    None => *v,
                };
                // SAFETY: as above.
                unsafe { _mm512_storeu_ps(x.add((r + j * hh) * 16), v) };
            }
        }
    }
}

/// The transpose of 16 rows of 16 floats: lane `j` of vector `i` is lane `i` of row `j`. Four stages of
/// 2x2 block swaps (blocks of 8, 4, 2 and 1 lanes), each one `vpermt2ps` per vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
fn transpose16(mut r: [__m512; 16]) -> [__m512; 16] {
    /// `vpermt2ps` indices of a stage of block `s`: the low row keeps its lanes with bit `s` clear and
    /// takes the high row's lanes `j - s` into the others; the high row takes the low row's `j + s` and
    /// keeps its own.
    const fn idx(s: usize, high: bool) -> [i32; 16] {
        let mut x = [0i32; 16];
        let mut j = 0;
        while j < 16 {
            x[j] = match (high, j & s == 0) {
                (false, true) => j as i32,
                (false, false) => (16 + j - s) as i32,
                (true, true) => (j + s) as i32,
                (true, false) => (16 + j) as i32,
            };
            j += 1;
        }
        x
    }
    const IDX: [[[i32; 16]; 2]; 4] = [
        [idx(8, false), idx(8, true)],
        [idx(4, false), idx(4, true)],
        [idx(2, false), idx(2, true)],
        [idx(1, false), idx(1, true)],
    ];
    /// One stage: rows `a` and `a + S` for every `a` with bit `S` clear.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    fn stage<const S: usize>(r: &mut [__m512; 16], idx: &[[i32; 16]; 2]) {
        // SAFETY: each index table holds 16 i32; unaligned reads.
        let (lo, hi) = unsafe {
            (_mm512_loadu_si512(idx[0].as_ptr().cast()), _mm512_loadu_si512(idx[1].as_ptr().cast()))
        };
        for blk in (0..16).step_by(2 * S) {
            for a in blk..blk + S {
                let (x, y) = (r[a], r[a + S]);
                r[a] = _mm512_permutex2var_ps(x, lo, y);
                r[a + S] = _mm512_permutex2var_ps(x, hi, y);
            }
        }
    }
    stage::<8>(&mut r, &IDX[0]);
    stage::<4>(&mut r, &IDX[1]);
    stage::<2>(&mut r, &IDX[2]);
    stage::<1>(&mut r, &IDX[3]);
    r
}

/// The outliers of channels `lo..lo + d` (one KV head's) among `slots`, in order: for each, its place in
/// `slots` into `at`, its channel (less `lo`) into `chan` and its delta as f32 into `w`; returns how many.
/// Sixteen slots at a time: an unsigned compare of `index - lo` against `d` (and against the empty slot)
/// picks them, `vpcompressd` packs them into a register stored whole at the next free entry (a compressed
/// store to memory is slow on Zen 4), so each array needs 15 entries of room past the slots. The
/// portable loop in `generic::add_token_outliers` keeps the same entries.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn keep_outliers(
    slots: &[crate::quant::outliers::Outlier],
    lo: usize,
    d: usize,
    at: &mut [u32],
    chan: &mut [u32],
    w: &mut [f32],
) -> usize {
    let n = slots.len();
    assert!(
        at.len() >= n + 15 && chan.len() >= n + 15 && w.len() >= n + 15 && lo + d <= 1 << 16,
        "outlier buffers shorter than their slots"
    );
    let words: &[u32] = bytemuck::cast_slice(slots);
    let (lov, dv) = (_mm512_set1_epi32(lo as i32), _mm512_set1_epi32(d as i32));
    let (low, empty) = (_mm512_set1_epi32(0xffff), _mm512_set1_epi32(i32::from(crate::cache::EMPTY_SLOT)));
    let step = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut m = 0;
    for i0 in (0..n).step_by(16) {
        let live: __mmask16 = if n - i0 >= 16 { 0xffff } else { (1 << (n - i0)) - 1 };
        // SAFETY: the lanes of `live` lie in `words` (i0 + its count <= n); the rest are not read.
        let raw = unsafe { _mm512_maskz_loadu_epi32(live, words.as_ptr().add(i0).cast()) };
        let index = _mm512_and_si512(raw, low);
        let c = _mm512_sub_epi32(index, lov);
        let hit = _mm512_mask_cmplt_epu32_mask(live, c, dv) & _mm512_cmpneq_epi32_mask(index, empty);
        let delta = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(raw)));
        let place = _mm512_add_epi32(step, _mm512_set1_epi32(i0 as i32));
        // SAFETY: m <= i0, so entries m..m + 16 lie within n + 15 of each array (checked above); unaligned
        // stores, whose lanes past the kept ones are overwritten or left unread.
        unsafe {
            _mm512_storeu_si512(at.as_mut_ptr().add(m).cast(), _mm512_maskz_compress_epi32(hit, place));
            _mm512_storeu_si512(chan.as_mut_ptr().add(m).cast(), _mm512_maskz_compress_epi32(hit, c));
            _mm512_storeu_ps(w.as_mut_ptr().add(m), _mm512_maskz_compress_ps(hit, delta));
        }
        m += hit.count_ones() as usize;
    }
    m
}

/// [`crate::attention::generic::TokenQueriesQ8::scores`] for a block of 16 rows of 2-bit codes (the same
/// bits), a token per dword.
///
/// Per channel group `g` and per quad `c` (4 channels, one byte of each row) it touches: the quad's byte of
/// the 16 rows (`rows`: four vectors of four rows' 16-byte runs of 64 channels, one row per 128-bit lane)
/// is gathered with two `vpermt2b` and a blend into the low bytes of dword pairs, `vpmultishiftqb` and a
/// mask spread each row's four codes over its dword, and one `vpdpbusd` per query adds the row's dot
/// product with the query's four rounded elements (zero outside `g`, so a quad shared by two groups
/// counts once in each). Then per query the group's integer sums meet its scales and zero points (read
/// 16 tokens at once: f16 with `vcvtph2ps`, FP8 through the exact table with `vgatherdps`), as the portable
/// twin forms them, and each query's 16 scores are stored at `out` row `q0 + m`, columns `t0..t0 + 16`.
/// `params`: the group parameters of the block's tokens, group `g`'s 16 from entry `g * ring`.
///
/// # Safety (of calling it)
/// As [`scores_q8_channel`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
pub(crate) fn token_keys_q8(
    kq: &crate::attention::generic::TokenQueriesQ8<'_>,
    codes: &[u32],
    row_words: usize,
    params: crate::attention::generic::BlockParams<'_>,
    out: &mut Scores<'_>,
    q0: usize,
    t0: usize,
) {
    use crate::attention::generic::BlockParams;
    const T: usize = crate::attention::generic::Q8_TOKEN_BLOCK;
    let (groups, nq) = (kq.groups, kq.bias.len());
    let row_bytes = row_words * 4;
    let (_, ring) = params.extent();
    assert!(kq.fits(codes, row_words, 1, &params, out, q0, t0), "key block shorter than its layout");
    let fp8 = crate::quant::param::fp8_e4m3_table();
    let bytes: &[u8] = bytemuck::cast_slice(&codes[..T * row_words]);
    // Quad `c`'s byte of rows 2k, 2k + 1 (k < 8) into bytes 0 and 1 of qword k: from rows 0-3 and 8-11
    // (`rows[0]`, `rows[2]`) for qwords 0, 1, 4, 5, and rows 4-7, 12-15 for the others, at the same
    // offsets; the other bytes repeat them.
    let base = _mm512_set_epi64(
        QUAD_PAIR[3],
        QUAD_PAIR[2],
        QUAD_PAIR[3],
        QUAD_PAIR[2],
        QUAD_PAIR[1],
        QUAD_PAIR[0],
        QUAD_PAIR[1],
        QUAD_PAIR[0],
    );
    let shifts = _mm512_set1_epi64(0x0e0c_0a08_0604_0200);
    let three = _mm512_set1_epi8(3);
    let mut chunk = usize::MAX;
    let mut rows = [_mm512_setzero_si512(); 4];
    let mut score = [_mm512_setzero_ps(); 4];
    for (m, s) in score.iter_mut().enumerate().take(nq) {
        *s = _mm512_set1_ps(kq.bias[m]);
    }
    for g in 0..groups {
        let (a, b) = kq.span[g];
        let mut acc = [_mm512_setzero_si512(); 4];
        for c in a..b {
            if c / 16 != chunk {
                chunk = c / 16;
                rows = core::array::from_fn(|j| {
                    let at = |i: usize| (4 * j + i) * row_bytes + 16 * chunk;
                    // SAFETY: row 4 j + i < 16 holds `row_bytes` bytes from `at(i)` - 16 chunk, and
                    // 16 chunk + 16 <= d / 4 = row_bytes (checked above); unaligned 16-byte reads.
                    unsafe {
                        let r = _mm512_castsi128_si512(_mm_loadu_si128(bytes.as_ptr().add(at(0)).cast()));
                        let r = _mm512_inserti32x4::<1>(r, _mm_loadu_si128(bytes.as_ptr().add(at(1)).cast()));
                        let r = _mm512_inserti32x4::<2>(r, _mm_loadu_si128(bytes.as_ptr().add(at(2)).cast()));
                        _mm512_inserti32x4::<3>(r, _mm_loadu_si128(bytes.as_ptr().add(at(3)).cast()))
                    }
                });
            }
            let idx = _mm512_add_epi8(base, _mm512_set1_epi8((c % 16) as i8));
            let lo = _mm512_permutex2var_epi8(rows[0], idx, rows[2]);
            let hi = _mm512_permutex2var_epi8(rows[1], idx, rows[3]);
            let pairs = _mm512_mask_blend_epi64(0xcc, lo, hi);
            let x = _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, pairs), three);
            for (m, am) in acc.iter_mut().enumerate().take(nq) {
                let q = &kq.q8[m * kq.stride + kq.at[g] + 4 * (c - a)..][..4];
                let w = i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8]);
                *am = _mm512_dpbusd_epi32(*am, x, _mm512_set1_epi32(w));
            }
        }
        // SAFETY: the group's 16 parameters from entry g ring lie in the slices (checked above); unaligned
        // reads; every gathered index is a byte, under the FP8 table's 256 entries.
        let (s, z) = unsafe {
            match params {
                BlockParams::F16 { scale, zero, .. } => (
                    _mm512_cvtph_ps(_mm256_loadu_si256(scale.as_ptr().add(g * ring).cast())),
                    _mm512_cvtph_ps(_mm256_loadu_si256(zero.as_ptr().add(g * ring).cast())),
                ),
                BlockParams::Fp8 { scale, zero, .. } => {
                    let si = _mm512_cvtepu8_epi32(_mm_loadu_si128(scale.as_ptr().add(g * ring).cast()));
                    let zi = _mm512_cvtepu8_epi32(_mm_loadu_si128(zero.as_ptr().add(g * ring).cast()));
                    (_mm512_i32gather_ps::<4>(si, fp8.as_ptr()), _mm512_i32gather_ps::<4>(zi, fp8.as_ptr()))
                }
            }
        };
        for (m, sc) in score.iter_mut().enumerate().take(nq) {
            let (dl, qs) = (kq.delta[m * groups + g], kq.qsum[m * groups + g]);
            let x = _mm512_mul_ps(_mm512_mul_ps(s, _mm512_set1_ps(dl)), _mm512_cvtepi32_ps(acc[m]));
            *sc = _mm512_add_ps(*sc, x);
            *sc = _mm512_add_ps(*sc, _mm512_mul_ps(z, _mm512_set1_ps(qs)));
        }
    }
    for (m, sc) in score.iter().enumerate().take(nq) {
        let at = (q0 + m) * out.stride + out.pos + t0;
        // SAFETY: `at + 16` is within `out.data` (checked above); an unaligned store.
        unsafe { _mm512_storeu_ps(out.data.as_mut_ptr().add(at), *sc) };
    }
}

/// [`token_keys_q8`]'s byte indices into a pair of row vectors: qword `k` (of 0-3, repeated for 4-7 from
/// the other pair) takes byte 0 of rows `2k % 4`, `2k % 4 + 1` of the pair's first vector, or of its
/// second for `k >= 2`; the other six bytes repeat the pair.
const QUAD_PAIR: [i64; 4] = [pair_index(0), pair_index(32), pair_index(64), pair_index(96)];

/// A qword of byte indices `[i, i + 16]` repeated four times.
const fn pair_index(i: i64) -> i64 {
    let two = i | (i + 16) << 8;
    two | two << 16 | two << 32 | two << 48
}
