//! Server, registry, notification and config tests over a real Unix socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{load_config, parse_config, Subsystems};
use crate::framework::Framework;
use crate::jsonrpc::{
    INVALID_PARAMS, INVALID_REQUEST, INVALID_STATE, METHOD_NOT_FOUND, PARSE_ERROR,
};
use crate::notify::{Notifier, MAX_EVENTS};
use crate::registry::{parse_params, Registry, StateMask};
use crate::server::{RpcServer, MAX_REQUEST_BYTES};
use crate::RpcError;

struct Harness {
    _dir: tempfile::TempDir,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    fw: Arc<Framework>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread panicked");
        }
    }
}

fn registry_with_test_methods(state: StateMask) -> Arc<Registry> {
    let r = Arc::new(Registry::new(state));
    r.register_sync("echo", StateMask::ALWAYS, "echo params", |p| {
        Ok(p.unwrap_or(Value::Null))
    });
    r.register_sync("add", StateMask::RUNTIME, "a + b", |p| {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct P {
            a: i64,
            b: i64,
        }
        let p: P = parse_params(p)?;
        Ok(json!(p.a + p.b))
    });
    r.register(
        "later",
        StateMask::ALWAYS,
        "answers from another thread",
        |_, resp| {
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                resp.ok(json!("late"));
            });
        },
    );
    r.register(
        "forget",
        StateMask::ALWAYS,
        "drops its responder",
        |_, _resp| {},
    );
    r.register_sync("fail", StateMask::ALWAYS, "fails with -ENODEV", |_| {
        Err(RpcError::errno(libc::ENODEV, "no such device: x"))
    });
    r
}

fn start(state: StateMask) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rpc.sock");
    let registry = registry_with_test_methods(state);
    let notifier = Arc::new(Notifier::new());
    notifier.register_type("bdev_register");
    let subsystems = Arc::new(Subsystems::new());
    subsystems.register("bdev", &[], || {
        vec![json!({"method": "echo", "params": {"x": 1}})]
    });
    subsystems.register("nvmf", &["bdev"], Vec::new);
    let fw = Framework::install(registry.clone(), subsystems, notifier, Box::new(|| Ok(())));
    let mut server = RpcServer::listen(&path, registry).expect("listen");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let thread = thread::spawn(move || {
        while !stop2.load(Ordering::Acquire) {
            if !server.poll() {
                thread::sleep(Duration::from_micros(200));
            }
        }
    });
    Harness {
        _dir: dir,
        path,
        stop,
        thread: Some(thread),
        fw,
    }
}

struct Client {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(h: &Harness) -> Self {
        let s = UnixStream::connect(&h.path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Self { s, buf: Vec::new() }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write");
    }

    /// Reads one JSON value, or None on EOF.
    fn recv(&mut self) -> Option<Value> {
        loop {
            let mut it = serde_json::Deserializer::from_slice(&self.buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let off = it.byte_offset();
                    self.buf.drain(..off);
                    return Some(v);
                }
                Some(Err(e)) if !e.is_eof() => panic!("bad JSON from server: {e}"),
                _ => {}
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("read");
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn call(&mut self, method: &str, params: Value, id: u64) -> Value {
        let req = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
        self.send_raw(req.to_string().as_bytes());
        let resp = self.recv().expect("response");
        assert_eq!(resp["id"], json!(id), "response id");
        resp
    }
}

fn error_code(resp: &Value) -> i64 {
    resp["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("expected an error: {resp}"))
}

#[test]
fn single_request_and_result() {
    let h = start(StateMask::RUNTIME);
    let mut c = Client::connect(&h);
    let r = c.call("add", json!({"a": 2, "b": 40}), 7);
    assert_eq!(r["result"], json!(42));
    assert_eq!(r["jsonrpc"], json!("2.0"));
}

#[test]
fn streamed_objects_without_framing_and_split_writes() {
    let h = start(StateMask::RUNTIME);
    let mut c = Client::connect(&h);
    let a = json!({"jsonrpc":"2.0","method":"add","params":{"a":1,"b":1},"id":1}).to_string();
    let b = json!({"jsonrpc":"2.0","method":"add","params":{"a":2,"b":2},"id":2}).to_string();
    let both = format!("{a}{b}");
    let (x, y) = both.split_at(a.len() + 7);
    c.send_raw(x.as_bytes());
    thread::sleep(Duration::from_millis(20));
    c.send_raw(y.as_bytes());
    let r1 = c.recv().expect("r1");
    let r2 = c.recv().expect("r2");
    assert_eq!(
        (r1["id"].clone(), r1["result"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(
        (r2["id"].clone(), r2["result"].clone()),
        (json!(2), json!(4))
    );
}

#[test]
fn batch_answers_in_one_array_without_notifications() {
    let h = start(StateMask::RUNTIME);
    let mut c = Client::connect(&h);
    let batch = json!([
        {"jsonrpc":"2.0","method":"add","params":{"a":1,"b":2},"id":"x"},
        {"jsonrpc":"2.0","method":"echo","params":{"n":1}},
        {"jsonrpc":"2.0","method":"later","id":"y"},
        {"jsonrpc":"2.0","method":"nope","id":"z"},
        {"foo": 1}
    ]);
    c.send_raw(batch.to_string().as_bytes());
    let r = c.recv().expect("batch response");
    let arr = r.as_array().expect("array");
    assert_eq!(arr.len(), 4, "{r}");
    assert_eq!(arr[0]["result"], json!(3));
    assert_eq!(arr[1]["result"], json!("late"));
    assert_eq!(error_code(&arr[2]), i64::from(METHOD_NOT_FOUND));
    assert_eq!(error_code(&arr[3]), i64::from(INVALID_REQUEST));
    c.send_raw(b"[]");
    assert_eq!(
        error_code(&c.recv().expect("empty batch")),
        i64::from(INVALID_REQUEST)
    );
}

#[test]
fn errors_have_spdk_codes_and_messages() {
    let h = start(StateMask::RUNTIME);
    let mut c = Client::connect(&h);
    let r = c.call("nope", json!({}), 1);
    assert_eq!(error_code(&r), i64::from(METHOD_NOT_FOUND));
    assert!(r["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("nope"));
    let r = c.call("add", json!({"a": 1}), 2);
    assert_eq!(error_code(&r), i64::from(INVALID_PARAMS));
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("missing field `b`"),
        "{r}"
    );
    let r = c.call("add", json!({"a": 1, "b": 2, "c": 3}), 3);
    assert_eq!(error_code(&r), i64::from(INVALID_PARAMS));
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("unknown field `c`"),
        "{r}"
    );
    let r = c.call("add", json!({"a": "one", "b": 2}), 4);
    assert_eq!(error_code(&r), i64::from(INVALID_PARAMS));
    let r = c.call("fail", json!({}), 5);
    assert_eq!(error_code(&r), -i64::from(libc::ENODEV));
    let r = c.call("forget", json!({}), 6);
    assert_eq!(error_code(&r), -32603);
    c.send_raw(br#"{"jsonrpc":"1.0","method":"echo","id":9}"#);
    let r = c.recv().expect("resp");
    assert_eq!(
        (error_code(&r), r["id"].clone()),
        (i64::from(INVALID_REQUEST), json!(9))
    );
    c.send_raw(br#"{"jsonrpc":"2.0","method":"echo","params":5,"id":10}"#);
    assert_eq!(
        error_code(&c.recv().expect("resp")),
        i64::from(INVALID_REQUEST)
    );
    c.send_raw(b"17");
    assert_eq!(
        error_code(&c.recv().expect("resp")),
        i64::from(INVALID_REQUEST)
    );
}

#[test]
fn parse_error_is_answered_then_connection_closed_and_server_serves_others() {
    let h = start(StateMask::RUNTIME);
    let mut bad = Client::connect(&h);
    bad.send_raw(b"{\"jsonrpc\": \"2.0\", \"method\": ]");
    let r = bad.recv().expect("parse error response");
    assert_eq!(error_code(&r), i64::from(PARSE_ERROR));
    assert_eq!(r["id"], Value::Null);
    assert!(
        bad.recv().is_none(),
        "connection must be closed after a parse error"
    );
    let mut good = Client::connect(&h);
    assert_eq!(
        good.call("add", json!({"a": 1, "b": 1}), 1)["result"],
        json!(2)
    );
}

#[test]
fn large_requests_accepted_and_oversized_refused() {
    let h = start(StateMask::RUNTIME);
    let mut c = Client::connect(&h);
    let big = "x".repeat(5 << 20);
    let r = c.call("echo", json!({ "blob": big }), 1);
    assert_eq!(r["result"]["blob"].as_str().map(str::len), Some(5 << 20));
    let mut c2 = Client::connect(&h);
    let writer = {
        let mut s = c2.s.try_clone().expect("clone");
        thread::spawn(move || {
            let head = br#"{"jsonrpc":"2.0","method":"echo","id":1,"params":{"b":""#;
            let _ = s.write_all(head);
            let chunk = vec![b'y'; 1 << 20];
            for _ in 0..(MAX_REQUEST_BYTES >> 20) + 2 {
                if s.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    };
    let r = c2.recv().expect("oversize error");
    assert_eq!(error_code(&r), i64::from(INVALID_REQUEST));
    drop(c2);
    writer.join().expect("writer");
    let mut c3 = Client::connect(&h);
    assert_eq!(
        c3.call("add", json!({"a": 2, "b": 2}), 3)["result"],
        json!(4)
    );
}

#[test]
fn many_clients_at_once_and_disconnects_mid_request() {
    let h = start(StateMask::RUNTIME);
    let path = h.path.clone();
    let half = {
        let mut s = UnixStream::connect(&path).expect("connect");
        s.write_all(br#"{"jsonrpc":"2.0","method":"add","par"#)
            .expect("write");
        s
    };
    drop(half);
    let threads: Vec<_> = (0..100)
        .map(|i| {
            let path = path.clone();
            thread::spawn(move || {
                let s = UnixStream::connect(&path).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(20)))
                    .expect("timeout");
                let mut c = Client { s, buf: Vec::new() };
                let r = c.call("add", json!({"a": i, "b": 1}), i);
                assert_eq!(r["result"], json!(i + 1));
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let mut c = Client::connect(&h);
    assert_eq!(c.call("later", json!({}), 1)["result"], json!("late"));
}

#[test]
fn second_server_refused_and_stale_socket_reclaimed() {
    let h = start(StateMask::RUNTIME);
    let err = RpcServer::listen(&h.path, Arc::new(Registry::default())).expect_err("must refuse");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains("already serving"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stale.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    drop(l); // the file stays, nobody listens: a killed daemon's leftover
    let s = RpcServer::listen(&path, Arc::new(Registry::default())).expect("reclaim stale socket");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(s);
    assert!(!path.exists(), "socket removed when the server goes away");

    let file = dir.path().join("regular");
    std::fs::write(&file, b"x").expect("write");
    assert!(RpcServer::listen(&file, Arc::new(Registry::default())).is_err());
    assert!(file.exists(), "a regular file is never removed");
}

#[test]
fn startup_state_gates_methods_and_wait_init() {
    let h = start(StateMask::STARTUP);
    let mut c = Client::connect(&h);
    let r = c.call("add", json!({"a": 1, "b": 1}), 1);
    assert_eq!(error_code(&r), i64::from(INVALID_STATE));
    let methods = c.call("rpc_get_methods", json!({"current": true}), 2)["result"].clone();
    let names: Vec<&str> = methods
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        names.contains(&"framework_start_init") && !names.contains(&"add"),
        "{names:?}"
    );
    let mut waiter = Client::connect(&h);
    waiter.send_raw(br#"{"jsonrpc":"2.0","method":"framework_wait_init","id":5}"#);
    thread::sleep(Duration::from_millis(30));
    assert_eq!(
        c.call("framework_start_init", json!({}), 3)["result"],
        json!(true)
    );
    assert_eq!(
        waiter.recv().expect("wait_init answer")["result"],
        json!(true)
    );
    assert_eq!(
        c.call("add", json!({"a": 1, "b": 1}), 4)["result"],
        json!(2)
    );
    let r = c.call("framework_start_init", json!({}), 5);
    assert_eq!(error_code(&r), i64::from(INVALID_STATE));
    assert_eq!(h.fw.registry.state(), StateMask::RUNTIME);
}

#[test]
fn config_methods_report_subsystems() {
    let h = start(StateMask::RUNTIME);
    let mut c = Client::connect(&h);
    let subs = c.call("framework_get_subsystems", json!({}), 1)["result"].clone();
    assert_eq!(
        subs,
        json!([{"subsystem":"bdev","depends_on":[]},{"subsystem":"nvmf","depends_on":["bdev"]}])
    );
    let cfg = c.call("framework_get_config", json!({"name": "bdev"}), 2)["result"].clone();
    assert_eq!(cfg, json!([{"method": "echo", "params": {"x": 1}}]));
    let r = c.call("framework_get_config", json!({"name": "nope"}), 3);
    assert_eq!(error_code(&r), -i64::from(libc::ENOENT));
    let all = c.call("save_config", json!({}), 4)["result"].clone();
    assert_eq!(all["subsystems"][0]["subsystem"], json!("bdev"));
    assert_eq!(all["subsystems"][1]["config"], json!([]));
}

#[test]
fn notifications_ring() {
    let n = Notifier::new();
    n.register_type("bdev_register");
    n.register_type("thin_pool_low_water_mark");
    assert_eq!(n.types(), vec!["bdev_register", "thin_pool_low_water_mark"]);
    let a = n.send("bdev_register", "malloc0");
    let b = n.send("thin_pool_low_water_mark", "pool0");
    assert_eq!((a, b), (0, 1));
    let v = n
        .rpc_get_notifications(Some(json!({"id": 1})))
        .expect("get");
    assert_eq!(
        v,
        json!([{"type": "thin_pool_low_water_mark", "ctx": "pool0", "id": 1}])
    );
    assert_eq!(
        n.rpc_get_notifications(None)
            .expect("all")
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(
        n.rpc_get_notifications(Some(json!({"max": 1})))
            .expect("max")[0]["id"],
        json!(0)
    );
    assert!(n.rpc_get_notifications(Some(json!({"id": -1}))).is_err());
    for i in 0..(MAX_EVENTS as u64 + 10) {
        n.send("bdev_register", &format!("b{i}"));
    }
    let all = n.events(0, 0);
    assert_eq!(all.len(), MAX_EVENTS);
    assert_eq!(all.last().map(|e| e.id), Some(MAX_EVENTS as u64 + 11));
    assert!(all.windows(2).all(|w| w[1].id == w[0].id + 1));
}

#[test]
fn load_config_runs_calls_in_order_and_names_failures() {
    let r = registry_with_test_methods(StateMask::STARTUP);
    let cfg = json!({"subsystems": [
        {"subsystem": "bdev", "config": [
            {"method": "add", "params": {"a": 1, "b": 2}},
            [{"method": "echo", "params": {}}, {"method": "echo"}]
        ]},
        {"subsystem": "empty", "config": null}
    ]});
    let calls = parse_config(&cfg).expect("parse");
    assert_eq!(
        calls.iter().map(|c| c.method.as_str()).collect::<Vec<_>>(),
        ["add", "echo", "echo"]
    );
    let started = Arc::new(AtomicBool::new(false));
    let s2 = started.clone();
    let r2 = r.clone();
    load_config(&r, &cfg, move || {
        s2.store(true, Ordering::Release);
        r2.set_state(StateMask::RUNTIME);
        Ok(())
    })
    .expect("load");
    assert!(started.load(Ordering::Acquire));

    let bad = json!({"subsystems": [{"subsystem": "bdev", "config": [{"method": "fail"}]}]});
    let err = load_config(&r, &bad, || Ok(())).expect_err("must fail");
    assert!(
        err.contains("fail failed") && err.contains("no such device"),
        "{err}"
    );
    let unknown = json!({"subsystems": [{"subsystem": "bdev", "config": [{"method": "zzz"}]}]});
    assert!(load_config(&r, &unknown, || Ok(()))
        .expect_err("unknown")
        .contains("unknown method zzz"));
    assert!(parse_config(&json!({"subsystem": []})).is_err());
    assert!(parse_config(&json!({"subsystems": [{"config": []}]})).is_err());
    assert!(
        parse_config(&json!({"subsystems": [{"subsystem": "x", "config": [{"params": {}}]}]}))
            .is_err()
    );
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_request_parser(bytes in proptest::collection::vec(0u8..=255, 0..256)) {
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            let _ = crate::jsonrpc::parse_request(v);
        }
    }
}
