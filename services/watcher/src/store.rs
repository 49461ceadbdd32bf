//! The watcher's state in Redis: journeys, timers, each debtor's open invoices, and who polls
//! which partition's timers.
//!
//! Sized for a utility's whole customer base open at once (the target is at most 500 bytes of
//! Redis memory per open invoice):
//! - a journey is a field of a bucketed hash (see [`journey_state`]), its body a one-byte
//!   format tag and the journey in postcard (a compact binary serde format);
//! - a timer is a member of its partition's sorted set, scored by fire time: the step index and
//!   the invoice, in about 30 bytes;
//! - a debtor's open invoices are a field of a bucketed hash (a JSON list of invoice ids under
//!   a hash of the debtor), kept by the same script that writes the journey, so combining
//!   never misses an open invoice.
//!
//! Writes are compare-and-set on the journey's version, so two instances briefly sharing a
//! partition during a rebalance cannot overwrite each other's transitions.

use forfall_domain::journey::{Journey, TimerChange};
use forfall_platform::journey_state::{self, Header};
use forfall_platform::kafka::Failure;
use forfall_platform::redis_store::Keys;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// What the watcher stores per invoice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub journey: Journey,
    /// Partition of the invoice on `forfall.invoices.v1`: whose timer set holds its timer.
    pub partition: i32,
    /// The step whose timer is scheduled, if any.
    pub pending_step: Option<usize>,
}

/// A stored journey with the version it was read at.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub stored: Stored,
    pub version: u64,
}

pub use crate::format::{decode_body, encode_body};

/// A timer's member in its partition's set: the step and the invoice, unambiguous for any ids.
pub fn member(tenant: &str, invoice_id: &str, step_index: usize) -> String {
    format!("{step_index}:{}", journey_state::pair_field(tenant, invoice_id))
}

/// A due timer, read back from its member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    pub member: String,
    pub tenant: String,
    pub invoice_id: String,
    pub step_index: usize,
    /// When it fell due (its score), in milliseconds since the epoch.
    pub due_ms: i64,
}

pub fn parse_member(m: &str, due_ms: i64) -> Option<Timer> {
    let (step, rest) = m.split_once(':')?;
    let (len, rest) = rest.split_once(':')?;
    let len: usize = len.parse().ok()?;
    Some(Timer {
        member: m.to_owned(),
        tenant: rest.get(..len)?.to_owned(),
        invoice_id: rest.get(len..)?.to_owned(),
        step_index: step.parse().ok()?,
        due_ms,
    })
}

/// Writes one journey if its version is still the expected one, moves its timer, and keeps the
/// debtor's list of open invoices.
const SAVE_SCRIPT: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local v = ''
if cur then v = string.match(cur, '^(%d+)|') or '' end
if v ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[2], ARGV[4]) end
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[2], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[2], ARGV[7], ARGV[6]) end
local raw = redis.call('HGET', KEYS[3], ARGV[8])
local ids = {}
if raw then ids = cjson.decode(raw) end
local at = nil
for i, id in ipairs(ids) do if id == ARGV[9] then at = i end end
if ARGV[10] == 'open' and not at then
  table.insert(ids, ARGV[9])
  redis.call('HSET', KEYS[3], ARGV[8], cjson.encode(ids))
elseif ARGV[10] ~= 'open' and at then
  table.remove(ids, at)
  if #ids == 0 then redis.call('HDEL', KEYS[3], ARGV[8]) else redis.call('HSET', KEYS[3], ARGV[8], cjson.encode(ids)) end
end
return 1
";

/// Takes or renews the right to fire a partition's timers, and returns the due ones. The lock
/// expires in real time (Redis' own clock), so an instance that stops without releasing it
/// holds the partition for at most its time to live.
const CLAIM_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'WITHSCORES', 'LIMIT', 0, ARGV[4])
";

const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// One journey write: the new state, the version it was read at, its timer change, and the
/// timer that fired it (if one did).
pub struct Save {
    pub expected: Option<u64>,
    pub stored: Stored,
    pub timer: TimerChange,
    pub fired_step: Option<usize>,
}

pub struct Store {
    redis: ConnectionManager,
    keys: Keys,
    save: redis::Script,
    claim: redis::Script,
    release: redis::Script,
}

impl Store {
    pub fn new(redis: ConnectionManager, keys: Keys) -> Self {
        Self {
            redis,
            keys,
            save: redis::Script::new(SAVE_SCRIPT),
            claim: redis::Script::new(CLAIM_SCRIPT),
            release: redis::Script::new(RELEASE_SCRIPT),
        }
    }

    fn conn(&self) -> ConnectionManager {
        self.redis.clone()
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn timers_key(&self, partition: i32) -> String {
        self.keys.key(&["timers", &partition.to_string()])
    }

    fn lock_key(&self, partition: i32) -> String {
        self.keys.key(&["timers-lock", &partition.to_string()])
    }

    /// Where a debtor's open invoices are listed. The field is a 64-bit hash of the debtor, not
    /// its name (8 bytes instead of ~40 per debtor): two debtors that share one share a list,
    /// which costs a few extra reads and nothing else, as every listed journey is checked for
    /// its own debtor when read.
    fn debtor_location(&self, tenant: &str, debtor_id: &str) -> (String, Vec<u8>) {
        let at = journey_state::bucketed(&self.keys, "debtor-open", tenant, debtor_id);
        (at.key, journey_state::fnv1a(at.field.as_bytes()).to_be_bytes().to_vec())
    }

    /// The journeys of `(tenant, invoice)` pairs, in one round trip, in order.
    pub async fn load_many(&self, invoices: &[(String, String)]) -> Result<Vec<Option<Loaded>>, Failure> {
        if invoices.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (tenant, invoice_id) in invoices {
            let at = journey_state::location(&self.keys, tenant, invoice_id);
            pipe.hget(at.key, at.field);
        }
        let values: Vec<Option<Vec<u8>>> = pipe.query_async(&mut self.conn()).await?;
        values
            .into_iter()
            .map(|v| {
                let Some(v) = v else { return Ok(None) };
                let (header, body) = journey_state::decode(&v)
                    .ok_or_else(|| Failure::Fatal(anyhow::anyhow!("corrupt journey state: no header")))?;
                Ok(Some(Loaded {
                    stored: decode_body(body)?,
                    version: header.version,
                }))
            })
            .collect()
    }

    pub async fn load(&self, tenant: &str, invoice_id: &str) -> Result<Option<Loaded>, Failure> {
        let mut all = self.load_many(&[(tenant.to_owned(), invoice_id.to_owned())]).await?;
        Ok(all.pop().flatten())
    }

    /// Each debtor's open invoices (ids), in one round trip, in order.
    pub async fn open_invoices(&self, debtors: &[(String, String)]) -> Result<Vec<Vec<String>>, Failure> {
        if debtors.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (tenant, debtor_id) in debtors {
            let (key, field) = self.debtor_location(tenant, debtor_id);
            pipe.hget(key, field);
        }
        let lists: Vec<Option<String>> = pipe.query_async(&mut self.conn()).await?;
        Ok(lists
            .into_iter()
            .map(|l| l.and_then(|l| serde_json::from_str(&l).ok()).unwrap_or_default())
            .collect())
    }

    /// Writes journeys, each only if nobody wrote it since it was read, in one round trip;
    /// whether each was written, in order.
    pub async fn save_many(&self, saves: Vec<Save>) -> Result<Vec<bool>, Failure> {
        if saves.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for s in saves {
            self.add_save(&mut pipe, s)?;
        }
        let written: Vec<i32> = match pipe.query_async(&mut self.conn()).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // Redis restarted or its script cache was flushed: load and try once more. A
                // write that went through before the error fails its version check now, and
                // the caller decides it again from what is stored.
                self.save.load_async(&mut self.conn()).await?;
                pipe.query_async(&mut self.conn()).await?
            }
            other => other?,
        };
        Ok(written.into_iter().map(|w| w == 1).collect())
    }

    pub async fn save_one(&self, save: Save) -> Result<bool, Failure> {
        Ok(self.save_many(vec![save]).await?.first().copied().unwrap_or(false))
    }

    fn add_save(&self, pipe: &mut redis::Pipeline, s: Save) -> Result<(), Failure> {
        let Save {
            expected,
            mut stored,
            timer,
            fired_step,
        } = s;
        let inv = &stored.journey.invoice;
        let (tenant, invoice_id, debtor_id) = (inv.tenant.clone(), inv.invoice_id.clone(), inv.debtor_id.clone());
        let fired = fired_step.map(|step| member(&tenant, &invoice_id, step));
        let pending = stored.pending_step.map(|step| member(&tenant, &invoice_id, step));
        let mut add = (String::new(), 0i64);
        match timer {
            TimerChange::Keep => {
                if fired_step.is_some() && stored.pending_step == fired_step {
                    stored.pending_step = None;
                }
            }
            TimerChange::Cancel => stored.pending_step = None,
            TimerChange::Schedule { step_index, fire_at } => {
                add = (member(&tenant, &invoice_id, step_index), fire_at.timestamp_millis());
                stored.pending_step = Some(step_index);
            }
        }
        // The fired timer is done whatever was decided; the previously pending one is replaced
        // or cancelled (kept only when the decision keeps it).
        let remove_pending = match timer {
            TimerChange::Keep => None,
            _ => pending.filter(|p| *p != add.0),
        };
        let remove_fired = fired.filter(|f| *f != add.0 && Some(f) != remove_pending.as_ref());
        let header = Header {
            version: expected.map_or(1, |v| v + 1),
            status: stored.journey.state.label(),
            next_step: Some(stored.journey.next_step as i64),
        };
        let value = journey_state::encode(&header, &encode_body(&stored)?);
        let at = journey_state::location(&self.keys, &tenant, &invoice_id);
        let debtor = self.debtor_location(&tenant, &debtor_id);
        let open = if stored.journey.state.is_final() {
            "closed"
        } else {
            "open"
        };
        pipe.cmd("EVALSHA")
            .arg(self.save.get_hash())
            .arg(3)
            .arg(&at.key)
            .arg(self.timers_key(stored.partition))
            .arg(&debtor.0)
            .arg(&at.field)
            .arg(expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(value)
            .arg(remove_pending.unwrap_or_default())
            .arg(remove_fired.unwrap_or_default())
            .arg(&add.0)
            .arg(add.1)
            .arg(&debtor.1)
            .arg(&invoice_id)
            .arg(open);
        Ok(())
    }

    /// The due timers of a partition with the moment each fell due, if this instance holds
    /// (or now takes) the partition's lock.
    pub async fn claim_due(
        &self,
        partition: i32,
        holder: &str,
        lock_ms: u64,
        now_ms: i64,
        limit: usize,
    ) -> Result<Option<Vec<(String, i64)>>, Failure> {
        let flat: Option<Vec<String>> = self
            .claim
            .key(self.lock_key(partition))
            .key(self.timers_key(partition))
            .arg(holder)
            .arg(lock_ms)
            .arg(now_ms)
            .arg(limit)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(flat.map(|flat| {
            flat.chunks(2)
                .filter_map(|pair| match pair {
                    [member, score] => Some((member.clone(), score.parse::<f64>().ok()? as i64)),
                    _ => None,
                })
                .collect()
        }))
    }

    /// Gives a partition's timers up, so that its next owner need not wait for the lock to expire.
    pub async fn release(&self, partition: i32, holder: &str) -> Result<(), Failure> {
        let _: i32 = self
            .release
            .key(self.lock_key(partition))
            .arg(holder)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    pub async fn remove_timer(&self, partition: i32, member: &str) -> Result<(), Failure> {
        let _: () = redis::cmd("ZREM")
            .arg(self.timers_key(partition))
            .arg(member)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Makes sure the save script is in Redis' cache (pipelined saves call it by hash).
    pub async fn prepare(&self) -> Result<(), Failure> {
        self.save.load_async(&mut self.conn()).await?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn timer_members_read_back_whatever_the_ids_hold() {
        for (tenant, invoice, step) in [("acme", "inv-1", 0), ("a:b", "c:d", 12), ("æøå", "", 3)] {
            let m = member(tenant, invoice, step);
            let t = parse_member(&m, 7).unwrap();
            assert_eq!(
                (t.tenant.as_str(), t.invoice_id.as_str(), t.step_index),
                (tenant, invoice, step)
            );
        }
        assert_eq!(parse_member("junk", 0), None);
        assert_eq!(parse_member("1:99:short", 0), None);
    }

    /// A Danish household's electricity invoice, as a utility bills it.
    pub fn sample_input() -> forfall_domain::invoice::IssuedInput {
        use forfall_domain::invoice::{Contact, IssuedInput, epoch_days};
        let day = |d| epoch_days(chrono::NaiveDate::from_ymd_opt(2026, 11, d).unwrap_or_default());
        IssuedInput {
            tenant: "acme-energy".into(),
            debtor_id: "acme-energy:c-000123456".into(),
            invoice_id: "inv-000123456".into(),
            revision: 1,
            invoice_number: "2026-000123456".into(),
            issue_date_days: day(1),
            due_date_days: day(20),
            amount_minor: 123_450,
            currency: "DKK".into(),
            jurisdiction: "DK".into(),
            debtor_kind: "consumer".into(),
            payment_reference: Some("+71<000000123456789+".into()),
            description: Some("Electricity, October".into()),
            contact: Contact {
                name: Some("Maja Kristensen".into()),
                email: Some("maja.kristensen@example.dk".into()),
                phone: Some("+4512345678".into()),
                language: Some("da".into()),
                ..Contact::default()
            },
        }
    }

    #[test]
    fn the_body_is_small_and_round_trips() {
        let plan = forfall_domain::journey::Plan::builtin();
        let snapshot = forfall_domain::invoice::validate_issued(sample_input()).unwrap();
        let journey = forfall_domain::journey::on_invoice(None, snapshot, &plan).journey;
        let stored = Stored {
            journey,
            partition: 3,
            pending_step: Some(0),
        };
        let body = encode_body(&stored).unwrap();
        assert_eq!(decode_body(&body).unwrap(), stored);
        let json = serde_json::to_vec(&stored).unwrap();
        assert!(
            body.len() * 2 < json.len(),
            "postcard {} bytes, JSON {}",
            body.len(),
            json.len()
        );
        assert!(
            decode_body(&[9, 1, 2]).is_err(),
            "an unknown format is refused, not misread"
        );
    }
}
