//! kvq on the CPU: real GGUF models (Llama family), their tokenizer, and generation over `kvq-core`'s
//! quantized KV cache.
//!
//! - [`gguf`]: the file reader (hostile input, every offset checked).
//! - [`quants`], [`kernels`]: ggml weight blocks and their dot products (scalar reference, AVX2/FMA).
//! - [`tokenizer`]: byte-level BPE matching llama.cpp's ids.
//! - [`model`]: the forward pass and [`model::Session`], one conversation's caches.
//! - [`chat`]: one conversation driven a line at a time (`kvq chat`'s loop, without the terminal).
//! - [`error`]: the library's typed errors.
//! - [`kvspec`]: the `--kv` grammar; [`sample`]: token sampling; [`fetch`]: the default model.
//! - [`calib`]: `kvq calibrate`'s tables for the calibrated cache formats; [`grad`]: the loss's gradient
//!   with respect to keys and values (Fisher weights for the codebooks).
//! - [`dump`]: one layer's attention inputs for the firmware demo (`kvq dump-qkv`).
//! - [`tiny`]: a tiny Llama GGUF with random weights, made in Rust, for tests and fuzz seeds.
//! - [`eval`] (feature `eval`, on by default): the evaluation harness apart from the runtime: perplexity,
//!   retrieval, the demo's document, the texts they read and the charts they draw.

pub mod calib;
pub mod chat;
pub mod dump;
pub mod error;
#[cfg(feature = "eval")]
pub mod eval;
pub mod fetch;
pub mod gguf;
pub mod grad;
pub mod kernels;
pub mod kvspec;
pub mod model;
pub mod quants;
pub mod sample;
pub mod tiny;
pub mod tokenizer;
