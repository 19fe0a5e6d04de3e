#!/usr/bin/env python3
"""Filesystem workloads for bench/fs_bench.sh (standard library only; needs root for drop_caches).

  fs_bench.py run --system NAME:WRITE_DIR:READ_DIR ... --json FILE
      runs every workload on every system (W1-W5 RUNS times, systems interleaved; W6/W7 once, as
      TRIES tries each), each step in its own process under a time limit, and writes the results
      as JSON. The report gives medians over the runs and every run's figure in the notes.
  fs_bench.py report --json FILE [--log FILE ...]
      turns the JSON into the markdown table (stdout).
  fs_bench.py step NAME WRITE_DIR READ_DIR [RUN]
      one workload on one system; prints one JSON line (what `run` calls).

Sizes come from the environment: SIZE_MB RUNS FILES EMPTY PROCS TRIES LAT_KB WP_SRC
POLL_TIMEOUT STEP_TIMEOUT SEED (defaults below). All times are time.monotonic().
"""

import argparse
import datetime
import hashlib
import json
import multiprocessing as mp
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time


def env_int(name, default):
    return int(os.environ.get(name, default))


P = {
    "SIZE_MB": env_int("SIZE_MB", 1024),
    "RUNS": env_int("RUNS", 3),
    "FILES": env_int("FILES", 2000),
    "EMPTY": env_int("EMPTY", 10000),
    "PROCS": env_int("PROCS", 8),
    "TRIES": env_int("TRIES", 20),
    "LAT_KB": env_int("LAT_KB", 64),
    "POLL_TIMEOUT": float(os.environ.get("POLL_TIMEOUT", 10)),
    "STEP_TIMEOUT": env_int("STEP_TIMEOUT", 1800),
    "SEED": env_int("SEED", 20261125),
    "WP_SRC": os.environ.get("WP_SRC", "/usr/share/wordpress"),
}
MiB = 1 << 20
now = time.monotonic


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def drop_caches():
    """Writes dirty pages back, then drops the page, dentry and inode caches (whole machine)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def wait_for(pred, what, timeout=None):
    """Untimed: waits (bounded) until pred() is true, e.g. until the read mount sees a directory."""
    deadline = now() + (timeout or P["POLL_TIMEOUT"])
    while True:
        try:
            if pred():
                return
        except OSError:
            pass
        if now() > deadline:
            raise RuntimeError(f"timed out after {timeout or P['POLL_TIMEOUT']} s waiting for {what}")
        time.sleep(0.005)


def fresh_dir(a, b, name):
    """NAME created (empty) under the write dir; returns (write path, read path) once the read side sees it."""
    wa, wb = os.path.join(a, name), os.path.join(b, name)
    if os.path.exists(wa):
        shutil.rmtree(wa)
    os.makedirs(wa)
    wait_for(lambda: os.path.isdir(wb), f"{wb} to appear")
    return wa, wb


# ---------------------------------------------------------------- W1/W2: fio sequential

def fio(args, timeout):
    t0 = now()
    r = subprocess.run(["fio", "--output-format=json"] + args, capture_output=True, text=True, timeout=timeout)
    el = now() - t0
    if r.returncode != 0:
        raise RuntimeError(f"fio failed ({r.returncode}): {r.stderr.strip()[-500:]} {r.stdout.strip()[-300:]}")
    out = r.stdout[r.stdout.find("{"):]  # fio may print warnings before the JSON
    return el, json.loads(out)


def step_w12(a, b, run):
    size = P["SIZE_MB"] * MiB
    wa, wb = os.path.join(a, "w1"), os.path.join(b, "w1")
    os.makedirs(wa, exist_ok=True)
    wait_for(lambda: os.path.isdir(wb), f"{wb} to appear")
    fa, fb = os.path.join(wa, f"seq-{run}.dat"), os.path.join(wb, f"seq-{run}.dat")
    common = ["--bs=1M", f"--size={P['SIZE_MB']}M", "--numjobs=1", "--ioengine=psync", "--direct=0"]
    drop_caches()
    # A seed per run: fio's buffers are otherwise the same bytes every run, which twinfs (blocks
    # stored by their hash) would find on its nodes already.
    el_w, jw = fio(["--name=w1", f"--filename={fa}", "--rw=write", "--end_fsync=1", "--fallocate=none",
                    f"--randseed={P['SEED'] + run}"] + common,
                   P["STEP_TIMEOUT"])
    wrote = jw["jobs"][0]["write"]["io_bytes"]
    if wrote != size:
        raise RuntimeError(f"fio wrote {wrote} bytes, expected {size}")
    wait_for(lambda: os.stat(fb).st_size == size, f"{fb} to have {size} bytes on the read side")
    drop_caches()
    t0 = now()
    r = subprocess.run(["dd", f"if={fb}", "of=/dev/null", "bs=1M"], capture_output=True, text=True,
                       timeout=P["STEP_TIMEOUT"])
    el_r = now() - t0
    m = re.search(r"^(\d+) bytes", r.stderr, re.M)
    if r.returncode != 0 or not m or int(m.group(1)) != size:
        raise RuntimeError(f"dd through the read mount failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    os.unlink(fa)
    # W1 is fio's own figure: bytes over the job's runtime, which includes the end_fsync (checked:
    # end_fsync=1 lengthens it) but not fio's ~0.4 s start-up; w1_wall is timed around the command.
    return {"w1": jw["jobs"][0]["write"]["bw_bytes"] / MiB, "w1_wall": size / MiB / el_w,
            "w2": size / MiB / el_r}


# ---------------------------------------------------------------- W3: WordPress tree

def manifest(root):
    """{relative path: sha256} of every file under root (following symlinks), plus the set of dirs."""
    files, dirs = {}, set()
    for d, dn, fn in os.walk(root, followlinks=True):
        rel = os.path.relpath(d, root)
        dirs.add(rel)
        for f in fn:
            p = os.path.join(d, f)
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            files[os.path.normpath(os.path.join(rel, f))] = h.hexdigest()
    return files, dirs


def twinfs(*args, timeout=120):
    """Runs the bench's twinfs binary against the bench's dev cluster; its stdout."""
    cluster = os.path.join(os.environ["BENCH_DIR"], "cluster", "cluster.json")
    r = subprocess.run([os.environ["TWINFS_BIN"], "--cluster", cluster, *args], capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"twinfs {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


def twinfs_first_run_again(b):
    """Makes a repeated W3 run a first run again on twinfs. twinfs stores blocks by their hash
    and keeps a deleted file's blocks until GC (an hour's grace), and a mount caches the blocks it
    read, so copying the same tree again would put blocks the nodes hold (no durable write) and
    read blocks the reader has. The previous tree is already deleted (fresh_dir; its rmdirs
    return only once its unlinks committed); its blocks are collected at once (no grace:
    nothing else writes during the bench), and the reading mount is started again (its block
    cache lives in its memory), before the copy, as in the first run."""
    twinfs("gc", "--apply", "--grace", "0s", timeout=P["STEP_TIMEOUT"])
    root = os.path.dirname(b)
    twinfs("umount", root)
    twinfs("mount", "uploads", root)


def step_w3(a, b, run):
    src = P["WP_SRC"]
    wa, wb = fresh_dir(a, b, "w3")
    if os.environ.get("BENCH_SYSTEM") == "twinfs" and run > 1:
        twinfs_first_run_again(b)
        wait_for(lambda: os.path.isdir(wb), f"{wb} to appear through the restarted reading mount")
    da, db = os.path.join(wa, "wp"), os.path.join(wb, "wp")
    drop_caches()
    t0 = now()
    r = subprocess.run(["cp", "-rL", src, da], capture_output=True, text=True, timeout=P["STEP_TIMEOUT"])
    copy_s = now() - t0
    if r.returncode != 0:
        raise RuntimeError(f"cp -rL failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    wait_for(lambda: os.path.isdir(db), f"{db} to appear")
    drop_caches()
    t0 = now()
    r = subprocess.run(["bash", "-c", "set -o pipefail; tar cf - . | wc -c"], cwd=db, capture_output=True,
                       text=True, timeout=P["STEP_TIMEOUT"])
    tar_s = now() - t0
    if r.returncode != 0:
        raise RuntimeError(f"tar through the read mount failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    # Untimed check: the tree seen through the read mount equals the source.
    ms, ds = manifest(src)
    mb, dsb = manifest(db)
    bad = sorted(k for k in set(ms) | set(mb) if ms.get(k) != mb.get(k))
    return {"copy_s": copy_s, "tar_s": tar_s, "tar_bytes": int(r.stdout.split()[0]),
            "files": len(ms), "dirs": len(ds), "bytes": sum(os.path.getsize(os.path.join(src, k)) for k in ms),
            "mismatch": len(bad) + len(ds ^ dsb), "mismatch_examples": bad[:5],
            # Every run copies onto nodes without the tree's blocks and reads through a mount
            # without them cached (twinfs_first_run_again), like the first.
            "cold": True}


# ---------------------------------------------------------------- W4: upload-like files

def step_w4(a, b, run):
    # New content every run: twinfs stores blocks by their hash, so a run that wrote the same
    # bytes again would find them on the nodes already (and in the reader's block cache).
    rng = random.Random(P["SEED"] + run)
    wa, wb = fresh_dir(a, b, "w4")
    months = [f"2026/{m:02d}" for m in range(1, 13)]
    for m in months:
        os.makedirs(os.path.join(wa, m))
    files = []  # (relative path, content, sha256); generated before timing
    for i in range(P["FILES"]):
        size = rng.randint(20 * 1024, 400 * 1024)
        data = rng.randbytes(size)
        files.append((f"{months[i % 12]}/upload-{i:05d}.jpg", data, hashlib.sha256(data).hexdigest()))
    total = sum(len(f[1]) for f in files)
    t0 = now()
    for rel, data, _ in files:
        with open(os.path.join(wa, rel), "xb") as f:  # create, write, close
            f.write(data)
    write_s = now() - t0
    expect = [(rel, h) for rel, _, h in files]
    del files
    wait_for(lambda: all(os.path.isdir(os.path.join(wb, m)) for m in months), "the month dirs on the read side")
    drop_caches()
    bad, errors = [], []
    t0 = now()
    for rel, h in expect:
        try:
            with open(os.path.join(wb, rel), "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
            if got != h:
                bad.append(rel)
        except OSError as e:
            bad.append(rel)
            errors.append(f"{rel}: {e}")
    verify_s = now() - t0
    return {"write_fps": len(expect) / write_s, "verify_fps": len(expect) / verify_s, "mismatch": len(bad),
            "mib": total / MiB, "write_mibs": total / MiB / write_s, "verify_mibs": total / MiB / verify_s,
            "mismatch_examples": bad[:5], "errors": errors[:5]}


# ---------------------------------------------------------------- W5: empty files in one directory

def _create_part(d, names, barrier, q):
    try:
        barrier.wait()
        for n in names:
            os.close(os.open(os.path.join(d, n), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        q.put(None)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(f"{type(e).__name__}: {e}")


def step_w5(a, b, _run):
    n = P["EMPTY"]
    names = [f"empty-{i:06d}" for i in range(n)]
    wa, wb = fresh_dir(a, b, "w5")
    da, db = os.path.join(wa, "flat"), os.path.join(wb, "flat")
    os.makedirs(da)
    wait_for(lambda: os.path.isdir(db), f"{db} to appear")
    t0 = now()
    for nm in names:
        os.close(os.open(os.path.join(da, nm), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    create_s = now() - t0
    missing, t0 = 0, now()
    for nm in names:
        try:
            os.stat(os.path.join(db, nm))
        except FileNotFoundError:
            missing += 1
    stat_s = now() - t0
    t0 = now()
    for nm in names:
        os.unlink(os.path.join(da, nm))
    unlink_s = now() - t0
    # Untimed check: the read side sees the directory empty again (bounded).
    left = None
    try:
        wait_for(lambda: not os.listdir(db), f"{db} to be empty on the read side")
    except RuntimeError:
        left = len(os.listdir(db))

    procs = P["PROCS"]
    ctx = mp.get_context("fork")

    def parallel(dirs_for):
        """PROCS processes creating names[k::PROCS] in dirs_for(k); returns ops/s."""
        targets = [dirs_for(k) for k in range(procs)]
        for d in targets:
            os.makedirs(d, exist_ok=True)
        barrier, q = ctx.Barrier(procs + 1), ctx.Queue()
        ps = [ctx.Process(target=_create_part, args=(targets[k], names[k::procs], barrier, q))
              for k in range(procs)]
        for p in ps:
            p.start()
        barrier.wait(timeout=60)
        t0 = now()
        errs = [q.get(timeout=P["STEP_TIMEOUT"]) for _ in ps]
        secs = now() - t0
        for p in ps:
            p.join()
        errs = [e for e in errs if e]
        if errs:
            raise RuntimeError(f"parallel create: {errs[:3]}")
        return n / secs

    # All processes in one directory of one mount.
    pa = os.path.join(wa, "par")
    par_create = parallel(lambda k: pa)
    got = len(os.listdir(pa))
    if got != n:
        raise RuntimeError(f"parallel create: {got} entries listed, expected {n}")

    # Each process its own directory (one kernel serialises creates within a directory), and
    # one directory shared by processes on both mounts (as pods on two nodes uploading into
    # the same month's folder).
    par_dirs = parallel(lambda k: os.path.join(wa, "pardirs", f"d{k}"))
    os.makedirs(os.path.join(wa, "parmounts"))
    wait_for(lambda: os.path.isdir(os.path.join(wb, "parmounts")), "parmounts on the read side")
    par_mounts = parallel(lambda k: os.path.join(wa if k % 2 == 0 else wb, "parmounts"))
    return {"create": n / create_s, "stat": n / stat_s, "unlink": n / unlink_s, "stat_missing": missing,
            "left_on_read_side": left, "par_create": par_create, "procs": procs,
            "par_create_dirs": par_dirs, "par_create_mounts": par_mounts}


# ---------------------------------------------------------------- W6/W7: cross-mount visibility

def _poller(conn):
    """Polls a path tightly (open, read all, compare) until it holds the expected bytes."""
    while True:
        msg = conn.recv()
        if msg is None:
            return
        path, want, old, timeout = msg
        polls = errors = other = stale = 0
        last_err = None
        conn.send("ready")
        deadline = now() + timeout
        seen = None
        while True:
            try:
                with open(path, "rb") as f:
                    data = f.read()
                polls += 1
                if data == want:
                    seen = now()
                    break
                if old is not None and data == old:
                    stale += 1
                else:
                    other += 1  # new file not complete yet, or a torn mix of old and new
            except FileNotFoundError:
                polls += 1
            except OSError as e:
                errors += 1
                last_err = str(e)
            if now() > deadline:
                break
        conn.send({"seen": seen, "polls": polls, "errors": errors, "last_error": last_err,
                   "stale": stale, "other": other})


def visibility(a, b, name, existing):
    rng = random.Random(P["SEED"] + (7 if existing else 6))
    size = P["LAT_KB"] * 1024
    wa, wb = fresh_dir(a, b, name)
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_poller, args=(child,), daemon=True)
    proc.start()
    lat, res = [], []
    try:
        def watch(path, want, old):
            parent.send((path, want, old, P["POLL_TIMEOUT"]))
            if parent.recv() != "ready":
                raise RuntimeError("poller out of step")

        def write(path, data, create):
            fd = os.open(path, (os.O_CREAT | os.O_EXCL if create else 0) | os.O_WRONLY, 0o644)
            try:
                os.pwrite(fd, data, 0)  # same size: an in-place overwrite, no truncation
            finally:
                os.close(fd)
            return now()

        old = None
        if existing:
            fa, fb = os.path.join(wa, "hot.dat"), os.path.join(wb, "hot.dat")
            old = rng.randbytes(size)
            watch(fb, old, None)
            write(fa, old, True)
            r = parent.recv()
            if r["seen"] is None:
                raise RuntimeError(f"the read side never saw the initial file: {r}")
            for _ in range(3):  # read it through the other mount: now in its caches
                with open(fb, "rb") as f:
                    if f.read() != old:
                        raise RuntimeError("the read side lost the initial content")
        for i in range(P["TRIES"]):
            time.sleep(rng.uniform(0.05, 0.25))  # not in step with any timer of the filesystem
            new = rng.randbytes(size)
            if not existing:
                fa, fb = os.path.join(wa, f"new-{i:03d}.dat"), os.path.join(wb, f"new-{i:03d}.dat")
            watch(fb, new, old)
            t_closed = write(fa, new, not existing)
            r = parent.recv()
            r["ms"] = None if r["seen"] is None else (r["seen"] - t_closed) * 1000
            res.append(r)
            if r["ms"] is not None:
                lat.append(max(0.0, r["ms"]))  # < 0: already visible when close returned
            old = new if existing else None
    finally:
        parent.send(None)
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    return {
        "median_ms": statistics.median(lat) if lat else None, "max_ms": max(lat) if lat else None,
        "timeouts": sum(1 for r in res if r["ms"] is None), "tries": len(res),
        "before_close": sum(1 for r in res if r["ms"] is not None and r["ms"] < 0),
        "errors": sum(r["errors"] for r in res), "last_error": next((r["last_error"] for r in res if r["last_error"]), None),
        "stale_reads": sum(r["stale"] for r in res), "other_reads": sum(r["other"] for r in res),
        "all_ms": [None if r["ms"] is None else round(r["ms"], 3) for r in res],
    }


def step_w6(a, b, _run):
    return visibility(a, b, "w6", existing=False)


def step_w7(a, b, _run):
    return visibility(a, b, "w7", existing=True)


STEPS = {"w12": step_w12, "w3": step_w3, "w4": step_w4, "w5": step_w5, "w6": step_w6, "w7": step_w7}


# ---------------------------------------------------------------- driver

def run_step(name, system, a, b, run):
    """One step in a child process, killed (SIGKILL reaches a process blocked in FUSE) past STEP_TIMEOUT."""
    t0 = now()
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "step", name, a, b, str(run)],
                           capture_output=True, text=True, timeout=P["STEP_TIMEOUT"],
                           env=dict(os.environ, BENCH_SYSTEM=system))
    except subprocess.TimeoutExpired:
        return {"error": f"step did not finish within STEP_TIMEOUT={P['STEP_TIMEOUT']} s (killed)"}, now() - t0
    if r.returncode != 0:
        tail = [l for l in r.stderr.strip().splitlines() if l.strip()][-1:] or [f"exit {r.returncode}"]
        return {"error": tail[0][:400], "stderr": r.stderr[-2000:]}, now() - t0
    return json.loads(r.stdout.strip().splitlines()[-1]), now() - t0


def cmd_run(args):
    systems = [s.split(":", 2) for s in args.system]
    for nm, a, _b in systems:
        os.makedirs(os.path.join(a, "fsbench"), exist_ok=True)
    systems = [(nm, os.path.join(a, "fsbench"), os.path.join(b, "fsbench")) for nm, a, b in systems]
    for nm, _a, b in systems:
        wait_for(lambda: os.path.isdir(b), f"{b} to appear")
    out = {"params": P, "systems": [s[0] for s in systems], "results": {s[0]: {} for s in systems}}

    def save():
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)

    for run in range(1, P["RUNS"] + 1):
        for nm, a, b in systems:
            r, el = run_step("w12", nm, a, b, run)
            out["results"][nm].setdefault("w12", []).append(r)
            log(f"[{nm}] W1/W2 run {run}: " + (f"error: {r['error']}" if "error" in r else
                f"write {r['w1']:.0f} MiB/s, read {r['w2']:.0f} MiB/s") + f" ({el:.0f} s)")
            save()
    # The machine is shared and noisy: W3-W5 run RUNS times like W1/W2 (systems interleaved, so
    # a slow spell hits every system) and are reported as medians. W6/W7 are TRIES tries each.
    for step in ["w3", "w4", "w5", "w6", "w7"]:
        runs = P["RUNS"] if step in ("w3", "w4", "w5") else 1
        for run in range(1, runs + 1):
            for nm, a, b in systems:
                r, el = run_step(step, nm, a, b, run)
                out["results"][nm].setdefault(step, []).append(r)
                short = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                         if k not in ("all_ms", "stderr", "mismatch_examples")}
                log(f"[{nm}] {step.upper()} run {run}: {json.dumps(short)} ({el:.0f} s)")
                save()
    save()


# ---------------------------------------------------------------- report

def fmt(v, unit=""):
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,}" + (f" {unit}" if unit else "")
    if v >= 100:
        s = f"{v:,.0f}"
    elif v >= 10:
        s = f"{v:.1f}"
    elif v >= 1:
        s = f"{v:.2f}"
    else:
        s = f"{v:.3f}"
    return s + (f" {unit}" if unit else "")


def machine():
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return "?"
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        info = f.read()
    m = re.search(r"model name\s*:\s*(.*)", info)
    if m:
        cpu = m.group(1).strip()
    vm = " (VM)" if re.search(r"^flags.*\bhypervisor\b", info, re.M) else ""
    with open("/proc/meminfo") as f:
        mem = int(re.search(r"MemTotal:\s*(\d+)", f.read()).group(1)) / (1 << 20)
    where = os.environ.get("BENCH_DIR", "/var/tmp")
    src, fstype = (sh(f"findmnt -no SOURCE,FSTYPE -T '{where}'").split() + ["?", "?"])[:2]
    size = sh(f"df -h --output=size '{where}' | tail -1")
    osname = sh(". /etc/os-release && echo $PRETTY_NAME")
    return (f"{len(os.sched_getaffinity(0))} cores ({cpu}{vm}), {mem:.0f} GiB RAM, disk {src} ({fstype}, {size}), kernel {platform.release()}, {osname}")


def cmd_report(args):
    with open(args.json) as f:
        data = json.load(f)
    p, R, systems = data["params"], data["results"], data["systems"]
    cols = ["twinfs", "bindfs", "local"]
    cols = [c for c in cols if c in systems] + [c for c in systems if c not in cols]
    refs = [c for c in cols if c != "twinfs"] if "twinfs" in cols else []
    notes = []

    def runs_of(sysname, step):
        """Every run of a step (older result files hold one run as a dict)."""
        r = R.get(sysname, {}).get(step)
        if r is None:
            return []
        return r if isinstance(r, list) else [r]

    def get(sysname, step, key):
        """Median over the runs that finished; mismatch counts are summed over all runs."""
        runs = runs_of(sysname, step)
        if not runs:
            return None
        ok = [r[key] for r in runs if "error" not in r and r.get(key) is not None]
        if not ok:
            return "error"
        if key == "mismatch":
            return sum(ok)
        return statistics.median(ok)

    def first_of(sysname, step, key):
        """W3 copies the same tree every run; twinfs stores blocks by their hash and keeps a
        deleted file's blocks for an hour (GC), and the reading mount caches blocks by hash, so
        only the first run writes and reads new blocks. Its figure is the one to compare."""
        r = first(sysname, step)
        if r is None:
            return "error" if runs_of(sysname, step) else None
        return r.get(key)

    def w3_figure(sysname, key):
        """The median of W3's runs when each was a first run (`cold`: blocks collected and the
        reader restarted in between); the first run's figure in older result files."""
        runs = [r for r in runs_of(sysname, "w3") if "error" not in r]
        if runs and all(r.get("cold") for r in runs):
            return statistics.median(r[key] for r in runs)
        return first_of(sysname, "w3", key)

    def first(sysname, step):
        """The first finished run of a step (W6/W7 have one; W3 only for the tree's size)."""
        return next((r for r in runs_of(sysname, step) if "error" not in r), None)

    def w12(sysname, key):
        runs = [r for r in R.get(sysname, {}).get("w12", []) if "error" not in r]
        if not runs:
            return "error" if R.get(sysname, {}).get("w12") else None
        return statistics.median(r[key] for r in runs)

    def lat(sysname, step, key):
        if not runs_of(sysname, step):
            return None
        r = first(sysname, step)
        if r is None:
            return "error"
        v = r.get(key)
        if r["timeouts"]:
            s = fmt(v, "ms") if v is not None else "—"
            return f"{s} ({r['timeouts']}/{r['tries']} timed out)" if key == "median_ms" else f"> {p['POLL_TIMEOUT']:.0f} s (timeout)"
        return v

    wp = next((first(s, "w3") for s in cols if first(s, "w3")), {})
    wp_desc = f"{wp.get('files', '?')} files, {wp.get('dirs', '?')} dirs, {fmt(wp.get('bytes', 0) / MiB)} MiB" if wp else "?"
    size = f"{p['SIZE_MB'] / 1024:g} GiB" if p["SIZE_MB"] >= 1024 else f"{p['SIZE_MB']} MiB"
    # Runs of W3-W5 (older result files: one).
    med = max((len(runs_of(s, "w4")) for s in cols), default=1)
    w3_runs = [r for r in runs_of("twinfs" if "twinfs" in cols else cols[0], "w3") if "error" not in r]
    w3_how = (f"median of {len(w3_runs)}, each a first run" if w3_runs and all(r.get("cold") for r in w3_runs)
              else "first run")
    # (label, unit, higher is better, function of system)
    rows = [
        (f"W1 sequential write {size} (fio bs=1M, end_fsync=1; fio's figure), median of {p['RUNS']}", "MiB/s", True, lambda s: w12(s, "w1")),
        (f"W2 sequential read of it through the other mount (dd bs=1M), caches dropped, median of {p['RUNS']}", "MiB/s", True, lambda s: w12(s, "w2")),
        (f"W3 `cp -rL` WordPress tree ({wp_desc}) into one mount, {w3_how}", "s", False, lambda s: w3_figure(s, "copy_s")),
        (f"W3 `tar cf - . \\| wc -c` of it through the other mount, caches dropped, {w3_how}", "s", False, lambda s: w3_figure(s, "tar_s")),
        (f"W4 write {p['FILES']:,} files of 20-400 KiB (create, write, close), median of {med}", "files/s", True, lambda s: get(s, "w4", "write_fps")),
        (f"W4 sha256-verify them through the other mount, caches dropped, median of {med}", "files/s", True, lambda s: get(s, "w4", "verify_fps")),
        ("W4 mismatches (missing or wrong content), all runs", "", None, lambda s: get(s, "w4", "mismatch")),
        (f"W5 create {p['EMPTY']:,} empty files in one directory, 1 process, median of {med}", "ops/s", True, lambda s: get(s, "w5", "create")),
        ("W5 stat them through the other mount", "ops/s", True, lambda s: get(s, "w5", "stat")),
        ("W5 unlink them", "ops/s", True, lambda s: get(s, "w5", "unlink")),
        (f"W5 create {p['EMPTY']:,} empty files, {p['PROCS']} processes, one directory of one mount", "ops/s", True, lambda s: get(s, "w5", "par_create")),
        (f"W5 create, {p['PROCS']} processes each in its own directory", "ops/s", True,
         lambda s: get(s, "w5", "par_create_dirs")),
        (f"W5 create, {p['PROCS']} processes over both mounts, one directory", "ops/s", True,
         lambda s: get(s, "w5", "par_create_mounts")),
        (f"W5 scaling: {p['PROCS']} processes / 1 process (medians)", "×", None,
         lambda s: (get(s, "w5", "par_create") / get(s, "w5", "create")) if isinstance(get(s, "w5", "create"), float) else get(s, "w5", "create")),
        (f"W6 new file ({p['LAT_KB']} KiB) visible with full content on the other mount, median of {p['TRIES']}", "ms", False, lambda s: lat(s, "w6", "median_ms")),
        ("W6 same, max", "ms", False, lambda s: lat(s, "w6", "max_ms")),
        (f"W7 in-place overwrite of a file the other mount has cached, visible there, median of {p['TRIES']}", "ms", False, lambda s: lat(s, "w7", "median_ms")),
        ("W7 same, max", "ms", False, lambda s: lat(s, "w7", "max_ms")),
    ]
    names = {"twinfs": "twinfs", "bindfs": "bindfs", "local": "local dir"}
    head = ["workload"] + [names.get(c, c) for c in cols] + [f"twinfs / {names.get(c, c)}" for c in refs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, unit, _hib, fn in rows:
        vals = [fn(c) for c in cols]
        cells = [label + (f", {unit}" if unit and unit != "×" else "")]
        cells += [fmt(v, "×" if unit == "×" else "") for v in vals]
        tw = vals[cols.index("twinfs")] if "twinfs" in cols else None
        for c in refs:
            rv = vals[cols.index(c)]
            if unit in ("", "×") or not isinstance(tw, (int, float)) or not isinstance(rv, (int, float)) or rv <= 0:
                cells.append("")
            else:
                x = tw / rv
                cells.append("**" + (f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x >= 0.01 else f"{x:.4f}") + "**")
        lines.append("| " + " | ".join(cells) + " |")

    for c in cols:
        runs = R.get(c, {}).get("w12", [])
        ok = [r for r in runs if "error" not in r]
        if ok:
            notes.append(f"{names.get(c, c)} per run (MiB/s): write " + " / ".join(fmt(r["w1"]) for r in ok)
                         + ", read " + " / ".join(fmt(r["w2"]) for r in ok)
                         + " (write timed around the fio command, start-up included: "
                         + " / ".join(fmt(r["w1_wall"]) for r in ok) + ")")
    for c in cols:
        for step, r in sorted(R.get(c, {}).items()):
            for i, rr in enumerate(r if isinstance(r, list) else [r]):
                if "error" in rr:
                    notes.append(f"**{names.get(c, c)} {step.upper()}{f' run {i + 1}' if isinstance(r, list) else ''} failed**: {rr['error']}")
        per_run = []
        for step, keys in (("w3", ("copy_s", "tar_s")), ("w4", ("write_fps", "verify_fps")),
                           ("w5", ("create", "stat", "unlink", "par_create"))):
            ok = [r for r in runs_of(c, step) if "error" not in r]
            if len(ok) > 1:
                per_run.append(step.upper() + " " + ", ".join(
                    f"{k} " + " / ".join(fmt(r.get(k)) for r in ok) for k in keys))
        if per_run:
            notes.append(f"{names.get(c, c)} per run: " + "; ".join(per_run))
        for i, w3 in enumerate(runs_of(c, "w3")):
            if w3.get("mismatch"):
                notes.append(f"**{names.get(c, c)} W3 run {i + 1}: {w3['mismatch']} paths differ** from the source through the other mount, e.g. {w3['mismatch_examples']}")
        for i, w4 in enumerate(runs_of(c, "w4")):
            if w4.get("mismatch"):
                notes.append(f"**{names.get(c, c)} W4 run {i + 1}: {w4['mismatch']} mismatches**, e.g. {w4['mismatch_examples']} {w4.get('errors')}")
        for i, w5 in enumerate(runs_of(c, "w5")):
            if w5.get("stat_missing"):
                notes.append(f"**{names.get(c, c)} W5 run {i + 1}: {w5['stat_missing']} of {p['EMPTY']:,} files not found by stat through the other mount**")
            if w5.get("left_on_read_side"):
                notes.append(f"**{names.get(c, c)} W5 run {i + 1}: {w5['left_on_read_side']} unlinked files still listed by the other mount after {p['POLL_TIMEOUT']:.0f} s**")
        for step in ("w6", "w7"):
            r = first(c, step) or {}
            if "tries" in r:
                extra = []
                if r["errors"]:
                    extra.append(f"**{r['errors']} read errors** (e.g. {r['last_error']})")
                if step == "w6" and r.get("other_reads"):
                    extra.append(f"{r['other_reads']} reads saw the new file before its full content (empty or short)")
                if step == "w7" and r.get("other_reads"):
                    extra.append(f"{r['other_reads']} reads that were neither the old nor the new content (torn)")
                notes.append(f"{names.get(c, c)} {step.upper()} per try (ms): "
                             + ", ".join("timeout" if v is None else fmt(max(v, 0.0)) for v in r["all_ms"])
                             + (f"; {r['before_close']} already visible when close returned" if r["before_close"] else "")
                             + ("; " + "; ".join(extra) if extra else ""))
    for lf in args.log or []:
        try:
            with open(lf, errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        clean = re.sub(r"\x1b\[[0-9;]*m", "", text)
        kinds = {}
        for l in clean.splitlines():
            m = re.search(r"\b(ERROR|WARN)\b\s*(.*)|(panicked.*)", l)
            if m:
                k = re.sub(r"\d+", "N", (m.group(0) or "").strip())[:120]
                kinds[k] = kinds.get(k, 0) + 1
        if kinds:
            top = sorted(kinds.items(), key=lambda kv: -kv[1])[:4]
            notes.append(f"`{'/'.join(lf.split('/')[-2:])}`: {sum(kinds.values()):,} ERROR/WARN lines: "
                         + "; ".join(f"{n:,} × `{k}`" for k, n in top))
    print("## Filesystem workloads (`bench/fs_bench.sh`)\n")
    print(f"Machine: {machine()}.")
    print(f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; twinfs {os.environ.get('BUILD_DESC', '?')}; "
          f"run time {os.environ.get('RUN_TIME', '?')}; load average (1, 5, 15 min) "
          f"{os.environ.get('LOAD_START', '?')} at the start, {' '.join(open('/proc/loadavg').read().split()[:3])} at the end.")
    print(f"Sizes: SIZE_MB={p['SIZE_MB']} RUNS={p['RUNS']} FILES={p['FILES']} EMPTY={p['EMPTY']} PROCS={p['PROCS']} "
          f"TRIES={p['TRIES']} LAT_KB={p['LAT_KB']} POLL_TIMEOUT={p['POLL_TIMEOUT']:g}s SEED={p['SEED']}.\n")
    print("twinfs: 3-node dev cluster on loopback (etcd, 3 nodes, 2 mount processes, all on this machine and disk); "
          "written through mount-0, read through mount-1. bindfs: `bindfs SRC MNT` over a directory on the same "
          "disk, read back through the same mount. local dir: a directory on the same disk. "
          "Ratios are twinfs's value over the reference's: above 1 is better for MiB/s, files/s, ops/s; "
          "below 1 is better for s and ms. W1 is fio's own figure (bytes over the job's runtime, which "
          "includes the end_fsync); everything else is timed around the whole command (dd, cp, tar, the "
          "Python loop) with a monotonic clock. Caches are dropped with `sync; echo 3 > "
          "/proc/sys/vm/drop_caches` before W1 and before each read phase. A twinfs close() stores the file's "
          "blocks on 2 nodes; local and bindfs writes (W3, W4, W5) end in the page cache.\n")
    print("\n".join(lines))
    if notes:
        print("\nNotes:\n")
        for n in notes:
            print(f"- {n}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--system", action="append", required=True, help="NAME:WRITE_DIR:READ_DIR")
    r.add_argument("--json", required=True)
    rp = sub.add_parser("report")
    rp.add_argument("--json", required=True)
    rp.add_argument("--log", action="append", help="mount log to scan for ERROR/WARN")
    s = sub.add_parser("step")
    s.add_argument("name", choices=sorted(STEPS))
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("run", type=int, nargs="?", default=1)
    args = ap.parse_args()
    if args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "report":
        cmd_report(args)
    else:
        print(json.dumps(STEPS[args.name](args.a, args.b, args.run)))


if __name__ == "__main__":
    main()
