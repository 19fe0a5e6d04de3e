//! Usage accounting and the quota: delta arithmetic, retried and unknown-outcome
//! transactions, folding, corrupt values, old volumes without a base.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

mod support;

use futures::executor::block_on;
use support::{HookedKv, Hooks};
use twinfs_core::usage::{read_usage, scan_file_bytes};
use twinfs_core::{
    Fs, FsError, FsOptions, KvError, MemBlocks, MemKv, MetaKv, RenameFlags, SetAttr, TxnOp,
    ROOT_INO,
};

fn opts() -> FsOptions {
    FsOptions {
        chunk_size: 16,
        max_txn_ops: 8,
        ..FsOptions::default()
    }
}

fn open(kv: Arc<dyn MetaKv>, blocks: Arc<MemBlocks>) -> Fs {
    block_on(Fs::open_volume(kv, blocks, "v", opts())).unwrap()
}

/// base + every delta, as stored.
fn accounted(kv: &dyn MetaKv, fs: &Fs) -> i64 {
    let u = block_on(read_usage(kv, fs.keys())).unwrap();
    u.deltas.iter().fold(u.base.unwrap(), |a, d| a + d.2)
}

fn files(kv: &dyn MetaKv, fs: &Fs) -> i64 {
    block_on(scan_file_bytes(kv, fs.keys())).unwrap().0 as i64
}

fn write_file(fs: &Fs, name: &[u8], len: usize) -> u64 {
    block_on(async {
        let (attr, _) = fs.create(ROOT_INO, name, 0o644, 0, 0, true).await.unwrap();
        let mut h = fs.open_created(&attr).unwrap();
        fs.write(&mut h, 0, &vec![7u8; len]).await.unwrap();
        fs.release(h).await.unwrap();
        attr.ino
    })
}

#[test]
fn every_size_change_is_accounted_once() {
    let kv = Arc::new(MemKv::new());
    let blocks = Arc::new(MemBlocks::new());
    let a = open(kv.clone(), blocks.clone());
    let b = open(kv.clone(), blocks.clone());
    let check = |what: &str| {
        assert_eq!(accounted(&*kv, &a), files(&*kv, &a), "after {what}");
    };
    check("format");
    assert_eq!(block_on(read_usage(&*kv, a.keys())).unwrap().base, Some(0));
    let f = write_file(&a, b"f", 100);
    check("write");
    assert_eq!(a.usage_bytes(), 100);
    let g = write_file(&b, b"g", 40);
    check("write through b");
    block_on(a.setattr(
        f,
        SetAttr {
            size: Some(30),
            ..Default::default()
        },
    ))
    .unwrap();
    check("truncate down (several steps of 8 ops)");
    block_on(b.setattr(
        f,
        SetAttr {
            size: Some(500),
            ..Default::default()
        },
    ))
    .unwrap();
    check("truncate up through the other instance");
    // A rename replacing a file purges it in the same transaction.
    block_on(a.rename(ROOT_INO, b"g", ROOT_INO, b"f", RenameFlags::default())).unwrap();
    check("rename over a file");
    assert_eq!(files(&*kv, &a), 40);
    // Unlinked while open: counts until the last close purges it.
    let h = block_on(b.open(g)).unwrap();
    block_on(b.unlink(ROOT_INO, b"f")).unwrap();
    check("unlink of an open file");
    assert_eq!(accounted(&*kv, &a), 40);
    block_on(b.release(h)).unwrap();
    check("last close");
    assert_eq!(accounted(&*kv, &a), 0);
    // Each instance knows its own changes; the view of the others comes from load_usage
    // (at mount) or the watch.
    assert_eq!(a.usage_bytes() + b.usage_bytes(), 0);
    block_on(a.load_usage()).unwrap();
    assert_eq!(a.usage_bytes(), 0);
}

#[test]
fn a_retried_flush_counts_its_growth_once() {
    let kv = Arc::new(MemKv::new());
    let blocks = Arc::new(MemBlocks::new());
    let a = Arc::new(open(kv.clone(), blocks.clone()));
    let b = Arc::new(open(kv.clone(), blocks.clone()));
    let ino = write_file(&a, b"f", 10);
    let mut h = block_on(a.open(ino)).unwrap();
    block_on(a.write(&mut h, 0, &[1u8; 50])).unwrap();
    // B changes the inode between A's reads and its transaction: A's flush retries.
    let b2 = b.clone();
    kv.before_next_txn(move |_| {
        std::thread::spawn(move || {
            block_on(b2.setattr(
                ino,
                SetAttr {
                    size: Some(20),
                    ..Default::default()
                },
            ))
            .unwrap();
        })
        .join()
        .unwrap();
    });
    let failed = kv.stats().failed_txns;
    block_on(a.flush(&mut h)).unwrap();
    assert!(
        kv.stats().failed_txns > failed,
        "the flush must have been retried"
    );
    block_on(a.release(h)).unwrap();
    assert_eq!(files(&*kv, &a), 50);
    assert_eq!(accounted(&*kv, &a), 50);
    assert_eq!(a.usage_bytes() + b.usage_bytes(), 50);
}

/// The next transaction commits and then reports an error (etcd timing out after applying
/// it: the outcome is unknown to the caller).
struct LostReply {
    fail_next: AtomicBool,
}

impl Hooks for LostReply {
    fn after_txn(&self, outcome: Result<bool, KvError>) -> Result<bool, KvError> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(KvError::Unavailable("reply lost".into()));
        }
        outcome
    }
}

#[test]
fn a_transaction_with_unknown_outcome_is_not_counted_twice() {
    let kv = Arc::new(HookedKv {
        inner: Arc::new(MemKv::new()),
        hooks: LostReply {
            fail_next: AtomicBool::new(false),
        },
    });
    let blocks = Arc::new(MemBlocks::new());
    // One slot in use at a time here, but commits rotate over the slots: lose a reply on
    // every slot once.
    let a = open(kv.clone(), blocks);
    let ino = write_file(&a, b"f", 0);
    for round in 1..=6u64 {
        kv.hooks.fail_next.store(true, Ordering::SeqCst);
        let r = block_on(a.setattr(
            ino,
            SetAttr {
                size: Some(round * 10),
                ..Default::default()
            },
        ));
        assert!(matches!(r, Err(FsError::Kv(_))), "{r:?}");
        // It did commit; the next change re-reads the slot it used before adding to it.
        block_on(a.setattr(
            ino,
            SetAttr {
                size: Some(round * 10 + 1),
                ..Default::default()
            },
        ))
        .unwrap();
        assert_eq!(accounted(&*kv, &a), files(&*kv, &a), "round {round}");
    }
    // Once everything has been re-read, the instance's own count is exact as well.
    for i in 0..9 {
        // Changing sizes: a transaction without a size change uses no slot.
        block_on(a.setattr(
            ino,
            SetAttr {
                size: Some(61 + i % 2),
                ..Default::default()
            },
        ))
        .unwrap();
    }
    assert_eq!(a.usage_bytes(), 61);
}

#[test]
fn writes_past_the_quota_fail_with_enospc_and_the_rest_always_works() {
    let kv = Arc::new(MemKv::new());
    let blocks = Arc::new(MemBlocks::new());
    let a = open(kv.clone(), blocks.clone());
    a.set_quota(Some(100));
    block_on(async {
        let (attr, _) = a.create(ROOT_INO, b"f", 0o644, 0, 0, true).await.unwrap();
        let mut h = a.open_created(&attr).unwrap();
        a.write(&mut h, 0, &[1u8; 60]).await.unwrap();
        // Unflushed growth counts: a second file cannot take more than 40.
        let (g, _) = a.create(ROOT_INO, b"g", 0o644, 0, 0, true).await.unwrap();
        let mut hg = a.open_created(&g).unwrap();
        a.write(&mut hg, 0, &[2u8; 30]).await.unwrap();
        let e = a.write(&mut hg, 30, &[2u8; 11]).await.unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(a.quota_left(), Some(10));
        // Overwriting within the size works at the limit, and what was written is intact.
        a.write(&mut hg, 0, &[3u8; 30]).await.unwrap();
        a.write(&mut hg, 30, &[3u8; 10]).await.unwrap();
        assert_eq!(a.quota_left(), Some(0));
        a.release(hg).await.unwrap();
        a.release(h).await.unwrap();
        assert_eq!(a.usage_bytes(), 100);
        assert_eq!(a.quota_left(), Some(0));
        // Truncating up (fallocate goes the same way) is growth too.
        let e = a
            .setattr(
                attr.ino,
                SetAttr {
                    size: Some(61),
                    ..Default::default()
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC);
        // Shrinking and unlinking always work, and give the space back.
        a.setattr(
            attr.ino,
            SetAttr {
                size: Some(50),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert_eq!(a.quota_left(), Some(10));
        a.unlink(ROOT_INO, b"g").await.unwrap();
        assert_eq!(a.quota_left(), Some(50));
        let h = a.open(attr.ino).await.unwrap();
        let got = a.read(&h, 0, 100).await.unwrap();
        assert_eq!(&got[..], &[1u8; 50][..]);
        a.release(h).await.unwrap();
    });
    // Another instance's usage counts once it knows it (the watch, or load_usage).
    let b = open(kv.clone(), blocks);
    b.set_quota(Some(100));
    block_on(b.load_usage()).unwrap();
    assert_eq!(b.quota_left(), Some(50));
    let e = block_on(async {
        let (attr, _) = b.create(ROOT_INO, b"h", 0o644, 0, 0, true).await.unwrap();
        let mut h = b.open_created(&attr).unwrap();
        let r = b.write(&mut h, 0, &[1u8; 51]).await;
        b.release(h).await.unwrap();
        r
    })
    .unwrap_err();
    assert_eq!(e, FsError::NoSpace);
}

#[test]
fn folding_keeps_the_total_and_removes_the_keys() {
    let kv = Arc::new(MemKv::new());
    let blocks = Arc::new(MemBlocks::new());
    let a = open(kv.clone(), blocks.clone());
    let b = open(kv.clone(), blocks.clone());
    write_file(&a, b"a", 30);
    write_file(&b, b"b", 12);
    let deltas = |kv: &MemKv| kv.scan_prefix(&a.keys().usage_deltas()).len();
    assert!(deltas(&kv) >= 2);
    // A stops cleanly.
    assert_eq!(block_on(a.fold_own_usage()).unwrap(), 30);
    assert_eq!(accounted(&*kv, &a), 42);
    assert!(kv
        .scan_prefix(&a.keys().usage_deltas_of(a.instance_id()))
        .is_empty());
    // B crashes (no fold); C starts, with only itself registered.
    let b_instance = b.instance_id();
    drop(b);
    let c = open(kv.clone(), blocks);
    block_on(c.load_usage()).unwrap();
    assert_eq!(c.usage_bytes(), 42);
    let live: HashSet<u64> = [c.instance_id()].into();
    assert_eq!(
        block_on(c.fold_dead_usage(&live)).unwrap(),
        vec![b_instance]
    );
    assert_eq!(deltas(&kv), 0);
    assert_eq!(block_on(read_usage(&*kv, c.keys())).unwrap().base, Some(42));
    assert_eq!(c.usage_bytes(), 42);
    assert_eq!(accounted(&*kv, &c), files(&*kv, &c));
    // A live instance's keys are never folded by another.
    write_file(&c, b"c", 5);
    let d = open(kv.clone(), Arc::new(MemBlocks::new()));
    let live: HashSet<u64> = [c.instance_id(), d.instance_id()].into();
    assert!(block_on(d.fold_dead_usage(&live)).unwrap().is_empty());
    assert_eq!(accounted(&*kv, &c), 47);
}

#[test]
fn corrupt_values_count_as_zero_and_are_reported() {
    let kv = Arc::new(MemKv::new());
    let blocks = Arc::new(MemBlocks::new());
    let a = open(kv.clone(), blocks.clone());
    write_file(&a, b"f", 25);
    let bad = a.keys().usage_delta(0x1234, 0);
    kv.put_sync(&bad, b"\x01{\"bytes\":\"lots\"}");
    let b = open(kv.clone(), blocks);
    let report = block_on(b.load_usage()).unwrap();
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(b.usage_bytes(), 25);
    assert_eq!(b.usage_corrupt_keys().len(), 1);
    // Through the watch path too; a good value later clears it.
    let w = b.usage_apply(&[(bad.clone(), Some(b"garbage".to_vec()))]);
    assert_eq!(w.len(), 1);
    b.usage_apply(&[(bad, Some(b"\x01{\"bytes\":5}".to_vec()))]);
    assert!(b.usage_corrupt_keys().is_empty());
    assert_eq!(b.usage_bytes(), 30);
    // A corrupt base too.
    kv.put_sync(&a.keys().usage_base(), b"\xff");
    let report = block_on(b.load_usage()).unwrap();
    assert_eq!(report.corrupt.len(), 2);
}

#[test]
fn a_volume_without_a_base_gets_one_from_a_scan() {
    let kv = Arc::new(MemKv::new());
    let blocks = Arc::new(MemBlocks::new());
    let a = open(kv.clone(), blocks.clone());
    write_file(&a, b"f", 33);
    write_file(&a, b"g", 7);
    // As a volume from before usage accounting: no usage keys at all.
    let prefix = a.keys().usage();
    kv.txn_sync(
        vec![],
        vec![TxnOp::DeleteRange {
            start: prefix.clone(),
            end: twinfs_core::prefix_end(&prefix),
        }],
    )
    .unwrap();
    let b = open(kv.clone(), blocks);
    let report = block_on(b.load_usage()).unwrap();
    assert_eq!(report.base, Some(40));
    assert_eq!(b.usage_bytes(), 40);
    assert_eq!(accounted(&*kv, &b), 40);
}
