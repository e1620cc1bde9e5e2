//! Hand-written SVG bar charts (no plotting crate): one group of horizontal
//! bars per configuration, one bar per series, the median as the bar and the
//! min–max spread as a whisker. Pure: data in, SVG text out.

use std::fmt::Write as _;

use super::stats::Summary;

/// A chart: `rows` are (configuration, one optional summary per series).
pub struct Chart<'a> {
    pub title: &'a str,
    pub unit: &'a str,
    pub series: &'a [&'a str],
    pub rows: Vec<(String, Vec<Option<Summary>>)>,
}

const COLORS: [&str; 6] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"];
const WIDTH: f64 = 960.0;
const LABEL_W: f64 = 210.0;
const RIGHT_PAD: f64 = 130.0;
const BAR_H: f64 = 13.0;
const TOP: f64 = 58.0;

fn esc(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn number(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn bar_chart(chart: &Chart<'_>) -> String {
    let n = chart.series.len().max(1) as f64;
    let group_h = n * BAR_H + 12.0;
    let height = TOP + group_h * chart.rows.len().max(1) as f64 + 30.0;
    let max = chart
        .rows
        .iter()
        .flat_map(|(_, values)| values.iter().flatten().map(|s| s.max.max(s.median)))
        .fold(0.0_f64, f64::max);
    let scale = if max > 0.0 { (WIDTH - LABEL_W - RIGHT_PAD) / max } else { 0.0 };
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="10" y="20" font-size="15" font-weight="bold">{} ({})</text>"#,
        esc(chart.title),
        esc(chart.unit)
    );
    let mut x = LABEL_W;
    for (i, name) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let _ = writeln!(svg, r#"<rect x="{x}" y="32" width="12" height="12" fill="{color}"/>"#);
        let _ = writeln!(svg, r#"<text x="{}" y="42">{}</text>"#, x + 16.0, esc(name));
        x += 24.0 + 7.0 * name.chars().count() as f64;
    }
    for (r, (label, values)) in chart.rows.iter().enumerate() {
        let y0 = TOP + r as f64 * group_h;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            LABEL_W - 8.0,
            y0 + group_h / 2.0,
            esc(label)
        );
        if values.iter().all(Option::is_none) {
            let _ = writeln!(
                svg,
                r##"<text x="{LABEL_W}" y="{}" fill="#888">not measured (see the report)</text>"##,
                y0 + group_h / 2.0
            );
            continue;
        }
        for (i, value) in values.iter().enumerate() {
            let y = y0 + i as f64 * BAR_H;
            let Some(s) = value else {
                let _ = writeln!(svg, r##"<text x="{LABEL_W}" y="{}" fill="#888">n/a</text>"##, y + BAR_H - 3.0);
                continue;
            };
            let color = COLORS[i % COLORS.len()];
            let w = (s.median * scale).max(0.5);
            let _ = writeln!(
                svg,
                r#"<rect x="{LABEL_W}" y="{y}" width="{w:.1}" height="{}" fill="{color}"><title>{} {}: {} ({}–{})</title></rect>"#,
                BAR_H - 2.0,
                esc(label),
                esc(chart.series.get(i).copied().unwrap_or("")),
                number(s.median),
                number(s.min),
                number(s.max)
            );
            if s.max > s.min {
                let (x1, x2, ym) = (LABEL_W + s.min * scale, LABEL_W + s.max * scale, y + (BAR_H - 2.0) / 2.0);
                let _ = writeln!(svg, r##"<line x1="{x1:.1}" x2="{x2:.1}" y1="{ym}" y2="{ym}" stroke="#222"/>"##);
                for xe in [x1, x2] {
                    let _ = writeln!(
                        svg,
                        r##"<line x1="{xe:.1}" x2="{xe:.1}" y1="{}" y2="{}" stroke="#222"/>"##,
                        ym - 3.0,
                        ym + 3.0
                    );
                }
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{}">{}</text>"#,
                LABEL_W + s.max.max(s.median) * scale + 5.0,
                y + BAR_H - 3.0,
                number(s.median)
            );
        }
    }
    let _ = writeln!(
        svg,
        r##"<text x="10" y="{}" fill="#666">bar = median over repetitions, whisker = min–max</text>"##,
        height - 10.0
    );
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::summarize;

    #[test]
    fn chart_has_a_bar_per_value_and_marks_missing_ones() {
        let svg = bar_chart(&Chart {
            title: "Throughput <bulk>",
            unit: "MB/s",
            series: &["upload", "download"],
            rows: vec![
                ("direct".into(), vec![summarize(&[900.0, 1000.0, 1100.0]), None]),
                ("connect-uds/sockmap".into(), vec![None, None]),
            ],
        });
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<title>").count(), 1);
        assert_eq!(svg.matches(">n/a<").count(), 1, "one missing value of a measured row");
        assert_eq!(svg.matches(">not measured").count(), 1, "one line for a row without values");
        assert!(svg.contains("Throughput &lt;bulk&gt;"));
        assert!(svg.contains(">1000<"), "median label");
    }
}
