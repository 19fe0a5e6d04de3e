//! [`ClusterBlocks`]: the core's [`BlockIo`] over the cluster's replicated block client.
//!
//! - `put` → [`BlockClient::put`]: returns once the block is durable on its replicas. When fewer
//!   nodes than wanted could take it, the put still succeeds with the copies it got (degraded
//!   writes are allowed by design; repair adds the missing copies later) and is counted in
//!   [`ClusterBlocks::under_replicated`].
//! - `get` → [`BlockClient::get`] of the whole block, which walks the placement ranking and
//!   verifies the bytes against the hash before returning them; a block no live node holds is
//!   [`BlockError::NotFound`], any other failure [`BlockError::Other`].
//! - A put that every node it asked refused for lack of room is [`BlockError::NoSpace`]: the
//!   application sees ENOSPC, as from a full local disk, not EIO.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use twinfs_cluster::client::{BlockClient, ClientError};
use twinfs_cluster::BlockHash;
use twinfs_core::{BlockError, BlockIo};

/// The production [`BlockIo`].
pub struct ClusterBlocks {
    client: Arc<BlockClient>,
    under_replicated: AtomicU64,
}

impl ClusterBlocks {
    pub fn new(client: Arc<BlockClient>) -> ClusterBlocks {
        ClusterBlocks {
            client,
            under_replicated: AtomicU64::new(0),
        }
    }

    /// The underlying block client.
    pub fn client(&self) -> &Arc<BlockClient> {
        &self.client
    }

    /// Puts through this instance that stored fewer copies than the volume's replica count.
    pub fn under_replicated(&self) -> u64 {
        self.under_replicated.load(Ordering::Relaxed)
    }
}

fn get_error(hash: BlockHash, e: ClientError) -> BlockError {
    match e {
        ClientError::NotFound(h) => BlockError::NotFound(h),
        other => BlockError::Other(format!("reading block {hash}: {other}")),
    }
}

fn put_error(e: ClientError) -> BlockError {
    match e {
        ClientError::NoSpace(why) => BlockError::NoSpace(why),
        other => BlockError::Other(format!("storing a block: {other}")),
    }
}

impl BlockIo for ClusterBlocks {
    fn put(&self, data: Bytes) -> BoxFuture<'_, Result<BlockHash, BlockError>> {
        async move {
            match self.client.put(data).await {
                Ok(outcome) => {
                    if outcome.under_replicated() {
                        self.under_replicated.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(outcome.hash)
                }
                Err(e) => Err(put_error(e)),
            }
        }
        .boxed()
    }

    fn get(&self, hash: BlockHash) -> BoxFuture<'_, Result<Bytes, BlockError>> {
        async move {
            self.client
                .get(hash, None)
                .await
                .map_err(|e| get_error(hash, e))
        }
        .boxed()
    }

    fn get_many(&self, hashes: Vec<BlockHash>) -> BoxFuture<'_, Vec<Result<Bytes, BlockError>>> {
        async move {
            if let [hash] = hashes[..] {
                return vec![self.get(hash).await];
            }
            let results = self.client.get_many(&hashes).await;
            results
                .into_iter()
                .zip(hashes)
                .map(|(r, hash)| r.map_err(|e| get_error(hash, e)))
                .collect()
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_map_to_block_errors() {
        let h = BlockHash::of(b"x");
        assert_eq!(
            get_error(h, ClientError::NotFound(h)),
            BlockError::NotFound(h)
        );
        assert!(matches!(
            get_error(h, ClientError::NoLiveNodes),
            BlockError::Other(_)
        ));
        assert!(matches!(
            get_error(
                h,
                ClientError::GetFailed {
                    hash: h,
                    attempts: "node-0: returned corrupt bytes".into()
                }
            ),
            BlockError::Other(_)
        ));
        assert!(matches!(
            put_error(ClientError::NoSpace("n1: NoSpace".into())),
            BlockError::NoSpace(_)
        ));
        assert!(matches!(
            put_error(ClientError::PutFailed("n1: timed out".into())),
            BlockError::Other(_)
        ));
    }
}
