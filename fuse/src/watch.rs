//! Follows a volume's keys in etcd and pushes other mounts' changes out of this mount's caches:
//! the core's per-handle metadata caches ([`twinfs_core::Fs::invalidate`]) and the kernel's
//! dentry, attribute and page caches (fuser's `Notifier`).
//!
//! - `i/<ino>` changed by another mount → the core forgets the inode's chunk map, the kernel
//!   forgets its attributes, and, when size or mtime changed (new data), its cached pages.
//! - `d/<parent>/<hash>/<name>` created or deleted → the kernel forgets that dentry (positive
//!   or negative), so the next lookup asks etcd.
//! - Events of this mount's own transactions are skipped: the kernel already knows about
//!   changes made through it. An event can arrive before its transaction's reply; it is known
//!   as own then by the value it puts ([`EtcdKv::is_own_write`]).
//!
//! Kernel notifications are written to `/dev/fuse` by a dedicated thread, never from a tokio
//! worker: `inval_entry` takes the directory's lock in the kernel and may wait for a request
//! of ours in flight on that directory.
//!
//! The watch resumes from the last revision it processed when the stream breaks (etcd
//! restart, leader change). If etcd compacted past that revision, the changes in between are
//! unknown: every cached inode is invalidated, and dentries fall back to their TTL.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use fuser::INodeNo;
use twinfs_core::schema::{decode_inode, Keys};

use crate::adapter::Shared;
use crate::etcd_kv::EtcdKv;

/// One kernel cache invalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// A dentry of `parent` appeared or disappeared.
    Entry { parent: u64, name: Vec<u8> },
    /// An inode's attributes changed; `data` when its contents may have too.
    Inode { ino: u64, data: bool },
}

/// What a changed key means for the caches; `None` for keys that no cache holds.
pub fn classify(
    keys: &Keys,
    key: &[u8],
    prev: Option<&[u8]>,
    new: Option<&[u8]>,
) -> Option<Invalidation> {
    let rest = key.strip_prefix(keys.prefix())?;
    if let Some(ino_hex) = rest.strip_prefix(b"i/") {
        let ino = parse_hex(ino_hex)?;
        let data = match (prev, new) {
            (Some(p), Some(n)) => match (decode_inode(key, p), decode_inode(key, n)) {
                (Ok(p), Ok(n)) => p.size != n.size || p.mtime_ns != n.mtime_ns,
                _ => true,
            },
            _ => true,
        };
        return Some(Invalidation::Inode { ino, data });
    }
    if let Some(ino_hex) = rest.strip_prefix(b"t/") {
        // A directory's times: its attributes only.
        let ino = parse_hex(ino_hex)?;
        return Some(Invalidation::Inode { ino, data: false });
    }
    if let Some(d) = rest.strip_prefix(b"d/") {
        // <parent:16>/<hash:16>/<name>
        if d.len() < 35 || d[16] != b'/' || d[33] != b'/' {
            return None;
        }
        let parent = parse_hex(&d[..16])?;
        return Some(Invalidation::Entry {
            parent,
            name: d[34..].to_vec(),
        });
    }
    None
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
}

/// Messages to the notifier thread.
enum Notice {
    One(Invalidation),
    /// Invalidate these inodes' attributes and pages (after a compaction).
    Inodes(Vec<u64>),
}

/// Starts the notifier thread and the watch task. `start_revision`: the etcd revision the
/// mount's view started from (changes after it are reported). `is_own`: whether a revision
/// is one of this mount's own transactions.
pub fn start(
    client: etcd_client::Client,
    keys: Keys,
    start_revision: i64,
    shared: Arc<Shared>,
    kv: Arc<EtcdKv>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let (tx, rx) = mpsc::channel::<Notice>();
    let notify_shared = shared.clone();
    std::thread::Builder::new()
        .name("twinfs-notify".into())
        .spawn(move || notifier_loop(rx, notify_shared))?;
    Ok(tokio::spawn(follow(
        client,
        keys,
        start_revision,
        shared,
        kv,
        tx,
    )))
}

fn notifier_loop(rx: mpsc::Receiver<Notice>, shared: Arc<Shared>) {
    while let Ok(n) = rx.recv() {
        let Some(notifier) = shared.notifier() else {
            continue;
        };
        // Errors are expected and harmless: ENOENT when the kernel has nothing cached for
        // the inode or dentry, ENOTCONN once unmounted.
        match n {
            Notice::One(Invalidation::Entry { parent, name }) => {
                let _ = notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(&name));
            }
            Notice::One(Invalidation::Inode { ino, data }) => {
                let _ = notifier.inval_inode(INodeNo(ino), if data { 0 } else { -1 }, 0);
            }
            Notice::Inodes(inos) => {
                for ino in inos {
                    let _ = notifier.inval_inode(INodeNo(ino), 0, 0);
                }
            }
        }
    }
}

async fn current_revision(client: &mut etcd_client::Client, keys: &Keys) -> Option<i64> {
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(keys.prefix(), Some(GetOptions::new().with_count_only())),
    )
    .await
    .ok()?
    .ok()?;
    r.header().map(|h| h.revision())
}

async fn follow(
    client: etcd_client::Client,
    keys: Keys,
    start_revision: i64,
    shared: Arc<Shared>,
    cache: Arc<EtcdKv>,
    tx: mpsc::Sender<Notice>,
) {
    let mut revision = start_revision;
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut c = client.clone();
        // No previous values (`with_prev_key`): etcd reads each one back from its history,
        // per event and per watcher, which doubled its CPU per create. The watch cache holds
        // the previous value of the keys whose previous value matters (inodes).
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let result: Result<(), String> = async {
            let (_watcher, mut stream) = c
                .watch(keys.prefix().to_vec(), Some(opts))
                .await
                .map_err(|e| e.to_string())?;
            // Following again from `revision`: the metadata cache may serve what it holds.
            cache.cache_start(revision);
            while let Some(resp) = stream.message().await.map_err(|e| e.to_string())? {
                if resp.compact_revision() > 0 {
                    return Err(format!("compacted to {}", resp.compact_revision()));
                }
                if resp.canceled() {
                    return Err(format!("cancelled: {}", resp.cancel_reason()));
                }
                // The cache takes the whole response at once (before any kernel notice of
                // it goes out), so readers see each transaction entirely or not at all.
                let mut changes = Vec::new();
                let mut usage = Vec::new();
                let mut notices = Vec::new();
                let mut xattr_suspects = Vec::new();
                let mut upto = 0;
                // Values put earlier in this response: the cache takes them only at its end.
                let mut earlier: HashMap<&[u8], Option<&[u8]>> = HashMap::new();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    // For deletes too, mod_revision is the revision of the change.
                    let rev = kv.mod_revision();
                    revision = revision.max(rev);
                    let rest = kv.key().strip_prefix(keys.prefix()).unwrap_or_default();
                    if cache.caches_key(kv.key()) {
                        let value = match ev.event_type() {
                            EventType::Put => Some(kv.value().to_vec()),
                            EventType::Delete => None,
                        };
                        changes.push((kv.key().to_vec(), value, rev));
                    } else if let (Some(dir), EventType::Put) =
                        (keys.parse_recall(kv.key()), ev.event_type())
                    {
                        // Another mount wants to make a name in `dir`: if this mount holds the
                        // directory's claim, it gives it up (see `twinfs_core::claims`).
                        if kv.value() != shared.fs.instance_id().to_be_bytes() {
                            let fs = shared.fs.clone();
                            tokio::spawn(async move {
                                for attempt in 1..=10u32 {
                                    match fs.release_claim(dir).await {
                                        Ok(()) => return,
                                        Err(e) => tracing::warn!(dir, attempt, error = %e,
                                            "giving up a directory claim failed; retrying"),
                                    }
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                }
                            });
                        }
                    } else if rest.starts_with(b"f/") {
                        // A flock taken or let go (by any mount): takers waiting here on
                        // that file read again.
                        shared.fs.note_flock_change(kv.key());
                    } else if rest.starts_with(b"usage/") {
                        // Own revisions too: this mount's folds rewrite the base, and the
                        // core ignores its own delta keys.
                        let value = match ev.event_type() {
                            EventType::Put => Some(kv.value().to_vec()),
                            EventType::Delete => None,
                        };
                        usage.push((kv.key().to_vec(), value));
                    }
                    upto = upto.max(rev);
                    let new = match ev.event_type() {
                        EventType::Put => Some(kv.value()),
                        EventType::Delete => None,
                    };
                    let before = earlier.insert(kv.key(), new);
                    if cache.is_own_write(rev, kv.key(), new) {
                        continue;
                    }
                    if rest.starts_with(b"c/") {
                        shared.fs.note_chunk_change(kv.key(), new);
                    }
                    // Only an inode's previous value matters (did size or mtime change?);
                    // unknown (not cached) counts as a change of everything.
                    let cached_prev;
                    let prev = match before {
                        Some(earlier_value) => earlier_value,
                        None if rest.starts_with(b"i/") => {
                            cached_prev = cache.value_before(kv.key(), rev);
                            cached_prev.as_deref()
                        }
                        None => None,
                    };
                    if let Some(inv) = classify(&keys, kv.key(), prev, new) {
                        // A rewrite or delete (not the creation, version 1) of an inode may be
                        // an xattr change: a new inode has none, and setting one rewrites it.
                        if let (Invalidation::Inode { ino, .. }, true) =
                            (&inv, kv.version() > 1 || new.is_none())
                        {
                            xattr_suspects.push(*ino);
                        }
                        notices.push(inv);
                    }
                }
                // Mark what changed before any cache can serve the new values (see
                // `Shared::changed_elsewhere`), then the caches, then the kernel: a kernel that
                // re-asks at once must get the new values.
                for inv in &notices {
                    if let Invalidation::Inode { ino, data } = inv {
                        shared.fs.invalidate(*ino);
                        shared.changed_elsewhere(*ino, *data);
                    }
                }
                for ino in xattr_suspects {
                    shared.fs.xattrs_may_exist(ino);
                }
                cache.cache_apply(&changes, upto);
                if !usage.is_empty() {
                    for w in shared.fs.usage_apply(&usage) {
                        tracing::warn!(warning = %w, "corrupt usage value");
                    }
                }
                for inv in notices {
                    if tx.send(Notice::One(inv)).is_err() {
                        return Ok(());
                    }
                }
                backoff = Duration::from_millis(100);
            }
            Err("watch stream ended".into())
        }
        .await;
        // Changes may be missed until the watch follows again.
        cache.cache_reset();
        match result {
            Ok(()) => return,
            Err(e) if e.starts_with("compacted") => {
                tracing::warn!(error = %e, "volume watch fell behind a compaction; invalidating all caches");
                shared.fs.invalidate_all();
                let inos = shared.told_inodes();
                for ino in &inos {
                    shared.changed_elsewhere(*ino, true);
                }
                if tx.send(Notice::Inodes(inos)).is_err() {
                    return;
                }
                let mut c = client.clone();
                if let Some(r) = current_revision(&mut c, &keys).await {
                    revision = r;
                }
                // Usage changes in between are unknown too: read the keys again.
                if let Err(e) = shared.fs.load_usage().await {
                    tracing::warn!(error = %e, "re-reading the volume's usage failed");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, revision, "volume watch broke; resuming");
            }
        }
        tokio::time::sleep(backoff).await;
        // At most a second: after an etcd outage the watch is back within about a second of
        // etcd's return (until then the attribute TTL bounds staleness).
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinfs_core::schema::{encode, FileKind, InodeRec};

    fn inode(size: u64, mtime: i64, mode: u32) -> Vec<u8> {
        encode(&InodeRec {
            kind: FileKind::File,
            mode,
            uid: 0,
            gid: 0,
            size,
            nlink: 1,
            atime_ns: 0,
            mtime_ns: mtime,
            ctime_ns: 0,
            rdev: 0,
            parent: 0,
            target: None,
        })
    }

    #[test]
    fn keys_map_to_the_right_invalidations() {
        let keys = Keys::new("vol");
        let ik = keys.inode(42);
        // chmod only: attributes, not data
        assert_eq!(
            classify(
                &keys,
                &ik,
                Some(&inode(5, 1, 0o644)),
                Some(&inode(5, 1, 0o600))
            ),
            Some(Invalidation::Inode {
                ino: 42,
                data: false
            })
        );
        // new content: data too
        assert_eq!(
            classify(
                &keys,
                &ik,
                Some(&inode(5, 1, 0o644)),
                Some(&inode(5, 2, 0o644))
            ),
            Some(Invalidation::Inode {
                ino: 42,
                data: true
            })
        );
        // corrupt previous value: be safe, drop data
        assert_eq!(
            classify(&keys, &ik, Some(b"garbage"), Some(&inode(5, 2, 0o644))),
            Some(Invalidation::Inode {
                ino: 42,
                data: true
            })
        );
        let dk = keys.dirent(7, b"photo.jpg");
        assert_eq!(
            classify(&keys, &dk, None, Some(b"x")),
            Some(Invalidation::Entry {
                parent: 7,
                name: b"photo.jpg".to_vec()
            })
        );
        assert_eq!(classify(&keys, &keys.chunk(42, 0), None, None), None);
        assert_eq!(classify(&keys, b"/twinfs/v/vol/d/short", None, None), None);
        assert_eq!(classify(&keys, b"/twinfs/other", None, None), None);
    }
}
