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
//! | `{p:e}:queue` | sorted set | instance id of each process with queued waiters → the server ms its turn began (the cross-process FIFO) |
//! | `{p:e}:queue_ttl` | sorted set | the same instances → the deadline of their queue entry (renewed by every retry) |
//! | `{p:e}:probe_lock` | string (PX) | held by the process probing the capacity |
//! | `{p:e}:events` | pub/sub channel | `w:<id>,<id>…` (slots are free for these queued instances), `c:<n>` (capacity changed) |
//!
//! The global count is the sum of `holders`; every script keeps `holders` and `leases` in
//! step. A process's entry is written only by that endpoint's task in that process, always
//! with the absolute count of slots it holds (never an increment), so a lost reply or an
//! outage cannot leave it wrong past the next call. Lease deadlines come from the server's
//! `TIME`, never from a client clock. Every script first reclaims the slots of the
//! instances whose lease deadline has passed (their process stopped heart-beating: crashed,
//! killed, or partitioned for longer than `lease_ttl`), and the queue entries whose
//! deadline has passed.
//!
//! **Fairness across processes.** A process that could not get every slot it asked for
//! joins `queue`. An acquire leaves one free slot for each queued process that has waited
//! longer than the caller (for every queued process, when the caller is not queued), and a
//! process that got some slots but not all goes to the back of the queue. Whenever slots
//! are free while processes are queued, the script publishes the ids of the first ones, and
//! only those retry at once. Without this, a busy process whose own releases go straight to
//! its own next waiters (one call releases and acquires) starves every other process.

use redis::Script;
use std::sync::LazyLock;

/// The keys of one endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) holders: String,
    pub(crate) leases: String,
    pub(crate) capacity: String,
    pub(crate) queue: String,
    pub(crate) queue_ttl: String,
    pub(crate) probe_lock: String,
    pub(crate) adaptive_lease: String,
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
            queue: format!("{tag}:queue"),
            queue_ttl: format!("{tag}:queue_ttl"),
            probe_lock: format!("{tag}:probe_lock"),
            adaptive_lease: format!("{tag}:adaptive_lease"),
            channel: format!("{tag}:events"),
        }
    }
}

/// Shared prologue: `now` from server TIME, reclaim expired leases and queue entries,
/// current capacity, and the helpers:
/// * `set_mine(n, ttl)` sets this instance's absolute slot count and lease;
/// * `leave()` takes this instance out of the queue;
/// * `wake(channel, free)` publishes the first `free` queued instances other than this one.
///
/// KEYS: holders, leases, capacity, queue, queue_ttl. ARGV[1] = instance, ARGV[2] = fallback
/// capacity.
const PROLOGUE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(dead) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
local gone = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now)
for _, id in ipairs(gone) do
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZREM', KEYS[5], id)
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
local function leave()
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('ZREM', KEYS[5], ARGV[1])
end
local function wake(channel, free)
  if free <= 0 then return end
  local out = {}
  for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, free)) do
    if id ~= ARGV[1] and #out < free then out[#out + 1] = id end
  end
  if #out > 0 then
    redis.call('PUBLISH', channel, 'w:' .. table.concat(out, ','))
  end
end
"#;

/// ACQUIRE: set this instance's slot count to `mine` (the slots it holds now, so the call
/// also carries the releases it has not reported yet) plus up to `want` new slots, leaving
/// one free slot for each process queued ahead of it (see the module docs). Queues the
/// instance when it got fewer than `want` (at the back when it got some), takes it out of
/// the queue when it got all. With `mine` = `-`, only reads the count.
/// KEYS: holders, leases, capacity, queue, queue_ttl.
/// ARGV: instance, fallback capacity, want, lease ttl ms, queue-entry ttl ms, channel, mine.
/// Returns `{granted, count, capacity}`.
const ACQUIRE_BODY: &str = r#"
local count = total()
local mine = tonumber(ARGV[7])
if not mine then
  wake(ARGV[6], cap - count)
  return {0, count, cap}
end
local want = tonumber(ARGV[3])
local before = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local others = count - before
local since = redis.call('ZSCORE', KEYS[4], ARGV[1])
local ahead
if since then
  ahead = redis.call('ZCOUNT', KEYS[4], '-inf', '(' .. since)
else
  ahead = redis.call('ZCARD', KEYS[4])
end
local grant = math.max(0, math.min(want, cap - others - mine - ahead))
local held = mine + grant
set_mine(held, ARGV[4])
if grant < want then
  if grant > 0 or not since then
    redis.call('ZADD', KEYS[4], now, ARGV[1])
  end
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[5]), ARGV[1])
else
  leave()
end
wake(ARGV[6], cap - others - held)
return {grant, others + held, cap}
"#;

/// SYNC: set this instance's slot count to `n` and renew its lease: the release (the
/// per-endpoint task is the only writer of its instance's count, so the absolute count is
/// exact even after lost replies or an outage), the heartbeat and the re-register after an
/// outage. With `queued` = `0`, also takes the instance out of the queue (it has no waiter
/// left). Also restores a missing capacity key from the fallback, unless the fallback is 0
/// (an endpoint whose capacity is still to be probed: 0 means "unknown" and is never
/// stored, so the capacity store's `get_or_probe` still probes). Wakes queued processes
/// when slots are free.
/// KEYS: holders, leases, capacity, queue, queue_ttl.
/// ARGV: instance, fallback capacity, n, lease ttl ms, channel, queued.
/// Returns `{registered_before, count, capacity}`.
const SYNC_BODY: &str = r#"
if redis.call('EXISTS', KEYS[3]) == 0 and tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[3], ARGV[2])
end
local was = 0
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then was = 1 end
set_mine(tonumber(ARGV[3]), ARGV[4])
if ARGV[6] == '0' then leave() end
local count = total()
wake(ARGV[5], cap - count)
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

/// The answer of the acquire, release and heartbeat scripts: `{n, count, capacity}`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScriptReply {
    /// Slots granted (acquire), or whether this process's lease was still there (sync).
    pub(crate) n: usize,
    /// The endpoint's global slot count after the call.
    pub(crate) count: usize,
    /// The endpoint's stored capacity.
    pub(crate) capacity: usize,
}

impl ScriptReply {
    /// The reply from the script's integers (a negative one reads as 0).
    pub(crate) fn new(n: i64, count: i64, capacity: i64) -> Self {
        let non_negative = |v: i64| usize::try_from(v).unwrap_or(0);
        Self {
            n: non_negative(n),
            count: non_negative(count),
            capacity: non_negative(capacity),
        }
    }
}

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
            &k.queue,
            &k.queue_ttl,
            &k.probe_lock,
        ] {
            assert!(key.starts_with("{portcullis:/work}:"), "{key}");
        }
        let k = Keys::new("p", "/a{b}");
        assert_eq!(k.holders, "{p:/a_b_}:holders");
    }
}
