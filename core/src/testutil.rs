//! Shared helpers for the unit tests: deterministic data and the quantizer's per-element bound.
extern crate std;
use crate::pack::Width;
use crate::quant::param::{ParamFormat, Round};
use half::f16;
use std::vec::Vec;

pub(crate) use crate::testing::Rng;

/// Activations shaped like real keys and values: each channel has its own offset and spread (a few
/// channels are outliers, as KIVI observes for keys), so per-channel and per-token groups differ.
pub(crate) fn activations(rng: &mut Rng, tokens: usize, heads: usize, d: usize) -> Vec<f32> {
    let chan: Vec<(f32, f32)> = (0..heads * d)
        .map(|i| {
            let outlier = i % 17 == 3;
            (rng.unit() * if outlier { 6.0 } else { 1.0 }, if outlier { 4.0 } else { 1.0 + rng.unit().abs() })
        })
        .collect();
    (0..tokens * heads * d).map(|i| chan[i % (heads * d)].0 + chan[i % (heads * d)].1 * rng.unit()).collect()
}

/// `x` rounded to f16, back in f32.
pub(crate) fn f16r(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// The largest error the uniform quantizer can make on any element of a group whose values (as quantized)
/// are `xs`: half the stored step plus f32 arithmetic slack. The step follows the quantizer's own
/// definition (`quant::uniform`): zero = f16 round-down of the minimum, step = f16 round-up of
/// `(max - zero) / max_code`.
pub(crate) fn group_bound(xs: &[f32], width: Width) -> f32 {
    let lo = xs.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let f = ParamFormat::F16;
    let zero = f.round(lo, Round::Down).unwrap();
    let step =
        f.round_f64((f64::from(hi) - f64::from(zero)) / f64::from(width.max_code()), Round::Up).unwrap();
    // decode = code * step + zero in f32: two roundings of magnitude up to |zero| + max_code * step
    let mag = zero.abs() + f32::from(width.max_code()) * step;
    step / 2.0 + 2.0 * f32::EPSILON * mag
}
