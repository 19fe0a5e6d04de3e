#!/usr/bin/env bash
# Filesystem benchmark: the same workloads through twinfs (written through one FUSE mount of a
# 3-node dev cluster, read through a second mount of the same volume, each its own process),
# bindfs (FUSE passthrough reference) and a plain local directory on the same disk, in one run.
# Writes a markdown table (twinfs | bindfs | local dir | ratios) to stdout and to $OUT.
#
#   W1 sequential write (fio, bs=1M, end_fsync=1)      W2 sequential read through the other mount
#   W3 cp -rL of the WordPress tree, tar of it through the other mount
#   W4 upload-like files written, sha256-verified through the other mount
#   W5 create / stat (other mount) / unlink of empty files in one directory; parallel creates
#   W6 time until a new file is visible through the other mount; W7 the same for an overwrite
#
# Usage: sudo bench/fs_bench.sh            (root: drop_caches, FUSE mounts; ~20-25 min at full size: W1-W5 run RUNS times)
#   Environment (defaults):  OUT=bench/fs_results.md  SIZE_MB=1024  RUNS=3  FILES=2000
#   EMPTY=10000  PROCS=8  TRIES=20  LAT_KB=64  POLL_TIMEOUT=10 (s, W6/W7 give up)
#   STEP_TIMEOUT=1800 (s, one workload on one system)  SYSTEMS="twinfs bindfs local"
#   WP_SRC=/usr/share/wordpress  SEED=20261125  SKIP_BUILD=1 (use the existing release build)
#   KEEP=1 (keep the work dir, with the mount and node logs)  TMPDIR (where the work dir goes)
# Smoke run: SIZE_MB=64 RUNS=1 FILES=100 EMPTY=500 TRIES=5 OUT=/tmp/smoke.md bench/fs_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start_ns=$(date +%s%N)
export LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
OUT=${OUT:-bench/fs_results.md}
SYSTEMS=${SYSTEMS:-twinfs bindfs local}
[ "$(id -u)" -eq 0 ] || { echo "fs_bench.sh needs root (drop_caches, FUSE mounts)" >&2; exit 1; }
for tool in fio bindfs fusermount3 python3 dd tar; do
  command -v $tool >/dev/null || { echo "$tool not found: run scripts/setup.sh" >&2; exit 1; }
done
[ -d "${WP_SRC:-/usr/share/wordpress}" ] || { echo "${WP_SRC:-/usr/share/wordpress} not found: run scripts/setup.sh (Debian package wordpress)" >&2; exit 1; }
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --bin twinfs
TWINFS=$PWD/target/release/twinfs
export TWINFS_BIN=$TWINFS
dirty=""; [ -z "$(git status --porcelain -- . 2>/dev/null)" ] || dirty=" with uncommitted changes"
export BUILD_DESC="release build of $(git rev-parse --short HEAD 2>/dev/null || echo '?')$dirty (binary built $(date -u -r "$TWINFS" '+%Y-%m-%d %H:%M UTC'))"

WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/twinfs-fsbench.XXXXXX")
export BENCH_DIR=$WORK
cleanup() {
  set +e
  if mountpoint -q "$WORK/bindfs-mnt" 2>/dev/null; then
    fusermount3 -u "$WORK/bindfs-mnt" 2>/dev/null || umount -l "$WORK/bindfs-mnt"
  fi
  [ -f "$WORK/cluster/cluster.json" ] && "$TWINFS" dev-cluster down --dir "$WORK/cluster" >/dev/null 2>&1
  if [ "${KEEP:-0}" = 1 ]; then
    echo "work dir kept: $WORK (twinfs mount logs: $WORK/cluster/mnt/mount-*.log)" >&2
  else
    rm -rf --one-file-system "$WORK"  # never descends into a mount left behind
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

systems=()
for s in $SYSTEMS; do
  case $s in
    twinfs)
      "$TWINFS" dev-cluster up --dir "$WORK/cluster" --nodes 3 --mounts 2 >"$WORK/cluster-up.log" \
        || { cat "$WORK/cluster-up.log" >&2; exit 1; }
      systems+=(--system "twinfs:$WORK/cluster/mnt/mount-0:$WORK/cluster/mnt/mount-1") ;;
    bindfs)
      mkdir -p "$WORK/bindfs-src" "$WORK/bindfs-mnt"
      bindfs "$WORK/bindfs-src" "$WORK/bindfs-mnt"
      systems+=(--system "bindfs:$WORK/bindfs-mnt:$WORK/bindfs-mnt") ;;
    local)
      mkdir -p "$WORK/local"
      systems+=(--system "local:$WORK/local:$WORK/local") ;;
    *) echo "unknown system in SYSTEMS: $s" >&2; exit 2 ;;
  esac
done

python3 bench/fs_bench.py run "${systems[@]}" --json "$WORK/results.json"

secs=$(( ($(date +%s%N) - start_ns) / 1000000000 ))
export RUN_TIME="$((secs / 60)) min $((secs % 60)) s"
logs=()
for f in "$WORK"/cluster/mnt/mount-*.log "$WORK"/cluster/nodes/node-*/node.log; do
  [ -f "$f" ] && logs+=(--log "$f")
done
python3 bench/fs_bench.py report --json "$WORK/results.json" "${logs[@]}" >"$WORK/report.md"
mkdir -p "$(dirname "$OUT")"
cp "$WORK/report.md" "$OUT"
cp "$WORK/results.json" "${OUT%.md}.json"
cat "$WORK/report.md"
