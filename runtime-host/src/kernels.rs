//! Weight dot-product kernels: AVX2/FMA integer dots of 32-element ggml blocks and of Q4_K/Q6_K
//! super-blocks against 16-bit activations, and f32 dots, chosen at run time; the scalar versions in
//! [`crate::quants`] are the reference.
//!
//! The `unsafe` pays: the AVX2 kernels measured 9-12x faster than the portable ones at one token and 17-20x
//! at eight on SmolLM2's matrices (2-vCPU AMD EPYC, 2026-11-23; `examples/matvec --portable` times both),
//! and the fused K-quant dot ([`dot_kquant`]) 1.27-1.37x faster than dequantizing the row first on Gemma 3's
//! (Zen 4, 2026-12-07, docs/decode-speed.md), and the 8-row kernel over packed matrices ([`dots_packed`])
//! took SmolLM2's decode-step products from 9.2-10.4 to 5.6-5.7 ms on one thread (the same machine and
//! page). Each vector load reads through a pointer into a slice whose length is asserted first.
#![allow(unsafe_code)]

use crate::gguf::TensorType;
use crate::quants::{self, Q16Act};

/// Whether the AVX2/FMA kernels run on this CPU.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `row` (blocks of a 32-element type) · activations `a` for `M` tokens at once, token `m`'s activations
/// starting at block `b0[m]`: each weight block is decoded once for all `M`.
///
/// Q4_1's block minimums enter as `hsum(scaled integer sums) + Σ_i m_i s_i`, the second sum one f32 FMA
/// chain over the blocks in order; [`dots_scaled`] and [`add_mins`] compute the same two parts apart
/// (the minimums for many tokens at once), with the same bits.
pub fn dot_q16<const M: usize>(
    ty: TensorType,
    row: &[u8],
    a: &Q16Act,
    b0: [usize; M],
    avx2: bool,
) -> [f32; M] {
    dot_q16_with::<M, true>(ty, RowRef::Plain(row), a, b0, avx2)
}

/// A row of a 32-element integer block type as the kernels read it: in the file's layout, or row `r` of
/// a packed group of [`PACK_ROWS`] rows of `row_bytes` ([`pack_rows`]).
#[derive(Clone, Copy, Debug)]
pub enum RowRef<'a> {
    /// The row's bytes, blocks one after another.
    Plain(&'a [u8]),
    /// Row `r` of the packed group `group`.
    Packed {
        /// The group's bytes (`PACK_ROWS * row_bytes`).
        group: &'a [u8],
        /// The row within the group.
        r: usize,
        /// Bytes of one row.
        row_bytes: usize,
    },
}

impl<'a> From<&'a [u8]> for RowRef<'a> {
    fn from(row: &'a [u8]) -> Self {
        RowRef::Plain(row)
    }
}

impl<'a> RowRef<'a> {
    /// Blocks of `ty` in the row.
    fn blocks(&self, ty: TensorType) -> usize {
        match *self {
            RowRef::Plain(row) => row.len() / ty.block_bytes(),
            RowRef::Packed { row_bytes, .. } => row_bytes / ty.block_bytes(),
        }
    }

    /// Row `k` of a matrix packed by [`pack_rows`] (`packed` holds its rows of `row_bytes` from row 0).
    pub fn of_packed(packed: &'a [u8], row_bytes: usize, k: usize) -> Self {
        let g = PACK_ROWS * row_bytes;
        RowRef::Packed { group: &packed[k / PACK_ROWS * g..][..g], r: k % PACK_ROWS, row_bytes }
    }

    /// Where the fields of the row's blocks lie in [`Self::bytes`], for kernel type `t` (see [`FIELDS`]).
    fn at(&self, t: usize) -> BlockAt {
        match *self {
            RowRef::Plain(_) => BlockAt::plain(t),
            RowRef::Packed { r, .. } => BlockAt::packed(t, r),
        }
    }

    /// The bytes the row's blocks lie in, checked to hold them.
    fn bytes(&self, ty: TensorType) -> &[u8] {
        match *self {
            RowRef::Plain(row) => row,
            RowRef::Packed { group, r, row_bytes } => {
                assert!(
                    r < PACK_ROWS
                        && group.len() >= PACK_ROWS * row_bytes
                        && row_bytes.is_multiple_of(ty.block_bytes()),
                    "packed row {r} of {row_bytes} bytes in a group of {}",
                    group.len()
                );
                &group[..PACK_ROWS * row_bytes]
            }
        }
    }

    /// The row in the file's layout (a copy for a packed row), for the portable kernels.
    fn plain(&self, ty: TensorType) -> std::borrow::Cow<'_, [u8]> {
        match *self {
            RowRef::Plain(row) => std::borrow::Cow::Borrowed(row),
            RowRef::Packed { r, row_bytes, .. } => {
                let mut row = vec![0u8; row_bytes];
                unpack_rows(ty, self.bytes(ty), row_bytes, r, &mut row);
                std::borrow::Cow::Owned(row)
            }
        }
    }

    /// The minimums `m` of the row's Q4_1 blocks, in order.
    fn mins(&self) -> impl Iterator<Item = f32> + '_ {
        let (at, bytes) = (self.at(2), self.bytes(TensorType::Q4_1));
        (0..self.blocks(TensorType::Q4_1)).map(move |i| quants::h(bytes, i * at.stride + at.mid))
    }
}

/// Where the fields of a row's blocks lie: block `i` at `i * stride`, its f16 scale at `+ d`, its middle
/// field (Q4_1's f16 minimum, Q5_0's high bits) at `+ mid`, its code bytes at `+ qs`.
#[derive(Clone, Copy, Debug)]
struct BlockAt {
    stride: usize,
    d: usize,
    mid: usize,
    qs: usize,
}

impl BlockAt {
    /// Blocks of kernel type `t` (see [`FIELDS`]) in the file's layout, one after another.
    const fn plain(t: usize) -> Self {
        Self { stride: block_bytes(t), d: 0, mid: 2, qs: codes_field(t).0 }
    }

    /// Row `r` of a packed group of kernel type `t` ([`pack_rows`]): a field at offset `o` of a block,
    /// `len` bytes long, holds the 8 rows' at `8 o + r * len`.
    const fn packed(t: usize, r: usize) -> Self {
        let f = FIELDS[t];
        let mid = if f.len() == 3 { PACK_ROWS * f[1].0 + r * f[1].1 } else { 0 };
        let (qs, qs_len) = codes_field(t);
        Self { stride: PACK_ROWS * block_bytes(t), d: 2 * r, mid, qs: PACK_ROWS * qs + r * qs_len }
    }

    /// Bytes from the first block's start to the end of block `nb - 1`'s codes (its last field).
    const fn span(&self, t: usize, nb: usize) -> usize {
        if nb == 0 { 0 } else { (nb - 1) * self.stride + self.qs + codes_field(t).1 }
    }
}

/// [`dot_q16`], or with `MIN` false without Q4_1's minimum terms (for the other types the same): the sum
/// over blocks of `dw * dy * Σ qw qy`.
fn dot_q16_with<const M: usize, const MIN: bool>(
    ty: TensorType,
    row: RowRef<'_>,
    a: &Q16Act,
    b0: [usize; M],
    avx2: bool,
) -> [f32; M] {
    let nb = row.blocks(ty);
    for &b in &b0 {
        assert!(
            a.q().len() >= (b + nb) * 32 && a.d.len() >= b + nb && a.s.len() >= b + nb,
            "activations shorter than the row"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        let t = kernel_type(ty).expect("dot_q16 takes 32-element integer block types only");
        let (bytes, at) = (row.bytes(ty), row.at(t));
        assert!(at.span(t, nb) <= bytes.len(), "row shorter than its blocks");
        // SAFETY: `avx2` is only true when `has_avx2()` found AVX2, FMA and F16C; the activations' lengths
        // are checked above, and the row's last block ends in `bytes` (checked above; its code bytes are
        // its last field).
        return unsafe {
            match t {
                0 => x86::dot::<0, M, MIN>(bytes.as_ptr(), nb, at, a, b0),
                1 => x86::dot::<1, M, MIN>(bytes.as_ptr(), nb, at, a, b0),
                2 => x86::dot::<2, M, MIN>(bytes.as_ptr(), nb, at, a, b0),
                _ => x86::dot::<3, M, MIN>(bytes.as_ptr(), nb, at, a, b0),
            }
        };
    }
    let _ = avx2;
    let plain = row.plain(ty);
    b0.map(|b| {
        let scaled = quants::dot_q16_scaled_ref(ty, &plain, a, b);
        if MIN && ty == TensorType::Q4_1 { scaled + min_chain(row.mins(), |i| a.s[b + i]) } else { scaled }
    })
}

/// The fields of the 32-element block types the integer kernels read, as (offset, length) in a block, in
/// order: the f16 scale first, the code bytes last (Q4_1's f16 minimum and Q5_0's 4 bytes of high bits
/// between). Indexed by the kernels' type number: Q8_0, Q4_0, Q4_1, Q5_0.
const FIELDS: [&[(usize, usize)]; 4] =
    [&[(0, 2), (2, 32)], &[(0, 2), (2, 16)], &[(0, 2), (2, 2), (4, 16)], &[(0, 2), (2, 4), (6, 16)]];

/// The code bytes' field, (offset, length), of kernel type `t`'s blocks: the last of [`FIELDS`].
const fn codes_field(t: usize) -> (usize, usize) {
    FIELDS[t][FIELDS[t].len() - 1]
}

/// Bytes of a block of kernel type `t` (`TensorType::block_bytes`): where its last field, the codes, ends.
const fn block_bytes(t: usize) -> usize {
    let (o, len) = codes_field(t);
    o + len
}

/// Rows of a packed group ([`pack_rows`]).
pub const PACK_ROWS: usize = 8;

/// The kernels' number of a 32-element integer block type, if `ty` is one.
fn kernel_type(ty: TensorType) -> Option<usize> {
    match ty {
        TensorType::Q8_0 => Some(0),
        TensorType::Q4_0 => Some(1),
        TensorType::Q4_1 => Some(2),
        TensorType::Q5_0 => Some(3),
        _ => None,
    }
}

/// Whether a matrix of `ty` with `rows` rows can be packed ([`pack_rows`]): Q8_0, Q4_0, Q4_1 or Q5_0, and
/// whole groups of [`PACK_ROWS`] rows.
pub fn packs(ty: TensorType, rows: usize) -> bool {
    kernel_type(ty).is_some() && rows.is_multiple_of(PACK_ROWS)
}

/// A matrix of `ty` (rows of `row_bytes`, whole groups of [`PACK_ROWS`]) in the layout [`dots_packed`]
/// reads: per group of 8 rows and per block, each field of the 8 rows' blocks side by side (the 8 scales,
/// then the 8 minimums or high bits, then the 8 rows' code bytes). The bytes are the same, moved: a
/// group of 8 rows takes `8 * row_bytes`, and [`unpack_rows`] gives the rows back.
///
/// # Panics
/// If `ty` does not pack or `rows` is not whole groups of rows.
pub fn pack_rows(ty: TensorType, rows: &[u8], row_bytes: usize) -> Vec<u8> {
    let mut out = vec![0u8; rows.len()];
    pack_rows_into(ty, rows, row_bytes, &mut out);
    out
}

/// [`pack_rows`] into `out`, which holds as many bytes as `rows`.
///
/// # Panics
/// As [`pack_rows`], or if `out`'s length differs from `rows`'.
pub fn pack_rows_into(ty: TensorType, rows: &[u8], row_bytes: usize, out: &mut [u8]) {
    let fields = FIELDS[kernel_type(ty).expect("pack_rows takes Q8_0, Q4_0, Q4_1 and Q5_0")];
    let bb = ty.block_bytes();
    assert!(
        row_bytes.is_multiple_of(bb) && rows.len().is_multiple_of(PACK_ROWS * row_bytes),
        "pack_rows: {} bytes are not whole groups of {PACK_ROWS} rows of {row_bytes}",
        rows.len()
    );
    assert_eq!(out.len(), rows.len(), "pack_rows: the packed matrix takes as many bytes as the rows");
    for (src, dst) in
        rows.chunks_exact(PACK_ROWS * row_bytes).zip(out.chunks_exact_mut(PACK_ROWS * row_bytes))
    {
        for (r, row) in src.chunks_exact(row_bytes).enumerate() {
            for (blk, packed) in row.chunks_exact(bb).zip(dst.chunks_exact_mut(PACK_ROWS * bb)) {
                for &(o, len) in fields {
                    packed[PACK_ROWS * o + r * len..][..len].copy_from_slice(&blk[o..o + len]);
                }
            }
        }
    }
}

/// Rows `r0..r0 + out.len() / row_bytes` of a matrix packed by [`pack_rows`], back in the file's layout.
///
/// # Panics
/// If `ty` does not pack, or the rows do not lie in `packed`.
pub fn unpack_rows(ty: TensorType, packed: &[u8], row_bytes: usize, r0: usize, out: &mut [u8]) {
    let fields = FIELDS[kernel_type(ty).expect("unpack_rows takes Q8_0, Q4_0, Q4_1 and Q5_0")];
    let bb = ty.block_bytes();
    for (k, row) in out.chunks_exact_mut(row_bytes).enumerate() {
        let (g, r) = ((r0 + k) / PACK_ROWS, (r0 + k) % PACK_ROWS);
        let group = &packed[g * PACK_ROWS * row_bytes..][..PACK_ROWS * row_bytes];
        for (blk, src) in row.chunks_exact_mut(bb).zip(group.chunks_exact(PACK_ROWS * bb)) {
            for &(o, len) in fields {
                blk[o..o + len].copy_from_slice(&src[PACK_ROWS * o + r * len..][..len]);
            }
        }
    }
}

/// One token's dots (activations from block 0) with the rows of a packed matrix ([`pack_rows`]; `packed`
/// holds `out.len()` rows of `row_bytes`, whole groups): `out[k]` is [`dot_q16`] of row `k`, bit for bit.
/// The vector kernel takes 8 rows at a time: each block's scales (and minimums) are converted once for
/// the 8 rows, and the 8 rows' FMA chains overlap. On SmolLM2's Q4_1 matrices this read 1.7x as many
/// bytes a second as one row at a time (Zen 4, one thread; docs/decode-speed.md).
///
/// # Panics
/// If `ty` does not pack, the rows are not whole groups in `packed`, or `a` holds fewer blocks than a row.
pub fn dots_packed(ty: TensorType, packed: &[u8], row_bytes: usize, a: &Q16Act, out: &mut [f32], avx2: bool) {
    dots_packed_with(ty, packed, row_bytes, a, out, avx2, avx2 && has_avx512bw());
}

/// Whether this CPU has AVX-512 F, BW and VL (the masked Q5_0 codes of [`dots_packed`]).
pub fn has_avx512bw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`dots_packed`] with the AVX-512 kernel for Q5_0 on or off (`avx512` only where [`has_avx512bw`]).
fn dots_packed_with(
    ty: TensorType,
    packed: &[u8],
    row_bytes: usize,
    a: &Q16Act,
    out: &mut [f32],
    avx2: bool,
    avx512: bool,
) {
    let t = kernel_type(ty).expect("dots_packed takes Q8_0, Q4_0, Q4_1 and Q5_0");
    let nb = row_bytes / ty.block_bytes();
    assert!(
        out.len().is_multiple_of(PACK_ROWS) && packed.len() >= out.len() * row_bytes,
        "dots_packed: {} rows of {row_bytes} bytes in {}",
        out.len(),
        packed.len()
    );
    assert!(a.q().len() >= nb * 32 && a.d.len() >= nb && a.s.len() >= nb, "activations shorter than the row");
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        for (g, o) in out.chunks_exact_mut(PACK_ROWS).enumerate() {
            let p = packed[g * PACK_ROWS * row_bytes..][..PACK_ROWS * row_bytes].as_ptr();
            // SAFETY: `avx2` is only true when `has_avx2()` found AVX2, FMA and F16C, and `avx512` where
            // `has_avx512bw()` found AVX-512 F, BW and VL; the group lies in `packed` (resliced above) and
            // `a` holds nb blocks (checked above).
            let dots = unsafe {
                match t {
                    0 => x86::dot8::<0>(p, nb, a),
                    1 => x86::dot8::<1>(p, nb, a),
                    2 => x86::dot8::<2>(p, nb, a),
                    _ if avx512 => x86::dot8_q5_avx512(p, nb, a),
                    _ => x86::dot8::<3>(p, nb, a),
                }
            };
            o.copy_from_slice(&dots);
        }
        return;
    }
    for (k, o) in out.iter_mut().enumerate() {
        *o = dot_q16_with::<1, true>(ty, RowRef::of_packed(packed, row_bytes, k), a, [0], avx2)[0];
    }
}

/// [`dot_q16`] without Q4_1's minimum terms, of `row` for the tokens `ts` into `out[t]`, token `t`'s
/// activations starting at block `t * bpr`: four tokens per kernel call while they fill one, then one at a
/// time.
pub fn dots_scaled<'r>(
    ty: TensorType,
    row: impl Into<RowRef<'r>>,
    a: &Q16Act,
    bpr: usize,
    ts: std::ops::Range<usize>,
    out: &mut [f32],
    avx2: bool,
) {
    let row = row.into();
    let mut t = ts.start;
    while t + 4 <= ts.end {
        let b = [t * bpr, (t + 1) * bpr, (t + 2) * bpr, (t + 3) * bpr];
        out[t..t + 4].copy_from_slice(&dot_q16_with::<4, false>(ty, row, a, b, avx2));
        t += 4;
    }
    for (tt, o) in out.iter_mut().enumerate().take(ts.end).skip(t) {
        *o = dot_q16_with::<1, false>(ty, row, a, [tt * bpr], avx2)[0];
    }
}

/// `Σ_i m_i s(i)` over a row's minimums as one f32 FMA chain in block order: the chain every path runs (the
/// vector kernel's `offs`, the lanes of the vector `add_mins`), so their results agree bit for bit.
fn min_chain(mins: impl Iterator<Item = f32>, s: impl Fn(usize) -> f32) -> f32 {
    mins.enumerate().fold(0f32, |o, (i, m)| m.mul_add(s(i), o))
}

/// Adds Q4_1's minimum terms of `row` for `n` tokens: `out[t] += Σ_i m_i st[i * n + t]`, where `st` holds
/// the activation blocks' `d * Σ q` block-major (`st[i * n + t]` = token `t`'s block `i`). The sum for each
/// token is the FMA chain [`dot_q16`] runs, so `dots_scaled + add_mins` equals `dot_q16` bit for bit.
/// Other types have no minimum: nothing is added.
pub fn add_mins<'r>(
    ty: TensorType,
    row: impl Into<RowRef<'r>>,
    st: &[f32],
    n: usize,
    out: &mut [f32],
    avx2: bool,
) {
    if ty != TensorType::Q4_1 {
        return;
    }
    let row = row.into();
    let nb = row.blocks(ty);
    assert!(st.len() >= nb * n && out.len() >= n, "add_mins: {n} tokens, {nb} blocks, st {}", st.len());
    // The minimums as f32 once per row: on the stack for rows up to 8192 columns.
    let mut stack = [0f32; 256];
    let mut heap = Vec::new();
    let mins: &mut [f32] = if nb <= stack.len() {
        &mut stack[..nb]
    } else {
        heap.resize(nb, 0.0);
        &mut heap
    };
    for (m, v) in mins.iter_mut().zip(row.mins()) {
        *m = v;
    }
    let mins = &*mins;
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: as in `dot_q16`; st holds nb rows of n tokens and out n tokens (checked above).
        t = unsafe { x86::add_mins(mins, st, n, out) };
    }
    let _ = avx2;
    for (tt, o) in out.iter_mut().enumerate().take(n).skip(t) {
        *o += min_chain(mins.iter().copied(), |i| st[i * n + tt]);
    }
}

/// Dequantizes a row of `ty` into `out`, as [`quants::dequant_row`] does and with the same bits: Q4_K and
/// Q6_K rows (the only types the f32 path takes in the default mode) have AVX2 versions that do the same
/// f32 multiply and subtract per element, eight at a time. Measured on Gemma 3 270M, whose feed-forward
/// matrices are Q4_K and Q6_K: the scalar loop was 27% of a decode step (`perf record`, 1 thread).
///
/// # Panics
/// As [`quants::dequant_row`].
pub fn dequant_row(ty: TensorType, bytes: &[u8], out: &mut [f32], avx2: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2 && matches!(ty, TensorType::Q4K | TensorType::Q6K) {
        for (b, o) in quants::row_blocks(ty, bytes, out) {
            // SAFETY: AVX2/F16C present (`avx2` comes from `has_avx2`); `b` is one whole block of `ty` and
            // `o` its 256 outputs, as `row_blocks` checks.
            unsafe {
                if ty == TensorType::Q4K {
                    x86::dequant_q4k(b, o);
                } else {
                    x86::dequant_q6k(b, o);
                }
            }
        }
        return;
    }
    let _ = avx2;
    quants::dequant_row(ty, bytes, out);
}

/// `w · x` in f32.
pub fn dot_f32(w: &[f32], x: &[f32], avx2: bool) -> f32 {
    assert_eq!(w.len(), x.len(), "dot of unequal lengths");
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: as in `dot_q16`; equal lengths checked above.
        return unsafe { x86::dot_f32(w, x) };
    }
    let _ = avx2;
    dot_f32_ref(w, x)
}

/// `dequant(row) · x` for a Q4_K or Q6_K row, the bits of [`dequant_row`] then [`dot_f32`] (the AVX2
/// pair) without storing the row: each element is formed as `dequant_row` forms it and enters
/// `dot_f32`'s accumulator at its place in `dot_f32`'s order. For one token (a decode step) this halves
/// the work per element; a chunk of tokens dequantizes the row once instead.
///
/// # Panics
/// If `ty` is not Q4_K or Q6_K, the row is not whole super-blocks, or `x` is not as long as the row.
pub fn dot_kquant(ty: TensorType, row: &[u8], x: &[f32], avx2: bool) -> f32 {
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    assert!(matches!(ty, TensorType::Q4K | TensorType::Q6K), "dot_kquant takes Q4_K and Q6_K rows");
    assert!(
        row.len().is_multiple_of(bb) && x.len() == row.len() / bb * bl,
        "row of {ty} has the wrong length"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is only true when `has_avx2()` found AVX2, FMA and F16C; lengths checked above.
        return unsafe { if ty == TensorType::Q4K { x86::dot_q4k(row, x) } else { x86::dot_q6k(row, x) } };
    }
    let mut buf = vec![0f32; x.len()];
    dequant_row(ty, row, &mut buf, avx2);
    dot_f32(&buf, x, avx2)
}

/// A Q4_K or Q6_K row · 16-bit activations for `M` tokens at once, token `m`'s from block `b0[m]` (the
/// row's super-block `i` against activation blocks `b0[m] + 8i ..`): each super-block's codes are decoded
/// once for all `M`. The vector kernel and the portable path ([`quants::dot_kq16_ref`]) give the same bits.
///
/// Against the fused f32 dot ([`dot_kquant`]) this multiplies integers, 16 products per `vpmaddwd`, and
/// folds the sub-block scales in once per 16 or 32 elements, where the f32 dot forms every element as a
/// float first: Gemma 3's `o` (Q4_K) and `down` (Q6_K) products of a decode step went from 1.39-2.07 to
/// 0.63-0.83 ms and from 3.11-4.52 to 1.40-1.82 ms on one thread (Zen 4; docs/decode-speed.md).
///
/// # Panics
/// If `ty` is neither, the row is not whole super-blocks, or `a` holds fewer blocks than the row from some
/// `b0[m]`.
pub fn dot_kq16<const M: usize>(
    ty: TensorType,
    row: &[u8],
    a: &Q16Act,
    b0: [usize; M],
    avx2: bool,
) -> [f32; M] {
    assert!(matches!(ty, TensorType::Q4K | TensorType::Q6K), "dot_kq16 takes Q4_K and Q6_K rows");
    let bb = ty.block_bytes();
    assert!(row.len().is_multiple_of(bb), "row of {ty} has the wrong length");
    let nb = row.len() / bb;
    for &b in &b0 {
        let end = b + 8 * nb;
        assert!(
            a.q().len() >= end * 32 && a.d.len() >= end && a.s.len() >= end,
            "activations shorter than the row"
        );
    }
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is only true when `has_avx2()` found AVX2, FMA and F16C; the row is whole
        // super-blocks and the activations hold each token's blocks (both checked above).
        return unsafe {
            if ty == TensorType::Q4K { x86::dot_q4k16(row, a, b0) } else { x86::dot_q6k16(row, a, b0) }
        };
    }
    let _ = avx2;
    b0.map(|b| quants::dot_kq16_ref(ty, row, a, b))
}

/// [`quants::quantize_block`] on AVX2, with its bits: one block of 32 activations into 16-bit codes;
/// returns `d` and `d * sum(q)`. The maximum ignores NaN as `f32::max` does, the rounding is the same
/// multiply, add and subtract (not fused), and the conversion zeroes NaN and saturates as `as i16` does.
/// It runs for every product's input, on one thread for a decode step: 1.7-2% of SmolLM2's decode samples
/// as scalar code (`perf`, `kvq bench --depths 0`).
///
/// # Panics
/// If `xb` or `qb` is not 32 long.
pub fn quantize_q16_block(xb: &[f32], qb: &mut [i16]) -> (f32, f32) {
    assert!(xb.len() == 32 && qb.len() == 32, "a block is 32 activations");
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: `has_avx2()` found AVX2, FMA and F16C; both slices hold 32 elements (asserted above).
        return unsafe { x86::quantize_block(xb, qb) };
    }
    quants::quantize_block(xb, qb)
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
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s)
    }

    /// The f16 at `b`, broadcast to 8 f32 lanes (a broadcast load: no dependency on an older register).
    ///
    /// # Safety
    /// `b` points at two readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16x8_at(b: *const u8) -> __m256 {
        // SAFETY: caller's contract; an unaligned 2-byte read.
        let bits = unsafe { b.cast::<i16>().read_unaligned() };
        _mm256_cvtph_ps(_mm_set1_epi16(bits))
    }

    /// Low and high nibbles of 16 bytes at `p` as two vectors of 16 i16: elements 0..16 and 16..32 (one
    /// widening of the bytes, then a mask and a shift within lanes).
    ///
    /// # Safety
    /// `p` points at 16 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles16(p: *const u8) -> [__m256i; 2] {
        // SAFETY: caller's contract; unaligned 16-byte load.
        let w = _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(p.cast()) });
        [_mm256_and_si256(w, _mm256_set1_epi16(15)), _mm256_srli_epi16::<4>(w)]
    }

    /// Bits 0..16 of `bits` as 16 i16 lanes holding 0x10 where the bit is set.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn bit4_lanes(bits: u32) -> __m256i {
        let sel =
            _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, i16::MIN);
        let v = _mm256_and_si256(_mm256_set1_epi16(bits as u16 as i16), sel);
        _mm256_and_si256(_mm256_cmpeq_epi16(v, sel), _mm256_set1_epi16(0x10))
    }

    /// The 32 codes of a block of type `T` (0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q5_0) as two vectors of 16 i16
    /// (elements 0..16 and 16..32), from its code bytes at `qs` and (Q5_0) its high bits at `qh`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `qs` points at the block's code bytes and, for Q5_0, `qh` at its four
    /// bytes of high bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn codes<const T: u8>(qs: *const u8, qh: *const u8) -> [__m256i; 2] {
        // SAFETY: caller's contract: every read below lies in the block's fields.
        unsafe {
            match T {
                0 => [
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(qs.cast())),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(qs.add(16).cast())),
                ],
                1 => {
                    let [lo, hi] = nibbles16(qs);
                    let eight = _mm256_set1_epi16(8);
                    [_mm256_sub_epi16(lo, eight), _mm256_sub_epi16(hi, eight)]
                }
                2 => nibbles16(qs),
                _ => {
                    let qh = qh.cast::<u32>().read_unaligned();
                    let [lo, hi] = nibbles16(qs);
                    let sixteen = _mm256_set1_epi16(16);
                    [
                        _mm256_sub_epi16(_mm256_or_si256(lo, bit4_lanes(qh)), sixteen),
                        _mm256_sub_epi16(_mm256_or_si256(hi, bit4_lanes(qh >> 16)), sixteen),
                    ]
                }
            }
        }
    }

    /// The block of type `T` whose fields lie at `at`'s offsets from `b` (see [`super::BlockAt`]): its codes
    /// ([`codes`]), its scale `d` and (Q4_1) its minimum `m`, each broadcast to 8 f32 lanes (zero for the
    /// other types).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; the block's fields lie in readable memory at those offsets.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<const T: u8>(b: *const u8, at: BlockAt) -> ([__m256i; 2], __m256, __m256) {
        // SAFETY: caller's contract: the fields lie at `at`'s offsets from `b`.
        unsafe {
            let m = if T == 2 { f16x8_at(b.add(at.mid)) } else { _mm256_setzero_ps() };
            (codes::<T>(b.add(at.qs), b.add(at.mid)), f16x8_at(b.add(at.d)), m)
        }
    }

    /// One block's term of a dot: `acc + f32(Σ w y) * scale`, the integer sum over the block's 32
    /// activations at `y`, `scale` the weights' scale times the activations' (`dw * dy`).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `y` points at 32 readable i16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_term(w: &[__m256i; 2], scale: __m256, y: *const i16, acc: __m256) -> __m256 {
        // SAFETY: caller's contract; unaligned 32-byte loads.
        let p = unsafe {
            _mm256_add_epi32(
                _mm256_madd_epi16(w[0], _mm256_loadu_si256(y.cast())),
                _mm256_madd_epi16(w[1], _mm256_loadu_si256(y.add(16).cast())),
            )
        };
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc)
    }

    /// Dot of a row of type `T` (0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q5_0; `nb` blocks from `rp`, their fields at
    /// `at`) with `M` tokens' 16-bit activations.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; the `nb` blocks' fields lie in readable memory; `a` holds blocks
    /// `b0[m]..b0[m] + nb` for every m.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot<const T: u8, const M: usize, const MIN: bool>(
        rp: *const u8,
        nb: usize,
        at: BlockAt,
        a: &Q16Act,
        b0: [usize; M],
    ) -> [f32; M] {
        let (yp, dp, sp) = (a.q().as_ptr(), a.d.as_ptr(), a.s.as_ptr());
        let mut acc = [_mm256_setzero_ps(); M];
        let mut offs = [_mm256_setzero_ps(); M];
        for i in 0..nb {
            // SAFETY: block i's fields lie in readable memory (i < nb); activation block b0[m] + i lies in
            // `a` (the caller's contract, checked by `dot_q16`).
            unsafe {
                let (w, dw, mw) = block::<T>(rp.add(i * at.stride), at);
                if MIN && T == 2 {
                    for (o, &b0m) in offs.iter_mut().zip(&b0) {
                        *o = _mm256_fmadd_ps(mw, _mm256_set1_ps(*sp.add(b0m + i)), *o);
                    }
                }
                for m in 0..M {
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*dp.add(b0[m] + i)));
                    acc[m] = block_term(&w, scale, yp.add((b0[m] + i) * 32), acc[m]);
                }
            }
        }
        let mut out = [0f32; M];
        for m in 0..M {
            // Every lane of offs[m] holds the same sum.
            out[m] = if MIN && T == 2 { hsum(acc[m]) + _mm256_cvtss_f32(offs[m]) } else { hsum(acc[m]) };
        }
        out
    }

    /// One token's dots with a packed group of 8 rows of type `T` ([`super::pack_rows`]), as [`dot`] with
    /// `M = 1`, `b0 = [0]` and `MIN` computes each row, with the same bits: a block's 8 scales (and Q4_1's
    /// minimums) are one vector, converted and scaled by the activations' once for the 8 rows, whose
    /// lane `r` is what [`dot`] broadcasts for row `r`; the minimums' 8 FMA chains run in one vector.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `g` points at a packed group of `nb` blocks a row, and `a` holds `nb`
    /// blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot8<const T: u8>(g: *const u8, nb: usize, a: &Q16Act) -> [f32; 8] {
        // SAFETY: the caller's contract.
        unsafe { dot8_in::<T, false>(g, nb, a) }
    }

    /// [`dot8`] for Q5_0 with AVX-512 (BW, VL) masks: a row's 32 high bits are two mask registers, and
    /// `code - 16` gains its 16 where the bit is set in one masked add, where AVX2 spreads each bit over a
    /// lane with four operations. The codes are the same integers, so the dots keep their bits.
    ///
    /// # Safety
    /// As [`dot8`], and the CPU has AVX-512 F, BW and VL.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn dot8_q5_avx512(g: *const u8, nb: usize, a: &Q16Act) -> [f32; 8] {
        // SAFETY: the caller's contract.
        unsafe { dot8_in::<3, true>(g, nb, a) }
    }

    /// Q5_0's codes as [`codes`] gives them, with AVX-512 masks for the high bits (see [`dot8_q5_avx512`]).
    ///
    /// # Safety
    /// As [`codes`], and the CPU has AVX-512 F, BW and VL.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn codes_q5_masked(qs: *const u8, qh: *const u8) -> [__m256i; 2] {
        // SAFETY: caller's contract: 4 bytes of high bits at `qh`, 16 code bytes at `qs`.
        let (qh, [lo, hi]) = unsafe { (qh.cast::<u32>().read_unaligned(), nibbles16(qs)) };
        let (sixteen, k) = (_mm256_set1_epi16(16), [qh as __mmask16, (qh >> 16) as __mmask16]);
        let [lo, hi] = [_mm256_sub_epi16(lo, sixteen), _mm256_sub_epi16(hi, sixteen)];
        [_mm256_mask_add_epi16(lo, k[0], lo, sixteen), _mm256_mask_add_epi16(hi, k[1], hi, sixteen)]
    }

    /// [`dot8`]'s loop, inlined into each caller's target features; `K`: Q5_0's codes by masks.
    ///
    /// # Safety
    /// As [`dot8`], and, where `K`, as [`dot8_q5_avx512`].
    #[inline(always)]
    unsafe fn dot8_in<const T: u8, const K: bool>(g: *const u8, nb: usize, a: &Q16Act) -> [f32; 8] {
        let bb8 = PACK_ROWS * block_bytes(T as usize);
        let (yp, dp, sp) = (a.q().as_ptr(), a.d.as_ptr(), a.s.as_ptr());
        // SAFETY: block i of the group and activation block i lie in the buffers for i < nb (the caller's
        // contract); a field at offset `o` of a block holds the 8 rows' at `8 o + r * len`. The caller's
        // target features hold every intrinsic's.
        unsafe {
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut offs = _mm256_setzero_ps();
            for i in 0..nb {
                let b = g.add(i * bb8);
                let sc =
                    _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(b.cast())), _mm256_set1_ps(*dp.add(i)));
                if T == 2 {
                    let m = _mm256_cvtph_ps(_mm_loadu_si128(b.add(16).cast()));
                    offs = _mm256_fmadd_ps(m, _mm256_set1_ps(*sp.add(i)), offs);
                }
                let y = yp.add(i * 32);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let at = BlockAt::packed(T as usize, r);
                    let (qs, qh) = (b.add(at.qs), b.add(at.mid));
                    let w = if K { codes_q5_masked(qs, qh) } else { codes::<T>(qs, qh) };
                    *acc = block_term(&w, _mm256_permutevar8x32_ps(sc, _mm256_set1_epi32(r as i32)), y, *acc);
                }
            }
            let mut out = [0f32; 8];
            _mm256_storeu_ps(out.as_mut_ptr(), offs);
            for (o, acc) in out.iter_mut().zip(acc) {
                *o = if T == 2 { hsum(acc) + *o } else { hsum(acc) };
            }
            out
        }
    }

    /// The vector part of [`super::add_mins`]: tokens in groups of 8; returns how many it did.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `st.len() >= mins.len() * n`, `out.len() >= n`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn add_mins(mins: &[f32], st: &[f32], n: usize, out: &mut [f32]) -> usize {
        let (sp, op) = (st.as_ptr(), out.as_mut_ptr());
        let mut t = 0;
        while t + 8 <= n {
            let mut o = _mm256_setzero_ps();
            for (i, &m) in mins.iter().enumerate() {
                // SAFETY: i * n + t + 8 <= mins.len() * n <= st.len().
                o = _mm256_fmadd_ps(_mm256_set1_ps(m), unsafe { _mm256_loadu_ps(sp.add(i * n + t)) }, o);
            }
            // SAFETY: t + 8 <= n <= out.len().
            unsafe { _mm256_storeu_ps(op.add(t), _mm256_add_ps(_mm256_loadu_ps(op.add(t)), o)) };
            t += 8;
        }
        t
    }

    /// The eight bytes at `p` in the low half of a vector.
    ///
    /// # Safety
    /// `p` points at 8 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bytes8(p: *const u8) -> __m128i {
        // SAFETY: caller's contract; an unaligned 8-byte load.
        unsafe { _mm_loadl_epi64(p.cast()) }
    }

    /// Eight unsigned byte codes (low 8 bytes of `v`) minus `bias`, as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn codes_ps(v: __m128i, bias: i32) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(v), _mm256_set1_epi32(bias)))
    }

    /// The scales and minimums of Q4_K sub-blocks `2j` and `2j + 1`, broadcast: `[d1, n1, d2, n2]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q4k_scales(d: f32, dmin: f32, sc: &[u8], j: usize) -> [__m256; 4] {
        let (s1, m1) = quants::scale_min_k4(2 * j, sc);
        let (s2, m2) = quants::scale_min_k4(2 * j + 1, sc);
        [
            _mm256_set1_ps(d * f32::from(s1)),
            _mm256_set1_ps(dmin * f32::from(m1)),
            _mm256_set1_ps(d * f32::from(s2)),
            _mm256_set1_ps(dmin * f32::from(m2)),
        ]
    }

    /// Eight low-nibble and eight high-nibble elements of a Q4_K sub-block pair from the 8 code bytes at
    /// `p`: `d * q - n`, the multiply and the subtract rounded apart as in the scalar code.
    ///
    /// # Safety
    /// `p` points at 8 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4k_pair(p: *const u8, sm: &[__m256; 4]) -> [__m256; 2] {
        let m4 = _mm_set1_epi8(15);
        // SAFETY: the caller's contract.
        let v = unsafe { bytes8(p) };
        let lo = codes_ps(_mm_and_si128(v, m4), 0);
        let hi = codes_ps(_mm_and_si128(_mm_srli_epi16::<4>(v), m4), 0);
        [_mm256_sub_ps(_mm256_mul_ps(sm[0], lo), sm[1]), _mm256_sub_ps(_mm256_mul_ps(sm[2], hi), sm[3])]
    }

    /// One Q4_K super-block (144 bytes) into 256 floats: `d * sc * q - dmin * m` per element, the
    /// multiply and the subtract rounded apart as in the scalar code.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `b.len() >= 144`, `out.len() >= 256` (asserted).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequant_q4k(b: &[u8], out: &mut [f32]) {
        assert!(b.len() >= 144 && out.len() >= 256);
        let (d, dmin) = (quants::h(b, 0), quants::h(b, 2));
        let sc = &b[4..16];
        let (qp, op) = (b[16..].as_ptr(), out.as_mut_ptr());
        for j in 0..4 {
            let sm = q4k_scales(d, dmin, sc, j);
            for l in (0..32).step_by(8) {
                // SAFETY: 32j + l + 8 <= 128 code bytes after byte 16 (b.len() >= 144); outputs
                // 64j + l + 32 + 8 <= 256.
                unsafe {
                    let [lo, hi] = q4k_pair(qp.add(32 * j + l), &sm);
                    _mm256_storeu_ps(op.add(64 * j + l), lo);
                    _mm256_storeu_ps(op.add(64 * j + 32 + l), hi);
                }
            }
        }
    }

    /// The four 6-bit code runs of a Q6_K half at column `l` (elements `l`, `l + 32`, `l + 64`, `l + 96`
    /// of the half, eight each) as bytes: low nibbles from `ql`, high pairs from `qh`.
    ///
    /// # Safety
    /// `ql + l + 40` and `qh + l + 8` bytes are readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6k_codes(ql: *const u8, qh: *const u8, l: usize) -> [__m128i; 4] {
        let (m4, m2) = (_mm_set1_epi8(15), _mm_set1_epi8(3));
        // SAFETY: the caller's contract.
        let (a, c, hb) = unsafe { (bytes8(ql.add(l)), bytes8(ql.add(l + 32)), bytes8(qh.add(l))) };
        // Each high pair is at most 3, so shifting it left by 4 in 16-bit lanes stays in its byte.
        let hi = |sh: i32| {
            let x = match sh {
                0 => hb,
                2 => _mm_srli_epi16::<2>(hb),
                4 => _mm_srli_epi16::<4>(hb),
                _ => _mm_srli_epi16::<6>(hb),
            };
            _mm_slli_epi16::<4>(_mm_and_si128(x, m2))
        };
        [
            _mm_or_si128(_mm_and_si128(a, m4), hi(0)),
            _mm_or_si128(_mm_and_si128(c, m4), hi(2)),
            _mm_or_si128(_mm_and_si128(_mm_srli_epi16::<4>(a), m4), hi(4)),
            _mm_or_si128(_mm_and_si128(_mm_srli_epi16::<4>(c), m4), hi(6)),
        ]
    }

    /// One Q6_K super-block (210 bytes) into 256 floats: `(d * sc) * (q - 32)` per element, as the scalar
    /// code rounds it.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `b.len() >= 210`, `out.len() >= 256` (asserted).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dequant_q6k(b: &[u8], out: &mut [f32]) {
        assert!(b.len() >= 210 && out.len() >= 256);
        let d = quants::h(b, 208);
        let op = out.as_mut_ptr();
        for n in 0..2 {
            let (ql, qh) = (b[64 * n..].as_ptr(), b[128 + 32 * n..].as_ptr());
            let sc = &b[192 + 8 * n..200 + 8 * n];
            let s = |k: usize| _mm256_set1_ps(d * f32::from(sc[k] as i8));
            for l in (0..32).step_by(8) {
                let is = l / 16;
                // SAFETY: ql + l + 32 + 8 <= 64 bytes of this half, qh + l + 8 <= 32; outputs
                // 128n + l + 96 + 8 <= 256.
                unsafe {
                    let [q1, q2, q3, q4] = q6k_codes(ql, qh, l);
                    let y = op.add(128 * n + l);
                    _mm256_storeu_ps(y, _mm256_mul_ps(s(is), codes_ps(q1, 32)));
                    _mm256_storeu_ps(y.add(32), _mm256_mul_ps(s(is + 2), codes_ps(q2, 32)));
                    _mm256_storeu_ps(y.add(64), _mm256_mul_ps(s(is + 4), codes_ps(q3, 32)));
                    _mm256_storeu_ps(y.add(96), _mm256_mul_ps(s(is + 6), codes_ps(q4, 32)));
                }
            }
        }
    }

    /// [`super::dot_kquant`] of a Q4_K row: [`dequant_q4k`]'s elements, each 8 taken into [`dot_f32`]'s
    /// accumulator `(element % 32) / 8` in the order `dot_f32` takes them.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `row` is whole 144-byte super-blocks and `x` 256 floats for each.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4k(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (sb, b) in row.chunks_exact(144).enumerate() {
            let (d, dmin) = (quants::h(b, 0), quants::h(b, 2));
            let sc = &b[4..16];
            let (qp, xp) = (b[16..].as_ptr(), x[256 * sb..][..256].as_ptr());
            for j in 0..4 {
                let sm = q4k_scales(d, dmin, sc, j);
                for (k, a) in acc.iter_mut().enumerate() {
                    let l = 8 * k;
                    // SAFETY: 32j + l + 8 <= 128 code bytes after byte 16 of the 144; elements
                    // 64j + 32 + l + 8 <= 256 of this super-block's x.
                    unsafe {
                        let [w_lo, w_hi] = q4k_pair(qp.add(32 * j + l), &sm);
                        *a = _mm256_fmadd_ps(w_lo, _mm256_loadu_ps(xp.add(64 * j + l)), *a);
                        *a = _mm256_fmadd_ps(w_hi, _mm256_loadu_ps(xp.add(64 * j + 32 + l)), *a);
                    }
                }
            }
        }
        hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    }

    /// [`super::dot_kquant`] of a Q6_K row: [`dequant_q6k`]'s elements in [`dot_f32`]'s order.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `row` is whole 210-byte super-blocks and `x` 256 floats for each.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q6k(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        for (sb, b) in row.chunks_exact(210).enumerate() {
            let d = quants::h(b, 208);
            let xp = x[256 * sb..][..256].as_ptr();
            for n in 0..2 {
                let (ql, qh) = (b[64 * n..].as_ptr(), b[128 + 32 * n..].as_ptr());
                let sc = &b[192 + 8 * n..200 + 8 * n];
                let s = |k: usize| _mm256_set1_ps(d * f32::from(sc[k] as i8));
                for (k, a) in acc.iter_mut().enumerate() {
                    let l = 8 * k;
                    let is = l / 16;
                    // SAFETY: ql + l + 32 + 8 <= 64 bytes of this half, qh + l + 8 <= 32; elements
                    // 128n + l + 96 + 8 <= 256 of this super-block's x.
                    unsafe {
                        let [q1, q2, q3, q4] = q6k_codes(ql, qh, l);
                        let y = xp.add(128 * n + l);
                        *a = _mm256_fmadd_ps(_mm256_mul_ps(s(is), codes_ps(q1, 32)), _mm256_loadu_ps(y), *a);
                        *a = _mm256_fmadd_ps(
                            _mm256_mul_ps(s(is + 2), codes_ps(q2, 32)),
                            _mm256_loadu_ps(y.add(32)),
                            *a,
                        );
                        *a = _mm256_fmadd_ps(
                            _mm256_mul_ps(s(is + 4), codes_ps(q3, 32)),
                            _mm256_loadu_ps(y.add(64)),
                            *a,
                        );
                        *a = _mm256_fmadd_ps(
                            _mm256_mul_ps(s(is + 6), codes_ps(q4, 32)),
                            _mm256_loadu_ps(y.add(96)),
                            *a,
                        );
                    }
                }
            }
        }
        hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
    }

    /// Q4_K's 8 sub-block scales and 8 minimums (6 bits each, packed in the 12 bytes at `p`) as f32 lanes,
    /// unpacked four at a time in 32-bit words (ggml's masks) rather than one by one.
    ///
    /// # Safety
    /// `p` points at 12 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4k_scales_mins(p: *const u8) -> (__m256, __m256) {
        const K1: u32 = 0x3f3f_3f3f;
        const K2: u32 = 0x0f0f_0f0f;
        const K3: u32 = 0x0303_0303;
        // SAFETY: the caller's contract; three unaligned 4-byte reads.
        let u = unsafe { [0, 4, 8].map(|o| p.add(o).cast::<u32>().read_unaligned()) };
        // Scales 0..4 are the low 6 bits of bytes 0..4 and minimums 0..4 those of bytes 4..8; scales and
        // minimums 4..8 take their low 4 bits from bytes 8..12 and their top 2 from the top of bytes 0..8.
        let s = [u[0] & K1, (u[2] & K2) | (((u[0] >> 6) & K3) << 4)];
        let m = [u[1] & K1, ((u[2] >> 4) & K2) | (((u[1] >> 6) & K3) << 4)];
        let v = _mm_set_epi32(m[1] as i32, m[0] as i32, s[1] as i32, s[0] as i32);
        let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        (f(v), f(_mm_srli_si128::<8>(v)))
    }

    /// [`super::dot_kq16`] of a Q4_K row, as [`quants::dot_kq16_ref`] computes it: per 64 elements, the 32
    /// code bytes' low nibbles are sub-block `2j` and their high ones `2j + 1` ([`nibbles16`] on each
    /// 16-byte half), each sub-block's 32 products one [`block_term`] with its lane of `(d sc) dy`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `row` is whole 144-byte super-blocks and `a` holds `8 * nb` blocks
    /// from every `b0[m]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4k16<const M: usize>(row: &[u8], a: &Q16Act, b0: [usize; M]) -> [f32; M] {
        let (yp, dp, sp) = (a.q().as_ptr(), a.d.as_ptr(), a.s.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let mut mins = [_mm256_setzero_ps(); M];
        for (i, blk) in row.chunks_exact(144).enumerate() {
            let p = blk.as_ptr();
            // SAFETY: the super-block's 144 bytes are readable (`chunks_exact`); activation blocks
            // b0[m] + 8i .. + 8 lie in `a` (the caller's contract).
            unsafe {
                let (sc, mn) = q4k_scales_mins(p.add(4));
                let (dsc, dmn) = (_mm256_mul_ps(f16x8_at(p), sc), _mm256_mul_ps(f16x8_at(p.add(2)), mn));
                let mut fs = [_mm256_setzero_ps(); M];
                for m in 0..M {
                    let b = b0[m] + 8 * i;
                    fs[m] = _mm256_mul_ps(dsc, _mm256_loadu_ps(dp.add(b)));
                    mins[m] = _mm256_fmadd_ps(dmn, _mm256_loadu_ps(sp.add(b)), mins[m]);
                }
                for j in 0..4 {
                    let [l0, h0] = nibbles16(p.add(16 + 32 * j));
                    let [l1, h1] = nibbles16(p.add(32 + 32 * j));
                    let (kl, kh) = (_mm256_set1_epi32(2 * j as i32), _mm256_set1_epi32(2 * j as i32 + 1));
                    for m in 0..M {
                        let y = yp.add((b0[m] + 8 * i + 2 * j) * 32);
                        let [a0, a1] = &mut acc[m];
                        *a0 = block_term(&[l0, l1], _mm256_permutevar8x32_ps(fs[m], kl), y, *a0);
                        *a1 = block_term(&[h0, h1], _mm256_permutevar8x32_ps(fs[m], kh), y.add(32), *a1);
                    }
                }
            }
        }
        std::array::from_fn(|m| hsum(_mm256_add_ps(acc[m][0], acc[m][1])) - hsum(mins[m]))
    }

    /// [`super::dot_kq16`] of a Q6_K row, as [`quants::dot_kq16_ref`] computes it: per half of 128
    /// elements, the four runs of 32 six-bit codes are built from `ql` and `qh` 32 at a time and less 32
    /// as bytes; each run is sub-blocks `2g` and `2g + 1` of the half, one `vpmaddwd` each with its lane
    /// of `(d sc) dy`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `row` is whole 210-byte super-blocks and `a` holds `8 * nb` blocks
    /// from every `b0[m]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q6k16<const M: usize>(row: &[u8], a: &Q16Act, b0: [usize; M]) -> [f32; M] {
        let (yp, dp) = (a.q().as_ptr(), a.d.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let (m4, c32) = (_mm256_set1_epi8(15), _mm256_set1_epi8(32));
        let bits = |k: i8| _mm256_set1_epi8(k);
        // Sub-blocks 2k and 2k + 1 share activation block k: its scale in both lanes.
        let dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        for (i, blk) in row.chunks_exact(210).enumerate() {
            let p = blk.as_ptr();
            // SAFETY: the super-block's 210 bytes are readable (`chunks_exact`): ql at 64n .. + 64, qh at
            // 128 + 32n .. + 32, the scales at 192 + 8n .. + 8, d at 208; activation blocks b0[m] + 8i ..
            // + 8 lie in `a` (the caller's contract).
            unsafe {
                let d = f16x8_at(p.add(208));
                for n in 0..2 {
                    let dsc = _mm256_mul_ps(
                        d,
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes8(p.add(192 + 8 * n)))),
                    );
                    let mut fs = [_mm256_setzero_ps(); M];
                    for m in 0..M {
                        let dy = _mm256_castps128_ps256(_mm_loadu_ps(dp.add(b0[m] + 8 * i + 4 * n)));
                        fs[m] = _mm256_mul_ps(dsc, _mm256_permutevar8x32_ps(dy, dup));
                    }
                    let (ql, qh) = (p.add(64 * n), p.add(128 + 32 * n));
                    let (lo, hi, hb) = (
                        _mm256_loadu_si256(ql.cast()),
                        _mm256_loadu_si256(ql.add(32).cast()),
                        _mm256_loadu_si256(qh.cast()),
                    );
                    // Each high pair moved to bits 4..6 of its own byte: no 16-bit shift crosses a byte
                    // with a set bit.
                    let runs = [
                        _mm256_or_si256(
                            _mm256_and_si256(lo, m4),
                            _mm256_slli_epi16::<4>(_mm256_and_si256(hb, bits(3))),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(hi, m4),
                            _mm256_slli_epi16::<2>(_mm256_and_si256(hb, bits(12))),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(lo), m4),
                            _mm256_and_si256(hb, bits(0x30)),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(hi), m4),
                            _mm256_srli_epi16::<2>(_mm256_and_si256(hb, bits(0xC0u8 as i8))),
                        ),
                    ];
                    for (g, run) in runs.into_iter().enumerate() {
                        let c = _mm256_sub_epi8(run, c32);
                        let w = [
                            _mm256_cvtepi8_epi16(_mm256_castsi256_si128(c)),
                            _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(c)),
                        ];
                        let (k0, k1) = (_mm256_set1_epi32(2 * g as i32), _mm256_set1_epi32(2 * g as i32 + 1));
                        for m in 0..M {
                            let y = yp.add((b0[m] + 8 * i) * 32 + 128 * n + 32 * g);
                            let s0 = _mm256_madd_epi16(w[0], _mm256_loadu_si256(y.cast()));
                            let s1 = _mm256_madd_epi16(w[1], _mm256_loadu_si256(y.add(16).cast()));
                            let [a0, a1] = &mut acc[m];
                            *a0 = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(s0),
                                _mm256_permutevar8x32_ps(fs[m], k0),
                                *a0,
                            );
                            *a1 = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(s1),
                                _mm256_permutevar8x32_ps(fs[m], k1),
                                *a1,
                            );
                        }
                    }
                }
            }
        }
        std::array::from_fn(|m| hsum(_mm256_add_ps(acc[m][0], acc[m][1])))
    }

    /// [`super::quantize_q16_block`]'s vector body.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `xb` and `qb` hold 32 elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_block(xb: &[f32], qb: &mut [i16]) -> (f32, f32) {
        // SAFETY: 32 floats at xb (the caller's contract); unaligned loads.
        let v: [__m256; 4] = std::array::from_fn(|k| unsafe { _mm256_loadu_ps(xb.as_ptr().add(8 * k)) });
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        // `max(|x|, m)`: a NaN `|x|` gives `m`, as `f32::max` ignores NaN.
        let mut m = _mm256_setzero_ps();
        for &x in &v {
            m = _mm256_max_ps(_mm256_and_ps(x, abs), m);
        }
        let s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        let amax = _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)));
        let dd = amax / 32767.0;
        let id = _mm256_set1_ps(if dd > 0.0 { 1.0 / dd } else { 0.0 });
        let (c, lo, hi) = (_mm256_set1_ps(12_582_912.0), _mm256_set1_ps(-32768.0), _mm256_set1_ps(32767.0));
        let q: [__m256i; 4] = v.map(|x| {
            let r = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x, id), c), c);
            // NaN to 0, then saturate: `as i16` of the truncated value.
            let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
            _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
        });
        let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)));
        // `packs` works within 128-bit lanes: put the quarters back in order.
        let p0 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[0], q[1]));
        let p1 = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(q[2], q[3]));
        // SAFETY: 32 i16 at qb (the caller's contract); unaligned stores.
        unsafe {
            _mm256_storeu_si256(qb.as_mut_ptr().cast(), p0);
            _mm256_storeu_si256(qb.as_mut_ptr().add(16).cast(), p1);
        }
        (dd, dd * sum as f32)
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `w.len() == x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
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
                let mut a = Q16Act::default();
                a.quantize(&x);
                for b0 in [0, 1] {
                    let r = quants::dot_q16_ref(ty, &row, &a, b0);
                    let v = dot_q16(ty, &row, &a, [b0], true)[0];
                    let four = dot_q16(ty, &row, &a, [b0, 1 - b0, b0, 1], true);
                    assert_eq!(four[0].to_bits(), v.to_bits(), "{ty}: the 4-token kernel's first lane");
                    assert_eq!(four[1].to_bits(), dot_q16(ty, &row, &a, [1 - b0], true)[0].to_bits());
                    // Integer sums are exact in both; they differ only in the order of the f32 block sums:
                    // at most nb + 8 roundings of partial sums bounded by the sum of |block terms|.
                    let mag: f32 = (0..nb)
                        .map(|i| {
                            let one = quants::dot_q16_ref(
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

    /// Packed matrices: unpacking gives the rows back (any run of rows), the packed one-token dots (8 rows
    /// at a time on the vector path, a row at a time on the portable one) equal `dot_q16` of each row bit
    /// for bit, and so do several tokens' dots and minimum terms read from a packed row in place, for
    /// every packing type and row lengths with and without remainders of the kernels' unrolling.
    #[test]
    fn packed_dots_equal_one_row_dots_bit_for_bit() {
        if !has_avx2() {
            eprintln!("vector half skipped: this CPU has no AVX2/FMA; the portable packed dots still run");
        }
        if !has_avx512bw() {
            eprintln!("AVX-512 Q5_0 codes skipped: this CPU lacks one of AVX-512 F, BW, VL");
        }
        for ty in [TensorType::Q8_0, TensorType::Q4_0, TensorType::Q4_1, TensorType::Q5_0] {
            for (nb, rows) in [(1usize, 8usize), (2, 16), (3, 8), (18, 24), (48, 16)] {
                let rb = nb * ty.block_bytes();
                let mut data = rand_bytes(rows * rb, (nb * 131 + rows) as u64);
                for b in data.chunks_exact_mut(ty.block_bytes()) {
                    let d = f16::from_f32(f32::from(b[0]) / 997.0 + 0.01).to_le_bytes();
                    b[0..2].copy_from_slice(&d);
                    if ty == TensorType::Q4_1 {
                        let m = f16::from_f32(f32::from(b[2]) / -512.0).to_le_bytes();
                        b[2..4].copy_from_slice(&m);
                    }
                }
                assert!(packs(ty, rows) && !packs(ty, rows + 1) && !packs(TensorType::Q4K, rows));
                let packed = pack_rows(ty, &data, rb);
                assert_eq!(packed.len(), data.len());
                assert_ne!(packed, data, "{ty}: packing moved no byte");
                for (r0, n) in [(0, rows), (3, 1), (5, rows - 5), (rows - 8, 8)] {
                    let mut back = vec![0u8; n * rb];
                    unpack_rows(ty, &packed, rb, r0, &mut back);
                    assert!(back == data[r0 * rb..(r0 + n) * rb], "{ty}: rows {r0}..{} come back", r0 + n);
                }
                let x: Vec<f32> = (0..nb * 32).map(|i| ((i * 53 % 97) as f32 - 48.0) / 9.0).collect();
                let mut a = Q16Act::default();
                a.quantize(&x);
                // The portable path, AVX2, and AVX2 with AVX-512's Q5_0 codes.
                for (avx, avx512) in [(false, false), (has_avx2(), false), (has_avx2(), has_avx512bw())] {
                    let mut out = vec![0f32; rows];
                    dots_packed_with(ty, &packed, rb, &a, &mut out, avx, avx512);
                    for (k, o) in out.iter().enumerate() {
                        let one = dot_q16(ty, &data[k * rb..][..rb], &a, [0], avx)[0];
                        assert_eq!(
                            o.to_bits(),
                            one.to_bits(),
                            "{ty} nb={nb} row {k} avx2={avx} avx512={avx512}: {o} vs {one}"
                        );
                    }
                }
                // Several tokens (a prefill chunk) read a packed row in place: the plain row's bits.
                let n = 5;
                let x: Vec<f32> = (0..n * nb * 32).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
                let mut a = Q16Act::default();
                a.quantize(&x);
                let st = a.block_major_sums(n);
                for avx in [false, has_avx2()] {
                    for k in [0, rows - 1, 5 % rows] {
                        let pr = RowRef::of_packed(&packed, rb, k);
                        let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
                        dots_scaled(ty, pr, &a, nb, 0..n, &mut got, avx);
                        add_mins(ty, pr, &st, n, &mut got, avx);
                        dots_scaled(ty, &data[k * rb..][..rb], &a, nb, 0..n, &mut want, avx);
                        add_mins(ty, &data[k * rb..][..rb], &st, n, &mut want, avx);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&got), bits(&want), "{ty} nb={nb} row {k} of {n} tokens, avx2={avx}");
                    }
                }
            }
        }
    }

    /// The batched split (`dots_scaled`: groups of four tokens, then `add_mins` over all tokens from
    /// block-major sums) gives every token the bits of the one-token `dot_q16`, on both paths, for token
    /// counts that leave every remainder of the 4-token and 8-token groups.
    #[test]
    fn split_minimums_equal_one_token_dots_bit_for_bit() {
        for ty in [TensorType::Q4_1, TensorType::Q8_0, TensorType::Q5_0] {
            let nb = 18;
            let mut row = rand_bytes(nb * ty.block_bytes(), 99);
            for b in row.chunks_exact_mut(ty.block_bytes()) {
                let d = f16::from_f32(f32::from(b[0]) / 997.0 + 0.01).to_le_bytes();
                b[0..2].copy_from_slice(&d);
                let m = f16::from_f32(f32::from(b[2]) / -300.0).to_le_bytes();
                if ty == TensorType::Q4_1 {
                    b[2..4].copy_from_slice(&m);
                }
            }
            for n in [1usize, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 23] {
                let x: Vec<f32> = (0..n * nb * 32).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
                let mut a = Q16Act::default();
                a.quantize(&x);
                assert_eq!(a.q().as_ptr() as usize % 64, 0, "codes start on a cache line");
                let st = a.block_major_sums(n);
                for avx in [false, has_avx2()] {
                    let mut out = vec![0f32; n];
                    dots_scaled(ty, &row[..], &a, nb, 0..n, &mut out, avx);
                    add_mins(ty, &row[..], &st, n, &mut out, avx);
                    for (tt, o) in out.iter().enumerate() {
                        let one = dot_q16(ty, &row, &a, [tt * nb], avx)[0];
                        assert_eq!(o.to_bits(), one.to_bits(), "{ty} n={n} token {tt} avx2={avx}");
                    }
                }
            }
        }
    }

    /// Random K-quant blocks with finite f16 scales (any bytes elsewhere are valid codes).
    fn k_blocks(ty: TensorType, n: usize, seed: u64) -> Vec<u8> {
        let mut b = rand_bytes(n * ty.block_bytes(), seed);
        let at: &[usize] = if ty == TensorType::Q4K { &[0, 2] } else { &[208] };
        for (i, blk) in b.chunks_exact_mut(ty.block_bytes()).enumerate() {
            for (k, &o) in at.iter().enumerate() {
                // Scales from 2^-14 (subnormal edge) to 2^15, and one negative, across the blocks.
                let v = f16::from_f32([6.1e-5, 0.013, -0.5, 3.0, 32768.0][(i + k) % 5]);
                blk[o..o + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        b
    }

    #[test]
    fn vector_k_quant_dequant_equals_scalar_bit_for_bit() {
        if !has_avx2() {
            eprintln!("skipped: this CPU has no AVX2/FMA, only the scalar path exists");
            return;
        }
        for ty in [TensorType::Q4K, TensorType::Q6K] {
            for (nb, seed) in [(1usize, 1u64), (2, 2), (3, 3), (8, 4), (10, 5)] {
                let bytes = k_blocks(ty, nb, seed);
                let (mut want, mut got) = (vec![0f32; nb * 256], vec![1f32; nb * 256]);
                quants::dequant_row(ty, &bytes, &mut want);
                dequant_row(ty, &bytes, &mut got, true);
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    assert_eq!(w.to_bits(), g.to_bits(), "{ty} blocks={nb} element {i}: {g} vs {w}");
                }
            }
        }
    }

    /// The fused K-quant dot gives the bits of dequantizing the row and then taking the f32 dot, on the
    /// vector path and on the portable one, over rows of 1 to 10 super-blocks whose scales span the
    /// subnormal edge to 2^15 (a different summation order would differ in the last bits on most rows).
    #[test]
    fn fused_k_quant_dot_equals_dequantize_then_dot_bit_for_bit() {
        let paths: &[bool] = if has_avx2() { &[false, true] } else { &[false] };
        if !has_avx2() {
            eprintln!("vector path skipped: this CPU has no AVX2/FMA");
        }
        for ty in [TensorType::Q4K, TensorType::Q6K] {
            for (nb, seed) in [(1usize, 11u64), (2, 12), (3, 13), (4, 14), (8, 15), (10, 16)] {
                let bytes = k_blocks(ty, nb, seed);
                let x: Vec<f32> = (0..nb * 256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
                for &avx2 in paths {
                    let mut w = vec![0f32; nb * 256];
                    dequant_row(ty, &bytes, &mut w, avx2);
                    let want = dot_f32(&w, &x, avx2);
                    let got = dot_kquant(ty, &bytes, &x, avx2);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{ty} blocks={nb} avx2={avx2}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The integer K-quant dots: the vector kernel gives the portable path's bits for one token and for
    /// four (each token's activations at its own block offset), over rows of 1 to 10 super-blocks whose
    /// scales span the subnormal edge to 2^15 (a lane sum in another lane, a scale broadcast from the next
    /// sub-block or the sub-blocks' accumulators swapped each changes the last bits of most rows); and both
    /// are within the f32 rounding of the exact dot of the dequantized row with the dequantized
    /// activations.
    #[test]
    fn integer_k_quant_dots_equal_their_twin_and_the_definition() {
        let vector = has_avx2();
        if !vector {
            eprintln!("vector kernel skipped: this CPU has no AVX2/FMA; the portable path is still checked");
        }
        for ty in [TensorType::Q4K, TensorType::Q6K] {
            for (nb, seed) in [(1usize, 21u64), (2, 22), (3, 23), (4, 24), (8, 25), (10, 26)] {
                let row = k_blocks(ty, nb, seed);
                // Three tokens' worth, so that offsets 0, 8 nb and 16 nb (and a shifted 1) all fit.
                let x: Vec<f32> =
                    (0..(3 * nb * 8 + 1) * 32).map(|i| ((i * 53 % 97) as f32 - 48.0) / 9.0).collect();
                let mut a = Q16Act::default();
                a.quantize(&x);
                let offs = [0, 8 * nb, 1, 16 * nb];
                let twin = offs.map(|b| quants::dot_kq16_ref(ty, &row, &a, b));
                assert_eq!(dot_kq16(ty, &row, &a, offs, false).map(f32::to_bits), twin.map(f32::to_bits));
                if vector {
                    let four = dot_kq16(ty, &row, &a, offs, true);
                    assert_eq!(four.map(f32::to_bits), twin.map(f32::to_bits), "{ty} nb={nb}: 4 tokens");
                    for (k, &b) in offs.iter().enumerate() {
                        let one = dot_kq16(ty, &row, &a, [b], true)[0];
                        assert_eq!(
                            one.to_bits(),
                            twin[k].to_bits(),
                            "{ty} nb={nb} b0={b}: {one} vs {}",
                            twin[k]
                        );
                    }
                }
                let mut w = vec![0f32; nb * 256];
                quants::dequant_row(ty, &row, &mut w);
                // The two parts of each weight, `d sc q` and `dmin m` (Q4_K), for the size of the sums:
                // the row dequantized with `dmin` zeroed, and with `d` zeroed.
                let part = |o: usize| {
                    let mut r = row.clone();
                    let mut v = vec![0f32; nb * 256];
                    if ty == TensorType::Q4K {
                        r.chunks_exact_mut(144).for_each(|b| b[o..o + 2].fill(0));
                        quants::dequant_row(ty, &r, &mut v);
                    }
                    v
                };
                let (scaled, mins) =
                    if ty == TensorType::Q4K { (part(2), part(0)) } else { (w.clone(), part(0)) };
                for (k, &b) in offs.iter().enumerate() {
                    let y = |e: usize| f64::from(a.d[b + e / 32]) * f64::from(a.q()[32 * b + e]);
                    let exact: f64 = (0..nb * 256).map(|e| f64::from(w[e]) * y(e)).sum();
                    let mag: f64 = (0..nb * 256)
                        .map(|e| (f64::from(scaled[e]).abs() + f64::from(mins[e]).abs()) * y(e).abs())
                        .sum();
                    // The integer lane sums are exact (and exact in f32). Each term `L (d sc) dy` takes
                    // three roundings (the two scale products, the FMA's), a minimum term `(dmin m) s` three
                    // (`dmin m`, `s = dy Σ q`, the FMA's), the dequantized row two per element; the
                    // accumulators add up to 8 nb terms each, then `hsum` three levels and the final two
                    // adds. Every rounding is relative to at most the sum of |parts| `mag`.
                    let tol = (8.0 * nb as f64 + 13.0) * f64::from(f32::EPSILON) * mag + 1e-30;
                    let got = f64::from(twin[k]);
                    assert!((got - exact).abs() <= tol, "{ty} nb={nb} b0={b}: {got} vs {exact} (tol {tol})");
                }
            }
        }
    }

    /// The vector activation rounding gives the scalar one's codes, scale and sum bit for bit: random
    /// blocks over many magnitudes, and blocks with zeros, a lone NaN or infinity, values at the rounding's
    /// ties, subnormals whose scale's inverse overflows, and the largest floats.
    #[test]
    fn vector_activation_rounding_equals_scalar_bit_for_bit() {
        if !has_avx2() {
            eprintln!("skipped: this CPU has no AVX2/FMA, only the scalar path exists");
            return;
        }
        let mut blocks: Vec<[f32; 32]> = Vec::new();
        let mut seed = 3u64;
        for k in 0..400 {
            let scale = 2f32.powi(k % 60 - 30);
            blocks.push(std::array::from_fn(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            }));
        }
        let base: [f32; 32] = std::array::from_fn(|i| i as f32 - 15.5);
        for special in
            [0.0, f32::NAN, f32::INFINITY, -f32::INFINITY, 1e-40, f32::MAX, -f32::MAX, 0.5, 32767.0]
        {
            let mut b = base;
            b[7] = special;
            blocks.push(b);
            blocks.push([special; 32]);
        }
        // Ties of the rounding: amax 32767 makes the scale 1, so x.5 values round half to even.
        blocks.push(std::array::from_fn(|i| if i == 0 { 32767.0 } else { i as f32 + 0.5 }));
        blocks.push(std::array::from_fn(|i| 1e-36 * (i as f32 - 16.0)));
        for (k, b) in blocks.iter().enumerate() {
            let (mut want, mut got) = ([0i16; 32], [1i16; 32]);
            let w = quants::quantize_block(b, &mut want);
            let g = quantize_q16_block(b, &mut got);
            assert_eq!(got, want, "block {k}: codes");
            assert_eq!(
                (g.0.to_bits(), g.1.to_bits()),
                (w.0.to_bits(), w.1.to_bits()),
                "block {k}: {g:?} vs {w:?}"
            );
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
