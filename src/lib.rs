//! pushbroker: a push-notification broker core speaking the Ubuntu Push wire protocol.
//!
//! Devices hold long-lived TCP or TLS connections; application servers ask for
//! deliveries over HTTP (`/notify`, `/broadcast`, `/register`, …). Sessions are hashed to
//! per-core shards, each a [`glommio`] executor with its own registry and store; shards
//! talk only by flume messages. The wire protocol and the HTTP API are described, for
//! client authors, in `docs/protocol.md` in the repository.
//!
//! # Embedding the server
//!
//! Build a [`ServerConfig`] in code (or load the original server's JSON with
//! [`ServerConfig::load`]), start a [`Server`], and shut it down when done;
//! [`Server::run_until_signal`] does what the `pushbroker` binary does (run until SIGINT
//! or SIGTERM, then shut down in order).
//!
//! ```
//! use std::time::Duration;
//! use pushbroker::{Server, ServerConfig};
//!
//! let config = ServerConfig {
//!     addr: "127.0.0.1:0".into(),      // devices; port 0 picks a free port
//!     http_addr: "127.0.0.1:0".into(), // the HTTP API
//!     ..ServerConfig::default()
//! };
//! let server = Server::start(&config)?;
//! println!("devices: {}, http: {}", server.device_addr(), server.http_addr());
//! // … serve …
//! server.shutdown(Duration::from_secs(2));
//! # Ok::<(), pushbroker::ServerError>(())
//! ```
//!
//! `examples/embed_server.rs` serves until a signal; `examples/broker_without_sockets.rs`
//! drives a [`SimpleBroker`] directly: register a session, broadcast, notify, ACK.
//!
//! # Using the broker without sockets
//!
//! A [`broker::Broker`] registers sessions (from a [`ConnectMsg`]) and feeds each one
//! exchanges on its queue ([`broker::BrokerSession::session_channel`]); whatever carries
//! the frames to the device performs each exchange with [`broker::perform`]. Deliveries
//! are asked for through the broker's sending facet ([`broker::BrokerSending`]), after
//! the notification is in the store ([`store::PendingStore`]). The broker and its
//! sessions run on a glommio executor: use the re-exported [`glommio`], so that the
//! fixed copy this crate carries is the one your code names.
//!
//! # Layout
//!
//! - [`protocol`]: message types, the framing codec and splitting (sans-IO).
//! - [`store`]: channel ids, notification metadata, the [`store::PendingStore`] trait, the
//!   in-memory and durable stores, and [`store::redis`], a per-shard Redis client.
//! - [`session`]: the per-device session loop over any async stream, with an injectable
//!   clock.
//! - [`api`]: the HTTP API for application servers.
//! - [`config`]: the configuration (the original server's JSON keys) and Go durations.
//! - [`server`]: device listeners (TCP/TLS, connection migration), the HTTP API on every
//!   shard, start-up and shutdown.
//! - [`logging`]: log lines: the text format tools parse, JSON, fixed targets and the
//!   filter (binaries install it).
//! - [`rt`]: hyper's runtime traits on glommio (the HTTP API's I/O and timer).
//! - [`broker`]: the broker API (registration, sessions, exchanges), the one-process
//!   [`broker::simple`] broker, test implementations and the conformance suite.

pub mod api;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod logging;
pub mod protocol;
pub mod rt;
pub mod server;
pub mod session;
pub mod store;

// The crates an embedder's code must name with the same types: glommio (this crate carries
// a fixed 0.9.0, see vendor/README.md) and serde_json (payloads, CONNECT's `Info`).
pub use glommio;
pub use serde_json;

pub use broker::sharded::{ShardedBroker, ShardedBrokerBuilder};
pub use broker::simple::SimpleBroker;
pub use config::ServerConfig;
pub use protocol::{ConnectMsg, DeviceId, Notification, Payload};
pub use server::{Server, ServerError};
pub use store::{InMemoryPendingStore, InternalChannelId, PendingStore};
