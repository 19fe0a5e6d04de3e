//! The block client: what a mount (or an operator tool) uses to store and fetch blocks.
//!
//! - `put` writes a block to the top R live nodes of its rendezvous ranking in parallel; a node
//!   that fails or times out is replaced by the next in the ranking. It succeeds when R nodes
//!   hold a durable copy, or, when fewer than R nodes can take it, when at least one does; the
//!   outcome says how many copies exist so the caller can count the block as under-replicated.
//! - `get` walks the ranking (suspect nodes last), giving each node a bounded time, and verifies
//!   the bytes against the hash before returning them; a bad copy is reported and skipped.
//! - `get_many` fetches several (small) blocks with one request per first-ranked holder; any
//!   block that request does not return good goes through `get`.
//!
//! Nothing here holds a lock across network I/O.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};

use crate::membership::{Membership, NodeRecord};
use crate::pki::Identity;
use crate::placement;
use crate::transport::{PeerPool, TransportError};
use crate::wire::{ByteRange, ErrorCode, Message, NodeInfo, MAX_BLOCK_SIZE, MAX_GET_MANY};
use crate::BlockHash;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub replicas: usize,
    /// Time one node gets to answer a get before the next is tried.
    pub get_attempt_timeout: Duration,
    /// Time one node gets to store a put before another takes its place.
    pub put_attempt_timeout: Duration,
    /// Time a reply's body (a block) may take to arrive once the node has started answering.
    pub transfer_timeout: Duration,
    /// How long a node that timed out is tried last.
    pub suspect_for: Duration,
    /// A put that has not got its copies after this long also goes to the next node in the
    /// ranking, so a silent node (killed, cut off, before its lease expires) stalls a write by
    /// this much instead of the whole put attempt timeout.
    pub hedge_after: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            replicas: 2,
            get_attempt_timeout: Duration::from_millis(1000),
            put_attempt_timeout: Duration::from_secs(5),
            transfer_timeout: Duration::from_secs(30),
            suspect_for: Duration::from_secs(15),
            hedge_after: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no live nodes are registered in etcd")]
    NoLiveNodes,
    #[error("block of {0} bytes exceeds the {MAX_BLOCK_SIZE}-byte limit")]
    TooLarge(usize),
    #[error("block {0} is not held by any live node")]
    NotFound(BlockHash),
    #[error("no node could store the block: {0}")]
    PutFailed(String),
    /// Every node asked to store the block answered that it is full (an application sees
    /// ENOSPC, as from a full local disk).
    #[error("no space left on any node that could store the block: {0}")]
    NoSpace(String),
    #[error("no live node returned a good copy of {hash}: {attempts}")]
    GetFailed { hash: BlockHash, attempts: String },
    #[error("node {node}: {error}")]
    Node { node: String, error: String },
}

/// Why one node did not store a block.
struct PutRefusal {
    /// The node answered that it has no room.
    full: bool,
    reason: String,
}

impl PutRefusal {
    fn other(reason: String) -> PutRefusal {
        PutRefusal {
            full: false,
            reason,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PutOutcome {
    pub hash: BlockHash,
    /// Nodes that acknowledged a durable copy.
    pub holders: Vec<String>,
    pub wanted: usize,
}

impl PutOutcome {
    pub fn under_replicated(&self) -> bool {
        self.holders.len() < self.wanted
    }
}

#[derive(Debug, Default)]
pub struct ClientStats {
    pub corrupt_copies_seen: AtomicU64,
    pub under_replicated_puts: AtomicU64,
    pub failed_attempts: AtomicU64,
}

pub struct BlockClient {
    pool: PeerPool,
    membership: Membership,
    opts: ClientOptions,
    suspects: Mutex<HashMap<String, Instant>>,
    /// Copies a put makes: `opts.replicas` at first; a mount follows its volume's setting.
    replicas: AtomicUsize,
    pub stats: ClientStats,
}

/// `live` in placement order for `hash` (zones spread over the first `replicas`): a function
/// of the live set alone, so the same on every node that sees it.
pub fn placement_order(live: &[NodeRecord], hash: &BlockHash, replicas: usize) -> Vec<NodeRecord> {
    let candidates: Vec<_> = live.iter().map(|n| n.candidate()).collect();
    placement::rank(hash, &candidates, replicas)
        .into_iter()
        .map(|i| live[i].clone())
        .collect()
}

enum AttemptError {
    NotFound,
    Failed(String),
}

impl BlockClient {
    pub fn new(
        identity: &Identity,
        membership: Membership,
        opts: ClientOptions,
    ) -> anyhow::Result<Arc<BlockClient>> {
        Ok(Arc::new(BlockClient {
            pool: PeerPool::new(identity)?,
            membership,
            replicas: AtomicUsize::new(opts.replicas),
            opts,
            suspects: Mutex::new(HashMap::new()),
            stats: ClientStats::default(),
        }))
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// Copies each put makes.
    pub fn replicas(&self) -> usize {
        self.replicas.load(Ordering::Relaxed)
    }

    /// Changes the copies later puts make (a volume's replica count changed); blocks already
    /// stored get theirs from the nodes' repair scans.
    pub fn set_replicas(&self, replicas: usize) {
        self.replicas.store(replicas.max(1), Ordering::Relaxed);
    }

    fn is_suspect(&self, id: &str) -> bool {
        let mut s = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
        match s.get(id) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                s.remove(id);
                false
            }
            None => false,
        }
    }

    fn suspect(&self, node: &NodeRecord) {
        self.suspects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.id.clone(), Instant::now() + self.opts.suspect_for);
        self.pool.forget(node.addr);
    }

    /// Live nodes in placement order for `hash`: the same on every node that sees the same
    /// live set. Decisions that several nodes must agree on (who owns a block's repair, which
    /// copies are surplus) use this order, never one that depends on this process's own
    /// experience of its peers.
    pub fn placement_order(&self, hash: &BlockHash) -> Vec<NodeRecord> {
        self.placement_order_among(&self.membership.live(), hash)
    }

    /// [`placement_order`](Self::placement_order) over a given snapshot of the live set.
    pub fn placement_order_among(&self, live: &[NodeRecord], hash: &BlockHash) -> Vec<NodeRecord> {
        placement_order(live, hash, self.replicas())
    }

    /// Live nodes in preference order for reading and writing `hash`: placement order, nodes
    /// this process recently found unresponsive (suspects) moved to the end.
    pub fn ranked_nodes(&self, hash: &BlockHash) -> Vec<NodeRecord> {
        let (mut good, bad): (Vec<NodeRecord>, Vec<NodeRecord>) = self
            .placement_order(hash)
            .into_iter()
            .partition(|n| !self.is_suspect(&n.id));
        good.extend(bad);
        good
    }

    async fn request(
        &self,
        node: &NodeRecord,
        msg: &Message,
        timeout: Duration,
    ) -> Result<Message, TransportError> {
        let r = self
            .pool
            .request(node.addr, msg, timeout, self.opts.transfer_timeout)
            .await;
        if let Err(e) = &r {
            self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            if matches!(
                e,
                TransportError::Timeout(_)
                    | TransportError::Connection { .. }
                    | TransportError::Connect { .. }
            ) {
                self.suspect(node);
            }
        }
        r
    }

    async fn put_one(
        &self,
        node: NodeRecord,
        hash: BlockHash,
        data: Bytes,
    ) -> (NodeRecord, Result<(), PutRefusal>) {
        let msg = Message::Put { hash, data };
        let r = match self
            .request(&node, &msg, self.opts.put_attempt_timeout)
            .await
        {
            Ok(Message::Ok) => Ok(()),
            Ok(Message::Error { code, message }) => Err(PutRefusal {
                full: code == ErrorCode::NoSpace,
                reason: format!("{code:?}: {message}"),
            }),
            Ok(other) => Err(PutRefusal::other(format!(
                "unexpected reply {:?}",
                other.kind()
            ))),
            Err(e) => Err(PutRefusal::other(e.to_string())),
        };
        (node, r)
    }

    /// Stores `data` on `replicas` nodes (see the module docs for the degraded case).
    pub async fn put(&self, data: Bytes) -> Result<PutOutcome, ClientError> {
        let hash = BlockHash::of(&data);
        self.put_with_hash(hash, data).await
    }

    pub async fn put_with_hash(
        &self,
        hash: BlockHash,
        data: Bytes,
    ) -> Result<PutOutcome, ClientError> {
        let start = std::time::Instant::now();
        let len = data.len() as u64;
        let r = self.put_replicated(hash, data).await;
        let m = crate::metrics::metrics();
        m.client_requests.record("put", start, r.is_ok());
        if let Ok(o) = &r {
            m.client_bytes_written.inc_by(len * o.holders.len() as u64);
            if o.under_replicated() {
                m.client_under_replicated_writes.inc();
            }
        }
        r
    }

    async fn put_replicated(
        &self,
        hash: BlockHash,
        data: Bytes,
    ) -> Result<PutOutcome, ClientError> {
        if data.len() > MAX_BLOCK_SIZE {
            return Err(ClientError::TooLarge(data.len()));
        }
        let ranked = self.ranked_nodes(&hash);
        if ranked.is_empty() {
            return Err(ClientError::NoLiveNodes);
        }
        let wanted = self.replicas();
        let mut next = ranked.into_iter();
        let mut in_flight = FuturesUnordered::new();
        let mut pending: HashMap<String, NodeRecord> = HashMap::new();
        for node in next.by_ref().take(wanted) {
            pending.insert(node.id.clone(), node.clone());
            in_flight.push(self.put_one(node, hash, data.clone()));
        }
        let mut holders = Vec::new();
        let mut errors = Vec::new();
        // Whether every refusal so far was a full node.
        let mut all_full = true;
        let hedge = tokio::time::sleep(self.opts.hedge_after);
        tokio::pin!(hedge);
        let mut hedged = false;
        while holders.len() < wanted {
            tokio::select! {
                done = in_flight.next() => {
                    let Some((node, result)) = done else { break };
                    pending.remove(&node.id);
                    match result {
                        Ok(()) => holders.push(node.id),
                        Err(refusal) => {
                            all_full &= refusal.full;
                            let e = refusal.reason;
                            tracing::warn!(node = %node.id, block = %hash, error = %e, "put failed; trying the next node");
                            errors.push(format!("{}: {e}", node.id));
                            if let Some(n) = next.next() {
                                pending.insert(n.id.clone(), n.clone());
                                in_flight.push(self.put_one(n, hash, data.clone()));
                            }
                        }
                    }
                }
                _ = &mut hedge, if !hedged && !pending.is_empty() => {
                    hedged = true;
                    // The slow nodes go last for a while; the next ones take their copies.
                    // Should a slow one still answer, the block has a surplus copy, which
                    // repair removes.
                    let slow: Vec<NodeRecord> = pending.values().cloned().collect();
                    for node in &slow {
                        tracing::warn!(node = %node.id, block = %hash, "put slow; also storing on the next node");
                        self.suspect(node);
                    }
                    for n in next.by_ref().take(slow.len()) {
                        pending.insert(n.id.clone(), n.clone());
                        in_flight.push(self.put_one(n, hash, data.clone()));
                    }
                }
            }
        }
        if holders.is_empty() {
            let errors = errors.join("; ");
            return Err(if all_full && !errors.is_empty() {
                ClientError::NoSpace(errors)
            } else {
                ClientError::PutFailed(errors)
            });
        }
        let outcome = PutOutcome {
            hash,
            holders,
            wanted,
        };
        if outcome.under_replicated() {
            self.stats
                .under_replicated_puts
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(block = %hash, copies = outcome.holders.len(), wanted,
                "block stored with fewer copies than wanted");
        }
        Ok(outcome)
    }

    async fn get_from(
        &self,
        node: &NodeRecord,
        hash: BlockHash,
        range: Option<ByteRange>,
    ) -> Result<Bytes, AttemptError> {
        let msg = Message::Get { hash, range };
        match self
            .request(node, &msg, self.opts.get_attempt_timeout)
            .await
        {
            Ok(Message::Data(data)) => {
                // Whole blocks are verified here only (the node sends them as stored); ranges
                // were verified by the node, which hashes the whole block before sending any
                // part of it.
                if range.is_none() && !hash.verifies(&data) {
                    self.stats
                        .corrupt_copies_seen
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::error!(node = %node.id, block = %hash, "node returned bytes that do not match the hash");
                    // Have the node re-hash its copy: a bad one is quarantined and counted
                    // there, and repair re-creates it. Awaited (bounded), so whoever reads
                    // next is not sent the same bytes; its answer changes nothing here.
                    let verify = Message::Verify { hashes: vec![hash] };
                    let _ = self
                        .request(node, &verify, self.opts.get_attempt_timeout)
                        .await;
                    return Err(AttemptError::Failed("returned corrupt bytes".into()));
                }
                Ok(data)
            }
            Ok(Message::Error {
                code: ErrorCode::NotFound,
                ..
            }) => Err(AttemptError::NotFound),
            Ok(Message::Error {
                code: ErrorCode::Corrupt,
                message,
            }) => {
                self.stats
                    .corrupt_copies_seen
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(node = %node.id, block = %hash, "node found its copy corrupt: {message}");
                Err(AttemptError::Failed(format!("copy corrupt: {message}")))
            }
            Ok(Message::Error { code, message }) => {
                Err(AttemptError::Failed(format!("{code:?}: {message}")))
            }
            Ok(other) => Err(AttemptError::Failed(format!(
                "unexpected reply {:?}",
                other.kind()
            ))),
            Err(e) => Err(AttemptError::Failed(e.to_string())),
        }
    }

    /// Fetches a block (or a range of it) from the first live holder that returns good bytes.
    pub async fn get(
        &self,
        hash: BlockHash,
        range: Option<ByteRange>,
    ) -> Result<Bytes, ClientError> {
        let start = std::time::Instant::now();
        let r = self.get_any(hash, range).await;
        let m = crate::metrics::metrics();
        m.client_requests.record("get", start, r.is_ok());
        if let Ok(d) = &r {
            m.client_bytes_read.inc_by(d.len() as u64);
        }
        r
    }

    async fn get_any(
        &self,
        hash: BlockHash,
        range: Option<ByteRange>,
    ) -> Result<Bytes, ClientError> {
        let ranked = self.ranked_nodes(&hash);
        if ranked.is_empty() {
            return Err(ClientError::NoLiveNodes);
        }
        let mut failures = Vec::new();
        for node in &ranked {
            match self.get_from(node, hash, range).await {
                Ok(data) => return Ok(data),
                Err(AttemptError::NotFound) => {}
                Err(AttemptError::Failed(e)) => failures.push(format!("{}: {e}", node.id)),
            }
        }
        if failures.is_empty() {
            Err(ClientError::NotFound(hash))
        } else {
            Err(ClientError::GetFailed {
                hash,
                attempts: failures.join("; "),
            })
        }
    }

    /// Fetches whole blocks, each as [`get`](Self::get) would return it, in `hashes`' order.
    /// The blocks are grouped by their first-ranked live holder and each group asked for in
    /// one `GetMany` request (one stream and round trip instead of one per block: a small
    /// block's fetch costs mostly its request, not its bytes). A block that request leaves
    /// out, or returns with bytes that do not match its hash, or every block of a failed
    /// request (a node that does not know `GetMany` included) is fetched through `get`,
    /// which walks the ranking and deals with bad copies.
    pub async fn get_many(&self, hashes: &[BlockHash]) -> Vec<Result<Bytes, ClientError>> {
        let holders: Vec<Vec<NodeRecord>> = hashes
            .iter()
            .map(|h| {
                let mut ranked = self.ranked_nodes(h);
                ranked.truncate(self.replicas().max(1));
                // A suspect node (it timed out lately: killed, cut off) is asked only for
                // blocks no other holder has, so a batch does not wait for it.
                if ranked.iter().any(|n| !self.is_suspect(&n.id)) {
                    ranked.retain(|n| !self.is_suspect(&n.id));
                }
                ranked
            })
            .collect();
        let groups = batch_by_holder(&holders);
        let mut got: Vec<Option<Bytes>> = vec![None; hashes.len()];
        let asks = groups.iter().flat_map(|(node, idxs)| {
            idxs.chunks(MAX_GET_MANY).map(move |idxs| async move {
                let start = Instant::now();
                let msg = Message::GetMany {
                    hashes: idxs.iter().map(|&i| hashes[i]).collect(),
                };
                let reply = self
                    .request(node, &msg, self.opts.get_attempt_timeout)
                    .await;
                let ok = matches!(&reply, Ok(Message::DataMany(b)) if b.len() == idxs.len());
                crate::metrics::metrics()
                    .client_requests
                    .record("get_many", start, ok);
                match reply {
                    Ok(Message::DataMany(blocks)) if ok => {
                        idxs.iter().copied().zip(blocks).collect()
                    }
                    _ => Vec::new(),
                }
            })
        });
        for answers in futures::future::join_all(asks).await {
            for (i, data) in answers {
                got[i] = data.filter(|d| hashes[i].verifies(d));
            }
        }
        let m = crate::metrics::metrics();
        m.client_bytes_read
            .inc_by(got.iter().flatten().map(|d| d.len() as u64).sum());
        // Whatever the batches did not bring (usually nothing), one by one, in parallel.
        futures::future::join_all(got.into_iter().zip(hashes).map(|(data, &hash)| async move {
            match data {
                Some(d) => Ok(d),
                None => self.get(hash, None).await,
            }
        }))
        .await
    }

    /// QUIC path figures of this client's connections to nodes.
    pub fn path_stats(&self) -> Vec<crate::transport::PathStats> {
        self.pool.path_stats()
    }

    /// The live nodes that hold a copy of `hash` (each asked directly, in parallel).
    pub async fn locate(&self, hash: BlockHash) -> Result<Vec<NodeRecord>, ClientError> {
        let live = self.membership.live();
        if live.is_empty() {
            return Err(ClientError::NoLiveNodes);
        }
        let msg = Message::Has { hashes: vec![hash] };
        let asks = live.into_iter().map(|node| {
            let msg = &msg;
            async move {
                let r = self
                    .request(&node, msg, self.opts.get_attempt_timeout)
                    .await;
                (node, r)
            }
        });
        let mut holders = Vec::new();
        for (node, r) in futures::future::join_all(asks).await {
            match r {
                Ok(Message::HasReply(bits)) if bits.first() == Some(&true) => holders.push(node),
                Ok(_) => {}
                Err(e) => tracing::warn!(node = %node.id, error = %e, "node did not answer"),
            }
        }
        Ok(holders)
    }

    pub async fn info(&self, node: &NodeRecord) -> Result<NodeInfo, ClientError> {
        match self
            .request(node, &Message::Info, self.opts.get_attempt_timeout)
            .await
        {
            Ok(Message::InfoReply(i)) => Ok(i),
            other => Err(reply_error(node, other)),
        }
    }

    /// A request to one node answered by a `HasReply` of one bit per hash (has, verify,
    /// collect). `timeout` covers the whole answer (verify re-reads every listed block).
    pub async fn ask_bits(
        &self,
        node: &NodeRecord,
        msg: &Message,
        expect: usize,
        timeout: Duration,
    ) -> Result<Vec<bool>, ClientError> {
        match self.request(node, msg, timeout).await {
            Ok(Message::HasReply(bits)) if bits.len() == expect => Ok(bits),
            Ok(Message::HasReply(bits)) => Err(ClientError::Node {
                node: node.id.clone(),
                error: format!("{} answers for {expect} blocks", bits.len()),
            }),
            other => Err(reply_error(node, other)),
        }
    }

    /// One page of a node's inventory, in hash order after `after`.
    pub async fn list_page(
        &self,
        node: &NodeRecord,
        after: Option<BlockHash>,
        limit: u32,
    ) -> Result<(Vec<crate::wire::ListEntry>, bool), ClientError> {
        let msg = Message::List { after, limit };
        match self.request(node, &msg, Duration::from_secs(10)).await {
            Ok(Message::ListReply { entries, more }) => Ok((entries, more)),
            other => Err(reply_error(node, other)),
        }
    }

    /// Stores a copy on one given node (repair: the copy goes where placement wants it).
    pub async fn put_on(
        &self,
        node: &NodeRecord,
        hash: BlockHash,
        data: Bytes,
    ) -> Result<(), ClientError> {
        let len = data.len() as u64;
        let (_, r) = self.put_one(node.clone(), hash, data).await;
        r.map_err(|refusal| ClientError::Node {
            node: node.id.clone(),
            error: refusal.reason,
        })?;
        crate::metrics::metrics().client_bytes_written.inc_by(len);
        Ok(())
    }

    /// Reads a whole block from one given node, verified against its hash.
    pub async fn get_from_node(
        &self,
        node: &NodeRecord,
        hash: BlockHash,
    ) -> Result<Bytes, ClientError> {
        self.get_from(node, hash, None)
            .await
            .map_err(|e| ClientError::Node {
                node: node.id.clone(),
                error: match e {
                    AttemptError::NotFound => "no copy".into(),
                    AttemptError::Failed(e) => e,
                },
            })
    }

    /// Deletes one copy on one node (surplus copies, after R verified copies exist elsewhere).
    pub async fn delete_on(&self, node: &NodeRecord, hash: BlockHash) -> Result<(), ClientError> {
        match self
            .request(node, &Message::Delete { hash }, Duration::from_secs(10))
            .await
        {
            Ok(Message::Ok) => Ok(()),
            other => Err(reply_error(node, other)),
        }
    }

    /// Sends a request to one node address (operators' and tests' raw access).
    pub async fn request_addr(
        &self,
        addr: SocketAddr,
        msg: &Message,
    ) -> Result<Message, TransportError> {
        self.pool
            .request(
                addr,
                msg,
                Duration::from_secs(10),
                self.opts.transfer_timeout,
            )
            .await
    }

    /// Sends raw bytes as a request frame (tests of the node's frame handling).
    pub async fn raw_request(
        &self,
        addr: SocketAddr,
        bytes: &[u8],
    ) -> Result<Vec<u8>, TransportError> {
        self.pool.raw_request(addr, bytes).await
    }
}

/// Groups blocks (each given by the nodes that should hold it, best first) into as few
/// requests as it can: repeatedly the node that should hold the most blocks not yet grouped
/// takes them all (ties to the node ranked better for more of them). With 3 nodes and 2
/// copies a batch then goes to 2 nodes, not to all 3 as by first-ranked holder.
fn batch_by_holder(holders: &[Vec<NodeRecord>]) -> Vec<(NodeRecord, Vec<usize>)> {
    let mut left: Vec<usize> = (0..holders.len())
        .filter(|&i| !holders[i].is_empty())
        .collect();
    let mut groups = Vec::new();
    while !left.is_empty() {
        // Per node: (blocks it holds among those left, sum of its ranks there).
        let mut score: HashMap<SocketAddr, (usize, usize, &NodeRecord)> = HashMap::new();
        for &i in &left {
            for (rank, node) in holders[i].iter().enumerate() {
                let e = score.entry(node.addr).or_insert((0, 0, node));
                e.0 += 1;
                e.1 += rank;
            }
        }
        let Some((_, _, best)) = score
            .into_values()
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(b.2.id.cmp(&a.2.id)))
        else {
            break;
        };
        let (take, keep): (Vec<usize>, Vec<usize>) = left
            .into_iter()
            .partition(|&i| holders[i].iter().any(|n| n.addr == best.addr));
        groups.push((best.clone(), take));
        left = keep;
    }
    groups
}

/// The error for a request to `node` that did not get the reply it wanted: the node's own
/// error, a reply of the wrong kind, or a transport failure.
fn reply_error(node: &NodeRecord, reply: Result<Message, TransportError>) -> ClientError {
    let error = match reply {
        Ok(Message::Error { code, message }) => format!("{code:?}: {message}"),
        Ok(other) => format!("unexpected reply {:?}", other.kind()),
        Err(e) => e.to_string(),
    };
    ClientError::Node {
        node: node.id.clone(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::NodeState;

    fn node(i: u16) -> NodeRecord {
        NodeRecord {
            id: format!("n{i}"),
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + i)),
            zone: None,
            version: String::new(),
            capacity: 0,
            free: 0,
            blocks: 0,
            bytes_used: 0,
            state: NodeState::Up,
            updated_unix: 0,
        }
    }

    #[test]
    fn batches_go_to_as_few_holders_as_cover_every_block() {
        let (a, b, c) = (node(0), node(1), node(2));
        // Six blocks on two of three nodes each; b holds five of them.
        let holders = vec![
            vec![a.clone(), b.clone()],
            vec![b.clone(), c.clone()],
            vec![c.clone(), a.clone()],
            vec![b.clone(), a.clone()],
            vec![c.clone(), b.clone()],
            vec![a.clone(), b.clone()],
            vec![],
        ];
        let groups = batch_by_holder(&holders);
        let got: Vec<(String, Vec<usize>)> = groups.into_iter().map(|(n, i)| (n.id, i)).collect();
        assert_eq!(
            got,
            vec![("n1".into(), vec![0, 1, 3, 4, 5]), ("n2".into(), vec![2])],
            "a block no live node should hold is in no batch"
        );
        // Equal counts: the node ranked first for more of the blocks.
        let holders = vec![vec![a.clone(), b.clone()], vec![a.clone(), b.clone()]];
        assert_eq!(batch_by_holder(&holders)[0].0.id, "n0");
    }

    #[tokio::test]
    async fn suspicion_reorders_reads_and_writes_but_never_placement() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca");
        crate::pki::init_ca(&ca, "test").expect("ca");
        let me = dir.path().join("me");
        crate::pki::issue_cert(&ca, "me", crate::pki::CertRole::Client, &me).expect("cert");
        let identity = Identity::load(&me).expect("identity");
        let nodes: Vec<NodeRecord> = (0..4).map(node).collect();
        let client = BlockClient::new(
            &identity,
            Membership::fixed(nodes),
            ClientOptions::default(),
        )
        .expect("client");
        let hash = BlockHash::of(b"a block");
        let placed = client.placement_order(&hash);
        assert_eq!(client.ranked_nodes(&hash), placed);
        client.suspect(&placed[0]);
        let ranked = client.ranked_nodes(&hash);
        assert_eq!(ranked.last(), Some(&placed[0]));
        assert_eq!(ranked[0], placed[1]);
        assert_eq!(client.placement_order(&hash), placed);
    }
}
