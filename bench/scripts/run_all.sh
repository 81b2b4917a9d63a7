#!/usr/bin/env bash
# Runs the three bdevperf benchmarks one after the other (build once) and prints their tables;
# paste the output into bench/RESULTS.md with the date and the machine's load.
# Environment: as common.sh (BENCH_SECONDS, BENCH_REPS, BENCH_CORE, BDEVPERF, BENCH_DIR).
set -euo pipefail
here=$(dirname "$0")
source "$here/common.sh"
build_bdevperf
export BDEVPERF PROBE BENCH_SECONDS BENCH_REPS BENCH_CORE
for script in null_vs_fio.sh uring_vs_fio.sh malloc_vs_memcpy.sh; do
    echo "## $script"
    BENCH_DIR="$BENCH_DIR/$script" bash "$here/$script"
    echo
done
