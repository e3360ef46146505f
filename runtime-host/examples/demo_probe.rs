//! `kvq demo`'s document and question, with f16's answer fed to each cache word by word: per KV spec the
//! answer's log-probability, and for its first 12 tokens each one's probability beside the strongest other
//! token's. The first spec is the reference whose greedy answer is scored (normally `f16`).
//!
//! `demo_probe SPECS [DOC_TOKENS]` (default 6000, as `kvq demo`).
use anyhow::Result;
use kvq_core::cache::Overflow;
use kvq_host::eval::{DEMO_QUESTION, demo_document, log_softmax};
use kvq_host::kvspec::KvSpec;
use kvq_host::model::{self, Model, Session};
use kvq_host::tokenizer::Tokenizer;

/// The probe's arguments.
#[derive(clap::Parser)]
struct Args {
    /// KV specs, comma-separated; the first is the reference.
    specs: String,
    /// Document length in tokens.
    #[arg(default_value_t = 6000)]
    doc_tokens: usize,
}

fn main() -> Result<()> {
    let Args { specs, doc_tokens } = <Args as clap::Parser>::parse();
    let specs = &specs;
    let path = kvq_host::fetch::default_model(true)?;
    let m = Model::load(&path)?;
    let tok = Tokenizer::from_gguf(&m.gguf)?;
    let prose = kvq_host::eval::texts::text("persuasion", true)?;
    let doc = demo_document(&tok, &prose, doc_tokens);
    let sys = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
    let prompt = format!(
        "<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\nRead this document.\n\n{doc}\nQuestion: {DEMO_QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&prompt, true, true);
    let v = m.cfg.n_vocab;
    let mut reference: Vec<u32> = Vec::new();
    for name in specs.split(',') {
        let spec = KvSpec::parse(name).map_err(anyhow::Error::msg)?;
        let cfg = m.cache_config(&spec, ids.len() + 64, Overflow::Stop)?;
        let mut arenas = model::arenas(&m, &cfg)?;
        let mut s = Session::new(&m, cfg, &mut arenas)?;
        let t = std::time::Instant::now();
        let logits = s.feed(&ids)?;
        let mut all = logits;
        if reference.is_empty() {
            // The reference's own greedy answer, with the logits it was chosen from.
            for _ in 0..24 {
                let id = kvq_host::sample::argmax(&all[all.len() - v..]);
                reference.push(id);
                all.extend(s.feed(&[id])?);
            }
            all.truncate(reference.len() * v);
            println!("{name:<12} greedy answer: {:?}", tok.decode(&reference));
        } else {
            all.extend(s.feed_all(&reference[..reference.len() - 1])?);
        }
        let mut lp = 0.0;
        let mut info = Vec::new();
        let mut ls = Vec::new();
        for (i, &tk) in reference.iter().enumerate() {
            let l = &all[i * v..(i + 1) * v];
            log_softmax(l, &mut ls);
            let prob = |id: usize| ls[id].exp();
            lp += prob(tk as usize).ln();
            // The most likely token other than the reference's, and its probability.
            let other =
                (0..v).filter(|&j| j != tk as usize).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap_or(0);
            if i < 12 {
                info.push(format!(
                    "{:?} {:.3} ({:?} {:.3})",
                    tok.decode(&[tk]),
                    prob(tk as usize),
                    tok.decode(&[other as u32]),
                    prob(other)
                ));
            }
        }
        println!(
            "{name:<12} log-prob of the reference answer {lp:8.3} ({:.0} s); its first 12 tokens, each with",
            t.elapsed().as_secs_f64()
        );
        println!("             the strongest other token: {}", info.join(", "));
    }
    Ok(())
}
