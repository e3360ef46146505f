//! Where each region of a layer cache lives in the caller's arena, computed by `const fn`.
//!
//! The arena is a run of `u32` words. Per stream (keys first, then values) it holds, each region starting
//! on a word:
//!
//! ```text
//! sinks   f16  [kv_heads][S][head_dim]                  first S tokens, token-major
//! window  f16  [kv_heads][R][head_dim]                  full-precision residual, slot j % R
//! body, fp16 keys     f16 [kv_heads][ring/32][head_dim][32]             blocks of 32 tokens, channel rows
//! body, fp16 values   f16 [kv_heads][ring][head_dim]                    token-major
//! body, per-channel   codes u32 [kv_heads][ring/256][head_dim][256*b/32]  a channel's 256 tokens, LSB first
//!                     scale f16 [kv_heads][ring/G][head_dim]      a group's channels contiguous
//!                     zero  f16 [kv_heads][ring/G][head_dim]
//! body, per-token     codes u32 [kv_heads][ring][head_dim*b/32]   a token's channels, LSB first (KIVI)
//!                     scale f16 [kv_heads][head_dim/G][ring]      a group's tokens contiguous
//!                     zero  f16 [kv_heads][head_dim/G][ring]
//! outliers, per-channel  [kv_heads][ring/G][slots] Outlier       a key group's slots (index t*d + c)
//! outliers, per-token    [ring][slots] Outlier                   a token's slots (index h*d + c)
//! tables               f32 and u16 calibration tables (see `Tables`), written once, kept by `reset`
//! ```
//!
//! After both streams, MiKV's tiers ([`TierLayout`]) where configured:
//!
//! ```text
//! slots   u32 [kv_heads][key ring/G][keep][slot_words]   promoted tokens' corrections (`Tiers::slot_words`)
//! score   f32 [kv_heads][R]                              attention received per window slot, summed
//! seen    u32 [kv_heads][R]                              queries that attended to it
//! ```
//!
//! FP8 parameters take one byte each in the same order (`scale` and `zero` regions then hold bytes).
//!
//! Quantized keys are stored in blocks of [`KEY_BLOCK`] = 256 tokens (fewer, down to 32, in a ring too
//! small to round up to whole 256-token blocks: [`key_block`]; fp16 keys in blocks of
//! [`KEY_BLOCK_F16`] = 32, again one line per channel): within a block each
//! channel's 256 tokens are consecutive words (KIVI's packing along the token axis: 16 tokens a word at
//! 2 bits, so one 64-byte line), and a block's channels follow one another. A GPU warp reads consecutive
//! words of one channel; a CPU core streams one block (4 KiB at 2 bits, one page) for 256 tokens. Whole
//! channel rows across the ring (KIVI's own layout) put 64 rows a page apart: measured with
//! `decode_bench`, that layout ran 30 layers at 16k tokens 1.1x slower on one thread and no faster on two,
//! TLB- and stream-bound rather than bandwidth-bound.
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

impl StreamLayout {
    /// Words of one KV head's per-channel key codes (`head_dim` channel rows in each of `ring / KEY_BLOCK`
    /// blocks).
    pub const fn key_head_words(&self, head_dim: usize) -> usize {
        head_dim * (self.ring / self.block) * self.row_words
    }

    /// Word offset, within one head's per-channel key codes, of channel `c`'s row in the block holding ring
    /// slot `slot` (see [`key_row`]).
    #[inline]
    pub const fn key_row(&self, slot: usize, c: usize, head_dim: usize) -> usize {
        key_row(slot, c, head_dim, self.block, self.row_words)
    }

    /// Index of ring slot `slot`'s code within its per-channel key row.
    #[inline]
    pub const fn key_col(&self, slot: usize) -> usize {
        slot & (self.block - 1)
    }
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

/// Where a stream's calibration tables sit (each region empty when the configuration does not use it).
///
/// ```text
/// rope        f32 [G][head_dim/2][2]        cos, sin of t * theta_i for offsets t < G (computed by `Cache::new`)
/// center      f32 [kv_heads][head_dim]      per-channel key means in the stored basis (default 0)
/// balance     f32 [kv_heads][head_dim]      per-channel key factors (default 1)
/// levels      f32 [units][2][L]             codebook: encoding levels, then decoding levels (after Q-Norm);
///                                          units = kv_heads * head_dim for per-channel keys, else kv_heads
/// thresholds  f32 [kv_heads][head_dim][2]   per-channel outlier thresholds (lower, upper) of per-channel keys
/// perm        u16 [kv_heads][head_dim]      permuted position i holds stored channel perm[i]
/// bounds      u16 [kv_heads][groups + 1]    variable group boundaries in permuted order
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Tables {
    /// RoPE offsets.
    pub rope: Region,
    /// Key centres.
    pub center: Region,
    /// Key balancing factors.
    pub balance: Region,
    /// Codebook levels.
    pub levels: Region,
    /// Outlier thresholds.
    pub thresholds: Region,
    /// Channel permutation.
    pub perm: Region,
    /// Group bounds.
    pub bounds: Region,
}

impl Tables {
    /// One past the last word.
    pub const fn end(&self) -> usize {
        self.bounds.end()
    }

    /// The same tables with every offset moved down by `base` (for a view of the arena from `base`).
    pub fn shifted(&self, base: usize) -> Self {
        let m = |r: Region| Region { offset: r.offset - base, words: r.words };
        Self {
            rope: m(self.rope),
            center: m(self.center),
            balance: m(self.balance),
            levels: m(self.levels),
            thresholds: m(self.thresholds),
            perm: m(self.perm),
            bounds: m(self.bounds),
        }
    }

    /// Words of all tables.
    pub const fn words(&self) -> usize {
        self.rope.words
            + self.center.words
            + self.balance.words
            + self.levels.words
            + self.thresholds.words
            + self.perm.words
            + self.bounds.words
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
    /// Outlier slots (quantized streams with outliers).
    pub outliers: Region,
    /// Calibration tables.
    pub tables: Tables,
    /// f32 working rows for quantizing transformed or generic groups (`[G][head_dim]` for per-channel keys,
    /// `[kv_heads][head_dim]` for per-token streams); empty for KIVI's plain streams.
    pub scratch: Region,
    /// Ring slots of the body, in tokens.
    pub ring: usize,
    /// Window slots, in tokens.
    pub window_tokens: usize,
    /// Tokens per key block of per-channel quantized keys ([`key_block`]; 1 for other streams).
    pub block: usize,
    /// Words of one row: a channel's `block` tokens (per-channel keys; u16 values for fp16 keys), or
    /// a token's channels (per-token).
    pub row_words: usize,
    /// Groups per row: `ring / G` (per-channel) or `head_dim / G` (per-token).
    pub row_groups: usize,
}

/// Where MiKV's tiers live (every region empty without tiers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TierLayout {
    /// Promoted tokens' slots.
    pub slots: Region,
    /// Summed attention per window slot and KV head.
    pub score: Region,
    /// Queries counted per window slot and KV head.
    pub seen: Region,
    /// Words of one slot.
    pub slot_words: usize,
}

/// The regions of a layer cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Layout {
    /// Key stream.
    pub keys: StreamLayout,
    /// Value stream.
    pub values: StreamLayout,
    /// MiKV's tiers.
    pub tiers: TierLayout,
    /// Words of the whole arena.
    pub total_words: usize,
    /// Bytes of the whole arena (`4 * total_words`).
    pub total_bytes: usize,
}

/// Tokens per key block of a large ring (see the module docs), and the most any ring uses. Per-channel key
/// groups must divide it.
pub const KEY_BLOCK: usize = 256;

/// The fewest tokens per key block, one tile of the int8 key kernel.
pub const KEY_BLOCK_MIN: usize = 32;

/// Tokens per key block for a per-channel key body of `tokens` tokens in groups of `group`: the largest
/// power of two from [`KEY_BLOCK`] down to `max(group, KEY_BLOCK_MIN)` whose rounding of the ring wastes at
/// most an eighth of `tokens`. Large rings keep 256-token blocks (one page per block at 2 bits); a small
/// arena is not made to reserve up to 255 slots it cannot use.
pub const fn key_block(tokens: usize, group: usize) -> usize {
    let floor = if group > KEY_BLOCK_MIN { group } else { KEY_BLOCK_MIN };
    let mut b = KEY_BLOCK;
    while b > floor && tokens.div_ceil(b) * b - tokens > tokens / 8 {
        b /= 2;
    }
    b
}

/// Word offset, within one head's per-channel codes, of channel `c`'s row in the block holding ring slot
/// `slot`, for blocks of `block` tokens (a power of two) and rows of `block_words`; the slot's code index
/// within that row is `slot & (block - 1)`.
#[inline]
pub const fn key_row(slot: usize, c: usize, head_dim: usize, block: usize, block_words: usize) -> usize {
    ((slot >> block.trailing_zeros()) * head_dim + c) * block_words
}

/// Tokens per fp16 key block: one 64-byte line per channel, so a block's channels are one contiguous run.
pub const KEY_BLOCK_F16: usize = 32;

/// Index, within one head's fp16 key body, of ring slot `slot`, channel `c`.
#[inline]
pub const fn key_f16(slot: usize, c: usize, head_dim: usize) -> usize {
    ((slot / KEY_BLOCK_F16) * head_dim + c) * KEY_BLOCK_F16 + slot % KEY_BLOCK_F16
}

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

/// Words that `n` parameters of `bytes` bytes take.
const fn param_words(n: usize, bytes: usize) -> Result<usize> {
    match n.checked_mul(bytes) {
        Some(b) => Ok(b.div_ceil(4)),
        None => Err(OVERFLOW),
    }
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
        let mut tiers = TierLayout {
            slots: Region { offset: end, words: 0 },
            score: Region { offset: end, words: 0 },
            seen: Region { offset: end, words: 0 },
            slot_words: 0,
        };
        let mut end = end;
        if let (Some(t), Precision::Quant(q)) = (self.tiers, self.keys) {
            tiers.slot_words = t.slot_words(self.head_dim);
            let units = tri!(mul(tri!(mul(self.kv_heads, keys.ring / q.group)), t.keep));
            tiers.slots.words = tri!(mul(units, tiers.slot_words));
            let win = tri!(mul(self.kv_heads, self.residual));
            tiers.score = Region { offset: tiers.slots.end(), words: win };
            tiers.seen = Region { offset: tiers.score.end(), words: win };
            end = tiers.seen.end();
        }
        Ok(Layout { keys, values, tiers, total_words: end, total_bytes: tri!(mul(end, 4)) })
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
                    s.ring = body.div_ceil(KEY_BLOCK_F16) * KEY_BLOCK_F16;
                    s.row_words = KEY_BLOCK_F16;
                    s.codes = Region { offset: at, words: f16_words(tri!(mul(hd, s.ring))) };
                }
                at = s.codes.end();
            }
            Precision::Quant(q @ QuantSpec { width, group, axis, .. }) => {
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
                        let trimmed = body - body % unit;
                        s.block = key_block(trimmed, group);
                        s.ring = trimmed.div_ceil(s.block) * s.block;
                        s.row_words = s.block * bits / 32;
                        s.row_groups = s.ring / group;
                        s.codes = Region {
                            offset: at,
                            words: tri!(mul(tri!(mul(hd, s.ring / s.block)), s.row_words)),
                        };
                        let params = tri!(param_words(tri!(mul(hd, s.row_groups)), q.param_bytes()));
                        s.scale = Region { offset: s.codes.end(), words: params };
                        s.zero = Region { offset: s.scale.end(), words: params };
                        let slots = tri!(mul(tri!(mul(self.kv_heads, s.row_groups)), q.outliers));
                        s.outliers = Region { offset: s.zero.end(), words: slots };
                        at = s.outliers.end();
                    }
                    Axis::PerToken => {
                        s.ring = body.saturating_sub(r);
                        s.row_words = self.head_dim * bits / 32;
                        s.row_groups = self.head_dim / group;
                        s.codes = Region {
                            offset: at,
                            words: tri!(mul(tri!(mul(self.kv_heads, s.ring)), s.row_words)),
                        };
                        let n = tri!(mul(tri!(mul(self.kv_heads, s.ring)), s.row_groups));
                        let params = tri!(param_words(n, q.param_bytes()));
                        s.scale = Region { offset: s.codes.end(), words: params };
                        s.zero = Region { offset: s.scale.end(), words: params };
                        s.outliers = Region { offset: s.zero.end(), words: tri!(mul(s.ring, q.outliers)) };
                        at = s.outliers.end();
                    }
                }
                s.tables = tri!(self.tables_layout(&q, values, at));
                at = s.tables.end();
                // Per-channel keys stored as handed in, without outliers or tiers, are coded straight from
                // the window; every other generic stream goes through the scratch rows.
                let direct = matches!(axis, Axis::PerChannel)
                    && !self.transform.keys()
                    && q.outliers == 0
                    && self.tiers.is_none();
                let rows = match axis {
                    _ if !self.generic(values) || direct => 0,
                    Axis::PerChannel => group,
                    Axis::PerToken => self.kv_heads,
                };
                // Placed (empty where unused) after the tables, so a view from the tables reaches it.
                s.scratch = Region { offset: at, words: tri!(mul(rows, self.head_dim)) };
                at = s.scratch.end();
            }
        }
        Ok((s, at))
    }

    const fn tables_layout(&self, q: &QuantSpec, values: bool, start: usize) -> Result<Tables> {
        let (heads, d) = (self.kv_heads, self.head_dim);
        let hd = tri!(mul(heads, d));
        let t = self.transform;
        let keys = !values;
        let rope =
            Region { offset: start, words: if keys && t.rope.is_some() { tri!(mul(q.group, d)) } else { 0 } };
        let center = Region { offset: rope.end(), words: if keys && t.center_keys { hd } else { 0 } };
        let balance = Region { offset: center.end(), words: if keys && t.balance_keys { hd } else { 0 } };
        let units = if matches!(q.axis, Axis::PerChannel) { hd } else { heads };
        let lw = if q.codebook { tri!(mul(units, 2 * q.width.levels() as usize)) } else { 0 };
        let levels = Region { offset: balance.end(), words: lw };
        let per_channel = matches!(q.axis, Axis::PerChannel);
        let tw = if q.outliers > 0 && per_channel { 2 * hd } else { 0 };
        let thresholds = Region { offset: levels.end(), words: tw };
        let perm = Region { offset: thresholds.end(), words: if q.permuted { f16_words(hd) } else { 0 } };
        let bw = if q.permuted { f16_words(tri!(mul(heads, d / q.group + 1))) } else { 0 };
        let bounds = Region { offset: perm.end(), words: bw };
        Ok(Tables { rope, center, balance, levels, thresholds, perm, bounds })
    }
}

const EMPTY: Region = Region { offset: 0, words: 0 };

const ZERO: StreamLayout = StreamLayout {
    sinks: EMPTY,
    window: EMPTY,
    codes: EMPTY,
    scale: EMPTY,
    zero: EMPTY,
    outliers: EMPTY,
    scratch: EMPTY,
    tables: Tables {
        rope: EMPTY,
        center: EMPTY,
        balance: EMPTY,
        levels: EMPTY,
        thresholds: EMPTY,
        perm: EMPTY,
        bounds: EMPTY,
    },
    ring: 0,
    block: 1,
    window_tokens: 0,
    row_words: 0,
    row_groups: 0,
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pack::Width;

    /// Key blocks: 256 tokens wherever rounding up to them wastes at most an eighth of the ring, else the
    /// largest smaller power of two that does, never under the group or 32 tokens.
    #[test]
    fn key_blocks_shrink_only_for_small_rings() {
        assert_eq!(key_block(0, 32), 256);
        assert_eq!(key_block(2048, 32), 256);
        assert_eq!(key_block(2048 + 224, 32), 256); // 32 slots over 2272: under an eighth
        assert_eq!(key_block(288, 32), 64); // 512 or 384 would waste 224 or 96 of 288; 320 wastes 32
        assert_eq!(key_block(384, 32), 128);
        assert_eq!(key_block(160, 32), 32); // 192 would waste 32 of 160, over an eighth
        assert_eq!(key_block(160, 64), 64); // but not under the group
        assert_eq!(key_block(32, 128), 128); // never under the group
        assert_eq!(key_block(16, 16), 32); // nor under the int8 kernel's 32-token tile
        // The ring always covers the tokens, wastes at most an eighth (or one block of the floor), and a
        // block is a power of two that the group divides.
        for g in [16, 32, 64, 128, 256] {
            for t in (0..3000).step_by(16) {
                let b = key_block(t, g);
                let ring = t.div_ceil(b) * b;
                assert!(
                    b.is_power_of_two() && b.is_multiple_of(g) && (32..=256).contains(&b),
                    "{t} {g}: {b}"
                );
                assert!(ring >= t && (ring - t <= t / 8 || b == g.max(32)), "{t} {g}: {b}");
            }
        }
        // A small cache no longer reserves a whole 256-token block: 4 sinks and 96 body tokens (a 32-token
        // window among them) quantize keys into three 32-token blocks, 96 slots.
        let small = CacheConfig::kivi(Width::B2, 32, 32, 3, 64, 100).with_sinks(4).layout().unwrap();
        assert_eq!((small.keys.ring, small.keys.block), (96, 32));
    }

    /// Regions follow one another without gaps or overlaps, and their sizes are the formulas above.
    #[test]
    fn kivi2_regions_add_up() {
        let cfg = CacheConfig::kivi(Width::B2, 32, 128, 3, 64, 1024).with_sinks(4);
        let l = cfg.layout().unwrap();
        let hd = 3 * 64;
        let k = l.keys;
        assert_eq!(k.sinks.words, hd * 4 / 2);
        assert_eq!(k.window.words, hd * 128 / 2);
        // Stop mode flushes whole residual blocks: 1020 - 1020 % 128 = 896 tokens, which 256-token blocks
        // would round up to 1024 (128 more, over an eighth), so the blocks are 128 tokens: 7 of them.
        assert_eq!((k.ring, k.block), (896, 128));
        assert_eq!(k.row_words, 128 * 2 / 32);
        assert_eq!(k.codes.words, hd * 896 * 2 / 32);
        assert_eq!(k.scale.words, hd * 28 / 2);
        let v = l.values;
        assert_eq!(v.ring, 1020 - 128);
        assert_eq!(v.row_words, 4);
        assert_eq!(v.row_groups, 2);
        assert_eq!(v.codes.words, 3 * 892 * 4);
        assert_eq!(v.scale.words, 3 * 2 * 892 / 2);
        let regions = [
            k.sinks, k.window, k.codes, k.scale, k.zero, k.outliers, v.sinks, v.window, v.codes, v.scale,
            v.zero, v.outliers,
        ];
        let mut at = 0;
        for r in regions {
            assert_eq!(r.offset, at);
            at = r.end();
        }
        assert_eq!(l.total_words, at);
        assert_eq!(l.total_bytes, 4 * at);
        let slide = cfg.with_overflow(Overflow::Slide).layout().unwrap();
        assert_eq!(slide.keys.ring, 1024);
        assert_eq!(key_row(300, 5, 64, 256, 16), (64 + 5) * 16);
        assert_eq!(key_row(300, 5, 64, 32, 2), (9 * 64 + 5) * 2);
        assert_eq!(key_f16(300, 5, 64), (9 * 64 + 5) * 32 + 12);
    }

    #[test]
    fn fp16_is_two_bytes_per_element() {
        let l = CacheConfig::fp16(3, 64, 4096).layout().unwrap();
        assert_eq!(l.total_bytes, 2 * 4096 * 3 * 64 * 2);
        // keys round up to whole blocks, values do not
        let l = CacheConfig::fp16(3, 64, 1000).layout().unwrap();
        assert_eq!((l.keys.ring, l.values.ring), (1024, 1000));
        let l = CacheConfig::fp16(3, 64, 1001).layout().unwrap();
        assert_eq!((l.keys.ring, l.values.ring), (1024, 1001));
        assert_eq!(CacheConfig::fp16(3, 64, 0).arena_bytes(), 0);
        let huge = CacheConfig::fp16(usize::MAX / 2, 64, 4096);
        assert!(matches!(huge.layout(), Err(Error::InvalidConfig { .. })));
    }
}
