#!/usr/bin/env bash
# What durability costs: pushload's unicast scenario against pushbroker in memory (no
# data_dir), with data_dir in the default mode (sync: answered once on disk) and in the
# relaxed mode, alternating run by run so all three see the same machine; then the
# recovery time of PENDING pending notifications (examples/recovery_time.rs). Writes one
# JSON + log per run, MACHINE.md and TABLE.md (medians of the reps, ratios to memory).
#
#   perf/durability.sh [--sizes "5000"] [--reps 3] [--notifies N] [--concurrency C]
#                      [--pending 1000000] [--out DIR]
#
# --notifies and --concurrency default to perf/run.sh's unicast flags (perf/flags.sh).
# The data folders live under the run's temporary folder (pushload's), on the same
# filesystem as TMPDIR: point TMPDIR at the disk you want measured.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

SIZES="5000"
REPS=3
NOTIFIES=""
CONCURRENCY=16
PENDING=1000000
OUT=""
while [ $# -gt 0 ]; do
    case $1 in
        --sizes) SIZES=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --notifies) NOTIFIES=$2; shift 2 ;;
        --concurrency) CONCURRENCY=$2; shift 2 ;;
        --pending) PENDING=$2; shift 2 ;;
        --out) OUT=$(abspath "$2"); shift 2 ;;
        -h|--help) sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "durability.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
OUT=${OUT:-$ROOT/perf/results/$(date +%F)-durability}
if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "durability.sh: $OUT is not empty" >&2; exit 2
fi
mkdir -p "$OUT"

cargo build --release --locked --bin pushbroker --bin pushload --example recovery_time

commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit (with uncommitted changes)"
tmp=${TMPDIR:-/tmp}
{
    echo "# durability run, $(date '+%F %T %Z')"
    echo
    echo "- commit: $commit"
    echo "- nproc: $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "- kernel: $(uname -r)"
    echo "- data on: $(df -T "$tmp" | awk 'NR==2 {print $1 " (" $2 ")"}') via $tmp"
    echo "- sizes: $SIZES; reps: $REPS; notifies: ${NOTIFIES:-as perf/flags.sh}; concurrency: $CONCURRENCY"
    echo
    echo '```sh'
} >"$OUT/MACHINE.md"

failed=0
for size in $SIZES; do
    workers=$((size > 10000 ? 2 : 1))
    notifies=${NOTIFIES:-$((size * 2 > 20000 ? size * 2 : 20000))}
    for rep in $(seq 1 "$REPS"); do
        for mode in memory sync relaxed; do
            case $mode in
                memory) extra='{}' ;;
                sync) extra='{"data_dir":"data"}' ;;
                relaxed) extra='{"data_dir":"data","durability":"relaxed"}' ;;
            esac
            name=unicast-$size-$mode-$rep
            cmd=(target/release/pushload --server target/release/pushbroker --scenario unicast
                 --sessions "$size" --workers "$workers" --notifies "$notifies"
                 --concurrency "$CONCURRENCY" --server-config "$extra"
                 --json "$OUT/$name.json")
            echo "+ ${cmd[*]}"
            rc=0
            timeout -k 10 900 "${cmd[@]}" >"$OUT/$name.log" 2>&1 || rc=$?
            printf '%q ' "${cmd[@]}" | sed "s|$ROOT/||g" >>"$OUT/MACHINE.md"
            echo " # exit $rc" >>"$OUT/MACHINE.md"
            [ "$rc" -eq 0 ] || { failed=$((failed + 1)); echo "  failed: exit $rc" >&2; }
        done
    done
done
recovery=(target/release/examples/recovery_time "$PENDING" 2 3)
echo "+ ${recovery[*]}"
"${recovery[@]}" | tee "$OUT/recovery.txt"
echo "${recovery[*]}" >>"$OUT/MACHINE.md"
echo '```' >>"$OUT/MACHINE.md"

python3 - "$OUT" >"$OUT/TABLE.md" <<'EOF'
import json, os, re, statistics, sys
d = sys.argv[1]
runs = {}
for f in sorted(os.listdir(d)):
    m = re.match(r"^unicast-(\d+)-(memory|sync|relaxed)-(\d+)\.json$", f)
    if m:
        with open(os.path.join(d, f)) as fh:
            runs.setdefault((int(m[1]), m[2]), []).append(json.load(fh))
metrics = [
    ("notifies per s", lambda r: r.get("notifies_per_s")),
    ("latency p50 (ms)", lambda r: r["latency_ms"]["p50"]),
    ("latency p99 (ms)", lambda r: r["latency_ms"]["p99"]),
    ("server CPU per delivery (µs)", lambda r: r.get("server_cpu_us_per_delivery")),
]
modes = ("memory", "sync", "relaxed")
print("| sessions | metric | memory | data_dir, sync | data_dir, relaxed | sync / memory | relaxed / memory |")
print("|---:|---|---:|---:|---:|---:|---:|")
for size in sorted({n for (n, _) in runs}):
    bad = [(mode, r.get("missing"), r.get("duplicates")) for mode in modes
           for r in runs.get((size, mode), []) if not r.get("ok")]
    for label, get in metrics:
        med = {}
        for mode in modes:
            vals = [get(r) for r in runs.get((size, mode), []) if r.get("ok")]
            vals = [v for v in vals if v is not None]
            med[mode] = statistics.median(vals) if vals else None
        fmt = lambda v: "—" if v is None else f"{v:.3g}"
        ratio = lambda a, b: f"{a / b:.2f}×" if a is not None and b else "—"
        m = med["memory"]
        print(f"| {size:,} | {label} | {fmt(m)} | {fmt(med['sync'])} | {fmt(med['relaxed'])} "
              f"| {ratio(med['sync'], m)} | {ratio(med['relaxed'], m)} |")
    if bad:
        print(f"\nruns not ok at {size}: {bad}")
EOF
cat "$OUT/TABLE.md"
echo
cat "$OUT/recovery.txt"
echo "results in $OUT ($failed failed runs)"
[ "$failed" -eq 0 ]
