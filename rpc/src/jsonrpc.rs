//! JSON-RPC 2.0 wire types in SPDK's dialect.
//!
//! SPDK streams request objects over the socket without framing (whitespace between them is
//! optional) and accepts batches (a JSON array of requests). Responses carry the request's
//! `id`; a request without `id` is a notification and gets no response. Error codes are the
//! JSON-RPC ones plus SPDK's `-errno` convention for failures of the operation itself.

use serde_json::{json, Value};

/// Invalid JSON was received.
pub const PARSE_ERROR: i32 = -32700;
/// The JSON sent is not a valid request object.
pub const INVALID_REQUEST: i32 = -32600;
/// The method does not exist.
pub const METHOD_NOT_FOUND: i32 = -32601;
/// Invalid method parameters.
pub const INVALID_PARAMS: i32 = -32602;
/// Internal error.
pub const INTERNAL_ERROR: i32 = -32603;
/// SPDK's `SPDK_JSONRPC_ERROR_INVALID_STATE`: the method is not allowed in the current state.
pub const INVALID_STATE: i32 = -1;

/// A JSON-RPC error: a code and a message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// JSON-RPC code (`-327xx`) or `-errno`.
    pub code: i32,
    /// Human-readable message; says what was wrong and with which object.
    pub message: String,
}

impl RpcError {
    /// An error with an explicit code.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// `-32602`: bad, missing or unknown parameters.
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }

    /// `-32601`: no such method.
    pub fn method_not_found(method: &str) -> Self {
        Self::new(METHOD_NOT_FOUND, format!("Method not found: {method}"))
    }

    /// `-32603`: the server failed for a reason of its own.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(INTERNAL_ERROR, message)
    }

    /// `-errno`, as SPDK reports operation failures (`-ENODEV`, `-EEXIST`, ...).
    pub fn errno(errno: i32, message: impl Into<String>) -> Self {
        debug_assert!(errno > 0, "errno must be positive");
        Self::new(-errno.abs(), message)
    }

    /// The `error` member of a response.
    pub fn to_json(&self) -> Value {
        json!({ "code": self.code, "message": self.message })
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.message, self.code)
    }
}

impl std::error::Error for RpcError {}

/// A validated request object.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Method name.
    pub method: String,
    /// `params`, if present (an object or an array).
    pub params: Option<Value>,
    /// `id`, if present; `None` means a notification (no response).
    pub id: Option<Value>,
}

/// Validates one request object. On error, returns the id to answer with (or null) and the
/// error, as JSON-RPC 2.0 asks.
pub fn parse_request(v: Value) -> Result<Request, (Value, RpcError)> {
    let Value::Object(mut obj) = v else {
        return Err((
            Value::Null,
            RpcError::new(INVALID_REQUEST, "Invalid request: not an object"),
        ));
    };
    let id = obj.remove("id");
    let id_for_err = id.clone().unwrap_or(Value::Null);
    match &id {
        None | Some(Value::Null | Value::Number(_) | Value::String(_)) => {}
        Some(_) => {
            return Err((
                Value::Null,
                RpcError::new(
                    INVALID_REQUEST,
                    "Invalid request: id must be a number or string",
                ),
            ))
        }
    }
    match obj.remove("jsonrpc") {
        Some(Value::String(s)) if s == "2.0" => {}
        _ => {
            return Err((
                id_for_err,
                RpcError::new(INVALID_REQUEST, "Invalid request: jsonrpc must be \"2.0\""),
            ))
        }
    }
    let method = match obj.remove("method") {
        Some(Value::String(s)) => s,
        _ => {
            return Err((
                id_for_err,
                RpcError::new(INVALID_REQUEST, "Invalid request: method must be a string"),
            ))
        }
    };
    let params = obj.remove("params");
    if let Some(p) = &params {
        if !p.is_object() && !p.is_array() {
            return Err((
                id_for_err,
                RpcError::new(
                    INVALID_REQUEST,
                    "Invalid request: params must be an object or array",
                ),
            ));
        }
    }
    if let Some(k) = obj.keys().next() {
        return Err((
            id_for_err,
            RpcError::new(
                INVALID_REQUEST,
                format!("Invalid request: unknown member '{k}'"),
            ),
        ));
    }
    Ok(Request { method, params, id })
}

/// A success response object.
pub fn response_ok(id: Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// An error response object.
pub fn response_err(id: Value, err: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": err.to_json() })
}
