#!/usr/bin/env bash
# bdevperf on a uring bdev vs fio --ioengine=io_uring on the same 2 GiB file: 4 KiB randread
# and randwrite at queue depth 1, 32, 128, O_DIRECT when the file system allows it (same flag
# for both). Prints IOPS (median of BENCH_REPS runs) and the ratio (target >= 0.95).
# BENCH_FILE overrides the file (default $BENCH_DIR/uring.img, filled with data first).
source "$(dirname "$0")/common.sh"
need fio "Debian package fio"
need taskset "util-linux"
build_bdevperf
header

file=${BENCH_FILE:-$BENCH_DIR/uring.img}
size=$((2 << 30))
if [ ! -f "$file" ] || [ "$(stat -c %s "$file")" -lt "$size" ]; then
    echo "filling $file with 2 GiB of data..." >&2
    fio --name=fill --filename="$file" --size=$size --rw=write --bs=1m --ioengine=psync \
        --end_fsync=1 --output=/dev/null
fi
direct=1
dd if="$file" of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null || direct=0
config=$BENCH_DIR/uring.json
write_config "$config" bdev_uring_create "{\"name\":\"Uring0\",\"filename\":\"$file\",\"block_size\":4096}"

printf '%-22s %12s %12s %8s\n' "4KiB O_DIRECT=$direct" "bdevperf" "fio" "ratio"
for rw in randread randwrite; do
    for qd in 1 32 128; do
        ours=() theirs=()
        for _ in $(seq "$BENCH_REPS"); do
            ours+=("$(bdevperf_run iops -q "$qd" -o 4096 -w "$rw" --json "$config")")
            fio_json --ioengine=io_uring --filename="$file" --size=$size --rw="$rw" --bs=4k \
                --iodepth="$qd" --direct="$direct"
            theirs+=("$(fio_field 'rw["iops"]')")
        done
        b=$(median "${ours[@]}")
        f=$(median "${theirs[@]}")
        printf '%-22s %12.0f %12.0f %8s\n' "$rw QD$qd" "$b" "$f" "$(ratio "$b" "$f")"
    done
done
echo "target: ratio >= 0.95 everywhere"
