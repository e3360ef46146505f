//! SVG plots of evaluation results (plotters, SVG backend: no fonts or system libraries needed).

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use std::path::Path;

/// One named series of `(x, y)` points.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points, drawn in order.
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn range(vals: impl Iterator<Item = f64> + Clone, floor_zero: bool) -> (f64, f64) {
    let lo = vals.clone().fold(f64::INFINITY, f64::min);
    let hi = vals.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.02).max(1e-9);
    let lo = if floor_zero { 0f64.min(lo - pad) } else { lo - pad };
    (lo, hi + pad)
}

/// Writes an SVG line-and-point chart of `series` to `path`. `lines` joins each series' points (and the y
/// axis starts at zero, for speeds); without it, points only, each series a labelled marker, and the y axis
/// spans the data (for quality figures whose differences are small against their size).
///
/// # Errors
/// The file cannot be written.
pub fn chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    lines: bool,
) -> Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let e = |err: &dyn std::fmt::Display| anyhow!("plot {}: {err}", path.display());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (x0, x1) = range(xs, true);
    let (y0, y1) = range(ys, lines);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|x| e(&x))?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(|x| e(&x))?;
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        if lines {
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
            chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 4, c.filled()))).map_err(|x| e(&x))?;
        } else {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 6, c.filled())))
                .map_err(|x| e(&x))?
                .label(s.label.clone())
                .legend(move |(x, y)| Circle::new((x + 9, y), 5, c.filled()));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// A quality point: a label, bits per element and the perplexity change against f16 in percent.
#[derive(Clone, Debug, PartialEq)]
pub struct QualityPoint {
    /// Legend label.
    pub label: String,
    /// Bits per element held.
    pub bits: f64,
    /// `100 (ppl / ppl_f16 - 1)`.
    pub delta_pct: f64,
}

/// The quality points of `kvq perplexity --json` output (one record per line): every spec but the
/// baseline, against the baseline of the same run.
///
/// # Errors
/// A line that is not a record, or a run without an `f16` record.
pub fn quality_points(jsonl: &str, what: &str) -> Result<Vec<QualityPoint>> {
    let recs = jsonl
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str::<crate::eval::PplRecord>(l)
                .map_err(|e| anyhow!("{what}:{}: not a kvq perplexity --json record: {e}", i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let base = recs
        .iter()
        .find(|r| r.spec == crate::eval::BASELINE)
        .ok_or_else(|| anyhow!("{what}: no {} record to compare with", crate::eval::BASELINE))?
        .ppl;
    Ok(recs
        .iter()
        .filter(|r| r.spec != crate::eval::BASELINE)
        .map(|r| QualityPoint {
            label: r.spec.clone(),
            bits: r.bits_per_element,
            delta_pct: 100.0 * (r.ppl / base - 1.0),
        })
        .collect())
}

/// A reference point given as `LABEL=BITS:DELTA_PCT` (for example `llama.cpp q4_0=4.5:5.27`).
///
/// # Errors
/// Another shape, or numbers that do not parse.
pub fn parse_ref(s: &str) -> Result<QualityPoint> {
    let (label, rest) =
        s.rsplit_once('=').ok_or_else(|| anyhow!("--ref {s:?}: expected LABEL=BITS:DELTA_PCT"))?;
    let (b, d) = rest.split_once(':').ok_or_else(|| anyhow!("--ref {s:?}: expected LABEL=BITS:DELTA_PCT"))?;
    let num = |x: &str| {
        x.trim()
            .trim_start_matches('+')
            .parse::<f64>()
            .map_err(|_| anyhow!("--ref {s:?}: {x:?} is not a number"))
    };
    Ok(QualityPoint { label: label.trim().to_string(), bits: num(b)?, delta_pct: num(d)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_points_are_against_their_runs_baseline() {
        let rec = |spec: &str, ppl: f64, bits: f64| {
            format!(
                r#"{{"spec":"{spec}","ppl":{ppl},"ppl_stderr":0.1,"kld":0.0,"kld_stderr":0.0,"top1_agree":1.0,"bits_per_element":{bits},"kv_bytes":1,"scored":10}}"#
            )
        };
        let run = [rec("f16", 20.0, 16.0), rec("kvq2", 21.0, 3.5)].join("\n");
        let p = quality_points(&run, "run").unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].label.as_str(), p[0].bits), ("kvq2", 3.5));
        assert!((p[0].delta_pct - 5.0).abs() < 1e-9);
        assert!(quality_points(&rec("kvq2", 21.0, 3.5), "run").unwrap_err().to_string().contains("no f16"));
        assert!(quality_points("{", "run").is_err());
        let r = parse_ref("llama.cpp q4_0=4.5:+5.27").unwrap();
        assert_eq!((r.label.as_str(), r.bits, r.delta_pct), ("llama.cpp q4_0", 4.5, 5.27));
        assert!(parse_ref("q4_0=4.5").is_err() && parse_ref("q4_0=x:1").is_err());
    }
}
