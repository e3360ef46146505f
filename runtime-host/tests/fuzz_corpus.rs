//! The committed fuzz corpus (`fuzz/seeds/<target>.hex`, written by `examples/fuzz_seeds.rs`) replayed in
//! the test suite: every file is well-formed hex, one input a line, and every GGUF input goes through what
//! the `gguf` fuzz target checks (it parses or is refused; a parsed file hands out only tensor bytes inside
//! it; a tokenizer built from its metadata encodes and decodes). So an input that once reached new code
//! keeps being run on every change, not only when someone fuzzes.

use kvq_host::gguf::Gguf;
use kvq_host::tokenizer::Tokenizer;
use std::path::Path;

/// The inputs of `fuzz/seeds/{target}.hex`, with their line numbers.
fn corpus(target: &str) -> Vec<(usize, Vec<u8>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../fuzz/seeds/{target}.hex"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.starts_with('#')) {
        let b = line.as_bytes();
        assert!(b.len().is_multiple_of(2), "{target}.hex line {}: odd length", i + 1);
        let data: Vec<u8> = b
            .chunks_exact(2)
            .map(|p| {
                u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16)
                    .unwrap_or_else(|_| panic!("{target}.hex line {}: not hex", i + 1))
            })
            .collect();
        out.push((i + 1, data));
    }
    out
}

#[test]
fn committed_corpora_are_hex_one_input_a_line() {
    for target in ["gguf", "tokenizer", "kvspec", "cache"] {
        let inputs = corpus(target);
        assert!(inputs.len() >= 10, "{target}: {} inputs", inputs.len());
        // Sorted and unique, as `--pack` writes them, so that a refresh's diff shows only what changed.
        for w in inputs.windows(2) {
            assert!(w[0].1 < w[1].1, "{target}.hex line {}: duplicate or out of order", w[1].0);
        }
    }
}

#[test]
fn committed_gguf_corpus_replays_cleanly() {
    let (mut parsed, mut tokenizers) = (0, 0);
    for (line, data) in corpus("gguf") {
        let Ok(g) = Gguf::parse(&data) else { continue };
        parsed += 1;
        for t in &g.tensors {
            if let Ok(b) = g.tensor_bytes(&data, t) {
                let (start, end) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
                let at = b.as_ptr() as usize;
                assert!(
                    at >= start && at + b.len() <= end,
                    "line {line}: tensor {} outside the file",
                    t.name
                );
            }
        }
        if let Ok(tok) = Tokenizer::from_gguf(&g) {
            tokenizers += 1;
            let ids = tok.encode("Hello world <|im_start|> 123 \u{2581}é 🦀", true, true);
            let _ = tok.decode(&ids);
        }
    }
    // The corpus holds files that parse and vocabularies that build, not only refusals.
    assert!(parsed > 0 && tokenizers > 0, "{parsed} parsed, {tokenizers} tokenizers");
}
