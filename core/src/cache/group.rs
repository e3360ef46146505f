//! One quantization group as the cache codes it: uniform min-max (KIVI, SKVQ) or calibrated codebook levels
//! (KVQuant's nuqX), parameters in f16 or FP8, with the group's outliers left out of its range.
//!
//! Both kinds reconstruct a code as `zero + scale * level(code)`: for the uniform grid `level(code) = code`,
//! `zero` the bottom of the range and `scale` the step (methods.md §1.1); for a codebook `level` is the
//! calibrated table in `[-1, 1]` (after Q-Norm), `zero` the centre of the range and `scale` its half-width
//! (§2.3). The kernels read every format through that one form.

use super::config::QuantSpec;
use crate::error::Result;
use crate::quant::param::Round;
use crate::quant::uniform::{GroupParams, UniformSpec};

/// A stream's coder for one group: its spec and, for codebook streams, the encoding and decoding levels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GroupCoder<'t> {
    pub(crate) spec: QuantSpec,
    /// Encoding levels (ascending) and decoding levels, for codebook streams.
    pub(crate) levels: Option<(&'t [f32], &'t [f32])>,
}

/// Index of the level of `enc` (ascending) nearest to `a`, the lower one on a tie (as
/// [`crate::quant::codebook::Codebook::encode`]).
#[inline]
pub(crate) fn nearest(enc: &[f32], a: f32) -> u8 {
    let i = enc.partition_point(|&l| l <= a);
    if i == 0 {
        return 0;
    }
    if i == enc.len() {
        return (enc.len() - 1) as u8;
    }
    if a - enc[i - 1] <= enc[i] - a { (i - 1) as u8 } else { i as u8 }
}

impl GroupCoder<'_> {
    fn uniform(&self) -> UniformSpec {
        UniformSpec::new(self.spec.width).with_clip(self.spec.clip).with_params(self.spec.params)
    }

    /// Parameters for a group whose values (outliers left out) span `[lo, hi]`.
    ///
    /// Codebook groups: `zero` is the centre rounded to nearest and `scale` the half-width that still
    /// covers `[lo, hi]` around the stored centre, rounded up, so every value normalizes into `[-1, 1]`.
    ///
    /// # Errors
    /// [`crate::Error::ParamOverflow`] if a parameter does not fit its format (the cache checks magnitudes
    /// before it quantizes, so this does not happen there).
    pub(crate) fn fit(&self, lo: f32, hi: f32) -> Result<GroupParams> {
        if self.levels.is_none() {
            return self.uniform().fit(lo, hi);
        }
        let fmt = self.spec.params;
        let (lo, hi) = self.uniform().clip_range(lo.min(hi), lo.max(hi));
        let zero = fmt.round_f64((f64::from(lo) + f64::from(hi)) / 2.0, Round::Nearest)?;
        let half = (f64::from(hi) - f64::from(zero)).max(f64::from(zero) - f64::from(lo));
        let scale = fmt.round_f64(half, Round::Up)?;
        Ok(GroupParams { scale, zero })
    }

    /// The code of `x`.
    #[inline]
    pub(crate) fn encode(&self, p: &GroupParams, x: f32) -> u8 {
        match self.levels {
            None => self.uniform().encode(p, x),
            Some((enc, _)) => {
                let a = if p.scale == 0.0 { 0.0 } else { (x - p.zero) / p.scale };
                nearest(enc, a)
            }
        }
    }

    /// The reconstruction of `code`.
    #[inline]
    pub(crate) fn decode(&self, p: &GroupParams, code: u8) -> f32 {
        match self.levels {
            None => p.decode(code),
            Some((_, dec)) => p.zero + p.scale * dec[usize::from(code)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::Width;
    use crate::quant::codebook::Codebook;
    use crate::quant::param::ParamFormat;

    #[test]
    fn nearest_is_the_codebooks_rule() {
        let enc = [-0.8f32, -0.2, 0.3, 0.9];
        let cb = Codebook::new(Width::B2, &enc).unwrap();
        for i in -120..=120 {
            let a = i as f32 / 100.0;
            assert_eq!(nearest(&enc, a), cb.encode(a), "a = {a}");
        }
    }

    /// A codebook group's parameters cover its range after rounding, in both formats: every value
    /// normalizes into `[-1, 1]`, and the top level reconstructs the top of the stored range.
    #[test]
    fn codebook_params_cover_the_range() {
        let (enc, dec) = ([-1.0f32, -0.3, 0.3, 1.0], [-1.0f32, -0.3, 0.3, 1.0]);
        for fmt in [ParamFormat::F16, ParamFormat::Fp8E4M3] {
            let spec = crate::cache::QuantSpec::per_channel(Width::B2, 32).with_codebook().with_params(fmt);
            let c = GroupCoder { spec, levels: Some((&enc, &dec)) };
            for (lo, hi) in [(-3.1f32, 2.7), (10.3, 11.9), (-0.001, 0.002), (5.0, 5.0)] {
                let p = c.fit(lo, hi).unwrap();
                assert!(p.zero - p.scale <= lo && p.zero + p.scale >= hi, "{fmt:?} [{lo}, {hi}]: {p:?}");
                assert_eq!(fmt.round(p.zero, Round::Nearest).unwrap(), p.zero);
                let top = p.zero + p.scale;
                assert_eq!(c.decode(&p, c.encode(&p, top)), top);
            }
        }
    }
}
