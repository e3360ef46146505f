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

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
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
