//! The kernels' argument structs (`kernels/kvq.cuh` declares the same in C) and the host's plan of an
//! append: which groups it codes and which rows it stores, computed from `kvq-core`'s counts exactly as
//! `Cache::append` moves them token by token.

use kvq_core::cache::{Axis, CacheConfig, Counts, Layout, Overflow, Precision, StreamLayout};
use kvq_core::quant::param::ParamFormat;
use kvq_core::transform::Pairing;

use crate::error::{GpuError, Result};

/// `KVQ_F16`: an fp16 body.
pub const KIND_F16: u32 = 0;
/// `KVQ_PER_CHANNEL`: codes per channel along tokens (KIVI keys).
pub const KIND_PER_CHANNEL: u32 = 1;
/// `KVQ_PER_TOKEN`: codes per token along channels (KIVI values).
pub const KIND_PER_TOKEN: u32 = 2;
/// Largest head dimension the attention kernels take (`KVQ_MAX_HEAD_DIM`).
pub const MAX_HEAD_DIM: usize = 256;
/// Most query heads per KV head (`KVQ_MAX_RATIO`).
pub const MAX_RATIO: usize = 8;

/// One stream's regions and shape (`KvqStream`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KvqStream {
    /// [`KIND_F16`], [`KIND_PER_CHANNEL`] or [`KIND_PER_TOKEN`].
    pub kind: u32,
    /// Bits a code occupies.
    pub bits: u32,
    /// Largest code.
    pub max_code: u32,
    /// Group size.
    pub group: u32,
    /// Body slots.
    pub ring: u32,
    /// Tokens per key block.
    pub block: u32,
    /// Words of one code row.
    pub row_words: u32,
    /// Groups per row.
    pub row_groups: u32,
    /// Window slots.
    pub window_tokens: u32,
    /// Word offset of the sinks.
    pub sinks: u32,
    /// Word offset of the window.
    pub window: u32,
    /// Word offset of the body.
    pub codes: u32,
    /// Word offset of the scales.
    pub scale: u32,
    /// Word offset of the zero points.
    pub zero: u32,
    /// 1 where the body is read through the generic reader (`kvq_generic_row`): any calibrated format
    /// (codebook, outliers, FP8 parameters, permutation, clipping), a transform or tiers, or per-token keys.
    pub generic: u32,
    /// Parameter format: [`PARAMS_F16`] or [`PARAMS_FP8`].
    pub params: u32,
    /// Levels per codebook unit (`2^bits`), 0 for the uniform grid.
    pub levels_n: u32,
    /// Word offset of the codebook levels (`[unit][enc, dec][levels_n]` f32).
    pub levels: u32,
    /// Outlier slots per unit, 0 for none.
    pub outliers_n: u32,
    /// Word offset of the outlier slots (one word each: index in the low half, f16 delta in the high).
    pub outliers: u32,
    /// 1 for per-token groups over a calibrated channel permutation.
    pub permuted: u32,
    /// Word offset of the permutation (`[kv_heads][d]` u16).
    pub perm: u32,
    /// Word offset of the group bounds (`[kv_heads][d/G + 1]` u16).
    pub bounds: u32,
}

/// A layer cache's shape and streams (`KvqLayout`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KvqLayout {
    /// KV heads.
    pub kv_heads: u32,
    /// Channels per head.
    pub head_dim: u32,
    /// Most tokens held.
    pub capacity: u32,
    /// Sinks `S`.
    pub sinks: u32,
    /// Window `R`.
    pub residual: u32,
    /// Words of the arena.
    pub total_words: u32,
    /// Keys.
    pub keys: KvqStream,
    /// Values.
    pub values: KvqStream,
    /// Keys stored relative to their key group's first position: [`ROPE_NONE`], [`ROPE_ADJACENT`] or
    /// [`ROPE_HALVES`] (the pairing).
    pub rope: u32,
    /// 1 where keys are Hadamard-rotated.
    pub rotate_keys: u32,
    /// 1 where values are Hadamard-rotated.
    pub rotate_values: u32,
    /// 1 where calibrated key means are subtracted.
    pub center_keys: u32,
    /// 1 where keys are scaled by calibrated balancing factors.
    pub balance_keys: u32,
    /// Word offset of the RoPE offsets table (`[G][d/2][cos, sin]` f32).
    pub rope_table: u32,
    /// Word offset of the key centres (`[kv_heads][d]` f32).
    pub center: u32,
    /// Word offset of the balancing factors (`[kv_heads][d]` f32).
    pub balance: u32,
    /// MiKV: promoted tokens per key group and KV head, 0 without tiers.
    pub tier_keep: u32,
    /// Bits of the tier corrections.
    pub tier_bits: u32,
    /// Words of one tier slot.
    pub tier_slot_words: u32,
    /// Word offset of the tier slots.
    pub tier_slots: u32,
}

/// `KVQ_PARAMS_F16`: group parameters in f16.
pub const PARAMS_F16: u32 = 0;
/// `KVQ_PARAMS_FP8`: group parameters in FP8 E4M3, one byte each.
pub const PARAMS_FP8: u32 = 1;
/// `KVQ_ROPE_NONE`: keys stored as handed in.
pub const ROPE_NONE: u32 = 0;
/// `KVQ_ROPE_ADJACENT`: RoPE pairs `(2i, 2i + 1)`.
pub const ROPE_ADJACENT: u32 = 1;
/// `KVQ_ROPE_HALVES`: RoPE pairs `(i, i + d/2)`.
pub const ROPE_HALVES: u32 = 2;

/// Token counts and the ends of the quantized runs (`KvqCounts`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KvqCounts {
    /// Sinks held.
    pub sinks: u32,
    /// Body tokens appended.
    pub n: u32,
    /// First body token held.
    pub base: u32,
    /// End of the key body's run.
    pub key_q_end: u32,
    /// End of the value body's run.
    pub value_q_end: u32,
}

/// One append's work (`KvqAppend`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KvqAppend {
    /// Sinks held before.
    pub sink0: u32,
    /// Input rows that become sinks.
    pub sink_new: u32,
    /// Body tokens appended before.
    pub n0: u32,
    /// Body tokens in this append.
    pub tokens: u32,
    /// First key window block flushed.
    pub key_blocks0: u32,
    /// Key window blocks flushed.
    pub key_blocks: u32,
    /// First body token whose value this append codes.
    pub value_q0: u32,
    /// Values coded.
    pub value_q: u32,
}

fn u32_of(what: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| GpuError::Unsupported { what, value: v })
}

fn stream(cfg: &CacheConfig, p: Precision, l: &StreamLayout, keys: bool) -> Result<KvqStream> {
    let mut s = KvqStream {
        ring: u32_of("ring", l.ring)?,
        block: u32_of("block", l.block)?,
        row_words: u32_of("row words", l.row_words)?,
        row_groups: u32_of("row groups", l.row_groups)?,
        window_tokens: u32_of("window", l.window_tokens)?,
        sinks: u32_of("offset", l.sinks.offset)?,
        window: u32_of("offset", l.window.offset)?,
        codes: u32_of("offset", l.codes.offset)?,
        scale: u32_of("offset", l.scale.offset)?,
        zero: u32_of("offset", l.zero.offset)?,
        ..KvqStream::default()
    };
    let Precision::Quant(q) = p else {
        s.kind = KIND_F16;
        s.bits = 16;
        return Ok(s);
    };
    s.kind = match q.axis {
        Axis::PerChannel if keys => KIND_PER_CHANNEL,
        Axis::PerToken => KIND_PER_TOKEN,
        Axis::PerChannel => {
            return Err(GpuError::Unsupported { what: "per-channel values on the GPU", value: 0 });
        }
    };
    s.bits = q.width.bits();
    s.max_code = u32::from(q.width.max_code());
    s.group = u32_of("group", q.group)?;
    // The device reads KIVI's plain per-channel keys and per-token values directly; everything else
    // (and clipping, which only the quantizer sees) through the generic reader.
    s.generic = u32::from(cfg.generic(!keys) || (keys && q.axis == Axis::PerToken) || q.clip != 1.0);
    s.params = match q.params {
        ParamFormat::F16 => PARAMS_F16,
        ParamFormat::Fp8E4M3 => PARAMS_FP8,
        _ => return Err(GpuError::Unsupported { what: "parameter format on the GPU", value: 0 }),
    };
    if q.codebook {
        s.levels_n = q.width.levels();
        s.levels = u32_of("offset", l.tables.levels.offset)?;
    }
    s.outliers_n = u32_of("outlier slots", q.outliers)?;
    s.outliers = u32_of("offset", l.outliers.offset)?;
    s.permuted = u32::from(q.permuted);
    s.perm = u32_of("offset", l.tables.perm.offset)?;
    s.bounds = u32_of("offset", l.tables.bounds.offset)?;
    Ok(s)
}

impl KvqLayout {
    /// The kernels' view of `cfg`'s layout `l` (`cfg.layout()`).
    ///
    /// # Errors
    /// [`GpuError::Unsupported`] for per-channel values and arenas whose f16 indices pass `u32` (8 GiB).
    /// Every format `kvq-core` has is read; only KIVI's plain ones are appended on the device
    /// ([`KvqLayout::device_append`]).
    pub fn new(cfg: &CacheConfig, l: &Layout) -> Result<Self> {
        // Kernels index halves of the arena with 32-bit integers.
        if l.total_words > (u32::MAX / 2) as usize {
            return Err(GpuError::Unsupported {
                what: "arena words on the GPU (at most 2^31)",
                value: l.total_words,
            });
        }
        Ok(Self {
            kv_heads: u32_of("kv_heads", cfg.kv_heads)?,
            head_dim: u32_of("head_dim", cfg.head_dim)?,
            capacity: u32_of("capacity", cfg.capacity)?,
            sinks: u32_of("sinks", cfg.sinks)?,
            residual: u32_of("residual", cfg.residual)?,
            total_words: u32_of("words", l.total_words)?,
            keys: stream(cfg, cfg.keys, &l.keys, true)?,
            values: stream(cfg, cfg.values, &l.values, false)?,
            rope: match cfg.transform.rope.map(|r| r.pairing) {
                None => ROPE_NONE,
                Some(Pairing::Adjacent) => ROPE_ADJACENT,
                Some(Pairing::Halves) => ROPE_HALVES,
            },
            rotate_keys: u32::from(cfg.transform.rotate_keys),
            rotate_values: u32::from(cfg.transform.rotate_values),
            center_keys: u32::from(cfg.transform.center_keys),
            balance_keys: u32::from(cfg.transform.balance_keys),
            rope_table: u32_of("offset", l.keys.tables.rope.offset)?,
            center: u32_of("offset", l.keys.tables.center.offset)?,
            balance: u32_of("offset", l.keys.tables.balance.offset)?,
            tier_keep: u32_of("tier keep", cfg.tiers.map_or(0, |t| t.keep))?,
            tier_bits: cfg.tiers.map_or(0, |t| t.width.bits()),
            tier_slot_words: u32_of("tier slot words", l.tiers.slot_words)?,
            tier_slots: u32_of("offset", l.tiers.slots.offset)?,
        })
    }

    /// Whether the device's append kernels take this cache: fp16 and KIVI's plain uniform formats
    /// (per-channel keys, per-token values, f16 parameters, no clipping, transform or tiers). The
    /// calibrated formats are appended on the host (`kvq-core`'s `Cache::append`) and uploaded.
    pub fn device_append(&self) -> bool {
        self.keys.generic == 0 && self.values.generic == 0
    }
}

impl KvqCounts {
    /// The kernels' counts for a cache of `cfg` at `c`.
    pub fn new(cfg: &CacheConfig, c: Counts) -> Self {
        let r = cfg.residual;
        Self {
            sinks: c.sinks as u32,
            n: c.n as u32,
            base: c.base as u32,
            key_q_end: cfg.keys.residual().quantized_end(c.n, r) as u32,
            value_q_end: cfg.values.residual().quantized_end(c.n, r) as u32,
        }
    }
}

/// The counts after appending `tokens` tokens at `c`, as `Cache::append` moves them (sinks first; a full
/// sliding cache drops a slide step before each new body token).
///
/// # Errors
/// [`kvq_core::Error::ContextFull`] when a stopping cache would pass its capacity.
pub fn counts_after(cfg: &CacheConfig, c: Counts, tokens: usize) -> Result<Counts> {
    if cfg.overflow == Overflow::Stop && c.held() + tokens > cfg.capacity {
        return Err(
            kvq_core::Error::ContextFull { held: c.held(), adding: tokens, capacity: cfg.capacity }.into()
        );
    }
    let mut c = c;
    let to_sinks = (cfg.sinks - c.sinks).min(tokens);
    c.sinks += to_sinks;
    for _ in to_sinks..tokens {
        if c.held() == cfg.capacity {
            c.base += cfg.slide_step();
        }
        c.n += 1;
    }
    Ok(c)
}

/// Most tokens one append may carry so that no body slot or window slot is written twice within it, and
/// both passes' item counts stay below 2^31 (the kernels index items with 32-bit integers): a longer
/// append is cut into pieces of this size.
pub fn max_piece(cfg: &CacheConfig, l: &Layout) -> usize {
    let r = cfg.residual;
    // Each pass has at most 2 (P + R) kv_heads head_dim items.
    let hd = (cfg.kv_heads * cfg.head_dim).max(1);
    let mut p = ((1usize << 30) / hd).saturating_sub(r);
    for (precision, s) in [(cfg.keys, &l.keys), (cfg.values, &l.values)] {
        let limit = match precision {
            Precision::F16 => s.ring,
            // A piece of P tokens flushes key blocks spanning at most P + R - 1 tokens.
            Precision::Quant(q) if q.axis == Axis::PerChannel => (s.ring + 1).saturating_sub(r),
            Precision::Quant(_) => s.ring,
        };
        if limit > 0 {
            p = p.min(limit);
        }
    }
    p.clamp(1, 1 << 20)
}

/// The work of appending `tokens` tokens (at most [`max_piece`]) to a cache at counts `c` (after any sinks
/// the append fills).
pub fn plan_append(cfg: &CacheConfig, c: Counts, tokens: usize) -> KvqAppend {
    let sink_new = (cfg.sinks - c.sinks).min(tokens);
    let body = tokens - sink_new;
    let (n0, n1, r) = (c.n, c.n + body, cfg.residual);
    let (mut key_blocks0, mut key_blocks) = (0, 0);
    if let Precision::Quant(q) = cfg.keys
        && q.axis == Axis::PerChannel
    {
        key_blocks0 = n0 / r;
        key_blocks = n1 / r - n0 / r;
    }
    let (mut value_q0, mut value_q) = (0, 0);
    if let Precision::Quant(_) = cfg.values {
        value_q0 = n0.saturating_sub(r);
        value_q = n1.saturating_sub(r) - value_q0;
    }
    KvqAppend {
        sink0: c.sinks as u32,
        sink_new: sink_new as u32,
        n0: n0 as u32,
        tokens: body as u32,
        key_blocks0: key_blocks0 as u32,
        key_blocks: key_blocks as u32,
        value_q0: value_q0 as u32,
        value_q: value_q as u32,
    }
}

/// Items of the quantize pass (`kvq_quantize_items`).
pub fn quantize_items(l: &KvqLayout, a: &KvqAppend) -> u64 {
    let mut n = 0u64;
    if l.keys.kind == KIND_PER_CHANNEL {
        n += u64::from(a.key_blocks)
            * u64::from(l.residual / l.keys.group)
            * u64::from(l.kv_heads * l.head_dim);
    }
    if l.values.kind == KIND_PER_TOKEN {
        n += u64::from(a.value_q) * u64::from(l.kv_heads) * u64::from(l.head_dim / l.values.group);
    }
    n
}

/// Items of the store pass (`kvq_store_items`).
pub fn store_items(l: &KvqLayout, a: &KvqAppend) -> u64 {
    2 * u64::from(a.sink_new + a.tokens) * u64::from(l.kv_heads) * u64::from(l.head_dim)
}

/// Checks an append's input as `Cache::append` does: equal lengths, a multiple of `kv_heads * head_dim`,
/// finite, within `MAX_ABS`, and room in a stopping cache. Returns the tokens.
///
/// # Errors
/// The `kvq_core` errors `Cache::append` gives for the same input; [`GpuError::Unsupported`] past
/// 2^32 - 1 body tokens since the start (the kernels count tokens in 32 bits).
pub fn check_append(cfg: &CacheConfig, c: Counts, keys: &[f32], values: &[f32]) -> Result<usize> {
    use kvq_core::Error;
    let hd = cfg.kv_heads * cfg.head_dim;
    if !keys.len().is_multiple_of(hd) {
        return Err(Error::ShapeMismatch {
            what: "keys length (multiple of kv_heads*head_dim)",
            expected: hd,
            got: keys.len(),
        }
        .into());
    }
    if values.len() != keys.len() {
        return Err(
            Error::ShapeMismatch { what: "values length", expected: keys.len(), got: values.len() }.into()
        );
    }
    for (i, &x) in keys.iter().chain(values).enumerate() {
        if !x.is_finite() {
            return Err(Error::NonFinite { index: i }.into());
        }
        if x.abs() > kvq_core::cache::MAX_ABS {
            return Err(Error::ParamOverflow { value: x, max: kvq_core::cache::MAX_ABS }.into());
        }
    }
    let tokens = keys.len() / hd;
    let after = counts_after(cfg, c, tokens)?;
    if after.n > u32::MAX as usize {
        return Err(GpuError::Unsupported {
            what: "body tokens since the start (at most 2^32 - 1)",
            value: after.n,
        });
    }
    Ok(tokens)
}

/// Checks counts handed in with an arena (`DeviceCache::upload`) for ones `Cache::append` can leave: the
/// kernels locate every token from them, so counts from elsewhere must not point outside the arena.
///
/// # Errors
/// [`kvq_core::Error::InvalidConfig`] for counts no cache of `cfg` reaches.
pub fn check_counts(cfg: &CacheConfig, c: Counts) -> Result<()> {
    let slide = cfg.slide_step();
    let ok = c.sinks <= cfg.sinks
        && (c.sinks == cfg.sinks || (c.n == 0 && c.base == 0))
        && c.base <= c.n
        && c.n <= u32::MAX as usize
        && c.held() <= cfg.capacity
        && match cfg.overflow {
            Overflow::Stop => c.base == 0,
            Overflow::Slide => c.base.is_multiple_of(slide),
        };
    if ok {
        Ok(())
    } else {
        Err(kvq_core::Error::InvalidConfig {
            what: "counts (no cache of this configuration holds them)",
            value: c.n,
        }
        .into())
    }
}

/// How a decode or prefill is split along the tokens (Flash-Decoding): `splits` blocks per KV head and
/// query, each over `split` tokens (a multiple of 128, the four warps' tiles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Splits {
    /// Tokens per split.
    pub split: usize,
    /// Splits.
    pub splits: usize,
}

impl Splits {
    /// Splits for `tokens` tokens (the most any query sees) over `kv_heads` heads and `queries` queries,
    /// aiming at `target` blocks in all (a few per multiprocessor), never under 128 tokens a split.
    pub fn new(tokens: usize, kv_heads: usize, queries: usize, target: usize) -> Self {
        let tokens = tokens.max(1);
        let rows = (kv_heads * queries).max(1);
        let want = target.div_ceil(rows).max(1);
        let split = tokens.div_ceil(want).div_ceil(128).max(1) * 128;
        Self { split, splits: tokens.div_ceil(split) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvq_core::cache::QuantSpec;
    use kvq_core::pack::Width;

    /// Splits cover the tokens with whole 128-token tiles per warp group, as few as the target allows.
    #[test]
    fn splits_cover_the_tokens() {
        for tokens in [1usize, 127, 128, 129, 4096, 40_000, 131_072] {
            for (heads, queries, target) in [(1usize, 1usize, 528usize), (3, 1, 528), (8, 64, 32), (1, 1, 1)]
            {
                let s = Splits::new(tokens, heads, queries, target);
                assert!(s.split.is_multiple_of(128) && s.split >= 128, "{tokens} {s:?}");
                assert!(s.split * s.splits >= tokens && s.split * (s.splits - 1) < tokens, "{tokens} {s:?}");
                // No more blocks than the target asks for, unless the tiles force it.
                assert!(s.splits * heads * queries <= target.max(heads * queries) || s.split == 128, "{s:?}");
            }
        }
    }

    /// The counts of an append equal kvq-core's after the same appends, sinks and slides included.
    #[test]
    fn counts_follow_core() {
        let cfg =
            CacheConfig::kivi(Width::B2, 32, 64, 2, 64, 300).with_sinks(4).with_overflow(Overflow::Slide);
        let mut arena = vec![0u32; cfg.layout().unwrap().total_words];
        let mut cache = kvq_core::cache::Cache::new(cfg, &mut arena).unwrap();
        let mut c = Counts::default();
        for n in [1usize, 2, 3, 100, 250, 1, 64, 500] {
            let x = vec![0.25f32; n * 128];
            cache.append(&x, &x).unwrap();
            c = counts_after(&cfg, c, n).unwrap();
            assert_eq!(c, cache.counts());
        }
        let stop = CacheConfig { overflow: Overflow::Stop, ..cfg };
        let full = Counts { sinks: 4, n: 296, base: 0 };
        assert!(matches!(
            counts_after(&stop, full, 1),
            Err(GpuError::Core(kvq_core::Error::ContextFull { .. }))
        ));
    }

    /// Every format is read; only fp16 and KIVI's plain formats are appended on the device, clipping
    /// excluded (`plain` does not look at it), and per-channel values are refused.
    #[test]
    fn calibrated_formats_are_read_but_not_appended_on_the_device() {
        let kivi = CacheConfig::kivi(Width::B4, 32, 64, 2, 64, 1000);
        let clipped = QuantSpec { clip: 0.9, ..QuantSpec::per_token(Width::B4, 32) };
        let fp8 =
            QuantSpec::per_token(Width::B2, 32).with_params(kvq_core::quant::param::ParamFormat::Fp8E4M3);
        let token_keys = QuantSpec::per_token(Width::B2, 32);
        for (what, cfg) in [
            ("clipped values", CacheConfig { values: Precision::Quant(clipped), ..kivi }),
            ("FP8 parameters", CacheConfig { values: Precision::Quant(fp8), ..kivi }),
            ("per-token keys", CacheConfig { keys: Precision::Quant(token_keys), ..kivi }),
            (
                "rotated values",
                kivi.with_transform(kvq_core::cache::Transform { rotate_values: true, ..Default::default() }),
            ),
        ] {
            let l = KvqLayout::new(&cfg, &cfg.layout().unwrap()).unwrap();
            assert!(!l.device_append(), "{what}");
        }
        for cfg in [kivi, CacheConfig::fp16(2, 64, 100), CacheConfig { keys: Precision::F16, ..kivi }] {
            assert!(KvqLayout::new(&cfg, &cfg.layout().unwrap()).unwrap().device_append());
        }
        // kvq-core refuses per-channel values in its layout; the kernels refuse them whatever layout they
        // are handed.
        let channel_values = QuantSpec::per_channel(Width::B2, 32);
        let cfg = CacheConfig { values: Precision::Quant(channel_values), ..kivi };
        assert!(cfg.layout().is_err());
        assert!(matches!(KvqLayout::new(&cfg, &kivi.layout().unwrap()), Err(GpuError::Unsupported { .. })));
    }

    /// Counts a cache can reach pass; counts that would send the kernels outside the arena do not.
    #[test]
    fn counts_from_elsewhere_are_checked() {
        let cfg = CacheConfig::kivi(Width::B2, 32, 64, 2, 64, 300).with_sinks(4);
        for tokens in [0usize, 3, 4, 5, 200, 300] {
            assert!(check_counts(&cfg, cfg.counts_after(tokens).unwrap()).is_ok(), "{tokens}");
        }
        for bad in [
            Counts { sinks: 5, n: 0, base: 0 },
            Counts { sinks: 3, n: 1, base: 0 },
            Counts { sinks: 4, n: 10, base: 11 },
            Counts { sinks: 4, n: 400, base: 0 },
            Counts { sinks: 4, n: 100, base: 32 },
        ] {
            assert!(check_counts(&cfg, bad).is_err(), "{bad:?}");
        }
        let slide = cfg.with_overflow(Overflow::Slide);
        assert!(check_counts(&slide, slide.counts_after(1000).unwrap()).is_ok());
        assert!(check_counts(&slide, Counts { sinks: 4, n: 300, base: 7 }).is_err());
    }

    /// A piece's items stay below 2^31 whatever the shape (the kernels count them in 32 bits).
    #[test]
    fn pieces_keep_item_counts_in_32_bits() {
        let cfg = CacheConfig::kivi(Width::B2, 32, 128, 32, 128, 600_000);
        let l = cfg.layout().unwrap();
        let k = KvqLayout::new(&cfg, &l).unwrap();
        let p = max_piece(&cfg, &l);
        assert!(p >= 1);
        for n0 in [0usize, 127, 5000] {
            let c = Counts { sinks: 0, n: n0, base: 0 };
            let a = plan_append(&cfg, c, p);
            assert!(quantize_items(&k, &a) < 1 << 31 && store_items(&k, &a) < 1 << 31, "{a:?}");
        }
    }
}
