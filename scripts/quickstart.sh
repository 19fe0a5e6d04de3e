#!/usr/bin/env bash
# One command from a fresh Debian machine to a running local cluster:
# installs and builds (scripts/setup.sh), starts etcd, 3 nodes and 2 mounts of the volume
# "uploads" in ./dev-cluster, then writes a file through one mount and reads it through the other.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
TWINFS=./target/release/twinfs
DIR=${DIR:-$PWD/dev-cluster}
if [ -f "$DIR/cluster.json" ]; then $TWINFS dev-cluster down --dir "$DIR" >/dev/null 2>&1 || true; fi
$TWINFS dev-cluster up --dir "$DIR" --nodes 3 --mounts 2
export TWINFS_CLUSTER=$DIR/cluster.json
A=$DIR/mnt/mount-0 B=$DIR/mnt/mount-1
echo; $TWINFS status
echo; $TWINFS volume list
mkdir -p "$A/wp-content/uploads/2026/11"
head -c 1048576 /dev/urandom > "$A/wp-content/uploads/2026/11/photo.jpg"
echo; echo "wrote 1 MiB through $A; reading it through $B:"
ls -l "$B/wp-content/uploads/2026/11/"
cmp "$A/wp-content/uploads/2026/11/photo.jpg" "$B/wp-content/uploads/2026/11/photo.jpg" \
  && echo "identical through both mounts (each block stored on 2 of the 3 nodes)"
echo; echo "try more: ls $B; twinfs volume inspect uploads"
echo "stop it with: $TWINFS dev-cluster down --dir $DIR"
