//! How a stored journey's body is encoded, and the readers kept for older encodings.
//!
//! postcard carries no field names, so bytes written with one shape of [`Stored`] only read
//! with that shape: every change to it takes a new tag here, and the reader of the old tag stays
//! (as a frozen copy of the old types) until no Redis and no changelog can still hold it.

use chrono::NaiveDate;
use forfall_domain::invoice::InvoiceSnapshot;
use forfall_domain::journey::{FeeCharged, Journey, JourneyState, Pause, WarningGiven};
use forfall_platform::kafka::Failure;
use serde::Deserialize;

use crate::store::Stored;

/// Before fees' days were recorded (`Journey::fee_dates`).
const FORMAT_POSTCARD_V1: u8 = 1;
/// Before messages were kept as evidence (`Journey::messages`).
const FORMAT_POSTCARD_V2: u8 = 2;
/// Before disputes were kept (`Journey::disputes`).
const FORMAT_POSTCARD_V3: u8 = 3;
/// Before the invoice's trace was kept (`Stored::trace`).
const FORMAT_POSTCARD_V4: u8 = 4;
const FORMAT_POSTCARD_V5: u8 = 5;

pub fn encode_body(stored: &Stored) -> Result<Vec<u8>, Failure> {
    let mut body = vec![FORMAT_POSTCARD_V5];
    let encoded =
        postcard::to_allocvec(stored).map_err(|e| Failure::Fatal(anyhow::anyhow!("encoding a journey: {e}")))?;
    body.extend_from_slice(&encoded);
    Ok(body)
}

pub fn decode_body(body: &[u8]) -> Result<Stored, Failure> {
    let corrupt =
        |tag: u8, e: postcard::Error| Failure::Fatal(anyhow::anyhow!("corrupt journey state (postcard v{tag}): {e}"));
    match body.split_first() {
        Some((&FORMAT_POSTCARD_V5, rest)) => postcard::from_bytes(rest).map_err(|e| corrupt(5, e)),
        Some((&FORMAT_POSTCARD_V4, rest)) => postcard::from_bytes::<StoredV4>(rest)
            .map(Stored::from)
            .map_err(|e| corrupt(4, e)),
        Some((&FORMAT_POSTCARD_V3, rest)) => postcard::from_bytes::<StoredV3>(rest)
            .map(Stored::from)
            .map_err(|e| corrupt(3, e)),
        Some((&FORMAT_POSTCARD_V2, rest)) => postcard::from_bytes::<StoredV2>(rest)
            .map(Stored::from)
            .map_err(|e| corrupt(2, e)),
        Some((&FORMAT_POSTCARD_V1, rest)) => postcard::from_bytes::<StoredV1>(rest)
            .map(Stored::from)
            .map_err(|e| corrupt(1, e)),
        Some((tag, _)) => Err(Failure::Fatal(anyhow::anyhow!(
            "journey state in format {tag}, which this watcher does not read (newer than it?)"
        ))),
        None => Err(Failure::Fatal(anyhow::anyhow!("journey state without a body"))),
    }
}

/// [`Stored`] as format 4 wrote it: today's [`Journey`] (freeze it here as `JourneyV4` when
/// `Journey` next changes), without `trace`.
#[derive(Deserialize)]
struct StoredV4 {
    journey: Journey,
    partition: i32,
    pending_step: Option<usize>,
    pending_fire_ms: Option<i64>,
}

impl From<StoredV4> for Stored {
    fn from(v4: StoredV4) -> Self {
        Stored {
            journey: v4.journey,
            partition: v4.partition,
            pending_step: v4.pending_step,
            pending_fire_ms: v4.pending_fire_ms,
            // Steps fired after the upgrade start traces of their own.
            trace: None,
        }
    }
}

/// [`Stored`] as format 3 wrote it.
#[derive(Deserialize)]
struct StoredV3 {
    journey: JourneyV3,
    partition: i32,
    pending_step: Option<usize>,
    pending_fire_ms: Option<i64>,
}

/// [`Journey`] as format 3 wrote it: format 2's fields, then `messages`, without `disputes`.
#[derive(Deserialize)]
struct JourneyV3 {
    v2: JourneyV2,
    messages: Vec<forfall_domain::evidence::MessageEvidence>,
}

impl From<JourneyV3> for Journey {
    fn from(v3: JourneyV3) -> Self {
        let j = v3.v2.v1;
        Journey {
            state: j.state,
            invoice: j.invoice,
            plan_version: j.plan_version,
            plan: j.plan,
            segment: j.segment,
            experiment: j.experiment,
            fees_minor: j.fees_minor,
            pause: j.pause,
            due_override: j.due_override,
            postponements: j.postponements,
            applied_requests: j.applied_requests,
            next_step: j.next_step,
            paid_minor: j.paid_minor,
            applied_payments: j.applied_payments,
            steps_taken: j.steps_taken,
            fee_dates: v3.v2.fee_dates,
            fees: v3.v2.fees,
            warning: v3.v2.warning,
            messages: v3.messages,
            // Format 3 did not keep them: disputes raised before the upgrade are on the
            // invoice's timeline only.
            disputes: Vec::new(),
        }
    }
}

impl From<StoredV3> for Stored {
    fn from(v3: StoredV3) -> Self {
        Stored {
            journey: v3.journey.into(),
            partition: v3.partition,
            pending_step: v3.pending_step,
            pending_fire_ms: v3.pending_fire_ms,
            trace: None,
        }
    }
}

/// [`Stored`] as format 2 wrote it.
#[derive(Deserialize)]
struct StoredV2 {
    journey: JourneyV2,
    partition: i32,
    pending_step: Option<usize>,
    pending_fire_ms: Option<i64>,
}

/// [`Journey`] as format 2 wrote it: format 1's fields, then three more, in order (postcard
/// writes a nested struct as its fields), without `messages`.
#[derive(Deserialize)]
struct JourneyV2 {
    v1: JourneyV1,
    fee_dates: Vec<NaiveDate>,
    fees: Vec<FeeCharged>,
    warning: Option<WarningGiven>,
}

impl From<JourneyV2> for Journey {
    fn from(v2: JourneyV2) -> Self {
        // Format 2 did not keep messages: the hand-off's evidence starts with the upgrade.
        JourneyV3 {
            v2,
            messages: Vec::new(),
        }
        .into()
    }
}

impl From<StoredV2> for Stored {
    fn from(v2: StoredV2) -> Self {
        Stored {
            journey: v2.journey.into(),
            partition: v2.partition,
            pending_step: v2.pending_step,
            pending_fire_ms: v2.pending_fire_ms,
            trace: None,
        }
    }
}

/// [`Stored`] as format 1 wrote it.
#[derive(Deserialize)]
struct StoredV1 {
    journey: JourneyV1,
    partition: i32,
    pending_step: Option<usize>,
}

/// [`Journey`] as format 1 wrote it: the same fields, in the same order, without `fee_dates`.
#[derive(Deserialize)]
struct JourneyV1 {
    state: JourneyState,
    invoice: InvoiceSnapshot,
    plan_version: String,
    plan: String,
    segment: Option<String>,
    experiment: Option<String>,
    fees_minor: i64,
    pause: Option<Pause>,
    due_override: Option<NaiveDate>,
    postponements: u32,
    applied_requests: Vec<String>,
    next_step: usize,
    paid_minor: i64,
    applied_payments: Vec<String>,
    steps_taken: Vec<String>,
}

impl From<StoredV1> for Stored {
    fn from(v1: StoredV1) -> Self {
        Stored {
            // Format 1 did not record fees or the warning; a fee charged before the upgrade is
            // not spaced from (the plan's own spacing, checked at policy load, still holds).
            journey: JourneyV2 {
                v1: v1.journey,
                fee_dates: Vec::new(),
                fees: Vec::new(),
                warning: None,
            }
            .into(),
            partition: v1.partition,
            pending_step: v1.pending_step,
            // Format 1 kept the timer's moment only in the timer set.
            pending_fire_ms: None,
            trace: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    /// Format 1's writer, frozen: what a watcher before `fee_dates` stored.
    #[derive(Serialize)]
    struct WrittenV1<'a> {
        journey: JourneyV1Out<'a>,
        partition: i32,
        pending_step: Option<usize>,
    }

    #[derive(Serialize)]
    struct JourneyV1Out<'a> {
        state: JourneyState,
        invoice: &'a InvoiceSnapshot,
        plan_version: &'a str,
        plan: &'a str,
        segment: Option<&'a str>,
        experiment: Option<&'a str>,
        fees_minor: i64,
        pause: Option<&'a Pause>,
        due_override: Option<NaiveDate>,
        postponements: u32,
        applied_requests: &'a [String],
        next_step: usize,
        paid_minor: i64,
        applied_payments: &'a [String],
        steps_taken: &'a [String],
    }

    /// Format 1's journey fields of `j`, as its writer wrote them.
    fn v1_out(j: &Journey) -> JourneyV1Out<'_> {
        JourneyV1Out {
            state: j.state,
            invoice: &j.invoice,
            plan_version: &j.plan_version,
            plan: &j.plan,
            segment: j.segment.as_deref(),
            experiment: j.experiment.as_deref(),
            fees_minor: j.fees_minor,
            pause: j.pause.as_ref(),
            due_override: j.due_override,
            postponements: j.postponements,
            applied_requests: &j.applied_requests,
            next_step: j.next_step,
            paid_minor: j.paid_minor,
            applied_payments: &j.applied_payments,
            steps_taken: &j.steps_taken,
        }
    }

    /// Format 2's journey fields of `j`.
    fn v2_out(j: &Journey) -> JourneyV2Out<'_> {
        JourneyV2Out {
            v1: v1_out(j),
            fee_dates: &j.fee_dates,
            fees: &j.fees,
            warning: j.warning.as_ref(),
        }
    }

    #[test]
    fn a_journey_stored_in_format_1_still_reads() {
        let plan = forfall_domain::journey::Plan::builtin();
        let snapshot = forfall_domain::invoice::validate_issued(crate::store::tests::sample_input()).unwrap();
        let mut journey = forfall_domain::journey::on_invoice(None, snapshot, &plan).journey;
        journey.fees_minor = 10_000;
        journey.steps_taken = vec!["nudge".into()];
        let j = &journey;
        let old = WrittenV1 {
            journey: v1_out(j),
            partition: 5,
            pending_step: Some(1),
        };
        let mut body = vec![FORMAT_POSTCARD_V1];
        body.extend(postcard::to_allocvec(&old).unwrap());
        let read = decode_body(&body).unwrap();
        assert_eq!(read.journey, journey);
        assert_eq!((read.partition, read.pending_step), (5, Some(1)));
        // Read as format 2 the same bytes would be garbage or an error: the tag is what tells.
        let current = encode_body(&read).unwrap();
        assert_eq!(current[0], FORMAT_POSTCARD_V5);
        assert_eq!(decode_body(&current).unwrap(), read);
    }

    /// Format 2's writer, frozen: what a watcher before `messages` stored.
    #[derive(Serialize)]
    struct WrittenV2<'a> {
        journey: JourneyV2Out<'a>,
        partition: i32,
        pending_step: Option<usize>,
        pending_fire_ms: Option<i64>,
    }

    #[derive(Serialize)]
    struct JourneyV2Out<'a> {
        v1: JourneyV1Out<'a>,
        fee_dates: &'a [NaiveDate],
        fees: &'a [FeeCharged],
        warning: Option<&'a WarningGiven>,
    }

    #[test]
    fn a_journey_stored_in_format_2_still_reads() {
        let plan = forfall_domain::journey::Plan::builtin();
        let snapshot = forfall_domain::invoice::validate_issued(crate::store::tests::sample_input()).unwrap();
        let mut journey = forfall_domain::journey::on_invoice(None, snapshot, &plan).journey;
        journey.state = JourneyState::Paused(forfall_domain::journey::PauseReason::Dispute);
        journey.fees_minor = 6_000;
        journey.steps_taken = vec!["nudge".into(), "reminder-1".into()];
        journey.fee_dates = vec![NaiveDate::from_ymd_opt(2026, 3, 16).unwrap()];
        journey.warning = Some(WarningGiven {
            date: NaiveDate::from_ymd_opt(2026, 3, 16).unwrap(),
            step: "reminder-1".into(),
            days_to_pay: Some(14),
        });
        let j = &journey;
        let old = WrittenV2 {
            // Serialised in order, a nested struct adds no bytes: V1's fields, then V2's.
            journey: v2_out(j),
            partition: 2,
            pending_step: Some(2),
            pending_fire_ms: Some(1_774_000_000_000),
        };
        let mut body = vec![FORMAT_POSTCARD_V2];
        body.extend(postcard::to_allocvec(&old).unwrap());
        let read = decode_body(&body).unwrap();
        assert_eq!(read.journey, journey, "a paused journey keeps its state's encoding");
        assert_eq!(
            (read.partition, read.pending_step, read.pending_fire_ms),
            (2, Some(2), Some(1_774_000_000_000))
        );
    }

    /// Format 3's writer, frozen: what a watcher before `disputes` stored.
    #[derive(Serialize)]
    struct WrittenV3<'a> {
        journey: JourneyV3Out<'a>,
        partition: i32,
        pending_step: Option<usize>,
        pending_fire_ms: Option<i64>,
    }

    #[derive(Serialize)]
    struct JourneyV3Out<'a> {
        v2: JourneyV2Out<'a>,
        messages: &'a [forfall_domain::evidence::MessageEvidence],
    }

    #[test]
    fn a_journey_stored_in_format_3_still_reads() {
        let plan = forfall_domain::journey::Plan::builtin();
        let snapshot = forfall_domain::invoice::validate_issued(crate::store::tests::sample_input()).unwrap();
        let mut journey = forfall_domain::journey::on_invoice(None, snapshot, &plan).journey;
        journey.steps_taken = vec!["nudge".into()];
        journey.messages = vec![forfall_domain::evidence::MessageEvidence {
            action_id: "a1".into(),
            step: "nudge".into(),
            channel: "email".into(),
            at_ms: 1_774_000_000_000,
            delivery: forfall_domain::evidence::Delivery::Sent,
            content_sha256: Some("ab".repeat(32)),
            provider_message_id: Some("m-1".into()),
        }];
        let j = &journey;
        let old = WrittenV3 {
            journey: JourneyV3Out {
                v2: v2_out(j),
                messages: &j.messages,
            },
            partition: 7,
            pending_step: Some(1),
            pending_fire_ms: Some(1_775_000_000_000),
        };
        let mut body = vec![FORMAT_POSTCARD_V3];
        body.extend(postcard::to_allocvec(&old).unwrap());
        let read = decode_body(&body).unwrap();
        assert_eq!(read.journey, journey, "messages kept, no disputes");
        assert_eq!(read.partition, 7);
        let mut disputed = read.clone();
        disputed.journey.disputes = vec![forfall_domain::journey::DisputeRecord {
            opened: NaiveDate::from_ymd_opt(2026, 3, 20).unwrap(),
            reason: Some("never ordered".into()),
            resolved: None,
            resolution: None,
        }];
        assert_eq!(decode_body(&encode_body(&disputed).unwrap()).unwrap(), disputed);
    }

    /// Format 4's writer, frozen: what a watcher before `trace` stored.
    #[derive(Serialize)]
    struct WrittenV4<'a> {
        journey: &'a Journey,
        partition: i32,
        pending_step: Option<usize>,
        pending_fire_ms: Option<i64>,
    }

    #[test]
    fn a_journey_stored_in_format_4_still_reads_and_format_5_keeps_its_trace() {
        let plan = forfall_domain::journey::Plan::builtin();
        let snapshot = forfall_domain::invoice::validate_issued(crate::store::tests::sample_input()).unwrap();
        let journey = forfall_domain::journey::on_invoice(None, snapshot, &plan).journey;
        let old = WrittenV4 {
            journey: &journey,
            partition: 4,
            pending_step: Some(0),
            pending_fire_ms: Some(1_776_000_000_000),
        };
        let mut body = vec![FORMAT_POSTCARD_V4];
        body.extend(postcard::to_allocvec(&old).unwrap());
        let read = decode_body(&body).unwrap();
        assert_eq!(read.journey, journey);
        assert_eq!(
            (read.partition, read.pending_fire_ms, read.trace),
            (4, Some(1_776_000_000_000), None)
        );
        let traced = Stored {
            trace: Some(forfall_platform::telemetry::TraceContext::new_root()),
            ..read.clone()
        };
        let body = encode_body(&traced).unwrap();
        assert_eq!(body[0], FORMAT_POSTCARD_V5);
        assert_eq!(decode_body(&body).unwrap(), traced);
        // Untraced (spans not exported, or not sampled), the trace costs one byte.
        assert_eq!(encode_body(&read).unwrap().len() + 25, body.len());
    }
}
