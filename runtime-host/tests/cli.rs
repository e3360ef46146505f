//! The `kvq` binary end to end on the default model: chat answers, every `--kv` preset, tokenize, info,
//! and bad input (malformed and truncated GGUF files, a bad spec, a full context) as errors, never panics.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn kvq(args: &[&str], stdin: Option<&str>) -> Output {
    let model = common::model_path();
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvq"));
    c.args(args).arg("-m").arg(&model).arg("-t").arg("2");
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn chat_names_paris_with_f16_and_kivi2() {
    for kv in ["f16", "kivi2"] {
        let out = kvq(
            &["chat", "--kv", kv, "--greedy", "-n", "40"],
            Some("What is the capital of France?\n/stats\n"),
        );
        let (so, se) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{kv}: {se}");
        assert!(so.contains("Paris"), "{kv}: answer {so:?}");
        assert!(se.contains("tokens held") && se.contains("bits per element"), "{kv}: /stats printed {se:?}");
    }
}

#[test]
fn every_preset_generates() {
    let prompt = "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n";
    for kv in ["f16", "kivi2", "kivi4", "kivi8", "kivi2:s=4", "kivi4:k=8:g=64:r=128"] {
        let out = kvq(&["generate", "--kv", kv, "-p", prompt, "-n", "24", "--greedy", "--json"], None);
        assert!(out.status.success(), "{kv}: {}", text(&out.stderr));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids = j["generated_ids"].as_array().unwrap();
        assert!(!ids.is_empty(), "{kv}: nothing generated");
        assert_eq!(j["prompt_ids"][0], 1, "{kv}: <|im_start|> parsed as a control token");
        assert!(j["timings"]["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(!j["text"].as_str().unwrap().trim().is_empty(), "{kv}: empty text");
    }
}

#[test]
fn tokenize_and_info() {
    let dir = std::env::temp_dir().join(format!("kvq-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("t.txt");
    std::fs::write(&f, "Hello world").unwrap();
    let out = kvq(&["tokenize", "-f", f.to_str().unwrap(), "--json"], None);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout).trim(), r#"{"ids":[19556,905]}"#);
    std::fs::write(&f, [0x48, 0xff, 0x49]).unwrap();
    let out = kvq(&["tokenize", "-f", f.to_str().unwrap(), "--json"], None);
    assert!(
        !out.status.success() && text(&out.stderr).contains("invalid UTF-8 at byte 1"),
        "{}",
        text(&out.stderr)
    );
    let out = kvq(&["info"], None);
    let so = text(&out.stdout);
    assert!(out.status.success());
    assert!(
        so.contains("9 query / 3 KV, head_dim 64") && so.contains("Q4_1 x210") && so.contains("kivi2"),
        "{so}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_an_error() {
    let out = kvq(&["generate", "--kv", "kivi3", "-p", "x"], None);
    assert!(!out.status.success() && text(&out.stderr).contains("unknown preset"));
    // A context too small for the prompt under the stop policy.
    let out =
        kvq(&["generate", "--kv", "f16", "-c", "4", "-p", "one two three four five six", "-n", "4"], None);
    let se = text(&out.stderr);
    assert!(!out.status.success() && se.contains("context full"), "{se}");
    assert!(!se.contains("panicked"));
    // A context no machine can hold: an error naming the allocation, not an abort.
    let out = kvq(&["generate", "--kv", "f16", "-c", "4000000000000", "-p", "x", "-n", "1"], None);
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{se}");
    assert!(se.contains("cannot allocate") || se.contains("memory available"), "{se}");
}

/// Truncated and corrupted copies of the real model: every one is refused with a message, none panics.
#[test]
fn malformed_model_files_are_refused() {
    let bytes = std::fs::read(common::model_path()).unwrap();
    let g = kvq_host::gguf::Gguf::parse(&bytes).unwrap();
    let header = g.data_start as usize;
    let dir = std::env::temp_dir().join(format!("kvq-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for cut in [0, 3, 8, 24, 100, 1000, header / 2, header - 1, header + 10, bytes.len() / 2, bytes.len() - 1]
    {
        cases.push((format!("truncated at {cut}"), bytes[..cut].to_vec()));
    }
    // Corrupt the first tensor's type id to an unknown one, and its dims to a huge count.
    let mut t = bytes.clone();
    let name = b"token_embd.weight";
    let at = t.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // n_dims u32, 2 dims u64, then the type u32.
    t[at + 4 + 16..at + 4 + 16 + 4].copy_from_slice(&99u32.to_le_bytes());
    cases.push(("unknown tensor type".into(), t));
    let mut t = bytes.clone();
    t[at + 4..at + 12].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push(("huge dims".into(), t));
    for (what, data) in cases {
        let p = dir.join("bad.gguf");
        std::fs::write(&p, &data).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_kvq")).args(["info", "-m"]).arg(&p).output().unwrap();
        let se = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {se}");
        assert!(se.starts_with("kvq: error:") && !se.contains("panicked"), "{what}: {se}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
