#!/bin/bash
# Inside the guest (tests/nvme_guest.rs): the Linux kernel's nvmet-tcp target, written
# elsewhere, for our NVMe/TCP initiator on the host. The namespace is a loop device over a
# file on the guest's tmpfs, so Dataset Management deallocate and Write Zeroes both become
# hole punches and read back as zeroes (tmpfs has no FALLOC_FL_ZERO_RANGE, which the file
# backend of nvmet would need). Run with --hostfwd HOSTPORT:4420.
# Prints NVMET-READY when listening, then stays up SECONDS or until /tmp/stop exists.
# usage: nvme_guest_target.sh SECONDS NQN SIZE_MB
set -euo pipefail
SECS=${1:-120}
NQN=${2:-nqn.2024-01.io.thinbdev:guest-target}
SIZE_MB=${3:-128}
modprobe nvmet
modprobe nvmet-tcp
modprobe loop
truncate -s "${SIZE_MB}M" /tmp/ns1.img
LOOP=$(losetup -f)
losetup "$LOOP" /tmp/ns1.img
C=/sys/kernel/config/nvmet
mkdir "$C/subsystems/$NQN"
echo 1 >"$C/subsystems/$NQN/attr_allow_any_host"
mkdir "$C/subsystems/$NQN/namespaces/1"
echo -n "$LOOP" >"$C/subsystems/$NQN/namespaces/1/device_path"
echo 1 >"$C/subsystems/$NQN/namespaces/1/enable"
mkdir "$C/ports/1"
echo tcp >"$C/ports/1/addr_trtype"
echo ipv4 >"$C/ports/1/addr_adrfam"
echo 0.0.0.0 >"$C/ports/1/addr_traddr"
echo 4420 >"$C/ports/1/addr_trsvcid"
ln -s "$C/subsystems/$NQN" "$C/ports/1/subsystems/$NQN"
echo "NVMET-READY nqn=$NQN"
end=$(($(date +%s) + SECS))
dmesg -c >/dev/null
# The target's kernel messages as they come (what it disliked, if anything).
while [ "$(date +%s)" -lt "$end" ] && [ ! -e /tmp/stop ]; do
    sleep 1
    dmesg -c | grep -E 'nvme' || true
done
echo "NVMET-TARGET: done"
