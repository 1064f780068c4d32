//! What travels to a shard: requests into its inbox (from any thread) and shard-to-shard
//! mesh traffic.

use std::time::SystemTime;

use super::Shard;
use crate::broker::{BrokerError, Delivery};
use crate::protocol::{Notification, Payload};
use crate::store::{InternalChannelId, NotifyVerdict, UnicastRequest};

/// Work sent to run on a shard.
pub(crate) type ShardJob = Box<dyn FnOnce(&Shard) + Send>;

/// What the sharded broker's inboxes take: requests from any thread.
pub(crate) enum Request {
    /// Deliver the current state of a broadcast channel (to each shard) or of a unicast
    /// channel (to its owner): the original's `BrokerSending`.
    Deliver(Delivery),
    /// Append to a broadcast channel, on its sequencer.
    Publish {
        chan: InternalChannelId,
        payload: Payload,
        expiration: SystemTime,
        /// Deliver to sessions (`/broadcast`), or only append everywhere and answer once
        /// every replica has it (test harnesses).
        deliver: bool,
        reply: flume::Sender<Result<i64, BrokerError>>,
    },
    /// Apply a notify, on the device's owner.
    Notify {
        req: UnicastRequest,
        reply: flume::Sender<Result<NotifyVerdict, BrokerError>>,
    },
    /// Run a job on the shard.
    Run(ShardJob),
    /// Stop the shard.
    Stop,
}

/// Shard-to-shard traffic.
pub(crate) enum MeshMsg {
    /// A broadcast notification the sequencer appended at `top_level`.
    Replicate {
        chan: InternalChannelId,
        top_level: i64,
        notification: Notification,
        expiration: SystemTime,
        deliver: bool,
        /// Told once this replica has it.
        applied: Option<flume::Sender<()>>,
    },
    /// Run a job on the shard.
    Run(ShardJob),
}

/// A batch of mesh messages: what one shard sent another during one task turn.
pub(crate) type MeshBatch = Vec<MeshMsg>;
