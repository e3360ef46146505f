//! Dense-and-sparse quantization (KVQuant, methods.md §2.5).
//!
//! Values of a vector (one key channel, one value token) strictly beyond its thresholds `[lower, upper]`
//! are outliers. The dense part is quantized *without* them (its range is the range of the remaining
//! values), each outlier's dense code is its value clamped into that range, and the outlier is kept as an
//! [`Outlier`]: its index in the vector and the f16 **correction** `x - x_hat_dense`, so reconstruction adds
//! the sparse part to the dense one (`x_hat = dense + sparse`, KVQuant's deployment form), which a fused
//! kernel applies as a second, independent pass. An outlier is therefore kept to within f16 rounding of
//! its correction.
//!
//! Storage is fixed-capacity: the caller hands a slice of [`Outlier`] slots per vector (KVQuant's
//! deployment caps 21 + 21 per token for hidden 4096). [`dynamic_thresholds`] picks per-vector thresholds
//! that leave at most `k` values beyond each side, so a capacity of `2k` always suffices; more values
//! beyond caller-chosen thresholds than slots is [`Error::TooManyOutliers`], never a silent drop.

use super::codebook::{Codebook, VectorNorm};
use super::param::{ParamFormat, Round};
use super::uniform::{GroupParams, UniformSpec};
use crate::error::{Error, Result, need};
use crate::view::{Strided, StridedMut};

/// One kept value: 16-bit index and f16 correction, 4 bytes (the paper's accounting, §3.7).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Outlier {
    /// Position in the vector.
    pub index: u16,
    /// f16 bits of `x - x_hat_dense`.
    pub delta: u16,
}

const _: () = assert!(core::mem::size_of::<Outlier>() == 4);

impl Outlier {
    /// The correction as f32.
    #[inline]
    pub fn delta(&self) -> f32 {
        half::f16::from_bits(self.delta).to_f32()
    }
}

/// Whether `x` lies strictly beyond `[lower, upper]`.
#[inline]
fn beyond(x: f32, lower: f32, upper: f32) -> bool {
    x > upper || x < lower
}

/// Counts the values of `src` beyond the thresholds and the min/max of the others; checks finiteness.
fn scan(src: &Strided<'_>, lower: f32, is_out: impl Fn(f32) -> bool) -> Result<(usize, f32, f32)> {
    let (mut n, mut lo, mut hi) = (0usize, f32::INFINITY, f32::NEG_INFINITY);
    for (index, x) in src.iter().enumerate() {
        if !x.is_finite() {
            return Err(Error::NonFinite { index });
        }
        if is_out(x) {
            n += 1;
        } else {
            lo = lo.min(x);
            hi = hi.max(x);
        }
    }
    if lo > hi {
        // Every value is an outlier: the dense part is the constant at the lower threshold.
        (lo, hi) = (lower, lower);
    }
    Ok((n, lo, hi))
}

/// Records the outliers of `src` with corrections against the dense reconstruction `dense(i)`.
fn record(
    src: &Strided<'_>,
    out: &mut [Outlier],
    is_out: impl Fn(f32) -> bool,
    dense: impl Fn(f32) -> f32,
) -> Result<usize> {
    let mut n = 0;
    for (i, x) in src.iter().enumerate() {
        if is_out(x) {
            let d = ParamFormat::F16.round(x - dense(x), Round::Nearest)?;
            out[n] = Outlier { index: i as u16, delta: ParamFormat::F16.encode(d) };
            n += 1;
        }
    }
    Ok(n)
}

fn check_len(src: &Strided<'_>) -> Result<()> {
    if src.len() > usize::from(u16::MAX) + 1 {
        return Err(Error::InvalidConfig { what: "outlier vector length", value: src.len() });
    }
    Ok(())
}

/// Uniform dense-and-sparse: quantizes `src` with `spec` over the range of its values within
/// `[lower, upper]`, writes codes `start..` of `words`, and stores the values beyond the thresholds in
/// `out`. Returns the dense parameters and the number of outliers written to `out[..n]`.
///
/// All checks run before anything is written.
///
/// # Errors
/// [`Error::NonFinite`], [`Error::TooManyOutliers`], [`Error::BufferTooSmall`],
/// [`Error::InvalidConfig`] for vectors longer than 65536, and the errors of [`UniformSpec::fit`].
pub fn quantize_uniform(
    spec: &UniformSpec,
    src: Strided<'_>,
    lower: f32,
    upper: f32,
    words: &mut [u32],
    start: usize,
    out: &mut [Outlier],
) -> Result<(GroupParams, usize)> {
    check_len(&src)?;
    need("words", spec.width.words_for(start + src.len()), words.len())?;
    let is_out = |x| beyond(x, lower, upper);
    let (n, lo, hi) = scan(&src, lower, is_out)?;
    if n > out.len() {
        return Err(Error::TooManyOutliers { needed: n, capacity: out.len() });
    }
    let p = spec.fit(lo, hi)?;
    spec.encode_into(&p, src, words, start)?;
    let n = record(&src, out, is_out, |x| p.decode(spec.encode(&p, x)))?;
    Ok((p, n))
}

/// Codebook dense-and-sparse (KVQuant nuqX-1%): normalizes by `norm` (built from the vector's thresholds
/// with [`VectorNorm::from_thresholds`]), encodes every value to its nearest level, and stores the values
/// whose normalized magnitude exceeds 1 — those beyond the thresholds — in `out`. Returns the number of
/// outliers.
///
/// # Errors
/// [`Error::NonFinite`], [`Error::TooManyOutliers`], [`Error::BufferTooSmall`], [`Error::InvalidConfig`].
pub fn quantize_codebook(
    cb: &Codebook,
    norm: &VectorNorm,
    src: Strided<'_>,
    words: &mut [u32],
    start: usize,
    out: &mut [Outlier],
) -> Result<usize> {
    check_len(&src)?;
    need("words", cb.width().words_for(start + src.len()), words.len())?;
    let is_out = |x| norm.normalize(x).abs() > 1.0;
    let (n, _, _) = scan(&src, 0.0, is_out)?;
    if n > out.len() {
        return Err(Error::TooManyOutliers { needed: n, capacity: out.len() });
    }
    cb.quantize(src, norm, words, start)?;
    record(&src, out, is_out, |x| norm.denormalize(cb.decode(cb.encode(norm.normalize(x)))))
}

/// Adds the corrections of `outliers` into a reconstructed vector.
///
/// # Errors
/// [`Error::OutOfBounds`] if an outlier's index lies past the vector (nothing is added then).
pub fn add_outliers(outliers: &[Outlier], mut dst: StridedMut<'_>) -> Result<()> {
    if let Some(o) = outliers.iter().find(|o| usize::from(o.index) >= dst.len()) {
        return Err(Error::OutOfBounds { index: usize::from(o.index), len: dst.len() });
    }
    for o in outliers {
        *dst.at(usize::from(o.index)) += o.delta();
    }
    Ok(())
}

/// Per-vector thresholds that leave at most `k` values strictly above `upper` and at most `k` strictly
/// below `lower`: the `(k+1)`-th largest and smallest values (KVQuant's per-token `topk(k+1)` for values).
/// `scratch` holds `2 * (k + 1)` floats.
///
/// # Errors
/// [`Error::EmptyInput`], [`Error::NonFinite`], [`Error::BufferTooSmall`] for short scratch.
pub fn dynamic_thresholds(src: Strided<'_>, k: usize, scratch: &mut [f32]) -> Result<(f32, f32)> {
    need("scratch", 2 * (k + 1), scratch.len())?;
    if src.is_empty() {
        return Err(Error::EmptyInput { what: "vector" });
    }
    let (top, rest) = scratch.split_at_mut(k + 1);
    let bot = &mut rest[..k + 1];
    // Sorted insertion into two small buffers: top descending, bottom ascending.
    let (mut nt, mut nb) = (0usize, 0usize);
    for (index, x) in src.iter().enumerate() {
        if !x.is_finite() {
            return Err(Error::NonFinite { index });
        }
        insert(top, &mut nt, x, |a, b| a > b);
        insert(bot, &mut nb, x, |a, b| a < b);
    }
    if nt <= k {
        // Fewer than k + 1 values: nothing need be an outlier.
        return Ok((bot[0], top[0]));
    }
    Ok((bot[nb - 1], top[nt - 1]))
}

/// Inserts `x` into the first `*n` sorted entries of `buf` (order `before`), keeping at most `buf.len()`.
fn insert(buf: &mut [f32], n: &mut usize, x: f32, before: impl Fn(f32, f32) -> bool) {
    let pos = buf[..*n].iter().position(|&y| before(x, y)).unwrap_or(*n);
    if pos >= buf.len() {
        return;
    }
    let last = (*n).min(buf.len() - 1);
    buf.copy_within(pos..last, pos + 1);
    buf[pos] = x;
    *n = (*n + 1).min(buf.len());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::Width;
    extern crate std;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    fn vector(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if i % 17 == 3 { u * 40.0 } else { u } // a few large values
            })
            .collect()
    }

    fn check_uniform(xs: &[f32], lower: f32, upper: f32, width: Width) {
        let spec = UniformSpec::new(width);
        let mut words = vec![0u32; width.words_for(xs.len() + 3)];
        let mut out = vec![Outlier::default(); xs.len()];
        let (p, n) =
            quantize_uniform(&spec, Strided::contiguous(xs), lower, upper, &mut words, 3, &mut out).unwrap();
        // Exactly the values beyond the thresholds, in order.
        let want: Vec<u16> =
            (0..xs.len()).filter(|&i| xs[i] > upper || xs[i] < lower).map(|i| i as u16).collect();
        let got: Vec<u16> = out[..n].iter().map(|o| o.index).collect();
        assert_eq!(got, want);
        let mut back = vec![0.0; xs.len()];
        spec.dequantize(&p, &words, 3, StridedMut::contiguous(&mut back)).unwrap();
        add_outliers(&out[..n], StridedMut::contiguous(&mut back)).unwrap();
        for (i, (&x, &y)) in xs.iter().zip(&back).enumerate() {
            let bound = if want.contains(&(i as u16)) {
                // f16 rounding of the correction, whose size is at most |x| + the dense extremes.
                (x.abs() + upper.abs().max(lower.abs())) * ParamFormat::F16.unit_roundoff() + 1e-7
            } else {
                p.scale / 2.0 + crate::quant::uniform::tests::arith_slack(x, &p, width.max_code())
            };
            assert!((x - y).abs() <= bound, "i={i} x={x} y={y} bound={bound}");
        }
    }

    #[test]
    fn uniform_keeps_exactly_the_values_beyond() {
        for width in [Width::B2, Width::B3, Width::B4] {
            for seed in 0..10 {
                check_uniform(&vector(64 + seed as usize * 7, seed), -0.4, 0.45, width);
            }
        }
        // Every value an outlier; none an outlier.
        check_uniform(&[5.0, -5.0, 6.0], -1.0, 1.0, Width::B2);
        check_uniform(&[0.5, -0.5, 0.25], -1.0, 1.0, Width::B2);
    }

    #[test]
    fn codebook_sparse_round_trip() {
        let cb = Codebook::new(Width::B2, &[-1.0, -0.3, 0.3, 1.0]).unwrap();
        let xs = vector(200, 4);
        let (lower, upper) = dynamic_thresholds(Strided::contiguous(&xs), 3, &mut [0.0; 8]).unwrap();
        let norm = VectorNorm::from_thresholds(lower, upper, ParamFormat::F16).unwrap();
        let mut words = vec![0u32; Width::B2.words_for(200)];
        let mut out = [Outlier::default(); 6];
        let n = quantize_codebook(&cb, &norm, Strided::contiguous(&xs), &mut words, 0, &mut out).unwrap();
        assert!(n <= 6);
        let mut back = vec![0.0; 200];
        cb.dequantize(&norm, &words, 0, StridedMut::contiguous(&mut back)).unwrap();
        add_outliers(&out[..n], StridedMut::contiguous(&mut back)).unwrap();
        for (i, (&x, &y)) in xs.iter().zip(&back).enumerate() {
            let outlier = norm.normalize(x).abs() > 1.0;
            assert_eq!(outlier, out[..n].iter().any(|o| usize::from(o.index) == i));
            let bound = if outlier { x.abs() / 1024.0 } else { 0.35 * norm.range + 1e-5 };
            assert!((x - y).abs() <= bound, "i={i} x={x} y={y}");
        }
    }

    #[test]
    fn dynamic_thresholds_cap_each_side() {
        for k in [0usize, 1, 3, 10] {
            for seed in 0..8 {
                let xs = vector(150, seed);
                let mut scratch = vec![0.0; 2 * k + 2];
                let (lo, hi) = dynamic_thresholds(Strided::contiguous(&xs), k, &mut scratch).unwrap();
                let mut sorted = xs.clone();
                sorted.sort_by(f32::total_cmp);
                assert_eq!(lo, sorted[k]);
                assert_eq!(hi, sorted[sorted.len() - 1 - k]);
                assert!(xs.iter().filter(|&&x| x > hi).count() <= k);
                assert!(xs.iter().filter(|&&x| x < lo).count() <= k);
            }
        }
        // Fewer values than k + 1: the extremes themselves.
        assert_eq!(
            dynamic_thresholds(Strided::contiguous(&[2.0, -1.0]), 5, &mut [0.0; 12]).unwrap(),
            (-1.0, 2.0)
        );
    }

    #[test]
    fn overflow_and_bad_input_write_nothing() {
        let spec = UniformSpec::new(Width::B2);
        let xs = [9.0f32, -9.0, 0.0, 9.5];
        let mut words = [7u32; 1];
        let mut out = [Outlier { index: 99, delta: 99 }; 2];
        assert_eq!(
            quantize_uniform(&spec, Strided::contiguous(&xs), -1.0, 1.0, &mut words, 0, &mut out),
            Err(Error::TooManyOutliers { needed: 3, capacity: 2 })
        );
        assert_eq!(
            quantize_uniform(
                &spec,
                Strided::contiguous(&[1.0, f32::NAN]),
                -1.0,
                1.0,
                &mut words,
                0,
                &mut out
            ),
            Err(Error::NonFinite { index: 1 })
        );
        assert_eq!(words, [7]);
        assert_eq!(out, [Outlier { index: 99, delta: 99 }; 2]);
        let mut v = [0.0f32; 2];
        assert!(add_outliers(&out, StridedMut::contiguous(&mut v)).is_err());
        assert_eq!(v, [0.0; 2]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 3 } else { 256 }, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn prop_uniform_sparse(xs in proptest::collection::vec(-50.0f32..50.0, 1..120), t in 0.5f32..30.0) {
            check_uniform(&xs, -t, t * 0.8, Width::B3);
        }
    }
}
