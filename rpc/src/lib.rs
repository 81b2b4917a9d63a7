//! `rpc`: the JSON-RPC 2.0 server that `thind` exposes on a Unix socket, speaking SPDK's
//! dialect so that SPDK's own `spdk-rpc` client drives it unchanged.
//!
//! Layers:
//! - [`jsonrpc`]: request/response/error types and SPDK's error codes.
//! - [`registry`]: the method table. Domain crates keep plain handler functions in their own
//!   `rpc.rs`; `thind` adapts them into [`registry::Registry`] entries. A handler receives its
//!   params and a [`registry::Responder`], which it may complete later from any thread (so a
//!   handler can hop to a reactor and answer when the work is done).
//! - [`server`]: the Unix-socket listener and connections. It never blocks: `thind` calls
//!   [`server::RpcServer::poll`] from a poller on one reactor, as SPDK polls its RPC server.
//! - [`notify`]: the notification ring behind `notify_get_types`/`notify_get_notifications`.
//! - [`config`]: the `framework_get_config`/`framework_get_subsystems` data behind `save_config`
//!   and the loader behind `thind --json`.
//! - [`framework`]: `spdk_get_version`, `rpc_get_methods`, `framework_*` methods.
//!
//! Nothing here knows about bdevs or reactors: the crate is the protocol and the plumbing.

pub mod config;
pub mod framework;
pub mod jsonrpc;
pub mod notify;
pub mod registry;
pub mod server;

pub use jsonrpc::RpcError;
pub use registry::{parse_params, Registry, Responder, StateMask};
pub use server::RpcServer;

#[cfg(test)]
mod tests;
