//! Self-healing with real processes: repair after a node is lost, replacement of a corrupt
//! copy, `twinfs fsck`, and garbage collection that removes unreferenced blocks (including
//! those of a writer killed before it committed) and never a referenced one.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Short timers so a test sees a whole repair: a vanished node is given 3 s, scans every 1 s.
const FAST: &[&str] = &[
    "--repair-grace=3s",
    "--planned-grace=3s",
    "--repair-interval=1s",
    "--gc-interval=0",
];

fn fsck(c: &DevCluster, quick: bool) -> Value {
    let mut args = vec!["fsck", "uploads", "--json"];
    if quick {
        args.push("--quick");
    }
    let out = run(c.cmd().args(&args));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "fsck printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn fsck_clean(c: &DevCluster) -> bool {
    let out = run(c.cmd().args(["fsck", "uploads"]));
    out.status.success()
}

fn write_files(dir: &Path, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for i in 0..n {
        // Upload-like sizes, and one larger than a chunk.
        let len = if i == 0 { 9 << 20 } else { 20_000 + i * 37_000 };
        let data = random_bytes(len);
        let name = format!("upload-{i}.jpg");
        std::fs::write(dir.join(&name), &data).expect("write");
        files.push((name, data));
    }
    files
}

fn assert_files(dir: &Path, files: &[(String, Vec<u8>)]) {
    for (name, data) in files {
        let got = std::fs::read(dir.join(name)).expect("read back");
        assert!(got == *data, "{name} changed");
    }
}

#[test]
fn copies_of_a_killed_node_are_recreated_and_fsck_reports_full_redundancy() {
    let c = DevCluster::start(3, 2, 1, FAST);
    let mnt = c.mounts[0].clone();
    let files = write_files(&mnt, 12);
    let before = fsck(&c, false);
    assert_eq!(before["lost"], 0, "{before}");
    assert_eq!(before["endangered"], 0, "{before}");
    let blocks = before["blocks"].as_u64().expect("blocks");
    assert!(blocks >= 14, "{before}");

    // The node holding the most copies dies.
    let status = c.status_json();
    let victim = status["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .max_by_key(|n| n["blocks"].as_u64().unwrap_or(0))
        .and_then(|n| n["id"].as_str())
        .expect("a node")
        .to_string();
    c.kill9(&victim);
    // Once its lease is gone, its copies are missing...
    let degraded = wait_for(Duration::from_secs(15), || {
        fsck(&c, true)["endangered"].as_u64().unwrap_or(0) > 0
    });
    assert!(degraded.is_some(), "the kill never showed in fsck");
    // ... and the files still read back whole through the mount meanwhile.
    assert_files(&mnt, &files);

    // Within the grace period plus the repair, every block has 2 verified copies again.
    let healed = wait_for(Duration::from_secs(60), || fsck_clean(&c));
    assert!(
        healed.is_some(),
        "not repaired in 60 s: {}",
        fsck(&c, false)
    );
    eprintln!(
        "full redundancy {:?} after the node's death was seen",
        healed
    );
    let after = fsck(&c, false);
    assert_eq!(after["healthy"].as_u64(), Some(blocks), "{after}");
    assert_eq!(after["live_nodes"], 2, "{after}");
    // The repair is visible in the status.
    let s = c.status_json();
    assert!(
        s["repair"]["repaired_blocks"].as_u64().unwrap_or(0) > 0,
        "{s}"
    );
    let table = c.ok(&["status"]);
    assert!(table.contains("UNDER-REPLICATED"), "{table}");
    assert_files(&mnt, &files);
}

#[test]
fn a_corrupt_copy_is_found_and_replaced_from_a_good_one() {
    let c = DevCluster::start(3, 2, 1, FAST);
    let mnt = c.mounts[0].clone();
    let data = random_bytes(300_000);
    std::fs::write(mnt.join("photo.jpg"), &data).expect("write");
    let hash = blake3::hash(&data).to_hex().to_string();
    let holders = c.locate(&hash);
    assert_eq!(holders.len(), 2, "two copies");
    // Rot on one node's disk.
    assert!(c.rot_copy(&holders[0], &hash, 1000), "a copy to rot");

    // fsck has each node re-hash its copies: it sees one good copy, names the file, and the
    // node quarantines the bad copy.
    let report = fsck(&c, false);
    assert_eq!(report["endangered"], 1, "{report}");
    assert_eq!(report["files"][0]["path"], "/photo.jpg", "{report}");
    // Repair re-creates the second copy from the good one.
    assert!(
        wait_for(Duration::from_secs(30), || fsck_clean(&c)).is_some(),
        "the corrupt copy was not replaced: {}",
        fsck(&c, false)
    );
    assert_eq!(std::fs::read(mnt.join("photo.jpg")).expect("read"), data);
}

#[test]
fn scrub_finds_rot_in_a_block_nobody_reads_and_repair_replaces_it() {
    let args: Vec<&str> = FAST
        .iter()
        .copied()
        .chain(["--scrub-interval=1s"])
        .collect();
    let c = DevCluster::start(3, 2, 1, &args);
    let data = random_bytes(200_000);
    std::fs::write(c.mounts[0].join("old.jpg"), &data).expect("write");
    let hash = blake3::hash(&data).to_hex().to_string();
    let holder = c.locate(&hash)[0].clone();
    assert!(c.rot_copy(&holder, &hash, 7), "a copy to rot");
    // Nobody reads it: the scrub finds it (counted by the node) ...
    let found = wait_for(Duration::from_secs(30), || {
        c.status_json()["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .any(|n| n["id"] == holder.as_str() && n["corrupt_detected"] == 1)
    });
    assert!(found.is_some(), "the scrub never found the bad copy");
    // ... and repair brings back two good copies.
    assert!(
        wait_for(Duration::from_secs(30), || fsck_clean(&c)).is_some(),
        "{}",
        fsck(&c, false)
    );
    assert_eq!(
        std::fs::read(c.mounts[0].join("old.jpg")).expect("read"),
        data
    );
}

fn total_blocks(c: &DevCluster) -> u64 {
    c.status_json()["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["state"] == "alive")
        .map(|n| n["blocks"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn gc_removes_unreferenced_blocks_and_never_a_referenced_one() {
    let c = DevCluster::start(2, 2, 1, FAST);
    let mnt = c.mounts[0].clone();
    let keep = write_files(&mnt, 4);
    let gone = random_bytes(500_000);
    std::fs::write(mnt.join("deleted.jpg"), &gone).expect("write");
    std::fs::remove_file(mnt.join("deleted.jpg")).expect("unlink");
    // A block stored by a client that never referenced it.
    let stray = random_bytes(70_000);
    let stray_hash = c.put(&stray);

    // A writer killed before it committed: full chunks (4 MiB) are stored in the background
    // while the file is still open; then the mount process dies with them uncommitted. (One
    // process that never closes: every close, even of a duplicate descriptor, flushes.)
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import os, time\n\
             fd = os.open('{}', os.O_WRONLY | os.O_CREAT, 0o644)\n\
             data = os.urandom(9437184)\n\
             while data:\n    data = data[os.write(fd, data):]\n\
             time.sleep(600)\n",
            mnt.join("never-closed.bin").display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("writer");
    let stored = total_blocks(&c);
    let uploaded = wait_for(Duration::from_secs(20), || total_blocks(&c) >= stored + 4);
    assert!(
        uploaded.is_some(),
        "the open file's full chunks were never stored"
    );
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is this test's mount process.
    unsafe {
        libc::kill(c.mount_pids[0] as i32, libc::SIGKILL);
    }
    let _ = writer.kill();
    let _ = writer.wait();

    // Dry run: lists, removes nothing.
    std::thread::sleep(Duration::from_secs(3));
    let before = total_blocks(&c);
    let dry = c.ok(&["gc", "--grace", "2s", "--json"]);
    let dry: Value = serde_json::from_str(&dry).expect("gc json");
    assert_eq!(dry["removed_blocks"], 0, "{dry}");
    let candidates: u64 = dry["candidates"]
        .as_object()
        .expect("candidates")
        .values()
        .map(|v| v[0].as_u64().unwrap_or(0))
        .sum();
    // deleted.jpg (1 block), the stray block, the writer's 2 full chunks: 4 blocks, 2 copies
    // of each except the stray one (put with 2 replicas too).
    assert!(candidates >= 8, "{dry}");
    assert_eq!(total_blocks(&c), before, "a dry run removed something");

    // A long grace keeps everything young.
    let young: Value =
        serde_json::from_str(&c.ok(&["gc", "--apply", "--grace", "1h", "--json"])).expect("json");
    assert_eq!(young["removed_blocks"], 0, "{young}");

    let applied: Value =
        serde_json::from_str(&c.ok(&["gc", "--apply", "--grace", "2s", "--json"])).expect("json");
    assert_eq!(
        applied["removed_blocks"].as_u64(),
        Some(candidates),
        "{applied}"
    );
    assert_eq!(total_blocks(&c), before - candidates);
    // The stray block is gone; every referenced block still has its two verified copies.
    assert!(c.locate(&stray_hash).is_empty());
    let report = fsck(&c, false);
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["endangered"], 0, "{report}");

    // The surviving files read back whole through a new mount.
    assert_files_through_new_mount(&c, &keep);
}

/// Reads `files` back through a new mount of the volume (nothing of them cached).
fn assert_files_through_new_mount(c: &DevCluster, files: &[(String, Vec<u8>)]) {
    let remount = c.dir.path().join("remount");
    std::fs::create_dir_all(&remount).expect("dir");
    let out = run(c.cmd().arg("mount").arg("uploads").arg(&remount));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _guard = DetachOnDrop(remount.clone());
    assert_files(&remount, files);
}

/// The command line process `pid` runs with (to start a node again after killing it).
fn cmdline_of(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("cmdline")
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Restarts a node killed with -9 from the command line it ran with. The dev cluster's `down`
/// only knows the PIDs it recorded: the returned guard stops this one.
fn restart_killed_node(c: &DevCluster, id: &str, cmdline: &[String]) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(&c.node(id).log)
        .expect("node log");
    let child = Command::new(&cmdline[0])
        .args(&cmdline[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("restarting the node");
    KillOnDrop(child)
}

#[test]
fn a_returning_node_s_surplus_copies_go_once_two_verified_copies_exist_elsewhere() {
    let c = DevCluster::start(3, 2, 1, FAST);
    let mnt = c.mounts[0].clone();
    let files = write_files(&mnt, 6);
    let blocks = fsck(&c, false)["blocks"].as_u64().expect("blocks");
    let status = c.status_json();
    let victim = status["nodes"][0]["id"].as_str().expect("id").to_string();
    let pid = c.node(&victim).pid;
    let cmdline = cmdline_of(pid);
    c.kill9(&victim);
    // Repaired on the two others...
    assert!(
        wait_for(Duration::from_secs(60), || {
            let r = fsck(&c, true);
            r["live_nodes"] == 2 && r["healthy"].as_u64() == Some(blocks)
        })
        .is_some(),
        "{}",
        fsck(&c, false)
    );
    // ... then the node comes back with its old copies: surplus, removed once the copies where
    // placement wants them are verified; every block ends with exactly two copies.
    let _restarted = restart_killed_node(&c, &victim, &cmdline);
    // 13.7 s alone. Copies are counted by fsck, which asks every node's index for the
    // referenced blocks. Twice in CI the nodes' own block counters (`twinfs status`, which count
    // every copy a node holds, referenced or not) summed to 18 for 8 blocks for minutes while
    // the repair scans found nothing left to remove (the second time the logs below showed
    // every removal done). Whether those 2 were unreferenced copies or a counter error is not
    // known yet: a failure prints both views and the nodes' logs.
    let settled = wait_for(Duration::from_secs(120), || {
        let r = fsck(&c, true);
        r["live_nodes"] == 3
            && r["unreachable"].as_array().is_some_and(|u| u.is_empty())
            && r["healthy"].as_u64() == Some(blocks)
            && r["surplus"] == 0
    });
    assert!(
        settled.is_some(),
        "{}\nstatus counters: {} copies for {blocks} blocks; {}\n{}",
        fsck(&c, true),
        total_blocks(&c),
        c.ok(&["status"]),
        c.nodes
            .iter()
            .map(|n| format!("--- {}:\n{}", n.id, log_tail(&n.log, 40)))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let report = fsck(&c, false);
    assert_eq!(report["healthy"].as_u64(), Some(blocks), "{report}");
    assert_eq!(report["surplus"], 0, "{report}");
    assert_files(&mnt, &files);
}

#[test]
fn a_corrupt_chunk_record_is_reported_by_fsck_and_stops_gc() {
    let c = DevCluster::start(2, 2, 1, FAST);
    std::fs::write(c.mounts[0].join("ok.jpg"), random_bytes(50_000)).expect("write");
    let etcd = c.json["etcd"]["endpoints"][0].as_str().expect("etcd");
    let key = "/twinfs/v/uploads/c/0000000000000099/0000000000000000";
    let out = Command::new("etcdctl")
        .args(["--endpoints", etcd, "put", key, "not a chunk record"])
        .output()
        .expect("etcdctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(c.cmd().args(["fsck", "uploads"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("CORRUPT RECORD") && text.contains(key),
        "{text}"
    );
    let out = run(c.cmd().args(["gc", "--apply", "--grace", "2s"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("removes nothing"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_changed_replica_count_is_applied_to_new_writes_and_to_stored_blocks() {
    let c = DevCluster::start(3, 2, 1, FAST);
    let mnt = c.mounts[0].clone();
    let files = write_files(&mnt, 4);
    let blocks = fsck(&c, false)["blocks"].as_u64().expect("blocks");
    // `status` counts copies from the node records, which nodes refresh every 5 s. A put slower
    // than 1 s (CI runs six clusters at once on 2 cores) is also sent to the third node; the
    // repair scans remove such surplus copies.
    assert!(
        wait_for(Duration::from_secs(60), || total_blocks(&c) == 2 * blocks).is_some(),
        "copies: {} for {blocks} blocks; {}",
        total_blocks(&c),
        fsck(&c, false)
    );

    // Up to 3: the stored blocks get a third copy from the repair scans...
    let out = c.ok(&["volume", "set-replicas", "uploads", "3"]);
    assert!(out.contains("3 copies of each block (was 2)"), "{out}");
    let settled = wait_for(Duration::from_secs(60), || {
        total_blocks(&c) == 3 * blocks && fsck(&c, true)["healthy"].as_u64() == Some(blocks)
    });
    assert!(
        settled.is_some(),
        "copies: {} for {blocks} blocks; {}",
        total_blocks(&c),
        fsck(&c, false)
    );
    // ... and a new file is written with 3 copies at once (the mount follows the record).
    let mount_log = PathBuf::from(c.json["mounts"][0]["log"].as_str().expect("mount log"));
    assert!(
        std::fs::read_to_string(&mount_log)
            .unwrap_or_default()
            .contains("volume replica count changed"),
        "{}",
        log_tail(&mount_log, 20)
    );
    let before = total_blocks(&c);
    let extra = random_bytes(300_000);
    std::fs::write(mnt.join("after.jpg"), &extra).expect("write");
    let report = fsck(&c, false);
    let now_blocks = report["blocks"].as_u64().expect("blocks");
    assert_eq!(now_blocks, blocks + 1, "{report}");
    assert_eq!(report["healthy"].as_u64(), Some(now_blocks), "{report}");
    assert!(
        wait_for(Duration::from_secs(30), || total_blocks(&c) == before + 3).is_some(),
        "copies: {} (was {before})",
        total_blocks(&c)
    );

    // Down to 1: the surplus copies go, every file stays whole.
    c.ok(&["volume", "set-replicas", "uploads", "1"]);
    let settled = wait_for(Duration::from_secs(60), || {
        total_blocks(&c) == now_blocks && fsck(&c, true)["healthy"].as_u64() == Some(now_blocks)
    });
    assert!(
        settled.is_some(),
        "copies: {} for {now_blocks} blocks; {}",
        total_blocks(&c),
        fsck(&c, false)
    );
    assert_eq!(fsck(&c, true)["surplus"], 0);
    assert_files(&mnt, &files);
    assert!(std::fs::read(mnt.join("after.jpg")).expect("read") == extra);

    // Out of range, or no such volume: refused, nothing changes.
    for (args, says) in [
        (
            vec!["volume", "set-replicas", "uploads", "0"],
            "not in 1..=5",
        ),
        (
            vec!["volume", "set-replicas", "uploads", "6"],
            "not in 1..=5",
        ),
        (
            vec!["volume", "set-replicas", "nosuch", "2"],
            "does not exist",
        ),
    ] {
        let out = run(c.cmd().args(&args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {err}"
        );
    }
    assert!(c
        .ok(&["volume", "inspect", "uploads"])
        .contains("replicas:    1"));
}

/// A writer mount killed in the middle of a stream of new files (each committed while its
/// block is still being stored, under a pending record): every file whose `close` returned
/// reads back whole through the other mount, every other file reads whole or empty (never an
/// error, never a mix), and fsck then finds no block lost.
#[test]
fn a_writer_mount_killed_mid_stream_leaves_each_new_file_whole_or_empty() {
    let c = DevCluster::start(3, 3, 2, FAST);
    let (a, b) = (c.mounts[0].clone(), c.mounts[1].clone());
    let dir = a.join("stream");
    std::fs::create_dir(&dir).expect("mkdir");
    let content = |i: usize| -> Vec<u8> {
        let line = format!("file {i} of a stream cut short\n");
        line.repeat(200 + i % 300).into_bytes()
    };
    let script = format!(
        "import sys\n\
         i = 0\n\
         while True:\n\
         \x20   line = ('file %d of a stream cut short\\n' % i) * (200 + i % 300)\n\
         \x20   with open('{}/f%05d' % i, 'w') as f:\n\
         \x20       f.write(line)\n\
         \x20   print(i, flush=True)\n\
         \x20   i += 1\n",
        dir.display()
    );
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("writer");
    let mut out = std::io::BufReader::new(writer.stdout.take().expect("stdout"));
    let mut closed = None;
    let mut line = String::new();
    while std::io::BufRead::read_line(&mut out, &mut line).unwrap_or(0) > 0 {
        closed = line.trim().parse::<usize>().ok();
        line.clear();
        if closed >= Some(300) {
            break;
        }
    }
    // The next file's close is most likely under way about a millisecond later (most of a
    // new file's time goes to its close): the kill then falls between its commit and the end
    // of its put. Where it falls does not change what must hold.
    std::thread::sleep(Duration::from_micros(1200));
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is this test's mount process.
    unsafe {
        libc::kill(c.mount_pids[0] as i32, libc::SIGKILL);
    }
    // Files whose close returned before the kill, as far as this test saw.
    let closed = closed.expect("the writer closed files");
    while std::io::BufRead::read_line(&mut out, &mut line).unwrap_or(0) > 0 {}
    let _ = writer.kill();
    let _ = writer.wait();

    let seen = b.join("stream");
    wait_for(Duration::from_secs(10), || {
        std::fs::read_dir(&seen).map(|d| d.count()).unwrap_or(0) > closed
    })
    .expect("the committed files appear through the other mount");
    let mut names: Vec<String> = std::fs::read_dir(&seen)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let (mut whole, mut empty) = (0, 0);
    for name in &names {
        let i: usize = name[1..].parse().expect("a file of the stream");
        let got = std::fs::read(seen.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        if got == content(i) {
            whole += 1;
        } else {
            assert!(
                got.is_empty() && i > closed,
                "{name}: {} bytes, neither its content nor empty (closed up to {closed})",
                got.len()
            );
            empty += 1;
        }
    }
    assert!(whole > closed, "{whole} whole files, {closed} closed");
    eprintln!("{whole} files whole, {empty} empty (in flight when the writer died)");
    // Readers settled what was missing; the repair scans settle what landed.
    let settled = wait_for(Duration::from_secs(20), || {
        let r = fsck(&c, true);
        r["lost"] == 0 && r["endangered"] == 0 && r["in_flight"] == 0
    });
    assert!(settled.is_some(), "{}", fsck(&c, true));
}

/// Sends `sig` to a process this test started.
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is one of this test's processes.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// The writing mount dies while the put of a new file's block cannot finish (every node
/// stopped) but the file's transaction has committed: the other mount sees the file at once.
/// With `nodes_die`, the stopped nodes are killed and restarted, so the block never lands:
/// once the dead writer's session is gone, the first read withdraws the content (the file is
/// empty), or, with `deleted`, the file is unlinked unread and the repair scans delete its
/// record. Otherwise the nodes go on and the file reads whole if the block landed (the repair
/// scans then delete the pending record), empty if the writer died before sending it. Never
/// an error, never part of the content; fsck finds nothing lost and no record left.
fn writer_killed_while_its_put_hangs(nodes_die: bool, deleted: bool) {
    let c = DevCluster::start(3, 3, 2, FAST);
    let (a, b) = (c.mounts[0].clone(), c.mounts[1].clone());
    std::fs::create_dir(a.join("up")).expect("mkdir");
    std::fs::write(a.join("up/before.txt"), b"stored before").expect("write");
    let content = b"committed while its block was still on the way\n".repeat(100);
    let cmdlines: Vec<Vec<String>> = c.nodes.iter().map(|n| cmdline_of(n.pid)).collect();
    for n in &c.nodes {
        signal(n.pid, libc::SIGSTOP);
    }
    let target = a.join("up/pending.txt");
    let mut writer = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "open('{}', 'wb').write(b'committed while its block was still on the way\\n' * 100)",
            target.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("writer");
    let seen = b.join("up/pending.txt");
    let visible = wait_for(Duration::from_secs(2), || {
        std::fs::metadata(&seen).is_ok_and(|m| m.len() == content.len() as u64)
    });
    // The writer's close is still waiting for its put.
    let closed = writer.try_wait().expect("writer").is_some();
    signal(c.mount_pids[0], libc::SIGKILL);
    let mut restarted = Vec::new();
    for (n, cmdline) in c.nodes.iter().zip(&cmdlines) {
        if nodes_die {
            signal(n.pid, libc::SIGKILL);
            signal(n.pid, libc::SIGCONT);
            wait_for(Duration::from_secs(10), || {
                !alive(n.pid) || is_zombie(n.pid)
            })
            .expect("the node died");
            restarted.push(restart_killed_node(&c, &n.id, cmdline));
        } else {
            signal(n.pid, libc::SIGCONT);
        }
    }
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(visible.is_some(), "the commit did not wait for the put");
    assert!(!closed, "close returned before its block was stored");

    let reads_back = |f: &Path| wait_for(Duration::from_secs(30), || std::fs::read(f).is_ok());
    reads_back(&b.join("up/before.txt")).expect("the nodes serve again");
    if deleted {
        std::fs::remove_file(&seen).expect("unlink through the other mount");
    } else {
        let got = std::fs::read(&seen).expect("read through the other mount");
        if nodes_die {
            assert!(
                got.is_empty(),
                "{} bytes of a block that never landed",
                got.len()
            );
        } else {
            // Whether the block lands depends on how much of it the writer sent before it
            // died (a stopped node grants no new streams): either way, all or nothing.
            assert!(
                got == content || got.is_empty(),
                "{} bytes: neither the content nor empty",
                got.len()
            );
        }
    }
    assert_eq!(
        std::fs::read(b.join("up/before.txt")).expect("read"),
        b"stored before"
    );
    let settled = wait_for(Duration::from_secs(30), || {
        let r = fsck(&c, true);
        r["lost"] == 0 && r["endangered"] == 0 && r["pending_records"] == 0
    });
    assert!(settled.is_some(), "{}", fsck(&c, true));
}

#[test]
fn a_writer_mount_killed_while_its_put_hangs_leaves_the_file_whole_or_empty() {
    writer_killed_while_its_put_hangs(false, false);
}

#[test]
fn a_writer_mount_killed_with_its_block_lost_leaves_the_file_empty() {
    writer_killed_while_its_put_hangs(true, false);
}

#[test]
fn a_lost_pending_file_deleted_unread_leaves_no_record() {
    writer_killed_while_its_put_hangs(true, true);
}

/// Small blocks go to each node's append-only log, their index entries committed later in
/// batches: a node killed with -9 right after acknowledging them lost those entries from
/// memory. Restarted, it replays its log: every block is indexed and served again, nothing is
/// counted lost, and the files read back whole through a new mount.
#[test]
fn small_blocks_acknowledged_just_before_every_node_is_killed_are_there_after_restart() {
    let c = DevCluster::start(3, 2, 1, FAST);
    let mnt = c.mounts[0].clone();
    // Fewer small blocks per node than one index batch (64): none of their entries was
    // committed when the nodes die.
    let files: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| (format!("small-{i}.txt"), random_bytes(1_000 + i * 2_000)))
        .collect();
    for (name, data) in &files {
        std::fs::write(mnt.join(name), data).expect("write");
    }
    let cmdlines: Vec<Vec<String>> = c.nodes.iter().map(|n| cmdline_of(n.pid)).collect();
    for n in &c.nodes {
        c.kill9(&n.id);
    }
    let _restarted: Vec<KillOnDrop> = c
        .nodes
        .iter()
        .zip(&cmdlines)
        .map(|(n, cmdline)| restart_killed_node(&c, &n.id, cmdline))
        .collect();
    let blocks = files.len() as u64;
    let settled = wait_for(Duration::from_secs(60), || {
        let r = fsck(&c, false);
        r["live_nodes"] == 3 && r["healthy"].as_u64() == Some(blocks) && r["lost"] == 0
    });
    assert!(settled.is_some(), "{}", fsck(&c, false));
    assert_files_through_new_mount(&c, &files);
}
