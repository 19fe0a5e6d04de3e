#!/usr/bin/env python3
"""Failover benchmark: one node killed under an upload workload.

A 3-node dev cluster (release build) with two mounts of one volume (2 copies per block). The
volume is filled with FILL_MB of data (so the killed node held about FILL_MB*2/3 MiB of copies),
then a writer keeps writing upload-like files (20-400 KiB, checksummed) through mount A while a
reader reads and verifies them through mount B. After BASELINE_S seconds one node is killed with
-9. The run measures:

  - the longest single write and read call (open/write/close, open/read/close) before and after
    the kill: the stall an application sees;
  - application errors and mismatches (must be 0);
  - the time from the kill until the node counts as dead, and the repair: from the end of the
    grace period until `twinfs fsck --quick` reports every block with 2 copies, with the bytes
    re-created (from `twinfs status --json`) and so the repair rate in MiB/s;
  - the workload's write throughput before the kill and while the repair runs (the foreground
    share the rate limit leaves).

Usage: sudo python3 bench/failover_bench.py   (root: FUSE mounts)
Environment: FILL_MB=1536 BASELINE_S=10 GRACE_S=10 REPAIR_RATE=64 TIMEOUT_S=300
             OUT=bench/failover_results.md TWINFS=target/release/twinfs
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

FILL_MB = int(os.environ.get("FILL_MB", "1536"))
BASELINE_S = float(os.environ.get("BASELINE_S", "10"))
GRACE_S = int(os.environ.get("GRACE_S", "10"))
REPAIR_RATE = os.environ.get("REPAIR_RATE", "64")
TIMEOUT_S = float(os.environ.get("TIMEOUT_S", "300"))
OUT = os.environ.get("OUT", "bench/failover_results.md")
TWINFS = os.path.abspath(os.environ.get("TWINFS", "target/release/twinfs"))


def twinfs(work, *args, check=True):
    r = subprocess.run([TWINFS, "--cluster", f"{work}/cluster.json", *args],
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"twinfs {' '.join(args)} failed: {r.stderr}")
    return r


class Workload:
    def __init__(self, mnt_a, mnt_b):
        self.a, self.b = mnt_a, mnt_b
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done = []          # (name, sha256) written and closed
        self.errors = []
        self.writes = []        # (t_end, seconds, bytes)
        self.reads = []         # (t_end, seconds)
        self.mismatches = 0
        self.rng = random.Random(20261125)

    def writer(self):
        i = 0
        while not self.stop.is_set():
            size = self.rng.randint(20 << 10, 400 << 10)
            data = os.urandom(size)
            name = f"up-{i:06d}.jpg"
            t0 = time.monotonic()
            try:
                with open(os.path.join(self.a, name + ".tmp"), "wb") as f:
                    f.write(data)
                os.rename(os.path.join(self.a, name + ".tmp"), os.path.join(self.a, name))
            except OSError as e:
                self.errors.append(f"write {name}: {e}")
                continue
            t1 = time.monotonic()
            with self.lock:
                self.writes.append((t1, t1 - t0, size))
                self.done.append((name, hashlib.sha256(data).hexdigest()))
            i += 1

    def reader(self):
        checked = 0
        while not self.stop.is_set():
            with self.lock:
                todo = self.done[checked:checked + 1]
            if not todo:
                time.sleep(0.01)
                continue
            name, digest = todo[0]
            t0 = time.monotonic()
            got = None
            for _ in range(100):  # renames reach the other mount within about a second
                try:
                    with open(os.path.join(self.b, name), "rb") as f:
                        got = f.read()
                    break
                except FileNotFoundError:
                    time.sleep(0.02)
                except OSError as e:
                    self.errors.append(f"read {name}: {e}")
                    break
            t1 = time.monotonic()
            if got is None:
                self.errors.append(f"read {name}: never appeared")
            elif hashlib.sha256(got).hexdigest() != digest:
                self.mismatches += 1
            self.reads.append((t1, t1 - t0))
            checked += 1


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def main():
    if os.geteuid() != 0:
        sys.exit("failover_bench.py needs root (FUSE mounts)")
    if not os.path.exists(TWINFS):
        subprocess.run(["cargo", "build", "--release", "--bin", "twinfs"], check=True)
    work = tempfile.mkdtemp(prefix="twinfs-failover-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    up = subprocess.run([TWINFS, "dev-cluster", "up", "--dir", work, "--nodes", "3",
                         "--lease-ttl", "5", "--mounts", "2",
                         f"--node-arg=--repair-grace={GRACE_S}s",
                         f"--node-arg=--repair-interval=2s",
                         f"--node-arg=--repair-rate={REPAIR_RATE}"],
                        capture_output=True, text=True)
    if up.returncode != 0:
        sys.exit(f"dev-cluster up failed: {up.stderr}")
    try:
        run(work)
    finally:
        subprocess.run([TWINFS, "dev-cluster", "down", "--dir", work], capture_output=True)


def run(work):
    cluster = json.load(open(f"{work}/cluster.json"))
    mnt_a, mnt_b = (m["path"] for m in cluster["mounts"][:2])
    # Fill: large files, so the killed node holds about FILL_MB*2/3 MiB of copies.
    t0 = time.monotonic()
    os.makedirs(f"{mnt_a}/fill", exist_ok=True)
    for i in range(0, FILL_MB, 64):
        with open(f"{mnt_a}/fill/f{i:05d}", "wb") as f:
            f.write(os.urandom(64 << 20))
    fill_s = time.monotonic() - t0

    w = Workload(mnt_a, mnt_b)
    threads = [threading.Thread(target=w.writer), threading.Thread(target=w.reader)]
    for t in threads:
        t.start()
    time.sleep(BASELINE_S)
    status = json.loads(twinfs(work, "status", "--json").stdout)
    victim = max(status["nodes"], key=lambda n: n["blocks"])
    victim_bytes = victim["bytes_used"]
    node = next(n for n in cluster["nodes"] if n["id"] == victim["id"])
    t_kill = time.monotonic()
    os.kill(node["pid"], signal.SIGKILL)

    t_dead = t_grace_end = t_repaired = None
    repaired_bytes = 0
    while time.monotonic() - t_kill < TIMEOUT_S:
        s = json.loads(twinfs(work, "status", "--json").stdout)
        state = next((n["state"] for n in s["nodes"] if n["id"] == victim["id"]), "?")
        if t_dead is None and state != "alive":
            t_dead = time.monotonic()
            t_grace_end = t_dead + GRACE_S
        repaired_bytes = s["repair"]["repaired_bytes"]
        if t_grace_end and time.monotonic() > t_grace_end:
            under = sum(v["under_replicated"] + v["lost"] for v in s["volumes"].values())
            if under == 0 and twinfs(work, "fsck", "uploads", "--quick", check=False).returncode == 0:
                t_repaired = time.monotonic()
                break
        time.sleep(0.5)
    time.sleep(2)
    w.stop.set()
    for t in threads:
        t.join()
    s = json.loads(twinfs(work, "status", "--json").stdout)
    repaired_bytes = s["repair"]["repaired_bytes"]

    def window(xs, a, b):
        return [x for x in xs if a <= x[0] < b]

    before_w = window(w.writes, t_kill - BASELINE_S, t_kill)
    after_w = window(w.writes, t_kill, 1e18)
    before_r = window(w.reads, t_kill - BASELINE_S, t_kill)
    after_r = window(w.reads, t_kill, 1e18)
    repair_s = (t_repaired - t_grace_end) if t_repaired and t_grace_end else None
    during = window(w.writes, t_grace_end or 0, t_repaired or 0)
    mib = lambda xs, secs: sum(x[2] for x in xs) / (1 << 20) / secs if secs else 0.0
    fg_before = mib(before_w, BASELINE_S)
    fg_during = mib(during, repair_s) if repair_s else 0.0
    uname = os.uname()
    lines = [
        "# Failover benchmark: one node killed under an upload workload",
        "",
        f"Machine: {os.cpu_count()} vCPU, {uname.sysname} {uname.release}; 3-node dev cluster on "
        f"loopback, one disk; release build. Fill {FILL_MB} MiB written in {fill_s:.1f} s; "
        f"grace {GRACE_S} s, repair rate limit {REPAIR_RATE} MiB/s, lease TTL 5 s.",
        "",
        "| measure | before the kill | after the kill |",
        "|---|---|---|",
        f"| files written / read+verified | {len(before_w)} / {len(before_r)} | {len(after_w)} / {len(after_r)} |",
        f"| longest write (open+write+close+rename) | {max((x[1] for x in before_w), default=0)*1000:.0f} ms | {max((x[1] for x in after_w), default=0)*1000:.0f} ms |",
        f"| median write | {median([x[1] for x in before_w])*1000:.1f} ms | {median([x[1] for x in after_w])*1000:.1f} ms |",
        f"| longest read (open+read+close) | {max((x[1] for x in before_r), default=0)*1000:.0f} ms | {max((x[1] for x in after_r), default=0)*1000:.0f} ms |",
        f"| median read | {median([x[1] for x in before_r])*1000:.1f} ms | {median([x[1] for x in after_r])*1000:.1f} ms |",
        f"| workload write throughput | {fg_before:.1f} MiB/s | {fg_during:.1f} MiB/s during repair ({fg_during / fg_before if fg_before else 0:.2f}x) |",
        "",
        f"- application errors: {len(w.errors)}; mismatches: {w.mismatches}",
        f"- killed node held {victim_bytes / (1 << 20):.0f} MiB of copies; counted dead "
        f"{(t_dead - t_kill) if t_dead else float('nan'):.1f} s after the kill",
        f"- repair: {repaired_bytes / (1 << 20):.0f} MiB re-created in "
        f"{repair_s if repair_s is not None else float('nan'):.1f} s after the grace period "
        f"({repaired_bytes / (1 << 20) / repair_s if repair_s else 0:.1f} MiB/s); "
        f"full redundancy (fsck) {'reached' if t_repaired else 'NOT reached within the timeout'}",
    ]
    if w.errors:
        lines.append("- first errors: " + "; ".join(w.errors[:5]))
    text = "\n".join(lines) + "\n"
    print(text)
    with open(OUT, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
