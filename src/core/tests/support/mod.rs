//! A test store over [`MemKv`] that misbehaves in one chosen way (a lost transaction reply, a
//! stale watch cache, counted reads) and passes everything else through, so each test spells
//! out only its fault.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use twinfs_core::kv::Versioned;
use twinfs_core::{Compare, KvError, MemKv, MetaKv, RangePage, TxnOp};

/// What a [`HookedKv`] does differently from the [`MemKv`] under it. Every method has a
/// pass-through default.
pub trait Hooks: Send + Sync {
    /// Called before every read that goes to the store.
    fn on_read(&self) {}
    /// Awaited before every transaction reaches the store; an error fails it unapplied.
    fn before_txn(&self) -> BoxFuture<'static, Result<(), KvError>> {
        futures::future::ready(Ok(())).boxed()
    }
    /// Sees every transaction's outcome after the store applied it, and may replace it.
    fn after_txn(&self, outcome: Result<bool, KvError>) -> Result<bool, KvError> {
        outcome
    }
    /// The watch cache's answer for `key` (no cache by default).
    fn cached(&self, _key: &[u8]) -> Versioned {
        None
    }
    /// Whether the watch cache knows `key` absent (see [`MetaKv::cached_absent`]).
    fn cached_absent(&self, _key: &[u8], _within: &[u8]) -> bool {
        false
    }
    /// The store's session (see [`MetaKv::session`]; none by default).
    fn session(&self) -> Option<u64> {
        None
    }
}

/// [`MemKv`] with [`Hooks`].
pub struct HookedKv<H> {
    pub inner: Arc<MemKv>,
    pub hooks: H,
}

impl<H: Hooks> MetaKv for HookedKv<H> {
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Versioned, KvError>> {
        self.hooks.on_read();
        self.inner.get(key)
    }

    fn range<'a>(
        &'a self,
        start: &'a [u8],
        end: &'a [u8],
        limit: usize,
    ) -> BoxFuture<'a, Result<RangePage, KvError>> {
        self.hooks.on_read();
        self.inner.range(start, end, limit)
    }

    fn txn(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> BoxFuture<'_, Result<bool, KvError>> {
        let gate = self.hooks.before_txn();
        async move {
            gate.await?;
            let outcome = self.inner.txn_sync(compares, ops);
            self.hooks.after_txn(outcome)
        }
        .boxed()
    }

    fn get_many<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
    ) -> BoxFuture<'a, Result<Vec<Versioned>, KvError>> {
        self.hooks.on_read();
        self.inner.get_many(keys)
    }

    fn get_many_and_range<'a>(
        &'a self,
        keys: &'a [Vec<u8>],
        start: &'a [u8],
        end: &'a [u8],
        limit: usize,
    ) -> BoxFuture<'a, Result<(Vec<Versioned>, RangePage), KvError>> {
        self.hooks.on_read();
        self.inner.get_many_and_range(keys, start, end, limit)
    }

    fn cached(&self, key: &[u8]) -> Versioned {
        self.hooks.cached(key)
    }

    fn cached_absent(&self, key: &[u8], within: &[u8]) -> bool {
        self.hooks.cached_absent(key, within)
    }

    fn session(&self) -> Option<u64> {
        self.hooks.session()
    }
}
