//! The library's errors: what went wrong, with the value the caller gave. The words of the command line
//! (flag names such as `--kv`) are the binary's to add; [`Error::Spec`] carries whether the spec was for
//! the layers that hold the whole context or for Gemma 3's local layers, so the binary can name its flag.

use std::path::PathBuf;

/// An error of `kvq-host`'s runtime: loading a model, tokenizing, parsing or fitting a KV-cache spec,
/// running the forward pass.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that could not be opened, mapped or read.
    #[error("{}: {reason}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        reason: std::io::Error,
    },
    /// A GGUF file whose bytes do not parse.
    #[error("reading {}: {reason}", path.display())]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: crate::gguf::GgufError,
    },
    /// A model file that parses but that kvq cannot run: an unsupported architecture or shape, a missing
    /// or malformed tensor or metadata key.
    #[error("{0}")]
    Model(String),
    /// A vocabulary in the model file that kvq cannot tokenize with.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A KV-cache spec that does not parse, or does not fit the model.
    #[error("KV spec {spec:?}: {reason}")]
    Spec {
        /// The spec as given.
        spec: String,
        /// Why it was refused.
        reason: String,
        /// Whether it was the spec of Gemma 3's local (sliding-window) layers.
        local: bool,
    },
    /// A token id outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    Token {
        /// The id.
        id: u32,
        /// The vocabulary's size.
        vocab: usize,
    },
    /// A context that stops when full has no room for the tokens fed.
    #[error("the context is full: it holds {held} of {capacity} tokens and {needed} more were fed")]
    ContextFull {
        /// Tokens held.
        held: usize,
        /// The context's capacity.
        capacity: usize,
        /// Tokens that did not fit.
        needed: usize,
    },
    /// An activation that is NaN or infinite: broken weights or input.
    #[error("layer {layer}: activation {index} is {value} (NaN/Inf); the model or input is broken")]
    NonFinite {
        /// The layer.
        layer: usize,
        /// The activation's index.
        index: usize,
        /// Its value.
        value: f32,
    },
    /// The KV cache or attention refused (an arena too small, a shape the format cannot take).
    #[error("{what}: {reason}")]
    Cache {
        /// Which cache or layer.
        what: String,
        /// The core's reason.
        reason: kvq_core::Error,
    },
    /// A KV cache larger than the memory available.
    #[error(
        "a KV cache of {tokens} tokens needs {need_mib} MiB, more than the {avail_mib} MiB of memory available"
    )]
    Memory {
        /// The context asked for.
        tokens: usize,
        /// What its caches need.
        need_mib: u128,
        /// What the system has available.
        avail_mib: u64,
    },
    /// Memory that could not be allocated.
    #[error("{what}: cannot allocate {mib} MiB (a smaller context needs less)")]
    Alloc {
        /// What it was for.
        what: &'static str,
        /// How much was asked for.
        mib: usize,
    },
    /// A calibration file that is missing, unreadable or for another model.
    #[error("{0}")]
    Calibration(String),
}

impl Error {
    /// The same error, a spec error marked as the spec of Gemma 3's local layers (`--kv-local`).
    pub fn for_local_layers(self) -> Self {
        match self {
            Error::Spec { spec, reason, .. } => Error::Spec { spec, reason, local: true },
            e => e,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns early with `Error::$variant(format!(...))` unless the condition holds (`Model`, `Tokenizer`).
macro_rules! ensure_as {
    ($variant:ident, $cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::error::Error::$variant(format!($($arg)+)));
        }
    };
}

/// Returns early with `Error::$variant(format!(...))`.
macro_rules! bail_as {
    ($variant:ident, $($arg:tt)+) => {
        return Err($crate::error::Error::$variant(format!($($arg)+)))
    };
}

pub(crate) use {bail_as, ensure_as};
