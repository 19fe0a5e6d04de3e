//! Cluster membership in etcd.
//!
//! Keys:
//! - `/twinfs/live/<id>`: the node's [`NodeRecord`], attached to the node's lease. It exists
//!   exactly while the node is alive: when the node stops renewing (crash, partition), etcd
//!   deletes it after the lease TTL, and every watcher learns of it at once.
//! - `/twinfs/nodes/<id>`: the same record without a lease: the last known state of every node
//!   that ever joined, so `twinfs status` can show dead nodes as dead (and a clean shutdown as
//!   `stopped`, which repair treats as a planned absence).
//!
//! Clients hold a [`Membership`] view: one prefix read, then a watch from the next revision, so
//! joins and deaths arrive as events, not by polling. When the watch breaks (etcd restart,
//! compaction) the view re-reads the prefix and watches again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use etcd_client::{EventType, GetOptions, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::etcd::PREFIX;
use crate::placement::Candidate;

pub fn live_prefix() -> String {
    format!("{PREFIX}live/")
}
pub fn registry_prefix() -> String {
    format!("{PREFIX}nodes/")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Up,
    /// Left through a clean shutdown; expected back.
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub addr: SocketAddr,
    #[serde(default)]
    pub zone: Option<String>,
    pub version: String,
    pub capacity: u64,
    pub free: u64,
    pub blocks: u64,
    pub bytes_used: u64,
    pub state: NodeState,
    pub updated_unix: u64,
}

impl NodeRecord {
    pub fn candidate(&self) -> Candidate {
        Candidate {
            id: self.id.clone(),
            zone: self.zone.clone(),
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a record, refusing (with a log line, not a panic) values that are not ours.
fn parse_record(key: &[u8], value: &[u8]) -> Option<NodeRecord> {
    match serde_json::from_slice::<NodeRecord>(value) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), error = %e,
                "ignoring a corrupt node record in etcd");
            None
        }
    }
}

/// Live nodes as last seen from etcd.
#[derive(Clone)]
pub struct Membership {
    nodes: Arc<RwLock<BTreeMap<String, NodeRecord>>>,
    changed: watch::Receiver<u64>,
}

impl Membership {
    /// Reads the live nodes, then follows changes in a background task for as long as the
    /// process runs.
    pub async fn watch(client: etcd_client::Client) -> Result<Membership> {
        let nodes = Arc::new(RwLock::new(BTreeMap::new()));
        let (tx, rx) = watch::channel(0u64);
        let mut c = client.clone();
        let revision = relist(&mut c, &nodes)
            .await
            .context("reading live nodes from etcd")?;
        tx.send_modify(|v| *v += 1);
        let bg_nodes = nodes.clone();
        tokio::spawn(async move { follow(client, bg_nodes, tx, revision).await });
        Ok(Membership { nodes, changed: rx })
    }

    /// A live set that never changes (tools and tests that need no etcd).
    pub fn fixed(nodes: Vec<NodeRecord>) -> Membership {
        let (_, rx) = watch::channel(0u64);
        Membership {
            nodes: Arc::new(RwLock::new(
                nodes.into_iter().map(|n| (n.id.clone(), n)).collect(),
            )),
            changed: rx,
        }
    }

    pub fn live(&self) -> Vec<NodeRecord> {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn is_live(&self, id: &str) -> bool {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    /// Waits until `pred` holds for the live set, or `timeout` passes.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&[NodeRecord]) -> bool,
    ) -> bool {
        let mut rx = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.live()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return pred(&self.live()),
            }
        }
    }
}

async fn relist(
    client: &mut etcd_client::Client,
    nodes: &RwLock<BTreeMap<String, NodeRecord>>,
) -> Result<i64> {
    let resp = client
        .get(live_prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let fresh: BTreeMap<String, NodeRecord> = resp
        .kvs()
        .iter()
        .filter_map(|kv| parse_record(kv.key(), kv.value()))
        .map(|r| (r.id.clone(), r))
        .collect();
    *nodes.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    Ok(revision)
}

async fn follow(
    client: etcd_client::Client,
    nodes: Arc<RwLock<BTreeMap<String, NodeRecord>>>,
    tx: watch::Sender<u64>,
    mut revision: i64,
) {
    let prefix = live_prefix();
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut c = client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let result: Result<()> = async {
            let (_watcher, mut stream) = c.watch(prefix.clone(), Some(opts)).await?;
            while let Some(resp) = stream.message().await? {
                if resp.compact_revision() > 0 || resp.canceled() {
                    anyhow::bail!("watch cancelled (compacted to {})", resp.compact_revision());
                }
                let mut map = nodes.write().unwrap_or_else(|e| e.into_inner());
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    revision = revision.max(kv.mod_revision());
                    let id = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
                    match ev.event_type() {
                        EventType::Put => {
                            if let Some(r) = parse_record(kv.key(), kv.value()) {
                                map.insert(id, r);
                            }
                        }
                        EventType::Delete => {
                            map.remove(&id);
                        }
                    }
                }
                drop(map);
                tx.send_modify(|v| *v += 1);
                backoff = Duration::from_millis(200);
            }
            anyhow::bail!("watch stream ended")
        }
        .await;
        if tx.is_closed() && Arc::strong_count(&nodes) == 1 {
            return; // nobody is looking any more
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "membership watch broke; re-reading");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        let mut c = client.clone();
        match relist(&mut c, &nodes).await {
            Ok(rev) => {
                revision = rev;
                tx.send_modify(|v| *v += 1);
            }
            Err(e) => tracing::warn!(error = %e, "re-reading live nodes failed"),
        }
    }
}

/// Reads every node that ever registered, with its liveness.
pub async fn all_nodes(client: &mut etcd_client::Client) -> Result<Vec<(NodeRecord, bool)>> {
    let reg = client
        .get(registry_prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
    let live = client
        .get(live_prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
    let live: BTreeMap<String, NodeRecord> = live
        .kvs()
        .iter()
        .filter_map(|kv| parse_record(kv.key(), kv.value()))
        .map(|r| (r.id.clone(), r))
        .collect();
    let mut out: BTreeMap<String, (NodeRecord, bool)> = reg
        .kvs()
        .iter()
        .filter_map(|kv| parse_record(kv.key(), kv.value()))
        .map(|r| (r.id.clone(), (r, false)))
        .collect();
    for (id, r) in live {
        out.insert(id, (r, true));
    }
    Ok(out.into_values().collect())
}

/// A node's registration: its record under a lease, kept alive and refreshed in the background.
pub struct Registration {
    client: etcd_client::Client,
    id: String,
    lease: Arc<std::sync::atomic::AtomicI64>,
    task: tokio::task::JoinHandle<()>,
}

async fn put_record(
    client: &mut etcd_client::Client,
    record: &NodeRecord,
    lease: i64,
) -> Result<()> {
    let value = serde_json::to_vec(record)?;
    let live_key = format!("{}{}", live_prefix(), record.id);
    let reg_key = format!("{}{}", registry_prefix(), record.id);
    let txn = etcd_client::Txn::new().and_then([
        etcd_client::TxnOp::put(
            live_key,
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        ),
        etcd_client::TxnOp::put(reg_key, value, None),
    ]);
    client.txn(txn).await?;
    Ok(())
}

impl Registration {
    /// Registers the node (record produced by `snapshot`, called again at every refresh) under a
    /// lease of `ttl`, and keeps it alive: renewals every ttl/3, the record refreshed every
    /// `refresh`, and a new lease taken if the old one was lost (etcd down longer than the TTL).
    pub async fn start<F>(
        client: etcd_client::Client,
        ttl: Duration,
        refresh: Duration,
        snapshot: F,
    ) -> Result<Registration>
    where
        F: Fn() -> NodeRecord + Send + Sync + 'static,
    {
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let mut c = client.clone();
        let lease = c
            .lease_grant(ttl_secs, None)
            .await
            .context("taking an etcd lease")?
            .id();
        let record = snapshot();
        let id = record.id.clone();
        put_record(&mut c, &record, lease)
            .await
            .context("registering in etcd")?;
        let lease_cell = Arc::new(std::sync::atomic::AtomicI64::new(lease));
        let task = tokio::spawn(keep_alive(
            client.clone(),
            lease_cell.clone(),
            ttl_secs,
            refresh,
            Arc::new(snapshot),
        ));
        Ok(Registration {
            client,
            id,
            lease: lease_cell,
            task,
        })
    }

    /// Leaves cleanly: the last record says `stopped`, and the lease is revoked so the node is
    /// gone from the live set at once rather than after the TTL.
    pub async fn leave(self, mut last: NodeRecord) -> Result<()> {
        self.task.abort();
        last.state = NodeState::Stopped;
        last.updated_unix = unix_now();
        let mut c = self.client.clone();
        let reg_key = format!("{}{}", registry_prefix(), self.id);
        c.put(reg_key, serde_json::to_vec(&last)?, None).await?;
        let lease = self.lease.load(std::sync::atomic::Ordering::Relaxed);
        c.lease_revoke(lease).await?;
        Ok(())
    }
}

async fn keep_alive<F>(
    client: etcd_client::Client,
    lease: Arc<std::sync::atomic::AtomicI64>,
    ttl_secs: i64,
    refresh: Duration,
    snapshot: Arc<F>,
) where
    F: Fn() -> NodeRecord + Send + Sync + 'static,
{
    {
        use std::sync::atomic::Ordering;
        let renew_every = Duration::from_millis((ttl_secs as u64 * 1000) / 3);
        let mut last_refresh = tokio::time::Instant::now();
        loop {
            let mut c = client.clone();
            let current = lease.load(Ordering::Relaxed);
            let result: Result<()> = async {
                let (mut keeper, mut stream) = c.lease_keep_alive(current).await?;
                loop {
                    keeper.keep_alive().await?;
                    match tokio::time::timeout(Duration::from_secs(3), stream.message()).await {
                        Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                        Ok(Ok(_)) => anyhow::bail!("lease {current:x} expired"),
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => anyhow::bail!("no keep-alive answer within 3 s"),
                    }
                    if last_refresh.elapsed() >= refresh {
                        // The snapshot reads the node's disk (free space, the block index).
                        let snap = snapshot.clone();
                        let record = tokio::task::spawn_blocking(move || snap()).await?;
                        put_record(&mut c, &record, current).await?;
                        last_refresh = tokio::time::Instant::now();
                    }
                    tokio::time::sleep(renew_every).await;
                }
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "etcd lease renewal failed; re-registering");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            // Is the lease still there? If not (expired while etcd was unreachable), take a new one.
            let alive = matches!(c.lease_time_to_live(current, None).await, Ok(r) if r.ttl() > 0);
            if alive {
                continue;
            }
            match c.lease_grant(ttl_secs, None).await {
                Ok(g) => {
                    if put_record(&mut c, &snapshot(), g.id()).await.is_ok() {
                        lease.store(g.id(), Ordering::Relaxed);
                        last_refresh = tokio::time::Instant::now();
                        tracing::info!(lease = g.id(), "re-registered under a new lease");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot take a new lease yet"),
            }
        }
    }
}
