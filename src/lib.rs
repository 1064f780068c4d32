//! pushbroker: a push-notification broker core speaking the Ubuntu Push wire protocol.
//!
//! # Layout
//!
//! - [`protocol`]: message types, the framing codec and splitting (sans-IO).
//! - [`store`]: channel ids, notification metadata, the [`store::PendingStore`] trait and
//!   the in-memory store.
//! - [`broker`]: the broker API (registration, sessions, exchanges), the one-process
//!   [`broker::simple`] broker, test implementations and the conformance suite.

pub mod broker;
pub mod protocol;
pub mod store;
