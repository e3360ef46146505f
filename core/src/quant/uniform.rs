//! Asymmetric min-max group quantizer with round-to-nearest (KIVI, methods.md §1.1; SKVQ §3.3).
//!
//! For a group with minimum `mn` and maximum `mx`, clipped to `[lo, hi]` by the factor `alpha`:
//!
//! ```text
//! zero  = round_down(lo)                      stored zero point (f16 or FP8), at or below lo
//! scale = round_up((hi - zero) / max_code)    stored step, so zero + max_code * scale >= hi
//! code  = round( clamp((x - zero) / scale, 0, max_code) )     clamp BEFORE round, as KIVI and SKVQ do
//! x_hat = code * scale + zero
//! ```
//!
//! The parameters are rounded into their storage format first and the codes chosen for the stored values,
//! with the zero point rounded down and the step rounded up, so the stored grid still covers `[lo, hi]`.
//! Hence the bound the tests assert: for `x` in `[lo, hi]`, `|x - x_hat| <= scale / 2` (plus f32
//! arithmetic rounding), where `scale` is the *stored* step, itself at most
//! `(hi - lo) / max_code` plus the format's rounding of the two parameters. For clipped `x` outside
//! `[lo, hi]` the error grows by the distance to the interval.
//!
//! A constant group (`mx == mn`) whose value the format represents gets `scale = 0` and reconstructs
//! exactly; KIVI divides by zero there (§1.1). Non-finite input is an error, never a NaN scale.
//!
//! **Clipping.** SKVQ scales both bounds by `alpha` toward zero (`lo = alpha*mn`, `hi = alpha*mx`). For a
//! group that straddles zero kvq does exactly that. For a one-signed group SKVQ's rule would move the bound
//! nearer zero *away* from the data (e.g. `[1, 2]` becomes `[0.9, 1.8]`), wasting levels below the data;
//! kvq instead anchors at the bound nearest zero and shrinks only the far one, `lo = c + alpha*(mn - c)`,
//! `hi = c + alpha*(mx - c)` with `c = clamp(0, mn, mx)`, which is SKVQ's rule whenever `c = 0`.

use super::param::{ParamFormat, Round};
use crate::error::{Error, Result, need};
use crate::pack::{self, Width};
use crate::view::{Strided, StridedMut};

/// Codes are staged through a stack buffer of this many before packing.
const CHUNK: usize = 64;

/// A uniform quantizer's configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UniformSpec {
    /// Code width.
    pub width: Width,
    /// Clipping factor `alpha` in `(0, 1]`; 1 means no clipping.
    pub clip: f32,
    /// Storage format of the scale and zero point.
    pub params: ParamFormat,
}

/// A group's stored parameters, as values of their [`ParamFormat`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GroupParams {
    /// Step between levels (0 for a constant group).
    pub scale: f32,
    /// Value of code 0.
    pub zero: f32,
}

impl UniformSpec {
    /// `width`-bit codes, no clipping, f16 parameters (KIVI).
    pub const fn new(width: Width) -> Self {
        Self { width, clip: 1.0, params: ParamFormat::F16 }
    }

    /// The same with clipping factor `alpha` (SKVQ uses 0.92 to 0.96).
    pub const fn with_clip(self, alpha: f32) -> Self {
        Self { clip: alpha, ..self }
    }

    /// The same with parameters stored as `params`.
    pub const fn with_params(self, params: ParamFormat) -> Self {
        Self { params, ..self }
    }

    /// Checks the clipping factor.
    ///
    /// # Errors
    /// [`Error::InvalidClip`] unless `0 < clip <= 1`.
    pub fn validate(&self) -> Result<()> {
        if self.clip > 0.0 && self.clip <= 1.0 {
            Ok(())
        } else {
            Err(Error::InvalidClip { alpha: self.clip })
        }
    }

    /// The clipped interval `[lo, hi]` for a group with extremes `mn <= mx` (see the module docs).
    pub fn clip_range(&self, mn: f32, mx: f32) -> (f32, f32) {
        if self.clip == 1.0 {
            return (mn, mx);
        }
        let c = 0.0f32.clamp(mn, mx);
        (c + self.clip * (mn - c), c + self.clip * (mx - c))
    }

    /// Stored parameters for a group with extremes `mn <= mx`.
    ///
    /// # Errors
    /// [`Error::InvalidClip`]; [`Error::NonFinite`] if an extreme is not finite;
    /// [`Error::ParamOverflow`] if the zero point or step does not fit the format.
    pub fn fit(&self, mn: f32, mx: f32) -> Result<GroupParams> {
        self.validate()?;
        if !mn.is_finite() {
            return Err(Error::NonFinite { index: 0 });
        }
        if !mx.is_finite() {
            return Err(Error::NonFinite { index: 1 });
        }
        let (lo, hi) = self.clip_range(mn.min(mx), mn.max(mx));
        let zero = self.params.round(lo, Round::Down)?;
        let span = f64::from(hi) - f64::from(zero); // exact for f32 operands of like magnitude
        let scale = self.params.round_f64(span / f64::from(self.width.max_code()), Round::Up)?;
        Ok(GroupParams { scale, zero })
    }

    /// The code of `x` under `p`.
    #[inline]
    pub fn encode(&self, p: &GroupParams, x: f32) -> u8 {
        if p.scale == 0.0 {
            return 0;
        }
        let t = ((x - p.zero) / p.scale).clamp(0.0, f32::from(self.width.max_code()));
        (t + 0.5) as u8 // t >= 0: truncation of t + 0.5 rounds half up
    }

    /// Quantizes `src` into codes `start..start + src.len()` of the stream `words` and returns the
    /// group's parameters.
    ///
    /// On error nothing is written.
    ///
    /// # Errors
    /// [`Error::NonFinite`] (with the index within the group), [`Error::EmptyInput`],
    /// [`Error::BufferTooSmall`], and the errors of [`UniformSpec::fit`].
    pub fn quantize(&self, src: Strided<'_>, words: &mut [u32], start: usize) -> Result<GroupParams> {
        need("words", self.width.words_for(start + src.len()), words.len())?;
        let (mn, mx) = src.min_max()?;
        let p = self.fit(mn, mx)?;
        self.encode_into(&p, src, words, start)?;
        Ok(p)
    }

    /// Encodes `src` with given parameters into the stream (used when the range excludes outliers).
    pub(crate) fn encode_into(
        &self,
        p: &GroupParams,
        src: Strided<'_>,
        words: &mut [u32],
        start: usize,
    ) -> Result<()> {
        let mut buf = [0u8; CHUNK];
        let mut done = 0;
        while done < src.len() {
            let n = CHUNK.min(src.len() - done);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = self.encode(p, src.get(done + i));
            }
            pack::pack(&buf[..n], self.width, words, start + done)?;
            done += n;
        }
        Ok(())
    }

    /// Reconstructs codes `start..start + out.len()` of `words` under `p` into `out`.
    ///
    /// # Errors
    /// The errors of [`pack::unpack`].
    pub fn dequantize(
        &self,
        p: &GroupParams,
        words: &[u32],
        start: usize,
        mut out: StridedMut<'_>,
    ) -> Result<()> {
        let mut buf = [0u8; CHUNK];
        let mut done = 0;
        while done < out.len() {
            let n = CHUNK.min(out.len() - done);
            pack::unpack(words, self.width, start + done, &mut buf[..n])?;
            for (i, &c) in buf[..n].iter().enumerate() {
                *out.at(done + i) = p.decode(c);
            }
            done += n;
        }
        Ok(())
    }
}

impl GroupParams {
    /// The value of `code`.
    #[inline]
    pub fn decode(&self, code: u8) -> f32 {
        f32::from(code) * self.scale + self.zero
    }

    /// Raw bits `[scale, zero]` in `fmt`.
    pub fn to_raw(&self, fmt: ParamFormat) -> [u16; 2] {
        [fmt.encode(self.scale), fmt.encode(self.zero)]
    }

    /// Parameters from raw bits `[scale, zero]` in `fmt`.
    pub fn from_raw(fmt: ParamFormat, raw: [u16; 2]) -> Self {
        Self { scale: fmt.decode(raw[0]), zero: fmt.decode(raw[1]) }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    extern crate std;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    /// f32 arithmetic slack for computing `x_hat = code * scale + zero` and `(x - zero) / scale`:
    /// a few units of roundoff of the largest magnitude involved.
    pub(crate) fn arith_slack(x: f32, p: &GroupParams, max_code: u8) -> f32 {
        4.0 * f32::EPSILON * (x.abs() + p.zero.abs() + f32::from(max_code) * p.scale)
    }

    /// Checks the error bound of every element of a quantized group; returns the stored parameters.
    fn check_group(spec: UniformSpec, xs: &[f32], start: usize) -> GroupParams {
        let mut words = vec![0xDEAD_BEEFu32; spec.width.words_for(start + xs.len()) + 1];
        let p = spec.quantize(Strided::contiguous(xs), &mut words, start).unwrap();
        let mut back = vec![0.0f32; xs.len()];
        spec.dequantize(&p, &words, start, StridedMut::contiguous(&mut back)).unwrap();
        let (mn, mx) = Strided::contiguous(xs).min_max().unwrap();
        let (lo, hi) = spec.clip_range(mn, mx);
        let maxq = spec.width.max_code();
        // The stored step exceeds the exact one by at most the format's rounding of the zero (down, up
        // to one step of |lo|) and of the step itself (up, one step of |scale|).
        let fmt = spec.params;
        let ulp = |v: f32| (2.0 * fmt.unit_roundoff() * v.abs()).max(fmt.subnormal_step());
        let exact_step = (hi - lo) / f32::from(maxq);
        let step_bound = exact_step + ulp(lo) / f32::from(maxq) + ulp(exact_step + ulp(lo));
        assert!(p.scale <= step_bound * (1.0 + 4.0 * f32::EPSILON), "scale {} > {step_bound}", p.scale);
        let top = f64::from(p.zero) + f64::from(maxq) * f64::from(p.scale);
        assert!(
            p.zero <= lo && top >= f64::from(hi) - f64::from(hi.abs()) * 1e-15,
            "grid {p:?} misses [{lo}, {hi}]"
        );
        for (&x, &y) in xs.iter().zip(&back) {
            let outside = if x < lo {
                lo - x
            } else if x > hi {
                x - hi
            } else {
                0.0
            };
            let bound = p.scale / 2.0 + outside + arith_slack(x, &p, maxq);
            assert!((x - y).abs() <= bound, "x={x} x_hat={y} bound={bound} p={p:?} spec={spec:?}");
        }
        p
    }

    fn lcg_values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
            })
            .collect()
    }

    #[test]
    fn error_within_half_step_every_width() {
        for width in Width::ALL {
            for fmt in [ParamFormat::F16, ParamFormat::Fp8E4M3] {
                for (k, (lo, hi)) in
                    [(-1.0, 1.0), (0.5, 3.0), (-7.0, -2.0), (-0.01, 0.02)].into_iter().enumerate()
                {
                    for n in [1, 2, 31, 32, 33, 128] {
                        let xs = lcg_values(n, (k * 1000 + n) as u64, lo, hi);
                        check_group(UniformSpec::new(width).with_params(fmt), &xs, k * 7);
                    }
                }
            }
        }
    }

    #[test]
    fn two_bit_levels_are_kivi_min_max() {
        // Values on an f16-exact grid: zero = min, step = (max - min) / 3, codes = exact indices.
        let xs = [-1.0f32, 0.5, 2.0, 3.5, 2.0, -1.0];
        let spec = UniformSpec::new(Width::B2);
        let mut w = [0u32; 1];
        let p = spec.quantize(Strided::contiguous(&xs), &mut w, 0).unwrap();
        assert_eq!(p, GroupParams { scale: 1.5, zero: -1.0 });
        let mut codes = [0u8; 6];
        pack::unpack(&w, Width::B2, 0, &mut codes).unwrap();
        assert_eq!(codes, [0, 1, 2, 3, 2, 0]);
    }

    #[test]
    fn constant_group_is_exact() {
        for width in Width::ALL {
            for v in [0.0f32, 1.5, -3.25, 1024.0] {
                let xs = [v; 40];
                let p = check_group(UniformSpec::new(width), &xs, 3);
                assert_eq!(p.scale, 0.0);
                let mut w = [0u32; 12];
                let mut back = [9.0f32; 40];
                let spec = UniformSpec::new(width);
                let p = spec.quantize(Strided::contiguous(&xs), &mut w, 0).unwrap();
                spec.dequantize(&p, &w, 0, StridedMut::contiguous(&mut back)).unwrap();
                assert!(back.iter().all(|&y| y == v), "{width:?} {v}");
            }
        }
        // Not an f16 value: reconstructs within the grid's half step, which is tiny, and never NaN.
        let xs = [0.1f32; 8];
        let p = check_group(UniformSpec::new(Width::B4), &xs, 0);
        assert!(p.scale < 1e-5);
    }

    #[test]
    fn ternary_has_three_levels() {
        let xs = [-2.0f32, -0.1, 0.0, 0.9, 2.0, 1.1];
        let spec = UniformSpec::new(Width::Ternary);
        let mut w = [0u32; 1];
        let p = spec.quantize(Strided::contiguous(&xs), &mut w, 0).unwrap();
        assert_eq!(p, GroupParams { scale: 2.0, zero: -2.0 });
        let mut codes = [0u8; 6];
        pack::unpack(&w, Width::Ternary, 0, &mut codes).unwrap();
        assert_eq!(codes, [0, 1, 1, 1, 2, 2]);
        check_group(spec, &lcg_values(77, 5, -3.0, 1.0), 1);
    }

    #[test]
    fn clipping_shrinks_the_range_and_clamps() {
        let spec = UniformSpec::new(Width::B2).with_clip(0.5);
        assert_eq!(spec.clip_range(-4.0, 2.0), (-2.0, 1.0)); // straddles zero: SKVQ's alpha*min, alpha*max
        assert_eq!(spec.clip_range(2.0, 6.0), (2.0, 4.0)); // one-signed: the far bound moves
        assert_eq!(spec.clip_range(-6.0, -2.0), (-4.0, -2.0));
        let xs = [-4.0f32, -1.0, 0.0, 0.5, 1.0, 2.0];
        let p = check_group(spec, &xs, 0);
        assert_eq!(p, GroupParams { scale: 1.0, zero: -2.0 });
        // -4 clamps to the bottom level, 2 to the top.
        let mut w = [0u32; 1];
        spec.quantize(Strided::contiguous(&xs), &mut w, 0).unwrap();
        let mut codes = [0u8; 6];
        pack::unpack(&w, Width::B2, 0, &mut codes).unwrap();
        assert_eq!(codes, [0, 1, 2, 3, 3, 3]);
        for alpha in [0.0, -1.0, 1.5, f32::NAN] {
            assert!(matches!(
                UniformSpec::new(Width::B2).with_clip(alpha).validate(),
                Err(Error::InvalidClip { .. })
            ));
        }
        for alpha in [0.92f32, 0.96] {
            check_group(UniformSpec::new(Width::B3).with_clip(alpha), &lcg_values(64, 9, -2.0, 5.0), 0);
        }
    }

    #[test]
    fn strided_group_reads_one_channel() {
        // 4 tokens x 3 channels, row-major; channel 1 holds distinct values.
        let rows = [0.0f32, 10.0, 0.0, 0.0, 11.0, 0.0, 0.0, 12.0, 0.0, 0.0, 13.0, 0.0];
        let spec = UniformSpec::new(Width::B2);
        let mut w = [0u32; 1];
        let p = spec.quantize(Strided::new(&rows, 1, 3, 4).unwrap(), &mut w, 0).unwrap();
        assert_eq!(p, GroupParams { scale: 1.0, zero: 10.0 });
        let mut back = [0.0f32; 12];
        spec.dequantize(&p, &w, 0, StridedMut::new(&mut back, 1, 3, 4).unwrap()).unwrap();
        assert_eq!(back, rows);
    }

    #[test]
    fn bad_input_is_an_error_and_writes_nothing() {
        let spec = UniformSpec::new(Width::B4);
        let mut w = [5u32; 2];
        let xs = [1.0f32, f32::INFINITY, 0.0];
        assert_eq!(spec.quantize(Strided::contiguous(&xs), &mut w, 0), Err(Error::NonFinite { index: 1 }));
        let big = [0.0f32, 1.0e6];
        assert!(matches!(
            spec.quantize(Strided::contiguous(&big), &mut w, 0),
            Err(Error::ParamOverflow { .. })
        ));
        assert!(matches!(
            spec.quantize(Strided::contiguous(&[0.0; 17]), &mut w, 0),
            Err(Error::BufferTooSmall { .. })
        ));
        assert_eq!(
            spec.quantize(Strided::contiguous(&[]), &mut w, 0),
            Err(Error::EmptyInput { what: "group" })
        );
        assert_eq!(w, [5, 5]);
        // FP8 parameters overflow at 448.
        let fp8 = spec.with_params(ParamFormat::Fp8E4M3);
        assert!(matches!(
            fp8.quantize(Strided::contiguous(&[-500.0, 0.0]), &mut w, 0),
            Err(Error::ParamOverflow { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 3 } else { 512 }, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn prop_error_within_bound(
            w in 0usize..6,
            fp8 in any::<bool>(),
            clip in prop_oneof![Just(1.0f32), 0.5f32..1.0],
            xs in proptest::collection::vec(-300.0f32..300.0, 1..100),
            scale_exp in -12i32..0,
            start in 0usize..40,
        ) {
            let s = libm::ldexpf(1.0, scale_exp);
            let xs: Vec<f32> = xs.iter().map(|x| x * s).collect();
            let fmt = if fp8 { ParamFormat::Fp8E4M3 } else { ParamFormat::F16 };
            check_group(UniformSpec::new(Width::ALL[w]).with_clip(clip).with_params(fmt), &xs, start);
        }
    }
}
