//! Shared helpers for the end-to-end tests: spawn `thind`, drive it with SPDK's `spdk-rpc`,
//! talk raw JSON-RPC on its socket, and probe prerequisites (a missing one fails under
//! `CI=true` and skips loudly elsewhere).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// True when running in CI, where a missing prerequisite is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks that `program` runs; fails the test under CI, or returns false (skip) elsewhere.
pub fn require(program: &str, why: &str) -> bool {
    let ok = Command::new(program)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        let msg = format!("prerequisite missing: `{program}` ({why}); run ./scripts/test.sh");
        assert!(!in_ci(), "{msg}");
        eprintln!("SKIPPING: {msg}");
    }
    ok
}

/// The `thind` binary built for this test run.
pub fn thind_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_thind"))
}

/// A running `thind` with its own socket in a temp dir; killed on drop.
pub struct Thind {
    pub child: Option<Child>,
    pub sock: PathBuf,
    pub dir: PathBuf,
}

impl Thind {
    /// Starts thind on core 0 in interrupt mode with `extra` args and waits for its socket.
    pub fn start(dir: &Path, extra: &[&str]) -> Thind {
        let sock = dir.join("spdk.sock");
        Self::start_on(dir, &sock, extra)
    }

    /// As [`Thind::start`] with an explicit socket path.
    pub fn start_on(dir: &Path, sock: &Path, extra: &[&str]) -> Thind {
        let mut cmd = Command::new(thind_bin());
        cmd.args(["-m", "0x1", "--interrupt-mode", "-r"])
            .arg(sock)
            .args(extra);
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawn thind");
        let t = Thind {
            child: Some(child),
            sock: sock.to_owned(),
            dir: dir.to_owned(),
        };
        t.wait_ready();
        // The socket answers during start-up too; unless start-up waits for RPCs, wait until
        // the config (--json) has been applied and the framework runs, so what it creates
        // (bdevs, listeners, controllers) exists when the test goes on.
        if !extra.contains(&"--wait-for-rpc") {
            t.wait_init();
        }
        t
    }

    /// `framework_wait_init`: answers once initialization (config included) is complete.
    fn wait_init(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut s = UnixStream::connect(&self.sock).expect("connect RPC socket");
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        s.write_all(br#"{"jsonrpc":"2.0","method":"framework_wait_init","id":1}"#)
            .expect("send framework_wait_init");
        let mut got = Vec::new();
        let mut b = [0u8; 512];
        while Instant::now() < deadline {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&b[..n]);
                    if let Ok(v) = serde_json::from_slice::<Value>(&got) {
                        assert!(v.get("error").is_none(), "framework_wait_init: {v}");
                        return;
                    }
                }
            }
        }
        panic!(
            "thind on {} did not finish initialization: {}",
            self.sock.display(),
            String::from_utf8_lossy(&got)
        );
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = UnixStream::connect(&self.sock) {
                let req = br#"{"jsonrpc":"2.0","method":"spdk_get_version","id":1}"#;
                if s.write_all(req).is_ok() {
                    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
                    let mut b = [0u8; 256];
                    if s.read(&mut b).is_ok_and(|n| n > 0) {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("thind did not come up on {}", self.sock.display());
    }

    /// Runs `spdk-rpc -s SOCK ARGS...` and returns its output.
    pub fn rpc_output(&self, args: &[&str]) -> Output {
        Command::new("spdk-rpc")
            .arg("-s")
            .arg(&self.sock)
            .args(args)
            .env("PYTHONPATH", rpc_plugin_dir())
            .output()
            .expect("run spdk-rpc")
    }

    /// Runs spdk-rpc, asserts success, returns stdout parsed as JSON (or as a string).
    pub fn rpc(&self, args: &[&str]) -> Value {
        let out = self.rpc_output(args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "spdk-rpc {args:?} failed: {}\n{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).unwrap_or(Value::String(stdout.trim().to_owned()))
    }

    /// Runs spdk-rpc expecting failure; returns stdout+stderr.
    pub fn rpc_fail(&self, args: &[&str]) -> String {
        let out = self.rpc_output(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success(),
            "spdk-rpc {args:?} should have failed: {text}"
        );
        text
    }

    /// Sends SIGTERM and waits; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        let pid = i32::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        wait_timeout(&mut child, Duration::from_secs(30)).code()
    }

    /// Kills with SIGKILL (a crash).
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill");
        child.wait().expect("wait");
    }
}

impl Drop for Thind {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for `child`, killing it after `limit`.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Directory holding the `thin_rpc` spdk-rpc plugin.
pub fn rpc_plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rpc/python")
}

/// A raw JSON-RPC connection (for malformed input the real client never sends).
pub struct Raw {
    pub s: UnixStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects.
    pub fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Raw { s, buf: Vec::new() }
    }

    /// Sends bytes.
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    /// Reads one JSON value; None on EOF.
    pub fn recv(&mut self) -> Option<Value> {
        loop {
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            if let Some(Ok(v)) = it.next() {
                let off = it.byte_offset();
                self.buf.drain(..off);
                return Some(v);
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a request and returns its response.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let req = serde_json::json!({"jsonrpc":"2.0","method":method,"params":params,"id":1});
        self.send(req.to_string().as_bytes());
        self.recv().expect("response")
    }
}
