//! What `/metrics` and `/stats` show beside the broker's figures: the API's own counters,
//! and the counters of the listeners and connection moves, which the server keeps. Each
//! lives in its shard's service slot ([`Shard::service`](crate::broker::sharded::Shard::service)),
//! owned by the shard, never shared across shards.

use std::cell::{Cell, RefCell};

/// What the API counted on one shard. Borrowed only inside a method.
#[derive(Debug, Default)]
pub struct ApiCounters {
    requests: Cell<u64>,
    /// Label → count.
    errors: RefCell<Vec<(&'static str, u64)>>,
}

/// A copy of [`ApiCounters`] that can leave the shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiCounts {
    /// Requests served.
    pub requests: u64,
    /// Error answers, by label.
    pub errors: Vec<(&'static str, u64)>,
}

impl ApiCounters {
    /// Counts a request served.
    pub fn count_request(&self) {
        self.requests.set(self.requests.get() + 1);
    }

    /// Counts an error answer, by its label.
    pub fn count_error(&self, label: &'static str) {
        let mut errors = self.errors.borrow_mut();
        match errors.iter_mut().find(|(l, _)| *l == label) {
            Some((_, n)) => *n += 1,
            None => errors.push((label, 1)),
        }
    }

    /// What was counted so far.
    pub fn counts(&self) -> ApiCounts {
        ApiCounts {
            requests: self.requests.get(),
            errors: self.errors.borrow().clone(),
        }
    }
}

/// Which of a shard's listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// Where devices connect.
    Devices,
    /// The HTTP API.
    Http,
}

/// What a shard's listeners refused or failed to accept, and the device connections that
/// moved to or from it. The server, which owns the listeners, counts them.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    counts: Cell<ConnectionCounts>,
}

/// A copy of [`ConnectionCounters`] that can leave the shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionCounts {
    /// Device connections refused: the server held `max_sessions` (every shard full).
    pub rejected_devices: u64,
    /// HTTP connections closed at once: the shard held its share of them.
    pub rejected_http: u64,
    /// Failed accepts on the device listener.
    pub device_accept_errors: u64,
    /// Failed accepts on the HTTP listener.
    pub http_accept_errors: u64,
    /// Connections moved here from another shard.
    pub migrations_in: u64,
    /// Connections moved from here to their owner.
    pub migrations_out: u64,
}

impl ConnectionCounters {
    fn update(&self, f: impl FnOnce(&mut ConnectionCounts)) {
        let mut c = self.counts.get();
        f(&mut c);
        self.counts.set(c);
    }

    /// Counts a connection closed at once because `listener`'s limit was reached.
    pub fn count_rejected(&self, listener: Listener) {
        self.update(|c| match listener {
            Listener::Devices => c.rejected_devices += 1,
            Listener::Http => c.rejected_http += 1,
        });
    }

    /// Counts a failed accept on `listener`.
    pub fn count_accept_error(&self, listener: Listener) {
        self.update(|c| match listener {
            Listener::Devices => c.device_accept_errors += 1,
            Listener::Http => c.http_accept_errors += 1,
        });
    }

    /// Counts a connection moved here from another shard.
    pub fn count_migration_in(&self) {
        self.update(|c| c.migrations_in += 1);
    }

    /// Counts a connection moved from here to its owner.
    pub fn count_migration_out(&self) {
        self.update(|c| c.migrations_out += 1);
    }

    /// What was counted so far.
    pub fn counts(&self) -> ConnectionCounts {
        self.counts.get()
    }
}
