//! Tiny GGUF models made in Rust, one per supported architecture: seeded random weights, a small
//! vocabulary and the architecture's chat template. `llama` and `qwen2` carry a byte-level BPE vocabulary
//! with a few merges and ChatML's control tokens; `gemma3` a SentencePiece vocabulary (byte fallback, a few
//! scored pieces, Gemma's turn tokens), local sliding-window layers and a global one. Tests that need a
//! model but not a real model's numbers run on them offline (chat's loop, the commands' errors, batched
//! prefill against decoding), and the fuzz targets take them as seeds. Their replies are noise, as random
//! weights give.

use crate::gguf::{Array, Value, Writer};

/// The shape of a tiny model.
#[derive(Clone, Copy, Debug)]
pub struct Tiny {
    /// Layers.
    pub n_layer: usize,
    /// Embedding width.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// KV heads.
    pub n_kv_head: usize,
    /// Feed-forward width.
    pub n_ff: usize,
    /// Training context (the default `-c`).
    pub n_ctx: usize,
    /// Seed of the weights.
    pub seed: u64,
    /// Gemma 3's sliding window: the tokens its local layers attend to (ignored by the other
    /// architectures).
    pub window: usize,
}

impl Default for Tiny {
    /// Two layers, 128 wide, 2 query heads over 1 KV head of dimension 64 (SmolLM2's, which every preset
    /// takes), a 512-token context; for Gemma 3 a 32-token window on the first layer, the second global.
    fn default() -> Self {
        Self { n_layer: 2, n_embd: 128, n_head: 2, n_kv_head: 1, n_ff: 256, n_ctx: 512, seed: 1, window: 32 }
    }
}

/// Pairs merged by the vocabulary, in rank order (GPT-2's byte characters: `Ġ` is a space).
const MERGES: [(&str, &str); 8] =
    [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("e", "r"), ("Ġ", "a"), ("o", "n")];

/// ChatML's control tokens, after the byte tokens and the merged ones.
pub const CONTROL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// xorshift64*, uniform in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The vocabulary: every byte, the merged pairs, then [`CONTROL`].
pub fn vocabulary() -> Vec<String> {
    let mut tokens: Vec<String> = crate::tokenizer::byte_chars().into_iter().map(String::from).collect();
    tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.extend(CONTROL.iter().map(|s| s.to_string()));
    tokens
}

/// Gemma's turn tokens, after its four specials (`<pad>`, `<eos>`, `<bos>`, `<unk>`).
pub const GEMMA_TURNS: [&str; 2] = ["<start_of_turn>", "<end_of_turn>"];

/// SentencePiece pieces of the Gemma vocabulary beyond the byte tokens, best score first: the space mark,
/// the lowercase letters, then merged pieces.
const GEMMA_PIECES: [&str; 8] = ["▁t", "he", "▁the", "in", "an", "er", "▁a", "on"];

/// Gemma's chat template, as far as kvq reads it (the turn markers).
const GEMMA_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n\
                              {{ m['content'] }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n";

/// The Gemma vocabulary: `<pad>`, `<eos>`, `<bos>`, `<unk>`, [`GEMMA_TURNS`], the 256 byte tokens
/// `<0xNN>`, then the pieces. Returns the tokens, their types and their scores.
fn gemma_vocabulary() -> (Vec<String>, Vec<u32>, Vec<f32>) {
    let mut tokens: Vec<String> =
        ["<pad>", "<eos>", "<bos>", "<unk>"].iter().map(|s| s.to_string()).collect();
    let mut types = vec![3u32, 3, 3, 2];
    tokens.extend(GEMMA_TURNS.iter().map(|s| s.to_string()));
    types.extend([3, 3]);
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    types.extend([6; 256]);
    let pieces: Vec<String> = std::iter::once("▁".to_string())
        .chain(('a'..='z').map(String::from))
        .chain(GEMMA_PIECES.map(String::from))
        .collect();
    types.extend(vec![1; pieces.len()]);
    let mut scores = vec![0.0f32; tokens.len()];
    scores.extend((0..pieces.len()).map(|i| -(i as f32)));
    tokens.extend(pieces);
    (tokens, types, scores)
}

/// The GGUF bytes of a tiny Llama of shape `t` (F32 tensors, output tied to the embeddings).
pub fn llama(t: &Tiny) -> Vec<u8> {
    build(t, "llama")
}

/// The GGUF bytes of a tiny Qwen2 of shape `t`: as [`llama`], with Q/K/V biases, RoPE base 1,000,000 and
/// the `qwen2` pre-tokenizer.
pub fn qwen2(t: &Tiny) -> Vec<u8> {
    build(t, "qwen2")
}

/// The GGUF bytes of a tiny Gemma 3 of shape `t`: a SentencePiece vocabulary, Q/K norms and post-norms,
/// every layer but the last local (attending to the last `t.window` tokens), RoPE bases 10,000 (local) and
/// 1,000,000 (global), and Gemma's turn template.
pub fn gemma3(t: &Tiny) -> Vec<u8> {
    build(t, "gemma3")
}

fn build(t: &Tiny, arch: &str) -> Vec<u8> {
    let hd = t.n_embd / t.n_head;
    let key = |k: &str| format!("{arch}.{k}");
    let mut w = Writer::default();
    w.kv("general.architecture", Value::Str(arch.into()))
        .kv("general.name", Value::Str(format!("kvq tiny {arch} (seed {})", t.seed)))
        .kv(&key("block_count"), Value::U64(t.n_layer as u64))
        .kv(&key("context_length"), Value::U64(t.n_ctx as u64))
        .kv(&key("embedding_length"), Value::U64(t.n_embd as u64))
        .kv(&key("feed_forward_length"), Value::U64(t.n_ff as u64))
        .kv(&key("attention.head_count"), Value::U64(t.n_head as u64))
        .kv(&key("attention.head_count_kv"), Value::U64(t.n_kv_head as u64));
    let n_vocab = if arch == "gemma3" {
        let (tokens, types, scores) = gemma_vocabulary();
        let id = |s: &str| tokens.iter().position(|x| x == s).unwrap_or(0) as u64;
        w.kv(&key("attention.key_length"), Value::U64(hd as u64))
            .kv(&key("attention.value_length"), Value::U64(hd as u64))
            .kv(&key("attention.sliding_window"), Value::U64(t.window as u64))
            .kv(&key("attention.sliding_window_pattern"), Value::U64(t.n_layer as u64))
            .kv(&key("rope.freq_base"), Value::F64(1_000_000.0))
            .kv(&key("attention.layer_norm_rms_epsilon"), Value::F64(1e-6))
            .kv("tokenizer.ggml.model", Value::Str("llama".into()))
            .kv("tokenizer.ggml.pre", Value::Str("default".into()))
            .kv("tokenizer.ggml.scores", Value::Array(Array::F32(scores)))
            .kv("tokenizer.ggml.token_type", Value::Array(Array::U32(types)))
            .kv("tokenizer.ggml.bos_token_id", Value::U64(id("<bos>")))
            .kv("tokenizer.ggml.eos_token_id", Value::U64(id("<eos>")))
            .kv("tokenizer.ggml.unknown_token_id", Value::U64(id("<unk>")))
            .kv("tokenizer.ggml.padding_token_id", Value::U64(id("<pad>")))
            .kv("tokenizer.ggml.add_bos_token", Value::Bool(true))
            .kv("tokenizer.ggml.add_space_prefix", Value::Bool(false))
            .kv("tokenizer.chat_template", Value::Str(GEMMA_TEMPLATE.into()));
        let n = tokens.len();
        w.kv("tokenizer.ggml.tokens", Value::Array(Array::Str(tokens)));
        n
    } else {
        let tokens = vocabulary();
        let n = tokens.len();
        let mut types = vec![1u32; n];
        types[n - CONTROL.len()..].fill(3);
        let id = |s: &str| tokens.iter().position(|x| x == s).unwrap_or(0) as u64;
        let qwen = arch == "qwen2";
        w.kv(&key("rope.freq_base"), Value::F64(if qwen { 1_000_000.0 } else { 10_000.0 }))
            .kv(&key("attention.layer_norm_rms_epsilon"), Value::F64(if qwen { 1e-6 } else { 1e-5 }))
            .kv("tokenizer.ggml.model", Value::Str("gpt2".into()))
            .kv("tokenizer.ggml.pre", Value::Str(if qwen { "qwen2" } else { "smollm" }.into()))
            .kv(
                "tokenizer.ggml.merges",
                Value::Array(Array::Str(MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect())),
            )
            .kv("tokenizer.ggml.token_type", Value::Array(Array::U32(types)))
            .kv("tokenizer.ggml.bos_token_id", Value::U64(id("<|im_start|>")))
            .kv("tokenizer.ggml.eos_token_id", Value::U64(id("<|im_end|>")))
            .kv("tokenizer.ggml.add_bos_token", Value::Bool(false))
            .kv(
                "tokenizer.chat_template",
                Value::Str(
                    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                        .into(),
                ),
            )
            .kv("tokenizer.ggml.tokens", Value::Array(Array::Str(tokens)));
        n
    };
    let mut rng = Rng(t.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let values = |rng: &mut Rng, n: usize, s: f32| -> Vec<u8> {
        (0..n).flat_map(|_| (rng.next() * s).to_le_bytes()).collect()
    };
    let matrix = |w: &mut Writer, rng: &mut Rng, name: &str, cols: usize, rows: usize| {
        let data = values(rng, cols * rows, 1.0 / (cols as f32).sqrt());
        w.tensor(name, &[cols as u64, rows as u64], 0, data);
    };
    let ones = |n: usize| -> Vec<u8> { (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect() };
    let (q_dim, kv_dim) = (t.n_head * hd, t.n_kv_head * hd);
    matrix(&mut w, &mut rng, "token_embd.weight", t.n_embd, n_vocab);
    for l in 0..t.n_layer {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        w.tensor(&n("attn_norm"), &[t.n_embd as u64], 0, ones(t.n_embd));
        matrix(&mut w, &mut rng, &n("attn_q"), t.n_embd, q_dim);
        matrix(&mut w, &mut rng, &n("attn_k"), t.n_embd, kv_dim);
        matrix(&mut w, &mut rng, &n("attn_v"), t.n_embd, kv_dim);
        matrix(&mut w, &mut rng, &n("attn_output"), q_dim, t.n_embd);
        w.tensor(&n("ffn_norm"), &[t.n_embd as u64], 0, ones(t.n_embd));
        matrix(&mut w, &mut rng, &n("ffn_gate"), t.n_embd, t.n_ff);
        matrix(&mut w, &mut rng, &n("ffn_up"), t.n_embd, t.n_ff);
        matrix(&mut w, &mut rng, &n("ffn_down"), t.n_ff, t.n_embd);
        match arch {
            "qwen2" => {
                for (s, len) in [("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)] {
                    let b = values(&mut rng, len, 0.1);
                    w.tensor(&format!("blk.{l}.{s}.bias"), &[len as u64], 0, b);
                }
            }
            "gemma3" => {
                for (s, len) in [
                    ("attn_q_norm", hd),
                    ("attn_k_norm", hd),
                    ("post_attention_norm", t.n_embd),
                    ("post_ffw_norm", t.n_embd),
                ] {
                    w.tensor(&n(s), &[len as u64], 0, ones(len));
                }
            }
            _ => {}
        }
    }
    w.tensor("output_norm.weight", &[t.n_embd as u64], 0, ones(t.n_embd));
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::{Tiny, gemma3, llama, qwen2};
    use crate::gguf::Gguf;
    use crate::tokenizer::Tokenizer;

    /// Each tiny model's file parses, its vocabulary tokenizes its chat turn with the turn tokens whole and
    /// text through the merges, and gives the text back; the bytes are seeded.
    #[test]
    fn tiny_model_files_and_vocabularies() {
        type Build = fn(&Tiny) -> Vec<u8>;
        let chatml = "<|im_start|>user\nsay the tin man<|im_end|>\n";
        let gemma = "<start_of_turn>user\nsay the tin man<end_of_turn>\n";
        let cases: [(Build, &str, &str, [&str; 2]); 3] = [
            (llama, "llama", chatml, ["Ġthe", "in"]),
            (qwen2, "qwen2", chatml, ["Ġthe", "in"]),
            (gemma3, "gemma3", gemma, ["▁the", "in"]),
        ];
        for (build, arch, text, merged) in cases {
            let file = build(&Tiny::default());
            let g = Gguf::parse(&file).unwrap();
            assert_eq!(g.get("general.architecture").and_then(|v| v.as_str()), Some(arch));
            let tok = Tokenizer::from_gguf(&g).unwrap();
            let ids = tok.encode(text, false, true);
            let turn = text.split('\n').next().unwrap().trim_end_matches("user");
            assert_eq!(ids[0], tok.id(turn).unwrap(), "{arch}: {ids:?}");
            for m in merged {
                assert!(ids.contains(&tok.id(m).unwrap()), "{arch}: {m} in {ids:?}");
            }
            assert_eq!(tok.decode(&ids), text, "{arch}");
            assert_eq!(build(&Tiny::default()), file, "{arch}: seeded, the same bytes each time");
            assert_ne!(build(&Tiny { seed: 2, ..Tiny::default() }), file, "{arch}");
        }
    }
}
