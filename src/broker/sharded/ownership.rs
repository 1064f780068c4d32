//! Who owns what: a device's shard and a channel's shard, by a fixed-seed hash that
//! every thread and every run of the same build computes alike.

use std::fmt;

use crate::store::InternalChannelId;

/// A shard's index, `0..nr_shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub usize);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard-{}", self.0)
    }
}

/// The hasher behind ownership: fixed seeds, so the owner of a key is the same in every
/// thread and every run of the same build.
const OWNER_HASHER: ahash::RandomState = ahash::RandomState::with_seeds(
    0x7075_7368_6272_6f6b,
    0x6572_2d6f_776e_6572,
    0x0d15_ea5e_dead_beef,
    0x5eed_5eed_5eed_5eed,
);

/// The shard that owns device `device_id` among `nr_shards` (at least 1).
pub fn owner_of_device(device_id: &str, nr_shards: usize) -> ShardId {
    shard_of(OWNER_HASHER.hash_one(device_id), nr_shards)
}

/// The shard that owns channel `chan` among `nr_shards`: for a unicast channel, its
/// device's owner; for a broadcast channel, its sequencer.
pub fn owner_of_channel(chan: &InternalChannelId, nr_shards: usize) -> ShardId {
    match chan {
        InternalChannelId::Unicast { device, .. } => owner_of_device(device, nr_shards),
        other => shard_of(OWNER_HASHER.hash_one(other), nr_shards),
    }
}

fn shard_of(hash: u64, nr_shards: usize) -> ShardId {
    let n = nr_shards.max(1) as u64;
    // `hash % n < n <= usize::MAX`: the conversion cannot fail.
    ShardId(usize::try_from(hash % n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn owner_is_the_same_on_every_thread_and_every_call() {
        let here: Vec<ShardId> = (0..100)
            .map(|i| owner_of_device(&format!("dev-{i}"), 4))
            .collect();
        let there = std::thread::spawn(|| {
            (0..100)
                .map(|i| owner_of_device(&format!("dev-{i}"), 4))
                .collect::<Vec<_>>()
        })
        .join()
        .expect("thread");
        assert_eq!(here, there);
    }

    #[test]
    fn devices_spread_evenly_over_shards() {
        let mut counts = [0usize; 4];
        for i in 0..20_000 {
            counts[owner_of_device(&format!("device-{i:08}"), 4).0] += 1;
        }
        for c in counts {
            assert!((4_000..6_000).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn a_unicast_channel_lives_with_its_device() {
        for n in 1..=8 {
            for d in ["x", "dev-2", "phone-77"] {
                assert_eq!(
                    owner_of_channel(&InternalChannelId::unicast("user", d), n),
                    owner_of_device(d, n)
                );
            }
        }
    }

    #[test]
    fn zero_shards_count_as_one() {
        assert_eq!(owner_of_device("dev", 0), ShardId(0));
        assert_eq!(owner_of_channel(&InternalChannelId::System, 0), ShardId(0));
    }

    proptest! {
        #[test]
        fn owner_stays_in_range(device in ".*", n in 1usize..64) {
            prop_assert!(owner_of_device(&device, n).0 < n);
            prop_assert!(owner_of_channel(&InternalChannelId::unicast("u", &device), n).0 < n);
        }

        #[test]
        fn sequencer_stays_in_range(hex in "[0-9a-f]{32}", n in 1usize..64) {
            let chan = InternalChannelId::from_hex(&hex).expect("32 hex digits");
            prop_assert!(owner_of_channel(&chan, n).0 < n);
        }
    }
}
