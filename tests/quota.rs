//! Volume quotas through real mounts: usage accounted across mounts, ENOSPC at the write that
//! would pass the quota, statfs showing the quota, and usage that survives a crashed mount.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::Value;
use twinfs_fuse::mountpoint::{self, MountState};

const MIB: u64 = 1 << 20;

fn mount(c: &DevCluster, volume: &str, name: &str) -> (PathBuf, DetachOnDrop) {
    let dir = c.dir.path().join(name);
    // A dead mount (its process killed) is in the way of a second mount there: EEXIST.
    if let Err(e) = fs::create_dir_all(&dir) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::AlreadyExists,
            "mount dir: {e}"
        );
    }
    let out = run(c.cmd().arg("mount").arg(volume).arg(&dir));
    assert!(
        out.status.success(),
        "mount {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (dir.clone(), DetachOnDrop(dir))
}

fn inspect(c: &DevCluster, volume: &str) -> Value {
    let out = c.ok(&["volume", "inspect", volume, "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

/// Writes `data` in 1 MiB writes; returns how many bytes the writes accepted and the error
/// that stopped them, if any.
fn write_in_mibs(path: &Path, data: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut f = fs::File::create(path).expect("create");
    let mut done = 0;
    for piece in data.chunks(MIB as usize) {
        match f.write(piece) {
            Ok(n) => {
                done += n;
                if n < piece.len() {
                    // A short write: the next one reports why.
                    if let Err(e) = f.write(&piece[n..]) {
                        return (done, Some(e));
                    }
                }
            }
            Err(e) => return (done, Some(e)),
        }
    }
    if let Err(e) = f.sync_all() {
        return (done, Some(e));
    }
    (done, None)
}

#[test]
fn a_quota_holds_across_two_mounts() {
    let c = DevCluster::up(2, 10);
    c.ok(&["volume", "create", "q", "--quota", "8M"]);
    let (a, _ga) = mount(&c, "q", "qa");
    let (b, _gb) = mount(&c, "q", "qb");

    let six = random_bytes(6 * MIB as usize);
    fs::write(a.join("six"), &six).expect("6 MiB through A fit in 8 MiB");

    // Both mounts report the quota as the size and what is left as free (B within the
    // watch's latency).
    for m in [&a, &b] {
        wait_statvfs(m, Duration::from_secs(5), |s| s == (8 * MIB, 2 * MIB));
    }

    // B may add 2 MiB: the third 1 MiB write fails with ENOSPC, the first two are kept.
    let four = random_bytes(4 * MIB as usize);
    let (done, err) = write_in_mibs(&b.join("four"), &four);
    let err = err.expect("writing 4 MiB more must fail");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert_eq!(done as u64, 2 * MIB, "bytes accepted before ENOSPC");
    let kept = fs::read(b.join("four")).expect("read back");
    assert_eq!(kept.len() as u64, 2 * MIB);
    assert!(
        kept == four[..2 * MIB as usize],
        "what was written before ENOSPC is intact"
    );
    assert_eq!(
        fs::read(a.join("four")).expect("through A").len() as u64,
        2 * MIB
    );
    let (_, free) = statvfs(&a);
    assert_eq!(free, 0, "df shows the volume full");
    let info = inspect(&c, "q");
    assert_eq!(info["bytes_used"], 8 * MIB, "{info}");
    assert_eq!(info["quota_bytes"], 8 * MIB, "{info}");

    // Overwriting inside a file's size still works at the limit.
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(b.join("four"))
            .expect("open");
        f.write_all(&four[..MIB as usize])
            .expect("overwrite within the size");
    }

    // Deleting A's file gives the space back to B.
    fs::remove_file(a.join("six")).expect("unlink");
    // B sees the space come back.
    wait_statvfs(&b, Duration::from_secs(5), |(_, free)| free == 6 * MIB);
    fs::remove_file(b.join("four")).expect("unlink");
    let (done, err) = write_in_mibs(&b.join("again"), &four);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(done as u64, 4 * MIB);
    assert_eq!(fs::read(a.join("again")).expect("through A"), four);
    let info = inspect(&c, "q");
    assert_eq!(info["bytes_used"], 4 * MIB, "{info}");
    assert_eq!(info["bytes_in_files"], 4 * MIB, "{info}");
    let list: Value = serde_json::from_str(&c.ok(&["volume", "list", "--json"])).expect("json");
    assert_eq!(list[0]["bytes_used"], 4 * MIB, "{list}");
}

#[test]
fn usage_survives_a_crashed_mount() {
    let c = DevCluster::up(2, 10);
    c.ok(&["volume", "create", "q", "--quota", "1G"]);
    let (a, _ga) = mount(&c, "q", "qa");
    fs::write(a.join("one"), random_bytes(3 * MIB as usize + 17)).expect("write");
    fs::write(a.join("two"), random_bytes(1_234_567)).expect("write");
    fs::write(a.join("gone"), random_bytes(MIB as usize)).expect("write");
    fs::remove_file(a.join("gone")).expect("unlink");
    {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(a.join("one"))
            .expect("open");
        f.set_len(2 * MIB).expect("truncate");
    }
    let info = inspect(&c, "q");
    let pid = info["mounts"][0]["pid"].as_u64().expect("mount pid") as i32;
    // Written but never closed: lost with the mount (its name stays, empty). No process may
    // be started from here to the kill: a fork's exec closes its copy of the descriptor, and
    // that close flushes.
    let mut open = fs::File::create(a.join("unflushed")).expect("create");
    open.write_all(&[1u8; 1000]).expect("write");
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is this test's mount.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    assert!(
        wait_for(Duration::from_secs(5), || !alive(pid as u32)).is_some(),
        "mount killed"
    );
    drop(open);

    // Mounted again over the dead mount once the mount command's own check finds it dead
    // (until the kernel answers ENOTCONN there it is taken for a live mount and refused): the
    // usage is exactly the bytes of the files there.
    assert!(
        wait_for(Duration::from_secs(10), || mountpoint::state(&a)
            == MountState::Dead)
        .is_some(),
        "the killed mount never looked dead: {:?}",
        mountpoint::state(&a)
    );
    let (a2, _ga2) = mount(&c, "q", "qa");
    let present: u64 = fs::read_dir(&a2)
        .expect("readdir")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();
    assert_eq!(present, 2 * MIB + 1_234_567);
    let info = inspect(&c, "q");
    assert_eq!(info["bytes_used"], present, "{info}");
    assert_eq!(info["bytes_in_files"], present, "{info}");
    let (_, free) = statvfs(&a2);
    assert_eq!(
        free,
        ((1 << 30) - present) / 4096 * 4096,
        "free, in 4 KiB blocks"
    );

    // Once the crashed mount's registration has expired, the new mount folds its keys into
    // the base (15 s after its start); a clean unmount folds its own. The total stays exact.
    assert!(
        wait_for(Duration::from_secs(40), || inspect(&c, "q")
            ["usage_instances"]
            == 0)
        .is_some(),
        "{}",
        inspect(&c, "q")
    );
    let out = run(c.cmd().arg("umount").arg(&a2));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_for(Duration::from_secs(10), || inspect(&c, "q")["mounts"]
            .as_array()
            .is_some_and(|m| m.is_empty()))
        .is_some(),
        "the mount left"
    );
    let info = inspect(&c, "q");
    assert_eq!(info["usage_instances"], 0, "{info}");
    assert_eq!(info["bytes_used"], present, "{info}");
}

/// Nodes that are full make writes fail with ENOSPC (as a full local disk does, not EIO), lose
/// nothing already written, and leave the mount serving; a mount whose log cannot be written
/// (`/dev/full`, as on a full disk) keeps working and reports the same errors.
#[test]
fn full_nodes_give_enospc_and_an_unwritable_log_stops_nothing() {
    // Two nodes of 3 MB each, every block on both: room for about 3 MB of content.
    let c = DevCluster::start(2, 10, 0, &["--capacity=3000000"]);
    c.ok(&["volume", "create", "full"]);
    let (a, _ga) = mount(&c, "full", "fa");
    let dir = c.dir.path().join("fb");
    fs::create_dir_all(&dir).expect("mount dir");
    let _gb = DetachOnDrop(dir.clone());
    let out = run(c
        .cmd()
        .args(["mount", "full"])
        .arg(&dir)
        .args(["--log-file", "/dev/full"]));
    assert!(
        out.status.success(),
        "a mount logging to /dev/full starts: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let kept = random_bytes(MIB as usize);
    fs::write(a.join("kept"), &kept).expect("1 MiB fits");
    for (m, name) in [(&a, "big-a"), (&dir, "big-b")] {
        let (_, err) = write_in_mibs(&m.join(name), &random_bytes(8 * MIB as usize));
        let err = err.unwrap_or_else(|| panic!("8 MiB on full nodes through {m:?} succeeded"));
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENOSPC),
            "full nodes through {m:?}: {err}"
        );
    }
    // Nothing written before is lost, both mounts still serve, and a write that fits again
    // (the failed file removed) goes through.
    for m in [&a, &dir] {
        assert_eq!(fs::read(m.join("kept")).expect("read kept"), kept);
        fs::remove_file(m.join(if *m == a { "big-a" } else { "big-b" })).expect("unlink");
    }
    fs::create_dir(dir.join("still-serving")).expect("mkdir through the /dev/full mount");
    assert!(a.join("still-serving").is_dir());
    fs::write(dir.join("small"), b"fits").expect("a small write fits");
    assert_eq!(fs::read(a.join("small")).unwrap(), b"fits");
    for m in [&a, &dir] {
        let out = run(c.cmd().arg("umount").arg(m));
        assert!(
            out.status.success(),
            "umount {m:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_changed_quota_reaches_mounted_volumes_at_once() {
    let c = DevCluster::up(2, 10);
    c.ok(&["volume", "create", "g", "--quota", "4M"]);
    let (a, _ga) = mount(&c, "g", "ga");
    let (b, _gb) = mount(&c, "g", "gb");
    let three = random_bytes(3 * MIB as usize);
    fs::write(a.join("three"), &three).expect("3 MiB fit in 4 MiB");
    // B knows A's committed usage within the watch latency (SEMANTICS.md, Quotas).
    wait_statvfs(&b, Duration::from_secs(5), |s| s == (4 * MIB, MIB));
    let (_, err) = write_in_mibs(&b.join("two"), &random_bytes(2 * MIB as usize));
    assert_eq!(
        err.and_then(|e| e.raw_os_error()),
        Some(libc::ENOSPC),
        "2 MiB more do not fit in 4 MiB"
    );
    fs::remove_file(b.join("two")).expect("unlink");

    // Grown while both mounts are up: both show the new size and B may write.
    let out = c.ok(&["volume", "set-quota", "g", "16M"]);
    assert!(out.contains("quota 16.0 MiB (was 4.0 MiB)"), "{out}");
    for m in [&a, &b] {
        wait_statvfs(m, Duration::from_secs(5), |s| s == (16 * MIB, 13 * MIB));
    }
    let eight = random_bytes(8 * MIB as usize);
    let (done, err) = write_in_mibs(&b.join("eight"), &eight);
    assert!(err.is_none(), "8 MiB fit in 16 MiB: {err:?}");
    assert_eq!(done, eight.len());
    assert_eq!(inspect(&c, "g")["quota_bytes"], 16 * MIB);

    // Shrunk below the usage: nothing is lost, growth fails, overwrites still work.
    let out = c.ok(&["volume", "set-quota", "g", "5M"]);
    assert!(out.contains("more than the new quota"), "{out}");
    for m in [&a, &b] {
        wait_statvfs(m, Duration::from_secs(5), |s| s == (5 * MIB, 0));
    }
    let (done, err) = write_in_mibs(&a.join("more"), &random_bytes(MIB as usize));
    assert_eq!(done, 0);
    assert_eq!(err.and_then(|e| e.raw_os_error()), Some(libc::ENOSPC));
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(a.join("three"))
            .expect("open");
        f.write_all(&three[..MIB as usize])
            .expect("overwrite within the size");
    }
    assert!(fs::read(b.join("eight")).expect("read") == eight);
    assert!(fs::read(b.join("three")).expect("read") == three);

    // Removed: the nodes' space is the limit again.
    let out = c.ok(&["volume", "set-quota", "g", "none"]);
    assert!(out.contains("quota none (was 5.0 MiB)"), "{out}");
    wait_statvfs(&a, Duration::from_secs(5), |(total, _)| total > 16 * MIB);
    let (_, err) = write_in_mibs(&a.join("more"), &random_bytes(2 * MIB as usize));
    assert!(err.is_none(), "no quota: {err:?}");
    assert!(inspect(&c, "g")["quota_bytes"].is_null());

    // Mistakes are refused with a clear message and change nothing.
    for (args, says) in [
        (
            vec!["volume", "set-quota", "nosuch", "1G"],
            "does not exist",
        ),
        (vec!["volume", "set-quota", "g", "0"], "greater than 0"),
        (vec!["volume", "set-quota", "g", "lots"], "not a size"),
    ] {
        let out = run(c.cmd().args(&args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
    }
    assert!(inspect(&c, "g")["quota_bytes"].is_null());
}
