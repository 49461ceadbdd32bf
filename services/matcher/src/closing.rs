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
//! invoice (the index, a booked allocation), so that concurrent writers always leave the keys as
//! the last state says.

use forfall_domain::reference::normalise;

use crate::{Indexed, MatcherKeys};

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

/// A Lua function `settle_invoices(k0, a0, n)`: closes or keeps each of `n` invoices on the
/// allocations and terms Redis holds now. Invoice `i` (from 0) has its five keys (entry,
/// allocated, debtor's set, number's set, reference) from `KEYS[k0 + 5 * i + 1]` and its four
/// arguments (id, has a number, has a reference, time to live once closed) from
/// `ARGV[a0 + 4 * i + 1]`, as [`add_settled`] appends them. Returns how many it closed.
pub(crate) const SETTLE_INVOICES_LUA: &str = r"
local function settle_invoices(k0, a0, n)
  local closed = 0
  for i = 0, n - 1 do
    local k, a = k0 + 5 * i, a0 + 4 * i
    local raw = redis.call('GET', KEYS[k + 1])
    if raw then
      local open = tonumber(cjson.decode(raw)['open_minor'])
      closed = closed + close_or_keep(KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5],
        ARGV[a + 1], ARGV[a + 2] == '1', ARGV[a + 3] == '1', open, tonumber(ARGV[a + 4]))
    end
  end
  return closed
end
";

/// For the rebuild, which writes before the state marker exists (the running service settles
/// the invoices a booking paid in the booking's own script).
static SETTLE_REBUILDING: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        "{CLOSE_OR_KEEP_LUA}{SETTLE_INVOICES_LUA}return settle_invoices(0, 1, tonumber(ARGV[1]))"
    ))
});

/// The rebuild's settle call for the invoices given, each with its time to live once closed
/// (0 removes a closed invoice's keys at once).
pub(crate) fn rebuild_settle_invocation<'a>(
    keys: &MatcherKeys<'_>,
    tenant: &str,
    invoices: impl IntoIterator<Item = (&'a Indexed, u64)>,
) -> redis::ScriptInvocation<'static> {
    let mut invocation = SETTLE_REBUILDING.prepare_invoke();
    add_settled(&mut invocation, keys, tenant, invoices);
    invocation
}

/// Appends what [`SETTLE_INVOICES_LUA`] reads for the invoices given to `invocation`: their
/// count as one argument, then each invoice's four arguments and five keys.
pub(crate) fn add_settled<'a>(
    invocation: &mut redis::ScriptInvocation<'_>,
    keys: &MatcherKeys<'_>,
    tenant: &str,
    invoices: impl IntoIterator<Item = (&'a Indexed, u64)>,
) {
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
}
