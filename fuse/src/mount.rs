//! `twinfs mount`: connect to etcd and the nodes, open the volume, mount it through FUSE,
//! serve until unmounted or signalled, then flush and leave cleanly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use etcd_client::GetOptions;
use fuser::{Config, MountOption, Session, SessionACL};
use twinfs_cluster::client::{BlockClient, ClientOptions};
use twinfs_cluster::etcd::EtcdConfig;
use twinfs_cluster::membership::Membership;
use twinfs_cluster::pki::Identity;
use twinfs_core::schema::Keys;
use twinfs_core::{BlockIo, CachedBlocks, Fs, FsOptions, MetaKv};

use crate::adapter::{Shared, SpaceInfo, TwinFs};
use crate::block_io::ClusterBlocks;
use crate::claim_session::ClaimSession;
use crate::etcd_kv::EtcdKv;
pub use crate::mountpoint::MountState;
use crate::volume;

/// Everything `twinfs mount` needs.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub volume: String,
    pub mountpoint: PathBuf,
    pub etcd: EtcdConfig,
    /// Directory with ca.crt, tls.crt, tls.key (a client or node certificate of the cluster).
    pub tls_dir: PathBuf,
    /// How long the kernel may cache attributes and entries (other nodes' changes are pushed
    /// out sooner by the etcd watch; this is the bound if the watch is cut off).
    pub attr_ttl: Duration,
    /// Bytes of block data cached in memory.
    pub cache_bytes: usize,
    /// Unflushed bytes one open file may buffer before it flushes by itself.
    pub write_buffer_bytes: usize,
    /// fuser worker threads (each with its own /dev/fuse fd).
    pub fuse_threads: usize,
    /// How long to wait for at least one live node at start.
    pub wait_for_nodes: Duration,
    /// How long an operation retries while etcd is unreachable before it fails with EIO.
    pub etcd_timeout: Duration,
    /// On stop, unmount (a standalone mount) or only flush and cut the connection, leaving a
    /// dead mount for the next start to stack on (the agent: pods that bound the mount regain
    /// it only through a mount stacked on the one they hold).
    pub detach_on_stop: bool,
}

impl MountConfig {
    pub fn new(volume: &str, mountpoint: &Path, etcd: EtcdConfig, tls_dir: &Path) -> MountConfig {
        MountConfig {
            volume: volume.to_string(),
            mountpoint: mountpoint.to_path_buf(),
            etcd,
            tls_dir: tls_dir.to_path_buf(),
            attr_ttl: Duration::from_secs(1),
            cache_bytes: 256 << 20,
            write_buffer_bytes: 64 << 20,
            fuse_threads: 4,
            wait_for_nodes: Duration::from_secs(10),
            etcd_timeout: crate::etcd_kv::DEFAULT_TIMEOUT,
            detach_on_stop: true,
        }
    }
}

/// Kernel read-ahead of a mount, KiB. Sequential reads of 1 GiB through the other mount in one
/// run (2026-12-03, 2-core VM): 128 KiB (FUSE's default) 382 MB/s, 1 MiB 455, 4 MiB 466,
/// 16 MiB 476.
const READ_AHEAD_KIB: u32 = 4096;

/// Mounts and serves until the filesystem is unmounted (`umount`, `twinfs umount`) or the
/// process gets SIGTERM/SIGINT (then it flushes open files and unmounts). `ready` is called
/// once the mount is live.
pub fn run(
    cfg: MountConfig,
    ready: impl FnOnce(),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let mountpoint = crate::mountpoint::absolute(&cfg.mountpoint)?;
    match crate::mountpoint::state(&mountpoint) {
        MountState::Live => bail!("{} is already a twinfs mount", mountpoint.display()),
        MountState::Dead => tracing::warn!(
            path = %mountpoint.display(),
            "a dead twinfs mount (its process was killed) is in the way: mounting over it, so \
             that whoever bound it (pods, with HostToContainer propagation) sees the new one"
        ),
        MountState::NotMounted => {
            let meta = std::fs::metadata(&mountpoint)
                .with_context(|| format!("mount point {}", mountpoint.display()))?;
            if !meta.is_dir() {
                bail!("mount point {} is not a directory", mountpoint.display());
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("twinfs-mount")
        .enable_all()
        .build()
        .context("starting the async runtime")?;

    let opened = rt.block_on(open(&cfg, &mountpoint))?;
    let Opened {
        shared,
        etcd,
        kv,
        start_revision,
        registration,
    } = opened;

    let fuse_cfg = {
        let mut c = Config::default();
        c.mount_options = vec![
            MountOption::FSName(format!("twinfs:{}", cfg.volume)),
            MountOption::Subtype("twinfs".into()),
            MountOption::DefaultPermissions,
            MountOption::NoAtime,
            MountOption::Dev,
            MountOption::Suid,
        ];
        c.acl = SessionACL::All;
        c.n_threads = Some(cfg.fuse_threads.max(1));
        c.clone_fd = true;
        c
    };
    let filesystem = TwinFs::new(shared.clone(), rt.handle().clone());
    let session = match crate::mountpoint::mount_fuse(&mountpoint, &cfg.volume)
        .with_context(|| format!("mounting {} (is /dev/fuse usable?)", mountpoint.display()))?
    {
        // Mounted by us (root): the kernel's INIT is waiting on the descriptor.
        Some(dev) => Session::from_fd(filesystem, dev, SessionACL::All, fuse_cfg.clone()),
        // Not allowed to mount(2): fuser goes through the setuid fusermount3.
        None => Session::new(filesystem, &mountpoint, &fuse_cfg),
    }
    .with_context(|| format!("starting FUSE at {}", mountpoint.display()))?;
    shared.set_notifier(session.notifier());
    let _watch = {
        let _guard = rt.enter();
        crate::watch::start(
            etcd.clone(),
            Keys::new(&cfg.volume),
            start_revision,
            shared.clone(),
            kv.clone(),
        )
        .context("starting the volume watch")?
    };
    let bg = session.spawn().context("starting the FUSE session")?;
    let tidier = {
        let _guard = rt.enter();
        spawn_tidy(etcd.clone(), shared.fs.clone(), cfg.volume.clone())
    };
    // The stat waits for INIT (the kernel holds requests until then) and is answered by the
    // session just started; only then does a larger read-ahead stick.
    match std::fs::metadata(&mountpoint)
        .map_err(anyhow::Error::from)
        .and_then(|_| crate::mountpoint::set_read_ahead(&mountpoint, READ_AHEAD_KIB))
    {
        Ok(()) => tracing::debug!(kib = READ_AHEAD_KIB, "kernel read-ahead set"),
        // Read-only sysfs (an unprivileged container): slower sequential reads, nothing else.
        Err(e) => tracing::info!(error = %format!("{e:#}"), "kernel read-ahead left at 128 KiB"),
    }
    tracing::info!(volume = %cfg.volume, path = %mountpoint.display(), "mounted");
    let gauge = twinfs_cluster::metrics::metrics().mounts.clone();
    gauge.inc();
    ready();

    // Wait for the session to end (unmounted from outside) or for a signal.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let joiner = std::thread::Builder::new()
        .name("twinfs-session".into())
        .spawn(move || {
            if let Err(e) = bg.join() {
                tracing::warn!(error = %e, "FUSE session ended with an error");
            }
            let _ = done_tx.send(());
        })
        .context("starting the session thread")?;
    let signalled = rt.block_on(async {
        tokio::select! {
            _ = done_rx => false,
            _ = shutdown => true,
        }
    });
    let mut detached = true;
    if signalled {
        tracing::info!("stopping: flushing open files");
        let failed = rt.block_on(shared.flush_all());
        if failed > 0 {
            tracing::error!(failed, "some open files could not be flushed");
        }
        if !cfg.detach_on_stop {
            // Later requests fail (ENOTCONN) instead of being taken and lost at exit; the dead
            // mount stays for the next start to stack on.
            crate::mountpoint::abort_connection(&mountpoint);
            detached = false;
        } else if let Err(e) = unmount(&mountpoint, false) {
            tracing::warn!(error = %e, "unmount refused (files open?); detaching lazily");
            if let Err(e) = unmount(&mountpoint, true) {
                tracing::error!(error = %e, "lazy unmount failed");
            }
        }
        // The session ends once the kernel lets go of the connection (after a lazy detach,
        // at the last close), so give it only a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !joiner.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        let _ = joiner.join();
    }
    tidier.abort();
    rt.block_on(async {
        // This session's usage changes go into the base while it is still registered.
        match shared.fs.fold_own_usage().await {
            Ok(n) => tracing::debug!(bytes = n, "folded this mount's usage into the base"),
            Err(e) => tracing::warn!(error = %e,
                "folding this mount's usage failed; the next mount folds it"),
        }
        // Other mounts may make names in this mount's directories from now on.
        kv.end_claim_session().await;
        if let Err(e) = registration.leave().await {
            tracing::debug!(error = %e, "leaving the mount registry");
        }
    });
    gauge.dec();
    if detached {
        tracing::info!(volume = %cfg.volume, path = %mountpoint.display(), "unmounted");
    } else {
        tracing::info!(volume = %cfg.volume, path = %mountpoint.display(),
            "stopped; the mount point stays for the next start to mount over");
    }
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

struct Opened {
    shared: Arc<Shared>,
    etcd: etcd_client::Client,
    kv: Arc<EtcdKv>,
    start_revision: i64,
    registration: volume::MountRegistration,
}

async fn open(cfg: &MountConfig, mountpoint: &Path) -> Result<Opened> {
    let identity = Identity::load(&cfg.tls_dir)
        .with_context(|| format!("loading the certificate in {}", cfg.tls_dir.display()))?;
    let etcd = cfg.etcd.connect().await?;
    let record = volume::get(&etcd, &cfg.volume).await?;
    let membership = Membership::watch(etcd.clone()).await?;
    if !membership
        .wait_until(cfg.wait_for_nodes, |live| !live.is_empty())
        .await
    {
        bail!(
            "no twinfs node is alive in etcd at {:?} (waited {:?}); start one with `twinfs node`",
            cfg.etcd.endpoints,
            cfg.wait_for_nodes
        );
    }
    let client = BlockClient::new(
        &identity,
        membership.clone(),
        ClientOptions {
            replicas: usize::from(record.replicas),
            ..Default::default()
        },
    )?;
    let blocks: Arc<dyn BlockIo> = Arc::new(CachedBlocks::new(
        Arc::new(ClusterBlocks::new(client.clone())),
        cfg.cache_bytes,
    ));
    let keys = Keys::new(&cfg.volume);
    let kv = Arc::new(
        EtcdKv::new(etcd.clone())
            .with_timeout(cfg.etcd_timeout)
            .with_cache_prefix(keys.prefix())
            .with_claim_session(ClaimSession::start(etcd.clone())),
    );
    // The revision our view starts at: the watch reports every change after it.
    let mut c = etcd.clone();
    let start_revision = tokio::time::timeout(
        Duration::from_secs(5),
        c.get(keys.prefix(), Some(GetOptions::new().with_count_only())),
    )
    .await
    .context("etcd did not answer")??
    .header()
    .map(|h| h.revision())
    .unwrap_or(0);
    let sleep: twinfs_core::Sleeper =
        Arc::new(|d| Box::pin(tokio::time::sleep(d)) as futures::future::BoxFuture<'static, ()>);
    let runtime = tokio::runtime::Handle::current();
    let fs = Fs::open_volume(
        kv.clone() as Arc<dyn MetaKv>,
        blocks,
        &cfg.volume,
        FsOptions {
            chunk_size: record.chunk_size,
            max_dirty_bytes: cfg.write_buffer_bytes,
            cached_lookups: true,
            sleep: Some(sleep),
            // Through the handle: the core may spawn from a fuser thread (a prefetch at open),
            // which has no runtime context of its own.
            spawn: Some(Arc::new(move |f| {
                runtime.spawn(f);
            })),
            ..Default::default()
        },
    )
    .await
    .with_context(|| format!("opening volume {}", cfg.volume))?;
    let fs = Arc::new(fs);
    // Registered (with the instance that will own its usage keys and orphans) before it
    // writes anything, so that no other mount takes those for a crashed mount's.
    let resync_fs = fs.clone();
    let registration = volume::register_mount_as(
        &etcd,
        &cfg.volume,
        mountpoint,
        Some(fs.instance_id()),
        // While the record was gone, another mount may have folded this one's usage keys.
        Some(Arc::new(move || resync_fs.usage_resync())),
    )
    .await?;
    let usage = fs
        .load_usage()
        .await
        .with_context(|| format!("reading the usage of volume {}", cfg.volume))?;
    for key in &usage.corrupt {
        tracing::warn!(key = %key, "usage value does not decode; counted as 0");
    }
    fs.set_quota(record.quota_bytes);
    // `twinfs volume set-quota` and `set-replicas` reach this mount through its watch of the
    // volume record.
    let follow_fs = Arc::downgrade(&fs);
    let follow_client = client.clone();
    let follow_volume = cfg.volume.clone();
    tokio::spawn(volume::follow_record(
        etcd.clone(),
        cfg.volume.clone(),
        move |rec| {
            let Some(fs) = follow_fs.upgrade() else {
                return false; // the mount is gone
            };
            if fs.quota() != rec.quota_bytes {
                tracing::info!(volume = %follow_volume, quota = ?rec.quota_bytes, "volume quota changed");
                fs.set_quota(rec.quota_bytes);
            }
            let replicas = usize::from(rec.replicas);
            if follow_client.replicas() != replicas {
                tracing::info!(volume = %follow_volume, replicas, "volume replica count changed");
                follow_client.set_replicas(replicas);
            }
            true
        },
    ));
    tidy(&etcd, &fs, &cfg.volume).await;
    let space_membership = membership.clone();
    let space_fs = fs.clone();
    let space_client = client.clone();
    let space = Arc::new(move || {
        let replicas = space_client.replicas().max(1) as u64;
        let live = space_membership.live();
        let total: u64 = live.iter().map(|n| n.capacity).sum::<u64>() / replicas;
        let free: u64 = live.iter().map(|n| n.free).sum::<u64>() / replicas;
        match space_fs.quota() {
            // The quota is the filesystem's size; what is left of it, or the nodes' free
            // space if that is less.
            Some(q) => SpaceInfo {
                total_bytes: q,
                free_bytes: free.min(space_fs.quota_left().unwrap_or(q)),
            },
            None => SpaceInfo {
                total_bytes: total,
                free_bytes: free.min(total),
            },
        }
    });
    let shared = Shared::new(fs, cfg.attr_ttl, space);
    Ok(Opened {
        shared,
        etcd,
        kv,
        start_revision,
        registration,
    })
}

/// Housekeeping of what crashed mounts left behind: their usage delta keys are folded into the
/// base and the unlinked files they kept open are purged. A mount counts as crashed when no
/// mount record names its filesystem instance (records go with their lease, 10 s after a
/// crash); when some record cannot tell (unreadable, or from an older version), nothing is
/// touched.
async fn tidy(etcd: &etcd_client::Client, fs: &Fs, volume: &str) {
    let live = match volume::live_instances(etcd, volume).await {
        Ok(Some(live)) => live,
        Ok(None) => {
            tracing::debug!("a mount record does not name its instance; leaving others' keys");
            // Still: orphans nobody owns, and this instance's own.
            if let Err(e) = fs.purge_orphans(&[]).await {
                tracing::warn!(error = %e, "purging orphans failed");
            }
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading the mount records failed");
            return;
        }
    };
    match fs.fold_dead_usage(&live).await {
        Ok(v) if v.is_empty() => {}
        Ok(v) => tracing::info!(mounts = v.len(), "folded usage of crashed mounts"),
        Err(e) => tracing::warn!(error = %e, "folding usage of crashed mounts failed"),
    }
    let dead: Vec<u64> = match fs.list_orphans().await {
        Ok(o) => o
            .into_iter()
            .map(|(_, owner)| owner)
            .filter(|o| *o != 0 && *o != fs.instance_id() && !live.contains(o))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "listing orphans failed");
            return;
        }
    };
    match fs.purge_orphans(&dead).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(purged = n, "purged orphaned inodes"),
        Err(e) => tracing::warn!(error = %e, "purging orphans failed"),
    }
}

/// Runs [`tidy`] again 15 s after the start (a mount that crashed just before still had its
/// record then) and every 5 minutes after that.
fn spawn_tidy(
    etcd: etcd_client::Client,
    fs: Arc<Fs>,
    volume: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut wait = volume::MOUNT_LEASE_TTL + Duration::from_secs(5);
        loop {
            tokio::time::sleep(wait).await;
            tidy(&etcd, &fs, &volume).await;
            wait = Duration::from_secs(300);
        }
    })
}

/// Completes on SIGTERM or SIGINT (the standalone mount's way to stop).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => futures::future::pending::<()>().await,
    }
}

/// Unmounts `path` (lazily: detached now, released when the last user lets go).
pub fn unmount(path: &Path, lazy: bool) -> Result<()> {
    use nix::mount::{umount2, MntFlags};
    let flags = if lazy {
        MntFlags::MNT_DETACH
    } else {
        MntFlags::empty()
    };
    match umount2(path, flags) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EPERM) => {
            // Not root: the setuid helper may unmount FUSE mounts of this user.
            let mut cmd = std::process::Command::new("fusermount3");
            cmd.arg("-u");
            if lazy {
                cmd.arg("-z");
            }
            let status = cmd.arg(path).status().context("running fusermount3 -u")?;
            if !status.success() {
                bail!("fusermount3 -u {} failed", path.display());
            }
            Ok(())
        }
        Err(nix::errno::Errno::EBUSY) => {
            bail!("{} is busy: files are open on it", path.display())
        }
        Err(nix::errno::Errno::EINVAL) => bail!("{} is not a mount point", path.display()),
        Err(e) => bail!("unmounting {}: {e}", path.display()),
    }
}

/// Whether a twinfs mount (live or dead) is at `path`.
pub fn is_twinfs_mount(path: &Path) -> bool {
    mount_state(path) != MountState::NotMounted
}

/// Lazily detaches every twinfs mount stacked at `path` (cleanup after tests and crashes).
pub fn detach_all(path: &Path) {
    for _ in 0..64 {
        if !is_twinfs_mount(path) || unmount(path, true).is_err() {
            return;
        }
    }
}

/// Whether `path` holds a live twinfs mount, a dead one, or none.
pub fn mount_state(path: &Path) -> MountState {
    crate::mountpoint::state(path)
}
