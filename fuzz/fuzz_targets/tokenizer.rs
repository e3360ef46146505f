//! The tokenizers over random vocabularies (byte-level BPE with random merges, SentencePiece with random
//! scores and token types) and random text: building one gives a tokenizer or an error; encoding gives ids
//! inside the vocabulary, and decoding them never panics. With the default model's own vocabulary (when
//! `KVQ_FUZZ_MODEL` names its GGUF), byte-level BPE must give back the text it encoded, unless the text
//! holds a byte the vocabulary has no token for.

#![no_main]

use arbitrary::Arbitrary;
use kvq_host::gguf::{Array, Gguf, Value, Writer};
use kvq_host::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

#[derive(Arbitrary, Debug)]
struct Input {
    spm: bool,
    pre: u8,
    tokens: Vec<String>,
    types: Vec<u8>,
    merges: Vec<(u16, u16)>,
    scores: Vec<f32>,
    text: String,
    special: bool,
}

fn real() -> Option<&'static Tokenizer> {
    static T: OnceLock<Option<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        let path = std::env::var_os("KVQ_FUZZ_MODEL")?;
        let bytes = std::fs::read(path).ok()?;
        Tokenizer::from_gguf(&Gguf::parse(&bytes).ok()?).ok()
    })
    .as_ref()
}

fuzz_target!(|inp: Input| {
    if let Some(tok) = real() {
        let ids = tok.encode(&inp.text, false, false);
        // SmolLM2's vocabulary lacks a few control bytes (0x16, for one); those become id 0, as in
        // llama.cpp, and cannot come back. Every other text must.
        if !ids.contains(&0) {
            assert_eq!(tok.decode(&ids), inp.text, "byte-level BPE gives back its text");
        }
    }
    let n = inp.tokens.len().min(512);
    if n == 0 {
        return;
    }
    let tokens: Vec<String> = inp.tokens[..n].to_vec();
    let types: Vec<u32> = (0..n).map(|i| u32::from(inp.types.get(i).copied().unwrap_or(1) % 7)).collect();
    let merges: Vec<String> = inp
        .merges
        .iter()
        .take(1024)
        .map(|&(a, b)| format!("{} {}", tokens[usize::from(a) % n], tokens[usize::from(b) % n]))
        .collect();
    let pre = ["smollm", "gpt-2", "llama-bpe", "qwen2", "default"][usize::from(inp.pre) % 5];
    let mut w = Writer::default();
    w.kv("tokenizer.ggml.model", Value::Str(if inp.spm { "llama" } else { "gpt2" }.into()))
        .kv("tokenizer.ggml.pre", Value::Str(pre.into()))
        .kv("tokenizer.ggml.tokens", Value::Array(Array::Str(tokens)))
        .kv("tokenizer.ggml.token_type", Value::Array(Array::U32(types)))
        .kv("tokenizer.ggml.merges", Value::Array(Array::Str(merges)))
        .kv("tokenizer.ggml.bos_token_id", Value::U64(0));
    if inp.spm {
        let scores: Vec<f32> = (0..n).map(|i| inp.scores.get(i).copied().unwrap_or(0.0)).collect();
        w.kv("tokenizer.ggml.scores", Value::Array(Array::F32(scores)));
    }
    let file = w.finish();
    let g = Gguf::parse(&file).expect("the writer's own file parses");
    let Ok(tok) = Tokenizer::from_gguf(&g) else { return };
    let ids = tok.encode(&inp.text, true, inp.special);
    assert!(ids.iter().all(|&id| (id as usize) < n), "ids inside the vocabulary");
    let _ = tok.decode(&ids);
});
