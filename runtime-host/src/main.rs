//! `kvq`: run a GGUF language model on the CPU with a quantized KV cache.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvq_core::cache::{CacheConfig, Overflow};
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
    Info(ModelArgs),
    /// Prefill and decode speed at several depths, per KV spec, in one run.
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated KV specs, measured in this order.
    #[arg(long, default_value = "f16,kivi2")]
    kv: String,
    /// Comma-separated depths (tokens already in the cache) at which to measure.
    #[arg(long, default_value = "0,2048,8192")]
    depths: String,
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
    /// GGUF model file (default: SmolLM2-135M-Instruct, fetched on first use into $KVQ_CACHE).
    #[arg(short = 'm', long)]
    model: Option<PathBuf>,
    /// Threads (default: all cores).
    #[arg(short = 't', long)]
    threads: Option<usize>,
    /// Multiply with f32 activations (weights dequantized) instead of 8-bit activations: slower, closer to
    /// exact arithmetic.
    #[arg(long)]
    exact: bool,
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
    /// Temperature.
    #[arg(long)]
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
    #[arg(short = 'p', long)]
    prompt: String,
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
    }
}

fn load(a: &ModelArgs) -> Result<Model> {
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t.max(1)).build_global().context("starting threads")?;
    }
    let path = match &a.model {
        Some(p) => p.clone(),
        None => fetch::default_model(false)?,
    };
    let mut m = Model::load(&path)?;
    if a.exact {
        m.mode = model::MatMode::Exact;
    }
    Ok(m)
}

fn cache_config(m: &Model, c: &CacheArgs, default: Overflow) -> Result<CacheConfig> {
    let spec = KvSpec::parse(&c.kv).map_err(anyhow::Error::msg)?;
    let ctx = c.ctx.unwrap_or(m.cfg.n_ctx_train).max(1);
    let overflow = match c.overflow {
        Some(OverflowArg::Stop) => Overflow::Stop,
        Some(OverflowArg::Slide) => Overflow::Slide,
        None => default,
    };
    spec.config(m.cfg.n_kv_head, m.cfg.head_dim, ctx, overflow).map_err(anyhow::Error::msg)
}

/// The model, its tokenizer and the per-layer cache configuration `generate` and `chat` run with.
fn prepare(r: &RunArgs, overflow: Overflow) -> Result<(Model, Tokenizer, CacheConfig)> {
    let model = load(&r.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let cfg = cache_config(&model, &r.cache, overflow)?;
    Ok((model, tok, cfg))
}

fn kv_bytes(s: &Session<'_>) -> usize {
    s.caches().iter().map(|c| c.usage().total_bytes()).sum()
}

fn generate(a: GenerateArgs) -> Result<()> {
    let (model, tok, cfg) = prepare(&a.run, Overflow::Stop)?;
    let mut arenas = model::arenas(&model, &cfg)?;
    let mut s = Session::new(&model, cfg, &mut arenas)?;
    let prompt = tok.encode(&a.prompt, true, true);
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let mut sampler = a.run.sample.sampler();
    let t0 = Instant::now();
    let mut logits = s.feed(&prompt)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut out_ids = Vec::new();
    let mut stream = Utf8Stream::default();
    let mut text = String::new();
    let t1 = Instant::now();
    let stdout = std::io::stdout();
    if !a.json {
        let mut o = stdout.lock();
        write!(o, "{}", a.prompt)?;
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
    let decoded = out_ids.len().saturating_sub(1).max(1);
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
                "decode_tokens_per_s": decoded as f64 / decode_s,
            },
            "kv_bytes": kv_bytes(&s),
        });
        println!("{j}");
    } else {
        println!();
        eprintln!(
            "kvq: prompt {} tokens at {:.1} tok/s, generated {} at {:.1} tok/s, KV {:.2} MiB ({}, {} kernels)",
            prompt.len(),
            prompt.len() as f64 / prefill_s,
            out_ids.len(),
            decoded as f64 / decode_s,
            kv_bytes(&s) as f64 / (1 << 20) as f64,
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

fn chat(a: ChatArgs) -> Result<()> {
    let (model, tok, cfg) = prepare(&a.run, Overflow::Slide)?;
    let tmpl = model.gguf.get("tokenizer.chat_template").and_then(|v| v.as_str()).unwrap_or("");
    if !tmpl.contains("<|im_start|>") || tok.id("<|im_start|>").is_none() {
        bail!("this model's chat template is not ChatML; kvq chat supports ChatML models (use generate)");
    }
    let end = tok.id("<|im_end|>").context("no <|im_end|> token")?;
    let mut arenas = model::arenas(&model, &cfg)?;
    let mut s = Session::new(&model, cfg, &mut arenas)?;
    let mut sampler = a.run.sample.sampler();
    let (mut gen_tokens, mut gen_secs) = (0usize, 0f64);
    let mut pending = tok.encode(&chatml("system", &a.system), true, true);
    eprintln!(
        "kvq chat: {} ({} layers), KV cache {} ({} tokens, overflow {:?}). /reset, /stats, /quit.",
        model.gguf.get("general.name").and_then(|v| v.as_str()).unwrap_or("model"),
        model.cfg.n_layer,
        a.run.cache.kv,
        cfg.capacity,
        cfg.overflow
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
                pending = tok.encode(&chatml("system", &a.system), true, true);
                eprintln!("(history cleared)");
                continue;
            }
            "/stats" => {
                let u = s.caches()[0].usage();
                eprintln!(
                    "tokens held {} (position {}), KV {:.2} MiB, {:.3} bits per element, decode {:.1} tok/s",
                    s.held(),
                    s.pos,
                    kv_bytes(&s) as f64 / (1 << 20) as f64,
                    u.bits_per_element(s.caches()[0].config()),
                    gen_tokens as f64 / gen_secs.max(1e-9)
                );
                continue;
            }
            _ => {}
        }
        pending.extend(tok.encode(&format!("{}<|im_start|>assistant\n", chatml("user", msg)), false, true));
        let mut logits = s.feed(&pending).context("reading the message")?;
        pending.clear();
        let mut stream = Utf8Stream::default();
        let t = Instant::now();
        let mut n = 0;
        let mut out = std::io::stdout().lock();
        loop {
            let id = sampler.sample(&logits);
            if id == end || Some(id) == tok.eos || n >= a.n {
                // Close the turn in the cache: <|im_end|>\n.
                pending = vec![end];
                pending.extend(tok.encode("\n", false, false));
                break;
            }
            write!(out, "{}", stream.push(&tok.token_bytes(id)))?;
            out.flush()?;
            logits = s.feed(&[id])?;
            n += 1;
        }
        writeln!(out)?;
        gen_tokens += n;
        gen_secs += t.elapsed().as_secs_f64();
    }
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let model = load(&a.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let text = match (&a.file, &a.prompt) {
        (Some(f), _) => {
            let b = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            String::from_utf8(b).map_err(|e| {
                anyhow::anyhow!("{}: invalid UTF-8 at byte {}", f.display(), e.utf8_error().valid_up_to())
            })?
        }
        (None, Some(p)) => p.clone(),
        (None, None) => bail!("give -f FILE or -p TEXT"),
    };
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

fn info(a: ModelArgs) -> Result<()> {
    let model = load(&a)?;
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
        println!("tokenizer     byte-level BPE, pre-tokenizer {}, add BOS {}", t.pre, t.add_bos);
    }
    println!("\nKV cache per token (all {} layers), at {} tokens held:", c.n_layer, c.n_ctx_train);
    println!("{:8} {:>14} {:>12}", "preset", "bytes/token", "bits/elem");
    for p in PRESETS {
        let spec = KvSpec::parse(p).map_err(anyhow::Error::msg)?;
        let cfg = spec
            .config(c.n_kv_head, c.head_dim, c.n_ctx_train, Overflow::Stop)
            .map_err(anyhow::Error::msg)?;
        let counts = cfg.counts_after(c.n_ctx_train).map_err(|e| anyhow::anyhow!("{e}"))?;
        let u = cfg.usage(counts);
        println!(
            "{p:8} {:>14.1} {:>12.3}",
            (u.total_bytes() * c.n_layer) as f64 / c.n_ctx_train as f64,
            u.bits_per_element(&cfg)
        );
    }
    Ok(())
}

/// Prose whose tokens fill the cache in `kvq bench` (the speed does not depend on the text).
const FILL: &str = "It is a truth universally acknowledged, that a single man in possession of a good fortune, \
must be in want of a wife. However little known the feelings or views of such a man may be on his first entering \
a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered as \
the rightful property of some one or other of their daughters. ";

fn bench(a: BenchArgs) -> Result<()> {
    let model = load(&a.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let fill = tok.encode(FILL, false, false);
    let mut depths: Vec<usize> = a
        .depths
        .split(',')
        .map(|d| d.trim().parse())
        .collect::<std::result::Result<_, _>>()
        .context("--depths")?;
    depths.sort_unstable();
    let top = depths.last().copied().unwrap_or(0);
    let capacity = top + a.n + a.prefill + 1;
    let threads = rayon::current_num_threads();
    if !a.json {
        println!(
            "kvq bench: {} threads, {} kernels, weights {:.1} MB/token; decode {} tokens at each depth, then prefill {} (its depth is depth + {})",
            threads,
            model.kernel_name(),
            model.weight_bytes_per_token() as f64 / 1e6,
            a.n,
            a.prefill,
            a.n
        );
        println!("{:>10} {:>7} {:>12} {:>13} {:>10}", "kv", "depth", "decode t/s", "prefill t/s", "KV MiB");
    }
    let mut pos = 0usize;
    let mut next = |k: usize| -> Vec<u32> {
        let v: Vec<u32> = (0..k).map(|i| fill[(pos + i) % fill.len()]).collect();
        pos += k;
        v
    };
    for spec in a.kv.split(',') {
        let c =
            CacheArgs { kv: spec.trim().to_string(), ctx: Some(capacity), overflow: Some(OverflowArg::Stop) };
        let cfg = cache_config(&model, &c, Overflow::Stop)?;
        let mut arenas = model::arenas(&model, &cfg)?;
        let mut s = Session::new(&model, cfg, &mut arenas)?;
        for &d in &depths {
            while s.held() < d {
                let k = (d - s.held()).min(512);
                s.feed(&next(k))?;
            }
            let kv = kv_bytes(&s);
            // Decode: the first step also warms the caches; time the rest.
            let first = next(1);
            s.feed(&first)?;
            let t = Instant::now();
            for _ in 1..a.n {
                s.feed(&next(1))?;
            }
            let dec = (a.n - 1) as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            s.feed(&next(a.prefill))?;
            let pre = a.prefill as f64 / t.elapsed().as_secs_f64();
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"kv": spec, "depth": d, "threads": threads, "decode_tokens_per_s": dec,
                        "prefill_tokens": a.prefill, "prefill_tokens_per_s": pre, "kv_bytes": kv})
                );
            } else {
                println!("{spec:>10} {d:>7} {dec:>12.1} {pre:>13.1} {:>10.2}", kv as f64 / (1 << 20) as f64);
            }
        }
    }
    Ok(())
}
