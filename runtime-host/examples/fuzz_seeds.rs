//! Writes the seed corpus of the GGUF fuzz target: small GGUF files built with `kvq_host::gguf::Writer`,
//! one per shape of input the reader and the tokenizers take. The vocabulary and tensor seeds go to
//! `fuzz/corpus/gguf/`, the three tiny models to `target/fuzz-seeds/gguf/`; neither is committed (binary
//! files are made, not tracked). `scripts/fuzz.sh` runs this first and gives the fuzzer both.
//!
//! ```text
//! cargo run -p kvq-host --example fuzz_seeds
//! ```

use kvq_host::gguf::{Array, Value, Writer};
use kvq_host::tiny::Tiny;
use std::path::Path;

fn bpe(w: &mut Writer) {
    // A byte-level vocabulary over a few letters, with merges and ChatML's control tokens.
    let mut tokens: Vec<String> = "abcdeĠ".chars().map(String::from).collect();
    tokens.extend(["ab", "abc", "Ġa", "<|im_start|>", "<|im_end|>"].map(String::from));
    let mut types = vec![1u32; tokens.len()];
    let n = types.len();
    types[n - 2] = 3;
    types[n - 1] = 3;
    w.kv("general.architecture", Value::Str("llama".into()))
        .kv("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::Str("smollm".into()))
        .kv("tokenizer.ggml.tokens", Value::Array(Array::Str(tokens)))
        .kv("tokenizer.ggml.token_type", Value::Array(Array::U32(types)))
        .kv(
            "tokenizer.ggml.merges",
            Value::Array(Array::Str(vec!["a b".into(), "ab c".into(), "Ġ a".into()])),
        )
        .kv("tokenizer.ggml.bos_token_id", Value::U64(9))
        .kv("tokenizer.ggml.eos_token_id", Value::U64(10));
}

fn spm(w: &mut Writer) {
    let mut tokens: Vec<String> =
        ["<unk>", "<s>", "</s>", "\u{2581}", "a", "b", "\u{2581}a", "ab"].map(String::from).to_vec();
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let mut types = vec![1u32; tokens.len()];
    types[0] = 2;
    types[1] = 3;
    types[2] = 3;
    for t in &mut types[8..] {
        *t = 6;
    }
    let scores: Vec<f32> = (0..tokens.len()).map(|i| -(i as f32)).collect();
    w.kv("general.architecture", Value::Str("gemma3".into()))
        .kv("tokenizer.ggml.model", Value::Str("llama".into()))
        .kv("tokenizer.ggml.tokens", Value::Array(Array::Str(tokens)))
        .kv("tokenizer.ggml.token_type", Value::Array(Array::U32(types)))
        .kv("tokenizer.ggml.scores", Value::Array(Array::F32(scores)))
        .kv("tokenizer.ggml.bos_token_id", Value::U64(1))
        .kv("tokenizer.ggml.eos_token_id", Value::U64(2));
}

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = root.join("fuzz/corpus/gguf");
    let models = root.join("target/fuzz-seeds/gguf");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&models)?;
    let mut w = Writer::default();
    bpe(&mut w);
    std::fs::write(dir.join("bpe-vocab.gguf"), w.finish())?;
    let mut w = Writer::default();
    spm(&mut w);
    std::fs::write(dir.join("spm-vocab.gguf"), w.finish())?;
    // Tensors of several ggml types (F32, F16, Q8_0, Q4_0) beside metadata of each scalar kind.
    let mut w = Writer::default();
    w.kv("general.name", Value::Str("seed".into()))
        .kv("llama.block_count", Value::U64(1))
        .kv("llama.rope.freq_base", Value::F64(10_000.0))
        .kv("llama.use_parallel_residual", Value::Bool(false))
        .kv("llama.offset", Value::I64(-3))
        .kv("general.tags", Value::Array(Array::U8(vec![1, 2, 3])))
        .tensor("f32", &[4, 2], 0, (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect())
        .tensor("f16", &[4], 1, vec![0, 60, 0, 64, 0, 66, 0, 68])
        .tensor("q8_0", &[32], 8, [vec![0, 60], (0..32u8).collect()].concat())
        .tensor("q4_0", &[32], 2, [vec![0, 60], vec![0x5a; 16]].concat());
    std::fs::write(dir.join("tensors.gguf"), w.finish())?;
    // Whole model files, as small as the shapes allow (one layer, one head of 32), one per architecture.
    let tiny =
        Tiny { n_layer: 1, n_embd: 32, n_head: 1, n_kv_head: 1, n_ff: 32, n_ctx: 64, seed: 3, window: 16 };
    std::fs::write(models.join("tiny-llama.gguf"), kvq_host::tiny::llama(&tiny))?;
    std::fs::write(models.join("tiny-qwen2.gguf"), kvq_host::tiny::qwen2(&tiny))?;
    std::fs::write(models.join("tiny-gemma3.gguf"), kvq_host::tiny::gemma3(&tiny))?;
    println!("wrote 3 seeds to {} and 3 to {}", dir.display(), models.display());
    Ok(())
}
