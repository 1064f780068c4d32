//! What `/health`, `/metrics` and `/stats` report: every shard's [`ShardReport`] (its
//! broker's [`ShardMetrics`], its API counters, its listeners' counters), gathered with
//! `run_on` within a deadline, rendered as Prometheus text (format 0.0.4)
//! or as JSON.

use std::fmt::Write as _;
use std::time::Duration;

use futures_lite::future;
use serde::Serialize;

use super::counters::{ApiCounters, ApiCounts, ConnectionCounters, ConnectionCounts};
use crate::broker::sharded::{Shard, ShardId, ShardMetrics, ShardedSending};

/// What one shard reports: its broker's figures, the API's and the listeners' counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardReport {
    /// The broker's figures.
    pub broker: ShardMetrics,
    /// What the API counted there.
    pub api: ApiCounts,
    /// What the listeners there counted.
    pub connections: ConnectionCounts,
}

impl ShardReport {
    /// The report of `shard`, on its thread.
    pub fn of(shard: &Shard) -> Self {
        Self {
            broker: shard.metrics(),
            api: shard
                .service::<ApiCounters>()
                .map(|c| c.counts())
                .unwrap_or_default(),
            connections: shard
                .service::<ConnectionCounters>()
                .map(|c| c.counts())
                .unwrap_or_default(),
        }
    }
}

/// The `Content-Type` of `/metrics`.
pub(crate) const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Asks every shard for its metrics, all at once, and waits at most `within`.
///
/// # Returns
/// Per shard, in order, its metrics, or `None` when it did not answer in time (or is
/// stopped).
///
/// Must run on a glommio executor (the questions are local tasks, the deadline a glommio
/// timer).
pub(crate) async fn gather(sending: &ShardedSending, within: Duration) -> Vec<Option<ShardReport>> {
    let asked: Vec<_> = (0..sending.nr_shards())
        .map(|i| {
            let sending = sending.clone();
            glommio::spawn_local(async move {
                future::or(
                    async { sending.run_on(ShardId(i), ShardReport::of).await.ok() },
                    async {
                        glommio::timer::sleep(within).await;
                        None
                    },
                )
                .await
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(asked.len());
    for task in asked {
        answers.push(task.await);
    }
    answers
}

/// The figures of one shard, or of all together, as `/stats` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Figures {
    /// Sessions registered now.
    pub(crate) sessions: u64,
    /// Sessions registered since start.
    pub(crate) registrations: u64,
    /// Broadcast snapshots fanned out.
    pub(crate) broadcast_fanouts: u64,
    /// Broadcast exchanges fed to sessions.
    pub(crate) broadcast_deliveries: u64,
    /// Unicast exchanges fed to sessions.
    pub(crate) unicast_deliveries: u64,
    /// Exchanges a full session queue refused.
    pub(crate) refused_deliveries: u64,
    /// Broadcast notifications sequenced.
    pub(crate) broadcasts: u64,
    /// Notifies applied.
    pub(crate) unicasts: u64,
    /// Connections moved in from another shard.
    pub(crate) migrations_in: u64,
    /// Connections moved out to their owner.
    pub(crate) migrations_out: u64,
    /// API requests served.
    pub(crate) api_requests: u64,
    /// Device connections closed at once: the session limit was reached.
    pub(crate) rejected_device_connections: u64,
    /// HTTP connections closed at once: the connection limit was reached.
    pub(crate) rejected_http_connections: u64,
    /// Failed accepts on the device listener.
    pub(crate) device_accept_errors: u64,
    /// Failed accepts on the HTTP listener.
    pub(crate) http_accept_errors: u64,
    /// API errors served, by label (sorted).
    pub(crate) api_errors: Vec<(&'static str, u64)>,
}

impl Figures {
    fn of(m: &ShardReport) -> Self {
        let mut f = Figures::default();
        f.add(m);
        f
    }

    /// The sum over the shards that answered.
    fn total(answers: &[Option<ShardReport>]) -> Self {
        let mut f = Figures::default();
        for m in answers.iter().flatten() {
            f.add(m);
        }
        f
    }

    fn add(&mut self, r: &ShardReport) {
        let m = &r.broker;
        self.sessions += m.sessions as u64;
        self.registrations += m.delivery.registrations;
        self.broadcast_fanouts += m.delivery.broadcast_fanouts;
        self.broadcast_deliveries += m.delivery.broadcast_feeds;
        self.unicast_deliveries += m.delivery.unicast_feeds;
        self.refused_deliveries += m.delivery.refused_feeds;
        self.broadcasts += m.broadcasts;
        self.unicasts += m.unicasts;
        self.migrations_in += r.connections.migrations_in;
        self.migrations_out += r.connections.migrations_out;
        self.api_requests += r.api.requests;
        self.rejected_device_connections += r.connections.rejected_devices;
        self.rejected_http_connections += r.connections.rejected_http;
        self.device_accept_errors += r.connections.device_accept_errors;
        self.http_accept_errors += r.connections.http_accept_errors;
        for &(label, n) in &r.api.errors {
            match self.api_errors.iter_mut().find(|(l, _)| *l == label) {
                Some((_, total)) => *total += n,
                None => self.api_errors.push((label, n)),
            }
        }
        self.api_errors.sort_unstable();
    }
}

/// `/stats`: per shard (`"up": false` and no figures for one that did not answer) and
/// totals over the shards that answered.
#[derive(Debug, Serialize)]
pub(crate) struct Stats {
    shards: Vec<ShardStats>,
    totals: Figures,
}

#[derive(Debug, Serialize)]
struct ShardStats {
    shard: usize,
    up: bool,
    #[serde(flatten)]
    figures: Option<Figures>,
}

impl Serialize for Figures {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("sessions", &self.sessions)?;
        map.serialize_entry("registrations", &self.registrations)?;
        map.serialize_entry("broadcast_fanouts", &self.broadcast_fanouts)?;
        map.serialize_entry("broadcast_deliveries", &self.broadcast_deliveries)?;
        map.serialize_entry("unicast_deliveries", &self.unicast_deliveries)?;
        map.serialize_entry("refused_deliveries", &self.refused_deliveries)?;
        map.serialize_entry("broadcasts", &self.broadcasts)?;
        map.serialize_entry("unicasts", &self.unicasts)?;
        map.serialize_entry("migrations_in", &self.migrations_in)?;
        map.serialize_entry("migrations_out", &self.migrations_out)?;
        map.serialize_entry("api_requests", &self.api_requests)?;
        map.serialize_entry(
            "rejected_device_connections",
            &self.rejected_device_connections,
        )?;
        map.serialize_entry("rejected_http_connections", &self.rejected_http_connections)?;
        map.serialize_entry("device_accept_errors", &self.device_accept_errors)?;
        map.serialize_entry("http_accept_errors", &self.http_accept_errors)?;
        map.serialize_entry("api_errors", &ErrorsJson(&self.api_errors))?;
        map.end()
    }
}

struct ErrorsJson<'a>(&'a [(&'static str, u64)]);

impl Serialize for ErrorsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|&(label, n)| (label, n)))
    }
}

impl Stats {
    pub(crate) fn new(answers: &[Option<ShardReport>]) -> Self {
        let shards = answers
            .iter()
            .enumerate()
            .map(|(i, m)| ShardStats {
                shard: i,
                up: m.is_some(),
                figures: m.as_ref().map(Figures::of),
            })
            .collect();
        Stats {
            shards,
            totals: Figures::total(answers),
        }
    }
}

/// Escapes a Prometheus label value.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes a metric family's `HELP` and `TYPE` lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A per-shard family: name, type, help, and the value of one shard.
type PerShard = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ShardReport) -> u64,
);

/// The per-shard families with one sample per shard.
const PER_SHARD: [PerShard; 15] = [
    (
        "pushbroker_sessions",
        "gauge",
        "Device sessions registered now.",
        |m| m.broker.sessions as u64,
    ),
    (
        "pushbroker_registrations_total",
        "counter",
        "Device sessions registered.",
        |m| m.broker.delivery.registrations,
    ),
    (
        "pushbroker_broadcast_fanouts_total",
        "counter",
        "Broadcast snapshots fanned out to the shard's sessions.",
        |m| m.broker.delivery.broadcast_fanouts,
    ),
    (
        "pushbroker_refused_deliveries_total",
        "counter",
        "Exchanges a full session queue refused.",
        |m| m.broker.delivery.refused_feeds,
    ),
    (
        "pushbroker_broadcasts_total",
        "counter",
        "Broadcast notifications sequenced by the shard.",
        |m| m.broker.broadcasts,
    ),
    (
        "pushbroker_unicasts_total",
        "counter",
        "Notifies applied by the shard.",
        |m| m.broker.unicasts,
    ),
    (
        "pushbroker_api_requests_total",
        "counter",
        "HTTP API requests served by the shard.",
        |m| m.api.requests,
    ),
    (
        "pushbroker_rejected_device_connections_total",
        "counter",
        "Device connections closed at once because the session limit was reached.",
        |m| m.connections.rejected_devices,
    ),
    (
        "pushbroker_rejected_http_connections_total",
        "counter",
        "HTTP connections closed at once because the connection limit was reached.",
        |m| m.connections.rejected_http,
    ),
    (
        "pushbroker_device_accept_errors_total",
        "counter",
        "Failed accepts on the device listener (e.g. out of descriptors).",
        |m| m.connections.device_accept_errors,
    ),
    (
        "pushbroker_http_accept_errors_total",
        "counter",
        "Failed accepts on the HTTP listener (e.g. out of descriptors).",
        |m| m.connections.http_accept_errors,
    ),
    (
        "pushbroker_store_commits_total",
        "counter",
        "Group commits of the shard's log (a write and an fdatasync each); 0 without data_dir.",
        |m| m.broker.store.commits,
    ),
    (
        "pushbroker_store_records_total",
        "counter",
        "Store operations the shard's log committed.",
        |m| m.broker.store.records,
    ),
    (
        "pushbroker_store_log_bytes",
        "gauge",
        "Bytes in the shard's log file.",
        |m| m.broker.store.log_bytes,
    ),
    (
        "pushbroker_store_unavailable",
        "gauge",
        "1 while the shard's log cannot write (changes are refused with 503), else 0.",
        |m| u64::from(m.broker.store.unavailable),
    ),
];

/// The Prometheus text (format 0.0.4) of the shards' answers: per-shard samples for the
/// shards that answered, `pushbroker_shard_up` for each, and the API errors by label
/// summed over the shards that answered.
pub(crate) fn prometheus(answers: &[Option<ShardReport>]) -> String {
    let mut out = String::with_capacity(4096);
    family(
        &mut out,
        "pushbroker_shards",
        "gauge",
        "Shards in the broker.",
    );
    let _ = writeln!(out, "pushbroker_shards {}", answers.len());

    family(
        &mut out,
        "pushbroker_shard_up",
        "gauge",
        "Whether the shard answered this scrape in time.",
    );
    for (i, m) in answers.iter().enumerate() {
        let up = u8::from(m.is_some());
        let _ = writeln!(out, "pushbroker_shard_up{{shard=\"{i}\"}} {up}");
    }

    let up: Vec<(usize, &ShardReport)> = answers
        .iter()
        .enumerate()
        .filter_map(|(i, m)| m.as_ref().map(|m| (i, m)))
        .collect();
    for (name, kind, help, value) in PER_SHARD {
        family(&mut out, name, kind, help);
        for &(i, m) in &up {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", value(m));
        }
    }

    family(
        &mut out,
        "pushbroker_deliveries_total",
        "counter",
        "Exchanges fed to sessions, by feed.",
    );
    for &(i, m) in &up {
        for (feed, n) in [
            ("broadcast", m.broker.delivery.broadcast_feeds),
            ("unicast", m.broker.delivery.unicast_feeds),
        ] {
            let _ = writeln!(
                out,
                "pushbroker_deliveries_total{{shard=\"{i}\",feed=\"{feed}\"}} {n}"
            );
        }
    }

    family(
        &mut out,
        "pushbroker_migrations_total",
        "counter",
        "Device connections moved between shards, by direction.",
    );
    for &(i, m) in &up {
        for (direction, n) in [
            ("in", m.connections.migrations_in),
            ("out", m.connections.migrations_out),
        ] {
            let _ = writeln!(
                out,
                "pushbroker_migrations_total{{shard=\"{i}\",direction=\"{direction}\"}} {n}"
            );
        }
    }

    family(
        &mut out,
        "pushbroker_api_errors_total",
        "counter",
        "HTTP API error answers, by label, over every shard.",
    );
    for (label, n) in Figures::total(answers).api_errors {
        let label = escape_label(label);
        let _ = writeln!(out, "pushbroker_api_errors_total{{label=\"{label}\"}} {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::DeliveryStats;

    fn shard(i: usize, errors: Vec<(&'static str, u64)>) -> ShardReport {
        ShardReport {
            broker: ShardMetrics {
                shard: i,
                sessions: 2 + i,
                delivery: DeliveryStats {
                    registrations: 10,
                    broadcast_fanouts: 3,
                    broadcast_feeds: 4,
                    unicast_feeds: 5,
                    refused_feeds: 1,
                },
                broadcasts: 6,
                unicasts: 7,
                store: crate::store::StoreStats {
                    commits: 16,
                    records: 17,
                    log_bytes: 18,
                    compactions: 0,
                    unavailable: true,
                },
            },
            api: ApiCounts {
                requests: 11,
                errors,
            },
            connections: ConnectionCounts {
                rejected_devices: 12,
                rejected_http: 13,
                device_accept_errors: 14,
                http_accept_errors: 15,
                migrations_in: 8,
                migrations_out: 9,
            },
        }
    }

    #[test]
    fn prometheus_text_has_every_family_and_sums_errors_over_shards() {
        let answers = [
            Some(shard(0, vec![("invalid-request", 2), ("unknown-token", 1)])),
            None,
            Some(shard(2, vec![("invalid-request", 3)])),
        ];
        let text = prometheus(&answers);
        for line in [
            "pushbroker_shards 3",
            "pushbroker_shard_up{shard=\"0\"} 1",
            "pushbroker_shard_up{shard=\"1\"} 0",
            "pushbroker_sessions{shard=\"0\"} 2",
            "pushbroker_sessions{shard=\"2\"} 4",
            "pushbroker_deliveries_total{shard=\"2\",feed=\"broadcast\"} 4",
            "pushbroker_deliveries_total{shard=\"2\",feed=\"unicast\"} 5",
            "pushbroker_broadcasts_total{shard=\"0\"} 6",
            "pushbroker_unicasts_total{shard=\"0\"} 7",
            "pushbroker_migrations_total{shard=\"0\",direction=\"in\"} 8",
            "pushbroker_migrations_total{shard=\"0\",direction=\"out\"} 9",
            "pushbroker_api_requests_total{shard=\"2\"} 11",
            "pushbroker_rejected_device_connections_total{shard=\"0\"} 12",
            "pushbroker_rejected_http_connections_total{shard=\"2\"} 13",
            "pushbroker_device_accept_errors_total{shard=\"0\"} 14",
            "pushbroker_http_accept_errors_total{shard=\"2\"} 15",
            "pushbroker_store_commits_total{shard=\"0\"} 16",
            "pushbroker_store_records_total{shard=\"2\"} 17",
            "pushbroker_store_log_bytes{shard=\"0\"} 18",
            "pushbroker_store_unavailable{shard=\"2\"} 1",
            "# TYPE pushbroker_store_log_bytes gauge",
            "pushbroker_api_errors_total{label=\"invalid-request\"} 5",
            "pushbroker_api_errors_total{label=\"unknown-token\"} 1",
            "# TYPE pushbroker_api_errors_total counter",
            "# TYPE pushbroker_sessions gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.contains("shard=\"1\""))
                .collect::<Vec<_>>(),
            ["pushbroker_shard_up{shard=\"1\"} 0"],
            "no samples for a silent shard"
        );
        assert!(text.ends_with('\n'));
        // Every sample line is `name{labels} value` or `name value`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = l.rsplit_once(' ').expect("a value");
            value.parse::<u64>().expect("an integer value");
        }
    }

    #[test]
    fn stats_show_each_shard_and_totals() {
        let answers = [Some(shard(0, vec![("internal", 1)])), None];
        let json = serde_json::to_value(Stats::new(&answers)).expect("JSON");
        assert_eq!(json["shards"][0]["shard"], 0);
        assert_eq!(json["shards"][0]["up"], true);
        assert_eq!(json["shards"][0]["sessions"], 2);
        assert_eq!(json["shards"][0]["api_errors"]["internal"], 1);
        assert_eq!(
            json["shards"][1],
            serde_json::json!({"shard": 1, "up": false})
        );
        assert_eq!(json["totals"]["unicast_deliveries"], 5);
        assert_eq!(json["totals"]["api_requests"], 11);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
