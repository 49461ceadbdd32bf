//! When an invoice leaves the matcher's index.
//!
//! An invoice is closed for the matcher when nothing is left to pay on it: its own terms (after
//! credits) minus what was allocated to it is zero or less. A closed invoice is never a candidate
//! for a payment (the matching rules skip it), so it leaves the debtor's and the invoice
//! number's sets at once, and its own entry, its allocated total and its reference expire after
//! `matcher.retention_days`: until then a new revision that reopens it (an amount raised, a
//! credit note withdrawn) finds its allocations, and a payment quoting its reference again is
//! unmatched with the invoice known rather than kept for an invoice that never comes. An open
//! invoice never expires, however old.
//!
//! The decision is taken in Redis, in the same script as the write that can close or reopen the
//! invoice (the index) or right after it (a booked allocation), so that concurrent writers
//! always leave the keys as the last state says.

use std::collections::BTreeMap;

use forfall_domain::reference::normalise;
use forfall_platform::derived_state::guard_lua;
use forfall_platform::kafka::Failure;

use crate::{Indexed, Matcher, MatcherKeys};

/// A Lua function `close_or_keep(inv, alloc, debtor, num, ref, id, has_num, has_ref, open, ttl)`:
/// expires a closed invoice's keys and takes it out of the sets, or keeps an open one's for good.
/// Returns 1 when the invoice is closed.
pub(crate) const CLOSE_OR_KEEP_LUA: &str = r"
local function close_or_keep(inv, alloc, debtor, num, ref, id, has_num, has_ref, open, ttl)
  local allocated = tonumber(redis.call('GET', alloc) or '0')
  local owns_ref = has_ref and redis.call('GET', ref) == id
  if open - allocated > 0 then
    redis.call('PERSIST', inv)
    redis.call('PERSIST', alloc)
    if owns_ref then redis.call('PERSIST', ref) end
    redis.call('SADD', debtor, id)
    if has_num then redis.call('SADD', num, id) end
    return 0
  end
  redis.call('EXPIRE', inv, ttl)
  redis.call('EXPIRE', alloc, ttl)
  if owns_ref then redis.call('EXPIRE', ref, ttl) end
  redis.call('SREM', debtor, id)
  if has_num then redis.call('SREM', num, id) end
  return 1
end
";

/// The keys of one indexed invoice.
pub(crate) struct InvoiceKeys {
    pub inv: String,
    pub alloc: String,
    pub debtor: String,
    /// `None` when the invoice has no number to index.
    pub num: Option<String>,
    pub reference: Option<String>,
}

impl MatcherKeys<'_> {
    pub(crate) fn of_invoice(&self, tenant: &str, ix: &Indexed) -> InvoiceKeys {
        let number = normalise(&ix.invoice_number);
        InvoiceKeys {
            inv: self.key("inv", tenant, &ix.invoice_id),
            alloc: self.key("alloc", tenant, &ix.invoice_id),
            debtor: self.key("debtor", tenant, &ix.debtor_id),
            num: (!number.is_empty()).then(|| self.key("num", tenant, &number)),
            reference: ix.reference.as_deref().map(|r| self.key("ref", tenant, r)),
        }
    }
}

/// Closes or keeps each invoice given, on the allocations and terms Redis holds now.
/// `KEYS[1]` is the state marker; per invoice five keys and four arguments follow.
const SETTLE_LUA: &str = r"local n = tonumber(ARGV[3])
local closed = 0
for i = 0, n - 1 do
  local k, a = 1 + 5 * i, 3 + 4 * i
  local raw = redis.call('GET', KEYS[k + 1])
  if raw then
    local open = tonumber(cjson.decode(raw)['open_minor'])
    closed = closed + close_or_keep(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5],
      ARGV[a + 1], ARGV[a + 2] == '1', ARGV[a + 3] == '1', open, tonumber(ARGV[a + 4]))
  end
end
return closed";

/// For booked allocations: guarded like every write.
static SETTLE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        "{}{CLOSE_OR_KEEP_LUA}{SETTLE_LUA}",
        guard_lua("KEYS[1]", "ARGV[1]", "ARGV[2]")
    ))
});

/// For the rebuild, which writes before the marker exists.
static SETTLE_REBUILDING: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(&format!("{CLOSE_OR_KEEP_LUA}{SETTLE_LUA}")));

/// Whether a settle call is one of the running service's writes or the rebuild's.
#[derive(Clone, Copy)]
pub(crate) enum Writer {
    Service { epoch: i64, writes: i64 },
    Rebuild,
}

/// One settle call for the invoices given, each with its time to live once closed (0 removes
/// a closed invoice's keys at once).
pub(crate) fn settle_invocation<'a>(
    keys: &MatcherKeys<'_>,
    marker: &str,
    writer: Writer,
    tenant: &str,
    invoices: impl IntoIterator<Item = (&'a Indexed, u64)>,
) -> redis::ScriptInvocation<'static> {
    let (mut invocation, (epoch, writes)) = match writer {
        Writer::Service { epoch, writes } => (SETTLE.prepare_invoke(), (epoch, writes)),
        Writer::Rebuild => (SETTLE_REBUILDING.prepare_invoke(), (0, 0)),
    };
    invocation.key(marker).arg(epoch).arg(writes);
    let invoices: Vec<(InvoiceKeys, &str, u64)> = invoices
        .into_iter()
        .map(|(ix, ttl)| (keys.of_invoice(tenant, ix), ix.invoice_id.as_str(), ttl))
        .collect();
    invocation.arg(invoices.len());
    for (k, id, ttl) in invoices {
        invocation
            .arg(id)
            .arg(if k.num.is_some() { "1" } else { "0" })
            .arg(if k.reference.is_some() { "1" } else { "0" })
            .arg(ttl)
            .key(k.inv)
            .key(k.alloc)
            .key(k.debtor)
            .key(k.num.unwrap_or_else(|| "-".into()))
            .key(k.reference.unwrap_or_else(|| "-".into()));
    }
    invocation
}

impl Matcher {
    /// After allocations are booked: the invoices they paid in full leave the index (see the
    /// module). `indexed` holds what the decision read of each invoice.
    pub(crate) async fn close_settled(
        &self,
        tenant: &str,
        allocated: impl IntoIterator<Item = &str>,
        indexed: &BTreeMap<String, Indexed>,
    ) -> Result<(), Failure> {
        let invoices: Vec<(&Indexed, u64)> = allocated
            .into_iter()
            .filter_map(|id| indexed.get(id))
            .map(|ix| (ix, self.0.retention_secs))
            .collect();
        if invoices.is_empty() {
            return Ok(());
        }
        let (epoch, writes) = self.0.state.seen();
        let invocation = settle_invocation(
            &MatcherKeys(&self.0.keys),
            self.0.state.marker_key(),
            Writer::Service { epoch, writes },
            tenant,
            invoices,
        );
        let closed: i64 = invocation.invoke_async(&mut self.conn()).await?;
        if closed < 0 {
            return Err(self.0.state.missing());
        }
        Ok(())
    }
}
