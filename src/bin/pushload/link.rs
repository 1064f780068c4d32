//! What the coordinator and its worker processes say to each other.
//!
//! The coordinator writes one JSON [`Command`] per line to a worker's stdin. A worker
//! writes frames to its stdout: a tag byte, a little-endian `u32` length, then either
//! packed [`Receipt`]s or one JSON [`Event`]. Receipts are the bulk of the traffic (one per
//! delivery), so they travel packed, a batch per frame.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What a worker process is to do, given as its `--worker` argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerSpec {
    /// The first device index this worker runs.
    pub(crate) first: u32,
    /// How many devices it runs (`first..first + count`).
    pub(crate) count: u32,
    /// Executor threads in this worker.
    pub(crate) threads: u32,
    /// The servers' device listeners: device i connects to the (i mod n)-th
    /// ([`crate::target::device_addr`]).
    pub(crate) devices: Vec<SocketAddr>,
    /// Devices speak TLS, trusting this CA (PEM).
    pub(crate) tls_ca: Option<PathBuf>,
    /// This run's mark in device ids and payloads.
    pub(crate) nonce: String,
    /// Connections this worker has in progress at once while connecting.
    pub(crate) connect_concurrency: u32,
    /// Mean lifetime of a connection while churning, in seconds; `None` without churn.
    pub(crate) churn_lifetime_s: Option<f64>,
    /// Longest time from connecting to CONNACK, in seconds.
    pub(crate) timeout_s: u64,
}

/// What the coordinator tells a worker, one JSON line each.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum Command {
    /// Connect every device; each thread answers [`Event::Connected`].
    Connect,
    /// Answer [`Event::Mark`] with this process's CPU time.
    Mark,
    /// Start disconnecting and reconnecting devices.
    Churn,
    /// Stop churning; each thread answers [`Event::Settled`] once all its devices are
    /// connected again.
    Settle,
    /// Answer [`Event::Final`] and exit.
    Finish,
}

/// What a worker tells the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) enum Event {
    /// The worker runs this many threads; per-thread answers come from each.
    Ready {
        /// Threads in the worker.
        threads: u32,
    },
    /// A thread's devices have all connected or failed to.
    Connected {
        /// Devices that got CONNACK.
        ok: u32,
        /// Devices that could not connect, with the first reason.
        failed: u32,
        /// Why the first failed one failed.
        first_error: Option<String>,
        /// Microseconds from connecting to CONNACK, per connected device.
        connect_us: Vec<u64>,
    },
    /// CPU time of the worker process so far.
    Mark {
        /// User plus system time, µs.
        cpu_us: u64,
    },
    /// A device lost its connection when it should not have.
    Lost {
        /// The device index.
        device: u32,
        /// What happened.
        reason: String,
    },
    /// A thread's devices are all connected again after churn.
    Settled {
        /// Reconnections the thread made while churning.
        reconnects: u64,
    },
    /// The worker's last word.
    Final {
        /// User plus system time, µs.
        cpu_us: u64,
    },
}

/// One delivery a device received and ACKed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Receipt {
    /// A broadcast (`item` is its number) or a notification (`item` is the notify's).
    pub(crate) kind: ReceiptKind,
    /// The device that received it.
    pub(crate) device: u32,
    /// The broadcast or notify number.
    pub(crate) item: u32,
    /// For notifications, the device index the payload names; for broadcasts, `device`.
    pub(crate) addressed: u32,
    /// When the frame was read ([`crate::procfs::now_ns`]).
    pub(crate) at_ns: u64,
}

/// What a [`Receipt`] is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReceiptKind {
    /// A broadcast payload.
    Broadcast,
    /// A notification.
    Notify,
}

const RECEIPT_LEN: usize = 1 + 4 + 4 + 4 + 8;
const TAG_RECEIPTS: u8 = 1;
const TAG_EVENT: u8 = 2;

/// A frame from a worker.
#[derive(Debug)]
pub(crate) enum FromWorker {
    /// A batch of receipts.
    Receipts(Vec<Receipt>),
    /// An event.
    Event(Event),
}

/// Writes a batch of receipts as one frame.
pub(crate) fn write_receipts(out: &mut impl Write, receipts: &[Receipt]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(5 + receipts.len() * RECEIPT_LEN);
    frame.push(TAG_RECEIPTS);
    frame.extend_from_slice(&((receipts.len() * RECEIPT_LEN) as u32).to_le_bytes());
    for r in receipts {
        frame.push(match r.kind {
            ReceiptKind::Broadcast => 0,
            ReceiptKind::Notify => 1,
        });
        frame.extend_from_slice(&r.device.to_le_bytes());
        frame.extend_from_slice(&r.item.to_le_bytes());
        frame.extend_from_slice(&r.addressed.to_le_bytes());
        frame.extend_from_slice(&r.at_ns.to_le_bytes());
    }
    out.write_all(&frame)
}

/// Writes an event as one frame.
pub(crate) fn write_event(out: &mut impl Write, event: &Event) -> io::Result<()> {
    let body = serde_json::to_vec(event).map_err(io::Error::other)?;
    out.write_all(&[TAG_EVENT])?;
    out.write_all(&(body.len() as u32).to_le_bytes())?;
    out.write_all(&body)
}

/// Reads the next frame; `None` at the end of the stream.
pub(crate) fn read_frame(input: &mut impl Read) -> io::Result<Option<FromWorker>> {
    let mut head = [0u8; 5];
    match input.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len];
    input.read_exact(&mut body)?;
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    match head[0] {
        TAG_RECEIPTS => {
            if !len.is_multiple_of(RECEIPT_LEN) {
                return Err(bad("a receipt batch of a wrong length"));
            }
            let u32_at =
                |c: &[u8], at: usize| u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
            let receipts = body
                .chunks_exact(RECEIPT_LEN)
                .map(|c| {
                    let mut t = [0u8; 8];
                    t.copy_from_slice(&c[13..21]);
                    Receipt {
                        kind: if c[0] == 0 {
                            ReceiptKind::Broadcast
                        } else {
                            ReceiptKind::Notify
                        },
                        device: u32_at(c, 1),
                        item: u32_at(c, 5),
                        addressed: u32_at(c, 9),
                        at_ns: u64::from_le_bytes(t),
                    }
                })
                .collect();
            Ok(Some(FromWorker::Receipts(receipts)))
        }
        TAG_EVENT => serde_json::from_slice(&body)
            .map(|e| Some(FromWorker::Event(e)))
            .map_err(|e| bad(&format!("a bad event: {e}"))),
        _ => Err(bad("an unknown frame tag")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let receipts = vec![
            Receipt {
                kind: ReceiptKind::Broadcast,
                device: 7,
                item: 3,
                addressed: 7,
                at_ns: 1 << 40,
            },
            Receipt {
                kind: ReceiptKind::Notify,
                device: 1,
                item: 99_999,
                addressed: 2,
                at_ns: 5,
            },
        ];
        let event = Event::Lost {
            device: 4,
            reason: "EOF".into(),
        };
        let mut buf = vec![];
        write_receipts(&mut buf, &receipts).unwrap();
        write_event(&mut buf, &event).unwrap();
        let mut input = &buf[..];
        match read_frame(&mut input).unwrap() {
            Some(FromWorker::Receipts(r)) => assert_eq!(r, receipts),
            other => panic!("{other:?}"),
        }
        match read_frame(&mut input).unwrap() {
            Some(FromWorker::Event(e)) => assert_eq!(e, event),
            other => panic!("{other:?}"),
        }
        assert!(read_frame(&mut input).unwrap().is_none());
    }

    #[test]
    fn commands_are_one_json_line() {
        let line = serde_json::to_string(&Command::Settle).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(
            serde_json::from_str::<Command>(&line).unwrap(),
            Command::Settle
        );
    }
}
