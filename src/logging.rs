//! The log line format that deployment tools parse (docs/protocol.md §4.3):
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
        // A write error (stderr a closed pipe: a log shipper that died) drops the line.
        // Reporting it would print to that same stderr, which panics.
        .log_internal_errors(false)
        .fmt_fields(DefaultFields::new())
        .event_format(LineFormat::new())
        .finish();
    tracing::subscriber::set_global_default(subscriber)
}

/// The longest part of a device-supplied string a log line shows.
pub const MAX_LOGGED_LEN: usize = 128;

/// A string from a device or an API client, made safe for a log line.
///
/// An ordinary identifier (1 to [`MAX_LOGGED_LEN`] printable ASCII characters, no blank,
/// quote or backslash) is written as it is, so the line shapes tools parse hold. Anything
/// else is written quoted with Rust's escapes (`"\n"`, `"\u{7f}"`, …): an empty string is
/// `""`, and a control character can never start a line of its own. Past
/// [`MAX_LOGGED_LEN`] characters it is cut, and the line says how long it was.
#[derive(Debug, Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let plain = !s.is_empty()
            && s.len() <= MAX_LOGGED_LEN
            && s.bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if plain {
            return f.write_str(s);
        }
        f.write_str("\"")?;
        let mut chars = s.chars();
        for c in chars.by_ref().take(MAX_LOGGED_LEN) {
            fmt::Display::fmt(&c.escape_debug(), f)?;
        }
        f.write_str("\"")?;
        if chars.next().is_some() {
            write!(f, "... ({} bytes)", s.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_ids_are_written_as_they_are() {
        for id in [
            "dev-1",
            "0123456789abcdef",
            "a:b/c_d.e",
            &"x".repeat(MAX_LOGGED_LEN),
        ] {
            assert_eq!(Untrusted(id).to_string(), id);
        }
    }

    #[test]
    fn control_characters_quotes_and_blanks_are_escaped_inside_quotes() {
        assert_eq!(Untrusted("").to_string(), r#""""#);
        assert_eq!(Untrusted("a b").to_string(), r#""a b""#);
        let forged = "x\n2026/01/01 00:00:00.000000 INFO listening for devices on 1.2.3.4:1";
        let logged = Untrusted(forged).to_string();
        assert!(!logged.contains('\n'), "{logged}");
        assert!(logged.starts_with(r#""x\n2026"#), "{logged}");
        assert_eq!(
            Untrusted("q\"\\\r\u{7f}é").to_string(),
            r#""q\"\\\r\u{7f}é""#
        );
    }

    #[test]
    fn long_strings_are_cut_and_say_their_length() {
        let long = "y".repeat(65_000);
        let logged = Untrusted(&long).to_string();
        assert_eq!(
            logged,
            format!("\"{}\"... (65000 bytes)", "y".repeat(MAX_LOGGED_LEN))
        );
        // No line is ever longer than the cut allows, whatever the characters.
        let wide = "\u{1}".repeat(10_000);
        assert!(Untrusted(&wide).to_string().len() < 8 * MAX_LOGGED_LEN);
    }
}
