//! kvq dump-qkv: one layer's attention inputs for the firmware demo.

use super::*;

#[derive(Args)]
pub(crate) struct DumpArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[command(flatten)]
    pub(crate) text: TextArgs,
    /// Tokens to run (from the start of the text; default Persuasion).
    #[arg(long, default_value_t = kvq_host::dump::DEFAULT_TOKENS)]
    pub(crate) tokens: usize,
    /// The layer whose attention inputs are written.
    #[arg(long, default_value_t = kvq_host::dump::DEFAULT_LAYER)]
    pub(crate) layer: usize,
    /// Output file.
    #[arg(short = 'o', long)]
    pub(crate) out: PathBuf,
}

pub(crate) fn dump_qkv(a: DumpArgs) -> Result<()> {
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
    kvq_host::eval::ensure_calibration(&model)?;
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
