#!/usr/bin/env bash
# Load scenarios with pushload: pushbroker plain, pushbroker TLS and the floor server
# (../shared/floor, the lower bound), one after the other with the same flags, for every
# scenario, size and rep. Writes one JSON + log per run, MACHINE.md and TABLES.md.
#
#   perf/run.sh [--floor-src PATH] [--sizes "1000 5000 19000"] [--reps 3]
#               [--scenarios "connect idle broadcast unicast churn"] [--out DIR]
#
# The same settings can come from the environment: FLOOR_SRC, SIZES, REPS, SCENARIOS, OUT.
# RUN_TIMEOUT (seconds, default 900) bounds each pushload run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

SIZES=${SIZES:-"1000 5000 19000"}
REPS=${REPS:-3}
SCENARIOS=${SCENARIOS:-"connect idle broadcast unicast churn"}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
FLOOR_SRC=${FLOOR_SRC:+$(abspath "$FLOOR_SRC")}
OUT=${OUT:+$(abspath "$OUT")}
while [ $# -gt 0 ]; do
    case $1 in
        --floor-src) FLOOR_SRC=$(abspath "$2"); shift 2 ;;
        --sizes) SIZES=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --scenarios) SCENARIOS=$2; shift 2 ;;
        --out) OUT=$(abspath "$2"); shift 2 ;;
        -h|--help) sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
FLOOR_SRC=${FLOOR_SRC:-$ROOT/../shared/floor/floor.c}

# A fresh results directory: the default one gets a -2, -3, ... suffix if taken.
if [ -z "${OUT:-}" ]; then
    OUT=$ROOT/perf/results/$(date +%F)-pushload
    base=$OUT; i=2
    while [ -e "$OUT" ]; do OUT=$base-$i; i=$((i + 1)); done
elif [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "run.sh: $OUT is not empty" >&2; exit 2
fi
mkdir -p "$OUT"
MACHINE=$OUT/MACHINE.md

# Prints a command in a form that can be pasted into a shell from the repository root.
quote() { printf '%q ' "$@" | sed -e 's/ $//' -e "s|$ROOT/||g"; }

BUILD=(cargo build --release --locked --bin pushbroker --bin pushload)
echo "+ $(quote "${BUILD[@]}")"
"${BUILD[@]}"

FLOOR=""
FLOOR_BUILD=(cc -O2 -o target/floor/floor "$FLOOR_SRC" -lpthread)
if [ -f "$FLOOR_SRC" ]; then
    mkdir -p target/floor
    echo "+ $(quote "${FLOOR_BUILD[@]}")"
    "${FLOOR_BUILD[@]}"
    FLOOR=target/floor/floor
else
    echo "note: no floor source at $FLOOR_SRC; running without the floor column" >&2
fi

commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit (with uncommitted changes)"
{
    echo "# pushload run, $(date '+%F %T %Z')"
    echo
    echo "- commit: $commit"
    echo "- nproc: $(nproc)"
    echo "- cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "- memory: $(free -g | awk '/^Mem:/ {print $2}') GiB (free -g total)"
    echo "- kernel: $(uname -r)"
    echo "- open files per process: $(ulimit -n)"
    echo "- $(rustc --version)"
    if [ -n "$FLOOR" ]; then
        echo "- floor: $FLOOR_SRC, sha256 $(sha256sum "$FLOOR_SRC" | cut -c1-16)"
    else
        echo "- floor: not run (no source at $FLOOR_SRC)"
    fi
    echo "- sizes: $SIZES; reps: $REPS; scenarios: $SCENARIOS"
    echo
    echo "## Commands (from the repository root; exit code after each run)"
    echo
    echo '```sh'
    quote "${BUILD[@]}"; echo
    [ -z "$FLOOR" ] || { quote "${FLOOR_BUILD[@]}"; echo; }
} >"$MACHINE"

# shellcheck source=perf/flags.sh
. "$ROOT/perf/flags.sh"

failed=0
for scenario in $SCENARIOS; do
    for size in $SIZES; do
        workers=$(workers_for "$size")
        for rep in $(seq 1 "$REPS"); do
            for server in plain tls floor; do
                case $server in
                    plain) srv=(--server target/release/pushbroker) ;;
                    tls) srv=(--server target/release/pushbroker --tls) ;;
                    # The floor has no TLS, and no pending storage for churn to exercise.
                    floor) [ -n "$FLOOR" ] && [ "$scenario" != churn ] || continue
                           srv=(--server "$FLOOR") ;;
                esac
                name=$scenario-$size-$server-$rep
                # shellcheck disable=SC2207 # flags are single words
                cmd=(target/release/pushload "${srv[@]}" --scenario "$scenario" --sessions "$size"
                     --workers "$workers" $(scenario_flags "$scenario" "$size")
                     --json "$OUT/$name.json")
                echo "+ $(quote "${cmd[@]}")"
                rc=0
                timeout -k 10 "$RUN_TIMEOUT" "${cmd[@]}" >"$OUT/$name.log" 2>&1 || rc=$?
                echo "$rc" >"$OUT/$name.rc"
                echo "$(quote "${cmd[@]}")  # exit $rc" >>"$MACHINE"
                if [ "$rc" -ne 0 ]; then
                    failed=$((failed + 1))
                    echo "  failed: exit $rc, see $OUT/$name.log" >&2
                fi
            done
        done
    done
done
echo '```' >>"$MACHINE"

python3 perf/table.py "$OUT" >"$OUT/TABLES.md"
cat "$OUT/TABLES.md"
echo
echo "results in $OUT ($failed failed runs)"
[ "$failed" -eq 0 ]
