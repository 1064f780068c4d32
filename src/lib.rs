//! pushbroker: a push-notification broker core speaking the Ubuntu Push wire protocol.
//!
//! # Layout
//!
//! - [`protocol`]: message types, the framing codec and splitting (sans-IO).
//! - [`store`]: channel ids, notification metadata, the [`store::PendingStore`] trait and
//!   the in-memory store.
//! - [`session`]: the per-device session loop over any async stream, with an injectable
//!   clock.
//! - [`api`]: the HTTP API for application servers.
//! - [`config`]: the configuration (the original server's JSON keys) and Go durations.
//! - [`server`]: device listeners (TCP/TLS, connection migration), the HTTP API on every
//!   shard, start-up and shutdown.
//! - [`logging`]: the log line format tools parse (binaries install it).
//! - [`broker`]: the broker API (registration, sessions, exchanges), the one-process
//!   [`broker::simple`] broker, test implementations and the conformance suite.

pub mod api;
pub mod broker;
pub mod config;
pub mod logging;
pub mod protocol;
pub mod server;
pub mod session;
pub mod store;
