#!/usr/bin/env bash
# Thin pool scaling and break-sharing cost, through bdevperf (see thin_vs_base.sh for why the
# pool lives on uring bdevs over /dev/shm files):
#  1. 4 KiB randread and randwrite QD 128 per thin bdev, on 1, 4 and 16 provisioned thin bdevs
#     of one pool, one reactor; and 4 thin bdevs on two reactors (-m with 2 cores, one job per
#     bdev dealt round-robin to the reactors);
#  2. 4 KiB randwrite QD 128 on thin0 right after a snapshot of it (the first write to each
#     64 KiB block copies it: break sharing), next to the same run without a snapshot.
# See common.sh for the environment knobs.
source "$(dirname "$0")/common.sh"
need taskset "util-linux"
build_bdevperf
header

SHM=$(mktemp -d /dev/shm/thin-scaling.XXXXXX)
trap 'rm -rf "$SHM" "$BENCH_DIR"' EXIT
data=$SHM/data.img meta=$SHM/meta.img

# config FILE EXTRA_CALLS: uring data/meta and pool0, then EXTRA_CALLS (JSON objects).
config() {
    cat >"$1" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_uring_create","params":{"name":"d0","filename":"$data","block_size":4096}},
 {"method":"bdev_uring_create","params":{"name":"m0","filename":"$meta","block_size":4096}},
 {"method":"bdev_thin_pool_create","params":{"name":"pool0","data_bdev":"d0","metadata_bdev":"m0"}}$2]}]}
JSON
}

# fresh_pool N: a new pool with thin bdevs thin0..thinN-1 of 512 MiB, each written in full.
fresh_pool() {
    local n=$1 creates="" i saved=$BENCH_SECONDS
    rm -f "$data" "$meta"
    # Room for the thin bdevs and for breaking the sharing with three snapshots of each.
    truncate -s $((n * 512 * 4 + 256))M "$data"
    truncate -s 256M "$meta"
    for i in $(seq 0 $((n - 1))); do
        creates+=",{\"method\":\"bdev_thin_create\",\"params\":{\"pool\":\"pool0\",\"name\":\"thin$i\",\"size_in_mib\":512}}"
    done
    config "$BENCH_DIR/create.json" "$creates"
    config "$BENCH_DIR/open.json" ""
    BENCH_SECONDS=1
    bdevperf_run iops -q 1 -o 4096 -w read -T thin0 --json "$BENCH_DIR/create.json" >/dev/null
    # Sequential 64 KiB writes, one job per thin bdev, long enough to cover each bdev: every
    # first write provisions a block, which runs at a few thousand 64 KiB writes per second on
    # a busy machine, so allow 2 s per 512 MiB bdev (THIN_PROVISION_SECONDS overrides). A
    # bdev left partly unprovisioned turns the randwrite figures into first-write figures.
    BENCH_SECONDS=${THIN_PROVISION_SECONDS:-$((4 + 2 * n))}
    bdevperf_run iops -q 32 -o 65536 -w write --json "$BENCH_DIR/open.json" >/dev/null
    BENCH_SECONDS=$saved
}

printf '%-40s %14s %14s\n' "4 KiB QD128 per bdev, total IOPS" "randread" "randwrite"
for setup in "1 1" "4 1" "16 1" "4 2"; do
    read -r n cores <<<"$setup"
    [ "$cores" = 1 ] && fresh_pool "$n"
    mask=$BENCH_MASK
    [ "$cores" = 2 ] && mask=0x3
    for w in randread randwrite; do
        vals=()
        for rep in $(seq "$BENCH_REPS"); do
            vals+=("$(BENCH_MASK=$mask bdevperf_run iops -q 128 -o 4096 -w $w --json "$BENCH_DIR/open.json")")
        done
        eval "r_$w=$(median "${vals[@]}")"
    done
    # shellcheck disable=SC2154
    printf '%-40s %14.0f %14.0f\n' "$n thin bdev(s), $cores reactor(s)" "$r_randread" "$r_randwrite"
done

# Break sharing: snapshot thin0, then random 4 KiB writes to it (a fresh snapshot each rep).
fresh_pool 1
plain=() broken=()
for rep in $(seq "$BENCH_REPS"); do
    plain+=("$(bdevperf_run iops -q 128 -o 4096 -w randwrite -T thin0 --json "$BENCH_DIR/open.json")")
done
for rep in $(seq "$BENCH_REPS"); do
    config "$BENCH_DIR/snap.json" ",{\"method\":\"bdev_thin_snapshot\",\"params\":{\"thin_name\":\"thin0\",\"snapshot_name\":\"snap$rep\"}}"
    broken+=("$(bdevperf_run iops -q 128 -o 4096 -w randwrite -T thin0 --json "$BENCH_DIR/snap.json")")
done
p=$(median "${plain[@]}") b=$(median "${broken[@]}")
printf '%-40s %14.0f\n' "thin0 randwrite, provisioned" "$p"
printf '%-40s %14.0f   (ratio %s)\n' "thin0 randwrite right after a snapshot" "$b" "$(ratio "$b" "$p")"
