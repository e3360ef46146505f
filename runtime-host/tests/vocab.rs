//! The `llama-bpe` (Llama 3) and `qwen2` pre-tokenizers against llama.cpp's own tokenizer test data:
//! the vocabulary-only GGUFs `models/ggml-vocab-{llama-bpe,qwen2}.gguf` and their `.inp`/`.out` pairs
//! (texts and the ids Hugging Face's tokenizers give them, which llama.cpp's `test-tokenizer-0` must
//! reproduce). They ship in the source distribution of the PyPI package `llama-cpp-python==0.3.36`,
//! fetched with `pip download` into kvq's cache on first use and checked by sha256; nothing is committed
//! but the hashes. `tests/data/vocab_extra_ref.json` adds ids of more texts from `llama-tokenize`
//! (made by `tests/data/make_vocab_ref.py`).

mod common;

use kvq_host::gguf::Gguf;
use kvq_host::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::process::Command;

const SDIST: &str = "llama-cpp-python==0.3.36";
const SDIST_FILE: &str = "llama_cpp_python-0.3.36.tar.gz";
const MODELS: &str = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/";

/// (vocabulary, sha256 of the GGUF, of the `.inp`, of the `.out`).
const FILES: [(&str, &str, &str, &str); 2] = [
    (
        "llama-bpe",
        "97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e",
        "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
        "118abf2034a197fc5c9dec5204dfdeee7004c7c70952ae577f66b99e212fab9b",
    ),
    (
        "qwen2",
        "44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c",
        "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0",
        "de785bb305cc6fa9d43908ed5da337f853c0b79e971348fcfb9f0915a39c5363",
    ),
];

/// The directory holding `ggml-vocab-*.gguf{,.inp,.out}` for [`FILES`], fetched once.
fn vocab_dir() -> PathBuf {
    static P: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let dir = kvq_host::fetch::cache_dir().unwrap().join("fixtures").join("llama-vocab");
        let wanted = || {
            FILES.iter().flat_map(|(name, g, i, o)| {
                [("", *g), (".inp", *i), (".out", *o)]
                    .map(|(ext, sha)| (format!("ggml-vocab-{name}.gguf{ext}"), sha.to_string()))
            })
        };
        let ok = |p: &Path, sha: &str| kvq_host::fetch::sha256_file(p).ok().as_deref() == Some(sha);
        if wanted().all(|(f, sha)| ok(&dir.join(&f), &sha)) {
            return dir;
        }
        std::fs::create_dir_all(&dir).unwrap();
        // Only this package as a source distribution; its build backend comes as wheels (metadata only).
        let st = Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python", SDIST])
            .arg("-d")
            .arg(&dir)
            .status()
            .expect("python3 with pip is needed to fetch llama.cpp's vocabulary test files");
        assert!(st.success(), "pip download {SDIST} failed");
        let sdist = dir.join(SDIST_FILE);
        let gz = flate2::read::GzDecoder::new(std::fs::File::open(&sdist).unwrap());
        let mut tar = tar::Archive::new(gz);
        let names: Vec<String> = wanted().map(|(f, _)| f).collect();
        for e in tar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            if let Some(f) = path.strip_prefix(MODELS).filter(|f| names.iter().any(|n| n == f)) {
                let out = dir.join(f);
                e.unpack(&out).unwrap();
            }
        }
        let _ = std::fs::remove_file(&sdist);
        for (f, sha) in wanted() {
            assert!(
                ok(&dir.join(&f), &sha),
                "{f} from {SDIST} is missing or differs from the recorded sha256"
            );
        }
        dir
    })
    .clone()
}

fn tokenizer(name: &str) -> Tokenizer {
    let path = vocab_dir().join(format!("ggml-vocab-{name}.gguf"));
    let buf = std::fs::read(&path).unwrap();
    let g = Gguf::parse(&buf).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.pre, name);
    tok
}

/// llama.cpp's `test-tokenizer-0` cases: texts split at `\n__ggml_vocab_test__\n`, one line of ids each,
/// tokenized without special-token parsing.
fn cases(name: &str) -> Vec<(String, bool, Vec<u32>)> {
    let dir = vocab_dir();
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    // As test-tokenizer-0 reads it: a separator at the very end starts no further case.
    let sep = "\n__ggml_vocab_test__\n";
    let texts: Vec<&str> = inp.strip_suffix(sep).unwrap_or(&inp).split(sep).collect();
    let ids: Vec<Vec<u32>> =
        out.lines().map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect()).collect();
    assert_eq!(texts.len(), ids.len());
    texts.into_iter().zip(ids).map(|(t, i)| (t.to_owned(), false, i)).collect()
}

fn check(name: &str) {
    let c = cases(name);
    assert!(c.len() >= 40);
    let tok = tokenizer(name);
    // test-tokenizer-0 tokenizes without BOS.
    let bad = common::id_mismatches(&tok, &c, false);
    for (text, _, _) in &c {
        assert_eq!(tok.decode(&tok.encode(text, false, false)), *text, "{name}: round trip of {text:?}");
    }
    assert!(bad.is_empty(), "{name}: {} of {} cases differ:\n{}", bad.len(), c.len(), bad.join("\n"));
}

#[test]
fn download_llama_bpe_matches_llama_cpp_test_data() {
    check("llama-bpe");
}

#[test]
fn download_qwen2_matches_llama_cpp_test_data() {
    check("qwen2");
}

/// More texts (code, digit runs, CRLF, scripts, each model's control tokens with and without special
/// parsing), BOS as the metadata says, against `llama-tokenize`.
#[test]
fn download_extra_texts_match_llama_tokenize() {
    let refs: serde_json::Value = serde_json::from_str(include_str!("data/vocab_extra_ref.json")).unwrap();
    for (name, rows) in refs["vocabs"].as_object().unwrap() {
        let tok = tokenizer(name);
        let cases = common::tokenize_cases(rows);
        assert!(cases.len() >= 60);
        let bad = common::id_mismatches(&tok, &cases, true);
        assert!(bad.is_empty(), "{name}: {} of {} cases differ:\n{}", bad.len(), cases.len(), bad.join("\n"));
    }
}
