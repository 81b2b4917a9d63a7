#!/bin/bash
# Guest payload for tests/nvmf_guest.rs: the Linux NVMe/TCP initiator against thinbdev's
# target on the host (reached as $HOST_IP:4420 through guest-run --fwd).
# usage: nvmf_guest.sh NQN NS1_BYTES
set -euo pipefail
NQN=${1:?nqn}; NS1_BYTES=${2:?size}
say() { echo "GUEST: $*"; }
trap 'echo "GUEST: failed at line $LINENO"; dmesg | tail -40' ERR

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
wait_dev() {  # wait_dev NSID
  local i d
  for i in $(seq 1 600); do
    d=$(dev_of "$1"); [ -n "$d" ] && [ -b "$d" ] && { echo "$d"; return 0; }
    sleep 0.1
  done
  { say "namespace $1 did not appear"; ls /sys/block /sys/class/nvme*; 
    for b in /sys/block/nvme*; do echo "$b nsid=$(cat $b/nsid 2>&1)"; done; dmesg | tail -20; } >&2
  return 1
}
connect() { nvme connect -t tcp -a "$HOST_IP" -s 4420 -n "$NQN" -i 2 "$@"; }

say "discover"
nvme discover -t tcp -a "$HOST_IP" -s 4420 | tee /tmp/disc.txt
grep -Eq "subnqn: +$NQN\$" /tmp/disc.txt || { say "subsystem not in discovery log"; exit 1; }

say "connect (no digests)"
connect
d1=$(wait_dev 1); d2=$(wait_dev 2)
nvme list
size=$(blockdev --getsize64 "$d1")
[ "$size" = "$NS1_BYTES" ] || { say "size $size != $NS1_BYTES"; exit 1; }
say "ns1 $d1 size $size OK; ns2 $d2"
dmesg | grep -q "creating 2 I/O queues" || { say "expected 2 I/O queues"; exit 1; }

fio --name=rand4k --filename="$d1" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --numjobs=2 --size=8M --offset_increment=8M --time_based --runtime=30 \
    --verify=crc32c --verify_backlog=64 --do_verify=1 --verify_fatal=1 --group_reporting \
    --output-format=terse --terse-version=3 > /tmp/fio1.out
awk -F';' '{printf "GUEST: fio rand4k: write %s KiB/s, verify read %s KiB/s, errors=%s\n", $48, $7, $5}' /tmp/fio1.out
fio --name=seq128k --filename="$d1" --ioengine=libaio --direct=1 --rw=write --bs=128k \
    --iodepth=32 --numjobs=2 --size=16M --offset_increment=16M --time_based --runtime=30 \
    --verify=crc32c --verify_backlog=16 --do_verify=1 --verify_fatal=1 --group_reporting \
    --output-format=terse --terse-version=3 > /tmp/fio2.out
awk -F';' '{printf "GUEST: fio seq128k: write %s KiB/s, verify read %s KiB/s, errors=%s\n", $48, $7, $5}' /tmp/fio2.out
say "FIO-VERIFY-PASS"

say "blkdiscard"
blkdiscard -o $((1024*1024)) -l $((4*1024*1024)) "$d1"
say "DISCARD-DONE"

say "ext4"
modprobe crc32c_generic || true
for m in crc16 mbcache jbd2 ext4; do insmod "/opt/mods/$m.ko"; done
grep -q ext4 /proc/filesystems || { say "no ext4 in guest kernel"; exit 1; }
LD_LIBRARY_PATH=/opt/e2fs /opt/e2fs/mkfs.ext4 -q -F "$d1"
mkdir -p /mnt/t
mount -t ext4 "$d1" /mnt/t
for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/t/f$i bs=64k count=16 2>/dev/null; done
(cd /mnt/t && md5sum f1 f2 f3 f4 > /tmp/sums)
sync
umount /mnt/t
nvme disconnect -n "$NQN"
say "reconnect with header and data digests"
connect -g -G
d1=$(wait_dev 1)
mount -t ext4 "$d1" /mnt/t
(cd /mnt/t && md5sum -c /tmp/sums)
umount /mnt/t
say "FILES-INTACT"
fio --name=digests --filename="$d1" --ioengine=libaio --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --numjobs=2 --size=2M --offset_increment=2M --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --group_reporting --output-format=terse --terse-version=3 > /tmp/fio3.out
awk -F';' '{printf "GUEST: fio with digests: write %s KiB/s, errors=%s\n", $48, $5}' /tmp/fio3.out

say "REMOVE-NS2"
for i in $(seq 1 300); do
  [ -z "$(dev_of 2)" ] && break
  sleep 0.1
done
[ -z "$(dev_of 2)" ] || { say "namespace 2 still present"; exit 1; }
say "NS2-GONE"
nvme list
nvme disconnect -n "$NQN" | tee /tmp/disc.out
grep -q "disconnected 1 controller" /tmp/disc.out
say "NVMF-GUEST-PASS"
