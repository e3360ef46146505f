//! A quantized KV cache for one layer, in memory the caller owns.
//!
//! Tokens arrive in order. The first `S` go to the sinks and stay f16 for good. Later ones (body tokens,
//! numbered `j = 0, 1, ...`) go, per stream, into a full-precision window and from there into the
//! quantized body, by the stream's rule ([`window::Residual`]):
//!
//! - **fp16**: straight into the body, in f16.
//! - **KIVI keys** (per channel, methods.md §1.4): the window fills to `R`; when it is full its `R` tokens
//!   are quantized as `R/G` groups per channel and it empties. So `n mod R` keys are full precision, and a
//!   prefill of `T` tokens leaves `T - T mod R` quantized (none if `T < R`).
//! - **KIVI values** (per token): a FIFO of the last `R` tokens; each new token pushes the oldest into
//!   the body. So `min(n, R)` values are full precision.
//!
//! The state after every append equals KIVI's state after each step. KIVI's decode reads the step's
//! attention before its flush (its window briefly holds `R` keys and `R + 1` values); kvq quantizes first
//! and attention reads the stored state, so the arena never holds more than `R` window tokens.
//!
//! At capacity the cache stops ([`Overflow::Stop`], an error that changes nothing) or slides
//! ([`Overflow::Slide`]): the oldest body tokens go, a key group at a time, and the sinks stay.
//!
//! The arena layout is in [`layout`]; attention over the cache is [`crate::attention`].

pub mod blob;
pub mod config;
pub(crate) mod group;
pub mod layout;
pub(crate) mod tables;
pub(crate) mod tier;
pub mod window;

pub use config::{Axis, CacheConfig, Overflow, Precision, QuantSpec, Tiers, Transform};
pub use layout::{Layout, Region, StreamLayout, Tables, TierLayout};
pub use window::Residual;

use crate::error::{Error, Result};
use crate::pack;
use crate::quant::outliers::Outlier;
use crate::quant::param::ParamFormat;
use crate::quant::uniform::{GroupParams, UniformSpec};
use crate::view::Strided;
use config::{MAX_GROUP, MAX_HEAD_DIM, MAX_OUTLIER_SLOTS};
use group::GroupCoder;
use half::f16;
use tables::TableView;

/// An outlier slot's index when the slot is empty.
pub(crate) const EMPTY_SLOT: u16 = u16::MAX;

/// Largest magnitude the cache accepts. Any group of values within `±MAX_ABS` has a zero point and a step
/// that f16 represents (the step is at most `2 * MAX_ABS` plus rounding, below f16's 65504), so a
/// quantization can never fail half-way through an append.
pub const MAX_ABS: f32 = 16384.0;

/// Which of a cache's two streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Stream {
    /// Keys (post-RoPE, as the caller hands them in).
    Keys,
    /// Values.
    Values,
}

/// Bytes a cache holds in each region for the tokens it holds, and the average bits per element.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Usage {
    /// Tokens held.
    pub tokens: usize,
    /// f16 bytes of the sinks (keys and values).
    pub sink_bytes: usize,
    /// f16 bytes of the full-precision windows.
    pub window_bytes: usize,
    /// Bytes of the body: packed codes, or f16 tokens for fp16 streams.
    pub body_bytes: usize,
    /// Bytes of the body's group scales and zero points.
    pub param_bytes: usize,
    /// Bytes of the outlier slots reserved for the body's groups or tokens (index and f16 correction).
    pub outlier_bytes: usize,
    /// Bytes of MiKV's tiers: the slots reserved for the quantized key groups, and the window's
    /// attention sums and counts.
    pub tier_bytes: usize,
}

impl Usage {
    /// All bytes held.
    pub const fn total_bytes(&self) -> usize {
        self.sink_bytes
            + self.window_bytes
            + self.body_bytes
            + self.param_bytes
            + self.outlier_bytes
            + self.tier_bytes
    }

    /// Average bits per stored element (keys and values, every head and channel); 0 when empty.
    pub fn bits_per_element(&self, cfg: &CacheConfig) -> f64 {
        let elements = self.tokens * cfg.kv_heads * cfg.head_dim * 2;
        if elements == 0 { 0.0 } else { (self.total_bytes() * 8) as f64 / elements as f64 }
    }
}

/// Token counts of a cache: sinks held, body tokens appended, first body token still held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Counts {
    /// Sinks held (at most `S`).
    pub sinks: usize,
    /// Body tokens appended since the start, evicted ones included.
    pub n: usize,
    /// First body token still held.
    pub base: usize,
}

impl Counts {
    /// Tokens held.
    pub const fn held(&self) -> usize {
        self.sinks + self.n - self.base
    }
}

impl CacheConfig {
    /// The counts after appending `tokens` tokens to an empty cache, with sliding where configured.
    ///
    /// # Errors
    /// [`Error::ContextFull`] when `tokens` exceeds the capacity of a [`Overflow::Stop`] cache.
    pub const fn counts_after(&self, tokens: usize) -> Result<Counts> {
        let sinks = if tokens < self.sinks { tokens } else { self.sinks };
        let n = tokens - sinks;
        let mut base = 0;
        if tokens > self.capacity {
            match self.overflow {
                Overflow::Stop => {
                    return Err(Error::ContextFull { held: 0, adding: tokens, capacity: self.capacity });
                }
                Overflow::Slide => {
                    let step = self.slide_step();
                    base = (tokens - self.capacity).div_ceil(step) * step;
                }
            }
        }
        Ok(Counts { sinks, n, base })
    }

    /// Bytes held in each region at the given counts.
    pub const fn usage(&self, c: Counts) -> Usage {
        let hd = self.kv_heads * self.head_dim;
        let mut u = Usage {
            tokens: c.held(),
            sink_bytes: 0,
            window_bytes: 0,
            body_bytes: 0,
            param_bytes: 0,
            outlier_bytes: 0,
            tier_bytes: 0,
        };
        let streams = [self.keys, self.values];
        let mut i = 0;
        while i < 2 {
            u.sink_bytes += c.sinks * hd * 2;
            let q = streams[i].residual().quantized_end(c.n, self.residual);
            u.window_bytes += (c.n - q) * hd * 2;
            let live = q - c.base;
            match streams[i] {
                Precision::F16 => u.body_bytes += live * hd * 2,
                Precision::Quant(s) => {
                    u.body_bytes += live * hd * s.width.bits() as usize / 8;
                    u.param_bytes += live * hd / s.group * 2 * s.param_bytes();
                    let units = match s.axis {
                        Axis::PerChannel => live / s.group * self.kv_heads,
                        Axis::PerToken => live,
                    };
                    u.outlier_bytes += units * s.outliers * core::mem::size_of::<Outlier>();
                }
            }
            i += 1;
        }
        if let (Some(t), Precision::Quant(k)) = (self.tiers, self.keys)
            && c.held() > 0
        {
            let q = Residual::Block.quantized_end(c.n, self.residual);
            let groups = (q - c.base) / k.group;
            u.tier_bytes = groups * self.kv_heads * t.keep * t.slot_words(self.head_dim) * 4
                + self.kv_heads * self.residual * 8;
        }
        u
    }
}

/// One layer's KV cache over a borrowed arena.
#[derive(Debug)]
pub struct Cache<'a> {
    cfg: CacheConfig,
    layout: Layout,
    arena: &'a mut [u32],
    counts: Counts,
}

/// Read-only views of one stream's regions, for attention kernels.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamView<'c> {
    pub(crate) precision: Precision,
    pub(crate) layout: StreamLayout,
    pub(crate) sinks: &'c [u16],
    pub(crate) window: &'c [u16],
    pub(crate) codes: &'c [u32],
    pub(crate) scale: &'c [u16],
    pub(crate) zero: &'c [u16],
    /// The parameter regions as bytes (FP8 parameters).
    pub(crate) scale8: &'c [u8],
    pub(crate) zero8: &'c [u8],
    pub(crate) outliers: &'c [Outlier],
    pub(crate) tables: TableView<'c>,
    /// End of the quantized run (logical body index).
    pub(crate) q_end: usize,
}

impl<'c> StreamView<'c> {
    /// The body as f16 values (fp16 streams).
    pub(crate) fn body_f16(&self) -> &'c [u16] {
        bytemuck::cast_slice(self.codes)
    }

    /// The scale and zero point at parameter index `i`, in the stream's format.
    #[inline(always)]
    pub(crate) fn params(&self, fmt: ParamFormat, i: usize) -> GroupParams {
        match fmt {
            ParamFormat::F16 => GroupParams { scale: f32_of(self.scale[i]), zero: f32_of(self.zero[i]) },
            _ => GroupParams {
                scale: fmt.decode(u16::from(self.scale8[i])),
                zero: fmt.decode(u16::from(self.zero8[i])),
            },
        }
    }

    /// The group coder of codebook unit `unit` (or the uniform one).
    pub(crate) fn coder(&self, q: QuantSpec, unit: usize) -> GroupCoder<'c> {
        let levels = if q.codebook { self.tables.unit_levels(unit, q.width.levels() as usize) } else { None };
        GroupCoder { spec: q, levels }
    }
}

/// Moves code `i` of `words` by `delta` levels of `width`; false (and nothing moved) where that leaves the
/// code's range.
#[cfg(test)]
fn shift_code(words: &mut [u32], width: pack::Width, i: usize, delta: i32) -> bool {
    let code = i32::from(pack::get(words, width, i).unwrap()) + delta;
    if !(0..width.levels() as i32).contains(&code) {
        return false;
    }
    pack::pack(&[code as u8], width, words, i).unwrap();
    true
}

fn f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

fn f32_of(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

fn uniform(s: &QuantSpec) -> UniformSpec {
    UniformSpec::new(s.width).with_clip(s.clip)
}

/// Writes a group's parameters `p` at parameter index `at` of stream layout `l`, in format `fmt`.
fn write_params(arena: &mut [u32], l: StreamLayout, fmt: ParamFormat, at: usize, p: GroupParams) {
    let [sc, z] = p.to_raw(fmt);
    match fmt {
        ParamFormat::F16 => {
            bytemuck::cast_slice_mut::<u32, u16>(&mut arena[l.scale.offset..l.scale.end()])[at] = sc;
            bytemuck::cast_slice_mut::<u32, u16>(&mut arena[l.zero.offset..l.zero.end()])[at] = z;
        }
        _ => {
            bytemuck::cast_slice_mut::<u32, u8>(&mut arena[l.scale.offset..l.scale.end()])[at] = sc as u8;
            bytemuck::cast_slice_mut::<u32, u8>(&mut arena[l.zero.offset..l.zero.end()])[at] = z as u8;
        }
    }
}

/// The largest magnitude a generic stream's stored (transformed) values may take: its parameters must
/// represent the range (FP8 E4M3 reaches 448).
fn stored_limit(q: &QuantSpec) -> f32 {
    MAX_ABS.min(q.params.max())
}

/// Positions of the largest `cap` entries of `score` over `0..n` (ties to the lower position), written
/// ascending into `out`; returns how many (at most `cap`, only entries with a positive score).
fn top_positions(
    n: usize,
    cap: usize,
    score: impl Fn(usize) -> f32,
    out: &mut [u16; MAX_OUTLIER_SLOTS],
) -> usize {
    let mut best = [(0.0f32, 0u16); MAX_OUTLIER_SLOTS];
    let mut k = 0;
    if cap == 0 {
        return 0;
    }
    for i in 0..n {
        let v = score(i);
        if v.is_nan() || v <= 0.0 || (k == cap && v <= best[k - 1].0) {
            continue;
        }
        // Insert into the descending list (stable: equal scores keep the earlier position first).
        let mut at = if k < cap { k } else { cap - 1 };
        best[at] = (v, i as u16);
        while at > 0 && best[at - 1].0 < best[at].0 {
            best.swap(at - 1, at);
            at -= 1;
        }
        k = (k + 1).min(cap);
    }
    for (o, b) in out.iter_mut().zip(&best[..k]) {
        *o = b.1;
    }
    out[..k].sort_unstable();
    k
}

impl<'a> Cache<'a> {
    /// A cache over `arena`, empty.
    ///
    /// # Errors
    /// The errors of [`CacheConfig::layout`]; [`Error::ArenaTooSmall`] (in bytes) if `arena` is shorter
    /// than the layout.
    pub fn new(cfg: CacheConfig, arena: &'a mut [u32]) -> Result<Self> {
        let layout = cfg.layout()?;
        if arena.len() < layout.total_words {
            return Err(Error::ArenaTooSmall { needed: layout.total_bytes, got: arena.len() * 4 });
        }
        let mut cache = Self { cfg, layout, arena, counts: Counts::default() };
        cache.init_tables()?;
        Ok(cache)
    }

    /// A cache over a byte arena; its first bytes are skipped up to a 4-byte boundary.
    ///
    /// # Errors
    /// As [`Cache::new`]; `got` counts the aligned bytes.
    pub fn from_bytes(cfg: CacheConfig, arena: &'a mut [u8]) -> Result<Self> {
        let (_, words, _) = bytemuck::pod_align_to_mut::<u8, u32>(arena);
        Self::new(cfg, words)
    }

    /// The configuration.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// The arena layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The arena's words that the layout uses, read-only: the cache's whole state besides its
    /// [`Counts`], for copying it elsewhere (a GPU's memory).
    pub fn words(&self) -> &[u32] {
        &self.arena[..self.layout.total_words]
    }

    /// Token counts.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Tokens held.
    pub fn held(&self) -> usize {
        self.counts.held()
    }

    /// Bytes held per region now.
    pub fn usage(&self) -> Usage {
        self.cfg.usage(self.counts)
    }

    /// Forgets every token (the arena's contents are left as they are and overwritten later).
    pub fn reset(&mut self) {
        self.counts = Counts::default();
    }

    fn stream_cfg(&self, s: Stream) -> (Precision, StreamLayout) {
        match s {
            Stream::Keys => (self.cfg.keys, self.layout.keys),
            Stream::Values => (self.cfg.values, self.layout.values),
        }
    }

    /// Moves the code of per-channel key row `slot`, channel `c`, of head `h` by `delta` levels; false (and
    /// nothing moved) where that leaves the code's range. For tests that a tolerance notices one level.
    /// Per-token keys: the code of token `slot`'s stored column `c`, as [`Self::shift_value_code`].
    #[cfg(test)]
    pub(crate) fn shift_key_code(&mut self, h: usize, slot: usize, c: usize, delta: i32) -> bool {
        let (Precision::Quant(q), l) = self.stream_cfg(Stream::Keys) else { return false };
        if q.axis == Axis::PerToken {
            return self.shift_row_code(Stream::Keys, h, slot, c, delta);
        }
        let d = self.cfg.head_dim;
        let codes = &mut self.arena[l.codes.offset..l.codes.end()];
        let w = &mut codes[h * l.key_head_words(d) + l.key_row(slot, c, d)..][..l.row_words];
        shift_code(w, q.width, l.key_col(slot), delta)
    }

    /// Moves the code of per-token value row `slot` (ring slot), stored column `c`, of head `h` by `delta`
    /// levels; false (and nothing moved) where that leaves the code's range. For tests that a tolerance
    /// notices one level.
    #[cfg(test)]
    pub(crate) fn shift_value_code(&mut self, h: usize, slot: usize, c: usize, delta: i32) -> bool {
        self.shift_row_code(Stream::Values, h, slot, c, delta)
    }

    /// [`Self::shift_value_code`] for either stream's per-token rows.
    #[cfg(test)]
    fn shift_row_code(&mut self, s: Stream, h: usize, slot: usize, c: usize, delta: i32) -> bool {
        let (Precision::Quant(q), l) = self.stream_cfg(s) else { return false };
        let codes = &mut self.arena[l.codes.offset..l.codes.end()];
        shift_code(&mut codes[(h * l.ring + slot) * l.row_words..][..l.row_words], q.width, c, delta)
    }

    /// Read-only views of one stream.
    pub(crate) fn view(&self, s: Stream) -> StreamView<'_> {
        let (precision, layout) = self.stream_cfg(s);
        let words = |r: Region| &self.arena[r.offset..r.end()];
        StreamView {
            precision,
            layout,
            sinks: bytemuck::cast_slice(words(layout.sinks)),
            window: bytemuck::cast_slice(words(layout.window)),
            codes: words(layout.codes),
            scale: bytemuck::cast_slice(words(layout.scale)),
            zero: bytemuck::cast_slice(words(layout.zero)),
            scale8: bytemuck::cast_slice(words(layout.scale)),
            zero8: bytemuck::cast_slice(words(layout.zero)),
            outliers: bytemuck::cast_slice(words(layout.outliers)),
            tables: TableView::new(self.arena, &layout.tables),
            q_end: precision.residual().quantized_end(self.counts.n, self.cfg.residual),
        }
    }

    /// Appends tokens: `keys` and `values` are `[tokens][kv_heads][head_dim]`, row-major.
    ///
    /// Either every token is appended or, on error, none is and the cache is unchanged.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if the lengths are not equal multiples of `kv_heads * head_dim`;
    /// [`Error::NonFinite`] (index into the key buffer, then the value buffer offset by its length) for
    /// NaN or infinite input; [`Error::ParamOverflow`] for a magnitude above [`MAX_ABS`];
    /// [`Error::ContextFull`] when a [`Overflow::Stop`] cache would exceed its capacity.
    pub fn append(&mut self, keys: &[f32], values: &[f32]) -> Result<()> {
        let hd = self.cfg.kv_heads * self.cfg.head_dim;
        if !keys.len().is_multiple_of(hd) {
            return Err(Error::ShapeMismatch {
                what: "keys length (multiple of kv_heads*head_dim)",
                expected: hd,
                got: keys.len(),
            });
        }
        if values.len() != keys.len() {
            return Err(Error::ShapeMismatch {
                what: "values length",
                expected: keys.len(),
                got: values.len(),
            });
        }
        for (i, &x) in keys.iter().chain(values).enumerate() {
            if !x.is_finite() {
                return Err(Error::NonFinite { index: i });
            }
            if x.abs() > MAX_ABS {
                return Err(Error::ParamOverflow { value: x, max: MAX_ABS });
            }
        }
        let tokens = keys.len() / hd;
        if self.cfg.overflow == Overflow::Stop && self.held() + tokens > self.cfg.capacity {
            return Err(Error::ContextFull {
                held: self.held(),
                adding: tokens,
                capacity: self.cfg.capacity,
            });
        }
        self.check_stored_range(keys, values)?;
        for (k, v) in keys.chunks_exact(hd).zip(values.chunks_exact(hd)) {
            self.push(k, v)?;
        }
        Ok(())
    }

    /// Checks, before anything changes, that every body token of an append keeps its transformed values
    /// within what a generic stream's parameters represent ([`stored_limit`]), so that no group fails to
    /// quantize half-way through. The values are transformed exactly as the quantizer will transform them
    /// (from their f16 window copies where there is a window).
    fn check_stored_range(&self, keys: &[f32], values: &[f32]) -> Result<()> {
        let (heads, d) = (self.cfg.kv_heads, self.cfg.head_dim);
        let hd = heads * d;
        let to_sinks = self.cfg.sinks - self.counts.sinks;
        let mut row = [0.0f32; MAX_HEAD_DIM];
        for (s, input) in [(Stream::Keys, keys), (Stream::Values, values)] {
            let values_stream = s == Stream::Values;
            if !self.cfg.generic(values_stream) {
                continue;
            }
            let (Precision::Quant(q), _) = self.stream_cfg(s) else { continue };
            let limit = stored_limit(&q);
            for (i, tok) in input.chunks_exact(hd).enumerate().skip(to_sinks) {
                let j = self.counts.n + i - to_sinks;
                for (h, x) in tok.chunks_exact(d).enumerate() {
                    let row = &mut row[..d];
                    for (o, &v) in row.iter_mut().zip(x) {
                        *o = if self.cfg.residual > 0 { f32_of(f16_bits(v)) } else { v };
                    }
                    self.forward(s, h, j % q.group, row);
                    if let Some(&v) = row.iter().find(|v| v.abs() > limit) {
                        return Err(Error::ParamOverflow { value: v, max: limit });
                    }
                }
            }
        }
        Ok(())
    }

    /// Turns `row`, a key or value of KV head `head` as handed to [`Cache::append`], into the basis the
    /// cache quantizes it in ([`Transform`]: RoPE undone by `offset`, the token's position within its key
    /// group; balance; Hadamard rotation; centring): what calibration measures its statistics in.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] for a head past `kv_heads` or an offset past the key group;
    /// [`Error::ShapeMismatch`] unless `row` holds `head_dim` values.
    pub fn stored_basis(&self, stream: Stream, head: usize, offset: usize, row: &mut [f32]) -> Result<()> {
        if head >= self.cfg.kv_heads {
            return Err(Error::OutOfBounds { index: head, len: self.cfg.kv_heads });
        }
        if row.len() != self.cfg.head_dim {
            return Err(Error::ShapeMismatch {
                what: "row length",
                expected: self.cfg.head_dim,
                got: row.len(),
            });
        }
        let group = self.cfg.key_spec().map_or(1, |q| q.group);
        if stream == Stream::Keys && self.cfg.transform.rope.is_some() && offset >= group {
            return Err(Error::OutOfBounds { index: offset, len: group });
        }
        self.forward(stream, head, offset, row);
        Ok(())
    }

    /// The stored basis of a body row of head `h` (`offset`: the token's offset within its key group, used
    /// by RoPE offsets): keys turned back by their offset, balanced, rotated and centred; values rotated.
    pub(crate) fn forward(&self, s: Stream, h: usize, offset: usize, row: &mut [f32]) {
        let t = self.cfg.transform;
        let d = self.cfg.head_dim;
        let tables = self.tables_of(s);
        match s {
            Stream::Keys => {
                if let Some(rope) = t.rope {
                    rope.rotate(row, &tables.rope[offset * d..][..d], true);
                }
                if t.balance_keys {
                    for (x, &b) in row.iter_mut().zip(&tables.balance[h * d..][..d]) {
                        *x *= b;
                    }
                }
                if t.rotate_keys {
                    crate::transform::hadamard(row);
                }
                if t.center_keys {
                    for (x, &m) in row.iter_mut().zip(&tables.center[h * d..][..d]) {
                        *x -= m;
                    }
                }
            }
            Stream::Values => {
                if t.rotate_values {
                    crate::transform::hadamard(row);
                }
            }
        }
    }

    /// The inverse of [`Cache::forward`]: a stored-basis row back to the keys or values handed in.
    #[inline]
    pub(crate) fn inverse(&self, s: Stream, h: usize, offset: usize, row: &mut [f32]) {
        let t = self.cfg.transform;
        let d = self.cfg.head_dim;
        let tables = self.tables_of(s);
        match s {
            Stream::Keys => {
                if t.center_keys {
                    for (x, &m) in row.iter_mut().zip(&tables.center[h * d..][..d]) {
                        *x += m;
                    }
                }
                if t.rotate_keys {
                    crate::transform::hadamard(row);
                }
                if t.balance_keys {
                    for (x, &b) in row.iter_mut().zip(&tables.balance[h * d..][..d]) {
                        *x /= b;
                    }
                }
                if let Some(rope) = t.rope {
                    rope.rotate(row, &tables.rope[offset * d..][..d], false);
                }
            }
            Stream::Values => {
                if t.rotate_values {
                    crate::transform::hadamard(row);
                }
            }
        }
    }

    fn push(&mut self, k: &[f32], v: &[f32]) -> Result<()> {
        if self.held() == self.cfg.capacity {
            // Only a sliding cache gets here (`append` refused the rest); validation guarantees the
            // oldest `step` body tokens are quantized in both streams.
            self.counts.base += self.cfg.slide_step();
        }
        if self.counts.sinks < self.cfg.sinks {
            let slot = self.counts.sinks;
            for s in [Stream::Keys, Stream::Values] {
                let x = if s == Stream::Keys { k } else { v };
                let (_, l) = self.stream_cfg(s);
                let d = self.cfg.head_dim;
                let sinks: &mut [u16] =
                    bytemuck::cast_slice_mut(&mut self.arena[l.sinks.offset..l.sinks.end()]);
                for (h, row) in x.chunks_exact(d).enumerate() {
                    let dst = &mut sinks[(h * self.cfg.sinks + slot) * d..][..d];
                    for (o, &y) in dst.iter_mut().zip(row) {
                        *o = f16_bits(y);
                    }
                }
            }
            self.counts.sinks += 1;
            return Ok(());
        }
        self.push_stream(Stream::Keys, k)?;
        self.push_stream(Stream::Values, v)?;
        self.counts.n += 1;
        Ok(())
    }

    fn push_stream(&mut self, s: Stream, x: &[f32]) -> Result<()> {
        let (p, l) = self.stream_cfg(s);
        let (heads, d, r) = (self.cfg.kv_heads, self.cfg.head_dim, self.cfg.residual);
        let j = self.counts.n;
        match p {
            Precision::F16 => {
                let body: &mut [u16] =
                    bytemuck::cast_slice_mut(&mut self.arena[l.codes.offset..l.codes.end()]);
                let slot = j % l.ring;
                for (h, row) in x.chunks_exact(d).enumerate() {
                    for (c, &y) in row.iter().enumerate() {
                        let at = match s {
                            Stream::Keys => h * d * l.ring + layout::key_f16(slot, c, d),
                            Stream::Values => (h * l.ring + slot) * d + c,
                        };
                        body[at] = f16_bits(y);
                    }
                }
            }
            Precision::Quant(q) if self.cfg.generic(s == Stream::Values) => match q.axis {
                Axis::PerChannel => {
                    self.clear_importance(j % r);
                    self.write_window(l, j % r, x);
                    if (j + 1).is_multiple_of(r) {
                        for gs in (j + 1 - r..j + 1).step_by(q.group) {
                            self.quantize_key_group(l, &q, gs)?;
                        }
                    }
                }
                Axis::PerToken => {
                    if r == 0 {
                        self.quantize_token_generic(s, l, &q, j, Some(x))?;
                    } else {
                        if j >= r {
                            self.quantize_token_generic(s, l, &q, j - r, None)?;
                        }
                        self.write_window(l, j % r, x);
                    }
                }
            },
            Precision::Quant(q) => match q.axis {
                Axis::PerChannel => {
                    self.write_window(l, j % r, x);
                    if (j + 1).is_multiple_of(r) {
                        self.flush_block(l, &q, j + 1 - r)?;
                    }
                }
                Axis::PerToken => {
                    if r == 0 {
                        for h in 0..heads {
                            self.quantize_token(l, &q, h, j % l.ring, &x[h * d..][..d])?;
                        }
                    } else {
                        if j >= r {
                            let mut buf = [0.0f32; crate::cache::config::MAX_GROUP];
                            let old = j - r;
                            for h in 0..heads {
                                for g0 in (0..d).step_by(q.group) {
                                    let win: &[u16] =
                                        bytemuck::cast_slice(&self.arena[l.window.offset..l.window.end()]);
                                    let row = &win[(h * r + old % r) * d + g0..][..q.group];
                                    for (o, &b) in buf[..q.group].iter_mut().zip(row) {
                                        *o = f32_of(b);
                                    }
                                    self.quantize_token_group(l, &q, h, old % l.ring, g0, &buf[..q.group])?;
                                }
                            }
                        }
                        self.write_window(l, j % r, x);
                    }
                }
            },
        }
        Ok(())
    }

    fn write_window(&mut self, l: StreamLayout, slot: usize, x: &[f32]) {
        let (d, r) = (self.cfg.head_dim, self.cfg.residual);
        let win: &mut [u16] = bytemuck::cast_slice_mut(&mut self.arena[l.window.offset..l.window.end()]);
        for (h, row) in x.chunks_exact(d).enumerate() {
            for (o, &y) in win[(h * r + slot) * d..][..d].iter_mut().zip(row) {
                *o = f16_bits(y);
            }
        }
    }

    fn quantize_token(
        &mut self,
        l: StreamLayout,
        q: &QuantSpec,
        h: usize,
        slot: usize,
        x: &[f32],
    ) -> Result<()> {
        for g0 in (0..x.len()).step_by(q.group) {
            self.quantize_token_group(l, q, h, slot, g0, &x[g0..g0 + q.group])?;
        }
        Ok(())
    }

    /// Quantizes channels `g0..g0 + G` of one token of head `h` into body slot `slot`.
    fn quantize_token_group(
        &mut self,
        l: StreamLayout,
        q: &QuantSpec,
        h: usize,
        slot: usize,
        g0: usize,
        x: &[f32],
    ) -> Result<()> {
        let codes = &mut self.arena[l.codes.offset..l.codes.end()];
        let row = &mut codes[(h * l.ring + slot) * l.row_words..][..l.row_words];
        let p = uniform(q).quantize(Strided::contiguous(x), row, g0)?;
        self.store_params(l, (h * l.row_groups + g0 / q.group) * l.ring + slot, p);
        Ok(())
    }

    fn store_params(&mut self, l: StreamLayout, at: usize, p: GroupParams) {
        let [s, z] = p.to_raw(crate::quant::param::ParamFormat::F16);
        bytemuck::cast_slice_mut::<u32, u16>(&mut self.arena[l.scale.offset..l.scale.end()])[at] = s;
        bytemuck::cast_slice_mut::<u32, u16>(&mut self.arena[l.zero.offset..l.zero.end()])[at] = z;
    }

    fn tables_of(&self, s: Stream) -> TableView<'_> {
        TableView::new(self.arena, &self.stream_cfg(s).1.tables)
    }

    /// The arena split for a generic quantization of stream layout `l`: the words below its tables (codes,
    /// parameters, outliers: written), and its tables and scratch rows (read).
    fn split(&mut self, l: StreamLayout) -> (&mut [u32], TableView<'_>, &[f32]) {
        let base = l.tables.rope.offset;
        let (lo, hi) = self.arena.split_at_mut(base);
        let hi: &[u32] = hi;
        let tables = TableView::new(hi, &l.tables.shifted(base));
        let scratch = bytemuck::cast_slice(&hi[l.scratch.offset - base..][..l.scratch.words]);
        (lo, tables, scratch)
    }

    /// Quantizes key group `G` tokens from body index `gs` (group-aligned, in the window) through the generic
    /// path: each head's rows go to the stored basis ([`Cache::forward`]) in the scratch rows, the values
    /// beyond their channel's thresholds compete for the group's outlier slots (the farthest out, relative
    /// to the thresholds' width, win), and each channel is coded over the rest of its values, clamped to
    /// its thresholds.
    fn quantize_key_group(&mut self, l: StreamLayout, q: &QuantSpec, gs: usize) -> Result<()> {
        let (heads, d, r, g) = (self.cfg.kv_heads, self.cfg.head_dim, self.cfg.residual, q.group);
        let slot = gs % l.ring;
        let gi = slot / g;
        // Without scratch rows (keys stored as handed in, no outliers, no tiers) each channel is read from
        // the window.
        let direct = l.scratch.words == 0;
        for h in 0..heads {
            for i in (0..g).filter(|_| !direct) {
                let mut row = [0.0f32; MAX_HEAD_DIM];
                let row = &mut row[..d];
                let win: &[u16] = bytemuck::cast_slice(&self.arena[l.window.offset..l.window.end()]);
                for (o, &b) in row.iter_mut().zip(&win[(h * r + (gs + i) % r) * d..][..d]) {
                    *o = f32_of(b);
                }
                self.forward(Stream::Keys, h, i, row);
                let scratch: &mut [f32] =
                    bytemuck::cast_slice_mut(&mut self.arena[l.scratch.offset..l.scratch.end()]);
                scratch[i * d..][..d].copy_from_slice(row);
            }
            let (lo_words, tables, scratch) = self.split(l);
            let th = |c: usize| {
                if tables.thresholds.is_empty() {
                    (f32::NEG_INFINITY, f32::INFINITY)
                } else {
                    (tables.thresholds[(h * d + c) * 2], tables.thresholds[(h * d + c) * 2 + 1])
                }
            };
            let mut sel = [0u16; MAX_OUTLIER_SLOTS];
            let n_sel = if direct {
                0
            } else {
                top_positions(
                    g * d,
                    q.outliers,
                    |i| {
                        let (x, (lo, hi)) = (scratch[i], th(i % d));
                        let excess = (x - hi).max(lo - x);
                        if excess > 0.0 { excess / (hi - lo).max(f32::MIN_POSITIVE) } else { 0.0 }
                    },
                    &mut sel,
                )
            };
            // Per channel: range over the values not kept as outliers, clamped to the thresholds.
            let mut params = [GroupParams { scale: 0.0, zero: 0.0 }; MAX_HEAD_DIM];
            let mut codes = [[0u8; MAX_GROUP]; 1];
            let mut deltas = [0u16; MAX_OUTLIER_SLOTS];
            let head_words = h * l.key_head_words(d);
            for c in 0..d {
                let coder = {
                    let levels = if q.codebook {
                        tables.unit_levels(h * d + c, q.width.levels() as usize)
                    } else {
                        None
                    };
                    GroupCoder { spec: *q, levels }
                };
                let mut col = [0.0f32; MAX_GROUP];
                let col = &mut col[..g];
                if direct {
                    let win: &[u16] = bytemuck::cast_slice(&lo_words[l.window.offset..l.window.end()]);
                    for (i, o) in col.iter_mut().enumerate() {
                        *o = f32_of(win[(h * r + (gs + i) % r) * d + c]);
                    }
                } else {
                    for (i, o) in col.iter_mut().enumerate() {
                        *o = scratch[i * d + c];
                    }
                }
                let kept = |t: usize| sel[..n_sel].binary_search(&((t * d + c) as u16)).is_err();
                let (lo_t, hi_t) = th(c);
                let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                for t in (0..g).filter(|&t| kept(t)) {
                    let x = col[t].clamp(lo_t, hi_t);
                    lo = lo.min(x);
                    hi = hi.max(x);
                }
                if lo > hi {
                    // Every value is an outlier: the dense part is the threshold nearest zero.
                    (lo, hi) = (0.0f32.clamp(lo_t, hi_t), 0.0f32.clamp(lo_t, hi_t));
                }
                let p = coder.fit(lo, hi)?;
                params[c] = p;
                for t in 0..g {
                    let x = col[t];
                    codes[0][t] = coder.encode(&p, x.clamp(lo, hi));
                    if !kept(t)
                        && let Ok(k) = sel[..n_sel].binary_search(&((t * d + c) as u16))
                    {
                        let delta = x - coder.decode(&p, codes[0][t]);
                        deltas[k] = f16_bits(delta);
                    }
                }
                let row_at = head_words + l.key_row(slot, c, d);
                let words = &mut lo_words[l.codes.offset..l.codes.end()][row_at..][..l.row_words];
                pack::pack(&codes[0][..g], q.width, words, l.key_col(slot))?;
            }
            for (c, p) in params[..d].iter().enumerate() {
                write_params(lo_words, l, q.params, (h * l.row_groups + gi) * d + c, *p);
            }
            if q.outliers > 0 {
                let slots: &mut [Outlier] =
                    bytemuck::cast_slice_mut(&mut lo_words[l.outliers.offset..l.outliers.end()]);
                let dst = &mut slots[(h * l.row_groups + gi) * q.outliers..][..q.outliers];
                for (k, o) in dst.iter_mut().enumerate() {
                    *o = if k < n_sel {
                        Outlier { index: sel[k], delta: deltas[k] }
                    } else {
                        Outlier { index: EMPTY_SLOT, delta: 0 }
                    };
                }
            }
            self.promote_key_group(l, q, gs, h)?;
        }
        Ok(())
    }

    /// Quantizes body token `j` of a per-token stream through the generic path, from `x` (`[heads][d]`,
    /// no window) or its window slot: rows to the stored basis, the token's largest magnitudes across all
    /// heads to its outlier slots, then each (permuted) group over the rest.
    fn quantize_token_generic(
        &mut self,
        s: Stream,
        l: StreamLayout,
        q: &QuantSpec,
        j: usize,
        x: Option<&[f32]>,
    ) -> Result<()> {
        let (heads, d, r) = (self.cfg.kv_heads, self.cfg.head_dim, self.cfg.residual);
        let slot = j % l.ring;
        for h in 0..heads {
            let mut row = [0.0f32; MAX_HEAD_DIM];
            let row = &mut row[..d];
            match x {
                Some(x) => row.copy_from_slice(&x[h * d..][..d]),
                None => {
                    let win: &[u16] = bytemuck::cast_slice(&self.arena[l.window.offset..l.window.end()]);
                    for (o, &b) in row.iter_mut().zip(&win[(h * r + j % r) * d..][..d]) {
                        *o = f32_of(b);
                    }
                }
            }
            self.forward(s, h, 0, row);
            let mut ordered = [0.0f32; MAX_HEAD_DIM];
            {
                let (perm, _) = self.tables_of(s).order(h, d, d / q.group);
                // Stored order: permuted position i holds channel perm[i].
                for (i, o) in ordered[..d].iter_mut().enumerate() {
                    *o = if perm.is_empty() { row[i] } else { row[usize::from(perm[i])] };
                }
            }
            let scratch: &mut [f32] =
                bytemuck::cast_slice_mut(&mut self.arena[l.scratch.offset..l.scratch.end()]);
            scratch[h * d..][..d].copy_from_slice(&ordered[..d]);
        }
        let (lo_words, tables, scratch) = self.split(l);
        let mut sel = [0u16; MAX_OUTLIER_SLOTS];
        let n_sel = top_positions(heads * d, q.outliers, |i| scratch[i].abs(), &mut sel);
        let mut deltas = [0u16; MAX_OUTLIER_SLOTS];
        let groups = d / q.group;
        for h in 0..heads {
            let coder = {
                let levels = if q.codebook { tables.unit_levels(h, q.width.levels() as usize) } else { None };
                GroupCoder { spec: *q, levels }
            };
            let (_, bounds) = tables.order(h, d, groups);
            let row = &scratch[h * d..][..d];
            let kept = |i: usize| sel[..n_sel].binary_search(&((h * d + i) as u16)).is_err();
            let mut codes = [0u8; MAX_HEAD_DIM];
            let mut params = [GroupParams { scale: 0.0, zero: 0.0 }; MAX_HEAD_DIM];
            for (gj, p_out) in params[..groups].iter_mut().enumerate() {
                let range = if bounds.is_empty() {
                    gj * q.group..(gj + 1) * q.group
                } else {
                    usize::from(bounds[gj])..usize::from(bounds[gj + 1])
                };
                if range.is_empty() {
                    continue;
                }
                let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                for i in range.clone().filter(|&i| kept(i)) {
                    lo = lo.min(row[i]);
                    hi = hi.max(row[i]);
                }
                if lo > hi {
                    (lo, hi) = (0.0, 0.0);
                }
                let p = coder.fit(lo, hi)?;
                *p_out = p;
                for i in range {
                    codes[i] = coder.encode(&p, row[i].clamp(lo, hi));
                    if !kept(i)
                        && let Ok(k) = sel[..n_sel].binary_search(&((h * d + i) as u16))
                    {
                        deltas[k] = f16_bits(row[i] - coder.decode(&p, codes[i]));
                    }
                }
            }
            let words = &mut lo_words[l.codes.offset..l.codes.end()][(h * l.ring + slot) * l.row_words..]
                [..l.row_words];
            pack::pack(&codes[..d], q.width, words, 0)?;
            for (gj, p) in params[..groups].iter().enumerate() {
                write_params(lo_words, l, q.params, (h * l.row_groups + gj) * l.ring + slot, *p);
            }
        }
        if q.outliers > 0 {
            let slots: &mut [Outlier] =
                bytemuck::cast_slice_mut(&mut lo_words[l.outliers.offset..l.outliers.end()]);
            for (k, o) in slots[slot * q.outliers..][..q.outliers].iter_mut().enumerate() {
                *o = if k < n_sel {
                    Outlier { index: sel[k], delta: deltas[k] }
                } else {
                    Outlier { index: EMPTY_SLOT, delta: 0 }
                };
            }
        }
        if s == Stream::Values && self.cfg.tiers.is_some() {
            for h in 0..heads {
                let mut ordered = [0.0f32; MAX_HEAD_DIM];
                let scratch: &[f32] = bytemuck::cast_slice(&self.arena[l.scratch.offset..l.scratch.end()]);
                ordered[..d].copy_from_slice(&scratch[h * d..][..d]);
                self.correct_value(q, h, j, slot, &ordered[..d])?;
            }
        }
        Ok(())
    }

    /// Quantizes the full window (`R` tokens from logical `t0`) per channel into the body.
    fn flush_block(&mut self, l: StreamLayout, q: &QuantSpec, t0: usize) -> Result<()> {
        let (heads, d, r, g) = (self.cfg.kv_heads, self.cfg.head_dim, self.cfg.residual, q.group);
        let mut buf = [0.0f32; crate::cache::config::MAX_GROUP];
        for gs in (t0..t0 + r).step_by(g) {
            let slot = gs % l.ring;
            for h in 0..heads {
                for c in 0..d {
                    let win: &[u16] = bytemuck::cast_slice(&self.arena[l.window.offset..l.window.end()]);
                    for (i, o) in buf[..g].iter_mut().enumerate() {
                        *o = f32_of(win[(h * r + (gs + i) % r) * d + c]);
                    }
                    let codes = &mut self.arena[l.codes.offset..l.codes.end()];
                    let head = h * l.key_head_words(d);
                    let row = &mut codes[head + l.key_row(slot, c, d)..][..l.row_words];
                    let p = uniform(q).quantize(Strided::contiguous(&buf[..g]), row, l.key_col(slot))?;
                    self.store_params(l, (h * l.row_groups + slot / g) * d + c, p);
                }
            }
        }
        Ok(())
    }

    /// Reconstructs every held token of `stream`, head `head`, into `out` as `[held][head_dim]` in token
    /// order (sinks, then body oldest first): the plain reference that attention is tested against.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] for a head past `kv_heads`; [`Error::BufferTooSmall`] if `out` is short.
    pub fn dequantize(&self, stream: Stream, head: usize, out: &mut [f32]) -> Result<usize> {
        let (heads, d, r) = (self.cfg.kv_heads, self.cfg.head_dim, self.cfg.residual);
        if head >= heads {
            return Err(Error::OutOfBounds { index: head, len: heads });
        }
        let held = self.held();
        crate::error::need("dequantize output", held * d, out.len())?;
        let v = self.view(stream);
        let l = v.layout;
        let mut rows = out.chunks_exact_mut(d);
        for i in 0..self.counts.sinks {
            let row = rows.next().unwrap_or_default();
            for (c, o) in row.iter_mut().enumerate() {
                *o = f32_of(v.sinks[(head * self.cfg.sinks + i) * d + c]);
            }
        }
        for j in self.counts.base..self.counts.n {
            let row = rows.next().unwrap_or_default();
            if j >= v.q_end {
                for (c, o) in row.iter_mut().enumerate() {
                    *o = f32_of(v.window[(head * r + j % r) * d + c]);
                }
                continue;
            }
            let slot = j % l.ring;
            match v.precision {
                Precision::F16 => {
                    let body = v.body_f16();
                    for (c, o) in row.iter_mut().enumerate() {
                        *o = f32_of(match stream {
                            Stream::Keys => body[head * d * l.ring + layout::key_f16(slot, c, d)],
                            Stream::Values => body[(head * l.ring + slot) * d + c],
                        });
                    }
                }
                Precision::Quant(q) if self.cfg.generic(stream == Stream::Values) => {
                    self.dequantize_generic(stream, &v, q, head, j, row)?;
                }
                Precision::Quant(q) => {
                    for (c, o) in row.iter_mut().enumerate() {
                        let (code, at) = match q.axis {
                            Axis::PerChannel => (
                                pack::get(
                                    &v.codes[head * l.key_head_words(d) + l.key_row(slot, c, d)..]
                                        [..l.row_words],
                                    q.width,
                                    l.key_col(slot),
                                )?,
                                (head * l.row_groups + slot / q.group) * d + c,
                            ),
                            Axis::PerToken => (
                                pack::get(
                                    &v.codes[(head * l.ring + slot) * l.row_words..][..l.row_words],
                                    q.width,
                                    c,
                                )?,
                                (head * l.row_groups + c / q.group) * l.ring + slot,
                            ),
                        };
                        let p = GroupParams { scale: f32_of(v.scale[at]), zero: f32_of(v.zero[at]) };
                        *o = p.decode(code);
                    }
                }
            }
        }
        Ok(held)
    }

    /// Per-channel key row at ring slot `slot` of head `head` in the stored basis: codes, parameters,
    /// levels and outlier corrections (no tier correction).
    pub(crate) fn stored_key_row(
        &self,
        q: &QuantSpec,
        head: usize,
        slot: usize,
        row: &mut [f32],
    ) -> Result<()> {
        let v = self.view(Stream::Keys);
        let (l, d) = (v.layout, self.cfg.head_dim);
        let gi = slot / q.group;
        for (c, o) in row.iter_mut().enumerate() {
            let words = &v.codes[head * l.key_head_words(d) + l.key_row(slot, c, d)..][..l.row_words];
            let code = pack::get(words, q.width, l.key_col(slot))?;
            let p = v.params(q.params, (head * l.row_groups + gi) * d + c);
            *o = v.coder(*q, head * d + c).decode(&p, code);
        }
        if q.outliers > 0 {
            let t = slot % q.group;
            for o in &v.outliers[(head * l.row_groups + gi) * q.outliers..][..q.outliers] {
                let i = usize::from(o.index);
                if o.index != EMPTY_SLOT && i / d == t {
                    row[i % d] += o.delta();
                }
            }
        }
        Ok(())
    }

    /// Body row `j` (logical) of a generic stream, reconstructed in the stored basis (codes, parameters,
    /// levels, outlier and tier corrections), then turned back to the basis the tokens came in.
    fn dequantize_generic(
        &self,
        stream: Stream,
        v: &StreamView<'_>,
        q: QuantSpec,
        head: usize,
        j: usize,
        row: &mut [f32],
    ) -> Result<()> {
        let (l, d) = (v.layout, self.cfg.head_dim);
        let slot = j % l.ring;
        let mut corr = [0.0f32; MAX_HEAD_DIM];
        let promoted = match tier::TierView::of(self).and_then(|t| t.find(head, j).map(|s| (t, s))) {
            Some((t, s)) => {
                t.correction(s, stream, &mut corr[..d]);
                true
            }
            None => false,
        };
        match q.axis {
            Axis::PerChannel => {
                self.stored_key_row(&q, head, slot, row)?;
                if promoted {
                    row.iter_mut().zip(&corr[..d]).for_each(|(o, c)| *o += c);
                }
                self.inverse(stream, head, slot % q.group, row);
            }
            Axis::PerToken => {
                let groups = d / q.group;
                let (perm, bounds) = v.tables.order(head, d, groups);
                let words = &v.codes[(head * l.ring + slot) * l.row_words..][..l.row_words];
                let mut codes = [0u8; MAX_HEAD_DIM];
                pack::unpack(words, q.width, 0, &mut codes[..d])?;
                let coder = v.coder(q, head);
                let mut stored = [0.0f32; MAX_HEAD_DIM];
                for gj in 0..groups {
                    let range = if bounds.is_empty() {
                        gj * q.group..(gj + 1) * q.group
                    } else {
                        usize::from(bounds[gj])..usize::from(bounds[gj + 1])
                    };
                    let p = v.params(q.params, (head * l.row_groups + gj) * l.ring + slot);
                    for i in range {
                        stored[i] = coder.decode(&p, codes[i]);
                    }
                }
                for o in &v.outliers[slot * q.outliers..][..q.outliers] {
                    let i = usize::from(o.index);
                    if o.index != EMPTY_SLOT && i / d == head {
                        stored[i % d] += o.delta();
                    }
                }
                if promoted {
                    stored[..d].iter_mut().zip(&corr[..d]).for_each(|(o, c)| *o += c);
                }
                for (i, &x) in stored[..d].iter().enumerate() {
                    row[if perm.is_empty() { i } else { usize::from(perm[i]) }] = x;
                }
                self.inverse(stream, head, 0, row);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests;
