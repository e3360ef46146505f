//! kvq generate: a prompt in, the continuation streamed out.

use super::*;

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) run: RunArgs,
    /// Prompt; control tokens such as <|im_start|> are parsed as special tokens.
    #[arg(short = 'p', long, required_unless_present = "file", conflicts_with = "file")]
    pub(crate) prompt: Option<String>,
    /// Read the prompt from a UTF-8 file instead (not echoed; a bar shows the prefill's progress).
    #[arg(short = 'f', long)]
    pub(crate) file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    pub(crate) n: usize,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// Print one JSON object (prompt_ids, generated_ids, text, timings) instead of streaming.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn generate(a: GenerateArgs) -> Result<()> {
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
