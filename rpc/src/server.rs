//! The JSON-RPC server on a Unix socket, polled (never blocking) from one reactor.
//!
//! Connections are non-blocking sockets with a receive and a send buffer. Requests are JSON
//! values streamed without framing; each complete value is dispatched as soon as it has
//! arrived. Answers come back through a channel (handlers may answer from any thread) and are
//! queued on their connection. Every limit is explicit: connections, request size, requests
//! dispatched per poll, answers outstanding and bytes queued per connection.
//!
//! A malformed JSON text cannot be resynchronised in a stream, so a parse error is answered
//! (`-32700`, id null) and the connection is closed after the answer is sent, as SPDK does.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use serde_json::Value;

use crate::jsonrpc::{self, RpcError, INVALID_REQUEST, PARSE_ERROR};
use crate::registry::{Registry, Responder};

/// Most connections served at once; more are accepted and closed at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Largest request accepted (bytes of one JSON text); larger ones are refused.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
/// Requests dispatched per connection per poll (bounded work per tick).
const MAX_REQUESTS_PER_POLL: usize = 64;
/// Answers a connection may have outstanding before the server stops reading from it.
const MAX_OUTSTANDING: usize = 1024;
/// Bytes queued for a client that does not read before it is disconnected.
const MAX_SEND_BYTES: usize = 64 << 20;
/// Bytes read per connection per poll.
const READ_CHUNK: usize = 64 << 10;
/// Below this size a buffer is re-parsed on any new data; above, only when it may be complete.
const SMALL_BUFFER: usize = 64 << 10;

/// Where an answer goes.
struct Reply {
    conn: u64,
    slot: Slot,
    result: Result<Value, RpcError>,
}

enum Slot {
    /// A single request with this id.
    Single(Value),
    /// Element `index` (with this id) of batch `batch`.
    Batch { batch: u64, index: usize, id: Value },
}

struct Batch {
    answers: Vec<Option<Value>>,
    remaining: usize,
}

struct Conn {
    stream: UnixStream,
    recv: Vec<u8>,
    /// Bytes of `recv` already consumed by the parser.
    parsed_to: usize,
    /// `recv` may hold a complete request not yet parsed.
    parse_pending: bool,
    send: Vec<u8>,
    sent: usize,
    outstanding: usize,
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    /// No more reading: close once the queued answers are sent.
    closing: bool,
    /// The peer is gone: drop at once.
    dead: bool,
}

/// The RPC server: a listening socket and its connections.
pub struct RpcServer {
    path: PathBuf,
    listener: UnixListener,
    registry: Arc<Registry>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    tx: Sender<Reply>,
    rx: Receiver<Reply>,
}

impl std::fmt::Debug for RpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcServer")
            .field("path", &self.path)
            .field("connections", &self.conns.len())
            .finish()
    }
}

/// Prepares `path` for binding: refuses when another server answers on it, removes a stale
/// socket left by a killed process, refuses to remove anything that is not a socket.
fn reclaim_socket_path(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            ErrorKind::AddrInUse,
            format!(
                "another process is already serving RPC on {} (stop it, or choose another \
                 socket with -r)",
                path.display()
            ),
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

impl RpcServer {
    /// Listens on `path` (mode 0600). A stale socket is reclaimed; a live one is an error of
    /// kind `AddrInUse` that says so.
    pub fn listen(path: &Path, registry: Arc<Registry>) -> io::Result<Self> {
        reclaim_socket_path(path)?;
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let (tx, rx) = channel();
        Ok(Self {
            path: path.to_owned(),
            listener,
            registry,
            conns: HashMap::new(),
            next_conn: 1,
            tx,
            rx,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of open connections.
    pub fn nr_connections(&self) -> usize {
        self.conns.len()
    }

    /// Does a bounded amount of work: accepts, reads, dispatches, routes answers, writes.
    /// Returns true if anything happened (the reactor's busy/idle accounting).
    pub fn poll(&mut self) -> bool {
        let mut busy = self.accept();
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in &ids {
            busy |= self.service_input(*id);
        }
        while let Ok(reply) = self.rx.try_recv() {
            busy = true;
            self.route(reply);
        }
        for id in &ids {
            busy |= self.service_output(*id);
        }
        self.conns
            .retain(|_, c| !(c.dead || (c.closing && c.drained())));
        busy
    }

    fn accept(&mut self) -> bool {
        let mut busy = false;
        for _ in 0..64 {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    busy = true;
                    if self.conns.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err()
                    {
                        continue; // dropping the stream closes it
                    }
                    let id = self.next_conn;
                    self.next_conn += 1;
                    self.conns.insert(id, Conn::new(stream));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        busy
    }

    fn service_input(&mut self, id: u64) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        if conn.closing || conn.dead || conn.outstanding >= MAX_OUTSTANDING {
            return false;
        }
        let got = conn.read_some();
        if !(got || conn.parse_pending) {
            return false;
        }
        let mut values = Vec::new();
        let parse = conn.take_values(&mut values);
        for v in values {
            self.dispatch_value(id, v);
        }
        if let Some(conn) = self.conns.get_mut(&id) {
            if let Err(err) = parse {
                conn.queue(&jsonrpc::response_err(Value::Null, &err));
                conn.closing = true;
            }
        }
        true
    }

    fn dispatch_value(&mut self, conn_id: u64, v: Value) {
        match v {
            Value::Array(items) => self.dispatch_batch(conn_id, items),
            other => match jsonrpc::parse_request(other) {
                Ok(req) => {
                    let Some(id) = req.id else {
                        self.registry
                            .dispatch(&req.method, req.params, Responder::new(|_| {}));
                        return;
                    };
                    let responder = self.responder(conn_id, Slot::Single(id));
                    self.registry.dispatch(&req.method, req.params, responder);
                }
                Err((id, err)) => self.queue_now(conn_id, &jsonrpc::response_err(id, &err)),
            },
        }
    }

    fn dispatch_batch(&mut self, conn_id: u64, items: Vec<Value>) {
        if items.is_empty() {
            let err = RpcError::new(INVALID_REQUEST, "Invalid request: empty batch");
            self.queue_now(conn_id, &jsonrpc::response_err(Value::Null, &err));
            return;
        }
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        let batch = conn.next_batch;
        conn.next_batch += 1;
        conn.batches.insert(
            batch,
            Batch {
                answers: vec![None; items.len()],
                remaining: items.len(),
            },
        );
        for (index, item) in items.into_iter().enumerate() {
            match jsonrpc::parse_request(item) {
                Ok(req) => match req.id {
                    Some(id) => {
                        let resp = self.responder(conn_id, Slot::Batch { batch, index, id });
                        self.registry.dispatch(&req.method, req.params, resp);
                    }
                    None => {
                        self.registry
                            .dispatch(&req.method, req.params, Responder::new(|_| {}));
                        self.batch_answer(conn_id, batch, index, None);
                    }
                },
                Err((id, err)) => {
                    let answer = jsonrpc::response_err(id, &err);
                    self.batch_answer(conn_id, batch, index, Some(answer));
                }
            }
        }
    }

    fn responder(&mut self, conn_id: u64, slot: Slot) -> Responder {
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            conn.outstanding += 1;
        }
        let tx = self.tx.clone();
        Responder::new(move |result| {
            let _ = tx.send(Reply {
                conn: conn_id,
                slot,
                result,
            });
        })
    }

    fn route(&mut self, reply: Reply) {
        let Some(conn) = self.conns.get_mut(&reply.conn) else {
            return;
        };
        conn.outstanding = conn.outstanding.saturating_sub(1);
        match reply.slot {
            Slot::Single(id) => {
                let answer = match reply.result {
                    Ok(v) => jsonrpc::response_ok(id, v),
                    Err(e) => jsonrpc::response_err(id, &e),
                };
                conn.queue(&answer);
            }
            Slot::Batch { batch, index, id } => {
                let answer = match reply.result {
                    Ok(v) => jsonrpc::response_ok(id, v),
                    Err(e) => jsonrpc::response_err(id, &e),
                };
                self.batch_answer(reply.conn, batch, index, Some(answer));
            }
        }
    }

    fn batch_answer(&mut self, conn_id: u64, batch: u64, index: usize, answer: Option<Value>) {
        let Some(conn) = self.conns.get_mut(&conn_id) else {
            return;
        };
        let Some(b) = conn.batches.get_mut(&batch) else {
            return;
        };
        if let Some(slot) = b.answers.get_mut(index) {
            *slot = answer;
        }
        b.remaining -= 1;
        if b.remaining > 0 {
            return;
        }
        let Some(done) = conn.batches.remove(&batch) else {
            return;
        };
        let answers: Vec<Value> = done.answers.into_iter().flatten().collect();
        if !answers.is_empty() {
            conn.queue(&Value::Array(answers));
        }
    }

    fn queue_now(&mut self, conn_id: u64, answer: &Value) {
        if let Some(conn) = self.conns.get_mut(&conn_id) {
            conn.queue(answer);
        }
    }

    fn service_output(&mut self, id: u64) -> bool {
        let Some(conn) = self.conns.get_mut(&id) else {
            return false;
        };
        conn.write_some()
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            recv: Vec::new(),
            parsed_to: 0,
            parse_pending: false,
            send: Vec::new(),
            sent: 0,
            outstanding: 0,
            batches: HashMap::new(),
            next_batch: 0,
            closing: false,
            dead: false,
        }
    }

    /// Reads what is available (bounded). Returns true if bytes arrived.
    fn read_some(&mut self) -> bool {
        let mut buf = [0u8; 16 << 10];
        let mut total = 0;
        while total < READ_CHUNK {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    // Peer closed its side: answer what is outstanding only if it still reads;
                    // a half-closed client gets its answers, a gone one fails the write.
                    self.closing = true;
                    break;
                }
                Ok(n) => {
                    total += n;
                    self.recv.extend_from_slice(buf.get(..n).unwrap_or(&[]));
                    self.parse_pending = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.dead = true;
                    break;
                }
            }
        }
        total > 0
    }

    /// Extracts up to `MAX_REQUESTS_PER_POLL` complete JSON values from the receive buffer.
    /// `Err` is a parse error or an oversized request: answer it and close.
    fn take_values(&mut self, out: &mut Vec<Value>) -> Result<(), RpcError> {
        self.parse_pending = false;
        let pending = self.recv.get(self.parsed_to..).unwrap_or(&[]);
        let trimmed_end = pending.iter().rposition(|b| !b.is_ascii_whitespace());
        let Some(last) = trimmed_end else {
            self.recv.clear();
            self.parsed_to = 0;
            return Ok(());
        };
        let maybe_complete = matches!(pending.get(last), Some(b'}' | b']'));
        if pending.len() > SMALL_BUFFER && !maybe_complete {
            return self.check_size(pending.len());
        }
        let mut stream = serde_json::Deserializer::from_slice(pending).into_iter::<Value>();
        let mut consumed = 0;
        let mut result = Ok(());
        while out.len() < MAX_REQUESTS_PER_POLL {
            match stream.next() {
                None => break,
                Some(Ok(v)) => {
                    consumed = stream.byte_offset();
                    out.push(v);
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    result = Err(RpcError::new(PARSE_ERROR, format!("Parse error: {e}")));
                    break;
                }
            }
        }
        if out.len() == MAX_REQUESTS_PER_POLL {
            self.parse_pending = true;
        }
        self.parsed_to += consumed;
        if self.parsed_to == self.recv.len() || self.parsed_to > (1 << 20) {
            self.recv.drain(..self.parsed_to);
            self.parsed_to = 0;
        }
        result?;
        self.check_size(self.recv.len() - self.parsed_to)
    }

    fn check_size(&self, pending: usize) -> Result<(), RpcError> {
        if pending > MAX_REQUEST_BYTES {
            return Err(RpcError::new(
                INVALID_REQUEST,
                format!("Invalid request: larger than {MAX_REQUEST_BYTES} bytes"),
            ));
        }
        Ok(())
    }

    /// Nothing left to answer or send.
    fn drained(&self) -> bool {
        self.outstanding == 0 && self.batches.is_empty() && self.sent == self.send.len()
    }

    fn queue(&mut self, answer: &Value) {
        if self.dead {
            return;
        }
        // serde_json cannot fail to serialise a Value it built.
        let bytes = serde_json::to_vec(answer).unwrap_or_default();
        if self.send.len() - self.sent + bytes.len() > MAX_SEND_BYTES {
            self.dead = true;
            return;
        }
        self.send.extend_from_slice(&bytes);
        self.send.push(b'\n');
    }

    /// Writes what the socket takes. Returns true if bytes left.
    fn write_some(&mut self) -> bool {
        let mut busy = false;
        while self.sent < self.send.len() {
            match self.stream.write(self.send.get(self.sent..).unwrap_or(&[])) {
                Ok(0) => {
                    self.dead = true;
                    break;
                }
                Ok(n) => {
                    busy = true;
                    self.sent += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.dead = true;
                    break;
                }
            }
        }
        if self.sent == self.send.len() {
            self.send.clear();
            self.sent = 0;
        }
        busy
    }
}
