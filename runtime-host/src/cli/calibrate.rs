//! kvq calibrate: the calibrated formats' tables, measured on a calibration text.

use super::*;

#[derive(Args)]
pub(crate) struct CalibrateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Calibration text file (UTF-8); never an evaluation text.
    #[arg(short = 'f', long, conflicts_with = "text")]
    pub(crate) file: Option<PathBuf>,
    /// A fetched calibration text: emma (default) or mansfieldpark.
    #[arg(long)]
    pub(crate) text: Option<String>,
    /// Tokens to calibrate on (whole chunks of --ctx-size).
    #[arg(long, default_value_t = kvq_host::calib::DEFAULT_TOKENS)]
    pub(crate) tokens: usize,
    /// Tokens per chunk (a fresh context each).
    #[arg(short = 'c', long = "ctx-size", default_value_t = kvq_host::calib::DEFAULT_CTX)]
    pub(crate) ctx: usize,
    /// Where to write the file (default: `$KVQ_CACHE/calib/<model sha256>.json`, where presets look).
    #[arg(short = 'o', long)]
    pub(crate) out: Option<PathBuf>,
    /// How the codebooks' k-means weighs elements: fisher (squared loss gradients from a backward pass
    /// through the model, as KVQuant) or uniform.
    #[arg(long, value_enum, default_value_t = kvq_host::calib::Weighting::Fisher)]
    pub(crate) weights: kvq_host::calib::Weighting,
}

/// Evaluation texts, which calibration must never see.
pub(crate) const EVALUATION_TEXTS: [&str; 3] = ["prideprejudice", "persuasion", "jargon"];

pub(crate) fn calibrate(a: CalibrateArgs) -> Result<()> {
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
            (t.to_string(), kvq_host::eval::texts::text(t, false)?)
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
