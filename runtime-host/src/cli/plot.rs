//! kvq plot-quality: perplexity change against bits per element, as an SVG.

use super::*;

#[derive(Args)]
pub(crate) struct PlotQualityArgs {
    /// Files of `kvq perplexity --json` records; each spec is compared with the f16 record of its file.
    #[arg(required = true)]
    pub(crate) files: Vec<PathBuf>,
    /// A point measured elsewhere, LABEL=BITS:DELTA_PCT (for example "llama.cpp q4_0=4.5:5.27").
    #[arg(long = "ref")]
    pub(crate) refs: Vec<String>,
    /// Title of the chart.
    #[arg(long, default_value = "Perplexity change against KV bits per element")]
    pub(crate) title: String,
    /// The SVG to write.
    #[arg(short = 'o', long)]
    pub(crate) out: PathBuf,
}

pub(crate) fn plot_quality(a: PlotQualityArgs) -> Result<()> {
    use kvq_host::eval::plot::{QualityPoint, Series, chart, parse_ref, quality_points};
    let mut points: Vec<QualityPoint> = Vec::new();
    for f in &a.files {
        let text = read_utf8(f)?;
        points.extend(quality_points(&text, &f.display().to_string())?);
    }
    for r in &a.refs {
        points.push(parse_ref(r)?);
    }
    let series: Vec<Series> = points
        .iter()
        .map(|p| Series {
            label: format!("{} ({:+.2}%)", p.label, p.delta_pct),
            points: vec![(p.bits, p.delta_pct)],
        })
        .collect();
    chart(&a.out, &a.title, "bits per element held", "perplexity vs f16 (%)", &series, false)?;
    eprintln!("kvq: wrote {} ({} points)", a.out.display(), points.len());
    Ok(())
}
