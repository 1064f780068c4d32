#!/bin/bash
# usage: run.sh [FLOOR_SRC]. One run alternating: floor, pushbroker 2 shards (default), pushbroker 1 shard; 5,000 sessions.
cd "$(dirname "$0")/../../.."
out=perf/results/2026-12-01-one-shard
cc -O2 -pthread -o /tmp/floor "${1:-../shared/floor/floor.c}"  # the floor server's source, as perf/run.sh --floor-src
for sc in broadcast unicast; do
  if [ $sc = broadcast ]; then f="--broadcasts 20"; else f="--notifies 20000 --concurrency 16"; fi
  for rep in 1 2 3; do
    for srv in floor two one; do
      case $srv in
        floor) s="--server /tmp/floor";;
        two) s="--server target/release/pushbroker";;
        one) s="--server target/release/pushbroker --server-config {\"shards\":1}";;
      esac
      cmd="target/release/pushload $s --scenario $sc --sessions 5000 --workers 1 $f --json $out/$sc-$srv-$rep.json"
      echo "$cmd" >> $out/COMMANDS.txt
      flock /tmp/perf.lock $cmd > $out/$sc-$srv-$rep.log 2>&1
      echo "$sc $srv $rep $(grep -E 'result' $out/$sc-$srv-$rep.log | awk '{print $2}') $(grep 'server CPU µs/delivery' $out/$sc-$srv-$rep.log | awk '{print $4}')"
    done
  done
done
