//! `twinfs fsck VOLUME` and `twinfs gc`: the operator's view of redundancy and garbage.

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use twinfs_cluster::BlockHash;
use twinfs_core::schema::Keys;
use twinfs_fuse::etcd_kv::EtcdKv;

use crate::admin::{connect, human_bytes};
use crate::maintenance::{self, Census};
use crate::ConnArgs;

#[derive(Serialize)]
struct FileDamage {
    path: String,
    ino: u64,
    /// Blocks of the file with no good copy on a live node.
    lost_blocks: u64,
    /// Blocks with fewer good copies than the volume asks for.
    endangered_blocks: u64,
}

#[derive(Serialize)]
struct FsckReport {
    volume: String,
    replicas: usize,
    blocks: u64,
    bytes: u64,
    /// Blocks with the full number of good copies on live nodes.
    healthy: u64,
    /// Of the healthy, blocks with more copies than wanted (a returning node's, or after the
    /// replica count was lowered): the repair scans remove the extra ones.
    surplus: u64,
    endangered: u64,
    lost: u64,
    /// Blocks of new files whose writer's put is still in flight (pending records), with fewer
    /// than the wanted copies: not damage.
    in_flight: u64,
    /// New files whose content committed while their blocks were being stored, not yet
    /// settled (by the writer, a reader or the repair scans).
    pending_records: usize,
    /// Copies verified (re-read and re-hashed by their node) or only seen present (--quick).
    verified: bool,
    live_nodes: usize,
    /// Nodes registered as live that did not answer (their copies are not counted).
    unreachable: Vec<String>,
    /// Chunk records that do not decode: "key: reason" (their data cannot be found).
    corrupt_records: Vec<String>,
    files: Vec<FileDamage>,
}

/// Checks that every block `volume` references has R good copies on live nodes, and names the
/// files whose data is lost or endangered. Exits non-zero when any is.
pub async fn fsck(conn: &ConnArgs, volume: &str, quick: bool, json: bool) -> Result<bool> {
    let (client, etcd) = connect(conn, 2).await?;
    let record = twinfs_fuse::volume::get(&etcd, volume).await?;
    let replicas = usize::from(record.replicas.max(1));
    let census: Census = maintenance::census(&etcd, Some(volume)).await?;
    let live = client.membership().live();
    let hashes: Vec<BlockHash> = census.blocks.keys().copied().collect();
    let bytes: u64 = census.blocks.values().map(|b| u64::from(b.size)).sum();
    let bar = if std::io::stderr().is_terminal() && !json {
        let b = indicatif::ProgressBar::new((hashes.len() * live.len()) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} copies checked ({eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(if quick { "locating" } else { "verifying" });
        Some(b)
    } else {
        None
    };
    let copies = maintenance::copies_on(&client, &live, &hashes, !quick, |n| {
        if let Some(b) = &bar {
            b.inc(n);
        }
    })
    .await;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    // A node that does not answer serves nothing: its copies do not count.
    let unreachable: Vec<String> = live
        .iter()
        .filter(|n| !copies.contains_key(&n.id))
        .map(|n| n.id.clone())
        .collect();
    let good = |h: &BlockHash| copies.values().filter(|s| s.contains(h)).count();
    let (mut healthy, mut surplus, mut endangered, mut lost) = (0u64, 0u64, 0u64, 0u64);
    let mut in_flight = 0u64;
    let mut damaged_blocks: HashSet<BlockHash> = HashSet::new();
    for h in &hashes {
        match good(h) {
            // A new file's block whose put is in flight (a pending record names it).
            n if n < replicas && census.in_flight.contains(h) => in_flight += 1,
            0 => {
                lost += 1;
                damaged_blocks.insert(*h);
            }
            n if n < replicas => {
                endangered += 1;
                damaged_blocks.insert(*h);
            }
            n => {
                healthy += 1;
                if n > replicas {
                    surplus += 1;
                }
            }
        }
    }
    let mut files = Vec::new();
    if !damaged_blocks.is_empty() {
        // Which files own the damaged blocks, and their names.
        let kv = EtcdKv::new(etcd.clone());
        let keys = Keys::new(volume);
        let mut per_ino: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        twinfs_core::scan::chunk_refs(
            &kv,
            &keys,
            |r| {
                if damaged_blocks.contains(&r.hash) {
                    let e = per_ino.entry(r.ino).or_default();
                    if good(&r.hash) == 0 {
                        e.0 += 1;
                    } else {
                        e.1 += 1;
                    }
                }
            },
            |_, _| {},
        )
        .await?;
        let inos: HashSet<u64> = per_ino.keys().copied().collect();
        let names = twinfs_core::scan::paths_of(&kv, &keys, &inos).await?;
        for (ino, (l, e)) in per_ino {
            files.push(FileDamage {
                path: names
                    .get(&ino)
                    .cloned()
                    .unwrap_or_else(|| format!("(unlinked inode {ino})")),
                ino,
                lost_blocks: l,
                endangered_blocks: e,
            });
        }
    }
    let report = FsckReport {
        volume: volume.to_string(),
        replicas,
        blocks: hashes.len() as u64,
        bytes,
        healthy,
        surplus,
        endangered,
        lost,
        in_flight,
        pending_records: census.pending.len(),
        verified: !quick,
        live_nodes: live.len(),
        unreachable,
        corrupt_records: census
            .bad_records
            .iter()
            .map(|(_, k, why)| format!("{k}: {why}"))
            .collect(),
        files,
    };
    let clean = report.lost == 0 && report.endangered == 0 && report.corrupt_records.is_empty();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(clean);
    }
    println!(
        "volume {}: {} blocks ({}), {} wanted copies each, {} live nodes, copies {}",
        report.volume,
        report.blocks,
        human_bytes(report.bytes),
        replicas,
        report.live_nodes,
        if quick {
            "located (--quick)"
        } else {
            "verified"
        }
    );
    if !report.unreachable.is_empty() {
        println!(
            "  not answering (copies not counted): {}",
            report.unreachable.join(", ")
        );
    }
    println!(
        "  {} healthy, {} endangered (fewer than {replicas} good copies), {} lost (no good copy)",
        report.healthy, report.endangered, report.lost
    );
    if report.in_flight > 0 {
        println!(
            "  {} being written (a new file's block whose put is still in flight)",
            report.in_flight
        );
    }
    if report.surplus > 0 {
        println!(
            "  {} with more than {replicas} copies (the repair scans remove the extra ones)",
            report.surplus
        );
    }
    for r in &report.corrupt_records {
        println!("  CORRUPT RECORD {r}");
    }
    for f in &report.files {
        let what = if f.lost_blocks > 0 {
            "LOST"
        } else {
            "endangered"
        };
        println!(
            "  {what:<10} {} ({} blocks lost, {} endangered)",
            f.path, f.lost_blocks, f.endangered_blocks
        );
    }
    if clean {
        println!("fsck: clean");
    }
    Ok(clean)
}

/// Lists (and with `apply` removes) copies no volume references, older than `grace`.
pub async fn gc(conn: &ConnArgs, apply: bool, grace: Duration, json: bool) -> Result<()> {
    let (client, etcd) = connect(conn, 2).await?;
    let census = maintenance::census(&etcd, None).await?;
    let live = client.membership().live();
    if grace < Duration::from_secs(600) {
        eprintln!("warning: a grace under 10 minutes may remove blocks of writes still in flight");
    }
    let report =
        maintenance::collect_garbage(&client, &live, &census, grace.as_secs(), apply).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} blocks referenced by {} volumes; {} live nodes",
        census.blocks.len(),
        census.volumes.len(),
        live.len()
    );
    for (node, (n, b)) in &report.candidates {
        println!(
            "  {node}: {n} unreferenced blocks ({}) older than the grace",
            human_bytes(*b)
        );
    }
    println!(
        "{} unreferenced blocks are younger than the grace of {}s and stay",
        report.young,
        grace.as_secs()
    );
    if apply {
        println!(
            "removed {} blocks ({})",
            report.removed_blocks,
            human_bytes(report.removed_bytes)
        );
    } else {
        println!("nothing removed: run with --apply to remove them");
    }
    Ok(())
}

/// Parses "90", "90s", "15m", "2h", "1d".
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 15m, 2h)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("").is_err());
    }
}
