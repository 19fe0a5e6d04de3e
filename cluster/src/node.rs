//! The node agent: a block store served over QUIC, registered in etcd.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::blockstore::{BlockStore, StoreError};
use crate::etcd::EtcdConfig;
use crate::membership::{unix_now, NodeRecord, NodeState, Registration};
use crate::pki::Identity;
use crate::transport::{self, Handler, ServerCounters};
use crate::wire::{ErrorCode, Message, MessageKind, NodeInfo, MAX_GET_MANY_BYTES, MAX_LIST_PAGE};
use crate::VERSION;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Where blocks, the index and the node id live.
    pub data_dir: PathBuf,
    /// UDP address to listen on for QUIC.
    pub listen: SocketAddr,
    /// Address other nodes and clients use to reach this one (defaults to `listen`, which must
    /// then not be a wildcard).
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    pub etcd: EtcdConfig,
    /// Directory with ca.crt, tls.crt, tls.key.
    pub tls_dir: PathBuf,
    #[serde(default)]
    pub zone: Option<String>,
    /// Bytes this node offers; defaults to the size of the data directory's filesystem.
    #[serde(default)]
    pub capacity: Option<u64>,
    /// Seconds without a lease renewal after which the node counts as dead.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_secs: u64,
    /// Where to serve /metrics, /healthz and /readyz over HTTP (none: not served).
    #[serde(default)]
    pub metrics_addr: Option<SocketAddr>,
    /// Volumes the agent mounts itself (Kubernetes DaemonSet, or one service per host).
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    /// Repair, garbage collection and scrubbing (the `[maintenance]` table).
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
}

/// Timers and rates of the cluster's upkeep. Why each default: ARCHITECTURE.md, "Failure model".
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// Seconds a vanished node (lease expired) may stay away before its copies are re-created
    /// elsewhere.
    pub repair_grace_secs: u64,
    /// The same for a node that announced a planned stop (rolling restarts).
    pub planned_grace_secs: u64,
    /// Seconds between two repair scans of the namespace.
    pub repair_interval_secs: u64,
    /// Repair copy bandwidth of this node, MiB/s (0: no repair by this node).
    pub repair_mib_per_sec: f64,
    /// Unreferenced copies younger than this are never collected.
    pub gc_grace_secs: u64,
    /// Seconds between two garbage collections of this node's copies (0: never).
    pub gc_interval_secs: u64,
    /// Re-reading rate of the background scrub, MiB/s (0: no scrub).
    pub scrub_mib_per_sec: f64,
    /// Seconds from the start of one scrub pass to the start of the next.
    pub scrub_interval_secs: u64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            repair_grace_secs: 60,
            planned_grace_secs: 900,
            repair_interval_secs: 30,
            repair_mib_per_sec: 64.0,
            gc_grace_secs: 3600,
            gc_interval_secs: 3600,
            scrub_mib_per_sec: 8.0,
            scrub_interval_secs: 7 * 86400,
        }
    }
}

impl MaintenanceConfig {
    pub fn validate(&self) -> Result<()> {
        if self.repair_interval_secs == 0 || self.scrub_interval_secs == 0 {
            bail!("maintenance intervals must be at least 1 second");
        }
        for (name, v) in [
            ("repair_mib_per_sec", self.repair_mib_per_sec),
            ("scrub_mib_per_sec", self.scrub_mib_per_sec),
        ] {
            if !(0.0..=100_000.0).contains(&v) {
                bail!("{name} must be between 0 and 100000, not {v}");
            }
        }
        if self.gc_grace_secs == 0 {
            bail!("gc_grace_secs must be at least 1 (and should outlast any write in flight)");
        }
        if self.gc_grace_secs < 600 {
            tracing::warn!(
                gc_grace_secs = self.gc_grace_secs,
                "a garbage-collection grace under 10 minutes can race writes in flight; for tests only"
            );
        }
        Ok(())
    }
}

/// One volume the agent keeps mounted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    pub volume: String,
    pub dir: PathBuf,
}

impl std::str::FromStr for MountSpec {
    type Err = String;
    /// `VOLUME=DIR`, as `--mount` takes it.
    fn from_str(s: &str) -> Result<MountSpec, String> {
        match s.split_once('=') {
            Some((v, d)) if !v.is_empty() && d.starts_with('/') => Ok(MountSpec {
                volume: v.to_string(),
                dir: PathBuf::from(d),
            }),
            _ => Err(format!(
                "{s:?} is not VOLUME=/ABSOLUTE/DIR (e.g. uploads=/var/lib/twinfs/volumes/uploads)"
            )),
        }
    }
}

fn default_lease_ttl() -> u64 {
    10
}

impl NodeConfig {
    pub fn advertised(&self) -> Result<SocketAddr> {
        let a = self.advertise.unwrap_or(self.listen);
        if a.ip().is_unspecified() {
            bail!(
                "listen address {} is a wildcard; give --advertise with an address peers can reach",
                self.listen
            );
        }
        if a.port() == 0 {
            bail!("the advertised address {a} needs a port");
        }
        Ok(a)
    }

    pub fn validate(&self) -> Result<()> {
        self.etcd.validate()?;
        self.advertised()?;
        if !(2..=300).contains(&self.lease_ttl_secs) {
            bail!(
                "lease_ttl_secs must be between 2 and 300, not {}",
                self.lease_ttl_secs
            );
        }
        self.maintenance.validate()?;
        for (i, m) in self.mounts.iter().enumerate() {
            if !m.dir.is_absolute() {
                bail!(
                    "mount directory {} must be an absolute path",
                    m.dir.display()
                );
            }
            if self.mounts[..i].iter().any(|o| o.dir == m.dir) {
                bail!("two mounts at {}", m.dir.display());
            }
        }
        if let Some(z) = &self.zone {
            if z.is_empty() || z.len() > 64 {
                bail!("zone label must be 1-64 characters");
            }
        }
        Ok(())
    }
}

/// Reads the node id from `data_dir/node_id`, creating a new random one on first start.
pub fn load_or_create_node_id(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim().to_string();
            if id.is_empty()
                || id.len() > 64
                || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                bail!(
                    "{} holds {id:?}, which is not a node id; fix or remove it",
                    path.display()
                );
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = format!("n{:015x}", rand::random::<u64>() >> 4);
            let tmp = data_dir.join("node_id.tmp");
            std::fs::write(&tmp, format!("{id}\n"))?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(data_dir)?.sync_all()?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub struct NodeService {
    pub id: String,
    pub zone: Option<String>,
    pub store: Arc<BlockStore>,
    pub capacity: Option<u64>,
    pub counters: Arc<ServerCounters>,
}

fn store_error(e: StoreError) -> Message {
    let code = match &e {
        StoreError::NotFound(_) => ErrorCode::NotFound,
        StoreError::HashMismatch(_) => ErrorCode::HashMismatch,
        StoreError::Corrupt(_) => ErrorCode::Corrupt,
        StoreError::NoSpace => ErrorCode::NoSpace,
        StoreError::TooLarge(_) => ErrorCode::TooLarge,
        StoreError::BadRange { .. } => ErrorCode::BadRequest,
        StoreError::Io(_) | StoreError::Index(_) => ErrorCode::Internal,
    };
    if code == ErrorCode::Internal {
        tracing::error!(error = %e, "block store error");
    }
    Message::error(code, e.to_string())
}

impl NodeService {
    pub fn info(&self) -> NodeInfo {
        let s = self.store.stats();
        let (disk_cap, free) = self.store.disk_space().unwrap_or((0, 0));
        let capacity = self.capacity.unwrap_or(disk_cap);
        let free = match self.capacity {
            Some(cap) => free.min(cap.saturating_sub(s.bytes_used)),
            None => free,
        };
        NodeInfo {
            node_id: self.id.clone(),
            zone: self.zone.clone().unwrap_or_default(),
            version: VERSION.to_string(),
            blocks: s.blocks,
            bytes_used: s.bytes_used,
            capacity,
            free,
            corrupt_detected: s.corrupt_detected,
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&BlockStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Io(std::io::Error::other(format!(
                "store task failed: {e}"
            )))),
        }
    }

    async fn handle_request(self: Arc<Self>, req: Message) -> Message {
        let start = std::time::Instant::now();
        let op = match req.kind() {
            MessageKind::Put => "put",
            MessageKind::Get => "get",
            MessageKind::Has => "has",
            MessageKind::Delete => "delete",
            MessageKind::List => "list",
            MessageKind::Info => "info",
            MessageKind::Verify => "verify",
            MessageKind::Collect => "collect",
            MessageKind::GetMany => "get_many",
            _ => "other",
        };
        let m = crate::metrics::metrics();
        if let Message::Put { data, .. } = &req {
            m.node_bytes_received.inc_by(data.len() as u64);
        }
        let reply = self.serve_request(req).await;
        let sent = match &reply {
            Message::Data(d) => d.len() as u64,
            Message::DataMany(blocks) => blocks.iter().flatten().map(|d| d.len() as u64).sum(),
            _ => 0,
        };
        if sent > 0 {
            m.node_bytes_sent.inc_by(sent);
        }
        // A missing block is an answer, not a failure (clients ask holders in turn).
        let failed = matches!(&reply, Message::Error { code, .. } if *code != ErrorCode::NotFound);
        m.node_requests.record(op, start, !failed);
        reply
    }

    async fn serve_request(self: Arc<Self>, req: Message) -> Message {
        match req {
            Message::Put { hash, data } => {
                if let Some(cap) = self.capacity {
                    if self.store.stats().bytes_used + data.len() as u64 > cap {
                        return Message::error(ErrorCode::NoSpace, "node capacity reached");
                    }
                }
                match self.blocking(move |s| s.put(&hash, &data)).await {
                    Ok(_) => {
                        // Small blocks' index entries, a batch at a time, after this reply
                        // rather than before it (the block is durable already).
                        if self.store.claim_index_commit() {
                            let store = self.store.clone();
                            tokio::task::spawn_blocking(move || {
                                if let Err(e) = store.commit_unindexed() {
                                    tracing::warn!(error = %e, "committing small blocks' index entries failed; will retry");
                                }
                            });
                        }
                        Message::Ok
                    }
                    Err(e) => {
                        if matches!(e, StoreError::HashMismatch(_)) {
                            self.counters
                                .malformed_frames
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(block = %hash, "refused a put whose bytes do not match its hash");
                        }
                        store_error(e)
                    }
                }
            }
            // A whole block goes out as stored: the client hashes it anyway (and sends
            // `Verify` on a mismatch). A range cannot be checked by the client, so the node
            // hashes the whole block before sending any part of it.
            Message::Get { hash, range } => {
                let read = match range {
                    None => self.blocking(move |s| s.read_unverified(&hash)).await,
                    Some(r) => self
                        .blocking(move |s| s.get(&hash, Some(r)))
                        .await
                        .map(bytes::Bytes::from),
                };
                match read {
                    Ok(data) => Message::Data(data),
                    Err(e) => store_error(e),
                }
            }
            // Blocks are sent as stored, as for `Get`; the client verifies each one and fetches
            // any it finds bad, missing or left out through `Get` (where a bad copy is dealt
            // with), so a block this node cannot read is simply left out here.
            Message::GetMany { hashes } => {
                let read = self
                    .blocking(move |s| {
                        let mut budget = MAX_GET_MANY_BYTES;
                        Ok(hashes
                            .iter()
                            .map(|h| {
                                // Sized from the index first: a block past the budget is not
                                // read at all.
                                let size = s.stored_size(h).ok()??;
                                if size > budget as u64 {
                                    return None;
                                }
                                let data = s.read_unverified(h).ok()?;
                                budget = budget.checked_sub(data.len())?;
                                Some(data)
                            })
                            .collect())
                    })
                    .await;
                match read {
                    Ok(blocks) => Message::DataMany(blocks),
                    Err(e) => store_error(e),
                }
            }
            Message::Has { hashes } => match self.blocking(move |s| s.has_many(&hashes)).await {
                Ok(bits) => Message::HasReply(bits),
                Err(e) => store_error(e),
            },
            Message::Delete { hash } => match self.blocking(move |s| s.delete(&hash)).await {
                Ok(()) => Message::Ok,
                Err(e) => store_error(e),
            },
            Message::List { after, limit } => {
                let limit = (limit as usize).min(MAX_LIST_PAGE);
                match self.blocking(move |s| s.list(after, limit)).await {
                    Ok((entries, more)) => Message::ListReply { entries, more },
                    Err(e) => store_error(e),
                }
            }
            Message::Verify { hashes } => match self.blocking(move |s| s.verify(&hashes)).await {
                Ok(bits) => Message::HasReply(bits),
                Err(e) => store_error(e),
            },
            Message::Collect {
                hashes,
                older_than_unix,
            } => match self
                .blocking(move |s| s.collect(&hashes, older_than_unix))
                .await
            {
                Ok(bits) => {
                    let n = bits.iter().filter(|b| **b).count();
                    if n > 0 {
                        tracing::info!(
                            deleted = n,
                            "garbage collection removed unreferenced blocks"
                        );
                    }
                    Message::HasReply(bits)
                }
                Err(e) => store_error(e),
            },
            Message::Info => {
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.info()).await {
                    Ok(i) => Message::InfoReply(i),
                    Err(e) => Message::error(ErrorCode::Internal, e.to_string()),
                }
            }
            other => Message::error(
                ErrorCode::BadRequest,
                format!("{:?} is not a request", other.kind()),
            ),
        }
    }
}

impl Handler for NodeService {
    fn handle(self: Arc<Self>, request: Message) -> BoxFuture<'static, Message> {
        Box::pin(self.handle_request(request))
    }
}

/// Re-reads every copy of this node at `mib_per_sec`, one pass per `interval`: a copy that no
/// longer matches its hash is quarantined by the read, and the repair scan re-creates it from a
/// good copy elsewhere. Finds rot in blocks nobody reads.
async fn scrub(store: Arc<BlockStore>, mib_per_sec: f64, interval: Duration) {
    let bytes_per_sec = mib_per_sec * 1024.0 * 1024.0;
    // Not at start: a node (re)starting is often part of a busy moment (rolling restart,
    // benchmark, test); a pass a week need not begin in it. Jittered so nodes started together
    // do not scrub together.
    let first = interval.min(Duration::from_secs(3600));
    let first = first + first.mul_f64(rand::random::<f64>() / 10.0);
    tokio::time::sleep(first).await;
    loop {
        let pass = tokio::time::Instant::now();
        let (mut checked, mut bad, mut after) = (0u64, 0u64, None);
        loop {
            let s = store.clone();
            let page = match tokio::task::spawn_blocking(move || s.list(after, 256)).await {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "scrub could not list blocks");
                    break;
                }
                Err(_) => break,
            };
            let (entries, more) = page;
            for e in &entries {
                let (s, hash) = (store.clone(), e.hash);
                match tokio::task::spawn_blocking(move || s.verify(&[hash])).await {
                    Ok(Ok(v)) if v.first() == Some(&false) => bad += 1,
                    _ => {}
                }
                checked += 1;
                let pause = Duration::from_secs_f64(e.size as f64 / bytes_per_sec);
                tokio::time::sleep(pause).await;
            }
            match (more, entries.last()) {
                (true, Some(last)) => after = Some(last.hash),
                _ => break,
            }
        }
        if checked > 0 {
            tracing::info!(
                checked,
                bad,
                seconds = pass.elapsed().as_secs(),
                "scrub pass done"
            );
        }
        tokio::time::sleep_until(pass + interval).await;
    }
}

fn record_of(svc: &NodeService, addr: SocketAddr) -> NodeRecord {
    let i = svc.info();
    let m = crate::metrics::metrics();
    m.node_blocks.set(i.blocks as i64);
    m.node_bytes_used.set(i.bytes_used as i64);
    m.node_corrupt_blocks.set(i.corrupt_detected as i64);
    NodeRecord {
        id: svc.id.clone(),
        addr,
        zone: svc.zone.clone(),
        version: VERSION.to_string(),
        capacity: i.capacity,
        free: i.free,
        blocks: i.blocks,
        bytes_used: i.bytes_used,
        state: NodeState::Up,
        updated_unix: unix_now(),
    }
}

/// Runs a node until `shutdown` completes, then leaves the cluster cleanly.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
    health: Arc<crate::metrics::Health>,
) -> Result<()> {
    config.validate()?;
    let addr = config.advertised()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let id = load_or_create_node_id(&config.data_dir)?;
    let identity = Identity::load(&config.tls_dir)?;
    let blocks_dir = config.data_dir.join("store");
    let store = tokio::task::spawn_blocking(move || BlockStore::open(&blocks_dir))
        .await
        .context("opening the block store")??;
    let stats = store.stats();
    tracing::info!(node = %id, blocks = stats.blocks, bytes = stats.bytes_used, "block store open");
    let counters = Arc::new(ServerCounters::default());
    let svc = Arc::new(NodeService {
        id: id.clone(),
        zone: config.zone.clone(),
        store: Arc::new(store),
        capacity: config.capacity,
        counters: counters.clone(),
    });
    if config.maintenance.scrub_mib_per_sec > 0.0 {
        tokio::spawn(scrub(
            svc.store.clone(),
            config.maintenance.scrub_mib_per_sec,
            Duration::from_secs(config.maintenance.scrub_interval_secs),
        ));
    }
    let endpoint = transport::server_endpoint(&identity, config.listen)?;
    tokio::spawn(transport::serve(endpoint.clone(), svc.clone(), counters));
    tracing::info!(node = %id, listen = %config.listen, advertise = %addr, "serving blocks over QUIC");

    let etcd = config.etcd.connect().await?;
    let snap_svc = svc.clone();
    let registration = Registration::start(
        etcd,
        Duration::from_secs(config.lease_ttl_secs),
        Duration::from_secs(5),
        move || record_of(&snap_svc, addr),
    )
    .await?;
    tracing::info!(node = %id, ttl = config.lease_ttl_secs, "registered in etcd");
    health.node_registered.store(true, Ordering::Relaxed);

    shutdown.await;
    health.node_registered.store(false, Ordering::Relaxed);
    tracing::info!(node = %id, "shutting down: leaving the cluster");
    let last = record_of(&svc, addr);
    if let Err(e) = tokio::time::timeout(Duration::from_secs(5), registration.leave(last))
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("etcd did not answer in 5 s")))
    {
        tracing::warn!(error = %e, "could not deregister cleanly; the lease will expire");
    }
    // Let in-flight requests finish (bounded), then close.
    endpoint.close(quinn::VarInt::from_u32(0), b"node shutting down");
    tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle())
        .await
        .ok();
    Ok(())
}
