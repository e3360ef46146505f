//! Links against `memory.x` (and defmt's script with the `defmt` feature) and stages the stream the
//! firmware replays: the file `KVQ_QKV` names, written by `kvq dump-qkv` (never committed). Its header
//! becomes `shape.rs` (the layer's shape as constants, so the cache arenas are `static`s sized by
//! `kvq-core`'s `const fn` layouts) and its bytes `qkv.bin` (included with `include_bytes!`).

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
    let u = |i: usize| u32::from_le_bytes(b[4 + 4 * i..8 + 4 * i].try_into().unwrap());
    assert_eq!(u(0), 1, "KVQ_QKV: dump version {} (this firmware reads 1)", u(0));
    let (tokens, layer, qh, kvh, d, pairing) = (u(1), u(2), u(3), u(4), u(5), u(6));
    let base = f32::from_le_bytes(b[32..36].try_into().unwrap());
    let want = 36 + 4 * tokens as usize * ((qh + 2 * kvh) * d) as usize;
    assert_eq!(b.len(), want, "KVQ_QKV: {} bytes, the header says {want}", b.len());
    fs::write(out.join("qkv.bin"), &b[36..]).unwrap();
    fs::write(
        out.join("shape.rs"),
        format!(
            "/// Tokens in the stream.\npub const TOKENS: usize = {tokens};\n\
             /// The model layer they come from.\npub const LAYER: usize = {layer};\n\
             /// The layer's shape.\npub const SHAPE: stream::Shape = stream::Shape {{ q_heads: {qh}, kv_heads: {kvh}, \
             head_dim: {d}, tokens: {tokens}, rope: kvq_core::transform::Rope {{ base: {base:?}, pairing: \
             kvq_core::transform::Pairing::{} }} }};\n",
            if pairing == 0 { "Adjacent" } else { "Halves" }
        ),
    )
    .unwrap();
}
