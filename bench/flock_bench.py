#!/usr/bin/env python3
"""flock(2) cost through twinfs, against a local directory measured in the same run.

  bench/flock_bench.py MOUNT_A MOUNT_B LOCAL_DIR [--rounds N]

MOUNT_A and MOUNT_B: two mounts of one volume (e.g. `twinfs dev-cluster up --mounts 2`).
Measures, each as a median over N rounds:
  take+release   LOCK_EX then LOCK_UN on an open file, one process (the cost of an uncontended lock)
  hand-over      a process on MOUNT_B blocked in LOCK_EX until one on MOUNT_A lets go: time from
                 A's LOCK_UN returning to B's LOCK_EX returning (on LOCAL_DIR: two processes on
                 the same directory)
"""
import argparse, fcntl, multiprocessing as mp, os, statistics, time


def take_release(d, rounds):
    path = os.path.join(d, "flock-bench-uncontended")
    with open(path, "w") as f:
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            fcntl.flock(f, fcntl.LOCK_UN)
            times.append(time.perf_counter() - t)
    os.unlink(path)
    return statistics.median(times)


def _waiter(path, ready, got, rounds):
    with open(path) as f:
        for _ in range(rounds):
            ready.wait()
            fcntl.flock(f, fcntl.LOCK_EX)
            got.put(time.perf_counter())
            fcntl.flock(f, fcntl.LOCK_UN)


def hand_over(da, db, rounds):
    name = "flock-bench-handover"
    open(os.path.join(da, name), "w").close()
    # perf_counter is CLOCK_MONOTONIC: comparable across processes on one machine.
    ready, got = mp.Event(), mp.Queue()
    with open(os.path.join(da, name)) as f:
        p = mp.Process(target=_waiter, args=(os.path.join(db, name), ready, got, rounds))
        p.start()
        times = []
        for _ in range(rounds):
            fcntl.flock(f, fcntl.LOCK_EX)
            ready.set()
            time.sleep(0.05)  # let the waiter block on the lock (not a timing: it only waits)
            ready.clear()
            fcntl.flock(f, fcntl.LOCK_UN)
            released = time.perf_counter()
            times.append(got.get(timeout=30) - released)
            time.sleep(0.01)  # the waiter lets go before the next round takes it again
        p.join(30)
    os.unlink(os.path.join(da, name))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a"); ap.add_argument("b"); ap.add_argument("local")
    ap.add_argument("--rounds", type=int, default=200)
    o = ap.parse_args()
    ms = lambda s: f"{s * 1e3:.3f} ms"
    tr_t, tr_l = take_release(o.a, o.rounds), take_release(o.local, o.rounds)
    ho_rounds = max(o.rounds // 5, 10)
    ho_t, ho_l = hand_over(o.a, o.b, ho_rounds), hand_over(o.local, o.local, ho_rounds)
    print(f"| measure (median) | twinfs | local dir | ratio |")
    print(f"|---|---|---|---|")
    print(f"| take+release LOCK_EX, {o.rounds} rounds | {ms(tr_t)} | {ms(tr_l)} | {tr_t / tr_l:.0f}x |")
    print(f"| hand-over A→B across mounts, {ho_rounds} rounds | {ms(ho_t)} | {ms(ho_l)} (same dir) | {ho_t / ho_l:.0f}x |")


if __name__ == "__main__":
    main()
