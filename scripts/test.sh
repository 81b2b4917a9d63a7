#!/usr/bin/env bash
# Runs every test: installs prerequisites, checks formatting and lints, builds, and runs the
# unit, property, interop, crash and end-to-end tests. Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-prereqs.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test"
# Tests that need a prerequisite fail (not skip) when it is missing under CI=true.
cargo test --workspace --no-fail-fast -- --test-threads=2
