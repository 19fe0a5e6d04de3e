//! The cluster's upkeep: repair of missing copies, removal of surplus copies, garbage
//! collection of unreferenced blocks, and the checks behind `twinfs fsck` and `twinfs gc`.
//!
//! No coordinator: every node scans the namespace and acts only on the blocks it *owns*: a
//! block's owner is the first node, in the block's placement ranking over the live nodes, that
//! holds a copy (or the first live node when none does, so lost blocks are counted once). Two
//! nodes whose views of membership differ for a moment may both repair a block; puts are
//! idempotent, so that costs bandwidth, never correctness. Ownership and surplus use the pure
//! placement order (never one reordered by this node's suspicions; see `plan_scan`). Each node
//! garbage-collects only its
//! own copies, with the node itself re-checking age under a lock shared with puts.
//!
//! Timers (defaults in `MaintenanceConfig`; reasons in ARCHITECTURE.md, "Failure model").

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use twinfs_cluster::client::BlockClient;
use twinfs_cluster::membership::{self, unix_now, NodeRecord, NodeState};
use twinfs_cluster::node::MaintenanceConfig;
use twinfs_cluster::wire::{Message, MAX_HAS_BATCH};
use twinfs_cluster::BlockHash;
use twinfs_core::scan::{self, BlockRef};
use twinfs_core::schema::{Keys, PendingRec};
use twinfs_core::MetaKv;
use twinfs_fuse::etcd_kv::EtcdKv;

/// What the namespace references: each block, the most copies any volume wants of it, and the
/// volumes referencing it.
#[derive(Default)]
pub struct Census {
    pub blocks: HashMap<BlockHash, BlockInfo>,
    pub volumes: Vec<String>,
    /// Chunk records that do not decode: (volume, key, reason). Garbage collection refuses to
    /// run while there are any (it cannot know what they reference); repair goes on.
    pub bad_records: Vec<(String, String, String)>,
    /// Blocks a new file's first flush committed while storing them (pending records, see
    /// the core's `pending.rs`): missing copies of these are a write in flight, not a loss.
    pub in_flight: HashSet<BlockHash>,
    /// Those records: (volume, inode, record, revision).
    pub pending: Vec<(String, u64, PendingRec, twinfs_core::Revision)>,
}

#[derive(Clone, Debug)]
pub struct BlockInfo {
    pub replicas: usize,
    pub size: u32,
    /// Indices into `Census::volumes`.
    pub volumes: Vec<u16>,
}

/// Reads every chunk record of `only` (or of every volume). Any unreadable volume is an error:
/// garbage collection must never run on a partial view.
pub async fn census(etcd: &etcd_client::Client, only: Option<&str>) -> Result<Census> {
    let mut volumes = twinfs_fuse::volume::list(etcd)
        .await
        .context("listing volumes")?;
    if let Some(name) = only {
        volumes.retain(|v| v.name == name);
        if volumes.is_empty() {
            anyhow::bail!("no volume named {name:?}");
        }
    }
    let kv = EtcdKv::new(etcd.clone());
    let mut c = Census::default();
    for (vi, v) in volumes.iter().enumerate() {
        c.volumes.push(v.name.clone());
        let keys = Keys::new(&v.name);
        let replicas = usize::from(v.replicas.max(1));
        let blocks = &mut c.blocks;
        let bad_records = &mut c.bad_records;
        let name = v.name.clone();
        scan::chunk_refs(
            &kv,
            &keys,
            |r: BlockRef| {
                let e = blocks.entry(r.hash).or_insert(BlockInfo {
                    replicas,
                    size: r.len,
                    volumes: Vec::new(),
                });
                e.replicas = e.replicas.max(replicas);
                let vi = vi as u16;
                if !e.volumes.contains(&vi) {
                    e.volumes.push(vi);
                }
            },
            |key, err| {
                tracing::error!(volume = %name, key = %String::from_utf8_lossy(key), error = %err,
                "corrupt chunk record");
                bad_records.push((
                    name.clone(),
                    String::from_utf8_lossy(key).into_owned(),
                    err.to_string(),
                ));
            },
        )
        .await
        .with_context(|| format!("scanning the chunk records of volume {}", v.name))?;
        let pending = scan::pending_records(&kv, &keys, |key, err| {
            tracing::error!(volume = %v.name, key = %String::from_utf8_lossy(key), error = %err,
                "corrupt pending record");
        })
        .await
        .with_context(|| format!("scanning the pending records of volume {}", v.name))?;
        for (ino, rec, rev) in pending {
            c.in_flight.extend(scan::pending_blocks(&rec));
            c.pending.push((v.name.clone(), ino, rec, rev));
        }
    }
    Ok(c)
}

/// Deletes the pending records whose writer is gone (its session key expired with its lease)
/// and whose blocks all have a copy (the content they vouched for is durable) or whose file
/// was deleted since. (A record of a live file with a block missing everywhere is left to the
/// next reader of the file, which withdraws the content; see the core's `pending.rs`.)
/// Returns how many it deleted.
pub async fn settle_landed_pending(
    etcd: &etcd_client::Client,
    census: &Census,
    copies: &HashMap<String, HashSet<BlockHash>>,
) -> Result<u64> {
    let kv = EtcdKv::new(etcd.clone());
    let mut settled = 0;
    for (volume, ino, rec, rev) in &census.pending {
        let keys = Keys::new(volume);
        if kv
            .get(&keys.writer_alive(rec.instance, rec.session))
            .await?
            .is_some()
        {
            continue;
        }
        let landed = scan::pending_blocks(rec).all(|h| copies.values().any(|s| s.contains(&h)));
        // A deleted file's record vouches for nothing any more.
        if !landed && kv.get(&keys.inode(*ino)).await?.is_some() {
            continue;
        }
        let key = keys.pending(*ino);
        let compares = vec![twinfs_core::Compare::key(key.clone(), *rev)];
        if kv
            .txn(compares, vec![twinfs_core::TxnOp::Delete { key }])
            .await?
        {
            settled += 1;
        }
    }
    Ok(settled)
}

/// Which of `hashes` each node holds (or, with `verify`, holds a good copy of, re-read and
/// re-hashed by the node). A node that does not answer is left out of the map.
pub async fn copies_on(
    client: &BlockClient,
    nodes: &[NodeRecord],
    hashes: &[BlockHash],
    verify: bool,
    mut progress: impl FnMut(u64),
) -> HashMap<String, HashSet<BlockHash>> {
    // Verifying reads every block: small batches keep each request within its timeout.
    let batch = if verify { 64 } else { MAX_HAS_BATCH };
    let mut out: HashMap<String, HashSet<BlockHash>> = HashMap::new();
    for node in nodes {
        let mut held = HashSet::new();
        let mut ok = true;
        for part in hashes.chunks(batch) {
            let msg = if verify {
                Message::Verify {
                    hashes: part.to_vec(),
                }
            } else {
                Message::Has {
                    hashes: part.to_vec(),
                }
            };
            match client
                .ask_bits(node, &msg, part.len(), Duration::from_secs(120))
                .await
            {
                Ok(bits) => held.extend(part.iter().zip(bits).filter(|(_, b)| *b).map(|(h, _)| *h)),
                Err(e) => {
                    tracing::warn!(node = %node.id, error = %e, "node did not report its copies");
                    ok = false;
                    break;
                }
            }
            progress(part.len() as u64);
        }
        if ok {
            out.insert(node.id.clone(), held);
        }
    }
    out
}

/// Per-volume counts a node publishes after each repair scan (`twinfs status` sums them).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeHealth {
    /// Referenced blocks this node owns.
    pub blocks: u64,
    /// Owned blocks with fewer than R copies on live nodes (waiting or being repaired).
    pub under_replicated: u64,
    /// ... of which with a single copy left.
    pub one_copy: u64,
    /// ... whose missing copies may be on nodes still within their grace period.
    pub waiting: u64,
    /// Blocks with no copy on any live node.
    pub lost: u64,
    /// Blocks of new files being written (pending records): not counted above.
    #[serde(default)]
    pub in_flight: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeHealth {
    pub node: String,
    pub updated_unix: u64,
    pub scan_seconds: f64,
    pub volumes: BTreeMap<String, VolumeHealth>,
    /// Copies re-created by this node since it started.
    pub repaired_blocks: u64,
    pub repaired_bytes: u64,
    /// Surplus copies removed by this node since it started.
    pub surplus_removed: u64,
    /// Unreferenced copies of this node removed by garbage collection since it started.
    pub gc_removed_blocks: u64,
    pub gc_removed_bytes: u64,
    #[serde(default)]
    pub error: Option<String>,
}

pub fn health_prefix() -> String {
    format!("{}health/", twinfs_cluster::etcd::PREFIX)
}

/// Grace a non-live node gets before its copies count as gone: longer after a planned stop.
fn in_grace(rec: &NodeRecord, cfg: &MaintenanceConfig, now: u64) -> bool {
    let grace = match rec.state {
        NodeState::Stopped => cfg.planned_grace_secs,
        NodeState::Up => cfg.repair_grace_secs,
    };
    now.saturating_sub(rec.updated_unix) < grace
}

/// Runs repair scans (every `repair_interval_secs`) and garbage collection of this node's
/// copies (every `gc_interval_secs`) until the task is dropped.
pub async fn run(
    me: String,
    etcd: etcd_client::Client,
    client: Arc<BlockClient>,
    cfg: MaintenanceConfig,
) {
    let mut health = NodeHealth {
        node: me.clone(),
        ..Default::default()
    };
    let mut last_gc = Instant::now();
    let repair_every = Duration::from_secs(cfg.repair_interval_secs);
    loop {
        let started = Instant::now();
        match repair_scan(&me, &etcd, &client, &cfg, &mut health).await {
            Ok(census) => {
                health.error = None;
                let gc_due = cfg.gc_interval_secs > 0
                    && last_gc.elapsed() >= Duration::from_secs(cfg.gc_interval_secs);
                if gc_due {
                    last_gc = Instant::now();
                    if let Some(node) = client.membership().live().into_iter().find(|n| n.id == me)
                    {
                        match collect_garbage(&client, &[node], &census, cfg.gc_grace_secs, true)
                            .await
                        {
                            Ok(r) => {
                                health.gc_removed_blocks += r.removed_blocks;
                                health.gc_removed_bytes += r.removed_bytes;
                            }
                            Err(e) => {
                                tracing::warn!(error = %format!("{e:#}"), "garbage collection failed")
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "repair scan failed; trying again");
                health.error = Some(format!("{e:#}"));
            }
        }
        health.scan_seconds = started.elapsed().as_secs_f64();
        health.updated_unix = unix_now();
        publish(&etcd, &health).await;
        tokio::time::sleep(repair_every.saturating_sub(started.elapsed())).await;
    }
}

async fn publish(etcd: &etcd_client::Client, health: &NodeHealth) {
    let Ok(v) = serde_json::to_vec(health) else {
        return;
    };
    let mut c = etcd.clone();
    let key = format!("{}{}", health_prefix(), health.node);
    match tokio::time::timeout(Duration::from_secs(5), c.put(key, v, None)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "publishing repair health"),
        Err(_) => tracing::debug!("publishing repair health timed out"),
    }
}

/// One scan: counts this node's owned blocks by state, repairs what is due (fewest copies
/// first, at the configured rate) and removes verified surplus copies.
async fn repair_scan(
    me: &str,
    etcd: &etcd_client::Client,
    client: &BlockClient,
    cfg: &MaintenanceConfig,
    health: &mut NodeHealth,
) -> Result<Census> {
    let census = census(etcd, None).await?;
    let mut e = etcd.clone();
    let all = tokio::time::timeout(Duration::from_secs(10), membership::all_nodes(&mut e))
        .await
        .context("etcd did not answer")??;
    let now = unix_now();
    let waiting = all
        .iter()
        .any(|(rec, alive)| !alive && in_grace(rec, cfg, now));
    let live = client.membership().live();
    let hashes: Vec<BlockHash> = census.blocks.keys().copied().collect();
    let copies = copies_on(client, &live, &hashes, false, |_| {}).await;
    if copies.len() < live.len() {
        // A live node that does not answer may hold copies: repairing now could copy what
        // exists; try again at the next scan.
        anyhow::bail!(
            "{} of {} live nodes did not report their copies",
            live.len() - copies.len(),
            live.len()
        );
    }
    if !census.pending.is_empty() {
        match settle_landed_pending(etcd, &census, &copies).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(records = n, "settled pending records of gone writers"),
            Err(e) => tracing::warn!(error = %e, "settling pending records"),
        }
    }
    let ScanPlan {
        volumes,
        mut due,
        surplus,
    } = plan_scan(me, &census, &copies, waiting, |h| {
        client.placement_order_among(&live, h)
    });
    let m = twinfs_cluster::metrics::metrics();
    m.blocks_under_replicated
        .set(volumes.values().map(|v| v.under_replicated as i64).sum());
    m.blocks_lost
        .set(volumes.values().map(|v| v.lost as i64).sum());
    health.volumes = volumes;
    // Fewest copies first: a block with one copy left is one failure from loss.
    due.sort();
    let bytes_per_sec = cfg.repair_mib_per_sec * 1024.0 * 1024.0;
    if bytes_per_sec > 0.0 {
        for (_, hash) in due {
            let Some(info) = census.blocks.get(&hash) else {
                continue;
            };
            match repair_block(client, &hash, info, &copies).await {
                Ok(bytes) => {
                    health.repaired_blocks += 1;
                    health.repaired_bytes += bytes;
                    twinfs_cluster::metrics::metrics()
                        .repaired_bytes
                        .inc_by(bytes);
                    tokio::time::sleep(Duration::from_secs_f64(bytes as f64 / bytes_per_sec)).await;
                }
                Err(e) => tracing::warn!(block = %hash, error = %format!("{e:#}"), "repair failed"),
            }
        }
    }
    for Surplus { hash, top, extra } in surplus {
        // Only once every copy where placement wants one is verified good.
        let verify = Message::Verify { hashes: vec![hash] };
        let good = futures::future::join_all(
            top.iter()
                .map(|t| client.ask_bits(t, &verify, 1, Duration::from_secs(30))),
        )
        .await;
        if good
            .iter()
            .all(|r| matches!(r, Ok(b) if b.first() == Some(&true)))
        {
            for node in extra {
                match client.delete_on(&node, hash).await {
                    Ok(()) => {
                        health.surplus_removed += 1;
                        tracing::info!(block = %hash, on = %node.id, "removed a surplus copy");
                    }
                    Err(e) => {
                        tracing::warn!(block = %hash, on = %node.id, error = %e, "removing a surplus copy failed")
                    }
                }
            }
        } else {
            tracing::warn!(block = %hash, "surplus copies stay: the copies where placement wants them did not verify");
        }
    }
    Ok(census)
}

/// What one scan of one node will do, decided without I/O from what the scan read.
#[derive(Debug, Default)]
struct ScanPlan {
    volumes: BTreeMap<String, VolumeHealth>,
    /// Owned blocks to repair, with how many copies they have.
    due: Vec<(usize, BlockHash)>,
    surplus: Vec<Surplus>,
}

/// An owned block with more copies than it needs, all of the wanted ones present.
#[derive(Debug)]
struct Surplus {
    hash: BlockHash,
    /// Where placement wants the copies: verified before anything is removed.
    top: Vec<NodeRecord>,
    /// The other holders: their copies go.
    extra: Vec<NodeRecord>,
}

/// Decides node `me`'s share of the upkeep. `placement_order` must be the same function of the
/// live set on every node (not one reordered by this node's view of who is slow): two nodes
/// that each believed themselves a block's owner, with different ideas of where its copies
/// belong, could each remove the copies the other keeps.
fn plan_scan(
    me: &str,
    census: &Census,
    copies: &HashMap<String, HashSet<BlockHash>>,
    waiting: bool,
    placement_order: impl Fn(&BlockHash) -> Vec<NodeRecord>,
) -> ScanPlan {
    let mut volumes: BTreeMap<String, VolumeHealth> = census
        .volumes
        .iter()
        .map(|v| (v.clone(), VolumeHealth::default()))
        .collect();
    let mut due: Vec<(usize, BlockHash)> = Vec::new();
    let mut surplus: Vec<Surplus> = Vec::new();
    for (hash, info) in &census.blocks {
        let ranked = placement_order(hash);
        let holders: Vec<&NodeRecord> = ranked
            .iter()
            .filter(|n| copies.get(&n.id).is_some_and(|s| s.contains(hash)))
            .collect();
        let owner = holders.first().copied().or(ranked.first());
        if owner.map(|o| o.id.as_str()) != Some(me) {
            continue;
        }
        let n = holders.len();
        for &vi in &info.volumes {
            let Some(v) = census
                .volumes
                .get(vi as usize)
                .and_then(|n| volumes.get_mut(n))
            else {
                continue;
            };
            v.blocks += 1;
            if n < info.replicas && census.in_flight.contains(hash) {
                v.in_flight += 1;
            } else if n == 0 {
                v.lost += 1;
            } else if n < info.replicas {
                v.under_replicated += 1;
                if n == 1 {
                    v.one_copy += 1;
                }
                if waiting {
                    v.waiting += 1;
                }
            }
        }
        // A block in flight gets its other copies from its writer's put.
        if n > 0 && n < info.replicas && !waiting && !census.in_flight.contains(hash) {
            due.push((n, *hash));
        } else if n > info.replicas {
            let top: Vec<NodeRecord> = ranked.iter().take(info.replicas).cloned().collect();
            if top.iter().all(|t| holders.iter().any(|h| h.id == t.id)) {
                let extra: Vec<NodeRecord> = holders
                    .iter()
                    .filter(|h| !top.iter().any(|t| t.id == h.id))
                    .map(|h| (*h).clone())
                    .collect();
                surplus.push(Surplus {
                    hash: *hash,
                    top,
                    extra,
                });
            }
        }
    }
    ScanPlan {
        volumes,
        due,
        surplus,
    }
}

/// Copies `hash` to the best-ranked live nodes without a copy until it has `replicas`.
async fn repair_block(
    client: &BlockClient,
    hash: &BlockHash,
    info: &BlockInfo,
    copies: &HashMap<String, HashSet<BlockHash>>,
) -> Result<u64> {
    let data: Bytes = client.get(*hash, None).await?;
    let ranked = client.ranked_nodes(hash);
    let (holding, missing): (Vec<&NodeRecord>, Vec<&NodeRecord>) = ranked
        .iter()
        .partition(|n| copies.get(&n.id).is_some_and(|s| s.contains(hash)));
    let mut have = holding.len();
    let mut written = 0u64;
    for target in missing {
        if have >= info.replicas {
            break;
        }
        if target.free < data.len() as u64 {
            continue;
        }
        match client.put_on(target, *hash, data.clone()).await {
            Ok(()) => {
                have += 1;
                written += data.len() as u64;
                tracing::info!(block = %hash, to = %target.id, "re-created a missing copy");
            }
            Err(e) => {
                tracing::warn!(block = %hash, to = %target.id, error = %e, "repair copy failed")
            }
        }
    }
    if written == 0 {
        anyhow::bail!("no live node could take a copy");
    }
    Ok(written)
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// Unreferenced copies old enough to go, per node: (count, bytes).
    pub candidates: BTreeMap<String, (u64, u64)>,
    /// Unreferenced copies still within the grace period (writes may be about to commit them).
    pub young: u64,
    pub removed_blocks: u64,
    pub removed_bytes: u64,
}

/// Finds the copies on `nodes` that `census` does not reference and that were stored before
/// the grace period; with `apply`, asks each node to delete them (the node re-checks the age
/// under its put lock, so a block re-stored meanwhile stays).
pub async fn collect_garbage(
    client: &BlockClient,
    nodes: &[NodeRecord],
    census: &Census,
    grace_secs: u64,
    apply: bool,
) -> Result<GcReport> {
    if let Some((vol, key, why)) = census.bad_records.first() {
        anyhow::bail!(
            "{} chunk records do not decode (first: volume {vol}, key {key}: {why}); garbage \
             collection cannot tell what they reference and removes nothing",
            census.bad_records.len()
        );
    }
    let cutoff = unix_now().saturating_sub(grace_secs);
    let mut report = GcReport::default();
    for node in nodes {
        let mut after = None;
        let mut doomed: Vec<(BlockHash, u64)> = Vec::new();
        loop {
            let (entries, more) = client.list_page(node, after, 4096).await?;
            for e in &entries {
                if census.blocks.contains_key(&e.hash) {
                    continue;
                }
                if e.stored_unix < cutoff {
                    doomed.push((e.hash, e.size));
                } else {
                    report.young += 1;
                }
            }
            match (more, entries.last()) {
                (true, Some(last)) => after = Some(last.hash),
                _ => break,
            }
        }
        let bytes: u64 = doomed.iter().map(|d| d.1).sum();
        report
            .candidates
            .insert(node.id.clone(), (doomed.len() as u64, bytes));
        if !apply {
            continue;
        }
        for part in doomed.chunks(1024) {
            let hashes: Vec<BlockHash> = part.iter().map(|d| d.0).collect();
            let msg = Message::Collect {
                hashes: hashes.clone(),
                older_than_unix: cutoff,
            };
            let bits = client
                .ask_bits(node, &msg, hashes.len(), Duration::from_secs(60))
                .await?;
            for (d, removed) in part.iter().zip(bits) {
                if removed {
                    report.removed_blocks += 1;
                    report.removed_bytes += d.1;
                }
            }
        }
    }
    Ok(report)
}

/// Health records of the live nodes (`twinfs status`).
pub async fn read_health(etcd: &etcd_client::Client) -> Result<Vec<NodeHealth>> {
    let mut c = etcd.clone();
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        c.get(
            health_prefix(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        ),
    )
    .await
    .context("etcd did not answer")??;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<NodeHealth>(kv.value()).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn rec(state: NodeState, updated_unix: u64) -> NodeRecord {
        NodeRecord {
            id: "n".into(),
            addr: "127.0.0.1:1".parse::<SocketAddr>().expect("addr"),
            zone: None,
            version: "0".into(),
            capacity: 0,
            free: 0,
            blocks: 0,
            bytes_used: 0,
            state,
            updated_unix,
        }
    }

    fn node(i: usize) -> NodeRecord {
        NodeRecord {
            id: format!("n{i}"),
            ..rec(NodeState::Up, 0)
        }
    }

    fn order(live: &[NodeRecord], replicas: usize) -> impl Fn(&BlockHash) -> Vec<NodeRecord> + '_ {
        move |h| twinfs_cluster::client::placement_order(live, h, replicas)
    }

    /// Every live node plans its scan from the same facts; returns the copies left once every
    /// node has removed the surplus it decided to remove.
    fn after_every_node_plans(
        live: &[NodeRecord],
        census: &Census,
        copies: &HashMap<String, HashSet<BlockHash>>,
    ) -> (HashMap<String, HashSet<BlockHash>>, u64) {
        let mut left = copies.clone();
        let mut owned = 0;
        for me in live {
            let plan = plan_scan(&me.id, census, copies, false, order(live, 2));
            owned += plan.volumes.values().map(|v| v.blocks).sum::<u64>();
            for s in plan.surplus {
                for n in s.extra {
                    if let Some(held) = left.get_mut(&n.id) {
                        held.remove(&s.hash);
                    }
                }
            }
        }
        (left, owned)
    }

    /// Block `i` (2 copies wanted) held by the nodes whose bits are set in `holders[i]`.
    fn spread(
        nodes: &[NodeRecord],
        holders: &[u8],
    ) -> (Census, HashMap<String, HashSet<BlockHash>>) {
        let mut census = Census {
            volumes: vec!["v".into()],
            ..Default::default()
        };
        let mut copies: HashMap<String, HashSet<BlockHash>> = nodes
            .iter()
            .map(|n| (n.id.clone(), HashSet::new()))
            .collect();
        for (i, mask) in holders.iter().enumerate() {
            let hash = BlockHash::of(&i.to_le_bytes());
            census.blocks.insert(
                hash,
                BlockInfo {
                    replicas: 2,
                    size: 1,
                    volumes: vec![0],
                },
            );
            for (n, node) in nodes.iter().enumerate() {
                if mask & (1 << n) != 0 {
                    copies.get_mut(&node.id).expect("node").insert(hash);
                }
            }
        }
        (census, copies)
    }

    proptest::proptest! {
        /// A node joining (or leaving) is seen by some nodes a moment before the others: nodes
        /// planning from the two live sets at once still leave every block at least two copies.
        #[test]
        fn surplus_removal_from_two_views_of_membership_keeps_two_copies(
            holders in proptest::collection::vec(0u8..32, 1..40),
            newcomer in 0usize..5,
            late in 0u8..32,
        ) {
            let all: Vec<NodeRecord> = (0..5).map(node).collect();
            let without: Vec<NodeRecord> =
                all.iter().filter(|n| n.id != all[newcomer].id).cloned().collect();
            let (census, copies) = spread(&all, &holders);
            // A view only asks the nodes it knows for their copies.
            let seen_without: HashMap<String, HashSet<BlockHash>> = copies
                .iter()
                .filter(|(id, _)| **id != all[newcomer].id)
                .map(|(id, held)| (id.clone(), held.clone()))
                .collect();
            let mut left = copies.clone();
            for (n, me) in all.iter().enumerate() {
                // The newcomer knows itself; the others are early or late, as `late` says.
                let (view, seen) = if n != newcomer && late & (1 << n) != 0 {
                    (&without, &seen_without)
                } else {
                    (&all, &copies)
                };
                let plan = plan_scan(&me.id, &census, seen, false, order(view, 2));
                for s in plan.surplus {
                    for x in s.extra {
                        left.get_mut(&x.id).expect("node").remove(&s.hash);
                    }
                }
            }
            for (i, mask) in holders.iter().enumerate() {
                let hash = BlockHash::of(&i.to_le_bytes());
                let before = mask.count_ones() as usize;
                let after = left.values().filter(|s| s.contains(&hash)).count();
                proptest::prop_assert!(after >= before.min(2), "block {i}: {before} -> {after}");
            }
        }

        /// However copies are spread, each block has exactly one owner, and surplus removal by
        /// all nodes together keeps every block's wanted copies.
        #[test]
        fn surplus_removal_keeps_the_copies_placement_wants(
            holders in proptest::collection::vec(0u8..32, 1..40),
        ) {
            let live: Vec<NodeRecord> = (0..5).map(node).collect();
            let (census, copies) = spread(&live, &holders);
            let (left, owned) = after_every_node_plans(&live, &census, &copies);
            proptest::prop_assert_eq!(owned, holders.len() as u64);
            for (i, mask) in holders.iter().enumerate() {
                let hash = BlockHash::of(&i.to_le_bytes());
                let before = mask.count_ones() as usize;
                let after = left.values().filter(|s| s.contains(&hash)).count();
                let top = order(&live, 2)(&hash);
                let wanted_held = top.iter().take(2).all(|t| copies[&t.id].contains(&hash));
                if before > 2 && wanted_held {
                    proptest::prop_assert_eq!(after, 2);
                    for t in top.iter().take(2) {
                        proptest::prop_assert!(left[&t.id].contains(&hash));
                    }
                } else {
                    proptest::prop_assert_eq!(after, before);
                }
            }
        }
    }

    /// A new file's block whose put is in flight (named by a pending record) is neither lost
    /// with no copy nor repaired with one: its writer's put makes the copies.
    #[test]
    fn blocks_in_flight_are_neither_lost_nor_repaired() {
        let live: Vec<NodeRecord> = (0..3).map(node).collect();
        // Blocks 0 and 1 without a copy, blocks 2 and 3 with one (on node 0).
        let (mut census, copies) = spread(&live, &[0, 0, 1, 1]);
        let in_flight = [0usize, 2].map(|i| BlockHash::of(&i.to_le_bytes()));
        census.in_flight.extend(in_flight);
        let mut total = VolumeHealth::default();
        let mut due = Vec::new();
        for me in &live {
            let plan = plan_scan(&me.id, &census, &copies, false, order(&live, 2));
            for v in plan.volumes.values() {
                total.lost += v.lost;
                total.under_replicated += v.under_replicated;
                total.in_flight += v.in_flight;
            }
            due.extend(plan.due.into_iter().map(|(_, h)| h));
        }
        assert_eq!(
            (total.lost, total.under_replicated, total.in_flight),
            (1, 1, 2)
        );
        assert_eq!(due, vec![BlockHash::of(&3usize.to_le_bytes())]);
    }

    #[test]
    fn a_planned_stop_gets_the_longer_grace() {
        let cfg = MaintenanceConfig {
            repair_grace_secs: 60,
            planned_grace_secs: 900,
            ..Default::default()
        };
        assert!(in_grace(&rec(NodeState::Up, 1000), &cfg, 1059));
        assert!(!in_grace(&rec(NodeState::Up, 1000), &cfg, 1060));
        assert!(in_grace(&rec(NodeState::Stopped, 1000), &cfg, 1800));
        assert!(!in_grace(&rec(NodeState::Stopped, 1000), &cfg, 1900));
    }
}
