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
//! | `{p:e}:events` | pub/sub channel | `r:<instance>` (slots freed by that instance), `c:<n>` (capacity changed) |
//!
//! The global count is the sum of `holders`; every script keeps `holders` and `leases` in
//! step. Lease deadlines come from the server's `TIME`, never from a client clock. Every
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

/// Shared prologue: `now` from server TIME, reclaim expired leases, current capacity.
/// KEYS: holders, leases, capacity. ARGV[1] = instance, ARGV[2] = fallback capacity.
const PROLOGUE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(dead) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
local cap = tonumber(redis.call('GET', KEYS[3]) or ARGV[2])
local function total()
  local n = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[1])) do n = n + tonumber(v) end
  return n
end
"#;

/// ACQUIRE: take up to `want` slots for `instance`.
/// KEYS: holders, leases, capacity, waiting.
/// ARGV: instance, fallback capacity, want, lease ttl ms, waiting-flag ttl ms, channel.
/// Returns `{granted, count, capacity}`.
const ACQUIRE_BODY: &str = r#"
local count = total()
local want = tonumber(ARGV[3])
local grant = math.max(0, math.min(want, cap - count))
if grant > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], grant)
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
end
if grant < want then
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[5])
elseif #dead > 0 and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('PUBLISH', ARGV[6], 'r:' .. ARGV[1])
end
return {grant, count + grant, cap}
"#;

/// RELEASE: give back up to `n` slots of `instance`; wakes waiters when some are queued.
/// KEYS: holders, leases, capacity, waiting.
/// ARGV: instance, fallback capacity, n, channel.
/// Returns `{released, count, capacity}`.
const RELEASE_BODY: &str = r#"
local held = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local n = math.min(held, tonumber(ARGV[3]))
if held - n <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif n > 0 then
  redis.call('HINCRBY', KEYS[1], ARGV[1], -n)
end
if (n > 0 or #dead > 0) and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('PUBLISH', ARGV[4], 'r:' .. ARGV[1])
end
return {n, total(), cap}
"#;

/// HEARTBEAT: renew the lease of `instance`. With `mode` = `renew`, an instance that is not
/// registered (its lease was reclaimed, or Redis lost its data) is registered again with
/// `n` slots; with `mode` = `set`, the instance's slot count is set to `n` (the re-register
/// after an outage). Also restores a missing capacity key from the fallback, unless the
/// fallback is 0 (an endpoint whose capacity is still to be probed: 0 means "unknown" and is
/// never stored, so the capacity store's `get_or_probe` still probes).
/// KEYS: holders, leases, capacity, waiting.
/// ARGV: instance, fallback capacity, n, lease ttl ms, channel, mode.
/// Returns `{registered_before, count, capacity}`.
const HEARTBEAT_BODY: &str = r#"
if redis.call('EXISTS', KEYS[3]) == 0 and tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[3], ARGV[2])
end
local n = tonumber(ARGV[3])
local before = redis.call('HGET', KEYS[1], ARGV[1])
local was = 0
if before then was = 1 end
local old = tonumber(before or '0')
if ARGV[6] == 'set' or not before then
  if n > 0 then
    redis.call('HSET', KEYS[1], ARGV[1], n)
  else
    redis.call('HDEL', KEYS[1], ARGV[1])
  end
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local now_held = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if (now_held < old or #dead > 0) and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('PUBLISH', ARGV[5], 'r:' .. ARGV[1])
end
return {was, total(), cap}
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
pub(crate) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{PROLOGUE}{RELEASE_BODY}")));
pub(crate) static HEARTBEAT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{PROLOGUE}{HEARTBEAT_BODY}")));
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
