//! A layer cache's configuration: shape, capacity and one policy per stream, chosen at run time.

use super::window::Residual;
use crate::error::{Error, Result};
use crate::pack::Width;
use crate::quant::param::ParamFormat;
use crate::transform::{Rope, hadamard_len_ok};

/// Which axis a quantization group runs along.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Axis {
    /// `G` consecutive tokens of one channel (KIVI and KVQuant keys); the window flushes in blocks.
    PerChannel,
    /// `G` consecutive channels of one token (KIVI values, SKVQ keys and values); the window is a FIFO.
    PerToken,
}

/// Quantization of one stream: min-max groups (methods.md §1.1), with KVQuant's and SKVQ's options.
///
/// - `params`: the groups' two parameters in f16 (KIVI) or FP8 E4M3 (SKVQ), half the bytes.
/// - `codebook`: the codes index calibrated levels instead of a uniform grid (KVQuant's nuqX, §2.3): a
///   group is normalized to `[-1, 1]` by its centre and half-range and each value takes its nearest level.
///   The levels live in the cache's tables ([`crate::cache::Cache::set_levels`]), per channel for
///   per-channel keys and per head otherwise.
/// - `outliers`: dense-and-sparse slots (§2.5): per key group of `G` tokens and KV head for per-channel
///   keys (values beyond calibrated per-channel thresholds), per token across all KV heads for per-token
///   streams (its largest magnitudes). Each slot is 4 bytes: index and f16 correction.
/// - `permuted`: per-token groups run over a calibrated channel permutation with variable-size groups
///   (SKVQ's reordering, §3.1); queries are permuted alike and value outputs permuted back.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct QuantSpec {
    /// Code width.
    pub width: Width,
    /// Group size `G` (for permuted streams, `head_dim / G` is the number of groups).
    pub group: usize,
    /// Grouping axis.
    pub axis: Axis,
    /// Clipping factor in `(0, 1]` (SKVQ); 1 is plain min-max.
    pub clip: f32,
    /// Storage format of each group's two parameters.
    pub params: ParamFormat,
    /// Calibrated non-uniform levels instead of the uniform grid.
    pub codebook: bool,
    /// Outlier slots per unit (see above); 0 for none.
    pub outliers: usize,
    /// Per-token groups over a calibrated channel permutation.
    pub permuted: bool,
}

impl QuantSpec {
    /// KIVI keys: `width`-bit codes per channel in groups of `group` tokens.
    pub const fn per_channel(width: Width, group: usize) -> Self {
        Self {
            width,
            group,
            axis: Axis::PerChannel,
            clip: 1.0,
            params: ParamFormat::F16,
            codebook: false,
            outliers: 0,
            permuted: false,
        }
    }

    /// KIVI values: `width`-bit codes per token in groups of `group` channels.
    pub const fn per_token(width: Width, group: usize) -> Self {
        Self { axis: Axis::PerToken, ..Self::per_channel(width, group) }
    }

    /// The same with parameters stored as `params`.
    pub const fn with_params(self, params: ParamFormat) -> Self {
        Self { params, ..self }
    }

    /// The same with calibrated codebook levels.
    pub const fn with_codebook(self) -> Self {
        Self { codebook: true, ..self }
    }

    /// The same with `slots` outlier slots per unit.
    pub const fn with_outliers(self, slots: usize) -> Self {
        Self { outliers: slots, ..self }
    }

    /// Whether KIVI's kernels read this body: uniform levels, f16 parameters, fixed groups, no outliers.
    pub const fn plain(&self) -> bool {
        matches!(self.params, ParamFormat::F16) && !self.codebook && self.outliers == 0 && !self.permuted
    }

    /// Bytes of one group parameter.
    pub const fn param_bytes(&self) -> usize {
        self.params.bytes()
    }
}

/// Orthogonal transforms of the stored keys and values ([`crate::transform`]); attention applies the same
/// to the query and turns the output back, so scores and outputs are unchanged up to rounding.
///
/// Keys go through, in this order: the RoPE rotation back by their offset in their key group (`rope`,
/// per-channel keys), multiplication by calibrated per-channel balancing factors (`balance_keys`, MiKV),
/// the Hadamard rotation (`rotate_keys`), and subtraction of calibrated per-channel means
/// (`center_keys`). Values: the Hadamard rotation (`rotate_values`).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Transform {
    /// Store per-channel keys relative to their group's first position (pre-RoPE quantization).
    pub rope: Option<Rope>,
    /// Hadamard-rotate keys (head_dim a power of two).
    pub rotate_keys: bool,
    /// Hadamard-rotate values (head_dim a power of two).
    pub rotate_values: bool,
    /// Subtract calibrated per-channel key means before quantizing.
    pub center_keys: bool,
    /// Scale keys by calibrated per-channel factors, queries by their inverse (MiKV's balancer).
    pub balance_keys: bool,
}

impl Transform {
    /// No transform.
    pub const NONE: Self = Self {
        rope: None,
        rotate_keys: false,
        rotate_values: false,
        center_keys: false,
        balance_keys: false,
    };

    /// Whether the key body is stored in another basis than the keys handed in.
    pub const fn keys(&self) -> bool {
        self.rope.is_some() || self.rotate_keys || self.center_keys || self.balance_keys
    }
}

/// MiKV's importance tiers (methods.md §4): per key group of `G` tokens and KV head, the `keep` tokens that
/// received the most attention while they sat in the full-precision window (the mean of the probabilities
/// handed to [`crate::cache::Cache::observe`]) are promoted when the group is quantized: their keys and
/// values keep their low-bit codes and gain a per-token correction of `width`-bit codes (the difference
/// between the token and its low-bit reconstruction, in groups of [`Tiers::group`] channels with f16
/// parameters). A promoted token's error is then the correction's, `2^-width` of the low-bit error's range
/// instead of the low-bit error. The rest stay as stored. Tiers need per-channel keys and per-token
/// values, both generic (the window of `residual` tokens is where importance is measured). The token
/// whose append quantizes a block has not been attended yet and is not promoted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Tiers {
    /// Tokens promoted per key group and KV head (at most `G`).
    pub keep: usize,
    /// Width of the correction codes (2, 4 or 8 bits).
    pub width: Width,
}

impl Tiers {
    /// Channels per correction group for a head of `head_dim` channels: 64 where it divides, else all.
    pub const fn group(head_dim: usize) -> usize {
        if head_dim.is_multiple_of(64) { 64 } else { head_dim }
    }

    /// Words of one promoted token's slot: its logical body index, then per stream (keys, values) one word
    /// of f16 scale and zero per correction group and the packed correction codes.
    pub const fn slot_words(&self, head_dim: usize) -> usize {
        let groups = head_dim / Self::group(head_dim);
        1 + 2 * (groups + head_dim * self.width.bits() as usize / 32)
    }
}

/// How one stream (keys or values) is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Precision {
    /// Every token in f16 (the baseline).
    F16,
    /// Quantized body plus a full-precision window of the residual length.
    Quant(QuantSpec),
}

impl Precision {
    /// The window rule this precision implies.
    pub const fn residual(&self) -> Residual {
        match self {
            Self::F16 => Residual::None,
            Self::Quant(QuantSpec { axis: Axis::PerChannel, .. }) => Residual::Block,
            Self::Quant(QuantSpec { axis: Axis::PerToken, .. }) => Residual::Fifo,
        }
    }
}

/// What an append does when the cache holds `capacity` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Overflow {
    /// Refuse the append with [`Error::ContextFull`]; nothing changes.
    Stop,
    /// Drop the oldest body tokens (never the sinks), a quantization group at a time for per-channel keys.
    Slide,
}

/// The configuration of one layer's cache.
///
/// ```
/// use kvq_core::cache::CacheConfig;
/// use kvq_core::pack::Width;
/// // KIVI-2 (G = 32, R = 128) for the default model's layer shape, 8k tokens.
/// let cfg = CacheConfig::kivi(Width::B2, 32, 128, 3, 64, 8192);
/// const FP16: CacheConfig = CacheConfig::fp16(3, 64, 8192);
/// const BYTES: usize = match FP16.layout() { Ok(l) => l.total_bytes, Err(_) => panic!() };
/// assert_eq!(BYTES, 2 * 8192 * 3 * 64 * 2);
/// assert!(cfg.layout()?.total_bytes < BYTES / 4);
/// # Ok::<(), kvq_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct CacheConfig {
    /// KV heads of the layer.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Most tokens held at once: sinks, quantized body and windows together.
    pub capacity: usize,
    /// Key stream.
    pub keys: Precision,
    /// Value stream (per-token groups only).
    pub values: Precision,
    /// Residual length `R` of the full-precision windows of quantized streams.
    pub residual: usize,
    /// The first `S` tokens kept in f16 (attention sinks).
    pub sinks: usize,
    /// Behaviour at capacity.
    pub overflow: Overflow,
    /// Transforms of the stored keys and values.
    pub transform: Transform,
    /// MiKV's importance tiers, if any.
    pub tiers: Option<Tiers>,
}

/// Largest group size the cache takes (KIVI and SKVQ use up to 128).
pub const MAX_GROUP: usize = 256;

/// Largest head dimension of a generic stream (its rows are staged on the stack).
pub const MAX_HEAD_DIM: usize = 512;

/// Most outlier slots per unit.
pub const MAX_OUTLIER_SLOTS: usize = 256;

impl CacheConfig {
    /// Keys and values in f16.
    pub const fn fp16(kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self {
            kv_heads,
            head_dim,
            capacity,
            keys: Precision::F16,
            values: Precision::F16,
            residual: 0,
            sinks: 0,
            overflow: Overflow::Stop,
            transform: Transform::NONE,
            tiers: None,
        }
    }

    /// KIVI: keys per channel and values per token, both `width`-bit in groups of `group`, residual `residual`.
    pub const fn kivi(
        width: Width,
        group: usize,
        residual: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Self {
        Self {
            keys: Precision::Quant(QuantSpec::per_channel(width, group)),
            values: Precision::Quant(QuantSpec::per_token(width, group)),
            residual,
            ..Self::fp16(kv_heads, head_dim, capacity)
        }
    }

    /// The same with `sinks` attention sinks.
    pub const fn with_sinks(self, sinks: usize) -> Self {
        Self { sinks, ..self }
    }

    /// The same with overflow behaviour `overflow`.
    pub const fn with_overflow(self, overflow: Overflow) -> Self {
        Self { overflow, ..self }
    }

    /// The same with transforms `transform`.
    pub const fn with_transform(self, transform: Transform) -> Self {
        Self { transform, ..self }
    }

    /// The same with MiKV's importance tiers `tiers`.
    pub const fn with_tiers(self, tiers: Tiers) -> Self {
        Self { tiers: Some(tiers), ..self }
    }

    /// The key stream's spec, if quantized.
    pub const fn key_spec(&self) -> Option<QuantSpec> {
        match self.keys {
            Precision::Quant(q) => Some(q),
            Precision::F16 => None,
        }
    }

    /// The value stream's spec, if quantized.
    pub const fn value_spec(&self) -> Option<QuantSpec> {
        match self.values {
            Precision::Quant(q) => Some(q),
            Precision::F16 => None,
        }
    }

    /// Whether KIVI's kernels read the key body (with a transformed query where it is rotated or balanced):
    /// a plain body, no RoPE offsets, no centring.
    pub const fn plain_keys(&self) -> bool {
        match self.keys {
            Precision::F16 => true,
            Precision::Quant(q) => {
                q.plain()
                    && self.transform.rope.is_none()
                    && !self.transform.center_keys
                    && self.tiers.is_none()
            }
        }
    }

    /// Whether appending to a stream goes through the generic quantizer (a transform, or anything beyond
    /// KIVI's plain groups) rather than KIVI's.
    pub const fn generic(&self, values: bool) -> bool {
        let p = if values { self.values } else { self.keys };
        let Precision::Quant(q) = p else {
            return false;
        };
        let t = self.transform;
        !q.plain() || self.tiers.is_some() || if values { t.rotate_values } else { t.keys() }
    }

    /// Whether KIVI's kernels read the value body (outputs turned back where it is rotated).
    pub const fn plain_values(&self) -> bool {
        match self.values {
            Precision::F16 => true,
            Precision::Quant(q) => q.plain(),
        }
    }

    /// Whether any stream is quantized (and so has a window of `residual` tokens).
    pub const fn quantized(&self) -> bool {
        matches!(self.keys, Precision::Quant(_)) || matches!(self.values, Precision::Quant(_))
    }

    /// Tokens a sliding cache drops at a time: a key group for per-channel keys, else one.
    pub const fn slide_step(&self) -> usize {
        match self.keys {
            Precision::Quant(QuantSpec { axis: Axis::PerChannel, group, .. }) => group,
            _ => 1,
        }
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the setting: zero heads, head_dim or capacity; `sinks >= capacity`;
    /// a group size of 0 or above [`MAX_GROUP`], or whose codes do not fill whole `u32` words
    /// (`G * bits % 32 != 0`); a per-channel stream whose residual is not a positive multiple of `G`;
    /// per-token groups that do not divide `head_dim`; per-channel values; a clipping factor outside
    /// `(0, 1]` ([`Error::InvalidClip`]); a sliding cache too small to slide
    /// (`capacity < sinks + residual + slide_step`).
    pub const fn validate(&self) -> Result<()> {
        if self.kv_heads == 0 {
            return Err(Error::InvalidConfig { what: "kv_heads", value: 0 });
        }
        if self.head_dim == 0 {
            return Err(Error::InvalidConfig { what: "head_dim", value: 0 });
        }
        if self.capacity == 0 || self.sinks >= self.capacity {
            return Err(Error::InvalidConfig { what: "capacity (must exceed sinks)", value: self.capacity });
        }
        if let Precision::Quant(QuantSpec { axis: Axis::PerChannel, .. }) = self.values {
            return Err(Error::InvalidConfig { what: "value axis (values are per-token)", value: 0 });
        }
        if let Err(e) = self.check_stream(&self.keys) {
            return Err(e);
        }
        if let Err(e) = self.check_stream(&self.values) {
            return Err(e);
        }
        if let Err(e) = self.check_transform() {
            return Err(e);
        }
        if let Err(e) = self.check_tiers() {
            return Err(e);
        }
        if matches!(self.overflow, Overflow::Slide) {
            let r = if self.quantized() { self.residual } else { 0 };
            if self.capacity < self.sinks + r + self.slide_step() {
                return Err(Error::InvalidConfig {
                    what: "capacity (a sliding cache needs sinks + residual + one slide step)",
                    value: self.capacity,
                });
            }
        }
        Ok(())
    }

    const fn check_tiers(&self) -> Result<()> {
        let Some(t) = self.tiers else {
            return Ok(());
        };
        let (Precision::Quant(k), Precision::Quant(_)) = (self.keys, self.values) else {
            return Err(Error::InvalidConfig { what: "tiers (keys and values must be quantized)", value: 0 });
        };
        if !matches!(k.axis, Axis::PerChannel) {
            return Err(Error::InvalidConfig { what: "tiers (keys must be per-channel groups)", value: 0 });
        }
        if t.keep == 0 || t.keep > k.group {
            return Err(Error::InvalidConfig {
                what: "tier keep (1 to G tokens per key group)",
                value: t.keep,
            });
        }
        if !matches!(t.width, Width::B2 | Width::B4 | Width::B8) {
            return Err(Error::InvalidConfig {
                what: "tier width (2, 4 or 8 bits)",
                value: t.width.bits() as usize,
            });
        }
        let d = self.head_dim;
        if d > MAX_HEAD_DIM || !(d * 2).is_multiple_of(32) {
            return Err(Error::InvalidConfig {
                what: "head_dim (tiers need a multiple of 16, at most 512)",
                value: d,
            });
        }
        Ok(())
    }

    const fn check_transform(&self) -> Result<()> {
        let t = self.transform;
        let pow2 = hadamard_len_ok(self.head_dim);
        if (t.rotate_keys || t.rotate_values) && !pow2 {
            return Err(Error::InvalidConfig {
                what: "head_dim (a Hadamard rotation needs a power of two)",
                value: self.head_dim,
            });
        }
        if (t.keys() || t.rotate_values) && self.head_dim > MAX_HEAD_DIM {
            return Err(Error::InvalidConfig {
                what: "head_dim (at most 512 with a transform)",
                value: self.head_dim,
            });
        }
        let quant_keys = matches!(self.keys, Precision::Quant(_));
        if t.rotate_values && !matches!(self.values, Precision::Quant(_)) {
            return Err(Error::InvalidConfig { what: "value rotation (values must be quantized)", value: 0 });
        }
        if t.keys() && !quant_keys {
            return Err(Error::InvalidConfig { what: "key transform (keys must be quantized)", value: 0 });
        }
        if t.rope.is_some() {
            if !matches!(self.keys, Precision::Quant(QuantSpec { axis: Axis::PerChannel, .. })) {
                return Err(Error::InvalidConfig {
                    what: "RoPE offsets (keys must be per-channel groups)",
                    value: 0,
                });
            }
            if !self.head_dim.is_multiple_of(2) {
                return Err(Error::InvalidConfig {
                    what: "head_dim (RoPE needs it even)",
                    value: self.head_dim,
                });
            }
            if let Some(r) = t.rope
                && !(r.base.is_finite() && r.base > 1.0)
            {
                return Err(Error::InvalidConfig { what: "RoPE base (finite, above 1)", value: 0 });
            }
        }
        Ok(())
    }

    const fn check_stream(&self, p: &Precision) -> Result<()> {
        let Precision::Quant(q) = *p else {
            return Ok(());
        };
        if !(q.clip > 0.0 && q.clip <= 1.0) {
            return Err(Error::InvalidClip { alpha: q.clip });
        }
        if q.codebook && q.width.levels() as usize > crate::quant::codebook::MAX_LEVELS {
            return Err(Error::InvalidConfig {
                what: "codebook width (at most 4 bits)",
                value: q.width.bits() as usize,
            });
        }
        if q.permuted && !matches!(q.axis, Axis::PerToken) {
            return Err(Error::InvalidConfig {
                what: "channel permutation (per-token groups only)",
                value: 0,
            });
        }
        if self.head_dim > MAX_HEAD_DIM && !q.plain() {
            return Err(Error::InvalidConfig {
                what: "head_dim (at most 512 for this format)",
                value: self.head_dim,
            });
        }
        if q.outliers > MAX_OUTLIER_SLOTS {
            return Err(Error::InvalidConfig { what: "outlier slots (at most 256)", value: q.outliers });
        }
        if q.outliers > 0 {
            // Slot indices are u16 (0xFFFF marks an empty slot): a key group's `G * head_dim` positions of
            // one head, or a token's `kv_heads * head_dim`.
            let (unit, what) = match q.axis {
                Axis::PerChannel => (q.group * self.head_dim, "outlier slots (at most G * head_dim)"),
                Axis::PerToken => {
                    (self.kv_heads * self.head_dim, "outlier slots (at most kv_heads * head_dim)")
                }
            };
            if unit >= u16::MAX as usize {
                return Err(Error::InvalidConfig { what: "outlier index space (u16)", value: unit });
            }
            if q.outliers > unit {
                return Err(Error::InvalidConfig { what, value: q.outliers });
            }
        }
        if q.group == 0 || q.group > MAX_GROUP {
            return Err(Error::InvalidConfig { what: "group size", value: q.group });
        }
        if !(q.group * q.width.bits() as usize).is_multiple_of(32) {
            return Err(Error::InvalidConfig {
                what: "group size (G * bits must fill u32 words)",
                value: q.group,
            });
        }
        match q.axis {
            Axis::PerChannel => {
                if !super::layout::KEY_BLOCK.is_multiple_of(q.group) {
                    return Err(Error::InvalidConfig {
                        what: "group size (per-channel groups must divide the 256-token key block)",
                        value: q.group,
                    });
                }
                if self.residual == 0 || !self.residual.is_multiple_of(q.group) {
                    return Err(Error::InvalidConfig {
                        what: "residual (per-channel keys need a positive multiple of G)",
                        value: self.residual,
                    });
                }
            }
            Axis::PerToken => {
                if !self.head_dim.is_multiple_of(q.group) {
                    return Err(Error::InvalidConfig {
                        what: "head_dim (per-token groups must divide it)",
                        value: self.head_dim,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_name_the_setting() {
        let ok = CacheConfig::kivi(Width::B2, 32, 128, 3, 64, 1024);
        assert_eq!(ok.validate(), Ok(()));
        let cases = [
            (CacheConfig { head_dim: 0, ..ok }, "head_dim"),
            (CacheConfig { kv_heads: 0, ..ok }, "kv_heads"),
            (CacheConfig { head_dim: 48, ..ok }, "head_dim (per-token groups must divide it)"),
            (
                CacheConfig { residual: 100, ..ok },
                "residual (per-channel keys need a positive multiple of G)",
            ),
            (CacheConfig { residual: 0, ..ok }, "residual (per-channel keys need a positive multiple of G)"),
            (CacheConfig::kivi(Width::B3, 16, 128, 3, 64, 1024), "group size (G * bits must fill u32 words)"),
            (CacheConfig::kivi(Width::B2, 512, 512, 3, 512, 1024), "group size"),
            (ok.with_sinks(1024), "capacity (must exceed sinks)"),
            (
                CacheConfig { capacity: 150, ..ok.with_overflow(Overflow::Slide) },
                "capacity (a sliding cache needs sinks + residual + one slide step)",
            ),
        ];
        for (cfg, what) in cases {
            match cfg.validate() {
                Err(Error::InvalidConfig { what: w, .. }) => assert_eq!(w, what),
                other => panic!("{cfg:?}: {other:?}"),
            }
        }
        let clipped = CacheConfig {
            keys: Precision::Quant(QuantSpec { clip: 0.0, ..QuantSpec::per_channel(Width::B2, 32) }),
            ..ok
        };
        assert_eq!(clipped.validate(), Err(Error::InvalidClip { alpha: 0.0 }));
    }
}
