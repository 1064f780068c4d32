//! `pushload`: the load generator for servers speaking the Ubuntu Push protocol.
//!
//! It starts the server (`--server 'CMD ARGS'`, given a generated configuration file as
//! its last argument) or attaches to running ones (`--devices HOST:PORT --api URL`, each
//! a comma-separated list for several nodes), connects `--sessions` devices from worker
//! processes, drives a scenario through the HTTP API, checks every delivery (right
//! device, right payload, nothing missing, nothing twice), and reports latency and the
//! CPU and memory the server and pushload spent:
//!
//! ```text
//! pushload --server target/release/pushbroker --sessions 5000 --scenario broadcast --json out.json
//! ```
//!
//! Scenarios: `connect` (connects/s, server CPU per connect), `idle` (server memory per
//! session, CPU per session-second), `broadcast` (sequential broadcasts to every device),
//! `unicast` (notifies to random devices from keep-alive clients), `churn` (unicast while
//! devices disconnect and reconnect). Exit status: 0 when the run is ok, 1 when it is not,
//! 2 when it could not run.

mod http;
mod link;
mod procfs;
mod report;
mod run;
mod steady;
mod target;
mod wire;
mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

/// A load generator for Ubuntu Push servers that checks every delivery.
#[derive(Debug, Parser)]
#[command(version, about)]
pub(crate) struct Options {
    /// Start this server (whitespace-separated command and arguments); pushload appends the
    /// path of a generated JSON configuration, reads the ports from its log, and kills it
    /// at the end.
    #[arg(long, conflicts_with_all = ["devices", "api"])]
    server: Option<String>,
    /// Attach to a running server's device listener; several nodes' listeners
    /// comma-separated or repeated: session i connects to the (i mod n)-th, and
    /// reconnects there.
    #[arg(
        long,
        requires = "api",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    devices: Vec<SocketAddr>,
    /// The running server's HTTP API (`http://HOST:PORT`); several nodes' APIs
    /// comma-separated or repeated, used as --api-spread says. With two nodes A and B,
    /// `--devices B --api A` measures cross-node delivery and `--devices A --api A`
    /// same-node.
    #[arg(long, requires = "devices", value_delimiter = ',', value_name = "URL")]
    api: Vec<String>,
    /// How notifies are spread over the --api URLs: `round-robin` sends notify k to the
    /// (k mod m)-th; `same-node` sends a notify to the API listed at the same place as
    /// its device's --devices address (the same node), `cross-node` to the one listed
    /// next (another node); both need as many --api as --devices. Broadcasts always go
    /// to each API in turn.
    #[arg(long, value_enum, default_value_t = ApiSpread::RoundRobin)]
    api_spread: ApiSpread,
    /// With --devices: the server's process id, to measure its CPU and memory; several
    /// nodes' pids comma-separated or repeated, their CPU and memory summed.
    #[arg(long, requires = "devices", value_delimiter = ',')]
    pid: Vec<u32>,
    /// Device sessions.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    sessions: u32,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::Broadcast)]
    scenario: Scenario,
    /// Broadcasts, one after another (broadcast).
    #[arg(long, default_value_t = 20)]
    broadcasts: u32,
    /// Notifies (unicast, churn).
    #[arg(long, default_value_t = 10_000)]
    notifies: u32,
    /// Notifies per second, 0 for as fast as the clients go [churn: notifies spread over
    /// 10 seconds].
    #[arg(long, default_value_t = 0.0)]
    notify_rate: f64,
    /// Keep-alive HTTP clients sending notifies.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Connections in progress at once while connecting.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: u32,
    /// Devices speak TLS (server name `push-delivery`); with --server a certificate is
    /// generated.
    #[arg(long)]
    tls: bool,
    /// With --tls and --devices: the CA certificate (PEM) the server's chains to.
    #[arg(long, requires = "tls")]
    ca: Option<PathBuf>,
    /// Write the result as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Worker processes running the devices; each holds its share of the sessions'
    /// sockets, so use more where one process's open-files limit is below the sessions.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// Executor threads per worker. One is cheapest per delivery (fewer wake-ups); it
    /// keeps up with a server on every core of a small machine.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Seconds `idle` holds the sessions.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Reconnections per second while churning.
    #[arg(long, default_value_t = 200.0)]
    churn_rate: f64,
    /// Seed for picking notify targets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Extra keys for the generated server configuration, as a JSON object
    /// (e.g. '{"shards":1}').
    #[arg(long, value_parser = parse_object, default_value = "{}")]
    server_config: serde_json::Map<String, serde_json::Value>,
    /// Longest wait for any one step (server start, a device's CONNACK, connecting them
    /// all, an API answer, a broadcast round, the notifies beyond their pacing), in
    /// seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Internal: run as a worker process with this specification.
    #[arg(long, hide = true)]
    worker: Option<String>,
}

/// A load scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// Connect every session: connects/s and server CPU per connect.
    Connect,
    /// Hold every session: server memory per session and CPU per session-second.
    Idle,
    /// Sequential broadcasts to every session.
    Broadcast,
    /// Notifies to random sessions from keep-alive clients.
    Unicast,
    /// Unicast while sessions disconnect and reconnect.
    Churn,
}

/// How API calls are spread over several `--api` URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ApiSpread {
    /// Call k goes to the (k mod m)-th API.
    RoundRobin,
    /// A notify goes to the API of the node its device is connected to.
    SameNode,
    /// A notify goes to the API of the node after its device's.
    CrossNode,
}

impl ApiSpread {
    /// The spread's name on the command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ApiSpread::RoundRobin => "round-robin",
            ApiSpread::SameNode => "same-node",
            ApiSpread::CrossNode => "cross-node",
        }
    }
}

impl Scenario {
    /// The scenario's name on the command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Idle => "idle",
            Scenario::Broadcast => "broadcast",
            Scenario::Unicast => "unicast",
            Scenario::Churn => "churn",
        }
    }
}

/// Parses `--server-config`: a JSON object.
fn parse_object(s: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(s) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err("expected a JSON object".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[allow(clippy::print_stderr)]
fn fail(err: &anyhow::Error) -> ExitCode {
    eprintln!("pushload: {err:#}");
    ExitCode::from(2)
}

#[allow(clippy::print_stdout)]
fn main() -> ExitCode {
    let opts = Options::parse();
    if let Some(spec) = &opts.worker {
        let worker = serde_json::from_str(spec)
            .context("bad worker specification")
            .and_then(worker::main);
        return match worker {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    let report = match run::run(&opts) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    print!("{}", report.table());
    if let Some(path) = &opts.json {
        let written = serde_json::to_vec_pretty(&report)
            .map_err(anyhow::Error::from)
            .and_then(|json| {
                std::fs::write(path, json)
                    .with_context(|| format!("cannot write {}", path.display()))
            });
        if let Err(e) = written {
            return fail(&e);
        }
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
