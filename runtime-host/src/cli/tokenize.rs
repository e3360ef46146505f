//! kvq tokenize: token ids of a text.

use super::*;

#[derive(Args)]
pub(crate) struct TokenizeArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// File to tokenize.
    #[arg(short = 'f', long)]
    pub(crate) file: Option<PathBuf>,
    /// Text to tokenize (instead of a file).
    #[arg(short = 'p', long)]
    pub(crate) prompt: Option<String>,
    /// Treat control-token text as plain text.
    #[arg(long)]
    pub(crate) no_parse_special: bool,
    /// Print {"ids": [...]}.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn tokenize(a: TokenizeArgs) -> Result<()> {
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
