//! `twinfs node` as deployed: the block node, the volumes the agent keeps mounted on its host,
//! and the HTTP endpoint with /metrics, /healthz and /readyz.
//!
//! Mounts run in this process, each on its own thread with its own runtime (the FUSE session
//! blocks). A mount that fails or ends is mounted again with backoff. On SIGTERM the mounts flush
//! their open files and cut their connections *without* unmounting, then the node announces a
//! planned stop in etcd: the next agent mounts over the dead mount, which is what pods that bound
//! it (hostPath with HostToContainer propagation) need to see the new one (see
//! `twinfs_fuse::mountpoint`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::watch;
use twinfs_cluster::etcd::EtcdConfig;
use twinfs_cluster::metrics::{self, Health, MountHealth};
use twinfs_cluster::node::{self, MountSpec, NodeConfig};
use twinfs_fuse::mount::{self, MountConfig};

/// How long stopping mounts may take to flush before the agent goes on without them.
const MOUNT_STOP_GRACE: Duration = Duration::from_secs(45);

pub async fn run(cfg: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    cfg.validate()?;
    let health = Arc::new(Health::default());
    if let Some(addr) = cfg.metrics_addr {
        let local = metrics::serve(addr, health.clone()).await?;
        tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut keepers = Vec::new();
    for spec in &cfg.mounts {
        health.set_mount(
            &spec.volume,
            &spec.dir.display().to_string(),
            MountHealth::Starting,
        );
        let (spec, etcd, tls) = (spec.clone(), cfg.etcd.clone(), cfg.tls_dir.clone());
        let (health, stop) = (health.clone(), stop_rx.clone());
        keepers.push(
            std::thread::Builder::new()
                .name(format!("mount-{}", spec.volume))
                .spawn(move || keep_mounted(spec, etcd, tls, health, stop))
                .context("starting a mount thread")?,
        );
    }
    // Repair and garbage collection, once the node is registered (it needs the node's id).
    let upkeep = {
        let (cfg, health) = (cfg.clone(), health.clone());
        tokio::spawn(async move {
            while !health.node_registered.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if let Err(e) = start_upkeep(&cfg).await {
                tracing::error!(error = %format!("{e:#}"), "repair and garbage collection not running");
            }
        })
    };
    let stop_health = health.clone();
    let stop_mounts = move || {
        stop_health.stopping.store(true, Ordering::Relaxed);
        let _ = stop_tx.send(true);
    };
    let wait_for_mounts = || async {
        let deadline = Instant::now() + MOUNT_STOP_GRACE;
        while keepers.iter().any(|k| !k.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if keepers.iter().any(|k| !k.is_finished()) {
            tracing::error!("some mounts did not stop within {MOUNT_STOP_GRACE:?}");
        }
    };
    // Mounts stop (flushing into the nodes) before this node leaves the cluster.
    let result = node::run(
        cfg,
        async {
            shutdown.await;
            tracing::info!("stopping: flushing the mounts, then leaving the cluster");
            stop_mounts();
            wait_for_mounts().await;
        },
        health.clone(),
    )
    .await;
    upkeep.abort();
    // The node failed without a signal: the mounts must not outlive it unnoticed.
    health.stopping.store(true, Ordering::Relaxed);
    result
}

async fn start_upkeep(cfg: &NodeConfig) -> Result<()> {
    let me = node::load_or_create_node_id(&cfg.data_dir)?;
    let identity = twinfs_cluster::pki::Identity::load(&cfg.tls_dir)?;
    let etcd = cfg.etcd.connect().await?;
    let members = twinfs_cluster::membership::Membership::watch(etcd.clone()).await?;
    let client = twinfs_cluster::client::BlockClient::new(
        &identity,
        members,
        twinfs_cluster::client::ClientOptions::default(),
    )?;
    crate::maintenance::run(me, etcd, client, cfg.maintenance.clone()).await;
    Ok(())
}

/// Keeps `spec` mounted until `stop`: mounts, and mounts again (with backoff) when mounting
/// fails or the session ends.
fn keep_mounted(
    spec: MountSpec,
    etcd: EtcdConfig,
    tls_dir: PathBuf,
    health: Arc<Health>,
    stop: watch::Receiver<bool>,
) {
    let path = spec.dir.display().to_string();
    let mut backoff = Duration::from_secs(1);
    loop {
        if *stop.borrow() {
            return;
        }
        // Fails harmlessly when a dead mount is in the way; `mount::run` deals with that.
        let _ = std::fs::create_dir_all(&spec.dir);
        let mut cfg = MountConfig::new(&spec.volume, &spec.dir, etcd.clone(), &tls_dir);
        cfg.detach_on_stop = false;
        let started = Instant::now();
        let ready_health = health.clone();
        let (volume, ready_path) = (spec.volume.clone(), path.clone());
        let mut stop_rx = stop.clone();
        let result = mount::run(
            cfg,
            move || ready_health.set_mount(&volume, &ready_path, MountHealth::Mounted),
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        );
        if *stop.borrow() {
            return;
        }
        health.set_mount(&spec.volume, &path, MountHealth::Failed);
        match result {
            Ok(()) => tracing::warn!(volume = %spec.volume, path = %path,
                "the mount ended (unmounted from outside?); mounting it again"),
            Err(e) => {
                tracing::error!(volume = %spec.volume, path = %path, error = %format!("{e:#}"),
                "mounting failed; trying again in {backoff:?}")
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until && !*stop.borrow() {
            std::thread::sleep(Duration::from_millis(100));
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}
