//! The Cortex-M4F firmware streams one real layer of SmolLM2-135M through every policy's cache and its
//! outputs are the host's, bit for bit: every 64-token hash and the final one, with the tokens held, the
//! arena bytes, the bits per element and the largest context in the board's SRAM. Where QEMU or the
//! target is missing the test says how to install them and stops; with `KVQ_REQUIRE_FIRMWARE=1` (set by
//! `.ci/run`) it fails instead.

use kvq_tests::{firmware, host_lines, stream};

/// The stream written for the firmware's build, with the host's result lines; `None` (after saying why)
/// where the firmware cannot run here.
fn setup(test: &str) -> Option<(std::path::PathBuf, Vec<String>)> {
    let q = kvq_tests::default_stream().expect("the default stream");
    let mut outputs = Vec::new();
    let want = host_lines(&q, &mut outputs).expect("host run");
    if let Some(why) = firmware::missing() {
        assert!(std::env::var_os("KVQ_REQUIRE_FIRMWARE").is_none(), "the firmware test must run: {why}");
        eprintln!("{test}: not run: {why}");
        return None;
    }
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kvq-qkv.bin");
    std::fs::write(&path, q.to_bytes()).unwrap();
    Some((path, want))
}

/// Requires the firmware's step and done lines to be the host's, in order, and its final `ok`.
fn same_as_host(text: &str, want: &[String]) {
    let got: Vec<&str> =
        text.lines().filter(|l| l.starts_with("kvq-fw step ") || l.starts_with("kvq-fw done ")).collect();
    assert_eq!(got.len(), want.len(), "firmware printed\n{text}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g, w, "the firmware and the host differ");
    }
    assert!(text.lines().any(|l| l == "kvq-fw ok"), "no final ok:\n{text}");
}

/// A `key=value` field of a result line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = line.find(&format!(" {key}=")).unwrap_or_else(|| panic!("no {key} in {line}")) + key.len() + 2;
    line[at..].split(' ').next().unwrap()
}

#[test]
fn real_model_firmware_matches_the_host_bit_for_bit() {
    let Some((path, want)) = setup("real_model_firmware_matches_the_host_bit_for_bit") else { return };
    let elf = firmware::build(&path, false).expect("firmware builds");
    let (code, stdout, stderr) = firmware::run(&elf, 600).expect("qemu runs");
    let stdout = String::from_utf8_lossy(&stdout);
    assert_eq!(code, 0, "firmware exit code {code}\n{stdout}\n{stderr}");
    same_as_host(&stdout, &want);
    let (text, data, bss) = firmware::sizes(&std::fs::read(&elf).unwrap()).unwrap();
    eprintln!("firmware-demo: text {text} data {data} bss {bss} bytes");
    for l in &want {
        if l.starts_with("kvq-fw done") {
            eprintln!("{l}");
        }
    }
}

/// The defmt build logs each policy's start and result as defmt frames on standard output, which decode
/// with the ELF's own table into the host's figures; its result lines, now on standard error, are still
/// the host's bit for bit.
#[test]
fn real_model_the_defmt_build_logs_decode_to_the_host_figures() {
    let Some((path, want)) = setup("real_model_the_defmt_build_logs_decode_to_the_host_figures") else {
        return;
    };
    let elf = firmware::build(&path, true).expect("firmware builds with defmt");
    let (code, frames, stderr) = firmware::run(&elf, 600).expect("qemu runs");
    assert_eq!(code, 0, "firmware exit code {code}\n{stderr}");
    same_as_host(&stderr, &want);
    let logs = firmware::defmt_lines(&std::fs::read(&elf).unwrap(), &frames).expect("the frames decode");
    let done: Vec<&String> = want.iter().filter(|l| l.starts_with("kvq-fw done ")).collect();
    assert_eq!(logs.len(), 2 * done.len(), "decoded {logs:#?}");
    for (pair, d) in logs.chunks(2).zip(done) {
        let name = &d["kvq-fw done policy=".len()..d.find(" tokens=").unwrap()];
        let tokens = field(d, "tokens");
        assert_eq!(pair[0], format!("INFO policy {name}: streaming {tokens} tokens"));
        let head = format!(
            "INFO policy {name}: {tokens} tokens, {} held in {} arena bytes, ",
            field(d, "held"),
            field(d, "arena_bytes")
        );
        let hash = u64::from_str_radix(field(d, "hash"), 16).unwrap();
        let tail =
            format!(" bits per element, {} tokens fit 4 MiB, hash {hash:x}", field(d, "max_context_sram"));
        assert!(
            pair[1].starts_with(&head) && pair[1].ends_with(&tail),
            "{:?} is not {head}..{tail}",
            pair[1]
        );
        let bits: f64 = pair[1][head.len()..pair[1].len() - tail.len()].parse().unwrap();
        let host: f64 = field(d, "bits_per_element").parse().unwrap();
        assert!((bits - host).abs() <= 5e-4, "bits per element {bits} against {host}");
    }
}

/// The hash the firmware reports changes when any one bit of any one output changes: it is the running
/// FNV-1a of the outputs' bits (checked against the report), and flipping a bit of the first, a middle
/// or the last output of the stream, at the low, middle and sign bit, always gives another hash.
#[test]
fn real_model_one_flipped_output_bit_changes_the_hash() {
    let q = kvq_tests::default_stream().expect("the default stream");
    let mut outputs = Vec::new();
    let lines = host_lines(&q, &mut outputs).unwrap();
    let done = lines.iter().find(|l| l.starts_with("kvq-fw done policy=f16 ")).unwrap();
    let hash = |xs: &[f32]| {
        let mut h = stream::Hash::new();
        h.add(xs);
        h.0
    };
    let reported = u64::from_str_radix(done.rsplit("hash=").next().unwrap(), 16).unwrap();
    assert_eq!(hash(&outputs), reported);
    assert_eq!(outputs.len(), q.tokens() * q.q_heads * q.head_dim);
    for at in [0, outputs.len() / 2, outputs.len() - 1] {
        for bit in [0, 13, 31] {
            let mut o = outputs.clone();
            o[at] = f32::from_bits(o[at].to_bits() ^ (1 << bit));
            assert_ne!(hash(&o), reported, "output {at} bit {bit}");
        }
    }
}

/// The edge figures: tokens of this layer that fit a 64 KiB, 256 KiB and 1 MiB arena per policy. The
/// untiered 2-bit policies' marginal cost per token is at most a fifth of fp16's (so far from the fixed
/// costs they hold 5x the tokens; MiKV's tier slots add 14 bytes a token, 5% over). The small-arena
/// policy (16-token window and key groups, FP8 parameters) holds at least 5x fp16's tokens at every size,
/// `kvq2:k=2:kg=32:r=32:p=fp8` from 256 KiB; at 64 KiB the 32-token window (24 KiB of f16) keeps the other 2-bit
/// policies under 5x: the printed table says by how much.
#[test]
fn real_model_two_bit_caches_hold_five_times_the_tokens() {
    let q = kvq_tests::default_stream().expect("the default stream");
    let s = kvq_tests::shape(&q);
    for bytes in [64 << 10, 256 << 10, 1 << 20] {
        let fp16 = stream::max_context(0, &s, bytes);
        let row: Vec<String> = (0..stream::POLICIES)
            .map(|i| {
                let n = stream::max_context(i, &s, bytes);
                format!("{} {n} ({:.1}x)", stream::policy(i, &s, 1024).0, n as f64 / fp16 as f64)
            })
            .collect();
        eprintln!("{} KiB: {}", bytes >> 10, row.join(", "));
        assert!(fp16 > 0);
        assert!(stream::max_context(4, &s, bytes) >= 5 * fp16, "{}", row.join(", "));
        if bytes >= 256 << 10 {
            assert!(stream::max_context(2, &s, bytes) >= 5 * fp16, "{}", row.join(", "));
        }
    }
    let marginal = |i: usize| {
        let at = |c: usize| stream::policy(i, &s, c).1.arena_bytes() as f64;
        (at(1 << 16) - at(1 << 15)) / f64::from(1 << 15)
    };
    for i in [1, 2, 4] {
        assert!(
            marginal(i) * 5.0 <= marginal(0),
            "{}: {} bytes per token",
            stream::policy(i, &s, 1024).0,
            marginal(i)
        );
    }
}

/// The firmware's calibrated policies are the host's presets (`mikv2`, `kvquant2`, `skvq2`) with the firmware's
/// 32-token window, field for field, including the clipping factor the calibration measured, and their
/// table blobs load into the firmware's caches (a blob from another configuration would be refused).
#[test]
fn real_model_calibrated_policies_are_the_host_presets() {
    let q = kvq_tests::default_stream().expect("the default stream");
    let s = kvq_tests::shape(&q);
    let path = kvq_host::fetch::default_model(true).unwrap();
    let model = kvq_host::model::Model::load(&path).unwrap();
    let mut seen = 0;
    for i in 0..stream::POLICIES {
        let Some(preset) = stream::calibrated(i) else { continue };
        let (name, fw) = stream::policy(i, &s, stream::stream_capacity(i, &s));
        assert_eq!(name, format!("{preset}:r=32"));
        let spec = kvq_host::kvspec::KvSpec::parse(name).unwrap();
        let host = model.cache_config(&spec, fw.capacity, fw.overflow).unwrap();
        assert_eq!(fw, host, "{name}");
        let blob = kvq_tests::tables(&q, i);
        assert!(blob.len() > 100, "{name}: {} words of tables", blob.len());
        let mut arena = vec![0u32; fw.layout().unwrap().total_words];
        let mut cache = kvq_core::cache::Cache::new(fw, &mut arena).unwrap();
        assert!(kvq_core::cache::blob::load_tables(&mut cache, blob).unwrap() > 0);
        seen += 1;
    }
    assert_eq!(seen, 3);
    assert!(s.clip > 0.0 && s.clip < 1.0, "clip {}", s.clip);
}
