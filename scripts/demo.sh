#!/usr/bin/env bash
# Runs thind on a file-backed demo pool: builds the binaries, creates (once) a 1 GiB data file
# and a 64 MiB metadata file under ./demo, starts thind with a config that opens them as uring
# bdevs and a thin pool on them, creates the thin bdev `thin0` on the first run (later runs get
# it back from the pool's own metadata), exports it over NVMe/TCP (127.0.0.1:4420) and
# vhost-user-blk ($DEMO/vhost.0), and says how to reach it. Ctrl-C stops
# thind cleanly (it commits the pool). Environment: DEMO_DIR, RPC_SOCK, CPUMASK.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=${DEMO_DIR:-$ROOT/demo}
SOCK=${RPC_SOCK:-/var/tmp/spdk.sock}
CPUMASK=${CPUMASK:-0x1}

command -v spdk-rpc >/dev/null || ./scripts/install-prereqs.sh
cargo build --release --bins --quiet
mkdir -p "$DEMO"
[ -f "$DEMO/data.img" ] || truncate -s 1G "$DEMO/data.img"
[ -f "$DEMO/meta.img" ] || truncate -s 64M "$DEMO/meta.img"

cat > "$DEMO/config.json" <<JSON
{"subsystems": [
  {"subsystem": "bdev", "config": [
    {"method": "bdev_uring_create",
     "params": {"name": "demo_data", "filename": "$DEMO/data.img", "block_size": 4096}},
    {"method": "bdev_uring_create",
     "params": {"name": "demo_meta", "filename": "$DEMO/meta.img", "block_size": 4096}},
    {"method": "bdev_thin_pool_create",
     "params": {"name": "pool0", "data_bdev": "demo_data", "metadata_bdev": "demo_meta",
                "data_block_size": 65536, "low_water_mark": 1024}}
  ]}
]}
JSON

rpc() { PYTHONPATH="$ROOT/rpc/python" spdk-rpc -s "$SOCK" "$@"; }

target/release/thind -m "$CPUMASK" --interrupt-mode -r "$SOCK" -S "$DEMO" --json "$DEMO/config.json" &
THIND=$!
trap 'kill -TERM $THIND 2>/dev/null; wait $THIND' INT TERM
for _ in $(seq 100); do rpc spdk_get_version >/dev/null 2>&1 && break; sleep 0.1; done
rpc bdev_get_bdevs -b thin0 >/dev/null 2>&1 ||
    rpc --plugin thin_rpc bdev_thin_create -p pool0 -n thin0 -s 512 >/dev/null
NQN=nqn.2016-06.io.spdk:thin0
rpc nvmf_create_transport -t TCP >/dev/null
rpc nvmf_create_subsystem "$NQN" -a -s THINBDEV0001 >/dev/null
rpc nvmf_subsystem_add_ns "$NQN" thin0 >/dev/null
rpc nvmf_subsystem_add_listener "$NQN" -t tcp -a 127.0.0.1 -s 4420 >/dev/null
rpc vhost_create_blk_controller vhost.0 thin0 >/dev/null

cat <<MSG

thind is running (pid $THIND), RPC socket $SOCK. The thin pool pool0 lives in $DEMO.
  spdk-rpc -s $SOCK bdev_get_bdevs -b thin0
  NVMe/TCP:  nvme connect -t tcp -a 127.0.0.1 -s 4420 -n $NQN
  vhost:     qemu ... -chardev socket,id=c0,path=$DEMO/vhost.0 -device vhost-user-blk-pci,chardev=c0
  PYTHONPATH=$ROOT/rpc/python spdk-rpc -s $SOCK --plugin thin_rpc bdev_thin_pool_get_pools
  target/release/bdevperf -q 32 -o 4096 -w randrw -t 5 --json <config>   (see bench/)
Press Ctrl-C to stop (the pool is committed on the way out).
MSG
wait $THIND
