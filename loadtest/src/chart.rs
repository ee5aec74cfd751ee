//! report.png: delivered tasks per second and pickup p99 per second, with faults marked.
//!
//! Labels need a TrueType font: DejaVu Sans from the system (Debian's fonts-dejavu-core).
//! Without one the chart is drawn without text, and the Markdown report says what it shows.

use std::path::Path;

use plotters::prelude::*;

use crate::report::Report;

const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> bool {
    let Some(bytes) = FONTS.iter().find_map(|p| std::fs::read(p).ok()) else {
        return false;
    };
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .is_ok()
}

/// Draws the chart; returns whether it has text labels.
pub fn draw(r: &Report, path: &Path) -> anyhow::Result<bool> {
    let labels = register_font();
    let root = BitMapBackend::new(path, (1100, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(320);
    let end = r.timeline.len().max(2) as u64;
    let tasks_max = r.timeline.iter().map(|t| t.1).max().unwrap_or(1).max(1);
    let pick_max = r.timeline.iter().filter_map(|t| t.2).fold(1.0f64, f64::max);
    let faults: Vec<u64> = r.faults.iter().map(|f| f.at_sec as u64).collect();
    let label_px = |n| if labels { n } else { 0 };

    let mut c = ChartBuilder::on(&top);
    c.margin(12)
        .x_label_area_size(label_px(28))
        .y_label_area_size(label_px(60));
    if labels {
        c.caption(
            format!("{:?}: tasks delivered per second (red: faults)", r.scenario),
            ("sans-serif", 18),
        );
    }
    let mut chart = c.build_cartesian_2d(0u64..end, 0u64..tasks_max + tasks_max / 10 + 1)?;
    if labels {
        chart.configure_mesh().x_desc("seconds").draw()?;
    }
    chart.draw_series(LineSeries::new(
        r.timeline.iter().map(|t| (t.0, t.1)),
        BLUE.stroke_width(2),
    ))?;
    chart.draw_series(
        faults
            .iter()
            .map(|&s| PathElement::new(vec![(s, 0), (s, tasks_max)], RED)),
    )?;

    let mut c = ChartBuilder::on(&bottom);
    c.margin(12)
        .x_label_area_size(label_px(28))
        .y_label_area_size(label_px(60));
    if labels {
        c.caption(
            "pickup p99 per second, ms (single-unit orders)",
            ("sans-serif", 18),
        );
    }
    let mut chart = c.build_cartesian_2d(0u64..end, 0f64..pick_max * 1.1)?;
    if labels {
        chart.configure_mesh().x_desc("seconds").draw()?;
    }
    chart.draw_series(LineSeries::new(
        r.timeline.iter().filter_map(|t| t.2.map(|p| (t.0, p))),
        GREEN.stroke_width(2),
    ))?;
    chart.draw_series(
        faults
            .iter()
            .map(|&s| PathElement::new(vec![(s, 0.0), (s, pick_max)], RED)),
    )?;
    root.present()?;
    Ok(labels)
}
