//! Operator commands that talk to a running cluster.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use twinfs_cluster::client::{BlockClient, ClientOptions};
use twinfs_cluster::membership::{self, Membership, NodeState};
use twinfs_cluster::pki::Identity;
use twinfs_cluster::wire::{ByteRange, MAX_BLOCK_SIZE};
use twinfs_cluster::BlockHash;

use crate::{resolve_conn, ConnArgs};

pub async fn connect(
    conn: &ConnArgs,
    replicas: usize,
) -> Result<(Arc<BlockClient>, twinfs_cluster::etcd::Client)> {
    let (etcd_cfg, tls_dir) = resolve_conn(conn)?;
    let identity = Identity::load(&tls_dir)?;
    let etcd = etcd_cfg.connect().await?;
    let membership = Membership::watch(etcd.clone()).await?;
    let client = BlockClient::new(
        &identity,
        membership,
        ClientOptions {
            replicas,
            ..Default::default()
        },
    )?;
    Ok((client, etcd))
}

fn parse_hash(s: &str) -> Result<BlockHash> {
    s.parse()
        .with_context(|| format!("{s:?} is not a block hash (64 hex digits)"))
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub async fn status(conn: &ConnArgs, json: bool) -> Result<()> {
    let (client, mut etcd) = connect(conn, 2).await?;
    let nodes = membership::all_nodes(&mut etcd).await?;
    let mut rows = Vec::new();
    for (record, alive) in nodes {
        // Live nodes are asked for fresh figures; others show their last record.
        let (blocks, used, free, corrupt) = if alive {
            match client.info(&record).await {
                Ok(i) => (i.blocks, i.bytes_used, i.free, Some(i.corrupt_detected)),
                Err(_) => (record.blocks, record.bytes_used, record.free, None),
            }
        } else {
            (record.blocks, record.bytes_used, record.free, None)
        };
        let state = match (alive, record.state) {
            (true, _) => "alive",
            (false, NodeState::Stopped) => "stopped",
            (false, NodeState::Up) => "dead",
        };
        rows.push((record, state, blocks, used, free, corrupt));
    }
    // Redundancy per volume, from the repair scans of the live nodes (each counts the blocks
    // it owns, so the sums cover every block once).
    let live_ids: Vec<String> = rows
        .iter()
        .filter(|r| r.1 == "alive")
        .map(|r| r.0.id.clone())
        .collect();
    let health = crate::maintenance::read_health(&etcd)
        .await
        .unwrap_or_default();
    let mut volumes: std::collections::BTreeMap<String, crate::maintenance::VolumeHealth> =
        Default::default();
    let (mut repaired_blocks, mut repaired_bytes, mut last_scan) = (0u64, 0u64, 0u64);
    for h in health.iter().filter(|h| live_ids.contains(&h.node)) {
        repaired_blocks += h.repaired_blocks;
        repaired_bytes += h.repaired_bytes;
        last_scan = last_scan.max(h.updated_unix);
        for (name, v) in &h.volumes {
            let t = volumes.entry(name.clone()).or_default();
            t.blocks += v.blocks;
            t.under_replicated += v.under_replicated;
            t.one_copy += v.one_copy;
            t.waiting += v.waiting;
            t.lost += v.lost;
        }
    }
    if json {
        let v: Vec<_> = rows
            .iter()
            .map(|(r, state, blocks, used, free, corrupt)| {
                serde_json::json!({
                    "id": r.id, "addr": r.addr.to_string(), "zone": r.zone, "state": state,
                    "blocks": blocks, "bytes_used": used, "free": free, "capacity": r.capacity,
                    "version": r.version, "corrupt_detected": corrupt,
                })
            })
            .collect();
        let out = serde_json::json!({
            "nodes": v,
            "volumes": volumes,
            "repair": {
                "repaired_blocks": repaired_blocks,
                "repaired_bytes": repaired_bytes,
                "last_scan_unix": last_scan,
            },
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{:<18} {:<22} {:<10} {:<8} {:>8} {:>11} {:>11}",
        "NODE", "ADDRESS", "ZONE", "STATE", "BLOCKS", "USED", "FREE"
    );
    for (r, state, blocks, used, free, _) in &rows {
        println!(
            "{:<18} {:<22} {:<10} {:<8} {:>8} {:>11} {:>11}",
            r.id,
            r.addr.to_string(),
            r.zone.as_deref().unwrap_or("-"),
            state,
            blocks,
            human_bytes(*used),
            human_bytes(*free)
        );
    }
    let alive = rows.iter().filter(|r| r.1 == "alive").count();
    println!("{alive} of {} nodes alive", rows.len());
    if !volumes.is_empty() {
        println!();
        println!(
            "{:<20} {:>9} {:>17} {:>9} {:>9} {:>6}",
            "VOLUME", "BLOCKS", "UNDER-REPLICATED", "ONE-COPY", "WAITING", "LOST"
        );
        for (name, v) in &volumes {
            println!(
                "{:<20} {:>9} {:>17} {:>9} {:>9} {:>6}",
                name, v.blocks, v.under_replicated, v.one_copy, v.waiting, v.lost
            );
        }
        println!(
            "repair: {repaired_blocks} copies re-created ({}) by the live nodes; last scan {}s ago",
            human_bytes(repaired_bytes),
            membership::unix_now().saturating_sub(last_scan)
        );
    }
    Ok(())
}

pub async fn block_put(conn: &ConnArgs, file: &Path, replicas: usize) -> Result<()> {
    if replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let meta = std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
    if meta.len() > MAX_BLOCK_SIZE as u64 {
        bail!(
            "{} is {} bytes; a block holds at most {MAX_BLOCK_SIZE} bytes",
            file.display(),
            meta.len()
        );
    }
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let (client, _) = connect(conn, replicas).await?;
    let outcome = client.put(data.into()).await?;
    if outcome.under_replicated() {
        eprintln!(
            "twinfs: warning: only {} of {} copies stored (too few live nodes); repair will add the rest",
            outcome.holders.len(),
            outcome.wanted
        );
    }
    println!("{}", outcome.hash);
    Ok(())
}

pub async fn block_get(
    conn: &ConnArgs,
    hash: &str,
    output: Option<&Path>,
    offset: Option<u64>,
    len: Option<u64>,
) -> Result<()> {
    let hash = parse_hash(hash)?;
    let range = match (offset, len) {
        (None, None) => None,
        (o, l) => Some(ByteRange {
            offset: o.unwrap_or(0),
            len: l,
        }),
    };
    let (client, _) = connect(conn, 2).await?;
    let data = client.get(hash, range).await?;
    match output {
        Some(path) => {
            let tmp = path.with_extension("twinfs-partial");
            std::fs::write(&tmp, &data).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        }
        None => std::io::stdout().lock().write_all(&data)?,
    }
    Ok(())
}

pub async fn block_locate(conn: &ConnArgs, hash: &str) -> Result<()> {
    let hash = parse_hash(hash)?;
    let (client, _) = connect(conn, 2).await?;
    let holders = client.locate(hash).await?;
    if holders.is_empty() {
        bail!("no live node holds block {hash}");
    }
    for n in holders {
        println!("{}", n.id);
    }
    Ok(())
}
