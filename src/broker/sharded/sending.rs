//! The sending facet of a [`ShardedBroker`](super::ShardedBroker): requests into the
//! inbox of the shard that owns them, from any thread.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use super::{Request, Shard, ShardId, ShardJob, owner_of_channel};
use crate::broker::{BrokerError, BrokerSending, Delivery};
use crate::protocol::Payload;
use crate::store::{InternalChannelId, NotifyVerdict, UnicastRequest};

/// The sending facet of a [`ShardedBroker`](super::ShardedBroker): `Send`, cheap to clone; requests go to the
/// inbox of the shard that owns them and never block (a full inbox is
/// [`BrokerError::QueueFull`]).
#[derive(Clone)]
pub struct ShardedSending {
    pub(super) inboxes: Arc<[flume::Sender<Request>]>,
}

impl fmt::Debug for ShardedSending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedSending")
            .field("nr_shards", &self.inboxes.len())
            .finish()
    }
}

fn try_send(inbox: &flume::Sender<Request>, req: Request) -> Result<(), BrokerError> {
    inbox.try_send(req).map_err(|e| match e {
        flume::TrySendError::Full(_) => BrokerError::QueueFull,
        flume::TrySendError::Disconnected(_) => BrokerError::NotRunning,
    })
}

impl ShardedSending {
    /// How many shards there are.
    pub fn nr_shards(&self) -> usize {
        self.inboxes.len()
    }

    fn inbox(&self, shard: ShardId) -> &flume::Sender<Request> {
        &self.inboxes[shard.0 % self.inboxes.len()]
    }

    /// Appends a notification to broadcast channel `chan` on its sequencer and delivers
    /// it to every session on every shard.
    ///
    /// # Returns
    /// The channel's new top level.
    ///
    /// # Errors
    /// [`BrokerError::QueueFull`] when the sequencer's inbox is full,
    /// [`BrokerError::NotRunning`] when the broker is stopped, a store error.
    pub async fn publish(
        &self,
        chan: InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
    ) -> Result<i64, BrokerError> {
        self.publish_with(chan, payload, expiration, true).await
    }

    /// Appends a notification to broadcast channel `chan` on every replica without
    /// delivering it, answering once every shard has it (for tests that then ask for a
    /// delivery with [`BrokerSending::broadcast`]).
    ///
    /// # Errors
    /// As [`ShardedSending::publish`].
    #[cfg(any(test, feature = "testing"))]
    pub async fn append_everywhere(
        &self,
        chan: InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
    ) -> Result<i64, BrokerError> {
        self.publish_with(chan, payload, expiration, false).await
    }

    async fn publish_with(
        &self,
        chan: InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
        deliver: bool,
    ) -> Result<i64, BrokerError> {
        let sequencer = owner_of_channel(&chan, self.nr_shards());
        let (reply, answer) = flume::bounded(1);
        try_send(
            self.inbox(sequencer),
            Request::Publish {
                chan,
                payload,
                expiration,
                deliver,
                reply,
            },
        )?;
        answer
            .recv_async()
            .await
            .unwrap_or(Err(BrokerError::NotRunning))
    }

    /// Applies a notify on the owner of the device's channel, which delivers it if the
    /// device is connected.
    ///
    /// # Errors
    /// [`BrokerError::QueueFull`] when the owner's inbox is full,
    /// [`BrokerError::NotRunning`] when the broker is stopped, a store error.
    pub async fn notify(&self, req: UnicastRequest) -> Result<NotifyVerdict, BrokerError> {
        let owner = owner_of_channel(&req.chan_id, self.nr_shards());
        let (reply, answer) = flume::bounded(1);
        try_send(self.inbox(owner), Request::Notify { req, reply })?;
        answer
            .recv_async()
            .await
            .unwrap_or(Err(BrokerError::NotRunning))
    }

    /// Runs `job` on shard `shard` and returns its result. Waits for room in the
    /// shard's inbox rather than failing: this is for control work, not for traffic.
    ///
    /// # Errors
    /// [`BrokerError::NotRunning`] when the broker is stopped.
    pub async fn run_on<R: Send + 'static>(
        &self,
        shard: ShardId,
        job: impl FnOnce(&Shard) -> R + Send + 'static,
    ) -> Result<R, BrokerError> {
        let (reply, answer) = flume::bounded(1);
        let job: ShardJob = Box::new(move |s: &Shard| {
            // The asker may have given up waiting; nothing to do then.
            let _ = reply.send(job(s));
        });
        self.inbox(shard)
            .send_async(Request::Run(job))
            .await
            .map_err(|_| BrokerError::NotRunning)?;
        answer
            .recv_async()
            .await
            .map_err(|_| BrokerError::NotRunning)
    }

    /// Runs the future `job` makes as a task on shard `shard` and returns its output.
    ///
    /// # Errors
    /// [`BrokerError::NotRunning`] when the broker is stopped, or stops before the task
    /// finishes.
    pub async fn run_task_on<R, F, Fut>(&self, shard: ShardId, job: F) -> Result<R, BrokerError>
    where
        R: Send + 'static,
        F: FnOnce(Shard) -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
    {
        let (reply, answer) = flume::bounded(1);
        self.run_on(shard, move |s: &Shard| {
            let fut = job(s.clone());
            glommio::spawn_local(async move {
                let _ = reply.send(fut.await);
            })
            .detach();
        })
        .await?;
        answer
            .recv_async()
            .await
            .map_err(|_| BrokerError::NotRunning)
    }
}

impl BrokerSending for ShardedSending {
    fn broadcast(&self, chan: InternalChannelId) -> Result<(), BrokerError> {
        self.inboxes.iter().try_for_each(|inbox| {
            try_send(inbox, Request::Deliver(Delivery::Broadcast(chan.clone())))
        })
    }

    fn unicast(&self, chans: &[InternalChannelId]) -> Result<(), BrokerError> {
        chans.iter().try_for_each(|chan| {
            let owner = owner_of_channel(chan, self.nr_shards());
            try_send(
                self.inbox(owner),
                Request::Deliver(Delivery::Unicast(chan.clone())),
            )
        })
    }
}
