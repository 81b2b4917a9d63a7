#!/usr/bin/env bash
# A thin bdev against its base bdev alone, both through bdevperf on one core. The pool's data
# and metadata are uring bdevs on files in /dev/shm (so the pool can be provisioned by one
# bdevperf run and measured by the next: a malloc pool would not survive the process); the
# baseline is a uring bdev on another /dev/shm file of the thin bdev's size, written in full
# first the same way (its own file: writing the pool's data file would destroy the pool).
#  1. provisioned: 4 KiB randread and randwrite at QD 128 on a fully written thin bdev vs the
#     base bdev (target >= 0.90);
#  2. first writes: 64 KiB randwrite QD 32 on a fresh thin bdev (64 KiB blocks, zeroing off,
#     every write provisions) vs the same on the provisioned thin bdev (target >= 0.5).
# See common.sh for the environment knobs.
source "$(dirname "$0")/common.sh"
need taskset "util-linux"
build_bdevperf
header

SHM=$(mktemp -d /dev/shm/thin-bench.XXXXXX)
trap 'rm -rf "$SHM" "$BENCH_DIR"' EXIT
data=$SHM/data.img meta=$SHM/meta.img

# pool_config FILE ZERO CREATE_THIN: uring data/meta, pool0, and thin0 (2 GiB) if asked.
pool_config() {
    local thin=""
    [ "$3" = yes ] && thin=',{"method":"bdev_thin_create","params":{"pool":"pool0","name":"thin0","size_in_mib":2048}}'
    cat >"$1" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_uring_create","params":{"name":"d0","filename":"$data","block_size":4096}},
 {"method":"bdev_uring_create","params":{"name":"m0","filename":"$meta","block_size":4096}},
 {"method":"bdev_thin_pool_create","params":{"name":"pool0","data_bdev":"d0","metadata_bdev":"m0",
   "data_block_size":65536,"zero_new_blocks":$2}}$thin]}]}
JSON
}

fresh_pool() {
    rm -f "$data" "$meta"
    truncate -s 4G "$data"
    truncate -s 64M "$meta"
    pool_config "$BENCH_DIR/create.json" "$1" yes
    pool_config "$BENCH_DIR/open.json" "$1" no
}

base=$BENCH_DIR/base.json
truncate -s 2G "$SHM/base.img"
write_config "$base" bdev_uring_create "{\"name\":\"Base0\",\"filename\":\"$SHM/base.img\",\"block_size\":4096}"

# Provision all of thin0 once (sequential 64 KiB writes until the run ends).
fresh_pool false
first_ns=()
BENCH_SECONDS_SAVED=$BENCH_SECONDS
for rep in $(seq "$BENCH_REPS"); do
    # First writes: a fresh pool each time, short runs so that most writes still provision.
    fresh_pool false
    BENCH_SECONDS=2
    first_ns+=("$(bdevperf_run iops -q 32 -o 65536 -w randwrite -T thin0 --json "$BENCH_DIR/create.json")")
done
BENCH_SECONDS=8
bdevperf_run iops -q 32 -o 65536 -w write -T thin0 --json "$BENCH_DIR/open.json" >/dev/null
bdevperf_run iops -q 32 -o 65536 -w write -T Base0 --json "$base" >/dev/null
BENCH_SECONDS=$BENCH_SECONDS_SAVED

declare -A res
for rep in $(seq "$BENCH_REPS"); do
    for w in randread randwrite; do
        res[base_$w]+=" $(bdevperf_run iops -q 128 -o 4096 -w $w -T Base0 --json "$base")"
        res[thin_$w]+=" $(bdevperf_run iops -q 128 -o 4096 -w $w -T thin0 --json "$BENCH_DIR/open.json")"
    done
    res[prov64]+=" $(bdevperf_run iops -q 32 -o 65536 -w randwrite -T thin0 --json "$BENCH_DIR/open.json")"
    echo "run $rep done" >&2
done

printf '%-44s %12s %12s %7s\n' "4 KiB QD128, one core" "base IOPS" "thin IOPS" "ratio"
for w in randread randwrite; do
    # shellcheck disable=SC2086
    b=$(median ${res[base_$w]}) t=$(median ${res[thin_$w]})
    printf '%-44s %12.0f %12.0f %7s\n' "$w (provisioned thin vs uring base)" "$b" "$t" "$(ratio "$t" "$b")"
done
# shellcheck disable=SC2086
p=$(median ${res[prov64]}) f=$(median "${first_ns[@]}")
printf '%-44s %12s %12s %7s\n' "64 KiB randwrite QD32, zeroing off" "provisioned" "first write" "ratio"
printf '%-44s %12.0f %12.0f %7s\n' "thin0" "$p" "$f" "$(ratio "$f" "$p")"
echo "targets: provisioned >= 0.90 of base; first writes >= 0.5 of provisioned"
