//! Payments decided together: a bank's file arrives as thousands of payments at once, most of
//! them quoting a reference that alone decides them. A poll's payments share three Redis round
//! trips instead of taking three or four each: whether each was decided before and which
//! invoice its reference names (one pipeline), those invoices (a second), and their bookings
//! (a third, the booking script once per payment).
//!
//! Everything that is not that common case goes the way of a payment alone, from where the
//! batch left it: a payment decided before (its records again), one whose reference names no
//! invoice or does not decide it (the other candidates are read), and one whose booking found
//! its invoice changed (decided again on what is there now) or the payment decided by another
//! attempt. Payments of one lane never share a batch; two payments for one invoice may, and
//! the second's booking then finds the first's allocation and is decided again, as when they
//! are decided at once by separate tasks.

use forfall_domain::matching::{self, OpenInvoice};
use forfall_platform::kafka::{
    Failure, Handler, Inbound, Outbound, each_failed_as, each_retried_alone, every_record_decided,
};
use forfall_platform::records::{PaymentReceived, Record};
use forfall_platform::redis_store;
use forfall_platform::telemetry::TraceContext;
use futures::future::{BoxFuture, join_all};

use crate::{Booked, Decided, InvoiceRow, Matcher, Seen};

type Outcome = Result<Vec<Outbound>, Failure>;

/// A payment of the batch, by its record's place.
struct Payment {
    at: usize,
    payment: PaymentReceived,
    trace: TraceContext,
}

/// A payment whose reference named an invoice, as decided by the reference alone.
struct ByReference {
    payment: Payment,
    decided: Decided,
    seen: Seen,
}

/// One result per record, in order (see [`Handler::handle_batch`]).
pub(crate) async fn handle(matcher: &Matcher, records: &[Inbound]) -> Vec<Outcome> {
    if let Err(e) = matcher.0.state.ensure_ready().await {
        // Each is retried on its own, which waits for the state as `handle` does.
        return each_retried_alone(records.len(), &format!("{e:?}"));
    }
    let mut payments = Vec::with_capacity(records.len());
    let mut others: Vec<BoxFuture<'_, (usize, Outcome)>> = Vec::new();
    for (at, record) in records.iter().enumerate() {
        let payment = match matcher.0.rt.codec.decode(record.payload.as_deref()).await {
            Ok(decoded) if decoded.name == PaymentReceived::FULL_NAME => decoded.to::<PaymentReceived>().ok(),
            _ => None,
        };
        match payment {
            Some(payment) => payments.push(Payment {
                at,
                payment,
                trace: record.trace,
            }),
            // Invoices, and whatever `handle` rejects with its reason.
            None => others.push(Box::pin(async move { (at, matcher.handle(record).await) })),
        }
    }
    let (decided, others) = futures::join!(decide(matcher, payments), join_all(others));
    let mut results: Vec<Option<Outcome>> = records.iter().map(|_| None).collect();
    for (at, outcome) in decided.into_iter().chain(others) {
        results[at] = Some(outcome);
    }
    every_record_decided(results)
}

/// Each of `payments` decided, with its place.
async fn decide(matcher: &Matcher, payments: Vec<Payment>) -> Vec<(usize, Outcome)> {
    if payments.is_empty() {
        return Vec::new();
    }
    let ats: Vec<usize> = payments.iter().map(|p| p.at).collect();
    match decide_together(matcher, payments).await {
        Ok(outcomes) => outcomes,
        // A round trip that failed fails them all (Redis away: each is retried on its own).
        Err(e) => {
            let failed = each_failed_as(ats.len(), &e);
            ats.into_iter().zip(failed).collect()
        }
    }
}

async fn decide_together(matcher: &Matcher, payments: Vec<Payment>) -> Result<Vec<(usize, Outcome)>, Failure> {
    let m = &matcher.0;
    // 1. Decided before? Which invoice does the reference name? With the state marker.
    let ref_keys: Vec<Option<String>> = payments.iter().map(|p| matcher.reference_key(&p.payment)).collect();
    let floor = m.state.read_floor();
    let mut pipe = redis::pipe();
    pipe.get(m.state.marker_key());
    for (p, ref_key) in payments.iter().zip(&ref_keys) {
        pipe.get(matcher.key("payment", &p.payment.tenant, &p.payment.payment_id));
        if let Some(ref_key) = ref_key {
            pipe.get(ref_key);
        }
    }
    let replies: Vec<Option<String>> = pipe.query_async(&mut matcher.conn()).await?;
    let mut replies = replies.into_iter();
    let marker = replies.next().flatten();
    m.state.check(marker.as_deref(), floor)?;

    let mut alone: Vec<BoxFuture<'_, (usize, Outcome)>> = Vec::new();
    let mut by_reference: Vec<(Payment, String)> = Vec::new();
    for (p, ref_key) in payments.into_iter().zip(ref_keys) {
        let decided: Option<Decided> = replies.next().flatten().and_then(|raw| serde_json::from_str(&raw).ok());
        let referenced = ref_key.map(|_| replies.next().flatten());
        match (decided, referenced) {
            (None, Some(Some(invoice_id))) => by_reference.push((p, invoice_id)),
            (decided, referenced) => alone.push(Box::pin(async move {
                let outcome = matcher
                    .payment_after_read(p.payment, p.trace, decided, referenced)
                    .await;
                (p.at, outcome)
            })),
        }
    }

    // 2. The invoices the references name, as the rules see them.
    let mut to_book: Vec<ByReference> = Vec::new();
    let mut outcomes: Vec<(usize, Outcome)> = Vec::new();
    if !by_reference.is_empty() {
        let mut pipe = redis::pipe();
        for (p, invoice_id) in &by_reference {
            matcher.add_open_invoice_reads(&mut pipe, &p.payment.tenant, std::slice::from_ref(invoice_id));
        }
        let rows: Vec<InvoiceRow> = pipe.query_async(&mut matcher.conn()).await?;
        for ((p, invoice_id), row) in by_reference.into_iter().zip(rows) {
            let mut seen = Seen::default();
            let invoice: Option<OpenInvoice> = Matcher::open_invoice_from(&p.payment.tenant, row, &mut seen);
            let incoming = match Matcher::incoming(&p.payment) {
                Ok(incoming) => incoming,
                Err(e) => {
                    outcomes.push((p.at, Err(e)));
                    continue;
                }
            };
            match matching::decided_by_reference(&incoming, invoice.as_ref()) {
                Some(decision) => {
                    let decided = Decided {
                        payment: p.payment.clone(),
                        decision,
                        matched_by: None,
                    };
                    to_book.push(ByReference {
                        payment: p,
                        decided,
                        seen,
                    });
                }
                // The later rules decide: their candidates are read as for a payment alone.
                None => alone.push(Box::pin(async move {
                    let outcome = matcher
                        .payment_after_read(p.payment, p.trace, None, Some(Some(invoice_id)))
                        .await;
                    (p.at, outcome)
                })),
            }
        }
    }

    // 3. Their bookings, each re-checking what it was based on.
    let bookings = to_book
        .iter()
        .map(|b| matcher.book_invocation(&b.decided, &b.seen, false))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(first) = bookings.first() {
        let mut pipe = redis::pipe();
        for booking in &bookings {
            pipe.invoke_script(booking);
        }
        let replies: Vec<i32> = redis_store::query_with_script(&mut matcher.conn(), &pipe, first).await?;
        for (b, reply) in to_book.into_iter().zip(replies) {
            let p = b.payment;
            match matcher.booked(&b.decided, reply) {
                Ok(Booked::Done) => outcomes.push((p.at, matcher.decided_now(&b.decided, p.trace, "together").await)),
                Ok(booked) => {
                    if booked == Booked::Conflict {
                        m.metrics.results.with_label_values(&["redecided"]).inc();
                    }
                    // Decided by another attempt (its records again), or decided again on
                    // what is there now.
                    alone.push(Box::pin(
                        async move { (p.at, matcher.payment(p.payment, p.trace).await) },
                    ));
                }
                Err(e) => outcomes.push((p.at, Err(e))),
            }
        }
    }
    outcomes.extend(join_all(alone).await);
    Ok(outcomes)
}
