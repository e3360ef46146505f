//! A layer cache's configuration: shape, capacity and one policy per stream, chosen at run time.

use super::window::Residual;
use crate::error::{Error, Result};
use crate::pack::Width;

/// Which axis a quantization group runs along.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Axis {
    /// `G` consecutive tokens of one channel (KIVI and KVQuant keys); the window flushes in blocks.
    PerChannel,
    /// `G` consecutive channels of one token (KIVI values, SKVQ keys and values); the window is a FIFO.
    PerToken,
}

/// Quantization of one stream: uniform min-max groups with f16 scale and zero point (methods.md §1.1).
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct QuantSpec {
    /// Code width.
    pub width: Width,
    /// Group size `G`.
    pub group: usize,
    /// Grouping axis.
    pub axis: Axis,
    /// Clipping factor in `(0, 1]` (SKVQ); 1 is plain min-max.
    pub clip: f32,
}

impl QuantSpec {
    /// KIVI keys: `width`-bit codes per channel in groups of `group` tokens.
    pub const fn per_channel(width: Width, group: usize) -> Self {
        Self { width, group, axis: Axis::PerChannel, clip: 1.0 }
    }

    /// KIVI values: `width`-bit codes per token in groups of `group` channels.
    pub const fn per_token(width: Width, group: usize) -> Self {
        Self { width, group, axis: Axis::PerToken, clip: 1.0 }
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
}

/// Largest group size the cache takes (KIVI and SKVQ use up to 128).
pub const MAX_GROUP: usize = 256;

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

    const fn check_stream(&self, p: &Precision) -> Result<()> {
        let Precision::Quant(q) = *p else {
            return Ok(());
        };
        if !(q.clip > 0.0 && q.clip <= 1.0) {
            return Err(Error::InvalidClip { alpha: q.clip });
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
