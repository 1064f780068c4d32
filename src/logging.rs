//! The log line format that deployment tools parse (PROTOCOL.md §4):
//! `YYYY/MM/DD HH:MM:SS.uuuuuu LEVEL message`, one line per event, written at once.
//!
//! Only binaries install a subscriber ([`init`]); the library just emits `tracing` events.

use std::fmt;

use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The filter used when `RUST_LOG` is not set: INFO and above, plus the DEBUG session
/// lines (`session(ID) connected …`, `… ended with: …`) that tools wait for; other
/// per-request detail (API requests, broker internals) only when asked for, so a busy
/// server does not write a line per request.
pub const DEFAULT_FILTER: &str = "info,pushbroker::server::listener=debug";

/// Formats events as `YYYY/MM/DD HH:MM:SS.uuuuuu LEVEL message key=value…`.
#[derive(Debug, Clone, Copy)]
pub struct LineFormat {
    /// The local time zone's offset, read once at start-up (reading it later, with
    /// threads running, is not reliable).
    offset: UtcOffset,
}

impl LineFormat {
    /// A format in the local time zone (UTC when it cannot be known).
    pub fn new() -> Self {
        Self {
            offset: UtcOffset::current_local_offset().unwrap_or(UtcOffset::UTC),
        }
    }
}

impl Default for LineFormat {
    fn default() -> Self {
        Self::new()
    }
}

fn level_word(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => "INFO",
        Level::WARN => "WARN",
        Level::ERROR => "ERROR",
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let now = OffsetDateTime::now_utc().to_offset(self.offset);
        let stamp = now
            .format(format_description!(
                "[year]/[month]/[day] [hour]:[minute]:[second].[subsecond digits:6]"
            ))
            .map_err(|_| fmt::Error)?;
        write!(writer, "{stamp} {} ", level_word(event.metadata().level()))?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the line format on stderr for the whole process, filtered by `RUST_LOG`
/// (default [`DEFAULT_FILTER`]).
///
/// # Errors
/// When a subscriber is already installed.
pub fn init() -> Result<(), tracing::subscriber::SetGlobalDefaultError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .fmt_fields(DefaultFields::new())
        .event_format(LineFormat::new())
        .finish();
    tracing::subscriber::set_global_default(subscriber)
}
