//! A poll's worth of billing records decided together: a billing run is almost all new
//! invoices, so theirs are read in one Redis round trip and written in another, and their
//! outputs go to the broker together. Credit notes and cancellations (rare) go one at a time.
//! Records of one debtor never share a batch (the runtime keeps a lane's records apart), so no
//! record of a batch decides on a snapshot another of the batch writes; the same invoice named
//! under two debtors is the exception, and its second record is decided after the batch.

use std::collections::HashSet;

use forfall_platform::kafka::{Failure, Inbound, Outbound, each_retried_alone, every_record_decided};
use forfall_platform::records::{InvoiceIssued, Record};

use crate::stored::parse_stored;
use crate::{Ingest, Issued, Step};

type Outcome = Result<Vec<Outbound>, Failure>;

/// One result per record, in order (see [`forfall_platform::kafka::Handler::handle_batch`]).
pub(crate) async fn handle(ingest: &Ingest, records: &[Inbound]) -> Vec<Outcome> {
    let mut results: Vec<Option<Outcome>> = records.iter().map(|_| None).collect();
    if let Err(e) = ingest.state.ensure_ready().await {
        // Each is retried on its own, which waits for the state as `handle` does.
        return each_retried_alone(records.len(), &format!("{e:?}"));
    }
    // The batch's new revisions, by their record's place.
    let mut issued: Vec<(usize, Issued)> = Vec::with_capacity(records.len());
    let mut named: HashSet<(String, String)> = HashSet::new();
    for (i, record) in records.iter().enumerate() {
        let decoded = match ingest.rt.codec.decode(record.payload.as_deref()).await {
            Ok(d) => d,
            Err(e) => {
                results[i] = Some(Err(e.into()));
                continue;
            }
        };
        if decoded.name != InvoiceIssued::FULL_NAME {
            results[i] = Some(ingest.handle_decoded(decoded, record.trace).await);
            continue;
        }
        match decoded
            .to::<InvoiceIssued>()
            .map_err(Failure::from)
            .and_then(Issued::of)
        {
            Err(f) => results[i] = Some(Err(f)),
            Ok(one) => {
                let invoice = (one.tenant.clone(), one.incoming.invoice_id.clone());
                if named.insert(invoice) {
                    issued.push((i, one));
                } else {
                    results[i] = Some(Err(Failure::Transient(anyhow::anyhow!(
                        "invoice named twice in one batch (under two debtors): decided after it"
                    ))));
                }
            }
        }
    }
    for (i, outcome) in decide(ingest, records, issued).await {
        results[i] = Some(outcome);
    }
    every_record_decided(results)
}

/// The new revisions' snapshots read together, their steps decided, the new ones written
/// together, and their snapshots published.
async fn decide(ingest: &Ingest, records: &[Inbound], issued: Vec<(usize, Issued)>) -> Vec<(usize, Outcome)> {
    if issued.is_empty() {
        return Vec::new();
    }
    let all_transient = |issued: Vec<(usize, Issued)>, why: String| -> Vec<(usize, Outcome)> {
        issued
            .into_iter()
            .map(|(i, _)| (i, Err(Failure::Transient(anyhow::anyhow!("{why}")))))
            .collect()
    };
    let floor = ingest.state.read_floor();
    let mut reads = redis::pipe();
    for (_, one) in &issued {
        reads.get(ingest.keys.stored(&one.tenant, &one.incoming.invoice_id));
    }
    reads.get(ingest.state.marker_key());
    let mut held: Vec<Option<Vec<u8>>> = match reads.query_async(&mut ingest.redis.clone()).await {
        Ok(held) => held,
        Err(e) => return all_transient(issued, format!("reading the invoices' snapshots: {e}")),
    };
    // The marker is text; what is not is judged by the check like any marker it cannot read.
    let marker = held.pop().flatten().map(|m| String::from_utf8_lossy(&m).into_owned());
    if let Err(e) = ingest.state.check(marker.as_deref(), floor) {
        return all_transient(issued, format!("{e:?}"));
    }
    let mut out = Vec::with_capacity(issued.len());
    let mut steps = Vec::with_capacity(issued.len());
    for ((i, one), raw) in issued.into_iter().zip(held) {
        match parse_stored(raw).and_then(|existing| ingest.revision_step(existing, &one)) {
            Ok(step) => steps.push((i, one, step)),
            Err(f) => out.push((i, Err(f))),
        }
    }
    // The new snapshots, in one call (the script loaded first: a Redis that lost its scripts
    // with its data still runs it).
    let saving: Vec<&crate::Stored> = steps
        .iter()
        .filter_map(|(_, _, step)| match step {
            Step::Save(stored, _) => Some(stored),
            _ => None,
        })
        .collect();
    let saved = if saving.is_empty() {
        true
    } else {
        let call = match ingest.save_many_call(&saving) {
            Ok(call) => call,
            Err(f) => return out.into_iter().chain(fatal_all(steps, f)).collect(),
        };
        let mut writes = redis::pipe();
        writes.load_script(&crate::SAVE_MANY).ignore();
        writes.invoke_script(&call);
        match writes.query_async::<(i32,)>(&mut ingest.redis.clone()).await {
            Ok((saved,)) => saved == 1,
            Err(e) => {
                let why = format!("writing the invoices' snapshots: {e}");
                return out
                    .into_iter()
                    .chain(
                        steps
                            .into_iter()
                            .map(|(i, _, _)| (i, Err(Failure::Transient(anyhow::anyhow!("{why}"))))),
                    )
                    .collect();
            }
        }
    };
    for (i, one, step) in steps {
        let trace = records[i].trace;
        let outcome = match step {
            Step::Save(stored, change) => {
                if saved {
                    ingest.publish(&stored.snapshot, change, one.source(), trace).await
                } else {
                    Err(ingest.state.missing())
                }
            }
            Step::Republish(stored) => {
                ingest
                    .publish(
                        &stored.snapshot,
                        forfall_platform::records::InvoiceChange::Issued,
                        one.source(),
                        trace,
                    )
                    .await
            }
            Step::Ignore => Ok(Vec::new()),
        };
        out.push((i, outcome));
    }
    out
}

/// Every step's record failed with `f`'s reason (a bug: the whole batch stops).
fn fatal_all(steps: Vec<(usize, Issued, Step)>, f: Failure) -> Vec<(usize, Outcome)> {
    let why = format!("{f:?}");
    steps
        .into_iter()
        .map(|(i, _, _)| (i, Err(Failure::Fatal(anyhow::anyhow!("{why}")))))
        .collect()
}
