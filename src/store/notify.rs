//! The rules of a unicast notify (docs/protocol.md §3.4), applied to a store by whoever
//! owns the device's channel.

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

/// What a unicast channel holds of one app ([`PendingStore::app_pending`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppPending {
    /// How many notifications of the app it holds.
    pub for_app: usize,
    /// How many of those carry the replace tag asked about.
    pub replaceable: usize,
    /// The payload of the app's newest notification.
    pub newest: Option<Payload>,
}

impl AppPending {
    /// Counts `entries` (a channel's notifications with their metadata, oldest first).
    pub fn count<'a>(
        entries: impl IntoIterator<Item = (&'a Notification, &'a Metadata)>,
        app_id: &str,
        replace_tag: Option<&str>,
    ) -> Self {
        let mut pending = AppPending::default();
        let mut newest = None;
        for (n, m) in entries {
            if *n.app_id != *app_id {
                continue;
            }
            pending.for_app += 1;
            newest = Some(&n.payload);
            if replace_tag.is_some() && m.replace_tag.as_deref() == replace_tag {
                pending.replaceable += 1;
            }
        }
        pending.newest = newest.cloned();
        pending
    }
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
        let AppPending {
            for_app,
            replaceable,
            newest,
        } = store.app_pending(chan, &req.app_id, req.replace_tag.as_deref())?;
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
                newest: newest.unwrap_or_else(Payload::null),
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

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::time::Duration;

    use super::*;
    use crate::broker::testing::{FaultyStore, StoreOp};
    use crate::store::{InMemoryPendingStore, ManualClock};

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    /// A store whose clock reads `t(0)` until the test moves it.
    fn store() -> (InMemoryPendingStore, Rc<ManualClock>) {
        let clock = Rc::new(ManualClock::new(t(0)));
        (InMemoryPendingStore::with_clock(clock.clone()), clock)
    }

    fn dev() -> InternalChannelId {
        InternalChannelId::unicast("user1", "dev1")
    }

    /// The payload sent with the notification labelled `label`.
    fn payload(label: &str) -> Payload {
        Payload::from_json(&format!(r#"{{"m":"{label}"}}"#)).expect("valid JSON")
    }

    /// A notify of `app` to `dev()` carrying `payload(label)`, live until `t(expires)`.
    fn req(app: &str, label: &str, expires: u64) -> UnicastRequest {
        UnicastRequest {
            chan_id: dev(),
            app_id: app.to_owned(),
            payload: payload(label),
            expiration: t(expires),
            replace_tag: None,
            clear_pending: false,
        }
    }

    fn tagged(app: &str, label: &str, expires: u64, tag: &str) -> UnicastRequest {
        UnicastRequest {
            replace_tag: Some(tag.to_owned()),
            ..req(app, label, expires)
        }
    }

    fn clearing(app: &str, label: &str, expires: u64) -> UnicastRequest {
        UnicastRequest {
            clear_pending: true,
            ..req(app, label, expires)
        }
    }

    /// Applies `r` under the label of its payload as message id; the in-memory store
    /// never fails.
    fn notify(s: &dyn PendingStore, r: &UnicastRequest, max_per_app: usize) -> NotifyVerdict {
        let data: serde_json::Value = serde_json::from_str(r.payload.get()).expect("JSON");
        let label = data["m"].as_str().expect("a payload made by `payload`");
        apply_notify(s, r, max_per_app, label.to_owned()).expect("in-memory store never fails")
    }

    fn accepted(label: &str) -> NotifyVerdict {
        NotifyVerdict::Accepted {
            msg_id: label.to_owned(),
        }
    }

    fn refused(newest: &str) -> NotifyVerdict {
        NotifyVerdict::TooManyPending {
            newest: payload(newest),
        }
    }

    /// `(app, msg id)` of everything `chan` holds, expired or not, oldest first.
    fn held_in(s: &dyn PendingStore, chan: &InternalChannelId) -> Vec<(String, String)> {
        let (_, ns, metas) = s
            .get_channel_unfiltered(chan)
            .expect("in-memory store never fails");
        assert_eq!(
            ns.len(),
            metas.len(),
            "notifications and metadata misaligned"
        );
        ns.iter()
            .map(|n| (n.app_id.to_string(), n.msg_id.to_string()))
            .collect()
    }

    fn held(s: &dyn PendingStore) -> Vec<(String, String)> {
        held_in(s, &dev())
    }

    fn entries(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|&(app, msg)| (app.to_owned(), msg.to_owned()))
            .collect()
    }

    #[test]
    fn accepted_notify_appends_the_request_under_the_given_msg_id() {
        let (s, _) = store();
        let first = UnicastRequest {
            payload: Payload::from_json(r#" {"a": [1, 2],  "b":null} "#).expect("valid JSON"),
            ..tagged("app1", "ignored", 100, "tag1")
        };
        assert_eq!(
            apply_notify(&s, &first, 10, "msg-7".to_owned()),
            Ok(accepted("msg-7"))
        );
        let second = req("app2", "n2", 200);
        assert_eq!(
            apply_notify(&s, &second, 10, "msg-8".to_owned()),
            Ok(accepted("msg-8"))
        );

        let (level, ns, metas) = s.get_channel_unfiltered(&dev()).expect("unfiltered");
        assert_eq!(level, 0, "a unicast append does not move the level");
        assert_eq!(
            ns,
            [
                Notification::unicast("app1", "msg-7", first.payload.clone()),
                Notification::unicast("app2", "msg-8", payload("n2")),
            ]
        );
        // The payload is kept as received, not re-encoded.
        assert_eq!(ns[0].payload.get(), r#"{"a": [1, 2],  "b":null}"#);
        assert_eq!(
            metas,
            [
                Metadata {
                    expiration: t(100),
                    replace_tag: Some(Arc::from("tag1")),
                },
                Metadata {
                    expiration: t(200),
                    replace_tag: None,
                },
            ]
        );
        // Only the addressed channel was touched.
        assert!(held_in(&s, &InternalChannelId::unicast("user1", "dev2")).is_empty());
    }

    #[test]
    fn notify_beyond_the_apps_limit_is_refused_with_its_newest_pending_payload() {
        let (s, _) = store();
        assert_eq!(notify(&s, &req("app1", "m1", 100), 2), accepted("m1"));
        assert_eq!(notify(&s, &req("app1", "m2", 50), 2), accepted("m2"));
        // Newer than app1's, but another app's: not what app1 is told about.
        assert_eq!(notify(&s, &req("app2", "m3", 100), 2), accepted("m3"));

        // The newest is the last appended, not the one expiring last.
        assert_eq!(notify(&s, &req("app1", "m4", 100), 2), refused("m2"));
        assert_eq!(
            held(&s),
            entries(&[("app1", "m1"), ("app1", "m2"), ("app2", "m3")]),
            "nothing is appended when refused"
        );
        // Refusals stick while nothing changes.
        assert_eq!(notify(&s, &req("app1", "m5", 100), 2), refused("m2"));
        assert_eq!(held(&s).len(), 3);
    }

    #[test]
    fn other_apps_notifications_do_not_count_towards_the_limit() {
        let (s, _) = store();
        assert_eq!(notify(&s, &req("app2", "m1", 100), 2), accepted("m1"));
        assert_eq!(notify(&s, &req("app2", "m2", 100), 2), accepted("m2"));
        assert_eq!(notify(&s, &req("app1", "m3", 100), 2), accepted("m3"));
        assert_eq!(notify(&s, &req("app1", "m4", 100), 2), accepted("m4"));
        assert_eq!(notify(&s, &req("app1", "m5", 100), 2), refused("m4"));
        assert_eq!(notify(&s, &req("app2", "m6", 100), 2), refused("m2"));
        // The same app on another device has its own limit.
        let other = UnicastRequest {
            chan_id: InternalChannelId::unicast("user1", "dev2"),
            ..req("app1", "m7", 100)
        };
        assert_eq!(notify(&s, &other, 2), accepted("m7"));
        assert_eq!(
            held(&s),
            entries(&[
                ("app2", "m1"),
                ("app2", "m2"),
                ("app1", "m3"),
                ("app1", "m4")
            ])
        );
    }

    #[test]
    fn expired_notifications_are_scrubbed_first_and_do_not_count() {
        let (s, clock) = store();
        assert_eq!(notify(&s, &req("app1", "m1", 10), 2), accepted("m1"));
        assert_eq!(notify(&s, &req("app1", "m2", 100), 2), accepted("m2"));
        assert_eq!(notify(&s, &req("app2", "m3", 10), 2), accepted("m3"));

        // Expiring exactly now is still live: counted, and the notify is refused.
        clock.set(t(10));
        assert_eq!(notify(&s, &req("app1", "m4", 100), 2), refused("m2"));
        assert_eq!(held(&s).len(), 3);

        clock.advance(Duration::from_nanos(1));
        assert_eq!(notify(&s, &req("app1", "m5", 100), 2), accepted("m5"));
        // Every expired notification of the channel went, other apps' too.
        assert_eq!(held(&s), entries(&[("app1", "m2"), ("app1", "m5")]));
    }

    #[test]
    fn refused_notify_still_scrubs_and_names_the_newest_live_payload() {
        let (s, clock) = store();
        assert_eq!(notify(&s, &req("app1", "m1", 100), 2), accepted("m1"));
        assert_eq!(notify(&s, &req("app1", "m2", 20), 2), accepted("m2"));
        assert_eq!(notify(&s, &req("app2", "m3", 20), 2), accepted("m3"));

        clock.set(t(21));
        // m2 is app1's newest but has expired: m1 is what is pending.
        assert_eq!(notify(&s, &req("app1", "m4", 100), 1), refused("m1"));
        // The refused notify touched the channel: the expired ones of every app went.
        assert_eq!(held(&s), entries(&[("app1", "m1")]));
    }

    #[test]
    fn clear_pending_removes_only_the_apps_pending_and_appends_at_the_limit() {
        let (s, _) = store();
        assert_eq!(notify(&s, &req("app1", "m1", 100), 2), accepted("m1"));
        assert_eq!(notify(&s, &req("app2", "m2", 100), 2), accepted("m2"));
        assert_eq!(
            notify(&s, &tagged("app1", "m3", 100, "x"), 2),
            accepted("m3")
        );
        assert_eq!(notify(&s, &req("app1", "m4", 100), 2), refused("m3"));

        assert_eq!(notify(&s, &clearing("app1", "m5", 100), 2), accepted("m5"));
        assert_eq!(held(&s), entries(&[("app2", "m2"), ("app1", "m5")]));
        // The cleared ones no longer count: one more fits, then the limit is back.
        assert_eq!(notify(&s, &req("app1", "m6", 100), 2), accepted("m6"));
        assert_eq!(notify(&s, &req("app1", "m7", 100), 2), refused("m6"));
        assert_eq!(
            held(&s),
            entries(&[("app2", "m2"), ("app1", "m5"), ("app1", "m6")])
        );
    }

    #[test]
    fn clear_pending_with_nothing_pending_just_appends() {
        let (s, _) = store();
        assert_eq!(notify(&s, &req("app2", "m1", 100), 2), accepted("m1"));
        assert_eq!(notify(&s, &clearing("app1", "m2", 100), 2), accepted("m2"));
        assert_eq!(held(&s), entries(&[("app2", "m1"), ("app1", "m2")]));
    }

    #[test]
    fn clear_pending_with_a_replace_tag_still_clears_everything_of_the_app() {
        let (s, _) = store();
        assert_eq!(
            notify(&s, &tagged("app1", "m1", 100, "x"), 5),
            accepted("m1")
        );
        assert_eq!(
            notify(&s, &tagged("app1", "m2", 100, "y"), 5),
            accepted("m2")
        );
        assert_eq!(notify(&s, &req("app1", "m3", 100), 5), accepted("m3"));
        let r = UnicastRequest {
            clear_pending: true,
            ..tagged("app1", "m4", 100, "x")
        };
        assert_eq!(notify(&s, &r, 5), accepted("m4"));
        assert_eq!(held(&s), entries(&[("app1", "m4")]));
    }

    #[test]
    fn matching_replace_tag_replaces_the_apps_pending_one_even_at_the_limit() {
        let (s, _) = store();
        assert_eq!(
            notify(&s, &tagged("app1", "m1", 100, "a"), 2),
            accepted("m1")
        );
        assert_eq!(
            notify(&s, &tagged("app1", "m2", 100, "b"), 2),
            accepted("m2")
        );
        assert_eq!(notify(&s, &req("app1", "m3", 100), 2), refused("m2"));

        assert_eq!(
            notify(&s, &tagged("app1", "m4", 200, "a"), 2),
            accepted("m4")
        );
        let (_, ns, metas) = s.get_channel_unfiltered(&dev()).expect("unfiltered");
        assert_eq!(
            ns,
            [
                Notification::unicast("app1", "m2", payload("m2")),
                Notification::unicast("app1", "m4", payload("m4")),
            ]
        );
        assert_eq!(metas[1].replace_tag.as_deref(), Some("a"));
        assert_eq!(metas[1].expiration, t(200));
        // Still at the limit, and the replacement is now the newest.
        assert_eq!(notify(&s, &req("app1", "m5", 100), 2), refused("m4"));
    }

    #[test]
    fn matching_replace_tag_below_the_limit_removes_the_old_one() {
        let (s, _) = store();
        assert_eq!(
            notify(&s, &tagged("app1", "m1", 100, "a"), 5),
            accepted("m1")
        );
        assert_eq!(notify(&s, &req("app1", "m2", 100), 5), accepted("m2"));
        assert_eq!(
            notify(&s, &tagged("app1", "m3", 100, "a"), 5),
            accepted("m3")
        );
        assert_eq!(held(&s), entries(&[("app1", "m2"), ("app1", "m3")]));
    }

    #[test]
    fn replace_tag_of_another_app_does_not_replace_and_at_the_limit_is_refused() {
        let (s, _) = store();
        assert_eq!(
            notify(&s, &tagged("app2", "m1", 100, "a"), 2),
            accepted("m1")
        );
        assert_eq!(
            notify(&s, &tagged("app1", "m2", 100, "b"), 2),
            accepted("m2")
        );
        assert_eq!(notify(&s, &req("app1", "m3", 100), 2), accepted("m3"));

        assert_eq!(
            notify(&s, &tagged("app1", "m4", 100, "a"), 2),
            refused("m3")
        );
        assert_eq!(
            held(&s),
            entries(&[("app2", "m1"), ("app1", "m2"), ("app1", "m3")])
        );

        // Below the limit it appends, and app2's "a" stays.
        assert_eq!(
            notify(&s, &tagged("app1", "m5", 100, "a"), 3),
            accepted("m5")
        );
        assert_eq!(
            held(&s),
            entries(&[
                ("app2", "m1"),
                ("app1", "m2"),
                ("app1", "m3"),
                ("app1", "m5")
            ])
        );
    }

    #[test]
    fn replace_tag_without_a_match_below_the_limit_simply_appends() {
        let (s, _) = store();
        assert_eq!(
            notify(&s, &tagged("app1", "m1", 100, "x"), 3),
            accepted("m1")
        );
        assert_eq!(notify(&s, &req("app1", "m2", 100), 3), accepted("m2"));
        assert_eq!(
            notify(&s, &tagged("app1", "m3", 100, "y"), 3),
            accepted("m3")
        );
        assert_eq!(
            held(&s),
            entries(&[("app1", "m1"), ("app1", "m2"), ("app1", "m3")])
        );
        // And at the limit, an unmatched tag is refused like any other notify.
        assert_eq!(
            notify(&s, &tagged("app1", "m4", 100, "z"), 3),
            refused("m3")
        );
        assert_eq!(held(&s).len(), 3);
    }

    #[test]
    fn untagged_notifications_never_replace_each_other() {
        let (s, _) = store();
        assert_eq!(notify(&s, &req("app1", "m1", 100), 3), accepted("m1"));
        assert_eq!(notify(&s, &req("app1", "m2", 100), 3), accepted("m2"));
        assert_eq!(notify(&s, &req("app1", "m3", 100), 3), accepted("m3"));
        assert_eq!(
            held(&s),
            entries(&[("app1", "m1"), ("app1", "m2"), ("app1", "m3")])
        );
        assert_eq!(notify(&s, &req("app1", "m4", 100), 3), refused("m3"));
        assert_eq!(held(&s).len(), 3);
    }

    #[test]
    fn expired_notification_with_the_tag_is_not_replaced_but_scrubbed() {
        let (s, clock) = store();
        assert_eq!(
            notify(&s, &tagged("app1", "m1", 10, "a"), 1),
            accepted("m1")
        );
        clock.set(t(11));
        // Nothing live is pending: m2 is accepted though it replaces nothing.
        assert_eq!(
            notify(&s, &tagged("app1", "m2", 100, "a"), 1),
            accepted("m2")
        );
        assert_eq!(held(&s), entries(&[("app1", "m2")]));
    }

    #[test]
    fn snapshot_after_two_notifies_with_the_same_tag_shows_only_the_newest() {
        let (s, _) = store();
        assert_eq!(
            notify(&s, &tagged("app1", "m1", 100, "a"), 5),
            accepted("m1")
        );
        assert_eq!(
            notify(&s, &tagged("app2", "m2", 100, "a"), 5),
            accepted("m2")
        );
        assert_eq!(
            notify(&s, &tagged("app1", "m3", 100, "a"), 5),
            accepted("m3")
        );
        let (level, live) = s.get_channel_snapshot(&dev()).expect("snapshot");
        assert_eq!(level, 0);
        assert_eq!(
            live,
            [
                Notification::unicast("app2", "m2", payload("m2")),
                Notification::unicast("app1", "m3", payload("m3")),
            ]
        );
    }

    #[test]
    fn zero_limit_refuses_with_a_null_payload_when_nothing_is_pending() {
        let (s, _) = store();
        let refused_null = NotifyVerdict::TooManyPending {
            newest: Payload::null(),
        };
        assert_eq!(notify(&s, &req("app1", "m1", 100), 0), refused_null);
        assert!(held(&s).is_empty());
        // Another app's pending notification is not app1's newest.
        assert_eq!(notify(&s, &clearing("app2", "m2", 100), 0), accepted("m2"));
        assert_eq!(notify(&s, &req("app1", "m3", 100), 0), refused_null);
        let NotifyVerdict::TooManyPending { newest } = notify(&s, &req("app1", "m4", 100), 0)
        else {
            panic!("a zero limit must refuse");
        };
        assert_eq!(newest.get(), "null");
        // With something of app1 pending, that is what a refusal names.
        assert_eq!(notify(&s, &clearing("app1", "m5", 100), 0), accepted("m5"));
        assert_eq!(notify(&s, &req("app1", "m6", 100), 0), refused("m5"));
        assert_eq!(held(&s), entries(&[("app2", "m2"), ("app1", "m5")]));
    }

    fn faulty(op: StoreOp, successes: usize) -> FaultyStore {
        FaultyStore::over(store().0).failing(op, successes, &format!("{op:?} failed"))
    }

    fn unavailable(op: StoreOp) -> Result<NotifyVerdict, StoreError> {
        Err(StoreError::Unavailable(format!("{op:?} failed").into()))
    }

    #[test]
    fn failing_read_of_the_channel_is_returned_and_nothing_appended() {
        let s = faulty(StoreOp::Unfiltered, 0);
        assert_eq!(
            apply_notify(&s, &req("app1", "m1", 100), 2, "m1".to_owned()),
            unavailable(StoreOp::Unfiltered)
        );
        assert!(held(s.inner()).is_empty());
    }

    #[test]
    fn failing_expiry_scrub_is_returned_and_nothing_appended() {
        let s = faulty(StoreOp::Scrub, 0);
        for r in [
            req("app1", "m1", 100),
            clearing("app1", "m1", 100),
            tagged("app1", "m1", 100, "a"),
        ] {
            assert_eq!(
                apply_notify(&s, &r, 2, "m1".to_owned()),
                unavailable(StoreOp::Scrub),
                "{r:?}"
            );
        }
        assert!(held(s.inner()).is_empty());
    }

    #[test]
    fn failing_clear_is_returned_and_nothing_appended() {
        // The expiry scrub succeeds; the clearing one fails.
        let s = faulty(StoreOp::Scrub, 1);
        assert_eq!(
            apply_notify(&s, &clearing("app1", "m1", 100), 2, "m1".to_owned()),
            unavailable(StoreOp::Scrub)
        );
        assert!(held(s.inner()).is_empty());
    }

    #[test]
    fn failing_replacement_is_returned_and_the_old_one_kept() {
        // Two successful scrubs: those of the first notify and the expiry one of the second.
        let s = faulty(StoreOp::Scrub, 2);
        assert_eq!(
            apply_notify(&s, &tagged("app1", "m1", 100, "a"), 2, "m1".to_owned()),
            Ok(accepted("m1"))
        );
        assert_eq!(
            apply_notify(&s, &tagged("app1", "m2", 100, "a"), 2, "m2".to_owned()),
            unavailable(StoreOp::Scrub)
        );
        assert_eq!(held(s.inner()), entries(&[("app1", "m1")]));
    }

    #[test]
    fn failing_append_is_returned() {
        let s = faulty(StoreOp::AppendUnicast, 0);
        assert_eq!(
            apply_notify(&s, &req("app1", "m1", 100), 2, "m1".to_owned()),
            unavailable(StoreOp::AppendUnicast)
        );
        assert!(held(s.inner()).is_empty());
    }
}
