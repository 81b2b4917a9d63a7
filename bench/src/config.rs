//! The JSON config SPDK's bdevperf reads (`--json`), parsed into a list of method calls.
//!
//! ```json
//! {"subsystems": [{"subsystem": "bdev", "config": [
//!     {"method": "bdev_malloc_create", "params": {"name": "Malloc0", ...}}]}]}
//! ```
//!
//! Only the shape is checked here; each call's params are checked by the bdev crate's RPC
//! handler for that method, exactly as the same call over JSON-RPC would be.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::indexing_slicing))]

use std::fmt;
use std::path::Path;

use serde_json::Value;

/// One `{"method": ..., "params": ...}` entry of a subsystem's config.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigCall {
    /// The subsystem it is listed under (`bdev`).
    pub subsystem: String,
    /// The RPC method name.
    pub method: String,
    /// The params object (`{}` when absent).
    pub params: Value,
}

/// A config error; `Display` is one line naming the file and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and parses the config file at `path`.
pub fn load(path: &Path) -> Result<Vec<ConfigCall>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("--json {}: cannot read: {e}", path.display())))?;
    parse(&text).map_err(|e| ConfigError(format!("--json {}: {}", path.display(), e.0)))
}

/// Parses config text.
pub fn parse(text: &str) -> Result<Vec<ConfigCall>, ConfigError> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| ConfigError(format!("not valid JSON: {e}")))?;
    let subsystems = root
        .get("subsystems")
        .ok_or_else(|| ConfigError("no \"subsystems\" array at the top level".into()))?
        .as_array()
        .ok_or_else(|| ConfigError("\"subsystems\" is not an array".into()))?;
    let mut calls = Vec::new();
    for (i, subsystem) in subsystems.iter().enumerate() {
        let name = subsystem
            .get("subsystem")
            .and_then(Value::as_str)
            .ok_or_else(|| ConfigError(format!("subsystems[{i}] has no \"subsystem\" name")))?;
        let entries = match subsystem.get("config") {
            None | Some(Value::Null) => continue,
            Some(Value::Array(entries)) => entries,
            Some(_) => {
                return Err(ConfigError(format!(
                    "subsystem '{name}': \"config\" is not an array"
                )))
            }
        };
        for (j, entry) in entries.iter().enumerate() {
            calls.push(parse_entry(name, j, entry)?);
        }
    }
    Ok(calls)
}

fn parse_entry(subsystem: &str, index: usize, entry: &Value) -> Result<ConfigCall, ConfigError> {
    let at = || format!("subsystem '{subsystem}' config[{index}]");
    let object = entry
        .as_object()
        .ok_or_else(|| ConfigError(format!("{} is not an object", at())))?;
    let method = object
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| ConfigError(format!("{} has no \"method\" string", at())))?;
    let params = match object.get("params") {
        None | Some(Value::Null) => Value::Object(serde_json::Map::new()),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(ConfigError(format!(
                "{} ({method}): \"params\" is not an object",
                at()
            )))
        }
    };
    Ok(ConfigCall {
        subsystem: subsystem.to_owned(),
        method: method.to_owned(),
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spdk_shape() {
        let calls = parse(
            r#"{"subsystems":[
                {"subsystem":"accel","config":null},
                {"subsystem":"bdev","config":[
                  {"method":"bdev_malloc_create",
                   "params":{"name":"Malloc0","num_blocks":256,"block_size":4096}},
                  {"method":"bdev_wait_for_examine"}]}]}"#,
        )
        .unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].subsystem, "bdev");
        assert_eq!(calls[0].method, "bdev_malloc_create");
        assert_eq!(calls[0].params["num_blocks"], 256);
        assert_eq!(calls[1].method, "bdev_wait_for_examine");
        assert!(calls[1].params.as_object().unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_shapes_with_a_reason() {
        for (text, needle) in [
            ("", "not valid JSON"),
            ("{", "not valid JSON"),
            ("[]", "no \"subsystems\""),
            (r#"{"subsystems":{}}"#, "not an array"),
            (r#"{"subsystems":[{}]}"#, "no \"subsystem\" name"),
            (
                r#"{"subsystems":[{"subsystem":"bdev","config":{}}]}"#,
                "not an array",
            ),
            (
                r#"{"subsystems":[{"subsystem":"bdev","config":[1]}]}"#,
                "not an object",
            ),
            (
                r#"{"subsystems":[{"subsystem":"bdev","config":[{}]}]}"#,
                "no \"method\"",
            ),
            (
                r#"{"subsystems":[{"subsystem":"bdev","config":[{"method":"x","params":[]}]}]}"#,
                "\"params\" is not an object",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.0.contains(needle), "{text:?}: {e}");
            assert!(!e.0.contains('\n'), "{text:?}: multi-line error {e}");
        }
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let e = load(Path::new("/nonexistent/bdevperf.json")).unwrap_err();
        assert!(e.0.contains("/nonexistent/bdevperf.json"), "{e}");
    }
}
