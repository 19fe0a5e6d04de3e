//! Key schema and value encoding (see the crate docs for the full description).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use twinfs_cluster::BlockHash;

use crate::error::{FsError, FsResult};

/// Version byte in front of every JSON-encoded value.
pub const VALUE_V1: u8 = 1;
/// Version byte in front of raw (xattr) values.
pub const RAW_V1: u8 = 0x81;

/// The kind of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl FileKind {
    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDev => libc::S_IFCHR,
            FileKind::BlockDev => libc::S_IFBLK,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`, if any.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Some(FileKind::File),
            libc::S_IFDIR => Some(FileKind::Dir),
            libc::S_IFLNK => Some(FileKind::Symlink),
            libc::S_IFIFO => Some(FileKind::Fifo),
            libc::S_IFSOCK => Some(FileKind::Socket),
            libc::S_IFCHR => Some(FileKind::CharDev),
            libc::S_IFBLK => Some(FileKind::BlockDev),
            _ => None,
        }
    }
}

/// `i/<ino>`: an inode's attributes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeRec {
    pub kind: FileKind,
    /// Permission bits only (`0o7777`); the type comes from `kind`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    #[serde(default)]
    pub rdev: u32,
    /// Directories only: the parent directory (a directory has exactly one).
    #[serde(default)]
    pub parent: u64,
    /// Symlinks only: the target, hex-encoded in the JSON.
    #[serde(default, with = "hex_opt", skip_serializing_if = "Option::is_none")]
    pub target: Option<Vec<u8>>,
}

/// `d/<parent>/<hash>/<name>`: a directory entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirentRec {
    pub ino: u64,
    pub kind: FileKind,
}

/// `c/<ino>/<index>`: the block holding a chunk's bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRec {
    /// BLAKE3 hash of the block, hex.
    pub block: String,
    /// Bytes in the block (≤ chunk size); the rest of the chunk up to the file size is zeros.
    pub len: u32,
}

impl ChunkRec {
    pub fn hash(&self) -> FsResult<BlockHash> {
        self.block
            .parse()
            .map_err(|_| FsError::Corrupt(format!("bad block hash {:?}", self.block)))
    }
}

/// `t/<ino>`: a directory's modification and change times since its entries last changed.
/// Written without a compare by every operation that adds or removes an entry, so concurrent
/// creates in one directory do not conflict on the directory's inode; readers take `mtime`
/// from here and `ctime` as the later of this and the inode's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirTimesRec {
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// `o/<ino>`: an inode whose last link is gone and whose data is still to be purged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrphanRec {
    /// The Fs instance that had it open when it was orphaned (0 = nobody, purge any time).
    pub owner: u64,
}

/// `p/<ino>`: a new file's first content committed while its blocks were still being stored
/// (see `pending.rs`): the blocks that may not be durable yet, and the writer that vouches for
/// them while its `s/<instance>/<session>` key lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRec {
    pub instance: u64,
    pub session: u64,
    /// Chunk index and block (hex) of every chunk the transaction wrote (some of whose blocks
    /// were in flight at commit).
    pub blocks: Vec<(u64, String)>,
}

/// `usage/base` and `usage/d/<instance>/<slot>`: bytes of regular files (apparent size), the
/// folded total or one instance's cumulative signed change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRec {
    pub bytes: i64,
}

/// `m`: the volume's own parameters, fixed at format time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRec {
    pub chunk_size: u32,
}

/// `n`: the next unallocated inode number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRec {
    pub next: u64,
}

mod hex_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        match s {
            None => Ok(None),
            Some(s) => hex::decode(s).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// Encodes a record as `[VALUE_V1] ++ json`.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![VALUE_V1];
    // Serializing these plain structs into a Vec cannot fail; fall back to an empty object
    // (which decodes as corrupt, never silently) rather than panicking.
    match serde_json::to_writer(&mut out, v) {
        Ok(()) => out,
        Err(_) => vec![VALUE_V1, b'{', b'}'],
    }
}

/// Decodes a value written by [`encode`]; anything else is [`FsError::Corrupt`] (EIO).
pub fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> FsResult<T> {
    match value.split_first() {
        Some((&VALUE_V1, body)) => serde_json::from_slice(body)
            .map_err(|e| FsError::Corrupt(format!("{}: {e}", String::from_utf8_lossy(key)))),
        Some((v, _)) => Err(FsError::Corrupt(format!(
            "{}: unknown value version {v}",
            String::from_utf8_lossy(key)
        ))),
        None => Err(FsError::Corrupt(format!(
            "{}: empty value",
            String::from_utf8_lossy(key)
        ))),
    }
}

pub fn encode_raw(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() + 1);
    out.push(RAW_V1);
    out.extend_from_slice(v);
    out
}

pub fn decode_raw(key: &[u8], value: &[u8]) -> FsResult<Vec<u8>> {
    match value.split_first() {
        Some((&RAW_V1, body)) => Ok(body.to_vec()),
        _ => Err(FsError::Corrupt(format!(
            "{}: bad raw value",
            String::from_utf8_lossy(key)
        ))),
    }
}

/// Decodes and sanity-checks an inode record.
pub fn decode_inode(key: &[u8], value: &[u8]) -> FsResult<InodeRec> {
    let rec: InodeRec = decode(key, value)?;
    if rec.kind == FileKind::Symlink && rec.target.is_none() {
        return Err(FsError::Corrupt(format!(
            "{}: symlink without target",
            String::from_utf8_lossy(key)
        )));
    }
    Ok(rec)
}

/// The 62-bit hash of a name that orders a directory's entries and serves as the readdir
/// cookie. Values are in `[16, 2^62)`: cookies 0..16 are free for the adapter ("." and "..").
pub fn name_hash(name: &[u8]) -> u64 {
    let h = blake3::hash(name);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    (u64::from_be_bytes(b) >> 2) | 16
}

/// Builds every key of one volume.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: Vec<u8>,
}

impl Keys {
    pub fn new(volume: &str) -> Keys {
        Keys {
            prefix: format!("/twinfs/v/{volume}/").into_bytes(),
        }
    }

    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    fn with(&self, s: &str) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(s.as_bytes());
        k
    }

    pub fn volume(&self) -> Vec<u8> {
        self.with("m")
    }
    pub fn counter(&self) -> Vec<u8> {
        self.with("n")
    }
    pub fn inode(&self, ino: u64) -> Vec<u8> {
        self.with(&format!("i/{ino:016x}"))
    }
    /// Prefix of every inode record of the volume.
    pub fn all_inodes(&self) -> Vec<u8> {
        self.with("i/")
    }
    pub fn dir_times(&self, ino: u64) -> Vec<u8> {
        self.with(&format!("t/{ino:016x}"))
    }
    /// `w/<dir>`: the claim of the mount that made directory `dir` (under its session), which
    /// lets it answer lookups of names not in the directory without etcd; see
    /// [`crate::Fs::lookup`].
    pub fn claim(&self, dir: u64) -> Vec<u8> {
        self.with(&format!("w/{dir:016x}"))
    }
    /// `r/<dir>`: another mount asks the holder of `dir`'s claim to give it up.
    pub fn recall(&self, dir: u64) -> Vec<u8> {
        self.with(&format!("r/{dir:016x}"))
    }
    /// Parses the directory out of an `r/<dir>` key (`None` for any other key).
    pub fn parse_recall(&self, key: &[u8]) -> Option<u64> {
        let rest = key.strip_prefix(self.with("r/").as_slice())?;
        if rest.len() != 16 {
            return None;
        }
        parse_hex16(rest).ok()
    }
    /// `f/<ino>/x/<instance><fh>` (exclusive) or `f/<ino>/s/<instance><fh>` (shared): a `flock`
    /// lock on `ino` held through handle `fh` of mount `instance`, under that mount's session
    /// (see `flock.rs`). The kind is in the key so that a range compare can ask "no exclusive
    /// holder" alone.
    pub fn flock(&self, ino: u64, exclusive: bool, instance: u64, fh: u64) -> Vec<u8> {
        let kind = if exclusive { 'x' } else { 's' };
        self.with(&format!("f/{ino:016x}/{kind}/{instance:016x}{fh:016x}"))
    }
    /// Prefix of every `flock` lock on `ino`.
    pub fn flocks(&self, ino: u64) -> Vec<u8> {
        self.with(&format!("f/{ino:016x}/"))
    }
    /// Prefix of the exclusive `flock` locks on `ino`.
    pub fn flocks_exclusive(&self, ino: u64) -> Vec<u8> {
        self.with(&format!("f/{ino:016x}/x/"))
    }
    /// The inode of an `f/<ino>/…` lock key (`None` for any other key).
    pub fn parse_flock(&self, key: &[u8]) -> Option<u64> {
        let rest = key.strip_prefix(self.with("f/").as_slice())?;
        let well_formed = rest.len() == 16 + 3 + 32
            && rest[16] == b'/'
            && matches!(rest[17], b's' | b'x')
            && rest[18] == b'/';
        if !well_formed {
            return None;
        }
        parse_hex16(&rest[..16]).ok()
    }
    pub fn orphan(&self, ino: u64) -> Vec<u8> {
        self.with(&format!("o/{ino:016x}"))
    }
    pub fn orphans(&self) -> Vec<u8> {
        self.with("o/")
    }
    /// Parses the inode number out of an `o/<ino>` key.
    pub fn parse_orphan(&self, key: &[u8]) -> FsResult<u64> {
        parse_ino_under(&self.orphans(), key, "orphan")
    }
    /// `p/<ino>`: `ino`'s pending content ([`PendingRec`]).
    pub fn pending(&self, ino: u64) -> Vec<u8> {
        self.with(&format!("p/{ino:016x}"))
    }
    /// Prefix of every pending-content record.
    pub fn all_pending(&self) -> Vec<u8> {
        self.with("p/")
    }
    /// Parses the inode number out of a `p/<ino>` key.
    pub fn parse_pending(&self, key: &[u8]) -> FsResult<u64> {
        parse_ino_under(&self.all_pending(), key, "pending")
    }
    /// `s/<instance>/<session>`: exists while that session of that mount lives (put under
    /// its lease); a writer's pending content is its to settle while it does.
    pub fn writer_alive(&self, instance: u64, session: u64) -> Vec<u8> {
        self.with(&format!("s/{instance:016x}/{session:016x}"))
    }
    /// `usage/base`: the folded usage total of the volume ([`UsageRec`]).
    pub fn usage_base(&self) -> Vec<u8> {
        self.with("usage/base")
    }
    /// Prefix of every usage key (`usage/base` and the per-instance deltas).
    pub fn usage(&self) -> Vec<u8> {
        self.with("usage/")
    }
    /// Prefix of every per-instance usage delta key.
    pub fn usage_deltas(&self) -> Vec<u8> {
        self.with("usage/d/")
    }
    /// Prefix of the usage delta keys of one instance.
    pub fn usage_deltas_of(&self, instance: u64) -> Vec<u8> {
        self.with(&format!("usage/d/{instance:016x}/"))
    }
    /// `usage/d/<instance>/<slot>`: one of an instance's cumulative usage deltas.
    pub fn usage_delta(&self, instance: u64, slot: u64) -> Vec<u8> {
        self.with(&format!("usage/d/{instance:016x}/{slot:016x}"))
    }
    /// Splits a `usage/d/<instance>/<slot>` key into (instance, slot).
    pub fn parse_usage_delta(&self, key: &[u8]) -> FsResult<(u64, u64)> {
        let rest = key
            .strip_prefix(self.usage_deltas().as_slice())
            .ok_or_else(|| FsError::Corrupt("usage key outside the volume".into()))?;
        if rest.len() != 33 || rest[16] != b'/' {
            return Err(FsError::Corrupt("malformed usage key".into()));
        }
        Ok((parse_hex16(&rest[..16])?, parse_hex16(&rest[17..])?))
    }
    pub fn dir(&self, parent: u64) -> Vec<u8> {
        self.with(&format!("d/{parent:016x}/"))
    }
    /// The key prefix of every entry of `parent` whose name hashes to `hash`.
    pub fn dirent_hash(&self, parent: u64, hash: u64) -> Vec<u8> {
        self.with(&format!("d/{parent:016x}/{hash:016x}/"))
    }
    pub fn dirent(&self, parent: u64, name: &[u8]) -> Vec<u8> {
        let mut k = self.dirent_hash(parent, name_hash(name));
        k.extend_from_slice(name);
        k
    }
    /// Splits a dirent key of `parent` into (cookie, name).
    pub fn parse_dirent<'k>(&self, parent: u64, key: &'k [u8]) -> FsResult<(u64, &'k [u8])> {
        let dir = self.dir(parent);
        let rest = key
            .strip_prefix(dir.as_slice())
            .ok_or_else(|| FsError::Corrupt("dirent key outside its directory".into()))?;
        if rest.len() < 18 || rest[16] != b'/' {
            return Err(FsError::Corrupt("malformed dirent key".into()));
        }
        let hash = parse_hex16(&rest[..16])?;
        Ok((hash, &rest[17..]))
    }
    /// Prefix of every chunk record of the volume.
    pub fn all_chunks(&self) -> Vec<u8> {
        self.with("c/")
    }
    /// Splits any `c/<ino>/<index>` key into (ino, index).
    pub fn parse_any_chunk(&self, key: &[u8]) -> FsResult<(u64, u64)> {
        let rest = key
            .strip_prefix(self.all_chunks().as_slice())
            .ok_or_else(|| FsError::Corrupt("chunk key outside the volume".into()))?;
        if rest.len() != 33 || rest[16] != b'/' {
            return Err(FsError::Corrupt("malformed chunk key".into()));
        }
        Ok((parse_hex16(&rest[..16])?, parse_hex16(&rest[17..])?))
    }
    /// Prefix of every directory entry of the volume.
    pub fn all_dirents(&self) -> Vec<u8> {
        self.with("d/")
    }
    /// Splits any `d/<parent>/<hash>/<name>` key into (parent, name).
    pub fn parse_any_dirent<'k>(&self, key: &'k [u8]) -> FsResult<(u64, &'k [u8])> {
        let rest = key
            .strip_prefix(self.all_dirents().as_slice())
            .ok_or_else(|| FsError::Corrupt("dirent key outside the volume".into()))?;
        if rest.len() < 35 || rest[16] != b'/' || rest[33] != b'/' {
            return Err(FsError::Corrupt("malformed dirent key".into()));
        }
        Ok((parse_hex16(&rest[..16])?, &rest[34..]))
    }
    pub fn chunks(&self, ino: u64) -> Vec<u8> {
        self.with(&format!("c/{ino:016x}/"))
    }
    pub fn chunk(&self, ino: u64, index: u64) -> Vec<u8> {
        self.with(&format!("c/{ino:016x}/{index:016x}"))
    }
    pub fn parse_chunk(&self, ino: u64, key: &[u8]) -> FsResult<u64> {
        let rest = key
            .strip_prefix(self.chunks(ino).as_slice())
            .ok_or_else(|| FsError::Corrupt("chunk key outside its inode".into()))?;
        parse_hex16(rest)
    }
    pub fn xattrs(&self, ino: u64) -> Vec<u8> {
        self.with(&format!("x/{ino:016x}/"))
    }
    pub fn xattr(&self, ino: u64, name: &[u8]) -> Vec<u8> {
        let mut k = self.xattrs(ino);
        k.extend_from_slice(name);
        k
    }
}

/// The inode number of a `<prefix><ino>` key (`what` names the kind in the error).
fn parse_ino_under(prefix: &[u8], key: &[u8], what: &str) -> FsResult<u64> {
    let rest = key
        .strip_prefix(prefix)
        .ok_or_else(|| FsError::Corrupt(format!("bad {what} key")))?;
    parse_hex16(rest)
}

fn parse_hex16(s: &[u8]) -> FsResult<u64> {
    if s.len() != 16 {
        return Err(FsError::Corrupt("bad number in key".into()));
    }
    std::str::from_utf8(s)
        .ok()
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| FsError::Corrupt("bad number in key".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_values_are_errors() {
        let k = b"k";
        assert!(decode::<InodeRec>(k, b"").is_err());
        assert!(decode::<InodeRec>(k, b"\x02{}").is_err());
        assert!(decode::<InodeRec>(k, b"\x01{not json").is_err());
        assert!(decode::<InodeRec>(k, b"\x01{}").is_err());
        assert!(decode::<DirentRec>(k, b"\x01{\"ino\":1,\"kind\":\"weird\"}").is_err());
        assert!(decode_raw(k, b"\x01abc").is_err());
        let bad_hash = ChunkRec {
            block: "zz".into(),
            len: 1,
        };
        assert_eq!(bad_hash.hash().unwrap_err().errno(), libc::EIO);
        let sym: Vec<u8> = encode(&InodeRec {
            kind: FileKind::Symlink,
            mode: 0o777,
            uid: 0,
            gid: 0,
            size: 0,
            nlink: 1,
            atime_ns: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            rdev: 0,
            parent: 0,
            target: None,
        });
        assert!(decode_inode(k, &sym).is_err());
    }

    #[test]
    fn keys_sort_and_parse() {
        let keys = Keys::new("v");
        assert!(keys.chunk(1, 2) < keys.chunk(1, 10));
        assert!(keys.chunk(1, 0xffff) < keys.chunk(2, 0));
        let k = keys.dirent(7, b"hello");
        let (h, n) = keys.parse_dirent(7, &k).unwrap();
        assert_eq!(n, b"hello");
        assert_eq!(h, name_hash(b"hello"));
        assert!((16..(1 << 62)).contains(&h));
        assert!(keys.parse_dirent(7, &keys.dir(7)).is_err());
        assert_eq!(keys.parse_chunk(3, &keys.chunk(3, 99)).unwrap(), 99);
    }
}
