#!/usr/bin/env bash
# The cost of NVMe/TCP: bdevperf through our initiator (bdev_nvme_attach_controller) against
# thind's target over loopback, next to bdevperf on the same kind of bdev locally, in one run.
# thind runs in poll mode pinned to TARGET_CORE (default 0) exporting a null and a malloc bdev;
# bdevperf runs pinned to BENCH_CORE (default 1). 4 KiB randread and randwrite at QD 1 and 128.
# Reports IOPS, p50/p99 latency, the ratio remote/local and the target's CPU time per I/O
# (user+system time of thind over the run, from /proc, divided by the I/Os it served).
# See common.sh for the environment knobs; THIND overrides the daemon binary.
source "$(dirname "$0")/common.sh"
need taskset "util-linux"
need python3 "python3"
TARGET_CORE=${TARGET_CORE:-0}
PORT=${NVMF_BENCH_PORT:-44420}
build_bdevperf
root=$(repo_root)
if [ -z "${THIND:-}" ]; then
    (cd "$root" && cargo build --release -q --bin thind)
    THIND=${CARGO_TARGET_DIR:-$root/target}/release/thind
fi
header
echo "# target: thind on core $TARGET_CORE (poll mode); initiator: bdevperf on core $BENCH_CORE"

NULL_NQN=nqn.2016-06.io.thinbdev:bench-null
MALLOC_NQN=nqn.2016-06.io.thinbdev:bench-malloc
listener() {
    printf '{"method":"nvmf_subsystem_add_listener","params":{"nqn":"%s","listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"%s"}}}' "$1" "$PORT"
}
cat >"$BENCH_DIR/target.json" <<JSON
{"subsystems":[
 {"subsystem":"bdev","config":[
  {"method":"bdev_null_create","params":{"name":"Null0","num_blocks":262144,"block_size":4096}},
  {"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":262144,"block_size":4096}}]},
 {"subsystem":"nvmf","config":[
  {"method":"nvmf_create_transport","params":{"trtype":"TCP"}},
  {"method":"nvmf_create_subsystem","params":{"nqn":"$NULL_NQN","allow_any_host":true,"serial_number":"BENCH0001"}},
  {"method":"nvmf_subsystem_add_ns","params":{"nqn":"$NULL_NQN","namespace":{"bdev_name":"Null0"}}},
  $(listener "$NULL_NQN"),
  {"method":"nvmf_create_subsystem","params":{"nqn":"$MALLOC_NQN","allow_any_host":true,"serial_number":"BENCH0002"}},
  {"method":"nvmf_subsystem_add_ns","params":{"nqn":"$MALLOC_NQN","namespace":{"bdev_name":"Malloc0"}}},
  $(listener "$MALLOC_NQN")]}]}
JSON
write_config "$BENCH_DIR/local-null.json" bdev_null_create '{"name":"Null0","num_blocks":262144,"block_size":4096}'
write_config "$BENCH_DIR/local-malloc.json" bdev_malloc_create '{"name":"Malloc0","num_blocks":262144,"block_size":4096}'
attach() {
    write_config "$BENCH_DIR/remote-$1.json" bdev_nvme_attach_controller \
        "{\"name\":\"Nvme0\",\"trtype\":\"tcp\",\"adrfam\":\"ipv4\",\"traddr\":\"127.0.0.1\",\"trsvcid\":\"$PORT\",\"subnqn\":\"$2\"}"
}
attach null "$NULL_NQN"
attach malloc "$MALLOC_NQN"

taskset -c "$TARGET_CORE" "$THIND" -m "$(printf '0x%x' $((1 << TARGET_CORE)))" \
    -r "$BENCH_DIR/thind.sock" --json "$BENCH_DIR/target.json" >"$BENCH_DIR/thind.log" 2>&1 &
THIND_PID=$!
trap 'kill "$THIND_PID" 2>/dev/null; wait "$THIND_PID" 2>/dev/null; rm -rf "$BENCH_DIR"' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || { cat "$BENCH_DIR/thind.log" >&2; echo "thind did not listen on $PORT" >&2; exit 1; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$THIND_PID/stat"; }
HZ=$(getconf CLK_TCK)

declare -A res
for rep in $(seq "$BENCH_REPS"); do
    for bdev in null malloc; do
        for w in randread randwrite; do
            [ "$bdev" = null ] && [ "$w" = randwrite ] && continue
            for qd in 1 128; do
                k="$bdev $w $qd"
                res[local $k]+=" $(bdevperf_run iops -q $qd -o 4096 -w $w --json "$BENCH_DIR/local-$bdev.json")"
                t0=$(cpu_ticks)
                bdevperf_run iops -q $qd -o 4096 -w $w --json "$BENCH_DIR/remote-$bdev.json" >/dev/null
                t1=$(cpu_ticks)
                iops=$(total_field iops <"$BENCH_DIR/bdevperf.out")
                res[remote $k]+=" $iops"
                res[p50 $k]+=" $(total_field p50_us <"$BENCH_DIR/bdevperf.out" 2>/dev/null || echo nan)"
                res[p99 $k]+=" $(total_field p99_us <"$BENCH_DIR/bdevperf.out" 2>/dev/null || echo nan)"
                res[tcpu $k]+=" $(python3 -c "import sys; t, i, s, hz = map(float, sys.argv[1:]); print(t / hz * 1e9 / (i * s) if i else 'nan')" "$((t1 - t0))" "$iops" "$BENCH_SECONDS" "$HZ")"
                res[icpu $k]+=" $(python3 -c "import sys; c, i, s = map(float, sys.argv[1:]); print(c * 1e9 / (i * s) if i else 'nan')" "$(cat "$BENCH_DIR/bdevperf.cpu")" "$iops" "$BENCH_SECONDS")"
            done
        done
    done
    echo "run $rep done" >&2
done

printf '%-26s %11s %11s %6s %9s %9s %12s %12s\n' "4 KiB" "local IOPS" "NVMe/TCP" "ratio" "p50 us" "p99 us" "target ns/IO" "init. ns/IO"
for bdev in null malloc; do
    for w in randread randwrite; do
        [ "$bdev" = null ] && [ "$w" = randwrite ] && continue
        for qd in 1 128; do
            k="$bdev $w $qd"
            # shellcheck disable=SC2086
            l=$(median ${res[local $k]}) r=$(median ${res[remote $k]})
            # shellcheck disable=SC2086
            printf '%-26s %11.0f %11.0f %6s %9s %9s %12.0f %12.0f\n' "$bdev $w QD$qd" "$l" "$r" "$(ratio "$r" "$l")" \
                "$(median ${res[p50 $k]})" "$(median ${res[p99 $k]})" "$(median ${res[tcpu $k]})" "$(median ${res[icpu $k]})"
        done
    done
done
echo "yardstick (SPDK v26.05 on this machine kind): NVMe/TCP loopback 0.3-0.5 M IOPS at QD128, 69 K at QD1"
