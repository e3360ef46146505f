//! kvq perplexity: perplexity, KL divergence and top-1 agreement against the f16 cache.

use super::*;

#[derive(Args)]
pub(crate) struct PerplexityArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) text: TextArgs,
    /// Tokens per chunk.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 2048)]
    pub(crate) ctx: usize,
    /// Most chunks to score (default: all the text holds).
    #[arg(long)]
    pub(crate) chunks: Option<usize>,
    /// Comma-separated KV specs; f16 (the baseline) is added when missing.
    #[arg(long, default_value = "f16,kivi2,kivi4")]
    pub(crate) kv: String,
    /// One JSON object per spec.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write an SVG plot of perplexity against bits per element here.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
}

pub(crate) fn perplexity(a: PerplexityArgs) -> Result<()> {
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
        let series: Vec<kvq_host::eval::plot::Series> = recs
            .iter()
            .map(|r| kvq_host::eval::plot::Series {
                label: r.spec.clone(),
                points: vec![(r.bits_per_element, r.ppl)],
            })
            .collect();
        kvq_host::eval::plot::chart(
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
