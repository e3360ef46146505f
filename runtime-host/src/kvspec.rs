//! The `--kv SPEC` grammar: a named preset, optionally followed by `:key=value` overrides.
//!
//! ```text
//! SPEC    := PRESET (":" KNOB)*
//! PRESET  := f16 | kivi2 | kivi4 | kivi8 | q
//! KNOB    := k=BITS | v=BITS            bits of keys / values: f16, 2, 4, 8 (3 and 1 are stored but have no
//!                                        vector kernel yet)
//!          | g=N | kg=N | vg=N           group size of both / keys / values (default 32)
//!          | r=N                         residual window R in tokens (default 128; a multiple of the key group)
//!          | s=N                         attention sinks kept in f16 (default 0)
//!          | clip=F                      SKVQ clipping factor in (0, 1] (default 1)
//! ```
//!
//! Presets: `f16` = keys and values in f16 (the baseline); `kivi2` = KIVI 2-bit (keys per channel, values per
//! token, G=32, R=128); `kivi4`, `kivi8` the same at 4 and 8 bits. Examples: `kivi2:s=4` (KIVI-2 with four
//! sinks), `kivi2:k=4` (4-bit keys, 2-bit values), `kivi4:g=64:r=256`.

use kvq_core::cache::{CacheConfig, Overflow, Precision, QuantSpec};
use kvq_core::pack::Width;

/// A parsed spec: its canonical name and the per-layer configuration template (shape and capacity are
/// filled in by [`KvSpec::config`]).
#[derive(Clone, Debug, PartialEq)]
pub struct KvSpec {
    /// The text it was parsed from.
    pub name: String,
    keys: Option<(Width, usize)>,
    values: Option<(Width, usize)>,
    residual: usize,
    sinks: usize,
    clip: f32,
}

/// The named presets, for help texts and `kvq info`.
pub const PRESETS: [&str; 4] = ["f16", "kivi2", "kivi4", "kivi8"];

fn width(s: &str) -> Result<Option<Width>, String> {
    Ok(Some(match s {
        "f16" | "16" => return Ok(None),
        "1" => Width::B1,
        "2" => Width::B2,
        "3" => Width::B3,
        "4" => Width::B4,
        "8" => Width::B8,
        _ => return Err(format!("bits {s:?}: expected f16, 1, 2, 3, 4 or 8")),
    }))
}

impl KvSpec {
    /// Parses `s`.
    ///
    /// # Errors
    /// A message naming the part that does not parse.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        let preset = parts.next().unwrap_or("");
        let q = |w| Some((w, 32));
        let mut spec = match preset {
            "f16" => Self { name: s.into(), keys: None, values: None, residual: 0, sinks: 0, clip: 1.0 },
            "kivi2" | "q" => Self {
                name: s.into(),
                keys: q(Width::B2),
                values: q(Width::B2),
                residual: 128,
                sinks: 0,
                clip: 1.0,
            },
            "kivi4" => Self {
                name: s.into(),
                keys: q(Width::B4),
                values: q(Width::B4),
                residual: 128,
                sinks: 0,
                clip: 1.0,
            },
            "kivi8" => Self {
                name: s.into(),
                keys: q(Width::B8),
                values: q(Width::B8),
                residual: 128,
                sinks: 0,
                clip: 1.0,
            },
            _ => {
                return Err(format!(
                    "--kv {s:?}: unknown preset {preset:?} (presets: {})",
                    PRESETS.join(", ")
                ));
            }
        };
        for knob in parts {
            let (k, v) =
                knob.split_once('=').ok_or_else(|| format!("--kv {s:?}: {knob:?} is not key=value"))?;
            let num =
                || v.parse::<usize>().map_err(|_| format!("--kv {s:?}: {k}={v:?} is not a whole number"));
            let bad = |e: String| format!("--kv {s:?}: {e}");
            match k {
                "k" => spec.keys = width(v).map_err(bad)?.map(|w| (w, spec.keys.map_or(32, |k| k.1))),
                "v" => spec.values = width(v).map_err(bad)?.map(|w| (w, spec.values.map_or(32, |k| k.1))),
                "g" => {
                    let g = num()?;
                    spec.keys = spec.keys.map(|(w, _)| (w, g));
                    spec.values = spec.values.map(|(w, _)| (w, g));
                }
                "kg" => {
                    let g = num()?;
                    spec.keys = spec.keys.map(|(w, _)| (w, g));
                }
                "vg" => {
                    let g = num()?;
                    spec.values = spec.values.map(|(w, _)| (w, g));
                }
                "r" => spec.residual = num()?,
                "s" => spec.sinks = num()?,
                "clip" => {
                    spec.clip = v
                        .parse::<f32>()
                        .ok()
                        .filter(|c| *c > 0.0 && *c <= 1.0)
                        .ok_or_else(|| format!("--kv {s:?}: clip={v:?} must be a number in (0, 1]"))?;
                }
                _ => return Err(format!("--kv {s:?}: unknown knob {k:?} (k, v, g, kg, vg, r, s, clip)")),
            }
        }
        if spec.keys.is_some() || spec.values.is_some() {
            if spec.residual == 0 && spec.keys.is_some() {
                return Err(format!(
                    "--kv {s:?}: quantized keys need a residual window r > 0 (a multiple of the group)"
                ));
            }
        } else {
            spec.residual = 0;
        }
        Ok(spec)
    }

    /// One layer's cache configuration for `kv_heads` x `head_dim` and `capacity` tokens, checked.
    ///
    /// # Errors
    /// The core's reason when the combination does not fit (for example a group that does not divide
    /// `head_dim`).
    pub fn config(
        &self,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        overflow: Overflow,
    ) -> Result<CacheConfig, String> {
        let prec = |s: Option<(Width, usize)>, per_channel: bool| match s {
            None => Precision::F16,
            Some((w, g)) => {
                let mut q =
                    if per_channel { QuantSpec::per_channel(w, g) } else { QuantSpec::per_token(w, g) };
                q.clip = self.clip;
                Precision::Quant(q)
            }
        };
        let cfg = CacheConfig {
            kv_heads,
            head_dim,
            capacity,
            keys: prec(self.keys, true),
            values: prec(self.values, false),
            residual: self.residual,
            sinks: self.sinks,
            overflow,
        };
        cfg.validate().map_err(|e| format!("--kv {:?}: {e}", self.name))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvq_core::cache::Axis;

    #[test]
    fn presets_and_knobs() {
        let c = KvSpec::parse("f16").unwrap().config(3, 64, 1024, Overflow::Stop).unwrap();
        assert_eq!(c, CacheConfig::fp16(3, 64, 1024));
        let c = KvSpec::parse("kivi2").unwrap().config(3, 64, 1024, Overflow::Stop).unwrap();
        assert_eq!(c, CacheConfig::kivi(Width::B2, 32, 128, 3, 64, 1024));
        let c = KvSpec::parse("kivi4:s=4:g=64:r=256").unwrap().config(3, 64, 4096, Overflow::Slide).unwrap();
        assert_eq!(
            c,
            CacheConfig::kivi(Width::B4, 64, 256, 3, 64, 4096).with_sinks(4).with_overflow(Overflow::Slide)
        );
        let c = KvSpec::parse("kivi2:k=4").unwrap().config(3, 64, 1024, Overflow::Stop).unwrap();
        assert!(matches!(
            c.keys,
            Precision::Quant(QuantSpec { width: Width::B4, axis: Axis::PerChannel, .. })
        ));
        assert!(matches!(
            c.values,
            Precision::Quant(QuantSpec { width: Width::B2, axis: Axis::PerToken, .. })
        ));
        let c = KvSpec::parse("kivi2:k=f16").unwrap().config(3, 64, 1024, Overflow::Stop).unwrap();
        assert_eq!(c.keys, Precision::F16);
    }

    #[test]
    fn errors_name_the_part() {
        assert!(KvSpec::parse("kivi3").unwrap_err().contains("unknown preset"));
        assert!(KvSpec::parse("kivi2:x=1").unwrap_err().contains("unknown knob"));
        assert!(KvSpec::parse("kivi2:r=abc").unwrap_err().contains("whole number"));
        assert!(KvSpec::parse("kivi2:clip=2").unwrap_err().contains("(0, 1]"));
        assert!(KvSpec::parse("kivi2:k=5").unwrap_err().contains("bits"));
        // A group that does not divide head_dim is the core's refusal.
        let s = KvSpec::parse("kivi2:g=48").unwrap();
        assert!(s.config(3, 64, 1024, Overflow::Stop).is_err());
    }
}
