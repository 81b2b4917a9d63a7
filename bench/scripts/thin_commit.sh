#!/usr/bin/env bash
# Thin pool commit cost: flush latency (each flush commits the pool metadata) p50/p99 against
# the number of mappings changed since the previous commit (0, 1, 100, 10 000, 100 000), and
# the metadata blocks each commit writes; sequential and random placement of the changed
# blocks; metadata on a malloc bdev (CPU cost of the commit) and on a uring bdev over a file
# in $BENCH_DIR (adds the file's writes and flushes). The data bdev is a null bdev. Runs
# bdev/examples/thin_commit.rs (see its header for the method). Changed = 0 is a flush with
# nothing dirty: it must write no metadata block.
# See common.sh for the environment knobs (BENCH_CORE; BENCH_SECONDS and BENCH_REPS unused).
# THIN_COMMIT_COUNTS overrides the counts (comma separated), THIN_COMMIT_BASE the number of
# mappings the thin bdev holds before the measured changes (default 131072).
source "$(dirname "$0")/common.sh"
header

root=$(repo_root)
if [ -z "${THIN_COMMIT:-}" ]; then
    (cd "$root" && cargo build --release -q -p bdev --example thin_commit)
    THIN_COMMIT=${CARGO_TARGET_DIR:-$root/target}/release/examples/thin_commit
fi
[ -x "$THIN_COMMIT" ] || { echo "thin_commit not found at $THIN_COMMIT" >&2; exit 1; }
counts=${THIN_COMMIT_COUNTS:-0,1,100,10000,100000}

for meta in malloc file; do
    for placement in seq rand; do
        args=(--counts "$counts" --base "${THIN_COMMIT_BASE:-131072}" --placement "$placement"
              --core "$BENCH_CORE")
        [ "$meta" = file ] && args+=(--meta-file "$BENCH_DIR/thin-commit-meta.img")
        echo "## metadata: $meta, placement: $placement"
        "$THIN_COMMIT" "${args[@]}" | grep -v '^{'
        rm -f "$BENCH_DIR/thin-commit-meta.img"
    done
done
