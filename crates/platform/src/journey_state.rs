//! The contract between the watcher (which owns journey state) and the services that read it
//! (dispatch's last look, the matcher's "handed over?"): where an invoice's journey lives in
//! Redis and how its status is read without decoding the journey.
//!
//! A utility keeps a whole customer base open at once, so the layout is chosen for memory:
//! journeys are fields of [`BUCKETS`] small hashes (a Redis key costs about a hundred bytes of
//! its own; a field in a listpack-encoded hash a few), and each value starts with a short text
//! header (`version|status|next step|`) that Lua and readers parse, followed by the watcher's
//! binary encoding of the journey. Keeping the hashes listpack-encoded needs Redis's
//! `hash-max-listpack-value` above the journey size (the dev stack sets 1024; production Redis
//! should too); with the default (64) the layout still works, at about 60 bytes more per invoice.

use crate::redis_store::Keys;

/// Hashes the journeys are spread over. A constant of the contract: every reader computes
/// the same bucket. At 1 million open invoices a bucket holds about 15.
pub const BUCKETS: u64 = 1 << 16;

/// A field of a bucketed hash: where one entity's value lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Location {
    pub key: String,
    pub field: String,
}

/// FNV-1a: stable across processes, versions and languages (std's hasher promises none of that).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `tenant` and `id` as one field, unambiguous whatever characters the ids hold.
pub fn pair_field(tenant: &str, id: &str) -> String {
    format!("{}:{tenant}{id}", tenant.len())
}

/// `(tenant, id)` back from [`pair_field`]; the rest of `field` after them is `id`'s.
pub fn split_pair(field: &str) -> Option<(&str, &str)> {
    let (len, rest) = field.split_once(':')?;
    let len: usize = len.parse().ok()?;
    Some((rest.get(..len)?, rest.get(len..)?))
}

/// The bucketed location of `(tenant, id)` among hashes named `kind`.
pub fn bucketed(keys: &Keys, kind: &str, tenant: &str, id: &str) -> Location {
    let field = pair_field(tenant, id);
    let bucket = fnv1a(field.as_bytes()) % BUCKETS;
    // The bucket is the hash tag, so a bucket stays in one Redis Cluster slot.
    Location {
        key: keys.key(&[kind, &format!("{{{bucket:04x}}}")]),
        field,
    }
}

/// Where one invoice's journey lives.
pub fn location(keys: &Keys, tenant: &str, invoice_id: &str) -> Location {
    bucketed(keys, "journeys", tenant, invoice_id)
}

/// Where the watcher marks, ahead of its outputs, that a journey stops accepting contact.
///
/// The watcher produces a decision's outputs before it writes the journey, so for a moment
/// (seconds, when the broker is slow to acknowledge) the journey event "closed: paid" is out
/// while the stored status still says "nudged". Dispatch must not send in that moment: so a
/// decision that stops contact (paid, credited, paused, handed over) first writes this stop,
/// `version|status` with the version the journey write will have. Readers take it while the
/// stored journey is older than it; the journey write removes it.
pub fn stop_location(keys: &Keys, tenant: &str, invoice_id: &str) -> Location {
    bucketed(keys, "contact-stops", tenant, invoice_id)
}

/// A contact stop's value: the version the journey write will have, and its status.
pub fn encode_stop(version: u64, status: &str) -> Vec<u8> {
    format!("{version}|{status}").into_bytes()
}

fn decode_stop(value: &[u8]) -> Option<(u64, String)> {
    let (version, status) = std::str::from_utf8(value).ok()?.split_once('|')?;
    Some((version.parse().ok()?, status.to_owned()))
}

/// The readable head of a stored journey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bumped by every write; the watcher's compare-and-set compares it.
    pub version: u64,
    /// A [`forfall_domain::JourneyState`] label.
    pub status: String,
    /// Index of the next plan step: a step is recorded by moving this past it.
    pub next_step: Option<i64>,
}

/// A stored value: the header, then the journey's body.
pub fn encode(header: &Header, body: &[u8]) -> Vec<u8> {
    let next = header.next_step.map(|s| s.to_string()).unwrap_or_default();
    let mut out = format!("{}|{}|{next}|", header.version, header.status).into_bytes();
    out.extend_from_slice(body);
    out
}

/// The header of a stored value and the body after it; `None` when it is not one.
pub fn decode(value: &[u8]) -> Option<(Header, &[u8])> {
    let mut parts = value.splitn(4, |b| *b == b'|');
    let version = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let status = std::str::from_utf8(parts.next()?).ok()?.to_owned();
    let next = std::str::from_utf8(parts.next()?).ok()?;
    let body = parts.next()?;
    let next_step = if next.is_empty() {
        None
    } else {
        Some(next.parse().ok()?)
    };
    Some((
        Header {
            version,
            status,
            next_step,
        },
        body,
    ))
}

/// The status label of a stored value, if it is one.
pub fn status_of(value: Option<&[u8]>) -> Option<String> {
    value.and_then(decode).map(|(h, _)| h.status)
}

/// Whether a message may be sent, from the stored status label. Unknown state is treated as
/// "do not contact": a message that should have gone can be sent later, one sent wrongly cannot
/// be taken back.
pub fn status_accepts_contact(status: Option<&str>) -> bool {
    matches!(status, Some(s) if s == "open" || s == "nudged" || s == "warned" || s.starts_with("reminded-"))
}

/// What the last look needs: the status, and whether the stored journey already includes the
/// action's own step. The watcher produces an action before it writes the journey (so that
/// nothing is lost on a crash), so for a moment the stored state can lag the action. A journey
/// not there at all is lagging too (a new journey not written yet, or the watcher's state lost
/// and being rebuilt), never a reason to suppress at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastLook {
    pub status: Option<String>,
    pub caught_up: bool,
}

impl LastLook {
    /// From the stored journey and its contact stop, if any: a stop newer than the journey is
    /// the watcher's decision already made, so it wins, and nothing is left to wait for.
    fn of(value: Option<&[u8]>, stop: Option<&[u8]>, step_index: i32) -> Self {
        let header = value.and_then(decode).map(|(h, _)| h);
        if let Some((_, status)) = stop
            .and_then(decode_stop)
            .filter(|(version, _)| header.as_ref().is_none_or(|h| h.version < *version))
        {
            return LastLook {
                status: Some(status),
                caught_up: true,
            };
        }
        let caught_up = header
            .as_ref()
            .is_some_and(|h| h.next_step.is_none_or(|next| next > i64::from(step_index)));
        LastLook {
            status: header.map(|h| h.status),
            caught_up,
        }
    }
}

async fn read(
    conn: &mut redis::aio::ConnectionManager,
    keys: &Keys,
    tenant: &str,
    invoice_id: &str,
) -> redis::RedisResult<Option<Vec<u8>>> {
    let at = location(keys, tenant, invoice_id);
    redis::cmd("HGET").arg(&at.key).arg(&at.field).query_async(conn).await
}

/// The last look for the invoices of one action (a combined action lists several), in one
/// round trip, in the order given.
pub async fn last_looks(
    conn: &mut redis::aio::ConnectionManager,
    keys: &Keys,
    tenant: &str,
    invoices: &[(&str, i32)],
) -> redis::RedisResult<Vec<LastLook>> {
    let mut pipe = redis::pipe();
    add_last_looks(&mut pipe, keys, tenant, invoices);
    let values: Vec<Option<Vec<u8>>> = pipe.query_async(conn).await?;
    Ok(last_looks_from(&values, invoices))
}

/// Adds the reads of [`last_looks`] to `pipe` (two replies per invoice, after whatever `pipe`
/// already holds), for a caller that sends them along with its own commands.
pub fn add_last_looks(pipe: &mut redis::Pipeline, keys: &Keys, tenant: &str, invoices: &[(&str, i32)]) {
    for (invoice_id, _) in invoices {
        let at = location(keys, tenant, invoice_id);
        let stop = stop_location(keys, tenant, invoice_id);
        pipe.hget(at.key, at.field).hget(stop.key, stop.field);
    }
}

/// The Lua pattern that finds a journey value's header (`version|status|next step|`), the part
/// a last look's verdict depends on; matches what [`header_bytes`] returns.
pub const HEADER_LUA_PATTERN: &str = "^[^|]*|[^|]*|[^|]*|";

/// A journey value's header as stored (through its third `|`), if it has one.
pub fn header_bytes(value: &[u8]) -> Option<&[u8]> {
    let third = value.iter().enumerate().filter(|(_, b)| **b == b'|').nth(2)?.0;
    value.get(..=third)
}

/// The last looks from the replies [`add_last_looks`] asked for, in the order given.
pub fn last_looks_from(values: &[Option<Vec<u8>>], invoices: &[(&str, i32)]) -> Vec<LastLook> {
    values
        .chunks(2)
        .zip(invoices)
        .map(|(v, (_, step))| {
            let (journey, stop) = (v.first().cloned().flatten(), v.get(1).cloned().flatten());
            LastLook::of(journey.as_deref(), stop.as_deref(), *step)
        })
        .collect()
}

/// Reads the status for the last look.
pub async fn read_status(
    conn: &mut redis::aio::ConnectionManager,
    keys: &Keys,
    tenant: &str,
    invoice_id: &str,
) -> redis::RedisResult<Option<String>> {
    Ok(status_of(read(conn, keys, tenant, invoice_id).await?.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use forfall_domain::journey::{CloseReason, JourneyState};

    #[test]
    fn a_headers_bytes_are_what_decode_reads_the_header_from() {
        let value = b"7|nudged|2|\x00binary|with|bars";
        assert_eq!(header_bytes(value), Some(&b"7|nudged|2|"[..]));
        assert!(decode(value).is_some());
        assert_eq!(header_bytes(b"7|closed:paid||"), Some(&b"7|closed:paid||"[..]));
        for short in [&b""[..], b"7", b"7|nudged", b"7|nudged|2"] {
            assert_eq!(header_bytes(short), None);
            assert!(decode(short).is_none());
        }
    }

    #[test]
    fn pairs_split_back_whatever_the_ids_hold() {
        for (tenant, id) in [("acme", "inv-1"), ("a:b", "c:d"), ("æøå", ""), ("", "x")] {
            assert_eq!(split_pair(&pair_field(tenant, id)), Some((tenant, id)));
            let nested = pair_field(&pair_field(tenant, id), "p:1");
            let (inner, last) = split_pair(&nested).unwrap();
            assert_eq!((split_pair(inner), last), (Some((tenant, id)), "p:1"));
        }
        assert_eq!(split_pair("9:short"), None);
        assert_eq!(split_pair("junk"), None);
    }

    #[test]
    fn agrees_with_the_domain_on_who_may_be_contacted() {
        for state in [
            JourneyState::Open,
            JourneyState::Nudged,
            JourneyState::Reminded(2),
            JourneyState::Warned,
            JourneyState::HandedOver,
            JourneyState::NeedsPerson,
            JourneyState::Closed(CloseReason::Paid),
            JourneyState::Closed(CloseReason::Credited),
            JourneyState::Closed(CloseReason::Cancelled),
            JourneyState::Paused(forfall_domain::journey::PauseReason::Dispute),
            JourneyState::Paused(forfall_domain::journey::PauseReason::Instalments),
        ] {
            assert_eq!(
                status_accepts_contact(Some(&state.label())),
                state.accepts_contact(),
                "{state:?}"
            );
            assert!(
                !state.label().contains('|'),
                "a status label cannot hold the header's separator"
            );
        }
        assert!(!status_accepts_contact(None));
    }

    #[test]
    fn the_header_round_trips_and_leaves_a_binary_body_alone() {
        let header = Header {
            version: 42,
            status: "reminded-1".into(),
            next_step: Some(2),
        };
        let body = [0u8, b'|', 255, b'|', 7];
        let value = encode(&header, &body);
        assert_eq!(decode(&value), Some((header.clone(), &body[..])));
        let none = Header {
            next_step: None,
            ..header
        };
        assert_eq!(decode(&encode(&none, b"")), Some((none, &b""[..])));
        assert_eq!(decode(b"not a journey"), None);
        assert_eq!(decode(b"x|open|1|"), None, "the version is a number");
    }

    #[test]
    fn the_last_look_is_caught_up_once_the_step_is_recorded() {
        let at = |next| {
            encode(
                &Header {
                    version: 1,
                    status: "nudged".into(),
                    next_step: next,
                },
                b"",
            )
        };
        assert!(!LastLook::of(Some(&at(Some(1))), None, 1).caught_up);
        assert!(LastLook::of(Some(&at(Some(2))), None, 1).caught_up);
        assert!(
            !LastLook::of(None, None, 1).caught_up,
            "nothing stored: the journey is not written yet or is being rebuilt"
        );
        assert_eq!(LastLook::of(Some(&at(None)), None, 1).status.as_deref(), Some("nudged"));
    }

    #[test]
    fn a_contact_stop_newer_than_the_journey_wins_and_an_older_one_is_ignored() {
        let journey = |version| {
            encode(
                &Header {
                    version,
                    status: "nudged".into(),
                    next_step: Some(1),
                },
                b"",
            )
        };
        let stop = encode_stop(4, "closed:paid");
        // The watcher decided "paid" (version 4) and has not written the journey yet.
        let ahead = LastLook::of(Some(&journey(3)), Some(&stop), 1);
        assert_eq!(ahead.status.as_deref(), Some("closed:paid"));
        assert!(ahead.caught_up, "a stop is a decision made: nothing to wait for");
        assert!(!status_accepts_contact(ahead.status.as_deref()));
        // A journey not written at all yet is stopped too.
        assert_eq!(
            LastLook::of(None, Some(&stop), 1).status.as_deref(),
            Some("closed:paid")
        );
        // Written (or written again since, by a later decision): the journey speaks.
        for version in [4, 5] {
            let look = LastLook::of(Some(&journey(version)), Some(&stop), 1);
            assert_eq!(look.status.as_deref(), Some("nudged"), "version {version}");
        }
        // Something that is not a stop is not one.
        let junk = LastLook::of(Some(&journey(3)), Some(b"closed"), 2);
        assert_eq!(junk.status.as_deref(), Some("nudged"));
    }

    #[test]
    fn fields_are_unambiguous_and_buckets_stable() {
        assert_ne!(pair_field("a:", "b"), pair_field("a", ":b"));
        let keys = Keys::new("forfall:");
        let a = location(&keys, "acme", "inv-1");
        assert_eq!(a, location(&keys, "acme", "inv-1"));
        // Pinned: a reader built from another version must find the same bucket.
        assert_eq!(
            fnv1a(b"4:acmeinv-1") % BUCKETS,
            u64::from_str_radix(&a.key[a.key.len() - 5..a.key.len() - 1], 16).unwrap()
        );
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
