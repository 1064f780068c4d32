//! `pushbroker`: runs the push server.
//!
//! `pushbroker CONFIG.json` reads the original server's configuration keys;
//! `pushbroker` alone runs the embedded default (devices on 127.0.0.1:9090 over plain TCP,
//! the HTTP API on 127.0.0.1:8080) and prints how to try it.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use pushbroker::config::{DEFAULT_CONFIG_JSON, ServerConfig};
use pushbroker::logging;
use pushbroker::server::Server;

/// How long shutdown waits for sessions to end before stopping the shards.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A push-notification server speaking the Ubuntu Push protocol.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file (JSON, the original server's keys); without it the embedded
    /// default runs.
    config: Option<PathBuf>,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// The format of the log lines on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// The values of `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// `YYYY/MM/DD HH:MM:SS.uuuuuu LEVEL message key=value…` in local time, the lines
    /// tools built for the original server parse.
    Text,
    /// One JSON object per line: timestamp (RFC 3339, UTC), level, target, message,
    /// fields.
    Json,
}

impl From<LogFormat> for logging::LogFormat {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => Self::Text,
            LogFormat::Json => Self::Json,
        }
    }
}

/// Writes `text` to stdout: what the user asked to see, not a log line.
fn say(text: &str) {
    let _ = writeln!(std::io::stdout(), "{text}");
}

/// Reports a fatal error and its causes on stderr.
fn fail(what: &str, err: &dyn std::error::Error) -> ExitCode {
    let mut msg = format!("pushbroker: {what}: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        msg.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    // Not eprintln!, which panics when stderr is gone.
    let _ = writeln!(std::io::stderr(), "{msg}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        say(DEFAULT_CONFIG_JSON.trim_end());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = logging::init(cli.log_format.into()) {
        return fail("cannot set up logging", &e);
    }
    let config = match &cli.config {
        Some(path) => match ServerConfig::load(path) {
            Ok(c) => c,
            Err(e) => return fail(&format!("bad configuration {}", path.display()), &e),
        },
        None => ServerConfig::embedded_default(),
    };
    let embedded = cli.config.is_none();
    let run = Server::run_until_signal(&config, SHUTDOWN_GRACE, |server| {
        if embedded {
            let http = server.http_addr();
            say(&format!(
                "pushbroker runs the embedded default configuration (see --print-default-config).\n\
                 Devices connect to {devices} (plain TCP); the HTTP API is on {http}. Try:\n\
                 \n  curl -s -X POST -H 'Content-Type: application/json' \\\n\
                 \x20   -d '{{\"deviceid\":\"dev-1\",\"appid\":\"com.example.app_app\"}}' http://{http}/register\n\
                 \x20 curl -s -X POST -H 'Content-Type: application/json' \\\n\
                 \x20   -d '{{\"channel\":\"system\",\"expire_on\":\"2099-01-01T00:00:00Z\",\"data\":{{\"daily/mako\":[1]}}}}' http://{http}/broadcast\n\
                 \x20 curl -s http://{http}/delivery-hosts\n\
                 \nStop with Ctrl-C.",
                devices = server.device_addr(),
            ));
        }
    });
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("cannot start", &e),
    }
}
