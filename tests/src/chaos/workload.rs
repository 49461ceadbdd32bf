//! A customer base and what each customer does, day by day, from a seed.

use chrono::{Duration as Days, NaiveDate};
use forfall_domain::invoice::epoch_days;
use forfall_domain::reference::{ReferenceKind, generate};
use forfall_platform::records::{DebtorRequest, InvoiceCredited, InvoiceIssued, PaymentReceived, new_event_id};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::TENANT;

/// What a debtor does with their invoice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Behaviour {
    PaysBeforeDue,
    PaysAfterNudge,
    PaysPartlyThenRest,
    Disputes,
    Credited,
    NeverPays,
}

impl Behaviour {
    fn pick(rng: &mut StdRng) -> Self {
        match rng.random_range(0..100) {
            0..20 => Behaviour::PaysBeforeDue,
            20..50 => Behaviour::PaysAfterNudge,
            50..60 => Behaviour::PaysPartlyThenRest,
            60..65 => Behaviour::Disputes,
            65..70 => Behaviour::Credited,
            _ => Behaviour::NeverPays,
        }
    }
}

/// How a payment reaches Forfall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A payment event on `payments.events.v1`.
    Event,
    /// A line of the day's camt.054 file, imported over HTTP.
    Camt054,
}

#[derive(Debug, Clone)]
pub struct Debtor {
    pub debtor_id: String,
    pub invoice_id: String,
    pub number: String,
    pub reference: String,
    pub email: String,
    pub phone: String,
    pub jurisdiction: &'static str,
    pub currency: &'static str,
    pub language: &'static str,
    pub amount_minor: i64,
    pub due: NaiveDate,
    pub behaviour: Behaviour,
    pub route: Route,
}

/// One thing that happens on a simulated day.
#[derive(Debug, Clone)]
pub enum Happening {
    Issue(Box<InvoiceIssued>),
    Pay { payment: PaymentReceived, route: Route },
    Credit(InvoiceCredited),
    Dispute(DebtorRequest),
}

pub struct Workload {
    pub debtors: Vec<Debtor>,
    pub first_day: NaiveDate,
    pub last_day: NaiveDate,
}

/// Jurisdiction, currency, language and a mobile number prefix that makes a valid number with
/// six more digits.
const COUNTRIES: [(&str, &str, &str, &str); 4] = [
    ("DK", "DKK", "da", "+4520"),
    ("NO", "NOK", "nb", "+4790"),
    ("SE", "SEK", "sv", "+46701"),
    ("FI", "EUR", "fi", "+358401"),
];

impl Workload {
    pub fn new(seed: u64, debtors: usize, first_day: NaiveDate) -> anyhow::Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut all = Vec::with_capacity(debtors);
        for i in 0..debtors {
            let (jurisdiction, currency, language, mobile) = COUNTRIES[rng.random_range(0..COUNTRIES.len())];
            let reference = generate(ReferenceKind::Rf, &format!("CH{i:07}"))?.value;
            all.push(Debtor {
                debtor_id: format!("{TENANT}:customer-{i}@example.test"),
                invoice_id: format!("chaos-inv-{i}"),
                number: format!("{:07}", 5_000_000 + i),
                reference,
                email: format!("customer-{i}@example.test"),
                phone: format!("{mobile}{i:06}"),
                jurisdiction,
                currency,
                language,
                amount_minor: rng.random_range(20_000..500_000),
                due: first_day + Days::days(3 + rng.random_range(0..5)),
                behaviour: Behaviour::pick(&mut rng),
                route: if rng.random_bool(0.5) {
                    Route::Event
                } else {
                    Route::Camt054
                },
            });
        }
        // The default policy hands over 20 banking days after the due date.
        let last_day = first_day + Days::days(3 + 5 + 34);
        Ok(Self {
            debtors: all,
            first_day,
            last_day,
        })
    }

    /// What happens on `day`, in the order it happens.
    pub fn on(&self, day: NaiveDate) -> Vec<Happening> {
        let mut out = Vec::new();
        for d in &self.debtors {
            if day == self.first_day {
                out.push(Happening::Issue(Box::new(d.issued())));
            }
            let pay = |amount: i64, n: u32| Happening::Pay {
                payment: d.payment(amount, n, day),
                route: d.route,
            };
            let days_after_due = (day - d.due).num_days();
            match (d.behaviour, days_after_due) {
                (Behaviour::PaysBeforeDue, -1) => out.push(pay(d.amount_minor, 1)),
                (Behaviour::PaysAfterNudge, 3) => out.push(pay(d.amount_minor, 1)),
                (Behaviour::PaysPartlyThenRest, 3) => out.push(pay(d.amount_minor / 2, 1)),
                (Behaviour::PaysPartlyThenRest, 17) => out.push(pay(d.amount_minor - d.amount_minor / 2, 2)),
                (Behaviour::Credited, -1) => out.push(Happening::Credit(d.credited())),
                (Behaviour::Disputes, 2) => out.push(Happening::Dispute(d.dispute(day))),
                _ => {}
            }
        }
        out
    }
}

impl Debtor {
    /// The invoice as the shared test sample shapes one.
    fn sample(&self) -> crate::Sample<'_> {
        crate::Sample {
            tenant: TENANT,
            invoice_id: &self.invoice_id,
            number: &self.number,
            due: self.due,
            amount_minor: self.amount_minor,
            currency: self.currency,
            jurisdiction: self.jurisdiction,
            email: &self.email,
            reference: &self.reference,
            language: self.language,
        }
    }

    fn issued(&self) -> InvoiceIssued {
        InvoiceIssued {
            phone: Some(self.phone.clone()),
            ..self.sample().issued()
        }
    }

    pub fn payment_id(&self, n: u32) -> String {
        format!("{}-pay-{n}", self.invoice_id)
    }

    fn payment(&self, amount_minor: i64, n: u32, day: NaiveDate) -> PaymentReceived {
        PaymentReceived {
            booking_date: epoch_days(day),
            value_date: epoch_days(day),
            ..self
                .sample()
                .payment(&self.payment_id(n), amount_minor, &self.reference)
        }
    }

    fn credited(&self) -> InvoiceCredited {
        InvoiceCredited {
            event_id: new_event_id(),
            tenant: TENANT.into(),
            debtor_id: self.debtor_id.clone(),
            occurred_at: 0,
            invoice_id: self.invoice_id.clone(),
            credit_note_id: format!("{}-credit", self.invoice_id),
            amount_minor: self.amount_minor,
            currency: self.currency.into(),
        }
    }

    fn dispute(&self, day: NaiveDate) -> DebtorRequest {
        DebtorRequest {
            event_id: format!("{}-dispute", self.invoice_id),
            tenant: TENANT.into(),
            debtor_id: self.debtor_id.clone(),
            occurred_at: 0,
            invoice_id: self.invoice_id.clone(),
            kind: "dispute".into(),
            new_due_date: None,
            promise_date: None,
            instalments: Vec::new(),
            reason: Some(format!("the meter reading of {day} is wrong")),
            source: "chaos".into(),
        }
    }
}
