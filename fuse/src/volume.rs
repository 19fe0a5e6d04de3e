//! The volume registry in etcd.
//!
//! | key | value | |
//! |---|---|---|
//! | `/twinfs/volumes/<name>` | [`VolumeRecord`] (JSON) | a volume's settings: replicas, quota, chunk size |
//! | `/twinfs/v/<name>/…` | see `twinfs_core` | the volume's namespace (inodes, entries, chunk maps) |
//! | `/twinfs/mounts/<name>/<mount-id>` | [`MountRecord`] (JSON), under a lease | one live mount of the volume |
//!
//! * [`create`] writes the record in one transaction that requires it not to exist, then
//!   formats the namespace (root directory, volume parameters) through the core, so
//!   [`inspect`] works at once. Should formatting fail, the first mount formats instead.
//! * A mount calls [`register_mount`] **before** opening the volume: the record is written only
//!   if the volume exists (same transaction), under an etcd lease (TTL 10 s) that a background
//!   task renews, so a crashed mount disappears by itself within the TTL.
//! * [`set_quota`] and [`set_replicas`] change a volume's settings in one transaction compared
//!   on the record's revision; every mount follows its volume's record ([`follow_record`]) and
//!   enforces the new quota (and shows it in `statfs`), or makes the new number of copies of
//!   what it writes, from the moment its watch sees it.
//! * [`delete`] removes the record and the whole namespace in one transaction that requires
//!   that no mount record exists; a live mount therefore blocks it, and a mount cannot
//!   register in a deleted volume. The volume's **data blocks are not touched**: nothing
//!   references them any more, and the cluster's block garbage collection reclaims them after
//!   its grace period.
//!
//! Names: 1 to 64 characters of `A-Z a-z 0-9 _ . -`, not starting with `.` or `-` (a subset of
//! what `twinfs_core::Fs::open_volume` accepts).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use twinfs_cluster::etcd::{Client, REQUEST_TIMEOUT};
use twinfs_cluster::membership::unix_now;
use twinfs_cluster::BlockHash;
use twinfs_core::fs::MAX_CHUNK_SIZE;
use twinfs_core::schema::{decode_inode, Keys};
use twinfs_core::{prefix_end, BlockError, BlockIo, FileKind, Fs, FsOptions, DEFAULT_CHUNK_SIZE};

use crate::etcd_kv::EtcdKv;

/// Where volume records live.
pub const VOLUMES_PREFIX: &str = "/twinfs/volumes/";
/// Where mount records live.
pub const MOUNTS_PREFIX: &str = "/twinfs/mounts/";
pub const DEFAULT_REPLICAS: u8 = 2;
pub const MAX_REPLICAS: u8 = 5;
pub const MAX_NAME_LEN: usize = 64;
/// Lease TTL of mount records: a mount that stops renewing disappears after this long.
pub const MOUNT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Keys per page when scanning.
const PAGE: i64 = 1000;

pub fn volume_key(name: &str) -> String {
    format!("{VOLUMES_PREFIX}{name}")
}

/// `/twinfs/mounts/<volume>/`.
pub fn mounts_prefix(volume: &str) -> String {
    format!("{MOUNTS_PREFIX}{volume}/")
}

/// `/twinfs/v/<volume>/`: the volume's namespace.
pub fn namespace_prefix(volume: &str) -> String {
    String::from_utf8_lossy(Keys::new(volume).prefix()).into_owned()
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VolumeError {
    #[error("invalid volume name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("invalid volume settings: {0}")]
    InvalidSettings(String),
    #[error("volume {0} already exists")]
    AlreadyExists(String),
    #[error("volume {0} does not exist (create it with `twinfs volume create {0}`)")]
    NotFound(String),
    #[error("volume {0} has no record but metadata of an earlier volume of that name is still under /twinfs/v/{0}/; remove it with `twinfs volume delete {0}` first")]
    Leftovers(String),
    #[error("{}", mounted_message(.volume, .mounts, .unreadable))]
    Mounted {
        volume: String,
        mounts: Vec<MountRecord>,
        /// Keys of mount records that could not be decoded (they block deletion too).
        unreadable: Vec<String>,
    },
    #[error("corrupt record at {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("etcd: {0}")]
    Etcd(String),
}

fn mounted_message(volume: &str, mounts: &[MountRecord], unreadable: &[String]) -> String {
    let mut places: Vec<String> = mounts
        .iter()
        .map(|m| format!("{}:{} (pid {})", m.host, m.path, m.pid))
        .collect();
    places.extend(
        unreadable
            .iter()
            .map(|k| format!("an unreadable mount record {k}")),
    );
    format!(
        "volume {volume} is mounted at {}; unmount it first",
        places.join(", ")
    )
}

pub type Result<T, E = VolumeError> = std::result::Result<T, E>;

/// Checks a volume name; the error says what is wrong with it.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |reason: String| {
        Err(VolumeError::InvalidName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("a name must not be empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return bad(format!(
            "it contains {c:?}; only letters, digits, '_', '.' and '-' are allowed"
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return bad(format!(
            "it is {} characters long; at most {MAX_NAME_LEN} are allowed",
            name.len()
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("a name must not start with '.' or '-'".into());
    }
    Ok(())
}

fn default_replicas() -> u8 {
    DEFAULT_REPLICAS
}

fn default_chunk_size() -> u32 {
    DEFAULT_CHUNK_SIZE
}

/// `/twinfs/volumes/<name>`: a volume's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    /// Copies of every block (1..=5).
    #[serde(default = "default_replicas")]
    pub replicas: u8,
    /// Most bytes the volume may hold (`None`: no quota).
    #[serde(default)]
    pub quota_bytes: Option<u64>,
    /// Chunk size the namespace is formatted with.
    #[serde(default = "default_chunk_size")]
    pub chunk_size: u32,
    #[serde(default)]
    pub created_unix: u64,
}

impl VolumeRecord {
    /// A record with default settings.
    pub fn new(name: &str, replicas: u8, quota_bytes: Option<u64>) -> VolumeRecord {
        VolumeRecord {
            name: name.to_string(),
            replicas,
            quota_bytes,
            chunk_size: DEFAULT_CHUNK_SIZE,
            created_unix: unix_now(),
        }
    }

    /// Checks the settings (the name included).
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        if self.replicas == 0 || self.replicas > MAX_REPLICAS {
            return Err(VolumeError::InvalidSettings(format!(
                "replicas must be between 1 and {MAX_REPLICAS} (got {})",
                self.replicas
            )));
        }
        if self.quota_bytes == Some(0) {
            return Err(VolumeError::InvalidSettings(
                "a quota must be greater than 0 (leave it out for no quota)".into(),
            ));
        }
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(VolumeError::InvalidSettings(format!(
                "chunk size must be between 1 and {MAX_CHUNK_SIZE} bytes (got {})",
                self.chunk_size
            )));
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        // A plain struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes the value stored at `/twinfs/volumes/<name>`; anything malformed, out of range
    /// or naming another volume is [`VolumeError::Corrupt`].
    pub fn decode(name: &str, value: &[u8]) -> Result<VolumeRecord> {
        let key = volume_key(name);
        let corrupt = |reason: String| VolumeError::Corrupt {
            key: key.clone(),
            reason,
        };
        let rec: VolumeRecord = serde_json::from_slice(value)
            .map_err(|e| corrupt(format!("not a volume record: {e}")))?;
        if rec.name != name {
            return Err(corrupt(format!("the record names volume {:?}", rec.name)));
        }
        rec.validate().map_err(|e| corrupt(e.to_string()))?;
        Ok(rec)
    }
}

/// `/twinfs/mounts/<volume>/<id>`: one live mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub id: String,
    pub host: String,
    pub path: String,
    pub pid: u32,
    pub started_unix: u64,
    /// The mount's filesystem instance (hex): the owner of its usage delta keys and of the
    /// orphans it keeps open. Absent in records of mounts older than usage accounting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

impl MountRecord {
    /// The filesystem instance of this mount, when recorded and well-formed.
    pub fn instance_id(&self) -> Option<u64> {
        self.instance
            .as_deref()
            .and_then(|s| u64::from_str_radix(s, 16).ok())
    }

    pub fn decode(key: &str, value: &[u8]) -> Result<MountRecord> {
        serde_json::from_slice(value).map_err(|e| VolumeError::Corrupt {
            key: key.to_string(),
            reason: format!("not a mount record: {e}"),
        })
    }
}

/// What [`inspect`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeInfo {
    #[serde(flatten)]
    pub record: VolumeRecord,
    /// The namespace has been formatted (it has a root directory).
    pub formatted: bool,
    /// Inodes of every kind.
    pub inodes: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// FIFOs, sockets and device nodes.
    pub other: u64,
    /// Inode records that did not decode (each is an EIO for the application).
    pub corrupt_inodes: u64,
    /// The volume's usage as the mounts count it against the quota: `usage/base` plus every
    /// mount's delta (bytes of regular files, apparent size, before replication). Equal to
    /// `bytes_in_files` unless a mount is writing or accounting drifted. For a volume that
    /// predates usage accounting and was not mounted since: `bytes_in_files`.
    pub bytes_used: u64,
    /// Sum of the regular files' sizes from a scan of every inode record.
    pub bytes_in_files: u64,
    /// Whether `bytes_used` comes from the usage keys (false: from the scan).
    pub usage_accounted: bool,
    /// Mount sessions with usage delta keys not yet folded into the base (live mounts that
    /// changed something, and crashed ones not yet tidied up).
    pub usage_instances: u64,
    /// Usage keys whose value does not decode (each counted as 0).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub usage_corrupt: Vec<String>,
    /// Unlinked inodes whose data is still to be purged.
    pub orphans: u64,
    pub mounts: Vec<MountRecord>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable_mounts: Vec<String>,
}

async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(VolumeError::Etcd(format!("{what}: {e}"))),
        Err(_) => Err(VolumeError::Etcd(format!(
            "{what}: etcd did not answer within {REQUEST_TIMEOUT:?}"
        ))),
    }
}

fn key_string(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

/// Keys under `prefix` (count only), at the current revision; returns (count, revision).
async fn count_prefix(etcd: &Client, prefix: &str, revision: i64) -> Result<(u64, i64)> {
    let mut c = etcd.clone();
    let mut opts = GetOptions::new().with_prefix().with_count_only();
    if revision > 0 {
        opts = opts.with_revision(revision);
    }
    let resp = bounded(&format!("counting {prefix}"), c.get(prefix, Some(opts))).await?;
    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    Ok((u64::try_from(resp.count()).unwrap_or(0), rev))
}

/// Every key under `prefix`, page by page, all pages at one revision (the first page's, or
/// `revision` when > 0); `f` sees each entry.
async fn scan_prefix(
    etcd: &Client,
    prefix: &str,
    mut revision: i64,
    mut f: impl FnMut(&KeyValue),
) -> Result<()> {
    let end = prefix_end(prefix.as_bytes());
    let end = if end.is_empty() { vec![0] } else { end };
    let mut start = prefix.as_bytes().to_vec();
    loop {
        let mut c = etcd.clone();
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        let resp = bounded(
            &format!("reading {prefix}"),
            c.get(start.clone(), Some(opts)),
        )
        .await?;
        if revision <= 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        for kv in resp.kvs() {
            f(kv);
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => return Ok(()),
        }
    }
}

/// A [`BlockIo`] for formatting only: formatting writes metadata, never blocks.
struct NoBlocks;

impl BlockIo for NoBlocks {
    fn put(&self, _data: Bytes) -> BoxFuture<'_, Result<BlockHash, BlockError>> {
        futures::future::ready(Err(BlockError::Other(
            "no block store while formatting a volume".into(),
        )))
        .boxed()
    }
    fn get(&self, _hash: BlockHash) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        futures::future::ready(Err(BlockError::Other(
            "no block store while formatting a volume".into(),
        )))
        .boxed()
    }
}

/// Writes the namespace's root directory and parameters (nothing if already formatted).
async fn format(etcd: &Client, rec: &VolumeRecord) -> Result<()> {
    let opts = FsOptions {
        chunk_size: rec.chunk_size,
        ..FsOptions::default()
    };
    Fs::open_volume(
        Arc::new(EtcdKv::new(etcd.clone())),
        Arc::new(NoBlocks),
        &rec.name,
        opts,
    )
    .await
    .map(|_| ())
    .map_err(|e| VolumeError::Etcd(format!("formatting volume {}: {e}", rec.name)))
}

/// Creates volume `name` and formats its namespace. Fails with
/// [`VolumeError::AlreadyExists`] when the name is taken.
pub async fn create(
    etcd: &Client,
    name: &str,
    replicas: u8,
    quota_bytes: Option<u64>,
) -> Result<VolumeRecord> {
    validate_name(name)?;
    let rec = VolumeRecord::new(name, replicas, quota_bytes);
    rec.validate()?;
    let key = volume_key(name);
    let ns = namespace_prefix(name);
    for _ in 0..3 {
        // Cheap check first: the transaction's range compare below reads every key of the
        // range, which is only cheap when the range is empty.
        let (leftovers, _) = count_prefix(etcd, &ns, 0).await?;
        if leftovers > 0 {
            return Err(if get_raw(etcd, &key).await?.is_some() {
                VolumeError::AlreadyExists(name.to_string())
            } else {
                VolumeError::Leftovers(name.to_string())
            });
        }
        let txn = Txn::new()
            .when([
                Compare::version(key.clone(), CompareOp::Equal, 0),
                Compare::version(ns.clone(), CompareOp::Equal, 0).with_prefix(),
            ])
            .and_then([TxnOp::put(key.clone(), rec.encode(), None)]);
        let mut c = etcd.clone();
        let resp = bounded(&format!("creating volume {name}"), c.txn(txn)).await?;
        if resp.succeeded() {
            if let Err(e) = format(etcd, &rec).await {
                tracing::warn!(volume = name, error = %e,
                    "volume created but not formatted; the first mount will format it");
            }
            return Ok(rec);
        }
        if get_raw(etcd, &key).await?.is_some() {
            return Err(VolumeError::AlreadyExists(name.to_string()));
        }
        // Metadata appeared under the prefix meanwhile: look again.
    }
    Err(VolumeError::Leftovers(name.to_string()))
}

async fn get_raw(etcd: &Client, key: &str) -> Result<Option<Vec<u8>>> {
    Ok(get_kv(etcd, key).await?.0.map(|kv| kv.value().to_vec()))
}

/// `key`'s entry, if any, and the store's revision when it was read.
async fn get_kv(etcd: &Client, key: &str) -> Result<(Option<KeyValue>, i64)> {
    let mut c = etcd.clone();
    let resp = bounded(&format!("reading {key}"), c.get(key, None)).await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let kv = resp
        .kvs()
        .iter()
        .find(|kv| kv.key() == key.as_bytes())
        .cloned();
    Ok((kv, revision))
}

/// Sets volume `name`'s quota (`None` removes it); returns the record before and after. Live
/// mounts follow the record ([`follow_record`]) and enforce the new quota within moments. A
/// quota below the current usage is allowed, as a full disk is: growth fails with ENOSPC until
/// files are deleted or truncated, and everything already written stays.
pub async fn set_quota(
    etcd: &Client,
    name: &str,
    quota_bytes: Option<u64>,
) -> Result<(VolumeRecord, VolumeRecord)> {
    update(etcd, name, |old| VolumeRecord {
        quota_bytes,
        ..old.clone()
    })
    .await
}

/// Sets how many copies volume `name` keeps of each block; returns the record before and after.
/// Live mounts make that many copies of what they write from the moment they see the change;
/// the blocks already stored get copies added or removed by the nodes' repair scans.
pub async fn set_replicas(
    etcd: &Client,
    name: &str,
    replicas: u8,
) -> Result<(VolumeRecord, VolumeRecord)> {
    update(etcd, name, |old| VolumeRecord {
        replicas,
        ..old.clone()
    })
    .await
}

/// Rewrites volume `name`'s record with `change` applied, in one transaction compared on the
/// record's revision, so a concurrent change is never overwritten unseen.
async fn update(
    etcd: &Client,
    name: &str,
    change: impl Fn(&VolumeRecord) -> VolumeRecord,
) -> Result<(VolumeRecord, VolumeRecord)> {
    validate_name(name)?;
    let key = volume_key(name);
    for _ in 0..5 {
        let (Some(kv), _) = get_kv(etcd, &key).await? else {
            return Err(VolumeError::NotFound(name.to_string()));
        };
        let old = VolumeRecord::decode(name, kv.value())?;
        let new = change(&old);
        new.validate()?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::put(key.clone(), new.encode(), None)]);
        let mut c = etcd.clone();
        let resp = bounded(&format!("updating volume {name}"), c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok((old, new));
        }
        // The record changed (or went) between the read and the transaction: look again.
    }
    Err(VolumeError::Etcd(format!(
        "the record of volume {name} kept changing; try again"
    )))
}

/// Follows volume `name`'s record and calls `apply` with it now and after every change, for as
/// long as `apply` returns true. A broken watch is re-established (the record re-read
/// first, so no change is missed); a record that does not decode is logged and its quota left
/// as it was.
pub async fn follow_record(etcd: Client, name: String, apply: impl Fn(&VolumeRecord) -> bool) {
    let key = volume_key(&name);
    // Whether to go on following.
    let offer = |value: &[u8]| match VolumeRecord::decode(&name, value) {
        Ok(rec) => apply(&rec),
        Err(e) => {
            tracing::warn!(error = %e, "volume record; settings unchanged");
            true
        }
    };
    let mut backoff = Duration::from_millis(200);
    loop {
        // Ok: `apply` asked to stop; Err: the watch broke.
        let result: std::result::Result<(), String> = async {
            let (kv, revision) = get_kv(&etcd, &key).await.map_err(|e| e.to_string())?;
            if let Some(kv) = kv {
                if !offer(kv.value()) {
                    return Ok(());
                }
            }
            let mut c = etcd.clone();
            let opts = etcd_client::WatchOptions::new().with_start_revision(revision + 1);
            let (_watcher, mut stream) = c
                .watch(key.as_str(), Some(opts))
                .await
                .map_err(|e| e.to_string())?;
            while let Some(resp) = stream.message().await.map_err(|e| e.to_string())? {
                if resp.compact_revision() > 0 || resp.canceled() {
                    return Err("watch cancelled".into());
                }
                for ev in resp.events() {
                    // A delete is ignored: deleting a mounted volume is refused.
                    if let (Some(kv), etcd_client::EventType::Put) = (ev.kv(), ev.event_type()) {
                        if !offer(kv.value()) {
                            return Ok(());
                        }
                    }
                }
                backoff = Duration::from_millis(200);
            }
            Err("watch stream ended".into())
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, volume = %name, "volume record watch broke; re-reading")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The record of volume `name`.
pub async fn get(etcd: &Client, name: &str) -> Result<VolumeRecord> {
    validate_name(name)?;
    match get_raw(etcd, &volume_key(name)).await? {
        Some(v) => VolumeRecord::decode(name, &v),
        None => Err(VolumeError::NotFound(name.to_string())),
    }
}

/// Every volume, by name. A corrupt record is an error naming its key.
pub async fn list(etcd: &Client) -> Result<Vec<VolumeRecord>> {
    let mut out = Vec::new();
    let mut first_err = None;
    scan_prefix(etcd, VOLUMES_PREFIX, 0, |kv| {
        let key = key_string(kv);
        let name = key.strip_prefix(VOLUMES_PREFIX).unwrap_or(&key);
        match VolumeRecord::decode(name, kv.value()) {
            Ok(r) => out.push(r),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    })
    .await?;
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Mount records of `volume`, plus the keys of those that do not decode.
async fn read_mounts(etcd: &Client, volume: &str) -> Result<(Vec<MountRecord>, Vec<String>)> {
    let mut mounts = Vec::new();
    let mut unreadable = Vec::new();
    scan_prefix(etcd, &mounts_prefix(volume), 0, |kv| {
        let key = key_string(kv);
        match MountRecord::decode(&key, kv.value()) {
            Ok(m) => mounts.push(m),
            Err(e) => {
                tracing::warn!(error = %e, "unreadable mount record");
                unreadable.push(key);
            }
        }
    })
    .await?;
    Ok((mounts, unreadable))
}

/// The filesystem instances of `volume`'s live mounts, or `None` when that cannot be known
/// (a mount record that does not decode, or one written by a version that does not record its
/// instance): then nothing may be treated as abandoned.
pub async fn live_instances(
    etcd: &Client,
    volume: &str,
) -> Result<Option<std::collections::HashSet<u64>>> {
    validate_name(volume)?;
    let (mounts, unreadable) = read_mounts(etcd, volume).await?;
    if !unreadable.is_empty() {
        return Ok(None);
    }
    Ok(mounts.iter().map(MountRecord::instance_id).collect())
}

/// The live mounts of `volume`. A corrupt record is an error naming its key.
pub async fn list_mounts(etcd: &Client, volume: &str) -> Result<Vec<MountRecord>> {
    validate_name(volume)?;
    let (mounts, unreadable) = read_mounts(etcd, volume).await?;
    match unreadable.into_iter().next() {
        Some(key) => Err(VolumeError::Corrupt {
            key,
            reason: "not a mount record".into(),
        }),
        None => Ok(mounts),
    }
}

/// Settings, usage and live mounts of volume `name`. Usage comes from a scan of every inode
/// record (paged, at one revision), so it costs one read per 1000 inodes.
pub async fn inspect(etcd: &Client, name: &str) -> Result<VolumeInfo> {
    let record = get(etcd, name).await?;
    let keys = Keys::new(name);
    let formatted = get_raw(etcd, &String::from_utf8_lossy(&keys.volume()))
        .await?
        .is_some();
    let inode_prefix = format!("{}i/", namespace_prefix(name));
    let (inodes, rev) = count_prefix(etcd, &inode_prefix, 0).await?;
    let (orphans, _) = count_prefix(etcd, &format!("{}o/", namespace_prefix(name)), rev).await?;
    let mut info = VolumeInfo {
        record,
        formatted,
        inodes,
        files: 0,
        dirs: 0,
        symlinks: 0,
        other: 0,
        corrupt_inodes: 0,
        bytes_used: 0,
        bytes_in_files: 0,
        usage_accounted: false,
        usage_instances: 0,
        usage_corrupt: Vec::new(),
        orphans,
        mounts: Vec::new(),
        unreadable_mounts: Vec::new(),
    };
    scan_prefix(etcd, &inode_prefix, rev, |kv| {
        match decode_inode(kv.key(), kv.value()) {
            Ok(ino) => match ino.kind {
                FileKind::File => {
                    info.files += 1;
                    info.bytes_in_files = info.bytes_in_files.saturating_add(ino.size);
                }
                FileKind::Dir => info.dirs += 1,
                FileKind::Symlink => info.symlinks += 1,
                _ => info.other += 1,
            },
            Err(_) => info.corrupt_inodes += 1,
        }
    })
    .await?;
    let usage = twinfs_core::usage::read_usage(&EtcdKv::new(etcd.clone()), &keys)
        .await
        .map_err(|e| VolumeError::Etcd(format!("reading the usage of {name}: {e}")))?;
    info.usage_accounted = usage.base.is_some();
    info.bytes_used = if info.usage_accounted {
        usage.total()
    } else {
        info.bytes_in_files
    };
    for key in &usage.corrupt {
        tracing::warn!(key = %key, "usage value does not decode; counted as 0");
    }
    info.usage_instances = usage.instances().len() as u64;
    info.usage_corrupt = usage.corrupt;
    let (mounts, unreadable) = read_mounts(etcd, name).await?;
    info.mounts = mounts;
    info.unreadable_mounts = unreadable;
    Ok(info)
}

/// The usage of volume `name` from its usage keys (one range read), or `None` when the volume
/// predates usage accounting and was not mounted since (see [`inspect`] for a scan).
pub async fn used_bytes(etcd: &Client, name: &str) -> Result<Option<u64>> {
    validate_name(name)?;
    let usage = twinfs_core::usage::read_usage(&EtcdKv::new(etcd.clone()), &Keys::new(name))
        .await
        .map_err(|e| VolumeError::Etcd(format!("reading the usage of {name}: {e}")))?;
    Ok(usage.base.map(|_| usage.total()))
}

/// Deletes volume `name`: its record and its whole namespace, in one transaction that requires
/// that the volume has no mount record ([`VolumeError::Mounted`] otherwise). Also removes the
/// leftover namespace of a volume whose record is already gone.
///
/// The volume's data blocks stay on the nodes: nothing references them any more, and the
/// cluster's block garbage collection reclaims them after its grace period.
pub async fn delete(etcd: &Client, name: &str) -> Result<()> {
    validate_name(name)?;
    let key = volume_key(name);
    let ns = namespace_prefix(name);
    let mp = mounts_prefix(name);
    for _ in 0..5 {
        let exists = get_raw(etcd, &key).await?.is_some();
        if !exists && count_prefix(etcd, &ns, 0).await?.0 == 0 {
            return Err(VolumeError::NotFound(name.to_string()));
        }
        let txn = Txn::new()
            .when([Compare::version(mp.clone(), CompareOp::Equal, 0).with_prefix()])
            .and_then([
                TxnOp::delete(key.clone(), None),
                TxnOp::delete(ns.clone(), Some(DeleteOptions::new().with_prefix())),
            ]);
        let mut c = etcd.clone();
        let resp = bounded(&format!("deleting volume {name}"), c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(());
        }
        let (mounts, unreadable) = read_mounts(etcd, name).await?;
        if !mounts.is_empty() || !unreadable.is_empty() {
            return Err(VolumeError::Mounted {
                volume: name.to_string(),
                mounts,
                unreadable,
            });
        }
        // The last mount went away between the transaction and the read: try again.
    }
    Err(VolumeError::Etcd(format!(
        "deleting volume {name}: mounts kept coming and going; try again"
    )))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".to_string())
}

/// Writes the mount record under `lease` if the volume exists; false if it does not.
async fn put_mount(
    etcd: &Client,
    volume: &str,
    key: &str,
    value: &[u8],
    lease: i64,
) -> Result<bool> {
    let txn = Txn::new()
        .when([Compare::version(volume_key(volume), CompareOp::Greater, 0)])
        .and_then([TxnOp::put(
            key,
            value.to_vec(),
            Some(PutOptions::new().with_lease(lease)),
        )]);
    let mut c = etcd.clone();
    Ok(
        bounded(&format!("registering the mount at {key}"), c.txn(txn))
            .await?
            .succeeded(),
    )
}

async fn revoke(etcd: &Client, lease: i64) {
    let mut c = etcd.clone();
    if let Err(e) = bounded("revoking the mount lease", c.lease_revoke(lease)).await {
        tracing::debug!(error = %e, "lease revoke failed; it expires by itself");
    }
}

/// A mount's record in etcd, kept alive in the background until [`MountRegistration::leave`]
/// or drop (then the record goes with its lease: at once after `leave`, within the TTL after a
/// plain drop or a crash).
pub struct MountRegistration {
    etcd: Client,
    record: MountRecord,
    key: String,
    lease: Arc<AtomicI64>,
    lost: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for MountRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountRegistration")
            .field("key", &self.key)
            .field("record", &self.record)
            .field("lease", &self.lease_id())
            .finish()
    }
}

/// Registers a mount of `volume` at `path` by this process. Fails with
/// [`VolumeError::NotFound`] when the volume does not exist. Must be called inside a tokio
/// runtime (it spawns the lease keep-alive task).
pub async fn register_mount(etcd: &Client, volume: &str, path: &Path) -> Result<MountRegistration> {
    register_mount_as(etcd, volume, path, None, None).await
}

/// Called when a mount's registration had lapsed and was written again.
pub type Reregistered = Arc<dyn Fn() + Send + Sync>;

/// [`register_mount`] for filesystem instance `instance` (recorded, so that other mounts know
/// whose usage keys and orphans are still owned by a live mount).
pub async fn register_mount_as(
    etcd: &Client,
    volume: &str,
    path: &Path,
    instance: Option<u64>,
    on_reregistered: Option<Reregistered>,
) -> Result<MountRegistration> {
    validate_name(volume)?;
    let record = MountRecord {
        id: format!("{:016x}", rand::random::<u64>()),
        host: hostname(),
        path: path.display().to_string(),
        pid: std::process::id(),
        started_unix: unix_now(),
        instance: instance.map(|i| format!("{i:016x}")),
    };
    let key = format!("{}{}", mounts_prefix(volume), record.id);
    let value = serde_json::to_vec(&record)
        .map_err(|e| VolumeError::InvalidSettings(format!("mount record: {e}")))?;
    let ttl = i64::try_from(MOUNT_LEASE_TTL.as_secs()).unwrap_or(10);
    let mut c = etcd.clone();
    let lease = bounded("taking a lease for the mount", c.lease_grant(ttl, None))
        .await?
        .id();
    match put_mount(etcd, volume, &key, &value, lease).await {
        Ok(true) => {}
        Ok(false) => {
            revoke(etcd, lease).await;
            return Err(VolumeError::NotFound(volume.to_string()));
        }
        Err(e) => {
            revoke(etcd, lease).await;
            return Err(e);
        }
    }
    let lease_cell = Arc::new(AtomicI64::new(lease));
    let lost = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(keep_alive(
        etcd.clone(),
        volume.to_string(),
        key.clone(),
        value,
        lease_cell.clone(),
        lost.clone(),
        on_reregistered,
    ));
    Ok(MountRegistration {
        etcd: etcd.clone(),
        record,
        key,
        lease: lease_cell,
        lost,
        task: Some(task),
    })
}

impl MountRegistration {
    pub fn record(&self) -> &MountRecord {
        &self.record
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// The etcd key of the record.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The current lease (it changes when an expired lease had to be replaced).
    pub fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// True when the registration could not be restored: its lease expired (etcd unreachable
    /// for longer than the TTL) and the volume was deleted meanwhile. The mount should stop.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Removes the record at once (revokes its lease) and stops the keep-alive task.
    pub async fn leave(mut self) -> Result<()> {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let lease = self.lease_id();
        let mut c = self.etcd.clone();
        let revoked = bounded("revoking the mount lease", c.lease_revoke(lease)).await;
        // The lease is ours to revoke only once: Drop must not try again.
        self.lease.store(0, Ordering::Relaxed);
        revoked.map(|_| ())
    }
}

impl Drop for MountRegistration {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let lease = self.lease.swap(0, Ordering::Relaxed);
        if lease == 0 {
            return;
        }
        // Best effort: revoke now if a runtime is around; otherwise the lease expires by itself.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let etcd = self.etcd.clone();
            handle.spawn(async move { revoke(&etcd, lease).await });
        }
    }
}

async fn keep_alive(
    etcd: Client,
    volume: String,
    key: String,
    value: Vec<u8>,
    lease: Arc<AtomicI64>,
    lost: Arc<AtomicBool>,
    on_reregistered: Option<Reregistered>,
) {
    let ttl = i64::try_from(MOUNT_LEASE_TTL.as_secs()).unwrap_or(10);
    let renew_every = MOUNT_LEASE_TTL / 3;
    loop {
        let current = lease.load(Ordering::Relaxed);
        let result: Result<(), String> = async {
            let mut c = etcd.clone();
            let (mut keeper, mut stream) = bounded("lease keep-alive", c.lease_keep_alive(current))
                .await
                .map_err(|e| e.to_string())?;
            loop {
                bounded("lease keep-alive", keeper.keep_alive())
                    .await
                    .map_err(|e| e.to_string())?;
                match tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    Ok(Ok(_)) => return Err(format!("lease {current:x} expired")),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err("no keep-alive answer within 3 s".into()),
                }
                tokio::time::sleep(renew_every).await;
            }
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(mount = %key, error = %e, "mount lease renewal failed; retrying");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut c = etcd.clone();
        let alive = matches!(
            bounded("lease time-to-live", c.lease_time_to_live(current, None)).await,
            Ok(r) if r.ttl() > 0
        );
        if alive {
            continue;
        }
        // The lease expired (etcd unreachable longer than the TTL): take a new one and write the
        // record again, if the volume still exists.
        let new = match bounded("taking a lease for the mount", c.lease_grant(ttl, None)).await {
            Ok(g) => g.id(),
            Err(e) => {
                tracing::warn!(mount = %key, error = %e, "cannot take a new lease yet");
                continue;
            }
        };
        match put_mount(&etcd, &volume, &key, &value, new).await {
            Ok(true) => {
                lease.store(new, Ordering::Relaxed);
                tracing::info!(mount = %key, lease = new, "mount re-registered under a new lease");
                if let Some(f) = &on_reregistered {
                    f();
                }
            }
            Ok(false) => {
                revoke(&etcd, new).await;
                lost.store(true, Ordering::Relaxed);
                tracing::error!(volume = %volume, mount = %key,
                    "the volume was deleted while this mount's registration had lapsed");
                return;
            }
            Err(e) => {
                revoke(&etcd, new).await;
                tracing::warn!(mount = %key, error = %e, "re-registering the mount failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(name: &str) -> String {
        match validate_name(name) {
            Err(VolumeError::InvalidName { reason, .. }) => reason,
            other => panic!("{name:?}: expected InvalidName, got {other:?}"),
        }
    }

    #[test]
    fn names() {
        for ok in [
            "a",
            "uploads",
            "wp-content_2.old",
            "A",
            "0",
            &"x".repeat(64),
        ] {
            assert_eq!(validate_name(ok), Ok(()), "{ok:?}");
        }
        assert!(reason("").contains("empty"));
        assert!(reason(&"x".repeat(65)).contains("at most 64"));
        assert!(reason(".hidden").contains("start with"));
        assert!(reason("-x").contains("start with"));
        assert!(reason("a/b").contains("'/'"));
        assert!(reason("a b").contains("' '"));
        assert!(reason("é").contains("only letters"));
        assert!(reason("a\0").contains("only letters"));
        assert!(reason("..").contains("start with"));
    }

    #[test]
    fn accepted_names_are_accepted_by_the_core() {
        // Whatever the registry accepts, Fs::open_volume must accept too.
        let blocks: Arc<dyn BlockIo> = Arc::new(NoBlocks);
        for name in ["a", "wp-content_2.old", "Z9", &"y".repeat(64)] {
            assert_eq!(validate_name(name), Ok(()));
            let kv = Arc::new(twinfs_core::MemKv::new());
            let r = futures::executor::block_on(Fs::open_volume(
                kv,
                blocks.clone(),
                name,
                FsOptions::default(),
            ));
            assert!(r.is_ok(), "{name:?}");
        }
    }

    #[test]
    fn records_decode_or_fail_clearly() {
        let rec = VolumeRecord::new("vol", 2, Some(10 << 30));
        assert_eq!(VolumeRecord::decode("vol", &rec.encode()), Ok(rec));
        // Defaults fill in missing optional fields.
        let minimal = VolumeRecord::decode("vol", br#"{"name":"vol"}"#).unwrap();
        assert_eq!(minimal.replicas, DEFAULT_REPLICAS);
        assert_eq!(minimal.chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(minimal.quota_bytes, None);
        for garbage in [
            &b""[..],
            b"\x00\xff",
            b"not json",
            b"[]",
            b"{}",
            br#"{"name":"other"}"#,
            br#"{"name":"vol","replicas":0}"#,
            br#"{"name":"vol","replicas":9}"#,
            br#"{"name":"vol","replicas":-1}"#,
            br#"{"name":"vol","chunk_size":0}"#,
            br#"{"name":"vol","quota_bytes":0}"#,
        ] {
            match VolumeRecord::decode("vol", garbage) {
                Err(VolumeError::Corrupt { key, reason }) => {
                    assert_eq!(key, "/twinfs/volumes/vol");
                    assert!(!reason.is_empty());
                }
                other => panic!("{:?}: {other:?}", String::from_utf8_lossy(garbage)),
            }
        }
        assert!(matches!(
            MountRecord::decode("/twinfs/mounts/vol/x", b"{\"id\":1}"),
            Err(VolumeError::Corrupt { .. })
        ));
    }

    #[test]
    fn settings_are_checked() {
        assert!(matches!(
            VolumeRecord::new("v", 0, None).validate(),
            Err(VolumeError::InvalidSettings(_))
        ));
        assert!(matches!(
            VolumeRecord::new("v", 6, None).validate(),
            Err(VolumeError::InvalidSettings(_))
        ));
        assert!(matches!(
            VolumeRecord::new("v", 2, Some(0)).validate(),
            Err(VolumeError::InvalidSettings(_))
        ));
        assert_eq!(VolumeRecord::new("v", 5, Some(1)).validate(), Ok(()));
    }

    #[test]
    fn mounted_error_names_every_mount() {
        let e = VolumeError::Mounted {
            volume: "uploads".into(),
            mounts: vec![MountRecord {
                id: "1".into(),
                host: "web-1".into(),
                path: "/mnt/uploads".into(),
                pid: 42,
                started_unix: 0,
                instance: None,
            }],
            unreadable: vec![],
        };
        assert_eq!(
            e.to_string(),
            "volume uploads is mounted at web-1:/mnt/uploads (pid 42); unmount it first"
        );
    }

    #[test]
    fn prefixes_do_not_overlap_between_names() {
        assert_eq!(namespace_prefix("a"), "/twinfs/v/a/");
        assert_eq!(mounts_prefix("a"), "/twinfs/mounts/a/");
        assert!(!mounts_prefix("a.b").starts_with(&mounts_prefix("a")));
        assert!(!namespace_prefix("ab").starts_with(&namespace_prefix("a")));
    }
}
