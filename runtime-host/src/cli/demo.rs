//! kvq demo: a planted fact in a long chat, answered with several caches side by side.

use super::*;

#[derive(Args)]
pub(crate) struct DemoArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// KV specs to compare, side by side: by default f16, KIVI-2 and kvq's 2-bit recipe.
    #[arg(long, default_value = "f16,kivi2,kvq2")]
    pub(crate) kv: String,
    /// Document length in tokens (prose from Persuasion, with the planted fact halfway).
    #[arg(long, default_value_t = 6000)]
    pub(crate) doc_tokens: usize,
    /// Most tokens per answer.
    #[arg(short = 'n', long, default_value_t = 48)]
    pub(crate) n: usize,
}

pub(crate) fn demo(a: DemoArgs) -> Result<()> {
    let model = load(&a.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let (fmt, end) = Turns::of(&model, &tok)?;
    let specs = parse_specs(&a.kv)?;
    let prose = kvq_host::eval::texts::text("persuasion", false)?;
    // Whole paragraphs of the novel's opening chapters up to the token budget, the fact halfway.
    let doc = demo_document(&tok, &prose, a.doc_tokens);
    let system = match fmt {
        Turns::ChatMl => "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        Turns::Gemma => "",
    };
    let prompt = format!(
        "{}{}",
        fmt.open(system),
        fmt.user(&format!("Read this document.\n\n{doc}\nQuestion: {DEMO_QUESTION}"), Some(system))
    );
    let ids = tok.encode(&prompt, true, true);
    eprintln!(
        "kvq demo: a {}-token chat (Persuasion, chapters 1 on, with a planted fact halfway); asking: {DEMO_QUESTION}",
        ids.len()
    );
    let cap = ids.len() + a.n + 1;
    // Every spec is checked before the first runs: a bad one fails at once, not after minutes.
    let cfgs = specs
        .iter()
        .map(|spec| model.cache_config(spec, cap, Overflow::Stop))
        .collect::<kvq_host::error::Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    for (spec, cfg) in specs.iter().zip(cfgs) {
        let mut arenas = model::arenas(&model, &cfg)?;
        let mut s = Session::new(&model, cfg, &mut arenas)?;
        let pb = bar(ids.len(), &spec.name);
        let t = Instant::now();
        let logits = s.feed_progress(&ids, |k| pb.inc(k as u64))?;
        pb.finish_and_clear();
        let prefill = ids.len() as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut out = Vec::new();
        reply(
            &mut s,
            &mut Sampler::greedy(),
            logits,
            |id| id == end || Some(id) == tok.eos,
            a.n,
            |id| {
                out.push(id);
                Ok(())
            },
        )?;
        let decode = out.len() as f64 / t.elapsed().as_secs_f64();
        let answer = tok.decode(&out).trim().replace('\n', " ");
        rows.push((spec.name.clone(), answer, s.kv_bytes(), s.bits_per_element(), prefill, decode));
    }
    println!("\nQ: {DEMO_QUESTION}   (the document says: the blue {DEMO_ANSWER} on the kitchen shelf)\n");
    for (name, answer, ..) in &rows {
        let ok = if answer.to_lowercase().contains(DEMO_ANSWER) { "found" } else { "missed" };
        println!("{name:>8} [{ok}]: {answer}");
    }
    println!("\n{:>8} {:>10} {:>10} {:>13} {:>12}", "kv", "KV MiB", "bits/elem", "prefill t/s", "decode t/s");
    for (name, _, kv, bits, pre, dec) in &rows {
        println!("{name:>8} {:>10.2} {bits:>10.2} {pre:>13.1} {dec:>12.1}", *kv as f64 / (1 << 20) as f64);
    }
    Ok(())
}
