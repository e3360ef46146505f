//! Host-side simulation and cross-crate tests of kvq (package `kvq-tests`).
//!
//! - [`stream`]: the firmware's workload, the very file `firmware-demo` compiles, run here over the same
//!   stream so that the Cortex-M4F's outputs can be required to match the host's bit for bit
//!   (`tests/firmware.rs`).
//! - [`firmware`]: builds `firmware-demo` for `thumbv7em-none-eabihf` and runs it under QEMU.
//! - `tests/soak.rs`: a long session through a sliding 2-bit cache on the real model.
//!
//! The GPU crate's host-side simulation tests join here when `runtime-gpu/` lands.

#[path = "../../firmware-demo/src/stream.rs"]
#[allow(unreachable_pub, dead_code)]
pub mod stream;

pub mod firmware;

use kvq_host::dump::Qkv;

/// The firmware's shape for a stream.
pub fn shape(q: &Qkv) -> stream::Shape {
    stream::Shape {
        q_heads: q.q_heads,
        kv_heads: q.kv_heads,
        head_dim: q.head_dim,
        tokens: q.tokens(),
        rope: q.rope,
        clip: q.tables.iter().find(|t| t.preset == "skvq2").map_or(1.0, |t| t.clip),
    }
}

/// Policy `i`'s calibration blob in `q` (empty for a policy without tables).
///
/// # Panics
/// If the stream lacks the tables a calibrated policy reads.
pub fn tables(q: &Qkv, i: usize) -> &[u32] {
    match stream::calibrated(i) {
        None => &[],
        Some(p) => &q.tables.iter().find(|t| t.preset == p).unwrap_or_else(|| panic!("no {p} tables")).blob,
    }
}

/// The stream `kvq dump-qkv` writes by default, made with the default model (fetched on first use).
///
/// # Errors
/// Fetching or loading the model, reading the text, the forward pass.
pub fn default_stream() -> anyhow::Result<Qkv> {
    use kvq_host::dump::{DEFAULT_LAYER, DEFAULT_TEXT, DEFAULT_TOKENS};
    let path = kvq_host::fetch::default_model(true)?;
    let model = kvq_host::model::Model::load(&path)?;
    let tok = kvq_host::tokenizer::Tokenizer::from_gguf(&model.gguf)?;
    let text = kvq_host::eval::texts::text(DEFAULT_TEXT, true)?;
    let tokens = tok.encode(&text, true, false);
    kvq_host::eval::ensure_calibration(&model)?;
    Qkv::capture(&model, &tokens[..DEFAULT_TOKENS], DEFAULT_LAYER)?
        .with_tables(&model, &kvq_host::dump::TABLE_PRESETS)
}

/// The lines the firmware prints for `q`'s stream (its `step` and `done` lines), computed on the host
/// with the same code and the portable kernels; `outputs` receives every output row of policy 0.
///
/// # Errors
/// The cache's errors.
pub fn host_lines(q: &Qkv, outputs: &mut Vec<f32>) -> kvq_core::Result<Vec<String>> {
    let s = shape(q);
    let (qd, kd) = (s.q_heads * s.head_dim, s.kv_heads * s.head_dim);
    let mut arena = vec![0u32; stream::arena_words(&s)];
    let mut scratch = vec![0.0f32; stream::scratch_len(&s)];
    let (mut qr, mut kr, mut vr, mut out) = (vec![0.0; qd], vec![0.0; kd], vec![0.0; kd], vec![0.0; qd]);
    let mut received = vec![0.0f32; stream::received_len(&s)];
    let mut lines = Vec::new();
    outputs.clear();
    for i in 0..stream::POLICIES {
        let (name, _) = stream::policy(i, &s, stream::stream_capacity(i, &s));
        let b = stream::Buffers {
            q: &mut qr,
            k: &mut kr,
            v: &mut vr,
            out: &mut out,
            scratch: &mut scratch,
            received: &mut received,
        };
        let fill = |t: usize, qo: &mut [f32], ko: &mut [f32], vo: &mut [f32]| {
            qo.copy_from_slice(&q.q[t * qd..(t + 1) * qd]);
            ko.copy_from_slice(&q.k[t * kd..(t + 1) * kd]);
            vo.copy_from_slice(&q.v[t * kd..(t + 1) * kd]);
        };
        let keep = |row: &[f32]| {
            if i == 0 {
                outputs.extend_from_slice(row);
            }
        };
        let r = stream::run(i, &s, &mut arena, tables(q, i), b, fill, keep, |t, h| {
            lines.push(format!("kvq-fw step policy={name} t={t} hash={h:016x}"))
        })?;
        lines.push(format!(
            "kvq-fw done policy={name} tokens={} held={} arena_bytes={} bits_per_element={:.3} max_context_sram={} hash={:016x}",
            r.tokens,
            r.held,
            r.arena_bytes,
            r.bits_per_element,
            stream::max_context(i, &s, firmware::SRAM_BYTES),
            r.hash
        ));
    }
    Ok(lines)
}

/// The default model (fetched on first use), its tokenizer and the text of *Persuasion*: what the
/// model-level scenarios run on.
pub fn default_model_and_text() -> (kvq_host::model::Model, kvq_host::tokenizer::Tokenizer, String) {
    let path = kvq_host::fetch::default_model(true).expect("the default model");
    let m = kvq_host::model::Model::load(&path).expect("the default model loads");
    let tok = kvq_host::tokenizer::Tokenizer::from_gguf(&m.gguf).expect("its tokenizer");
    let text = kvq_host::eval::texts::text("persuasion", true).expect("Persuasion");
    (m, tok, text)
}
