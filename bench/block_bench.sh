#!/usr/bin/env bash
# Block data-plane benchmark: a 3-node dev cluster on this machine, 1 GiB put and get as 4 MiB
# blocks with R=2, next to a same-disk fsync reference measured in the same run.
# Usage: bench/block_bench.sh [extra block-bench args, e.g. --runs 5]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p twinfs -p twinfs-bench
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/twinfs-bench.XXXXXX")
trap './target/release/twinfs dev-cluster down --dir "$WORK" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
./target/release/twinfs dev-cluster up --dir "$WORK" --nodes 3 >/dev/null
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), disk $(df -h "$WORK" | awk 'NR==2{print $1" "$2}')"
./target/release/block-bench --cluster "$WORK/cluster.json" --ref-dir "$WORK/reference" "$@"
