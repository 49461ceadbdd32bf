//! An experiment report as a text summary and as one self-contained HTML page: a table per
//! variant, each rate with its interval as a dot and whisker (inline SVG), and each variant's
//! difference to control with its single-look and always-valid intervals. No script, no
//! fetched asset: the file can be mailed or archived as it is.

use std::fmt::Write as _;

use forfall_domain::experiment::{Rate, Report};
use forfall_domain::stats::Interval;

/// The rates shown, with what they mean to a credit controller.
const RATES: [(&str, &str); 6] = [
    ("settled_before_fee", "Settled before any fee"),
    ("settled_before_handoff", "Settled before the hand-off"),
    ("settled", "Settled in all"),
    ("handed_over", "Handed to the agency"),
    ("charged_a_fee", "Charged a fee"),
    ("disputed", "Disputed"),
];

fn percent(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

fn points(x: f64) -> String {
    format!("{:+.1} pp", x * 100.0)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The report as a few lines of text, for the terminal.
pub fn summary(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "experiment {} (control: {}; alpha {})",
        r.experiment, r.control, r.alpha
    );
    if let Some(s) = &r.sample_ratio {
        let _ = writeln!(
            out,
            "sample ratio: chi-squared {:.2}, p = {:.4}{}",
            s.chi_squared,
            s.p_value,
            if s.mismatch {
                "  MISMATCH: the assignment or the counting is broken; do not trust the differences"
            } else {
                ""
            }
        );
    }
    for v in &r.variants {
        let before_fee = &v.metrics["settled_before_fee"];
        let _ = write!(
            out,
            "{:<16} {:>7} invoices {:>7} debtors  settled before any fee {:>7}",
            v.variant,
            v.invoices,
            v.debtors,
            percent(before_fee.rate)
        );
        if let Some(d) = v
            .versus_control
            .as_ref()
            .and_then(|c| c.differences.get("settled_before_fee"))
        {
            let _ = write!(
                out,
                "  vs control {} [{}, {}] always-valid, p = {:.4}{}",
                points(d.sequential.estimate),
                points(d.sequential.interval.low),
                points(d.sequential.interval.high),
                d.sequential.p_value,
                if d.significant() { " *" } else { "" }
            );
        }
        out.push('\n');
    }
    for unknown in &r.unknown_variants {
        let _ = writeln!(out, "left out: variant '{unknown}' is not in the policy's experiment");
    }
    out
}

/// A horizontal dot-and-whisker plot: one row per label, the scale from `min` to `max`.
fn whiskers(
    rows: &[(String, f64, Option<Interval>)],
    min: f64,
    max: f64,
    zero_line: bool,
    label: fn(f64) -> String,
) -> String {
    let (width, row_h, left, right) = (560.0, 26.0, 150.0, 20.0);
    let height = row_h * rows.len() as f64 + 30.0;
    let span = (max - min).max(1e-9);
    let x = |v: f64| left + (v.clamp(min, max) - min) / span * (width - left - right);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" font-family="sans-serif" font-size="12">"#
    );
    for tick in 0..=4 {
        let v = min + span * f64::from(tick) / 4.0;
        let _ = write!(
            svg,
            r##"<line x1="{x:.1}" y1="4" x2="{x:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{x:.1}" y="{t:.1}" text-anchor="middle" fill="#555">{}</text>"##,
            escape(&label(v)),
            x = x(v),
            y = height - 22.0,
            t = height - 8.0
        );
    }
    if zero_line && min < 0.0 && max > 0.0 {
        let _ = write!(
            svg,
            r##"<line x1="{z:.1}" y1="4" x2="{z:.1}" y2="{y:.1}" stroke="#333" stroke-dasharray="4 3"/>"##,
            z = x(0.0),
            y = height - 22.0
        );
    }
    for (i, (name, value, interval)) in rows.iter().enumerate() {
        let y = 16.0 + row_h * i as f64;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{:.1}" text-anchor="end" fill="#222">{}</text>"##,
            left - 8.0,
            y + 4.0,
            escape(name)
        );
        if let Some(iv) = interval {
            let _ = write!(
                svg,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#3465a4" stroke-width="2"><title>{} to {}</title></line>"##,
                x(iv.low),
                x(iv.high),
                escape(&label(iv.low)),
                escape(&label(iv.high))
            );
        }
        let _ = write!(
            svg,
            r##"<circle cx="{:.1}" cy="{y:.1}" r="4" fill="#204a87"><title>{}</title></circle>"##,
            x(*value),
            escape(&label(*value))
        );
    }
    svg.push_str("</svg>");
    svg
}

fn rate_cell(r: &Rate) -> String {
    match &r.interval {
        Some(i) => format!(
            "{} <small>({} of {}; {} to {})</small>",
            percent(r.rate),
            r.count,
            r.of,
            percent(i.low),
            percent(i.high)
        ),
        None => "no invoices".into(),
    }
}

/// The report as one HTML page.
pub fn page(r: &Report) -> String {
    let mut h = String::new();
    let title = format!("Experiment {}", r.experiment);
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{t}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}.warn{{background:#fce9e9;border:1px solid #c00;padding:8px}}small{{color:#555}}</style></head><body>
<h1>{t}</h1><p>Control: <b>{c}</b>. Intervals at {level} %. A difference is marked significant only when its <em>always-valid</em> interval (valid however often this report is looked at) excludes zero.</p>"#,
        t = escape(&title),
        c = escape(&r.control),
        level = (1.0 - r.alpha) * 100.0
    );
    if let Some(s) = &r.sample_ratio {
        if s.mismatch {
            let _ = write!(
                h,
                r#"<p class="warn"><b>Sample ratio mismatch</b>: the variants' sizes do not fit their weights (chi-squared {:.2}, p = {:.2e}). The assignment or the counting is broken; do not trust the differences below.</p>"#,
                s.chi_squared, s.p_value
            );
        } else {
            let _ = write!(
                h,
                "<p>Sample ratio: chi-squared {:.2} on {} degrees of freedom, p = {:.4}: the sizes fit the weights.</p>",
                s.chi_squared, s.degrees_of_freedom, s.p_value
            );
        }
    }
    if !r.unknown_variants.is_empty() {
        let _ = write!(
            h,
            r#"<p class="warn">Left out: variants the journeys name but the policy's experiment does not: {}.</p>"#,
            escape(&r.unknown_variants.join(", "))
        );
    }
    h.push_str("<h2>Variants</h2><div style=\"overflow-x:auto\"><table><tr><th>Variant</th><th>Weight</th><th>Debtors</th><th>Invoices</th>");
    for (_, label) in RATES {
        let _ = write!(h, "<th>{label}</th>");
    }
    h.push_str("<th>Fees charged</th><th>Messages</th><th>Days due → paid (mean / median)</th></tr>");
    for v in &r.variants {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            escape(&v.variant),
            v.weight,
            v.debtors,
            v.invoices
        );
        for (key, _) in RATES {
            let _ = write!(h, "<td>{}</td>", v.metrics.get(key).map(rate_cell).unwrap_or_default());
        }
        let fees: Vec<String> = v
            .fees_minor
            .iter()
            .map(|(currency, minor)| format!("{:.2} {currency}", *minor as f64 / 100.0))
            .collect();
        let messages: Vec<String> = v.messages.iter().map(|(c, n)| format!("{c}: {n}")).collect();
        let days = v
            .days_to_payment
            .as_ref()
            .map(|d| format!("{:.1} / {:.1}", d.mean, d.median))
            .unwrap_or_else(|| "none paid".into());
        let _ = write!(
            h,
            "<td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&fees.join(", ")),
            escape(&messages.join(", ")),
            days
        );
    }
    h.push_str("</table></div>");
    for (key, label) in RATES {
        let rows: Vec<(String, f64, Option<Interval>)> = r
            .variants
            .iter()
            .filter_map(|v| v.metrics.get(key).map(|m| (v.variant.clone(), m.rate, m.interval)))
            .collect();
        let _ = write!(h, "<h3>{label}</h3>{}", whiskers(&rows, 0.0, 1.0, false, percent));
        let diffs: Vec<(String, f64, Option<Interval>)> = r
            .variants
            .iter()
            .filter_map(|v| {
                let d = v.versus_control.as_ref()?.differences.get(key)?;
                Some([
                    (
                        format!("{} (one look)", v.variant),
                        d.fixed.estimate,
                        Some(d.fixed.interval),
                    ),
                    (
                        format!("{} (always valid)", v.variant),
                        d.sequential.estimate,
                        Some(d.sequential.interval),
                    ),
                ])
            })
            .flatten()
            .collect();
        if !diffs.is_empty() {
            let reach = diffs
                .iter()
                .flat_map(|(_, e, i)| [e.abs(), i.map_or(0.0, |i| i.low.abs().max(i.high.abs()))])
                .fold(0.01_f64, f64::max)
                .min(1.0);
            let _ = write!(
                h,
                "<p>Difference to control ({}):</p>{}",
                escape(&r.control),
                whiskers(&diffs, -reach, reach, true, points)
            );
            h.push_str("<table><tr><th>Variant</th><th>Difference</th><th>One look</th><th>Always valid</th><th>p (always valid)</th></tr>");
            for v in &r.variants {
                if let Some(d) = v.versus_control.as_ref().and_then(|c| c.differences.get(key)) {
                    let _ = write!(
                        h,
                        "<tr><td>{}</td><td>{}</td><td>{} to {}</td><td>{} to {}</td><td>{:.4}{}</td></tr>",
                        escape(&v.variant),
                        points(d.sequential.estimate),
                        points(d.fixed.interval.low),
                        points(d.fixed.interval.high),
                        points(d.sequential.interval.low),
                        points(d.sequential.interval.high),
                        d.sequential.p_value,
                        if d.significant() { " (significant)" } else { "" }
                    );
                }
            }
            h.push_str("</table>");
        }
    }
    h.push_str("<p><small>Wilson intervals for rates; Newcombe's hybrid score interval for a single look at a difference; the asymptotic confidence sequence of Waudby-Smith et al. (2023), as GrowthBook uses it (tuned for 5,000 invoices), for the always-valid interval and p-value; Pearson's chi-squared test of the debtors per variant against the weights, flagged below p = 0.001. Invoices are the unit; a debtor's invoices share a variant.</small></p></body></html>\n");
    h
}
