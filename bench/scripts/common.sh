# Shared helpers of the bdevperf benchmark scripts (sourced, not run).
#
# Environment:
#   BENCH_SECONDS  run time of each measurement (default 5)
#   BENCH_REPS     repetitions of each measurement; the median is reported (default 3)
#   BENCH_CORE     CPU the measured process is pinned to (default 1, or 0 on a 1-CPU machine)
#   BENCH_DIR      scratch directory for configs and files, kept (default: a temporary one,
#                  removed at exit)
#   BDEVPERF       bdevperf binary (default: built here with cargo build --release -p bench)
set -euo pipefail

BENCH_SECONDS=${BENCH_SECONDS:-5}
BENCH_REPS=${BENCH_REPS:-3}
if [ -z "${BENCH_CORE:-}" ]; then
    if [ "$(nproc)" -gt 1 ]; then BENCH_CORE=1; else BENCH_CORE=0; fi
fi
BENCH_MASK=$(printf '0x%x' $((1 << BENCH_CORE)))
if [ -z "${BENCH_DIR:-}" ]; then
    BENCH_DIR=$(mktemp -d /var/tmp/bdevperf-bench.XXXXXX)
    trap 'rm -rf "$BENCH_DIR"' EXIT
fi
mkdir -p "$BENCH_DIR"

repo_root() { cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd; }

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "missing prerequisite: $1 ($2)" >&2; exit 1; }
}

build_bdevperf() {
    if [ -z "${BDEVPERF:-}" ]; then
        local root target
        root=$(repo_root)
        (cd "$root" && cargo build --release -q -p bench)
        target=${CARGO_TARGET_DIR:-$root/target}
        BDEVPERF=$target/release/bdevperf
        PROBE=$target/release/bdevperf-probe
    else
        PROBE=${PROBE:-$(dirname "$BDEVPERF")/bdevperf-probe}
    fi
    [ -x "$BDEVPERF" ] || { echo "bdevperf not found at $BDEVPERF" >&2; exit 1; }
}

# write_config FILE METHOD PARAMS_JSON: a one-bdev SPDK JSON config.
write_config() {
    printf '{"subsystems":[{"subsystem":"bdev","config":[{"method":"%s","params":%s}]}]}\n' \
        "$2" "$3" >"$1"
}

# median V1 V2 ...: the median of numbers.
median() {
    printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2] + a[NR/2+1]) / 2 }'
}

# total_field KEY: reads the bdevperf "Total" JSON line from stdin, prints KEY.
total_field() {
    python3 -c '
import json, sys
key = sys.argv[1]
for line in sys.stdin:
    if line.startswith("{"):
        v = json.loads(line)
        if v.get("job") == "Total":
            print(v[key]); break
else:
    sys.exit("no Total line in bdevperf output")' "$1"
}

# bdevperf_run KEY ARGS...: one bdevperf run on BENCH_MASK; prints KEY of its Total line.
bdevperf_run() {
    local key=$1
    shift
    # Run under a tiny Python wrapper that records the child's CPU time (user + system) in
    # $BENCH_DIR/bdevperf.cpu, for the per-I/O CPU cost.
    python3 -c '
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{ru.ru_utime + ru.ru_stime}\n")
sys.exit(rc)' "$BENCH_DIR/bdevperf.cpu" \
        "$BDEVPERF" -m "$BENCH_MASK" -t "$BENCH_SECONDS" -S 0 "$@" >"$BENCH_DIR/bdevperf.out" \
        2>"$BENCH_DIR/bdevperf.err" || {
        echo "bdevperf $* failed:" >&2
        cat "$BENCH_DIR/bdevperf.err" >&2
        exit 1
    }
    total_field "$key" <"$BENCH_DIR/bdevperf.out"
}

# fio_json ARGS...: one fio run pinned to BENCH_CORE, JSON output in $BENCH_DIR/fio.json.
fio_json() {
    taskset -c "$BENCH_CORE" fio --output-format=json --output="$BENCH_DIR/fio.json" \
        --name=bench --time_based --runtime="$BENCH_SECONDS" --ramp_time=0 "$@" >/dev/null
}

# fio_field EXPR: a Python expression over `j` (the fio job) and `rw` (read or write part).
fio_field() {
    python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
rw = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
print(eval(sys.argv[2]))' "$BENCH_DIR/fio.json" "$1"
}

ratio() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print(f'{a / b:.2f}' if b else 'inf')" "$1" "$2"; }

header() {
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC') $(uname -r) $(nproc) CPUs," \
        "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "# load average: $(cut -d' ' -f1-3 /proc/loadavg); runs: ${BENCH_REPS} x" \
        "${BENCH_SECONDS}s, median; core ${BENCH_CORE}"
}
