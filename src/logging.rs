//! The server's log lines: their formats, targets and filter.
//!
//! Only binaries install a subscriber ([`init`]); the library just emits `tracing` events.
//!
//! # Formats
//!
//! One line per event, written at once, in one of two formats ([`LogFormat`]):
//!
//! - text ([`LineFormat`], the default): `YYYY/MM/DD HH:MM:SS.uuuuuu LEVEL message
//!   key=value…`, the shape deployment tools parse (docs/protocol.md §4.3). Its time is
//!   local time without an offset, as the original server wrote it, so that those tools
//!   keep working. The server's events record their fields for display
//!   (`peer=1.2.3.4:5`, never `peer=Some(…)`), strings from devices and API clients
//!   through [`Untrusted`].
//! - JSON ([`JsonFormat`]): an object per line with `timestamp` (RFC 3339 in UTC with
//!   microseconds, `2026-01-02T03:04:05.123456Z`), `level`, `target`, `message` and the
//!   event's fields as JSON values, for log collectors.
//!
//! # Targets
//!
//! Every event names one of a fixed set of targets, whatever module emits it, so that a
//! `RUST_LOG` filter keeps selecting the same lines when code moves:
//!
//! | target | lines |
//! |---|---|
//! | `pushbroker::session` ([`target::SESSION`]) | `session(ID) connected …`, `… registered …`, `… ended with: …` |
//! | `pushbroker::api` ([`target::API`]) | a line per HTTP request and connection (DEBUG) |
//! | `pushbroker::broker` ([`target::BROKER`]) | broker internals: registrations, full queues, shards, store errors |
//! | `pushbroker::server` ([`target::SERVER`]) | `listening for …`, start, accept failures, connection limits |
//!
//! The default filter, [`DEFAULT_FILTER`], is INFO and above plus the DEBUG session lines.
//! `RUST_LOG` replaces it; one that does not parse is an error ([`parse_filter`]).

use std::fmt;

use serde::Serialize;
use serde::ser::SerializeMap as _;
use thiserror::Error;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};
use tracing::field::{Field, Visit};
use tracing::{Dispatch, Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// The targets of the server's log lines: a fixed set, named in `RUST_LOG` filters.
///
/// Every event the library emits names one of these explicitly
/// (`debug!(target: target::SESSION, …)`), so a filter selects the same lines whichever
/// file emits them.
pub mod target {
    /// A device session's lines: `session(ID) connected PEERADDR`,
    /// `session(ID) registered DEVICEID`, `session(ID) ended with: REASON`.
    pub const SESSION: &str = "pushbroker::session";
    /// The HTTP API: a line per request and per connection, at DEBUG.
    pub const API: &str = "pushbroker::api";
    /// Broker internals: registrations, full session queues, shards starting, stopping
    /// and failing, store errors.
    pub const BROKER: &str = "pushbroker::broker";
    /// The server around them: `listening for …`, start, accept failures, connection
    /// limits.
    pub const SERVER: &str = "pushbroker::server";
}

/// The filter used when `RUST_LOG` is not set: INFO and above, plus the DEBUG
/// [`target::SESSION`] lines (`session(ID) connected …`, `… ended with: …`) that tools
/// wait for; other per-request detail (API requests, broker internals) only when asked
/// for, so a busy server does not write a line per request.
pub const DEFAULT_FILTER: &str = "info,pushbroker::session=debug";

/// Formats events as `YYYY/MM/DD HH:MM:SS.uuuuuu LEVEL message key=value…`, the time in
/// the local time zone without an offset (as the original server wrote it).
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

/// Formats events as one JSON object per line: `timestamp` (RFC 3339 in UTC, with
/// microseconds: `2026-01-02T03:04:05.123456Z`), `level` (`INFO`, …), `target` (one of
/// [`target`]), `message`, then the event's fields, each as a JSON value (numbers and
/// booleans as such, anything else as a string). A field named like one of the first
/// four keys is written as `field.NAME`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonFormat;

/// The keys [`JsonFormat`] writes before an event's fields.
const JSON_KEYS: [&str; 4] = ["timestamp", "level", "target", "message"];

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let stamp = OffsetDateTime::now_utc()
            .format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
            ))
            .map_err(|_| fmt::Error)?;
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let line = JsonLine {
            timestamp: &stamp,
            level: level_word(event.metadata().level()),
            target: event.metadata().target(),
            fields: &fields,
        };
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writer.write_str(&text)?;
        writeln!(writer)
    }
}

/// An event's fields as JSON values, its message apart.
#[derive(Debug, Default)]
struct JsonFields {
    message: String,
    fields: Vec<(&'static str, serde_json::Value)>,
}

impl JsonFields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        if field.name() == "message" {
            self.message = match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
        } else {
            self.fields.push((field.name(), value));
        }
    }
}

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%x` fields arrive here too, formatted with their Display.
        self.put(field, format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        let value = i64::try_from(value).map_or_else(|_| value.to_string().into(), Into::into);
        self.put(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        let value = u64::try_from(value).map_or_else(|_| value.to_string().into(), Into::into);
        self.put(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity.
        let value = serde_json::Number::from_f64(value)
            .map_or_else(|| value.to_string().into(), serde_json::Value::Number);
        self.put(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
}

/// One line of [`JsonFormat`], its keys in order.
struct JsonLine<'a> {
    timestamp: &'a str,
    level: &'static str,
    target: &'a str,
    fields: &'a JsonFields,
}

impl Serialize for JsonLine<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(JSON_KEYS.len() + self.fields.fields.len()))?;
        map.serialize_entry("timestamp", self.timestamp)?;
        map.serialize_entry("level", self.level)?;
        map.serialize_entry("target", self.target)?;
        map.serialize_entry("message", &self.fields.message)?;
        for (name, value) in &self.fields.fields {
            if JSON_KEYS.contains(name) {
                map.serialize_entry(&format!("field.{name}"), value)?;
            } else {
                map.serialize_entry(name, value)?;
            }
        }
        map.end()
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// [`LineFormat`]: the plain lines deployment tools parse, in local time.
    #[default]
    Text,
    /// [`JsonFormat`]: a JSON object per line, in UTC, for log collectors.
    Json,
}

/// A subscriber writing `format` lines to `writer`, filtered by `filter`.
fn dispatch<W>(filter: EnvFilter, format: LogFormat, writer: W) -> Dispatch
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // A write error (stderr a closed pipe: a log shipper that died) drops the line.
        // Reporting it would print to that same stderr, which panics.
        .log_internal_errors(false)
        .fmt_fields(DefaultFields::new());
    match format {
        LogFormat::Text => Dispatch::new(builder.event_format(LineFormat::new()).finish()),
        LogFormat::Json => Dispatch::new(builder.event_format(JsonFormat).finish()),
    }
}

/// A log filter that cannot be used.
#[derive(Debug, Error)]
pub enum FilterError {
    /// The filter is not UTF-8.
    #[error("not UTF-8")]
    NotUnicode,
    /// One of its comma-separated directives does not parse.
    #[error("cannot parse directive {directive:?}: {reason}")]
    Directive {
        /// The directive as written.
        directive: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why logging could not be set up.
#[derive(Debug, Error)]
pub enum InitError {
    /// `RUST_LOG` is not a filter.
    #[error("bad RUST_LOG")]
    Filter(#[from] FilterError),
    /// Another subscriber was installed first.
    #[error("cannot install the log subscriber")]
    Install(#[from] tracing::subscriber::SetGlobalDefaultError),
}

/// Parses a `RUST_LOG` filter (`info,pushbroker::api=debug`): [`DEFAULT_FILTER`] when it
/// is empty or blank, else its comma-separated directives, blanks around them ignored.
///
/// # Errors
/// The first directive that does not parse, by name: a mistyped filter is an error, never
/// silently a filter other than the one meant.
pub fn parse_filter(spec: &str) -> Result<EnvFilter, FilterError> {
    let directives: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return parse_filter(DEFAULT_FILTER);
    }
    let bad = |directive: &str, e: tracing_subscriber::filter::ParseError| FilterError::Directive {
        directive: directive.to_owned(),
        reason: e.to_string(),
    };
    for directive in &directives {
        EnvFilter::builder()
            .parse(directive)
            .map_err(|e| bad(directive, e))?;
    }
    EnvFilter::builder()
        .parse(directives.join(","))
        .map_err(|e| bad(spec, e))
}

/// The filter `RUST_LOG` asks for: [`DEFAULT_FILTER`] when it is unset or empty.
///
/// # Errors
/// When it is set to something [`parse_filter`] refuses.
pub fn filter_from_env() -> Result<EnvFilter, FilterError> {
    match std::env::var_os(EnvFilter::DEFAULT_ENV) {
        None => parse_filter(DEFAULT_FILTER),
        Some(spec) => parse_filter(spec.to_str().ok_or(FilterError::NotUnicode)?),
    }
}

/// Installs `format` on stderr for the whole process, filtered by `RUST_LOG` (default
/// [`DEFAULT_FILTER`]).
///
/// # Errors
/// When `RUST_LOG` is not a filter ([`parse_filter`]), or a subscriber is already
/// installed.
pub fn init(format: LogFormat) -> Result<(), InitError> {
    let filter = filter_from_env()?;
    tracing::dispatcher::set_global_default(dispatch(filter, format, std::io::stderr))?;
    Ok(())
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::broker::testing::LogCapture;

    /// The lines `emit` logs in `format` under `filter`.
    fn logged_as(format: LogFormat, filter: &str, emit: impl FnOnce()) -> String {
        let capture = LogCapture::new();
        let filter = parse_filter(filter).unwrap();
        tracing::dispatcher::with_default(&dispatch(filter, format, capture.clone()), || {
            // Call sites first hit on threads without a subscriber may have cached
            // "never"; make them ask this one.
            tracing::callsite::rebuild_interest_cache();
            emit();
        });
        capture.captured()
    }

    /// The lines `emit` logs as text under `filter`.
    fn logged_under(filter: &str, emit: impl FnOnce()) -> String {
        logged_as(LogFormat::Text, filter, emit)
    }

    #[test]
    fn the_default_filter_shows_session_lines_and_hides_request_detail() {
        let log = logged_under(DEFAULT_FILTER, || {
            tracing::debug!(target: target::SESSION, "session(7) connected 127.0.0.1:5");
            tracing::debug!(target: target::API, status = 200, "api request");
            tracing::debug!(target: target::BROKER, "registered with broker");
            tracing::debug!(target: target::SERVER, "server started");
            tracing::info!(target: target::SERVER, "listening for http on 127.0.0.1:8080");
        });
        assert!(
            log.contains(" DEBUG session(7) connected 127.0.0.1:5\n"),
            "{log}"
        );
        assert!(
            log.contains(" INFO listening for http on 127.0.0.1:8080\n"),
            "{log}"
        );
        assert_eq!(log.lines().count(), 2, "{log}");
    }

    #[test]
    fn a_filter_on_a_target_selects_its_lines() {
        let filter = format!("warn,{}=debug", target::API);
        let log = logged_under(&filter, || {
            tracing::debug!(target: target::SESSION, "session(7) connected 127.0.0.1:5");
            tracing::debug!(target: target::API, "api request");
        });
        assert!(log.contains(" DEBUG api request\n"), "{log}");
        assert_eq!(log.lines().count(), 1, "{log}");
    }

    #[test]
    fn text_lines_keep_their_shape() {
        let log = logged_under("debug", || {
            let peer: std::net::SocketAddr = ([10, 1, 2, 3], 4567).into();
            tracing::debug!(
                target: target::API,
                peer = Some(tracing::field::display(peer)),
                status = 200,
                "http connection closed"
            );
        });
        let (stamp, rest) = log.split_at(27);
        assert_eq!(
            stamp.replace(|c: char| c.is_ascii_digit(), "#"),
            "####/##/## ##:##:##.###### "
        );
        assert_eq!(
            rest,
            "DEBUG http connection closed peer=10.1.2.3:4567 status=200\n"
        );
    }

    #[test]
    fn json_lines_are_objects_with_the_event_and_its_fields() {
        let log = logged_as(LogFormat::Json, "debug", || {
            let peer: std::net::SocketAddr = ([10, 1, 2, 3], 4567).into();
            tracing::info!(
                target: target::SESSION,
                peer = %peer,
                absent = None::<u8>,
                status = 200u16,
                late = -3i64,
                ok = true,
                ratio = 0.5,
                path = "/a b",
                shown = ?Some(1),
                level = "mine",
                "session({}) registered {}",
                7,
                Untrusted("dev\n1")
            );
        });
        assert_eq!(log.matches('\n').count(), 1, "one line: {log}");
        assert!(log.ends_with('\n'), "{log}");
        let line: serde_json::Value = serde_json::from_str(&log).unwrap();
        let object = line.as_object().unwrap();
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        let mut want = vec![
            "timestamp",
            "level",
            "target",
            "message",
            "peer",
            "status",
            "late",
            "ok",
            "ratio",
            "path",
            "shown",
            "field.level",
        ];
        want.sort_unstable();
        assert_eq!(keys, want, "{log}");
        // The keys come in a fixed order, the event's own first.
        assert!(log.starts_with(r#"{"timestamp":""#), "{log}");
        assert!(
            log.contains(r#"","level":"INFO","target":"pushbroker::session","message":"#),
            "{log}"
        );
        assert_eq!(line["message"], r#"session(7) registered "dev\n1""#);
        assert_eq!(line["peer"], "10.1.2.3:4567");
        assert_eq!(line["status"], 200);
        assert_eq!(line["late"], -3);
        assert_eq!(line["ok"], true);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(line["path"], "/a b");
        assert_eq!(line["shown"], "Some(1)");
        assert_eq!(line["field.level"], "mine");
        let stamp = line["timestamp"].as_str().unwrap();
        assert_eq!(
            stamp.replace(|c: char| c.is_ascii_digit(), "#"),
            "####-##-##T##:##:##.######Z"
        );
        let at =
            OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).unwrap();
        assert_eq!(at.offset(), UtcOffset::UTC);
        let off = (OffsetDateTime::now_utc() - at).abs();
        assert!(off < time::Duration::minutes(1), "{stamp} is not now");
    }

    #[test]
    fn json_messages_and_fields_cannot_break_the_line() {
        let log = logged_as(LogFormat::Json, "debug", || {
            let forged = "x\n{\"level\":\"ERROR\"}\u{7f}\u{2028}";
            tracing::debug!(target: target::API, path = forged, "got {forged}");
        });
        assert_eq!(log.matches('\n').count(), 1, "one line: {log}");
        let line: serde_json::Value = serde_json::from_str(&log).unwrap();
        assert_eq!(line["level"], "DEBUG");
        assert_eq!(line["path"], "x\n{\"level\":\"ERROR\"}\u{7f}\u{2028}");
    }

    #[test]
    fn an_empty_or_blank_filter_is_the_default() {
        let default = parse_filter(DEFAULT_FILTER).unwrap().to_string();
        for spec in ["", "  ", ",", " , "] {
            assert_eq!(parse_filter(spec).unwrap().to_string(), default, "{spec:?}");
        }
    }

    #[test]
    fn blanks_around_directives_are_ignored() {
        assert_eq!(
            parse_filter(" info , pushbroker::api=debug ")
                .unwrap()
                .to_string(),
            parse_filter("info,pushbroker::api=debug")
                .unwrap()
                .to_string()
        );
    }

    #[test]
    fn a_bad_directive_is_an_error_naming_it() {
        for (spec, bad) in [
            ("pushbroker=notalevel", "pushbroker=notalevel"),
            (
                "info, pushbroker::api=verbose ,warn",
                "pushbroker::api=verbose",
            ),
            ("warn,pushbroker::session=5x", "pushbroker::session=5x"),
        ] {
            let err = parse_filter(spec).unwrap_err();
            let FilterError::Directive { directive, .. } = &err else {
                panic!("{err:?}");
            };
            assert_eq!(directive, bad);
            let message = err.to_string();
            assert!(message.contains(&format!("{bad:?}")), "{message}");
        }
        let message = parse_filter("pushbroker=notalevel")
            .unwrap_err()
            .to_string();
        assert!(message.contains("level"), "{message}");
    }

    /// Every event in the server's sources names one of [`target`]'s targets, so that
    /// filters do not depend on where a line is emitted.
    #[test]
    fn every_event_names_a_fixed_target() {
        const NAMES: [&str; 4] = ["SESSION", "API", "BROKER", "SERVER"];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        // The load generator is a client program of its own, not the server.
        let skip = root.join("bin").join("pushload");
        let mut files = Vec::new();
        let mut dirs = vec![root];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() && path != skip {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    files.push(path);
                }
            }
        }
        let mut events = 0;
        let mut untargeted = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            for level in ["trace", "debug", "info", "warn", "error"] {
                let call = format!("{level}!(");
                for (at, _) in text.match_indices(&call) {
                    let before = text[..at].chars().next_back();
                    if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                        continue;
                    }
                    events += 1;
                    let args = text[at + call.len()..].trim_start();
                    let named = args.strip_prefix("target:").is_some_and(|rest| {
                        let expr = rest.trim_start();
                        let expr = expr.strip_prefix("crate::logging::").unwrap_or(expr);
                        NAMES
                            .iter()
                            .any(|n| expr.starts_with(&format!("target::{n},")))
                    });
                    if !named {
                        let line = text[..at].lines().count();
                        untargeted.push(format!("{}:{line}", file.display()));
                    }
                }
            }
        }
        assert!(
            events > 30,
            "only {events} events found: is the scan right?"
        );
        assert!(
            untargeted.is_empty(),
            "events without a fixed target: {untargeted:#?}"
        );
    }

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
