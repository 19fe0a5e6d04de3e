#!/usr/bin/env bash
# One command from a fresh Debian machine to a running local cluster:
# installs and builds (scripts/setup.sh), starts etcd and 3 nodes in ./dev-cluster, then stores
# a block, shows where its two copies live and reads it back.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
TWINFS=./target/release/twinfs
DIR=${DIR:-$PWD/dev-cluster}
if [ -f "$DIR/cluster.json" ]; then $TWINFS dev-cluster down --dir "$DIR" >/dev/null 2>&1 || true; fi
$TWINFS dev-cluster up --dir "$DIR" --nodes 3
export TWINFS_CLUSTER=$DIR/cluster.json
echo; $TWINFS status
sample=$(mktemp); trap 'rm -f "$sample" "$sample.back"' EXIT
head -c 1048576 /dev/urandom > "$sample"
hash=$($TWINFS block put "$sample")
echo; echo "stored 1 MiB as block $hash on:"; $TWINFS block locate "$hash" | sed 's/^/  /'
$TWINFS block get "$hash" -o "$sample.back"
cmp "$sample" "$sample.back" && echo "read back identical"
echo; echo "stop it with: $TWINFS dev-cluster down --dir $DIR"
