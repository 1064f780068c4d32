//! The broker conformance suite, run against every broker implementation: the
//! one-executor broker and the sharded broker with 1, 2 and 4 shards.

use pushbroker::broker::testing::run_local;
use pushbroker::broker::testsuite::{ShardedSuite, SimpleSuite};

pushbroker::broker_conformance!(simple, SimpleSuite::new, run_local);
pushbroker::broker_conformance!(sharded_1, |s, c| ShardedSuite::new(s, c, 1), run_local);
pushbroker::broker_conformance!(sharded_2, |s, c| ShardedSuite::new(s, c, 2), run_local);
pushbroker::broker_conformance!(sharded_4, |s, c| ShardedSuite::new(s, c, 4), run_local);
