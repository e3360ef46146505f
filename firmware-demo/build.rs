//! Links against `memory.x` (and defmt's script with the `defmt` feature) and stages the stream the
//! firmware replays: the file `KVQ_QKV` names, written by `kvq dump-qkv` (never committed). Its header
//! becomes `shape.rs` (the layer's shape as constants, so the cache arenas are `static`s sized by
//! `kvq-core`'s `const fn` layouts, and its calibration tables as `static` word arrays) and its token
//! rows `qkv.bin` (included with `include_bytes!`).

use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    fs::copy("memory.x", out.join("memory.x")).unwrap();
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-env-changed=KVQ_QKV");
    if env::var_os("CARGO_FEATURE_DEFMT").is_some() {
        println!("cargo:rustc-link-arg-bins=-Tdefmt.x");
    }
    let Some(path) = env::var_os("KVQ_QKV") else {
        panic!(
            "set KVQ_QKV to a stream from `kvq dump-qkv -o FILE` (for example \
             `cargo run --release -p kvq-host -- dump-qkv -o target/qkv.bin`, then \
             `KVQ_QKV=$PWD/target/qkv.bin cargo run --release` here)"
        );
    };
    let path = PathBuf::from(path);
    println!("cargo:rerun-if-changed={}", path.display());
    let b = fs::read(&path).unwrap_or_else(|e| panic!("KVQ_QKV={}: {e}", path.display()));
    assert!(b.len() >= 36 && &b[..4] == b"KVQD", "KVQ_QKV={}: not a kvq dump-qkv file", path.display());
    let u = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    assert_eq!(u(4), 2, "KVQ_QKV: dump version {} (this firmware reads 2: run kvq dump-qkv again)", u(4));
    let (tokens, layer, qh, kvh, d, pairing) = (u(8), u(12), u(16), u(20), u(24), u(28));
    let base = f32::from_le_bytes(b[32..36].try_into().unwrap());
    let rows = 36 + 4 * tokens as usize * ((qh + 2 * kvh) * d) as usize;
    assert!(b.len() >= rows + 4, "KVQ_QKV: {} bytes, the header says at least {}", b.len(), rows + 4);
    fs::write(out.join("qkv.bin"), &b[36..rows]).unwrap();
    // The calibration tables: per preset its name, clipping factor and blob, as Rust statics.
    let mut at = rows;
    let mut next = || {
        let w = u(at);
        at += 4;
        w
    };
    let mut calib = String::from(
        "/// Calibration tables of the layer, per host preset (`kvq_core::cache::blob`).\npub static CALIB: &[(&str, &[u32])] = &[\n",
    );
    let mut clip = 1.0f32;
    for _ in 0..next() {
        let len = next() as usize;
        let mut name = Vec::new();
        for _ in 0..len.div_ceil(4) {
            name.extend_from_slice(&next().to_le_bytes());
        }
        name.truncate(len);
        let name = String::from_utf8(name).expect("KVQ_QKV: a table name is not UTF-8");
        let c = f32::from_bits(next());
        if name == "skvq2" {
            clip = c;
        }
        let words: Vec<String> = (0..next()).map(|_| format!("{:#x}", next())).collect();
        calib.push_str(&format!("    ({name:?}, &[{}]),\n", words.join(", ")));
    }
    calib.push_str("];\n");
    assert_eq!(at, b.len(), "KVQ_QKV: bytes after the tables");
    fs::write(
        out.join("shape.rs"),
        format!(
            "/// Tokens in the stream.\npub const TOKENS: usize = {tokens};\n\
             /// The model layer they come from.\npub const LAYER: usize = {layer};\n\
             /// The layer's shape.\npub const SHAPE: stream::Shape = stream::Shape {{ q_heads: {qh}, kv_heads: {kvh}, \
             head_dim: {d}, tokens: {tokens}, rope: kvq_core::transform::Rope {{ base: {base:?}, pairing: \
             kvq_core::transform::Pairing::{} }}, clip: {clip:?} }};\n{calib}",
            if pairing == 0 { "Adjacent" } else { "Halves" }
        ),
    )
    .unwrap();
}
