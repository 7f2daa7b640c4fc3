//! What a run writes: `summary.json`, a terminal table, and `report.html`
//! with SVG plots drawn by plotters (self-contained: the SVG is inline).

use std::fmt::Write as _;

use plotters::prelude::*;

use crate::run::{Outcome, Summary};

/// One colour per policy, the same in every plot where lines are policies.
fn policy_color(name: &str) -> RGBColor {
    match name {
        "spotguard" => RGBColor(31, 119, 180),
        "spotguard-2-regions" => RGBColor(148, 103, 189),
        "seed" => RGBColor(214, 39, 40),
        "single-region" => RGBColor(44, 160, 44),
        _ => RGBColor(127, 127, 127),
    }
}

/// Groups (primary, fallback 1, 2, ...) and other series: a palette of
/// their own, so that no line looks like a policy.
const SERIES_COLORS: [RGBColor; 6] = [
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(188, 189, 34),
    RGBColor(227, 119, 194),
    RGBColor(0, 0, 0),
];

/// One colour per failover state, in the mode timeline.
const STATES: [(&str, RGBColor); 3] = [
    ("normal", RGBColor(210, 210, 210)),
    ("failed over", RGBColor(214, 39, 40)),
    ("failing back", RGBColor(255, 160, 40)),
];

/// The table's columns: header and the cell of one policy's summary.
type Column = (&'static str, fn(&Summary, Option<f64>) -> String);

fn kills(s: &Summary, cause: &str) -> usize {
    s.killed.get(cause).copied().unwrap_or(0)
}

const COLUMNS: &[Column] = &[
    ("policy", |s, _| s.policy.clone()),
    ("jobs done", |s, _| format!("{}/{}", s.done, s.jobs)),
    ("stranded", |s, _| s.stranded.to_string()),
    ("p50 wait s", |s, _| format!("{:.0}", s.wait_p50_s)),
    ("p95 wait s", |s, _| format!("{:.0}", s.wait_p95_s)),
    ("p95 vs no outage", |s, b| {
        b.filter(|b| *b > 0.0)
            .map_or("-".to_string(), |b| format!("{:.2}x", s.wait_p95_s / b))
    }),
    ("p95 done s", |s, _| format!("{:.0}", s.completion_p95_s)),
    ("killed: failback", |s, _| kills(s, "Failback").to_string()),
    ("killed: scale-in", |s, _| {
        (kills(s, "GroupScaleIn") + kills(s, "AgentScaleIn")).to_string()
    }),
    ("killed: reclaim", |s, _| kills(s, "Reclaimed").to_string()),
    ("killed: replaced", |s, _| kills(s, "Replaced").to_string()),
    ("killed: agent died", |s, _| {
        kills(s, "AgentDied").to_string()
    }),
    ("lost", |s, _| s.lost.to_string()),
    ("dead-lettered", |s, _| s.dead_lettered.to_string()),
    ("fallback instance-h", |s, _| {
        format!("{:.1}", s.fallback_instance_hours)
    }),
    ("utilization", |s, _| format!("{:.2}", s.utilization)),
    ("total cost $", |s, _| format!("{:.2}", s.cost_usd)),
    ("mode changes", |s, _| s.mode_changes.to_string()),
    ("invariant violations", |s, _| {
        s.violations.len().to_string()
    }),
];

/// The comparison table, one row per policy (Markdown, so it pastes into
/// the README). `stranded`: messages left with no instance at the end (the
/// baselines cannot start an empty group), apart from failover losses.
pub fn table(rows: &[&Summary], no_outage_p95: Option<f64>) -> String {
    let mut out = String::new();
    let heads: Vec<&str> = COLUMNS.iter().map(|c| c.0).collect();
    let _ = writeln!(out, "| {} |", heads.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(COLUMNS.len()));
    for s in rows {
        let cells: Vec<String> = COLUMNS.iter().map(|c| (c.1)(s, no_outage_p95)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

/// The same table in HTML.
pub fn html_table(rows: &[&Summary], no_outage_p95: Option<f64>) -> String {
    let mut out = String::from("<table><tr>");
    for c in COLUMNS {
        let _ = write!(out, "<th>{}</th>", esc(c.0));
    }
    out.push_str("</tr>");
    for s in rows {
        out.push_str("<tr>");
        for c in COLUMNS {
            let _ = write!(out, "<td>{}</td>", esc(&(c.1)(s, no_outage_p95)));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    out
}

type Line<'a> = (&'a str, &'a [f64]);

/// A line as drawn: its name, its points, its colour.
type Drawn<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

/// How a plot's lines are coloured: by policy name, or from the series
/// palette in order.
#[derive(Clone, Copy)]
enum Colors {
    Policies,
    Series,
}

impl Colors {
    fn of(self, k: usize, name: &str) -> RGBColor {
        match self {
            Colors::Policies => policy_color(name),
            Colors::Series => SERIES_COLORS[k % SERIES_COLORS.len()],
        }
    }
}

fn line_plot(
    title: &str,
    y_desc: &str,
    x: &[f64],
    lines: &[Line<'_>],
    step: bool,
    colors: Colors,
) -> Result<String, String> {
    let x_max = x.last().copied().unwrap_or(1.0).max(1.0) / 60.0;
    let y_max = lines
        .iter()
        .flat_map(|l| l.1.iter().copied())
        .fold(1.0f64, f64::max)
        * 1.1;
    let series = lines
        .iter()
        .enumerate()
        .map(|(k, (name, ys))| {
            let mut pts: Vec<(f64, f64)> = Vec::new();
            for (i, (xv, yv)) in x.iter().zip(ys.iter()).enumerate() {
                if step && i > 0 {
                    pts.push((xv / 60.0, ys[i - 1]));
                }
                pts.push((xv / 60.0, *yv));
            }
            (*name, pts, colors.of(k, name))
        })
        .collect();
    plot(
        title,
        ("simulated hours", y_desc),
        (x_max, y_max),
        series,
        SeriesLabelPosition::MiddleRight,
    )
}

/// Cumulative distribution of job waits, one line per policy.
fn wait_plot(outcomes: &[(&str, &Outcome)]) -> Result<String, String> {
    let x_max = outcomes
        .iter()
        .flat_map(|o| o.1.series.waits_s.last().copied())
        .fold(60.0f64, f64::max)
        / 60.0;
    let series = outcomes
        .iter()
        .map(|(name, o)| {
            let n = o.series.waits_s.len().max(1) as f64;
            let pts = o
                .series
                .waits_s
                .iter()
                .enumerate()
                .map(|(i, w)| (w / 60.0, (i + 1) as f64 / n))
                .collect();
            (*name, pts, policy_color(name))
        })
        .collect();
    plot(
        "job wait: share of jobs started within x minutes",
        ("wait (minutes)", "share of jobs"),
        (x_max, 1.0),
        series,
        SeriesLabelPosition::LowerRight,
    )
}

/// One SVG chart: named lines of points, over [0, x_max] x [0, y_max].
fn plot(
    title: &str,
    (x_desc, y_desc): (&str, &str),
    (x_max, y_max): (f64, f64),
    series: Vec<Drawn<'_>>,
    legend: SeriesLabelPosition,
) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 300)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()
            .map_err(|e| e.to_string())?;
        for (name, pts, color) in series {
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(legend)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// The modes as a categorical chart: one row per policy, a bar coloured
/// by state for each stretch of time in it (mode 0 normal, 1 failed over,
/// 2 failing back, sampled once a minute).
fn mode_plot(x: &[f64], rows: &[Line<'_>]) -> Result<String, String> {
    let x_max = x.last().copied().unwrap_or(1.0).max(1.0) / 60.0;
    let n = rows.len().max(1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 80 + 36 * n as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption("failover mode", ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(10)
            .build_cartesian_2d(0f64..x_max, 0f64..n as f64)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("simulated hours")
            .y_labels(0)
            .disable_y_mesh()
            .draw()
            .map_err(|e| e.to_string())?;
        // Row 0 (the first policy) at the top.
        for (k, (name, modes)) in rows.iter().enumerate() {
            let row = (n - 1 - k) as f64;
            let mut start = 0usize;
            while start < modes.len() {
                let m = modes[start];
                let mut end = start + 1;
                while end < modes.len() && modes[end] == m {
                    end += 1;
                }
                let state = (m.round().max(0.0) as usize).min(STATES.len() - 1);
                let x0 = x.get(start).copied().unwrap_or(0.0) / 60.0;
                let x1 = x.get(end).copied().map_or(x_max, |v| v / 60.0);
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x0, row + 0.15), (x1, row + 0.85)],
                        STATES[state].1.filled(),
                    )))
                    .map_err(|e| e.to_string())?;
                start = end;
            }
            chart
                .draw_series(std::iter::once(Text::new(
                    name.to_string(),
                    (x_max * 0.01, row + 0.62),
                    ("sans-serif", 13).into_font().color(&BLACK),
                )))
                .map_err(|e| e.to_string())?;
        }
        for (name, color) in STATES {
            chart
                .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

/// "primary", "fallback 1", ... for a run with `n` groups.
fn group_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|g| match g {
            0 => "primary".to_string(),
            k => format!("fallback {k}"),
        })
        .collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The whole report: the table, then per policy the backlog, instances and
/// mode plots, then the waits and costs across policies.
pub fn html(
    scenario: &str,
    seed: u64,
    outcomes: &[(&str, &Outcome)],
    no_outage_p95: Option<f64>,
) -> Result<String, String> {
    let mut body = String::new();
    let rows: Vec<&Summary> = outcomes.iter().map(|o| &o.1.summary).collect();
    let _ = write!(
        body,
        "<h1>spotguard-sim: {}</h1><p>seed {seed}; every run is the real agent and controller code in virtual time.</p>{}",
        esc(scenario),
        html_table(&rows, no_outage_p95)
    );
    let x = outcomes
        .first()
        .map(|o| o.1.series.minutes.clone())
        .unwrap_or_default();
    let backlog: Vec<(&str, &[f64])> = outcomes
        .iter()
        .map(|(n, o)| (*n, o.series.visible.as_slice()))
        .collect();
    body.push_str("<h2>Backlog over time</h2>");
    body.push_str(&line_plot(
        "visible messages",
        "messages",
        &x,
        &backlog,
        false,
        Colors::Policies,
    )?);
    // The outage windows: each region's spot capacity, from the run with
    // the most groups (every policy sees the same capacity).
    if let Some((_, o)) = outcomes
        .iter()
        .max_by_key(|o| o.1.series.group_capacity.len())
    {
        let names = group_names(o.series.group_capacity.len());
        let lines: Vec<(&str, &[f64])> = names
            .iter()
            .zip(&o.series.group_capacity)
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        body.push_str("<h2>Spot capacity per region (the outages)</h2>");
        body.push_str(&line_plot(
            "spot capacity",
            "instances",
            &x,
            &lines,
            true,
            Colors::Series,
        )?);
    }
    body.push_str("<h2>Instances per group, pending, and work</h2>");
    for (name, o) in outcomes {
        let s = &o.series;
        let names = group_names(s.group_in_service.len());
        let mut lines: Vec<(&str, &[f64])> = names
            .iter()
            .zip(&s.group_in_service)
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        lines.push(("primary pending", &s.primary_pending));
        lines.push(("fallbacks pending", &s.fallback_pending));
        body.push_str(&line_plot(
            &format!("{name}: instances in service per group"),
            "instances",
            &s.minutes,
            &lines,
            false,
            Colors::Series,
        )?);
        body.push_str(&line_plot(
            &format!("{name}: messages in flight and busy instances"),
            "count",
            &s.minutes,
            &[
                ("visible", &s.visible),
                ("in flight", &s.in_flight),
                ("busy instances", &s.busy),
            ],
            false,
            Colors::Series,
        )?);
    }
    body.push_str("<h2>Jobs killed over time, by cause</h2>");
    let kill_names: Vec<(String, &[f64])> = outcomes
        .iter()
        .flat_map(|(name, o)| {
            o.series
                .kills
                .iter()
                .map(move |(cause, v)| (format!("{name}: {cause}"), v.as_slice()))
        })
        .filter(|(_, v)| v.last().is_some_and(|k| *k > 0.0))
        .collect();
    let zeros = vec![0.0; x.len()];
    let mut kill_lines: Vec<(&str, &[f64])> =
        kill_names.iter().map(|(n, v)| (n.as_str(), *v)).collect();
    if kill_lines.is_empty() {
        kill_lines.push(("none killed, any policy", &zeros));
    }
    body.push_str(&line_plot(
        "executions killed (cumulative)",
        "jobs",
        &x,
        &kill_lines,
        true,
        Colors::Series,
    )?);
    body.push_str("<h2>Job wait-time distribution</h2>");
    body.push_str(&wait_plot(outcomes)?);
    body.push_str("<h2>Cumulative cost</h2>");
    let cost: Vec<(&str, &[f64])> = outcomes
        .iter()
        .map(|(n, o)| (*n, o.series.cost.as_slice()))
        .collect();
    body.push_str(&line_plot(
        "cumulative cost",
        "dollars",
        &x,
        &cost,
        false,
        Colors::Policies,
    )?);
    body.push_str("<h2>Failover mode timeline</h2><p>One row per policy, one colour per state (the original design: failed over while its fallback is open).</p>");
    let modes: Vec<(&str, &[f64])> = outcomes
        .iter()
        .map(|(n, o)| (*n, o.series.mode.as_slice()))
        .collect();
    body.push_str(&mode_plot(&x, &modes)?);
    Ok(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>spotguard-sim: {}</title><style>body{{font-family:sans-serif;max-width:820px;margin:auto}}pre{{font-size:11px;overflow-x:auto}}table{{border-collapse:collapse;font-size:11px}}td,th{{border:1px solid #ccc;padding:2px 4px}}svg{{display:block;margin:8px 0}}</style></head><body>{body}</body></html>\n",
        esc(scenario)
    ))
}
