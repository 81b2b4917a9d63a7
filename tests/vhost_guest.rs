//! End to end with QEMU's vhost-user-blk device: thind serves a uring bdev through
//! `vhost_create_blk_controller`, `guest-run --vhost-user-blk SOCK` boots a Linux guest that
//! sees it as /dev/vda. Checks: size, fio verify (4 KiB random + 128 KiB sequential, QD 32, two
//! queues, time-based), blkdiscard reaching the bdev's unmap, an ext4 file system surviving a
//! guest reboot (a second guest on the same socket), and thind restarted from its saved config
//! (no guest attached) serving a third guest the same data.
//!
//! Needs QEMU and `../shared/guest/guest-run` (installed by `guest-run --setup`); under
//! `CI=true` their absence fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{require, Thind};

const DISK_MB: u64 = 64;

fn guest_run_bin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/guest/guest-run")
}

/// The ext4 modules of the guest kernel (guest-run bundles only virtio/NVMe ones).
fn ext4_modules() -> Vec<PathBuf> {
    let cache = std::env::var("GUEST_RUN_CACHE").unwrap_or_else(|_| "/var/cache/guest-run".into());
    let list = [
        "crypto/crc32c_generic.ko",
        "lib/crc16.ko",
        "fs/mbcache.ko",
        "fs/jbd2/jbd2.ko",
        "fs/ext4/ext4.ko",
    ];
    let kernels = std::fs::read_dir(&cache).into_iter().flatten().flatten();
    for kernel in kernels {
        let versions = std::fs::read_dir(kernel.path().join("tree/lib/modules"));
        for v in versions.into_iter().flatten().flatten() {
            let paths: Vec<PathBuf> = list
                .iter()
                .map(|m| v.path().join("kernel").join(m))
                .collect();
            if paths.iter().all(|p| p.exists()) {
                return paths;
            }
        }
    }
    Vec::new()
}

const PRELUDE: &str = r#"#!/bin/bash
set -euo pipefail
bb() { if command -v "$1" >/dev/null 2>&1; then "$@"; else busybox "$@"; fi; }
for i in $(seq 1 100); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || { echo "no /dev/vda"; ls /sys/block; exit 1; }
for m in crc32c_generic crc16 mbcache jbd2; do insmod /lib/thin-test-mods/$m.ko 2>/dev/null || true; done
insmod /lib/thin-test-mods/ext4.ko || grep -q ext4 /proc/filesystems
mount_vda() { mkdir -p /mnt/d; mount -t ext4 /dev/vda /mnt/d || { dmesg | tail -5; exit 1; }; }
"#;

const FIRST: &str = r#"
EXP=$1
S=$(cat /sys/block/vda/size)
[ "$S" = "$EXP" ] || { echo "size $S sectors, expected $EXP"; exit 1; }
Q=$(ls /sys/block/vda/mq | wc -l)
[ "$Q" -ge 2 ] || { echo "only $Q queue(s)"; exit 1; }
echo "vda: $S sectors, $Q queues, serial $(cat /sys/block/vda/serial)"
fio --ioengine=libaio --direct=1 --time_based --runtime=30 --iodepth=32 \
    --verify=crc32c --verify_fatal=1 --verify_backlog=32 --filename=/dev/vda \
    --name=rand4k --rw=randwrite --bs=4k --offset=0 --size=8M \
    --name=seq128k --rw=write --bs=128k --offset=16M --size=16M \
    --output-format=terse --terse-version=3 > /tmp/fio.out
awk -F';' '$3 != "" {printf "fio %s: write %s KiB/s, verify-read %s KiB/s, errors=%s\n", $3, $48, $7, $5}' /tmp/fio.out
if bb blkdiscard -o 33554432 -l 1048576 /dev/vda; then echo "blkdiscard done";
else fio --name=trim --filename=/dev/vda --ioengine=psync --rw=trim --bs=1M --offset=32M --size=1M; fi
bb mke2fs -b 4096 /dev/vda >/dev/null
mount_vda
for i in 1 2 3; do dd if=/dev/urandom of=/mnt/d/f$i bs=64k count=8 2>/dev/null; done
(cd /mnt/d && bb md5sum f1 f2 f3 > sums)
sync; umount /mnt/d
echo "GUEST-FIRST: PASS"
"#;

const SECOND: &str = r#"
mount_vda
(cd /mnt/d && bb md5sum -c sums)
dd if=/dev/urandom of=/mnt/d/g1 bs=64k count=4 2>/dev/null
(cd /mnt/d && bb md5sum g1 >> sums)
sync; umount /mnt/d
echo "GUEST-SECOND: PASS"
"#;

const THIRD: &str = r#"
mount_vda
(cd /mnt/d && bb md5sum -c sums)
[ "$(wc -l < /mnt/d/sums)" = 4 ] || { echo "sums lost lines"; exit 1; }
umount /mnt/d
echo "GUEST-THIRD: PASS"
"#;

/// Runs `body` in a guest attached to `sock`; retries once on a guest-run timeout (124).
fn guest(dir: &Path, sock: &Path, name: &str, body: &str, args: &[&str], mods: &[PathBuf]) {
    let script = dir.join(format!("{name}.sh"));
    std::fs::write(&script, format!("{PRELUDE}{body}")).expect("write payload");
    for attempt in 0..2 {
        let mut cmd = Command::new(guest_run_bin());
        cmd.args(["--vhost-user-blk"])
            .arg(sock)
            .args(["--vhost-queues", "2", "--timeout", "240"]);
        for m in mods {
            let dst = format!(
                "/lib/thin-test-mods/{}",
                m.file_name().unwrap().to_string_lossy()
            );
            cmd.arg("--file").arg(format!("{}:{dst}", m.display()));
        }
        cmd.arg(&script).args(args);
        let out = cmd.output().expect("run guest-run");
        let text = format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("--- guest {name} (attempt {attempt}) ---\n{text}");
        if out.status.code() == Some(124) && attempt == 0 {
            continue;
        }
        assert!(out.status.success(), "guest {name} failed: {text}");
        let marker = format!("GUEST-{}: PASS", name.to_uppercase());
        assert!(text.contains(&marker), "guest {name}: no {marker}");
        return;
    }
}

/// Starts thind on cores `mask` (interrupt mode) with `extra` args; waits for its RPC socket.
fn start_thind(dir: &Path, mask: &str, extra: &[&str]) -> Thind {
    let sock = dir.join("spdk.sock");
    let child = Command::new(common::thind_bin())
        .args(["-m", mask, "--interrupt-mode", "-r"])
        .arg(&sock)
        .args(extra)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn thind");
    let t = Thind {
        child: Some(child),
        sock: sock.clone(),
        dir: dir.to_owned(),
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while t.rpc_output(&["spdk_get_version"]).status.code() != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "thind did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    t
}

fn unmap_ops(t: &Thind, bdev: &str) -> u64 {
    let mut raw = common::Raw::connect(&t.sock);
    let req = serde_json::json!({
        "jsonrpc": "2.0", "id": 1, "method": "bdev_get_iostat", "params": {"name": bdev}
    });
    raw.send(req.to_string().as_bytes());
    let v = raw.recv().expect("bdev_get_iostat answer");
    let ops = &v["result"]["bdevs"][0]["num_unmap_ops"];
    ops.as_u64()
        .unwrap_or_else(|| panic!("bdev_get_iostat: {v}"))
}

#[test]
fn vhost_guest_end_to_end() {
    if !require("qemu-system-x86_64", "QEMU runs the guest")
        || !require("spdk-rpc", "SPDK's RPC client")
    {
        return;
    }
    assert!(
        guest_run_bin().exists(),
        "guest-run missing at {}",
        guest_run_bin().display()
    );
    let mods = ext4_modules();
    if mods.is_empty() {
        let msg = "guest kernel ext4 modules missing: run ../shared/guest/guest-run --setup";
        assert!(!common::in_ci(), "{msg}");
        eprintln!("SKIPPING: {msg}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(DISK_MB << 20))
        .expect("disk image");
    let sock = dir.join("vhost.0");
    let dir_s = dir.to_str().unwrap();

    // Two reactors: the controller's two queues run on different cores.
    let mut t = start_thind(dir, "0x3", &["-S", dir_s]);
    t.rpc(&["bdev_uring_create", img.to_str().unwrap(), "Disk0", "4096"]);
    t.rpc(&[
        "vhost_create_blk_controller",
        "vhost.0",
        "Disk0",
        "--cpumask",
        "0x3",
    ]);
    let list = t.rpc(&["vhost_get_controllers"]);
    assert_eq!(list[0]["ctrlr"], "vhost.0");
    assert_eq!(list[0]["socket"], sock.to_str().unwrap());
    assert_eq!(list[0]["cpumask"], "0x3");
    let busy = t.rpc_fail(&["vhost_create_blk_controller", "vhost.0", "Disk0"]);
    assert!(busy.contains("exists"), "{busy}");

    let sectors = (DISK_MB << 20) / 512;
    let before = unmap_ops(&t, "Disk0");
    guest(dir, &sock, "first", FIRST, &[&sectors.to_string()], &mods);
    assert!(
        unmap_ops(&t, "Disk0") > before,
        "guest discard reached the bdev's unmap"
    );

    guest(dir, &sock, "second", SECOND, &[], &mods);

    let cfg = t.rpc(&["save_config"]);
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    assert!(
        cfg.to_string().contains("vhost_create_blk_controller"),
        "save_config has the controller"
    );
    assert_eq!(t.terminate(), Some(0));
    assert!(!sock.exists(), "socket removed at shutdown");

    let t2 = start_thind(
        dir,
        "0x3",
        &["-S", dir_s, "--json", cfg_path.to_str().unwrap()],
    );
    let list = t2.rpc(&["vhost_get_controllers", "-n", "vhost.0"]);
    assert_eq!(list[0]["backend_specific"]["block"]["bdev"], "Disk0");
    assert_eq!(
        list[0]["cpumask"], "0x3",
        "cpumask restored from the saved config"
    );
    guest(dir, &sock, "third", THIRD, &[], &mods);
    drop(t2);
}
