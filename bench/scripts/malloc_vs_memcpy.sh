#!/usr/bin/env bash
# bdevperf on a 1 GiB malloc bdev, randread QD128 at 4 KiB and 128 KiB, next to single-thread
# memcpy bandwidth of the same block size (bdevperf-probe memcpy) measured in the same run.
# A malloc read is one memcpy from bdev memory to the I/O buffer, so the ratio says how much
# of the memory bandwidth one core leaves to the data path. Median of BENCH_REPS runs.
source "$(dirname "$0")/common.sh"
need taskset "util-linux"
build_bdevperf
header

config=$BENCH_DIR/malloc.json
write_config "$config" bdev_malloc_create '{"name":"Malloc0","num_blocks":262144,"block_size":4096}'

printf '%-22s %16s %16s %8s\n' "randread QD128" "bdevperf B/s" "memcpy B/s" "ratio"
for size in 4096 131072; do
    ours=() theirs=()
    for _ in $(seq "$BENCH_REPS"); do
        mibps=$(bdevperf_run mibps -q 128 -o "$size" -w randread --json "$config")
        ours+=("$(python3 -c "print(float('$mibps') * 1048576)")")
        theirs+=("$(taskset -c "$BENCH_CORE" "$PROBE" memcpy "$size" "$BENCH_SECONDS" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_per_sec"])')")
    done
    b=$(median "${ours[@]}")
    m=$(median "${theirs[@]}")
    printf '%-22s %16.0f %16.0f %8s\n' "$size bytes" "$b" "$m" "$(ratio "$b" "$m")"
done
