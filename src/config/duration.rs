//! Go's duration syntax (`"10s"`, `"500ms"`, `"1m30s"`, `"0.5s"`), as the original
//! server's configuration and CONNACK's `PingInterval` use it.

use std::fmt::Write as _;
use std::time::Duration;

use thiserror::Error;

/// Why a duration string was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid duration {text:?}: {reason}")]
pub struct DurationError {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// Parses a Go duration: a sequence of decimal numbers, each with an optional fraction
/// and a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), such as `"300ms"` or `"1h2m3.5s"`;
/// `"0"` alone needs no unit. Negative durations are refused (none makes sense here),
/// except a negative zero such as `"-0s"`, which Go reads as zero.
///
/// Fractions are computed as Go's `time.ParseDuration` computes them (in `float64`,
/// then truncated), so every string gives the same nanosecond count here as in Go:
/// `"0.3333333333333333333h"` is exactly 20 minutes. As in Go, durations longer than
/// about 292 years (`i64::MAX` nanoseconds) are refused, so no deadline computed from a
/// configured duration can overflow.
///
/// ```
/// use std::time::Duration;
/// use pushbroker::config::parse_go_duration;
///
/// assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
/// assert!(parse_go_duration("5").is_err()); // a unit is required
/// ```
///
/// # Errors
/// A [`DurationError`] saying what is wrong.
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        text: text.to_owned(),
        reason,
    };
    let mut s = text;
    let mut negative = false;
    if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    } else if let Some(rest) = s.strip_prefix('-') {
        negative = true;
        s = rest;
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(err("empty"));
    }
    let mut total: u128 = 0;
    while !s.is_empty() {
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, rest) = s.split_at(int_len);
        let (frac_part, rest) = match rest.strip_prefix('.') {
            Some(r) => {
                let n = r.bytes().take_while(u8::is_ascii_digit).count();
                r.split_at(n)
            }
            None => ("", rest),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(err("expected a number"));
        }
        let unit_len = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(rest.len(), |(i, _)| i);
        let (unit, rest) = rest.split_at(unit_len);
        if unit.is_empty() {
            return Err(err("missing unit"));
        }
        let scale = unit_nanos(unit).ok_or_else(|| err("unknown unit"))?;
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| err("number too large"))?
        };
        let mut nanos = int.checked_mul(scale).ok_or_else(|| err("overflow"))?;
        let (frac, frac_scale) = leading_fraction(frac_part);
        if frac > 0 {
            // Go's `float64(f) * (float64(unit) / scale)`, truncated: the same IEEE
            // operations in the same order give the same nanosecond as Go. The product
            // is at most 3.6e12 (one hour), so the cast back neither saturates nor wraps.
            let fraction_nanos = (frac as f64 * (scale as f64 / frac_scale)) as u128;
            nanos = nanos
                .checked_add(fraction_nanos)
                .ok_or_else(|| err("overflow"))?;
        }
        total = total.checked_add(nanos).ok_or_else(|| err("overflow"))?;
        s = rest;
    }
    if negative && total != 0 {
        return Err(err("negative durations are not allowed"));
    }
    // Go's durations are an i64 of nanoseconds (about 292 years): refuse longer ones, so
    // no deadline computed from a configured duration can overflow.
    if total > i64::MAX as u128 {
        return Err(err("overflow"));
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| err("overflow"))?;
    // The remainder is below 10^9: it fits.
    let sub = u32::try_from(total % 1_000_000_000).unwrap_or(0);
    Ok(Duration::new(secs, sub))
}

/// Go's `leadingFraction`: the fraction's digits as an integer and `10^digits` as a
/// float, ignoring the digits past the point where the integer would exceed `2^63`.
/// `digits` holds ASCII digits only.
fn leading_fraction(digits: &str) -> (u64, f64) {
    let mut value: u64 = 0;
    let mut scale = 1.0_f64;
    for b in digits.bytes() {
        if value > ((1 << 63) - 1) / 10 {
            break;
        }
        // `value * 10 + 9` stays below 2^64 given the check above.
        let next = value * 10 + u64::from(b - b'0');
        if next > 1 << 63 {
            break;
        }
        value = next;
        scale *= 10.0;
    }
    (value, scale)
}

/// Formats a duration as Go's `Duration.String` does: `"10s"`, `"500ms"`, `"1m30s"`,
/// `"1h0m0s"`, `"1.5s"`, `"0s"`.
pub fn format_go_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    if nanos < 1_000_000_000 {
        // Below a second: one unit, with a fraction.
        let (scale, unit) = if nanos < 1_000 {
            (1, "ns")
        } else if nanos < 1_000_000 {
            (1_000, "\u{b5}s")
        } else {
            (1_000_000, "ms")
        };
        push_fraction(&mut out, nanos, scale);
        out.push_str(unit);
        return out;
    }
    let hours = nanos / 3_600_000_000_000;
    let minutes = (nanos / 60_000_000_000) % 60;
    let sec_nanos = nanos % 60_000_000_000;
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    push_fraction(&mut out, sec_nanos, 1_000_000_000);
    out.push('s');
    out
}

/// Writes `value / scale` with its fraction, trailing zeros trimmed.
fn push_fraction(out: &mut String, value: u128, scale: u128) {
    let _ = write!(out, "{}", value / scale);
    let frac = value % scale;
    if frac > 0 {
        let width = scale.ilog10() as usize;
        let digits = format!("{frac:0width$}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::{format_go_duration, parse_go_duration};

    const NS: u64 = 1;
    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    const M: u64 = 60 * S;
    const H: u64 = 60 * M;

    fn parsed(text: &str) -> Duration {
        match parse_go_duration(text) {
            Ok(d) => d,
            Err(e) => panic!("{text:?} should parse: {e}"),
        }
    }

    #[test]
    fn parses_the_forms_the_configuration_uses() {
        let cases: &[(&str, u64)] = &[
            ("10s", 10 * S),
            ("500ms", 500 * MS),
            ("1m30s", 90 * S),
            ("0.5s", S / 2),
            ("1h2m3.5s", H + 2 * M + 3 * S + S / 2),
            ("100us", 100 * US),
            ("1\u{b5}s", US),
            ("1\u{3bc}s", US),
            ("0", 0),
            ("+5s", 5 * S),
        ];
        for &(text, nanos) in cases {
            assert_eq!(parsed(text), Duration::from_nanos(nanos), "{text:?}");
        }
    }

    /// The accepted cases of Go's `TestParseDuration` (`src/time/time_test.go`), minus the
    /// negative ones.
    #[test]
    fn parses_as_go_does() {
        let cases: &[(&str, u64)] = &[
            ("0", 0),
            ("5s", 5 * S),
            ("30s", 30 * S),
            ("1478s", 1478 * S),
            ("+5s", 5 * S),
            ("+0", 0),
            ("5.0s", 5 * S),
            ("5.6s", 5 * S + 600 * MS),
            ("5.s", 5 * S),
            (".5s", 500 * MS),
            ("1.0s", S),
            ("1.00s", S),
            ("1.004s", S + 4 * MS),
            ("1.0040s", S + 4 * MS),
            ("100.00100s", 100 * S + MS),
            ("10ns", 10 * NS),
            ("11us", 11 * US),
            ("12\u{b5}s", 12 * US),
            ("12\u{3bc}s", 12 * US),
            ("13ms", 13 * MS),
            ("14s", 14 * S),
            ("15m", 15 * M),
            ("16h", 16 * H),
            ("3h30m", 3 * H + 30 * M),
            ("10.5s4m", 4 * M + 10 * S + 500 * MS),
            (
                "1h2m3s4ms5us6ns",
                H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS,
            ),
            ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
            ("52763797000ns", 52_763_797_000 * NS),
            ("0.3333333333333333333h", 20 * M),
            ("9007199254740993ns", (1 << 53) + 1),
            ("9223372036854775807ns", (1 << 63) - 1),
            ("9223372036854775.807us", (1 << 63) - 1),
            ("9223372036s854ms775us807ns", (1 << 63) - 1),
            ("0.100000000000000000000h", 6 * M),
            (
                "0.830103483285477580700h",
                49 * M + 48 * S + 372_539_827 * NS,
            ),
        ];
        for &(text, nanos) in cases {
            assert_eq!(parsed(text), Duration::from_nanos(nanos), "{text:?}");
        }
    }

    #[test]
    fn negative_zero_is_zero_as_in_go() {
        assert_eq!(parsed("-0"), Duration::ZERO);
        assert_eq!(parsed("-0s"), Duration::ZERO);
        assert_eq!(parsed("-0.0m"), Duration::ZERO);
    }

    #[test]
    fn refuses_malformed_and_negative_durations() {
        for text in [
            "",
            "5",
            "-1s",
            "-.5s",
            "1x",
            "s",
            ".s",
            "+.s",
            "1.2.3s",
            "3000000h0x",
            "-",
            "+",
            "1s ",
            " 1s",
            "1 s",
            "1S",
            "1sec",
            "00",
        ] {
            let got = parse_go_duration(text);
            let Err(e) = got else {
                panic!("{text:?} should be refused, got {got:?}");
            };
            assert_eq!(e.text, text);
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let reason = |text| parse_go_duration(text).map_err(|e| e.reason);
        assert_eq!(reason(""), Err("empty"));
        assert_eq!(reason("5"), Err("missing unit"));
        assert_eq!(reason("1.2.3s"), Err("missing unit"));
        assert_eq!(reason("1x"), Err("unknown unit"));
        assert_eq!(reason("s"), Err("expected a number"));
        assert_eq!(reason(".s"), Err("expected a number"));
        assert_eq!(reason("-1s"), Err("negative durations are not allowed"));
    }

    /// Expected strings are Go's `Duration.String()` outputs (including the cases of Go's
    /// `TestDurationString`).
    #[test]
    fn formats_as_go_does() {
        let cases: &[(u64, &str)] = &[
            (0, "0s"),
            (NS, "1ns"),
            (999 * NS, "999ns"),
            (US, "1\u{b5}s"),
            (1100 * NS, "1.1\u{b5}s"),
            (2200 * US, "2.2ms"),
            (100 * MS, "100ms"),
            (500 * MS, "500ms"),
            (999_999_999, "999.999999ms"),
            (S, "1s"),
            (S + S / 2, "1.5s"),
            (3300 * MS, "3.3s"),
            (10 * S, "10s"),
            (S + US, "1.000001s"),
            (S + NS, "1.000000001s"),
            (90 * S, "1m30s"),
            (2 * M + 500 * MS, "2m0.5s"),
            (4 * M + 5 * S, "4m5s"),
            (4 * M + 5001 * MS, "4m5.001s"),
            (8 * M + NS, "8m0.000000001s"),
            (H, "1h0m0s"),
            (H + S, "1h0m1s"),
            (5 * H + 6 * M + 7001 * MS, "5h6m7.001s"),
            (100 * H, "100h0m0s"),
            ((1 << 63) - 1, "2562047h47m16.854775807s"),
        ];
        for &(nanos, text) in cases {
            assert_eq!(
                format_go_duration(Duration::from_nanos(nanos)),
                text,
                "{nanos}ns"
            );
        }
    }

    #[test]
    fn formatted_durations_parse_back() {
        let mut nanos = 1u64;
        while nanos < 400 * H {
            for n in [nanos, nanos + 1, nanos * 3 / 2, nanos * 7 + 13] {
                let d = Duration::from_nanos(n);
                assert_eq!(parse_go_duration(&format_go_duration(d)), Ok(d), "{n}ns");
            }
            nanos *= 10;
        }
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(nanos in 0..=i64::MAX as u64) {
            let d = Duration::from_nanos(nanos);
            prop_assert_eq!(parse_go_duration(&format_go_duration(d)), Ok(d));
        }

        #[test]
        fn durations_beyond_gos_range_are_refused(secs in (i64::MAX as u64 / 1_000_000_000 + 1)..u64::MAX) {
            let d = Duration::from_secs(secs);
            prop_assert!(parse_go_duration(&format_go_duration(d)).is_err());
        }

        #[test]
        fn small_durations_round_trip(nanos in 0u64..10 * H) {
            let d = Duration::from_nanos(nanos);
            prop_assert_eq!(parse_go_duration(&format_go_duration(d)), Ok(d));
        }

        #[test]
        fn parsing_never_panics(text in "[-+0-9.a-z\u{b5}\u{3bc}]{0,24}") {
            let _ = parse_go_duration(&text);
        }
    }
}
