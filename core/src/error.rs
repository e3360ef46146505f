//! The one error type of `kvq-core`.
//!
//! Every fallible operation returns [`Error`], a small `Copy` enum whose variants carry the numbers that
//! explain the failure. No operation panics on bad input, and a failed operation leaves the caller's
//! buffers as they were unless its docs say otherwise.

use core::fmt;

/// What went wrong, with the offending numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Error {
    /// An input value was NaN or infinite; `index` is its position in the input as the operation read it.
    NonFinite {
        /// Position of the first non-finite value.
        index: usize,
    },
    /// A caller-provided buffer is shorter than the operation needs.
    BufferTooSmall {
        /// Which buffer.
        what: &'static str,
        /// Elements (or bytes, for byte buffers) needed.
        needed: usize,
        /// Elements (or bytes) provided.
        got: usize,
    },
    /// A caller-provided arena is smaller than the layout needs, in bytes.
    ArenaTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes provided.
        got: usize,
    },
    /// Two lengths that must agree do not.
    ShapeMismatch {
        /// Which quantity.
        what: &'static str,
        /// The length the operation expected.
        expected: usize,
        /// The length it got.
        got: usize,
    },
    /// A strided view reaches past the end of its slice.
    OutOfBounds {
        /// Last index the view would touch.
        index: usize,
        /// Length of the slice.
        len: usize,
    },
    /// A code is larger than its width allows.
    CodeOutOfRange {
        /// The code.
        code: u8,
        /// Largest code the width allows.
        max: u8,
    },
    /// A quantization parameter (scale or zero point) does not fit its storage format.
    ParamOverflow {
        /// The value that did not fit.
        value: f32,
        /// Largest finite magnitude of the format.
        max: f32,
    },
    /// A configuration value is out of its allowed range.
    InvalidConfig {
        /// Which setting.
        what: &'static str,
        /// The value given.
        value: usize,
    },
    /// A clipping factor outside `(0, 1]`.
    InvalidClip {
        /// The factor given.
        alpha: f32,
    },
    /// More values lie beyond the outlier thresholds than the outlier storage holds.
    TooManyOutliers {
        /// Values beyond the thresholds.
        needed: usize,
        /// Slots available.
        capacity: usize,
    },
    /// A permutation repeats or skips an index.
    InvalidPermutation {
        /// First offending entry.
        index: usize,
    },
    /// The input holds nothing to work on (no values, or all weights zero).
    EmptyInput {
        /// Which input.
        what: &'static str,
    },
    /// A serialized input (a table blob) does not parse: `what` failed at word `at`.
    Malformed {
        /// What was wrong.
        what: &'static str,
        /// Word where parsing stopped.
        at: usize,
    },
    /// A cache configured to stop when full was asked to hold more tokens than its capacity.
    ContextFull {
        /// Tokens the cache holds.
        held: usize,
        /// Tokens the append asked to add.
        adding: usize,
        /// Tokens it can hold.
        capacity: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NonFinite { index } => write!(f, "non-finite input value at index {index}"),
            Self::BufferTooSmall { what, needed, got } => {
                write!(f, "{what} buffer too small: needs {needed}, got {got}")
            }
            Self::ArenaTooSmall { needed, got } => {
                write!(f, "arena too small: needs {needed} bytes, got {got}")
            }
            Self::ShapeMismatch { what, expected, got } => {
                write!(f, "{what}: expected {expected}, got {got}")
            }
            Self::OutOfBounds { index, len } => {
                write!(f, "strided view reaches index {index} of a slice of length {len}")
            }
            Self::CodeOutOfRange { code, max } => write!(f, "code {code} exceeds the width's maximum {max}"),
            Self::ParamOverflow { value, max } => {
                write!(f, "quantization parameter {value} exceeds the format's range ±{max}")
            }
            Self::InvalidConfig { what, value } => write!(f, "invalid {what}: {value}"),
            Self::InvalidClip { alpha } => write!(f, "clipping factor {alpha} is outside (0, 1]"),
            Self::TooManyOutliers { needed, capacity } => {
                write!(f, "{needed} values beyond the outlier thresholds, storage holds {capacity}")
            }
            Self::InvalidPermutation { index } => {
                write!(f, "permutation entry {index} repeats or is out of range")
            }
            Self::EmptyInput { what } => write!(f, "{what} is empty"),
            Self::Malformed { what, at } => write!(f, "malformed table blob at word {at}: {what}"),
            Self::ContextFull { held, adding, capacity } => {
                write!(f, "context full: holding {held} tokens, adding {adding}, capacity {capacity}")
            }
        }
    }
}

impl core::error::Error for Error {}

/// `Result` with [`Error`].
pub type Result<T> = core::result::Result<T, Error>;

/// Checks that a buffer named `what` holds at least `needed` elements.
#[inline]
pub(crate) fn need(what: &'static str, needed: usize, got: usize) -> Result<()> {
    if got < needed { Err(Error::BufferTooSmall { what, needed, got }) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::string::ToString;

    #[test]
    fn display_names_the_numbers() {
        let e = Error::ArenaTooSmall { needed: 4096, got: 100 };
        assert_eq!(e.to_string(), "arena too small: needs 4096 bytes, got 100");
        let e = Error::BufferTooSmall { what: "words", needed: 7, got: 3 };
        assert_eq!(e.to_string(), "words buffer too small: needs 7, got 3");
        assert!(need("x", 3, 3).is_ok());
        assert_eq!(need("x", 4, 3), Err(Error::BufferTooSmall { what: "x", needed: 4, got: 3 }));
    }
}
