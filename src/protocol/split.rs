//! Splitting of messages too large for one frame into parts, each ACKed before the next.
//!
//! The rules are the original server's: a part's payload bytes stay within
//! [`MAX_PAYLOAD_SIZE`]; a BROADCAST part's `TopLevel` is the level its last payload brings
//! the device to, so a device that drops between parts resumes correctly; a NOTIFICATIONS
//! part counts, per notification, payload, app id and message id plus the JSON overhead of
//! an empty notification object. Unlike the original, a single payload over the limit still
//! goes out (alone in its part) instead of looping forever.

use std::borrow::Cow;
use std::ops::Range;

use super::messages::{BroadcastMsg, Notification, NotificationsMsg, Payload};

/// The payload bytes one message part may carry: 62 KiB, which leaves room in a 64 KiB
/// frame for the message's own fields.
pub const MAX_PAYLOAD_SIZE: usize = 62 * 1024;

/// The JSON bytes of one notification besides its app id, message id and payload: an
/// empty notification object, `{"A":"","M":"","P":null}`, less its `null` payload, as the
/// original server counted it. With it a notification's count is its exact encoded size.
pub const NOTIFICATION_OVERHEAD: usize = r#"{"A":"","M":"","P":null}"#.len() - "null".len();

/// Splits `sizes` (consecutive item sizes) into ranges whose sums stay within `max`; an
/// item larger than `max` gets a range of its own. An empty input gives one empty range.
fn split_by_size(sizes: impl Iterator<Item = usize>, max: usize) -> Vec<Range<usize>> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut size = 0;
    let mut end = 0;
    for item in sizes {
        if end > start && size + item > max {
            parts.push(start..end);
            start = end;
            size = 0;
        }
        size += item;
        end += 1;
    }
    parts.push(start..end);
    parts
}

/// The ranges of `payloads` that make the parts of one BROADCAST.
pub fn split_payloads(payloads: &[Payload]) -> Vec<Range<usize>> {
    split_by_size(payloads.iter().map(Payload::len), MAX_PAYLOAD_SIZE)
}

/// The ranges of `notifications` that make the parts of one NOTIFICATIONS.
pub fn split_notifications(notifications: &[Notification]) -> Vec<Range<usize>> {
    split_by_size(
        notifications
            .iter()
            .map(|n| n.payload.len() + n.app_id.len() + n.msg_id.len() + NOTIFICATION_OVERHEAD),
        MAX_PAYLOAD_SIZE,
    )
}

impl<'a> BroadcastMsg<'a> {
    /// The parts to send in order; a message that fits is its own single part.
    ///
    /// Each part's `TopLevel` is `TopLevel − len(Payloads) + payloads up to the part's end`,
    /// so the last part carries the message's `TopLevel`. `null` payloads stay one part.
    ///
    /// This holds for a message whose payloads are consecutive levels (nothing filtered
    /// out), as a client or a tool sees one. The broker's broadcast exchange filters by
    /// device tag, so it splits with [`split_payloads`] and gives each part the level of
    /// its last kept payload instead.
    pub fn split(&self) -> Vec<BroadcastMsg<'_>> {
        let Some(payloads) = self.payloads.as_deref() else {
            return vec![self.borrowed(None, self.top_level)];
        };
        let ranges = split_payloads(payloads);
        if ranges.len() == 1 {
            return vec![self.borrowed(Some(payloads), self.top_level)];
        }
        let base = self.top_level.saturating_sub(payloads.len() as i64);
        ranges
            .into_iter()
            .map(|r| {
                let top = base.saturating_add(r.end as i64);
                self.borrowed(Some(&payloads[r]), top)
            })
            .collect()
    }

    fn borrowed<'b>(&'b self, payloads: Option<&'b [Payload]>, top_level: i64) -> BroadcastMsg<'b> {
        BroadcastMsg {
            app_id: Cow::Borrowed(&self.app_id),
            chan_id: Cow::Borrowed(&self.chan_id),
            top_level,
            payloads: payloads.map(Cow::Borrowed),
        }
    }
}

impl NotificationsMsg<'_> {
    /// The parts to send in order; a message that fits is its own single part.
    pub fn split(&self) -> Vec<NotificationsMsg<'_>> {
        split_notifications(&self.notifications)
            .into_iter()
            .map(|r| NotificationsMsg {
                notifications: Cow::Borrowed(&self.notifications[r]),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codec::{MAX_FRAME_BODY, encode_frame};
    use crate::protocol::messages::Message;

    /// A payload of exactly `n` bytes (`n ≥ 1`), distinct for distinct `tag`s of one size.
    fn sized(n: usize, tag: usize) -> Payload {
        let text = match n {
            0 => panic!("payloads are never empty"),
            1 => (tag % 10).to_string(),
            _ => {
                let body: String = format!("{tag}-")
                    .chars()
                    .chain(std::iter::repeat('x'))
                    .take(n - 2)
                    .collect();
                format!("\"{body}\"")
            }
        };
        let p = Payload::from_json(&text).expect("valid JSON");
        assert_eq!(p.len(), n);
        p
    }

    fn payloads(sizes: &[usize]) -> Vec<Payload> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| sized(n, i))
            .collect()
    }

    fn broadcast(top_level: i64, payloads: Option<&[Payload]>) -> BroadcastMsg<'_> {
        BroadcastMsg {
            app_id: Cow::Borrowed("app"),
            chan_id: Cow::Borrowed("0"),
            top_level,
            payloads: payloads.map(Cow::Borrowed),
        }
    }

    fn part_payloads<'a>(part: &'a BroadcastMsg<'_>) -> &'a [Payload] {
        part.payloads
            .as_deref()
            .expect("parts of a message with payloads have payloads")
    }

    fn bytes(ps: &[Payload]) -> usize {
        ps.iter().map(Payload::len).sum()
    }

    #[test]
    fn max_payload_size_is_62_kib() {
        assert_eq!(MAX_PAYLOAD_SIZE, 63_488);
        assert_eq!(NOTIFICATION_OVERHEAD, 20);
    }

    #[test]
    fn notification_count_is_its_encoded_size() {
        let n = Notification::unicast("com.example_app", "msg-7", sized(100, 3));
        let encoded = serde_json::to_string(&n).expect("encodes");
        assert_eq!(
            encoded.len(),
            n.payload.len() + n.app_id.len() + n.msg_id.len() + NOTIFICATION_OVERHEAD
        );
    }

    #[test]
    fn small_message_is_one_part() {
        let ps = payloads(&[10, 20, 30]);
        let msg = broadcast(10, Some(&ps));
        let parts = msg.split();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0], msg);
        assert_eq!(parts[0].top_level, 10);
        assert_eq!(split_payloads(&ps), vec![0..3]);
    }

    #[test]
    fn exactly_at_the_limit_is_one_part() {
        let ps = payloads(&[MAX_PAYLOAD_SIZE - 100, 100]);
        assert_eq!(split_payloads(&ps), vec![0..2]);
        let ps = payloads(&[MAX_PAYLOAD_SIZE - 100, 101]);
        assert_eq!(split_payloads(&ps), vec![0..1, 1..2]);
        let ps = payloads(&[MAX_PAYLOAD_SIZE]);
        assert_eq!(split_payloads(&ps), vec![0..1]);
    }

    #[test]
    fn three_parts_keep_order_sizes_and_levels() {
        let sizes = [30_000, 30_000, 30_000, 30_000, 10_000];
        let ps = payloads(&sizes);
        let msg = broadcast(100, Some(&ps));
        let parts = msg.split();
        assert_eq!(parts.len(), 3);
        assert_eq!(split_payloads(&ps), vec![0..2, 2..4, 4..5]);
        let tops: Vec<i64> = parts.iter().map(|p| p.top_level).collect();
        // 100 − 5 + (index after the part's last payload).
        assert_eq!(tops, vec![97, 99, 100]);
        let mut all = Vec::new();
        let mut buf = Vec::new();
        for part in &parts {
            assert_eq!(part.app_id, "app");
            assert_eq!(part.chan_id, "0");
            let these = part_payloads(part);
            assert!(bytes(these) <= MAX_PAYLOAD_SIZE);
            all.extend_from_slice(these);
            // Every part fits in a frame.
            let range = encode_frame(&mut buf, &Message::Broadcast(part.clone()))
                .expect("a part fits in a frame");
            assert!(range.len() - 2 <= MAX_FRAME_BODY);
        }
        assert_eq!(all, ps);
        assert_eq!(parts.last().map(|p| p.top_level), Some(msg.top_level));
    }

    #[test]
    fn oversized_payload_gets_its_own_part() {
        let ps = payloads(&[1_000, 70_000, 1_000]);
        let msg = broadcast(7, Some(&ps));
        let parts = msg.split();
        let lens: Vec<usize> = parts.iter().map(|p| part_payloads(p).len()).collect();
        assert_eq!(lens, vec![1, 1, 1]);
        assert_eq!(part_payloads(&parts[1]), &ps[1..2]);
        let tops: Vec<i64> = parts.iter().map(|p| p.top_level).collect();
        assert_eq!(tops, vec![5, 6, 7]);

        // Alone, at the start, twice in a row: always terminates, one part each.
        assert_eq!(split_payloads(&payloads(&[70_000])), vec![0..1]);
        assert_eq!(
            split_payloads(&payloads(&[70_000, 70_000])),
            vec![0..1, 1..2]
        );
        assert_eq!(
            split_payloads(&payloads(&[70_000, 10, 10])),
            vec![0..1, 1..3]
        );
        assert_eq!(
            split_payloads(&payloads(&[10, 10, 70_000])),
            vec![0..2, 2..3]
        );
    }

    #[test]
    fn null_and_empty_payloads_are_one_part() {
        let msg = broadcast(4, None);
        let parts = msg.split();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].payloads, None);
        assert_eq!(parts[0].top_level, 4);

        let empty: [Payload; 0] = [];
        let msg = broadcast(4, Some(&empty));
        let parts = msg.split();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].payloads.as_deref(), Some(&empty[..]));
        assert_eq!(parts[0].top_level, 4);
        assert_eq!(split_payloads(&empty), vec![0..0]);
    }

    fn notification(payload_len: usize, tag: usize) -> Notification {
        Notification::unicast("app", &format!("m{tag}"), sized(payload_len, tag))
    }

    #[test]
    fn notifications_count_ids_and_overhead() {
        // Each notification costs payload + 3 ("app") + 2 ("m0"/"m1") + 20.
        let per = 3 + 2 + 20;
        let first = 40_000;
        let at_limit = MAX_PAYLOAD_SIZE - 2 * per - first;
        let fits = [notification(first, 0), notification(at_limit, 1)];
        assert_eq!(split_notifications(&fits), vec![0..2]);
        let msg = NotificationsMsg {
            notifications: Cow::Borrowed(&fits),
        };
        let parts = msg.split();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0], msg);

        let over = [notification(first, 0), notification(at_limit + 1, 1)];
        assert_eq!(split_notifications(&over), vec![0..1, 1..2]);
        let msg = NotificationsMsg {
            notifications: Cow::Borrowed(&over),
        };
        let parts = msg.split();
        assert_eq!(parts.len(), 2);
        assert_eq!(&parts[0].notifications[..], &over[..1]);
        assert_eq!(&parts[1].notifications[..], &over[1..]);

        // A longer id counts as much as a longer payload.
        let longer_id = [
            notification(first, 0),
            Notification::unicast("app", "m12", sized(at_limit, 1)),
        ];
        assert_eq!(split_notifications(&longer_id), vec![0..1, 1..2]);
    }

    #[test]
    fn notifications_oversized_and_empty() {
        let ns = [
            notification(10, 0),
            notification(70_000, 1),
            notification(10, 2),
        ];
        assert_eq!(split_notifications(&ns), vec![0..1, 1..2, 2..3]);
        assert_eq!(split_notifications(&[]), vec![0..0]);
        let msg = NotificationsMsg {
            notifications: Cow::Owned(Vec::new()),
        };
        let parts = msg.split();
        assert_eq!(parts.len(), 1);
        assert!(parts[0].notifications.is_empty());
    }
}
