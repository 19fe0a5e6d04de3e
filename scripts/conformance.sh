#!/usr/bin/env bash
# Conformance tests against a real FUSE mount of a local dev cluster (3 nodes, 2 mounts of the
# volume "uploads", each its own mount process as on different nodes):
#
#   1. pjdfstest (POSIX conformance, the Rust rewrite) on mount 0. Every failing test case must be
#      listed, with its reason, in tests/pjdfstest-exclusions.txt (`name  # reason`, one a line);
#      any other failure fails this script. Excluded tests that pass are reported as a note.
#   2. fsx (file-data exerciser) for $FSX_OPS operations (100,000) with a fixed seed on a 256 KiB
#      file in mount 0, then $FSX_CHUNK_OPS (5,000) on a 10 MiB file that spans chunk boundaries;
#      any data or size mismatch fails this script. Each file fsx leaves is then read through
#      mount 1 and must be byte-identical (close-to-open consistency across nodes).
#
# Needs root (pjdfstest switches users; FUSE mounts), pjdfstest and fsx on PATH (scripts/setup.sh
# installs them), and etcd (dev-cluster starts its own).
#
# Environment:
#   TWINFS_BIN          twinfs binary to use (default ./target/debug/twinfs, built if unset)
#   PJDFSTEST_PATTERNS  only run pjdfstest cases whose names contain one of these words
#   SKIP_PJDFSTEST=1 / SKIP_FSX=1   run only the other part
#   FSX_OPS, FSX_SEED   fsx operation count (100000) and seed (20251125)
#   FSX_CHUNK_OPS       operations of the second, multi-chunk fsx run (5000; 0 skips it)
#   KEEP_DIR=1          leave the work directory (logs) in place on success
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
export NO_COLOR=1 CLICOLOR=0

EXCLUSIONS=$ROOT/tests/pjdfstest-exclusions.txt
FSX_OPS=${FSX_OPS:-100000}
FSX_SEED=${FSX_SEED:-20251125}
FSX_CHUNK_OPS=${FSX_CHUNK_OPS:-5000}
PJDFSTEST_TIMEOUT=${PJDFSTEST_TIMEOUT:-1200}
FSX_TIMEOUT=${FSX_TIMEOUT:-1200}

if [ -z "${TWINFS_BIN:-}" ]; then
  echo "==> cargo build --bin twinfs"
  cargo build --quiet --bin twinfs
  TWINFS_BIN=$ROOT/target/debug/twinfs
fi
TWINFS_BIN=$(realpath "$TWINFS_BIN")
[ -x "$TWINFS_BIN" ] || { echo "conformance: $TWINFS_BIN is not an executable" >&2; exit 2; }
for tool in pjdfstest fsx; do
  command -v "$tool" >/dev/null || { echo "conformance: $tool not found; run scripts/setup.sh" >&2; exit 2; }
done
[ "$(id -u)" -eq 0 ] || echo "conformance: not root: pjdfstest skips the tests that need root" >&2

# Short paths: pjdfstest binds Unix sockets at paths under the mount (at most 107 bytes).
WORK=$(mktemp -d /tmp/tfc.XXXXXX)
chmod 0755 "$WORK"   # the test users must reach the mount
CLUSTER_UP=0
cleanup() {
  local rc=$?
  if [ $CLUSTER_UP -eq 1 ]; then
    if ! "$TWINFS_BIN" dev-cluster down --dir "$WORK/c" >"$WORK/cluster-down.log" 2>&1; then
      echo "conformance: dev-cluster down failed (see $WORK/cluster-down.log)" >&2
      rc=1
    fi
  fi
  if [ $rc -eq 0 ] && [ -z "${KEEP_DIR:-}" ]; then
    rm -rf "$WORK"
  else
    echo "conformance: logs kept in $WORK" >&2
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "==> dev cluster in $WORK/c"
CLUSTER_UP=1
"$TWINFS_BIN" dev-cluster up --dir "$WORK/c" --nodes 3 --mounts 2 >"$WORK/cluster-up.log" 2>&1 \
  || { cat "$WORK/cluster-up.log" >&2; exit 1; }
MNT0=$WORK/c/mnt/mount-0
MNT1=$WORK/c/mnt/mount-1
mountpoint -q "$MNT0" && mountpoint -q "$MNT1" || { echo "conformance: mounts missing" >&2; exit 1; }

status=0
pjd_summary="pjdfstest: not run"
fsx_summary="fsx: not run"

# ----- pjdfstest -----------------------------------------------------------------------------
if [ -z "${SKIP_PJDFSTEST:-}" ]; then
  # pjdfstest.toml: the opt-in features twinfs has, and two unprivileged users whose primary
  # groups differ (present on every Debian system) for the tests that switch users.
  write_pjd_config() { # FILE ALLOW_REMOUNT
    cat >"$1" <<EOF
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}

[settings]
# twinfs keeps nanosecond timestamps; 10 ms is ample.
naptime = 0.01
allow_remount = $2

[dummy_auth]
entries = [["nobody", "nogroup"], ["daemon", "daemon"]]
EOF
  }
  # Two passes. First the EROFS tests alone: they remount the mount read-only and back, which
  # the kernel refuses (EBUSY) while any file on it is open for writing, and a few pjdfstest
  # cases (posix_fallocate::affected_only_create_flags, ftruncate::affected_create_flags_only)
  # leak such descriptors until the process exits. Then everything else, remounts off.
  write_pjd_config "$WORK/pjdfstest-erofs.toml" true
  write_pjd_config "$WORK/pjdfstest.toml" false
  # The mount's type is plain "fuse", for which mount(8) runs the /sbin/mount.fuse helper, which
  # cannot remount a twinfs mount: give pjdfstest a `mount` that does the remount itself (-i).
  # $WORK/secondary: a directory on another filesystem, for the EXDEV tests.
  mkdir -p "$WORK/bin" "$WORK/secondary"
  printf '#!/bin/sh\nexec %s -i "$@"\n' "$(command -v mount)" >"$WORK/bin/mount"
  chmod 0755 "$WORK/bin/mount" "$WORK/secondary"
  echo "==> pjdfstest on $MNT0"
  start=$(date +%s)
  pjd_rc=0
  (cd "$MNT0" && PATH="$WORK/bin:$PATH" timeout --kill-after=30 "$PJDFSTEST_TIMEOUT" \
     pjdfstest -c "$WORK/pjdfstest-erofs.toml" -p "$MNT0" -s "$WORK/secondary" erofs) \
     >"$WORK/pjdfstest-erofs.log" 2>&1 || pjd_rc=$?
  # shellcheck disable=SC2086
  (cd "$MNT0" && timeout --kill-after=30 "$PJDFSTEST_TIMEOUT" \
     pjdfstest -c "$WORK/pjdfstest.toml" -p "$MNT0" -s "$WORK/secondary" ${PJDFSTEST_PATTERNS:-}) \
     >"$WORK/pjdfstest.log" 2>&1 || pjd_rc=$?
  pjd_secs=$(( $(date +%s) - start ))
  # Result lines: "<name> <padding> ok|FAILED|skipped"; a failure's message follows, tab-indented.
  # A test counts as run if either pass ran it (the second skips the EROFS ones).
  sed 's/\x1b\[[0-9;]*m//g' "$WORK/pjdfstest-erofs.log" "$WORK/pjdfstest.log" >"$WORK/pjdfstest.txt"
  if [ -n "${PJDFSTEST_PATTERNS:-}" ]; then
    # Only the EROFS tests the patterns select count.
    awk '$NF=="ok"||$NF=="FAILED"||$NF=="skipped"{print $1}' \
      <(sed 's/\x1b\[[0-9;]*m//g' "$WORK/pjdfstest.log") | sort -u >"$WORK/selected"
  fi
  awk '$NF=="ok"{print $1}'      "$WORK/pjdfstest.txt" | sort -u >"$WORK/passed"
  awk '$NF=="FAILED"{print $1}'  "$WORK/pjdfstest.txt" | sort -u >"$WORK/failed"
  awk '$NF=="skipped"{print $1}' "$WORK/pjdfstest.txt" | sort -u \
    | comm -23 - "$WORK/passed" | comm -23 - "$WORK/failed" >"$WORK/skipped"
  if [ -n "${PJDFSTEST_PATTERNS:-}" ]; then
    for f in passed failed skipped; do
      comm -12 "$WORK/$f" "$WORK/selected" >"$WORK/$f.sel" && mv "$WORK/$f.sel" "$WORK/$f"
    done
  fi
  sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$EXCLUSIONS" | sort -u >"$WORK/excluded"
  comm -23 "$WORK/failed" "$WORK/excluded" >"$WORK/unexpected"
  comm -12 "$WORK/passed" "$WORK/excluded" >"$WORK/now-passing"
  n_pass=$(wc -l <"$WORK/passed"); n_fail=$(wc -l <"$WORK/failed")
  n_skip=$(wc -l <"$WORK/skipped"); n_unexp=$(wc -l <"$WORK/unexpected")
  if [ "$(grep -c '^Summary:' "$WORK/pjdfstest.txt")" -ne 2 ]; then
    echo "pjdfstest did not finish (exit $pjd_rc after ${pjd_secs}s); last lines:" >&2
    tail -n 20 "$WORK/pjdfstest.txt" >&2
    status=1
    pjd_summary="pjdfstest: did not finish (exit $pjd_rc): $n_pass passed, $n_fail failed so far"
  else
    if [ "$n_unexp" -gt 0 ]; then
      echo "pjdfstest: unexpected failures (not in tests/pjdfstest-exclusions.txt):"
      while read -r t; do
        echo "  $t"
        # The failure message: the tab-indented lines right after the FAILED line.
        awk -v t="$t" 'f && /^\t/{print "      " $0; next} {f=0} $1==t && $NF=="FAILED"{f=1}' \
          "$WORK/pjdfstest.txt" | head -n 6
      done <"$WORK/unexpected"
      status=1
    fi
    if [ -s "$WORK/now-passing" ]; then
      echo "pjdfstest: note: excluded tests that now pass (remove them from the exclusions file):"
      sed 's/^/  /' "$WORK/now-passing"
    fi
    if [ "$n_unexp" -eq 0 ]; then
      pjd_summary="pjdfstest: $n_pass passed, $n_fail failed (all $n_fail excluded), $n_skip skipped, ${pjd_secs}s"
    else
      pjd_summary="pjdfstest: $n_pass passed, $n_fail failed ($n_unexp not excluded), $n_skip skipped, ${pjd_secs}s"
    fi
  fi
  echo "$pjd_summary"
fi

# ----- fsx ------------------------------------------------------------------------------------
# run_fsx NAME OPS FLEN OPSIZE_MAX: fsx with every operation it has except punch_hole (twinfs has
# no FALLOC_FL_PUNCH_HOLE, and fsx aborts on EOPNOTSUPP): pread/pwrite, mmap reads and writes with
# msync, truncates, close/reopen, msync(MS_INVALIDATE), fsync, fdatasync, posix_fallocate,
# sendfile, posix_fadvise, copy_file_range. Then the file must read the same through mount 1.
run_fsx() {
  local name=$1 ops=$2 flen=$3 opmax=$4
  cat >"$WORK/$name.toml" <<EOF
flen = $flen
[opsize]
max = $opmax
[weights]
close_open = 2
read = 10
write = 10
mapread = 10
mapwrite = 10
invalidate = 1
truncate = 4
fsync = 1
fdatasync = 1
posix_fallocate = 1
sendfile = 2
posix_fadvise = 1
copy_file_range = 2
EOF
  echo "==> $name: $ops operations, seed $FSX_SEED, file up to $flen bytes, on $MNT0/$name.dat"
  mkdir -p "$WORK/$name-artifacts"
  local start rc secs
  start=$(date +%s)
  timeout --kill-after=30 "$FSX_TIMEOUT" \
    fsx -N "$ops" -S "$FSX_SEED" -f "$WORK/$name.toml" -P "$WORK/$name-artifacts" "$MNT0/$name.dat" \
    >"$WORK/$name.log" 2>&1 && rc=0 || rc=$?
  secs=$(( $(date +%s) - start ))
  if [ $rc -eq 0 ] && grep -q "All operations completed A-OK" "$WORK/$name.log"; then
    # The other mount (another process, as on another node) must read the same bytes.
    if cmp -s "$MNT0/$name.dat" "$MNT1/$name.dat"; then
      fsx_summary+="$name: $ops operations (seed $FSX_SEED) clean in ${secs}s, mount-1 reads the same $(stat -c %s "$MNT0/$name.dat") bytes"$'\n'
    else
      cmp "$MNT0/$name.dat" "$MNT1/$name.dat" || true
      fsx_summary+="$name: $ops operations (seed $FSX_SEED) clean in ${secs}s, but mount-1 reads different content"$'\n'
      status=1
    fi
  else
    echo "$name FAILED (exit $rc after ${secs}s); end of its log:" >&2
    tail -n 60 "$WORK/$name.log" >&2
    fsx_summary+="$name: FAILED (exit $rc, seed $FSX_SEED), see $WORK/$name.log and $WORK/$name-artifacts"$'\n'
    status=1
  fi
}

if [ -z "${SKIP_FSX:-}" ]; then
  fsx_summary=""
  # The classic fsx shape (256 KiB file, operations up to 64 KiB), inside one chunk.
  run_fsx fsx "$FSX_OPS" 262144 65536
  # A 10 MiB file across 4 MiB chunk boundaries: fewer operations, as each flush rewrites whole
  # chunks. FSX_CHUNK_OPS=0 skips it.
  if [ "$FSX_CHUNK_OPS" -gt 0 ]; then
    run_fsx fsx-chunks "$FSX_CHUNK_OPS" 10485760 262144
  fi
  fsx_summary=${fsx_summary%$'\n'}
  echo "$fsx_summary"
fi

echo
echo "$pjd_summary"
echo "$fsx_summary"
# One closing line in the plain "N passed, N failed" form: pjdfstest cases plus fsx runs.
fsx_runs=$(printf '%s\n' "$fsx_summary" | grep -c 'operations\|FAILED' || true)
fsx_good=$(printf '%s\n' "$fsx_summary" | grep -c 'reads the same' || true)
echo "conformance: $(( ${n_pass:-0} + fsx_good )) passed, $(( ${n_unexp:-0} + fsx_runs - fsx_good )) failed"
exit $status
