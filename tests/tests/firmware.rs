//! The Cortex-M4F firmware streams one real layer of SmolLM2-135M through every policy's cache and its
//! outputs are the host's, bit for bit: every 64-token hash and the final one, with the tokens held, the
//! arena bytes, the bits per element and the largest context in the board's SRAM. Where QEMU or the
//! target is missing the test says how to install them and stops; with `KVQ_REQUIRE_FIRMWARE=1` (set by
//! `.ci/run`) it fails instead.

use kvq_tests::{firmware, host_lines, stream};

#[test]
fn firmware_matches_the_host_bit_for_bit() {
    let q = kvq_tests::default_stream().expect("the default stream");
    let mut outputs = Vec::new();
    let want = host_lines(&q, &mut outputs).expect("host run");
    if let Some(why) = firmware::missing() {
        assert!(std::env::var_os("KVQ_REQUIRE_FIRMWARE").is_none(), "the firmware test must run: {why}");
        eprintln!("firmware_matches_the_host_bit_for_bit: not run: {why}");
        return;
    }
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join("kvq-qkv.bin");
    std::fs::write(&path, q.to_bytes()).unwrap();
    let elf = firmware::build(&path).expect("firmware builds");
    let (code, stdout, stderr) = firmware::run(&elf, 600).expect("qemu runs");
    assert_eq!(code, 0, "firmware exit code {code}\n{stdout}\n{stderr}");
    let got: Vec<&str> =
        stdout.lines().filter(|l| l.starts_with("kvq-fw step ") || l.starts_with("kvq-fw done ")).collect();
    assert_eq!(got.len(), want.len(), "firmware printed\n{stdout}");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "the firmware and the host differ");
    }
    assert!(stdout.lines().any(|l| l == "kvq-fw ok"));
    let (text, data, bss) = firmware::sizes(&std::fs::read(&elf).unwrap()).unwrap();
    eprintln!("firmware-demo: text {text} data {data} bss {bss} bytes");
    for l in &want {
        if l.starts_with("kvq-fw done") {
            eprintln!("{l}");
        }
    }
}

/// The hash the firmware reports changes when any one bit of any one output changes: it is the running
/// FNV-1a of the outputs' bits (checked against the report), and flipping a bit of the first, a middle
/// or the last output of the stream, at the low, middle and sign bit, always gives another hash.
#[test]
fn one_flipped_output_bit_changes_the_hash() {
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
/// costs they hold 5x the tokens; MiKV's tier slots add 14 bytes a token, 5% over), and `kvq2:r=32:p=fp8` holds at least 5x fp16's tokens from 256 KiB. At 64 KiB
/// the fixed costs (the f16 window, key codes in 256-token blocks, the RoPE table, the quantizer's
/// scratch rows) keep every 2-bit policy under 5x: the printed table says by how much.
#[test]
fn two_bit_caches_hold_five_times_the_tokens() {
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
        if bytes >= 256 << 10 {
            assert!(stream::max_context(2, &s, bytes) >= 5 * fp16, "{}", row.join(", "));
        }
    }
    let marginal = |i: usize| {
        let at = |c: usize| stream::policy(i, &s, c).1.arena_bytes() as f64;
        (at(1 << 16) - at(1 << 15)) / f64::from(1 << 15)
    };
    for i in 1..3 {
        assert!(
            marginal(i) * 5.0 <= marginal(0),
            "{}: {} bytes per token",
            stream::policy(i, &s, 1024).0,
            marginal(i)
        );
    }
}
