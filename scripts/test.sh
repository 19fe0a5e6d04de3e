#!/usr/bin/env bash
# The project's test command: formatting, lints, the deploy/ manifests (offline), unit and
# integration tests, then conformance (pjdfstest and fsx on a real FUSE mount).
# Integration tests start real etcd and node processes; they need etcd on PATH (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> deploy manifests"
bash scripts/validate-deploy.sh
echo "==> cargo test"
cargo test --workspace --no-fail-fast 2>&1 | tee target/test.log
echo "==> conformance: pjdfstest and fsx against a real mount (scripts/conformance.sh)"
TWINFS_BIN=$PWD/target/debug/twinfs bash scripts/conformance.sh
