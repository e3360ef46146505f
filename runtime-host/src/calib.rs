//! Calibration: the tables the calibrated cache formats read (`kvq calibrate`), measured on a model's own
//! keys, values and queries over a calibration text, and applied to every layer's cache.
//!
//! What is measured, per layer, KV head and channel, in the basis each format stores (the cache's own
//! [`Cache::stored_basis`], so the tables match what the cache quantizes):
//!
//! - key bases `none` (as handed in), `rope` (relative to the key group's first position: KVQuant's keys
//!   before RoPE), `rot` (Hadamard) and `rope+rot`; value bases `none` and `rot`;
//! - per key channel: the mean (centring), the 0.5% and 99.5% quantiles (KVQuant's outlier thresholds,
//!   1% of the elements in all) and the range;
//! - codebooks of 4, 8 and 16 levels (nuq2, nuq3, nuq4) by 1-D k-means over the values as the cache
//!   normalizes them (each group's range mapped onto `[-1, 1]`, outliers left out), per key channel and
//!   per value head, with Q-Norm's corrected decode table;
//! - SKVQ's channel permutation (clustering of the channels' ranges into `head_dim / 32` groups) for
//!   per-token keys and values, and one clipping factor for the model (the one whose 2-bit per-token key
//!   and ternary value reconstruction error over the calibration text is least);
//! - MiKV's balance factors `sqrt(max |q_c| / max |k_c|)` over the query heads of each KV head.
//!
//! With [`Weighting::Fisher`] (the default of `kvq calibrate`) the k-means weighs each element by its Fisher
//! information, as KVQuant does: the squared gradient of the loss with respect to it, from a backward pass
//! through the whole model ([`crate::grad`]), times its group's half-range squared (the paper's objective
//! `sum F (A - Q(A))^2` written over normalized values). [`Weighting::Uniform`] weighs every element alike.
//!
//! The file is JSON, versioned, and names the model's sha256; a preset that needs tables finds it in
//! `$KVQ_CACHE/calib/<sha256>.json` (or `calib=FILE`).

use crate::model::{Model, Session};
use anyhow::{Context, Result, bail, ensure};
use kvq_core::cache::blob::TableSink;
use kvq_core::cache::{Axis, Cache, CacheConfig, QuantSpec, Stream, Transform};
use kvq_core::pack::Width;
use kvq_core::quant::codebook::{Codebook, WeightedPoint, kmeans_1d};
use kvq_core::quant::param::ParamFormat;
use kvq_core::quant::reorder::{ClusterBuffers, cluster_channels};
use kvq_core::quant::uniform::UniformSpec;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The file format's version; a file of another version is refused.
pub const VERSION: u32 = 1;
/// Key group (tokens) and value/permutation group (channels) the statistics are gathered with.
pub const GROUP: usize = 32;
/// Fraction of key elements beyond the thresholds (KVQuant's 1%).
pub const OUTLIER_FRACTION: f64 = 0.01;
/// How the codebooks' k-means weighs the calibration elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    /// Every element alike (keys and values from the runtime's own forward pass).
    #[default]
    Uniform,
    /// By Fisher information, `(dL/dx)^2`, from the backward pass of the `grad` module (keys and values from its
    /// f32 forward pass).
    Fisher,
}

impl Weighting {
    /// Its name in files and messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Uniform => "uniform",
            Self::Fisher => "fisher",
        }
    }
}

/// The clipping factors searched.
pub const CLIPS: [f32; 9] = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6];

/// Codebooks of one basis for 2, 3 and 4 bits: per unit, the encoding then the decoding levels.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Codebooks {
    /// `[units][4 + 4]`.
    pub b2: Vec<f32>,
    /// `[units][8 + 8]`.
    pub b3: Vec<f32>,
    /// `[units][16 + 16]`.
    pub b4: Vec<f32>,
}

impl Codebooks {
    /// The tables of `width` (`None` where a codebook is not calibrated for it).
    pub fn of(&self, width: Width) -> Option<&[f32]> {
        match width {
            Width::B2 => Some(&self.b2),
            Width::B3 => Some(&self.b3),
            Width::B4 => Some(&self.b4),
            _ => None,
        }
    }
}

/// One key basis's tables for one layer, `[kv_heads][head_dim]` unless noted.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct KeyTables {
    /// Per-channel means.
    pub mean: Vec<f32>,
    /// Lower and upper outlier thresholds.
    pub lower: Vec<f32>,
    /// See `lower`.
    pub upper: Vec<f32>,
    /// Per-channel codebooks (unit `head * head_dim + channel`).
    pub codebooks: Codebooks,
    /// Per-token permutation of each head, `[kv_heads][head_dim]`, and its group bounds,
    /// `[kv_heads][head_dim / GROUP + 1]`.
    pub perm: Vec<u16>,
    /// See `perm`.
    pub bounds: Vec<u16>,
}

/// One value basis's tables for one layer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ValueTables {
    /// Per-head codebooks.
    pub codebooks: Codebooks,
    /// As [`KeyTables::perm`].
    pub perm: Vec<u16>,
    /// As [`KeyTables::bounds`].
    pub bounds: Vec<u16>,
}

/// One layer's tables.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LayerTables {
    /// Key bases `none`, `rope`, `rot`, `rope+rot`, in that order.
    pub keys: Vec<KeyTables>,
    /// Value bases `none`, `rot`.
    pub values: Vec<ValueTables>,
    /// MiKV's balance factors, `[kv_heads][head_dim]`.
    pub balance: Vec<f32>,
    /// Reconstruction error of 2-bit per-token permuted keys plus ternary values at each of [`CLIPS`].
    pub clip_error: Vec<f64>,
}

/// A model's calibration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    /// [`VERSION`].
    pub version: u32,
    /// sha256 of the GGUF file calibrated.
    pub model_sha256: String,
    /// What it was calibrated on.
    pub text: String,
    /// Tokens seen.
    pub tokens: usize,
    /// How the codebooks were fitted (files written before weighting existed are uniform).
    #[serde(default)]
    pub weighting: Weighting,
    /// Shape: KV heads and head dimension.
    pub kv_heads: usize,
    /// See `kv_heads`.
    pub head_dim: usize,
    /// The clipping factor chosen for `clip=calib` (least error summed over layers).
    pub clip: f32,
    /// Per layer.
    pub layers: Vec<LayerTables>,
}

/// Index of a key basis in [`LayerTables::keys`].
pub fn key_basis(t: &Transform) -> usize {
    usize::from(t.rope.is_some()) + 2 * usize::from(t.rotate_keys)
}

/// The default path of `sha256`'s calibration file.
///
/// # Errors
/// No cache directory.
pub fn default_path(sha256: &str) -> Result<PathBuf> {
    Ok(crate::fetch::cache_dir()?.join("calib").join(format!("{sha256}.json")))
}

/// The calibration text `kvq calibrate` reads by default.
pub const DEFAULT_TEXT: &str = "emma";
/// Tokens it calibrates on by default.
pub const DEFAULT_TOKENS: usize = 16384;
/// Tokens per chunk by default.
pub const DEFAULT_CTX: usize = 2048;

impl Calibration {
    /// Writes the file at `path` (its directory made if needed), through a temporary file renamed into
    /// place, so that a reader never sees half a file.
    ///
    /// # Errors
    /// Creating the directory, writing or renaming the file.
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads and checks the file at `path` against `model`.
    ///
    /// # Errors
    /// Unreadable or malformed JSON, another version, another model, another shape.
    pub fn load(path: &Path, model: &Model) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: Self = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            c.version == VERSION,
            "{}: calibration version {} (this kvq reads {VERSION}); run kvq calibrate again",
            path.display(),
            c.version
        );
        let sha = model.sha256()?;
        ensure!(
            c.model_sha256 == sha,
            "{}: calibrated for the model with sha256 {}, not this one ({sha}); run kvq calibrate -m for this model",
            path.display(),
            c.model_sha256
        );
        let mc = &model.cfg;
        ensure!(
            c.kv_heads == mc.n_kv_head && c.head_dim == mc.head_dim && c.layers.len() == mc.n_layer,
            "{}: calibration shape does not match the model",
            path.display()
        );
        let (h, d) = (c.kv_heads, c.head_dim);
        for (li, l) in c.layers.iter().enumerate() {
            let ok = l.keys.len() == 4
                && l.values.len() == 2
                && l.balance.len() == h * d
                && l.keys.iter().all(|k| {
                    k.mean.len() == h * d
                        && k.lower.len() == h * d
                        && k.upper.len() == h * d
                        && books_ok(&k.codebooks, h * d)
                        && k.perm.len() == h * d
                        && k.bounds.len() == h * (d / GROUP + 1)
                })
                && l.values.iter().all(|v| {
                    books_ok(&v.codebooks, h)
                        && v.perm.len() == h * d
                        && v.bounds.len() == h * (d / GROUP + 1)
                });
            ensure!(ok, "{}: layer {li}'s tables have the wrong sizes", path.display());
        }
        Ok(c)
    }

    /// Sets the tables `cache` (layer `li`) reads: codebooks, centres, thresholds, permutations and
    /// balance factors, as its configuration asks.
    ///
    /// # Errors
    /// The core's refusal of a table (a codebook not increasing, a factor out of range), named.
    pub fn apply(&self, li: usize, cache: &mut Cache<'_>) -> Result<()> {
        let cfg = *cache.config();
        self.apply_to(li, &cfg, cache)
    }

    /// [`Calibration::apply`] for a cache of `cfg` that is not at hand: the same calls go to `sink` (for
    /// example a `TableWriter`, whose blob a device loads with `kvq_core::cache::blob::load_tables`).
    ///
    /// # Errors
    /// As [`Calibration::apply`].
    pub fn apply_to(&self, li: usize, cfg: &CacheConfig, cache: &mut impl TableSink) -> Result<()> {
        let cfg = *cfg;
        let l = &self.layers[li];
        let d = cfg.head_dim;
        let kb = &l.keys[key_basis(&cfg.transform)];
        let vb = &l.values[usize::from(cfg.transform.rotate_values)];
        let err = |e: kvq_core::Error| anyhow::anyhow!("layer {li}: calibration table refused: {e}");
        ensure!(
            !(cfg.transform.balance_keys && (cfg.transform.center_keys || cfg.transform.rotate_keys)),
            "balance=1 is calibrated without rotation or centring; it does not combine with rot or center"
        );
        for h in 0..cfg.kv_heads {
            let row = h * d..(h + 1) * d;
            let mean = &kb.mean[row.clone()];
            if cfg.transform.center_keys {
                cache.set_center(h, mean).map_err(err)?;
            }
            if cfg.transform.balance_keys {
                cache.set_balance(h, &l.balance[row.clone()]).map_err(err)?;
            }
            if let Some(q) = cfg.key_spec() {
                if q.axis == Axis::PerChannel && q.outliers > 0 {
                    // Thresholds are applied after centring.
                    let shift = |x: &[f32]| -> Vec<f32> {
                        x.iter()
                            .zip(mean)
                            .map(|(a, m)| if cfg.transform.center_keys { a - m } else { *a })
                            .collect()
                    };
                    cache
                        .set_thresholds(h, &shift(&kb.lower[row.clone()]), &shift(&kb.upper[row.clone()]))
                        .map_err(err)?;
                }
                stream_tables(cache, Stream::Keys, q, h, &kb.perm, &kb.bounds, &kb.codebooks, d, &err)?;
            }
            if let Some(q) = cfg.value_spec() {
                stream_tables(cache, Stream::Values, q, h, &vb.perm, &vb.bounds, &vb.codebooks, d, &err)?;
            }
        }
        Ok(())
    }
}

/// Sets head `h`'s permutation and codebooks of one stream, as its spec `q` asks: keys have a codebook per
/// channel (unit `h * d + c`), values one per head (unit `h`).
#[allow(clippy::too_many_arguments)]
fn stream_tables(
    cache: &mut impl TableSink,
    stream: Stream,
    q: QuantSpec,
    h: usize,
    perm: &[u16],
    bounds: &[u16],
    books: &Codebooks,
    d: usize,
    core: &dyn Fn(kvq_core::Error) -> anyhow::Error,
) -> Result<()> {
    let what = if stream == Stream::Keys { "key" } else { "value" };
    if q.permuted {
        let groups = d / q.group;
        ensure!(q.group == GROUP, "perm=1 is calibrated for groups of {GROUP} channels");
        let b = &bounds[h * (groups + 1)..][..groups + 1];
        cache.set_permutation(stream, h, &perm[h * d..][..d], b).map_err(core)?;
    }
    if q.codebook {
        let t =
            books.of(q.width).with_context(|| format!("{what} codebooks exist for 2, 3 and 4 bits only"))?;
        let n = q.width.levels() as usize;
        let units = if q.axis == Axis::PerChannel { h * d..(h + 1) * d } else { h..h + 1 };
        for u in units {
            let e = &t[u * 2 * n..][..2 * n];
            cache.set_levels(stream, u, &e[..n], &e[n..]).map_err(core)?;
        }
    }
    Ok(())
}

fn books_ok(b: &Codebooks, units: usize) -> bool {
    b.b2.len() == units * 8 && b.b3.len() == units * 16 && b.b4.len() == units * 32
}

/// Whether `cfg` reads calibration tables.
pub fn needs_tables(cfg: &CacheConfig) -> bool {
    let t = cfg.transform;
    let q = |s: Option<QuantSpec>, keys: bool| {
        s.is_some_and(|q| q.codebook || q.permuted || (keys && q.outliers > 0 && q.axis == Axis::PerChannel))
    };
    t.center_keys || t.balance_keys || q(cfg.key_spec(), true) || q(cfg.value_spec(), false)
}

/// What one layer saw: keys and values as handed to the cache (`[t][kv_heads][d]`), their positions, and
/// the largest query magnitude per query channel.
#[derive(Default)]
pub struct LayerCapture {
    /// Keys.
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
    /// Position of each row.
    pub pos: Vec<usize>,
    /// `max |q|` per `[n_head][d]`.
    pub qmax: Vec<f32>,
    /// The loss's gradient with respect to each key ([`Weighting::Fisher`]; empty otherwise).
    pub gk: Vec<f32>,
    /// The same for values.
    pub gv: Vec<f32>,
}

/// Runs `model` over `tokens` in chunks of `ctx` and measures the tables, the codebooks weighted as
/// `weighting` says. `progress(done, total)` is called as tokens are fed and layers measured.
///
/// # Errors
/// The forward pass's errors; a text shorter than one chunk; too little memory for the backward pass.
pub fn calibrate(
    model: &Model,
    tokens: &[u32],
    ctx: usize,
    text: &str,
    weighting: Weighting,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Calibration> {
    let c = &model.cfg;
    let (h, d) = (c.n_kv_head, c.head_dim);
    ensure!(
        d.is_power_of_two() && d % GROUP == 0,
        "calibration needs a power-of-two head_dim divisible by {GROUP}"
    );
    ensure!(
        tokens.len() >= ctx && ctx >= GROUP,
        "the calibration text holds {} tokens, fewer than one chunk of {ctx}",
        tokens.len()
    );
    let chunks = tokens.len() / ctx;
    let total = chunks * ctx + c.n_layer;
    let cfg = CacheConfig::fp16(h, d, ctx);
    let mut arenas = crate::model::arenas(model, &cfg)?;
    let mut caps: Vec<LayerCapture> = Vec::new();
    if weighting == Weighting::Fisher {
        let dense = crate::grad::Dense::new(model)?;
        caps.resize_with(c.n_layer, Default::default);
        for ci in 0..chunks {
            let pass = dense.pass(&tokens[ci * ctx..(ci + 1) * ctx])?;
            for (cap, lg) in caps.iter_mut().zip(pass.layers) {
                cap.k.extend_from_slice(&lg.k);
                cap.v.extend_from_slice(&lg.v);
                cap.gk.extend_from_slice(&lg.gk);
                cap.gv.extend_from_slice(&lg.gv);
                cap.pos.extend(0..ctx);
                cap.qmax.resize(lg.qmax.len(), 0.0);
                cap.qmax.iter_mut().zip(&lg.qmax).for_each(|(a, b)| *a = a.max(*b));
            }
            progress((ci + 1) * ctx, total);
        }
    } else {
        let mut s = Session::new(model, cfg, &mut arenas)?;
        for ci in 0..chunks {
            s.reset();
            s.capture = Some(std::mem::take(&mut caps));
            for (j, part) in tokens[ci * ctx..(ci + 1) * ctx].chunks(crate::model::CHUNK).enumerate() {
                s.feed(part)?;
                progress(ci * ctx + (j + 1) * part.len().min(crate::model::CHUNK), total);
            }
            caps = s.capture.take().unwrap_or_default();
        }
    }
    let done = std::sync::atomic::AtomicUsize::new(0);
    let layers = caps
        .par_iter()
        .map(|cap| {
            let r = measure_layer(model, cap);
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(chunks * ctx + n, total);
            r
        })
        .collect::<Result<Vec<_>>>()?;
    let clip = (0..CLIPS.len())
        .min_by(|&a, &b| {
            let e = |i: usize| layers.iter().map(|l| l.clip_error[i]).sum::<f64>();
            e(a).total_cmp(&e(b))
        })
        .map_or(1.0, |i| CLIPS[i]);
    Ok(Calibration {
        version: VERSION,
        model_sha256: model.sha256()?,
        text: text.into(),
        tokens: chunks * ctx,
        weighting,
        kv_heads: h,
        head_dim: d,
        clip,
        layers,
    })
}

/// A cache whose [`Cache::stored_basis`] is the basis `transform` describes.
fn basis_cache<'a>(model: &Model, transform: Transform, arena: &'a mut Vec<u32>) -> Result<Cache<'a>> {
    let c = &model.cfg;
    let mut cfg = CacheConfig::kivi(Width::B2, GROUP, GROUP, c.n_kv_head, c.head_dim, GROUP);
    cfg.transform = transform;
    arena.resize(cfg.arena_bytes().div_ceil(4), 0);
    Cache::new(cfg, arena).map_err(|e| anyhow::anyhow!("calibration basis: {e}"))
}

/// Rows of `x` (`[t][kv_heads][d]`) of head `h` turned into the stored basis, `[t][d]`.
fn to_basis(cache: &Cache<'_>, stream: Stream, x: &[f32], pos: &[usize], h: usize) -> Result<Vec<f32>> {
    let cfg = cache.config();
    let (heads, d) = (cfg.kv_heads, cfg.head_dim);
    let mut out = Vec::with_capacity(pos.len() * d);
    for (t, &p) in pos.iter().enumerate() {
        let mut row = x[(t * heads + h) * d..][..d].to_vec();
        cache.stored_basis(stream, h, p % GROUP, &mut row).map_err(|e| anyhow::anyhow!("{e}"))?;
        out.extend_from_slice(&row);
    }
    Ok(out)
}

/// The `q`-quantile of `xs` (sorted in place).
fn quantile(xs: &mut [f32], q: f64) -> f32 {
    xs.sort_unstable_by(f32::total_cmp);
    let i = ((xs.len() - 1) as f64 * q).round() as usize;
    xs[i]
}

/// A codebook of `width` fitted by k-means to `points` (normalized to `[-1, 1]`; weighted where `weights`
/// is not empty), with Q-Norm: the encoding then the decoding levels.
fn fit_codebook(points: &[f32], weights: &[f32], width: Width) -> Result<Vec<f32>> {
    let n = width.levels() as usize;
    let mut centroids = vec![0.0f32; n];
    let mut pts: Vec<WeightedPoint> = points
        .iter()
        .enumerate()
        .map(|(i, &value)| WeightedPoint { value, weight: weights.get(i).copied().unwrap_or(1.0) })
        .collect();
    if pts.is_empty() {
        pts.push(WeightedPoint { value: 0.0, weight: 1.0 });
    }
    kmeans_1d(&mut pts, &mut centroids, 50).map_err(|e| anyhow::anyhow!("k-means: {e}"))?;
    // Distinct, increasing levels within [-1, 1] (k-means on few distinct points can repeat a centre).
    centroids.sort_unstable_by(f32::total_cmp);
    for i in 0..n {
        let lo = if i == 0 { -1.0 } else { centroids[i - 1] + 1e-3 };
        centroids[i] = centroids[i].clamp(-1.0, 1.0).max(lo);
    }
    if centroids[n - 1] > 1.0 {
        // squeezed at the top: spread evenly instead
        centroids = (0..n).map(|i| -1.0 + 2.0 * i as f32 / (n - 1) as f32).collect();
    }
    let cb = Codebook::new(width, &centroids).map_err(|e| anyhow::anyhow!("codebook: {e}"))?;
    let data: Vec<f32> = points.to_vec();
    let qn = if data.is_empty() {
        cb
    } else {
        cb.with_qnorm(&data).map_err(|e| anyhow::anyhow!("Q-Norm: {e}"))?
    };
    let mut out = centroids.clone();
    out.extend(qn.recon()[..n].iter().map(|r| r.clamp(-4.0, 4.0)));
    Ok(out)
}

/// One codebook's calibration points: normalized values and, for Fisher weighting, their weights.
#[derive(Default)]
struct Unit {
    points: Vec<f32>,
    weights: Vec<f32>,
}

impl Unit {
    /// Adds the normalized values of a group `xs` with its outliers (outside `[lo_t, hi_t]`) left out, as the
    /// cache normalizes codebook groups. With gradients `gs` (one per element of `xs`), each point weighs
    /// `(g * half)^2`: its Fisher information in the normalized units the k-means works in.
    fn add(&mut self, xs: &[f32], gs: Option<&[f32]>, lo_t: f32, hi_t: f32) {
        let keep = |x: f32| x >= lo_t && x <= hi_t;
        let kept = || xs.iter().copied().filter(|&x| keep(x));
        let (lo, hi) = kept().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
        if lo >= hi {
            return;
        }
        let (mid, half) = ((lo + hi) / 2.0, (hi - lo) / 2.0);
        self.points.extend(kept().map(|x| ((x - mid) / half).clamp(-1.0, 1.0)));
        if let Some(gs) = gs {
            let w = xs.iter().zip(gs).filter(|(x, _)| keep(**x)).map(|(_, g)| (g * half) * (g * half));
            self.weights.extend(w);
        }
    }
}

fn codebooks(units: &[Unit]) -> Result<Codebooks> {
    let fit = |w: Width| -> Result<Vec<f32>> {
        Ok(units
            .par_iter()
            .map(|u| fit_codebook(&u.points, &u.weights, w))
            .collect::<Result<Vec<_>>>()?
            .concat())
    };
    Ok(Codebooks { b2: fit(Width::B2)?, b3: fit(Width::B3)?, b4: fit(Width::B4)? })
}

/// SKVQ's permutation of each head's channels, from their ranges over `rows` (`[t][d]` per head).
fn permutation(rows: &[Vec<f32>], d: usize) -> Result<(Vec<u16>, Vec<u16>)> {
    let groups = d / GROUP;
    let (mut perm, mut bounds) = (Vec::new(), Vec::new());
    for x in rows {
        let t = x.len() / d;
        let mins: Vec<f32> =
            (0..d).map(|c| (0..t).map(|u| x[u * d + c]).fold(f32::INFINITY, f32::min)).collect();
        let maxs: Vec<f32> =
            (0..d).map(|c| (0..t).map(|u| x[u * d + c]).fold(f32::NEG_INFINITY, f32::max)).collect();
        let (mut p, mut inv, mut b, mut labels, mut scratch) =
            (vec![0u16; d], vec![0u16; d], vec![0u16; groups + 1], vec![0u16; d], vec![0.0f32; 2 * groups]);
        let buf = ClusterBuffers {
            perm: &mut p,
            inv: &mut inv,
            bounds: &mut b,
            labels: &mut labels,
            scratch: &mut scratch,
        };
        let used = cluster_channels(&mins, &maxs, groups, 30, buf)
            .map_err(|e| anyhow::anyhow!("clustering: {e}"))?;
        // Fewer non-empty clusters than groups: the rest are empty groups at the end.
        b[used + 1..=groups].fill(d as u16);
        perm.extend_from_slice(&p);
        bounds.extend_from_slice(&b);
    }
    Ok((perm, bounds))
}

/// Squared reconstruction error of per-token groups (permuted by `perm`/`bounds`) of `rows` at `width`,
/// FP8 parameters and clip `alpha`.
fn clip_error(rows: &[f32], d: usize, perm: &[u16], bounds: &[u16], width: Width, alpha: f32) -> f64 {
    let spec = UniformSpec::new(width).with_clip(alpha).with_params(ParamFormat::Fp8E4M3);
    let mut e = 0.0f64;
    let mut g = vec![0.0f32; d];
    for row in rows.chunks_exact(d) {
        for (i, &p) in perm.iter().enumerate() {
            g[i] = row[usize::from(p)];
        }
        for w in bounds.windows(2) {
            let xs = &g[usize::from(w[0])..usize::from(w[1])];
            if xs.is_empty() {
                continue;
            }
            let (lo, hi) =
                xs.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            let Ok(p) = spec.fit(lo, hi) else { return f64::INFINITY };
            for &x in xs {
                let y = p.decode(spec.encode(&p, x));
                e += f64::from(x - y) * f64::from(x - y);
            }
        }
    }
    e
}

fn measure_layer(model: &Model, cap: &LayerCapture) -> Result<LayerTables> {
    let c = &model.cfg;
    let (heads, d) = (c.n_kv_head, c.head_dim);
    if cap.pos.is_empty() {
        bail!("calibration saw no tokens");
    }
    let rope = Some(model.rope());
    let t0 = Transform::NONE;
    let key_transforms = [
        t0,
        Transform { rope, ..t0 },
        Transform { rotate_keys: true, ..t0 },
        Transform { rope, rotate_keys: true, ..t0 },
    ];
    let mut keys = Vec::new();
    let mut arena = Vec::new();
    for tr in key_transforms {
        let cache = basis_cache(model, tr, &mut arena)?;
        let rows: Vec<Vec<f32>> =
            (0..heads).map(|h| to_basis(&cache, Stream::Keys, &cap.k, &cap.pos, h)).collect::<Result<_>>()?;
        // The gradient in the stored basis: every basis is an orthogonal change of the handed keys, so the
        // gradient changes with it.
        let grads: Vec<Vec<f32>> = if cap.gk.is_empty() {
            Vec::new()
        } else {
            (0..heads).map(|h| to_basis(&cache, Stream::Keys, &cap.gk, &cap.pos, h)).collect::<Result<_>>()?
        };
        let t = cap.pos.len();
        let (mut mean, mut lower, mut upper) =
            (vec![0.0f32; heads * d], vec![0.0f32; heads * d], vec![0.0f32; heads * d]);
        let mut units: Vec<Unit> = Vec::with_capacity(heads * d);
        for (h, x) in rows.iter().enumerate() {
            for ch in 0..d {
                let mut col: Vec<f32> = (0..t).map(|u| x[u * d + ch]).collect();
                let i = h * d + ch;
                mean[i] = (col.iter().map(|&a| f64::from(a)).sum::<f64>() / t as f64) as f32;
                lower[i] = quantile(&mut col, OUTLIER_FRACTION / 2.0);
                upper[i] = quantile(&mut col, 1.0 - OUTLIER_FRACTION / 2.0);
                // Groups of GROUP consecutive positions of one chunk, as the cache forms them.
                let mut unit = Unit::default();
                let mut start = 0;
                while start + GROUP <= t {
                    if cap.pos[start].is_multiple_of(GROUP)
                        && cap.pos[start + GROUP - 1] == cap.pos[start] + GROUP - 1
                    {
                        let xs: Vec<f32> = (start..start + GROUP).map(|u| x[u * d + ch]).collect();
                        let gs: Option<Vec<f32>> =
                            grads.get(h).map(|g| (start..start + GROUP).map(|u| g[u * d + ch]).collect());
                        unit.add(&xs, gs.as_deref(), lower[i], upper[i]);
                        start += GROUP;
                    } else {
                        start += 1;
                    }
                }
                units.push(unit);
            }
        }
        let codebooks = codebooks(&units)?;
        let (perm, bounds) = permutation(&rows, d)?;
        keys.push(KeyTables { mean, lower, upper, codebooks, perm, bounds });
    }
    let mut values = Vec::new();
    let mut raw_values = Vec::new();
    for tr in [t0, Transform { rotate_values: true, ..t0 }] {
        let cache = basis_cache(model, tr, &mut arena)?;
        let rows: Vec<Vec<f32>> = (0..heads)
            .map(|h| to_basis(&cache, Stream::Values, &cap.v, &cap.pos, h))
            .collect::<Result<_>>()?;
        let grads: Vec<Vec<f32>> = if cap.gv.is_empty() {
            Vec::new()
        } else {
            (0..heads)
                .map(|h| to_basis(&cache, Stream::Values, &cap.gv, &cap.pos, h))
                .collect::<Result<_>>()?
        };
        let units: Vec<Unit> = rows
            .iter()
            .enumerate()
            .map(|(h, x)| {
                let mut unit = Unit::default();
                for (j, g) in x.chunks_exact(GROUP).enumerate() {
                    let gs = grads.get(h).map(|gr| &gr[j * GROUP..(j + 1) * GROUP]);
                    unit.add(g, gs, f32::NEG_INFINITY, f32::INFINITY);
                }
                unit
            })
            .collect();
        let codebooks = codebooks(&units)?;
        let (perm, bounds) = permutation(&rows, d)?;
        values.push(ValueTables { codebooks, perm, bounds });
        raw_values.push(rows);
    }
    // Balance: sqrt(max |q_c| / max |k_c|) over the KV head's query heads, on the keys as handed in.
    let ratio = c.n_head / heads;
    let mut balance = vec![1.0f32; heads * d];
    for h in 0..heads {
        for ch in 0..d {
            let kmax =
                (0..cap.pos.len()).map(|u| cap.k[(u * heads + h) * d + ch].abs()).fold(0.0f32, f32::max);
            let qmax = (0..ratio).map(|r| cap.qmax[(h * ratio + r) * d + ch]).fold(0.0f32, f32::max);
            if kmax > 0.0 && qmax > 0.0 {
                balance[h * d + ch] = (qmax / kmax).sqrt().clamp(1.0 / 64.0, 64.0);
            }
        }
    }
    // SKVQ's clip: 2-bit per-token permuted keys (basis none) plus ternary permuted values.
    let key_rows: Vec<Vec<f32>> = {
        let cache = basis_cache(model, t0, &mut arena)?;
        (0..heads).map(|h| to_basis(&cache, Stream::Keys, &cap.k, &cap.pos, h)).collect::<Result<_>>()?
    };
    let groups = d / GROUP + 1;
    let clip_error = CLIPS
        .iter()
        .map(|&a| {
            (0..heads)
                .map(|h| {
                    let (kp, kb) = (&keys[0].perm[h * d..][..d], &keys[0].bounds[h * groups..][..groups]);
                    let (vp, vb) = (&values[0].perm[h * d..][..d], &values[0].bounds[h * groups..][..groups]);
                    clip_error(&key_rows[h], d, kp, kb, Width::B2, a)
                        + clip_error(&raw_values[0][h], d, vp, vb, Width::Ternary, a)
                })
                .sum()
        })
        .collect();
    Ok(LayerTables { keys, values, balance, clip_error })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codebooks_are_increasing_within_range_and_fit_their_data() {
        // Laplace-like data bunched at zero: the 2-bit codebook's inner levels sit nearer zero than the
        // uniform grid's (+-1/3), and Q-Norm keeps the levels ordered.
        let pts: Vec<f32> = (0..4000)
            .map(|i| {
                let u = (i as f32 + 0.5) / 4000.0 * 2.0 - 1.0;
                u.signum() * u.abs().powi(3)
            })
            .collect();
        for w in [Width::B2, Width::B3, Width::B4] {
            let n = w.levels() as usize;
            let t = fit_codebook(&pts, &[], w).unwrap();
            let (enc, dec) = (&t[..n], &t[n..]);
            assert!(enc.windows(2).all(|p| p[0] < p[1]) && dec.windows(2).all(|p| p[0] < p[1]), "{t:?}");
            assert!(enc.iter().all(|a| (-1.0..=1.0).contains(a)));
        }
        let t = fit_codebook(&pts, &[], Width::B2).unwrap();
        assert!(t[1].abs() < 1.0 / 3.0 && t[2].abs() < 1.0 / 3.0, "{t:?}");
        // Degenerate data (one value) still gives a valid table.
        let t = fit_codebook(&[0.5; 100], &[], Width::B3).unwrap();
        assert!(t[..8].windows(2).all(|p| p[0] < p[1]));
    }

    #[test]
    fn fisher_weights_are_gradient_times_half_range_squared_and_pull_the_levels() {
        // A group over [-1, 3] (centre 1, half-range 2) with one outlier beyond the threshold: the kept
        // points normalized, each weighing (g * 2)^2, the outlier and its gradient left out.
        let mut u = Unit::default();
        u.add(&[-1.0, 1.0, 3.0, 9.0], Some(&[0.5, 0.0, -1.0, 7.0]), -5.0, 5.0);
        assert_eq!(u.points, vec![-1.0, 0.0, 1.0]);
        assert_eq!(u.weights, vec![1.0, 0.0, 4.0]);
        // Without gradients no weights (uniform), and a flat group adds nothing.
        let mut v = Unit::default();
        v.add(&[2.0, 2.0], None, -5.0, 5.0);
        v.add(&[0.0, 1.0], None, -5.0, 5.0);
        assert!(v.weights.is_empty() && v.points == vec![-1.0, 1.0]);
        // Heavy weights on the points near 0.5 pull a level there that uniform weights do not place.
        let pts: Vec<f32> = (0..400).map(|i| -1.0 + 2.0 * i as f32 / 399.0).collect();
        let w: Vec<f32> = pts.iter().map(|&x| if (x - 0.5).abs() < 0.05 { 1000.0 } else { 1.0 }).collect();
        let near = |t: &[f32]| t[..4].iter().map(|l| (l - 0.5).abs()).fold(f32::INFINITY, f32::min);
        let (uni, fis) =
            (fit_codebook(&pts, &[], Width::B2).unwrap(), fit_codebook(&pts, &w, Width::B2).unwrap());
        assert!(near(&fis) < 0.05 && near(&uni) > 0.1, "{uni:?} {fis:?}");
    }

    #[test]
    fn clip_search_prefers_clipping_a_heavy_tail() {
        let d = 64;
        let perm: Vec<u16> = (0..d as u16).collect();
        let bounds = [0u16, 32, 64];
        let err = |rows: &[f32], a: f32| clip_error(rows, d, &perm, &bounds, Width::B2, a);
        // One value per group three times the bulk: clipping it loses less than the coarse step costs the rest.
        let tail: Vec<f32> =
            (0..200 * d).map(|i| if i % 32 == 5 { 3.0 } else { ((i * 7919) % 97) as f32 / 97.0 }).collect();
        assert!(err(&tail, 0.8) < err(&tail, 1.0));
        // Values only at the ends of the range sit on the unclipped grid: any clipping moves them.
        let ends: Vec<f32> = (0..200 * d).map(|i| if (i * 7) % 3 == 0 { 0.0 } else { 1.0 }).collect();
        assert!(err(&ends, 1.0) < err(&ends, 0.8));
        assert!(CLIPS.iter().all(|&a| err(&tail, a).is_finite()));
    }
}
