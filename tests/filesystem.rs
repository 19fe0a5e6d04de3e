//! The shared filesystem end to end: a real etcd, 3 real node processes and 2 real FUSE mounts
//! of one volume, each mount its own process (as on two different nodes). What is done through
//! one mount must be seen through the other.

mod common;

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn cluster() -> DevCluster {
    let c = DevCluster::with_mounts(3, 10, 2);
    assert_eq!(c.mounts.len(), 2, "two mounts listed in cluster.json");
    for m in &c.mounts {
        assert!(is_mounted(m), "{} is mounted", m.display());
    }
    c
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let n = CString::new(name).expect("name without NUL");
    // SAFETY: `p` and `n` are valid NUL-terminated strings and `value` is a valid buffer of
    // `value.len()` bytes, all alive for the duration of the call.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn get_xattr(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    let n = CString::new(name).expect("name without NUL");
    let mut buf = vec![0u8; 4096];
    // SAFETY: as in set_xattr; `buf` is writable for `buf.len()` bytes.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// Changes to something the other mount has already looked at (so its kernel has it cached)
/// must reach it through the etcd watch, well before the 1 s attribute/entry TTL.
const PUSHED_WITHIN: Duration = Duration::from_millis(500);

fn within<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "{what}: not seen through the other mount within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn namespace_changes_through_one_mount_are_seen_through_the_other() {
    let c = cluster();
    let (a, b) = (&c.mounts[0], &c.mounts[1]);

    // New things: no cache on B can hide them, so they must be there at once.
    fs::write(a.join("hello.txt"), b"hello from A").unwrap();
    fs::create_dir_all(a.join("2026/11")).unwrap();
    fs::write(a.join("2026/11/photo.jpg"), random_bytes(300 * 1024)).unwrap();
    std::os::unix::fs::symlink("hello.txt", a.join("link")).unwrap();
    fs::hard_link(a.join("hello.txt"), a.join("2026/hard")).unwrap();
    set_xattr(&a.join("hello.txt"), "user.origin", b"node-a").unwrap();
    fs::set_permissions(
        a.join("2026/11/photo.jpg"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();

    assert_eq!(fs::read(b.join("hello.txt")).unwrap(), b"hello from A");
    assert!(b.join("2026/11").is_dir());
    assert_eq!(
        fs::read(b.join("2026/11/photo.jpg")).unwrap(),
        fs::read(a.join("2026/11/photo.jpg")).unwrap()
    );
    assert_eq!(
        fs::read_link(b.join("link")).unwrap(),
        Path::new("hello.txt")
    );
    assert_eq!(fs::read(b.join("link")).unwrap(), b"hello from A");
    let hb = fs::metadata(b.join("2026/hard")).unwrap();
    assert_eq!(hb.nlink(), 2);
    assert_eq!(hb.ino(), fs::metadata(b.join("hello.txt")).unwrap().ino());
    assert_eq!(
        get_xattr(&b.join("hello.txt"), "user.origin").unwrap(),
        b"node-a"
    );
    assert_eq!(
        fs::metadata(b.join("2026/11/photo.jpg")).unwrap().mode() & 0o7777,
        0o640
    );
    let mut names: Vec<String> = fs::read_dir(b)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["2026", "hello.txt", "link"]);

    // Changes to things B has cached: pushed by the watch.
    fs::rename(a.join("hello.txt"), a.join("renamed.txt")).unwrap();
    within("rename (old name gone)", PUSHED_WITHIN, || {
        (!b.join("hello.txt").exists()).then_some(())
    });
    assert_eq!(fs::read(b.join("renamed.txt")).unwrap(), b"hello from A");
    fs::set_permissions(a.join("renamed.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    within("chmod", PUSHED_WITHIN, || {
        (fs::metadata(b.join("renamed.txt")).ok()?.mode() & 0o7777 == 0o600).then_some(())
    });
    fs::rename(a.join("2026/11"), a.join("2026/december")).unwrap();
    within("directory rename", PUSHED_WITHIN, || {
        (!b.join("2026/11").exists() && b.join("2026/december/photo.jpg").is_file()).then_some(())
    });
    fs::remove_file(a.join("2026/hard")).unwrap();
    within("unlink of a hard link", PUSHED_WITHIN, || {
        (!b.join("2026/hard").exists() && fs::metadata(b.join("renamed.txt")).ok()?.nlink() == 1)
            .then_some(())
    });
    fs::remove_file(a.join("2026/december/photo.jpg")).unwrap();
    fs::remove_dir(a.join("2026/december")).unwrap();
    within("unlink + rmdir", PUSHED_WITHIN, || {
        (!b.join("2026/december").exists()).then_some(())
    });
    assert_eq!(fs::read_dir(b.join("2026")).unwrap().count(), 0);

    // And the other way round.
    fs::write(b.join("from-b"), b"B writes too").unwrap();
    assert_eq!(fs::read(a.join("from-b")).unwrap(), b"B writes too");

    // A answers getxattr of a file it created without asking etcd, until another node
    // changes the inode: an xattr set through B reaches A through the watch.
    fs::write(a.join("made-by-a"), b"x").unwrap();
    assert!(get_xattr(&a.join("made-by-a"), "user.tag").is_err());
    set_xattr(&b.join("made-by-a"), "user.tag", b"from B").unwrap();
    within("xattr set through the other mount", PUSHED_WITHIN, || {
        get_xattr(&a.join("made-by-a"), "user.tag")
            .ok()
            .filter(|v| v == b"from B")
    });

    // B found no xattr on a file A made (and now answers that without etcd, while the inode
    // stays as it read it): an xattr A sets still reaches B, and so does its removal.
    fs::write(a.join("made-by-a-too"), b"y").unwrap();
    let on_b = b.join("made-by-a-too");
    for _ in 0..2 {
        assert!(get_xattr(&on_b, "user.tag").is_err());
        assert!(get_xattr(&on_b, "security.capability").is_err());
    }
    set_xattr(&a.join("made-by-a-too"), "user.tag", b"from A").unwrap();
    within(
        "xattr set on a file the other mount knew without any",
        PUSHED_WITHIN,
        || get_xattr(&on_b, "user.tag").ok().filter(|v| v == b"from A"),
    );
    let removed = CString::new(a.join("made-by-a-too").as_os_str().as_bytes()).unwrap();
    // SAFETY: both arguments are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe { libc::removexattr(removed.as_ptr(), c"user.tag".as_ptr()) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    within(
        "xattr removal seen through the other mount",
        PUSHED_WITHIN,
        || get_xattr(&on_b, "user.tag").is_err().then_some(()),
    );
}

#[test]
fn overwrite_is_seen_at_the_next_open_even_when_the_reader_cached_the_file() {
    let c = cluster();
    let (a, b) = (&c.mounts[0], &c.mounts[1]);
    let path_a = a.join("upload.bin");
    let path_b = b.join("upload.bin");
    let base = random_bytes(64 * 1024);
    // Many rounds: the stale reads this guards against were races between B's watch, its
    // attribute cache and its kernel page invalidation, seen in 1 of ~10 runs of 5 rounds.
    for round in 0..150u32 {
        let content: Vec<u8> = base.iter().map(|x| x.wrapping_add(round as u8)).collect();
        // Same size every round: only the content (and mtime) changes.
        fs::write(&path_a, &content).unwrap();
        // Some rounds let B hand the kernel fresh attributes first (a `stat`, as PHP does
        // before reading), which is the order that once made B keep its stale pages.
        if round % 2 == 1 {
            fs::metadata(&path_b).unwrap();
        }
        // close() returned on A: an open() on B now must see the new bytes (close-to-open),
        // even though B read the previous version a moment ago and may still cache it.
        let seen = fs::read(&path_b).unwrap();
        assert!(
            seen == content,
            "round {round}: B read stale data after A's close"
        );
    }
    // Growing and shrinking are seen too.
    fs::write(&path_a, random_bytes(5 * 1024 * 1024 + 17)).unwrap();
    assert_eq!(fs::read(&path_b).unwrap(), fs::read(&path_a).unwrap());
    fs::OpenOptions::new()
        .write(true)
        .open(&path_a)
        .unwrap()
        .set_len(1000)
        .unwrap();
    assert_eq!(fs::read(&path_b).unwrap().len(), 1000);
}

#[test]
fn an_unlinked_file_stays_readable_through_open_descriptors_on_either_mount() {
    let c = cluster();
    let (a, b) = (&c.mounts[0], &c.mounts[1]);
    let data = random_bytes(200 * 1024);
    fs::write(a.join("doomed"), &data).unwrap();
    let mut f = fs::File::open(a.join("doomed")).unwrap();
    fs::remove_file(a.join("doomed")).unwrap();
    assert!(!a.join("doomed").exists());
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    assert!(
        back == data,
        "open descriptor reads the unlinked file's data"
    );

    // Open on B, deleted through A (the inode is gone from etcd): B's descriptor keeps the
    // file as it was, as a web server sending an attachment that WordPress on another node
    // deletes meanwhile needs.
    let data = random_bytes(3 * 1024 * 1024 + 5);
    fs::write(a.join("attachment"), &data).unwrap();
    let mut reader = fs::File::open(b.join("attachment")).unwrap();
    let mut back = vec![0u8; 64 * 1024];
    reader.read_exact(&mut back).unwrap();
    let mut writer = fs::OpenOptions::new()
        .write(true)
        .open(b.join("attachment"))
        .unwrap();
    writer.write_all(b"written through B").unwrap();
    writer.sync_all().unwrap();
    fs::remove_file(a.join("attachment")).unwrap();
    within("the unlink", PUSHED_WITHIN, || {
        (!b.join("attachment").exists()).then_some(())
    });
    reader.read_to_end(&mut back).unwrap();
    assert!(
        back == data,
        "B's descriptor reads the file another mount deleted, as it was"
    );
    let meta = reader.metadata().unwrap();
    assert_eq!((meta.nlink(), meta.len()), (0, data.len() as u64));
    // Writes through a descriptor of the deleted file succeed and go with it.
    writer.write_all(b"more").unwrap();
    writer.sync_all().unwrap();
    drop(writer);
    drop(reader);
    assert!(!a.join("attachment").exists() && !b.join("attachment").exists());

    // Replaced by a rename on A: B's descriptor keeps the old file.
    fs::write(a.join("page.html"), b"old page").unwrap();
    let mut old = fs::File::open(b.join("page.html")).unwrap();
    fs::write(a.join("page.tmp"), b"new page").unwrap();
    fs::rename(a.join("page.tmp"), a.join("page.html")).unwrap();
    within("the rename", PUSHED_WITHIN, || {
        (fs::read(b.join("page.html")).ok()? == b"new page").then_some(())
    });
    let mut seen = Vec::new();
    old.read_to_end(&mut seen).unwrap();
    assert_eq!(seen, b"old page");
}

fn listing(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_large_directory_lists_every_entry_once_even_while_it_changes() {
    // More entries than one page an open directory reads from etcd (512) and far more than
    // one kernel request holds (~25), with names of varied length.
    let c = cluster();
    let (a, b) = (&c.mounts[0], &c.mounts[1]);
    fs::create_dir(a.join("big")).unwrap();
    let stable: Vec<String> = (0..1300)
        .map(|i| format!("upload-{i}{}", "x".repeat(i % 40)))
        .collect();
    for n in &stable {
        fs::File::create(a.join("big").join(n)).unwrap();
    }
    let mut doomed: Vec<String> = (0..300).map(|i| format!("doomed-{i}")).collect();
    for n in &doomed {
        fs::File::create(a.join("big").join(n)).unwrap();
    }
    let mut expect: Vec<String> = stable.iter().chain(&doomed).cloned().collect();
    expect.sort();
    for dir in [a.join("big"), b.join("big")] {
        let mut got = listing(&dir);
        got.sort();
        assert_eq!(got.len(), expect.len(), "{}: entries listed", dir.display());
        assert!(got == expect, "{}: names listed", dir.display());
    }

    // While B lists, A removes some names and adds others. POSIX leaves open whether those
    // are listed; every name that stays must be, and none twice.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let changer = {
        let (dir, stop) = (a.join("big"), stop.clone());
        let doomed = std::mem::take(&mut doomed);
        std::thread::spawn(move || {
            for (i, n) in doomed.iter().enumerate() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                fs::remove_file(dir.join(n)).unwrap();
                fs::File::create(dir.join(format!("new-{i}"))).unwrap();
            }
        })
    };
    for round in 0..5 {
        let got = listing(&b.join("big"));
        let mut seen = std::collections::HashSet::new();
        for n in &got {
            assert!(seen.insert(n.clone()), "round {round}: {n} listed twice");
            assert!(
                n.starts_with("upload-") || n.starts_with("doomed-") || n.starts_with("new-"),
                "round {round}: unknown name {n}"
            );
        }
        for n in &stable {
            assert!(
                seen.contains(n),
                "round {round}: {n} missing from the listing"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    changer.join().unwrap();
}

#[test]
fn one_gib_written_through_one_mount_reads_back_identical_through_the_other() {
    let c = cluster();
    let (a, b) = (&c.mounts[0], &c.mounts[1]);
    const MIB: usize = 1 << 20;
    let mut chunk = vec![0u8; MIB];
    let mut written = blake3::Hasher::new();
    {
        let mut f = fs::File::create(a.join("big.bin")).unwrap();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..1024 {
            // xorshift: cheap, deterministic, incompressible enough
            for w in chunk.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                w.copy_from_slice(&state.to_le_bytes());
            }
            written.update(&chunk);
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let mut f = fs::File::open(b.join("big.bin")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 30);
    let mut read = blake3::Hasher::new();
    let mut total = 0usize;
    loop {
        let n = f.read(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        read.update(&chunk[..n]);
        total += n;
    }
    assert_eq!(total, 1 << 30);
    assert_eq!(read.finalize(), written.finalize(), "1 GiB differs");
}

#[test]
fn the_wordpress_tree_copied_into_one_mount_compares_equal_through_the_other() {
    let src = Path::new("/usr/share/wordpress");
    assert!(
        src.is_dir(),
        "Debian's wordpress package is needed (scripts/setup.sh installs it)"
    );
    let c = cluster();
    let (a, b) = (&c.mounts[0], &c.mounts[1]);
    let out = Command::new("cp")
        .arg("-rL")
        .arg(src)
        .arg(a.join("wordpress"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp -rL: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("diff")
        .arg("-r")
        .arg(src)
        .arg(b.join("wordpress"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "diff -r found differences:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn mounts_stop_cleanly_and_bad_mounts_fail_clearly() {
    let c = cluster();
    let (a, b) = (&c.mounts[0], &c.mounts[1]);
    fs::write(a.join("kept"), b"still here").unwrap();

    // `twinfs umount` unmounts, and the mount process goes away by itself.
    let out = run(c.cmd().arg("umount").arg(a));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(a));
    assert!(
        !alive(c.mount_pids[0]),
        "the mount process has exited when umount returns"
    );

    // SIGTERM flushes and unmounts: data written through an open file survives.
    let mut f = fs::File::create(b.join("open-at-sigterm")).unwrap();
    f.write_all(b"flushed at shutdown").unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is this test's mount.
    unsafe {
        libc::kill(c.mount_pids[1] as i32, libc::SIGTERM);
    }
    assert!(
        wait_for(Duration::from_secs(15), || !alive(c.mount_pids[1])).is_some(),
        "mount process exits on SIGTERM"
    );
    drop(f);
    assert!(!is_mounted(b), "SIGTERM unmounted");

    // Mount again (background, serving its metrics): both files are there, with their data.
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let out = run(c
        .cmd()
        .arg("mount")
        .arg("uploads")
        .arg(a)
        .arg("--metrics-addr")
        .arg(metrics.to_string()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::read(a.join("kept")).unwrap(), b"still here");
    assert_eq!(
        fs::read(a.join("open-at-sigterm")).unwrap(),
        b"flushed at shutdown"
    );
    let ready = http_get(metrics, "/readyz").unwrap_or_default();
    assert!(ready.starts_with("HTTP/1.1 200"), "/readyz: {ready}");
    let scraped = http_get(metrics, "/metrics").unwrap_or_default();
    for series in [
        "twinfs_fuse_ops_total{op=\"lookup\"}",
        "twinfs_etcd_requests_seconds_bucket",
        "twinfs_client_requests_total{op=\"get\"}",
    ] {
        assert!(scraped.contains(series), "{series} in /metrics:\n{scraped}");
    }
    let out = run(c.cmd().arg("umount").arg(a));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A volume that does not exist, and an etcd nobody listens on: clear errors, no mount.
    let out = run(c.cmd().arg("mount").arg("no-such-volume").arg(a));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-volume"),
        "error names the volume: {err}"
    );
    assert!(!is_mounted(a));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = run(twinfs()
        .env_remove("TWINFS_CLUSTER")
        .arg("--etcd")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--tls-dir")
        .arg(c.client_cert_dir())
        .arg("mount")
        .arg("uploads")
        .arg(a));
    assert!(!out.status.success(), "mount without etcd must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("etcd"), "error mentions etcd: {err}");
    assert!(!is_mounted(a));
}

/// The etcd watch that pushes changes between mounts resumes by itself after etcd restarts.
#[test]
fn invalidation_survives_an_etcd_restart() {
    let c = cluster();
    let (a, b) = (&c.mounts[0], &c.mounts[1]);
    fs::write(a.join("before"), b"v1").unwrap();
    assert_eq!(fs::read(b.join("before")).unwrap(), b"v1");

    // Restart etcd with the very same command line (same data directory and ports).
    let pid = c.json["etcd"]["pid"].as_u64().unwrap() as u32;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is this test's etcd.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    assert!(wait_for(Duration::from_secs(10), || !alive(pid)).is_some());
    // While etcd is away, an operation that needs it retries for the mount's etcd timeout
    // (10 s by default), then fails with EIO: bounded, not a hang, and not at once.
    let t = std::time::Instant::now();
    let err = fs::write(a.join("during-outage"), b"x").expect_err("etcd is down");
    let waited = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        waited >= Duration::from_secs(5) && waited <= Duration::from_secs(20),
        "EIO after {waited:?}"
    );
    let log = fs::File::create(c.dir.path().join("etcd-restarted.log")).unwrap();
    let _etcd = KillOnDrop(
        Command::new(&args[0])
            .args(&args[1..])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The mounts find etcd again by themselves: a rename through A reaches B's cache.
    let ok = wait_for(Duration::from_secs(20), || {
        fs::rename(a.join("before"), a.join("after")).is_ok()
    });
    assert!(ok.is_some(), "mount A works again after the etcd restart");
    assert_eq!(
        fs::read(b.join("after")).unwrap(),
        b"v1",
        "acknowledged data kept"
    );
    within("rename after etcd restart", Duration::from_secs(5), || {
        (!b.join("before").exists() && b.join("after").exists()).then_some(())
    });
    // And B's watch follows again by itself: within a few seconds of etcd's return, a change
    // to a file whose attributes B has cached is pushed to B's kernel within half the
    // attribute TTL (the size B's `stat` reports changes without an open).
    let mut size = 2;
    let pushed = wait_for(Duration::from_secs(10), || {
        assert_eq!(fs::metadata(b.join("after")).unwrap().len(), size);
        size += 1;
        fs::write(a.join("after"), vec![b'x'; size as usize]).unwrap();
        let t = std::time::Instant::now();
        while t.elapsed() < PUSHED_WITHIN {
            if fs::metadata(b.join("after")).unwrap().len() == size {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Not pushed (the watch is not back yet): let the attribute TTL expire before the next
        // try, so B's view is current again.
        std::thread::sleep(Duration::from_millis(1100));
        false
    });
    assert!(
        pushed.is_some(),
        "B's watch did not resume within 10 s of etcd's return"
    );
}

/// A mount answers lookups of absent names in directories it made without etcd (it holds a
/// claim on them); a name made through the other mount is still found through it as soon as
/// the other mount's call returns (the other mount recalls the claim first), and a mount that
/// died holding a claim delays a create in its directory by its lease TTL at most.
#[test]
fn a_name_made_in_a_directory_the_other_mount_made_is_found_at_once() {
    let c = cluster();
    let (a, b) = (&c.mounts[0], &c.mounts[1]);
    let _dead_mount = DetachOnDrop(a.clone());
    for i in 0..20 {
        let d = format!("made-by-a-{i}");
        fs::create_dir(a.join(&d)).unwrap();
        // Absent through A (from its cache); B learns the directory from etcd.
        assert!(!a.join(&d).join("x").exists());
        within("B to see the directory", Duration::from_secs(5), || {
            b.join(&d).is_dir().then_some(())
        });
        fs::write(b.join(&d).join("x"), b"from b").unwrap();
        assert_eq!(
            fs::read(a.join(&d).join("x")).unwrap(),
            b"from b",
            "round {i}: the name B made is found through A at once"
        );
        // A goes on making names there (without its claim now).
        fs::write(a.join(&d).join("y"), b"from a").unwrap();
        assert_eq!(fs::read(b.join(&d).join("y")).unwrap(), b"from a");
    }

    // A dies holding the claim of a directory it made: B's create there waits for A's lease.
    fs::create_dir(a.join("orphaned")).unwrap();
    assert!(!a.join("orphaned").join("x").exists());
    within("B to see the directory", Duration::from_secs(5), || {
        b.join("orphaned").is_dir().then_some(())
    });
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is this test's mount.
    unsafe {
        libc::kill(c.mount_pids[0] as i32, libc::SIGKILL);
    }
    let started = Instant::now();
    fs::write(b.join("orphaned").join("x"), b"after a died").unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "a dead holder's claim goes with its lease (waited {waited:?})"
    );
    assert_eq!(
        fs::read(b.join("orphaned").join("x")).unwrap(),
        b"after a died"
    );
}

fn flock(f: &fs::File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor this `File` owns and keeps open for the call.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn would_block(r: std::io::Result<()>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK))
}

#[test]
fn flock_excludes_across_mounts_and_a_dead_mounts_locks_go() {
    let c = cluster();
    let (a, b) = (&c.mounts[0], &c.mounts[1]);
    let _dead_mount = DetachOnDrop(a.clone());
    fs::write(a.join("lock"), b"").unwrap();
    fs::write(a.join("counter"), b"0").unwrap();

    let on_a = fs::File::open(a.join("lock")).unwrap();
    let on_b = fs::File::open(b.join("lock")).unwrap();
    flock(&on_a, libc::LOCK_EX).unwrap();
    assert!(would_block(flock(&on_b, libc::LOCK_EX | libc::LOCK_NB)));
    assert!(would_block(flock(&on_b, libc::LOCK_SH | libc::LOCK_NB)));
    // Shared locks share across mounts; an exclusive one then waits for both.
    flock(&on_a, libc::LOCK_SH).unwrap();
    flock(&on_b, libc::LOCK_SH | libc::LOCK_NB).unwrap();
    let third = fs::File::open(b.join("lock")).unwrap();
    assert!(would_block(flock(&third, libc::LOCK_EX | libc::LOCK_NB)));
    flock(&on_a, libc::LOCK_UN).unwrap();
    assert!(would_block(flock(&third, libc::LOCK_EX | libc::LOCK_NB)));
    // The last close lets go (a moment after close(2) returns: the kernel sends the release
    // without waiting for it).
    drop(on_b);
    within(
        "the lock to go at the last close",
        Duration::from_secs(5),
        || flock(&third, libc::LOCK_EX | libc::LOCK_NB).ok(),
    );
    drop(third);

    // Read-modify-write of a counter under LOCK_EX from both mounts at once: no update lost.
    const ROUNDS: u32 = 15;
    let bump = |root: std::path::PathBuf| {
        std::thread::spawn(move || {
            for _ in 0..ROUNDS {
                let lock = fs::File::open(root.join("lock")).unwrap();
                flock(&lock, libc::LOCK_EX).unwrap();
                let n: u32 = fs::read_to_string(root.join("counter"))
                    .unwrap()
                    .parse()
                    .unwrap();
                fs::write(root.join("counter"), (n + 1).to_string()).unwrap();
                flock(&lock, libc::LOCK_UN).unwrap();
            }
        })
    };
    let (ta, tb) = (bump(a.clone()), bump(b.clone()));
    ta.join().unwrap();
    tb.join().unwrap();
    assert_eq!(
        fs::read_to_string(a.join("counter")).unwrap(),
        (2 * ROUNDS).to_string(),
        "every increment made under the lock is kept"
    );

    // A taker on B blocks while A holds the lock and gets it when A lets go.
    flock(&on_a, libc::LOCK_EX).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let lock_b = b.join("lock");
    let waiter = std::thread::spawn(move || {
        let f = fs::File::open(lock_b).unwrap();
        flock(&f, libc::LOCK_EX).unwrap();
        tx.send(()).unwrap();
        f
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(500)).is_err(),
        "B's taker waits while A holds the lock"
    );
    // A signal reaches a waiting taker: `flock -w 1` gives up after its second (exit 1).
    let mut timed = Command::new("flock")
        .args(["-w", "1"])
        .arg(b.join("lock"))
        .arg("true")
        .spawn()
        .unwrap();
    let gave_up = within("flock -w 1 to give up", Duration::from_secs(10), || {
        timed.try_wait().unwrap()
    });
    assert_eq!(
        gave_up.code(),
        Some(1),
        "flock -w 1 timed out waiting for A's lock"
    );
    drop(on_a);
    rx.recv_timeout(Duration::from_secs(5))
        .expect("B's taker gets the lock once A closes");
    drop(waiter.join().unwrap());

    // A's mount dies holding a lock: B gets it once A's session lease runs out.
    let on_a = fs::File::open(a.join("lock")).unwrap();
    flock(&on_a, libc::LOCK_EX).unwrap();
    let on_b = fs::File::open(b.join("lock")).unwrap();
    assert!(would_block(flock(&on_b, libc::LOCK_EX | libc::LOCK_NB)));
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is this test's mount.
    unsafe {
        libc::kill(c.mount_pids[0] as i32, libc::SIGKILL);
    }
    let started = Instant::now();
    flock(&on_b, libc::LOCK_EX).unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "a dead mount's lock goes with its lease (waited {waited:?})"
    );
    drop(on_a);
}
