//! What a message says: templates per tenant, language and tone, rendered with minijinja.
//!
//! The defaults live in `services/dispatch/templates/<language>.toml` (labels, and per tone a
//! subject, an opening paragraph, an SMS text and, for a collection warning, what happens after
//! the deadline) plus two shared bodies (`body.txt.j2`, `body.html.j2`) that lay out what the law
//! asks every step to carry: each invoice with what it is for, its amount and due date, the fee,
//! the total, the deadline, the pay link and the bank details with the payment reference.
//! A tenant may replace any part in `<templates_dir>/<tenant>/<language>.toml`, including whole
//! `text` and `html` bodies.
//!
//! Every template is checked when loaded: it must compile, render against a worst-case sample,
//! keep the required content, and its SMS must fit the configured number of segments. A set
//! that fails any check is refused with every problem listed.

use std::collections::BTreeMap;
use std::path::Path;

use forfall_domain::sms;
use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};

pub const LANGUAGES: [&str; 5] = ["da", "nb", "sv", "fi", "en"];
pub const TONES: [&str; 5] = [
    "nudge",
    "reminder",
    "collection_warning",
    "payment_demand",
    "fresh_link",
];
const DEFAULT_TENANT: &str = "_default";

const BUILTIN_LANGUAGES: [(&str, &str); 5] = [
    ("da", include_str!("../templates/da.toml")),
    ("nb", include_str!("../templates/nb.toml")),
    ("sv", include_str!("../templates/sv.toml")),
    ("fi", include_str!("../templates/fi.toml")),
    ("en", include_str!("../templates/en.toml")),
];
const BODY_TEXT: &str = include_str!("../templates/body.txt.j2");
const BODY_HTML: &str = include_str!("../templates/body.html.j2");

/// One invoice as the debtor reads it.
#[derive(Debug, Clone, Serialize)]
pub struct InvoiceLine {
    pub number: String,
    pub description: Option<String>,
    pub amount: String,
    pub due_date: String,
    pub reference: Option<String>,
}

/// Everything a template may use. Amounts and dates are already formatted for the locale.
#[derive(Debug, Clone, Serialize)]
pub struct MessageContext {
    pub language: String,
    pub tone: String,
    pub creditor: String,
    pub debtor_name: Option<String>,
    pub invoices: Vec<InvoiceLine>,
    /// The earliest due date among the invoices.
    pub due_date: String,
    pub fee: Option<String>,
    pub total: String,
    /// Late interest accrued so far and the yearly rate, and the fixed compensation, where the
    /// policy claims them: not part of the total, claimed if the debt goes to collection.
    pub interest: Option<String>,
    pub interest_rate: Option<String>,
    pub compensation: Option<String>,
    pub pay_by: Option<String>,
    pub pay_link: String,
    pub bank_account: Option<String>,
    /// The payment reference to quote on a bank transfer (one invoice; a combined message
    /// lists each invoice's own reference).
    pub reference: Option<String>,
    pub contact: Option<String>,
}

/// A rendered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub subject: String,
    pub text: String,
    pub html: String,
    pub sms: String,
    /// What happens after the deadline (a collection warning's required statement), as rendered.
    pub consequence: String,
}

impl Content {
    /// SHA-256 (hex) of what `channel` carries of this message (the e-mail's subject, text and
    /// HTML; the SMS text; a webhook's subject and text): the evidence a hand-off lists, to be
    /// checked against the creditor's copy of what was sent.
    pub fn digest(&self, channel: &str) -> String {
        use sha2::{Digest, Sha256};
        let carried = match channel {
            "sms" => self.sms.clone(),
            "email" => format!("{}\n\n{}\n\n{}", self.subject, self.text, self.html),
            _ => format!("{}\n\n{}", self.subject, self.text),
        };
        hex::encode(Sha256::digest(carried.as_bytes()))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("message templates refused:\n  {}", .0.join("\n  "))]
pub struct TemplateError(pub Vec<String>);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LanguageFile {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    nudge: Option<ToneParts>,
    #[serde(default)]
    reminder: Option<ToneParts>,
    #[serde(default)]
    collection_warning: Option<ToneParts>,
    /// The creditor's own payment demand (NO betalingsoppfordring, SE inkassokrav, FI
    /// maksuvaatimus).
    #[serde(default)]
    payment_demand: Option<ToneParts>,
    /// A fresh link the debtor asked for on an expired link's page.
    #[serde(default)]
    fresh_link: Option<ToneParts>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToneParts {
    subject: Option<String>,
    intro: Option<String>,
    consequence: Option<String>,
    sms: Option<String>,
    /// A whole plain-text body, replacing the shared layout.
    text: Option<String>,
    /// A whole HTML body, replacing the shared layout.
    html: Option<String>,
}

impl LanguageFile {
    fn tone(&self, tone: &str) -> Option<&ToneParts> {
        match tone {
            "nudge" => self.nudge.as_ref(),
            "reminder" => self.reminder.as_ref(),
            "collection_warning" => self.collection_warning.as_ref(),
            "payment_demand" => self.payment_demand.as_ref(),
            "fresh_link" => self.fresh_link.as_ref(),
            _ => None,
        }
    }
}

/// The loaded, checked templates of every tenant.
pub struct Templates {
    env: Environment<'static>,
    /// (tenant, language) → labels, tenant labels over the defaults.
    labels: BTreeMap<(String, String), BTreeMap<String, String>>,
}

fn name(tenant: &str, language: &str, tone: &str, part: &str) -> String {
    // The `.html` suffix turns on minijinja's HTML escaping for that template.
    if part == "html" {
        format!("{tenant}/{language}/{tone}/body.html")
    } else {
        format!("{tenant}/{language}/{tone}/{part}")
    }
}

impl Templates {
    /// The built-in templates plus each tenant's in `dir` (`<tenant>/<language>.toml`), checked.
    pub fn load(dir: Option<&Path>, max_sms_segments: usize) -> Result<Self, TemplateError> {
        let mut problems = Vec::new();
        let mut files: BTreeMap<(String, String), LanguageFile> = BTreeMap::new();
        for (language, source) in BUILTIN_LANGUAGES {
            match toml::from_str::<LanguageFile>(source) {
                Ok(f) => {
                    files.insert((DEFAULT_TENANT.to_owned(), language.to_owned()), f);
                }
                Err(e) => problems.push(format!("built-in {language}.toml: {e}")),
            }
        }
        if let Some(dir) = dir {
            read_tenant_files(dir, &mut files, &mut problems);
        }
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        let add = |env: &mut Environment<'static>, name: String, source: String, problems: &mut Vec<String>| {
            if let Err(e) = env.add_template_owned(name.clone(), source) {
                problems.push(format!("{name}: {e}"));
            }
        };
        add(&mut env, "layout/body.txt".into(), BODY_TEXT.into(), &mut problems);
        add(&mut env, "layout/body.html".into(), BODY_HTML.into(), &mut problems);
        let mut labels = BTreeMap::new();
        for ((tenant, language), file) in &files {
            let mut merged = files
                .get(&(DEFAULT_TENANT.to_owned(), language.clone()))
                .map(|d| d.labels.clone())
                .unwrap_or_default();
            merged.extend(file.labels.clone());
            labels.insert((tenant.clone(), language.clone()), merged);
            for tone in TONES {
                let Some(parts) = file.tone(tone) else { continue };
                for (part, source) in [
                    ("subject", &parts.subject),
                    ("intro", &parts.intro),
                    ("consequence", &parts.consequence),
                    ("sms", &parts.sms),
                    ("text", &parts.text),
                    ("html", &parts.html),
                ] {
                    if let Some(source) = source {
                        add(
                            &mut env,
                            name(tenant, language, tone, part),
                            source.clone(),
                            &mut problems,
                        );
                    }
                }
            }
        }
        let templates = Templates { env, labels };
        // Checked even when some failed to compile, so that one run lists every problem.
        templates.check(max_sms_segments, &mut problems);
        let mut seen = std::collections::HashSet::new();
        problems.retain(|p| seen.insert(p.clone()));
        if problems.is_empty() {
            Ok(templates)
        } else {
            Err(TemplateError(problems))
        }
    }

    fn tenants(&self) -> Vec<String> {
        let mut t: Vec<String> = self.labels.keys().map(|(t, _)| t.clone()).collect();
        t.dedup();
        t
    }

    /// Every tenant, language and tone renders against worst-case samples, keeps what the law
    /// requires, and its SMS fits.
    fn check(&self, max_sms_segments: usize, problems: &mut Vec<String>) {
        for tenant in self.tenants() {
            for language in LANGUAGES {
                for tone in TONES {
                    for sample in [sample(language, tone, 1), sample(language, tone, 3)] {
                        let at = format!("tenant '{tenant}', language '{language}', tone '{tone}'");
                        let content = match self.render(&tenant, &sample) {
                            Ok(c) => c,
                            Err(e) => {
                                problems.push(format!("{at}: {e}"));
                                break;
                            }
                        };
                        for missing in missing_required(&content, &sample) {
                            problems.push(format!("{at}: {missing}"));
                        }
                        let length = sms::length(&content.sms);
                        if length.segments > max_sms_segments {
                            problems.push(format!(
                                "{at}: the SMS takes {} segments ({} {:?} units) with {} invoice(s), more than the limit of {max_sms_segments}",
                                length.segments,
                                length.units,
                                length.encoding,
                                sample.invoices.len()
                            ));
                        }
                    }
                }
            }
        }
    }

    /// The most specific template for a part: the tenant's, then the default, in the
    /// language, then in English.
    fn pick(&self, tenant: &str, language: &str, tone: &str, part: &str) -> Option<minijinja::Template<'_, '_>> {
        [
            (tenant, language),
            (DEFAULT_TENANT, language),
            (tenant, "en"),
            (DEFAULT_TENANT, "en"),
        ]
        .into_iter()
        .find_map(|(t, l)| self.env.get_template(&name(t, l, tone, part)).ok())
    }

    fn labels(&self, tenant: &str, language: &str) -> BTreeMap<String, String> {
        self.labels
            .get(&(tenant.to_owned(), language.to_owned()))
            .or_else(|| self.labels.get(&(DEFAULT_TENANT.to_owned(), language.to_owned())))
            .or_else(|| self.labels.get(&(DEFAULT_TENANT.to_owned(), "en".to_owned())))
            .cloned()
            .unwrap_or_default()
    }

    /// Renders a message for `ctx` with `tenant`'s templates.
    pub fn render(&self, tenant: &str, ctx: &MessageContext) -> Result<Content, minijinja::Error> {
        let language = if LANGUAGES.contains(&ctx.language.as_str()) {
            ctx.language.as_str()
        } else {
            "en"
        };
        let tone = ctx.tone.as_str();
        let part = |p: &str| -> Result<String, minijinja::Error> {
            match self.pick(tenant, language, tone, p) {
                Some(t) => Ok(t.render(ctx)?.trim().to_owned()),
                None => Ok(String::new()),
            }
        };
        let subject = part("subject")?;
        let intro = part("intro")?;
        let consequence = part("consequence")?;
        let sms = gsm_friendly(&part("sms")?);
        let full = minijinja::context! {
            subject => &subject,
            intro => &intro,
            consequence => (!consequence.is_empty()).then_some(&consequence),
            labels => self.labels(tenant, language),
            ..minijinja::Value::from_serialize(ctx)
        };
        let body = |p: &str, layout: &str| -> Result<String, minijinja::Error> {
            let own = [(tenant, language), (DEFAULT_TENANT, language)]
                .into_iter()
                .find_map(|(t, l)| self.env.get_template(&name(t, l, tone, p)).ok());
            let template = match own {
                Some(t) => t,
                None => self.env.get_template(layout)?,
            };
            template.render(&full)
        };
        let text = body("text", "layout/body.txt")?;
        let html = body("html", "layout/body.html")?;
        Ok(Content {
            subject,
            text,
            html,
            sms,
            consequence,
        })
    }
}

fn read_tenant_files(dir: &Path, files: &mut BTreeMap<(String, String), LanguageFile>, problems: &mut Vec<String>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(format!("{}: {e}", dir.display()));
            return;
        }
    };
    for tenant_dir in entries.flatten().filter(|e| e.path().is_dir()) {
        let tenant = tenant_dir.file_name().to_string_lossy().into_owned();
        let Ok(langs) = std::fs::read_dir(tenant_dir.path()) else {
            continue;
        };
        for file in langs.flatten() {
            let path = file.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let language = path.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_owned();
            if !LANGUAGES.contains(&language.as_str()) {
                problems.push(format!(
                    "{}: '{language}' is not a supported language ({})",
                    path.display(),
                    LANGUAGES.join(", ")
                ));
                continue;
            }
            match std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|s| toml::from_str::<LanguageFile>(&s).map_err(|e| e.to_string()))
            {
                Ok(f) => {
                    files.insert((tenant.clone(), language), f);
                }
                Err(e) => problems.push(format!("{}: {e}", path.display())),
            }
        }
    }
}

/// A context as long as real ones get: long names, large amounts, a full-length pay link.
fn sample(language: &str, tone: &str, invoices: usize) -> MessageContext {
    let line = |i: usize| InvoiceLine {
        number: format!("SAMPLE-NO-2026-{i:05}"),
        description: Some(format!("SAMPLE-FOR-Electricity {i}")),
        amount: "SAMPLE-AMT 1.234.567,89 kr.".into(),
        due_date: "SAMPLE-DUE 31.12.2026".into(),
        reference: Some(format!("SAMPLE-REF-+71<000000001234567{i}+12345678<")),
    };
    let collection = matches!(tone, "reminder" | "collection_warning" | "payment_demand");
    MessageContext {
        language: language.to_owned(),
        tone: tone.to_owned(),
        creditor: "Nordisk Energi og Vand A/S".into(),
        debtor_name: Some("Bartholomæus Christoffersen-Vestergaard".into()),
        invoices: (1..=invoices).map(line).collect(),
        due_date: "SAMPLE-DUE 31.12.2026".into(),
        fee: collection.then(|| "SAMPLE-FEE 100,00 kr.".to_owned()),
        total: "SAMPLE-TOT 1.234.667,89 kr.".into(),
        interest: collection.then(|| "SAMPLE-INT 12.345,67 kr.".to_owned()),
        interest_rate: collection.then(|| "10,75 %".to_owned()),
        compensation: collection.then(|| "SAMPLE-COMP 310,00 kr.".to_owned()),
        pay_by: collection.then(|| "SAMPLE-BY 14.01.2027".to_owned()),
        // As long as a real link: base URL plus a v1 token for a long tenant, debtor and invoice.
        pay_link: format!("https://pay.example.invalid/p/{}", "x".repeat(150)),
        bank_account: Some("SAMPLE-BANK Reg. 1234 konto 0001234567".into()),
        reference: Some("SAMPLE-REF-+71<000000001234567+12345678<".into()),
        contact: Some("SAMPLE-CONTACT kundeservice@example.invalid".into()),
    }
}

/// Locale formatting writes no-break spaces and typographic marks that GSM-7 lacks: one of them
/// would turn the whole SMS into UCS-2 and more than double its segments. Plain equivalents
/// read the same on a phone.
fn gsm_friendly(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{a0}' | '\u{202f}' | '\u{2009}' => ' ',
            '\u{2018}' | '\u{2019}' => '\'',
            '\u{201c}' | '\u{201d}' | '\u{201e}' => '"',
            '\u{2013}' | '\u{2014}' => '-',
            c => c,
        })
        .collect()
}

/// `text` as minijinja's HTML auto-escaping writes it.
fn html_escaped(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            '/' => out.push_str("&#x2f;"),
            c => out.push(c),
        }
    }
    out
}

/// What the law asks a message of this tone to carry, and the rendered message lacks.
fn missing_required(content: &Content, ctx: &MessageContext) -> Vec<String> {
    let mut missing = Vec::new();
    // The last word before collection must say, also by SMS, by when and what follows.
    let final_notice = matches!(ctx.tone.as_str(), "collection_warning" | "payment_demand");
    let mut require = |what: &str, needle: &str, in_sms: bool| {
        for (part, text, needle) in [
            ("text", &content.text, needle.to_owned()),
            ("html", &content.html, html_escaped(needle)),
        ] {
            if !text.contains(&needle) {
                missing.push(format!("the {part} body does not show {what}"));
            }
        }
        if in_sms && !content.sms.contains(needle) {
            missing.push(format!("the SMS does not show {what}"));
        }
    };
    for line in &ctx.invoices {
        require("each invoice's number", &line.number, false);
        require("each invoice's amount", &line.amount, false);
        if let Some(description) = &line.description {
            require("what each invoice is for", description, false);
        }
    }
    require("the total", &ctx.total, true);
    require("the pay link", &ctx.pay_link, true);
    if let Some(fee) = &ctx.fee {
        require("the fee", fee, false);
    }
    if let Some(interest) = &ctx.interest {
        require("the late interest claimed", interest, false);
    }
    if let Some(compensation) = &ctx.compensation {
        require("the compensation claimed", compensation, false);
    }
    if let Some(pay_by) = &ctx.pay_by {
        require("the deadline", pay_by, final_notice);
    }
    if let Some(bank) = &ctx.bank_account {
        require("the bank details", bank, false);
    }
    if final_notice {
        if content.consequence.is_empty() {
            missing.push(format!(
                "a {} has no `consequence`: what happens after the deadline",
                ctx.tone.replace('_', " ")
            ));
        } else {
            require(
                "what happens after the deadline (the consequence)",
                &content.consequence.clone(),
                false,
            );
        }
    }
    if content.subject.is_empty() {
        missing.push("the subject is empty".into());
    }
    missing.dedup();
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_templates_pass_their_own_checks() {
        Templates::load(None, 3).expect("built-ins load");
    }

    #[test]
    fn every_language_and_tone_carries_the_required_content() {
        let t = Templates::load(None, 3).expect("load");
        for language in LANGUAGES {
            for tone in TONES {
                let ctx = sample(language, tone, 2);
                let c = t.render("_default", &ctx).expect("render");
                assert!(missing_required(&c, &ctx).is_empty(), "{language}/{tone}");
                assert!(c.html.starts_with("<!DOCTYPE html>"), "{language}/{tone}");
            }
        }
    }

    #[test]
    fn a_collection_warning_says_so_and_what_follows() {
        let t = Templates::load(None, 3).expect("load");
        let c = t
            .render("_default", &sample("da", "collection_warning", 1))
            .expect("render");
        assert!(c.subject.starts_with("Inkassovarsel"), "{}", c.subject);
        assert!(c.text.contains("sender vi kravet til inkasso"), "{}", c.text);
        let c = t
            .render("_default", &sample("nb", "collection_warning", 1))
            .expect("render");
        assert!(c.text.contains("blir kravet sendt til inkasso"), "{}", c.text);
    }

    #[test]
    fn html_escapes_what_the_debtor_or_tenant_wrote() {
        let t = Templates::load(None, 3).expect("load");
        let mut ctx = sample("en", "nudge", 1);
        ctx.debtor_name = Some("<script>alert(1)</script>".into());
        let c = t.render("_default", &ctx).expect("render");
        assert!(!c.html.contains("<script>"));
        assert!(c.html.contains("&lt;script&gt;"));
        assert!(c.text.contains("<script>"), "plain text is not escaped");
    }

    #[test]
    fn an_sms_stays_in_gsm_7_despite_locale_spaces() {
        let t = Templates::load(None, 3).expect("load");
        let mut ctx = sample("nb", "reminder", 1);
        ctx.total = "1\u{a0}234,50\u{a0}kr".into();
        let c = t.render("_default", &ctx).expect("render");
        assert!(c.sms.contains("1 234,50 kr"), "{}", c.sms);
        assert_eq!(sms::length(&c.sms).encoding, sms::SmsEncoding::Gsm7, "{}", c.sms);
    }

    #[test]
    fn an_unknown_language_falls_back_to_english() {
        let t = Templates::load(None, 3).expect("load");
        let c = t.render("_default", &sample("de", "reminder", 1)).expect("render");
        assert!(c.subject.starts_with("Reminder"), "{}", c.subject);
    }

    fn tenant_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (path, body) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, body).expect("write");
        }
        dir
    }

    #[test]
    fn a_tenant_overrides_parts_and_keeps_the_rest() {
        let dir = tenant_dir(&[(
            "acme/da.toml",
            "[nudge]\nsubject = \"Acme: faktura {{ invoices[0].number }}\"\n",
        )]);
        let t = Templates::load(Some(dir.path()), 3).expect("load");
        let ctx = sample("da", "nudge", 1);
        let c = t.render("acme", &ctx).expect("render");
        assert!(c.subject.starts_with("Acme: faktura SAMPLE-NO"), "{}", c.subject);
        assert!(c.text.contains("En venlig påmindelse"), "default intro kept");
        let other = t.render("other", &ctx).expect("render");
        assert!(other.subject.starts_with("Din faktura"), "{}", other.subject);
    }

    #[test]
    fn an_sms_over_the_segment_limit_is_refused_at_load() {
        let long = "Kære kunde, ".repeat(30);
        let dir = tenant_dir(&[(
            "acme/da.toml",
            &format!("[reminder]\nsms = \"{long} {{{{ total }}}} {{{{ pay_link }}}}\"\n"),
        )]);
        let err = Templates::load(Some(dir.path()), 3).err().expect("refused").to_string();
        assert!(
            err.contains("tenant 'acme', language 'da', tone 'reminder': the SMS takes"),
            "{err}"
        );
        assert!(err.contains("more than the limit of 3"), "{err}");
    }

    #[test]
    fn a_template_that_drops_the_deadline_or_has_a_syntax_error_is_refused() {
        let dir = tenant_dir(&[
            (
                "acme/en.toml",
                "[collection_warning]\ntext = \"Pay {{ total }} now. {{ pay_link }}\"\n",
            ),
            ("broken/en.toml", "[nudge]\nsubject = \"{% if %}\"\n"),
        ]);
        let err = Templates::load(Some(dir.path()), 3).err().expect("refused").to_string();
        assert!(
            err.contains(
                "tenant 'acme', language 'en', tone 'collection_warning': the text body does not show the deadline"
            ),
            "{err}"
        );
        assert!(err.contains("broken/en/nudge/subject"), "{err}");
    }
}
