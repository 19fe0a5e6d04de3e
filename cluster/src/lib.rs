//! twinfs data plane: everything that moves and keeps block bytes.
//!
//! - [`wire`]: the versioned, size-bounded frame format (pure; no I/O).
//! - [`placement`]: rendezvous ranking of nodes per block, zone-aware (pure; no I/O).
//! - [`blockstore`]: a node's durable, verified, content-addressed block store.
//! - [`pki`]: the cluster CA and the mutual-TLS configurations built from it.
//! - [`transport`]: QUIC server and connection pool speaking [`wire`].
//! - [`membership`]: node registration under an etcd lease and the watched view of live nodes.
//! - [`client`]: the block client (replicated put, failover get, locate).
//! - [`node`]: the node agent that ties a block store, a server and a registration together.

pub mod blockstore;
pub mod client;
pub mod etcd;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod pki;
pub mod placement;
mod smalllog;
pub mod transport;
pub mod wire;

use std::fmt;
use std::str::FromStr;

/// The BLAKE3 hash of a block's bytes: its name everywhere in twinfs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    pub fn of(data: &[u8]) -> BlockHash {
        BlockHash(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// True when `data` hashes to this hash.
    pub fn verifies(&self, data: &[u8]) -> bool {
        // blake3::Hash's equality is constant-time; not needed here, but free.
        blake3::hash(data) == blake3::Hash::from_bytes(self.0)
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({})", &self.to_hex()[..16])
    }
}

#[derive(Debug, thiserror::Error)]
#[error("not a block hash: expected 64 hex digits")]
pub struct BadHash;

impl FromStr for BlockHash {
    type Err = BadHash;
    fn from_str(s: &str) -> Result<Self, BadHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| BadHash)?;
        Ok(BlockHash(out))
    }
}

/// The version string nodes register and report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
