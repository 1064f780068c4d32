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
/// `"0"` alone needs no unit. Negative durations are refused (none makes sense here).
///
/// # Errors
/// A [`DurationError`] saying what is wrong.
pub fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        text: text.to_owned(),
        reason,
    };
    let mut s = text;
    if let Some(rest) = s.strip_prefix('+') {
        s = rest;
    } else if s.starts_with('-') {
        return Err(err("negative durations are not allowed"));
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
        if !frac_part.is_empty() {
            // Up to 18 fraction digits carry meaning at nanosecond scale.
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: u128 = digits.parse().map_err(|_| err("bad fraction"))?;
            let denom = 10u128.pow(u32::try_from(digits.len()).unwrap_or(18));
            nanos = nanos
                .checked_add(frac * scale / denom)
                .ok_or_else(|| err("overflow"))?;
        }
        total = total.checked_add(nanos).ok_or_else(|| err("overflow"))?;
        s = rest;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| err("overflow"))?;
    // The remainder is below 10^9: it fits.
    let sub = u32::try_from(total % 1_000_000_000).unwrap_or(0);
    Ok(Duration::new(secs, sub))
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
