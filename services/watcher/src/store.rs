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

use forfall_domain::journey::{Journey, JourneyState, TimerChange};
use forfall_platform::journey_state::{self, Header};
use std::collections::HashMap;

use forfall_platform::changelog::Changelog;
use forfall_platform::kafka::{Failure, Outbound};
use forfall_platform::redis_store::Keys;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// What the watcher stores per invoice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub journey: Journey,
    /// Partition of the invoice on `forfall.invoices.v1`: whose timer set holds its timer.
    pub partition: i32,
    /// The step whose timer is scheduled, if any, and when it fires (ms since the epoch): the
    /// timer is rebuilt from these.
    pub pending_step: Option<usize>,
    pub pending_fire_ms: Option<i64>,
    /// The trace the invoice arrived in, kept only while spans are exported and it was sampled
    /// (so it costs nothing otherwise): the steps its timers fire, weeks later, continue it.
    pub trace: Option<forfall_platform::telemetry::TraceContext>,
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

/// A stored value read back: its body and the version it carries.
pub fn decode_value(value: &[u8]) -> Result<Loaded, Failure> {
    let (header, body) = journey_state::decode(value)
        .ok_or_else(|| Failure::Fatal(anyhow::anyhow!("corrupt journey state: no header")))?;
    Ok(Loaded {
        stored: decode_body(body)?,
        version: header.version,
    })
}

/// A partition's state marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateMarker {
    Missing,
    /// Rebuilt, with every change up to this changelog offset in Redis.
    Ready(i64),
    /// A rebuild got this far.
    Rebuilding(i64),
}

/// Keeps a debtor's list of open invoices (KEYS[3], field ARGV[8]) in step with one journey
/// (invoice ARGV[9], 'open' or not in ARGV[10]). Shared by the save and restore scripts.
const DEBTOR_OPEN_LUA: &str = r"
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
";

/// Keeps the partition's open-invoice counts (hash `{counts}`, fields `status|tenant`) in step
/// with one journey's value changing from `cur` (false when absent) to ARGV[3] (empty when
/// removed); the journey's field ARGV[1] names its tenant. Closed journeys are not counted.
/// Shared by the save and restore scripts, so that a rebuild leaves the counts as the writes
/// did.
fn open_counts_lua(counts: &str) -> String {
    format!(
        r"
local function open_status(value)
  if not value or value == '' then return nil end
  local s = string.match(value, '^%d+|([^|]*)|')
  if not s or string.sub(s, 1, 7) == 'closed:' then return nil end
  return s
end
local len, rest = string.match(ARGV[1], '^(%d+):(.*)$')
local tenant = string.sub(rest, 1, tonumber(len))
local was, now = open_status(cur), open_status(ARGV[3])
if was ~= now then
  if was and redis.call('HINCRBY', {counts}, was .. '|' .. tenant, -1) <= 0 then
    redis.call('HDEL', {counts}, was .. '|' .. tenant)
  end
  if now then redis.call('HINCRBY', {counts}, now .. '|' .. tenant, 1) end
end
"
    )
}

/// Writes one journey if its version is still the expected one and its partition's state is
/// present (KEYS[4] `ready:<changelog offset>`; -1 when it is missing or being rebuilt), moves
/// its timer, keeps the debtor's list of open invoices and the partition's closed journeys
/// (KEYS[5], by when they closed: ARGV[12]), removes the journey's contact stop (KEYS[6]: the
/// journey now says what it said), and records the journey's changelog offset (ARGV[11]) as the
/// partition's checkpoint, and the partition's open-invoice counts (KEYS[7]).
fn save_script() -> String {
    let open_counts = open_counts_lua("KEYS[7]");
    format!(
        r"
local state = redis.call('GET', KEYS[4])
if not state then return -1 end
local checkpoint = string.match(state, '^ready:(-?%d+)$')
if not checkpoint then return -1 end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local v = ''
if cur then v = string.match(cur, '^(%d+)|') or '' end
if v ~= ARGV[2] then return 0 end
{open_counts}
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[2], ARGV[4]) end
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[2], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[2], ARGV[7], ARGV[6]) end
{DEBTOR_OPEN_LUA}
if ARGV[12] ~= '' then redis.call('ZADD', KEYS[5], ARGV[12], ARGV[1]) else redis.call('ZREM', KEYS[5], ARGV[1]) end
redis.call('HDEL', KEYS[6], ARGV[1])
if tonumber(ARGV[11]) > tonumber(checkpoint) then redis.call('SET', KEYS[4], 'ready:' .. ARGV[11]) end
return 1
"
    )
}

/// Puts one journey back from its changelog as it is there (no version check: the changelog
/// is the truth, and nothing else writes the partition while it is rebuilt): its value (ARGV[3],
/// empty to delete), its timer (old member ARGV[4] out, ARGV[6] in at ARGV[7]), and the
/// debtor's list of open invoices, and the closed index (KEYS[4]; ARGV[11], when it closed).
/// ARGV[2] and ARGV[5] are unused (the save script's layout). The open-invoice counts (KEYS[5])
/// move from what Redis holds to the changelog's value.
fn restore_script() -> String {
    let open_counts = open_counts_lua("KEYS[5]");
    format!(
        r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
{open_counts}
if ARGV[3] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
if ARGV[4] ~= '' and ARGV[4] ~= ARGV[6] then redis.call('ZREM', KEYS[2], ARGV[4]) end
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[2], ARGV[7], ARGV[6]) end
if ARGV[8] ~= '' then
{DEBTOR_OPEN_LUA}
end
if ARGV[11] ~= '' then redis.call('ZADD', KEYS[4], ARGV[11], ARGV[1]) else redis.call('ZREM', KEYS[4], ARGV[1]) end
return 1
"
    )
}

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
    /// The decision ends contact ([`forfall_domain::journey::Decision::stops_contact`]): a
    /// contact stop goes to Redis before the decision's outputs (see [`Store::stop_contact`]).
    pub stops_contact: bool,
}

/// A journey write made ready: its Redis value (also its changelog value) and what moves with it.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub partition: i32,
    pub changelog_key: String,
    pub value: Vec<u8>,
    expected: Option<u64>,
    at: journey_state::Location,
    remove_pending: Option<String>,
    remove_fired: Option<String>,
    add: Option<(String, i64)>,
    debtor: (String, Vec<u8>),
    invoice_id: String,
    open: bool,
    /// When it closed (ms), for a journey that is closed: its retention counts from then.
    closed_at: Option<i64>,
    /// The step pending after this write and when it fires (ms), if any.
    pub upcoming: Option<(usize, i64)>,
    /// Where this journey's contact stop lives (removed by the write), and the stop itself
    /// when the decision ends contact.
    stop_at: journey_state::Location,
    stop: Option<Vec<u8>>,
}

/// What became of a prepared write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Yes,
    /// Someone wrote the journey since it was read: decide again.
    Conflict,
}

/// The partition's state is missing from Redis (lost, flushed, restored from an older copy,
/// or being rebuilt): nothing of the partition is decided until it is rebuilt.
#[derive(Debug, thiserror::Error)]
#[error(
    "the journey state of partition {partition} is missing or behind its changelog ({detail}): it is rebuilt first"
)]
pub struct StateMissing {
    pub partition: i32,
    pub detail: String,
}

/// The changelog key of a journey.
pub fn journey_change_key(tenant: &str, invoice_id: &str) -> String {
    format!("j{}", journey_state::pair_field(tenant, invoice_id))
}

/// The changelog key of one invoice in a debtor's late history (value: when it became late).
pub fn late_change_key(tenant: &str, debtor_id: &str, invoice_id: &str) -> String {
    let debtor = journey_state::pair_field(tenant, debtor_id);
    format!("l{}", journey_state::pair_field(&debtor, invoice_id))
}

/// The changelog key of one invoice's record in its debtor's history (value: the record,
/// [`forfall_domain::history::InvoiceRecord::encode`]).
pub fn history_change_key(tenant: &str, debtor_id: &str, invoice_id: &str) -> String {
    let debtor = journey_state::pair_field(tenant, debtor_id);
    format!("h{}", journey_state::pair_field(&debtor, invoice_id))
}

/// The changelog key of a payment parked until its invoice arrives (value: the parked payment).
pub fn parked_change_key(tenant: &str, invoice_id: &str, payment_id: &str) -> String {
    let invoice = journey_state::pair_field(tenant, invoice_id);
    format!("p{}", journey_state::pair_field(&invoice, payment_id))
}

/// What a changelog key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKey {
    Journey {
        tenant: String,
        invoice_id: String,
    },
    Late {
        tenant: String,
        debtor_id: String,
        invoice_id: String,
    },
    Parked {
        tenant: String,
        invoice_id: String,
        payment_id: String,
    },
    History {
        tenant: String,
        debtor_id: String,
        invoice_id: String,
    },
}

impl ChangeKey {
    pub fn parse(key: &[u8]) -> Option<Self> {
        let key = std::str::from_utf8(key).ok()?;
        let (kind, rest) = key.split_at_checked(1)?;
        let owned = |(a, b): (&str, &str)| (a.to_owned(), b.to_owned());
        match kind {
            "j" => {
                let (tenant, invoice_id) = owned(journey_state::split_pair(rest)?);
                Some(ChangeKey::Journey { tenant, invoice_id })
            }
            "l" => {
                let (debtor, invoice_id) = journey_state::split_pair(rest)?;
                let (tenant, debtor_id) = owned(journey_state::split_pair(debtor)?);
                Some(ChangeKey::Late {
                    tenant,
                    debtor_id,
                    invoice_id: invoice_id.to_owned(),
                })
            }
            "h" => {
                let (debtor, invoice_id) = journey_state::split_pair(rest)?;
                let (tenant, debtor_id) = owned(journey_state::split_pair(debtor)?);
                Some(ChangeKey::History {
                    tenant,
                    debtor_id,
                    invoice_id: invoice_id.to_owned(),
                })
            }
            "p" => {
                let (invoice, payment_id) = journey_state::split_pair(rest)?;
                let (tenant, invoice_id) = owned(journey_state::split_pair(invoice)?);
                Some(ChangeKey::Parked {
                    tenant,
                    invoice_id,
                    payment_id: payment_id.to_owned(),
                })
            }
            _ => None,
        }
    }
}

pub struct Store {
    redis: ConnectionManager,
    keys: Keys,
    changelog: Changelog,
    save: redis::Script,
    restore: redis::Script,
    claim: redis::Script,
    release: redis::Script,
    /// Per partition, the highest changelog offset this instance saw written to Redis: a
    /// smaller checkpoint in Redis means Redis went back in time.
    checkpoints: std::sync::Mutex<HashMap<i32, i64>>,
}

impl Store {
    pub fn new(redis: ConnectionManager, keys: Keys, changelog: Changelog) -> Self {
        Self {
            redis,
            keys,
            changelog,
            save: redis::Script::new(&save_script()),
            restore: redis::Script::new(&restore_script()),
            claim: redis::Script::new(CLAIM_SCRIPT),
            release: redis::Script::new(RELEASE_SCRIPT),
            checkpoints: std::sync::Mutex::default(),
        }
    }

    fn conn(&self) -> ConnectionManager {
        self.redis.clone()
    }

    pub fn redis(&self) -> ConnectionManager {
        self.redis.clone()
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn changelog(&self) -> &Changelog {
        &self.changelog
    }

    pub fn timers_key(&self, partition: i32) -> String {
        self.keys.key(&["timers", &partition.to_string()])
    }

    fn lock_key(&self, partition: i32) -> String {
        self.keys.key(&["timers-lock", &partition.to_string()])
    }

    /// A partition's closed journeys (pair fields), scored by when they closed: their retention.
    pub fn closed_key(&self, partition: i32) -> String {
        self.keys.key(&["closed", &partition.to_string()])
    }

    /// A debtor's late history: invoices that needed a reminder, scored by when.
    pub fn late_key(&self, tenant: &str, debtor_id: &str) -> String {
        self.keys.key(&["late", &format!("{{{tenant}:{debtor_id}}}")])
    }

    /// A debtor's history: one field per invoice, its record.
    pub fn history_key(&self, tenant: &str, debtor_id: &str) -> String {
        self.keys.key(&["history", &format!("{{{tenant}:{debtor_id}}}")])
    }

    /// A partition's late-history entries (their changelog keys) by when they were recorded:
    /// what the 12-month sweep reads.
    pub fn late_index_key(&self, partition: i32) -> String {
        self.keys.key(&["late-index", &partition.to_string()])
    }

    /// A partition's parked payments (their changelog keys) by when they were parked.
    pub fn parked_index_key(&self, partition: i32) -> String {
        self.keys.key(&["parked-index", &partition.to_string()])
    }

    /// Payments that arrived before their invoice, by payment id.
    pub fn parked_key(&self, tenant: &str, invoice_id: &str) -> String {
        self.keys.key(&["parked", &format!("{{{tenant}:{invoice_id}}}")])
    }

    /// A partition's open invoices counted by status and tenant (see [`open_counts_lua`]).
    pub fn open_counts_key(&self, partition: i32) -> String {
        self.keys.key(&["open-counts", &partition.to_string()])
    }

    /// The open invoices of `partitions` by (tenant, status label), summed.
    pub async fn open_counts(&self, partitions: &[i32]) -> Result<HashMap<(String, String), i64>, Failure> {
        if partitions.is_empty() {
            // No partition ready yet: nothing open here (and Redis refuses an empty pipeline).
            return Ok(HashMap::new());
        }
        let mut pipe = redis::pipe();
        for p in partitions {
            pipe.hgetall(self.open_counts_key(*p));
        }
        let per_partition: Vec<HashMap<String, i64>> = pipe.query_async(&mut self.conn()).await?;
        let mut sum = HashMap::new();
        for (field, n) in per_partition.into_iter().flatten() {
            if let Some((status, tenant)) = field.split_once('|') {
                *sum.entry((tenant.to_owned(), status.to_owned())).or_insert(0) += n;
            }
        }
        Ok(sum)
    }

    /// Whether a partition's state is present: `ready:<checkpoint>` once built,
    /// `rebuilding:<offset>` while a rebuild runs, missing when Redis lost it.
    pub fn state_key(&self, partition: i32) -> String {
        self.keys.key(&["state", &partition.to_string()])
    }

    /// Where a debtor's open invoices are listed. The field is a 64-bit hash of the debtor, not
    /// its name (8 bytes instead of ~40 per debtor): two debtors that share one share a list,
    /// which costs a few extra reads and nothing else, as every listed journey is checked for
    /// its own debtor when read.
    fn debtor_location(&self, tenant: &str, debtor_id: &str) -> (String, Vec<u8>) {
        let at = journey_state::bucketed(&self.keys, "debtor-open", tenant, debtor_id);
        (at.key, journey_state::fnv1a(at.field.as_bytes()).to_be_bytes().to_vec())
    }

    /// The partition's state marker as stored, read with other commands.
    pub fn parse_state(value: Option<&str>) -> StateMarker {
        match value {
            None => StateMarker::Missing,
            Some(v) => match v.split_once(':') {
                Some(("ready", n)) => n.parse().map_or(StateMarker::Missing, StateMarker::Ready),
                Some(("rebuilding", n)) => n.parse().map_or(StateMarker::Missing, StateMarker::Rebuilding),
                _ => StateMarker::Missing,
            },
        }
    }

    /// Fails with [`StateMissing`] unless the partition's state is ready and not behind what
    /// this instance had written when the marker was read: `seen_before`, taken before the read
    /// was sent. (Taken after, it would race the instance's own writes: a write of a later
    /// offset acknowledged between the read and the check is not in the marker read, and
    /// every such race, frequent with hundreds of records in hand, made a needless rebuild.)
    fn check_state(&self, partition: i32, marker: StateMarker, seen_before: Option<i64>) -> Result<(), Failure> {
        let missing = |detail: String| Failure::Transient(StateMissing { partition, detail }.into());
        match marker {
            StateMarker::Ready(checkpoint) => {
                if let Some(seen) = seen_before.filter(|seen| checkpoint < *seen) {
                    return Err(missing(format!(
                        "Redis says changelog offset {checkpoint}, this instance wrote {seen} already"
                    )));
                }
                Ok(())
            }
            StateMarker::Rebuilding(at) => Err(missing(format!("a rebuild stopped at offset {at}"))),
            StateMarker::Missing => Err(missing("no state marker".into())),
        }
    }

    /// Which of `partitions` have their state missing or behind in Redis, in one round trip: a
    /// Redis flushed or restored from an older copy is noticed even when no record arrives.
    pub async fn missing_state(&self, partitions: &[i32]) -> Result<Vec<i32>, Failure> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for p in partitions {
            cmd.arg(self.state_key(*p));
        }
        let seen: Vec<Option<i64>> = partitions.iter().map(|p| self.seen_checkpoint(*p)).collect();
        let markers: Vec<Option<String>> = cmd.query_async(&mut self.conn()).await?;
        Ok(partitions
            .iter()
            .zip(markers)
            .zip(seen)
            .filter(|((p, m), seen)| self.check_state(**p, Self::parse_state(m.as_deref()), *seen).is_err())
            .map(|((p, _), _)| *p)
            .collect())
    }

    fn seen_checkpoint(&self, partition: i32) -> Option<i64> {
        self.checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&partition)
            .copied()
    }

    /// Records that Redis holds partition `partition`'s changes up to `offset`.
    pub fn saw_checkpoint(&self, partition: i32, offset: i64) {
        let mut all = self.checkpoints.lock().unwrap_or_else(|p| p.into_inner());
        let at = all.entry(partition).or_insert(offset);
        *at = (*at).max(offset);
    }

    /// Forgets a partition (revoked): its next owner checks it afresh.
    pub fn forget_partition(&self, partition: i32) {
        self.checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&partition);
    }

    /// The members of a sorted set scored by time (a retention index) scored before `cutoff`,
    /// at most `limit`.
    pub async fn older_than(
        &self,
        index: &str,
        cutoff: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> Result<Vec<String>, Failure> {
        Ok(redis::cmd("ZRANGEBYSCORE")
            .arg(index)
            .arg("-inf")
            .arg(cutoff.timestamp_millis())
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await?)
    }

    /// What Redis holds for `(tenant, invoice)` pairs, in one round trip, in order, whatever the
    /// partition's state marker says (a rebuild reads what it overwrites).
    pub async fn read_journeys(&self, invoices: &[(String, String)]) -> Result<Vec<Option<Loaded>>, Failure> {
        if invoices.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        self.add_reads(&mut pipe, invoices);
        let values: Vec<Option<Vec<u8>>> = pipe.query_async(&mut self.conn()).await?;
        values
            .into_iter()
            .map(|v| v.map(|v| decode_value(&v)).transpose())
            .collect()
    }

    fn add_reads(&self, pipe: &mut redis::Pipeline, invoices: &[(String, String)]) {
        for (tenant, invoice_id) in invoices {
            let at = journey_state::location(&self.keys, tenant, invoice_id);
            pipe.hget(at.key, at.field);
        }
    }

    /// The journeys of `(tenant, invoice)` pairs of one partition, in one round trip, in order;
    /// [`StateMissing`] when the partition's state is not there to be read.
    pub async fn load_many(
        &self,
        partition: i32,
        invoices: &[(String, String)],
    ) -> Result<Vec<Option<Loaded>>, Failure> {
        let mut pipe = redis::pipe();
        pipe.get(self.state_key(partition));
        self.add_reads(&mut pipe, invoices);
        let seen = self.seen_checkpoint(partition);
        let (marker, values): (Option<String>, Vec<Option<Vec<u8>>>) = {
            let parse = |e: redis::ParsingError| Failure::Fatal(anyhow::anyhow!("unexpected reply from Redis: {e}"));
            let mut all = pipe
                .query_async::<Vec<redis::Value>>(&mut self.conn())
                .await?
                .into_iter();
            let marker: Option<String> = match all.next() {
                Some(v) => redis::from_redis_value(v).map_err(parse)?,
                None => None,
            };
            let values = all
                .map(redis::from_redis_value)
                .collect::<Result<Vec<Option<Vec<u8>>>, _>>()
                .map_err(parse)?;
            (marker, values)
        };
        self.check_state(partition, Self::parse_state(marker.as_deref()), seen)?;
        values
            .into_iter()
            .map(|v| v.map(|v| decode_value(&v)).transpose())
            .collect()
    }

    pub async fn load(&self, partition: i32, tenant: &str, invoice_id: &str) -> Result<Option<Loaded>, Failure> {
        let mut all = self
            .load_many(partition, &[(tenant.to_owned(), invoice_id.to_owned())])
            .await?;
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

    /// Makes a write ready: the value it stores (and puts on the changelog first) and the timer
    /// and debtor-list changes that go with it.
    pub fn prepare(&self, s: Save, now_ms: i64) -> Result<Prepared, Failure> {
        let Save {
            expected,
            mut stored,
            timer,
            fired_step,
            stops_contact,
        } = s;
        let inv = &stored.journey.invoice;
        let (tenant, invoice_id, debtor_id) = (inv.tenant.clone(), inv.invoice_id.clone(), inv.debtor_id.clone());
        let fired = fired_step.map(|step| member(&tenant, &invoice_id, step));
        let pending = stored.pending_step.map(|step| member(&tenant, &invoice_id, step));
        let mut add = None;
        match timer {
            TimerChange::Keep => {
                if fired_step.is_some() && stored.pending_step == fired_step {
                    stored.pending_step = None;
                    stored.pending_fire_ms = None;
                }
            }
            TimerChange::Cancel => {
                stored.pending_step = None;
                stored.pending_fire_ms = None;
            }
            TimerChange::Schedule { step_index, fire_at } => {
                add = Some((member(&tenant, &invoice_id, step_index), fire_at.timestamp_millis()));
                stored.pending_step = Some(step_index);
                stored.pending_fire_ms = Some(fire_at.timestamp_millis());
            }
        }
        let added = add.as_ref().map(|(m, _)| m.clone());
        // The fired timer is done whatever was decided; the previously pending one is replaced
        // or cancelled (kept only when the decision keeps it).
        let remove_pending = match timer {
            TimerChange::Keep => None,
            _ => pending.filter(|p| Some(p) != added.as_ref()),
        };
        let remove_fired = fired.filter(|f| Some(f) != added.as_ref() && Some(f) != remove_pending.as_ref());
        let header = Header {
            version: expected.map_or(1, |v| v + 1),
            status: stored.journey.state.label(),
            next_step: Some(stored.journey.next_step as i64),
        };
        let stop = stops_contact.then(|| journey_state::encode_stop(header.version, &header.status));
        let value = journey_state::encode(&header, &encode_body(&stored)?);
        Ok(Prepared {
            stop_at: journey_state::stop_location(&self.keys, &tenant, &invoice_id),
            stop,
            partition: stored.partition,
            changelog_key: journey_change_key(&tenant, &invoice_id),
            value,
            expected,
            at: journey_state::location(&self.keys, &tenant, &invoice_id),
            remove_pending,
            remove_fired,
            add,
            debtor: self.debtor_location(&tenant, &debtor_id),
            open: !stored.journey.state.is_final(),
            closed_at: matches!(stored.journey.state, JourneyState::Closed(_)).then_some(now_ms),
            invoice_id,
            upcoming: stored.pending_step.zip(stored.pending_fire_ms),
        })
    }

    /// The changelog record of a prepared write.
    pub fn change(&self, p: &Prepared) -> Outbound {
        self.changelog
            .put(p.partition, p.changelog_key.clone(), p.value.clone())
    }

    /// Marks the journeys whose decisions end contact as stopped, in one round trip, before
    /// their outputs are produced: dispatch's last look sees "paid" from the moment the
    /// journey event could say so, however long the journey write then waits on the broker.
    /// A decision that is not written after all (a crash, a conflict) leaves the stop to the
    /// decision made again, whose journey write removes it.
    pub async fn stop_contact<'a>(&self, prepared: impl IntoIterator<Item = &'a Prepared>) -> Result<(), Failure> {
        let mut pipe = redis::pipe();
        let mut any = false;
        for p in prepared {
            if let Some(stop) = &p.stop {
                pipe.hset(&p.stop_at.key, &p.stop_at.field, stop).ignore();
                any = true;
            }
        }
        if any {
            let _: () = pipe.query_async(&mut self.conn()).await?;
        }
        Ok(())
    }

    /// Writes prepared journeys of one partition, each only if nobody wrote it since it was
    /// read, in one round trip, with the changelog offset each went to; what became of each,
    /// in order. [`StateMissing`] when the partition's state is gone.
    pub async fn save_many(
        &self,
        partition: i32,
        saves: &[Prepared],
        offsets: &[i64],
    ) -> Result<Vec<Written>, Failure> {
        if saves.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (s, offset) in saves.iter().zip(offsets) {
            self.add_save(&mut pipe, s, *offset);
        }
        let written: Vec<i32> = match pipe.query_async(&mut self.conn()).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // Redis restarted or its script cache was flushed: load and try once more. A
                // write that went through before the error fails its version check now, and
                // the caller decides it again from what is stored.
                self.prepare_scripts().await?;
                pipe.query_async(&mut self.conn()).await?
            }
            other => other?,
        };
        if written.contains(&-1) {
            return Err(Failure::Transient(
                StateMissing {
                    partition,
                    detail: "found missing when writing".into(),
                }
                .into(),
            ));
        }
        if let Some(max) = saves
            .iter()
            .zip(offsets)
            .zip(&written)
            .filter(|(_, w)| **w == 1)
            .map(|((_, o), _)| *o)
            .max()
        {
            self.saw_checkpoint(partition, max);
        }
        Ok(written
            .into_iter()
            .map(|w| if w == 1 { Written::Yes } else { Written::Conflict })
            .collect())
    }

    fn add_save(&self, pipe: &mut redis::Pipeline, p: &Prepared, offset: i64) {
        let (add_member, add_score) = p.add.clone().unwrap_or_default();
        pipe.cmd("EVALSHA")
            .arg(self.save.get_hash())
            .arg(7)
            .arg(&p.at.key)
            .arg(self.timers_key(p.partition))
            .arg(&p.debtor.0)
            .arg(self.state_key(p.partition))
            .arg(self.closed_key(p.partition))
            .arg(&p.stop_at.key)
            .arg(self.open_counts_key(p.partition))
            .arg(&p.at.field)
            .arg(p.expected.map(|v| v.to_string()).unwrap_or_default())
            .arg(&p.value)
            .arg(p.remove_pending.clone().unwrap_or_default())
            .arg(p.remove_fired.clone().unwrap_or_default())
            .arg(add_member)
            .arg(add_score)
            .arg(&p.debtor.1)
            .arg(&p.invoice_id)
            .arg(if p.open { "open" } else { "closed" })
            .arg(offset)
            .arg(p.closed_at.map(|t| t.to_string()).unwrap_or_default());
    }

    /// Puts journeys back as their changelog has them, in one round trip: `current` is what
    /// Redis holds for each now (to move its timer and list entry), `next` the changelog's value
    /// (`None`: the journey is gone).
    pub fn add_restore(
        &self,
        pipe: &mut redis::Pipeline,
        tenant: &str,
        invoice_id: &str,
        current: Option<&Stored>,
        next: Option<(&[u8], &Stored)>,
        written_ms: i64,
    ) {
        let at = journey_state::location(&self.keys, tenant, invoice_id);
        let old_member = current
            .and_then(|c| c.pending_step)
            .map(|step| member(tenant, invoice_id, step))
            .unwrap_or_default();
        let (value, new_member, score, partition) = match next {
            Some((value, s)) => (
                value.to_vec(),
                s.pending_step
                    .filter(|_| s.pending_fire_ms.is_some())
                    .map(|step| member(tenant, invoice_id, step))
                    .unwrap_or_default(),
                s.pending_fire_ms.unwrap_or_default(),
                s.partition,
            ),
            None => (Vec::new(), String::new(), 0, current.map_or(0, |c| c.partition)),
        };
        let journey = next.map(|(_, s)| &s.journey).or(current.map(|c| &c.journey));
        let (debtor, open) = match journey {
            Some(j) => (
                self.debtor_location(tenant, &j.invoice.debtor_id),
                next.is_some_and(|(_, s)| !s.journey.state.is_final()),
            ),
            None => ((String::new(), Vec::new()), false),
        };
        let closed_at = next
            .filter(|(_, s)| matches!(s.journey.state, JourneyState::Closed(_)))
            .map(|_| written_ms.to_string())
            .unwrap_or_default();
        pipe.cmd("EVALSHA")
            .arg(self.restore.get_hash())
            .arg(5)
            .arg(&at.key)
            .arg(self.timers_key(partition))
            .arg(if debtor.0.is_empty() {
                at.key.clone()
            } else {
                debtor.0.clone()
            })
            .arg(self.closed_key(partition))
            .arg(self.open_counts_key(partition))
            .arg(&at.field)
            .arg("")
            .arg(value)
            .arg(old_member)
            .arg("")
            .arg(new_member)
            .arg(score)
            .arg(debtor.1)
            .arg(invoice_id)
            .arg(if open { "open" } else { "closed" })
            .arg(closed_at)
            .ignore();
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

    /// Makes sure the scripts are in Redis' cache (pipelined saves call them by hash).
    pub async fn prepare_scripts(&self) -> Result<(), Failure> {
        self.save.load_async(&mut self.conn()).await?;
        self.restore.load_async(&mut self.conn()).await?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn changelog_keys_read_back_whatever_the_ids_hold() {
        for (a, b, c) in [("acme", "c-1", "inv-1"), ("a:b", "c:d", "e:f"), ("", "æ", "")] {
            assert_eq!(
                ChangeKey::parse(journey_change_key(a, c).as_bytes()),
                Some(ChangeKey::Journey {
                    tenant: a.into(),
                    invoice_id: c.into()
                })
            );
            assert_eq!(
                ChangeKey::parse(late_change_key(a, b, c).as_bytes()),
                Some(ChangeKey::Late {
                    tenant: a.into(),
                    debtor_id: b.into(),
                    invoice_id: c.into()
                })
            );
            assert_eq!(
                ChangeKey::parse(history_change_key(a, b, c).as_bytes()),
                Some(ChangeKey::History {
                    tenant: a.into(),
                    debtor_id: b.into(),
                    invoice_id: c.into()
                })
            );
            assert_eq!(
                ChangeKey::parse(parked_change_key(a, c, b).as_bytes()),
                Some(ChangeKey::Parked {
                    tenant: a.into(),
                    invoice_id: c.into(),
                    payment_id: b.into()
                })
            );
        }
        assert_eq!(ChangeKey::parse(b"x1:ab"), None);
        assert_eq!(ChangeKey::parse(b""), None);
    }

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
            reminder_fee_agreed: false,
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
            pending_fire_ms: Some(1_700_000_000_000),
            trace: None,
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
