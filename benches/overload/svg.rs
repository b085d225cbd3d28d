//! Hand-written SVG line charts for the overload simulation (no dependency).

use std::fmt::Write as _;

/// One curve: a name for the legend, a colour and a dash pattern, and one value
/// per x category (`None` leaves a gap: no point, and the line breaks there).
pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub dash: &'static str,
    /// Line width; a wide pale line stays visible under curves that coincide.
    pub width: f64,
    pub opacity: f64,
    pub values: Vec<Option<f64>>,
    /// Points drawn hollow (for example: computed from few samples).
    pub hollow: Vec<bool>,
}

/// A horizontal reference line with a label.
pub struct Guide {
    pub value: f64,
    pub label: String,
}

pub struct Chart<'a> {
    pub title: &'a str,
    /// Lines under the title.
    pub subtitle: &'a [String],
    /// A note under the legend.
    pub note: &'a [String],
    pub x_title: &'a str,
    pub y_title: &'a str,
    pub x_labels: &'a [String],
    pub y_max: f64,
    pub y_step: f64,
    pub y_decimals: usize,
    pub series: &'a [Series],
    pub guides: &'a [Guide],
}

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 460.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 290.0;
const TOP: f64 = 76.0;
const BOTTOM: f64 = 62.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart<'_> {
    pub fn render(&self) -> String {
        let plot_w = WIDTH - LEFT - RIGHT;
        let plot_h = HEIGHT - TOP - BOTTOM;
        let n = self.x_labels.len().max(1);
        let x_at = |i: usize| LEFT + plot_w * (i as f64 + 0.5) / n as f64;
        let y_at = |v: f64| TOP + plot_h * (1.0 - (v / self.y_max).clamp(0.0, 1.0));

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="Helvetica, Arial, sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            s,
            r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
            WIDTH / 2.0,
            esc(self.title)
        );
        for (i, line) in self.subtitle.iter().enumerate() {
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" text-anchor="middle" font-size="11" fill="#555">{}</text>"##,
                WIDTH / 2.0,
                42 + 14 * i,
                esc(line)
            );
        }

        // Horizontal grid and y tick labels.
        let mut v = 0.0;
        while v <= self.y_max + 1e-9 {
            let y = y_at(v);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##,
                LEFT + plot_w
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{v:.prec$}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                prec = self.y_decimals
            );
            v += self.y_step;
        }
        // x tick labels.
        for (i, label) in self.x_labels.iter().enumerate() {
            let x = x_at(i);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/>"##,
                TOP + plot_h
            );
            let _ = writeln!(
                s,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                TOP + plot_h + 18.0,
                esc(label)
            );
        }
        // Axes.
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="13">{}</text>"#,
            LEFT + plot_w / 2.0,
            HEIGHT - 18.0,
            esc(self.x_title)
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" font-size="13" transform="rotate(-90 18 {:.1})">{}</text>"#,
            TOP + plot_h / 2.0,
            TOP + plot_h / 2.0,
            esc(self.y_title)
        );

        // Reference lines.
        for guide in self.guides {
            let y = y_at(guide.value);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#888" stroke-dasharray="2 3"/>"##,
                LEFT + plot_w
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#666">{}</text>"##,
                LEFT + 4.0,
                y - 4.0,
                esc(&guide.label)
            );
        }

        // Curves: a polyline per run of consecutive points, then markers.
        for series in self.series {
            let mut runs: Vec<Vec<(f64, f64, bool)>> = vec![Vec::new()];
            for (i, value) in series.values.iter().enumerate() {
                let hollow = series.hollow.get(i).copied().unwrap_or(false);
                match value {
                    Some(v) => runs.last_mut().expect("runs is never empty").push((
                        x_at(i),
                        y_at(*v),
                        hollow,
                    )),
                    None => runs.push(Vec::new()),
                }
            }
            for run in runs.iter().filter(|r| r.len() > 1) {
                let points: Vec<String> = run
                    .iter()
                    .map(|(x, y, _)| format!("{x:.1},{y:.1}"))
                    .collect();
                let _ = writeln!(
                    s,
                    r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="{}" stroke-opacity="{}" stroke-dasharray="{}"/>"#,
                    points.join(" "),
                    series.color,
                    series.width,
                    series.opacity,
                    series.dash
                );
            }
            for (x, y, hollow) in runs.iter().flatten() {
                let (fill, stroke) = if *hollow {
                    ("white", series.color)
                } else {
                    (series.color, "white")
                };
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3.8" fill="{fill}" stroke="{stroke}" stroke-width="1.4"/>"#
                );
            }
        }

        // Legend.
        let lx = LEFT + plot_w + 18.0;
        for (i, series) in self.series.iter().enumerate() {
            let y = TOP + 10.0 + 22.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{lx:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="{}" stroke-opacity="{}" stroke-dasharray="{}"/>"#,
                lx + 26.0,
                series.color,
                series.width,
                series.opacity,
                series.dash
            );
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{y:.1}" r="3.6" fill="{}"/>"#,
                lx + 13.0,
                series.color
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
                lx + 32.0,
                y + 4.0,
                esc(&series.name)
            );
        }
        let ny = TOP + 10.0 + 22.0 * self.series.len() as f64 + 10.0;
        for (i, line) in self.note.iter().enumerate() {
            let _ = writeln!(
                s,
                r##"<text x="{lx:.1}" y="{:.1}" font-size="11" fill="#555">{}</text>"##,
                ny + 15.0 * i as f64,
                esc(line)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}
