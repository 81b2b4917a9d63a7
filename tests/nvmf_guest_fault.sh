#!/bin/bash
# Guest payload for tests/nvmf_guest_fault.rs: the Linux NVMe/TCP initiator connects to
# thinbdev's target on the host ($HOST_IP:4420 through guest-run --fwd) with a 5 s
# keep-alive and runs fio on namespace 1 until the host test freezes (SIGSTOP) and then
# kills this guest mid-I/O. It never finishes on its own.
# usage: nvmf_guest_fault.sh NQN
set -euo pipefail
NQN=${1:?nqn}
say() { echo "GUEST: $*"; }
trap 'echo "GUEST: failed at line $LINENO"; dmesg | tail -20' ERR

dev_of() {  # dev_of NSID -> /dev/nvmeXnY of our subsystem, or nothing
  local s n
  for s in /sys/class/nvme-subsystem/nvme-subsys* /sys/class/nvme/nvme*; do
    [ "$(cat "$s/subsysnqn" 2>/dev/null)" = "$NQN" ] || continue
    for n in $(ls "$s" | grep -E '^nvme[0-9]+n[0-9]+$' || true); do
      [ "$(cat "/sys/block/$n/nsid" 2>/dev/null)" = "$1" ] || continue
      echo "/dev/$n"; return 0
    done
  done
}

nvme connect -t tcp -a "$HOST_IP" -s 4420 -n "$NQN" -i 2 -k 5
d=""
for i in $(seq 1 600); do
  d=$(dev_of 1); [ -n "$d" ] && [ -b "$d" ] && break
  sleep 0.1
done
[ -n "$d" ] && [ -b "$d" ] || { say "namespace 1 did not appear"; dmesg | tail -20; exit 1; }
say "CONNECTED $d"
# Mixed sizes so that both in-capsule writes and R2T-solicited ones are in flight.
fio --name=fault --filename="$d" --ioengine=libaio --direct=1 --rw=randrw --bsrange=4k-64k \
    --iodepth=16 --numjobs=2 --size=32M --time_based --runtime=600 --group_reporting \
    > /tmp/fio.out 2>&1 &
sleep 2
say "FIO-RUNNING"
wait
say "fio ended (unexpected)"; cat /tmp/fio.out
exit 1
