//! Two instances ("nodes") racing on one directory, with the second one's change slipped in
//! between the first one's reads and its transaction (MemKv's `before_next_txn` hook).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

mod support;

use futures::executor::block_on;
use support::{HookedKv, Hooks};
use twinfs_core::{Fs, FsError, FsOptions, MemBlocks, MemKv, ROOT_INO};

/// The hook runs inside A's executor; B's operation gets an executor of its own.
fn on_other_thread(f: impl FnOnce() + Send + 'static) {
    std::thread::spawn(f).join().expect("B's operation");
}

/// A `flock` caller that never gets a signal.
fn never() -> bool {
    false
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

type Snapshot = std::collections::HashMap<Vec<u8>, (Vec<u8>, i64)>;

/// A watch cache that answers from a snapshot taken earlier ([`HookedKv::freeze`]): as stale
/// as a cache can be.
#[derive(Default)]
struct StaleCache {
    snapshot: std::sync::Mutex<Snapshot>,
    /// Reads that went to the store (not the cache).
    reads: AtomicU64,
    /// The store's session number (0: none).
    session: AtomicU64,
}

impl Hooks for StaleCache {
    fn on_read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }
    fn cached(&self, key: &[u8]) -> twinfs_core::kv::Versioned {
        self.snapshot.lock().unwrap().get(key).cloned()
    }
    /// As a cache that holds every directory whole: absent if not in the snapshot.
    fn cached_absent(&self, key: &[u8], within: &[u8]) -> bool {
        key.starts_with(within) && !self.snapshot.lock().unwrap().contains_key(key)
    }
    fn session(&self) -> Option<u64> {
        Some(self.session.load(Ordering::Relaxed)).filter(|s| *s != 0)
    }
}

impl HookedKv<StaleCache> {
    fn freeze(&self) {
        let all = self.inner.scan_prefix(b"");
        let mut s = self.hooks.snapshot.lock().unwrap();
        s.clear();
        for e in all {
            s.insert(e.key, (e.value, e.mod_revision));
        }
    }
    fn reads(&self) -> u64 {
        self.hooks.reads.load(Ordering::Relaxed)
    }
}

/// Two instances of one volume: A reads through a cache that [`HookedKv::freeze`] fixes in
/// time, B reads the store directly.
fn stale_pair() -> (Arc<MemKv>, Arc<HookedKv<StaleCache>>, Fs, Fs) {
    stale_pair_with(FsOptions::default())
}

/// [`stale_pair`] with A's options.
fn stale_pair_with(opts: FsOptions) -> (Arc<MemKv>, Arc<HookedKv<StaleCache>>, Fs, Fs) {
    let mem = Arc::new(MemKv::new());
    let kv = Arc::new(HookedKv {
        inner: mem.clone(),
        hooks: StaleCache::default(),
    });
    let blocks = Arc::new(MemBlocks::new());
    let a = block_on(Fs::open_volume(kv.clone(), blocks.clone(), "v", opts)).unwrap();
    let b = block_on(Fs::open_volume(
        mem.clone(),
        blocks,
        "v",
        FsOptions::default(),
    ))
    .unwrap();
    (mem, kv, a, b)
}

/// A mount answers the lookup of a name absent from a directory it made (and claimed) from
/// its cache, however stale, because nobody else makes names there while it holds the claim:
/// another instance's create first fails its comparison on the claim, recalls it, and waits
/// until the holder gave it up (which the holder's watch does; here the test). From then on,
/// the former holder asks the store, and finds the new name at once.
#[test]
fn a_claimed_directory_answers_absent_names_until_another_mount_recalls_the_claim() {
    let (mem, kv, a, b) = stale_pair_with(FsOptions {
        cached_lookups: true,
        ..FsOptions::default()
    });
    kv.hooks.session.store(1, Ordering::Relaxed);
    let dir = block_on(a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
    kv.freeze();
    let reads = kv.reads();
    assert_eq!(
        block_on(a.lookup(dir.ino, b"taken")).map(|_| ()),
        Err(FsError::NotFound)
    );
    assert_eq!(kv.reads(), reads, "answered without the store");

    // B's create waits for the claim; A gives it up when the recall shows.
    let b = Arc::new(b);
    let creator = {
        let b = b.clone();
        std::thread::spawn(move || block_on(b.create(dir.ino, b"taken", 0o600, 7, 7, true)))
    };
    let recall = twinfs_core::schema::Keys::new("v").recall(dir.ino);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while mem.get_sync(&recall).is_none() {
        assert!(std::time::Instant::now() < deadline, "B asks for the claim");
        std::thread::yield_now();
    }
    block_on(a.release_claim(dir.ino)).unwrap();
    let (theirs, created) = creator.join().expect("B's create").unwrap();
    assert!(created);
    assert_eq!(
        block_on(a.lookup(dir.ino, b"taken")).map(|x| x.ino),
        Ok(theirs.ino),
        "found through A at once, its cache still stale"
    );
    let keys = twinfs_core::schema::Keys::new("v");
    assert_eq!(mem.get_sync(&keys.claim(dir.ino)), None);
    assert_eq!(mem.get_sync(&recall), None);
    // Claims made under a session that lapsed are void: lookups there go to the store.
    let dir2 = block_on(a.mkdir(ROOT_INO, b"d2", 0o755, 0, 0)).unwrap();
    kv.freeze();
    let reads = kv.reads();
    assert!(block_on(a.lookup(dir2.ino, b"x")).is_err());
    assert_eq!(kv.reads(), reads, "claimed");
    kv.hooks.session.store(2, Ordering::Relaxed);
    assert!(block_on(a.lookup(dir2.ino, b"x")).is_err());
    assert!(kv.reads() > reads, "the claim lapsed with its session");
}

/// readdirplus takes each entry's attributes where getattr would (the watch cache): listing a
/// directory the cache holds reads only its page of entries from the store, and an entry the
/// cache lacks (another mount made it since) is read, never left out or made up.
#[test]
fn a_listing_with_attributes_reads_only_what_the_cache_lacks() {
    let (_mem, kv, a, b) = stale_pair_with(FsOptions {
        cached_lookups: true,
        ..FsOptions::default()
    });
    let dir = block_on(a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
    for i in 0..40 {
        let name = format!("f{i}");
        block_on(a.create(dir.ino, name.as_bytes(), 0o644, 0, 0, true)).unwrap();
    }
    block_on(a.mkdir(dir.ino, b"sub", 0o700, 0, 0)).unwrap();
    kv.freeze();

    let reads = kv.reads();
    let entries = block_on(a.readdir(dir.ino, 0, 100)).unwrap();
    assert_eq!(entries.len(), 41);
    let attrs = block_on(a.entry_attrs(&entries)).unwrap();
    assert_eq!(kv.reads(), reads + 1, "one read: the page of entries");
    for (e, attr) in entries.iter().zip(&attrs) {
        let attr = attr.as_ref().expect("every entry has attributes");
        assert_eq!(
            attr,
            &block_on(a.getattr(e.ino)).unwrap(),
            "as getattr answers"
        );
    }

    // B makes a file after the snapshot: A's listing finds it in the store, with its attributes.
    let (late, _) = block_on(b.create(dir.ino, b"late", 0o600, 7, 7, true)).unwrap();
    let entries = block_on(a.readdir(dir.ino, 0, 100)).unwrap();
    let attrs = block_on(a.entry_attrs(&entries)).unwrap();
    let i = entries
        .iter()
        .position(|e| e.name == b"late")
        .expect("listed");
    let attr = attrs[i].as_ref().expect("read from the store");
    assert_eq!((attr.ino, attr.perm, attr.uid), (late.ino, 0o600, 7));
    assert_eq!(attrs.iter().filter(|a| a.is_none()).count(), 0);
}

#[test]
fn a_stale_metadata_cache_never_makes_a_wrong_answer() {
    let (mem, kv, a, b) = stale_pair();
    let dir = block_on(a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
    kv.freeze();
    // After the snapshot: B changes the directory (chmod) and creates a name in it.
    let sa = twinfs_core::SetAttr {
        mode: Some(0o700),
        ..Default::default()
    };
    block_on(b.setattr(dir.ino, sa)).unwrap();
    block_on(b.create(dir.ino, b"taken", 0o644, 0, 0, true)).unwrap();
    // A's creates start from the stale parent; etcd's compares catch it and the retry reads.
    let failed_before = mem.stats().failed_txns;
    block_on(a.create(dir.ino, b"new", 0o644, 0, 0, true)).unwrap();
    assert!(
        mem.stats().failed_txns > failed_before,
        "the first attempt used the (stale) cached parent"
    );
    assert_eq!(
        block_on(a.create(dir.ino, b"taken", 0o644, 0, 0, true)).map(|_| ()),
        Err(FsError::Exists)
    );
    let (existing, created) = block_on(a.create(dir.ino, b"taken", 0o644, 0, 0, false)).unwrap();
    assert!(!created);
    assert_eq!(
        existing.ino,
        block_on(b.lookup(dir.ino, b"taken")).unwrap().ino
    );
    // A directory removed after the snapshot: no create inside it.
    block_on(b.unlink(dir.ino, b"taken")).unwrap();
    block_on(b.unlink(dir.ino, b"new")).unwrap();
    block_on(b.rmdir(ROOT_INO, b"d")).unwrap();
    assert_eq!(
        block_on(a.create(dir.ino, b"ghost", 0o644, 0, 0, true)).map(|_| ()),
        Err(FsError::NotFound)
    );
    assert!(block_on(b.readdir(ROOT_INO, 0, 10)).unwrap().is_empty());
}

#[test]
fn unlinks_from_a_stale_cache_remove_exactly_what_etcd_holds() {
    let (mem, kv, a, b) = stale_pair();
    for name in [&b"gone"[..], b"linked", b"replaced", b"plain"] {
        block_on(a.create(ROOT_INO, name, 0o644, 0, 0, true)).unwrap();
    }
    let old_replaced = block_on(a.lookup(ROOT_INO, b"replaced")).unwrap().ino;
    kv.freeze();

    // The plain case: the cache is right, and the unlink needs no read and no retry.
    let (failed_before, reads_before) = (mem.stats().failed_txns, kv.reads());
    block_on(a.unlink(ROOT_INO, b"plain")).unwrap();
    assert_eq!(mem.stats().failed_txns, failed_before, "one transaction");
    assert_eq!(kv.reads(), reads_before, "no read: all from the cache");
    assert_eq!(
        block_on(b.lookup(ROOT_INO, b"plain")).map(|_| ()),
        Err(FsError::NotFound)
    );

    // After the snapshot, B removes one name, hard-links another and replaces a third.
    block_on(b.unlink(ROOT_INO, b"gone")).unwrap();
    let linked = block_on(b.lookup(ROOT_INO, b"linked")).unwrap().ino;
    block_on(b.link(linked, ROOT_INO, b"linked2")).unwrap();
    block_on(b.create(ROOT_INO, b"new", 0o644, 0, 0, true)).unwrap();
    block_on(b.rename(ROOT_INO, b"new", ROOT_INO, b"replaced", Default::default())).unwrap();

    // The cache still shows the old state; each unlink must act on etcd's.
    assert_eq!(
        block_on(a.unlink(ROOT_INO, b"gone")),
        Err(FsError::NotFound)
    );
    block_on(a.unlink(ROOT_INO, b"linked")).unwrap();
    let survivor = block_on(b.lookup(ROOT_INO, b"linked2")).unwrap();
    assert_eq!(survivor.ino, linked);
    assert_eq!(survivor.nlink, 1, "the other link keeps the inode");
    block_on(a.unlink(ROOT_INO, b"replaced")).unwrap();
    assert_eq!(
        block_on(b.lookup(ROOT_INO, b"replaced")).map(|_| ()),
        Err(FsError::NotFound)
    );
    assert_eq!(
        block_on(b.getattr(old_replaced)).map(|_| ()),
        Err(FsError::NotFound),
        "the replaced inode went with the rename"
    );
    let names: Vec<Vec<u8>> = block_on(b.readdir(ROOT_INO, 0, 10))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b"linked2".to_vec()]);
}

#[test]
fn a_new_files_first_flush_reads_nothing_and_a_wrong_guess_costs_only_a_retry() {
    let (mem, kv, a, b) = stale_pair();
    let read_back = |fs: &Fs, ino: u64| {
        block_on(async {
            let h = fs.open(ino).await.unwrap();
            let data = fs.read(&h, 0, 1 << 10).await.unwrap();
            fs.release(h).await.unwrap();
            data.to_vec()
        })
    };
    // Plain case: create, write, close through A, the cache knowing the new inode (as the
    // mount's write-through does): the flush's only store access is its transaction.
    let (attr, created) = block_on(a.create(ROOT_INO, b"new", 0o644, 0, 0, true)).unwrap();
    assert!(created);
    kv.freeze();
    let mut h = a.open_new(&attr).unwrap();
    block_on(a.write(&mut h, 0, b"hello")).unwrap();
    let reads = kv.reads();
    block_on(a.release(h)).unwrap();
    assert_eq!(kv.reads(), reads, "a new file's first flush reads nothing");
    assert_eq!(read_back(&b, attr.ino), b"hello");

    // Wrong guess: B wrote the file between A's create and A's flush. A's first transaction
    // fails on the chunk it thought absent; the retry patches A's byte over B's content.
    let (attr, _) = block_on(a.create(ROOT_INO, b"raced", 0o644, 0, 0, true)).unwrap();
    kv.freeze();
    let mut h = a.open_new(&attr).unwrap();
    block_on(async {
        let mut hb = b.open(attr.ino).await.unwrap();
        b.write(&mut hb, 0, b"from b, longer").await.unwrap();
        b.release(hb).await.unwrap();
    });
    block_on(a.write(&mut h, 0, b"A")).unwrap();
    let failed = mem.stats().failed_txns;
    block_on(a.release(h)).unwrap();
    assert!(
        mem.stats().failed_txns > failed,
        "the guess was tried and failed"
    );
    assert_eq!(read_back(&b, attr.ino), b"Arom b, longer");
    assert_eq!(read_back(&a, attr.ino), b"Arom b, longer");
}

type Queued = Arc<std::sync::Mutex<Vec<futures::future::BoxFuture<'static, ()>>>>;

/// A writes straight to the block store; B reads through a block cache and queues what it
/// spawns (fetches ahead) for the test to run.
struct FetchAheadPair {
    kv: Arc<MemKv>,
    stored: Arc<MemBlocks>,
    a: Fs,
    b: Fs,
    queued: Queued,
}

fn fetch_ahead_pair() -> FetchAheadPair {
    use twinfs_core::{BlockIo, CachedBlocks, Spawner};
    let kv = Arc::new(MemKv::new());
    let stored = Arc::new(MemBlocks::new());
    let a = block_on(Fs::open_volume(
        kv.clone(),
        stored.clone(),
        "v",
        FsOptions::default(),
    ))
    .unwrap();
    let queued: Queued = Arc::default();
    let q = queued.clone();
    let spawn: Spawner = Arc::new(move |f| q.lock().unwrap().push(f));
    let cached: Arc<dyn BlockIo> = Arc::new(CachedBlocks::new(stored.clone(), 64 << 20));
    let b = block_on(Fs::open_volume(
        kv.clone(),
        cached,
        "v",
        FsOptions {
            spawn: Some(spawn),
            ..FsOptions::default()
        },
    ))
    .unwrap();
    FetchAheadPair {
        kv,
        stored,
        a,
        b,
        queued,
    }
}

/// Runs what was queued so far; how many there were.
fn run_all(queued: &Queued) -> usize {
    let fs: Vec<_> = std::mem::take(&mut *queued.lock().unwrap());
    let n = fs.len();
    for f in fs {
        block_on(f);
    }
    n
}

/// B learns from the watch which block another node committed as a file's first chunk and
/// fetches it when the file is opened, before (in a mount: while) the open reads the chunk
/// map: the read that follows finds it cached. Another chunk, or a deleted record, gives no
/// hint; a stale hint costs a fetch, not wrong data.
#[test]
fn an_open_fetches_the_first_block_the_watch_announced() {
    use twinfs_core::MetaKv;
    let FetchAheadPair {
        kv,
        stored,
        a,
        b,
        queued,
    } = fetch_ahead_pair();
    let run_queued = || run_all(&queued);

    let (attr, _) = block_on(a.create(ROOT_INO, b"photo.jpg", 0o644, 0, 0, true)).unwrap();
    let mut h = block_on(a.open(attr.ino)).unwrap();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    block_on(a.write(&mut h, 0, &body)).unwrap();
    block_on(a.flush(&mut h)).unwrap();
    block_on(a.release(h)).unwrap();

    // No hint yet: nothing is fetched ahead.
    b.prefetch_first_block(attr.ino);
    assert_eq!(run_queued(), 0);

    // What the watch delivers: the chunk records A committed (chunk 1 of another file too).
    let key0 = b.keys().chunk(attr.ino, 0);
    let (value0, _) = block_on(kv.get(&key0)).unwrap().expect("chunk 0 committed");
    b.note_chunk_change(&b.keys().chunk(attr.ino + 1, 1), Some(&value0));
    b.prefetch_first_block(attr.ino + 1);
    assert_eq!(run_queued(), 0, "only a first chunk is a hint");
    b.note_chunk_change(&key0, Some(&value0));

    let gets_before = stored.counts().1;
    b.prefetch_first_block(attr.ino);
    assert_eq!(run_queued(), 1);
    assert_eq!(
        stored.counts().1,
        gets_before + 1,
        "the hinted block was fetched"
    );
    let hb = block_on(b.open(attr.ino)).unwrap();
    let got = block_on(b.read(&hb, 0, body.len())).unwrap();
    assert_eq!(&got[..], &body[..]);
    assert_eq!(
        stored.counts().1,
        gets_before + 1,
        "the read found the prefetched block in the cache"
    );
    block_on(b.release(hb)).unwrap();

    // A deleted record takes the hint away.
    b.note_chunk_change(&key0, None);
    b.prefetch_first_block(attr.ino);
    assert_eq!(run_queued(), 0);
}

/// When a directory's listing starts, B fetches the first blocks of its first files (small
/// ones, up to 16) in one batch: the opens that usually follow a listing (tar, cp -r) find them
/// cached, the first ones included. A later part of a listing fetches nothing.
#[test]
fn a_listing_start_fetches_its_first_small_files_in_one_batch() {
    use twinfs_core::MetaKv;
    let FetchAheadPair {
        kv,
        stored,
        a,
        b,
        queued,
    } = fetch_ahead_pair();
    let run_queued = || run_all(&queued);
    // 20 files written by A: the second is large (not batched), the others small.
    let mut files = Vec::new();
    for i in 0..20u32 {
        let name = format!("f{i:02}");
        let (attr, _) = block_on(a.create(ROOT_INO, name.as_bytes(), 0o644, 0, 0, true)).unwrap();
        let mut h = block_on(a.open(attr.ino)).unwrap();
        let len = if i == 1 { 300_000 } else { 1000 + i as usize };
        let body: Vec<u8> = (0..len).map(|j| (j as u32 ^ i) as u8).collect();
        block_on(a.write(&mut h, 0, &body)).unwrap();
        block_on(a.flush(&mut h)).unwrap();
        block_on(a.release(h)).unwrap();
        // What the watch delivers to B.
        let key = b.keys().chunk(attr.ino, 0);
        let (value, _) = block_on(kv.get(&key)).unwrap().expect("chunk committed");
        b.note_chunk_change(&key, Some(&value));
        files.push((attr.ino, body));
    }
    let inos: Vec<u64> = files.iter().map(|(ino, _)| *ino).collect();
    b.note_listed(inos.iter().copied(), false);
    assert_eq!(run_queued(), 0, "a listing's later entries fetch nothing");
    let gets_before = stored.counts().1;
    b.note_listed(inos.iter().copied(), true);
    assert_eq!(run_queued(), 1, "one batch");
    assert_eq!(
        stored.counts().1,
        gets_before + 16,
        "the first 16 small files' blocks, not the large one's"
    );
    // Reads of those files find their blocks cached.
    for (i, (ino, body)) in files.iter().enumerate().take(17) {
        let h = block_on(b.open(*ino)).unwrap();
        let before = stored.counts().1;
        let got = block_on(b.read(&h, 0, body.len())).unwrap();
        assert_eq!(&got[..], &body[..]);
        let fetched = stored.counts().1 - before;
        assert_eq!(fetched, u64::from(i == 1), "file {i}");
        block_on(b.release(h)).unwrap();
        run_queued();
    }
}

#[test]
fn a_file_found_without_xattrs_is_asked_again_once_its_inode_changes() {
    let (_mem, kv, a, b) = stale_pair();
    // Made by the other instance: A has no knowledge of it of its own.
    let (f, _) = block_on(b.create(ROOT_INO, b"f", 0o644, 0, 0, true)).unwrap();
    kv.freeze();
    let reads = kv.reads();
    assert_eq!(
        block_on(a.get_xattr(f.ino, b"user.tag")),
        Err(FsError::NoData)
    );
    assert_eq!(kv.reads(), reads + 1, "the first answer reads the store");
    // Any name, and the list, are then answered while the cache holds the inode as read.
    assert_eq!(
        block_on(a.get_xattr(f.ino, b"security.capability")),
        Err(FsError::NoData)
    );
    assert_eq!(block_on(a.list_xattr(f.ino)), Ok(vec![]));
    assert_eq!(kv.reads(), reads + 1, "answered without the store");
    // B sets one (rewriting the inode); once A's cache has the new inode, A reads again.
    block_on(b.set_xattr(f.ino, b"user.tag", b"v", twinfs_core::XattrSet::Any)).unwrap();
    kv.freeze();
    assert_eq!(block_on(a.get_xattr(f.ino, b"user.tag")), Ok(b"v".to_vec()));
}

/// A watch cache that is always current (a store's own commits written through), a session,
/// and a gate that holds (or fails) the next transaction.
#[derive(Default)]
struct GatedCache {
    store: std::sync::OnceLock<Arc<MemKv>>,
    gate: std::sync::Mutex<
        Option<futures::future::BoxFuture<'static, Result<(), twinfs_core::KvError>>>,
    >,
    /// Every transaction fails (etcd unreachable) while set.
    unreachable: std::sync::atomic::AtomicBool,
    /// Transactions that reached the store.
    txns: AtomicU64,
}

impl Hooks for GatedCache {
    fn before_txn(&self) -> futures::future::BoxFuture<'static, Result<(), twinfs_core::KvError>> {
        use futures::FutureExt;
        if self.unreachable.load(Ordering::SeqCst) {
            let down = twinfs_core::KvError::Unavailable("etcd unreachable".into());
            return futures::future::ready(Err(down)).boxed();
        }
        self.gate
            .lock()
            .unwrap()
            .take()
            .unwrap_or_else(|| futures::future::ready(Ok(())).boxed())
    }
    fn after_txn(
        &self,
        outcome: Result<bool, twinfs_core::KvError>,
    ) -> Result<bool, twinfs_core::KvError> {
        self.txns.fetch_add(1, Ordering::SeqCst);
        outcome
    }
    fn cached(&self, key: &[u8]) -> twinfs_core::kv::Versioned {
        self.store.get()?.get_sync(key)
    }
    fn cached_absent(&self, key: &[u8], within: &[u8]) -> bool {
        key.starts_with(within) && self.store.get().is_some_and(|s| s.get_sync(key).is_none())
    }
    fn session(&self) -> Option<u64> {
        Some(1)
    }
}

impl GatedCache {
    /// Holds the next transaction until the returned sender fires (`Err`: it then fails).
    fn hold_next(&self) -> futures::channel::oneshot::Sender<Result<(), twinfs_core::KvError>> {
        use futures::FutureExt;
        let (tx, rx) = futures::channel::oneshot::channel();
        *self.gate.lock().unwrap() = Some(rx.map(|r| r.unwrap_or(Ok(()))).boxed());
        tx
    }
}

fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
    let waker = futures::task::noop_waker();
    std::pin::Pin::new(f).poll(&mut std::task::Context::from_waker(&waker))
}

/// A with early creates (a claimed directory, a cache that knows it whole, a spawner whose
/// work the test may leave queued), B reading the store; and the blocks they share.
fn early_pair() -> (Arc<HookedKv<GatedCache>>, Arc<Fs>, Fs, Arc<MemBlocks>) {
    early_pair_with(Arc::new(drop))
}

/// A store and a view of it with an always-current cache, a session and a transaction gate.
fn gated_store() -> (Arc<MemKv>, Arc<HookedKv<GatedCache>>) {
    let mem = Arc::new(MemKv::new());
    let hooks = GatedCache::default();
    let _ = hooks.store.set(mem.clone());
    let kv = Arc::new(HookedKv {
        inner: mem.clone(),
        hooks,
    });
    (mem, kv)
}

/// As [`early_pair`], with A's background work run by `spawn`.
fn early_pair_with(
    spawn: twinfs_core::Spawner,
) -> (Arc<HookedKv<GatedCache>>, Arc<Fs>, Fs, Arc<MemBlocks>) {
    let (mem, kv) = gated_store();
    let blocks = Arc::new(MemBlocks::new());
    let opts = FsOptions {
        cached_lookups: true,
        spawn: Some(spawn),
        ..FsOptions::default()
    };
    let a = block_on(Fs::open_volume(kv.clone(), blocks.clone(), "v", opts)).unwrap();
    let b = block_on(Fs::open_volume(
        mem,
        blocks.clone(),
        "v",
        FsOptions::default(),
    ))
    .unwrap();
    (kv, Arc::new(a), b, blocks)
}

/// A's directory "d" and its early create of "f" (mode 0640, owner 7:7), whose transaction is
/// held until the returned sender fires.
fn early_create_held(
    kv: &HookedKv<GatedCache>,
    a: &Arc<Fs>,
) -> (
    twinfs_core::Attr,
    twinfs_core::Attr,
    futures::channel::oneshot::Sender<Result<(), twinfs_core::KvError>>,
) {
    let dir = block_on(a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
    let commit = kv.hooks.hold_next();
    let attr = block_on(a.create_early(dir.ino, b"f", 0o640, 7, 7))
        .expect("a claimed directory known whole")
        .unwrap();
    (dir, attr, commit)
}

/// A create in a directory this instance claimed is answered before its transaction commits;
/// until then every operation that could tell waits for it (here: lookup, getattr, a listing,
/// the first flush, which stores the file's block meanwhile), and other instances do not see
/// the file yet. Nothing is answered wrong at any point.
#[test]
fn a_create_answered_early_is_waited_for_by_everything_that_could_tell() {
    use futures::FutureExt;
    let (kv, a, b, blocks) = early_pair();
    let (dir, attr, commit) = early_create_held(&kv, &a);
    assert_eq!((attr.size, attr.uid, attr.gid, attr.perm), (0, 7, 7, 0o640));

    let mut lookup = a.lookup(dir.ino, b"f").boxed();
    let mut getattr = a.getattr(attr.ino).boxed();
    let mut listing = a.readdir(dir.ino, 0, 100).boxed();
    let mut fsyncdir = a.sync_dir(dir.ino).boxed();
    assert!(poll_once(&mut fsyncdir).is_pending());
    assert!(poll_once(&mut lookup).is_pending());
    assert!(poll_once(&mut getattr).is_pending());
    assert!(poll_once(&mut listing).is_pending());
    assert_eq!(
        block_on(b.lookup(dir.ino, b"f")).map(|_| ()),
        Err(FsError::NotFound),
        "not committed yet"
    );
    let mut h = a.open_new(&attr).unwrap();
    block_on(a.write(&mut h, 0, b"early bytes")).unwrap();
    {
        let stored = blocks.len();
        let mut flush = a.flush(&mut h).boxed();
        assert!(poll_once(&mut flush).is_pending());
        assert_eq!(
            blocks.len(),
            stored + 1,
            "the block is stored while the create commits"
        );
        commit.send(Ok(())).unwrap();
        block_on(flush).unwrap();
    }
    block_on(fsyncdir).unwrap();
    assert_eq!(block_on(lookup).unwrap().ino, attr.ino);
    assert_eq!(block_on(getattr).unwrap().size, 11);
    let names: Vec<Vec<u8>> = block_on(listing)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec![b"f".to_vec()]);
    let theirs = block_on(b.lookup(dir.ino, b"f")).unwrap();
    assert_eq!((theirs.ino, theirs.size), (attr.ino, 11));
    let f = block_on(b.open(attr.ino)).unwrap();
    assert_eq!(&block_on(b.read(&f, 0, 100)).unwrap()[..], b"early bytes");

    // Not early: a name taken, or a directory this instance did not make (not claimed).
    assert!(block_on(a.create_early(dir.ino, b"f", 0o640, 7, 7)).is_none());
    let other = block_on(b.mkdir(ROOT_INO, b"theirs", 0o755, 0, 0)).unwrap();
    assert!(block_on(a.create_early(other.ino, b"g", 0o640, 7, 7)).is_none());
}

/// An early create whose transaction fails: every later use of the file, the close's flush
/// included, gets that error, and the name stays free.
/// A file created early whose first flush comes before anything else needed the create: the
/// create and the content commit in one transaction, and another instance finds the file
/// whole (name, attributes, content) once the flush returns, and nothing before.
#[test]
fn a_new_files_create_and_first_flush_commit_in_one_transaction() {
    let (kv, a, b, _blocks) = early_pair();
    let dir = block_on(a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
    let before = kv.hooks.txns.load(Ordering::SeqCst);
    let attr = block_on(a.create_early(dir.ino, b"f", 0o640, 7, 7))
        .expect("a claimed directory known whole")
        .unwrap();
    let mut h = a.open_new(&attr).unwrap();
    block_on(a.write(&mut h, 0, b"hello")).unwrap();
    assert_eq!(
        block_on(b.lookup(dir.ino, b"f")).map(|_| ()),
        Err(FsError::NotFound),
        "nothing committed before the flush"
    );
    block_on(a.flush(&mut h)).unwrap();
    assert_eq!(
        kv.hooks.txns.load(Ordering::SeqCst) - before,
        1,
        "one transaction for the create and the content"
    );
    let found = block_on(b.lookup(dir.ino, b"f")).unwrap();
    assert_eq!(
        (found.ino, found.size, found.perm, found.uid, found.gid),
        (attr.ino, 5, 0o640, 7, 7)
    );
    let hb = block_on(b.open(found.ino)).unwrap();
    assert_eq!(&block_on(b.read(&hb, 0, 100)).unwrap()[..], b"hello");
    block_on(a.sync_dir(dir.ino)).unwrap();
    assert_eq!(block_on(a.getattr(attr.ino)).unwrap().size, 5);
}

/// When the joint transaction fails, the create commits on its own and the content follows:
/// the file is there, whole, and A's flush succeeds.
#[test]
fn a_failed_joint_create_and_flush_falls_back_to_two_transactions() {
    let (kv, a, b, _blocks) = early_pair();
    let dir = block_on(a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
    let attr = block_on(a.create_early(dir.ino, b"f", 0o600, 7, 7))
        .expect("a claimed directory known whole")
        .unwrap();
    let mut h = a.open_new(&attr).unwrap();
    block_on(a.write(&mut h, 0, b"kept")).unwrap();
    let joint = kv.hooks.hold_next();
    joint
        .send(Err(twinfs_core::KvError::Unavailable(
            "etcd blinked".into(),
        )))
        .unwrap();
    let before = kv.hooks.txns.load(Ordering::SeqCst);
    block_on(a.flush(&mut h)).unwrap();
    assert_eq!(
        kv.hooks.txns.load(Ordering::SeqCst) - before,
        2,
        "the create, then the content"
    );
    let found = block_on(b.lookup(dir.ino, b"f")).unwrap();
    assert_eq!((found.ino, found.size), (attr.ino, 4));
    let hb = block_on(b.open(found.ino)).unwrap();
    assert_eq!(&block_on(b.read(&hb, 0, 100)).unwrap()[..], b"kept");
    block_on(a.sync_dir(dir.ino)).unwrap();
}

#[test]
fn a_failed_early_create_fails_every_later_use_of_the_file() {
    use futures::FutureExt;
    let (kv, a, _b, _blocks) = early_pair();
    let (dir, attr, commit) = early_create_held(&kv, &a);
    let mut fsyncdir = a.sync_dir(dir.ino).boxed();
    assert!(poll_once(&mut fsyncdir).is_pending());
    let failure = twinfs_core::KvError::Unavailable("etcd gone".into());
    commit.send(Err(failure.clone())).unwrap();
    let err = Err(FsError::Kv(failure));
    assert_eq!(block_on(fsyncdir), err, "fsyncdir reports it");
    assert_eq!(block_on(a.getattr(attr.ino)).map(|_| ()), err);
    let mut h = a.open_new(&attr).unwrap();
    block_on(a.write(&mut h, 0, b"lost")).unwrap();
    assert_eq!(block_on(a.flush(&mut h)), err);
    let mut empty = a.open_new(&attr).unwrap();
    assert_eq!(block_on(a.flush(&mut empty)), err);
    assert_eq!(
        block_on(a.lookup(dir.ino, b"f")).map(|_| ()),
        Err(FsError::NotFound),
        "the name is free"
    );
}

/// A directory made in a claimed one is answered before its transaction commits, claimed at
/// once, and what is made in it (a file with content, a subdirectory) is answered early too:
/// their transactions wait for the directory's. The parent's link count and the new
/// directory's attributes are answered meanwhile; other instances see nothing until the
/// commits, then the whole tree.
#[test]
fn a_directory_made_early_has_files_made_early_in_it_that_commit_after_it() {
    use futures::FutureExt;
    let (kv, a, b, _blocks) = early_pair();
    let dir = block_on(a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
    let commit = kv.hooks.hold_next();
    let sub = block_on(a.mkdir_early(dir.ino, b"sub", 0o750, 7, 7))
        .expect("a claimed directory known whole")
        .unwrap();
    assert_eq!((sub.nlink, sub.perm, sub.uid), (2, 0o750, 7));
    assert_eq!(
        block_on(a.getattr(dir.ino)).unwrap().nlink,
        3,
        "the parent's link count"
    );
    assert_eq!(block_on(a.getattr(sub.ino)).unwrap().ino, sub.ino);
    assert_eq!(
        block_on(a.lookup(sub.ino, b"f")).map(|_| ()),
        Err(FsError::NotFound),
        "nothing in it yet, answered without waiting"
    );
    let f = block_on(a.create_early(sub.ino, b"f", 0o644, 7, 7))
        .expect("the new directory is claimed")
        .unwrap();
    let inner = block_on(a.mkdir_early(sub.ino, b"inner", 0o755, 7, 7))
        .expect("nested")
        .unwrap();
    assert_eq!(
        block_on(b.lookup(dir.ino, b"sub")).map(|_| ()),
        Err(FsError::NotFound),
        "not committed yet"
    );
    let mut h = a.open_new(&f).unwrap();
    block_on(a.write(&mut h, 0, b"made in a new directory")).unwrap();
    {
        let mut flush = a.flush(&mut h).boxed();
        assert!(
            poll_once(&mut flush).is_pending(),
            "waits for its directory"
        );
        commit.send(Ok(())).unwrap();
        block_on(flush).unwrap();
    }
    block_on(a.sync_dir(sub.ino)).unwrap();
    let theirs = block_on(b.lookup(dir.ino, b"sub")).unwrap();
    assert_eq!((theirs.ino, theirs.perm), (sub.ino, 0o750));
    assert_eq!(block_on(b.getattr(dir.ino)).unwrap().nlink, 3);
    assert_eq!(block_on(b.getattr(sub.ino)).unwrap().nlink, 3);
    assert_eq!(
        block_on(b.lookup(sub.ino, b"inner")).unwrap().ino,
        inner.ino
    );
    let ff = block_on(b.lookup(sub.ino, b"f")).unwrap();
    let opened = block_on(b.open(ff.ino)).unwrap();
    assert_eq!(
        &block_on(b.read(&opened, 0, 100)).unwrap()[..],
        b"made in a new directory"
    );
    assert_eq!(block_on(a.getattr(dir.ino)).unwrap().nlink, 3, "settled");
}

/// An early mkdir whose transaction fails: the directory and everything made early in it
/// fail with that error, the file's close included, and the name stays free.
#[test]
fn a_failed_early_mkdir_fails_what_was_made_in_it() {
    let (kv, a, b, _blocks) = early_pair();
    let dir = block_on(a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
    let commit = kv.hooks.hold_next();
    let sub = block_on(a.mkdir_early(dir.ino, b"sub", 0o755, 0, 0))
        .expect("early")
        .unwrap();
    let f = block_on(a.create_early(sub.ino, b"f", 0o644, 0, 0))
        .expect("early in it")
        .unwrap();
    let failure = twinfs_core::KvError::Unavailable("etcd gone".into());
    commit.send(Err(failure.clone())).unwrap();
    let err = Err(FsError::Kv(failure));
    let mut h = a.open_new(&f).unwrap();
    block_on(a.write(&mut h, 0, b"lost")).unwrap();
    assert_eq!(
        block_on(a.flush(&mut h)),
        err,
        "the file's close reports it"
    );
    assert_eq!(block_on(a.getattr(sub.ino)).map(|_| ()), err);
    assert_eq!(
        block_on(a.lookup(dir.ino, b"sub")).map(|_| ()),
        Err(FsError::NotFound),
        "the name is free"
    );
    assert_eq!(block_on(a.getattr(dir.ino)).unwrap().nlink, 2);
    assert_eq!(
        block_on(b.lookup(dir.ino, b"sub")).map(|_| ()),
        Err(FsError::NotFound)
    );
    block_on(a.mkdir(dir.ino, b"sub", 0o755, 0, 0)).unwrap();
}

/// A with early unlinks whose batches run on a thread of their own; its directory "d" with
/// files `names` (committed, one link each).
fn early_unlink_pair(
    names: &[Vec<u8>],
) -> (Arc<HookedKv<GatedCache>>, Arc<Fs>, Fs, twinfs_core::Attr) {
    let spawn: twinfs_core::Spawner = Arc::new(|work| {
        std::thread::spawn(move || block_on(work));
    });
    let (kv, a, b, _blocks) = early_pair_with(spawn);
    let dir = block_on(a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
    for n in names {
        block_on(a.create(dir.ino, n, 0o644, 0, 0, true)).unwrap();
    }
    (kv, a, b, dir)
}

fn file_names(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("f{i}").into_bytes()).collect()
}

/// Unlinks in a directory this instance claimed are answered at once and committed in
/// batches. Until a name's batch commits, every use of it on this instance waits (lookup, a
/// listing, fsyncdir), and other instances still see it; afterwards nobody does.
#[test]
fn unlinks_answered_early_commit_in_batches_and_are_waited_for() {
    use futures::FutureExt;
    let names = file_names(50);
    let (kv, a, b, dir) = early_unlink_pair(&names);
    let before = kv.hooks.txns.load(Ordering::SeqCst);
    let dir_before = block_on(a.getattr(dir.ino)).unwrap();
    let commit = kv.hooks.hold_next();
    for n in &names {
        assert!(
            a.unlink_early(dir.ino, n),
            "a claimed directory known whole"
        );
    }
    // The directory's times move at once: its getattr (the kernel's permission check before
    // every unlink) does not wait for the batch.
    let mut dir_stat = a.getattr(dir.ino).boxed();
    let std::task::Poll::Ready(Ok(dir_now)) = poll_once(&mut dir_stat) else {
        panic!("the directory's getattr waited");
    };
    assert!(dir_now.mtime_ns > dir_before.mtime_ns && dir_now.ctime_ns > dir_before.ctime_ns);
    let mut first = a.lookup(dir.ino, b"f0").boxed();
    let mut last = a.lookup(dir.ino, b"f49").boxed();
    let mut listing = a.readdir(dir.ino, 0, 100).boxed();
    let mut fsyncdir = a.sync_dir(dir.ino).boxed();
    assert!(poll_once(&mut first).is_pending());
    assert!(poll_once(&mut last).is_pending());
    assert!(poll_once(&mut listing).is_pending());
    assert!(poll_once(&mut fsyncdir).is_pending());
    assert!(
        block_on(b.lookup(dir.ino, b"f0")).is_ok(),
        "not committed yet"
    );
    commit.send(Ok(())).unwrap();
    block_on(fsyncdir).unwrap();
    assert_eq!(block_on(first).map(|_| ()), Err(FsError::NotFound));
    assert_eq!(block_on(last).map(|_| ()), Err(FsError::NotFound));
    assert!(block_on(listing).unwrap().is_empty());
    assert!(block_on(b.readdir(dir.ino, 0, 100)).unwrap().is_empty());
    let txns = kv.hooks.txns.load(Ordering::SeqCst) - before;
    assert!(
        (2..=4).contains(&txns),
        "50 unlinks in {txns} transactions (about 20 fit in one: three operations each)"
    );
    // The names are free again, for this instance and the other.
    block_on(a.create(dir.ino, b"f3", 0o600, 0, 0, true)).unwrap();
    assert!(block_on(b.lookup(dir.ino, b"f3")).is_ok());
    // Not early: a file with a second link, or one open here.
    block_on(a.link(
        block_on(a.lookup(dir.ino, b"f3")).unwrap().ino,
        dir.ino,
        b"g",
    ))
    .unwrap();
    assert!(!a.unlink_early(dir.ino, b"g"));
}

/// A batch etcd refuses because another instance changed one of its files (a chmod through a
/// handle it has open) or removed one first is redone one unlink at a time: every name the
/// application removed is gone, and nothing else.
#[test]
fn an_early_unlink_batch_that_conflicts_is_redone_one_by_one() {
    let names = file_names(5);
    let (kv, a, b, dir) = early_unlink_pair(&names);
    block_on(a.create(dir.ino, b"kept", 0o644, 0, 0, true)).unwrap();
    let commit = kv.hooks.hold_next();
    for n in &names {
        assert!(a.unlink_early(dir.ino, n));
    }
    let f1 = block_on(b.lookup(dir.ino, b"f1")).unwrap();
    let chmod = twinfs_core::SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    block_on(b.setattr(f1.ino, chmod)).unwrap();
    block_on(b.unlink(dir.ino, b"f2")).unwrap();
    commit.send(Ok(())).unwrap();
    block_on(a.sync_dir(dir.ino)).unwrap();
    let left: Vec<Vec<u8>> = block_on(b.readdir(dir.ino, 0, 100))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(left, vec![b"kept".to_vec()]);
    assert_eq!(
        block_on(b.getattr(f1.ino)).map(|_| ()),
        Err(FsError::NotFound),
        "the changed file's inode is gone with its name"
    );
}

/// An early unlink that cannot commit at all (etcd unreachable past every retry): the name is
/// still there, and the directory's next fsyncdir says so once.
#[test]
fn an_early_unlink_that_never_commits_is_reported_by_fsyncdir() {
    let names = file_names(1);
    let (kv, a, b, dir) = early_unlink_pair(&names);
    kv.hooks.unreachable.store(true, Ordering::SeqCst);
    assert!(a.unlink_early(dir.ino, b"f0"));
    let down = Err(FsError::Kv(twinfs_core::KvError::Unavailable(
        "etcd unreachable".into(),
    )));
    assert_eq!(block_on(a.sync_dir(dir.ino)), down);
    kv.hooks.unreachable.store(false, Ordering::SeqCst);
    assert_eq!(block_on(a.sync_dir(dir.ino)), Ok(()), "reported once");
    assert!(block_on(a.lookup(dir.ino, b"f0")).is_ok());
    assert!(block_on(b.lookup(dir.ino, b"f0")).is_ok());
}

/// Unlinks leave no key of the files behind, whatever the files held: data (chunk records),
/// xattrs set through another instance, a size without data; early (batched) or not.
#[test]
fn unlinked_files_leave_no_keys_behind() {
    let (kv, a, b, dir) = early_unlink_pair(&[]);
    let mut files = Vec::new();
    for (i, early) in [true, false].into_iter().enumerate() {
        let data = format!("data{i}").into_bytes();
        let (f, _) = block_on(a.create(dir.ino, &data, 0o644, 0, 0, true)).unwrap();
        let mut h = a.open_new(&f).unwrap();
        block_on(a.write(&mut h, 0, b"bytes")).unwrap();
        block_on(a.flush(&mut h)).unwrap();
        block_on(a.release(h)).unwrap();
        block_on(b.set_xattr(f.ino, b"user.tag", b"v", twinfs_core::XattrSet::Any)).unwrap();
        let sized = format!("sized{i}").into_bytes();
        let (g, _) = block_on(a.create(dir.ino, &sized, 0o644, 0, 0, true)).unwrap();
        let grow = twinfs_core::SetAttr {
            size: Some(1 << 20),
            ..Default::default()
        };
        block_on(a.setattr(g.ino, grow)).unwrap();
        files.push((data, f.ino, early));
        files.push((sized, g.ino, early));
    }
    // The keys that name the inode (usage delta keys are numbered too, and are not its).
    let keys_of = |ino: u64| -> Vec<String> {
        let hex = format!("{ino:016x}");
        kv.inner
            .scan_prefix(b"")
            .iter()
            .map(|e| String::from_utf8_lossy(&e.key).into_owned())
            .filter(|k| k.contains(&hex) && !k.contains("/usage/"))
            .collect()
    };
    assert!(
        keys_of(files[0].1).len() >= 3,
        "inode, chunk record and xattr are keys of their own"
    );
    for (name, _, early) in &files {
        if *early {
            assert!(a.unlink_early(dir.ino, name), "an early unlink was refused");
        } else {
            block_on(a.unlink(dir.ino, name)).unwrap();
        }
    }
    block_on(a.sync_dir(dir.ino)).unwrap();
    for (name, ino, _) in &files {
        let left = keys_of(*ino);
        let name = String::from_utf8_lossy(name);
        assert!(left.is_empty(), "keys of {name} left behind: {left:?}");
    }
    assert!(block_on(b.readdir(dir.ino, 0, 100)).unwrap().is_empty());
}

/// As on a local filesystem, a descriptor keeps the file it opened when another mount removes
/// its last link (unlink, or a rename over it): reads go on with what the file held, `fstat`
/// shows no link, and writes and close succeed (what is written goes with the file).
#[test]
fn a_file_deleted_by_another_mount_stays_readable_through_descriptors_open_here() {
    let (_kv, a, b) = two_nodes();
    let content: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (f, _) = block_on(a.create(ROOT_INO, b"doomed", 0o644, 0, 0, true)).unwrap();
    let mut w = a.open_new(&f).unwrap();
    block_on(a.write(&mut w, 0, &content)).unwrap();
    block_on(a.release(w)).unwrap();

    let reader = block_on(b.open(f.ino)).unwrap();
    let head = block_on(b.read(&reader, 0, 4096)).unwrap();
    let mut writer = block_on(b.open(f.ino)).unwrap();
    block_on(a.unlink(ROOT_INO, b"doomed")).unwrap();
    // B's watch tells it the inode changed: its handles' cached metadata is stale.
    b.invalidate(f.ino);
    assert_eq!(block_on(b.getattr(f.ino)), Err(FsError::NotFound));

    let mut got = head.to_vec();
    while got.len() < content.len() {
        let part = block_on(b.read(&reader, got.len() as u64, 128 << 10)).unwrap();
        assert!(
            !part.is_empty(),
            "short read at {} of {}",
            got.len(),
            content.len()
        );
        got.extend_from_slice(&part);
    }
    assert!(got == content, "a deleted file read back different bytes");
    assert!(block_on(b.read(&reader, content.len() as u64, 10))
        .unwrap()
        .is_empty());
    let attr = block_on(b.getattr_open(&reader)).unwrap();
    assert_eq!((attr.nlink, attr.size), (0, content.len() as u64));

    block_on(b.write(&mut writer, 0, b"late words")).unwrap();
    block_on(b.flush(&mut writer)).unwrap();
    block_on(b.release(writer)).unwrap();
    block_on(b.release(reader)).unwrap();
    assert_eq!(
        block_on(a.lookup(ROOT_INO, b"doomed")),
        Err(FsError::NotFound)
    );

    // A rename over the file: the old file's descriptor keeps the old content.
    let (old, _) = block_on(a.create(ROOT_INO, b"page", 0o644, 0, 0, true)).unwrap();
    let mut w = a.open_new(&old).unwrap();
    block_on(a.write(&mut w, 0, b"old page")).unwrap();
    block_on(a.release(w)).unwrap();
    let reader = block_on(b.open(old.ino)).unwrap();
    let (new, _) = block_on(a.create(ROOT_INO, b"page.tmp", 0o644, 0, 0, true)).unwrap();
    let mut w = a.open_new(&new).unwrap();
    block_on(a.write(&mut w, 0, b"new page")).unwrap();
    block_on(a.release(w)).unwrap();
    block_on(a.rename(ROOT_INO, b"page.tmp", ROOT_INO, b"page", Default::default())).unwrap();
    b.invalidate(old.ino);
    assert_eq!(&block_on(b.read(&reader, 0, 100)).unwrap()[..], b"old page");
    block_on(b.release(reader)).unwrap();
}

/// flock(2) across mounts: an exclusive lock excludes every other holder on every instance,
/// shared locks share, a waiting taker gets the lock once the holder lets go (also when the
/// holder's handle is released), and no lock key is left behind.
#[test]
fn flock_excludes_across_instances_and_lets_waiters_in() {
    use twinfs_core::FlockKind::{Exclusive, Shared};
    let (kv, a, b) = two_nodes();
    let (f, _) = block_on(a.create(ROOT_INO, b"lockfile", 0o644, 0, 0, true)).unwrap();
    let ino = f.ino;
    block_on(a.flock(ino, 1, Some(Exclusive), false, 100, &never)).unwrap();
    assert_eq!(
        block_on(b.flock(ino, 7, Some(Shared), false, 200, &never)),
        Err(FsError::WouldBlock)
    );
    assert_eq!(
        block_on(a.flock(ino, 2, Some(Exclusive), false, 101, &never)),
        Err(FsError::WouldBlock),
        "another handle on the same instance is another holder"
    );
    // Taking it again through the same handle is a no-op.
    block_on(a.flock(ino, 1, Some(Exclusive), false, 100, &never)).unwrap();

    // B waits; A lets go; B gets it.
    let b2 = b.clone();
    let waiter =
        std::thread::spawn(move || block_on(b2.flock(ino, 7, Some(Exclusive), true, 200, &never)));
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!waiter.is_finished(), "B took a lock A holds");
    block_on(a.flock(ino, 1, None, false, 100, &never)).unwrap();
    waiter.join().expect("waiter").unwrap();
    assert_eq!(b.flocks_held(), vec![(ino, 7, Exclusive)]);
    assert_eq!(
        block_on(a.flock(ino, 1, Some(Shared), false, 100, &never)),
        Err(FsError::WouldBlock)
    );
    // The handle's release lets go.
    block_on(b.flock_release(ino, 7)).unwrap();
    assert!(b.flocks_held().is_empty());

    // Shared locks share; converting to exclusive must wait for the other shared holder.
    block_on(a.flock(ino, 1, Some(Shared), false, 100, &never)).unwrap();
    block_on(b.flock(ino, 7, Some(Shared), false, 200, &never)).unwrap();
    assert_eq!(
        block_on(a.flock(ino, 1, Some(Exclusive), false, 100, &never)),
        Err(FsError::WouldBlock)
    );
    block_on(b.flock(ino, 7, None, false, 200, &never)).unwrap();
    block_on(a.flock(ino, 1, Some(Exclusive), false, 100, &never)).unwrap();
    block_on(a.flock_release(ino, 1)).unwrap();

    let left: Vec<String> = kv
        .scan_prefix(b"")
        .iter()
        .map(|e| String::from_utf8_lossy(&e.key).into_owned())
        .filter(|k| k.contains("/f/") || k.contains("/g/"))
        .collect();
    assert!(left.is_empty(), "lock keys left behind: {left:?}");
}

/// Many takers on two instances, each holding the exclusive lock for a moment: never two
/// inside at once.
#[test]
fn flock_exclusive_holders_never_overlap() {
    use std::sync::atomic::AtomicBool;
    let (_kv, a, b) = two_nodes();
    let (f, _) = block_on(a.create(ROOT_INO, b"counter", 0o644, 0, 0, true)).unwrap();
    let ino = f.ino;
    let inside = Arc::new(AtomicBool::new(false));
    let entries = Arc::new(AtomicU64::new(0));
    // Counted rather than asserted in the thread: a panicking holder would never let go.
    let overlaps = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for t in 0..6u64 {
        let fs = if t % 2 == 0 { a.clone() } else { b.clone() };
        let (inside, entries, overlaps) = (inside.clone(), entries.clone(), overlaps.clone());
        threads.push(std::thread::spawn(move || {
            for _ in 0..30 {
                block_on(fs.flock(
                    ino,
                    10 + t,
                    Some(twinfs_core::FlockKind::Exclusive),
                    true,
                    1,
                    &never,
                ))
                .unwrap();
                if inside.swap(true, Ordering::SeqCst) {
                    overlaps.fetch_add(1, Ordering::Relaxed);
                }
                entries.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
                inside.store(false, Ordering::SeqCst);
                block_on(fs.flock(ino, 10 + t, None, false, 1, &never)).unwrap();
            }
        }));
    }
    for t in threads {
        t.join().expect("taker");
    }
    assert_eq!(overlaps.load(Ordering::Relaxed), 0, "two holders at once");
    assert_eq!(entries.load(Ordering::Relaxed), 6 * 30);
}

/// B takes the lock just before A's transaction commits. A must not take it too: its
/// transaction's range compares find B's key (etcd evaluates them with the writes, atomically).
#[test]
fn flock_takers_racing_for_one_file_never_both_get_it() {
    let (kv, a, b) = two_nodes();
    let (f, _) = block_on(a.create(ROOT_INO, b"lock", 0o644, 0, 0, true)).unwrap();
    let ino = f.ino;
    let b2 = b.clone();
    kv.before_next_txn(move |_| {
        on_other_thread(move || {
            block_on(b2.flock(
                ino,
                7,
                Some(twinfs_core::FlockKind::Exclusive),
                false,
                2,
                &never,
            ))
            .unwrap();
        });
    });
    let r = block_on(a.flock(
        ino,
        3,
        Some(twinfs_core::FlockKind::Exclusive),
        false,
        1,
        &never,
    ));
    assert!(
        matches!(r, Err(FsError::WouldBlock)),
        "A took a lock B holds: {r:?}"
    );
    assert!(a.flocks_held().is_empty());
    assert_eq!(b.flocks_held().len(), 1);
}

/// A taker waiting for a lock gives up with EINTR once its caller got a signal (how
/// `flock -w` and Ctrl-C reach a waiter), holding nothing.
#[test]
fn a_waiting_flock_taker_gives_up_when_its_caller_is_interrupted() {
    use std::sync::atomic::AtomicBool;
    use twinfs_core::FlockKind::Exclusive;
    let (_kv, a, b) = two_nodes();
    let (f, _) = block_on(a.create(ROOT_INO, b"lock", 0o644, 0, 0, true)).unwrap();
    let ino = f.ino;
    block_on(a.flock(ino, 1, Some(Exclusive), false, 100, &never)).unwrap();
    let signalled = Arc::new(AtomicBool::new(false));
    let (b2, sig) = (b.clone(), signalled.clone());
    let waiter = std::thread::spawn(move || {
        let interrupted = move || sig.load(Ordering::SeqCst);
        block_on(b2.flock(ino, 7, Some(Exclusive), true, 200, &interrupted))
    });
    // The waiter keeps waiting until the signal comes (checked at every read it makes).
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        !waiter.is_finished(),
        "the taker waits while A holds the lock"
    );
    signalled.store(true, Ordering::SeqCst);
    let r = waiter.join().expect("waiter");
    assert!(matches!(r, Err(FsError::Interrupted)), "{r:?}");
    assert_eq!(FsError::Interrupted.errno(), libc::EINTR);
    assert!(b.flocks_held().is_empty());
    // A still holds it; once A lets go, B takes it at once.
    block_on(a.flock(ino, 1, None, false, 100, &never)).unwrap();
    block_on(b.flock(ino, 7, Some(Exclusive), false, 200, &never)).unwrap();
}

/// A close racing an unlink of the same file: the last release runs while the unlink's
/// transaction is in flight (the unlink saw the file open, so it orphans it; the release still
/// sees it linked). Once both are done the file is purged: no orphan record, its bytes out of
/// the volume's usage. Before the fix the orphan stayed until the next mount.
#[test]
fn a_close_racing_an_unlink_still_purges_the_file() {
    use futures::FutureExt;
    let (kv, a, _b, _blocks) = early_pair();
    let (attr, _) = block_on(a.create(ROOT_INO, b"f", 0o644, 0, 0, false)).unwrap();
    let mut h = a.open_created(&attr).unwrap();
    block_on(a.write(&mut h, 0, &[7u8; 1000])).unwrap();
    block_on(a.flush(&mut h)).unwrap();
    assert_eq!(a.usage_bytes(), 1000);

    let commit = kv.hooks.hold_next();
    let mut unlink = a.unlink(ROOT_INO, b"f").boxed();
    assert!(
        poll_once(&mut unlink).is_pending(),
        "held at its transaction"
    );
    block_on(a.release(h)).unwrap();
    commit.send(Ok(())).unwrap();
    block_on(unlink).unwrap();

    assert_eq!(block_on(a.list_orphans()).unwrap(), vec![]);
    assert_eq!(block_on(a.getattr(attr.ino)), Err(FsError::NotFound));
    assert_eq!(a.usage_bytes(), 0);
}

/// Blocks whose puts can be held (or failed) until the test says, to catch a writer between
/// its pending commit and the end of its puts (see the core's `pending.rs`).
#[derive(Default)]
struct GatedBlocks {
    inner: MemBlocks,
    hold: std::sync::Mutex<Option<PutGate>>,
}

type PutGate = futures::future::Shared<
    futures::future::BoxFuture<'static, Result<(), twinfs_core::BlockError>>,
>;

impl GatedBlocks {
    /// Holds every later put until the returned sender fires (`Err`: they fail).
    fn hold_puts(&self) -> futures::channel::oneshot::Sender<Result<(), twinfs_core::BlockError>> {
        use futures::FutureExt;
        let (tx, rx) = futures::channel::oneshot::channel();
        let gate = rx
            .map(|r| {
                r.unwrap_or(Err(twinfs_core::BlockError::Other(
                    "the writer died".into(),
                )))
            })
            .boxed()
            .shared();
        *self.hold.lock().unwrap() = Some(gate);
        tx
    }
}

impl twinfs_core::BlockIo for GatedBlocks {
    fn put(
        &self,
        data: bytes::Bytes,
    ) -> futures::future::BoxFuture<'_, Result<twinfs_core::BlockHash, twinfs_core::BlockError>>
    {
        use futures::FutureExt;
        let gate = self.hold.lock().unwrap().clone();
        async move {
            if let Some(gate) = gate {
                gate.await?;
            }
            self.inner.put(data).await
        }
        .boxed()
    }
    fn get(
        &self,
        hash: twinfs_core::BlockHash,
    ) -> futures::future::BoxFuture<'_, Result<bytes::Bytes, twinfs_core::BlockError>> {
        self.inner.get(hash)
    }
}

/// A writer with a session and early creates whose background work the test runs by hand
/// (`queued`), and a reader that sleeps between its looks at a block in flight.
struct PendingPair {
    mem: Arc<MemKv>,
    a: Arc<Fs>,
    b: Arc<Fs>,
    blocks: Arc<GatedBlocks>,
    queued: Arc<std::sync::Mutex<Vec<futures::future::BoxFuture<'static, ()>>>>,
    keys: twinfs_core::schema::Keys,
}

fn pending_pair() -> PendingPair {
    use futures::FutureExt;
    let (mem, kv) = gated_store();
    let blocks = Arc::new(GatedBlocks::default());
    let queued: Arc<std::sync::Mutex<Vec<futures::future::BoxFuture<'static, ()>>>> =
        Default::default();
    let q = queued.clone();
    let opts = FsOptions {
        cached_lookups: true,
        spawn: Some(Arc::new(move |f| q.lock().unwrap().push(f))),
        ..FsOptions::default()
    };
    let a = block_on(Fs::open_volume(kv, blocks.clone(), "v", opts)).unwrap();
    let reader = FsOptions {
        sleep: Some(Arc::new(|d| async move { std::thread::sleep(d) }.boxed())),
        ..FsOptions::default()
    };
    let b = block_on(Fs::open_volume(mem.clone(), blocks.clone(), "v", reader)).unwrap();
    PendingPair {
        mem,
        a: Arc::new(a),
        b: Arc::new(b),
        blocks,
        queued,
        keys: twinfs_core::schema::Keys::new("v"),
    }
}

impl PendingPair {
    /// A's new file `d/f` with `content` written, not flushed yet.
    fn new_file(&self, content: &[u8]) -> (u64, twinfs_core::OpenFile) {
        let dir = block_on(self.a.mkdir(ROOT_INO, b"d", 0o755, 0, 0)).unwrap();
        let attr = block_on(self.a.create_early(dir.ino, b"f", 0o644, 0, 0))
            .expect("a claimed directory known whole")
            .unwrap();
        let mut h = self.a.open_new(&attr).unwrap();
        block_on(self.a.write(&mut h, 0, content)).unwrap();
        (attr.ino, h)
    }

    fn run_queued(&self) {
        let work: Vec<_> = std::mem::take(&mut *self.queued.lock().unwrap());
        for f in work {
            block_on(f);
        }
    }

    fn pending_record(&self, ino: u64) -> Option<Vec<u8>> {
        self.mem.get_sync(&self.keys.pending(ino)).map(|(v, _)| v)
    }

    /// Ends A's session as etcd would when its lease expires: its owned keys go.
    fn expire_writer_session(&self) {
        let prefix = [self.keys.prefix(), b"s/".as_slice()].concat();
        for e in self.mem.scan_prefix(&prefix) {
            self.mem
                .txn_sync(vec![], vec![twinfs_core::TxnOp::Delete { key: e.key }])
                .unwrap();
        }
    }

    /// B's view of `ino`: its content, then its size.
    fn read_through_b(&self, ino: u64) -> (u64, Vec<u8>) {
        let h = block_on(self.b.open(ino)).unwrap();
        let bytes = block_on(self.b.read(&h, 0, 1 << 20)).unwrap().to_vec();
        let size = block_on(self.b.getattr(ino)).unwrap().size;
        (size, bytes)
    }
}

/// A new file's first flush commits while its block is being stored: the commit carries a
/// pending record, B reading (or patching) the file meanwhile waits for the block rather than
/// failing, and once the flush has returned the record is deleted in the background.
#[test]
fn a_new_files_content_commits_while_its_block_is_stored_and_readers_wait_for_it() {
    let p = pending_pair();
    let (ino, mut h) = p.new_file(b"uploaded while committing");
    let release = p.blocks.hold_puts();
    let a = p.a.clone();
    let flushing = std::thread::spawn(move || block_on(a.flush(&mut h)).map(|()| h));
    // The commit lands before the put: the file is visible with its size, and pending.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while p.pending_record(ino).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "A commits while storing"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(block_on(p.b.getattr(ino)).unwrap().size, 25);
    let b = p.b.clone();
    let reading = std::thread::spawn(move || {
        let h = block_on(b.open(ino)).unwrap();
        block_on(b.read(&h, 0, 100)).map(|d| d.to_vec())
    });
    // B's partial overwrite needs the block too (read-modify-write).
    let b = p.b.clone();
    let patching = std::thread::spawn(move || {
        let mut h = block_on(b.open(ino)).unwrap();
        block_on(b.write(&mut h, 0, b"U"))?;
        block_on(b.flush(&mut h))
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(!reading.is_finished(), "B waits for the block in flight");
    assert!(!patching.is_finished(), "B's flush waits for the block");
    release.send(Ok(())).unwrap();
    flushing.join().unwrap().expect("A's close succeeds");
    patching
        .join()
        .unwrap()
        .expect("B's flush builds on A's content");
    // The read ends after A's content landed: it sees it, patched or not yet.
    let read = reading.join().unwrap().unwrap();
    assert!(
        read == b"uploaded while committing" || read == b"Uploaded while committing",
        "{:?}",
        String::from_utf8_lossy(&read)
    );
    assert_eq!(
        p.read_through_b(ino),
        (25, b"Uploaded while committing".to_vec())
    );
    assert!(p.pending_record(ino).is_some(), "cleared in the background");
    p.run_queued();
    assert_eq!(p.pending_record(ino), None);
}

/// A writer whose block cannot be stored after its commit withdraws the content: its close
/// fails, the file stays as created (empty), no reference to the missing block is left, and a
/// later flush of the same handle stores the content the ordinary way.
#[test]
fn a_writer_whose_put_fails_after_the_commit_withdraws_the_content() {
    let p = pending_pair();
    let (ino, mut h) = p.new_file(b"not stored");
    let release = p.blocks.hold_puts();
    release
        .send(Err(twinfs_core::BlockError::NoSpace(
            "every node full".into(),
        )))
        .unwrap();
    let err = block_on(p.a.flush(&mut h)).unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC);
    assert_eq!(p.pending_record(ino), None);
    assert_eq!(p.read_through_b(ino), (0, Vec::new()));
    let chunks = p.mem.scan_prefix(&p.keys.chunks(ino));
    assert!(chunks.is_empty(), "no chunk refers to the missing block");
    *p.blocks.hold.lock().unwrap() = None;
    block_on(p.a.flush(&mut h)).unwrap();
    assert_eq!(p.read_through_b(ino), (10, b"not stored".to_vec()));
}

/// A writer that dies between its pending commit and the end of its put: once its session is
/// gone, a block that never landed is withdrawn by the first reader that misses it (the file
/// is left empty, as a crash before the write would leave it); one that did is read as is.
#[test]
fn a_dead_writers_pending_content_is_settled_by_the_next_reader() {
    use futures::FutureExt;
    for landed in [false, true] {
        let p = pending_pair();
        let (ino, mut h) = p.new_file(b"half written");
        let _held = p.blocks.hold_puts();
        {
            // The writer commits, then dies with its put in flight.
            let mut flush = p.a.flush(&mut h).boxed();
            assert!(poll_once(&mut flush).is_pending());
        }
        assert!(p.pending_record(ino).is_some());
        if landed {
            let stored = twinfs_core::BlockIo::put(
                &p.blocks.inner,
                bytes::Bytes::from_static(b"half written"),
            );
            block_on(stored).unwrap();
        }
        p.expire_writer_session();
        let want = if landed {
            (12, b"half written".to_vec())
        } else {
            (0, Vec::new())
        };
        assert_eq!(p.read_through_b(ino), want, "landed: {landed}");
        // A reader settles only what it finds missing; a landed block's record is repair's.
        assert_eq!(p.pending_record(ino).is_some(), landed);
    }
}
