//! The Llama-family forward pass (`llama`, `qwen2`, `gemma3`) over memory-mapped quantized weights, with
//! every layer's KV cache held by `kvq-core`.
//!
//! Per layer: `x += Wo · attn(rope(Wq·n(x)), rope(Wk·n(x)), Wv·n(x))`, then
//! `x += Wdown · (silu(Wgate·n(x)) * Wup·n(x))`, with `n` RMSNorm; logits `= Wout · n(x)` (`Wout` is the
//! embedding when the file has no `output.weight`). `llama` GGUFs rotate adjacent pairs `(2i, 2i+1)` (the
//! converter permuted the Q/K rows for it); `qwen2` rotates halves `(i, i + d/2)` and adds Q/K/V biases.
//!
//! `gemma3` as llama.cpp computes it: the embedding scaled by `sqrt(n_embd)`; per layer four RMS norms
//! (before and after attention, before and after the feed-forward block, each result added to the
//! residual after its post-norm; the GGUF stores the norms' weights as `1 + w`), RMS norms of each query
//! and key head before RoPE (halves pairing), queries scaled by `1/sqrt(head_dim)`, a GELU (tanh)-gated
//! feed-forward block and the tied output. Five of every six layers are local: they attend only to the
//! last `sliding_window` tokens (the current one included), with RoPE base 10,000 (or
//! `rope.freq_base_swa`); every sixth is global, with `rope.freq_base`. A local layer's cache is a sliding
//! ring of the window (f16 unless [`Model::set_local_kv`] says otherwise); global layers hold the context
//! in the session's format.

use crate::error::{Error, Result, bail_as, ensure_as};
use crate::gguf::{Gguf, TensorInfo, TensorType, Value};
use crate::kernels;
use crate::kvspec::KvSpec;
use crate::quants::{self, Q16Act};
use kvq_core::attention::{self, Kernel};
use kvq_core::cache::{Cache, CacheConfig, Overflow, Precision};
use kvq_core::transform::{Pairing, Rope};
use rayon::prelude::*;
use std::path::Path;

/// Supported architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama, SmolLM, Mistral-style: adjacent-pair RoPE, no biases.
    Llama,
    /// Qwen2: half-split RoPE, Q/K/V biases.
    Qwen2,
    /// Gemma 3: half-split RoPE, Q/K norms, post-norms, GELU gate, local (sliding-window) layers.
    Gemma3,
}

/// Model hyper-parameters from the GGUF metadata.
#[derive(Clone, Debug)]
pub struct Config {
    /// Architecture.
    pub arch: Arch,
    /// Layers.
    pub n_layer: usize,
    /// Embedding width.
    pub n_embd: usize,
    /// Feed-forward width.
    pub n_ff: usize,
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_kv_head: usize,
    /// Channels per head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Training context.
    pub n_ctx_train: usize,
    /// RoPE base frequency.
    pub rope_base: f32,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE base of local layers (equal to `rope_base` where there are none).
    pub rope_base_local: f32,
    /// Tokens a local layer attends to, the current one included (0: no local layers).
    pub window: usize,
    /// Per layer, whether it is local.
    pub local: Vec<bool>,
    /// Factor on the embedding rows (Gemma: `sqrt(n_embd)`).
    pub embd_scale: f32,
    /// Factor on the attention logits.
    pub attn_scale: f32,
    /// `tanh(logits / cap) * cap` when set.
    pub logit_softcap: Option<f32>,
}

impl Config {
    /// Whether layer `li` attends only to a sliding window.
    pub fn is_local(&self, li: usize) -> bool {
        self.local.get(li).copied().unwrap_or(false)
    }

    /// The first layer that holds the whole context.
    pub fn first_global(&self) -> usize {
        (0..self.n_layer).find(|&l| !self.is_local(l)).unwrap_or(0)
    }
}

/// A weight matrix `[rows][cols]` in the file: row `r` is output `r`.
#[derive(Clone, Debug)]
pub struct Weight {
    /// Element type.
    pub ty: TensorType,
    /// Output rows.
    pub rows: usize,
    /// Input columns.
    pub cols: usize,
    offset: usize,
    row_bytes: usize,
    /// Where the matrix was packed for the decode kernels ([`kernels::pack_rows`]): its index in
    /// `Model::packed`, which then holds its bytes instead of the file.
    packed: Option<usize>,
}

/// One transformer block's weights (public so that tests can replay a forward pass outside [`Session`]).
pub struct Layer {
    /// RMSNorm weights before attention.
    pub attn_norm: Vec<f32>,
    /// RMSNorm weights before the feed-forward block.
    pub ffn_norm: Vec<f32>,
    /// Query projection.
    pub wq: Weight,
    /// Key projection.
    pub wk: Weight,
    /// Value projection.
    pub wv: Weight,
    /// Attention output projection.
    pub wo: Weight,
    /// Query bias (Qwen2).
    pub bq: Option<Vec<f32>>,
    /// Key bias (Qwen2).
    pub bk: Option<Vec<f32>>,
    /// Value bias (Qwen2).
    pub bv: Option<Vec<f32>>,
    /// RMSNorm weights of each query head (Gemma 3), shared by the heads.
    pub q_norm: Option<Vec<f32>>,
    /// RMSNorm weights of each key head (Gemma 3).
    pub k_norm: Option<Vec<f32>>,
    /// RMSNorm weights on the attention output before the residual add (Gemma 3).
    pub post_attn_norm: Option<Vec<f32>>,
    /// RMSNorm weights on the feed-forward output before the residual add (Gemma 3).
    pub post_ffn_norm: Option<Vec<f32>>,
    /// Gate projection (SiLU-gated, GELU-gated for Gemma 3).
    pub gate: Weight,
    /// Up projection.
    pub up: Weight,
    /// Down projection.
    pub down: Weight,
}

/// How the matrix products treat activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatMode {
    /// Activations quantized to 16-bit codes per block of 32 for the integer kernels.
    Fast,
    /// Weights dequantized to f32 and multiplied with f32 activations (for reference checks).
    Exact,
}

/// A loaded model: the mapped file, its parsed header and the layer table.
pub struct Model {
    map: memmap2::Mmap,
    /// The matrices packed in groups of 8 rows at load ([`Weight::packed`]).
    packed: Vec<Vec<u8>>,
    /// Parsed header and metadata.
    pub gguf: Gguf,
    /// Hyper-parameters.
    pub cfg: Config,
    layers: Vec<Layer>,
    embd: Weight,
    output: Weight,
    output_norm: Vec<f32>,
    avx2: bool,
    /// RoPE inverse frequencies `base^(-2i/d)`, `i < d/2`.
    inv_freq: Vec<f64>,
    /// The same for local layers.
    inv_freq_local: Vec<f64>,
    /// The cache of local layers (a sliding ring of the window), if the model has any.
    local_cache: Option<CacheConfig>,
    /// Matrix-product mode.
    pub mode: MatMode,
    /// Whether sessions read caches of codes up to 2 bits, and of 4 bits, on attention's int8 path
    /// ([`Kernel::with_int8`]; on by default, off with `--exact` or `--f32-attention`).
    pub int8_attention: bool,
    /// The attention kernels sessions run ([`Kernel::detect`] by default: AVX-512 where the CPU has it,
    /// else AVX2, else the portable twins; `--attention-kernels` picks one); the int8 path is
    /// [`Self::int8_attention`]'s.
    pub attention_kernel: Kernel,
    /// The file mapped.
    path: std::path::PathBuf,
    sha256: std::sync::OnceLock<String>,
    /// The calibration sessions apply to calibrated formats (loaded by [`Model::cache_config`]).
    calibration: std::sync::OnceLock<(std::path::PathBuf, std::sync::Arc<crate::calib::Calibration>)>,
}

fn meta_u(g: &Gguf, key: &str) -> Result<usize> {
    g.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| Error::Model(format!("metadata {key} missing or not an integer")))
}

impl Model {
    /// Maps and checks the GGUF file at `path`.
    ///
    /// # Errors
    /// An unreadable or malformed file, an unsupported architecture, a missing tensor or one whose shape or
    /// type does not fit: each named.
    pub fn load(path: &Path) -> Result<Self> {
        ensure_as!(Model, !path.is_dir(), "{} is a directory, not a GGUF model file", path.display());
        let io = |reason| Error::Io { path: path.to_path_buf(), reason };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private; kvq never writes the file. Another process truncating
        // it while mapped would fault (SIGBUS), the documented hazard of memory-mapped model files, which
        // every GGUF runtime accepts to avoid copying hundreds of MB.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let gguf = Gguf::parse(&map).map_err(|reason| Error::Gguf { path: path.to_path_buf(), reason })?;
        let mut m = Self::from_parts(map, gguf)?;
        m.path = path.to_path_buf();
        Ok(m)
    }

    fn from_parts(map: memmap2::Mmap, gguf: Gguf) -> Result<Self> {
        let arch_s = gguf
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Model("metadata general.architecture missing".into()))?;
        let arch = match arch_s {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "gemma3" => Arch::Gemma3,
            a => bail_as!(Model, "architecture {a:?} is not supported (llama, qwen2 and gemma3 are)"),
        };
        let a = arch_s.to_string();
        let n_embd = meta_u(&gguf, &format!("{a}.embedding_length"))?;
        let n_head = meta_u(&gguf, &format!("{a}.attention.head_count"))?;
        let n_kv_head = meta_u(&gguf, &format!("{a}.attention.head_count_kv")).unwrap_or(n_head);
        ensure_as!(
            Model,
            n_head > 0 && n_kv_head > 0 && n_head % n_kv_head == 0,
            "head counts {n_head}/{n_kv_head}: query heads must be a multiple of KV heads"
        );
        ensure_as!(
            Model,
            arch == Arch::Gemma3 || n_embd % n_head == 0,
            "embedding {n_embd} is not a multiple of {n_head} heads"
        );
        let head_dim = meta_u(&gguf, &format!("{a}.attention.key_length")).unwrap_or(n_embd / n_head);
        ensure_as!(
            Model,
            head_dim.is_multiple_of(2) && head_dim <= 256,
            "head_dim {head_dim} is not supported (even, at most 256)"
        );
        let rope_dims = meta_u(&gguf, &format!("{a}.rope.dimension_count")).unwrap_or(head_dim);
        ensure_as!(
            Model,
            rope_dims == head_dim,
            "partial RoPE ({rope_dims} of {head_dim} dims) is not supported"
        );
        let embd_info = gguf
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::Model("tensor token_embd.weight missing".into()))?
            .clone();
        let n_layer = meta_u(&gguf, &format!("{a}.block_count"))?;
        ensure_as!(Model, n_layer > 0 && n_layer <= 1024, "block_count {n_layer} out of range");
        let f = |k: &str| gguf.get(&format!("{a}.{k}")).and_then(Value::as_f64);
        let rope_base = f("rope.freq_base").unwrap_or(10000.0) as f32;
        let gemma = arch == Arch::Gemma3;
        let window =
            if gemma { meta_u(&gguf, &format!("{a}.attention.sliding_window")).unwrap_or(0) } else { 0 };
        let local: Vec<bool> = if window == 0 {
            vec![false; n_layer]
        } else {
            // llama.cpp: a bool per layer, else a period n (default 6) whose last layer is global.
            match gguf.get(&format!("{a}.attention.sliding_window_pattern")) {
                Some(Value::Array(v)) => {
                    ensure_as!(
                        Model,
                        v.len() == n_layer,
                        "sliding_window_pattern has {} entries for {n_layer} layers",
                        v.len()
                    );
                    v.as_bools()
                        .ok_or_else(|| {
                            Error::Model("sliding_window_pattern is not an array of bools".into())
                        })?
                        .to_vec()
                }
                Some(v) => {
                    let n = v.as_u64().ok_or_else(|| {
                        Error::Model("sliding_window_pattern is neither an array nor an integer".into())
                    })? as usize;
                    ensure_as!(Model, n > 0, "sliding_window_pattern 0");
                    (0..n_layer).map(|l| l % n < n - 1).collect()
                }
                None => (0..n_layer).map(|l| l % 6 < 5).collect(),
            }
        };
        ensure_as!(Model, window == 0 || window <= 1 << 20, "sliding_window {window} out of range");
        let cfg = Config {
            arch,
            n_layer,
            n_embd,
            n_ff: meta_u(&gguf, &format!("{a}.feed_forward_length"))?,
            n_head,
            n_kv_head,
            head_dim,
            n_vocab: embd_info.dims.get(1).copied().unwrap_or(0) as usize,
            n_ctx_train: meta_u(&gguf, &format!("{a}.context_length")).unwrap_or(4096),
            rope_base,
            eps: f("attention.layer_norm_rms_epsilon").unwrap_or(if gemma { 1e-6 } else { 1e-5 }) as f32,
            rope_base_local: if window > 0 {
                f("rope.freq_base_swa").unwrap_or(10000.0) as f32
            } else {
                rope_base
            },
            window,
            local,
            embd_scale: if gemma { (n_embd as f32).sqrt() } else { 1.0 },
            // llama.cpp: 1/sqrt(n_embd/n_head) for Gemma 3 27B (62 layers), else 1/sqrt(head_dim).
            attn_scale: if gemma && n_layer == 62 {
                1.0 / ((n_embd / n_head) as f32).sqrt()
            } else {
                1.0 / (head_dim as f32).sqrt()
            },
            logit_softcap: f("final_logit_softcapping").map(|c| c as f32).filter(|&c| c > 0.0),
        };
        let weight = |name: &str, cols: usize, rows: usize| -> Result<Weight> {
            let t = gguf.tensor(name).ok_or_else(|| Error::Model(format!("tensor {name} missing")))?;
            weight_of(&gguf, t, cols, rows)
        };
        let vector = |name: &str, n: usize| -> Result<Vec<f32>> {
            let t = gguf.tensor(name).ok_or_else(|| Error::Model(format!("tensor {name} missing")))?;
            ensure_as!(Model, t.dims == [n as u64], "tensor {name}: dims {:?}, expected [{n}]", t.dims);
            let mut v = vec![0f32; n];
            quants::dequant_row(
                t.ty,
                gguf.tensor_bytes(&map, t).map_err(|e| Error::Model(format!("tensor {name}: {e}")))?,
                &mut v,
            );
            ensure_as!(Model, v.iter().all(|x| x.is_finite()), "tensor {name} holds NaN or infinite values");
            Ok(v)
        };
        let (q_dim, kv_dim) = (n_head * head_dim, n_kv_head * head_dim);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}");
            let bias = |s: &str, len: usize| -> Result<Option<Vec<f32>>> {
                if gguf.tensor(&n(s)).is_some() { vector(&n(s), len).map(Some) } else { Ok(None) }
            };
            let gemma_norm = |s: &str, len: usize| -> Result<Option<Vec<f32>>> {
                if gemma { vector(&n(s), len).map(Some) } else { Ok(None) }
            };
            layers.push(Layer {
                attn_norm: vector(&n("attn_norm.weight"), n_embd)?,
                ffn_norm: vector(&n("ffn_norm.weight"), n_embd)?,
                wq: weight(&n("attn_q.weight"), n_embd, q_dim)?,
                wk: weight(&n("attn_k.weight"), n_embd, kv_dim)?,
                wv: weight(&n("attn_v.weight"), n_embd, kv_dim)?,
                wo: weight(&n("attn_output.weight"), q_dim, n_embd)?,
                bq: bias("attn_q.bias", q_dim)?,
                bk: bias("attn_k.bias", kv_dim)?,
                bv: bias("attn_v.bias", kv_dim)?,
                q_norm: gemma_norm("attn_q_norm.weight", head_dim)?,
                k_norm: gemma_norm("attn_k_norm.weight", head_dim)?,
                post_attn_norm: gemma_norm("post_attention_norm.weight", n_embd)?,
                post_ffn_norm: gemma_norm("post_ffw_norm.weight", n_embd)?,
                gate: weight(&n("ffn_gate.weight"), n_embd, cfg.n_ff)?,
                up: weight(&n("ffn_up.weight"), n_embd, cfg.n_ff)?,
                down: weight(&n("ffn_down.weight"), cfg.n_ff, n_embd)?,
            });
        }
        let mut embd = weight_of(&gguf, &embd_info, n_embd, cfg.n_vocab)?;
        let (mut output, tied) = match gguf.tensor("output.weight") {
            Some(t) => (weight_of(&gguf, t, n_embd, cfg.n_vocab)?, false),
            None => (embd.clone(), true),
        };
        let avx2 = kernels::has_avx2();
        let packed = if avx2 { pack_matrices(&map, &mut layers, &mut output) } else { Vec::new() };
        if tied {
            // The embedding table is the output matrix: its rows come from the packed copy too.
            embd.packed = output.packed;
        }
        let output_norm = vector("output_norm.weight", n_embd)?;
        let inv = |base: f32| -> Vec<f64> {
            (0..head_dim / 2).map(|i| f64::from(base).powf(-2.0 * i as f64 / head_dim as f64)).collect()
        };
        let (inv_freq, inv_freq_local) = (inv(cfg.rope_base), inv(cfg.rope_base_local));
        let local_cache = (cfg.window > 0).then(|| {
            CacheConfig::fp16(cfg.n_kv_head, cfg.head_dim, cfg.window).with_overflow(Overflow::Slide)
        });
        Ok(Self {
            map,
            packed,
            gguf,
            cfg,
            layers,
            embd,
            output,
            output_norm,
            avx2,
            inv_freq,
            inv_freq_local,
            local_cache,
            mode: MatMode::Fast,
            int8_attention: true,
            attention_kernel: Kernel::detect(),
            path: std::path::PathBuf::new(),
            sha256: std::sync::OnceLock::new(),
            calibration: std::sync::OnceLock::new(),
        })
    }

    /// The file the model was loaded from (empty for a model built in memory).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The sha256 of the model file (computed once).
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn sha256(&self) -> Result<String> {
        if let Some(s) = self.sha256.get() {
            return Ok(s.clone());
        }
        let s = crate::fetch::sha256_file(&self.path).map_err(|e| Error::Io {
            path: self.path.clone(),
            reason: std::io::Error::other(format!("{e:#}")),
        })?;
        Ok(self.sha256.get_or_init(|| s).clone())
    }

    /// The calibration in use, if one was loaded.
    pub fn calibration(&self) -> Option<&crate::calib::Calibration> {
        self.calibration.get().map(|(_, c)| &**c)
    }

    /// Loads the calibration at `path`, or the model's default one, for the run (one per run).
    ///
    /// # Errors
    /// No file (with how to make one), a file for another model, or a second, different file.
    pub fn use_calibration(&self, path: Option<&Path>) -> Result<&crate::calib::Calibration> {
        let want = match path {
            Some(p) => p.to_path_buf(),
            None => crate::calib::default_path(&self.sha256()?)
                .map_err(|e| Error::Calibration(format!("{e:#}")))?,
        };
        if let Some((p, c)) = self.calibration.get() {
            if *p != want {
                return Err(Error::Calibration(format!(
                    "one calibration per run: {} is in use, not {}",
                    p.display(),
                    want.display()
                )));
            }
            return Ok(c);
        }
        if !want.exists() {
            return Err(Error::Calibration(format!(
                "no calibration for this model at {}: run `kvq calibrate{}` first (a few minutes), or give calib=FILE",
                want.display(),
                if path.is_some() { "" } else { " -m MODEL" }
            )));
        }
        let c =
            crate::calib::Calibration::load(&want, self).map_err(|e| Error::Calibration(format!("{e:#}")))?;
        let (_, c) = self.calibration.get_or_init(|| (want, std::sync::Arc::new(c)));
        Ok(c)
    }

    /// One layer's cache configuration for `spec` at this model's shape, holding `capacity` tokens.
    ///
    /// # Errors
    /// The spec's reason when it does not fit the model (for example a group that does not divide
    /// `head_dim`).
    pub fn cache_config(&self, spec: &KvSpec, capacity: usize, overflow: Overflow) -> Result<CacheConfig> {
        // Gemma 3 norms each head's keys before RoPE; kvq's recipes leave such keys unrotated.
        let spec = &spec.for_model(self.cfg.arch == Arch::Gemma3)?;
        let mut cfg = spec.config(self.cfg.n_kv_head, self.cfg.head_dim, capacity, overflow, self.rope())?;
        if spec.needs_calibration() {
            let c = self.use_calibration(spec.calib.as_deref()).map_err(|e| Error::Spec {
                spec: spec.name.clone(),
                reason: e.to_string(),
                local: false,
            })?;
            if spec.clip_calibrated {
                for p in [&mut cfg.keys, &mut cfg.values] {
                    if let Precision::Quant(q) = p {
                        q.clip = c.clip;
                    }
                }
            }
        }
        Ok(cfg)
    }

    /// The model's RoPE as the cache describes it (for keys stored relative to their group).
    pub fn rope(&self) -> Rope {
        let pairing = match self.cfg.arch {
            Arch::Llama => Pairing::Adjacent,
            Arch::Qwen2 | Arch::Gemma3 => Pairing::Halves,
        };
        Rope { base: self.cfg.rope_base, pairing }
    }

    /// Layer `li`'s RoPE as the cache describes it (local layers have their own base).
    pub fn layer_rope(&self, li: usize) -> Rope {
        let base = if self.cfg.is_local(li) { self.cfg.rope_base_local } else { self.cfg.rope_base };
        Rope { base, ..self.rope() }
    }

    /// The cache of layer `li` when the session's format is `cfg`: `cfg` itself for a layer that holds
    /// the context, the local ring for a sliding-window layer.
    pub fn layer_config(&self, li: usize, cfg: &CacheConfig) -> CacheConfig {
        match &self.local_cache {
            Some(l) if self.cfg.is_local(li) => *l,
            _ => *cfg,
        }
    }

    /// The local layers' cache (`None` for a model without them).
    pub fn local_config(&self) -> Option<&CacheConfig> {
        self.local_cache.as_ref()
    }

    /// Stores the local layers' keys and values in `spec` (default f16): a ring of the window that slides
    /// one token at a time, or a key group at a time for per-channel keys (it then holds between
    /// `window - G + 1` and `window` tokens).
    ///
    /// # Errors
    /// A model without local layers, a spec that does not fit the shape, or one that needs calibration
    /// tables (those are measured on the global layers' context).
    pub fn set_local_kv(&mut self, spec: &KvSpec) -> Result<()> {
        let refuse =
            |reason: &str| Error::Spec { spec: spec.name.clone(), reason: reason.into(), local: true };
        if self.cfg.window == 0 {
            return Err(refuse("this model has no sliding-window layers (only Gemma 3's have)"));
        }
        if spec.needs_calibration() {
            return Err(refuse("calibrated formats apply to global layers only"));
        }
        let local = (0..self.cfg.n_layer).find(|&l| self.cfg.is_local(l)).unwrap_or(0);
        let rope = self.layer_rope(local);
        let spec = &spec.for_model(self.cfg.arch == Arch::Gemma3).map_err(Error::for_local_layers)?;
        let cfg = spec
            .config(self.cfg.n_kv_head, self.cfg.head_dim, self.cfg.window, Overflow::Slide, rope)
            .map_err(Error::for_local_layers)?;
        if cfg.tiers.is_some() {
            return Err(refuse("tiers apply to global layers only"));
        }
        self.local_cache = Some(cfg);
        Ok(())
    }

    /// The weight matrix named `name` (a GGUF tensor name such as `blk.0.ffn_up.weight` or `output.weight`).
    pub fn weight(&self, name: &str) -> Option<Weight> {
        let t = self.gguf.tensor(name)?;
        let (cols, rows) = (*t.dims.first()? as usize, *t.dims.get(1)? as usize);
        weight_of(&self.gguf, t, cols, rows).ok()
    }

    /// Uses the portable kernels even where AVX2 is present (for comparisons).
    pub fn set_portable(&mut self, portable: bool) {
        self.avx2 = !portable && kernels::has_avx2();
    }

    /// Name of the weight kernels in use.
    pub fn kernel_name(&self) -> &'static str {
        if self.avx2 { "avx2" } else { "portable" }
    }

    /// Bytes of weights one decode step reads (every layer matrix, the output matrix, the norms).
    pub fn weight_bytes_per_token(&self) -> usize {
        let m = |w: &Weight| w.rows * w.row_bytes;
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| m(&l.wq) + m(&l.wk) + m(&l.wv) + m(&l.wo) + m(&l.gate) + m(&l.up) + m(&l.down))
            .sum();
        per_layer + m(&self.output)
    }

    /// Tensor-type histogram, for `kvq info`.
    pub fn tensor_types(&self) -> Vec<(TensorType, usize)> {
        let mut v: Vec<(TensorType, usize)> = Vec::new();
        for t in &self.gguf.tensors {
            match v.iter_mut().find(|(ty, _)| *ty == t.ty) {
                Some(e) => e.1 += 1,
                None => v.push((t.ty, 1)),
            }
        }
        v
    }

    /// Rows `r0..r0 + n` of `w` in the file's layout: a slice of the file, or unpacked into `buf`.
    fn rows<'a>(&'a self, w: &Weight, r0: usize, n: usize, buf: &'a mut Vec<u8>) -> &'a [u8] {
        let rb = w.row_bytes;
        match w.packed {
            Some(i) => {
                buf.resize(n * rb, 0);
                kernels::unpack_rows(w.ty, &self.packed[i], rb, r0, buf);
                buf
            }
            None => &self.map[w.offset + r0 * rb..][..n * rb],
        }
    }

    /// `w` dequantized to f32, row-major `[rows][cols]` (for the backward pass of [`crate::grad`]).
    ///
    /// # Errors
    /// Too little memory for the matrix.
    pub fn dense(&self, w: &Weight) -> Result<Vec<f32>> {
        let mut buf = Vec::new();
        let data = self.rows(w, 0, w.rows, &mut buf);
        let mut out: Vec<f32> = zeroed(w.rows * w.cols, "a dequantized weight")?;
        out.par_chunks_mut(w.cols).enumerate().for_each(|(r, o)| {
            quants::dequant_row(w.ty, &data[r * w.row_bytes..(r + 1) * w.row_bytes], o);
        });
        Ok(out)
    }

    /// `y[t] = W · x[t]` for `n = x.len() / cols` tokens (`y` is `[n][rows]`).
    pub fn matmul(&self, w: &Weight, x: &[f32], y: &mut [f32], act: &mut Q16Act) {
        self.matmuls(&[w], x, &mut [y], act);
    }

    /// Several products of one input (Q, K and V; gate and up) as one parallel job: `ys[i] = ws[i] · x`.
    /// The weights share `cols`; the activations are quantized once.
    pub fn matmuls(&self, ws: &[&Weight], x: &[f32], ys: &mut [&mut [f32]], act: &mut Q16Act) {
        let cols = ws[0].cols;
        let n = x.len() / cols;
        let avx2 = self.avx2;
        let int = |w: &Weight| self.mode == MatMode::Fast && quants::uses_q16(w.ty);
        // K-quant rows against the same 16-bit activations (`kernels::dot_kq16`).
        let kint =
            |w: &Weight| self.mode == MatMode::Fast && matches!(w.ty, TensorType::Q4K | TensorType::Q6K);
        if ws.iter().any(|w| int(w) || kint(w)) {
            act.quantize(x);
        }
        let act = &*act;
        let bpr = cols / 32;
        // Q4_1's minimum terms for several tokens come from one pass over the blocks' activation sums,
        // block-major (`st[i * n + t]`), after the scaled integer dots (same bits as one token at a time).
        let st: Vec<f32> = if n > 1 && ws.iter().any(|w| int(w) && w.ty == TensorType::Q4_1) {
            act.block_major_sums(n)
        } else {
            Vec::new()
        };
        // Each task takes a block of rows for every token, decoding each weight block once for four tokens.
        // Its output is row-major `[row][token]`: for one token that is `y` itself, for several a transposed
        // block copied out afterwards. Rows per task: enough work to amortize scheduling (about 16k weight
        // blocks), at least 4 tasks a matrix to balance two cores.
        // A packed matrix's tasks take whole groups of rows.
        let chunk_of = |w: &Weight| {
            let c = (16384 / bpr.max(1) / n.max(1)).clamp(4, 1024).min(w.rows.div_ceil(4)).max(1);
            if w.packed.is_some() { c.next_multiple_of(kernels::PACK_ROWS) } else { c }
        };
        let mut yts: Vec<Vec<f32>> =
            if n == 1 { Vec::new() } else { ws.iter().map(|w| vec![0f32; n * w.rows]).collect() };
        let mut tasks = Vec::new();
        let outs: Vec<&mut [f32]> = if n == 1 {
            ys.iter_mut().map(|y| &mut **y).collect()
        } else {
            yts.iter_mut().map(|v| &mut v[..]).collect()
        };
        for (w, out) in ws.iter().zip(outs) {
            debug_assert_eq!(out.len(), n * w.rows);
            let c = chunk_of(w);
            tasks.extend(out.chunks_mut(c * n).enumerate().map(|(ci, b)| (*w, ci * c, b)));
        }
        let run = |(w, r0, block): (&Weight, usize, &mut [f32])| {
            let (nr, rb) = (block.len() / n, w.row_bytes);
            if let (Some(i), true) = (w.packed, int(w)) {
                let packed = &self.packed[i][r0 * rb..][..nr * rb];
                if n == 1 {
                    return kernels::dots_packed(w.ty, packed, rb, act, block, avx2);
                }
                let row = |k: usize| kernels::RowRef::of_packed(packed, rb, k);
                return int_tokens(w, block, n, act, &st, avx2, &row);
            }
            let mut buf = Vec::new();
            let data = self.rows(w, r0, nr, &mut buf);
            let row = |k: usize| &data[k * rb..(k + 1) * rb];
            if int(w) && n == 1 {
                for (k, out) in block.iter_mut().enumerate() {
                    *out = kernels::dot_q16(w.ty, row(k), act, [0], avx2)[0];
                }
            } else if int(w) {
                int_tokens(w, block, n, act, &st, avx2, &|k| kernels::RowRef::Plain(row(k)));
            } else if kint(w) {
                // Four tokens a call while they fill one: each super-block decoded once for the four.
                for (k, out) in block.chunks_exact_mut(n).enumerate() {
                    let mut t = 0;
                    while t + 4 <= n {
                        let b = [t * bpr, (t + 1) * bpr, (t + 2) * bpr, (t + 3) * bpr];
                        out[t..t + 4].copy_from_slice(&kernels::dot_kq16(w.ty, row(k), act, b, avx2));
                        t += 4;
                    }
                    for (t, o) in out.iter_mut().enumerate().skip(t) {
                        *o = kernels::dot_kq16(w.ty, row(k), act, [t * bpr], avx2)[0];
                    }
                }
            } else if n == 1 && matches!(w.ty, TensorType::Q4K | TensorType::Q6K) {
                // One token: the row's elements go straight into the dot (the same bits as below).
                for (k, out) in block.iter_mut().enumerate() {
                    *out = kernels::dot_kquant(w.ty, row(k), x, avx2);
                }
            } else {
                let mut buf = vec![0f32; w.cols];
                for (k, out) in block.chunks_exact_mut(n).enumerate() {
                    kernels::dequant_row(w.ty, row(k), &mut buf, avx2);
                    for (t, o) in out.iter_mut().enumerate() {
                        *o = kernels::dot_f32(&buf, &x[t * w.cols..(t + 1) * w.cols], avx2);
                    }
                }
            }
        };
        if rayon::current_num_threads() == 1 {
            tasks.into_iter().for_each(run);
        } else {
            tasks.into_par_iter().for_each(run);
        }
        for ((w, yt), y) in ws.iter().zip(&yts).zip(ys.iter_mut()) {
            y.par_chunks_exact_mut(w.rows).enumerate().for_each(|(t, yrow)| {
                for (r, o) in yrow.iter_mut().enumerate() {
                    *o = yt[r * n + t];
                }
            });
        }
    }

    /// The transformer blocks, first to last.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The output head and the final norm's weights.
    pub fn output(&self) -> (&Weight, &[f32]) {
        (&self.output, &self.output_norm)
    }

    /// RoPE's cosines and sines at `pos` for the global layers, for [`rope`].
    pub fn rope_angles(&self, pos: usize) -> Vec<(f64, f64)> {
        rope_table(&self.inv_freq, pos)
    }

    /// RoPE's cosines and sines at `pos` for layer `li`.
    pub fn layer_rope_angles(&self, li: usize, pos: usize) -> Vec<(f64, f64)> {
        rope_table(if self.cfg.is_local(li) { &self.inv_freq_local } else { &self.inv_freq }, pos)
    }

    /// The embedding row of `token`.
    ///
    /// # Errors
    /// An id outside the vocabulary.
    pub fn embed(&self, token: u32, out: &mut [f32]) -> Result<()> {
        let t = token as usize;
        if t >= self.cfg.n_vocab {
            return Err(Error::Token { id: token, vocab: self.cfg.n_vocab });
        }
        let w = &self.embd;
        let mut buf = Vec::new();
        quants::dequant_row(w.ty, self.rows(w, t, 1, &mut buf), out);
        if self.cfg.embd_scale != 1.0 {
            out.iter_mut().for_each(|x| *x *= self.cfg.embd_scale);
        }
        Ok(())
    }
}

fn weight_of(g: &Gguf, t: &TensorInfo, cols: usize, rows: usize) -> Result<Weight> {
    ensure_as!(
        Model,
        t.dims == [cols as u64, rows as u64],
        "tensor {}: dims {:?}, expected [{cols}, {rows}]",
        t.name,
        t.dims
    );
    ensure_as!(Model, cols.is_multiple_of(32), "tensor {}: {cols} columns is not a multiple of 32", t.name);
    Ok(Weight {
        ty: t.ty,
        rows,
        cols,
        offset: (g.data_start + t.offset) as usize,
        row_bytes: t.ty.row_bytes(cols),
        packed: None,
    })
}

/// `n` tokens' products with a block of rows on the integer kernels (`block` is `[row][token]`, row `k`
/// read through `row`): the tokens in tiles whose 16-bit activations stay in L1 (about 16 KiB) while
/// every row passes over them (without tiles each row streams all the tokens' activations from L2), then
/// Q4_1's minimum terms from the activations' block-major sums `st`.
fn int_tokens<'r>(
    w: &Weight,
    block: &mut [f32],
    n: usize,
    act: &Q16Act,
    st: &[f32],
    avx2: bool,
    row: &dyn Fn(usize) -> kernels::RowRef<'r>,
) {
    let bpr = w.cols / 32;
    let tile = (16384 / (2 * w.cols)).max(4) / 4 * 4;
    for t0 in (0..n).step_by(tile) {
        for (k, out) in block.chunks_exact_mut(n).enumerate() {
            kernels::dots_scaled(w.ty, row(k), act, bpr, t0..(t0 + tile).min(n), out, avx2);
        }
    }
    for (k, out) in block.chunks_exact_mut(n).enumerate() {
        kernels::add_mins(w.ty, row(k), st, n, out, avx2);
    }
}

/// Packs every layer matrix and the output matrix the packed decode kernel reads
/// ([`kernels::pack_rows`]: Q8_0, Q4_0, Q4_1 and Q5_0 in whole groups of 8 rows), in parallel, and marks
/// each with its index in the returned list. The packed copy then serves every read of these matrices
/// (an embedding table that is the output matrix included: its rows are unpacked), so the file's pages
/// of them are dropped from the process (`MADV_DONTNEED`) and the weights stay resident once. One decode
/// step reads each matrix once: on SmolLM2's Q4_1 matrices the packed kernel read 1.7x as many bytes a
/// second (Zen 4, one thread; docs/decode-speed.md).
fn pack_matrices(map: &memmap2::Mmap, layers: &mut [Layer], output: &mut Weight) -> Vec<Vec<u8>> {
    let mut ws: Vec<&mut Weight> = Vec::new();
    for l in layers.iter_mut() {
        ws.extend([&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.gate, &mut l.up, &mut l.down]);
    }
    ws.push(output);
    ws.retain(|w| kernels::packs(w.ty, w.rows));
    let packed: Vec<Vec<u8>> = ws
        .par_iter()
        .map(|w| {
            // A few MB of rows at a time, their file pages dropped as soon as they are packed, so that
            // loading holds about one copy of the weights, not two (Gemma's output matrix is 168 MB).
            let chunk = (4 << 20) / w.row_bytes / kernels::PACK_ROWS * kernels::PACK_ROWS;
            let chunk = chunk.max(kernels::PACK_ROWS) * w.row_bytes;
            let mut p = vec![0u8; w.rows * w.row_bytes];
            for (i, dst) in p.chunks_mut(chunk).enumerate() {
                let (at, len) = (w.offset + i * chunk, dst.len());
                kernels::pack_rows_into(w.ty, &map[at..][..len], w.row_bytes, dst);
                #[cfg(unix)]
                // SAFETY: the map is read-only and backed by the file, so dropping its pages loses nothing
                // (nothing reads these ranges again; a read would fault them in from the file). A failure
                // only leaves the pages resident.
                #[allow(unsafe_code)]
                let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, len) };
            }
            p
        })
        .collect();
    for (i, w) in ws.into_iter().enumerate() {
        w.packed = Some(i);
    }
    packed
}

/// RMSNorm of `x` scaled by `w` into `out` (the mean square in f64).
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>() / x.len() as f64;
    let s = (1.0 / (ms + f64::from(eps)).sqrt()) as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * s * g;
    }
}

/// Rotation angles' cosines and sines for position `pos`: `theta_i = pos * inv_freq[i]`, in f64.
fn rope_table(inv_freq: &[f64], pos: usize) -> Vec<(f64, f64)> {
    inv_freq
        .iter()
        .map(|f| {
            let (s, c) = (pos as f64 * f).sin_cos();
            (c, s)
        })
        .collect()
}

/// Rotates `x` (`heads` x `d`) by the angles in `table` (from [`Model::rope_angles`]).
pub fn rope(x: &mut [f32], d: usize, table: &[(f64, f64)], arch: Arch) {
    let half = d / 2;
    for head in x.chunks_exact_mut(d) {
        for (i, &(c, s)) in table.iter().enumerate() {
            let (a, b) = match arch {
                Arch::Llama => (2 * i, 2 * i + 1),
                Arch::Qwen2 | Arch::Gemma3 => (i, i + half),
            };
            let (x0, x1) = (f64::from(head[a]), f64::from(head[b]));
            head[a] = (x0 * c - x1 * s) as f32;
            head[b] = (x0 * s + x1 * c) as f32;
        }
    }
}

/// [`rmsnorm`] of each row of `x` (rows of `w.len()`), rows in parallel when there are several.
fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let e = w.len();
    if x.len() > e {
        out.par_chunks_exact_mut(e).zip(x.par_chunks_exact(e)).for_each(|(o, xr)| rmsnorm(xr, w, eps, o));
    } else {
        rmsnorm(x, w, eps, out);
    }
}

/// The residual add `x += o`, with `o` RMS-normed first where the layer has a post-norm (Gemma 3);
/// `scratch` (as long as `x`) holds the normed rows.
fn add_post_normed(x: &mut [f32], o: &[f32], norm: Option<&[f32]>, eps: f32, scratch: &mut [f32]) {
    let add: &[f32] = match norm {
        Some(w) => {
            norm_rows(o, w, eps, scratch);
            scratch
        }
        None => o,
    };
    for (xv, ov) in x.iter_mut().zip(add) {
        *xv += ov;
    }
}

/// SiLU, `x * sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// GELU, tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))`.
pub fn gelu(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// One conversation's state: a cache per layer over caller-owned arenas, the next position, and scratch.
pub struct Session<'a> {
    model: &'a Model,
    caches: Vec<Cache<'a>>,
    /// The format of the layers that hold the context.
    cfg: CacheConfig,
    /// Position of the next token (tokens seen, including any that slid out of the cache).
    pub pos: usize,
    kernel: Kernel,
    prefill: Prefill,
    /// One scratch and one output buffer per KV head: heads run as parallel tasks.
    scratch: Vec<Vec<f32>>,
    parts: Vec<Vec<f32>>,
    /// Per KV head, the attention a decode step's query heads gave the window (MiKV's tiers).
    received: Vec<Vec<f32>>,
    act: Q16Act,
    /// Per layer, what calibration records of each token fed (keys, values, positions, query maxima).
    pub capture: Option<Vec<crate::calib::LayerCapture>>,
    /// One layer's attention inputs, recorded for `kvq dump-qkv`.
    pub tap: Option<crate::dump::Tap>,
}

/// How a chunk of several tokens attends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefill {
    /// The chunk's queries attend to the cache plus the chunk's own keys and values at full precision, then
    /// the chunk enters the cache (the fast path for prompts).
    Chunked,
    /// Each token's key and value enter the cache first and its query attends to the cache as stored: the
    /// same attention as decoding token by token, with the products still batched (for evaluation, where
    /// the quantized cache must shape every prediction as it would in decoding).
    AsDecode,
}

/// Per-layer arenas for a cache configuration: allocate with [`arenas`], then hand to [`Session::new`].
///
/// # Errors
/// When the memory cannot be had (a context far beyond this machine's memory): an error naming the size,
/// not an abort.
pub fn arenas(model: &Model, cfg: &CacheConfig) -> Result<Vec<Vec<u32>>> {
    let words: Vec<usize> =
        (0..model.cfg.n_layer).map(|l| model.layer_config(l, cfg).arena_bytes().div_ceil(4)).collect();
    let total = words.iter().map(|&w| w as u128 * 4).sum::<u128>();
    if let Some(avail) = mem_available()
        && total > u128::from(avail)
    {
        return Err(Error::Memory { tokens: cfg.capacity, need_mib: total >> 20, avail_mib: avail >> 20 });
    }
    words.into_iter().map(|w| zeroed(w, "KV cache arena")).collect()
}

/// `MemAvailable` from `/proc/meminfo` (Linux), in bytes.
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `n` zeroed values, or an error naming `what` and the size when the allocation fails.
fn zeroed<T: Clone + Default>(n: usize, what: &'static str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::Alloc { what, mib: (n * size_of::<T>()) >> 20 })?;
    v.resize(n, T::default());
    Ok(v)
}

/// Most tokens a prefill chunk holds.
pub const CHUNK: usize = 64;

impl<'a> Session<'a> {
    /// A session over `arenas` (one per layer, from [`arenas`]).
    ///
    /// # Errors
    /// The core's error if an arena is too small or the configuration does not fit the model.
    pub fn new(model: &'a Model, cfg: CacheConfig, arenas: &'a mut [Vec<u32>]) -> Result<Self> {
        ensure_as!(
            Model,
            cfg.kv_heads == model.cfg.n_kv_head && cfg.head_dim == model.cfg.head_dim,
            "cache shape does not match the model"
        );
        ensure_as!(
            Model,
            arenas.len() == model.cfg.n_layer,
            "{} arenas for {} layers",
            arenas.len(),
            model.cfg.n_layer
        );
        let mut caches = arenas
            .iter_mut()
            .enumerate()
            .map(|(li, a)| {
                Cache::new(model.layer_config(li, &cfg), a)
                    .map_err(|reason| Error::Cache { what: format!("layer {li}'s KV cache"), reason })
            })
            .collect::<Result<Vec<_>>>()?;
        if crate::calib::needs_tables(&cfg) {
            let calib = model.calibration().ok_or_else(|| {
                Error::Calibration(
                    "this cache format reads calibration tables and none is loaded (a calibrated preset \
                     loads the model's)"
                        .into(),
                )
            })?;
            for (li, c) in caches.iter_mut().enumerate() {
                if !model.cfg.is_local(li) {
                    calib.apply(li, c).map_err(|e| Error::Calibration(format!("{e:#}")))?;
                }
            }
        }
        let c = &model.cfg;
        let mut scratch = cfg.prefill_scratch_len(CHUNK, c.n_head).max(cfg.decode_scratch_len(c.n_head));
        if let Some(l) = model.local_config() {
            scratch = scratch.max(l.decode_scratch_len(c.n_head));
        }
        Ok(Self {
            model,
            caches,
            cfg,
            pos: 0,
            kernel: model.attention_kernel.with_int8(model.int8_attention),
            prefill: Prefill::Chunked,
            scratch: (0..c.n_kv_head).map(|_| zeroed(scratch, "attention scratch")).collect::<Result<_>>()?,
            parts: vec![Vec::new(); c.n_kv_head],
            received: vec![Vec::new(); c.n_kv_head],
            act: Q16Act::default(),
            capture: None,
            tap: None,
        })
    }

    /// The layer caches.
    pub fn caches(&self) -> &[Cache<'a>] {
        &self.caches
    }

    /// Tokens the caches of the global layers hold.
    pub fn held(&self) -> usize {
        self.caches[self.model.cfg.first_global()].held()
    }

    /// KV bytes held, all layers.
    pub fn kv_bytes(&self) -> usize {
        self.caches.iter().map(|c| c.usage().total_bytes()).sum()
    }

    /// Average bits per cached element of the global layers.
    pub fn bits_per_element(&self) -> f64 {
        let c = &self.caches[self.model.cfg.first_global()];
        c.usage().bits_per_element(c.config())
    }

    /// KV bytes held by the global and by the local layers.
    pub fn kv_bytes_by_kind(&self) -> (usize, usize) {
        let (mut g, mut l) = (0, 0);
        for (li, c) in self.caches.iter().enumerate() {
            let b = c.usage().total_bytes();
            if self.model.cfg.is_local(li) { l += b } else { g += b }
        }
        (g, l)
    }

    /// The format of the layers that hold the context.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Empties every cache.
    pub fn reset(&mut self) {
        for c in &mut self.caches {
            c.reset();
        }
        self.pos = 0;
    }

    /// Uses the portable attention kernels.
    pub fn set_kernel(&mut self, k: Kernel) {
        self.kernel = k;
    }

    /// How chunks of several tokens attend (default [`Prefill::Chunked`]).
    pub fn set_prefill(&mut self, p: Prefill) {
        self.prefill = p;
    }

    /// Runs `tokens` through the model (in chunks of [`CHUNK`]); returns the logits after the last one.
    ///
    /// # Errors
    /// An id outside the vocabulary, a full context under the stop policy (nothing of the failing chunk
    /// enters the cache), NaN/Inf activations.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.feed_progress(tokens, |_| {})
    }

    /// [`Session::feed`], calling `progress(k)` after each chunk of `k` tokens enters the cache.
    ///
    /// # Errors
    /// As [`Session::feed`]; the chunks before a failing one stay in the cache.
    pub fn feed_progress(&mut self, tokens: &[u32], mut progress: impl FnMut(usize)) -> Result<Vec<f32>> {
        ensure_as!(Model, !tokens.is_empty(), "nothing to feed");
        let mut logits = Vec::new();
        for chunk in tokens.chunks(CHUNK) {
            logits = self.forward_logits(chunk, true)?;
            progress(chunk.len());
        }
        Ok(logits)
    }

    /// Logits after every token of `tokens` (`[n][vocab]`), for evaluation.
    ///
    /// # Errors
    /// As [`Session::feed`].
    pub fn feed_all(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(tokens.len() * self.model.cfg.n_vocab);
        for chunk in tokens.chunks(CHUNK) {
            out.extend(self.forward_logits(chunk, false)?);
        }
        Ok(out)
    }

    /// Runs the forward pass on a worker of the thread pool: the products and attention inside then fork
    /// from a worker, whose idle peers are still spinning between the short serial steps, instead of from
    /// an outside thread that sleeps on a lock at every join. Measured with `kvq bench -t 2` in alternation:
    /// decode at depth 0 115 -> 136 tokens/s (f16), prefill 217 -> 233.
    fn forward_logits(&mut self, tokens: &[u32], last_only: bool) -> Result<Vec<f32>> {
        if rayon::current_num_threads() == 1 || rayon::current_thread_index().is_some() {
            return self.forward_inner(tokens, last_only);
        }
        rayon::scope(|_| self.forward_inner(tokens, last_only))
    }

    /// Attention of layer `li` for the queries `q` of `n = q.len() / (n_head * head_dim)` tokens into `out`:
    /// one token attends to the cache (decode), a chunk to the cache and the chunk's own `k`, `v` (prefill).
    /// Each KV head with its query heads is a task writing its own `self.parts[h]`; the heads' rows are then
    /// gathered into `out`.
    fn attend(
        &mut self,
        li: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        scale: f32,
        out: &mut [f32],
    ) -> kvq_core::Result<()> {
        let c = &self.model.cfg;
        let (d, qd) = (c.head_dim, c.n_head * c.head_dim);
        let n = q.len() / qd;
        let cache = &self.caches[li];
        let kernel = self.kernel;
        let ratio = c.n_head / c.n_kv_head;
        let window = cache.tier_window();
        type Task<'t> = (usize, ((&'t mut Vec<f32>, &'t mut Vec<f32>), &'t mut Vec<f32>));
        let run = |(h, ((scratch, part), recv)): Task<'_>| -> kvq_core::Result<()> {
            part.resize(n * qd, 0.0);
            if n == 1 {
                let mut probs =
                    attention::decode_heads(cache, h..h + 1, q, c.n_head, scale, part, scratch, kernel)?;
                // MiKV's tiers: the attention each window token received, summed over the group's heads.
                recv.clear();
                recv.resize(window, 0.0);
                let held = probs.tokens();
                for r in h * ratio..(h + 1) * ratio {
                    for (a, &p) in recv.iter_mut().zip(&probs.head(r)[held - window..]) {
                        *a += p;
                    }
                }
                Ok(())
            } else {
                attention::prefill_heads(cache, h..h + 1, q, k, v, c.n_head, scale, part, scratch, kernel)
            }
        };
        let tasks =
            self.scratch.iter_mut().zip(self.parts.iter_mut()).zip(self.received.iter_mut()).enumerate();
        let res: Vec<kvq_core::Result<()>> = if rayon::current_num_threads() == 1 {
            tasks.map(run).collect()
        } else {
            tasks.par_bridge().map(run).collect()
        };
        res.into_iter().collect::<kvq_core::Result<()>>()?;
        if n == 1 && window > 0 {
            for (h, recv) in self.received.iter().enumerate() {
                self.caches[li].observe(h, recv)?;
            }
        }
        let per_head = (c.n_head / c.n_kv_head) * d;
        for (h, part) in self.parts.iter().enumerate() {
            for t in 0..n {
                let rows = t * qd + h * per_head..t * qd + (h + 1) * per_head;
                out[rows.clone()].copy_from_slice(&part[rows]);
            }
        }
        Ok(())
    }

    fn forward_inner(&mut self, tokens: &[u32], last_only: bool) -> Result<Vec<f32>> {
        let m = self.model;
        let c = &m.cfg;
        let n = tokens.len();
        let (e, d) = (c.n_embd, c.head_dim);
        let (qd, kvd) = (c.n_head * d, c.n_kv_head * d);
        // Refuse before touching any cache when a stopping cache cannot take the chunk.
        let cc = self.cfg;
        if cc.overflow == Overflow::Stop && self.held() + n > cc.capacity {
            return Err(Error::ContextFull { held: self.held(), capacity: cc.capacity, needed: n });
        }
        let mut x = vec![0f32; n * e];
        for (t, &tok) in tokens.iter().enumerate() {
            m.embed(tok, &mut x[t * e..(t + 1) * e])?;
        }
        let mut h = vec![0f32; n * e];
        let (mut q, mut k, mut v) = (vec![0f32; n * qd], vec![0f32; n * kvd], vec![0f32; n * kvd]);
        let mut att = vec![0f32; n * qd];
        let mut o = vec![0f32; n * e];
        let (mut g, mut u) = (vec![0f32; n * c.n_ff], vec![0f32; n * c.n_ff]);
        let scale = c.attn_scale;
        let tables: Vec<Vec<(f64, f64)>> = (0..n).map(|t| rope_table(&m.inv_freq, self.pos + t)).collect();
        let local_tables: Vec<Vec<(f64, f64)>> = if c.window > 0 {
            (0..n).map(|t| rope_table(&m.inv_freq_local, self.pos + t)).collect()
        } else {
            Vec::new()
        };
        let mut head_tmp = vec![0f32; d];
        for (li, layer) in m.layers.iter().enumerate() {
            let local = c.is_local(li);
            norm_rows(&x, &layer.attn_norm, c.eps, &mut h);
            m.matmuls(&[&layer.wq, &layer.wk, &layer.wv], &h, &mut [&mut q, &mut k, &mut v], &mut self.act);
            for (buf, b, w) in [(&mut q, &layer.bq, qd), (&mut k, &layer.bk, kvd), (&mut v, &layer.bv, kvd)] {
                if let Some(b) = b {
                    for row in buf.chunks_exact_mut(w) {
                        row.iter_mut().zip(b).for_each(|(r, b)| *r += b);
                    }
                }
            }
            for (buf, w) in [(&mut q, &layer.q_norm), (&mut k, &layer.k_norm)] {
                if let Some(w) = w {
                    for head in buf.chunks_exact_mut(d) {
                        rmsnorm(head, w, c.eps, &mut head_tmp);
                        head.copy_from_slice(&head_tmp);
                    }
                }
            }
            for (t, table) in (if local { &local_tables } else { &tables }).iter().enumerate() {
                rope(&mut q[t * qd..(t + 1) * qd], d, table, c.arch);
                rope(&mut k[t * kvd..(t + 1) * kvd], d, table, c.arch);
            }
            if let Some(tap) = &mut self.tap
                && tap.layer == li
            {
                tap.q.extend_from_slice(&q);
                tap.k.extend_from_slice(&k);
                tap.v.extend_from_slice(&v);
            }
            if let Some(caps) = &mut self.capture {
                if caps.len() < m.layers.len() {
                    caps.resize_with(m.layers.len(), Default::default);
                }
                let cap = &mut caps[li];
                cap.k.extend_from_slice(&k);
                cap.v.extend_from_slice(&v);
                cap.pos.extend(self.pos..self.pos + n);
                cap.qmax.resize(qd, 0.0);
                for row in q.chunks_exact(qd) {
                    for (m, &x) in cap.qmax.iter_mut().zip(row) {
                        *m = m.max(x.abs());
                    }
                }
            }
            let err = |reason: kvq_core::Error| Error::Cache { what: format!("layer {li}"), reason };
            // MiKV's tiers rank tokens by the attention they receive, which only a step-by-step pass
            // hands back: a tiered cache takes a chunk token by token.
            // A local layer's ring holds exactly its window once its token is in, which a chunk attending
            // to the cache plus itself would overrun: it too goes token by token.
            if n == 1 || self.prefill == Prefill::AsDecode || cc.tiers.is_some() || local {
                // Decoding, or a chunk token by token as decoding does: each key and value enters the cache,
                // then its query attends to the cache as stored (the products above stay batched).
                for t in 0..n {
                    let kv = t * kvd..(t + 1) * kvd;
                    self.caches[li].append(&k[kv.clone()], &v[kv]).map_err(err)?;
                    let rows = t * qd..(t + 1) * qd;
                    self.attend(li, &q[rows.clone()], &[], &[], scale, &mut att[rows]).map_err(err)?;
                }
            } else {
                self.attend(li, &q, &k, &v, scale, &mut att).map_err(err)?;
                self.caches[li].append(&k, &v).map_err(err)?;
            }
            m.matmul(&layer.wo, &att, &mut o, &mut self.act);
            add_post_normed(&mut x, &o, layer.post_attn_norm.as_deref(), c.eps, &mut h);
            norm_rows(&x, &layer.ffn_norm, c.eps, &mut h);
            m.matmuls(&[&layer.gate, &layer.up], &h, &mut [&mut g, &mut u], &mut self.act);
            let act = if c.arch == Arch::Gemma3 { gelu } else { silu };
            let swiglu = |(gc, uc): (&mut [f32], &[f32])| {
                for (gv, uv) in gc.iter_mut().zip(uc) {
                    *gv = act(*gv) * uv;
                }
            };
            if n > 1 {
                g.par_chunks_mut(c.n_ff).zip(u.par_chunks(c.n_ff)).for_each(swiglu);
            } else {
                swiglu((&mut g, &u));
            }
            m.matmul(&layer.down, &g, &mut o, &mut self.act);
            add_post_normed(&mut x, &o, layer.post_ffn_norm.as_deref(), c.eps, &mut h);
            if let Some(i) = x.iter().position(|v| !v.is_finite()) {
                return Err(Error::NonFinite { layer: li, index: i, value: x[i] });
            }
        }
        self.pos += n;
        let rows: Vec<usize> = if last_only { vec![n - 1] } else { (0..n).collect() };
        let mut hn = vec![0f32; rows.len() * e];
        for (j, &t) in rows.iter().enumerate() {
            rmsnorm(&x[t * e..(t + 1) * e], &m.output_norm, c.eps, &mut hn[j * e..(j + 1) * e]);
        }
        let mut logits = vec![0f32; rows.len() * c.n_vocab];
        m.matmul(&m.output, &hn, &mut logits, &mut self.act);
        if let Some(cap) = c.logit_softcap {
            logits.iter_mut().for_each(|l| *l = (*l / cap).tanh() * cap);
        }
        Ok(logits)
    }
}
