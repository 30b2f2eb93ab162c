//! Key layout and the server-side Lua scripts.
//!
//! Every key of one endpoint carries the same hash tag, `{<prefix>:<endpoint>}`, so on a
//! Redis Cluster all of them live in one slot and one script can touch them atomically:
//!
//! | key | type | content |
//! |---|---|---|
//! | `{p:e}:holders` | hash | process instance id → number of slots it holds |
//! | `{p:e}:leases` | sorted set | process instance id → lease deadline (server ms) |
//! | `{p:e}:capacity` | string | the endpoint's global capacity |
//! | `{p:e}:waiting` | string (PX) | present while some process has queued waiters |
//! | `{p:e}:probe_lock` | string (PX) | held by the process probing the capacity |
//! | `{p:e}:events` | pub/sub channel | `r:<instance>:<n>` (`n` slots freed by that instance's call), `c:<n>` (capacity changed) |
//!
//! The global count is the sum of `holders`; every script keeps `holders` and `leases` in
//! step. A process's entry is written only by that endpoint's task in that process, always
//! with the absolute count of slots it holds (never an increment), so a lost reply or an
//! outage cannot leave it wrong past the next call. Lease deadlines come from the server's `TIME`, never from a client clock. Every
//! script first reclaims the slots of the instances whose lease deadline has passed (their
//! process stopped heart-beating: crashed, killed, or partitioned for longer than
//! `lease_ttl`).

use redis::Script;
use std::sync::LazyLock;

/// The keys of one endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) holders: String,
    pub(crate) leases: String,
    pub(crate) capacity: String,
    pub(crate) waiting: String,
    pub(crate) probe_lock: String,
    pub(crate) channel: String,
}

impl Keys {
    pub(crate) fn new(prefix: &str, endpoint: &str) -> Self {
        // Braces would end the hash tag early; they are not valid in paths anyway.
        let endpoint = endpoint.replace(['{', '}'], "_");
        let tag = format!("{{{prefix}:{endpoint}}}");
        Self {
            holders: format!("{tag}:holders"),
            leases: format!("{tag}:leases"),
            capacity: format!("{tag}:capacity"),
            waiting: format!("{tag}:waiting"),
            probe_lock: format!("{tag}:probe_lock"),
            channel: format!("{tag}:events"),
        }
    }
}

/// Shared prologue: `now` from server TIME, reclaim expired leases (`reclaimed`: the slots
/// they held), current capacity, and `set_mine`, which sets this instance's absolute slot
/// count and lease.
/// KEYS: holders, leases, capacity. ARGV[1] = instance, ARGV[2] = fallback capacity.
const PROLOGUE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
local reclaimed = 0
for _, id in ipairs(dead) do
  reclaimed = reclaimed + tonumber(redis.call('HGET', KEYS[1], id) or '0')
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
local cap = tonumber(redis.call('GET', KEYS[3]) or ARGV[2])
local function total()
  local n = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do n = n + tonumber(v) end
  return n
end
local function set_mine(n, ttl)
  if n > 0 then
    redis.call('HSET', KEYS[1], ARGV[1], n)
    redis.call('ZADD', KEYS[2], now + tonumber(ttl), ARGV[1])
  else
    redis.call('HDEL', KEYS[1], ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
  end
end
local function wake(channel, freed, free)
  if freed > 0 and free > 0 and redis.call('EXISTS', KEYS[4]) == 1 then
    redis.call('PUBLISH', channel, 'r:' .. ARGV[1] .. ':' .. math.min(freed, free))
  end
end
"#;

/// ACQUIRE: set this instance's slot count to `mine` (the slots it holds now, so the call
/// also carries the releases it has not reported yet) plus up to `want` new slots. With
/// `mine` = `-`, only reads the count. Wakes waiting processes when slots became free.
/// KEYS: holders, leases, capacity, waiting.
/// ARGV: instance, fallback capacity, want, lease ttl ms, waiting-flag ttl ms, channel, mine.
/// Returns `{granted, count, capacity}`.
const ACQUIRE_BODY: &str = r#"
local count = total()
local mine = tonumber(ARGV[7])
if not mine then
  wake(ARGV[6], reclaimed, cap - count)
  return {0, count, cap}
end
local want = tonumber(ARGV[3])
local before = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local others = count - before
local grant = math.max(0, math.min(want, cap - others - mine))
local held = mine + grant
set_mine(held, ARGV[4])
if grant < want then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[5])
end
wake(ARGV[6], reclaimed + math.max(0, before - held), cap - others - held)
return {grant, others + held, cap}
"#;

/// SYNC: set this instance's slot count to `n` and renew its lease: the release (the
/// per-endpoint task is the only writer of its instance's count, so the absolute count is
/// exact even after lost replies or an outage), the heartbeat and the re-register after an
/// outage. Also restores a missing capacity key from the fallback, unless the fallback is
/// 0 (an endpoint whose capacity is still to be probed: 0 means "unknown" and is never
/// stored, so the capacity store's `get_or_probe` still probes). Wakes waiting processes
/// when slots became free: the message carries how many.
/// KEYS: holders, leases, capacity, waiting.
/// ARGV: instance, fallback capacity, n, lease ttl ms, channel.
/// Returns `{registered_before, count, capacity}`.
const SYNC_BODY: &str = r#"
if redis.call('EXISTS', KEYS[3]) == 0 and tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[3], ARGV[2])
end
local n = tonumber(ARGV[3])
local before = redis.call('HGET', KEYS[1], ARGV[1])
local was = 0
if before then was = 1 end
set_mine(n, ARGV[4])
local count = total()
wake(ARGV[5], reclaimed + math.max(0, tonumber(before or '0') - n), cap - count)
return {was, count, cap}
"#;

/// SET_CAPACITY: store the capacity and tell every process.
/// KEYS: capacity. ARGV: capacity, channel.
const SET_CAPACITY: &str = r#"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], 'c:' .. ARGV[1])
return 1
"#;

/// UNLOCK: delete the probe lock if `owner` holds it. KEYS: lock. ARGV: owner.
const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// EXTEND: extend the probe lock if `owner` holds it. KEYS: lock. ARGV: owner, ttl ms.
const EXTEND: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

pub(crate) static ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{PROLOGUE}{ACQUIRE_BODY}")));
pub(crate) static SYNC: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{PROLOGUE}{SYNC_BODY}")));
pub(crate) static SET_CAPACITY_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(SET_CAPACITY));
pub(crate) static UNLOCK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(UNLOCK));
pub(crate) static EXTEND_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(EXTEND));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("portcullis", "/work");
        for key in [
            &k.holders,
            &k.leases,
            &k.capacity,
            &k.waiting,
            &k.probe_lock,
        ] {
            assert!(key.starts_with("{portcullis:/work}:"), "{key}");
        }
        let k = Keys::new("p", "/a{b}");
        assert_eq!(k.holders, "{p:/a_b_}:holders");
    }
}
