//! The `kvq` binary end to end on the default model: chat answers, every `--kv` preset, tokenize, info;
//! and bad input (malformed and truncated GGUF files, a bad spec, a full context) as errors, never panics,
//! on a tiny model made in Rust ([`kvq_host::tiny`]), so those run offline; calibration and every preset
//! on the tiny Llama, Qwen2 and Gemma 3.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn kvq(args: &[&str], stdin: Option<&str>) -> Output {
    kvq_on(&common::model_path(), args, stdin)
}

/// `kvq` with `-m model` (a tiny one where the real model's numbers do not matter).
fn kvq_on(model: &std::path::Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kvq"));
    c.args(args).arg("-m").arg(model).arg("-t").arg("2");
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
fn real_model_chat_names_paris_with_f16_and_kivi2() {
    for kv in ["f16", "kivi2"] {
        let out = kvq(
            &["chat", "--kv", kv, "--greedy", "-n", "40"],
            Some("What is the capital of France?\n/stats\n"),
        );
        let (so, se) = (text(&out.stdout), text(&out.stderr));
        assert!(out.status.success(), "{kv}: {se}");
        assert!(so.contains("Paris"), "{kv}: answer {so:?}");
        assert!(se.contains("tokens held") && se.contains("bits per element"), "{kv}: /stats printed {se:?}");
        // The header says in words what a full context does (it printed `overflow Slide`).
        assert!(se.contains("when full: slide, dropping the oldest tokens") && !se.contains("Slide"), "{se}");
    }
}

#[test]
fn real_model_every_preset_generates() {
    let prompt = "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n";
    for kv in ["f16", "kivi2", "kivi4", "kivi8", "kivi2:s=4", "kivi4:k=8:g=64:r=128", "kvq2", "kvq3"] {
        let out = kvq(&["generate", "--kv", kv, "-p", prompt, "-n", "24", "--greedy", "--json"], None);
        assert!(out.status.success(), "{kv}: {}", text(&out.stderr));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids = j["generated_ids"].as_array().unwrap();
        assert!(!ids.is_empty(), "{kv}: nothing generated");
        assert_eq!(j["prompt_ids"][0], 1, "{kv}: <|im_start|> parsed as a control token");
        // A rate needs two tokens (the first comes from the prefill's logits).
        let rate = j["timings"]["decode_tokens_per_s"].as_f64();
        assert!(if ids.len() >= 2 { rate.unwrap() > 0.0 } else { rate.is_none() }, "{kv}: rate {rate:?}");
        assert!(!j["text"].as_str().unwrap().trim().is_empty(), "{kv}: empty text");
    }
}

#[test]
fn real_model_tokenize_and_info() {
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
    // kvq2's bits per element at 2k and 8k tokens, everything counted (the figures of README.md and docs/results.md).
    let row = so.lines().find(|l| l.starts_with("kvq2 ")).unwrap_or_default();
    assert!(row.contains("3.709") && row.contains("3.083") && row.contains("rot=kv"), "{row}");
    // Any spec can be listed beside the presets: the all-2-bit recipe, at 2.96 bits at 8k tokens.
    let out = kvq(&["info", "--kv", "kvq2:k=2:kg=32:kp=f16:vp=f16,kivi2:s=4"], None);
    let so = text(&out.stdout);
    let row = so.lines().find(|l| l.starts_with("kvq2:k=2:kg=32:kp=f16:vp=f16 ")).unwrap_or_default();
    assert!(out.status.success() && row.contains("3.591") && row.contains("2.960"), "{so}");
    assert!(so.lines().any(|l| l.starts_with("kivi2:s=4 ")), "{so}");
    let out = kvq(&["info", "--kv", "kvq2:k=5"], None);
    assert!(!out.status.success() && text(&out.stderr).contains("k=5"), "{}", text(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_an_error() {
    // The tiny model made in Rust: these are the commands' checks, not the model's numbers.
    let tiny = common::tiny_model_path();
    let kvq = |args: &[&str], stdin: Option<&str>| kvq_on(&tiny, args, stdin);
    let out = kvq(&["generate", "--kv", "kivi3", "-p", "x"], None);
    let se = text(&out.stderr);
    assert!(!out.status.success() && se.contains("--kv \"kivi3\": unknown preset"), "{se}");
    // The local layers' spec is named by its own flag.
    let out = kvq(&["generate", "--kv-local", "kivi4", "-p", "x"], None);
    let se = text(&out.stderr);
    assert!(se.contains("--kv-local \"kivi4\": this model has no sliding-window layers"), "{se}");
    let gemma = common::tiny_path("gemma3");
    let out = kvq_on(&gemma, &["generate", "--kv-local", "kivi4:g=3", "-p", "x"], None);
    let se = text(&out.stderr);
    assert!(se.contains("--kv-local \"kivi4:g=3\":"), "{se}");
    // A context too small for the prompt under the stop policy.
    let out =
        kvq(&["generate", "--kv", "f16", "-c", "4", "-p", "one two three four five six", "-n", "4"], None);
    let se = text(&out.stderr);
    assert!(!out.status.success() && se.contains("context is full") && se.contains("raise -c"), "{se}");
    assert!(!se.contains("panicked"));
    // A context no machine can hold: an error naming the allocation, not an abort.
    let out = kvq(&["generate", "--kv", "f16", "-c", "4000000000000", "-p", "x", "-n", "1"], None);
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{se}");
    assert!(
        (se.contains("cannot allocate") || se.contains("memory available")) && se.contains("(lower -c)"),
        "{se}"
    );
    // Values that used to be taken silently or misreported (issue 25): each is refused, naming what was given.
    for (args, says) in [
        (&["generate", "-c", "0", "-p", "x", "-n", "1"][..], "-c 0"),
        (&["generate", "--temp", "nan", "-p", "x", "-n", "1"][..], "NaN is not a temperature"),
        (&["generate", "--temp", "-1", "-p", "x", "-n", "1"][..], "-1 is not a temperature"),
        (&["generate", "--kv", "kivi2:s=4:s=8", "-p", "x", "-n", "1"][..], "s is given twice"),
        // A sliding window keeps four sinks by default: 4 + 128 + 32 tokens do not fit in 160.
        (
            &["generate", "--overflow", "slide", "--kv", "kivi2", "-c", "160", "-p", "x", "-n", "1"][..],
            "keeps 4 sinks (s=0 for none), which -c 160 cannot hold",
        ),
    ] {
        let out = kvq(args, None);
        let se = text(&out.stderr);
        assert!(!out.status.success() && se.contains(says), "{args:?}: {se}");
        assert!(!se.contains("panicked"), "{se}");
    }
    // They fit in 164, and without sinks (s=0) in 160.
    for (kv, c) in [("kivi2", "164"), ("kivi2:s=0", "160")] {
        let out = kvq(&["generate", "--overflow", "slide", "--kv", kv, "-c", c, "-p", "x", "-n", "1"], None);
        assert!(out.status.success(), "{kv} -c {c}: {}", text(&out.stderr));
    }
    // No rate for fewer than two generated tokens (it once printed 22,397.9 tok/s for -n 0).
    let out = kvq(&["generate", "--kv", "f16", "-p", "x", "-n", "0"], None);
    let se = text(&out.stderr);
    assert!(out.status.success() && se.contains("generated 0,") && !se.contains("generated 0 at"), "{se}");
    // A directory as the model.
    let out = Command::new(env!("CARGO_BIN_EXE_kvq"))
        .args(["info", "-m", std::env::temp_dir().to_str().unwrap()])
        .output()
        .unwrap();
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{se}");
    assert!(se.contains("is a directory, not a GGUF model file"), "{se}");
}

/// `kvq info` on a model whose shape a preset cannot take (head dimension 32: `kvq2`'s 64-channel value
/// groups do not fit) lists that preset as n/a with the reason and the others as usual, where it once
/// stopped at that preset.
#[test]
fn info_lists_a_preset_the_model_cannot_take_as_na() {
    let dir = tmpdir("info-na");
    let path = dir.join("tiny-hd32.gguf");
    let t = kvq_host::tiny::Tiny { n_head: 4, n_kv_head: 2, ..kvq_host::tiny::Tiny::default() };
    std::fs::write(&path, kvq_host::tiny::llama(&t)).unwrap();
    let out = kvq_on(&path, &["info"], None);
    let so = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(so.contains("head_dim 32"), "{so}");
    let row = |p: &str| so.lines().find(|l| l.starts_with(&format!("{p} "))).unwrap_or_default().to_string();
    assert!(row("kvq2").contains("n/a") && row("kvq2").contains("head_dim"), "{so}");
    assert!(!row("kivi2").contains("n/a") && row("kivi2").contains("4.625"), "{so}");
    assert!(row("kvq3").contains("n/a"), "the presets after kvq2 are listed: {so}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Truncated and corrupted copies of a model file (the tiny one made in Rust): every one is refused with a
/// message, none panics.
#[test]
fn malformed_model_files_are_refused() {
    let bytes = std::fs::read(common::tiny_model_path()).unwrap();
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

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kvq-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn real_model_perplexity_command() {
    let dir = tmpdir("ppl");
    let f = dir.join("doc.txt");
    let book = kvq_host::eval::texts::text("prideprejudice", true).unwrap();
    std::fs::write(&f, &book[..6000]).unwrap();
    let plot = dir.join("q.svg");
    let doc = f.to_str().unwrap();
    let ppl = |chunks: &str, kv: &str, last: &[&str]| {
        let mut args = vec!["perplexity", "-f", doc, "-c", "128", "--chunks", chunks, "--kv", kv];
        args.extend(last);
        let out = kvq(&args, None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let recs: Vec<serde_json::Value> = ppl("2", "kivi2:r=32,kivi4:r=32", &["--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = recs.iter().map(|r| r["spec"].as_str().unwrap()).collect();
    assert_eq!(names, ["f16", "kivi2:r=32", "kivi4:r=32"]);
    for r in &recs {
        for k in ["ppl", "ppl_stderr", "kld", "top1_agree", "bits_per_element"] {
            assert!(r[k].as_f64().is_some(), "{k} missing in {r}");
        }
        let ppl = r["ppl"].as_f64().unwrap();
        assert!(ppl > 2.0 && ppl < 200.0, "{r}");
        assert_eq!(r["scored"], 2 * (128 - 1 - 64));
    }
    // 4-bit is closer to f16 than 2-bit.
    assert!(recs[2]["kld"].as_f64() < recs[1]["kld"].as_f64(), "{recs:?}");
    // The table and the plot.
    let table = ppl("1", "f16", &["--plot", plot.to_str().unwrap()]);
    assert!(table.contains("PPL") && table.contains("f16"), "{table}");
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
    // Bad input: invalid UTF-8, a text shorter than one chunk, a bad spec.
    let bad = dir.join("bad.txt");
    std::fs::write(&bad, b"fine so far \xff\xfe").unwrap();
    for args in [
        vec!["perplexity", "-f", bad.to_str().unwrap()],
        vec!["perplexity", "-f", f.to_str().unwrap(), "-c", "8192"],
        vec!["perplexity", "-f", f.to_str().unwrap(), "--kv", "kivi9"],
    ] {
        let out = kvq(&args, None);
        let se = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {se}");
        assert!(se.contains("kvq: error:") && !se.contains("panicked"), "{args:?}: {se}");
    }
}

#[test]
fn real_model_retrieval_command() {
    let out = kvq(
        &["retrieval", "--lengths", "384", "--depths", "0,1", "--seeds", "1", "--kv", "f16,kivi2", "--json"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let recs: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // 2 tasks x 2 specs x (2 depth cells + 1 summary).
    assert_eq!(recs.len(), 12, "{recs:?}");
    for r in &recs {
        let acc = r["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc) && r["logprob"].as_f64().unwrap() <= 0.0, "{r}");
    }
    let f16_passkey =
        recs.iter().find(|r| r["task"] == "passkey" && r["spec"] == "f16" && r["summary"] == true);
    assert_eq!(f16_passkey.unwrap()["accuracy"], 1.0, "the f16 cache finds a pass key in 384 tokens");
    let out = kvq(&["retrieval", "--lengths", "100000"], None);
    assert!(text(&out.stderr).contains("exceeds the model's context"), "{}", text(&out.stderr));
}

#[test]
fn real_model_bench_command() {
    let dir = tmpdir("bench");
    let plot = dir.join("speed.svg");
    let out = kvq(
        &[
            "bench",
            "--depths",
            "0,96",
            "-n",
            "4",
            "-p",
            "16",
            "--rounds",
            "2",
            "--kv",
            "f16,kivi2",
            "--json",
            "--plot",
            plot.to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let recs: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.len(), 4);
    for r in &recs {
        assert!(
            r["decode_tokens_per_s"].as_f64().unwrap() > 0.0
                && r["prefill_tokens_per_s"].as_f64().unwrap() > 0.0
        );
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 50 << 20, "the weights are resident: {r}");
        if r["kv"] == "f16" {
            assert_eq!(r["decode_vs_f16"], 1.0);
        }
    }
    let kivi_96 = recs.iter().find(|r| r["kv"] == "kivi2" && r["depth"] == 96).unwrap();
    let f16_96 = recs.iter().find(|r| r["kv"] == "f16" && r["depth"] == 96).unwrap();
    let kv = |r: &serde_json::Value| r["kv_bytes"].as_f64().unwrap();
    assert!((kivi_96["kv_vs_f16"].as_f64().unwrap() - kv(kivi_96) / kv(f16_96)).abs() < 1e-12);
    // 96 tokens held with R=128: all in the f16 window, so no saving yet beyond the layout's reserve.
    assert!(kv(f16_96) == (96 * 30 * 2 * 3 * 64 * 2) as f64, "{f16_96}");
    assert!(std::fs::read_to_string(&plot).unwrap().contains("Decode speed"));
}

#[test]
fn real_model_demo_command() {
    let out = kvq(&["demo", "--doc-tokens", "400", "-n", "12"], None);
    let so = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(so.contains("Where is the key to the old piano kept?"), "{so}");
    // The default comparison: f16, KIVI-2 and kvq2, each with an answer and a row of figures.
    for kv in ["f16", "kivi2", "kvq2"] {
        assert!(so.lines().any(|l| l.trim_start().starts_with(kv) && l.contains('[')), "{kv} answer in {so}");
        assert!(
            so.lines().any(|l| l.trim_start().starts_with(kv) && l.split_whitespace().count() == 5),
            "{kv} row in {so}"
        );
    }
}

/// Presets that read calibration tables refuse to run without them and say what to run; `kvq calibrate`
/// makes the file where they look, refuses an evaluation text, and then they generate.
#[test]
fn calibrated_presets_need_kvq_calibrate() {
    let dir = std::env::temp_dir().join(format!("kvq-cli-calib-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kvq"))
            .args(args)
            .arg("-m")
            .arg(common::tiny_model_path())
            .args(["-t", "2"])
            .env("KVQ_CACHE", &dir)
            .output()
            .unwrap()
    };
    let prompt = "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n";
    let out = run(&["generate", "--kv", "kvquant2", "-p", prompt, "-n", "8"]);
    let se = text(&out.stderr);
    assert!(!out.status.success() && se.contains("kvq calibrate"), "{se}");
    let out = run(&["calibrate", "--text", "prideprejudice"]);
    assert!(!out.status.success() && text(&out.stderr).contains("evaluation text"));
    let f = dir.join("cal.txt");
    let prose = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition, \
        seemed to unite some of the best blessings of existence; and had lived nearly twenty-one years in the \
        world with very little to distress or vex her. ";
    std::fs::write(&f, prose.repeat(12)).unwrap();
    let out = run(&["calibrate", "-f", f.to_str().unwrap(), "--tokens", "256", "-c", "128"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&["info"]);
    assert!(text(&out.stdout).contains("calib/"), "{}", text(&out.stdout));
    for kv in ["kvquant2", "skvq2", "mikv2"] {
        let out = run(&["generate", "--kv", kv, "-p", prompt, "-n", "8", "--greedy"]);
        assert!(out.status.success(), "{kv}: {}", text(&out.stderr));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `kvq models --path NAME` prints the cached GGUF of a named model (the scripts' way to find it); an unknown
/// name is an error listing the known ones.
#[test]
fn real_model_models_path_names_the_cached_file() {
    let model = common::model_path();
    let run = |name: &str| {
        Command::new(env!("CARGO_BIN_EXE_kvq")).args(["models", "--path", name]).output().unwrap()
    };
    let out = run("smollm2-135m");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::path::Path::new(text(&out.stdout).trim()), model.as_path());
    let out = run("nope");
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{se}");
    assert!(se.contains("no model is named \"nope\"") && se.contains("gemma3-270m"), "{se}");
}

/// `generate -f FILE` reads the prompt from a file and generates what `-p` with the same text does; a file
/// that is not UTF-8 is refused.
#[test]
fn real_model_generate_reads_a_prompt_file() {
    let dir = tmpdir("gen-file");
    let f = dir.join("prompt.txt");
    let prompt = "The capital of France is";
    std::fs::write(&f, prompt).unwrap();
    let ids = |out: &Output| -> Vec<u64> {
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["generated_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
    };
    let by_file = kvq(&["generate", "--kv", "f16", "-n", "6", "--json", "-f", f.to_str().unwrap()], None);
    let by_arg = kvq(&["generate", "--kv", "f16", "-n", "6", "--json", "-p", prompt], None);
    assert_eq!(ids(&by_file), ids(&by_arg));
    assert_eq!(ids(&by_file).len(), 6);
    std::fs::write(&f, [0x66, 0xff, 0x66]).unwrap();
    let out = kvq(&["generate", "-n", "1", "-f", f.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("UTF-8"), "{}", text(&out.stderr));
}

/// Every preset on every architecture, offline: each tiny model (random weights) is calibrated with
/// `kvq calibrate -f` on a text file (Fisher weights, so the backward pass runs too), then `kvq generate`
/// runs with every preset, the calibrated ones reading that file through `calib=`, and with a 2-bit cache
/// on Gemma 3's local layers.
#[test]
fn every_preset_runs_on_every_tiny_architecture() {
    let dir = tmpdir("tiny-presets");
    let prose = dir.join("calib.txt");
    let para = "The cat sat on the mat, and then the dog ran to the park in the rain. ";
    std::fs::write(&prose, para.repeat(40)).unwrap();
    for arch in common::TINY_ARCHS {
        let model = common::tiny_path(arch);
        let calib = dir.join(format!("{arch}.json"));
        let args = ["calibrate", "-f", prose.to_str().unwrap(), "--tokens", "512", "-c", "256", "-o"];
        let out = kvq_on(&model, &[&args[..], &[calib.to_str().unwrap()]].concat(), None);
        assert!(out.status.success(), "{arch}: calibrate: {}", text(&out.stderr));
        let c = calib.to_str().unwrap();
        let mut specs: Vec<String> =
            ["f16", "kivi2", "kivi4", "kivi2:s=4", "kvq2", "kvq3"].map(String::from).into();
        specs
            .extend(["kvquant2", "kvquant3", "kvquant4", "skvq2", "mikv2"].map(|p| format!("{p}:calib={c}")));
        for kv in &specs {
            let mut args =
                vec!["generate", "--kv", kv, "-p", "the cat sat on", "-n", "8", "--greedy", "--json"];
            if arch == "gemma3" {
                args.extend(["--kv-local", "kivi2:g=16:r=16:s=0"]);
            }
            let out = kvq_on(&model, &args, None);
            assert!(out.status.success(), "{arch} {kv}: {}", text(&out.stderr));
            let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert!(!j["prompt_ids"].as_array().unwrap().is_empty(), "{arch} {kv}: {j}");
            assert!(j["generated_ids"].as_array().is_some(), "{arch} {kv}: {j}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--attention-kernels` picks the kernels `kvq info` names, a set the CPU lacks is refused with the
/// reason, and the AVX2 and AVX-512 kernels (the same bits by construction) generate the same tokens.
#[test]
fn attention_kernels_flag_picks_the_kernels() {
    let model = common::tiny_path("llama");
    let out = kvq_on(&model, &["info", "--attention-kernels", "portable"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("attention     portable kernels"), "{}", text(&out.stdout));
    let has =
        [kvq_core::attention::Kernel::avx2().is_some(), kvq_core::attention::Kernel::avx512().is_some()];
    let mut ids = Vec::new();
    for (name, present) in ["avx2", "avx512"].into_iter().zip(has) {
        let args =
            ["generate", "--attention-kernels", name, "--kv", "kivi2", "-p", "the cat sat on", "-n", "12"];
        let out = kvq_on(&model, &[&args[..], &["--greedy", "--json"]].concat(), None);
        if !present {
            assert!(!out.status.success() && text(&out.stderr).contains("lacks"), "{}", text(&out.stderr));
            println!("{name}: this CPU lacks it; refused as it should be");
            continue;
        }
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        ids.push(j["generated_ids"].clone());
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
}
