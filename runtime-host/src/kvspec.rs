//! The `--kv SPEC` grammar: a named preset, optionally followed by `:key=value` overrides.
//!
//! ```text
//! SPEC    := PRESET (":" KNOB)*
//! PRESET  := f16 | kivi2 | kivi4 | kivi8 | q | kvquant2 | kvquant3 | kvquant4 | skvq2 | mikv2 | kvq2 | kvq3
//! KNOB    := k=BITS | v=BITS            bits of keys / values: f16, 1, 2, 3, 4, 8, or t (ternary, values)
//!          | g=N | kg=N | vg=N           group size of both / keys / values (default 32)
//!          | r=N                         residual window R in tokens (default 128; a multiple of the key group)
//!          | s=N                         attention sinks kept in f16 (default 0)
//!          | clip=F | clip=calib         SKVQ clipping factor in (0, 1] (default 1), or calibrated per layer
//!          | p=FMT | kp=FMT | vp=FMT      group parameters: f16 or fp8 (E4M3)
//!          | rot=kv|k|v|none             Hadamard rotation of keys and/or values
//!          | rope=0|1                    keys quantized relative to their group's first position (pre-RoPE)
//!          | nuq=0|1 | knuq= | vnuq=     calibrated codebook levels (KVQuant nuqX) instead of the uniform grid
//!          | out=F | kout=F | vout=F     dense-and-sparse outliers, a fraction of the elements (0.01 = 1%)
//!          | center=0|1                  subtract calibrated per-channel key means
//!          | balance=0|1                 MiKV's calibrated query/key channel balancing
//!          | kaxis=token|channel         keys quantized per token (SKVQ) or per channel (default)
//!          | perm=0|1                    calibrated channel permutation with variable groups (per-token streams)
//!          | tier=N                      MiKV: per key group, the N most attended tokens get a correction (0: none)
//!          | tw=2|4|8                    bits of the promoted tokens' corrections (default 4)
//!          | calib=FILE                  the calibration file (default: the model's, from `kvq calibrate`)
//! ```
//!
//! Presets: `f16` = keys and values in f16 (the baseline); `kivi2` = KIVI 2-bit (keys per channel, values per
//! token, G=32, R=128); `kivi4`, `kivi8` the same at 4 and 8 bits; `q` is an alias of `kivi2`. Examples:
//! `kivi2:s=4` (KIVI-2 with four sinks), `kivi2:k=4` (4-bit keys, 2-bit values), `kivi4:g=64:r=256`,
//! `kivi2:s=4:rot=kv:p=fp8` (rotated, FP8 parameters).
//!
//! The method presets expand to knobs over `kivi2` ([`PRESET_KNOBS`]), so `kvq2:vg=32` is `kvq2` with
//! 32-channel value groups: `kvquant2..4` (keys before RoPE, codebooks, 1% outliers, one f16 sink),
//! `skvq2` (per-token 2-bit keys and ternary values, permuted and clipped, FP8 parameters, five sinks),
//! `mikv2` (MiKV: calibrated query/key balancing, FP8 parameters, and per 32-token key group the two most
//! attended tokens corrected at 4 bits), `kvq2`/`kvq3` (kvq's recipe: Hadamard-rotated keys and values,
//! keys relative to their group's first position, four sinks, 64-channel value groups; on models that norm
//! each head's keys, Gemma 3, the keys are left unrotated, see [`KvSpec::for_model`]; `kvq2` spends its
//! budget as 3-bit keys in 64-token groups with f16 parameters beside 2-bit values with FP8 parameters,
//! which measures better than 2-bit keys in 32-token groups at the same bits; FP8 key parameters, as
//! `kvq2` had until the morning of 2026-12-06 (`kvq2:kp=fp8:vp=f16` now), lose `kvq demo`'s fact, and
//! 128-token key groups with f16 value parameters (`kvq2:kg=128:vp=f16`, `kvq2` until that evening) lose a
//! pass key f16 finds; `kvq2:k=2:kg=32:kp=f16:vp=f16` is the all-2-bit recipe). Presets with codebooks, permutations, centres, balance, calibrated clipping or key outliers
//! read the model's calibration file (`kvq calibrate`).

use kvq_core::cache::{CacheConfig, Overflow, Precision, QuantSpec, Tiers, Transform};
use kvq_core::pack::Width;
use kvq_core::quant::param::ParamFormat;
use kvq_core::transform::Rope;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// A spec error for the spec `spec` as given (the binary names the flag).
fn spec_error(spec: &str, reason: String) -> Error {
    Error::Spec { spec: spec.into(), reason, local: false }
}

/// How one stream (keys or values) is quantized.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamSpec {
    /// Code width.
    pub width: Width,
    /// Group size.
    pub group: usize,
    /// Parameter format.
    pub params: ParamFormat,
    /// Calibrated codebook levels.
    pub codebook: bool,
    /// Outlier fraction of the elements (0: none).
    pub outliers: f32,
    /// Quantized per token (values always are; keys with `kaxis=token`, SKVQ's keys).
    pub per_token: bool,
    /// Calibrated channel permutation with variable groups (SKVQ; per-token streams only).
    pub permuted: bool,
}

impl StreamSpec {
    const fn new(width: Width) -> Self {
        Self {
            width,
            group: 32,
            params: ParamFormat::F16,
            codebook: false,
            outliers: 0.0,
            per_token: false,
            permuted: false,
        }
    }
}

/// A parsed spec: its canonical name and the per-layer configuration template (shape, capacity and the
/// model's RoPE are filled in by [`KvSpec::config`]).
#[derive(Clone, Debug, PartialEq)]
pub struct KvSpec {
    /// The text it was parsed from.
    pub name: String,
    /// Key stream (`None`: f16).
    pub keys: Option<StreamSpec>,
    /// Value stream (`None`: f16).
    pub values: Option<StreamSpec>,
    /// Residual window.
    pub residual: usize,
    /// Attention sinks.
    pub sinks: usize,
    /// Whether the spec sets its sinks (`s=`, its own or its preset's); where it does not, a cache that
    /// slides keeps a few by default (`generate` and `chat`).
    pub sinks_set: bool,
    /// Clipping factor.
    pub clip: f32,
    /// Clipping factors per layer from the calibration file (`clip=calib`, SKVQ).
    pub clip_calibrated: bool,
    /// Hadamard rotation of keys.
    pub rotate_keys: bool,
    /// Hadamard rotation of values.
    pub rotate_values: bool,
    /// Keys relative to their group's first position.
    pub rope: bool,
    /// Calibrated key centring.
    pub center: bool,
    /// MiKV's calibrated query/key channel balancing.
    pub balance: bool,
    /// Calibration file given with `calib=`.
    pub calib: Option<PathBuf>,
    /// MiKV's tiers: tokens promoted per key group (0: none).
    pub tier_keep: usize,
    /// Width of the promoted tokens' corrections.
    pub tier_width: Width,
}

/// The named presets, for help texts and `kvq info`.
pub const PRESETS: [&str; 11] =
    ["f16", "kivi2", "kivi4", "kivi8", "kvquant2", "kvquant3", "kvquant4", "skvq2", "mikv2", "kvq2", "kvq3"];

/// What each preset expands to (a base and its knobs), for `kvq info` and the docs.
pub const PRESET_KNOBS: [(&str, &str); 7] = [
    ("kvquant2", "kivi2:s=1:rope=1:nuq=1:out=0.01"),
    ("kvquant3", "kivi2:k=3:v=3:s=1:rope=1:nuq=1:out=0.01"),
    ("kvquant4", "kivi2:k=4:v=4:s=1:rope=1:nuq=1:out=0.01"),
    ("skvq2", "kivi2:kaxis=token:v=t:s=5:perm=1:clip=calib:p=fp8"),
    ("kvq2", "kivi2:k=3:kg=64:s=4:rot=kv:rope=1:vg=64:vp=fp8"),
    ("kvq3", "kivi2:k=3:v=3:s=4:rot=kv:rope=1:vg=64"),
    ("mikv2", "kivi2:s=4:balance=1:p=fp8:tier=2:tw=4"),
];

/// kvq's recipes on models whose keys pass through a per-head RMS norm before RoPE (Gemma 3): values
/// rotated, keys not. On Gemma 3 270M a Hadamard rotation of such keys costs more than it gains
/// (CTX 2048, Pride and Prejudice, one chunk: `kvq2` KLD 0.0117 against 0.0355 with rotated keys,
/// `kvq3` 0.0030 against 0.0130), where on SmolLM2 it is the recipe's strongest step. A `rot=` knob given
/// after the preset still wins.
pub const PRESET_KNOBS_KEY_NORM: [(&str, &str); 2] = [
    ("kvq2", "kivi2:k=3:kg=64:s=4:rot=v:rope=1:vg=64:vp=fp8"),
    ("kvq3", "kivi2:k=3:v=3:s=4:rot=v:rope=1:vg=64"),
];

fn width(s: &str) -> Result<Option<Width>, String> {
    Ok(Some(match s {
        "f16" | "16" => return Ok(None),
        "1" => Width::B1,
        "2" => Width::B2,
        "3" => Width::B3,
        "4" => Width::B4,
        "8" => Width::B8,
        "t" | "1.5" => Width::Ternary,
        _ => return Err(format!("bits {s:?}: expected f16, 1, 2, 3, 4, 8 or t (ternary)")),
    }))
}

fn params(s: &str) -> Result<ParamFormat, String> {
    match s {
        "f16" => Ok(ParamFormat::F16),
        "fp8" | "e4m3" => Ok(ParamFormat::Fp8E4M3),
        _ => Err(format!("parameter format {s:?}: expected f16 or fp8")),
    }
}

fn flag(s: &str) -> Result<bool, String> {
    match s {
        "1" | "on" | "yes" | "true" => Ok(true),
        "0" | "off" | "no" | "false" => Ok(false),
        _ => Err(format!("{s:?} is not 0 or 1")),
    }
}

fn kivi(w: Width) -> KvSpec {
    KvSpec {
        name: String::new(),
        keys: Some(StreamSpec::new(w)),
        values: Some(StreamSpec::new(w)),
        residual: 128,
        sinks: 0,
        sinks_set: false,
        clip: 1.0,
        clip_calibrated: false,
        rotate_keys: false,
        rotate_values: false,
        rope: false,
        center: false,
        balance: false,
        calib: None,
        tier_keep: 0,
        tier_width: Width::B4,
    }
}

impl KvSpec {
    /// Parses `s`.
    ///
    /// # Errors
    /// A message naming the part that does not parse, or a knob given twice (a preset's own knobs may be
    /// overridden once: `kvq2:vg=32`).
    pub fn parse(s: &str) -> Result<Self> {
        let mut seen: Vec<&str> = Vec::new();
        for key in s.split(':').skip(1).map(|k| k.split_once('=').map_or(k, |kv| kv.0)) {
            if seen.contains(&key) {
                return Err(spec_error(s, format!("{key} is given twice")));
            }
            seen.push(key);
        }
        Self::parse_expanded(s).map_err(|reason| spec_error(s, reason))
    }

    /// [`KvSpec::parse`] after the duplicate check: a preset that stands for knobs is expanded and the
    /// user's knobs after it override its own.
    fn parse_expanded(s: &str) -> Result<Self, String> {
        let preset = s.split(':').next().unwrap_or("");
        if let Some((_, knobs)) = PRESET_KNOBS.iter().find(|(n, k)| *n == preset && !k.starts_with('(')) {
            let rest = &s[preset.len()..];
            let mut spec = Self::parse_expanded(&format!("{knobs}{rest}"))?;
            spec.name = s.into();
            return Ok(spec);
        }
        let mut parts = s.split(':');
        parts.next();
        let mut spec = match preset {
            "f16" => KvSpec { keys: None, values: None, residual: 0, ..kivi(Width::B2) },
            "kivi2" | "q" => kivi(Width::B2),
            "kivi4" => kivi(Width::B4),
            "kivi8" => kivi(Width::B8),
            _ => {
                return Err(format!("unknown preset {preset:?} (presets: {})", PRESETS.join(", ")));
            }
        };
        spec.name = s.into();
        for knob in parts {
            let (k, v) = knob.split_once('=').ok_or_else(|| format!("{knob:?} is not key=value"))?;
            let bad = |e: String| format!("{k}: {e}");
            let num = || v.parse::<usize>().map_err(|_| format!("{k}={v:?} is not a whole number"));
            let frac = || {
                v.parse::<f32>()
                    .ok()
                    .filter(|f| (0.0..=0.5).contains(f))
                    .ok_or_else(|| format!("{k}={v:?} must be a fraction in [0, 0.5]"))
            };
            let stream = |cur: Option<StreamSpec>, w: Option<Width>| {
                w.map(|w| StreamSpec { width: w, ..cur.unwrap_or(StreamSpec::new(w)) })
            };
            let both = |spec: &mut KvSpec, f: &dyn Fn(&mut StreamSpec)| {
                spec.keys.iter_mut().chain(spec.values.iter_mut()).for_each(f);
            };
            match k {
                "k" => spec.keys = stream(spec.keys, width(v).map_err(bad)?),
                "v" => spec.values = stream(spec.values, width(v).map_err(bad)?),
                "g" => {
                    let g = num()?;
                    both(&mut spec, &|x| x.group = g);
                }
                "kg" => {
                    let g = num()?;
                    spec.keys.iter_mut().for_each(|x| x.group = g);
                }
                "vg" => {
                    let g = num()?;
                    spec.values.iter_mut().for_each(|x| x.group = g);
                }
                "p" => {
                    let p = params(v).map_err(bad)?;
                    both(&mut spec, &|x| x.params = p);
                }
                "kp" => {
                    let p = params(v).map_err(bad)?;
                    spec.keys.iter_mut().for_each(|x| x.params = p);
                }
                "vp" => {
                    let p = params(v).map_err(bad)?;
                    spec.values.iter_mut().for_each(|x| x.params = p);
                }
                "nuq" => {
                    let f = flag(v).map_err(bad)?;
                    both(&mut spec, &|x| x.codebook = f);
                }
                "knuq" => {
                    let f = flag(v).map_err(bad)?;
                    spec.keys.iter_mut().for_each(|x| x.codebook = f);
                }
                "vnuq" => {
                    let f = flag(v).map_err(bad)?;
                    spec.values.iter_mut().for_each(|x| x.codebook = f);
                }
                "out" => {
                    let f = frac()?;
                    both(&mut spec, &|x| x.outliers = f);
                }
                "kout" => {
                    let f = frac()?;
                    spec.keys.iter_mut().for_each(|x| x.outliers = f);
                }
                "vout" => {
                    let f = frac()?;
                    spec.values.iter_mut().for_each(|x| x.outliers = f);
                }
                "rot" => {
                    (spec.rotate_keys, spec.rotate_values) = match v {
                        "kv" | "vk" => (true, true),
                        "k" => (true, false),
                        "v" => (false, true),
                        "none" | "0" => (false, false),
                        _ => return Err(format!("rot={v:?}: expected kv, k, v or none")),
                    }
                }
                "rope" => spec.rope = flag(v).map_err(bad)?,
                "balance" => spec.balance = flag(v).map_err(bad)?,
                "kaxis" => {
                    let t = match v {
                        "token" => true,
                        "channel" => false,
                        _ => return Err(format!("kaxis={v:?}: expected token or channel")),
                    };
                    spec.keys.iter_mut().for_each(|x| x.per_token = t);
                }
                "perm" => {
                    let f = flag(v).map_err(bad)?;
                    both(&mut spec, &|x| x.permuted = f);
                }
                "center" => spec.center = flag(v).map_err(bad)?,
                "tier" => spec.tier_keep = num()?,
                "tw" => {
                    spec.tier_width = match v {
                        "2" => Width::B2,
                        "4" => Width::B4,
                        "8" => Width::B8,
                        _ => return Err(format!("tw={v:?}: expected 2, 4 or 8")),
                    }
                }
                "calib" => spec.calib = Some(PathBuf::from(v)),
                "r" => spec.residual = num()?,
                "s" => (spec.sinks, spec.sinks_set) = (num()?, true),
                "clip" if v == "calib" => spec.clip_calibrated = true,
                "clip" => {
                    spec.clip = v
                        .parse::<f32>()
                        .ok()
                        .filter(|c| *c > 0.0 && *c <= 1.0)
                        .ok_or_else(|| format!("clip={v:?} must be a number in (0, 1]"))?;
                }
                _ => {
                    return Err(format!(
                        "unknown knob {k:?} (k, v, g, kg, vg, r, s, clip, p, kp, vp, rot, rope, nuq, knuq, vnuq, out, kout, vout, center, balance, kaxis, perm, tier, tw, calib)"
                    ));
                }
            }
        }
        if spec.keys.is_some() || spec.values.is_some() {
            if spec.residual == 0 && spec.keys.is_some() {
                return Err(
                    "quantized keys need a residual window r > 0 (a multiple of the group)".to_string()
                );
            }
        } else {
            spec.residual = 0;
        }
        Ok(spec)
    }

    /// The spec for a model whose keys are RMS-normed per head (`key_norm`): a `kvq2` or `kvq3` preset
    /// takes its [`PRESET_KNOBS_KEY_NORM`] expansion there, with the user's knobs after it; anything else
    /// is unchanged.
    ///
    /// # Errors
    /// A message if the re-expanded spec does not parse (it parsed with the default expansion, so only a
    /// knob that conflicts with the other expansion can fail).
    pub fn for_model(&self, key_norm: bool) -> Result<Self> {
        let preset = self.name.split(':').next().unwrap_or("");
        match PRESET_KNOBS_KEY_NORM.iter().find(|(n, _)| *n == preset) {
            Some((_, knobs)) if key_norm => {
                let mut spec = Self::parse_expanded(&format!("{knobs}{}", &self.name[preset.len()..]))
                    .map_err(|reason| spec_error(&self.name, reason))?;
                spec.name.clone_from(&self.name);
                Ok(spec)
            }
            _ => Ok(self.clone()),
        }
    }

    /// Whether the spec needs calibration tables (codebooks, centres, key outlier thresholds).
    pub fn needs_calibration(&self) -> bool {
        let cb = |s: &Option<StreamSpec>| s.is_some_and(|s| s.codebook);
        let perm = |s: &Option<StreamSpec>| s.is_some_and(|s| s.permuted);
        cb(&self.keys)
            || cb(&self.values)
            || perm(&self.keys)
            || perm(&self.values)
            || self.center
            || self.balance
            || self.clip_calibrated
            || self.keys.is_some_and(|k| k.outliers > 0.0 && !k.per_token)
    }

    /// One layer's cache configuration for `kv_heads` x `head_dim` and `capacity` tokens, with the model's
    /// RoPE `rope` (used when the spec stores keys relative to their group), checked.
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
        rope: Rope,
    ) -> Result<CacheConfig> {
        let prec = |s: Option<StreamSpec>, per_channel: bool| match s {
            None => Precision::F16,
            Some(s) => {
                let per_channel = per_channel && !s.per_token;
                let mut q = if per_channel {
                    QuantSpec::per_channel(s.width, s.group)
                } else {
                    QuantSpec::per_token(s.width, s.group)
                };
                q.clip = self.clip;
                q.params = s.params;
                q.codebook = s.codebook;
                q.permuted = s.permuted && !per_channel;
                let unit = if per_channel { s.group * head_dim } else { kv_heads * head_dim };
                q.outliers = (s.outliers * unit as f32).round() as usize;
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
            transform: Transform {
                rope: self.rope.then_some(rope),
                rotate_keys: self.rotate_keys,
                rotate_values: self.rotate_values,
                center_keys: self.center,
                balance_keys: self.balance,
            },
            tiers: (self.tier_keep > 0).then_some(Tiers { keep: self.tier_keep, width: self.tier_width }),
        };
        cfg.validate().map_err(|e| spec_error(&self.name, e.to_string()))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvq_core::cache::Axis;
    use kvq_core::transform::Pairing;

    const ROPE: Rope = Rope { base: 10_000.0, pairing: Pairing::Adjacent };

    fn cfg(s: &str, cap: usize, o: Overflow) -> CacheConfig {
        KvSpec::parse(s).unwrap().config(3, 64, cap, o, ROPE).unwrap()
    }

    #[test]
    fn presets_and_knobs() {
        assert_eq!(cfg("f16", 1024, Overflow::Stop), CacheConfig::fp16(3, 64, 1024));
        assert_eq!(cfg("kivi2", 1024, Overflow::Stop), CacheConfig::kivi(Width::B2, 32, 128, 3, 64, 1024));
        assert_eq!(
            cfg("kivi4:s=4:g=64:r=256", 4096, Overflow::Slide),
            CacheConfig::kivi(Width::B4, 64, 256, 3, 64, 4096).with_sinks(4).with_overflow(Overflow::Slide)
        );
        let c = cfg("kivi2:k=4", 1024, Overflow::Stop);
        assert!(matches!(
            c.keys,
            Precision::Quant(QuantSpec { width: Width::B4, axis: Axis::PerChannel, .. })
        ));
        assert!(matches!(
            c.values,
            Precision::Quant(QuantSpec { width: Width::B2, axis: Axis::PerToken, .. })
        ));
        assert_eq!(cfg("kivi2:k=f16", 1024, Overflow::Stop).keys, Precision::F16);
        let c = cfg("kivi2:s=4:rot=kv:rope=1:p=fp8:vout=0.01", 2048, Overflow::Stop);
        assert!(c.transform.rotate_keys && c.transform.rotate_values && c.transform.rope == Some(ROPE));
        let (k, v) = (c.key_spec().unwrap(), c.value_spec().unwrap());
        assert_eq!((k.params, v.params), (ParamFormat::Fp8E4M3, ParamFormat::Fp8E4M3));
        // 1% of a token's 3 x 64 values: 2 slots; keys have none.
        assert_eq!((k.outliers, v.outliers), (0, 2));
        let c = cfg("kivi2:kout=0.01:kp=fp8", 2048, Overflow::Stop);
        // 1% of a key group's 32 x 64 values of one head: 20 slots.
        assert_eq!(c.key_spec().unwrap().outliers, 20);
        assert_eq!(c.value_spec().unwrap().params, ParamFormat::F16);
        assert!(KvSpec::parse("kivi2:knuq=1").unwrap().needs_calibration());
        assert!(!KvSpec::parse("kivi2:rot=kv:rope=1").unwrap().needs_calibration());
    }

    /// On a model with per-head key norms `kvq2` and `kvq3` leave keys unrotated, the user's knobs still
    /// apply after the preset (a `rot=` among them wins), and other specs are untouched.
    #[test]
    fn kvq_recipes_follow_the_model() {
        let on = |s: &str, key_norm: bool| {
            KvSpec::parse(s)
                .unwrap()
                .for_model(key_norm)
                .unwrap()
                .config(1, 256, 4096, Overflow::Stop, ROPE)
                .unwrap()
        };
        for p in ["kvq2", "kvq3"] {
            let (plain, normed) = (on(p, false), on(p, true));
            assert!(plain.transform.rotate_keys && plain.transform.rotate_values);
            assert!(!normed.transform.rotate_keys && normed.transform.rotate_values);
            assert_eq!((normed.keys, normed.values, normed.sinks), (plain.keys, plain.values, plain.sinks));
            assert_eq!(normed.transform.rope, plain.transform.rope);
        }
        let c = on("kvq2:vg=32:s=2", true);
        assert!(!c.transform.rotate_keys);
        assert_eq!((c.value_spec().unwrap().group, c.sinks), (32, 2));
        assert!(on("kvq2:rot=kv", true).transform.rotate_keys);
        assert_eq!(KvSpec::parse("kvq2:rot=kv").unwrap().for_model(true).unwrap().name, "kvq2:rot=kv");
        assert_eq!(on("kivi2:rot=kv", true), on("kivi2:rot=kv", false));
        assert!(on("kivi2:rot=kv", true).transform.rotate_keys);
    }

    /// A spec sets its sinks with `s=`, its own or its preset's expansion's; the sliding default leaves
    /// those alone.
    #[test]
    fn sinks_set_by_the_spec_or_its_preset() {
        for (s, set) in
            [("kivi2", false), ("f16", false), ("kivi2:s=0", true), ("kvquant2", true), ("kvq2", true)]
        {
            assert_eq!(KvSpec::parse(s).unwrap().sinks_set, set, "{s}");
        }
    }

    #[test]
    fn method_presets_expand_to_their_knobs() {
        let c = cfg("kvq2", 8192, Overflow::Stop);
        assert_eq!(c.sinks, 4);
        assert!(c.transform.rotate_keys && c.transform.rotate_values && c.transform.rope == Some(ROPE));
        let (k, v) = (c.key_spec().unwrap(), c.value_spec().unwrap());
        assert_eq!((k.width, k.group, k.params), (Width::B3, 64, ParamFormat::F16));
        assert_eq!((v.width, v.group, v.params), (Width::B2, 64, ParamFormat::Fp8E4M3));
        // The formats `kvq2` had before, by their knobs: FP8 key parameters (until the morning of
        // 2026-12-06), then 128-token key groups with f16 value parameters (until that evening).
        let old = cfg("kvq2:kp=fp8:vp=f16", 8192, Overflow::Stop);
        let (k, v) = (old.key_spec().unwrap(), old.value_spec().unwrap());
        assert_eq!((k.group, k.params, v.params), (64, ParamFormat::Fp8E4M3, ParamFormat::F16));
        let g128 = cfg("kvq2:kg=128:vp=f16", 8192, Overflow::Stop);
        let (k, v) = (g128.key_spec().unwrap(), g128.value_spec().unwrap());
        assert_eq!((k.group, k.params, v.params), (128, ParamFormat::F16, ParamFormat::F16));
        // Knobs after a preset override it.
        assert_eq!(cfg("kvq2:vg=32:s=0", 8192, Overflow::Stop).value_spec().unwrap().group, 32);
        let k3 = cfg("kvq3", 8192, Overflow::Stop).key_spec().unwrap();
        assert_eq!(k3.width, Width::B3);
        let s = KvSpec::parse("skvq2").unwrap();
        assert!(s.needs_calibration() && s.clip_calibrated);
        let c = s.config(3, 64, 8192, Overflow::Slide, ROPE).unwrap();
        let (k, v) = (c.key_spec().unwrap(), c.value_spec().unwrap());
        assert_eq!((k.axis, k.permuted, k.params), (Axis::PerToken, true, ParamFormat::Fp8E4M3));
        assert_eq!((v.width, v.permuted, c.sinks), (Width::Ternary, true, 5));
        let q = KvSpec::parse("kvquant3").unwrap();
        assert!(q.needs_calibration());
        let c = q.config(3, 64, 8192, Overflow::Stop, ROPE).unwrap();
        let k = c.key_spec().unwrap();
        assert!(k.codebook && k.outliers == 20 && c.transform.rope.is_some() && !c.transform.rotate_keys);
        assert!(!KvSpec::parse("kvq2").unwrap().needs_calibration());
        let m = KvSpec::parse("mikv2").unwrap();
        assert!(m.needs_calibration());
        let c = m.config(3, 64, 8192, Overflow::Stop, ROPE).unwrap();
        assert_eq!(c.tiers, Some(Tiers { keep: 2, width: Width::B4 }));
        assert!(c.transform.balance_keys && c.key_spec().unwrap().params == ParamFormat::Fp8E4M3);
        assert_eq!(cfg("mikv2:tier=0", 8192, Overflow::Stop).tiers, None);
        assert!(KvSpec::parse("mikv2:tw=3").unwrap_err().to_string().contains("expected 2, 4 or 8"));
        // A knob given twice is refused; overriding a preset's own knob once is not.
        assert!(KvSpec::parse("kivi2:s=4:s=8").unwrap_err().to_string().contains("s is given twice"));
        assert!(KvSpec::parse("kvq2:vg=32:vg=16").unwrap_err().to_string().contains("vg is given twice"));
        let o = KvSpec::parse("kvq2:vg=32").unwrap();
        assert_eq!(o.values.unwrap().group, 32);
        // Tiers need per-channel keys: the core's refusal names it.
        let e = KvSpec::parse("kivi2:kaxis=token:tier=2").unwrap().config(3, 64, 1024, Overflow::Stop, ROPE);
        assert!(e.unwrap_err().to_string().contains("per-channel"));
    }

    #[test]
    fn errors_name_the_part() {
        assert!(KvSpec::parse("kivi3").unwrap_err().to_string().contains("unknown preset"));
        assert!(KvSpec::parse("kivi2:x=1").unwrap_err().to_string().contains("unknown knob"));
        assert!(KvSpec::parse("kivi2:r=abc").unwrap_err().to_string().contains("whole number"));
        assert!(KvSpec::parse("kivi2:clip=2").unwrap_err().to_string().contains("(0, 1]"));
        assert!(KvSpec::parse("kivi2:k=5").unwrap_err().to_string().contains("bits"));
        assert!(KvSpec::parse("kivi2:p=bf16").unwrap_err().to_string().contains("f16 or fp8"));
        assert!(KvSpec::parse("kivi2:rot=q").unwrap_err().to_string().contains("expected kv"));
        assert!(KvSpec::parse("kivi2:out=2").unwrap_err().to_string().contains("fraction"));
        // A group that does not divide head_dim is the core's refusal.
        let s = KvSpec::parse("kivi2:g=48").unwrap();
        assert!(s.config(3, 64, 1024, Overflow::Stop, ROPE).is_err());
        // A rotation needs a power-of-two head_dim.
        let s = KvSpec::parse("kivi2:rot=kv:g=16").unwrap();
        assert!(
            s.config(3, 48, 1024, Overflow::Stop, ROPE).unwrap_err().to_string().contains("power of two")
        );
    }
}
