//! A clock every process of a run shares, and the CPU time and memory of a process as
//! `/proc` tells them.

use std::io;

use nix::time::{ClockId, clock_gettime};

/// Nanoseconds on `CLOCK_MONOTONIC`: the same clock in the coordinator and in every
/// worker process, so a delivery's time in a worker compares with its POST's time.
pub(crate) fn now_ns() -> u64 {
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(t) => t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64,
        // CLOCK_MONOTONIC does not fail on Linux.
        Err(_) => 0,
    }
}

/// Clock ticks per second of `/proc/PID/stat` times (`USER_HZ`, 100 on Linux).
const TICKS_PER_S: u64 = 100;

/// User plus system CPU time of process `pid` (all its threads, ended ones included), in
/// microseconds.
///
/// Read from the process's CPU-time clock (`clock_getcpuclockid`), in nanoseconds: the
/// figure that `utime + stime` in `/proc/PID/stat` is rounded from to 10 ms ticks, too
/// coarse for a phase of a second. `/proc/PID/stat` when that clock cannot be read.
pub(crate) fn cpu_us(pid: u32) -> io::Result<u64> {
    let clock = nix::time::clock_getcpuclockid(nix::unistd::Pid::from_raw(pid as i32))
        .and_then(clock_gettime);
    match clock {
        Ok(t) => Ok(t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000),
        Err(_) => stat_cpu_us(pid),
    }
}

/// utime + stime of `/proc/PID/stat`, in µs.
fn stat_cpu_us(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu_ticks(&stat)
        .map(|ticks| ticks * (1_000_000 / TICKS_PER_S))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc stat"))
}

/// utime + stime from a `/proc/PID/stat` line (fields 14 and 15; the command in field 2
/// may hold spaces, so count from its closing parenthesis).
fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_ascii_whitespace();
    // After ")": field 3 (state) is index 0, so utime (14) is index 11.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident memory of process `pid`, in KiB.
pub(crate) fn rss_kb(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS in /proc status"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_times_after_a_command_with_spaces() {
        let line = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 70 0 0 20 0 1 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some(320));
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kb(me).unwrap() > 0);
        let t0 = cpu_us(me).unwrap();
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(60) {
            std::hint::black_box(now_ns());
        }
        assert!(cpu_us(me).unwrap() > t0);
    }
}
