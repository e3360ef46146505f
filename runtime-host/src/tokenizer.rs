//! The tokenizers GGUF files describe, as llama.cpp implements them.
//!
//! Byte-level BPE (`tokenizer.ggml.model = gpt2`, llama.cpp's `llm_tokenizer_bpe`): special tokens are split
//! out first, the text is cut by the model's pre-tokenizer regexes (applied in sequence, each to the pieces
//! of the one before, unmatched stretches kept as pieces), each piece's bytes are mapped to GPT-2's
//! printable characters and merged by rank.
//!
//! SentencePiece (`llama`, llama.cpp's `llm_tokenizer_spm`): special tokens are partitioned out longest
//! first over the whole text (user-defined ones always, control ones with special parsing); in each text
//! fragment spaces become U+2581 (with a leading one only where the metadata asks for a space prefix), the
//! fragment is cut into characters and adjacent pairs that are tokens merge highest score first (ties to
//! the leftmost); characters no token covers become `<0xNN>` byte tokens.

use crate::error::{Error, Result};
use crate::gguf::{Gguf, Value};
use aho_corasick::{AhoCorasick, MatchKind};

use crate::error::{bail_as, ensure_as};

/// `ensure_as!(Tokenizer, ...)`.
macro_rules! ensure {
    ($($arg:tt)+) => { ensure_as!(Tokenizer, $($arg)+) };
}

/// `bail_as!(Tokenizer, ...)`.
macro_rules! bail {
    ($($arg:tt)+) => { bail_as!(Tokenizer, $($arg)+) };
}
use fancy_regex::Regex;
use std::collections::HashMap;

/// llama.cpp's token attribute values in `tokenizer.ggml.token_type`.
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// SentencePiece's escaped space, U+2581.
const SPM_SPACE: &str = "\u{2581}";

/// The GPT-2 pre-tokenizer pattern llama.cpp uses for `smollm`, `gpt2`-style vocabularies.
const GPT2_RE: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_RE: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer's algorithm and its tables.
enum Kind {
    /// Byte-level BPE.
    Bpe {
        /// (left, right) -> (rank, merged id).
        merges: HashMap<(u32, u32), (u32, u32)>,
        regexes: Vec<Regex>,
        ignore_merges: bool,
        byte_char: [char; 256],
        char_byte: HashMap<char, u8>,
    },
    /// SentencePiece with byte fallback.
    Spm {
        scores: Vec<f32>,
        /// The `<0xNN>` token of each byte (else the byte's one-character token, else unknown).
        byte_ids: [u32; 256],
        add_space_prefix: bool,
    },
}

/// A tokenizer: byte-level BPE or SentencePiece.
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<i64>,
    ids: HashMap<String, u32>,
    kind: Kind,
    /// Special tokens to split out, longest first, and their automata.
    specials: Specials,
    /// BOS id, if the model has one.
    pub bos: Option<u32>,
    /// EOS id.
    pub eos: Option<u32>,
    /// Whether the metadata asks for BOS at the start.
    pub add_bos: bool,
    /// Pre-tokenizer name (`spm` for SentencePiece).
    pub pre: String,
}

/// GPT-2's reversible byte -> printable character map.
pub(crate) fn byte_chars() -> [char; 256] {
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
        .ok_or_else(|| Error::Tokenizer(format!("metadata {key} missing or not an array")))?;
    Ok(a.as_strs()
        .ok_or_else(|| Error::Tokenizer(format!("metadata {key} is not an array of strings")))?
        .to_vec())
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    ///
    /// # Errors
    /// A tokenizer model other than `gpt2` (byte-level BPE), an unknown pre-tokenizer, malformed vocabulary
    /// or merges.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let model = g.get("tokenizer.ggml.model").and_then(Value::as_str).unwrap_or("");
        match model {
            "gpt2" => Self::bpe(g),
            "llama" => Self::spm(g),
            m => bail!(
                "tokenizer model {m:?} is not supported (byte-level BPE, \"gpt2\", and SentencePiece, \"llama\", are)"
            ),
        }
    }

    /// The vocabulary and token types, checked.
    fn vocab(g: &Gguf) -> Result<(Vec<String>, Vec<i64>)> {
        let tokens = str_array(g, "tokenizer.ggml.tokens")?;
        ensure!(!tokens.is_empty() && tokens.len() < (1 << 24), "vocabulary of {} tokens", tokens.len());
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a
                .to_f64()
                .ok_or_else(|| {
                    Error::Tokenizer("tokenizer.ggml.token_type is not an array of numbers".into())
                })?
                .into_iter()
                .map(|x| x as i64)
                .collect(),
            None => vec![TYPE_NORMAL; tokens.len()],
        };
        ensure!(
            types.len() == tokens.len(),
            "token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        );
        Ok((tokens, types))
    }

    fn bpe(g: &Gguf) -> Result<Self> {
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
            .map(|p| Regex::new(p).map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        let (tokens, types) = Self::vocab(g)?;
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.entry(t.clone()).or_insert(i as u32);
        }
        let merge_list = str_array(g, "tokenizer.ggml.merges")?;
        let mut merges = HashMap::with_capacity(merge_list.len());
        for (rank, m) in merge_list.iter().enumerate() {
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| Error::Tokenizer(format!("merge #{rank} {m:?} has no space")))?;
            let (Some(&ia), Some(&ib), Some(&ij)) = (ids.get(a), ids.get(b), ids.get(&format!("{a}{b}")))
            else {
                continue; // a merge whose parts are not tokens can never apply
            };
            merges.entry((ia, ib)).or_insert((rank as u32, ij));
        }
        let specials = Specials::new(specials(&tokens, &types, false), MatchKind::LeftmostLongest)?;
        let byte_char = byte_chars();
        let char_byte = byte_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        Ok(Self {
            bos: special_id(g, "tokenizer.ggml.bos_token_id", tokens.len()),
            eos: special_id(g, "tokenizer.ggml.eos_token_id", tokens.len()),
            add_bos: match g.get("tokenizer.ggml.add_bos_token") {
                Some(Value::Bool(b)) => *b,
                _ => bos_default,
            },
            tokens,
            types,
            ids,
            kind: Kind::Bpe { merges, regexes, ignore_merges, byte_char, char_byte },
            specials,
            pre,
        })
    }

    fn spm(g: &Gguf) -> Result<Self> {
        let (tokens, types) = Self::vocab(g)?;
        let scores: Vec<f32> = match g.get("tokenizer.ggml.scores").and_then(Value::as_array) {
            Some(a) => a
                .to_f64()
                .ok_or_else(|| Error::Tokenizer("tokenizer.ggml.scores is not an array of numbers".into()))?
                .into_iter()
                .map(|x| x as f32)
                .collect(),
            None => bail!("a SentencePiece vocabulary without tokenizer.ggml.scores"),
        };
        ensure!(scores.len() == tokens.len(), "{} scores for {} tokens", scores.len(), tokens.len());
        ensure!(scores.iter().all(|s| s.is_finite()), "tokenizer.ggml.scores holds NaN or infinite values");
        // llama.cpp's map keeps the last id of a repeated text.
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            ids.insert(t.clone(), i as u32);
        }
        let unk = special_id(g, "tokenizer.ggml.unknown_token_id", tokens.len()).unwrap_or(0);
        let mut byte_ids = [unk; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let ch = [b as u8];
            let one = std::str::from_utf8(&ch).ok().and_then(|c| ids.get(c));
            if let Some(&id) = ids.get(&format!("<0x{b:02X}>")).or(one) {
                *slot = id;
            }
        }
        let flag = |k: &str, default: bool| match g.get(k) {
            Some(Value::Bool(b)) => *b,
            _ => default,
        };
        Ok(Self {
            bos: special_id(g, "tokenizer.ggml.bos_token_id", tokens.len()),
            eos: special_id(g, "tokenizer.ggml.eos_token_id", tokens.len()),
            add_bos: flag("tokenizer.ggml.add_bos_token", true),
            specials: Specials::new(specials(&tokens, &types, true), MatchKind::Standard)?,
            kind: Kind::Spm {
                scores,
                byte_ids,
                add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true),
            },
            tokens,
            types,
            ids,
            pre: "spm".into(),
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
        if let Kind::Spm { .. } = self.kind {
            self.encode_spm(text, parse_special, &mut out);
            return out;
        }
        // The earliest special token, at one position the longest, then on after it: one leftmost-longest
        // pass of the automaton (a search per token per step grew with text x tokens found).
        let (ac, idx) = self.specials.automaton(parse_special);
        let mut last = 0;
        for m in ac.find_iter(text) {
            self.encode_text(&text[last..m.start()], &mut out);
            out.push(self.specials.list[idx[m.pattern().as_usize()]].1);
            last = m.end();
        }
        self.encode_text(&text[last..], &mut out);
        out
    }

    /// llama.cpp's special-token partition: each special token in turn, longest first, is cut out of every
    /// text fragment left (leftmost occurrence first); then each text fragment is tokenized on its own.
    fn encode_spm(&self, text: &str, parse_special: bool, out: &mut Vec<u32>) {
        enum Frag<'t> {
            Text(&'t str),
            Token(u32),
        }
        let mut frags = vec![Frag::Text(text)];
        // Only the special tokens that occur in the text take part: one overlapping pass of the automaton
        // finds them (a search of the whole text for each of Gemma 3's 6,414 control and user-defined tokens took 5.8 s for Emma).
        let (ac, idx) = self.specials.automaton(parse_special);
        let mut present = vec![false; self.specials.list.len()];
        for m in ac.find_overlapping_iter(text) {
            present[idx[m.pattern().as_usize()]] = true;
        }
        for ((st, id, _), _) in self.specials.list.iter().zip(&present).filter(|(_, p)| **p) {
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                let Frag::Text(mut rest) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(p) = rest.find(st.as_str()) {
                    if p > 0 {
                        next.push(Frag::Text(&rest[..p]));
                    }
                    next.push(Frag::Token(*id));
                    rest = &rest[p + st.len()..];
                }
                if !rest.is_empty() {
                    next.push(Frag::Text(rest));
                }
            }
            frags = next;
        }
        let Kind::Spm { add_space_prefix, .. } = self.kind else { return };
        let mut prev_special = true;
        for f in frags {
            match f {
                Frag::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Frag::Text(t) => {
                    let prefix = if add_space_prefix && prev_special { " " } else { "" };
                    let escaped = format!("{prefix}{t}").replace(' ', SPM_SPACE);
                    self.spm_fragment(&escaped, out);
                    prev_special = false;
                }
            }
        }
    }

    /// One escaped fragment: characters merged pairwise, the pair whose merged text is the highest-scoring
    /// token first (ties to the leftmost); what no token covers becomes byte tokens.
    fn spm_fragment(&self, text: &str, out: &mut Vec<u32>) {
        use std::cmp::Ordering;
        use std::collections::BinaryHeap;
        let Kind::Spm { scores, byte_ids, .. } = &self.kind else { return };
        struct Bigram {
            score: f32,
            left: usize,
            right: usize,
            size: usize,
        }
        impl PartialEq for Bigram {
            fn eq(&self, o: &Self) -> bool {
                self.cmp(o) == Ordering::Equal
            }
        }
        impl Eq for Bigram {}
        impl PartialOrd for Bigram {
            fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Bigram {
            // The heap's top: the higher score, then the smaller left index (llama.cpp's comparator).
            fn cmp(&self, o: &Self) -> Ordering {
                self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
            }
        }
        // Symbols: byte start, byte length (0 once merged away), previous and next (usize::MAX: none).
        let mut start: Vec<usize> = Vec::new();
        let mut len: Vec<usize> = Vec::new();
        for (i, c) in text.char_indices() {
            start.push(i);
            len.push(c.len_utf8());
        }
        let n = start.len();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (0..n).map(|i| if i + 1 < n { i + 1 } else { usize::MAX }).collect();
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, len: &[usize], l: usize, r: usize| {
            if l == usize::MAX || r == usize::MAX {
                return;
            }
            let piece = &text[start[l]..start[r] + len[r]];
            if let Some(&id) = self.ids.get(piece) {
                heap.push(Bigram { score: scores[id as usize], left: l, right: r, size: piece.len() });
            }
        };
        for i in 1..n {
            try_add(&mut heap, &len, i - 1, i);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left, b.right);
            if len[l] == 0 || len[r] == 0 || len[l] + len[r] != b.size {
                continue;
            }
            len[l] += len[r];
            len[r] = 0;
            next[l] = next[r];
            if next[r] != usize::MAX {
                prev[next[r]] = l;
            }
            try_add(&mut heap, &len, prev[l], l);
            try_add(&mut heap, &len, l, next[l]);
        }
        let mut i = if n > 0 { 0 } else { usize::MAX };
        while i != usize::MAX {
            let piece = &text[start[i]..start[i] + len[i]];
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => out.extend(piece.bytes().map(|b| byte_ids[b as usize])),
            }
            i = next[i];
        }
    }

    fn split<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut pieces = vec![text];
        let Kind::Bpe { regexes, .. } = &self.kind else { return pieces };
        for re in regexes {
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
        let Kind::Bpe { merges, ignore_merges, byte_char, .. } = &self.kind else { return };
        for piece in self.split(text) {
            let mapped: String = piece.bytes().map(|b| byte_char[b as usize]).collect();
            if *ignore_merges && let Some(&id) = self.ids.get(&mapped) {
                out.push(id);
                continue;
            }
            let mut syms: Vec<u32> = Vec::with_capacity(mapped.len());
            for ch in mapped.chars() {
                let mut buf = [0u8; 4];
                // A byte-level vocabulary has a token for every byte; llama.cpp maps a missing one to id 0.
                syms.push(self.ids.get(ch.encode_utf8(&mut buf) as &str).copied().unwrap_or(0));
            }
            bpe_merge(&mut syms, merges);
            out.extend(syms);
        }
    }

    /// The bytes token `id` stands for (control tokens as their text; none for an unknown id).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(t) = self.tokens.get(id as usize) else { return Vec::new() };
        let ty = self.types[id as usize];
        match &self.kind {
            Kind::Bpe { char_byte, .. } => {
                if ty != TYPE_NORMAL {
                    return t.as_bytes().to_vec();
                }
                t.chars().map(|c| char_byte.get(&c).copied().unwrap_or(b'?')).collect()
            }
            Kind::Spm { .. } => match ty {
                TYPE_NORMAL => t.replace(SPM_SPACE, " ").into_bytes(),
                TYPE_BYTE => match t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')) {
                    Some(h) => u8::from_str_radix(h, 16).map_or_else(|_| t.as_bytes().to_vec(), |b| vec![b]),
                    None => t.as_bytes().to_vec(),
                },
                _ => t.as_bytes().to_vec(),
            },
        }
    }

    /// Text of `ids` (invalid UTF-8 sequences replaced by U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.token_bytes(i)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Merges `syms` in place as llama.cpp's BPE does: repeatedly the adjacent pair of lowest merge rank,
/// the leftmost of equal ranks, becomes its merged token. A heap of candidate pairs over a linked list of
/// symbols makes it `O(n log n)` in the pre-token's length (a rescan per merge was quadratic: one
/// 80,000-letter word took 33 s). A heap entry is stale once either side has merged since it was pushed.
fn bpe_merge(syms: &mut Vec<u32>, merges: &HashMap<(u32, u32), (u32, u32)>) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let n = syms.len();
    if n < 2 {
        return;
    }
    const NONE: usize = usize::MAX;
    let mut next: Vec<usize> = (1..=n).map(|i| if i < n { i } else { NONE }).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| if i > 0 { i - 1 } else { NONE }).collect();
    let mut alive = vec![true; n];
    // Min-heap on (rank, left position); the ids recorded check the entry is still current.
    type Pair = (u32, usize, usize, u32, u32);
    let mut heap: BinaryHeap<Reverse<Pair>> = BinaryHeap::new();
    let push = |heap: &mut BinaryHeap<_>, syms: &[u32], l: usize, r: usize| {
        if let Some(&(rank, _)) = merges.get(&(syms[l], syms[r])) {
            heap.push(Reverse((rank, l, r, syms[l], syms[r])));
        }
    };
    for i in 0..n - 1 {
        push(&mut heap, syms, i, i + 1);
    }
    while let Some(Reverse((_, l, r, lid, rid))) = heap.pop() {
        if !alive[l] || !alive[r] || next[l] != r || syms[l] != lid || syms[r] != rid {
            continue;
        }
        syms[l] = merges[&(lid, rid)].1;
        alive[r] = false;
        next[l] = next[r];
        if next[r] != NONE {
            prev[next[r]] = l;
        }
        if prev[l] != NONE {
            push(&mut heap, syms, prev[l], l);
        }
        if next[l] != NONE {
            push(&mut heap, syms, l, next[l]);
        }
    }
    let mut k = 0;
    for i in 0..n {
        if alive[i] {
            syms[k] = syms[i];
            k += 1;
        }
    }
    syms.truncate(k);
}

/// The special tokens and two automata over their texts: all of them, and the user-defined ones only
/// (those split out without special parsing). A text that two tokens share is searched for once, as
/// the first of them in the list (the one both searches found first).
struct Specials {
    list: Vec<(String, u32, bool)>,
    all: (AhoCorasick, Vec<usize>),
    always: (AhoCorasick, Vec<usize>),
}

impl Specials {
    fn new(list: Vec<(String, u32, bool)>, kind: MatchKind) -> Result<Self> {
        let build = |keep: &dyn Fn(&(String, u32, bool)) -> bool| -> Result<(AhoCorasick, Vec<usize>)> {
            let mut seen = std::collections::HashSet::new();
            let idx: Vec<usize> =
                (0..list.len()).filter(|&i| keep(&list[i]) && seen.insert(list[i].0.as_str())).collect();
            let ac = AhoCorasick::builder()
                .match_kind(kind)
                .build(idx.iter().map(|&i| list[i].0.as_str()))
                .map_err(|e| Error::Tokenizer(format!("building the special-token automaton: {e}")))?;
            Ok((ac, idx))
        };
        let all = build(&|_| true)?;
        let always = build(&|s| s.2)?;
        Ok(Self { list, all, always })
    }

    /// The automaton for this parse and the list index of each of its patterns.
    fn automaton(&self, parse_special: bool) -> (&AhoCorasick, &[usize]) {
        let (ac, idx) = if parse_special { &self.all } else { &self.always };
        (ac, idx)
    }
}

/// The special tokens to split out, longest first (ties by id): control and user-defined ones, and
/// with `unknown` (SentencePiece) the unknown-typed too; `always` marks the user-defined ones.
fn specials(tokens: &[String], types: &[i64], unknown: bool) -> Vec<(String, u32, bool)> {
    let mut v: Vec<(String, u32, bool)> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (t, ty))| {
            (**ty == TYPE_CONTROL || **ty == TYPE_USER_DEFINED || (unknown && **ty == TYPE_UNKNOWN))
                && !t.is_empty()
        })
        .map(|(i, (t, ty))| (t.clone(), i as u32, *ty == TYPE_USER_DEFINED))
        .collect();
    v.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
    v
}

/// A token id from the metadata, if it is inside the vocabulary.
fn special_id(g: &Gguf, key: &str, n: usize) -> Option<u32> {
    g.get(key).and_then(Value::as_u64).map(|v| v as u32).filter(|&v| (v as usize) < n)
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

    /// The quadratic merge `bpe_merge` replaced: rescan for the lowest rank (leftmost on ties), merge, repeat.
    fn rescan_merge(syms: &mut Vec<u32>, merges: &HashMap<(u32, u32), (u32, u32)>) {
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..syms.len().saturating_sub(1) {
                if let Some(&(rank, id)) = merges.get(&(syms[i], syms[i + 1]))
                    && best.is_none_or(|(r, _, _)| rank < r)
                {
                    best = Some((rank, i, id));
                }
            }
            let Some((_, i, id)) = best else { break };
            syms[i] = id;
            syms.remove(i + 1);
        }
    }

    #[test]
    fn heap_merge_equals_rescan_merge() {
        // Random merge tables over 4 base symbols (ids 0..4, merged ids from 4), some ranks shared, and
        // random sequences; both merges must give the same symbols.
        let mut seed = 7u64;
        let mut rnd = |m: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        for _ in 0..200 {
            let mut merges = HashMap::new();
            let mut next_id = 4u32;
            for _ in 0..rnd(30) + 1 {
                let (a, b) = (rnd(u64::from(next_id)) as u32, rnd(u64::from(next_id)) as u32);
                let rank = rnd(20) as u32;
                merges.entry((a, b)).or_insert_with(|| {
                    next_id += 1;
                    (rank, next_id - 1)
                });
            }
            let len = rnd(40) as usize;
            let syms: Vec<u32> = (0..len).map(|_| rnd(4) as u32).collect();
            let (mut a, mut b) = (syms.clone(), syms.clone());
            bpe_merge(&mut a, &merges);
            rescan_merge(&mut b, &merges);
            assert_eq!(a, b, "sequence {syms:?}, merges {merges:?}");
        }
    }

    #[test]
    fn one_megabyte_word_merges_in_bounded_time() {
        // 2^20 copies of one symbol with merges doubling it: 2^20 - 1 merges. The rescan took 33 s for 80,000
        // letters (quadratic: about 170 times that here, hours); the heap takes well under a second in
        // release builds. The bound is loose enough for a debug build on a slow machine.
        let merges: HashMap<(u32, u32), (u32, u32)> = (0..20).map(|k| ((k, k), (k, k + 1))).collect();
        let mut syms = vec![0u32; 1 << 20];
        let t = std::time::Instant::now();
        bpe_merge(&mut syms, &merges);
        assert_eq!(syms, vec![20]);
        assert!(t.elapsed().as_secs() < 30, "{:?} for 2^20 symbols", t.elapsed());
    }

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
