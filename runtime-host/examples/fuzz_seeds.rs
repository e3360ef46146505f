//! The fuzz targets' seeds. Two kinds:
//!
//! - Small GGUF files built with `kvq_host::gguf::Writer`, one per shape of input the reader and the
//!   tokenizers take: the vocabulary and tensor seeds go to `fuzz/corpus/gguf/`, the three tiny models to
//!   `target/fuzz-seeds/gguf/`. They are made here, deterministically, each run.
//! - The committed corpus: `fuzz/seeds/<target>.hex`, the inputs a fuzzing run kept (minimized with
//!   `cargo fuzz cmin`), one per line in hex, so that git holds text only. Each run unpacks them into
//!   `fuzz/corpus/<target>/`; `runtime-host/tests/fuzz_corpus.rs` replays the GGUF ones in the test suite.
//!
//! `scripts/fuzz.sh` runs this first and gives the fuzzer both. To refresh the committed corpus after a
//! run, minimize it and pack it (inputs over `--max-bytes`, default 4096, are left out):
//!
//! ```text
//! cargo run -p kvq-host --example fuzz_seeds                          # make and unpack the seeds
//! cargo run -p kvq-host --example fuzz_seeds -- --pack gguf DIR       # DIR's inputs to fuzz/seeds/gguf.hex
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

/// The fuzz targets.
const TARGETS: [&str; 4] = ["gguf", "tokenizer", "kvspec", "cache"];

/// Writes `dir`'s inputs of at most `max` bytes to `out`, one per line in hex, sorted (so that a refresh
/// changes only the lines that changed), after a header naming what they are.
fn pack(target: &str, dir: &Path, out: &Path, max: usize) -> std::io::Result<()> {
    let mut inputs = Vec::new();
    let mut skipped = 0;
    for e in std::fs::read_dir(dir)? {
        let data = std::fs::read(e?.path())?;
        if data.len() <= max {
            inputs.push(data);
        } else {
            skipped += 1;
        }
    }
    inputs.sort();
    inputs.dedup();
    let mut text = format!(
        "# The {target} fuzz target's corpus: one input per line, in hex ({} inputs of at most {max} bytes).\n\
         # Written by `cargo run -p kvq-host --example fuzz_seeds -- --pack {target} DIR`; see that example.\n",
        inputs.len()
    );
    for d in &inputs {
        for b in d {
            text.push_str(&format!("{b:02x}"));
        }
        text.push('\n');
    }
    std::fs::write(out, text)?;
    println!("packed {} inputs into {} ({skipped} over {max} bytes left out)", inputs.len(), out.display());
    Ok(())
}

/// Each committed `fuzz/seeds/<target>.hex` unpacked into `fuzz/corpus/<target>/`, one file per line.
fn unpack(root: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for t in TARGETS {
        let Ok(text) = std::fs::read_to_string(root.join(format!("fuzz/seeds/{t}.hex"))) else { continue };
        let dir = root.join("fuzz/corpus").join(t);
        std::fs::create_dir_all(&dir)?;
        for (i, line) in text.lines().filter(|l| !l.starts_with('#')).enumerate() {
            let data = decode_hex(line).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("fuzz/seeds/{t}.hex: line {i} is not hex"),
                )
            })?;
            std::fs::write(dir.join(format!("committed-{i:04}")), data)?;
            n += 1;
        }
    }
    Ok(n)
}

/// `line` as bytes, if it is an even number of hex digits.
fn decode_hex(line: &str) -> Option<Vec<u8>> {
    let b = line.trim().as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2).map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok()).collect()
}

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--pack") {
        let (Some(target), Some(dir)) = (args.get(1), args.get(2)) else {
            eprintln!("usage: fuzz_seeds --pack TARGET DIR [--max-bytes N]");
            std::process::exit(2);
        };
        if !TARGETS.contains(&target.as_str()) {
            eprintln!("unknown target {target} (one of {})", TARGETS.join(", "));
            std::process::exit(2);
        }
        let max = match args.get(3).map(String::as_str) {
            Some("--max-bytes") => args.get(4).and_then(|n| n.parse().ok()).unwrap_or_else(|| {
                eprintln!("--max-bytes takes a number");
                std::process::exit(2)
            }),
            _ => 4096,
        };
        std::fs::create_dir_all(root.join("fuzz/seeds"))?;
        return pack(target, Path::new(dir), &root.join(format!("fuzz/seeds/{target}.hex")), max);
    }
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
    let committed = unpack(&root)?;
    println!(
        "wrote 3 seeds to {} and 3 to {}; unpacked {committed} committed inputs from fuzz/seeds",
        dir.display(),
        models.display()
    );
    Ok(())
}
