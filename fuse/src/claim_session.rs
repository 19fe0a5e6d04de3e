//! The etcd lease a mount's directory claims live under (see `twinfs_core::claims`).
//!
//! A claim lets its holder answer "no such name" without etcd, so the holder must never use
//! one that may be gone. The session counts as alive only until the last acknowledged
//! keep-alive, counted from when it was *sent*, plus the TTL etcd granted, less a margin:
//! etcd cannot expire the lease before then. A lapse ends the session for good (its claims are
//! dropped by the core when the session number changes); the next lease starts a new one. A
//! dead mount's claims go with its lease, so another mount that wants to create in such a
//! directory waits at most about the TTL.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// TTL of the claim lease: how long a create in a directory made by a crashed mount waits.
pub const CLAIM_TTL: Duration = Duration::from_secs(5);
/// A lease is trusted until its TTL less this after the keep-alive that renewed it was sent.
const MARGIN: Duration = Duration::from_secs(1);
/// Bound on one lease request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One mount's claim lease, renewed in the background.
pub struct ClaimSession {
    /// The lease (0: none yet).
    lease: AtomicI64,
    /// Bumped with every new lease: claims made under an older number may be gone.
    number: AtomicU64,
    valid_until: Mutex<Option<Instant>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    etcd: etcd_client::Client,
}

impl std::fmt::Debug for ClaimSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimSession")
            .field("lease", &self.lease.load(Ordering::Relaxed))
            .field("number", &self.number.load(Ordering::Relaxed))
            .finish()
    }
}

impl ClaimSession {
    /// Starts taking and renewing a lease (inside a tokio runtime).
    pub fn start(etcd: etcd_client::Client) -> Arc<ClaimSession> {
        let session = Arc::new(ClaimSession {
            lease: AtomicI64::new(0),
            number: AtomicU64::new(0),
            valid_until: Mutex::new(None),
            task: Mutex::new(None),
            etcd,
        });
        let task = tokio::spawn(renew(Arc::downgrade(&session)));
        *session.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        session
    }

    /// The session number and lease while the lease certainly lives.
    pub fn current(&self) -> Option<(u64, i64)> {
        let until = (*self.valid_until.lock().unwrap_or_else(|e| e.into_inner()))?;
        if Instant::now() >= until {
            return None;
        }
        let lease = self.lease.load(Ordering::Acquire);
        (lease != 0).then(|| (self.number.load(Ordering::Acquire), lease))
    }

    /// etcd no longer knows the lease: nothing is owned under it any more.
    pub fn lapsed(&self) {
        *self.valid_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Ends the session: its claims go at once (the lease is revoked).
    pub async fn end(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        self.lapsed();
        let lease = self.lease.swap(0, Ordering::AcqRel);
        if lease != 0 {
            let mut c = self.etcd.clone();
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, c.lease_revoke(lease)).await;
        }
    }
}

impl Drop for ClaimSession {
    fn drop(&mut self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}

/// Takes a lease, keeps it alive, and takes a new one (a new session) when it expired.
async fn renew(session: std::sync::Weak<ClaimSession>) {
    let ttl = i64::try_from(CLAIM_TTL.as_secs()).unwrap_or(5);
    loop {
        let Some(s) = session.upgrade() else { return };
        let mut c = s.etcd.clone();
        let granted = match tokio::time::timeout(REQUEST_TIMEOUT, c.lease_grant(ttl, None)).await {
            Ok(Ok(g)) => Some((g.id(), Instant::now())),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "taking the claim lease failed; retrying");
                None
            }
            Err(_) => None,
        };
        let Some((lease, _)) = granted else {
            drop(s);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        s.number.fetch_add(1, Ordering::AcqRel);
        s.lease.store(lease, Ordering::Release);
        drop(s);
        keep_alive(&session, lease, ttl).await;
        if let Some(s) = session.upgrade() {
            s.lapsed();
        }
    }
}

/// Renews `lease` until etcd says it expired (or the session is gone). Transient failures
/// are retried on the same lease: it may well still live, and the validity window simply
/// runs out meanwhile.
async fn keep_alive(session: &std::sync::Weak<ClaimSession>, lease: i64, ttl: i64) {
    let every = CLAIM_TTL / 4;
    loop {
        let Some(s) = session.upgrade() else { return };
        let mut c = s.etcd.clone();
        drop(s);
        let opened = tokio::time::timeout(REQUEST_TIMEOUT, c.lease_keep_alive(lease)).await;
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(pair)) => pair,
            _ => {
                tokio::time::sleep(every).await;
                continue;
            }
        };
        loop {
            let sent = Instant::now();
            if !matches!(
                tokio::time::timeout(REQUEST_TIMEOUT, keeper.keep_alive()).await,
                Ok(Ok(()))
            ) {
                break;
            }
            match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {
                    let Some(s) = session.upgrade() else { return };
                    let granted = Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0));
                    let until = sent + granted.min(Duration::from_secs(ttl.unsigned_abs()));
                    *s.valid_until.lock().unwrap_or_else(|e| e.into_inner()) =
                        until.checked_sub(MARGIN);
                }
                // TTL 0: etcd no longer has the lease.
                Ok(Ok(Some(_))) => return,
                _ => break,
            }
            tokio::time::sleep(every).await;
        }
        tokio::time::sleep(every).await;
    }
}
