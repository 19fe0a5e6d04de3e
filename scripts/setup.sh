#!/usr/bin/env bash
# Installs what twinfs needs on Debian 12 and builds it. Safe to run again.
#   etcd-server       the namespace store (dev-cluster starts one)
#   protobuf-compiler protoc, needed to build the etcd client
#   fuse3             fusermount3 and /etc/fuse.conf for FUSE mounts
#   fio, bindfs       benchmarks (bench/)
#   wordpress         the source tree (/usr/share/wordpress) that bench/fs_bench.sh copies (W3);
#                     pulls in apache2, php and mariadb-client (apache2 starts where systemd runs)
#   libacl1-dev       needed to build pjdfstest (conformance tests, scripts/conformance.sh)
#   python3-venv      a venv for the deploy/ validators from PyPI (kubernetes-validate, hadolint)
#   kubernetes-client kubectl, for `kubectl kustomize` of deploy/kubernetes (no cluster needed);
#                     skipped when a kubectl is already there (another package may own the path)
# and, with cargo, the conformance tools at pinned versions: pjdfstest (POSIX conformance) and
# fsx (file-data exerciser). Each is skipped when already installed at that version. Then the
# pinned PyPI tools of scripts/validate-deploy.sh, in its venv (skipped when there).
# Usage: scripts/setup.sh [--no-build]   (--no-build: install packages only, as CI does)
set -euo pipefail
cd "$(dirname "$0")/.."
build=1; [ "${1:-}" = "--no-build" ] && build=0

need=()
for pkg in etcd-server etcd-client protobuf-compiler fuse3 fio bindfs wordpress pkg-config libacl1-dev \
           python3-venv; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
command -v kubectl >/dev/null || need+=(kubernetes-client)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "==> installing Debian packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian package starts a system etcd on 2379; twinfs does not use it (dev-cluster runs its
# own on free ports), so leave it alone.

if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# Conformance tools (scripts/conformance.sh), pinned. `cargo install` puts them in ~/.cargo/bin.
PJDFSTEST_VERSION=0.2.2
FSX_VERSION=0.3.2
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
install_tool() { # crate version
  if "$1" --version 2>/dev/null | grep -qx "$1 $2"; then return 0; fi
  echo "==> cargo install $1 $2"
  cargo install --locked --quiet --version "$2" "$1"
}
install_tool pjdfstest "$PJDFSTEST_VERSION"
install_tool fsx "$FSX_VERSION"

# Validators of deploy/ (scripts/validate-deploy.sh): kubernetes-validate and hadolint, pinned.
bash scripts/validate-deploy.sh --tools-only

[ $build -eq 1 ] || exit 0
echo "==> building twinfs (release)"
cargo build --release --bin twinfs
echo "==> built $(pwd)/target/release/twinfs"
