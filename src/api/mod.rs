//! The HTTP API for application servers (docs/protocol.md §3): `/broadcast`, `/notify`,
//! `/register`, `/unregister` and `/delivery-hosts`, byte for byte as the original
//! server answered them, plus the operational `/health`, `/metrics` (Prometheus) and
//! `/stats`.
//!
//! # Layout
//!
//! - [`serve_connection`] serves one HTTP/1.1 connection with hyper (keep-alive, a
//!   header-read timeout, a write timeout) and [`handle`]s each request.
//! - [`handle`] reads what it needs of a hyper request and calls [`respond`], the core:
//!   a request head and a body future in, a response out. Tests call it without sockets.
//! - `handlers`: the endpoints. `body`: the JSON bodies, decoded as Go's `encoding/json`
//!   did. [`ApiError`]: every failure, its status, label, message and JSON body in one
//!   place. `metrics`: gathering and rendering every shard's figures. [`rt`](crate::rt): hyper's
//!   I/O and timer traits on glommio, without `unsafe`.
//!
//! # Sharding
//!
//! Every shard accepts HTTP connections and serves them with its own [`ApiContext`]
//! (`Rc`, never leaves the shard). Tokens resolve on the serving shard's store; a notify
//! goes to the device's owner shard and a broadcast to its channel's sequencer through
//! [`ShardedSending`](crate::broker::sharded::ShardedSending), whose full inbox is a 503,
//! never a wait.
//!
//! # Logging
//!
//! Per request only `tracing::debug!`, target `pushbroker::api`
//! ([`logging::target::API`](crate::logging::target::API)): normal operation writes
//! nothing at INFO or above (docs/protocol.md §4.3), whatever clients send.

mod body;
mod counters;
mod error;
mod handlers;
mod http;
mod metrics;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

use crate::broker::sharded::Shard;

pub use counters::{ApiCounters, ApiCounts, ConnectionCounters, ConnectionCounts, Listener};
pub use error::ApiError;
pub use handlers::{BodyReadError, RequestHead, respond};
pub use http::{handle, serve_connection, serve_connection_until};
pub use metrics::ShardReport;

/// The largest request body accepted (the original's `MaxRequestBodyBytes`).
pub const MAX_REQUEST_BODY_BYTES: usize = 4096;

/// The largest `/notify` `data` accepted, in bytes as received (`/broadcast` data is bounded
/// only by the body).
pub const MAX_DATA_BYTES: usize = 2048;

/// How long `/health`, `/metrics` and `/stats` wait for every shard to answer: long
/// enough for a busy shard, short enough for a load balancer's probe.
pub const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// How the HTTP API is configured. The same on every shard; `Send`, so the server builds
/// it once and hands a clone to each shard.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// The device listener addresses `/delivery-hosts` answers with, exactly as logged.
    pub delivery_hosts: Vec<String>,
    /// The domain `/delivery-hosts` answers with (`delivery_domain` in the configuration).
    pub delivery_domain: String,
    /// How long a client may take to send a request's head, and how long an idle
    /// keep-alive connection is kept (hyper's `header_read_timeout`). Zero: no limit.
    pub http_read_timeout: Duration,
    /// How long one write of an answer may wait for the client to read. Zero: no limit.
    pub http_write_timeout: Duration,
    /// When set, `/stats` requires HTTP basic authentication with this user and
    /// password.
    pub statistics_auth: Option<(String, String)>,
    /// The largest request body accepted, in bytes ([`MAX_REQUEST_BODY_BYTES`]).
    pub max_body: usize,
}

impl Default for ApiConfig {
    /// No delivery hosts, an empty domain, the configuration's default timeouts
    /// (`http_read_timeout`, `http_write_timeout`), `/stats` open, 4096-byte bodies.
    fn default() -> Self {
        Self {
            delivery_hosts: Vec::new(),
            delivery_domain: String::new(),
            http_read_timeout: crate::config::DEFAULT_HTTP_TIMEOUT,
            http_write_timeout: crate::config::DEFAULT_HTTP_TIMEOUT,
            statistics_auth: None,
            max_body: MAX_REQUEST_BODY_BYTES,
        }
    }
}

impl fmt::Debug for ApiConfig {
    /// Shows the statistics user but never its password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("delivery_hosts", &self.delivery_hosts)
            .field("delivery_domain", &self.delivery_domain)
            .field("http_read_timeout", &self.http_read_timeout)
            .field("http_write_timeout", &self.http_write_timeout)
            .field(
                "statistics_auth",
                &self.statistics_auth.as_ref().map(|(user, _)| (user, "…")),
            )
            .field("max_body", &self.max_body)
            .finish()
    }
}

/// What one shard's API handlers work with: the shard (its store, the broker's sending
/// facet, its counters) and the settings. Shard-local: shared as `Rc` by the shard's
/// connections.
#[derive(Debug)]
pub struct ApiContext {
    /// The shard serving these requests.
    shard: Shard,
    settings: ApiConfig,
    /// The `/delivery-hosts` answer, rendered once.
    delivery_hosts: Bytes,
    /// The shard's API counters (in its service slot, shared by every context there).
    counters: std::rc::Rc<ApiCounters>,
}

#[derive(Serialize)]
struct DeliveryHosts<'a> {
    hosts: &'a [String],
    domain: &'a str,
}

impl ApiContext {
    /// The context of the API on `shard`.
    pub fn new(shard: Shard, settings: ApiConfig) -> Self {
        let hosts = DeliveryHosts {
            hosts: &settings.delivery_hosts,
            domain: &settings.delivery_domain,
        };
        let delivery_hosts = serde_json::to_vec(&hosts)
            .map(Bytes::from)
            // Strings only: cannot fail.
            .unwrap_or_else(|_| Bytes::from_static(br#"{"hosts":[],"domain":""}"#));
        Self {
            counters: shard.service_or_default::<ApiCounters>(),
            shard,
            settings,
            delivery_hosts,
        }
    }

    /// The `/delivery-hosts` answer for `hosts` and the configured domain.
    pub(crate) fn render_delivery_hosts(&self, hosts: &[String]) -> Bytes {
        let answer = DeliveryHosts {
            hosts,
            domain: &self.settings.delivery_domain,
        };
        serde_json::to_vec(&answer)
            .map(Bytes::from)
            .unwrap_or_else(|_| Bytes::from_static(br#"{"hosts":[],"domain":""}"#))
    }

    /// The shard's API counters.
    pub fn counters(&self) -> &ApiCounters {
        &self.counters
    }

    /// The shard serving these requests.
    pub fn shard(&self) -> &Shard {
        &self.shard
    }

    /// The settings.
    pub fn settings(&self) -> &ApiConfig {
        &self.settings
    }
}
