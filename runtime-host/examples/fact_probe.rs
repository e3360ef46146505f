//! Six facts planted in a chat document of Persuasion, asked one after the other with the answers fed in:
//! per KV spec the answers' mean log-probability, the KL divergence from the first spec at the answer
//! tokens, and how many answers greedy decoding would give exactly.
//!
//! `fact_probe SPECS [DOC_TOKENS] [OFFSETS]`: comma-separated specs (the first is the reference, normally
//! `f16`), the document length (default 6000), and paragraph offsets into the novel, one document each
//! (default 0). `QUIET=1` prints only the means over the documents.
use anyhow::Result;
use kvq_core::cache::Overflow;
use kvq_host::eval::{log_softmax, planted_document};
use kvq_host::kvspec::KvSpec;
use kvq_host::model::{self, Model, Session};
use kvq_host::tokenizer::Tokenizer;

const FACTS: [(&str, &str, &str, &str); 6] = [
    (
        "A note pinned inside the Kellynch Hall library reads: the key to the old piano is kept in the blue teapot on the kitchen shelf.",
        "Where is the key to the old piano kept?",
        "The key to the old piano is kept in the",
        " blue teapot on the kitchen shelf",
    ),
    (
        "The housekeeper has written: the spare lantern is hidden under the loose floorboard by the east window.",
        "Where is the spare lantern hidden?",
        "The spare lantern is hidden under the",
        " loose floorboard by the east window",
    ),
    (
        "A line in the estate ledger says: the new gardener at Kellynch is called Thomas Pilbury.",
        "What is the name of the new gardener at Kellynch?",
        "The new gardener at Kellynch is called",
        " Thomas Pilbury",
    ),
    (
        "Sir Walter's steward notes that the cellar lock opens with the number 4729.",
        "What number opens the cellar lock?",
        "The cellar lock opens with the number",
        " 4729",
    ),
    (
        "A letter on the hall table says: the visiting cousin will arrive by the Bath coach on the fourteenth of March.",
        "When will the visiting cousin arrive?",
        "The visiting cousin will arrive by the Bath coach on the",
        " fourteenth of March",
    ),
    (
        "Scratched into the stable door are the words: the grey mare is named Duchess.",
        "What is the grey mare named?",
        "The grey mare is named",
        " Duchess",
    ),
];

/// The probe's arguments.
#[derive(clap::Parser)]
struct Args {
    /// KV specs, comma-separated.
    specs: String,
    /// Document length in tokens.
    #[arg(default_value_t = 6000)]
    doc_tokens: usize,
    /// Paragraph offsets into the novel where documents start, comma-separated.
    #[arg(value_delimiter = ',', default_value = "0")]
    offsets: Vec<usize>,
}

fn main() -> Result<()> {
    let Args { specs, doc_tokens, offsets } = <Args as clap::Parser>::parse();
    let specs = &specs;
    let quiet = std::env::var("QUIET").is_ok();
    let path = kvq_host::fetch::default_model(true)?;
    let m = Model::load(&path)?;
    let tok = Tokenizer::from_gguf(&m.gguf)?;
    let prose = kvq_host::eval::texts::text("persuasion", true)?;
    let mut sums: Vec<(String, f64, f64, usize)> = Vec::new();
    for &off in &offsets {
        // Facts at depths 1/12, 3/12, ... 11/12.
        let marks: Vec<(&str, usize)> =
            FACTS.iter().enumerate().map(|(k, f)| (f.0, doc_tokens * (2 * k + 1) / 12)).collect();
        let (doc, planted) = planted_document(&tok, &prose, off, doc_tokens, &marks);
        let sys = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
        let head =
            format!("<|im_start|>system\n{sys}<|im_end|>\n<|im_start|>user\nRead this document.\n\n{doc}");
        // Questions in a fixed shuffled order; each turn: question, the reply's opening, the answer (scored).
        let order = [2, 0, 4, 1, 5, 3];
        let mut segs: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
        for (i, &f) in order.iter().enumerate() {
            let (_, q, pre, ans) = FACTS[f];
            let lead = if i == 0 { format!("{head}\nQuestion: {q}") } else { format!("Question: {q}") };
            let p = format!("{lead}<|im_end|>\n<|im_start|>assistant\n{pre}");
            let a = format!("{ans}.<|im_end|>\n<|im_start|>user\n");
            let pt = tok.encode(&p, i == 0, true);
            let at = tok.encode(&a, false, true);
            let na = tok.encode(ans, false, false).len();
            segs.push((pt, at[..na].to_vec()));
            // The answer's tail (". <|im_end|> ...") is fed without scoring.
            segs.push((at[na..].to_vec(), Vec::new()));
        }
        let total: usize = segs.iter().map(|(a, b)| a.len() + b.len()).sum();
        eprintln!("{total} tokens, {planted} facts planted");
        let v = m.cfg.n_vocab;
        let mut base: Vec<Vec<f64>> = Vec::new();
        for name in specs.split(',') {
            let spec = KvSpec::parse(name).map_err(anyhow::Error::msg)?;
            let cfg = m.cache_config(&spec, total + 1, Overflow::Stop)?;
            let mut arenas = model::arenas(&m, &cfg)?;
            let mut s = Session::new(&m, cfg, &mut arenas)?;
            let t = std::time::Instant::now();
            let mut dists: Vec<Vec<f64>> = Vec::new();
            let mut per_fact = Vec::new();
            let mut exact = 0;
            for (p, a) in &segs {
                if p.is_empty() {
                    continue;
                }
                let logits = s.feed(p)?;
                if a.is_empty() {
                    continue;
                }
                let mut all = logits;
                if a.len() > 1 {
                    all.extend(s.feed_all(&a[..a.len() - 1])?);
                }
                let (mut lp, mut ok) = (0.0, true);
                for (i, &tk) in a.iter().enumerate() {
                    let l = &all[i * v..(i + 1) * v];
                    let mut ls = Vec::new();
                    log_softmax(l, &mut ls);
                    lp += ls[tk as usize];
                    ok &= kvq_host::sample::argmax(l) == tk;
                    dists.push(ls);
                }
                s.feed(&a[a.len() - 1..])?;
                exact += usize::from(ok);
                per_fact.push(lp);
            }
            let kld = if base.is_empty() {
                0.0
            } else {
                let mut k = 0.0;
                for (b, d) in base.iter().zip(&dists) {
                    k += b.iter().zip(d).map(|(&p, &q)| p.exp() * (p - q)).sum::<f64>();
                }
                k / dists.len() as f64
            };
            let first_kld = if base.is_empty() {
                0.0
            } else {
                // KL at each answer's first token only.
                let mut k = 0.0;
                let mut i = 0;
                let mut n = 0;
                for (_, a) in &segs {
                    if a.is_empty() {
                        continue;
                    }
                    k += base[i].iter().zip(&dists[i]).map(|(&p, &q)| p.exp() * (p - q)).sum::<f64>();
                    n += 1;
                    i += a.len();
                }
                k / n as f64
            };
            if base.is_empty() {
                base = dists;
            }
            let mean: f64 = per_fact.iter().sum::<f64>() / per_fact.len() as f64;
            match sums.iter_mut().find(|x| x.0 == name) {
                Some(x) => {
                    x.1 += kld;
                    x.2 += mean;
                    x.3 += exact;
                }
                None => sums.push((name.to_string(), kld, mean, exact)),
            }
            if !quiet {
                println!(
                    "{name:<52} exact {exact}/{}  logP {mean:7.3}  KLD {kld:.4}  KLD1 {first_kld:.4}  per-fact {:?}  {:.0}s",
                    per_fact.len(),
                    per_fact.iter().map(|x| (x * 100.0).round() / 100.0).collect::<Vec<_>>(),
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    for (name, kld, lp, ex) in &sums {
        let n = offsets.len() as f64;
        println!("MEAN {name:<52} KLD {:.4}  logP {:.3}  exact {ex}/{}", kld / n, lp / n, 6 * offsets.len());
    }
    Ok(())
}
