//! One layer's attention inputs over a real text (`kvq dump-qkv`): the query, key and value of every
//! token as that layer's attention receives them (after RoPE), for the firmware demo, which streams
//! them through `kvq-core`'s caches on a Cortex-M4F, and for the test that replays them on the host.
//!
//! The file is little-endian: the magic `KVQD`, a version, then `tokens`, `layer`, `q_heads`, `kv_heads`,
//! `head_dim` and the RoPE pairing (0 adjacent, 1 halves) as `u32`, the RoPE base as `f32`, and per token
//! its query `[q_heads][head_dim]`, key and value `[kv_heads][head_dim]` as `f32`. Then the layer's
//! calibration tables for the calibrated presets the firmware runs: a `u32` count, and per preset its
//! name (a `u32` length, the bytes, zeros to a multiple of 4), its clipping factor (`f32`) and its table
//! blob (a `u32` word count, the words: `kvq_core::cache::blob`).

use crate::model::{Model, Session};
use anyhow::{Context, Result, bail, ensure};
use kvq_core::cache::CacheConfig;
use kvq_core::transform::{Pairing, Rope};

/// First bytes of a dump.
pub const MAGIC: &[u8; 4] = b"KVQD";
/// Version of the layout above.
pub const VERSION: u32 = 2;
/// Bytes before the first token.
pub const HEADER: usize = 36;
/// Tokens `kvq dump-qkv` runs by default (from the start of [`DEFAULT_TEXT`]).
pub const DEFAULT_TOKENS: usize = 512;
/// The layer it taps by default (a middle one of SmolLM2-135M's 30).
pub const DEFAULT_LAYER: usize = 15;
/// The text it reads by default.
pub const DEFAULT_TEXT: &str = "persuasion";
/// The calibrated presets whose tables a dump carries (the firmware's calibrated policies).
pub const TABLE_PRESETS: [&str; 3] = ["mikv2", "kvquant2", "skvq2"];
/// Most words of one preset's table blob a dump may hold (4 MiB).
const MAX_BLOB_WORDS: usize = 1 << 20;

/// One calibrated preset's tables for the dumped layer.
#[derive(Clone, Debug, PartialEq)]
pub struct PresetTables {
    /// The preset (`kvquant2`, `skvq2`).
    pub preset: String,
    /// Its clipping factor (1 where it does not clip).
    pub clip: f32,
    /// The blob `kvq_core::cache::blob::load_tables` reads.
    pub blob: Vec<u32>,
}

/// One layer's queries, keys and values over a text.
#[derive(Clone, Debug, PartialEq)]
pub struct Qkv {
    /// Layer index.
    pub layer: usize,
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// The model's RoPE.
    pub rope: Rope,
    /// `[tokens][q_heads][head_dim]`.
    pub q: Vec<f32>,
    /// `[tokens][kv_heads][head_dim]`.
    pub k: Vec<f32>,
    /// `[tokens][kv_heads][head_dim]`.
    pub v: Vec<f32>,
    /// Calibration tables of this layer, per preset.
    pub tables: Vec<PresetTables>,
}

/// Where a session taps one layer's attention inputs.
#[derive(Clone, Debug, Default)]
pub struct Tap {
    /// The layer tapped.
    pub layer: usize,
    /// Queries, keys and values as [`Qkv`] holds them.
    pub q: Vec<f32>,
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
}

impl Qkv {
    /// Tokens held.
    pub fn tokens(&self) -> usize {
        self.k.len() / (self.kv_heads * self.head_dim).max(1)
    }

    /// Runs `model` over `tokens` with an f16 cache and taps layer `layer`.
    ///
    /// # Errors
    /// A layer past the model's, no tokens, and the forward pass's errors.
    pub fn capture(model: &Model, tokens: &[u32], layer: usize) -> Result<Self> {
        let c = &model.cfg;
        ensure!(layer < c.n_layer, "layer {layer}: the model has {} layers", c.n_layer);
        ensure!(!tokens.is_empty(), "no tokens to run");
        let cfg = CacheConfig::fp16(c.n_kv_head, c.head_dim, tokens.len());
        let mut arenas = crate::model::arenas(model, &cfg)?;
        let mut s = Session::new(model, cfg, &mut arenas)?;
        s.tap = Some(Tap { layer, ..Tap::default() });
        s.feed(tokens)?;
        let tap = s.tap.take().context("tap lost")?;
        Ok(Self {
            layer,
            q_heads: c.n_head,
            kv_heads: c.n_kv_head,
            head_dim: c.head_dim,
            rope: model.layer_rope(layer),
            q: tap.q,
            k: tap.k,
            v: tap.v,
            tables: Vec::new(),
        })
    }

    /// Adds this layer's tables for each of `presets` from the model's calibration
    /// (`Model::use_calibration`), as the host's caches of those presets receive them.
    ///
    /// # Errors
    /// An unknown preset, a missing calibration, a table the core refuses.
    pub fn with_tables(mut self, model: &Model, presets: &[&str]) -> Result<Self> {
        use kvq_core::cache::blob::TableWriter;
        for &p in presets {
            let spec = crate::kvspec::KvSpec::parse(p)?;
            let cfg = model.cache_config(&spec, 1024, kvq_core::cache::Overflow::Stop)?;
            let calib = model.use_calibration(spec.calib.as_deref())?;
            let mut words = vec![0u32; MAX_BLOB_WORDS];
            let mut w = TableWriter::new(&mut words).map_err(|e| anyhow::anyhow!("{e}"))?;
            calib.apply_to(self.layer, &cfg, &mut w)?;
            let n = w.finish();
            words.truncate(n);
            let clip = cfg.key_spec().map_or(1.0, |q| q.clip);
            self.tables.push(PresetTables { preset: p.to_string(), clip, blob: words });
        }
        Ok(self)
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + 4 * (self.q.len() + self.k.len() + self.v.len()));
        b.extend_from_slice(MAGIC);
        let pairing = match self.rope.pairing {
            Pairing::Adjacent => 0u32,
            Pairing::Halves => 1,
        };
        for x in [VERSION, self.tokens() as u32, self.layer as u32, self.q_heads as u32].into_iter().chain([
            self.kv_heads as u32,
            self.head_dim as u32,
            pairing,
        ]) {
            b.extend_from_slice(&x.to_le_bytes());
        }
        b.extend_from_slice(&self.rope.base.to_le_bytes());
        let (qd, kd) = (self.q_heads * self.head_dim, self.kv_heads * self.head_dim);
        for t in 0..self.tokens() {
            for x in self.q[t * qd..(t + 1) * qd]
                .iter()
                .chain(&self.k[t * kd..(t + 1) * kd])
                .chain(&self.v[t * kd..(t + 1) * kd])
            {
                b.extend_from_slice(&x.to_le_bytes());
            }
        }
        b.extend_from_slice(&(self.tables.len() as u32).to_le_bytes());
        for t in &self.tables {
            b.extend_from_slice(&(t.preset.len() as u32).to_le_bytes());
            b.extend_from_slice(t.preset.as_bytes());
            b.resize(b.len().next_multiple_of(4), 0);
            b.extend_from_slice(&t.clip.to_le_bytes());
            b.extend_from_slice(&(t.blob.len() as u32).to_le_bytes());
            for w in &t.blob {
                b.extend_from_slice(&w.to_le_bytes());
            }
        }
        b
    }

    /// Parses a file's bytes.
    ///
    /// # Errors
    /// A wrong magic or version, a zero or oversized shape, a length that does not match the header,
    /// a non-finite value.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        ensure!(b.len() >= HEADER && &b[..4] == MAGIC, "not a kvq dump (no KVQD header)");
        let u = |i: usize| u32::from_le_bytes(b[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize;
        ensure!(u(0) == VERSION as usize, "dump version {} (this kvq reads {VERSION})", u(0));
        let (tokens, layer, qh, kvh, d) = (u(1), u(2), u(3), u(4), u(5));
        ensure!(
            (1..=1 << 20).contains(&tokens)
                && (1..=256).contains(&qh)
                && (1..=256).contains(&kvh)
                && (1..=1024).contains(&d),
            "dump shape out of range: {tokens} tokens, {qh} query heads, {kvh} KV heads, head_dim {d}"
        );
        ensure!(qh % kvh == 0, "{qh} query heads are not a multiple of {kvh} KV heads");
        let pairing = match u(6) {
            0 => Pairing::Adjacent,
            1 => Pairing::Halves,
            p => bail!("RoPE pairing {p} (expected 0 or 1)"),
        };
        let base = f32::from_le_bytes(b[32..36].try_into().unwrap());
        let per = (qh + 2 * kvh) * d;
        let rows = HEADER + 4 * tokens * per;
        ensure!(b.len() >= rows + 4, "dump holds {} bytes; its header says at least {}", b.len(), rows + 4);
        let tables = parse_tables(&b[rows..])?;
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (i, w) in b[HEADER..rows].chunks_exact(4).enumerate() {
            let x = f32::from_le_bytes(w.try_into().unwrap());
            ensure!(x.is_finite(), "value {i} of the dump is {x}");
            let o = i % per;
            if o < qh * d {
                q.push(x);
            } else if o < (qh + kvh) * d {
                k.push(x);
            } else {
                v.push(x);
            }
        }
        Ok(Self {
            layer,
            q_heads: qh,
            kv_heads: kvh,
            head_dim: d,
            rope: Rope { base, pairing },
            q,
            k,
            v,
            tables,
        })
    }
}

/// The tables section of a dump (everything after the token rows).
fn parse_tables(b: &[u8]) -> Result<Vec<PresetTables>> {
    let mut at = 0usize;
    let mut word = |what: &str| -> Result<u32> {
        let w = b.get(at..at + 4).with_context(|| format!("dump ends inside its tables ({what})"))?;
        at += 4;
        Ok(u32::from_le_bytes(w.try_into().unwrap()))
    };
    let n = word("count")? as usize;
    ensure!(n <= 16, "dump lists {n} table sets (at most 16)");
    let mut out = Vec::new();
    for _ in 0..n {
        let len = word("name length")? as usize;
        ensure!((1..=64).contains(&len), "dump table name of {len} bytes");
        let mut name = Vec::new();
        for _ in 0..len.div_ceil(4) {
            name.extend_from_slice(&word("name")?.to_le_bytes());
        }
        name.truncate(len);
        let preset = String::from_utf8(name).context("dump table name is not UTF-8")?;
        let clip = f32::from_bits(word("clip")?);
        ensure!(clip > 0.0 && clip <= 1.0, "dump tables of {preset}: clip factor {clip} outside (0, 1]");
        let words = word("blob length")? as usize;
        ensure!(words <= MAX_BLOB_WORDS, "dump tables of {preset}: {words} words (at most {MAX_BLOB_WORDS})");
        let blob = (0..words).map(|_| word("blob")).collect::<Result<Vec<u32>>>()?;
        out.push(PresetTables { preset, clip, blob });
    }
    ensure!(at == b.len(), "dump holds {} bytes after its tables", b.len() - at);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_files() {
        let d = Qkv {
            layer: 3,
            q_heads: 4,
            kv_heads: 2,
            head_dim: 8,
            rope: Rope { base: 10_000.0, pairing: Pairing::Halves },
            q: (0..3 * 32).map(|i| i as f32 * 0.5).collect(),
            k: (0..3 * 16).map(|i| -(i as f32)).collect(),
            v: (0..3 * 16).map(|i| i as f32 * 0.25).collect(),
            tables: vec![PresetTables { preset: "skvq2".into(), clip: 0.95, blob: vec![1, 2, 3] }],
        };
        let b = d.to_bytes();
        assert_eq!(b.len(), HEADER + 4 * 3 * (32 + 32) + 4 * (1 + 1 + 2 + 1 + 1 + 3));
        assert_eq!(Qkv::from_bytes(&b).unwrap(), d);
        for cut in 1..=28 {
            assert!(Qkv::from_bytes(&b[..b.len() - cut]).is_err(), "cut {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(Qkv::from_bytes(&long).unwrap_err().to_string().contains("after its tables"));
        assert!(Qkv::from_bytes(b"KVQX").is_err());
        let mut bad = b.clone();
        bad[4] = 9;
        assert!(Qkv::from_bytes(&bad).unwrap_err().to_string().contains("version"));
        let mut bad = b.clone();
        bad[HEADER..HEADER + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(Qkv::from_bytes(&bad).unwrap_err().to_string().contains("NaN"));
        let mut bad = b;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Qkv::from_bytes(&bad).unwrap_err().to_string().contains("out of range"));
    }
}
