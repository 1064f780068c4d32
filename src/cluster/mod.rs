//! Many nodes as one service, on Redis (`redis_url`).
//!
//! # What lives where
//!
//! Redis holds the service's state; each shard of each node holds a cache of what its
//! connected devices need. Every key of a device shares the hash tag `{d:LEN:DEV}` and
//! every key of a broadcast channel `{b:CHAN}`, so each script touches one slot and
//! Redis Cluster could shard them (the client speaks to one endpoint today: it does not
//! follow `MOVED` redirections, so a Redis Cluster needs a slot-aware client first):
//!
//! | key | type | what |
//! |---|---|---|
//! | `pb:{d:LEN:DEV}:u:LEN:USER` | list | the pending unicast notifications of (USER, DEV), oldest first, each a JSON header, a newline and the payload; it expires with its last notification |
//! | `pb:{d:LEN:DEV}:r` | hash | the device's **route record**: `node`, `shard` (while a session is registered), `epoch` (bumped by every registration), `seq` (bumped by every accepted notify) |
//! | `pb:{b:CHAN}:level` | string | the broadcast channel's top level: one sequence for the whole service |
//! | `pb:{b:CHAN}:log` | list | its newest `broadcast_backlog` notifications, `LEVEL EXPIRY_MS PAYLOAD` |
//! | `pb:{nodes}` | hash | node id → `MILLIS HOSTS_JSON`, refreshed every 2 s (`/delivery-hosts`) |
//!
//! Tokens need no key: they are derived from the (app, device) pair.
//!
//! # How a notification travels
//!
//! 1. `/notify` on any node: one script applies the store rules to the device's list
//!    (expired and replaced entries out, the per-app limit), appends, bumps `seq` and
//!    returns the route. The API answers 200 once Redis answered: the notification is
//!    stored, whatever happens to the nodes.
//! 2. If the device is connected, its node's shard is told over sharded pub/sub
//!    (`SPUBLISH pb:{n:NODE}:SHARD`), with the entry, the `seq` and the connection's
//!    `epoch`; a shard of the same node is told directly. The owner applies the entry to
//!    its cache and delivers. A message for an epoch that is not the live session's is
//!    ignored; a gap in `seq` makes the owner reload the device's list.
//! 3. A registration (CONNECT) runs one script that bumps `epoch`, writes the route and
//!    returns the pending list and `seq`: messages that arrive while it is in flight are
//!    held and applied after it by `seq`. So a notify routed to a node the device just
//!    left misses only a connection that is going, and its entry is in the list the new
//!    connection loads (autopush's race, designed out).
//! 4. An ACK drops the entries from the cache and from Redis; the session goes on once
//!    Redis confirmed the drop.
//! 5. The previous route, if it named another node or shard, gets a takeover message
//!    for its epoch: the older connection is closed (last registration wins across
//!    nodes).
//!
//! Broadcasts: one script raises the level, appends to the log and `PUBLISH`es on
//! `pb:bcast` in one atomic step, so every shard of every node receives the levels in
//! order; a shard that sees a gap (or resubscribes after a lost connection) reloads the
//! channel from the log.

mod node;
mod store;

pub(crate) use node::{ClusterShard, serve};
pub use store::ClusterStore;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::protocol::{Notification, Payload};
use crate::store::Metadata;
use crate::store::redis::{RedisConfig, Script};

/// How a node joins a service of many: the Redis they share and its own name there.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `redis://…` of the Redis the nodes share.
    pub redis_url: String,
    /// This node's id in route records and pub/sub channel names: unique per running
    /// process (a restarted node takes a new one, so routes to its previous life miss).
    pub node_id: String,
    /// Live notifications a broadcast channel keeps (`broadcast_backlog`).
    pub broadcast_backlog: usize,
    /// The client's timeouts and backoff.
    pub redis: RedisConfig,
}

impl ClusterConfig {
    /// A configuration for `redis_url` with a fresh node id.
    pub fn new(redis_url: &str, broadcast_backlog: usize) -> Self {
        Self {
            redis_url: redis_url.to_owned(),
            node_id: fresh_node_id(),
            broadcast_backlog: broadcast_backlog.max(1),
            redis: RedisConfig::default(),
        }
    }
}

/// A node id unique to this process: the host's name, the process id and the start time.
pub fn fresh_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(32)
        .collect();
    format!(
        "{host}-{:x}-{:x}",
        std::process::id(),
        micros & 0xff_ffff_ffff
    )
}

/// The pub/sub channel every shard of every node hears broadcasts on.
pub(crate) const BROADCAST_CHANNEL: &[u8] = b"pb:bcast";

/// The hash of live nodes.
pub(crate) const NODES_KEY: &[u8] = b"pb:{nodes}";

/// A node is listed by `/delivery-hosts` while its last heartbeat is this recent.
pub(crate) const NODE_TTL: Duration = Duration::from_secs(10);

/// How often a node refreshes its entry in [`NODES_KEY`].
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(2);

/// The pending list of (user, device). Ids are length-prefixed, so no device or user id,
/// braces and colons included, can make one key read as another.
pub(crate) fn pending_key(user: &str, device: &str) -> Vec<u8> {
    format!("pb:{{d:{}:{device}}}:u:{}:{user}", device.len(), user.len()).into_bytes()
}

/// The route record of a device.
pub(crate) fn route_key(device: &str) -> Vec<u8> {
    format!("pb:{{d:{}:{device}}}:r", device.len()).into_bytes()
}

/// A broadcast channel's level and log keys.
pub(crate) fn broadcast_keys(chan_hex: &str) -> (Vec<u8>, Vec<u8>) {
    (
        format!("pb:{{b:{chan_hex}}}:level").into_bytes(),
        format!("pb:{{b:{chan_hex}}}:log").into_bytes(),
    )
}

/// The sharded pub/sub channel of one shard of one node.
pub(crate) fn shard_channel(node: &str, shard: usize) -> Vec<u8> {
    format!("pb:{{n:{node}}}:{shard}").into_bytes()
}

/// A pending unicast notification as Redis keeps it: a JSON header the scripts read with
/// `cjson`, a newline, and the payload as received (never parsed by a script: a payload
/// nested deeper than `cjson` allows must not make a device's list unreadable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) head: EntryHead,
    pub(crate) payload: Payload,
}

/// An [`Entry`]'s header.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct EntryHead {
    /// Message id.
    pub(crate) id: String,
    /// App id.
    pub(crate) app: String,
    /// Expiry, in milliseconds since the epoch.
    pub(crate) exp: u64,
    /// Replace tag, `""` for none.
    pub(crate) tag: String,
}

impl Entry {
    pub(crate) fn encode(&self) -> Vec<u8> {
        // A struct of strings and a number: serializing cannot fail.
        let mut out = serde_json::to_vec(&self.head).unwrap_or_default();
        out.push(b'\n');
        out.extend_from_slice(self.payload.get().as_bytes());
        out
    }

    pub(crate) fn decode(raw: &[u8]) -> Option<Self> {
        let nl = raw.iter().position(|&b| b == b'\n')?;
        let head = serde_json::from_slice(&raw[..nl]).ok()?;
        let payload = Payload::from_json(std::str::from_utf8(&raw[nl + 1..]).ok()?).ok()?;
        Some(Self { head, payload })
    }

    /// The notification and metadata the store keeps for this entry.
    pub(crate) fn to_notification(&self) -> (Notification, Metadata) {
        let h = &self.head;
        (
            Notification::unicast(&h.app, &h.id, self.payload.clone()),
            Metadata {
                expiration: from_millis(h.exp),
                replace_tag: (!h.tag.is_empty()).then(|| std::sync::Arc::from(&*h.tag)),
            },
        )
    }
}

/// Milliseconds since the epoch (0 before it).
pub(crate) fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn from_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The scripts' reader of an [`Entry`]'s header: `head(raw)` is the decoded header, or
/// `nil` for an entry that does not parse (the scripts count it as expired).
macro_rules! lua_entry_head {
    () => {
        r#"
local function head(raw)
  local nl = string.find(raw, '\n', 1, true)
  if not nl then return nil end
  local ok, e = pcall(cjson.decode, string.sub(raw, 1, nl - 1))
  if ok and type(e) == 'table' and type(e.exp) == 'number' then return e end
  return nil
end
"#
    };
}

/// Applies the store rules of a notify to the device's list and appends; returns
/// `{0, newest_entry}` when the app has too many pending, else
/// `{1, seq, node, shard, epoch, mode}` (mode 0: appended, 1: the app's entries cleared
/// first, 2: entries with the same replace tag replaced).
///
/// KEYS: pending list, route. ARGV: now (ms), entry JSON, app, tag (`""`: none),
/// clear (`1`/`0`), max per app, the entry's expiry (ms), whether the list is the
/// device's own channel (`1`: only those bump the device's `seq`, as only they reach
/// its sessions). An entry that does not parse counts as expired.
pub(crate) static NOTIFY_LUA: &str = concat!(
    lua_entry_head!(),
    r#"
local now = tonumber(ARGV[1])
local app, tag, clear, max = ARGV[3], ARGV[4], ARGV[5] == '1', tonumber(ARGV[6])
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local live, for_app, replaceable, newest, expired = {}, 0, 0, false, false
for _, raw in ipairs(items) do
  local e = head(raw)
  if not e or e.exp < now then
    expired = true
  else
    live[#live + 1] = {raw, e}
    if e.app == app then
      for_app = for_app + 1
      newest = raw
      if tag ~= '' and e.tag == tag then replaceable = replaceable + 1 end
    end
  end
end
local mode = 0
if clear then mode = 1 elseif replaceable > 0 then mode = 2 elseif for_app >= max then
  return {0, newest}
end
local maxexp = tonumber(ARGV[7])
if mode == 0 and not expired then
  redis.call('RPUSH', KEYS[1], ARGV[2])
  for _, pair in ipairs(live) do if pair[2].exp > maxexp then maxexp = pair[2].exp end end
else
  local keep = {}
  for _, pair in ipairs(live) do
    local e = pair[2]
    local gone = e.app == app and (mode == 1 or (mode == 2 and e.tag == tag))
    if not gone then
      keep[#keep + 1] = pair[1]
      if e.exp > maxexp then maxexp = e.exp end
    end
  end
  keep[#keep + 1] = ARGV[2]
  redis.call('DEL', KEYS[1])
  for i = 1, #keep, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(keep, i, math.min(i + 999, #keep)))
  end
end
redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', maxexp + 1000))
local seq = 0
if ARGV[8] == '1' then seq = redis.call('HINCRBY', KEYS[2], 'seq', 1) end
local r = redis.call('HMGET', KEYS[2], 'node', 'shard', 'epoch')
if not r[1] then
  redis.call('PEXPIREAT', KEYS[2], string.format('%.0f', math.max(maxexp, now) + 86400000))
end
return {1, seq, r[1] or '', r[2] or '', r[3] or '', mode}
"#
);

/// Registers a connection: bumps the epoch, writes the route, returns
/// `{epoch, old_node, old_shard, old_epoch, seq, items}`.
///
/// KEYS: pending list, route. ARGV: node, shard.
pub(crate) static CLAIM_LUA: &str = r#"
local old = redis.call('HMGET', KEYS[2], 'node', 'shard', 'epoch')
local epoch = redis.call('HINCRBY', KEYS[2], 'epoch', 1)
redis.call('HSET', KEYS[2], 'node', ARGV[1], 'shard', ARGV[2])
redis.call('PERSIST', KEYS[2])
local seq = redis.call('HGET', KEYS[2], 'seq') or '0'
return {epoch, old[1] or '', old[2] or '', old[3] or '', seq, redis.call('LRANGE', KEYS[1], 0, -1)}
"#;

/// The device's `{seq, items}` (a resynchronisation). A route record that is gone (a
/// Redis that lost its data) is written again for the connection asking, so the device
/// stays reachable; one naming another connection is left alone.
///
/// KEYS: pending list, route. ARGV: node, shard, epoch.
pub(crate) static LOAD_LUA: &str = r#"
if not redis.call('HGET', KEYS[2], 'epoch') then
  redis.call('HSET', KEYS[2], 'node', ARGV[1], 'shard', ARGV[2], 'epoch', ARGV[3])
end
return {redis.call('HGET', KEYS[2], 'seq') or '0', redis.call('LRANGE', KEYS[1], 0, -1)}
"#;

/// Removes the route if it is still the connection's (its epoch); 1 if it did.
///
/// KEYS: route. ARGV: epoch.
pub(crate) static RELEASE_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] and redis.call('HEXISTS', KEYS[1], 'node') == 1 then
  redis.call('HDEL', KEYS[1], 'node', 'shard')
  redis.call('PEXPIRE', KEYS[1], 86400000)
  return 1
end
return 0
"#;

/// Drops the entries with the given message ids (and the expired ones); how many went.
///
/// KEYS: pending list. ARGV: now (ms), message ids.
pub(crate) static DROP_LUA: &str = concat!(
    lua_entry_head!(),
    r#"
local now = tonumber(ARGV[1])
local ids = {}
for i = 2, #ARGV do ids[ARGV[i]] = true end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
local keep = {}
for _, raw in ipairs(items) do
  local e = head(raw)
  if e and not ids[e.id] and e.exp >= now then keep[#keep + 1] = raw end
end
if #keep < #items then
  redis.call('DEL', KEYS[1])
  for i = 1, #keep, 1000 do
    redis.call('RPUSH', KEYS[1], unpack(keep, i, math.min(i + 999, #keep)))
  end
end
return #items - #keep
"#
);

/// Appends a broadcast: raises the level, logs it, trims the log to the backlog and
/// publishes it, in one atomic step (so subscribers get the levels in order); the level.
///
/// A level at or below the caller's own top (a Redis that lost its data) is raised past
/// it, so no shard takes the new one for one it has.
///
/// KEYS: level, log. ARGV: backlog, expiry (ms), payload, pub/sub channel, the caller's
/// top level.
pub(crate) static BROADCAST_LUA: &str = r#"
local level = redis.call('INCR', KEYS[1])
local top = tonumber(ARGV[5])
if level <= top then
  level = top + 1
  redis.call('SET', KEYS[1], string.format('%.0f', level))
end
local entry = level .. ' ' .. ARGV[2] .. ' ' .. ARGV[3]
redis.call('RPUSH', KEYS[2], entry)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[1]), -1)
redis.call('PUBLISH', ARGV[4], entry)
return level
"#;

/// A broadcast channel's `{level, entries}`. A level below the caller's own (a Redis
/// that lost its data) is raised to it first, so the sequence never goes back while a
/// node remembers it.
///
/// KEYS: level, log. ARGV: the caller's top level.
pub(crate) static BROADCAST_STATE_LUA: &str = r#"
local level = tonumber(redis.call('GET', KEYS[1]) or '0')
local top = tonumber(ARGV[1])
if top > level then
  redis.call('SET', KEYS[1], ARGV[1])
  level = top
end
return {level, redis.call('LRANGE', KEYS[2], 0, -1)}
"#;

/// The scripts of one shard's client (each keeps its SHA once loaded).
#[derive(Debug)]
pub(crate) struct Scripts {
    pub(crate) notify: Script,
    pub(crate) claim: Script,
    pub(crate) load: Script,
    pub(crate) release: Script,
    pub(crate) drop: Script,
    pub(crate) broadcast: Script,
    pub(crate) broadcast_state: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Self {
            notify: Script::new(NOTIFY_LUA),
            claim: Script::new(CLAIM_LUA),
            load: Script::new(LOAD_LUA),
            release: Script::new(RELEASE_LUA),
            drop: Script::new(DROP_LUA),
            broadcast: Script::new(BROADCAST_LUA),
            broadcast_state: Script::new(BROADCAST_STATE_LUA),
        }
    }
}

/// A broadcast log entry, `LEVEL EXPIRY_MS PAYLOAD`.
pub(crate) fn parse_broadcast(entry: &[u8]) -> Option<(i64, SystemTime, Payload)> {
    let text = std::str::from_utf8(entry).ok()?;
    let mut parts = text.splitn(3, ' ');
    let level = parts.next()?.parse().ok()?;
    let exp = parts.next()?.parse().ok()?;
    let payload = Payload::from_json(parts.next()?).ok()?;
    Some((level, from_millis(exp), payload))
}

/// What one node tells a shard of another (or of itself) over pub/sub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ShardMessage {
    /// A notify was stored for `device`'s connection `epoch` as its `seq`-th; `mode` as
    /// [`NOTIFY_LUA`] returns it.
    Deliver {
        epoch: u64,
        seq: u64,
        mode: u8,
        user: String,
        device: String,
        entry: Vec<u8>,
    },
    /// Connection `epoch` of `device` (or an older one) was taken over: close it.
    Kick { epoch: u64, device: String },
}

impl ShardMessage {
    /// `D EPOCH SEQ MODE ULEN DLEN USER DEVICE ENTRY` or `K EPOCH DLEN DEVICE`.
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            ShardMessage::Deliver {
                epoch,
                seq,
                mode,
                user,
                device,
                entry,
            } => {
                let mut out = format!(
                    "D {epoch} {seq} {mode} {} {} {user}{device}",
                    user.len(),
                    device.len()
                )
                .into_bytes();
                out.extend_from_slice(entry);
                out
            }
            ShardMessage::Kick { epoch, device } => {
                format!("K {epoch} {} {device}", device.len()).into_bytes()
            }
        }
    }

    pub(crate) fn decode(msg: &[u8]) -> Option<Self> {
        let mut at = 0;
        let mut word = || -> Option<&[u8]> {
            let rest = msg.get(at..)?;
            let end = rest.iter().position(|&b| b == b' ')?;
            at += end + 1;
            Some(&rest[..end])
        };
        let num = |w: &[u8]| -> Option<u64> { std::str::from_utf8(w).ok()?.parse().ok() };
        match word()? {
            b"D" => {
                let epoch = num(word()?)?;
                let seq = num(word()?)?;
                let mode = u8::try_from(num(word()?)?).ok()?;
                let ulen = usize::try_from(num(word()?)?).ok()?;
                let dlen = usize::try_from(num(word()?)?).ok()?;
                let rest = msg.get(at..)?;
                let user = std::str::from_utf8(rest.get(..ulen)?).ok()?.to_owned();
                let device = std::str::from_utf8(rest.get(ulen..ulen.checked_add(dlen)?)?)
                    .ok()?
                    .to_owned();
                let entry = rest.get(ulen + dlen..)?.to_vec();
                Some(ShardMessage::Deliver {
                    epoch,
                    seq,
                    mode,
                    user,
                    device,
                    entry,
                })
            }
            b"K" => {
                let epoch = num(word()?)?;
                let dlen = usize::try_from(num(word()?)?).ok()?;
                let rest = msg.get(at..)?;
                if rest.len() != dlen {
                    return None;
                }
                let device = std::str::from_utf8(rest).ok()?.to_owned();
                Some(ShardMessage::Kick { epoch, device })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn shard_messages_round_trip_whatever_the_ids_hold() {
        for msg in [
            ShardMessage::Deliver {
                epoch: 7,
                seq: 42,
                mode: 2,
                user: "u 1".into(),
                device: "d 1}{".into(),
                entry: b"{\"id\":\"m\"}\nnull".to_vec(),
            },
            ShardMessage::Kick {
                epoch: 3,
                device: "dev with spaces".into(),
            },
        ] {
            assert_eq!(ShardMessage::decode(&msg.encode()), Some(msg));
        }
    }

    #[test]
    fn malformed_shard_messages_are_refused() {
        for bad in [
            &b""[..],
            b"X 1",
            b"D 1 2",
            b"D 1 2 3 10 10 short",
            b"K 1 5 abc",
            b"K x 3 abc",
            b"D 1 2 300 1 1 ab{}",
            b"D 1 2 0 18446744073709551615 1 ab",
        ] {
            assert_eq!(ShardMessage::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn broadcast_entries_parse_and_garbage_does_not() {
        let (level, exp, payload) = parse_broadcast(br#"12 1700000000000 {"a": 1}"#).unwrap();
        assert_eq!(level, 12);
        assert_eq!(millis(exp), 1_700_000_000_000);
        assert_eq!(payload.get(), r#"{"a": 1}"#);
        assert!(parse_broadcast(b"x 1 {}").is_none());
        assert!(parse_broadcast(b"1 1 {").is_none());
        assert!(parse_broadcast(b"1").is_none());
    }

    #[test]
    fn keys_of_a_device_share_one_hash_tag() {
        let tag = |k: &[u8]| {
            let s = String::from_utf8(k.to_vec()).unwrap();
            let open = s.find('{').unwrap();
            let close = s[open..].find('}').unwrap() + open;
            s[open + 1..close].to_owned()
        };
        assert_eq!(tag(&pending_key("u", "dev")), tag(&route_key("dev")));
        // Ids with braces and colons cannot make one key another's.
        assert_ne!(route_key("a}:u:x"), pending_key("x}:r", "a"));
        assert_eq!(tag(&route_key("a}b")), tag(&pending_key("zz", "a}b")));
        let (level, log) = broadcast_keys("0");
        assert_eq!(tag(&level), tag(&log));
    }
}
