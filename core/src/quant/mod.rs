//! Group quantizers and their storage accounting.
//!
//! - [`uniform`]: asymmetric min-max groups with clipping (KIVI, SKVQ), f16 or FP8 parameters.
//! - [`codebook`]: non-uniform levels from weighted k-means, Q-Norm (KVQuant nuqX).
//! - [`outliers`]: dense-and-sparse storage of the values beyond per-vector thresholds (KVQuant).
//! - [`reorder`]: channel permutation into variable-size groups by clustering (SKVQ).
//! - [`param`]: the f16 and FP8 E4M3 parameter formats.

pub mod codebook;
pub mod outliers;
pub mod param;
pub mod reorder;
pub mod uniform;

use crate::pack::Width;
use param::ParamFormat;

/// Bits one group of `len` codes takes with its two parameters (scale and zero point, or zero and range).
#[inline]
pub const fn group_bits(width: Width, len: usize, params: ParamFormat) -> usize {
    len * width.bits() as usize + 2 * 8 * params.bytes()
}

/// Bytes one group of `len` codes and its two parameters take, when the group's codes start on a byte.
///
/// ```
/// use kvq_core::{pack::Width, quant::{group_bytes, param::ParamFormat}};
/// // KIVI-2, G = 32: 8 bytes of codes + f16 scale + f16 zero.
/// assert_eq!(group_bytes(Width::B2, 32, ParamFormat::F16), 12);
/// ```
#[inline]
pub const fn group_bytes(width: Width, len: usize, params: ParamFormat) -> usize {
    group_bits(width, len, params).div_ceil(8)
}

/// Average storage bits per element of groups of `len` codes with their parameters.
#[inline]
pub const fn bits_per_element(width: Width, len: usize, params: ParamFormat) -> f32 {
    group_bits(width, len, params) as f32 / len as f32
}

/// Average bits per element that dense-and-sparse storage adds for `capacity` outlier slots per vector of
/// `len` elements (4 bytes a slot: 16-bit index, f16 correction).
#[inline]
pub const fn outlier_bits_per_element(capacity: usize, len: usize) -> f32 {
    (capacity * 8 * core::mem::size_of::<outliers::Outlier>()) as f32 / len as f32
}
