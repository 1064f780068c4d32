#!/bin/bash
# What TLS costs the least server of pushbroker's shape (`examples/glommio_floor.rs` with
# rustls' buffered connection) against what it costs pushbroker, with the floor server
# (plain) as the common reference: one run, servers alternating, 3 reps.
# usage (from the repository root, after `cargo build --release --features pushload
# --bin pushload --bin pushbroker --example glommio_floor`):
#   perf/results/2026-12-02-tls-floor/run.sh FLOOR_BINARY [SIZES]
set -eu
floor=$1
sizes=${2:-"5000 19000"}
out=perf/results/2026-12-02-tls-floor
. perf/flags.sh
for size in $sizes; do
  workers=$(workers_for "$size")
  for rep in 1 2 3; do
    for sc in connect broadcast unicast; do
      # shellcheck disable=SC2207
      flags=($(scenario_flags "$sc" "$size"))
      for name in floor glommio_floor glommio_floor-tls pushbroker pushbroker-tls; do
        case $name in
          floor) server="$floor" ;;
          glommio_floor*) server=target/release/examples/glommio_floor ;;
          pushbroker*) server=target/release/pushbroker ;;
        esac
        tls=()
        [[ $name == *-tls ]] && tls=(--tls)
        flock /tmp/perf.lock target/release/pushload --server "$server" --scenario "$sc" \
          --sessions "$size" --workers "$workers" "${flags[@]}" "${tls[@]}" \
          --json "$out/$sc-$size-$name-$rep.json" > "$out/$sc-$size-$name-$rep.log" 2>&1 \
          || echo "failed: $sc $size $name $rep"
      done
    done
  done
done
