//! Where each region of a layer cache lives in the caller's arena, computed by `const fn`.
//!
//! The arena is a run of `u32` words. Per stream (keys first, then values) it holds, each region starting
//! on a word:
//!
//! ```text
//! sinks   f16  [kv_heads][S][head_dim]                  first S tokens, token-major
//! window  f16  [kv_heads][R][head_dim]                  full-precision residual, slot j % R
//! body, fp16 keys     f16 [kv_heads][head_dim][2*row_words]   channel-major: a channel's tokens contiguous
//! body, fp16 values   f16 [kv_heads][ring][head_dim]    token-major
//! body, per-channel   codes u32 [kv_heads][head_dim][row_words]   a channel's tokens, LSB first (KIVI)
//!                     scale f16 [kv_heads][ring/G][head_dim]      a group's channels contiguous
//!                     zero  f16 [kv_heads][ring/G][head_dim]
//! body, per-token     codes u32 [kv_heads][ring][head_dim*b/32]   a token's channels, LSB first (KIVI)
//!                     scale f16 [kv_heads][head_dim/G][ring]      a group's tokens contiguous
//!                     zero  f16 [kv_heads][head_dim/G][ring]
//! ```
//!
//! Channel-major rows (fp16 and per-channel keys) are `ring` tokens plus 64 bytes of padding
//! (`row_words = ring*b/32 + 16`, or `ring/2 + 16` for f16): without it a power-of-two ring puts every
//! channel's row at the same L1 set and a 16-token block across 64 channels thrashes (measured with
//! `decode_bench`: fp16 at 16k tokens took 77 ms a step at a 32 KiB row stride, 47 ms just off it).
//!
//! Body token `j` sits in ring slot `j % ring`. Per-channel rows are what KIVI's GEMV reads (a warp takes
//! consecutive words of one channel, 32/b tokens a word); per-token rows are one token's channels. The
//! parameters are laid out along the axis a kernel walks, so eight of them convert with one `vcvtph2ps`
//! (or one coalesced load on a GPU). `G * b` is a multiple of 32, so a group never straddles a word.

use super::config::{Axis, CacheConfig, Overflow, Precision, QuantSpec};
use crate::error::{Error, Result};

/// A region of the arena, in `u32` words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Region {
    /// First word.
    pub offset: usize,
    /// Words.
    pub words: usize,
}

impl Region {
    /// Bytes of the region.
    pub const fn bytes(&self) -> usize {
        self.words * 4
    }

    /// One past the last word.
    pub const fn end(&self) -> usize {
        self.offset + self.words
    }
}

/// The regions of one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct StreamLayout {
    /// f16 sinks.
    pub sinks: Region,
    /// f16 window (empty for fp16 streams).
    pub window: Region,
    /// Body: f16 tokens or packed codes.
    pub codes: Region,
    /// Body group scales (quantized streams).
    pub scale: Region,
    /// Body group zero points (quantized streams).
    pub zero: Region,
    /// Ring slots of the body, in tokens.
    pub ring: usize,
    /// Window slots, in tokens.
    pub window_tokens: usize,
    /// Words of one row: a channel's `ring` tokens plus padding (per-channel and fp16 keys), or a token's
    /// channels (per-token).
    pub row_words: usize,
    /// Groups per row: `ring / G` (per-channel) or `head_dim / G` (per-token).
    pub row_groups: usize,
}

/// The regions of a layer cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Layout {
    /// Key stream.
    pub keys: StreamLayout,
    /// Value stream.
    pub values: StreamLayout,
    /// Words of the whole arena.
    pub total_words: usize,
    /// Bytes of the whole arena (`4 * total_words`).
    pub total_bytes: usize,
}

/// Padding words after each channel-major row (see the module docs).
pub const ROW_PAD_WORDS: usize = 16;

const OVERFLOW: Error = Error::InvalidConfig { what: "capacity (layout overflows usize)", value: 0 };

/// `a * b`, or the overflow error.
const fn mul(a: usize, b: usize) -> Result<usize> {
    match a.checked_mul(b) {
        Some(v) => Ok(v),
        None => Err(OVERFLOW),
    }
}

/// Words that `n` f16 values take.
const fn f16_words(n: usize) -> usize {
    n.div_ceil(2)
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Err(e),
        }
    };
}

impl CacheConfig {
    /// The arena layout of this configuration.
    ///
    /// # Errors
    /// The errors of [`CacheConfig::validate`], and [`Error::InvalidConfig`] if the sizes overflow `usize`.
    pub const fn layout(&self) -> Result<Layout> {
        tri!(self.validate());
        let (keys, end) = tri!(self.stream_layout(&self.keys, false, 0));
        let (values, end) = tri!(self.stream_layout(&self.values, true, end));
        Ok(Layout { keys, values, total_words: end, total_bytes: tri!(mul(end, 4)) })
    }

    /// Bytes of the arena this configuration needs (0 if it is invalid; see [`CacheConfig::layout`]).
    pub const fn arena_bytes(&self) -> usize {
        match self.layout() {
            Ok(l) => l.total_bytes,
            Err(_) => 0,
        }
    }

    const fn stream_layout(
        &self,
        p: &Precision,
        values: bool,
        start: usize,
    ) -> Result<(StreamLayout, usize)> {
        let hd = tri!(mul(self.kv_heads, self.head_dim));
        let body = self.capacity - self.sinks;
        let mut s = ZERO;
        s.sinks = Region { offset: start, words: f16_words(tri!(mul(hd, self.sinks))) };
        let mut at = s.sinks.end();
        match *p {
            Precision::F16 => {
                s.ring = body;
                if values {
                    s.codes = Region { offset: at, words: f16_words(tri!(mul(hd, body))) };
                } else {
                    s.row_words = body.div_ceil(2) + ROW_PAD_WORDS;
                    s.codes = Region { offset: at, words: tri!(mul(hd, s.row_words)) };
                }
                at = s.codes.end();
            }
            Precision::Quant(QuantSpec { width, group, axis, .. }) => {
                let r = self.residual;
                s.window_tokens = r;
                s.window = Region { offset: at, words: f16_words(tri!(mul(hd, r))) };
                at = s.window.end();
                let bits = width.bits() as usize;
                match axis {
                    Axis::PerChannel => {
                        let unit = match self.overflow {
                            Overflow::Stop => r,
                            Overflow::Slide => group,
                        };
                        s.ring = body - body % unit;
                        s.row_words = s.ring / 32 * bits + (s.ring % 32) * bits / 32 + ROW_PAD_WORDS;
                        s.row_groups = s.ring / group;
                        s.codes = Region { offset: at, words: tri!(mul(hd, s.row_words)) };
                        let params = f16_words(tri!(mul(hd, s.row_groups)));
                        s.scale = Region { offset: s.codes.end(), words: params };
                        s.zero = Region { offset: s.scale.end(), words: params };
                        at = s.zero.end();
                    }
                    Axis::PerToken => {
                        s.ring = body.saturating_sub(r);
                        s.row_words = self.head_dim * bits / 32;
                        s.row_groups = self.head_dim / group;
                        s.codes = Region {
                            offset: at,
                            words: tri!(mul(tri!(mul(self.kv_heads, s.ring)), s.row_words)),
                        };
                        let params = f16_words(tri!(mul(tri!(mul(self.kv_heads, s.ring)), s.row_groups)));
                        s.scale = Region { offset: s.codes.end(), words: params };
                        s.zero = Region { offset: s.scale.end(), words: params };
                        at = s.zero.end();
                    }
                }
            }
        }
        Ok((s, at))
    }
}

const ZERO: StreamLayout = StreamLayout {
    sinks: Region { offset: 0, words: 0 },
    window: Region { offset: 0, words: 0 },
    codes: Region { offset: 0, words: 0 },
    scale: Region { offset: 0, words: 0 },
    zero: Region { offset: 0, words: 0 },
    ring: 0,
    window_tokens: 0,
    row_words: 0,
    row_groups: 0,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::Width;

    /// Regions follow one another without gaps or overlaps, and their sizes are the formulas above.
    #[test]
    fn kivi2_regions_add_up() {
        let cfg = CacheConfig::kivi(Width::B2, 32, 128, 3, 64, 1024).with_sinks(4);
        let l = cfg.layout().unwrap();
        let hd = 3 * 64;
        let k = l.keys;
        assert_eq!(k.sinks.words, hd * 4 / 2);
        assert_eq!(k.window.words, hd * 128 / 2);
        assert_eq!(k.ring, 1020 - 1020 % 128); // 896: Stop mode flushes whole residual blocks
        assert_eq!(k.row_words, 896 * 2 / 32 + ROW_PAD_WORDS);
        assert_eq!(k.codes.words, hd * (56 + ROW_PAD_WORDS));
        assert_eq!(k.scale.words, hd * 28 / 2);
        let v = l.values;
        assert_eq!(v.ring, 1020 - 128);
        assert_eq!(v.row_words, 4);
        assert_eq!(v.row_groups, 2);
        assert_eq!(v.codes.words, 3 * 892 * 4);
        assert_eq!(v.scale.words, 3 * 2 * 892 / 2);
        let regions =
            [k.sinks, k.window, k.codes, k.scale, k.zero, v.sinks, v.window, v.codes, v.scale, v.zero];
        let mut at = 0;
        for r in regions {
            assert_eq!(r.offset, at);
            at = r.end();
        }
        assert_eq!(l.total_words, at);
        assert_eq!(l.total_bytes, 4 * at);
        let slide = cfg.with_overflow(Overflow::Slide).layout().unwrap();
        assert_eq!(slide.keys.ring, 1020 - 1020 % 32);
    }

    #[test]
    fn fp16_is_two_bytes_per_element() {
        let l = CacheConfig::fp16(3, 64, 4096).layout().unwrap();
        assert_eq!(l.total_bytes, 2 * 4096 * 3 * 64 * 2 + 3 * 64 * ROW_PAD_WORDS * 4);
        assert_eq!(CacheConfig::fp16(3, 64, 0).arena_bytes(), 0);
        let huge = CacheConfig::fp16(usize::MAX / 2, 64, 4096);
        assert!(matches!(huge.layout(), Err(Error::InvalidConfig { .. })));
    }
}
