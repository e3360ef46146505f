//! A tiny Llama-architecture GGUF made in Rust: seeded random weights, a byte-level BPE vocabulary with a
//! few merges and ChatML's control tokens, and a ChatML template. Tests that need a model but not a real
//! model's numbers run on it offline (chat's loop, the commands' errors), and the fuzz targets take it as a
//! seed. Its replies are noise, as random weights give.

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
}

impl Default for Tiny {
    /// Two layers, 128 wide, 4 query heads over 2 KV heads of dimension 32 (the smallest every preset
    /// takes), a 512-token context.
    fn default() -> Self {
        Self { n_layer: 2, n_embd: 128, n_head: 4, n_kv_head: 2, n_ff: 256, n_ctx: 512, seed: 1 }
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

/// The GGUF bytes of a tiny model of shape `t` (F32 tensors, output tied to the embeddings).
pub fn llama(t: &Tiny) -> Vec<u8> {
    let tokens = vocabulary();
    let n_vocab = tokens.len();
    let mut types = vec![1u32; n_vocab];
    types[n_vocab - CONTROL.len()..].fill(3);
    let id = |s: &str| tokens.iter().position(|x| x == s).unwrap_or(0) as u64;
    let hd = t.n_embd / t.n_head;
    let mut w = Writer::default();
    w.kv("general.architecture", Value::Str("llama".into()))
        .kv("general.name", Value::Str(format!("kvq tiny llama (seed {})", t.seed)))
        .kv("llama.block_count", Value::U64(t.n_layer as u64))
        .kv("llama.context_length", Value::U64(t.n_ctx as u64))
        .kv("llama.embedding_length", Value::U64(t.n_embd as u64))
        .kv("llama.feed_forward_length", Value::U64(t.n_ff as u64))
        .kv("llama.attention.head_count", Value::U64(t.n_head as u64))
        .kv("llama.attention.head_count_kv", Value::U64(t.n_kv_head as u64))
        .kv("llama.rope.freq_base", Value::F64(10_000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F64(1e-5))
        .kv("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Value::Str("smollm".into()))
        .kv("tokenizer.ggml.merges", Value::Array(Array::Str(MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect())))
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
    let mut rng = Rng(t.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut matrix = |w: &mut Writer, name: &str, cols: usize, rows: usize| {
        let s = 1.0 / (cols as f32).sqrt();
        let data: Vec<u8> = (0..cols * rows).flat_map(|_| (rng.next() * s).to_le_bytes()).collect();
        w.tensor(name, &[cols as u64, rows as u64], 0, data);
    };
    let ones = |n: usize| -> Vec<u8> { (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect() };
    matrix(&mut w, "token_embd.weight", t.n_embd, n_vocab);
    for l in 0..t.n_layer {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        w.tensor(&n("attn_norm"), &[t.n_embd as u64], 0, ones(t.n_embd));
        matrix(&mut w, &n("attn_q"), t.n_embd, t.n_head * hd);
        matrix(&mut w, &n("attn_k"), t.n_embd, t.n_kv_head * hd);
        matrix(&mut w, &n("attn_v"), t.n_embd, t.n_kv_head * hd);
        matrix(&mut w, &n("attn_output"), t.n_head * hd, t.n_embd);
        w.tensor(&n("ffn_norm"), &[t.n_embd as u64], 0, ones(t.n_embd));
        matrix(&mut w, &n("ffn_gate"), t.n_embd, t.n_ff);
        matrix(&mut w, &n("ffn_up"), t.n_embd, t.n_ff);
        matrix(&mut w, &n("ffn_down"), t.n_ff, t.n_embd);
    }
    w.tensor("output_norm.weight", &[t.n_embd as u64], 0, ones(t.n_embd));
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::{Tiny, llama};
    use crate::gguf::Gguf;
    use crate::tokenizer::Tokenizer;

    /// The tiny model's file parses, its vocabulary tokenizes ChatML with the control tokens whole and
    /// text through the merges, and gives the text back.
    #[test]
    fn tiny_model_file_and_vocabulary() {
        let file = llama(&Tiny::default());
        let g = Gguf::parse(&file).unwrap();
        let tok = Tokenizer::from_gguf(&g).unwrap();
        let text = "<|im_start|>user\nsay the tin man<|im_end|>\n";
        let ids = tok.encode(text, false, true);
        assert_eq!(ids[0], tok.id("<|im_start|>").unwrap());
        assert!(ids.contains(&tok.id("Ġthe").unwrap()) && ids.contains(&tok.id("in").unwrap()), "{ids:?}");
        assert_eq!(tok.decode(&ids), text);
        assert_eq!(llama(&Tiny::default()), file, "seeded: the same bytes each time");
        assert_ne!(llama(&Tiny { seed: 2, ..Tiny::default() }), file);
    }
}
