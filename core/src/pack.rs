//! Bit-packing of b-bit codes into `u32` words.
//!
//! # Layout
//!
//! A run of codes is one little-endian **bitstream** over `u32` words: code `i` of the run occupies bits
//! `i*b .. i*b + b` of the stream, least significant bit first, and bit `k` of the stream is bit `k % 32`
//! of word `k / 32`. For the power-of-two widths this is exactly KIVI's layout (methods.md §1.3): word `w`
//! holds codes `w*32/b .. (w+1)*32/b - 1`, code `j` of the word at `(word >> (j*b)) & mask`.
//!
//! ```text
//! b = 2, 16 codes per word                     b = 4, 8 codes per word
//! word 0: |c15|c14| ... |c2 |c1 |c0 |          word 0: | c7 | c6 | ... | c1 | c0 |
//!  bit    31 30           5 4 3 2 1 0           bit     31 28          7  4 3  0
//!
//! b = 3, 32 codes in 3 words (the same stream; codes 10 and 21 straddle a word boundary)
//! word 0: |c10.lo(2)|c9|c8| ... |c1|c0|        c10 = bits 30..31 of word 0 + bit 0 of word 1
//! word 1: |c21.lo(1)|c20| ... |c11|c10.hi(1)|  c21 = bit 31 of word 1 + bits 0..1 of word 2
//! word 2: |c31|c30| ... |c22|c21.hi(2)|
//! ```
//!
//! **Why 32-in-3 for 3 bits** rather than 10 codes per word: it is the same stream formula as every other
//! width (one reader, one writer, one CUDA indexing rule), it stores exactly 3.0 bits per code where
//! 10-per-word stores 3.2 (7 % more cache for nothing), and it is the GPTQ/KVQuant layout
//! (methods.md §2.7), so their kernels' unpacking applies unchanged. The cost — two codes in every 32
//! straddle words — falls at fixed positions (10 and 21) of a 3-word block, so a decoder of a whole
//! 32-code block unrolls without branches, and kvq's group sizes are multiples of 32.
//!
//! [`Width::Ternary`] (SKVQ's "1.5-bit", three levels 0, 1, 2) is stored in 2 bits per code; the stored
//! value 3 is invalid and [`unpack`] reports it rather than decoding a level that does not exist
//! (SKVQ's reference unpack masks with `(1<<1)-1` and loses level 2, methods.md §3.4).
//!
//! Packing overwrites only the bits of the codes it writes: neighbouring codes in the same words are kept,
//! and slots need not be zeroed first.

use crate::error::{Error, Result, need};

/// The storage width of a code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Width {
    /// 1 bit, codes 0..=1.
    B1,
    /// 2 bits, codes 0..=3.
    B2,
    /// 3 bits, codes 0..=7 (32 codes in 3 words).
    B3,
    /// 4 bits, codes 0..=15.
    B4,
    /// 8 bits, codes 0..=255.
    B8,
    /// Three levels, codes 0..=2, stored in 2 bits (SKVQ "1.5-bit").
    Ternary,
}

impl Width {
    /// Every width, for tests and tables.
    pub const ALL: [Self; 6] = [Self::B1, Self::B2, Self::B3, Self::B4, Self::B8, Self::Ternary];

    /// Bits each code occupies in storage.
    #[inline]
    pub const fn bits(self) -> u32 {
        match self {
            Self::B1 => 1,
            Self::B2 | Self::Ternary => 2,
            Self::B3 => 3,
            Self::B4 => 4,
            Self::B8 => 8,
        }
    }

    /// Largest valid code (`levels - 1`).
    #[inline]
    pub const fn max_code(self) -> u8 {
        match self {
            Self::Ternary => 2,
            Self::B8 => 255,
            _ => ((1u32 << self.bits()) - 1) as u8,
        }
    }

    /// Number of quantization levels.
    #[inline]
    pub const fn levels(self) -> u32 {
        self.max_code() as u32 + 1
    }

    /// The width for `bits` in {1, 2, 3, 4, 8}; `None` otherwise (ternary has no bit count of its own).
    pub const fn from_bits(bits: u32) -> Option<Self> {
        match bits {
            1 => Some(Self::B1),
            2 => Some(Self::B2),
            3 => Some(Self::B3),
            4 => Some(Self::B4),
            8 => Some(Self::B8),
            _ => None,
        }
    }

    /// Words needed to hold codes `0..n` of a stream.
    #[inline]
    pub const fn words_for(self, n: usize) -> usize {
        (n * self.bits() as usize).div_ceil(32)
    }

    #[inline]
    const fn mask(self) -> u64 {
        (1u64 << self.bits()) - 1
    }
}

/// Reads code `i` of the stream.
///
/// # Errors
/// [`Error::BufferTooSmall`] if the code lies past the end of `words`.
#[inline]
pub fn get(words: &[u32], width: Width, i: usize) -> Result<u8> {
    need("words", width.words_for(i + 1), words.len())?;
    let bit = i * width.bits() as usize;
    let (w, sh) = (bit / 32, (bit % 32) as u32);
    let mut v = u64::from(words[w]) >> sh;
    if sh + width.bits() > 32 {
        v |= u64::from(words[w + 1]) << (32 - sh);
    }
    Ok((v & width.mask()) as u8)
}

/// Writes `codes` as codes `start..start + codes.len()` of the stream in `words`.
///
/// All codes are checked before anything is written, so on error `words` is unchanged.
///
/// # Errors
/// [`Error::CodeOutOfRange`] if a code exceeds [`Width::max_code`]; [`Error::BufferTooSmall`] if the run
/// ends past `words`.
pub fn pack(codes: &[u8], width: Width, words: &mut [u32], start: usize) -> Result<()> {
    need("words", width.words_for(start + codes.len()), words.len())?;
    let max = width.max_code();
    if let Some(&code) = codes.iter().find(|&&c| c > max) {
        return Err(Error::CodeOutOfRange { code, max });
    }
    if codes.is_empty() {
        return Ok(());
    }
    let b = width.bits();
    let bit = start * b as usize;
    let mut w = bit / 32;
    let sh = (bit % 32) as u32;
    // Accumulator: the bits of word `w` below the run, then the codes, flushed a word at a time.
    let mut acc = u64::from(words[w]) & ((1u64 << sh) - 1);
    let mut filled = sh;
    for &code in codes {
        acc |= u64::from(code) << filled;
        filled += b;
        if filled >= 32 {
            words[w] = acc as u32;
            w += 1;
            acc >>= 32;
            filled -= 32;
        }
    }
    if filled > 0 {
        let keep = !((1u64 << filled) - 1) as u32;
        words[w] = (words[w] & keep) | (acc as u32 & !keep);
    }
    Ok(())
}

/// Reads codes `start..start + out.len()` of the stream into `out`.
///
/// # Errors
/// [`Error::BufferTooSmall`] if the run ends past `words`; [`Error::CodeOutOfRange`] if a stored code
/// exceeds the width's maximum (only possible for [`Width::Ternary`], whose stored value 3 is invalid).
pub fn unpack(words: &[u32], width: Width, start: usize, out: &mut [u8]) -> Result<()> {
    need("words", width.words_for(start + out.len()), words.len())?;
    unpack_bits(words, width, start, out);
    let max = width.max_code();
    match out.iter().find(|&&c| c > max) {
        Some(&code) => Err(Error::CodeOutOfRange { code, max }),
        None => Ok(()),
    }
}

/// [`unpack`] without its checks, for kernels over storage whose size the layout fixed: stored values
/// come back as they are (a ternary 3 reads as 3). Panics if the run ends past `words`.
#[inline]
pub(crate) fn unpack_bits(words: &[u32], width: Width, start: usize, out: &mut [u8]) {
    if out.is_empty() {
        return;
    }
    let b = width.bits();
    let mask = width.mask();
    let bit = start * b as usize;
    let mut w = bit / 32;
    let sh = (bit % 32) as u32;
    let mut buf = u64::from(words[w]) >> sh;
    let mut avail = 32 - sh;
    for o in out.iter_mut() {
        if avail < b {
            w += 1;
            buf |= u64::from(words[w]) << avail;
            avail += 32;
        }
        *o = (buf & mask) as u8;
        buf >>= b;
        avail -= b;
    }
}

/// Reference twin of [`pack`]: one bit at a time, straight from the layout's definition.
#[cfg(test)]
pub(crate) fn pack_ref(codes: &[u8], width: Width, words: &mut [u32], start: usize) {
    let b = width.bits() as usize;
    for (i, &c) in codes.iter().enumerate() {
        for k in 0..b {
            let bit = (start + i) * b + k;
            let (w, s) = (bit / 32, bit % 32);
            words[w] = (words[w] & !(1 << s)) | (u32::from((c >> k) & 1) << s);
        }
    }
}

/// Reference twin of [`unpack`].
#[cfg(test)]
pub(crate) fn unpack_ref(words: &[u32], width: Width, start: usize, out: &mut [u8]) {
    let b = width.bits() as usize;
    for (i, o) in out.iter_mut().enumerate() {
        let mut c = 0u8;
        for k in 0..b {
            let bit = (start + i) * b + k;
            c |= (((words[bit / 32] >> (bit % 32)) & 1) as u8) << k;
        }
        *o = c;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    /// Distinct, non-periodic codes in range for `width`.
    fn codes(width: Width, n: usize, seed: u32) -> Vec<u8> {
        let levels = width.levels();
        (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) >> 7) % levels).map(|c| c as u8).collect()
    }

    const G: usize = 32;

    #[test]
    fn round_trip_every_width_length_and_offset() {
        let offsets: &[usize] =
            if cfg!(miri) { &[0, 1, 7, 13] } else { &[0, 1, 3, 5, 7, 9, 11, 13, 15, 31, 33] };
        let lengths = if cfg!(miri) { 0..=(G + 7) } else { 0..=(3 * G + 7) };
        for width in Width::ALL {
            for n in lengths.clone() {
                for &start in offsets {
                    let c = codes(width, n, (n * 31 + start) as u32);
                    let nw = width.words_for(start + n) + 1;
                    // Fill the words with a pattern so that clobbered neighbours show.
                    let mut fast = vec![0xA5C3_5A3Cu32; nw];
                    let mut slow = fast.clone();
                    pack(&c, width, &mut fast, start).unwrap();
                    pack_ref(&c, width, &mut slow, start);
                    assert_eq!(fast, slow, "{width:?} n={n} start={start}");
                    let mut back = vec![0u8; n];
                    unpack(&fast, width, start, &mut back).unwrap();
                    assert_eq!(back, c, "{width:?} n={n} start={start}");
                    let mut back_ref = vec![0u8; n];
                    unpack_ref(&fast, width, start, &mut back_ref);
                    assert_eq!(back_ref, c);
                    for (i, &ci) in c.iter().enumerate() {
                        assert_eq!(get(&fast, width, start + i).unwrap(), ci);
                    }
                }
            }
        }
    }

    #[test]
    fn kivi_layout_is_lsb_first() {
        // 2-bit: codes 0..16 = [1,2,3,0,...]: word = 1 | 2<<2 | 3<<4.
        let mut w = [0u32; 1];
        pack(&[1, 2, 3], Width::B2, &mut w, 0).unwrap();
        assert_eq!(w[0], 0b11_10_01);
        // 4-bit at offset 7 lands in the top nibble.
        let mut w = [0u32; 2];
        pack(&[0xB, 0x4], Width::B4, &mut w, 7).unwrap();
        assert_eq!(w, [0xB000_0000, 0x4]);
    }

    #[test]
    fn three_bit_matches_gptq_straddles() {
        // Code 10 = bits 30..31 of word 0 and bit 0 of word 1; code 21 = bit 31 of word 1, bits 0..1 of word 2.
        let mut c = [0u8; 32];
        c[10] = 0b101;
        c[21] = 0b011;
        let mut w = [0u32; 3];
        pack(&c, Width::B3, &mut w, 0).unwrap();
        assert_eq!(w[0], 0b01 << 30);
        assert_eq!(w[1], 0b1 | (0b1 << 31));
        assert_eq!(w[2], 0b01);
        assert_eq!(Width::B3.words_for(32), 3);
    }

    #[test]
    fn bad_input_is_an_error_and_writes_nothing() {
        let mut w = [7u32; 2];
        assert_eq!(pack(&[1, 4], Width::B2, &mut w, 0), Err(Error::CodeOutOfRange { code: 4, max: 3 }));
        assert_eq!(pack(&[3], Width::Ternary, &mut w, 0), Err(Error::CodeOutOfRange { code: 3, max: 2 }));
        assert_eq!(w, [7, 7]);
        assert_eq!(
            pack(&[0; 17], Width::B4, &mut w, 0),
            Err(Error::BufferTooSmall { what: "words", needed: 3, got: 2 })
        );
        let mut out = [0u8; 1];
        // 7 = 0b11 in the first ternary slot: invalid stored code.
        assert_eq!(unpack(&w, Width::Ternary, 0, &mut out), Err(Error::CodeOutOfRange { code: 3, max: 2 }));
        assert!(get(&w, Width::B8, 8).is_err());
        assert!(unpack(&w, Width::B8, 8, &mut []).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: if cfg!(miri) { 4 } else { 256 }, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn prop_pack_matches_naive(
            w in 0usize..6,
            raw in proptest::collection::vec(any::<u8>(), 0..200),
            start in 0usize..100,
            fill in any::<u32>(),
        ) {
            let width = Width::ALL[w];
            let c: Vec<u8> = raw.iter().map(|&x| (u32::from(x) % width.levels()) as u8).collect();
            let nw = width.words_for(start + c.len()) + 1;
            let mut fast = vec![fill; nw];
            let mut slow = fast.clone();
            pack(&c, width, &mut fast, start).unwrap();
            pack_ref(&c, width, &mut slow, start);
            prop_assert_eq!(&fast, &slow);
            let mut back = vec![0u8; c.len()];
            unpack(&fast, width, start, &mut back).unwrap();
            prop_assert_eq!(back, c);
        }
    }
}
