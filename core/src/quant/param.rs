//! Storage formats for quantization parameters (scale, zero point): IEEE f16, and FP8 E4M3 (SKVQ §3.3).
//!
//! Parameters are rounded *into* the format before any code is chosen, so the codes are the best codes
//! for the parameters actually stored. [`ParamFormat::round`] rounds in a chosen direction, which lets the
//! uniform quantizer pick a grid that still covers its whole range after rounding.

use crate::error::{Error, Result};

/// How a scale or zero point is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ParamFormat {
    /// IEEE 754 binary16: 10 mantissa bits, largest finite 65504.
    F16,
    /// OCP FP8 E4M3 ("fn": no infinities): 3 mantissa bits, exponent bias 7, largest finite 448,
    /// subnormal spacing 2^-9.
    Fp8E4M3,
}

/// Rounding direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Round {
    /// To nearest, ties to even.
    Nearest,
    /// Toward negative infinity.
    Down,
    /// Toward positive infinity.
    Up,
}

impl ParamFormat {
    /// Bytes one parameter takes.
    #[inline]
    pub const fn bytes(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::Fp8E4M3 => 1,
        }
    }

    /// Largest finite magnitude.
    #[inline]
    pub const fn max(self) -> f32 {
        match self {
            Self::F16 => 65504.0,
            Self::Fp8E4M3 => 448.0,
        }
    }

    /// Explicit mantissa bits.
    const fn mantissa_bits(self) -> i32 {
        match self {
            Self::F16 => 10,
            Self::Fp8E4M3 => 3,
        }
    }

    /// Exponent of the smallest normal number.
    const fn min_exp(self) -> i32 {
        match self {
            Self::F16 => -14,
            Self::Fp8E4M3 => -6,
        }
    }

    /// Half the largest relative rounding error of [`Round::Nearest`] for normal numbers: `2^-(m+1)`.
    pub const fn unit_roundoff(self) -> f32 {
        match self {
            Self::F16 => 1.0 / 2048.0,
            Self::Fp8E4M3 => 1.0 / 16.0,
        }
    }

    /// Spacing of the subnormal numbers: `2^(min_exp - m)`.
    pub const fn subnormal_step(self) -> f32 {
        match self {
            Self::F16 => 1.0 / 16_777_216.0, // 2^-24
            Self::Fp8E4M3 => 1.0 / 512.0,    // 2^-9
        }
    }

    /// The value of the format nearest to `v` in direction `mode`.
    ///
    /// # Errors
    /// [`Error::ParamOverflow`] if `v` is not finite or the rounded value exceeds [`ParamFormat::max`].
    pub fn round(self, v: f32, mode: Round) -> Result<f32> {
        self.round_f64(f64::from(v), mode)
    }

    /// [`ParamFormat::round`] of an `f64`, for callers that compute a parameter in double precision.
    ///
    /// # Errors
    /// As [`ParamFormat::round`].
    pub fn round_f64(self, v: f64, mode: Round) -> Result<f32> {
        let overflow = Error::ParamOverflow { value: v as f32, max: self.max() };
        if !v.is_finite() {
            return Err(overflow);
        }
        if v == 0.0 {
            return Ok(0.0);
        }
        // Exponent of |v| from f64's own exponent field; subnormal f64s are far below both formats' range.
        let field = ((v.to_bits() >> 52) & 0x7ff) as i32;
        let e = if field == 0 { self.min_exp() } else { (field - 1023).max(self.min_exp()) };
        let quantum = libm::ldexp(1.0, e - self.mantissa_bits());
        let t = v / quantum; // exact: division by a power of two
        let k = match mode {
            Round::Nearest => libm::rint(t),
            Round::Down => libm::floor(t),
            Round::Up => libm::ceil(t),
        };
        let r = k * quantum; // exact, and a value of the format is a value of f32
        if r.abs() > f64::from(self.max()) { Err(overflow) } else { Ok(r as f32) }
    }

    /// Raw bits of `v`, which must be a value of the format (as [`ParamFormat::round`] returns).
    /// FP8 bits occupy the low byte.
    pub fn encode(self, v: f32) -> u16 {
        match self {
            Self::F16 => half::f16::from_f32(v).to_bits(),
            Self::Fp8E4M3 => {
                let sign = if v.is_sign_negative() { 0x80u16 } else { 0 };
                let a = v.abs();
                if a == 0.0 {
                    return sign;
                }
                let field = ((a.to_bits() >> 23) & 0xff) as i32 - 127;
                if field < -6 {
                    // Subnormal: a = m * 2^-9, m in 1..=7.
                    sign | (libm::ldexpf(a, 9) as u16 & 7)
                } else {
                    let m = (libm::ldexpf(a, 3 - field) as u16) & 7; // a = (8 + m) * 2^(field-3)
                    sign | (((field + 7) as u16) << 3) | m
                }
            }
        }
    }

    /// The value of raw bits produced by [`ParamFormat::encode`]. The FP8 NaN pattern decodes to NaN.
    pub fn decode(self, raw: u16) -> f32 {
        match self {
            Self::F16 => half::f16::from_bits(raw).to_f32(),
            Self::Fp8E4M3 => FP8_E4M3[usize::from(raw & 0xff)],
        }
    }
}

/// The value of an E4M3 byte: `(-1)^s * m * 2^-9` for exponent field 0 (subnormal), else
/// `(-1)^s * (8 + m) * 2^(e - 10)`; `e = 15, m = 7` is NaN. Every factor is a power of two or a small
/// integer, so the products are exact.
const fn fp8_e4m3_value(raw: u8) -> f32 {
    let sign = if raw & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((raw >> 3) & 0xf) as i32;
    let m = (raw & 7) as f32;
    if exp == 15 && raw & 7 == 7 {
        f32::NAN
    } else if exp == 0 {
        sign * m * pow2(-9)
    } else {
        sign * (8.0 + m) * pow2(exp - 10)
    }
}

/// `2^k` for a normal `k` (here -9..=5), from its bit pattern.
const fn pow2(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

/// Every E4M3 byte's value, so that decoding a group parameter is one load (the decode-attention paths read
/// two per group).
/// The value of every E4M3 byte, for kernels that decode many at once (a gather).
#[cfg(target_arch = "x86_64")]
pub(crate) fn fp8_e4m3_table() -> &'static [f32; 256] {
    &FP8_E4M3
}

static FP8_E4M3: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = fp8_e4m3_value(i as u8);
        i += 1;
    }
    t
};

/// The f16 bits of each E4M3 code's value. Every E4M3 value is an f16 value (3 mantissa bits within f16's
/// 10, exponents from 2^-9 within f16's normal range from 2^-14), so this is exact; the attention kernels
/// read FP8 parameters through it where they take f16 ones.
#[cfg(any(target_arch = "x86_64", test))]
pub(crate) static FP8_E4M3_F16: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = f16_bits_of_exact(FP8_E4M3[i]);
        i += 1;
    }
    t
};

/// The f16 bits of `x`, for an `x` that is zero, NaN or an f16 normal (no rounding is done).
#[cfg(any(target_arch = "x86_64", test))]
const fn f16_bits_of_exact(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let e = ((b >> 23) & 0xff) as i32;
    if e == 0 {
        return sign;
    }
    if e == 0xff {
        return sign | 0x7e00;
    }
    sign | (((e - 127 + 15) as u16) << 10) | ((b >> 13) & 0x3ff) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f16 table equals `half`'s conversion of every E4M3 value, and converts back to it.
    #[test]
    fn fp8_values_are_f16_values() {
        for raw in 0..=255u16 {
            let v = ParamFormat::Fp8E4M3.decode(raw);
            let h = FP8_E4M3_F16[usize::from(raw)];
            if v.is_nan() {
                assert!(half::f16::from_bits(h).is_nan(), "{raw:#x}");
                continue;
            }
            assert_eq!(h, half::f16::from_f32(v).to_bits(), "{raw:#x}: {v}");
            assert_eq!(half::f16::from_bits(h).to_f32(), v, "{raw:#x}");
        }
    }

    #[test]
    fn f16_nearest_matches_half() {
        let mut x = 1.0e-9f32;
        while x < 70000.0 {
            for v in [x, -x, x * 1.37, -x * 0.71] {
                match ParamFormat::F16.round(v, Round::Nearest) {
                    Ok(r) => assert_eq!(r, half::f16::from_f32(v).to_f32(), "v={v}"),
                    Err(_) => assert!(half::f16::from_f32(v).is_infinite(), "v={v}"),
                }
            }
            x *= 1.0173;
        }
    }

    /// The decode table against the format's definition, evaluated with `ldexpf` for all 256 bytes.
    #[test]
    fn fp8_table_is_the_format() {
        for raw in 0u16..256 {
            let sign = if raw & 0x80 != 0 { -1.0 } else { 1.0 };
            let (exp, m) = (i32::from((raw >> 3) & 0xf), f32::from((raw & 7) as u8));
            let want =
                if exp == 0 { sign * libm::ldexpf(m, -9) } else { sign * libm::ldexpf(8.0 + m, exp - 10) };
            let got = ParamFormat::Fp8E4M3.decode(raw);
            if exp == 15 && raw & 7 == 7 {
                assert!(got.is_nan(), "{raw:#x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{raw:#x}");
            }
        }
        assert_eq!(ParamFormat::Fp8E4M3.decode(0x7e), 448.0);
        assert_eq!(ParamFormat::Fp8E4M3.decode(0x01), libm::ldexpf(1.0, -9));
    }

    #[test]
    fn directed_rounding_brackets_the_value() {
        for fmt in [ParamFormat::F16, ParamFormat::Fp8E4M3] {
            let mut x = 1.0e-6f32;
            while x < fmt.max() {
                for v in [x, -x] {
                    let d = fmt.round(v, Round::Down).unwrap();
                    // Within a step of the top, rounding up overflows, as it must.
                    let Ok(u) = fmt.round(v, Round::Up) else { continue };
                    assert!(d <= v && v <= u, "{fmt:?} v={v} d={d} u={u}");
                    // Adjacent values of the format: one normal step or one subnormal step apart.
                    let step = (v.abs() * 2.0 * fmt.unit_roundoff()).max(fmt.subnormal_step());
                    assert!(u - d <= step, "{fmt:?} v={v} d={d} u={u}");
                    for r in [d, u] {
                        assert_eq!(fmt.decode(fmt.encode(r)), r, "{fmt:?} r={r}");
                    }
                }
                x *= 1.0311;
            }
        }
    }

    #[test]
    fn fp8_e4m3_known_values() {
        let f = ParamFormat::Fp8E4M3;
        assert_eq!(f.encode(448.0), 0x7e);
        assert_eq!(f.encode(1.0), 0x38);
        assert_eq!(f.encode(-2.0), 0xc0);
        assert_eq!(f.encode(1.0 / 512.0), 0x01); // smallest subnormal
        assert_eq!(f.encode(0.875 / 64.0), 0x07); // largest subnormal
        assert_eq!(f.decode(0x7e), 448.0);
        assert!(f.decode(0x7f).is_nan());
        // Every non-NaN pattern round-trips.
        for raw in 0u16..256 {
            let v = f.decode(raw);
            if !v.is_nan() {
                assert_eq!(f.encode(v), raw, "raw={raw:#x} v={v}");
            }
        }
        assert_eq!(f.round(0.3, Round::Nearest).unwrap(), 0.3125);
        assert!(matches!(f.round(449.0, Round::Up), Err(Error::ParamOverflow { .. })));
        assert!(matches!(ParamFormat::F16.round(f32::NAN, Round::Down), Err(Error::ParamOverflow { .. })));
    }
}
