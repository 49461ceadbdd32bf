//! One attempt at sending one (action, channel) and its hold on the message's idempotency
//! claim in Redis: the lease, the last look taken with it, the commit point (also on
//! dispatch's changelog), the final state. See the crate's documentation for the protocol.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use forfall_platform::derived_state::guard_lua;
use forfall_platform::journey_state::{self, LastLook};
use forfall_platform::kafka::Failure;
use forfall_platform::redis_store;

use crate::channels::SendError;
use crate::{Dispatch, rebuild};

/// How long a value written to a claim lives.
#[derive(Clone, Copy)]
pub(crate) enum Expiry {
    /// `dispatch.claim_lease_ms`: the claim frees itself unless renewed.
    Lease,
    /// `dispatch.idempotency_ttl_days`: the claim's state is remembered.
    Remembered,
}

/// One attempt at one (action, channel), and its hold on the claim: `claimed:<id>` (the lease,
/// renewed while the attempt runs) up to the commit point, `sending:<id>` from it. Every write
/// the attempt makes to the claim is a compare-and-set from one of these two values of its own,
/// so an attempt whose claim was taken can change nothing: it does not send, does not write its
/// result over its successor's state and does not fall back to another channel.
pub(crate) struct Attempt<'a> {
    dispatch: &'a Dispatch,
    key: &'a str,
    /// The changelog key that records the commit point (see [`Attempt::commit`]).
    record: String,
    /// `claimed:<attempt id>`.
    lease: String,
    /// `sending:<attempt id>`.
    sending: String,
    /// The renewal found the claim no longer this attempt's.
    lost: AtomicBool,
    /// What the first look read, as stored: the invoices' ids, and for each its journey and
    /// contact stop (see [`Attempt::commit_if_unchanged`]).
    first_look: std::sync::OnceLock<(Vec<String>, Looked)>,
}

/// A look's replies as read: per invoice its journey, then its contact stop.
type Looked = Vec<Option<Vec<u8>>>;

/// A value for the commit script: `0` for none, `1` and the bytes for some.
fn tagged(value: Option<&[u8]>) -> Vec<u8> {
    match value {
        None => b"0".to_vec(),
        Some(v) => [&b"1"[..], v].concat(),
    }
}

impl<'a> Attempt<'a> {
    pub(crate) fn new(dispatch: &'a Dispatch, key: &'a str, action_id: &str, channel: &str) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            dispatch,
            key,
            record: rebuild::sending_changelog_key(action_id, channel),
            lease: format!("claimed:{id}"),
            sending: format!("sending:{id}"),
            lost: AtomicBool::new(false),
            first_look: std::sync::OnceLock::new(),
        }
    }

    /// Claims are off only in the benchmark mode `dispatch.idempotency = false`.
    pub(crate) fn enabled(&self) -> bool {
        self.dispatch.settings.idempotency
    }

    /// Takes the claim when nobody holds it (`SET NX` with the lease), and never on a Redis
    /// that lost dispatch's state: a claim missing for that reason is not a message unsent.
    /// The last look at `invoices` (see [`journey_state::last_looks`]) rides in the same round
    /// trip, read right after the claim is taken: `None` when the claim is someone else's.
    pub(crate) async fn claim_and_look(
        &self,
        tenant: &str,
        invoices: &[(&str, i32)],
    ) -> Result<Option<Vec<LastLook>>, Failure> {
        static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
            redis::Script::new(&format!(
                "{}if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end\nreturn 0",
                guard_lua("KEYS[2]", "ARGV[3]", "ARGV[4]")
            ))
        });
        let (epoch, writes) = self.dispatch.state.seen();
        let mut claim = CLAIM.prepare_invoke();
        claim
            .key(self.key)
            .key(self.dispatch.state.marker_key())
            .arg(&self.lease)
            .arg(self.dispatch.settings.claim_lease_ms)
            .arg(epoch)
            .arg(writes);
        let mut pipe = redis::pipe();
        pipe.invoke_script(&claim);
        journey_state::add_last_looks(&mut pipe, &self.dispatch.keys, tenant, invoices);
        let replies: Vec<redis::Value> =
            redis_store::query_with_script(&mut self.dispatch.redis.clone(), &pipe, &claim).await?;
        let mut replies = replies.into_iter();
        let claimed: i32 =
            redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil)).map_err(redis::RedisError::from)?;
        let looked: Looked = replies
            .map(redis::from_redis_value)
            .collect::<Result<_, _>>()
            .map_err(redis::RedisError::from)?;
        match claimed {
            -2 => Err(self.dispatch.state.missing()),
            1 => {
                let looks = journey_state::last_looks_from(&looked, invoices);
                let ids = invoices.iter().map(|(id, _)| (*id).to_owned()).collect();
                let _ = self.first_look.set((ids, looked));
                Ok(Some(looks))
            }
            _ => Ok(None),
        }
    }

    /// Moves the claim to `to` (deletes it when `to` is empty) only while it is still this
    /// attempt's (its lease or its `sending`). `false`: it is not, and nothing was written.
    /// A final state (`Expiry::Remembered`: what became of the message) is also written over a
    /// claim that is gone: only a Redis that lost its state loses a claim this attempt held
    /// (the lease is renewed, `sending` does not expire), and a message sent must be on record
    /// before its outcome is, or a redelivery after a crash would send it again.
    async fn transition(&self, to: &str, expiry: Expiry) -> Result<bool, Failure> {
        self.transition_and(to, expiry, None).await
    }

    /// [`Attempt::transition`], with `also` (a write of the caller's) sent after it in the same
    /// round trip, whatever the transition found.
    async fn transition_and(&self, to: &str, expiry: Expiry, also: Option<redis::Cmd>) -> Result<bool, Failure> {
        static TRANSITION: LazyLock<redis::Script> = LazyLock::new(|| {
            redis::Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  local lost = (v == false) and ARGV[6] == 'final'
                  if v ~= ARGV[1] and v ~= ARGV[2] and not lost then return 0 end
                  if ARGV[3] == '' then redis.call('DEL', KEYS[1])
                  else redis.call('SET', KEYS[1], ARGV[3], ARGV[4], ARGV[5]) end
                  return 1",
            )
        });
        let (unit, ttl, kind) = match expiry {
            Expiry::Lease => ("PX", self.dispatch.settings.claim_lease_ms, "lease"),
            Expiry::Remembered if to.starts_with("sending:") => ("EX", self.dispatch.ttl_secs(), "commit"),
            Expiry::Remembered => ("EX", self.dispatch.ttl_secs(), "final"),
        };
        let mut call = TRANSITION.prepare_invoke();
        call.key(self.key)
            .arg(&self.lease)
            .arg(&self.sending)
            .arg(to)
            .arg(unit)
            .arg(ttl)
            .arg(kind);
        let Some(also) = also else {
            let moved: i32 = call.invoke_async(&mut self.dispatch.redis.clone()).await?;
            return Ok(moved == 1);
        };
        let mut pipe = redis::pipe();
        pipe.invoke_script(&call).add_command(also).ignore();
        // Should the script be unknown, `also` (a plain write) is written again harmlessly.
        let (moved,): (i32,) = redis_store::query_with_script(&mut self.dispatch.redis.clone(), &pipe, &call).await?;
        Ok(moved == 1)
    }

    /// The commit point, right before the provider can have the message: the claim moves from
    /// this attempt's lease to `sending` (and stops expiring). Idempotent: a retried send whose
    /// first commit went through but whose answer was lost commits again harmlessly.
    ///
    /// The commit is also on dispatch's changelog, acknowledged before the provider is called:
    /// should Redis lose the claim while the provider has the message and before its outcome
    /// is on its topic (Redis flushed or failed over as the process dies), the rebuild brings
    /// the claim back as `sending` and the redelivered action is not sent a second time.
    pub(crate) async fn commit(&self) -> Result<(), SendError> {
        if !self.enabled() {
            return Ok(());
        }
        match self.transition(&self.sending, Expiry::Remembered).await {
            Ok(true) => {}
            // The lease ran out and the claim moved on: this attempt must not send.
            Ok(false) => return Err(SendError::ClaimLost),
            Err(e) => return Err(SendError::Transient(format!("cannot record the send's start: {e:?}"))),
        }
        self.record_commit().await
    }

    /// [`Attempt::commit`] in one round trip with the look before it, when nothing the look's
    /// verdict depends on changed since the first look: the script moves the claim to `sending`
    /// only if every one of `invoices` still has the journey header and the contact stop the
    /// first look found (the same statuses give the same verdict, which let the message go).
    /// `Ok(false)`: something changed (or there was no first look), nothing moved, and the
    /// caller looks again and decides as before.
    pub(crate) async fn commit_if_unchanged(&self, tenant: &str, invoices: &[(&str, i32)]) -> Result<bool, SendError> {
        static COMMIT: LazyLock<redis::Script> = LazyLock::new(|| {
            redis::Script::new(&format!(
                r"local n = tonumber(ARGV[4])
                  for i = 1, n do
                    local at = 4 + 4 * (i - 1)
                    local journey = redis.call('HGET', KEYS[2 * i], ARGV[at + 1])
                    local stop = redis.call('HGET', KEYS[2 * i + 1], ARGV[at + 2])
                    local header = journey and string.match(journey, '{}')
                    if (header and ('1' .. header) or '0') ~= ARGV[at + 3] then return 2 end
                    if (stop and ('1' .. stop) or '0') ~= ARGV[at + 4] then return 2 end
                  end
                  local v = redis.call('GET', KEYS[1])
                  if v ~= ARGV[1] and v ~= ARGV[2] then return 0 end
                  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
                  return 1",
                journey_state::HEADER_LUA_PATTERN
            ))
        });
        let Some((ids, looked)) = self.first_look.get() else {
            return Ok(false);
        };
        let mut call = COMMIT.prepare_invoke();
        call.key(self.key)
            .arg(&self.lease)
            .arg(&self.sending)
            .arg(self.dispatch.ttl_secs())
            .arg(invoices.len());
        for (invoice_id, _) in invoices {
            let seen = ids
                .iter()
                .position(|id| id == invoice_id)
                .and_then(|i| Some((looked.get(2 * i)?.as_deref(), looked.get(2 * i + 1)?.as_deref())));
            let Some((journey, stop_value)) = seen else {
                return Ok(false);
            };
            let at = journey_state::location(&self.dispatch.keys, tenant, invoice_id);
            let stop = journey_state::stop_location(&self.dispatch.keys, tenant, invoice_id);
            call.key(at.key)
                .key(stop.key)
                .arg(at.field)
                .arg(stop.field)
                .arg(tagged(journey.and_then(journey_state::header_bytes)))
                .arg(tagged(stop_value));
        }
        let moved: i32 = call
            .invoke_async(&mut self.dispatch.redis.clone())
            .await
            .map_err(|e| SendError::Transient(format!("cannot record the send's start: {e}")))?;
        match moved {
            1 => self.record_commit().await.map(|()| true),
            // The lease ran out and the claim moved on: this attempt must not send.
            0 => Err(SendError::ClaimLost),
            _ => Ok(false),
        }
    }

    /// The commit point on dispatch's changelog, acknowledged (see [`Attempt::commit`]).
    async fn record_commit(&self) -> Result<(), SendError> {
        let change = self
            .dispatch
            .changelog
            .put_keyed(self.record.clone(), self.sending.clone().into_bytes());
        let ack = self.dispatch.commit_producer.send(&change).await;
        ack.await
            .map(|_| ())
            .map_err(|e| SendError::Transient(format!("cannot record the send's start on the changelog: {e}")))
    }

    /// Once the claim holds what became of the message, its commit record is no longer
    /// needed (the outcome is the fact from here on): a tombstone, not waited for. Before a
    /// retry (the provider did not take the message) it is waited for, so that a rebuild never
    /// takes a message that was not sent for one whose delivery is unknown.
    pub(crate) async fn forget_commit(&self, wait: bool) {
        if !self.enabled() {
            return;
        }
        let tombstone = self.dispatch.changelog.delete_keyed(self.record.clone());
        let ack = self.dispatch.commit_producer.send(&tombstone).await;
        let written = async move {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "a commit record's tombstone was not written");
            }
        };
        if wait {
            written.await;
        } else {
            tokio::spawn(written);
        }
    }

    /// Before a retry: the provider did not take the message (that is what a transient error
    /// means), so the claim goes back from `sending` to the (renewed) lease. A stop while waiting
    /// then frees the message for the redelivery instead of leaving its delivery "unknown".
    pub(crate) async fn reopen(&self) -> Result<(), SendError> {
        if !self.enabled() {
            return Ok(());
        }
        match self.transition(&self.lease, Expiry::Lease).await {
            Ok(true) => {
                self.forget_commit(true).await;
                Ok(())
            }
            Ok(false) => Err(SendError::ClaimLost),
            Err(e) => {
                // The claim stays as it is, this attempt's either way; the next commit decides.
                tracing::warn!(error = ?e, "cannot reopen the claim before a retry");
                Ok(())
            }
        }
    }

    /// Writes the attempt's result over its own claim. `false`: the claim was taken meanwhile
    /// and nothing was written.
    pub(crate) async fn settle(&self, state: &str) -> Result<bool, Failure> {
        self.transition(state, Expiry::Remembered).await
    }

    /// [`Attempt::settle`], with `also` written in the same round trip.
    pub(crate) async fn settle_and(&self, state: &str, also: redis::Cmd) -> Result<bool, Failure> {
        self.transition_and(state, Expiry::Remembered, Some(also)).await
    }

    /// Frees the claim for the next attempt (only while it is still this attempt's).
    pub(crate) async fn release(&self) -> Result<bool, Failure> {
        self.transition("", Expiry::Lease).await
    }

    pub(crate) fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Runs `work` while renewing the lease every third of `dispatch.claim_lease_ms`.
    pub(crate) async fn renewing<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        if !self.enabled() {
            return work.await;
        }
        let renewal = async {
            self.keep_alive().await;
            std::future::pending::<T>().await
        };
        tokio::select! {
            out = work => out,
            out = renewal => out,
        }
    }

    /// Renews the lease (a compare-and-set on this attempt's id) until the claim turns out to be
    /// someone else's. While the claim is this attempt's `sending`, it does not expire and there
    /// is nothing to renew.
    async fn keep_alive(&self) {
        static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
            redis::Script::new(
                r"local v = redis.call('GET', KEYS[1])
                  if v == ARGV[1] then
                    redis.call('PEXPIRE', KEYS[1], ARGV[3])
                    return 1
                  end
                  if v == ARGV[2] then return 1 end
                  return 0",
            )
        });
        let lease_ms = self.dispatch.settings.claim_lease_ms;
        let every = Duration::from_millis((lease_ms / 3).max(10));
        loop {
            tokio::time::sleep(every).await;
            let renewed: Result<i32, redis::RedisError> = RENEW
                .key(self.key)
                .arg(&self.lease)
                .arg(&self.sending)
                .arg(lease_ms)
                .invoke_async(&mut self.dispatch.redis.clone())
                .await;
            match renewed {
                Ok(1) => {}
                Ok(_) => {
                    self.lost.store(true, Ordering::SeqCst);
                    tracing::warn!("this attempt's claim ran out and is no longer its own: it sends nothing");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "cannot renew the claim's lease; trying again"),
            }
        }
    }
}
