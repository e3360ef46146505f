//! The evaluation harness, apart from the runtime: what `kvq perplexity`, `kvq retrieval`, `kvq demo`,
//! `kvq bench` and `kvq plot-quality` measure and draw, and the texts they measure on. Behind the `eval`
//! feature (on by default), so a program that only runs models can leave it out.
//!
//! - [`perplexity`](mod@perplexity): perplexity with KL divergence and top-1 agreement against the `f16` cache.
//! - [`retrieval`]: passkey and line retrieval cases and how a session does on them.
//! - [`demo`]: `kvq demo`'s document with its planted fact.
//! - [`texts`]: evaluation and calibration texts from Debian packages ([`rdata`] reads R's lazy-load
//!   databases).
//! - [`plot`]: SVG charts.

pub mod demo;
pub mod perplexity;
pub mod plot;
pub mod rdata;
pub mod retrieval;
pub mod texts;

pub use demo::{DEMO_ANSWER, DEMO_FACT, DEMO_QUESTION, demo_document, planted_document};
pub use perplexity::{BASELINE, PplRecord, log_softmax, perplexity};
pub use retrieval::{Case, Outcome, Task, make_case, run_case};

use crate::calib::{self, DEFAULT_CTX, DEFAULT_TEXT, DEFAULT_TOKENS, Weighting};
use crate::model::Model;
use anyhow::Result;
use std::path::PathBuf;

/// Calibrates `model` as `kvq calibrate` does by default ([`DEFAULT_TOKENS`] tokens of [`DEFAULT_TEXT`] in
/// chunks of [`DEFAULT_CTX`], uniform weights) and writes the file where presets look, unless it is there
/// already; returns its path. For what needs a calibration without asking for one (`kvq dump-qkv`, the
/// tests).
///
/// # Errors
/// Fetching the text, the forward pass, writing the file.
pub fn ensure_calibration(model: &Model) -> Result<PathBuf> {
    let out = calib::default_path(&model.sha256()?)?;
    if out.exists() {
        return Ok(out);
    }
    eprintln!(
        "kvq: no calibration for this model yet; calibrating on {DEFAULT_TEXT} first (a few minutes) -> {}",
        out.display()
    );
    let tok = crate::tokenizer::Tokenizer::from_gguf(&model.gguf)?;
    let tokens = tok.encode(&texts::text(DEFAULT_TEXT, false)?, true, false);
    let n = DEFAULT_TOKENS.min(tokens.len()) / DEFAULT_CTX * DEFAULT_CTX;
    calib::calibrate(model, &tokens[..n], DEFAULT_CTX, DEFAULT_TEXT, Weighting::Uniform, &|_, _| {})?
        .save(&out)?;
    Ok(out)
}
