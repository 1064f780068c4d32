#!/usr/bin/env bash
# Before/after: pushbroker at revision REV against the working tree, with the same
# pushload flags, alternating run by run so both see the same machine. Writes one JSON
# per run and TABLE.md (medians of the reps, after/before ratios).
#
#   perf/compare.sh --before REV [--sizes "5000 19000"] [--reps 3]
#                   [--scenarios "broadcast unicast"] [--tls] [--out DIR]
#
# REV is built in a git worktree under target/compare/; pushload is the working tree's.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

BEFORE=""
SIZES="5000 19000"
REPS=3
SCENARIOS="broadcast unicast"
OUT=""
TLS=""
while [ $# -gt 0 ]; do
    case $1 in
        --before) BEFORE=$2; shift 2 ;;
        --sizes) SIZES=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --scenarios) SCENARIOS=$2; shift 2 ;;
        --out) OUT=$(abspath "$2"); shift 2 ;;
        --tls) TLS=--tls; shift ;;
        -h|--help) sed -n '2,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "compare.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$BEFORE" ] || { echo "compare.sh: --before REV is required" >&2; exit 2; }
cd "$ROOT"
rev=$(git rev-parse --short "$BEFORE")
OUT=${OUT:-$ROOT/perf/results/$(date +%F)-compare-$rev}
if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "compare.sh: $OUT is not empty" >&2; exit 2
fi
mkdir -p "$OUT"

tree=$ROOT/target/compare/src-$rev
if [ ! -d "$tree" ]; then
    git worktree add --detach "$tree" "$rev" >/dev/null
fi
(cd "$tree" && cargo build --release --locked --bin pushbroker --target-dir "$ROOT/target/compare/build")
cp "$ROOT/target/compare/build/release/pushbroker" "$ROOT/target/compare/pushbroker-$rev"
cargo build --release --locked --bin pushbroker --bin pushload

after="working tree at $(git rev-parse --short HEAD)"
[ -z "$(git status --porcelain --untracked-files=no)" ] || after="$after (with uncommitted changes)"
{
    echo "# before/after, $(date '+%F %T %Z')"
    echo
    echo "- before: $rev; after: $after"
    echo "- nproc: $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "- kernel: $(uname -r)"
    echo "- sizes: $SIZES; reps: $REPS; scenarios: $SCENARIOS"
    echo
    echo '```sh'
} >"$OUT/MACHINE.md"

# shellcheck source=perf/flags.sh
. "$ROOT/perf/flags.sh"

failed=0
for scenario in $SCENARIOS; do
    for size in $SIZES; do
        workers=$(workers_for "$size")
        for rep in $(seq 1 "$REPS"); do
            for side in before after; do
                case $side in
                    before) bin=target/compare/pushbroker-$rev ;;
                    after) bin=target/release/pushbroker ;;
                esac
                name=$scenario-$size-$side-$rep
                # shellcheck disable=SC2207 # flags are single words
                cmd=(target/release/pushload --server "$bin" --scenario "$scenario"
                     --sessions "$size" --workers "$workers" $TLS $(scenario_flags "$scenario" "$size")
                     --json "$OUT/$name.json")
                echo "+ ${cmd[*]}"
                rc=0
                timeout -k 10 900 "${cmd[@]}" >"$OUT/$name.log" 2>&1 || rc=$?
                echo "${cmd[*]}  # exit $rc" >>"$OUT/MACHINE.md"
                [ "$rc" -eq 0 ] || { failed=$((failed + 1)); echo "  failed: exit $rc" >&2; }
            done
        done
    done
done
echo '```' >>"$OUT/MACHINE.md"

python3 - "$OUT" >"$OUT/TABLE.md" <<'EOF'
import json, os, re, statistics, sys
d = sys.argv[1]
runs = {}
for f in sorted(os.listdir(d)):
    m = re.match(r"^([a-z]+)-(\d+)-(before|after)-(\d+)\.json$", f)
    if m:
        with open(os.path.join(d, f)) as fh:
            runs.setdefault((m[1], int(m[2]), m[3]), []).append(json.load(fh))
metrics = [
    ("server CPU per delivery (µs)", lambda r: r.get("server_cpu_us_per_delivery")),
    ("latency p50 (ms)", lambda r: r["latency_ms"]["p50"]),
    ("latency p99 (ms)", lambda r: r["latency_ms"]["p99"]),
    ("server RSS per session (KB)", lambda r: r.get("server_rss_per_session_kb")),
    ("server CPU per connect (µs)", lambda r: r.get("server_cpu_us_per_connect")),
    ("connects per s", lambda r: r.get("connects_per_s")),
]
print("| scenario | sessions | metric | before | after | after / before |")
print("|---|---:|---|---:|---:|---:|")
for (scenario, size) in sorted({(s, n) for (s, n, _) in runs}):
    for label, get in metrics:
        med = {}
        for side in ("before", "after"):
            vals = [get(r) for r in runs.get((scenario, size, side), []) if r.get("ok")]
            vals = [v for v in vals if v is not None]
            med[side] = statistics.median(vals) if vals else None
        b, a = med["before"], med["after"]
        if b is None and a is None:
            continue
        fmt = lambda v: "—" if v is None else f"{v:.3g}"
        ratio = f"{a / b:.2f}×" if a is not None and b else "—"
        print(f"| {scenario} | {size:,} | {label} | {fmt(b)} | {fmt(a)} | {ratio} |")
EOF
cat "$OUT/TABLE.md"
echo "results in $OUT ($failed failed runs)"
[ "$failed" -eq 0 ]
