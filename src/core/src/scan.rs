//! Whole-volume scans for the cluster's upkeep: which blocks the namespace references (repair,
//! garbage collection, fsck) and the paths of given inodes (fsck names the files it finds
//! damaged). Paged range reads through [`MetaKv`], so they run against etcd or the in-memory
//! model alike; each page is a bounded read.

use std::collections::{HashMap, HashSet};

use crate::kv::{prefix_end, KvEntry, MetaKv, Revision};
use crate::schema::{decode, ChunkRec, DirentRec, Keys, PendingRec};
use crate::{BlockHash, FsError, FsResult, ROOT_INO};

/// Keys read per range request.
const PAGE: usize = 1000;

/// One chunk of one file and the block holding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    pub hash: BlockHash,
    pub ino: u64,
    pub index: u64,
    pub len: u32,
}

/// Calls `each` for every chunk record of the volume, in key order, and `bad` (with the key and
/// the reason) for every record that does not decode; only failing to read is an error.
pub async fn chunk_refs(
    kv: &dyn MetaKv,
    keys: &Keys,
    mut each: impl FnMut(BlockRef),
    mut bad: impl FnMut(&[u8], FsError),
) -> FsResult<()> {
    for_each_under(kv, &keys.all_chunks(), |e| {
        let parsed = keys.parse_any_chunk(&e.key).and_then(|(ino, index)| {
            let rec: ChunkRec = decode(&e.key, &e.value)?;
            Ok(BlockRef {
                hash: rec.hash()?,
                ino,
                index,
                len: rec.len,
            })
        });
        match parsed {
            Ok(r) => each(r),
            Err(err) => bad(&e.key, err),
        }
    })
    .await
}

/// Calls `each` for every key under `prefix`, in key order, a bounded page at a time.
pub(crate) async fn for_each_under(
    kv: &dyn MetaKv,
    prefix: &[u8],
    mut each: impl FnMut(&KvEntry),
) -> FsResult<()> {
    let end = prefix_end(prefix);
    let mut start = prefix.to_vec();
    loop {
        let page = kv.range(&start, &end, PAGE).await?;
        page.entries.iter().for_each(&mut each);
        match (page.more, page.entries.last()) {
            (true, Some(last)) => {
                start = last.key.clone();
                start.push(0);
            }
            _ => return Ok(()),
        }
    }
}

/// The path (from the volume's root) of each inode in `inos` that has a name; hard-linked files
/// get one of their names. Inodes without a name (unlinked, still open) are left out.
pub async fn paths_of(
    kv: &dyn MetaKv,
    keys: &Keys,
    inos: &HashSet<u64>,
) -> FsResult<HashMap<u64, String>> {
    // child -> (parent, name) for every entry of the volume.
    let mut up: HashMap<u64, (u64, Vec<u8>)> = HashMap::new();
    let prefix = keys.all_dirents();
    let end = prefix_end(&prefix);
    let mut start = prefix.clone();
    loop {
        let page = kv.range(&start, &end, PAGE).await?;
        for e in &page.entries {
            let (parent, name) = keys.parse_any_dirent(&e.key)?;
            let rec: DirentRec = decode(&e.key, &e.value)?;
            up.entry(rec.ino).or_insert((parent, name.to_vec()));
        }
        match (page.more, page.entries.last()) {
            (true, Some(last)) => {
                start = last.key.clone();
                start.push(0);
            }
            _ => break,
        }
    }
    let mut out = HashMap::new();
    for &ino in inos {
        let mut parts = Vec::new();
        let mut cur = ino;
        let mut steps = 0;
        while cur != ROOT_INO {
            let Some((parent, name)) = up.get(&cur) else {
                break;
            };
            parts.push(String::from_utf8_lossy(name).into_owned());
            cur = *parent;
            steps += 1;
            if steps > 4096 {
                return Err(FsError::Corrupt(format!(
                    "directory loop above inode {ino}"
                )));
            }
        }
        if cur == ROOT_INO && !parts.is_empty() {
            parts.reverse();
            out.insert(ino, format!("/{}", parts.join("/")));
        }
    }
    Ok(out)
}

/// Every pending-content record of the volume (see the core's `pending.rs`): the inode, the
/// record and its revision. Records that do not decode are passed to `bad`.
pub async fn pending_records(
    kv: &dyn MetaKv,
    keys: &Keys,
    mut bad: impl FnMut(&[u8], FsError),
) -> FsResult<Vec<(u64, PendingRec, Revision)>> {
    let mut out = Vec::new();
    for_each_under(kv, &keys.all_pending(), |e| {
        let parsed = keys
            .parse_pending(&e.key)
            .and_then(|ino| Ok((ino, decode::<PendingRec>(&e.key, &e.value)?)));
        match parsed {
            Ok((ino, rec)) => out.push((ino, rec, e.mod_revision)),
            Err(err) => bad(&e.key, err),
        }
    })
    .await?;
    Ok(out)
}

/// The blocks a pending record names.
pub fn pending_blocks(rec: &PendingRec) -> impl Iterator<Item = BlockHash> + '_ {
    rec.blocks.iter().filter_map(|(_, h)| h.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fs, FsOptions, MemBlocks, MemKv};
    use std::sync::Arc;

    #[test]
    fn scans_find_every_block_and_name_its_file() {
        futures::executor::block_on(async {
            let kv = Arc::new(MemKv::new());
            let blocks = Arc::new(MemBlocks::new());
            let opts = FsOptions {
                chunk_size: 4,
                ..Default::default()
            };
            let fs = Fs::open_volume(kv.clone(), blocks, "v", opts)
                .await
                .expect("format");
            let d = fs
                .mkdir(ROOT_INO, b"dir", 0o755, 0, 0)
                .await
                .expect("mkdir");
            let (a, _) = fs
                .create(d.ino, b"f", 0o644, 0, 0, true)
                .await
                .expect("create");
            let mut f = fs.open(a.ino).await.expect("open");
            fs.write(&mut f, 0, b"0123456789").await.expect("write");
            fs.flush(&mut f).await.expect("flush");
            fs.release(f).await.expect("release");
            let keys = Keys::new("v");
            let mut refs = Vec::new();
            let mut bad = 0;
            chunk_refs(kv.as_ref(), &keys, |r| refs.push(r), |_, _| bad += 1)
                .await
                .expect("scan");
            assert_eq!(bad, 0);
            assert_eq!(refs.len(), 3, "10 bytes in 4-byte chunks");
            assert!(refs.iter().all(|r| r.ino == a.ino));
            assert_eq!(
                refs.iter().map(|r| r.index).collect::<Vec<_>>(),
                vec![0, 1, 2]
            );
            assert_eq!(refs[0].hash, BlockHash::of(b"0123"));
            let names = paths_of(kv.as_ref(), &keys, &[a.ino, 999].into_iter().collect())
                .await
                .expect("paths");
            assert_eq!(names.get(&a.ino).map(String::as_str), Some("/dir/f"));
            assert!(!names.contains_key(&999));

            // A corrupt record is reported with its key; the others are still found.
            let key = keys.chunk(a.ino, 7);
            kv.txn(
                vec![],
                vec![crate::TxnOp::Put {
                    key: key.clone(),
                    value: b"garbage".to_vec(),
                }],
            )
            .await
            .expect("put");
            let (mut found, mut bad_keys) = (0, Vec::new());
            chunk_refs(
                kv.as_ref(),
                &keys,
                |_| found += 1,
                |k, _| bad_keys.push(k.to_vec()),
            )
            .await
            .expect("scan");
            assert_eq!((found, bad_keys), (3, vec![key]));
        });
    }
}
