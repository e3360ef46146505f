//! Token ids equal llama.cpp's `llama-tokenize` on the default model (reference ids committed in
//! `tests/data/tokenizer_ref.json`, made by `tests/data/make_tokenizer_ref.py`).

mod common;

use kvq_host::tokenizer::Tokenizer;

#[test]
fn ids_match_llama_cpp() {
    let m = common::model();
    let tok = Tokenizer::from_gguf(&m.gguf).unwrap();
    let refs: serde_json::Value = serde_json::from_str(include_str!("data/tokenizer_ref.json")).unwrap();
    let cases = common::tokenize_cases(&refs["cases"]);
    assert!(cases.len() >= 40);
    let bad = common::id_mismatches(&tok, &cases, true);
    for (text, special, _) in &cases {
        // Decoding gives the text back (control tokens as their text).
        assert_eq!(tok.decode(&tok.encode(text, true, *special)), *text, "round trip of {text:?}");
    }
    assert!(bad.is_empty(), "{} of {} cases differ:\n{}", bad.len(), cases.len(), bad.join("\n"));
}

#[test]
fn bos_follows_metadata() {
    let m = common::model();
    let tok = Tokenizer::from_gguf(&m.gguf).unwrap();
    // SmolLM2's metadata says add_bos_token = false.
    assert!(!tok.add_bos);
    assert_eq!(tok.encode("Hello", true, true), tok.encode("Hello", false, true));
}
