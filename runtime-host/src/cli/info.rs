//! kvq info: a model's architecture, tensor types and what each preset costs per token.

use super::*;

#[derive(Args)]
pub(crate) struct InfoArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Comma-separated KV specs to list after the presets (any `--kv` spec, such as `kvq2:tier=1`).
    #[arg(long)]
    pub(crate) kv: Option<String>,
}

pub(crate) fn info(args: InfoArgs) -> Result<()> {
    let a = &args.model;
    let model = load(a)?;
    let c = &model.cfg;
    let g = &model.gguf;
    println!("name          {}", g.get("general.name").and_then(|v| v.as_str()).unwrap_or("?"));
    println!("architecture  {:?} (GGUF v{})", c.arch, g.version);
    println!("layers        {}, embedding {}, feed-forward {}", c.n_layer, c.n_embd, c.n_ff);
    println!("heads         {} query / {} KV, head_dim {}", c.n_head, c.n_kv_head, c.head_dim);
    println!("vocabulary    {}, training context {}", c.n_vocab, c.n_ctx_train);
    println!("rope base     {}, rms eps {:e}", c.rope_base, c.eps);
    let types: Vec<String> = model.tensor_types().iter().map(|(t, n)| format!("{t} x{n}")).collect();
    println!("tensors       {} ({})", g.tensors.len(), types.join(", "));
    println!(
        "weights/token {:.1} MB read per decode step ({} kernels)",
        model.weight_bytes_per_token() as f64 / 1e6,
        model.kernel_name()
    );
    println!("attention     {} kernels", model.attention_kernel.name());
    if let Ok(t) = Tokenizer::from_gguf(g) {
        if t.pre == "spm" {
            println!("tokenizer     SentencePiece ({} tokens), add BOS {}", t.len(), t.add_bos);
        } else {
            println!("tokenizer     byte-level BPE, pre-tokenizer {}, add BOS {}", t.pre, t.add_bos);
        }
    }
    let calib = kvq_host::calib::default_path(&model.sha256()?)?;
    println!(
        "calibration   {}",
        if calib.exists() {
            match kvq_host::calib::Calibration::load(&calib, &model) {
                Ok(c) => format!(
                    "{} ({} tokens of {}, {} codebooks; presets kvquant*, skvq2, mikv2 use it)",
                    calib.display(),
                    c.tokens,
                    c.text,
                    c.weighting.name()
                ),
                Err(e) => format!("{} is unusable: {e:#}", calib.display()),
            }
        } else {
            format!(
                "none (kvquant*, skvq2, mikv2 need one: kvq calibrate{})",
                if a.model.is_some() { " -m MODEL" } else { "" }
            )
        }
    );
    let at = [2048usize, c.n_ctx_train.min(32768)].map(|t| t.min(c.n_ctx_train));
    let n_global = (0..c.n_layer).filter(|&l| !c.is_local(l)).count();
    if let Some(l) = model.local_config() {
        let global: Vec<String> = (0..c.n_layer).filter(|&l| !c.is_local(l)).map(|l| l.to_string()).collect();
        let full = l.usage(l.counts_after(l.capacity).map_err(|e| anyhow::anyhow!("{e}"))?);
        println!(
            "layer kinds   {} global (layers {}), {} local: a ring of the last {} tokens, f16 unless --kv-local, \
             {} bytes each when full ({:.3} bits/elem)",
            n_global,
            global.join(", "),
            c.n_layer - n_global,
            c.window,
            full.total_bytes(),
            full.bits_per_element(l)
        );
    }
    println!(
        "\nKV cache per token ({}), at {} and {} tokens held:",
        if n_global == c.n_layer {
            format!("all {} layers", c.n_layer)
        } else {
            format!("the {n_global} global layers; --kv sets them")
        },
        at[0],
        at[1]
    );
    let extra: Vec<String> = match args.kv.as_deref() {
        Some(list) => parse_specs(list)?.into_iter().map(|s| s.name).collect(),
        None => Vec::new(),
    };
    let w = extra.iter().map(String::len).max().unwrap_or(0).max(8);
    println!(
        "{:w$} {:>14} {:>12} {:>14} {:>12}   is",
        "preset", "bytes/token", "bits/elem", "bytes/token", "bits/elem"
    );
    for p in PRESETS.iter().copied().chain(extra.iter().map(String::as_str)) {
        let spec = KvSpec::parse(p)?;
        // A preset this model's shape cannot take is listed as such, with the reason, and the rest go on.
        let cfg = match spec
            .for_model(c.arch == kvq_host::model::Arch::Gemma3)
            .and_then(|s| s.config(c.n_kv_head, c.head_dim, c.n_ctx_train, Overflow::Stop, model.rope()))
        {
            Ok(cfg) => cfg,
            Err(kvq_host::error::Error::Spec { reason, .. }) => {
                println!("{p:w$} {:>14} {:>12} {:>14} {:>12}   ({reason})", "n/a", "n/a", "n/a", "n/a");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut line = format!("{p:w$}");
        for t in at {
            let counts = cfg.counts_after(t).map_err(|e| anyhow::anyhow!("{e}"))?;
            let u = cfg.usage(counts);
            line += &format!(
                " {:>14.1} {:>12.3}",
                (u.total_bytes() * n_global) as f64 / t as f64,
                u.bits_per_element(&cfg)
            );
        }
        let normed = c.arch == kvq_host::model::Arch::Gemma3;
        let knobs = (if normed { &kvq_host::kvspec::PRESET_KNOBS_KEY_NORM[..] } else { &[] })
            .iter()
            .chain(&kvq_host::kvspec::PRESET_KNOBS)
            .find(|(n, _)| *n == p)
            .map_or("", |(_, k)| k);
        println!("{line}   {knobs}");
    }
    Ok(())
}
