//! The rules of a unicast notify (PROTOCOL.md §3), applied to a store by whoever owns the
//! device's channel.

use std::sync::Arc;
use std::time::SystemTime;

use super::{InternalChannelId, Metadata, PendingStore, ScrubCriteria, StoreError};
use crate::protocol::{Notification, Payload};

/// A notification for one device, as `/notify` accepted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnicastRequest {
    /// The device's unicast channel.
    pub chan_id: InternalChannelId,
    /// The sending application.
    pub app_id: String,
    /// The payload, as received.
    pub payload: Payload,
    /// When it stops being deliverable.
    pub expiration: SystemTime,
    /// Among live notifications of the app with this tag only the newest is delivered;
    /// a pending one with the same tag is replaced.
    pub replace_tag: Option<String>,
    /// First remove every pending notification of the app for the device.
    pub clear_pending: bool,
}

/// What became of a [`UnicastRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyVerdict {
    /// Appended under this message id.
    Accepted {
        /// The new notification's message id.
        msg_id: String,
    },
    /// Refused: the app already has the most notifications pending that it may; the
    /// payload is the newest of them (the API's `extra`).
    TooManyPending {
        /// The newest pending payload of the app.
        newest: Payload,
    },
}

/// Applies `req` to `store`: scrubs expired notifications, clears the app's pending ones
/// when asked, replaces a pending one with the same replace tag, refuses when the app
/// already has `max_per_app` pending (unless clearing or replacing), then appends under
/// `msg_id`.
///
/// # Errors
/// What the store returned; nothing was appended then.
pub fn apply_notify(
    store: &dyn PendingStore,
    req: &UnicastRequest,
    max_per_app: usize,
    msg_id: String,
) -> Result<NotifyVerdict, StoreError> {
    let chan = &req.chan_id;
    store.scrub(chan, ScrubCriteria::default())?;
    if req.clear_pending {
        store.scrub(
            chan,
            ScrubCriteria {
                app_id: Some(&req.app_id),
                replace_tag: None,
            },
        )?;
    } else {
        let (_, notifications, meta) = store.get_channel_unfiltered(chan)?;
        let mut for_app = 0;
        let mut replaceable = 0;
        let mut newest = None;
        for (n, m) in notifications.iter().zip(&meta) {
            if *n.app_id != *req.app_id {
                continue;
            }
            for_app += 1;
            newest = Some(&n.payload);
            if req.replace_tag.is_some() && m.replace_tag.as_deref() == req.replace_tag.as_deref() {
                replaceable += 1;
            }
        }
        if replaceable > 0 {
            store.scrub(
                chan,
                ScrubCriteria {
                    app_id: Some(&req.app_id),
                    replace_tag: req.replace_tag.as_deref(),
                },
            )?;
        } else if for_app >= max_per_app {
            return Ok(NotifyVerdict::TooManyPending {
                newest: newest.cloned().unwrap_or_else(Payload::null),
            });
        }
    }
    store.append_to_unicast_channel(
        chan,
        Notification::unicast(&req.app_id, &msg_id, req.payload.clone()),
        Metadata {
            expiration: req.expiration,
            replace_tag: req.replace_tag.as_deref().map(Arc::from),
        },
    )?;
    Ok(NotifyVerdict::Accepted { msg_id })
}
