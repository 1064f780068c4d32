#!/bin/bash
# The runtime's shape against the floor and pushbroker, after the glommio loop patches:
# one run of everything, alternating servers, 5,000 plain sessions, 3 reps.
# usage (from the repository root): perf/results/2026-12-02-shape/run.sh FLOOR_BINARY
set -eu
floor=$1
out=perf/results/2026-12-02-shape
for rep in 1 2 3; do
  for sc in broadcast unicast; do
    case $sc in
      broadcast) flags="--broadcasts 20" ;;
      unicast) flags="--notifies 20000 --concurrency 16" ;;
    esac
    for name in floor glommio_floor glommio_loop_floor pushbroker; do
      case $name in
        floor) server="$floor" ;;
        pushbroker) server=target/release/pushbroker ;;
        *) server=target/release/examples/$name ;;
      esac
      flock /tmp/perf.lock target/release/pushload --server "$server" --scenario $sc \
        --sessions 5000 --workers 1 $flags --json $out/$sc-$name-$rep.json > $out/$sc-$name-$rep.log 2>&1 || echo "failed: $sc $name $rep"
    done
  done
done
