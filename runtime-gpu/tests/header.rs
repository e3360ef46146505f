//! `kernels/kvq.cuh` against kvq-core, with no GPU: the header is compiled with the host C compiler into
//! `tests/shim/shim.c`, which runs the header's functions (the same ones the kernels call) on the CPU.
//!
//! - the argument structs: every field at the offset the Rust `#[repr(C)]` mirror has, by name, and the
//!   header's constants equal to kvq-core's;
//! - reading: every held element of caches kvq-core filled, located and dequantized by the header,
//!   equals `Cache::dequantize` bit for bit, for distinct, non-symmetric shapes (3 KV heads, head_dim
//!   96, unequal window and group) in every width, fp16 and mixed streams, stopping and sliding;
//! - appending: the host's append plan run through the header's two passes (items in reverse order)
//!   leaves the arena word for word as `Cache::append` does, after every append of random sizes.

mod common;

use kvq_core::testing::{Rng, append_observed, fill_tables};

use std::collections::HashMap;
use std::io::Write;
use std::mem::offset_of;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use common::Gen;
use kvq_core::cache::{Cache, CacheConfig, Counts, Overflow, Precision, QuantSpec, Stream};
use kvq_core::pack::Width;
use kvq_gpu::abi::{self, KvqAppend, KvqCounts, KvqLayout, KvqStream};

fn shim() -> &'static PathBuf {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kvq-header-shim");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let status = Command::new(&cc)
            .args(["-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-I"])
            .arg(dir.join("kernels"))
            .arg(dir.join("tests/shim/shim.c"))
            .arg("-o")
            .arg(&out)
            .arg("-lm")
            .status()
            .unwrap_or_else(|e| panic!("the host C compiler `{cc}` did not run: {e}"));
        assert!(status.success(), "shim.c did not compile");
        out
    })
}

fn run(input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(shim())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "shim failed");
    out.stdout
}

fn u32s(words: &[u32]) -> Vec<u8> {
    bytemuck::cast_slice(words).to_vec()
}

#[test]
fn argument_structs_and_constants_match_the_header() {
    let text = String::from_utf8(run(&u32s(&[1]))).unwrap();
    let c: HashMap<&str, usize> =
        text.lines().filter_map(|l| l.split_once(' ')).map(|(k, v)| (k, v.parse().unwrap())).collect();
    let mut want: Vec<(&str, usize)> = vec![
        ("sizeof.KvqStream", size_of::<KvqStream>()),
        ("sizeof.KvqLayout", size_of::<KvqLayout>()),
        ("sizeof.KvqCounts", size_of::<KvqCounts>()),
        ("sizeof.KvqAppend", size_of::<KvqAppend>()),
    ];
    macro_rules! fields {
        ($t:ident: $($f:ident),*) => {
            $(want.push((concat!(stringify!($t), ".", stringify!($f)), offset_of!($t, $f)));)*
        };
    }
    fields!(KvqStream: kind, bits, max_code, group, ring, block, row_words, row_groups, window_tokens, sinks, window, codes, scale, zero);
    fields!(KvqStream: generic, params, levels_n, levels, outliers_n, outliers, permuted, perm, bounds);
    fields!(KvqLayout: kv_heads, head_dim, capacity, sinks, residual, total_words, keys, values);
    fields!(KvqLayout: rope, rotate_keys, rotate_values, center_keys, balance_keys, rope_table, center, balance);
    fields!(KvqLayout: tier_keep, tier_bits, tier_slot_words, tier_slots);
    fields!(KvqCounts: sinks, n, base, key_q_end, value_q_end);
    fields!(KvqAppend: sink0, sink_new, n0, tokens, key_blocks0, key_blocks, value_q0, value_q);
    want.extend([
        ("const.KVQ_F16", abi::KIND_F16 as usize),
        ("const.KVQ_PER_CHANNEL", abi::KIND_PER_CHANNEL as usize),
        ("const.KVQ_PER_TOKEN", abi::KIND_PER_TOKEN as usize),
        ("const.KVQ_KEY_BLOCK_F16", kvq_core::cache::layout::KEY_BLOCK_F16),
        ("const.KVQ_KEY_BLOCK", kvq_core::cache::layout::KEY_BLOCK),
        ("const.KVQ_MAX_GROUP", kvq_core::cache::config::MAX_GROUP),
        ("const.KVQ_MAX_HEAD_DIM", abi::MAX_HEAD_DIM),
        ("const.KVQ_MAX_RATIO", abi::MAX_RATIO),
        ("const.KVQ_PARAMS_F16", abi::PARAMS_F16 as usize),
        ("const.KVQ_PARAMS_FP8", abi::PARAMS_FP8 as usize),
        ("const.KVQ_ROPE_NONE", abi::ROPE_NONE as usize),
        ("const.KVQ_ROPE_ADJACENT", abi::ROPE_ADJACENT as usize),
        ("const.KVQ_ROPE_HALVES", abi::ROPE_HALVES as usize),
    ]);
    for (name, v) in &want {
        assert_eq!(c.get(name), Some(v), "{name}: the header says {:?}, Rust {v}", c.get(name));
    }
    assert_eq!(c.len(), want.len(), "the header prints fields the test does not know: {text}");
}

/// The host twins of the device's f16 conversions (the device uses `cvt.rn`) against the `half` crate,
/// which kvq-core stores with: every f16 value back to f32, and f32s at every f16 value, at every midpoint
/// between neighbours (ties go to even) and one f32 ulp either side of it, subnormals included.
#[test]
fn half_conversions_equal_the_half_crate() {
    use half::f16;
    let mut xs = Vec::new();
    for b in 0..0x7c00u16 {
        let lo = f16::from_bits(b).to_f32();
        let hi = f16::from_bits(b + 1).to_f32();
        let mid = ((f64::from(lo) + f64::from(hi)) / 2.0) as f32; // exact: 12 significant bits
        for x in [lo, mid, f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1)] {
            xs.push(x);
            xs.push(-x);
        }
    }
    xs.extend([65519.0f32, 65520.0, 1e9, f32::INFINITY, 1e-10, 2.0f32.powi(-25), 2.0f32.powi(-26)]);
    let n = xs.len().max(65536);
    xs.resize(n, 0.0);
    let mut req = u32s(&[4, n as u32]);
    req.extend_from_slice(bytemuck::cast_slice(&xs));
    let out = run(&req);
    let (h, f) = out.split_at(2 * n);
    let h: &[u16] = bytemuck::cast_slice(h);
    let f: Vec<f32> = f.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    for (x, &got) in xs.iter().zip(h) {
        assert_eq!(got, f16::from_f32(*x).to_bits(), "f32 {x:e} ({:#x})", x.to_bits());
    }
    for (bits, got) in f.iter().take(65536).enumerate() {
        let want = f16::from_bits(bits as u16).to_f32();
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "f16 {bits:#x}: {got} vs {want}"
        );
    }
}

/// `n` tokens of `heads` x `d` keys or values from the shared generator, with channel-dependent spread and
/// a few outlier channels, so that groups differ.
fn spread_rows(g: &mut Gen, n: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n * heads * d);
    for _ in 0..n {
        for h in 0..heads {
            for c in 0..d {
                let spread = if c % 17 == 3 { 12.0 } else { 0.5 + (c % 5) as f32 * 0.3 + h as f32 * 0.1 };
                v.push(g.next() * spread + if c % 11 == 0 { 2.0 } else { 0.0 });
            }
        }
    }
    v
}

/// Configurations with distinct numbers everywhere: 3 KV heads, head_dim 96, window 64 or 96 against
/// groups of 32, 4 sinks or none, every width, fp16 and mixed streams.
fn configs() -> Vec<(String, CacheConfig)> {
    let (heads, d) = (3, 96);
    let mut v = Vec::new();
    for w in [Width::B1, Width::B2, Width::B3, Width::B4, Width::B8, Width::Ternary] {
        v.push((format!("kivi {w:?} s4 r64"), CacheConfig::kivi(w, 32, 64, heads, d, 700).with_sinks(4)));
    }
    v.push(("kivi2 r96 s0".into(), CacheConfig::kivi(Width::B2, 32, 96, heads, d, 650)));
    v.push((
        "kivi4 g64 r128 h5 d128".into(),
        CacheConfig::kivi(Width::B4, 64, 128, 5, 128, 900).with_sinks(3),
    ));
    v.push((
        "kivi2 slide".into(),
        CacheConfig::kivi(Width::B2, 32, 64, heads, d, 420).with_sinks(4).with_overflow(Overflow::Slide),
    ));
    v.push(("fp16".into(), CacheConfig::fp16(heads, d, 500).with_sinks(2)));
    v.push((
        "fp16 slide".into(),
        CacheConfig::fp16(heads, d, 300).with_sinks(4).with_overflow(Overflow::Slide),
    ));
    let kivi = CacheConfig::kivi(Width::B2, 32, 64, heads, d, 600).with_sinks(4);
    v.push(("f16 keys, 2-bit values".into(), CacheConfig { keys: Precision::F16, ..kivi }));
    v.push(("2-bit keys, f16 values".into(), CacheConfig { values: Precision::F16, ..kivi }));
    v.push((
        "4-bit values without window".into(),
        CacheConfig {
            keys: Precision::F16,
            values: Precision::Quant(QuantSpec::per_token(Width::B4, 32)),
            residual: 0,
            ..kivi
        },
    ));
    v
}

fn read_request(l: &KvqLayout, k: &KvqCounts, arena: &[u32]) -> Vec<u8> {
    let mut b = u32s(&[2]);
    b.extend_from_slice(bytemuck::bytes_of(l));
    b.extend_from_slice(bytemuck::bytes_of(k));
    b.extend(u32s(&[arena.len() as u32]));
    b.extend(u32s(arena));
    b
}

/// Every held row of `cache` read through the header (`kvq_read_row`) against `Cache::dequantize`, bit for
/// bit; `what` names the case in a failure.
fn assert_reads_like_core(what: &str, cache: &Cache<'_>, l: &KvqLayout) {
    let cfg = *cache.config();
    let (heads, d, held) = (cfg.kv_heads, cfg.head_dim, cache.held());
    let mut want = Vec::new();
    for s in [Stream::Keys, Stream::Values] {
        for h in 0..heads {
            let mut rows = vec![0.0f32; held * d];
            cache.dequantize(s, h, &mut rows).unwrap();
            want.extend(rows);
        }
    }
    let counts = KvqCounts::new(&cfg, cache.counts());
    let got = run(&read_request(l, &counts, cache.words()));
    let got: &[f32] = bytemuck::cast_slice(&got);
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{what}: element {i} (stream {}, head {}, token {}, channel {}): header {a}, core {b}",
            i / (heads * held * d),
            i / (held * d) % heads,
            i / d % held,
            i % d
        );
    }
}

#[test]
fn header_reads_every_held_element_as_core_dequantizes_it() {
    for (name, cfg) in configs() {
        let layout = cfg.layout().unwrap();
        let l = KvqLayout::new(&cfg, &layout).unwrap();
        let mut arena = vec![0u32; layout.total_words];
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        let (heads, d) = (cfg.kv_heads, cfg.head_dim);
        let mut cache = Cache::new(cfg, &mut arena).unwrap();
        // Stop at several fills: inside the sinks, inside the first window, past flushes, past a slide.
        let mut appended = 0;
        for step in [2usize, 5, 60, 131, 200, 300] {
            let room = if cfg.overflow == Overflow::Stop { cfg.capacity - cache.held() } else { step };
            let n = step.min(room);
            if n == 0 {
                break;
            }
            let (k, v) = (spread_rows(&mut g, n, heads, d), spread_rows(&mut g, n, heads, d));
            cache.append(&k, &v).unwrap();
            appended += n;
            assert_reads_like_core(&format!("{name} after {appended}"), &cache, &l);
        }
    }
}

/// The calibrated formats (kvq2 and kvq3's RoPE offsets, rotations and FP8 parameters, KVQuant's
/// codebooks and outliers, SKVQ's permutations, MiKV's balance and tiers, all at once), with tables that
/// are not the identity: every held row read through `kvq_generic_row` equals `Cache::dequantize` bit for
/// bit, at several fills and past a slide.
#[test]
fn header_reads_every_calibrated_format_as_core_dequantizes_it() {
    for (heads, d, name, cfg) in [(3usize, 64usize), (1, 256)]
        .into_iter()
        .flat_map(|(h, d)| common::calibrated_configs(h, d, 600).into_iter().map(move |(n, c)| (h, d, n, c)))
    {
        let layout = cfg.layout().unwrap();
        let l = KvqLayout::new(&cfg, &layout).unwrap();
        assert!(l.keys.generic == 1 || l.values.generic == 1, "{name} d{d} is read by the plain path");
        assert!(!l.device_append(), "{name}");
        let mut arena = vec![0u32; layout.total_words];
        let mut g = Gen(0x5851_f42d_4c95_7f2d);
        let mut cache = Cache::new(cfg, &mut arena).unwrap();
        let mut rng = Rng::new(g.0);
        fill_tables(&mut cache, &mut rng);
        let mut appended = 0;
        let mut promoted = 0;
        for step in [3usize, 70, 131, 200, 300] {
            let room = if cfg.overflow == Overflow::Stop { cfg.capacity - cache.held() } else { step };
            let n = step.min(room);
            if n == 0 {
                break;
            }
            let (k, v) = (spread_rows(&mut g, n, heads, d), spread_rows(&mut g, n, heads, d));
            append_observed(&mut cache, &k, &v, &mut rng);
            appended += n;
            let c = cache.counts();
            promoted += (c.base..c.n).filter(|&j| (0..heads).any(|h| cache.is_promoted(h, j))).count();
            assert_reads_like_core(&format!("{name} d{d} after {appended}"), &cache, &l);
        }
        if cfg.tiers.is_some() {
            assert!(promoted > 0, "{name}: no token was promoted, the tier path went untested");
        }
    }
}

#[test]
fn header_appends_as_core_does_word_for_word() {
    for (name, cfg) in configs() {
        let layout = cfg.layout().unwrap();
        let l = KvqLayout::new(&cfg, &layout).unwrap();
        let (heads, d) = (cfg.kv_heads, cfg.head_dim);
        let hd = heads * d;
        let mut host = vec![0u32; layout.total_words];
        let mut device = host.clone();
        let mut counts = Counts::default();
        let mut g = Gen(0x2545_f491_4f6c_dd1d);
        let mut cache = Cache::new(cfg, &mut host).unwrap();
        let piece = abi::max_piece(&cfg, &layout);
        for (step, n) in [1usize, 3, 2, 70, 1, 129, 64, 250, 33, 400, 5].into_iter().enumerate() {
            let n = if cfg.overflow == Overflow::Stop { n.min(cfg.capacity - cache.held()) } else { n };
            if n == 0 {
                break;
            }
            let (k, v) = (spread_rows(&mut g, n, heads, d), spread_rows(&mut g, n, heads, d));
            cache.append(&k, &v).unwrap();
            assert_eq!(abi::check_append(&cfg, counts, &k, &v).unwrap(), n);
            let mut done = 0;
            while done < n {
                let m = piece.min(n - done);
                let a = abi::plan_append(&cfg, counts, m);
                let mut req = u32s(&[3]);
                req.extend_from_slice(bytemuck::bytes_of(&l));
                req.extend_from_slice(bytemuck::bytes_of(&a));
                req.extend(u32s(&[device.len() as u32]));
                req.extend(u32s(&device));
                req.extend(u32s(&[m as u32]));
                req.extend_from_slice(bytemuck::cast_slice(&k[done * hd..(done + m) * hd]));
                req.extend_from_slice(bytemuck::cast_slice(&v[done * hd..(done + m) * hd]));
                device = bytemuck::cast_slice(&run(&req)).to_vec();
                counts = abi::counts_after(&cfg, counts, m).unwrap();
                done += m;
            }
            assert_eq!(counts, cache.counts(), "{name}: counts after append {step}");
            let want = cache.words();
            if let Some(i) = (0..want.len()).find(|&i| want[i] != device[i]) {
                panic!(
                    "{name}: append {step} ({n} tokens): word {i} is {:#x} on the header's path, {:#x} in core",
                    device[i], want[i]
                );
            }
        }
    }
}
