//! The `kvq` commands, one module each, and what they share: the model, cache and sampling
//! arguments and their checks.

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};
use kvq_core::attention::Kernel;
use kvq_core::cache::{CacheConfig, Overflow};
use kvq_host::chat::{Chat, End, Line, Turns, chat_config, reply};
use kvq_host::error::Error;
use kvq_host::eval::{DEMO_ANSWER, DEMO_QUESTION, demo_document};
use kvq_host::fetch;
use kvq_host::kvspec::{KvSpec, PRESETS};
use kvq_host::model::{self, Model, Session};
use kvq_host::sample::Sampler;
use kvq_host::tokenizer::{Tokenizer, Utf8Stream};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

pub(crate) mod bench;
pub(crate) mod calibrate;
pub(crate) mod chat;
pub(crate) mod demo;
pub(crate) mod dump;
pub(crate) mod generate;
pub(crate) mod info;
pub(crate) mod models;
pub(crate) mod perplexity;
pub(crate) mod plot;
pub(crate) mod retrieval;
pub(crate) mod tokenize;

#[derive(Args)]
pub(crate) struct TextArgs {
    /// Text file (UTF-8).
    #[arg(short = 'f', long, conflicts_with = "text")]
    pub(crate) file: Option<PathBuf>,
    /// A fetched evaluation text: prideprejudice, sensesensibility, mansfieldpark, emma, northangerabbey,
    /// persuasion (Jane Austen, Debian r-cran-janeaustenr) or jargon (Debian jargon-text).
    #[arg(long)]
    pub(crate) text: Option<String>,
}

impl TextArgs {
    fn read(&self, default: &str) -> Result<String> {
        match &self.file {
            Some(f) => read_utf8(f),
            None => kvq_host::eval::texts::text(self.text.as_deref().unwrap_or(default), false),
        }
    }
}

#[derive(Args, Clone)]
pub(crate) struct ModelArgs {
    /// A GGUF file, or a model's name from `kvq models` (fetched on first use into $KVQ_CACHE; default
    /// smollm2-135m).
    #[arg(short = 'm', long)]
    pub(crate) model: Option<PathBuf>,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    pub(crate) threads: Option<usize>,
    /// Multiply with f32 activations (weights dequantized) instead of 16-bit activations: slower, closer to
    /// exact arithmetic.
    #[arg(long)]
    pub(crate) exact: bool,
    /// Read 2- and 4-bit KV caches with f32 arithmetic instead of attention's int8 path (implied by --exact).
    #[arg(long)]
    pub(crate) f32_attention: bool,
    /// Attention kernels: the fastest this CPU runs (auto), or one set, to compare them.
    #[arg(long, value_enum, default_value_t = AttentionKernels::Auto)]
    pub(crate) attention_kernels: AttentionKernels,
    /// The cache of sliding-window layers (Gemma 3's local layers; default f16): an uncalibrated format
    /// such as kivi4 or kivi2:s=0. `--kv` sets the layers that hold the whole context.
    #[arg(long, value_name = "SPEC")]
    pub(crate) kv_local: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum AttentionKernels {
    /// AVX-512 where the CPU has it, else AVX2, else portable.
    Auto,
    /// AVX-512 (F, BW, VL, VNNI, VBMI) beside AVX2.
    Avx512,
    /// AVX2, FMA and F16C.
    Avx2,
    /// The scalar twins.
    Portable,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum OverflowArg {
    /// Stop with a clear message when the context is full.
    Stop,
    /// Drop the oldest tokens, keeping the sinks (four unless `--kv ...:s=N` says).
    Slide,
}

#[derive(Args, Clone)]
pub(crate) struct CacheArgs {
    /// KV cache spec: a preset (f16, kivi2, kivi4, kivi8) with optional `:k=BITS:v=BITS:g=N:r=N:s=N:clip=F`.
    #[arg(long, default_value = "kivi2")]
    pub(crate) kv: String,
    /// Context size in tokens (default: the model's training context).
    #[arg(short = 'c', long = "ctx-size")]
    pub(crate) ctx: Option<usize>,
    /// What happens when the context is full.
    #[arg(long, value_enum)]
    pub(crate) overflow: Option<OverflowArg>,
}

#[derive(Args)]
pub(crate) struct SampleArgs {
    /// Greedy decoding (the default unless --temp is given).
    #[arg(long)]
    pub(crate) greedy: bool,
    /// Temperature (a finite number >= 0; 0 is greedy).
    #[arg(long, allow_negative_numbers = true, value_parser = parse_temp)]
    pub(crate) temp: Option<f32>,
    /// Top-k (0: off).
    #[arg(long, default_value_t = 40)]
    pub(crate) top_k: usize,
    /// Top-p.
    #[arg(long, default_value_t = 0.95)]
    pub(crate) top_p: f32,
    /// Seed.
    #[arg(long, short = 's', default_value_t = 42)]
    pub(crate) seed: u64,
}

pub(crate) fn parse_temp(v: &str) -> Result<f32, String> {
    match v.parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        Ok(t) => Err(format!("{t} is not a temperature: give a finite number >= 0 (0 is greedy)")),
        Err(e) => Err(format!("{v:?}: {e}")),
    }
}

impl SampleArgs {
    fn sampler(&self) -> Sampler {
        match self.temp {
            Some(t) if !self.greedy && t > 0.0 => Sampler::new(t, self.top_k, self.top_p, self.seed),
            _ => Sampler::greedy(),
        }
    }
}

/// What `generate` and `chat` share: the model, its cache and the sampler.
#[derive(Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) cache: CacheArgs,
    #[command(flatten)]
    pub(crate) sample: SampleArgs,
}

pub(crate) fn load(a: &ModelArgs) -> Result<Model> {
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t.max(1)).build_global().context("starting threads")?;
    }
    let path = model_path(a.model.as_deref())?;
    let mut m = Model::load(&path)?;
    if a.exact {
        m.mode = model::MatMode::Exact;
    }
    m.int8_attention = !(a.exact || a.f32_attention);
    m.attention_kernel = match a.attention_kernels {
        AttentionKernels::Auto => Kernel::detect(),
        AttentionKernels::Avx512 => Kernel::avx512().context(
            "--attention-kernels avx512: this CPU lacks one of AVX-512 F, BW, VL, VNNI, VBMI (try avx2)",
        )?,
        AttentionKernels::Avx2 => Kernel::avx2()
            .context("--attention-kernels avx2: this CPU lacks one of AVX2, FMA, F16C (try portable)")?,
        AttentionKernels::Portable => Kernel::PORTABLE,
    };
    if let Some(spec) = &a.kv_local {
        let spec = KvSpec::parse(spec).map_err(Error::for_local_layers)?;
        m.set_local_kv(&spec)?;
    }
    Ok(m)
}

pub(crate) fn cache_config(m: &Model, c: &CacheArgs, default: Overflow) -> Result<CacheConfig> {
    let spec = KvSpec::parse(&c.kv)?;
    let ctx = c.ctx.unwrap_or(m.cfg.n_ctx_train);
    ensure!(ctx > 0, "-c 0: the context must hold at least one token");
    let overflow = match c.overflow {
        Some(OverflowArg::Stop) => Overflow::Stop,
        Some(OverflowArg::Slide) => Overflow::Slide,
        None => default,
    };
    let mut cfg = m.cache_config(&spec, ctx, overflow)?;
    // A window that slides keeps attention sinks unless the spec or its preset says how many (`s=0`: none).
    if overflow == Overflow::Slide && !spec.sinks_set {
        cfg.sinks = cfg.sinks.max(kvq_host::chat::SLIDE_SINKS);
        cfg.validate().map_err(|e| {
            anyhow::anyhow!(
                "--kv {:?}: a sliding cache keeps {} sinks (s=0 for none), which -c {ctx} cannot hold beside its \
                 window: {e}",
                spec.name,
                cfg.sinks
            )
        })?;
    }
    Ok(cfg)
}

/// The model, its tokenizer and the per-layer cache configuration `generate` and `chat` run with.
pub(crate) fn prepare(r: &RunArgs, overflow: Overflow) -> Result<(Model, Tokenizer, CacheConfig)> {
    let model = load(&r.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let cfg = cache_config(&model, &r.cache, overflow)?;
    Ok((model, tok, cfg))
}

/// The text of `-f FILE` (UTF-8), else of `-p TEXT`.
pub(crate) fn file_or_text(file: Option<&std::path::Path>, text: Option<&str>) -> Result<String> {
    match (file, text) {
        (Some(f), _) => read_utf8(f),
        (None, Some(p)) => Ok(p.to_string()),
        (None, None) => bail!("give -f FILE or -p TEXT"),
    }
}

/// The GGUF `-m` names: a file, else a named model (fetched if it is not cached), else the default.
pub(crate) fn model_path(m: Option<&std::path::Path>) -> Result<PathBuf> {
    let Some(p) = m else { return fetch::default_model(false) };
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    match p.to_str().and_then(fetch::named) {
        Some(n) => fetch::fetch(n, false),
        None => bail!("{}: no such file, nor a model name ({})", p.display(), fetch::model_names()),
    }
}

pub(crate) fn read_utf8(f: &std::path::Path) -> Result<String> {
    let b = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
    String::from_utf8(b).map_err(|e| {
        anyhow::anyhow!("{}: invalid UTF-8 at byte {}", f.display(), e.utf8_error().valid_up_to())
    })
}

pub(crate) fn parse_specs(list: &str) -> Result<Vec<KvSpec>> {
    let specs: Vec<KvSpec> =
        list.split(',').map(|s| KvSpec::parse(s.trim())).collect::<kvq_host::error::Result<_>>()?;
    if specs.is_empty() {
        bail!("no KV specs given");
    }
    Ok(specs)
}

pub(crate) fn parse_list<T: std::str::FromStr>(list: &str, what: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    list.split(',')
        .map(|x| x.trim().parse::<T>().map_err(|e| anyhow::anyhow!("{what}: {x:?}: {e}")))
        .collect()
}

pub(crate) fn bar(total: usize, msg: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    b
}

/// `e` in the command line's words: the library's errors name the flag a spec came from and say which
/// option helps; every other cause as it reads.
pub(crate) fn report(e: &anyhow::Error) -> String {
    let words = |le: &Error| match le {
        Error::Spec { spec, reason, local } => {
            format!("{} {spec:?}: {reason}", if *local { "--kv-local" } else { "--kv" })
        }
        Error::ContextFull { held, capacity, needed } => format!(
            "the context is full: {held} tokens held + {needed} new exceed the capacity of {capacity} (raise -c, \
             or use --overflow slide)"
        ),
        Error::Alloc { .. } | Error::Memory { .. } => format!("{le} (lower -c)"),
        le => le.to_string(),
    };
    e.chain()
        .map(|c| c.downcast_ref::<Error>().map_or_else(|| c.to_string(), words))
        .collect::<Vec<_>>()
        .join(": ")
}
