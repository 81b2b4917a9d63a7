#!/usr/bin/env bash
# bdevperf on a null bdev vs fio's null engine: one core, 4 KiB randread, queue depth 128.
# Prints both IOPS (median of BENCH_REPS runs), the ratio (target >= 5x) and the CPU cost per
# I/O: each tool's measured user+system CPU time divided by the I/Os it completed (bdevperf
# polls, so on an idle machine its cost is close to 1e9 / IOPS). See common.sh for the environment knobs.
source "$(dirname "$0")/common.sh"
need fio "Debian package fio"
need taskset "util-linux"
build_bdevperf
header

config=$BENCH_DIR/null.json
write_config "$config" bdev_null_create \
    '{"name":"Null0","num_blocks":268435456,"block_size":512}'

ours=() theirs=() fio_ns=() our_ns=()
for rep in $(seq "$BENCH_REPS"); do
    ours+=("$(bdevperf_run iops -q 128 -o 4096 -w randread --json "$config")")
    runtime=$(total_field runtime <"$BENCH_DIR/bdevperf.out")
    our_ns+=("$(python3 -c "import sys; cpu, iops, t = map(float, sys.argv[1:]); \
print(cpu * 1e9 / (iops * t))" "$(cat "$BENCH_DIR/bdevperf.cpu")" "${ours[-1]}" "$runtime")")
    fio_json --ioengine=null --rw=randread --bs=4k --iodepth=128 --size=128g
    theirs+=("$(fio_field 'rw["iops"]')")
    fio_ns+=("$(fio_field '(j["usr_cpu"] + j["sys_cpu"]) / 100 * 1e9 / rw["iops"]')")
    echo "run $rep: bdevperf ${ours[-1]} IOPS, fio ${theirs[-1]} IOPS" >&2
done
b=$(median "${ours[@]}")
f=$(median "${theirs[@]}")
fns=$(median "${fio_ns[@]}")
bns=$(median "${our_ns[@]}")
printf '%-34s %14s %12s\n' "null 4KiB randread QD128" "IOPS" "ns/IO (CPU)"
printf '%-34s %14.0f %12.1f\n' "bdevperf (null bdev)" "$b" "$bns"
printf '%-34s %14.0f %12.1f\n' "fio --ioengine=null" "$f" "$fns"
echo "ratio bdevperf/fio: $(ratio "$b" "$f")x (target >= 5x)"
