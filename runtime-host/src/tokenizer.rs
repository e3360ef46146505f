//! Byte-level BPE from GGUF metadata (`tokenizer.ggml.model = gpt2`), following llama.cpp's
//! `llm_tokenizer_bpe`: special tokens are split out first, the text is cut by the model's pre-tokenizer
//! regexes (applied in sequence, each to the pieces of the one before, unmatched stretches kept as pieces),
//! each piece's bytes are mapped to GPT-2's printable characters and merged by rank.

use crate::gguf::{Gguf, Value};
use anyhow::{Context, Result, bail, ensure};
use fancy_regex::Regex;
use std::collections::HashMap;

/// llama.cpp's token attribute values in `tokenizer.ggml.token_type`.
const TYPE_NORMAL: i64 = 1;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// The GPT-2 pre-tokenizer pattern llama.cpp uses for `smollm`, `gpt2`-style vocabularies.
const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE tokenizer.
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<i64>,
    ids: HashMap<String, u32>,
    /// (left, right) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    regexes: Vec<Regex>,
    ignore_merges: bool,
    /// Special tokens to split out, longest first: (text, id, always).
    specials: Vec<(String, u32, bool)>,
    byte_char: [char; 256],
    char_byte: HashMap<char, u8>,
    /// BOS id, if the model has one.
    pub bos: Option<u32>,
    /// EOS id.
    pub eos: Option<u32>,
    /// Whether the metadata asks for BOS at the start.
    pub add_bos: bool,
    /// Pre-tokenizer name.
    pub pre: String,
}

/// GPT-2's reversible byte -> printable character map.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    out
}

fn str_array(g: &Gguf, key: &str) -> Result<Vec<String>> {
    let a = g
        .get(key)
        .and_then(Value::as_array)
        .with_context(|| format!("metadata {key} missing or not an array"))?;
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(str::to_owned).with_context(|| format!("metadata {key}[{i}] is not a string"))
        })
        .collect()
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    ///
    /// # Errors
    /// A tokenizer model other than `gpt2` (byte-level BPE), an unknown pre-tokenizer, malformed vocabulary
    /// or merges.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let model = g.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
        ensure!(model == "gpt2", "tokenizer model {model:?} is not supported (byte-level BPE, \"gpt2\", is)");
        let pre = g.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default").to_string();
        // llama.cpp's defaults per pre-tokenizer: the Llama 3 family adds BOS unless the metadata says no.
        let (pats, ignore_merges, bos_default): (Vec<&str>, bool, bool) = match pre.as_str() {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
                (vec![r"\p{N}", GPT2_RE], false, false)
            }
            "gpt-2" | "mpt" | "olmo" | "jais" => (vec![GPT2_RE], false, false),
            "llama-bpe" | "llama3" | "llama-v3" => (vec![LLAMA3_RE], true, true),
            "dbrx" | "smaug-bpe" => (vec![LLAMA3_RE], false, false),
            "qwen2" | "stablelm2" | "hunyuan" => (vec![QWEN2_RE], false, false),
            p => bail!(
                "pre-tokenizer {p:?} is not supported (smollm, gpt-2, llama-bpe and qwen2 families are)"
            ),
        };
        let regexes = pats
            .iter()
            .map(|p| Regex::new(p).map_err(|e| anyhow::anyhow!("pre-tokenizer regex: {e}")))
            .collect::<Result<Vec<_>>>()?;
        let tokens = str_array(g, "tokenizer.ggml.tokens")?;
        ensure!(!tokens.is_empty() && tokens.len() < (1 << 24), "vocabulary of {} tokens", tokens.len());
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a.iter().map(|v| v.as_f64().map_or(TYPE_NORMAL, |x| x as i64)).collect(),
            None => vec![TYPE_NORMAL; tokens.len()],
        };
        ensure!(
            types.len() == tokens.len(),
            "token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        );
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let merge_list = str_array(g, "tokenizer.ggml.merges")?;
        let mut merges = HashMap::with_capacity(merge_list.len());
        for (rank, m) in merge_list.iter().enumerate() {
            let (a, b) = m.split_once(' ').with_context(|| format!("merge #{rank} {m:?} has no space"))?;
            let (Some(&ia), Some(&ib), Some(&ij)) = (ids.get(a), ids.get(b), ids.get(&format!("{a}{b}")))
            else {
                continue; // a merge whose parts are not tokens can never apply
            };
            merges.entry((ia, ib)).or_insert((rank as u32, ij));
        }
        let mut specials: Vec<(String, u32, bool)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, ty))| (**ty == TYPE_CONTROL || **ty == TYPE_USER_DEFINED) && !t.is_empty())
            .map(|(i, (t, ty))| (t.clone(), i as u32, *ty == TYPE_USER_DEFINED))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let id = |k: &str| {
            g.get(k).and_then(Value::as_u64).map(|v| v as u32).filter(|&v| (v as usize) < tokens.len())
        };
        let byte_char = byte_chars();
        let char_byte = byte_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        Ok(Self {
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: match g.get("tokenizer.ggml.add_bos_token") {
                Some(Value::Bool(b)) => *b,
                _ => bos_default,
            },
            tokens,
            types,
            ids,
            merges,
            regexes,
            ignore_merges,
            specials,
            byte_char,
            char_byte,
            pre,
        })
    }

    /// Vocabulary size.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the vocabulary is empty (never, once built).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The id of a token's exact text.
    pub fn id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Whether `id` is a control token (end of turn, BOS, ...).
    pub fn is_control(&self, id: u32) -> bool {
        self.types.get(id as usize) == Some(&TYPE_CONTROL)
    }

    /// Token ids of `text`. With `parse_special`, control tokens written in the text (`<|im_start|>`) become
    /// their ids, as llama.cpp's `--parse-special`/chat prompts do; user-defined tokens always do. BOS is
    /// prepended only when `add_bos` and the metadata asks for it.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_bos && self.add_bos {
            out.extend(self.bos);
        }
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest special token; at one position the longest (the list is sorted by length).
            let mut best: Option<(usize, &(String, u32, bool))> = None;
            for s in self.specials.iter().filter(|s| parse_special || s.2) {
                if let Some(p) = rest.find(s.0.as_str())
                    && best.is_none_or(|(bp, _)| p < bp)
                {
                    best = Some((p, s));
                }
            }
            match best {
                Some((p, s)) => {
                    self.encode_text(&rest[..p], &mut out);
                    out.push(s.1);
                    rest = &rest[p + s.0.len()..];
                }
                None => {
                    self.encode_text(rest, &mut out);
                    break;
                }
            }
        }
        out
    }

    fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::new();
            for p in pieces {
                let mut at = 0;
                for m in re.find_iter(p) {
                    let Ok(m) = m else { break };
                    if m.start() > at {
                        next.push(&p[at..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(m.as_str());
                    }
                    at = m.end();
                }
                if at < p.len() {
                    next.push(&p[at..]);
                }
            }
            pieces = next;
        }
        pieces
    }

    fn encode_text(&self, text: &str, out: &mut Vec<u32>) {
        for piece in self.split(text) {
            let mapped: String = piece.bytes().map(|b| self.byte_char[b as usize]).collect();
            if self.ignore_merges
                && let Some(&id) = self.ids.get(&mapped)
            {
                out.push(id);
                continue;
            }
            let mut syms: Vec<u32> = Vec::with_capacity(mapped.len());
            for ch in mapped.chars() {
                let mut buf = [0u8; 4];
                // A byte-level vocabulary has a token for every byte; llama.cpp maps a missing one to id 0.
                syms.push(self.ids.get(ch.encode_utf8(&mut buf) as &str).copied().unwrap_or(0));
            }
            loop {
                let mut best: Option<(u32, usize, u32)> = None;
                for i in 0..syms.len().saturating_sub(1) {
                    if let Some(&(rank, id)) = self.merges.get(&(syms[i], syms[i + 1]))
                        && best.is_none_or(|(r, _, _)| rank < r)
                    {
                        best = Some((rank, i, id));
                    }
                }
                let Some((_, i, id)) = best else { break };
                syms[i] = id;
                syms.remove(i + 1);
            }
            out.extend(syms);
        }
    }

    /// The bytes token `id` stands for (control tokens as their text; none for an unknown id).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(t) = self.tokens.get(id as usize) else { return Vec::new() };
        if self.types[id as usize] != TYPE_NORMAL {
            return t.as_bytes().to_vec();
        }
        t.chars().map(|c| self.char_byte.get(&c).copied().unwrap_or(b'?')).collect()
    }

    /// Text of `ids` (invalid UTF-8 sequences replaced by U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_bytes(i)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Turns a stream of token bytes into complete UTF-8 text, holding back a split multi-byte character.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes; returns the text that is complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_owned();
                self.pending.clear();
                s
            }
            Err(e) => {
                let good = e.valid_up_to();
                // An invalid sequence (not merely incomplete) is replaced and skipped.
                let cut = match e.error_len() {
                    Some(bad) => good + bad,
                    None => good,
                };
                let mut s = String::from_utf8_lossy(&self.pending[..cut]).into_owned();
                self.pending.drain(..cut);
                if e.error_len().is_some() {
                    s.push_str(&self.push(&[]));
                }
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let m = byte_chars();
        let set: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        assert_eq!(m[b'a' as usize], 'a');
    }

    #[test]
    fn utf8_stream_holds_split_characters() {
        let mut s = Utf8Stream::default();
        let e = "é".as_bytes();
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..]), "é");
        assert_eq!(s.push(&[0xff, b'a']), "\u{fffd}a");
    }
}
