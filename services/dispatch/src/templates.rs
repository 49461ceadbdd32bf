//! The foundation's message texts: one friendly text per language and tone. The template
//! engine with per-tenant templates, HTML bodies and SMS texts replaces this in the dispatch issue.

use forfall_domain::invoice::date_from_epoch_days;
use forfall_domain::locale::format_date;
use forfall_domain::money::format;
use forfall_domain::{Currency, Locale, Money};
use forfall_platform::records::JourneyAction;

pub struct Content {
    pub subject: String,
    pub body: String,
}

struct Words {
    subject_nudge: &'static str,
    subject_reminder: &'static str,
    greeting: &'static str,
    nudge: &'static str,
    reminder: &'static str,
    invoice: &'static str,
    amount: &'static str,
    due: &'static str,
    pay_by: &'static str,
    reference: &'static str,
    closing: &'static str,
}

fn words(language: &str) -> Words {
    match language {
        "da" => Words {
            subject_nudge: "Din faktura forfalder i dag",
            subject_reminder: "Påmindelse: din faktura er ikke betalt",
            greeting: "Hej",
            nudge: "En venlig påmindelse om, at din faktura forfalder i dag. Har du allerede betalt, kan du se bort fra denne besked.",
            reminder: "Vi har endnu ikke modtaget betaling for din faktura. Kan du ikke betale det hele nu, så kontakt os, så finder vi en løsning.",
            invoice: "Faktura",
            amount: "Beløb",
            due: "Forfaldsdato",
            pay_by: "Betal senest",
            reference: "Betalingsreference",
            closing: "Venlig hilsen",
        },
        "nb" => Words {
            subject_nudge: "Fakturaen din forfaller i dag",
            subject_reminder: "Påminnelse: fakturaen din er ikke betalt",
            greeting: "Hei",
            nudge: "En vennlig påminnelse om at fakturaen din forfaller i dag. Har du allerede betalt, kan du se bort fra denne meldingen.",
            reminder: "Vi har ennå ikke mottatt betaling for fakturaen din. Kan du ikke betale alt nå, ta kontakt, så finner vi en løsning.",
            invoice: "Faktura",
            amount: "Beløp",
            due: "Forfallsdato",
            pay_by: "Betal senest",
            reference: "KID",
            closing: "Vennlig hilsen",
        },
        "sv" => Words {
            subject_nudge: "Din faktura förfaller i dag",
            subject_reminder: "Påminnelse: din faktura är inte betald",
            greeting: "Hej",
            nudge: "En vänlig påminnelse om att din faktura förfaller i dag. Har du redan betalat kan du bortse från detta meddelande.",
            reminder: "Vi har ännu inte fått betalning för din faktura. Kan du inte betala allt nu, hör av dig så hittar vi en lösning.",
            invoice: "Faktura",
            amount: "Belopp",
            due: "Förfallodag",
            pay_by: "Betala senast",
            reference: "OCR",
            closing: "Vänliga hälsningar",
        },
        "fi" => Words {
            subject_nudge: "Laskusi erääntyy tänään",
            subject_reminder: "Muistutus: laskuasi ei ole maksettu",
            greeting: "Hei",
            nudge: "Ystävällinen muistutus: laskusi erääntyy tänään. Jos olet jo maksanut, voit jättää tämän viestin huomiotta.",
            reminder: "Emme ole vielä saaneet maksua laskustasi. Jos et voi maksaa kaikkea nyt, ota yhteyttä, niin löydämme ratkaisun.",
            invoice: "Lasku",
            amount: "Summa",
            due: "Eräpäivä",
            pay_by: "Maksa viimeistään",
            reference: "Viitenumero",
            closing: "Ystävällisin terveisin",
        },
        _ => Words {
            subject_nudge: "Your invoice is due today",
            subject_reminder: "Reminder: your invoice is unpaid",
            greeting: "Hello",
            nudge: "A friendly reminder that your invoice is due today. If you have already paid, please ignore this message.",
            reminder: "We have not yet received payment for your invoice. If you cannot pay it all now, get in touch and we will find a way.",
            invoice: "Invoice",
            amount: "Amount",
            due: "Due date",
            pay_by: "Please pay by",
            reference: "Payment reference",
            closing: "Kind regards",
        },
    }
}

pub fn render(a: &JourneyAction) -> Content {
    let language = a.language.as_deref().unwrap_or("en");
    let w = words(language);
    let locale = Locale::from_language(language);
    let nudge = a.tone == "nudge";
    let amount = a
        .currency
        .parse::<Currency>()
        .map(|c| format(Money::new(a.open_minor, c), locale))
        .unwrap_or_else(|_| format!("{} {}", a.open_minor, a.currency));
    let mut body = format!(
        "{} {},\n\n{}\n\n",
        w.greeting,
        a.debtor_name.as_deref().unwrap_or(""),
        if nudge { w.nudge } else { w.reminder }
    );
    body.push_str(&format!(
        "{}: {}\n{}: {}\n",
        w.invoice, a.invoice_number, w.amount, amount
    ));
    if let Some(due) = date_from_epoch_days(a.due_date) {
        body.push_str(&format!("{}: {}\n", w.due, format_date(due, locale)));
    }
    if let Some(pay_by) = a.pay_by.and_then(date_from_epoch_days) {
        body.push_str(&format!("{}: {}\n", w.pay_by, format_date(pay_by, locale)));
    }
    if let Some(reference) = &a.payment_reference {
        body.push_str(&format!("{}: {reference}\n", w.reference));
    }
    body.push_str(&format!("\n{}\n", w.closing));
    let subject = format!(
        "{} ({} {})",
        if nudge { w.subject_nudge } else { w.subject_reminder },
        w.invoice,
        a.invoice_number
    );
    Content { subject, body }
}
