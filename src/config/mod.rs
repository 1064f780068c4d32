//! The server's configuration: the original server's JSON keys, Go durations.

mod duration;

pub use duration::{DurationError, format_go_duration, parse_go_duration};
