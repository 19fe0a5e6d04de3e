//! Two instances ("nodes") racing on one directory, with the second one's change slipped in
//! between the first one's reads and its transaction (MemKv's `before_next_txn` hook).

use std::sync::Arc;

use futures::executor::block_on;
use twinfs_core::{Fs, FsError, FsOptions, MemBlocks, MemKv, ROOT_INO};

/// The hook runs inside A's executor; B's operation gets an executor of its own.
fn on_other_thread(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(f).join().expect("B's operation");
}

fn two_nodes() -> (Arc<MemKv>, Arc<Fs>, Arc<Fs>) {
    let kv = Arc::new(MemKv::new());
    let blocks = Arc::new(MemBlocks::new());
    let a = block_on(Fs::open_volume(
        kv.clone(),
        blocks.clone(),
        "v",
        FsOptions::default(),
    ))
    .unwrap();
    let b = block_on(Fs::open_volume(
        kv.clone(),
        blocks,
        "v",
        FsOptions::default(),
    ))
    .unwrap();
    (kv, Arc::new(a), Arc::new(b))
}

#[test]
fn creates_in_one_directory_from_two_nodes_do_not_conflict() {
    let (kv, a, b) = two_nodes();
    let dir = block_on(a.mkdir(ROOT_INO, b"uploads", 0o755, 0, 0)).unwrap();
    let before = kv.stats().failed_txns;
    // B creates a file in the same directory after A has read it, before A commits.
    let b2 = b.clone();
    let dino = dir.ino;
    kv.before_next_txn(move |_| {
        on_other_thread(move || {
            block_on(b2.create(dino, b"from-b.jpg", 0o644, 0, 0, true)).unwrap();
        });
    });
    block_on(a.create(dir.ino, b"from-a.jpg", 0o644, 0, 0, true)).unwrap();
    assert_eq!(
        kv.stats().failed_txns,
        before,
        "a create must not conflict with another node's create in the same directory"
    );
    let names: Vec<Vec<u8>> = block_on(a.readdir(dir.ino, 0, 100))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names.len(), 2);
    // Both nodes see the directory's mtime move.
    let t = block_on(b.getattr(dir.ino)).unwrap().mtime_ns;
    assert!(t >= dir.mtime_ns);
    assert_eq!(block_on(a.getattr(dir.ino)).unwrap().mtime_ns, t);
}

#[test]
fn rmdir_racing_a_create_in_that_directory_never_loses_the_new_entry() {
    let (kv, a, b) = two_nodes();
    let dir = block_on(a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
    // A has seen `d` empty; B creates a file in it just before A's rmdir commits.
    let b2 = b.clone();
    let dino = dir.ino;
    kv.before_next_txn(move |_| {
        on_other_thread(move || {
            block_on(b2.create(dino, b"late", 0o644, 0, 0, true)).unwrap();
        });
    });
    let r = block_on(a.rmdir(ROOT_INO, b"d"));
    assert_eq!(r, Err(FsError::NotEmpty));
    // The directory and B's file are both still there.
    let late = block_on(a.lookup(dir.ino, b"late")).unwrap();
    assert_eq!(block_on(b.getattr(late.ino)).unwrap().nlink, 1);
}

#[test]
fn create_in_a_directory_removed_meanwhile_fails_cleanly() {
    let (kv, a, b) = two_nodes();
    let dir = block_on(a.mkdir(ROOT_INO, b"gone", 0o755, 0, 0)).unwrap();
    let b2 = b.clone();
    kv.before_next_txn(move |_| {
        on_other_thread(move || block_on(b2.rmdir(ROOT_INO, b"gone")).unwrap());
    });
    let r = block_on(a.create(dir.ino, b"f", 0o644, 0, 0, true));
    assert_eq!(r.map(|_| ()), Err(FsError::NotFound));
    assert!(block_on(b.readdir(ROOT_INO, 0, 10)).unwrap().is_empty());
}

#[test]
fn utimens_on_a_directory_sticks_and_later_creates_move_it_again() {
    let (_kv, a, b) = two_nodes();
    let dir = block_on(a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
    block_on(a.create(dir.ino, b"x", 0o644, 0, 0, true)).unwrap();
    let past = 1_000_000_000i64;
    let sa = twinfs_core::SetAttr {
        mtime: Some(twinfs_core::TimeSet::Ns(past)),
        ..Default::default()
    };
    assert_eq!(block_on(a.setattr(dir.ino, sa)).unwrap().mtime_ns, past);
    assert_eq!(block_on(b.getattr(dir.ino)).unwrap().mtime_ns, past);
    block_on(b.unlink(dir.ino, b"x")).unwrap();
    assert!(block_on(a.getattr(dir.ino)).unwrap().mtime_ns > past);
}
