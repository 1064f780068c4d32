//! The server's configuration: a JSON object with the original Ubuntu Push server's keys,
//! durations in Go's syntax, read and validated once at startup into a [`ServerConfig`].
//!
//! Every key is optional: a missing key takes its default, and an unknown key is an error
//! naming it ([`ConfigError::UnknownKey`]), so a typo never passes silently. A value of the
//! wrong type or out of range is an error naming the key ([`ConfigError::InvalidValue`]).
//! The defaults ship as [`DEFAULT_CONFIG_JSON`] (`config/default.json`).
//!
//! # Reference
//!
//! | Key | Type | Default | Meaning |
//! |-----|------|---------|---------|
//! | `addr` | `"host:port"` | `"127.0.0.1:9090"` | Where devices connect. Port `0` picks a free port (the bound address is logged). |
//! | `exchange_timeout` | duration | `"5s"` | How long a device has to answer one exchange (a PING's PONG, a BROADCAST's ACK); also, each on its own, the TLS handshake, the version byte with CONNECT, and the write of CONNACK. |
//! | `ping_interval` | duration | `"10s"` | Idle time after which the server PINGs a device; the server is never silent longer than this. |
//! | `session_queue_size` | integer ≥ 1 | `10` | Exchanges a session may have queued towards its device; a full queue coalesces instead of blocking the shard. |
//! | `broker_queue_size` | integer ≥ 1 | `10000` | Requests a shard's inbox may hold; when an owner's inbox is full the HTTP API answers 503 `unavailable`. |
//! | `key_pem_file` | path | none | TLS private key (PEM). Relative to the config file's folder. Set with `cert_pem_file` or not at all; without both, devices speak plain TCP. |
//! | `cert_pem_file` | path | none | TLS certificate chain (PEM). Relative to the config file's folder. Set with `key_pem_file` or not at all. |
//! | `http_addr` | `"host:port"` | `"127.0.0.1:8080"` | Where the HTTP API for application servers listens. Port `0` picks a free port. It must not share a port with `addr`, and neither may be in use already (checked by `Server::start`). |
//! | `http_read_timeout` | duration | `"5s"` | Longest time to read one HTTP request. |
//! | `http_write_timeout` | duration | `"5s"` | Longest time to write one HTTP response. |
//! | `max_notifications_per_app` | integer ≥ 1 | `100` | Live notifications an application may have pending for one device; beyond it a notify answers 413 `too-many-pending`. |
//! | `broadcast_backlog` | integer 1 to 100,000 | `1000` | Live notifications a broadcast channel keeps; appending beyond it drops the oldest (levels keep counting, so a device further behind gets the newest ones). Bounds what catch-up can hold. |
//! | `max_sessions` | integer | `0` | Device connections the server holds at once, all shards together (a connection counts from its accept). Each shard holds a part and shards lend each other room by message: a connection past its shard's part waits while the shard asks a peer (a message each way), at most `exchange_timeout`, and is closed without being counted if no room comes in that time or the server stops; a peer that does not answer within 2 s counts as full. A connection that finds its shard without room and every peer full (the server holds `max_sessions`, give or take the messages in flight) is closed, counted (`pushbroker_rejected_device_connections_total`) and logged (WARN, at most every 10 s). `0` means the open-files limit less `max_http_connections` and `reserved_descriptors`, so devices can never take the descriptors the HTTP API needs. |
//! | `max_http_connections` | integer ≥ 1 | `512` | HTTP connections the server holds at once (split over the shards), refused the same way beyond it (`pushbroker_rejected_http_connections_total`). |
//! | `reserved_descriptors` | integer | `128` | Descriptors kept out of `max_sessions`' default for everything else the process opens. |
//! | `delivery_domain` | string | `""` | The `domain` that `/delivery-hosts` returns; empty for none. |
//! | `shards` | integer | `0` | Broker shards (one thread each); `0` means one per available CPU. |
//! | `statistics_auth_user` | string | none | User for the statistics endpoint's basic auth. Set with `statistics_auth_password` or not at all; without both, statistics need no auth. |
//! | `statistics_auth_password` | string | none | Password for the statistics endpoint's basic auth. |
//! | `data_dir` | path | none (the shipped `config/default.json`: `"pushbroker-data"`) | Where each shard keeps its log of store operations, so pending notifications, broadcast levels and message ids survive a crash and a restart. Relative to the config file's folder (for the embedded default: the working directory). Without it everything is kept in memory only, as in the original server. |
//! | `durability` | `"sync"` or `"relaxed"` | `"sync"` | With `data_dir`: `sync` answers `/notify` and `/broadcast` (and lets a session go on after an ACK) only once the operation is on disk, many requests sharing one `fdatasync`; `relaxed` answers at once and syncs every `fsync_interval`, so a machine crash loses at most that much. |
//! | `fsync_interval` | duration | `"10ms"` | With `durability: "relaxed"`: how often the log is written and synced. |
//! | `redis_url` | `"redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]"` | none | Makes the server one node of a service of many sharing this Redis (7 or later): pending notifications, broadcast levels and payloads, and which node each device is connected to live there; a notify or broadcast through any node reaches devices on every node, and `/delivery-hosts` lists every live node. Not with `data_dir` (Redis is then the store: its own persistence settings decide what survives). Absent: a single node, as without it. |
//! | `node_id` | string | host name, process id and start time | With `redis_url`: this node's name in route records and pub/sub channels. Must be unique among running nodes; a restarted node should take a new one (the default does). |
//!
//! Durations are Go duration strings ([`parse_go_duration`]): `"500ms"`, `"0.5s"`,
//! `"1m30s"`; they must be longer than zero. A `"host:port"` is what Go's
//! `net.SplitHostPort` accepts with a numeric port: `"127.0.0.1:9090"`, `":9090"` (every
//! interface), `"[::1]:9090"`. For the optional keys (the pem files and the statistics
//! credentials), `null` or `""` is the same as leaving the key out.
//!
//! # Example
//!
//! ```
//! use std::path::Path;
//! use std::time::Duration;
//! use pushbroker::config::ServerConfig;
//!
//! let config = ServerConfig::from_json(
//!     r#"{"addr": ":0", "ping_interval": "1m30s", "key_pem_file": "tls/key.pem",
//!         "cert_pem_file": "/etc/push/cert.pem"}"#,
//!     Path::new("/etc/push"),
//! )?;
//! assert_eq!(config.ping_interval, Duration::from_secs(90));
//! assert_eq!(config.key_pem_file.as_deref(), Some(Path::new("/etc/push/tls/key.pem")));
//! assert!(config.tls_enabled());
//! assert_eq!(config.http_addr, "127.0.0.1:8080"); // a default
//! # Ok::<(), pushbroker::config::ConfigError>(())
//! ```

mod duration;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};
use thiserror::Error;

pub use duration::{DurationError, format_go_duration, parse_go_duration};

/// The default configuration as shipped (`config/default.json`): devices on
/// `127.0.0.1:9090` over plain TCP, the HTTP API on `127.0.0.1:8080`, every other key at
/// its default. It agrees with [`ServerConfig::default`].
pub const DEFAULT_CONFIG_JSON: &str = include_str!("../../config/default.json");

/// Every key the configuration accepts.
const KNOWN_KEYS: &[&str] = &[
    "addr",
    "exchange_timeout",
    "ping_interval",
    "session_queue_size",
    "broker_queue_size",
    "key_pem_file",
    "cert_pem_file",
    "http_addr",
    "http_read_timeout",
    "http_write_timeout",
    "max_notifications_per_app",
    "broadcast_backlog",
    "max_sessions",
    "max_http_connections",
    "reserved_descriptors",
    "delivery_domain",
    "shards",
    "statistics_auth_user",
    "statistics_auth_password",
    "data_dir",
    "durability",
    "fsync_interval",
    "redis_url",
    "node_id",
];

/// The server's configuration, validated: see the [module docs](self) for the reference
/// table. Build it with [`ServerConfig::load`] or [`ServerConfig::from_json`]; fields are
/// public so tests can adjust a default.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Device listener address, `host:port` (`addr`); port `0` picks a free port.
    /// Kept as text because the host may be a name; validated as host and numeric port.
    pub addr: String,
    /// Time a device has for one exchange, and for TLS handshake plus CONNECT/CONNACK
    /// (`exchange_timeout`).
    pub exchange_timeout: Duration,
    /// Idle time before the server PINGs a device (`ping_interval`).
    pub ping_interval: Duration,
    /// Exchanges a session may have queued towards its device (`session_queue_size`).
    /// Bounded so a slow device costs only its own session.
    pub session_queue_size: usize,
    /// Requests a shard's inbox may hold (`broker_queue_size`); a full inbox makes the
    /// API answer 503 rather than block an executor.
    pub broker_queue_size: usize,
    /// TLS private key, PEM (`key_pem_file`), already resolved against the config file's
    /// folder. Set exactly when [`cert_pem_file`](Self::cert_pem_file) is.
    pub key_pem_file: Option<PathBuf>,
    /// TLS certificate chain, PEM (`cert_pem_file`), already resolved against the config
    /// file's folder. Set exactly when [`key_pem_file`](Self::key_pem_file) is.
    pub cert_pem_file: Option<PathBuf>,
    /// HTTP API listener address, `host:port` (`http_addr`); port `0` picks a free port.
    pub http_addr: String,
    /// Longest time to read one HTTP request (`http_read_timeout`).
    pub http_read_timeout: Duration,
    /// Longest time to write one HTTP response (`http_write_timeout`).
    pub http_write_timeout: Duration,
    /// Live notifications an application may have pending for one device
    /// (`max_notifications_per_app`); beyond it a notify answers 413.
    pub max_notifications_per_app: usize,
    /// Live notifications a broadcast channel keeps; the oldest go beyond it
    /// (`broadcast_backlog`).
    pub broadcast_backlog: usize,
    /// Device connections held at once (`max_sessions`); `0` derives it from the
    /// open-files limit: use [`ServerConfig::session_limit`].
    pub max_sessions: usize,
    /// HTTP connections held at once (`max_http_connections`).
    pub max_http_connections: usize,
    /// Descriptors kept out of the derived `max_sessions` (`reserved_descriptors`).
    pub reserved_descriptors: usize,
    /// The `domain` that `/delivery-hosts` returns; empty for none (`delivery_domain`).
    pub delivery_domain: String,
    /// Broker shards, one thread each; `0` means one per available CPU (`shards`). Use
    /// [`ServerConfig::shard_count`] for the resolved number.
    pub shards: usize,
    /// Basic-auth user for the statistics endpoint (`statistics_auth_user`). Set exactly
    /// when [`statistics_auth_password`](Self::statistics_auth_password) is.
    pub statistics_auth_user: Option<String>,
    /// Basic-auth password for the statistics endpoint (`statistics_auth_password`).
    /// Redacted from `Debug` output so it never reaches a log.
    pub statistics_auth_password: Option<String>,
    /// Where the shards keep their logs (`data_dir`), already resolved against the config
    /// file's folder; `None` keeps everything in memory.
    pub data_dir: Option<PathBuf>,
    /// When a change is acknowledged, with `data_dir` (`durability`, `fsync_interval`).
    pub durability: crate::store::Durability,
    /// The Redis shared by the nodes of a service of many (`redis_url`); `None`: a
    /// single node.
    pub redis_url: Option<String>,
    /// This node's id with `redis_url` (`node_id`); `None`: made up at start.
    pub node_id: Option<String>,
}

/// Default for `addr`.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9090";
/// Default for `http_addr`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
/// Default for `exchange_timeout`.
pub const DEFAULT_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for `ping_interval`.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(10);
/// Default for `session_queue_size`.
pub const DEFAULT_SESSION_QUEUE_SIZE: usize = 10;
/// Default for `broker_queue_size`.
pub const DEFAULT_BROKER_QUEUE_SIZE: usize = 10_000;
/// Default for `http_read_timeout` and `http_write_timeout`.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for `max_notifications_per_app`.
pub const DEFAULT_MAX_NOTIFICATIONS_PER_APP: usize = 100;
/// Default for `broadcast_backlog` (the in-memory store's own default).
pub use crate::store::DEFAULT_BROADCAST_BACKLOG;
/// Default for `max_http_connections`.
pub const DEFAULT_MAX_HTTP_CONNECTIONS: usize = 512;
/// Default for `reserved_descriptors`.
pub const DEFAULT_RESERVED_DESCRIPTORS: usize = 128;
/// The largest `broadcast_backlog`.
pub const MAX_BROADCAST_BACKLOG: usize = 100_000;
/// Default for `fsync_interval`.
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(10);
/// The `data_dir` of the shipped `config/default.json` (the embedded default).
pub const DEFAULT_DATA_DIR: &str = "pushbroker-data";

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR.to_owned(),
            exchange_timeout: DEFAULT_EXCHANGE_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            session_queue_size: DEFAULT_SESSION_QUEUE_SIZE,
            broker_queue_size: DEFAULT_BROKER_QUEUE_SIZE,
            key_pem_file: None,
            cert_pem_file: None,
            http_addr: DEFAULT_HTTP_ADDR.to_owned(),
            http_read_timeout: DEFAULT_HTTP_TIMEOUT,
            http_write_timeout: DEFAULT_HTTP_TIMEOUT,
            max_notifications_per_app: DEFAULT_MAX_NOTIFICATIONS_PER_APP,
            broadcast_backlog: DEFAULT_BROADCAST_BACKLOG,
            max_sessions: 0,
            max_http_connections: DEFAULT_MAX_HTTP_CONNECTIONS,
            reserved_descriptors: DEFAULT_RESERVED_DESCRIPTORS,
            delivery_domain: String::new(),
            shards: 0,
            statistics_auth_user: None,
            statistics_auth_password: None,
            data_dir: None,
            durability: crate::store::Durability::Sync,
            redis_url: None,
            node_id: None,
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("addr", &self.addr)
            .field("exchange_timeout", &self.exchange_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("session_queue_size", &self.session_queue_size)
            .field("broker_queue_size", &self.broker_queue_size)
            .field("key_pem_file", &self.key_pem_file)
            .field("cert_pem_file", &self.cert_pem_file)
            .field("http_addr", &self.http_addr)
            .field("http_read_timeout", &self.http_read_timeout)
            .field("http_write_timeout", &self.http_write_timeout)
            .field("max_notifications_per_app", &self.max_notifications_per_app)
            .field("broadcast_backlog", &self.broadcast_backlog)
            .field("max_sessions", &self.max_sessions)
            .field("max_http_connections", &self.max_http_connections)
            .field("reserved_descriptors", &self.reserved_descriptors)
            .field("delivery_domain", &self.delivery_domain)
            .field("shards", &self.shards)
            .field("statistics_auth_user", &self.statistics_auth_user)
            .field(
                "statistics_auth_password",
                &self.statistics_auth_password.as_ref().map(|_| "<redacted>"),
            )
            .field("data_dir", &self.data_dir)
            // The URL as the client shows it: never its password.
            .field(
                "redis_url",
                &self.redis_url.as_deref().map(|u| {
                    crate::store::redis::RedisUrl::parse(u)
                        .map_or_else(|_| "(invalid)".to_owned(), |u| u.to_string())
                }),
            )
            .field("node_id", &self.node_id)
            .field("durability", &self.durability)
            .finish()
    }
}

impl ServerConfig {
    /// Parses a configuration from JSON text; relative `key_pem_file` and `cert_pem_file`
    /// paths are resolved against `base_dir` (normally the config file's folder).
    /// Missing keys take their defaults.
    ///
    /// # Errors
    /// [`ConfigError::Json`] if the text is not a JSON object,
    /// [`ConfigError::UnknownKey`] for a key the server does not know,
    /// [`ConfigError::InvalidValue`] for a value of the wrong type or out of range, and
    /// [`ConfigError::Missing`] when only one key of a pair is set.
    pub fn from_json(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let map: Map<String, Value> = serde_json::from_str(text).map_err(ConfigError::Json)?;
        if let Some(key) = map.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
            return Err(ConfigError::UnknownKey(key.clone()));
        }
        let keys = Keys(&map);
        let resolve = |path: PathBuf| {
            if path.is_relative() {
                base_dir.join(path)
            } else {
                path
            }
        };
        let (key_pem_file, cert_pem_file) = keys.pair("key_pem_file", "cert_pem_file")?;
        keys.duration("fsync_interval", DEFAULT_FSYNC_INTERVAL)?;
        let (statistics_auth_user, statistics_auth_password) =
            keys.pair("statistics_auth_user", "statistics_auth_password")?;
        Self {
            addr: keys.host_port("addr", DEFAULT_ADDR)?,
            exchange_timeout: keys.duration("exchange_timeout", DEFAULT_EXCHANGE_TIMEOUT)?,
            ping_interval: keys.duration("ping_interval", DEFAULT_PING_INTERVAL)?,
            session_queue_size: keys.count("session_queue_size", DEFAULT_SESSION_QUEUE_SIZE, 1)?,
            broker_queue_size: keys.count("broker_queue_size", DEFAULT_BROKER_QUEUE_SIZE, 1)?,
            key_pem_file: key_pem_file.map(|p| resolve(PathBuf::from(p))),
            cert_pem_file: cert_pem_file.map(|p| resolve(PathBuf::from(p))),
            http_addr: keys.host_port("http_addr", DEFAULT_HTTP_ADDR)?,
            http_read_timeout: keys.duration("http_read_timeout", DEFAULT_HTTP_TIMEOUT)?,
            http_write_timeout: keys.duration("http_write_timeout", DEFAULT_HTTP_TIMEOUT)?,
            max_notifications_per_app: keys.count(
                "max_notifications_per_app",
                DEFAULT_MAX_NOTIFICATIONS_PER_APP,
                1,
            )?,
            broadcast_backlog: keys.count("broadcast_backlog", DEFAULT_BROADCAST_BACKLOG, 1)?,
            max_sessions: keys.count("max_sessions", 0, 0)?,
            max_http_connections: keys.count(
                "max_http_connections",
                DEFAULT_MAX_HTTP_CONNECTIONS,
                1,
            )?,
            reserved_descriptors: keys.count(
                "reserved_descriptors",
                DEFAULT_RESERVED_DESCRIPTORS,
                0,
            )?,
            delivery_domain: keys.string("delivery_domain")?.unwrap_or_default(),
            shards: keys.count("shards", 0, 0)?,
            statistics_auth_user,
            statistics_auth_password,
            data_dir: keys.string("data_dir")?.map(|p| resolve(PathBuf::from(p))),
            redis_url: keys.optional_string("redis_url")?,
            node_id: keys.optional_string("node_id")?,
            durability: match keys.string("durability")?.as_deref() {
                None | Some("sync") => crate::store::Durability::Sync,
                Some("relaxed") => crate::store::Durability::Relaxed(
                    keys.duration("fsync_interval", DEFAULT_FSYNC_INTERVAL)?,
                ),
                Some(other) => {
                    return Err(Keys::invalid(
                        "durability",
                        format!("expected \"sync\" or \"relaxed\", found {other:?}"),
                    ));
                }
            },
        }
        .validated()
    }

    fn validated(self) -> Result<Self, ConfigError> {
        self.validate()?;
        Ok(self)
    }

    /// Checks a configuration by the rules [`ServerConfig::from_json`] applies to a file,
    /// so one built in code is held to them too ([`Server::start`] calls this):
    /// addresses are `host:port` and not the same one, durations are longer than zero,
    /// the counts meet their minimum, and the pem files and the statistics credentials
    /// come in pairs.
    ///
    /// [`Server::start`]: crate::server::Server::start
    ///
    /// # Errors
    /// The first rule broken, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::InvalidValue {
            key: key.to_owned(),
            reason,
        };
        for (key, text) in [("addr", &self.addr), ("http_addr", &self.http_addr)] {
            check_host_port(text).map_err(|reason| invalid(key, format!("{text:?}: {reason}")))?;
        }
        if self.addr == self.http_addr && !self.addr.ends_with(":0") {
            return Err(invalid(
                "http_addr",
                format!(
                    "{:?} is also addr: addr and http_addr must be different ports",
                    self.http_addr
                ),
            ));
        }
        for (key, d) in [
            ("exchange_timeout", self.exchange_timeout),
            ("ping_interval", self.ping_interval),
            ("http_read_timeout", self.http_read_timeout),
            ("http_write_timeout", self.http_write_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be longer than zero".to_owned()));
            }
        }
        for (key, n) in [
            ("session_queue_size", self.session_queue_size),
            ("broker_queue_size", self.broker_queue_size),
            ("max_notifications_per_app", self.max_notifications_per_app),
            ("broadcast_backlog", self.broadcast_backlog),
            ("max_http_connections", self.max_http_connections),
        ] {
            if n < 1 {
                return Err(invalid(key, format!("must be at least 1, found {n}")));
            }
        }
        // A broadcast channel's backlog is one record of the durable log (a snapshot),
        // whose length must fit its 32-bit frame: 100,000 bodies of the API's largest
        // size stay far below 4 GiB.
        if self.broadcast_backlog > MAX_BROADCAST_BACKLOG {
            return Err(invalid(
                "broadcast_backlog",
                format!(
                    "must be at most {MAX_BROADCAST_BACKLOG}, found {}",
                    self.broadcast_backlog
                ),
            ));
        }
        if let Some(url) = &self.redis_url {
            crate::store::redis::RedisUrl::parse(url)
                .map_err(|e| invalid("redis_url", e.to_string()))?;
            if self.data_dir.is_some() {
                return Err(invalid(
                    "redis_url",
                    "not with data_dir: with redis_url the nodes keep their state in Redis; \
                     remove data_dir"
                        .to_owned(),
                ));
            }
        }
        if let Some(id) = &self.node_id
            && (id.is_empty()
                || id.len() > 128
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}'))
        {
            return Err(invalid(
                "node_id",
                format!("{id:?}: 1 to 128 printable ASCII characters, no spaces or braces"),
            ));
        }
        let missing = |key: &str, with: &str| ConfigError::Missing {
            key: key.to_owned(),
            with: with.to_owned(),
        };
        match (&self.key_pem_file, &self.cert_pem_file) {
            (Some(_), None) => return Err(missing("cert_pem_file", "key_pem_file")),
            (None, Some(_)) => return Err(missing("key_pem_file", "cert_pem_file")),
            _ => {}
        }
        match (&self.statistics_auth_user, &self.statistics_auth_password) {
            (Some(_), None) => {
                return Err(missing("statistics_auth_password", "statistics_auth_user"));
            }
            (None, Some(_)) => {
                return Err(missing("statistics_auth_user", "statistics_auth_password"));
            }
            _ => {}
        }
        Ok(())
    }

    /// Reads and parses the configuration file at `path`; relative pem paths in it are
    /// resolved against the file's folder. This does blocking file I/O: call it at
    /// startup, not on a shard.
    ///
    /// # Errors
    /// [`ConfigError::Io`] (with `path`) if the file cannot be read, otherwise as
    /// [`ServerConfig::from_json`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = path.parent().unwrap_or_else(|| Path::new(""));
        Self::from_json(&text, base_dir)
    }

    /// The configuration in [`DEFAULT_CONFIG_JSON`]: [`ServerConfig::default`] (the
    /// original's keys, everything in memory) with a `data_dir`,
    /// [`DEFAULT_DATA_DIR`] in the working directory. A unit test holds them together.
    pub fn embedded_default() -> Self {
        // The embedded file is tested to parse; should it ever fail, the built-in
        // defaults are the same values.
        Self::from_json(DEFAULT_CONFIG_JSON, Path::new("")).unwrap_or_else(|_| Self {
            data_dir: Some(PathBuf::from(DEFAULT_DATA_DIR)),
            ..Self::default()
        })
    }

    /// Whether devices connect over TLS: both pem files are set.
    pub fn tls_enabled(&self) -> bool {
        self.key_pem_file.is_some() && self.cert_pem_file.is_some()
    }

    /// The device connections to hold at once: [`max_sessions`](Self::max_sessions), or
    /// when that is `0`, the process's open-files limit (`RLIMIT_NOFILE`, soft) less
    /// [`max_http_connections`](Self::max_http_connections) and
    /// [`reserved_descriptors`](Self::reserved_descriptors); at least 1.
    pub fn session_limit(&self) -> usize {
        if self.max_sessions > 0 {
            return self.max_sessions;
        }
        let files = open_files_limit().unwrap_or(1024);
        files
            .saturating_sub(self.max_http_connections)
            .saturating_sub(self.reserved_descriptors)
            .max(1)
    }

    /// The number of broker shards to run: [`shards`](Self::shards), or when that is `0`,
    /// the available parallelism (at least 1).
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }
    }
}

/// Why a configuration was refused. Branch on the variants or the `is_*` predicates; the
/// `Display` text is for people.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is not a JSON object (malformed JSON, or another JSON value);
    /// the source has the line and column.
    #[error("configuration is not a valid JSON object")]
    Json(#[source] serde_json::Error),
    /// A key the server does not know, such as a misspelt one.
    #[error("unknown configuration key {0:?}")]
    UnknownKey(String),
    /// A key's value has the wrong type or is out of range.
    #[error("invalid value for configuration key {key:?}: {reason}")]
    InvalidValue {
        /// The key.
        key: String,
        /// What is wrong with the value.
        reason: String,
    },
    /// One key of a both-or-neither pair is set without the other.
    #[error("configuration key {key:?} is missing: it is required when {with:?} is set")]
    Missing {
        /// The key that is missing.
        key: String,
        /// The key that is set and needs it.
        with: String,
    },
}

impl ConfigError {
    /// Whether the configuration file could not be read.
    pub fn is_io(&self) -> bool {
        matches!(self, Self::Io { .. })
    }

    /// Whether the text is not a JSON object.
    pub fn is_json(&self) -> bool {
        matches!(self, Self::Json(_))
    }

    /// Whether a key is unknown.
    pub fn is_unknown_key(&self) -> bool {
        matches!(self, Self::UnknownKey(_))
    }

    /// Whether a value has the wrong type or is out of range.
    pub fn is_invalid_value(&self) -> bool {
        matches!(self, Self::InvalidValue { .. })
    }

    /// Whether one key of a pair is set without the other.
    pub fn is_missing(&self) -> bool {
        matches!(self, Self::Missing { .. })
    }

    /// The configuration key the error is about: the unknown, invalid or missing key.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::UnknownKey(key) | Self::InvalidValue { key, .. } | Self::Missing { key, .. } => {
                Some(key)
            }
            Self::Io { .. } | Self::Json(_) => None,
        }
    }
}

/// Typed reads of the configuration object's keys, each error naming its key.
struct Keys<'a>(&'a Map<String, Value>);

impl Keys<'_> {
    fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }

    /// A string value; `None` when the key is absent.
    fn string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(Self::invalid(
                key,
                format!("expected a string, found {}", kind(other)),
            )),
        }
    }

    /// An optional string: absent, `null` and `""` all mean "not set".
    fn optional_string(&self, key: &str) -> Result<Option<String>, ConfigError> {
        if matches!(self.0.get(key), Some(Value::Null)) {
            return Ok(None);
        }
        Ok(self.string(key)?.filter(|s| !s.is_empty()))
    }

    /// Two optional strings that must be set together.
    fn pair(
        &self,
        first: &str,
        second: &str,
    ) -> Result<(Option<String>, Option<String>), ConfigError> {
        let a = self.optional_string(first)?;
        let b = self.optional_string(second)?;
        let missing = |key: &str, with: &str| ConfigError::Missing {
            key: key.to_owned(),
            with: with.to_owned(),
        };
        match (&a, &b) {
            (Some(_), None) => Err(missing(second, first)),
            (None, Some(_)) => Err(missing(first, second)),
            _ => Ok((a, b)),
        }
    }

    /// A `host:port` address.
    fn host_port(&self, key: &str, default: &str) -> Result<String, ConfigError> {
        let Some(text) = self.string(key)? else {
            return Ok(default.to_owned());
        };
        check_host_port(&text)
            .map_err(|reason| Self::invalid(key, format!("{text:?}: {reason}")))?;
        Ok(text)
    }

    /// A Go duration string, longer than zero.
    fn duration(&self, key: &str, default: Duration) -> Result<Duration, ConfigError> {
        let text = match self.0.get(key) {
            None => return Ok(default),
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(Self::invalid(
                    key,
                    format!(
                        "expected a duration string such as \"10s\", found {}",
                        kind(other)
                    ),
                ));
            }
        };
        let d = parse_go_duration(text).map_err(|e| Self::invalid(key, e.to_string()))?;
        if d.is_zero() {
            return Err(Self::invalid(key, "must be longer than zero"));
        }
        Ok(d)
    }

    /// A whole number of at least `min`.
    fn count(&self, key: &str, default: usize, min: usize) -> Result<usize, ConfigError> {
        let n = match self.0.get(key) {
            None => return Ok(default),
            Some(Value::Number(n)) => n,
            Some(other) => {
                return Err(Self::invalid(
                    key,
                    format!("expected a whole number, found {}", kind(other)),
                ));
            }
        };
        let value = n
            .as_u64()
            .ok_or_else(|| Self::invalid(key, format!("expected a whole number, found {n}")))?;
        let value = usize::try_from(value)
            .map_err(|_| Self::invalid(key, format!("{value} is too large")))?;
        if value < min {
            return Err(Self::invalid(key, format!("must be at least {min}")));
        }
        Ok(value)
    }
}

/// The JSON type of `value`, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks `text` is what Go's `net.SplitHostPort` accepts, with a numeric port:
/// `host:port`, `:port`, `[ipv6]:port`.
fn check_host_port(text: &str) -> Result<(), &'static str> {
    let port = if let Some(bracketed) = text.strip_prefix('[') {
        let Some((host, rest)) = bracketed.split_once(']') else {
            return Err("missing ']' in address");
        };
        if host.contains('[') || host.contains(']') {
            return Err("unexpected bracket in address");
        }
        let Some(port) = rest.strip_prefix(':') else {
            return Err("missing port in address");
        };
        port
    } else {
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err("missing port in address");
        };
        if host.contains(':') {
            return Err("too many colons in address (an IPv6 host needs brackets)");
        }
        if host.contains('[') || host.contains(']') {
            return Err("unexpected bracket in address");
        }
        port
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || port.parse::<u16>().is_err()
    {
        return Err("port must be a number from 0 to 65535");
    }
    Ok(())
}

/// The soft open-files limit.
#[allow(unsafe_code)] // one libc call with a local out-parameter
fn open_files_limit() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into the struct it is given.
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (r == 0).then(|| usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::{ConfigError, DEFAULT_CONFIG_JSON, KNOWN_KEYS, ServerConfig};

    fn parse(text: &str) -> Result<ServerConfig, ConfigError> {
        ServerConfig::from_json(text, Path::new("/etc/push"))
    }

    fn parse_ok(text: &str) -> ServerConfig {
        parse(text).expect("configuration should parse")
    }

    fn parse_err(text: &str) -> ConfigError {
        match parse(text) {
            Ok(config) => panic!("{text} should be refused, got {config:?}"),
            Err(e) => e,
        }
    }

    /// Asserts `text` is refused with `InvalidValue` for `key`.
    fn assert_invalid(text: &str, key: &str) {
        let e = parse_err(text);
        assert!(
            matches!(&e, ConfigError::InvalidValue { key: k, .. } if k == key),
            "{text}: expected InvalidValue for {key}, got {e:?}"
        );
        assert!(e.is_invalid_value());
        assert_eq!(e.key(), Some(key));
    }

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "pushbroker-config-{name}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
            ));
            std::fs::create_dir_all(&path).expect("create temp dir");
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn empty_object_takes_every_default() {
        let c = parse_ok("{}");
        assert_eq!(c.addr, "127.0.0.1:9090");
        assert_eq!(c.exchange_timeout, Duration::from_secs(5));
        assert_eq!(c.ping_interval, Duration::from_secs(10));
        assert_eq!(c.session_queue_size, 10);
        assert_eq!(c.broker_queue_size, 10_000);
        assert_eq!(c.key_pem_file, None);
        assert_eq!(c.cert_pem_file, None);
        assert_eq!(c.http_addr, "127.0.0.1:8080");
        assert_eq!(c.http_read_timeout, Duration::from_secs(5));
        assert_eq!(c.http_write_timeout, Duration::from_secs(5));
        assert_eq!(c.max_notifications_per_app, 100);
        assert_eq!(c.delivery_domain, "");
        assert_eq!(c.shards, 0);
        assert_eq!(c.statistics_auth_user, None);
        assert_eq!(c.statistics_auth_password, None);
        assert!(!c.tls_enabled());
        assert_eq!(c, ServerConfig::default());
    }

    #[test]
    fn configs_built_in_code_are_held_to_the_same_rules() {
        assert!(ServerConfig::default().validate().is_ok());
        type Break = fn(&mut ServerConfig);
        let broken: [(&str, Break); 7] = [
            ("addr", |c| c.addr = "localhost".into()),
            ("http_addr", |c| c.http_addr = c.addr.clone()),
            ("exchange_timeout", |c| c.exchange_timeout = Duration::ZERO),
            ("session_queue_size", |c| c.session_queue_size = 0),
            ("max_http_connections", |c| c.max_http_connections = 0),
            ("cert_pem_file", |c| c.key_pem_file = Some("k.pem".into())),
            ("statistics_auth_password", |c| {
                c.statistics_auth_user = Some("u".into());
            }),
        ];
        for (key, breaks) in broken {
            let mut c = ServerConfig::default();
            breaks(&mut c);
            let e = c.validate().expect_err(key);
            assert_eq!(e.key(), Some(key), "{e}");
        }
        // Both on port 0 is two free ports, not one.
        let c = ServerConfig {
            addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            ..ServerConfig::default()
        };
        assert!(c.validate().is_ok());
        assert_invalid(
            r#"{"addr": "127.0.0.1:7000", "http_addr": "127.0.0.1:7000"}"#,
            "http_addr",
        );
    }

    #[test]
    fn full_config_sets_every_key() {
        let c = parse_ok(
            r#"{
                "addr": "0.0.0.0:0",
                "exchange_timeout": "100ms",
                "ping_interval": "1m30s",
                "session_queue_size": 3,
                "broker_queue_size": 50,
                "key_pem_file": "/tls/key.pem",
                "cert_pem_file": "/tls/cert.pem",
                "http_addr": "[::1]:0",
                "http_read_timeout": "2.5s",
                "http_write_timeout": "1h",
                "max_notifications_per_app": 7,
                "delivery_domain": "push.example.com",
                "shards": 4,
                "statistics_auth_user": "stats",
                "statistics_auth_password": "s3cret",
                "data_dir": "state",
                "durability": "relaxed",
                "fsync_interval": "50ms"
            }"#,
        );
        let expected = ServerConfig {
            addr: "0.0.0.0:0".to_owned(),
            exchange_timeout: Duration::from_millis(100),
            ping_interval: Duration::from_secs(90),
            session_queue_size: 3,
            broker_queue_size: 50,
            key_pem_file: Some(PathBuf::from("/tls/key.pem")),
            cert_pem_file: Some(PathBuf::from("/tls/cert.pem")),
            http_addr: "[::1]:0".to_owned(),
            http_read_timeout: Duration::from_millis(2500),
            http_write_timeout: Duration::from_secs(3600),
            max_notifications_per_app: 7,
            broadcast_backlog: 1000,
            max_sessions: 0,
            max_http_connections: 512,
            reserved_descriptors: 128,
            delivery_domain: "push.example.com".to_owned(),
            shards: 4,
            statistics_auth_user: Some("stats".to_owned()),
            statistics_auth_password: Some("s3cret".to_owned()),
            data_dir: Some(PathBuf::from("/etc/push/state")),
            durability: crate::store::Durability::Relaxed(Duration::from_millis(50)),
            redis_url: None,
            node_id: None,
        };
        assert_eq!(c, expected);
        assert!(c.tls_enabled());
        assert_eq!(c.shard_count(), 4);
    }

    #[test]
    fn redis_url_makes_a_node_and_excludes_data_dir() {
        let c = ServerConfig::from_json(
            r#"{"redis_url": "redis://:pw@10.0.0.5:6380/2", "node_id": "node-a"}"#,
            Path::new("/"),
        )
        .expect("valid");
        assert_eq!(c.redis_url.as_deref(), Some("redis://:pw@10.0.0.5:6380/2"));
        assert_eq!(c.node_id.as_deref(), Some("node-a"));
        // The password never reaches a log.
        assert!(!format!("{c:?}").contains("pw"), "{c:?}");
        // Empty means not set, as for the other optional strings.
        let c = ServerConfig::from_json(r#"{"redis_url": "", "node_id": null}"#, Path::new("/"))
            .expect("valid");
        assert_eq!((c.redis_url, c.node_id), (None, None));
        for (json, key) in [
            (r#"{"redis_url": "http://x"}"#, "redis_url"),
            (
                r#"{"redis_url": "redis://h", "data_dir": "d"}"#,
                "redis_url",
            ),
            (r#"{"redis_url": "redis://h", "node_id": "a b"}"#, "node_id"),
            (r#"{"redis_url": "redis://h", "node_id": "{x}"}"#, "node_id"),
        ] {
            match ServerConfig::from_json(json, Path::new("/")) {
                Err(ConfigError::InvalidValue { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{json}: {other:?}"),
            }
        }
    }

    #[test]
    fn every_known_key_is_in_the_reference_table() {
        let docs = include_str!("mod.rs");
        for key in KNOWN_KEYS {
            assert!(
                docs.contains(&format!("//! | `{key}` |")),
                "{key} missing from the table"
            );
        }
    }

    #[test]
    fn the_original_servers_sample_config_is_accepted() {
        // ubuntu-push `sampleconfigs/dev.json`.
        let c = parse_ok(
            r#"{
                "exchange_timeout": "5s",
                "ping_interval": "10s",
                "broker_queue_size": 10000,
                "session_queue_size": 10,
                "addr": "127.0.0.1:9090",
                "key_pem_file": "../server/acceptance/ssl/testing.key",
                "cert_pem_file": "../server/acceptance/ssl/testing.cert",
                "http_addr": "127.0.0.1:8080",
                "http_read_timeout": "5s",
                "http_write_timeout": "5s",
                "delivery_domain": "localhost"
            }"#,
        );
        assert_eq!(
            c.key_pem_file.as_deref(),
            Some(Path::new("/etc/push/../server/acceptance/ssl/testing.key"))
        );
        assert_eq!(c.delivery_domain, "localhost");
    }

    #[test]
    fn relative_pem_paths_resolve_against_base_dir_and_absolute_ones_stay() {
        let c = ServerConfig::from_json(
            r#"{"key_pem_file": "tls/key.pem", "cert_pem_file": "/abs/cert.pem"}"#,
            Path::new("/srv/push"),
        )
        .expect("parses");
        assert_eq!(c.key_pem_file, Some(PathBuf::from("/srv/push/tls/key.pem")));
        assert_eq!(c.cert_pem_file, Some(PathBuf::from("/abs/cert.pem")));
        assert!(c.tls_enabled());
    }

    #[test]
    fn load_resolves_relative_pem_paths_against_the_files_folder() {
        let dir = TempDir::new("load");
        let path = dir.0.join("server.json");
        std::fs::write(
            &path,
            r#"{"key_pem_file": "key.pem", "cert_pem_file": "certs/cert.pem", "addr": ":0"}"#,
        )
        .expect("write config");
        let c = ServerConfig::load(&path).expect("loads");
        assert_eq!(c.key_pem_file, Some(dir.0.join("key.pem")));
        assert_eq!(c.cert_pem_file, Some(dir.0.join("certs/cert.pem")));
        assert_eq!(c.addr, ":0");
    }

    #[test]
    fn load_of_a_missing_file_is_io_with_the_path() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("nope.json");
        let e = ServerConfig::load(&path).expect_err("missing file");
        assert!(e.is_io());
        assert_eq!(e.key(), None);
        match &e {
            ConfigError::Io { path: p, source } => {
                assert_eq!(p, &path);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Io, got {other:?}"),
        }
        assert!(e.source().is_some());
    }

    #[test]
    fn load_of_a_malformed_file_is_json() {
        let dir = TempDir::new("malformed");
        let path = dir.0.join("bad.json");
        std::fs::write(&path, "{\"addr\": }").expect("write config");
        assert!(ServerConfig::load(&path).expect_err("malformed").is_json());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse_err(r#"{"addr": "127.0.0.1:9090", "addrr": "127.0.0.1:9091"}"#);
        assert!(matches!(&e, ConfigError::UnknownKey(k) if k == "addrr"));
        assert!(e.is_unknown_key());
        assert_eq!(e.key(), Some("addrr"));
        assert_eq!(e.to_string(), "unknown configuration key \"addrr\"");
    }

    #[test]
    fn wrong_types_name_the_key() {
        assert_invalid(r#"{"ping_interval": 10}"#, "ping_interval");
        assert_invalid(r#"{"exchange_timeout": null}"#, "exchange_timeout");
        assert_invalid(r#"{"session_queue_size": "x"}"#, "session_queue_size");
        assert_invalid(r#"{"session_queue_size": "10"}"#, "session_queue_size");
        assert_invalid(r#"{"broker_queue_size": -1}"#, "broker_queue_size");
        assert_invalid(r#"{"broker_queue_size": 10.5}"#, "broker_queue_size");
        assert_invalid(
            r#"{"max_notifications_per_app": true}"#,
            "max_notifications_per_app",
        );
        assert_invalid(r#"{"shards": [1]}"#, "shards");
        assert_invalid(r#"{"addr": 9090}"#, "addr");
        assert_invalid(r#"{"http_addr": {}}"#, "http_addr");
        assert_invalid(r#"{"delivery_domain": 1}"#, "delivery_domain");
        assert_invalid(r#"{"delivery_domain": null}"#, "delivery_domain");
        assert_invalid(
            r#"{"key_pem_file": 1, "cert_pem_file": "c"}"#,
            "key_pem_file",
        );
        assert_invalid(
            r#"{"statistics_auth_password": false}"#,
            "statistics_auth_password",
        );
    }

    #[test]
    fn wrong_type_message_says_what_was_expected() {
        let e = parse_err(r#"{"ping_interval": 10}"#);
        assert_eq!(
            e.to_string(),
            "invalid value for configuration key \"ping_interval\": \
             expected a duration string such as \"10s\", found a number"
        );
    }

    #[test]
    fn bad_or_zero_durations_are_invalid() {
        for key in [
            "exchange_timeout",
            "ping_interval",
            "http_read_timeout",
            "http_write_timeout",
        ] {
            for bad in ["10x", "10", "", "-1s", "1.2.3s", "0", "0s"] {
                assert_invalid(&format!(r#"{{"{key}": "{bad}"}}"#), key);
            }
        }
    }

    #[test]
    fn zero_sizes_are_invalid_but_zero_shards_means_auto() {
        assert_invalid(r#"{"session_queue_size": 0}"#, "session_queue_size");
        assert_invalid(r#"{"broker_queue_size": 0}"#, "broker_queue_size");
        assert_invalid(
            r#"{"max_notifications_per_app": 0}"#,
            "max_notifications_per_app",
        );
        assert_invalid(r#"{"broadcast_backlog": 0}"#, "broadcast_backlog");
        assert_invalid(r#"{"broadcast_backlog": 100001}"#, "broadcast_backlog");
        assert_eq!(
            parse_ok(r#"{"broadcast_backlog": 100000}"#).broadcast_backlog,
            100_000
        );
        assert_eq!(parse_ok("{}").broadcast_backlog, 1000);
        assert_eq!(parse_ok(r#"{"broadcast_backlog": 3}"#).broadcast_backlog, 3);
        let c = parse_ok(r#"{"shards": 0}"#);
        assert_eq!(c.shards, 0);
        assert!(c.shard_count() >= 1);
    }

    #[test]
    fn addresses_need_a_numeric_port() {
        for good in [
            "127.0.0.1:9090",
            "127.0.0.1:0",
            ":9090",
            "localhost:65535",
            "[::1]:9090",
            "[::]:0",
        ] {
            assert_eq!(parse_ok(&format!(r#"{{"addr": "{good}"}}"#)).addr, good);
            assert_eq!(
                parse_ok(&format!(
                    r#"{{"addr": "127.0.0.1:1", "http_addr": "{good}"}}"#
                ))
                .http_addr,
                good
            );
        }
        for bad in [
            "127.0.0.1",
            "127.0.0.1:",
            "localhost:http",
            "localhost:65536",
            "localhost:+80",
            "::1:9090",
            "[::1]",
            "[::1:9090",
            "[::1]9090",
            "",
        ] {
            assert_invalid(&format!(r#"{{"addr": "{bad}"}}"#), "addr");
            assert_invalid(&format!(r#"{{"http_addr": "{bad}"}}"#), "http_addr");
        }
    }

    #[test]
    fn pem_files_are_both_or_neither() {
        let e = parse_err(r#"{"key_pem_file": "key.pem"}"#);
        assert!(e.is_missing());
        assert!(
            matches!(&e, ConfigError::Missing { key, with } if key == "cert_pem_file" && with == "key_pem_file")
        );
        assert_eq!(e.key(), Some("cert_pem_file"));
        let e = parse_err(r#"{"cert_pem_file": "cert.pem", "key_pem_file": ""}"#);
        assert!(
            matches!(&e, ConfigError::Missing { key, with } if key == "key_pem_file" && with == "cert_pem_file")
        );
        let c = parse_ok(r#"{"key_pem_file": null, "cert_pem_file": ""}"#);
        assert!(!c.tls_enabled());
        assert_eq!((c.key_pem_file, c.cert_pem_file), (None, None));
    }

    #[test]
    fn statistics_credentials_are_both_or_neither() {
        let e = parse_err(r#"{"statistics_auth_user": "stats"}"#);
        assert!(
            matches!(&e, ConfigError::Missing { key, with } if key == "statistics_auth_password" && with == "statistics_auth_user")
        );
        let e = parse_err(r#"{"statistics_auth_password": "pw"}"#);
        assert!(
            matches!(&e, ConfigError::Missing { key, with } if key == "statistics_auth_user" && with == "statistics_auth_password")
        );
        let c = parse_ok(r#"{"statistics_auth_user": "u", "statistics_auth_password": "p"}"#);
        assert_eq!(c.statistics_auth_user.as_deref(), Some("u"));
        assert_eq!(c.statistics_auth_password.as_deref(), Some("p"));
    }

    #[test]
    fn debug_output_redacts_the_statistics_password() {
        let c = parse_ok(r#"{"statistics_auth_user": "u", "statistics_auth_password": "hunter2"}"#);
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    #[test]
    fn malformed_json_is_json_with_a_position() {
        let e = parse_err("{\n  \"addr\": \"127.0.0.1:9090\",\n}");
        assert!(e.is_json());
        assert_eq!(e.key(), None);
        let ConfigError::Json(source) = &e else {
            panic!("expected Json, got {e:?}");
        };
        assert_eq!(source.line(), 3);
        assert!(e.source().is_some());
    }

    #[test]
    fn json_that_is_not_an_object_is_json() {
        for text in ["", "[]", "\"addr\"", "null", "10"] {
            assert!(parse_err(text).is_json(), "{text:?}");
        }
    }

    #[test]
    fn embedded_default_parses_and_equals_default() {
        let parsed = ServerConfig::from_json(DEFAULT_CONFIG_JSON, Path::new(""))
            .expect("default.json parses");
        let durable_default = ServerConfig {
            data_dir: Some(PathBuf::from(super::DEFAULT_DATA_DIR)),
            ..ServerConfig::default()
        };
        assert_eq!(parsed, durable_default);
        assert_eq!(ServerConfig::embedded_default(), durable_default);
        assert!(!parsed.tls_enabled());
        assert_eq!(parsed.durability, crate::store::Durability::Sync);
    }

    #[test]
    fn embedded_default_spells_out_every_key_but_tls_statistics_auth_and_redis() {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(DEFAULT_CONFIG_JSON).expect("default.json is an object");
        for key in KNOWN_KEYS {
            let optional = key.ends_with("_pem_file") || key.starts_with("statistics_auth_");
            // The relaxed mode's interval is only read with `durability: "relaxed"`.
            let optional = optional || *key == "fsync_interval";
            // A single node by default: the multi-node keys are left out.
            let optional = optional || *key == "redis_url" || *key == "node_id";
            assert_eq!(map.contains_key(*key), !optional, "{key}");
        }
    }
}
