//! `kvq-core`: exact, `no_std` primitives for storing keys and values at 1.5 to 8 bits.
//!
//! Numbers in, numbers out, over memory the caller hands in: no allocator, no files, no threads. The
//! methods are those of KIVI, KVQuant, SKVQ and MiKV; `docs/methods.md` in the repository says what each
//! does here and cites the papers.
//!
//! ```
//! use kvq_core::pack::Width;
//! use kvq_core::quant::uniform::UniformSpec;
//! use kvq_core::view::{Strided, StridedMut};
//!
//! // One per-channel key group: 32 tokens of channel 5 in a [tokens, 64] row-major block.
//! let keys: Vec<f32> = (0..32 * 64).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
//! let group = Strided::new(&keys, 5, 64, 32)?;
//! let spec = UniformSpec::new(Width::B2); // KIVI-2: asymmetric min-max, f16 scale and zero
//! let mut words = [0u32; 2]; // 32 codes x 2 bits
//! let p = spec.quantize(group, &mut words, 0)?;
//!
//! let mut back = [0.0f32; 32];
//! spec.dequantize(&p, &words, 0, StridedMut::contiguous(&mut back))?;
//! for (x, y) in group.iter().zip(back) {
//!     assert!((x - y).abs() <= p.scale / 2.0 + 1e-6);
//! }
//! # Ok::<(), kvq_core::Error>(())
//! ```
//!
//! # Modules
//!
//! - [`pack`]: b-bit codes (1, 2, 3, 4, 8 and ternary) in `u32` words; the layout diagram is there.
//! - [`quant::uniform`], [`quant::codebook`], [`quant::outliers`], [`quant::reorder`]: the quantizers.
//! - [`transform`]: the Hadamard rotation and group-relative RoPE a cache may store keys and values under.
//! - [`view`]: strided views, so a group is read out of a larger array without a copy.
//! - [`cache`]: the KV cache over a caller's arena: sinks, full-precision windows, quantized bodies in
//!   every format the presets use, sliding, calibration tables; sizes from `const fn`s.
//! - [`attention`]: decode and prefill attention over a cache, fused with the dequantization (portable
//!   code, and AVX2 kernels chosen at run time where the `std` feature can detect them).
//! - [`error`]: the one error type.
//!
//! # Storage per element
//!
//! Codes plus a scale and a zero point per group ([`quant::bits_per_element`]). Ternary codes are stored in
//! 2 bits, so they cost what 2-bit codes cost (their gain is accuracy per level, not storage).
//!
//! | codes | group | f16 params | FP8 params |
//! |---|---|---|---|
//! | 1-bit | 32 | 2.0 | 1.5 |
//! | 1-bit | 128 | 1.25 | 1.125 |
//! | 2-bit | 32 | 3.0 | 2.5 |
//! | 2-bit | 64 | 2.5 | 2.25 |
//! | 2-bit | 128 | 2.25 | 2.125 |
//! | ternary | 32 | 3.0 | 2.5 |
//! | ternary | 128 | 2.25 | 2.125 |
//! | 3-bit | 32 | 4.0 | 3.5 |
//! | 3-bit | 128 | 3.25 | 3.125 |
//! | 4-bit | 32 | 5.0 | 4.5 |
//! | 4-bit | 64 | 4.5 | 4.25 |
//! | 4-bit | 128 | 4.25 | 4.125 |
//! | 8-bit | 32 | 9.0 | 8.5 |
//! | 8-bit | 128 | 8.25 | 8.125 |
//!
//! KIVI-2 at G = 32 is 3.0 bits (KVQuant's table quotes 3.05 with the fp16 residual window); SKVQ's
//! 2.5 / 2.25 / 2.125 at G = 32 / 64 / 128 are its FP8 rows. A KVQuant codebook vector of 64 values with
//! f16 zero and range is 2.5 bits at 2-bit codes; dense-and-sparse adds 32 bits per outlier slot
//! ([`quant::outlier_bits_per_element`]: 1 slot per 100 values is 0.32 bits, the paper's figure).
//!
//! # Features
//!
//! `std` adds run-time CPU detection for the AVX2 kernels; `defmt` derives `defmt::Format` on the public
//! enums and errors for firmware logging. Nothing in the crate needs an allocator.

#![no_std]
#![deny(unsafe_code)]

#[cfg(feature = "std")]
extern crate std;

pub mod attention;
pub mod cache;
pub mod error;
pub mod pack;
pub mod quant;
pub mod transform;
pub mod view;

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::{Error, Result};

#[cfg(test)]
mod tests {
    extern crate std;
    use crate::pack::Width;
    use crate::quant::{bits_per_element, group_bytes, outlier_bits_per_element, param::ParamFormat};
    use std::format;

    /// The crate docs' table is what the accounting functions compute, row by row.
    #[test]
    fn docs_table_matches_accounting() {
        let docs = include_str!("lib.rs");
        let rows = [
            (Width::B1, "1-bit", [32, 128]),
            (Width::B2, "2-bit", [32, 128]),
            (Width::Ternary, "ternary", [32, 128]),
            (Width::B3, "3-bit", [32, 128]),
            (Width::B4, "4-bit", [32, 128]),
            (Width::B8, "8-bit", [32, 128]),
        ];
        for (width, name, groups) in rows {
            for g in groups {
                let f16 = bits_per_element(width, g, ParamFormat::F16);
                let fp8 = bits_per_element(width, g, ParamFormat::Fp8E4M3);
                let row = format!("//! | {name} | {g} | {f16:?} | {fp8:?} |");
                assert!(docs.contains(&row), "missing or wrong docs row: {row}");
            }
        }
        assert_eq!(bits_per_element(Width::B2, 64, ParamFormat::F16), 2.5);
        assert_eq!(group_bytes(Width::B3, 32, ParamFormat::F16), 16);
        assert_eq!(group_bytes(Width::B4, 32, ParamFormat::Fp8E4M3), 18);
        assert!((outlier_bits_per_element(1, 100) - 0.32).abs() < 1e-6);
    }
}
