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

/// The JSON overhead counted per notification besides its contents: the length of an
/// empty notification object, `{"A":"","M":"","P":null}`, as the original server counted it.
pub const NOTIFICATION_OVERHEAD: usize = r#"{"A":"","M":"","P":null}"#.len();

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
    pub fn split(&self) -> Vec<BroadcastMsg<'_>> {
        let Some(payloads) = self.payloads.as_deref() else {
            return vec![self.borrowed(None, self.top_level)];
        };
        let ranges = split_payloads(payloads);
        if ranges.len() == 1 {
            return vec![self.borrowed(Some(payloads), self.top_level)];
        }
        let base = self.top_level - payloads.len() as i64;
        ranges
            .into_iter()
            .map(|r| {
                let top = base + r.end as i64;
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
