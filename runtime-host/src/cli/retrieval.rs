//! kvq retrieval: passkey and line retrieval over long prompts.

use super::*;

#[derive(Args)]
pub(crate) struct RetrievalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Haystack prose for the pass key task and words for the line keys.
    #[arg(long, default_value = "persuasion")]
    pub(crate) text: String,
    /// Tasks: passkey, lines, or both.
    #[arg(long, default_value = "passkey,lines")]
    pub(crate) tasks: String,
    /// Comma-separated prompt lengths in tokens (at most the model's context).
    #[arg(long, default_value = "1024,2048,4096,8192")]
    pub(crate) lengths: String,
    /// Comma-separated needle depths, 0 (start) to 1 (end).
    #[arg(long, default_value = "0,0.25,0.5,0.75,1")]
    pub(crate) depths: String,
    /// Seeds per (length, depth).
    #[arg(long, default_value_t = 3)]
    pub(crate) seeds: u64,
    /// Comma-separated KV specs.
    #[arg(long, default_value = "f16,kivi2,kivi4")]
    pub(crate) kv: String,
    /// One JSON object per (task, spec, length, depth), then one summary per (task, spec).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn retrieval(a: RetrievalArgs) -> Result<()> {
    use kvq_host::eval::{Task, make_case, run_case};
    let model = load(&a.model)?;
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let hay = kvq_host::eval::texts::text(&a.text, false)?;
    let specs = parse_specs(&a.kv)?;
    let tasks: Vec<Task> = a
        .tasks
        .split(',')
        .map(|t| match t.trim() {
            "passkey" => Ok(Task::Passkey),
            "lines" => Ok(Task::Lines),
            o => Err(anyhow::anyhow!("unknown task {o:?} (passkey, lines)")),
        })
        .collect::<Result<_>>()?;
    let lengths: Vec<usize> = parse_list(&a.lengths, "--lengths")?;
    let depths: Vec<f64> = parse_list(&a.depths, "--depths")?;
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    if max_len > model.cfg.n_ctx_train {
        bail!("--lengths: {max_len} exceeds the model's context of {}", model.cfg.n_ctx_train);
    }
    if a.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    // Every case is generated once and run under every spec.
    let mut cases = Vec::new();
    for &task in &tasks {
        for &len in &lengths {
            for &depth in &depths {
                for seed in 0..a.seeds {
                    cases.push((task, len, depth, seed, make_case(&tok, task, &hay, len, depth, seed)?));
                }
            }
        }
    }
    let cap = cases.iter().map(|c| c.4.prompt.len() + c.4.answer.len()).max().unwrap_or(1);
    // Progress in prompt tokens: one 32k-token case is minutes of prefill.
    let pb = bar(cases.iter().map(|c| c.4.prompt.len()).sum::<usize>() * specs.len(), "retrieval");
    let mut results = Vec::new(); // (spec index, task, len, depth, outcome)
    for (si, spec) in specs.iter().enumerate() {
        let cfg = model.cache_config(spec, cap, Overflow::Stop)?;
        let mut arenas = model::arenas(&model, &cfg)?;
        let mut s = Session::new(&model, cfg, &mut arenas)?;
        for (task, len, depth, _, case) in &cases {
            results.push((si, *task, *len, *depth, run_case(&mut s, case, |k| pb.inc(k as u64))?));
        }
    }
    pb.finish_and_clear();
    let n_seeds = a.seeds as usize;
    // Per (task, spec): accuracy, mean log-probability; per cell for --json and the table.
    for &task in &tasks {
        if !a.json {
            println!(
                "\n{task:?} retrieval ({} seeds per cell; exact match %, mean answer log-prob):",
                a.seeds
            );
            let mut head = format!("{:<10} {:>6}", "kv", "len");
            for d in &depths {
                head += &format!(" {:>14}", format!("depth {d}"));
            }
            println!("{head} {:>16}", "all depths");
        }
        for (si, spec) in specs.iter().enumerate() {
            let mine: Vec<_> = results.iter().filter(|r| r.0 == si && r.1 == task).collect();
            for &len in &lengths {
                let mut row = format!("{:<10} {len:>6}", spec.name);
                let cell = |d: Option<f64>| {
                    score(mine.iter().filter(|r| r.2 == len && d.is_none_or(|d| r.3 == d)).map(|r| &r.4))
                };
                for &d in &depths {
                    let (acc, lp, n) = cell(Some(d));
                    if a.json {
                        println!(
                            "{}",
                            serde_json::json!({"task": task, "spec": spec.name, "length": len, "depth": d,
                                "cases": n, "accuracy": acc, "logprob": lp})
                        );
                    }
                    row += &format!(" {:>6.0}% {:>6.2}", 100.0 * acc, lp);
                }
                let (acc, lp, _) = cell(None);
                if !a.json {
                    println!("{row} {:>8.0}% {:>6.2}", 100.0 * acc, lp);
                }
            }
            let (acc, lp, _) = score(mine.iter().map(|r| &r.4));
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"task": task, "spec": spec.name, "summary": true, "cases": mine.len(),
                        "accuracy": acc, "logprob": lp, "seeds": n_seeds})
                );
            } else {
                println!("{:<10} {:>6} {:>8.1}% exact, mean log-prob {lp:.3}", spec.name, "all", 100.0 * acc);
            }
        }
    }
    Ok(())
}

/// Exact-match share, mean log-probability and count of retrieval outcomes.
pub(crate) fn score<'a>(outcomes: impl Iterator<Item = &'a kvq_host::eval::Outcome>) -> (f64, f64, usize) {
    let (mut exact, mut lp, mut n) = (0usize, 0f64, 0usize);
    for o in outcomes {
        exact += usize::from(o.exact);
        lp += o.logprob;
        n += 1;
    }
    (exact as f64 / n.max(1) as f64, lp / n.max(1) as f64, n)
}
