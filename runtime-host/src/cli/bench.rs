//! kvq bench: prefill and decode speed and memory at several depths, per KV spec.

use super::*;

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Comma-separated KV specs, measured in turn; ratios are to f16 when it is listed.
    #[arg(long, default_value = "f16,kivi2,kivi4")]
    pub(crate) kv: String,
    /// Comma-separated depths (tokens already in the cache) at which to measure.
    #[arg(long, default_value = "0,2048,4096,8192")]
    pub(crate) depths: String,
    /// Alternating decode rounds per depth (each spec in turn; the median is reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Write an SVG plot of decode speed against depth here.
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// Prompt tokens per prefill measurement.
    #[arg(short = 'p', long, default_value_t = 512)]
    pub(crate) prefill: usize,
    /// Tokens per decode measurement.
    #[arg(short = 'n', long, default_value_t = 64)]
    pub(crate) n: usize,
    /// One JSON object per (spec, depth).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Prose whose tokens fill the cache in `kvq bench` (the speed does not depend on the text).
pub(crate) const FILL: &str = "It is a truth universally acknowledged, that a single man in possession of a good fortune, \
must be in want of a wife. However little known the feelings or views of such a man may be on his first entering \
a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered as \
the rightful property of some one or other of their daughters. ";

/// Resident memory of this process (`VmRSS`), in bytes.
pub(crate) fn rss() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = s.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// The host runtime issue's speed targets for the default model (SmolLM2-135M; other models show
/// none): (what, spec, depth, tokens/s).
pub(crate) const TARGETS: [(&str, &str, usize, f64); 3] =
    [("decode", "f16", 0, 124.0), ("prefill", "f16", 0, 246.0), ("decode", "kivi2", 8192, 50.0)];

/// Resident memory attributed to each spec: what its allocations and runs add to the process's RSS, and
/// the most that has been so far.
pub(crate) struct Footprint {
    pub(crate) own: Vec<isize>,
    pub(crate) peak: Vec<isize>,
}

impl Footprint {
    /// Runs `f` for spec `si`, adding the RSS it grows by to that spec's.
    fn track<T>(&mut self, si: usize, f: impl FnOnce() -> kvq_host::error::Result<T>) -> Result<T> {
        let r0 = rss() as isize;
        let out = f()?;
        self.own[si] += rss() as isize - r0;
        self.peak[si] = self.peak[si].max(self.own[si]);
        Ok(out)
    }
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

pub(crate) fn bench(a: BenchArgs) -> Result<()> {
    let model = load(&a.model)?;
    let is_default = fetch::cached_path(&fetch::DEFAULT).is_ok_and(|p| p == model.path());
    let tok = Tokenizer::from_gguf(&model.gguf)?;
    let fill = tok.encode(FILL, false, false);
    let mut depths: Vec<usize> = parse_list(&a.depths, "--depths")?;
    depths.sort_unstable();
    depths.dedup();
    let specs = parse_specs(&a.kv)?;
    let rounds = a.rounds.max(1);
    let (n, p) = (a.n.max(2), a.prefill.max(1));
    // Each depth adds `rounds` decodes and one prefill per spec.
    let capacity = depths.last().copied().unwrap_or(0) + depths.len() * (rounds * n + p) + 1;
    let threads = rayon::current_num_threads();
    let mut pos = 0usize;
    let mut next = |k: usize| -> Vec<u32> {
        let v: Vec<u32> = (0..k).map(|i| fill[(pos + i) % fill.len()]).collect();
        pos += k;
        v
    };
    let cfgs: Vec<CacheConfig> = specs
        .iter()
        .map(|s| model.cache_config(s, capacity, Overflow::Stop))
        .collect::<kvq_host::error::Result<_>>()?;
    // Warm the weights into memory with a throwaway session, then take the base resident size.
    {
        let mut arenas = model::arenas(&model, &cfgs[0])?;
        let mut s = Session::new(&model, cfgs[0], &mut arenas)?;
        s.feed(&next(CHUNK_WARM))?;
    }
    // Each spec's resident memory: what its arenas and session add (arenas are zeroed, so resident, at the
    // full capacity from the start, as llama.cpp's KV buffer is), plus what its runs add later.
    let base_rss = rss();
    let mut fp = Footprint { own: vec![0; specs.len()], peak: vec![0; specs.len()] };
    let mut arenas = Vec::new();
    for (si, c) in cfgs.iter().enumerate() {
        arenas.push(fp.track(si, || model::arenas(&model, c))?);
    }
    let mut sessions = Vec::new();
    for (si, (c, ar)) in cfgs.iter().zip(arenas.iter_mut()).enumerate() {
        sessions.push(fp.track(si, || Session::new(&model, *c, ar))?);
    }
    if !a.json {
        eprintln!(
            "kvq bench: {threads} threads, {} weight and {} attention kernels, weights {:.1} MB/token; at each depth {rounds} alternating rounds of {n} decode steps per spec (median), then a {p}-token prefill per spec",
            model.kernel_name(),
            model.attention_kernel.with_int8(model.int8_attention).name(),
            model.weight_bytes_per_token() as f64 / 1e6
        );
    }
    let pb = bar(depths.len() * specs.len(), "bench");
    // rows[depth][spec] = (decode, prefill, kv bytes, peak rss)
    let mut rows = vec![vec![(0f64, 0f64, 0usize, 0usize); specs.len()]; depths.len()];
    for (di, &d) in depths.iter().enumerate() {
        for (si, s) in sessions.iter_mut().enumerate() {
            fp.track(si, || {
                while s.held() < d {
                    let k = (d - s.held()).min(512);
                    s.feed(&next(k))?;
                }
                Ok(())
            })?;
            rows[di][si].2 = s.kv_bytes();
        }
        let mut dec = vec![Vec::new(); specs.len()];
        for _ in 0..rounds {
            for (si, s) in sessions.iter_mut().enumerate() {
                dec[si].push(fp.track(si, || {
                    // The first step also warms the caches; time the rest.
                    s.feed(&next(1))?;
                    let t = Instant::now();
                    for _ in 1..n {
                        s.feed(&next(1))?;
                    }
                    Ok((n - 1) as f64 / t.elapsed().as_secs_f64())
                })?);
            }
        }
        for (si, s) in sessions.iter_mut().enumerate() {
            let pre = fp.track(si, || {
                let t = Instant::now();
                s.feed(&next(p))?;
                Ok(p as f64 / t.elapsed().as_secs_f64())
            })?;
            rows[di][si] = (
                median(&mut dec[si]),
                pre,
                rows[di][si].2,
                (base_rss as isize + fp.peak[si]).max(0) as usize,
            );
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    let base = specs.iter().position(|s| s.name == "f16");
    let ratio = |x: f64, b: Option<f64>| b.map_or(f64::NAN, |b| x / b);
    if !a.json {
        println!(
            "{:>10} {:>6} {:>11} {:>7} {:>12} {:>7} {:>9} {:>7} {:>9} {:>7}  target",
            "kv",
            "depth",
            "decode t/s",
            "vs f16",
            "prefill t/s",
            "vs f16",
            "KV MiB",
            "vs f16",
            "RSS MiB",
            "vs f16"
        );
    }
    for (si, spec) in specs.iter().enumerate() {
        for (di, &d) in depths.iter().enumerate() {
            let (dec, pre, kv, peak_rss) = rows[di][si];
            let b = base.map(|b| rows[di][b]);
            let (rd, rp, rk, rr) = (
                ratio(dec, b.map(|b| b.0)),
                ratio(pre, b.map(|b| b.1)),
                ratio(kv as f64, b.map(|b| b.2 as f64)),
                ratio(peak_rss as f64, b.map(|b| b.3 as f64)),
            );
            let targets: Vec<String> = TARGETS
                .iter()
                .filter(|t| is_default && t.1 == spec.name && t.2 == d)
                .map(|&(what, _, _, goal)| {
                    let got = if what == "decode" { dec } else { pre };
                    let verdict = if got >= goal {
                        "met".to_string()
                    } else {
                        format!("{:.0}% short", 100.0 * (1.0 - got / goal))
                    };
                    format!("{what} >= {goal}: {verdict}")
                })
                .collect();
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"kv": spec.name, "depth": d, "threads": threads, "rounds": rounds,
                        "attention_kernels": model.attention_kernel.with_int8(model.int8_attention).name(),
                        "decode_tokens_per_s": dec, "decode_vs_f16": rd,
                        "prefill_tokens": p, "prefill_tokens_per_s": pre, "prefill_vs_f16": rp,
                        "kv_bytes": kv, "kv_vs_f16": rk, "peak_rss_bytes": peak_rss, "peak_rss_vs_f16": rr,
                        "targets": targets})
                );
            } else {
                println!(
                    "{:>10} {d:>6} {dec:>11.1} {rd:>7.2} {pre:>12.1} {rp:>7.2} {:>9.2} {:>7} {:>9.1} {rr:>7.2}  {}",
                    spec.name,
                    kv as f64 / (1 << 20) as f64,
                    if rk.is_finite() { format!("{rk:.3}") } else { "-".into() },
                    peak_rss as f64 / (1 << 20) as f64,
                    targets.join("; ")
                );
            }
        }
    }
    if !a.json {
        eprintln!(
            "kvq: resident before any session (mapped weights, runtime): {:.1} MiB",
            base_rss as f64 / (1 << 20) as f64
        );
    }
    if let Some(path) = &a.plot {
        let series: Vec<kvq_host::eval::plot::Series> = specs
            .iter()
            .enumerate()
            .map(|(si, s)| kvq_host::eval::plot::Series {
                label: s.name.clone(),
                points: depths.iter().enumerate().map(|(di, &d)| (d as f64, rows[di][si].0)).collect(),
            })
            .collect();
        kvq_host::eval::plot::chart(
            path,
            &format!("Decode speed against depth ({threads} threads)"),
            "tokens in the cache",
            "decode tokens/s",
            &series,
            true,
        )?;
        eprintln!("kvq: wrote {}", path.display());
    }
    Ok(())
}

/// Tokens fed to warm the weights into memory before `kvq bench` measures.
pub(crate) const CHUNK_WARM: usize = 8;
