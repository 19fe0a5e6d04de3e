//! The volume registry through the real `twinfs` binary and a real etcd, and the etcd-backed
//! `MetaKv` of the filesystem core against that etcd.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use twinfs_cluster::etcd::{Client, EtcdConfig};
use twinfs_core::{prefix_end, Compare, KvError, MetaKv, TxnOp};
use twinfs_fuse::etcd_kv::EtcdKv;
use twinfs_fuse::volume::{self, VolumeError};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn etcd_endpoint(c: &DevCluster) -> String {
    c.json["etcd"]["endpoints"][0]
        .as_str()
        .expect("etcd endpoint in cluster.json")
        .to_string()
}

async fn connect(endpoint: &str) -> Client {
    EtcdConfig {
        endpoints: vec![endpoint.to_string()],
        ..Default::default()
    }
    .connect()
    .await
    .expect("connect to the dev cluster's etcd")
}

/// Runs `twinfs ARGS` and expects it to fail; returns its standard error.
fn fails(c: &DevCluster, args: &[&str]) -> String {
    let out = run(c.cmd().args(args));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "twinfs {args:?} should have failed; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        !stderr.contains("panicked"),
        "twinfs {args:?} panicked: {stderr}"
    );
    stderr
}

fn json(c: &DevCluster, args: &[&str]) -> Value {
    let out = c.ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed bad JSON ({e}): {out}"))
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .expect("a JSON array")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect()
}

#[test]
fn volume_lifecycle_through_the_cli() {
    let c = DevCluster::up(1, 10);
    let rt = runtime();
    let etcd = rt.block_on(connect(&etcd_endpoint(&c)));

    // Empty registry.
    assert!(c.ok(&["volume", "list"]).contains("no volumes"));
    assert_eq!(
        json(&c, &["volume", "list", "--json"]),
        Value::Array(vec![])
    );

    // Create, and a duplicate is refused.
    let out = c.ok(&[
        "volume",
        "create",
        "uploads",
        "--replicas",
        "2",
        "--quota",
        "10G",
    ]);
    assert!(out.contains("created volume uploads"), "{out}");
    let err = fails(&c, &["volume", "create", "uploads"]);
    assert!(err.contains("volume uploads already exists"), "{err}");
    c.ok(&["volume", "create", "media", "--replicas", "3"]);

    // A report whose reader went away (`twinfs volume list | head -0`) ends quietly, as other
    // Unix tools do, not with a panic.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = c
        .cmd()
        .args(["volume", "list"])
        .stdout(writer)
        .output()
        .expect("run twinfs volume list");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked"),
        "volume list into a closed pipe: {stderr}"
    );
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "volume list into a closed pipe: {:?} {stderr}",
        out.status
    );

    // Bad names and settings: non-zero exit and a message that says what is wrong.
    let long = "x".repeat(65);
    for (name, why) in [
        ("-x", "must not start with '.' or '-'"),
        (".hidden", "must not start with '.' or '-'"),
        ("a/b", "only letters, digits"),
        ("a b", "only letters, digits"),
        ("ünï", "only letters, digits"),
        (long.as_str(), "at most 64"),
    ] {
        // "--" so that names starting with '-' reach the command as names.
        let err = fails(&c, &["volume", "create", "--", name]);
        assert!(err.contains("invalid volume name"), "{name:?}: {err}");
        assert!(err.contains(why), "{name:?}: {err}");
    }
    for r in ["0", "6"] {
        let err = fails(&c, &["volume", "create", "vol", "--replicas", r]);
        assert!(err.contains("replicas must be between 1 and 5"), "{err}");
    }
    let err = fails(&c, &["volume", "create", "vol", "--quota", "10X"]);
    assert!(err.contains("suffix"), "{err}");
    let err = fails(&c, &["volume", "inspect", "nope"]);
    assert!(err.contains("volume nope does not exist"), "{err}");
    let err = fails(&c, &["volume", "delete", "nope"]);
    assert!(err.contains("volume nope does not exist"), "{err}");

    // List.
    let list = json(&c, &["volume", "list", "--json"]);
    assert_eq!(names(&list), ["media", "uploads"]);
    let uploads = &list[1];
    assert_eq!(uploads["replicas"], 2);
    assert_eq!(uploads["quota_bytes"], 10u64 << 30);
    assert_eq!(uploads["chunk_size"], twinfs_core::DEFAULT_CHUNK_SIZE);
    assert_eq!(list[0]["replicas"], 3);
    assert_eq!(list[0]["quota_bytes"], Value::Null);
    let table = c.ok(&["volume", "list"]);
    assert!(
        table.contains("uploads") && table.contains("media"),
        "{table}"
    );
    assert!(table.contains("10.0 GiB"), "{table}");

    // Inspect: formatted at create time, just a root directory, no mounts.
    let info = json(&c, &["volume", "inspect", "uploads", "--json"]);
    assert_eq!(info["name"], "uploads");
    assert_eq!(info["formatted"], true);
    assert_eq!(info["inodes"], 1);
    assert_eq!(info["dirs"], 1);
    assert_eq!(info["files"], 0);
    assert_eq!(info["bytes_used"], 0);
    assert_eq!(info["mounts"], Value::Array(vec![]));
    let text = c.ok(&["volume", "inspect", "uploads"]);
    assert!(text.contains("replicas:    2"), "{text}");
    assert!(text.contains("mounts:      0"), "{text}");

    // A mount record blocks deletion, with a message naming the mount.
    let reg = rt
        .block_on(volume::register_mount(
            &etcd,
            "uploads",
            Path::new("/mnt/uploads"),
        ))
        .expect("register a mount");
    let err = rt
        .block_on(volume::register_mount(
            &etcd,
            "nope",
            Path::new("/mnt/nope"),
        ))
        .expect_err("a mount of a missing volume is refused");
    assert_eq!(err, VolumeError::NotFound("nope".into()));
    let info = json(&c, &["volume", "inspect", "uploads", "--json"]);
    let mounts = info["mounts"].as_array().expect("mounts");
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0]["path"], "/mnt/uploads");
    assert_eq!(mounts[0]["pid"], std::process::id());
    assert_eq!(mounts[0]["id"], reg.id());
    let err = fails(&c, &["volume", "delete", "uploads"]);
    let pid = std::process::id();
    assert!(err.contains("volume uploads is mounted at "), "{err}");
    assert!(err.contains(&format!(":/mnt/uploads (pid {pid})")), "{err}");
    assert!(err.contains("unmount it first"), "{err}");
    // Still there, namespace intact.
    assert_eq!(
        json(&c, &["volume", "inspect", "uploads", "--json"])["inodes"],
        1
    );
    // The record outlives several lease TTLs while the registration is kept.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        rt.block_on(volume::list_mounts(&etcd, "uploads"))
            .expect("list mounts")
            .len(),
        1
    );

    // Unmounted: delete succeeds and takes the whole namespace with it.
    rt.block_on(reg.leave()).expect("leave");
    let out = c.ok(&["volume", "delete", "uploads"]);
    assert!(out.contains("deleted volume uploads"), "{out}");
    assert_eq!(names(&json(&c, &["volume", "list", "--json"])), ["media"]);
    let err = fails(&c, &["volume", "inspect", "uploads"]);
    assert!(err.contains("volume uploads does not exist"), "{err}");
    let left = rt
        .block_on(async {
            let mut e = etcd.clone();
            e.get("/twinfs/v/uploads/", Some(count_prefix())).await
        })
        .expect("count namespace keys");
    assert_eq!(left.count(), 0, "namespace keys left after delete");
    // The name can be used again.
    c.ok(&["volume", "create", "uploads"]);
    assert_eq!(
        json(&c, &["volume", "inspect", "uploads", "--json"])["inodes"],
        1
    );

    // A dropped registration (no leave) goes away by itself: delete then succeeds.
    let reg = rt
        .block_on(volume::register_mount(
            &etcd,
            "media",
            Path::new("/mnt/media"),
        ))
        .expect("register");
    fails(&c, &["volume", "delete", "media"]);
    drop(reg);
    let deleted = wait_for(Duration::from_secs(15), || {
        run(c.cmd().args(["volume", "delete", "media"]))
            .status
            .success()
    });
    assert!(
        deleted.is_some(),
        "media still mounted after the registration was dropped"
    );

    // A corrupt record is a clear error, not a panic, and can still be deleted.
    rt.block_on(async {
        let mut e = etcd.clone();
        e.put("/twinfs/volumes/broken", "{not json", None).await
    })
    .expect("put garbage");
    let err = fails(&c, &["volume", "list"]);
    assert!(
        err.contains("corrupt record at /twinfs/volumes/broken"),
        "{err}"
    );
    let err = fails(&c, &["volume", "inspect", "broken"]);
    assert!(
        err.contains("corrupt record at /twinfs/volumes/broken"),
        "{err}"
    );
    c.ok(&["volume", "delete", "broken"]);
    assert_eq!(names(&json(&c, &["volume", "list", "--json"])), ["uploads"]);
}

/// `GetOptions` for a count-only prefix read.
fn count_prefix() -> etcd_client::GetOptions {
    etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only()
}

fn put(key: &str, value: &str) -> TxnOp {
    TxnOp::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

fn cmp(key: &str, rev: i64) -> Compare {
    Compare::key(key.as_bytes().to_vec(), rev)
}

#[test]
fn etcd_kv_against_real_etcd() {
    let c = DevCluster::up(1, 10);
    let rt = runtime();
    let endpoint = etcd_endpoint(&c);
    rt.block_on(async {
        let client = connect(&endpoint).await;
        let kv = EtcdKv::new(client.clone());
        let trips = kv.round_trips();

        // get of a missing key.
        assert_eq!(kv.get(b"/t/a").await, Ok(None));

        // mod_revision 0 = must not exist.
        assert_eq!(
            kv.txn(vec![cmp("/t/a", 0)], vec![put("/t/a", "1")]).await,
            Ok(true)
        );
        let (v, r1) = kv.get(b"/t/a").await.unwrap().expect("a exists");
        assert_eq!(v, b"1");
        assert!(r1 > 0);
        assert!(kv.is_own_revision(r1));
        assert_eq!(
            kv.txn(vec![cmp("/t/a", 0)], vec![put("/t/a", "x")]).await,
            Ok(false)
        );

        // Current revision → applies; stale revision → refused, nothing written.
        assert_eq!(
            kv.txn(vec![cmp("/t/a", r1)], vec![put("/t/a", "2")]).await,
            Ok(true)
        );
        let (v, r2) = kv.get(b"/t/a").await.unwrap().expect("a exists");
        assert_eq!(v, b"2");
        assert!(r2 > r1);
        assert!(kv.is_own_revision(r2));
        assert_eq!(
            kv.txn(vec![cmp("/t/a", r1)], vec![put("/t/a", "3")]).await,
            Ok(false)
        );
        assert_eq!(
            kv.get(b"/t/a").await.unwrap().map(|x| x.0),
            Some(b"2".to_vec())
        );

        // Another client's write is not ours; neither is the revision a no-op delete reports.
        let mut raw = client.clone();
        let foreign = raw
            .put("/t/foreign", "f", None)
            .await
            .expect("raw put")
            .header()
            .expect("header")
            .revision();
        assert!(!kv.is_own_revision(foreign));
        assert_eq!(
            kv.txn(
                vec![],
                vec![TxnOp::Delete {
                    key: b"/t/never".to_vec()
                }]
            )
            .await,
            Ok(true)
        );
        assert!(!kv.is_own_revision(foreign));

        // A delete guarded by the key's revision is a write of ours.
        assert_eq!(
            kv.txn(
                vec![cmp("/t/a", r2)],
                vec![TxnOp::Delete {
                    key: b"/t/a".to_vec()
                }]
            )
            .await,
            Ok(true)
        );
        assert_eq!(kv.get(b"/t/a").await, Ok(None));

        // Paged range with `more`.
        let ops: Vec<TxnOp> = (0..25).map(|i| put(&format!("/t/k{i:02}"), "v")).collect();
        assert_eq!(kv.txn(vec![], ops).await, Ok(true));
        let start = b"/t/k".to_vec();
        let end = prefix_end(&start);
        let mut from = start.clone();
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let page = kv.range(&from, &end, 10).await.expect("range");
            pages += 1;
            assert!(page.entries.len() <= 10);
            seen.extend(page.entries.iter().map(|e| e.key.clone()));
            if !page.more {
                break;
            }
            from = page.entries.last().expect("a full page").key.clone();
            from.push(0);
        }
        assert_eq!(pages, 3);
        let want: Vec<Vec<u8>> = (0..25)
            .map(|i| format!("/t/k{i:02}").into_bytes())
            .collect();
        assert_eq!(seen, want);
        let all = kv.range(&start, &end, 0).await.expect("range");
        assert_eq!(all.entries.len(), 25);
        assert!(!all.more);
        assert!(all
            .entries
            .iter()
            .all(|e| e.mod_revision > 0 && e.value == b"v"));
        // Empty end = to the end of the key space.
        let tail = kv.range(b"/t/k20", b"", 0).await.expect("range");
        assert!(tail.entries.len() >= 5);
        let first5: Vec<Vec<u8>> = tail.entries[..5].iter().map(|e| e.key.clone()).collect();
        assert_eq!(first5, want[20..].to_vec());
        assert!(kv
            .range(b"/t/k2", b"/t/k1", 0)
            .await
            .expect("range")
            .entries
            .is_empty());

        // Over etcd's 128 operations per transaction: TooLarge, not a panic or a hang.
        let ops: Vec<TxnOp> = (0..200)
            .map(|i| put(&format!("/t/big{i:03}"), "v"))
            .collect();
        match kv.txn(vec![], ops).await {
            Err(KvError::TooLarge(_)) => {}
            other => panic!("200-op txn: {other:?}"),
        }
        assert!(kv.round_trips() > trips);

        // An etcd that does not answer: Unavailable within the bound, for reads and txns.
        {
            let dead = Client::connect(["http://127.0.0.1:9"], None)
                .await
                .expect("connecting is lazy");
            let kv = EtcdKv::new(dead).with_timeout(Duration::from_secs(1));
            let t = Instant::now();
            assert!(matches!(
                kv.get(b"/t/a").await,
                Err(KvError::Unavailable(_))
            ));
            assert!(matches!(
                kv.txn(vec![], vec![put("/t/z", "z")]).await,
                Err(KvError::Unavailable(_))
            ));
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "took {:?}",
                t.elapsed()
            );
        }
    });
}

fn put_rev(resp: etcd_client::PutResponse) -> i64 {
    resp.header().expect("header").revision()
}

/// The watch cache (fed by hand here, as a watch running late would feed it) never answers
/// older than what a read through the same store already returned. This is what keeps a
/// `stat` right after an `open` at the version the open read from etcd: without it, a mount
/// whose watch still held the writer's truncate answered size 0 after the writer's close.
/// The store's own commits go into the cache at once (written through), so the lookups and
/// directory `getattr`s that follow a create or unlink need no read.
/// A process stopped with SIGSTOP until this is dropped (then SIGCONT).
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        // SAFETY: kill(2) has no memory-safety preconditions; the PID is this test's etcd.
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
        }
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as in `new`.
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

/// A mount that did not watch a file being made (it started later) keeps what it reads in the
/// watch cache, and answers later lookups and `stat`s from it like a mount that watched; but
/// never when its watch has applied changes past the read, which could have removed the key
/// without a trace.
#[test]
fn reads_fill_the_watch_cache_only_when_the_watch_is_not_past_them() {
    with_watch_cache(b"/f/", async |_, kv, mut other| {
        let r1 = put_rev(
            other
                .put("/f/i/old", "made before", None)
                .await
                .expect("put"),
        );
        kv.cache_start(r1);
        assert_eq!(kv.cached(b"/f/i/old"), None, "never seen");
        assert_eq!(
            kv.get(b"/f/i/old").await.expect("get"),
            Some((b"made before".to_vec(), r1))
        );
        assert_eq!(
            kv.cached(b"/f/i/old"),
            Some((b"made before".to_vec(), r1)),
            "a read fills the cache"
        );
        // A range read (a directory listing) too; keys of other kinds (chunks) are not held.
        let r2 = put_rev(other.put("/f/d/x", "entry", None).await.expect("put"));
        put_rev(other.put("/f/c/x", "chunk", None).await.expect("put"));
        kv.range(b"/f/", &prefix_end(b"/f/"), 0)
            .await
            .expect("range");
        assert_eq!(
            kv.cached(b"/f/d/x"),
            None,
            "not before the watch reaches it"
        );
        kv.cache_apply(&[], r2 + 1);
        assert_eq!(kv.cached(b"/f/d/x"), Some((b"entry".to_vec(), r2)));
        assert_eq!(kv.cached(b"/f/c/x"), None);
        // A later change through the watch replaces a filled value.
        let r3 = put_rev(other.put("/f/i/old", "changed", None).await.expect("put"));
        kv.cache_apply(&[(b"/f/i/old".to_vec(), Some(b"changed".to_vec()), r3)], r3);
        assert_eq!(kv.cached(b"/f/i/old"), Some((b"changed".to_vec(), r3)));

        // The race: a read answered at revision `at`, then the key deleted elsewhere, and the
        // watch applies that delete (of a key the cache does not hold: no trace) before the
        // read's value reaches the cache. Simulated by a watch already past the read.
        let r4 = put_rev(other.put("/f/i/late", "v", None).await.expect("put"));
        kv.cache_apply(&[], r4 + 100);
        assert_eq!(
            kv.get(b"/f/i/late").await.expect("get"),
            Some((b"v".to_vec(), r4))
        );
        assert_eq!(
            kv.cached(b"/f/i/late"),
            None,
            "not filled: the watch is past the read"
        );
    });
}

/// A directory the store knows whole (it proved its entries empty in a commit, or listed
/// them all at a revision the watch had not passed) answers the names it lacks as absent
/// without etcd, and follows every later change the watch brings; anything that could have
/// lost a change (the cache emptied, a listing cut short, a watch already past the listing)
/// leaves it unknown.
#[test]
fn a_directory_known_whole_answers_absent_names_until_the_watch_brings_them() {
    with_watch_cache(b"/n/", async |_, kv, mut other| {
        let dir = |d: &str| format!("/n/d/{d}/").into_bytes();
        let name = |d: &str, n: &str| format!("/n/d/{d}/{n}").into_bytes();
        let proves_empty = |d: &str| Compare::range_empty(dir(d), prefix_end(&dir(d)));
        let r0 = put_rev(other.put("/n/i/0", "root", None).await.expect("put"));
        kv.cache_start(r0);
        assert!(
            !kv.cached_absent(&name("1", "x"), &dir("1")),
            "not known yet"
        );

        // A mkdir's commit proves the new directory empty.
        assert_eq!(
            kv.txn(vec![proves_empty("1")], vec![put("/n/i/1", "dir")])
                .await,
            Ok(true)
        );
        assert!(kv.cached_absent(&name("1", "x"), &dir("1")));
        assert!(
            !kv.cached_absent(&name("2", "x"), &dir("1")),
            "not under it"
        );
        // Another mount makes x: absent until the watch brings it (a watch delay), then not.
        let r1 = put_rev(other.put(name("1", "x"), "e", None).await.expect("put"));
        kv.cache_apply(&[(name("1", "x"), Some(b"e".to_vec()), r1)], r1);
        assert!(!kv.cached_absent(&name("1", "x"), &dir("1")));
        assert_eq!(kv.cached(&name("1", "x")), Some((b"e".to_vec(), r1)));
        let r2 = other
            .delete(name("1", "x"), None)
            .await
            .expect("delete")
            .header()
            .expect("header")
            .revision();
        kv.cache_apply(&[(name("1", "x"), None, r2)], r2);
        assert!(kv.cached_absent(&name("1", "x"), &dir("1")), "gone again");
        // A read newer than the watch holds every answer back, absences too.
        let r3 = put_rev(other.put("/n/i/9", "v", None).await.expect("put"));
        kv.get(b"/n/i/9").await.expect("get");
        assert!(!kv.cached_absent(&name("1", "x"), &dir("1")));
        kv.cache_apply(&[], r3);
        assert!(kv.cached_absent(&name("1", "x"), &dir("1")));

        // A mount that did not see directory 2 made learns it whole from a complete listing
        // (one page), and not from a page cut short.
        put_rev(other.put(name("2", "a"), "e", None).await.expect("put"));
        put_rev(other.put(name("3", "a"), "e", None).await.expect("put"));
        let r4 = put_rev(other.put(name("3", "b"), "e", None).await.expect("put"));
        kv.cache_apply(&[], r4);
        let page = kv
            .range(&dir("3"), &prefix_end(&dir("3")), 1)
            .await
            .expect("range");
        assert!(page.more);
        assert!(
            !kv.cached_absent(&name("3", "c"), &dir("3")),
            "listing cut short"
        );
        kv.range(&dir("2"), &prefix_end(&dir("2")), 0)
            .await
            .expect("range");
        assert!(kv.cached_absent(&name("2", "b"), &dir("2")));
        assert!(!kv.cached_absent(&name("2", "a"), &dir("2")), "listed");
        // Not when the watch is already past the listing (it may have applied a change of
        // the directory the listing predates).
        let r5 = put_rev(other.put(name("4", "a"), "e", None).await.expect("put"));
        kv.cache_apply(&[], r5 + 100);
        kv.range(&dir("4"), &prefix_end(&dir("4")), 0)
            .await
            .expect("range");
        assert!(!kv.cached_absent(&name("4", "b"), &dir("4")));

        // The cache emptied (the watch broke): nothing is known whole, and a proof from a
        // commit older than the emptying is not taken (changes after it may be lost).
        kv.cache_reset();
        kv.cache_start(r5 + 100);
        assert!(!kv.cached_absent(&name("1", "x"), &dir("1")));
        assert!(!kv.cached_absent(&name("2", "b"), &dir("2")));
        assert_eq!(
            kv.txn(vec![proves_empty("5")], vec![put("/n/i/5", "dir")])
                .await,
            Ok(true)
        );
        assert!(!kv.cached_absent(&name("5", "x"), &dir("5")));
    });
}

/// Runs `test` against a real etcd with an [`EtcdKv`] whose watch cache follows `prefix` (the
/// test drives the cache by hand, as a watch would) and a plain client standing for another
/// mount; the test also gets the cluster (to stop its etcd).
fn with_watch_cache(prefix: &'static [u8], test: impl AsyncFnOnce(&DevCluster, EtcdKv, Client)) {
    let c = DevCluster::up(1, 10);
    let rt = runtime();
    let endpoint = etcd_endpoint(&c);
    rt.block_on(async {
        let client = connect(&endpoint).await;
        let kv = EtcdKv::new(client.clone()).with_cache_prefix(prefix);
        test(&c, kv, client).await;
    });
}

#[test]
fn watch_cache_never_answers_older_than_a_read() {
    with_watch_cache(b"/w/", async |c, kv, mut other| {
        let value = |v: &str| Some(v.as_bytes().to_vec());
        let r1 = put_rev(other.put("/w/i/a", "old", None).await.expect("put"));
        kv.cache_start(r1 - 1);
        kv.cache_apply(&[(b"/w/i/a".to_vec(), value("old"), r1)], r1);
        assert_eq!(kv.cached(b"/w/i/a"), Some((b"old".to_vec(), r1)));
        // What a watch event of a later revision replaced (the watch asks etcd for no previous
        // values); nothing for a revision the cached value is not older than.
        assert_eq!(kv.value_before(b"/w/i/a", r1 + 1), value("old"));
        assert_eq!(kv.value_before(b"/w/i/a", r1), None);
        assert_eq!(kv.value_before(b"/w/i/missing", r1 + 1), None);

        // Another mount overwrites it; this mount's watch has not delivered that yet. Until
        // this mount sees the new value, answering the old one is a watch delay, allowed.
        let r2 = put_rev(other.put("/w/i/a", "new", None).await.expect("put"));
        assert_eq!(kv.cached(b"/w/i/a"), Some((b"old".to_vec(), r1)));
        // A read returns the new value: the cache answers nothing until it has caught up.
        assert_eq!(
            kv.get(b"/w/i/a").await.expect("get").map(|x| x.0),
            value("new")
        );
        assert_eq!(kv.cached(b"/w/i/a"), None, "older than what was read");
        kv.cache_apply(&[(b"/w/i/a".to_vec(), value("new"), r2)], r2);
        assert_eq!(kv.cached(b"/w/i/a"), Some((b"new".to_vec(), r2)));

        // Created and deleted elsewhere; a read finds it gone before the watch delivers
        // either change. The late put is not answered, nor after the delete.
        let r3 = put_rev(other.put("/w/d/b", "b", None).await.expect("put"));
        let r4 = other
            .delete("/w/d/b", None)
            .await
            .expect("delete")
            .header()
            .expect("header")
            .revision();
        assert_eq!(kv.get_many(&[b"/w/d/b".to_vec()]).await, Ok(vec![None]));
        kv.cache_apply(&[(b"/w/d/b".to_vec(), value("b"), r3)], r3);
        assert_eq!(
            kv.cached(b"/w/d/b"),
            None,
            "a put older than the read's absence"
        );
        kv.cache_apply(&[(b"/w/d/b".to_vec(), None, r4)], r4);
        assert_eq!(kv.cached(b"/w/d/b"), None);
        assert_eq!(kv.cached(b"/w/i/a"), Some((b"new".to_vec(), r2)));

        // Reads outside the followed prefix never hold the cache back (no watch event would
        // ever let it catch up).
        put_rev(other.put("/elsewhere", "x", None).await.expect("put"));
        assert_eq!(
            kv.get(b"/elsewhere").await.expect("get").map(|x| x.0),
            value("x")
        );
        assert_eq!(kv.cached(b"/w/i/a"), Some((b"new".to_vec(), r2)));

        // A range read (a listing, a chunk map) holds it back like a get.
        let r5 = put_rev(other.put("/w/i/c", "c", None).await.expect("put"));
        let page = kv
            .range(b"/w/", &prefix_end(b"/w/"), 0)
            .await
            .expect("range");
        assert_eq!(page.entries.len(), 2);
        assert_eq!(kv.cached(b"/w/i/a"), None);
        kv.cache_apply(&[(b"/w/i/c".to_vec(), value("c"), r5)], r5);
        assert_eq!(kv.cached(b"/w/i/a"), Some((b"new".to_vec(), r2)));

        // This store's own commit is in the cache at once (written through), and the watch
        // bringing an older change of the key late does not undo it.
        let (_, ra) = kv.get(b"/w/i/a").await.expect("get").expect("a");
        assert_eq!(
            kv.txn(vec![cmp("/w/i/a", ra)], vec![put("/w/i/a", "mine")])
                .await,
            Ok(true)
        );
        assert_eq!(
            kv.cached(b"/w/i/a").map(|x| x.0),
            value("mine"),
            "own commit written through"
        );
        let (_, mine) = kv.get(b"/w/i/a").await.expect("get").expect("a");
        kv.cache_apply(&[], mine); // the watch has passed the read: the floor is met
        assert_eq!(kv.cached(b"/w/i/a"), Some((b"mine".to_vec(), mine)));
        kv.cache_apply(&[(b"/w/i/a".to_vec(), value("new"), r2)], mine);
        assert_eq!(kv.cached(b"/w/i/a"), Some((b"mine".to_vec(), mine)));
        // An own delete likewise; a DeleteRange over cached keys waits for the watch.
        assert_eq!(
            kv.txn(
                vec![cmp("/w/i/a", mine)],
                vec![TxnOp::Delete {
                    key: b"/w/i/a".to_vec()
                }]
            )
            .await,
            Ok(true)
        );
        assert_eq!(kv.cached(b"/w/i/a"), None);
        kv.cache_apply(&[(b"/w/i/a".to_vec(), value("mine"), mine)], mine);
        assert_eq!(
            kv.cached(b"/w/i/a"),
            None,
            "the watch's older put after own delete"
        );
        assert_eq!(kv.cached(b"/w/i/c"), Some((b"c".to_vec(), r5)));
        assert_eq!(
            kv.txn(
                vec![],
                vec![TxnOp::DeleteRange {
                    start: b"/w/i/".to_vec(),
                    end: prefix_end(b"/w/i/")
                }]
            )
            .await,
            Ok(true)
        );
        assert_eq!(kv.cached(b"/w/i/c"), None, "removed by the own DeleteRange");

        // A transaction that fails with an error (here: over etcd's operation limit) may, in
        // general, have committed: the cache forgets what it holds but stays in use, serving
        // what the watch applies afterwards.
        let r6 = put_rev(other.put("/w/i/e", "e", None).await.expect("put"));
        kv.cache_apply(&[(b"/w/i/e".to_vec(), value("e"), r6)], r6);
        assert_eq!(kv.cached(b"/w/i/e"), Some((b"e".to_vec(), r6)));
        let too_many: Vec<TxnOp> = (0..1000).map(|i| put(&format!("/w/x/{i}"), "x")).collect();
        assert!(kv.txn(vec![], too_many).await.is_err());
        assert_eq!(
            kv.cached(b"/w/i/e"),
            None,
            "forgotten after an unknown outcome"
        );
        let r7 = put_rev(other.put("/w/i/e", "e2", None).await.expect("put"));
        kv.cache_apply(&[(b"/w/i/e".to_vec(), value("e2"), r7)], r7);
        assert_eq!(kv.cached(b"/w/i/e"), Some((b"e2".to_vec(), r7)));

        // The watch can bring a commit's events before its reply: while the transaction is
        // unanswered, its puts are known as this mount's own by their values (so the kernel
        // is not told to forget what this mount just made); after the reply, by revision.
        // etcd is stopped (SIGSTOP) so the transaction certainly stays unanswered while the
        // checks run; it continues when `held` is dropped, whatever the checks find.
        let held = Stopped::new(c.json["etcd"]["pid"].as_u64().expect("etcd pid") as i32);
        let mut commit = kv.txn(vec![cmp("/w/d/f", 0)], vec![put("/w/d/f", "own entry")]);
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(commit.as_mut(), cx).is_pending())
        })
        .await;
        assert!(first, "a stopped etcd cannot have answered");
        let unknown_revision = i64::MAX;
        assert!(kv.is_own_write(unknown_revision, b"/w/d/f", Some(b"own entry")));
        assert!(!kv.is_own_write(unknown_revision, b"/w/d/f", Some(b"other entry")));
        assert!(!kv.is_own_write(unknown_revision, b"/w/d/g", Some(b"own entry")));
        assert!(!kv.is_own_write(unknown_revision, b"/w/d/f", None));
        drop(held);
        assert_eq!(commit.await, Ok(true));
        let (_, rf) = kv.get(b"/w/d/f").await.expect("get").expect("f");
        assert!(kv.is_own_write(rf, b"/w/d/f", Some(b"own entry")));
        assert!(
            !kv.is_own_write(unknown_revision, b"/w/d/f", Some(b"own entry")),
            "answered: no longer in flight"
        );
        let rg = put_rev(other.put("/w/d/f", "own entry", None).await.expect("put"));
        assert!(
            !kv.is_own_write(rg, b"/w/d/f", Some(b"own entry")),
            "another's put"
        );
    });
}

/// A TCP proxy in front of etcd that loses one transaction's request or its reply, the way
/// an etcd restart does to a transaction in flight (fault injection a real etcd cannot be
/// made to do on cue). A fault is armed for the first client write that contains `marker`.
struct LossyProxy {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    /// (marker, lose the reply instead of the request)
    fault: std::sync::Mutex<Option<(Vec<u8>, bool)>>,
    /// New connections are closed at once while this is set (etcd still down).
    closed: std::sync::atomic::AtomicBool,
    /// Requests carrying the marker that were dropped / forwarded with their reply held.
    lost_requests: std::sync::atomic::AtomicUsize,
    held_replies: std::sync::atomic::AtomicUsize,
    /// Breaks every held connection.
    cut: tokio::sync::Notify,
}

impl LossyProxy {
    async fn start(upstream: std::net::SocketAddr) -> LossyProxy {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = std::sync::Arc::new(ProxyState::default());
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if st.closed.load(SeqCst) {
                    continue; // dropped: closed
                }
                let st = st.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = pump(client, server, st).await;
                });
            }
        });
        LossyProxy { addr, state, task }
    }

    fn arm(&self, marker: &str, lose_reply: bool) {
        *self.state.fault.lock().unwrap() = Some((marker.as_bytes().to_vec(), lose_reply));
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways; once the armed marker passes, either drops the connection before the
/// request reaches etcd, or forwards it and holds every later reply until `cut`.
async fn pump(
    mut client: tokio::net::TcpStream,
    mut server: tokio::net::TcpStream,
    st: std::sync::Arc<ProxyState>,
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cbuf, mut sbuf) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    let mut holding = false;
    loop {
        tokio::select! {
            n = client.read(&mut cbuf) => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                let chunk = &cbuf[..n];
                let hit = {
                    let mut fault = st.fault.lock().unwrap();
                    let hit = fault.as_ref().and_then(|(m, lose_reply)| {
                        chunk.windows(m.len()).any(|w| w == m.as_slice()).then_some(*lose_reply)
                    });
                    if hit.is_some() {
                        *fault = None;
                    }
                    hit
                };
                match hit {
                    Some(false) => {
                        st.lost_requests.fetch_add(1, SeqCst);
                        return Ok(());
                    }
                    Some(true) => {
                        server.write_all(chunk).await?;
                        holding = true;
                        st.held_replies.fetch_add(1, SeqCst);
                    }
                    None => server.write_all(chunk).await?,
                }
            }
            n = server.read(&mut sbuf), if !holding => {
                let n = n?;
                if n == 0 {
                    return Ok(());
                }
                client.write_all(&sbuf[..n]).await?;
            }
            _ = st.cut.notified(), if holding => return Ok(()),
        }
    }
}

/// A transaction whose request or reply is lost on the way (an etcd restart) is settled by
/// reading its keys back: applied → success, never applied → sent again, never applied and
/// overtaken by another writer → refused like any conflict (the core re-reads). Before, all
/// three failed with EIO: a rename during the etcd-restart failover scenario reached the
/// application as "Input/output error".
#[test]
fn a_transaction_whose_reply_was_lost_is_settled_by_reading_it_back() {
    use std::sync::atomic::Ordering::SeqCst;
    let c = DevCluster::up(1, 10);
    let rt = runtime();
    let endpoint = etcd_endpoint(&c);
    rt.block_on(async {
        let upstream: std::net::SocketAddr = endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("etcd endpoint is host:port");
        let proxy = LossyProxy::start(upstream).await;
        let mut direct = connect(&endpoint).await;
        let kv = std::sync::Arc::new(EtcdKv::new(
            connect(&format!("http://{}", proxy.addr)).await,
        ));
        assert_eq!(kv.get(b"/s/warm").await, Ok(None));
        let version = |resp: etcd_client::GetResponse| resp.kvs().first().map(|kv| kv.version());

        // 1. Applied, reply lost.
        proxy.arm("/s/applied", true);
        let t = put_if_absent(&kv, "/s/applied");
        let deadline = Instant::now() + Duration::from_secs(10);
        while direct
            .get("/s/applied", None)
            .await
            .expect("get")
            .kvs()
            .is_empty()
        {
            assert!(Instant::now() < deadline, "the txn never reached etcd");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(proxy.state.held_replies.load(SeqCst), 1);
        proxy.state.cut.notify_one();
        assert_eq!(t.await.expect("join"), Ok(true), "applied, reply lost");
        let got = direct.get("/s/applied", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"mine");
        assert_eq!(version(got), Some(1));

        // 2. Request lost while etcd is "down"; nothing else changed: sent again, once.
        proxy.state.closed.store(true, SeqCst);
        proxy.arm("/s/resent", false);
        let t = put_if_absent(&kv, "/s/resent");
        wait_until_lost(&proxy, 1).await;
        proxy.state.closed.store(false, SeqCst);
        assert_eq!(t.await.expect("join"), Ok(true), "lost request sent again");
        let got = direct.get("/s/resent", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"mine");
        assert_eq!(version(got), Some(1));

        // 3. Request lost, and another writer takes the key before etcd is back: refused.
        proxy.state.closed.store(true, SeqCst);
        proxy.arm("/s/overtaken", false);
        let t = put_if_absent(&kv, "/s/overtaken");
        wait_until_lost(&proxy, 2).await;
        direct
            .put("/s/overtaken", "theirs", None)
            .await
            .expect("put");
        proxy.state.closed.store(false, SeqCst);
        assert_eq!(t.await.expect("join"), Ok(false), "overtaken: a conflict");
        let got = direct.get("/s/overtaken", None).await.expect("get");
        assert_eq!(got.kvs()[0].value(), b"theirs");
    });
}

/// A txn putting "mine" at `key` if it does not exist, in the background.
fn put_if_absent(
    kv: &std::sync::Arc<EtcdKv>,
    key: &'static str,
) -> tokio::task::JoinHandle<Result<bool, KvError>> {
    let kv = kv.clone();
    tokio::spawn(async move { kv.txn(vec![cmp(key, 0)], vec![put(key, "mine")]).await })
}

async fn wait_until_lost(proxy: &LossyProxy, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy
        .state
        .lost_requests
        .load(std::sync::atomic::Ordering::SeqCst)
        < n
    {
        assert!(
            Instant::now() < deadline,
            "the request never passed the proxy"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
