//! The result of a run: one JSON object (`--json FILE`) and a short table.

use std::fmt::Write as _;
use std::net::SocketAddr;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::Options;

/// Percentiles of a latency histogram (recorded in µs), in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
}

impl Percentiles {
    /// The percentiles of `h`, or `None` when it is empty.
    pub(crate) fn of(h: &Histogram<u64>) -> Option<Self> {
        let ms = |us: u64| us as f64 / 1000.0;
        (!h.is_empty()).then(|| Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        })
    }
}

/// Everything a run found. Figures that could not be measured are `null` in JSON.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// No delivery missing, duplicated or wrong, every session connected, no error.
    pub(crate) ok: bool,
    pub(crate) scenario: String,
    /// Sessions that connected.
    pub(crate) sessions: u32,
    /// Sessions asked for.
    pub(crate) sessions_requested: u32,
    pub(crate) tls: bool,
    pub(crate) workers: u32,
    /// Deliveries of this run's payloads, each (device, item) counted once.
    pub(crate) deliveries: u64,
    /// Deliveries that should have happened.
    pub(crate) expected: u64,
    pub(crate) missing: u64,
    pub(crate) duplicates: u64,
    pub(crate) wrong: u64,
    /// Sessions lost, connections that failed, API calls that failed or were refused.
    pub(crate) errors: u64,
    /// The first few errors, in words.
    pub(crate) problems: Vec<String>,
    /// Per delivery from the POST (broadcast, unicast, churn); per session from connect
    /// to CONNACK (connect, idle).
    pub(crate) latency_ms: Option<Percentiles>,
    /// Per broadcast, from the POST until the last device had it.
    pub(crate) round_ms: Option<Percentiles>,
    /// Per session, from connect to CONNACK.
    pub(crate) connect_ms: Option<Percentiles>,
    pub(crate) server_cpu_us_per_delivery: Option<f64>,
    pub(crate) client_cpu_us_per_delivery: Option<f64>,
    pub(crate) server_cpu_us_per_connect: Option<f64>,
    pub(crate) connects_per_s: Option<f64>,
    pub(crate) server_rss_per_session_kb: Option<f64>,
    pub(crate) server_cpu_us_per_session_s: Option<f64>,
    pub(crate) notifies_per_s: Option<f64>,
    pub(crate) deliveries_per_s: Option<f64>,
    pub(crate) reconnects: Option<u64>,
    /// The measured phase: its length, and the CPU the server and pushload spent in it.
    pub(crate) phase_s: f64,
    pub(crate) server_cpu_s: Option<f64>,
    pub(crate) client_cpu_s: f64,
    /// The coordinator's share of `client_cpu_s` (the rest is the device workers').
    pub(crate) coordinator_cpu_s: f64,
    /// The device listeners the sessions were spread over (session i on the
    /// (i mod n)-th).
    pub(crate) devices: Vec<SocketAddr>,
    /// The APIs the calls were spread over.
    pub(crate) apis: Vec<String>,
    /// How notifies were spread over `apis` (`--api-spread`).
    pub(crate) api_spread: String,
    /// API calls made (notifies and broadcasts), per API in `apis` order.
    pub(crate) api_calls: Vec<u64>,
    /// The server processes measured; `server_cpu_s` and the RSS figures are their sums.
    pub(crate) pids: Vec<u32>,
    /// Each server process's share of `server_cpu_s`, in `pids` order (`null` where its
    /// CPU could not be read).
    pub(crate) server_cpu_s_per_pid: Vec<Option<f64>>,
}

impl Report {
    /// An empty report for a run with these options and `workers` worker processes.
    pub(crate) fn new(opts: &Options, workers: u32) -> Self {
        Report {
            ok: false,
            scenario: opts.scenario.name().to_owned(),
            sessions: 0,
            sessions_requested: opts.sessions,
            tls: opts.tls,
            workers,
            deliveries: 0,
            expected: 0,
            missing: 0,
            duplicates: 0,
            wrong: 0,
            errors: 0,
            problems: Vec::new(),
            latency_ms: None,
            round_ms: None,
            connect_ms: None,
            server_cpu_us_per_delivery: None,
            client_cpu_us_per_delivery: None,
            server_cpu_us_per_connect: None,
            connects_per_s: None,
            server_rss_per_session_kb: None,
            server_cpu_us_per_session_s: None,
            notifies_per_s: None,
            deliveries_per_s: None,
            reconnects: None,
            phase_s: 0.0,
            server_cpu_s: None,
            client_cpu_s: 0.0,
            coordinator_cpu_s: 0.0,
            devices: Vec::new(),
            apis: Vec::new(),
            api_spread: String::new(),
            api_calls: Vec::new(),
            pids: Vec::new(),
            server_cpu_s_per_pid: Vec::new(),
        }
    }

    /// A short table for a person.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let num = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        let pct = |p: Option<Percentiles>| {
            p.map_or("-".to_owned(), |p| {
                format!(
                    "p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
                    p.p50, p.p90, p.p99, p.max
                )
            })
        };
        let mut row = |k: &str, v: String| {
            let _ = writeln!(out, "  {k:<28} {v}");
        };
        row(
            "result",
            format!(
                "{}  ({} scenario, {}{} sessions)",
                if self.ok { "ok" } else { "NOT OK" },
                self.scenario,
                self.sessions,
                if self.tls { " TLS" } else { "" }
            ),
        );
        row(
            "deliveries",
            format!(
                "{} of {} (missing {}, duplicates {}, wrong {}, errors {})",
                self.deliveries,
                self.expected,
                self.missing,
                self.duplicates,
                self.wrong,
                self.errors
            ),
        );
        let list = |items: Vec<String>| {
            if items.is_empty() {
                "-".to_owned()
            } else {
                items.join(", ")
            }
        };
        row(
            "server",
            format!(
                "devices {}; API {}; pids {}",
                list(self.devices.iter().map(ToString::to_string).collect()),
                list(self.apis.clone()),
                list(self.pids.iter().map(ToString::to_string).collect()),
            ),
        );
        if self.apis.len() > 1 {
            row(
                "API calls",
                format!(
                    "{} ({})",
                    list(self.api_calls.iter().map(ToString::to_string).collect()),
                    self.api_spread
                ),
            );
        }
        row("latency ms", pct(self.latency_ms));
        if self.round_ms.is_some() {
            row("broadcast round ms", pct(self.round_ms));
        }
        row("connects/s", num(self.connects_per_s));
        row("server CPU µs/connect", num(self.server_cpu_us_per_connect));
        row(
            "server CPU µs/delivery",
            num(self.server_cpu_us_per_delivery),
        );
        row(
            "client CPU µs/delivery",
            num(self.client_cpu_us_per_delivery),
        );
        row("server RSS KB/session", num(self.server_rss_per_session_kb));
        if self.server_cpu_us_per_session_s.is_some() {
            row(
                "server CPU µs/session-s",
                num(self.server_cpu_us_per_session_s),
            );
        }
        if self.notifies_per_s.is_some() {
            row("notifies/s", num(self.notifies_per_s));
        }
        if let Some(r) = self.reconnects {
            row("reconnects", r.to_string());
        }
        row(
            "measured phase",
            format!(
                "{:.2} s; server CPU {} s, pushload CPU {:.2} s ({:.2} s coordinator)",
                self.phase_s,
                num(self.server_cpu_s),
                self.client_cpu_s,
                self.coordinator_cpu_s
            ),
        );
        if self.pids.len() > 1 {
            row(
                "server CPU s per pid",
                list(self.server_cpu_s_per_pid.iter().map(|s| num(*s)).collect()),
            );
        }
        for p in &self.problems {
            row("problem", p.clone());
        }
        out
    }
}
