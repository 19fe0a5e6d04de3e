//! Volume usage accounting and the quota check.
//!
//! **Usage** is the sum of `st_size` of the volume's regular files (apparent size, holes
//! included, counted once whatever the replica count). An unlinked file still open somewhere
//! counts until it is purged.
//!
//! **Keys.** `usage/base` holds the folded total ([`UsageRec`]). Each [`Fs`] instance (one mount
//! session) owns [`USAGE_SLOTS`] keys `usage/d/<instance>/<slot>`, each holding a cumulative
//! signed delta. Volume usage = base + every delta. Only the owner writes its keys, so they
//! need no compare: every transaction of the core that changes a regular file's size or purges
//! one (flush, truncate, unlink/rename purging a file, orphan purge) also puts one of its
//! slots' new value (old value + this transaction's change) in the same transaction. The value
//! is computed from the transaction being committed, so a retried transaction never counts
//! twice. Several slots let that many size-changing transactions of one mount be in flight at
//! once (each slot is locked from the put to the answer, so two commits never write one slot
//! from the same old value).
//!
//! A transaction whose outcome is unknown (etcd timed out) marks its slot stale: before its
//! next use the slot is read back from the store, which only its owner writes.
//!
//! **Folding.** On a clean stop the mount adds its deltas to the base and deletes its keys in
//! one transaction compared on the base; the delta keys of instances without a mount record
//! (crashed mounts) are folded the same way by the next mount that starts. Folding only tidies
//! up: the total is the same before and after.
//!
//! **The view.** Each instance keeps base + the other instances' deltas in memory, fed by the
//! mount's etcd watch ([`Fs::usage_apply`]), plus its own slots: it knows the volume's usage
//! within the watch's latency without reading anything. Values that do not decode count as 0
//! and are reported.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;

use crate::error::{FsError, FsResult};
use crate::fs::Fs;
use crate::kv::{prefix_end, Compare, KvEntry, MetaKv, Revision, TxnOp};
use crate::schema::{decode, decode_inode, encode, FileKind, Keys, UsageRec};

/// Usage delta keys per instance: size-changing transactions one mount may have in flight.
pub const USAGE_SLOTS: u64 = 4;

/// Keys read per range request when scanning.
const PAGE: usize = 1000;

/// A byte count from the store as i64 (sizes are at most 2^60; anything larger saturates).
pub(crate) fn bytes_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Decodes a usage value; anything but a [`UsageRec`] is [`FsError::Corrupt`].
pub fn decode_usage(key: &[u8], value: &[u8]) -> FsResult<i64> {
    decode::<UsageRec>(key, value).map(|r| r.bytes)
}

pub(crate) fn encode_usage(bytes: i64) -> Vec<u8> {
    encode(&UsageRec { bytes })
}

/// One of this instance's delta keys, as last written.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    pub value: i64,
    /// A transaction writing this slot ended without a known outcome: read it back first.
    pub stale: bool,
    /// The [`Fs::usage_resync`] epoch the value was last read back at.
    pub epoch: u64,
}

/// What this instance knows of the other usage keys.
#[derive(Debug, Default)]
pub(crate) struct UsageView {
    pub base: i64,
    /// Other instances' delta keys and their values.
    pub others: HashMap<Vec<u8>, i64>,
    /// Keys whose value did not decode (counted as 0).
    pub corrupt: BTreeSet<Vec<u8>>,
}

impl UsageView {
    fn total(&self) -> i64 {
        self.others
            .values()
            .fold(self.base, |acc, v| acc.saturating_add(*v))
    }
}

/// The usage keys of a volume as read from the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageReport {
    /// `usage/base`; `None` when the volume predates usage accounting (or was never mounted
    /// since).
    pub base: Option<i64>,
    /// (instance, slot, cumulative delta) of every delta key.
    pub deltas: Vec<(u64, u64, i64)>,
    /// Keys whose value could not be decoded: counted as 0.
    pub corrupt: Vec<String>,
}

impl UsageReport {
    /// base + every delta (what the mounts count against the quota), never below 0.
    pub fn total(&self) -> u64 {
        let t = self
            .deltas
            .iter()
            .fold(self.base.unwrap_or(0), |acc, d| acc.saturating_add(d.2));
        u64::try_from(t).unwrap_or(0)
    }

    /// Instances that own delta keys.
    pub fn instances(&self) -> BTreeSet<u64> {
        self.deltas.iter().map(|d| d.0).collect()
    }

    fn from_entries(keys: &Keys, entries: &[KvEntry]) -> UsageReport {
        let base_key = keys.usage_base();
        let mut r = UsageReport::default();
        for e in entries {
            let v = match decode_usage(&e.key, &e.value) {
                Ok(v) => v,
                Err(_) => {
                    r.corrupt.push(String::from_utf8_lossy(&e.key).into_owned());
                    0
                }
            };
            if e.key == base_key {
                r.base = Some(v);
            } else if let Ok((instance, slot)) = keys.parse_usage_delta(&e.key) {
                r.deltas.push((instance, slot, v));
            } else {
                // An unknown key under usage/: not ours to interpret.
                r.corrupt.push(String::from_utf8_lossy(&e.key).into_owned());
            }
        }
        r
    }
}

/// Every key under `usage/` with its revision.
async fn usage_entries(kv: &dyn MetaKv, keys: &Keys) -> FsResult<Vec<KvEntry>> {
    let mut out = Vec::new();
    crate::scan::for_each_under(kv, &keys.usage(), |e| out.push(e.clone())).await?;
    Ok(out)
}

/// Reads the volume's usage keys (for `twinfs volume inspect`).
pub async fn read_usage(kv: &dyn MetaKv, keys: &Keys) -> FsResult<UsageReport> {
    Ok(UsageReport::from_entries(
        keys,
        &usage_entries(kv, keys).await?,
    ))
}

/// Sum of the sizes of every regular-file inode record (the definition of usage, computed the
/// slow way), and how many inode records did not decode.
pub async fn scan_file_bytes(kv: &dyn MetaKv, keys: &Keys) -> FsResult<(u64, u64)> {
    let prefix = keys.all_inodes();
    let end = prefix_end(&prefix);
    let mut start = prefix.clone();
    let (mut total, mut bad) = (0u64, 0u64);
    loop {
        let page = kv.range(&start, &end, PAGE).await?;
        for e in &page.entries {
            match decode_inode(&e.key, &e.value) {
                Ok(rec) if rec.kind == FileKind::File => total = total.saturating_add(rec.size),
                Ok(_) => {}
                Err(_) => bad += 1,
            }
        }
        match (page.more, page.entries.last()) {
            (true, Some(last)) => {
                start = last.key.clone();
                start.push(0);
            }
            _ => return Ok((total, bad)),
        }
    }
}

impl Fs {
    /// The volume's usage as this instance knows it: the base and the other instances' deltas
    /// as last reported by the watch, plus this instance's own committed changes.
    pub fn usage_bytes(&self) -> i64 {
        let others = self.usage_view().total();
        others.saturating_add(self.own_usage.load(Ordering::Relaxed))
    }

    fn usage_view(&self) -> std::sync::MutexGuard<'_, UsageView> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keys whose usage value could not be decoded (each counted as 0).
    pub fn usage_corrupt_keys(&self) -> Vec<String> {
        self.usage_view()
            .corrupt
            .iter()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    /// Sets the quota enforced by writes and truncates (`None`: no quota).
    pub fn set_quota(&self, quota: Option<u64>) {
        self.quota.store(quota.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn quota(&self) -> Option<u64> {
        match self.quota.load(Ordering::Relaxed) {
            0 => None,
            q => Some(q),
        }
    }

    /// Growth this instance's unflushed writes will add (reserved at write time).
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// Bytes that may still be added under the quota (`None`: no quota): quota − usage −
    /// this instance's reserved growth.
    pub fn quota_left(&self) -> Option<u64> {
        let q = self.quota()?;
        let used = i128::from(self.usage_bytes()) + i128::from(self.reserved_bytes());
        Some(u64::try_from((i128::from(q) - used).max(0)).unwrap_or(0))
    }

    /// ENOSPC when growing the volume by `growth` bytes would pass the quota.
    pub(crate) fn check_growth(&self, growth: u64) -> FsResult<()> {
        if growth == 0 {
            return Ok(());
        }
        match self.quota_left() {
            Some(left) if growth > left => Err(FsError::NoSpace),
            _ => Ok(()),
        }
    }

    /// Checks `growth` against the quota and, if it fits, reserves it for handle `fh` until
    /// the handle's writes are committed ([`Fs::unreserve`]).
    pub(crate) fn reserve(&self, fh: u64, growth: u64) -> FsResult<()> {
        if growth == 0 {
            return Ok(());
        }
        let mut r = self.reserved.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = self.quota() {
            let reserved = r.values().fold(0u64, |a, b| a.saturating_add(*b));
            let after = i128::from(self.usage_bytes()) + i128::from(reserved) + i128::from(growth);
            if after > i128::from(q) {
                return Err(FsError::NoSpace);
            }
        }
        let slot = r.entry(fh).or_insert(0);
        *slot = slot.saturating_add(growth);
        Ok(())
    }

    /// Drops handle `fh`'s reservation (its writes are committed, or dropped).
    pub(crate) fn unreserve(&self, fh: u64) {
        self.reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
    }

    /// Applies changed usage keys (from the mount's watch: `(key, new value or None)`).
    /// This instance's own delta keys are ignored (it knows them better). Returns a warning
    /// for each value that does not decode (counted as 0).
    pub fn usage_apply(&self, changes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Vec<String> {
        let base_key = self.keys.usage_base();
        let mut warnings = Vec::new();
        let mut view = self.usage_view();
        for (key, value) in changes {
            let is_base = *key == base_key;
            if !is_base {
                match self.keys.parse_usage_delta(key) {
                    Ok((instance, _)) if instance == self.instance => continue,
                    Ok(_) => {}
                    Err(_) => continue,
                }
            }
            let v = match value {
                None => {
                    view.corrupt.remove(key);
                    None
                }
                Some(raw) => match decode_usage(key, raw) {
                    Ok(v) => {
                        view.corrupt.remove(key);
                        Some(v)
                    }
                    Err(e) => {
                        warnings.push(format!("{e}; counted as 0"));
                        view.corrupt.insert(key.clone());
                        Some(0)
                    }
                },
            };
            if is_base {
                view.base = v.unwrap_or(0);
            } else {
                match v {
                    Some(v) => view.others.insert(key.clone(), v),
                    None => view.others.remove(key),
                };
            }
        }
        warnings
    }

    /// Reads the usage keys into this instance's view (at mount start, and again when the
    /// watch lost track). A volume without `usage/base` (created before usage accounting) gets
    /// one first, computed from a scan of every inode record.
    pub async fn load_usage(&self) -> FsResult<UsageReport> {
        let mut attempt = 0;
        let entries = loop {
            let entries = usage_entries(&*self.kv, &self.keys).await?;
            let report = UsageReport::from_entries(&self.keys, &entries);
            if report.base.is_some() {
                break entries;
            }
            // base = files' bytes − the deltas already there, so the total is the scan.
            let (files, _) = scan_file_bytes(&*self.kv, &self.keys).await?;
            let deltas = report
                .deltas
                .iter()
                .fold(0i64, |a, d| a.saturating_add(d.2));
            let base = bytes_i64(files).saturating_sub(deltas);
            let ok = self
                .kv
                .txn(
                    vec![Compare::key(self.keys.usage_base(), 0)],
                    vec![TxnOp::Put {
                        key: self.keys.usage_base(),
                        value: encode_usage(base),
                    }],
                )
                .await?;
            if !ok {
                self.backoff(&mut attempt).await?;
            }
        };
        let report = UsageReport::from_entries(&self.keys, &entries);
        let changes: Vec<(Vec<u8>, Option<Vec<u8>>)> = entries
            .into_iter()
            .map(|e| (e.key, Some(e.value)))
            .collect();
        {
            let mut view = self.usage_view();
            view.others.clear();
            view.corrupt.clear();
        }
        self.usage_apply(&changes);
        Ok(report)
    }

    /// Puts `ops` and the new value of one of this instance's delta slots (+`usage`) in one
    /// transaction. With `usage == 0` it is a plain transaction.
    pub(crate) async fn txn_with_usage(
        &self,
        compares: Vec<Compare>,
        mut ops: Vec<TxnOp>,
        usage: i64,
    ) -> FsResult<bool> {
        if usage == 0 {
            return Ok(self.kv.txn(compares, ops).await?);
        }
        let n = self.slots.len();
        let start = self.slot_rr.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let mut guard = None;
        for i in 0..n {
            if let Some(g) = self.slots.get((start + i) % n).and_then(|s| s.try_lock()) {
                guard = Some(((start + i) % n, g));
                break;
            }
        }
        let (idx, mut slot) = match guard {
            Some(g) => g,
            None => match self.slots.get(start) {
                Some(s) => (start, s.lock().await),
                None => return Err(FsError::Corrupt("internal: no usage slots".into())),
            },
        };
        let key = self.keys.usage_delta(self.instance, idx as u64);
        self.refresh_slot(&mut slot, idx).await?;
        let new = slot.value.saturating_add(usage);
        ops.push(TxnOp::Put {
            key,
            value: encode_usage(new),
        });
        match self.kv.txn(compares, ops).await {
            Ok(true) => {
                slot.value = new;
                self.own_usage.fetch_add(usage, Ordering::Relaxed);
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                slot.stale = true;
                Err(e.into())
            }
        }
    }

    /// Reads a slot back from the store when its last write had an unknown outcome or a
    /// resync was asked for. Only this instance writes the key, so the store has its value.
    async fn refresh_slot(&self, slot: &mut Slot, idx: usize) -> FsResult<()> {
        let epoch = self.usage_epoch.load(Ordering::Relaxed);
        if !slot.stale && slot.epoch == epoch {
            return Ok(());
        }
        let key = self.keys.usage_delta(self.instance, idx as u64);
        let fresh = match self.kv.get(&key).await? {
            // A corrupt value cannot be repaired from here: it restarts from 0 (the lost
            // amount shows up as a difference from the scan in `volume inspect`).
            Some((v, _)) => decode_usage(&key, &v).unwrap_or(0),
            // Absent: never committed, or folded into the base by another mount.
            None => 0,
        };
        self.own_usage
            .fetch_add(fresh.saturating_sub(slot.value), Ordering::Relaxed);
        slot.value = fresh;
        slot.stale = false;
        slot.epoch = epoch;
        Ok(())
    }

    /// Makes every slot be read back from the store before its next use: the mount calls this
    /// when its registration had lapsed (another mount may have folded its keys meanwhile).
    pub fn usage_resync(&self) {
        self.usage_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Clean stop: adds this instance's deltas to the base and deletes its keys, in one
    /// transaction compared on the base (retried on conflict). Returns the bytes folded.
    pub async fn fold_own_usage(&self) -> FsResult<i64> {
        let mut guards = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            guards.push(s.lock().await);
        }
        let mut sum = 0i64;
        for (idx, slot) in guards.iter_mut().enumerate() {
            self.refresh_slot(slot, idx).await?;
            sum = sum.saturating_add(slot.value);
        }
        let own = self.keys.usage_deltas_of(self.instance);
        let own_end = prefix_end(&own);
        let base_key = self.keys.usage_base();
        let mut attempt = 0;
        loop {
            let (base, rev) = match self.kv.get(&base_key).await? {
                Some((v, rev)) => (decode_usage(&base_key, &v).unwrap_or(0), rev),
                None => (0, 0),
            };
            let new = base.saturating_add(sum);
            let ops = vec![
                TxnOp::Put {
                    key: base_key.clone(),
                    value: encode_usage(new),
                },
                TxnOp::DeleteRange {
                    start: own.clone(),
                    end: own_end.clone(),
                },
            ];
            let compares = vec![Compare::key(base_key.clone(), rev)];
            match self.kv.txn(compares, ops).await {
                Ok(true) => {
                    for g in guards.iter_mut() {
                        g.value = 0;
                    }
                    self.own_usage.fetch_sub(sum, Ordering::Relaxed);
                    self.usage_view().base = new;
                    return Ok(sum);
                }
                Ok(false) => self.backoff(&mut attempt).await?,
                Err(e) => {
                    // Unknown outcome: the slots are read back before any further use.
                    for g in guards.iter_mut() {
                        g.stale = true;
                    }
                    return Err(e.into());
                }
            }
        }
    }

    /// Folds the delta keys of every instance that is neither this one nor in `live` (the
    /// mounts that still have a registration) into the base. Returns the instances folded.
    pub async fn fold_dead_usage(&self, live: &HashSet<u64>) -> FsResult<Vec<u64>> {
        let base_key = self.keys.usage_base();
        let batch = self.opts.max_txn_ops.saturating_sub(2).max(1);
        let mut folded = BTreeSet::new();
        let mut attempt = 0;
        loop {
            let entries = usage_entries(&*self.kv, &self.keys).await?;
            let mut base: Option<(i64, Revision)> = None;
            let mut doomed: Vec<(Vec<u8>, i64, Revision, u64)> = Vec::new();
            for e in entries {
                if e.key == base_key {
                    base = Some((decode_usage(&e.key, &e.value).unwrap_or(0), e.mod_revision));
                    continue;
                }
                let Ok((instance, _)) = self.keys.parse_usage_delta(&e.key) else {
                    continue;
                };
                if instance == self.instance || live.contains(&instance) {
                    continue;
                }
                if doomed.len() < batch {
                    let v = decode_usage(&e.key, &e.value).unwrap_or(0);
                    doomed.push((e.key, v, e.mod_revision, instance));
                }
            }
            if doomed.is_empty() {
                return Ok(folded.into_iter().collect());
            }
            let (base, base_rev) = base.unwrap_or((0, 0));
            let sum = doomed.iter().fold(0i64, |a, d| a.saturating_add(d.1));
            let new = base.saturating_add(sum);
            let mut compares = vec![Compare::key(base_key.clone(), base_rev)];
            let mut ops = vec![TxnOp::Put {
                key: base_key.clone(),
                value: encode_usage(new),
            }];
            for (k, _, rev, _) in &doomed {
                compares.push(Compare::key(k.clone(), *rev));
                ops.push(TxnOp::Delete { key: k.clone() });
            }
            if self.kv.txn(compares, ops).await? {
                let mut view = self.usage_view();
                view.base = new;
                for (k, _, _, instance) in doomed {
                    view.others.remove(&k);
                    view.corrupt.remove(&k);
                    folded.insert(instance);
                }
            } else {
                self.backoff(&mut attempt).await?;
            }
        }
    }
}
