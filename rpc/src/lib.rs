//! rpc: JSON-RPC 2.0 server in SPDK's dialect (issue: thind and its JSON-RPC). Not yet implemented.
