//! The broker conformance suite, run against every broker implementation.

use pushbroker::broker::testing::run_local;
use pushbroker::broker::testsuite::SimpleSuite;

pushbroker::broker_conformance!(simple, SimpleSuite::new, run_local);
