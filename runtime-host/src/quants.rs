//! ggml weight blocks: scalar dequantization (the reference every kernel is checked against) and the
//! activation side of the integer dot products.
//!
//! Block layouts (bytes, little-endian), as ggml's `ggml-common.h` defines them:
//!
//! ```text
//! Q8_0  (34 B / 32):  d f16 | q i8 x 32                                 x = d * q
//! Q4_0  (18 B / 32):  d f16 | qs u8 x 16 (low nibble j, high j+16)      x = d * (q - 8)
//! Q4_1  (20 B / 32):  d f16 | m f16 | qs u8 x 16                        x = d * q + m
//! Q5_0  (22 B / 32):  d f16 | qh u32 (bit j = 5th bit of j) | qs x 16   x = d * (q - 16)
//! Q4_K (144 B / 256): d f16 | dmin f16 | 12 B of 6-bit scales/mins | qs u8 x 128
//! Q6_K (210 B / 256): ql u8 x 128 | qh u8 x 64 | scales i8 x 16 | d f16
//! ```

use crate::gguf::TensorType;
use half::{bf16, f16};

/// The little-endian f16 at byte `at` of `b`, as f32.
pub(crate) fn h(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes one block of `ty` from `b` (its `block_bytes`) into `out` (its `block_len`).
fn dequant_block(ty: TensorType, b: &[u8], out: &mut [f32]) {
    match ty {
        TensorType::F32 => out[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        TensorType::F16 => out[0] = h(b, 0),
        TensorType::Bf16 => out[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        TensorType::Q8_0 | TensorType::Q4_0 | TensorType::Q4_1 | TensorType::Q5_0 => {
            let (q, d, m) = block_codes(ty, b);
            for (o, &q) in out.iter_mut().zip(&q) {
                *o = d * q as f32 + m;
            }
        }
        TensorType::Q4K => {
            let (d, dmin) = (h(b, 0), h(b, 2));
            let sc = &b[4..16];
            let qs = &b[16..144];
            for (j, chunk) in out.chunks_exact_mut(64).enumerate() {
                let (s1, m1) = scale_min_k4(2 * j, sc);
                let (s2, m2) = scale_min_k4(2 * j + 1, sc);
                let (d1, d2) = (d * f32::from(s1), d * f32::from(s2));
                let (n1, n2) = (dmin * f32::from(m1), dmin * f32::from(m2));
                let q = &qs[32 * j..32 * j + 32];
                for l in 0..32 {
                    chunk[l] = d1 * f32::from(q[l] & 15) - n1;
                    chunk[l + 32] = d2 * f32::from(q[l] >> 4) - n2;
                }
            }
        }
        TensorType::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = h(b, 208);
            for n in 0..2 {
                let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
                let y = &mut out[128 * n..128 * n + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = i32::from((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32;
                    let q2 = i32::from((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    let s = |k: usize| d * f32::from(sc[is + k] as i8);
                    y[l] = s(0) * q1 as f32;
                    y[l + 32] = s(2) * q2 as f32;
                    y[l + 64] = s(4) * q3 as f32;
                    y[l + 96] = s(6) * q4 as f32;
                }
            }
        }
    }
}

/// Scale and min `j` (0..8) of a Q4_K super-block: 6 bits each, packed in 12 bytes.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 15) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Dequantizes a row: `bytes` holds `out.len()` elements of `ty` (a whole number of blocks).
///
/// # Panics
/// If `bytes` is not exactly `ty.row_bytes(out.len())` long or `out.len()` is not a multiple of the block
/// (the loader checks shapes before any row is read).
pub fn dequant_row(ty: TensorType, bytes: &[u8], out: &mut [f32]) {
    for (b, o) in row_blocks(ty, bytes, out) {
        dequant_block(ty, b, o);
    }
}

/// The blocks of a row of `ty` paired with their outputs, after checking that `bytes` holds exactly
/// `out.len()` elements (a whole number of blocks).
///
/// # Panics
/// If it does not (the loader checks shapes before any row is read).
pub(crate) fn row_blocks<'a>(
    ty: TensorType,
    bytes: &'a [u8],
    out: &'a mut [f32],
) -> impl Iterator<Item = (&'a [u8], &'a mut [f32])> {
    let (bl, bb) = (ty.block_len(), ty.block_bytes());
    assert!(
        out.len().is_multiple_of(bl) && bytes.len() == out.len() / bl * bb,
        "row of {ty} has the wrong length"
    );
    bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bl))
}

/// Activations quantized to 16 bits in blocks of 32: `q = round(x / d)`, `d = max|x| / 32767`, and each
/// block's `d * sum(q)` for the offset term of Q4_1.
///
/// llama.cpp quantizes activations to 8 bits (Q8_0/Q8_1); on SmolLM2 that moves logits by up to 1.4 and flips
/// greedy answers whose top two logits are close (the default system prompt's "capital of France" question is
/// one, see `tests/logits.rs`). At 16 bits the relative error per element is at most 1/65534, below the
/// weights' own f16 scale rounding, and `vpmaddwd` keeps the integer dot nearly as cheap as 8 bits.
///
/// The codes start on a 64-byte boundary, so each block's two 32-byte halves never straddle a cache line
/// (a split load costs two; at 16-byte alignment half of the kernels' activation loads were split).
#[derive(Clone, Debug, Default)]
pub struct Q16Act {
    /// Codes, one per activation, from `buf[off]`.
    buf: Vec<i16>,
    off: usize,
    len: usize,
    /// Per-block scale.
    pub d: Vec<f32>,
    /// Per-block `d * sum(q)`.
    pub s: Vec<f32>,
}

impl Q16Act {
    /// Quantizes `x` (length a multiple of 32), reusing the buffers.
    pub fn quantize(&mut self, x: &[f32]) {
        let nb = x.len() / 32;
        // 32 spare codes leave room to move the start to a 64-byte boundary.
        if self.buf.len() < x.len() + 32 {
            self.buf = vec![0; x.len() + 32];
        }
        let mis = (self.buf.as_ptr() as usize / 2) % 32;
        self.off = (32 - mis) % 32;
        self.len = x.len();
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        let q = &mut self.buf[self.off..self.off + self.len];
        // The vector rounding where the CPU has AVX2 (it falls back to `quantize_block`), the same bits.
        let one = |((xb, qb), (d, s)): Block<'_>| (*d, *s) = crate::kernels::quantize_q16_block(xb, qb);
        // Several tokens' worth (a prefill chunk) is split over the thread pool; one token is not worth it.
        if nb >= 256 {
            use rayon::prelude::*;
            x.par_chunks_exact(32)
                .zip(q.par_chunks_exact_mut(32))
                .zip(self.d.par_iter_mut().zip(self.s.par_iter_mut()))
                .with_min_len(64)
                .for_each(one);
        } else {
            x.chunks_exact(32)
                .zip(q.chunks_exact_mut(32))
                .zip(self.d.iter_mut().zip(self.s.iter_mut()))
                .for_each(one);
        }
    }

    /// The codes, one per activation.
    pub fn q(&self) -> &[i16] {
        &self.buf[self.off..self.off + self.len]
    }

    /// The per-block sums `s` of `n` tokens quantized together, block-major: entry `i * n + t` is token
    /// `t`'s block `i` (the layout [`crate::kernels::add_mins`] reads).
    pub fn block_major_sums(&self, n: usize) -> Vec<f32> {
        let nb = self.s.len() / n;
        (0..nb * n).map(|k| self.s[(k % n) * nb + k / n]).collect()
    }
}

/// One block of 32 activations into 16-bit codes, scalar: returns its scale `d = max|x| / 32767` and
/// `d * sum(q)`. The reference for [`crate::kernels::quantize_q16_block`], which gives the same bits.
pub fn quantize_block(xb: &[f32], qb: &mut [i16]) -> (f32, f32) {
    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
    let dd = amax / 32767.0;
    let id = if dd > 0.0 { 1.0 / dd } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qb.iter_mut().zip(xb) {
        // Round half to even by the 1.5 * 2^23 trick (exact for |v * id| <= 2^22; here <= 32767), numpy's
        // rounding and much cheaper than a libm call; the cast saturates any excess (and NaN gives 0).
        *q = ((v * id + 12_582_912.0) - 12_582_912.0) as i16;
        sum += i32::from(*q);
    }
    (dd, dd * sum as f32)
}

/// One block for [`Q16Act::quantize`]: the inputs, the codes, the scale and the `d * sum(q)` to write.
type Block<'a> = ((&'a [f32], &'a mut [i16]), (&'a mut f32, &'a mut f32));

/// Integer codes of one 32-element block, in element order, and its scale and offset: `x = d * q + m`.
fn block_codes(ty: TensorType, b: &[u8]) -> ([i32; 32], f32, f32) {
    let mut q = [0i32; 32];
    match ty {
        TensorType::Q8_0 => {
            for (o, &v) in q.iter_mut().zip(&b[2..34]) {
                *o = i32::from(v as i8);
            }
            (q, h(b, 0), 0.0)
        }
        TensorType::Q4_0 => {
            for j in 0..16 {
                q[j] = i32::from(b[2 + j] & 15) - 8;
                q[j + 16] = i32::from(b[2 + j] >> 4) - 8;
            }
            (q, h(b, 0), 0.0)
        }
        TensorType::Q4_1 => {
            for j in 0..16 {
                q[j] = i32::from(b[4 + j] & 15);
                q[j + 16] = i32::from(b[4 + j] >> 4);
            }
            (q, h(b, 0), h(b, 2))
        }
        TensorType::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..16 {
                q[j] = (i32::from(b[6 + j] & 15) | (((qh >> j) & 1) << 4) as i32) - 16;
                q[j + 16] = (i32::from(b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as i32) - 16;
            }
            (q, h(b, 0), 0.0)
        }
        _ => unreachable!("block_codes takes 32-element block types only"),
    }
}

/// Dot product of a row of `ty` (one of the 32-blocks: Q8_0, Q4_0, Q4_1, Q5_0) with quantized activations
/// starting at block `b0`, scalar: the reference for the vector kernels. Per block
/// `dw * dy * sum(qw * qy) + mw * dy * sum(qy)`, the integer sum exact.
pub fn dot_q16_ref(ty: TensorType, row: &[u8], a: &Q16Act, b0: usize) -> f32 {
    ref_dot(ty, row, a, b0, true)
}

/// [`dot_q16_ref`] without the minimum terms: `Σ_blocks dw * dy * Σ qw qy`.
pub fn dot_q16_scaled_ref(ty: TensorType, row: &[u8], a: &Q16Act, b0: usize) -> f32 {
    ref_dot(ty, row, a, b0, false)
}

fn ref_dot(ty: TensorType, row: &[u8], a: &Q16Act, b0: usize, mins: bool) -> f32 {
    let mut acc = 0f32;
    for (i, b) in row.chunks_exact(ty.block_bytes()).enumerate() {
        let y = &a.q()[(b0 + i) * 32..][..32];
        let (q, dw, mw) = block_codes(ty, b);
        let sum: i32 = q.iter().zip(y).map(|(&w, &y)| w * i32::from(y)).sum();
        let scaled = dw * a.d[b0 + i] * sum as f32;
        acc += if mins { scaled + mw * a.s[b0 + i] } else { scaled };
    }
    acc
}

/// A K-quant super-block's integer codes in element order and its sub-blocks' parameters: for Q4_K eight
/// sub-blocks of 32, codes `0..16`, scales `d * sc` and minimums `dmin * m` (`x = d sc q - dmin m`); for
/// Q6_K sixteen of 16, codes `-32..32` and scales `d * sc` (`x = d sc q`), no minimums.
fn k_codes(ty: TensorType, b: &[u8]) -> ([i32; 256], [f32; 16], [f32; 8]) {
    let (mut q, mut sc, mut mn) = ([0i32; 256], [0f32; 16], [0f32; 8]);
    if ty == TensorType::Q4K {
        let (d, dmin) = (h(b, 0), h(b, 2));
        for k in 0..8 {
            let (s, m) = scale_min_k4(k, &b[4..16]);
            (sc[k], mn[k]) = (d * f32::from(s), dmin * f32::from(m));
        }
        for (e, o) in q.iter_mut().enumerate() {
            let byte = b[16 + 32 * (e / 64) + e % 32];
            *o = i32::from(if e % 64 < 32 { byte & 15 } else { byte >> 4 });
        }
    } else {
        let d = h(b, 208);
        for (k, s) in sc.iter_mut().enumerate() {
            *s = d * f32::from(b[192 + k] as i8);
        }
        for (e, o) in q.iter_mut().enumerate() {
            // Element 128n + 32g + l: nibble g / 2 of ql[64n + l + 32 (g % 2)], bit pair g of qh[32n + l].
            let (n, g, l) = (e / 128, (e % 128) / 32, e % 32);
            let lo = b[64 * n + l + 32 * (g % 2)] >> (4 * (g / 2)) & 15;
            let hi = (b[128 + 32 * n + l] >> (2 * g)) & 3;
            *o = i32::from(lo | hi << 4) - 32;
        }
    }
    (q, sc, mn)
}

/// The horizontal sum of 8 lanes in the order the vector kernels' `hsum` adds them.
fn hsum8(v: [f32; 8]) -> f32 {
    ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]))
}

/// Dot product of a Q4_K or Q6_K row with 16-bit activations from block `b0` (the row's super-block `i`
/// against activation blocks `b0 + 8i ..`), scalar, as the vector kernel
/// ([`crate::kernels::dot_kq16`]) computes it and with its bits: the portable path and the twin it is
/// tested against.
///
/// Per sub-block `k` (32 elements for Q4_K, 16 for Q6_K) the integer products go into 8 lanes, element
/// `e` into lane `(e % 16) / 2` (the lanes of `vpmaddwd`); each lane's sum (at most 4 * 15 * 32767 or
/// 2 * 32 * 32767, exact in f32) is multiplied by `fs = (d sc_k) * dy` and added to accumulator `k % 2`
/// with one FMA. Q4_K's minimum terms `Σ_k (dmin m_k) * s_k` go lane `k` of a third accumulator, one FMA
/// per super-block. The result: `hsum(acc0 + acc1) - hsum(mins)`.
///
/// # Panics
/// If `ty` is neither, the row is not whole super-blocks, or `a` holds fewer blocks than the row from
/// `b0`.
pub fn dot_kq16_ref(ty: TensorType, row: &[u8], a: &Q16Act, b0: usize) -> f32 {
    assert!(matches!(ty, TensorType::Q4K | TensorType::Q6K), "dot_kq16_ref takes Q4_K and Q6_K rows");
    let bb = ty.block_bytes();
    assert!(row.len().is_multiple_of(bb), "row of {ty} has the wrong length");
    let nb = row.len() / bb;
    assert!(a.q().len() >= (b0 + 8 * nb) * 32, "activations shorter than the row");
    let sub = if ty == TensorType::Q4K { 32 } else { 16 };
    let (mut acc, mut mins) = ([[0f32; 8]; 2], [0f32; 8]);
    for (i, blk) in row.chunks_exact(bb).enumerate() {
        let b = b0 + 8 * i;
        let (q, sc, mn) = k_codes(ty, blk);
        let y = &a.q()[32 * b..][..256];
        for k in 0..256 / sub {
            let mut lanes = [0i32; 8];
            for e in sub * k..sub * (k + 1) {
                lanes[(e % 16) / 2] += q[e] * i32::from(y[e]);
            }
            let fs = sc[k] * a.d[b + k * sub / 32];
            for (l, &s) in acc[k % 2].iter_mut().zip(&lanes) {
                *l = (s as f32).mul_add(fs, *l);
            }
        }
        if ty == TensorType::Q4K {
            for (k, l) in mins.iter_mut().enumerate() {
                *l = mn[k].mul_add(a.s[b + k], *l);
            }
        }
    }
    let scaled = hsum8(std::array::from_fn(|l| acc[0][l] + acc[1][l]));
    if ty == TensorType::Q4K { scaled - hsum8(mins) } else { scaled }
}

/// Whether `ty` takes the integer path (32-element blocks against [`Q16Act`]).
pub fn uses_q16(ty: TensorType) -> bool {
    matches!(ty, TensorType::Q8_0 | TensorType::Q4_0 | TensorType::Q4_1 | TensorType::Q5_0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random bytes with valid, moderate f16 scales at the given offsets.
    fn blocks(ty: TensorType, n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as u8
        };
        let mut v: Vec<u8> = (0..n * ty.block_bytes()).map(|_| next()).collect();
        let scales: &[usize] = match ty {
            TensorType::Q8_0 | TensorType::Q4_0 | TensorType::Q5_0 => &[0],
            TensorType::Q4_1 => &[0, 2],
            _ => &[],
        };
        for b in v.chunks_exact_mut(ty.block_bytes()) {
            for &o in scales {
                let x = f16::from_f32((f32::from(b[o]) - 128.0) / 4096.0).to_le_bytes();
                b[o..o + 2].copy_from_slice(&x);
            }
        }
        v
    }

    #[test]
    fn integer_dot_equals_dequantized_dot() {
        for ty in [TensorType::Q8_0, TensorType::Q4_0, TensorType::Q4_1, TensorType::Q5_0] {
            for nb in [1, 2, 7, 18] {
                let row = blocks(ty, nb, nb as u64);
                let x: Vec<f32> = (0..nb * 32).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
                let mut a = Q16Act::default();
                a.quantize(&x);
                // The dot of the dequantized row with the dequantized activations, in f64.
                let mut w = vec![0f32; nb * 32];
                dequant_row(ty, &row, &mut w);
                let exact: f64 = (0..nb * 32)
                    .map(|i| f64::from(w[i]) * f64::from(a.d[i / 32]) * f64::from(a.q()[i]))
                    .sum();
                let got = dot_q16_ref(ty, &row, &a, 0);
                // Only f32 rounding separates the two: one product and one addition per block.
                let mag: f64 = (0..nb * 32)
                    .map(|i| (f64::from(w[i]) * f64::from(a.d[i / 32]) * f64::from(a.q()[i])).abs())
                    .sum();
                assert!(
                    (f64::from(got) - exact).abs()
                        <= 4.0 * (nb as f64 + 2.0) * f64::from(f32::EPSILON) * mag + 1e-30,
                    "{ty} nb={nb}: {got} vs {exact}"
                );
            }
        }
    }

    #[test]
    fn activation_quantization_error_is_half_a_step() {
        let x: Vec<f32> = (0..96).map(|i| ((i * 29 % 53) as f32 - 26.0) * 0.37).collect();
        let mut a = Q16Act::default();
        a.quantize(&x);
        for (i, &v) in x.iter().enumerate() {
            let d = a.d[i / 32];
            // Half a step, plus the f32 roundings of v / d (relative eps on a code up to 32767) and of
            // d * q (relative eps on a value up to max|x| = 32767 d): 2 * 32767 * eps * d.
            let tol = d * (0.5 + 2.0 * 32767.0 * f32::EPSILON);
            assert!((v - d * f32::from(a.q()[i])).abs() <= tol, "element {i}");
        }
    }
}
