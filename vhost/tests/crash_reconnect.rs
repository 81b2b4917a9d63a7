//! A backend crash with requests in flight: the backend runs in a child process (this test
//! binary re-executed), a frontend session here fills the ring, the backend takes the requests
//! (the shared in-flight area shows them) but its bdev holds their completions, later requests
//! complete past them (out of avail order), and the child is killed with SIGKILL. A new
//! backend process on the same socket (stale socket replaced) gets the same in-flight area
//! back with SET_INFLIGHT_FD and SET_VRING_BASE = used index, as QEMU reconnects, and must
//! complete every request exactly once: the ones it resubmits from the area, and the ones the
//! frontend published while no backend ran.
//!
//! `harness = false`: `main` is either the test or, with `VHOST_CRASH_CHILD_DIR` set, the
//! backend process (a uring bdev over a file, a fault bdev on top whose completions can be
//! held, a controller), driven by lines on its stdin.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::*;

const CTRLR: &str = "vcrash.0";
const DISK_BLOCKS: u64 = 1024;

fn main() {
    if let Ok(dir) = std::env::var("VHOST_CRASH_CHILD_DIR") {
        backend_child(PathBuf::from(dir));
        return;
    }
    let name = "in_flight_requests_survive_a_backend_crash";
    if !selected(name) {
        println!("test result: ok. 0 passed; 0 failed; 1 filtered out");
        return;
    }
    println!("test {name} ...");
    in_flight_requests_survive_a_backend_crash();
    println!("test {name} ... ok\n\ntest result: ok. 1 passed; 0 failed");
}

/// Applies the libtest arguments cargo may pass (filters, `--exact`, `--skip`, `--ignored`,
/// `--list`; options with a value are skipped) to the one test here.
fn selected(name: &str) -> bool {
    let mut args = std::env::args().skip(1);
    let (mut filters, mut skips) = (Vec::new(), Vec::new());
    let (mut exact, mut ignored_only) = (false, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--list" => {
                println!("{name}: test");
                std::process::exit(0);
            }
            "--exact" => exact = true,
            "--ignored" => ignored_only = true,
            "--skip" => skips.extend(args.next()),
            "--test-threads" | "--color" | "--format" | "--logfile" | "-Z" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            a => filters.push(a.to_owned()),
        }
    }
    let hit = |f: &String| {
        if exact {
            name == f
        } else {
            name.contains(f.as_str())
        }
    };
    !ignored_only
        && (filters.is_empty() || filters.iter().any(hit))
        && !skips.iter().any(|s| name.contains(s.as_str()))
}

/// The backend process: serves `CTRLR` in `dir` until its stdin closes or it is killed.
fn backend_child(dir: PathBuf) {
    setup_runtime_in("0x1", true, Some(dir.clone()));
    bdev::uring::create(bdev::uring::UringOpts {
        name: "CrashBase".into(),
        filename: dir.join("disk.img").to_string_lossy().into_owned(),
        block_size: Some(4096),
        uuid: None,
    })
    .expect("uring bdev");
    let fault = bdev::testing::fault::create("CrashSlow", "CrashBase").expect("fault bdev");
    controller(CTRLR, "CrashSlow", false);
    let mut out = std::io::stdout();
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lines() {
        match line.as_deref() {
            Ok("hold") => {
                // Completions wait for ~4 billion channel polls: never, in this test.
                fault
                    .config()
                    .delay_polls
                    .store(u32::MAX, Ordering::Relaxed);
                writeln!(out, "HELD").unwrap();
                out.flush().unwrap();
            }
            Ok(cmd) if cmd.starts_with("release ") => {
                // Once the base bdev has finished N I/Os (so every held completion is in the
                // fault bdev's queue, not still on its way), new completions go through at
                // once; the held ones stay held.
                let n: u64 = cmd["release ".len()..].parse().expect("count");
                wait_base_ops(n);
                fault.config().delay_polls.store(0, Ordering::Relaxed);
                writeln!(out, "RELEASED").unwrap();
                out.flush().unwrap();
            }
            Ok(other) => panic!("backend child: unknown command {other:?}"),
            Err(_) => break,
        }
    }
}

/// Waits until the base bdev has completed `n` reads and writes.
fn wait_base_ops(n: u64) {
    let (_, iostat) = bdev::rpc_methods()
        .into_iter()
        .find(|(m, _)| *m == "bdev_get_iostat")
        .expect("bdev_get_iostat");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = iostat(serde_json::json!({"name": "CrashBase"})).expect("iostat");
        let b = &v["bdevs"][0];
        let ops =
            b["num_read_ops"].as_u64().unwrap_or(0) + b["num_write_ops"].as_u64().unwrap_or(0);
        if ops >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "base bdev did {ops} of {n} I/Os: {v}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A backend child process; killed on drop.
struct Backend {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Backend {
    fn spawn(dir: &Path) -> Backend {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .env("VHOST_CRASH_CHILD_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn backend child");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut b = Backend {
            child,
            stdin,
            stdout,
        };
        b.expect_line("READY");
        b
    }

    fn expect_line(&mut self, want: &str) {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("backend output");
        assert_eq!(line.trim_end(), want, "backend child said {line:?}");
    }

    fn command(&mut self, cmd: &str, ack: &str) {
        writeln!(self.stdin, "{cmd}").expect("backend stdin");
        self.expect_line(ack);
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request of the test: a write (header and data in one readable descriptor) or a read
/// (data and status in one writable descriptor): two descriptors each, any layout.
#[derive(Clone, Copy)]
struct Req {
    head: u16,
    write: bool,
    sector: u64,
    seed: u8,
}

const BLOCK: usize = 4096;

impl Req {
    fn buf_gpa(&self) -> u64 {
        DATA + u64::from(self.head) * 0x2000
    }
    fn status_gpa(&self) -> u64 {
        if self.write {
            STATUS + u64::from(self.head)
        } else {
            self.buf_gpa() + BLOCK as u64
        }
    }
    fn hdr_gpa(&self) -> u64 {
        if self.write {
            self.buf_gpa()
        } else {
            HDR + 16 * u64::from(self.head)
        }
    }

    /// Writes the chain (descriptors `head`, `head + 1`) and buffers into guest memory.
    fn lay_out(&self, fe: &Fe) {
        let t = if self.write { T_OUT } else { T_IN };
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&t.to_le_bytes());
        hdr[8..16].copy_from_slice(&self.sector.to_le_bytes());
        fe.mem.put(self.hdr_gpa(), &hdr);
        fe.mem.put(self.status_gpa(), &[0xff]);
        let (h, n) = (self.head, self.head + 1);
        if self.write {
            fe.mem.put(self.buf_gpa() + 16, &pattern(BLOCK, self.seed));
            fe.desc(h, self.buf_gpa(), 16 + BLOCK as u32, 1, n);
            fe.desc(n, self.status_gpa(), 1, 2, 0);
        } else {
            fe.mem.put(self.buf_gpa(), &[0u8; BLOCK]);
            fe.desc(h, self.hdr_gpa(), 16, 1, n);
            fe.desc(n, self.buf_gpa(), BLOCK as u32 + 1, 2, 0);
        }
    }
}

fn req(head: u16, write: bool, sector: u64, seed: u8) -> Req {
    Req {
        head,
        write,
        sector,
        seed,
    }
}

/// Reads the in-flight flag of `head` in the shared area (queue 0's region).
fn in_flight(area: &[u8], head: u16) -> bool {
    area[16 + 16 * usize::from(head)] == 1
}

fn in_flight_requests_survive_a_backend_crash() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::File::create(dir.join("disk.img"))
        .and_then(|f| f.set_len(DISK_BLOCKS * BLOCK as u64))
        .expect("disk image");
    let sock = dir.join(CTRLR);

    // Session 1 on backend A: a fresh in-flight area, two plain requests that complete.
    let mut a = Backend::spawn(dir);
    let (mut fe, area, area_file) = Fe::connect_new_inflight(&sock, Mem::new(), 0);
    let old = pattern(BLOCK, 1);
    assert_eq!(fe.request(T_OUT, 64, &old, false).0, S_OK);
    let stable = pattern(BLOCK, 2);
    assert_eq!(fe.request(T_OUT, 72, &stable, false).0, S_OK);
    assert_eq!(fe.read(64, BLOCK), (S_OK, old.clone()));
    assert_eq!(fe.used_seen, 3);
    // SAFETY: mapping the in-flight memfd the backend gave us (its size is in `area`);
    // checked against MAP_FAILED, unmapped at the end.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            area.mmap_size as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            area_file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    // SAFETY: `map` covers `mmap_size` bytes and stays mapped until the munmap below; the
    // backend writes single bytes we only read.
    let shared = unsafe { std::slice::from_raw_parts(map.cast::<u8>(), area.mmap_size as usize) };

    // Four requests the backend takes but cannot complete (their bdev I/O is held), then two
    // that complete: the used ring now holds completions out of avail order, so resuming at
    // used->idx without the in-flight area would redo the two and lose the four.
    a.command("hold", "HELD");
    let held = [
        req(0, true, 64 * 8, 10),
        req(2, false, 72, 0),
        req(4, true, 64, 13),
        req(6, false, 64, 0),
    ];
    for r in &held {
        r.lay_out(&fe);
        fe.publish(r.head);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !held.iter().all(|r| in_flight(shared, r.head)) {
        assert!(Instant::now() < deadline, "backend never took the requests");
        std::thread::sleep(Duration::from_millis(2));
    }
    // Session 1 did three I/Os before these.
    a.command(&format!("release {}", 3 + held.len()), "RELEASED");
    let completed = [req(8, true, 66 * 8, 12), req(10, true, 65 * 8, 11)];
    let mut before_crash = Vec::new();
    for r in &completed {
        r.lay_out(&fe);
        fe.publish(r.head);
        let (id, _) = fe
            .wait_used(Duration::from_secs(10))
            .expect("completes while the others are held");
        before_crash.push(id);
        assert_eq!(fe.mem.slice(r.status_gpa(), 1)[0], S_OK);
    }
    assert_eq!(before_crash, [8, 10]);
    assert!(held.iter().all(|r| in_flight(shared, r.head)));

    // Backend A dies. The frontend keeps its memory, ring and in-flight area, and its driver
    // adds two more requests while no backend runs.
    a.kill9();
    let Fe { fe: conn, mem, .. } = fe;
    drop(conn);
    let later = [req(12, true, 67 * 8, 14), req(14, false, 72, 0)];

    // Backend B on the same socket; QEMU reconnects with the old area and base = used->idx.
    let used_idx = 3 + completed.len() as u16;
    let _b = Backend::spawn(dir);
    let mut fe = Fe::connect_with(
        &sock,
        mem,
        Some((&area, &area_file)),
        used_idx,
        vhost_user::vhost_user::message::VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        false,
    );
    fe.avail_idx = 3 + (held.len() + completed.len()) as u16;
    for r in &later {
        r.lay_out(&fe);
        fe.publish(r.head);
    }

    // Every request completes exactly once, and nothing else appears on the used ring.
    let all: BTreeMap<u16, Req> = held.iter().chain(&later).map(|r| (r.head, *r)).collect();
    let mut done: BTreeMap<u16, u32> = BTreeMap::new();
    for _ in 0..all.len() {
        let (id, len) = fe
            .wait_used(Duration::from_secs(10))
            .expect("every request completes");
        let head = u16::try_from(id).expect("head");
        assert!(
            all.contains_key(&head),
            "used entry for head {id}, which was not pending (completed twice?)"
        );
        assert!(
            done.insert(head, len).is_none(),
            "head {head} completed twice"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        fe.mem.u16_at(USED + 2),
        fe.used_seen,
        "no further used entries (no duplicate completion)"
    );
    for (head, r) in &all {
        assert_eq!(
            fe.mem.slice(r.status_gpa(), 1)[0],
            S_OK,
            "head {head} status"
        );
        let want_len = if r.write { 1 } else { BLOCK as u32 + 1 };
        assert_eq!(done[head], want_len, "head {head} used length");
        assert!(
            !in_flight(shared, *head),
            "head {head} still marked in flight"
        );
    }
    // The held read of block 8 ran together with the held write replacing it, so either
    // version is valid; the reads of block 9 see what was written before the crash.
    let r6 = fe.mem.slice(held[3].buf_gpa(), BLOCK).to_vec();
    assert!(
        r6 == old || r6 == pattern(BLOCK, 13),
        "read of block 8 returned neither version"
    );
    assert_eq!(fe.mem.slice(held[1].buf_gpa(), BLOCK), &stable[..]);
    assert_eq!(fe.mem.slice(later[1].buf_gpa(), BLOCK), &stable[..]);

    // Every write is on the disk.
    for r in held
        .iter()
        .chain(&completed)
        .chain(&later)
        .filter(|r| r.write)
    {
        let (st, data) = fe.read(r.sector, BLOCK);
        assert_eq!(st, S_OK);
        assert_eq!(
            data,
            pattern(BLOCK, r.seed),
            "write of head {} on disk",
            r.head
        );
    }
    // SAFETY: unmapping what we mapped above; `shared` is not used after this.
    unsafe { libc::munmap(map, area.mmap_size as usize) };
}
