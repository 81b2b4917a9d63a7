#!/usr/bin/env bash
# thind's vhost-user-blk controllers against local bdevperf and against qemu-storage-daemon,
# all measured from the host by the same frontend driver (vhost-blk-perf: shared memfd guest
# memory, split rings, busy-polled used rings) in the same run. 4 KiB randread and randwrite at
# QD 1 and 128, one queue; each figure is the median of BENCH_REPS runs; ratios are ours / theirs.
#  (a) thind's controller on a malloc bdev vs bdevperf on the same kind of malloc bdev locally
#      (the cost of the vhost-user path: rings in shared memory, a second process);
#  (b) qemu-storage-daemon's vhost-user-blk export of a raw file in /dev/shm and of a qcow2
#      file in /dev/shm (preallocation=full) vs thind's controller on a fully provisioned thin
#      bdev over a uring bdev on a raw file in /dev/shm; thind's controller on a uring bdev on
#      such a file is shown too (the same stack as qemu-storage-daemon's raw export).
# The targets run on core VHOST_TARGET_CORE (default 0): thind as one poll-mode reactor there
# (-m), qemu-storage-daemon pinned there with taskset (an iothread serves the export, file I/O
# through io_uring); bdevperf runs there too. The driver runs on VHOST_DRIVER_CORE (default 1).
# Only one target runs at a time: thind busy-polls its core. Unix sockets only.
#
# Environment (see common.sh for BENCH_SECONDS, BENCH_REPS, BENCH_DIR):
#   VHOST_TARGET_CORE, VHOST_DRIVER_CORE   cores of the targets and of the driver
#   VHOST_BENCH_MIB    size of every device and file (default 1024)
#   VHOST_THIND_MODE   poll (default: SPDK's way, a reactor spinning on its own core) or
#                      interrupt (thind --interrupt-mode: sleeps when idle, as
#                      qemu-storage-daemon does; the fairer setting on a shared, loaded machine)
#   THIND, VHOST_BLK_PERF, QSD   binaries (default: built here; /usr/bin/qemu-storage-daemon)
VHOST_TARGET_CORE=${VHOST_TARGET_CORE:-0}
VHOST_DRIVER_CORE=${VHOST_DRIVER_CORE:-1}
# bdevperf is target and driver in one process: it runs on the targets' core.
BENCH_CORE=$VHOST_TARGET_CORE
bench_dir_given=${BENCH_DIR:+yes}
source "$(dirname "$0")/common.sh"
need taskset "util-linux"
need fallocate "util-linux"
need qemu-img "QEMU (qemu-utils)"
QSD=${QSD:-/usr/bin/qemu-storage-daemon}
[ -x "$QSD" ] || { echo "missing prerequisite: $QSD (qemu-system-common)" >&2; exit 1; }
build_bdevperf
root=$(repo_root)
target=${CARGO_TARGET_DIR:-$root/target}
VHOST_BLK_PERF=${VHOST_BLK_PERF:-$(dirname "$BDEVPERF")/vhost-blk-perf}
if [ -z "${THIND:-}" ]; then
    (cd "$root" && cargo build --release -q --bin thind)
    THIND=$target/release/thind
fi
for b in "$VHOST_BLK_PERF" "$THIND"; do
    [ -x "$b" ] || { echo "not found: $b" >&2; exit 1; }
done
MIB=${VHOST_BENCH_MIB:-1024}
case ${VHOST_THIND_MODE:=poll} in
    poll) thind_mode=() ;;
    interrupt) thind_mode=(--interrupt-mode) ;;
    *) echo "VHOST_THIND_MODE must be poll or interrupt" >&2; exit 1 ;;
esac
TARGET_MASK=$(printf '0x%x' $((1 << VHOST_TARGET_CORE)))
header
echo "# targets on core $VHOST_TARGET_CORE, driver on core $VHOST_DRIVER_CORE; devices ${MIB} MiB;" \
    "thind in $VHOST_THIND_MODE mode"

SHM=$(mktemp -d /dev/shm/vhost-bench.XXXXXX)
SOCKS=$BENCH_DIR/sockets
mkdir -p "$SOCKS"
target_pid=""
stop_target() {
    if [ -n "$target_pid" ]; then
        kill "$target_pid" 2>/dev/null || true
        wait "$target_pid" 2>/dev/null || true
        target_pid=""
    fi
}
cleanup() {
    stop_target
    rm -rf "$SHM" "$SOCKS"
    [ -n "$bench_dir_given" ] || rm -rf "$BENCH_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_socket PATH: until a target creates PATH (or dies).
wait_socket() {
    local i
    for i in $(seq 600); do
        [ -S "$1" ] && return 0
        kill -0 "$target_pid" 2>/dev/null || { echo "target exited; see $BENCH_DIR/target.log" >&2; cat "$BENCH_DIR/target.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "no socket $1 after 60 s" >&2
    exit 1
}

# thind_config FILE CREATE_THIN: malloc, uring on a raw file, the thin pool (and thin0 if asked),
# and a controller on each.
thind_config() {
    local thin=""
    [ "$2" = yes ] && thin=',{"method":"bdev_thin_create","params":{"pool":"pool0","name":"thin0","size_in_mib":'"$MIB"'}}'
    cat >"$1" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[
 {"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":$((MIB * 256)),"block_size":4096}},
 {"method":"bdev_uring_create","params":{"name":"Uring0","filename":"$SHM/uring.img","block_size":4096}},
 {"method":"bdev_uring_create","params":{"name":"d0","filename":"$SHM/data.img","block_size":4096}},
 {"method":"bdev_uring_create","params":{"name":"m0","filename":"$SHM/meta.img","block_size":4096}},
 {"method":"bdev_thin_pool_create","params":{"name":"pool0","data_bdev":"d0","metadata_bdev":"m0",
   "data_block_size":65536,"zero_new_blocks":false}}$thin]},
 {"subsystem":"vhost_blk","config":[
 {"method":"vhost_create_blk_controller","params":{"ctrlr":"vhost.malloc","dev_name":"Malloc0"}},
 {"method":"vhost_create_blk_controller","params":{"ctrlr":"vhost.uring","dev_name":"Uring0"}},
 {"method":"vhost_create_blk_controller","params":{"ctrlr":"vhost.thin","dev_name":"thin0"}}]}]}
JSON
}

start_thind() {
    rm -f "$SOCKS"/*
    "$THIND" -m "$TARGET_MASK" "${thind_mode[@]}" -r "$SOCKS/spdk.sock" -S "$SOCKS" --json "$1" \
        >"$BENCH_DIR/target.log" 2>&1 &
    target_pid=$!
    wait_socket "$SOCKS/vhost.thin"
}

# start_qsd BLOCKDEV_ARGS...: qemu-storage-daemon pinned to the targets' core, exporting the
# node named "disk" on $SOCKS/qsd.sock.
start_qsd() {
    rm -f "$SOCKS"/*
    taskset -c "$VHOST_TARGET_CORE" "$QSD" --object iothread,id=iot0 "$@" \
        --export "type=vhost-user-blk,id=exp0,node-name=disk,iothread=iot0,addr.type=unix,addr.path=$SOCKS/qsd.sock,writable=on" \
        >"$BENCH_DIR/target.log" 2>&1 &
    target_pid=$!
    wait_socket "$SOCKS/qsd.sock"
}

# drive SOCKET KEY ARGS...: one driver run on the driver's core; prints KEY of its JSON line.
drive() {
    local sock=$1 key=$2
    shift 2
    "$VHOST_BLK_PERF" --socket "$sock" --core "$VHOST_DRIVER_CORE" "$@" >"$BENCH_DIR/drive.out" \
        2>"$BENCH_DIR/drive.err" || {
        echo "vhost-blk-perf --socket $sock $* failed:" >&2
        cat "$BENCH_DIR/drive.err" >&2
        exit 1
    }
    python3 -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        print(json.loads(line)[sys.argv[1]]); break
else:
    sys.exit("no JSON line in vhost-blk-perf output")' "$key" <"$BENCH_DIR/drive.out"
}

declare -A res
# measure NAME SOCKET: every workload on SOCKET; appends "iops avg p50 p99" to res[NAME_w_qd].
measure() {
    local w qd
    for w in randread randwrite; do
        for qd in 1 128; do
            drive "$2" iops -q "$qd" -o 4096 -w "$w" -t "$BENCH_SECONDS" >/dev/null
            res[$1_${w}_$qd]+=" $(drive_fields)"
        done
    done
}
# drive_fields: iops/avg/p50/p99 of the last run as one colon-joined token.
drive_fields() {
    python3 -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        j = json.loads(line)
        print(":".join(str(j[k]) for k in ("iops", "avg_latency_us", "p50_us", "p99_us"))); break' \
        <"$BENCH_DIR/drive.out"
}

measure_bdevperf() {
    local w qd out
    for w in randread randwrite; do
        for qd in 1 128; do
            bdevperf_run iops -q "$qd" -o 4096 -w "$w" -T Malloc0 --json "$BENCH_DIR/malloc.json" >/dev/null
            out=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        j = json.loads(line)
        if j.get("job") == "Total":
            print(":".join(str(j[k]) for k in ("iops", "avg_latency_us", "p50_us", "p99_us"))); break' \
                "$BENCH_DIR/bdevperf.out")
            res[bdevperf_${w}_$qd]+=" $out"
        done
    done
}

# Files: raw ones fully allocated; the qcow2 one fully preallocated; the thin pool's data file
# room for all of thin0 plus slack, provisioned below by one sequential pass.
fallocate -l "${MIB}M" "$SHM/uring.img"
fallocate -l "${MIB}M" "$SHM/qsd.raw"
qemu-img create -q -f qcow2 -o preallocation=full,cluster_size=65536 "$SHM/qsd.qcow2" "${MIB}M"
truncate -s "$((MIB + 256))M" "$SHM/data.img"
truncate -s 64M "$SHM/meta.img"
thind_config "$BENCH_DIR/create.json" yes
thind_config "$BENCH_DIR/open.json" no
write_config "$BENCH_DIR/malloc.json" bdev_malloc_create "{\"name\":\"Malloc0\",\"num_blocks\":$((MIB * 256)),\"block_size\":4096}"

start_thind "$BENCH_DIR/create.json"
# One sequential pass of 128 KiB writes provisions every block of thin0.
n=$(drive "$SOCKS/vhost.thin" ios -q 32 -o 131072 -w write -t 600 --one-pass)
[ "$n" -eq $((MIB * 8)) ] || { echo "provisioning wrote $n of $((MIB * 8)) blocks" >&2; exit 1; }
stop_target

for rep in $(seq "$BENCH_REPS"); do
    start_thind "$BENCH_DIR/open.json"
    measure malloc "$SOCKS/vhost.malloc"
    measure uring "$SOCKS/vhost.uring"
    measure thin "$SOCKS/vhost.thin"
    stop_target
    measure_bdevperf
    start_qsd --blockdev "driver=file,node-name=disk,filename=$SHM/qsd.raw,aio=io_uring,cache.direct=off"
    measure qsd_raw "$SOCKS/qsd.sock"
    stop_target
    start_qsd --blockdev "driver=file,node-name=f0,filename=$SHM/qsd.qcow2,aio=io_uring,cache.direct=off" \
        --blockdev "driver=qcow2,node-name=disk,file=f0"
    measure qsd_qcow2 "$SOCKS/qsd.sock"
    stop_target
    echo "run $rep done" >&2
done

# field NAME_W_QD INDEX: the median of field INDEX (1 iops, 2 avg, 3 p50, 4 p99) over the runs.
field() {
    # shellcheck disable=SC2086
    median $(printf '%s\n' ${res[$1]} | cut -d: -f"$2")
}

# compare LABEL OURS THEIRS: one line per workload and depth: IOPS and latencies of both, and
# ours/theirs for IOPS, theirs/ours for latencies (above 1 = ours better, for every column).
compare() {
    local w qd a b
    echo
    echo "## $1"
    printf '%-14s %10s %10s %6s | %9s %9s %6s | %9s %9s %6s | %9s %9s %6s\n' "" \
        "IOPS:$2" "$3" "ratio" "avg_us" "" "ratio" "p50_us" "" "ratio" "p99_us" "" "ratio"
    for w in randread randwrite; do
        for qd in 1 128; do
            a=$2_${w}_$qd b=$3_${w}_$qd
            local ia ib la lb pa pb qa qb
            ia=$(field "$a" 1) ib=$(field "$b" 1) la=$(field "$a" 2) lb=$(field "$b" 2)
            pa=$(field "$a" 3) pb=$(field "$b" 3) qa=$(field "$a" 4) qb=$(field "$b" 4)
            printf '%-14s %10.0f %10.0f %6s | %9.1f %9.1f %6s | %9.1f %9.1f %6s | %9.1f %9.1f %6s\n' \
                "$w QD$qd" "$ia" "$ib" "$(ratio "$ia" "$ib")" "$la" "$lb" "$(ratio "$lb" "$la")" \
                "$pa" "$pb" "$(ratio "$pb" "$pa")" "$qa" "$qb" "$(ratio "$qb" "$qa")"
        done
    done
}

echo "# ratios: IOPS ours/theirs, latency theirs/ours (above 1 = ours better)"
compare "(a) vhost controller on malloc vs bdevperf on malloc (local)" malloc bdevperf
compare "(b) thin over uring (/dev/shm) vs qemu-storage-daemon raw file (/dev/shm)" thin qsd_raw
compare "(b) thin over uring (/dev/shm) vs qemu-storage-daemon qcow2 (/dev/shm)" thin qsd_qcow2
compare "(b') uring bdev (/dev/shm) vs qemu-storage-daemon raw file (same stack)" uring qsd_raw
