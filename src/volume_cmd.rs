//! `twinfs volume …`: create, list, inspect, change and delete volumes (the registry in etcd, see
//! `twinfs_fuse::volume`).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use twinfs_cluster::etcd::EtcdConfig;
use twinfs_fuse::volume::{self, VolumeInfo, VolumeRecord, DEFAULT_REPLICAS};

use crate::admin::human_bytes;
use crate::clusterfile::ClusterFile;
use crate::ConnArgs;

#[derive(Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (its namespace is formatted at once).
    Create {
        /// Volume name: 1-64 of A-Z a-z 0-9 _ . - (not starting with '.' or '-').
        name: String,
        /// Copies of every block, 1 to 5.
        #[arg(long, default_value_t = DEFAULT_REPLICAS)]
        replicas: u8,
        /// Most bytes the volume may hold: a number of bytes or with a binary suffix
        /// (K, M, G, T, P: 10G = 10 GiB).
        #[arg(long, value_name = "BYTES", value_parser = parse_size)]
        quota: Option<u64>,
    },
    /// List the volumes.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a volume's settings, usage and live mounts.
    Inspect {
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Change a volume's quota (or remove it with "none"). Live mounts enforce the new quota
    /// within moments; a quota below the current usage is allowed and refuses growth until
    /// files are deleted.
    SetQuota {
        /// Volume name.
        name: String,
        /// New quota: bytes or with a binary suffix (K, M, G, T, P: 10G = 10 GiB), or "none".
        #[arg(value_name = "BYTES|none", value_parser = parse_quota)]
        quota: QuotaArg,
    },
    /// Change how many copies a volume keeps of each block. Live mounts write that many from
    /// within moments; the nodes' repair scans add or remove copies of the blocks already
    /// stored (`twinfs fsck NAME --quick` shows the progress).
    SetReplicas {
        /// Volume name.
        name: String,
        /// Copies of every block, 1 to 5.
        #[arg(value_parser = clap::value_parser!(u8).range(1..=5))]
        replicas: u8,
    },
    /// Delete a volume and all its metadata (refused while it is mounted anywhere). Its data
    /// blocks are left to the cluster's garbage collection.
    Delete { name: String },
}

/// A quota on the command line: a size, or "none" for no quota.
#[derive(Clone, Debug)]
pub struct QuotaArg(Option<u64>);

fn parse_quota(s: &str) -> Result<QuotaArg, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(QuotaArg(None));
    }
    parse_size(s).map(|b| QuotaArg(Some(b)))
}

/// Parses a size: bytes, or a number with a binary suffix K/M/G/T/P (optionally followed by
/// "i", "iB" or "B", any case): "500M" = 500 MiB, "10G" = 10 GiB, "1T" = 1 TiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "{s:?} is not a size: expected a whole number of bytes, optionally with a suffix K, M, G, T or P (e.g. 10G)"
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is too large a size"))?;
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "{s:?} is not a size: use a whole number (e.g. 1536M rather than 1.5G)"
        ));
    }
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B'))
        .or_else(|| unit.strip_suffix('I'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => {
            let hint = "use K, M, G, T or P (powers of 1024), e.g. 10G";
            return Err(format!("{s:?} is not a size: unknown suffix; {hint}"));
        }
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large a size"))?;
    if bytes == 0 {
        return Err("a quota must be greater than 0 (for no quota leave --quota out of `volume create`, or give `volume set-quota NAME none`)".into());
    }
    Ok(bytes)
}

/// etcd endpoints from `--etcd` or the cluster file (volume commands need no certificate).
fn etcd_config(conn: &ConnArgs) -> Result<EtcdConfig> {
    let endpoints = if !conn.etcd.is_empty() {
        conn.etcd.clone()
    } else if let Some(p) = &conn.cluster {
        ClusterFile::load(p)?.etcd.endpoints
    } else {
        bail!("don't know where the cluster is: give --cluster DIR/cluster.json (or set TWINFS_CLUSTER), or --etcd URL");
    };
    Ok(EtcdConfig {
        endpoints,
        ..Default::default()
    })
}

/// "2024-05-01 12:34:56 UTC" for a Unix time (proleptic Gregorian, no time zone database).
fn utc(secs: u64) -> String {
    if secs == 0 {
        return "-".into();
    }
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn quota_text(q: Option<u64>) -> String {
    match q {
        Some(b) => human_bytes(b),
        None => "none".into(),
    }
}

pub async fn run(conn: &ConnArgs, cmd: VolumeCmd) -> Result<()> {
    let etcd = etcd_config(conn)?.connect().await?;
    match cmd {
        VolumeCmd::Create {
            name,
            replicas,
            quota,
        } => {
            let rec = volume::create(&etcd, &name, replicas, quota).await?;
            println!(
                "created volume {} (replicas {}, quota {}, chunk size {})",
                rec.name,
                rec.replicas,
                quota_text(rec.quota_bytes),
                human_bytes(u64::from(rec.chunk_size))
            );
        }
        VolumeCmd::List { json } => {
            let vols = volume::list(&etcd).await?;
            let mut rows = Vec::with_capacity(vols.len());
            for v in vols {
                // One small range read per volume; a failure only blanks the column.
                let bytes_used = volume::used_bytes(&etcd, &v.name).await.ok().flatten();
                rows.push(ListRow {
                    record: v,
                    bytes_used,
                });
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_list(&rows);
            }
        }
        VolumeCmd::Inspect { name, json } => {
            let info = volume::inspect(&etcd, &name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_info(&info);
            }
        }
        VolumeCmd::SetQuota {
            name,
            quota: QuotaArg(quota),
        } => {
            let (old, new) = volume::set_quota(&etcd, &name, quota)
                .await
                .with_context(|| format!("cannot change the quota of volume {name}"))?;
            println!(
                "volume {name}: quota {} (was {}); live mounts apply it within moments",
                quota_text(new.quota_bytes),
                quota_text(old.quota_bytes)
            );
            if let (Some(q), Ok(Some(used))) = (quota, volume::used_bytes(&etcd, &name).await) {
                if used > q {
                    println!(
                        "note: the volume already holds {} ({used} bytes), more than the new \
                         quota: nothing is lost, but files cannot grow until usage is below it",
                        human_bytes(used)
                    );
                }
            }
        }
        VolumeCmd::SetReplicas { name, replicas } => {
            let (old, new) = volume::set_replicas(&etcd, &name, replicas)
                .await
                .with_context(|| format!("cannot change the replica count of volume {name}"))?;
            println!(
                "volume {name}: {} copies of each block (was {}); live mounts write {} copies \
                 within moments, and the nodes' repair scans {} copies of the blocks already \
                 stored (`twinfs fsck {name} --quick` shows the progress)",
                new.replicas,
                old.replicas,
                new.replicas,
                if new.replicas >= old.replicas {
                    "add"
                } else {
                    "remove"
                }
            );
        }
        VolumeCmd::Delete { name } => {
            volume::delete(&etcd, &name)
                .await
                .with_context(|| format!("cannot delete volume {name}"))?;
            println!("deleted volume {name}; its data blocks are left to garbage collection");
        }
    }
    Ok(())
}

/// One line of `twinfs volume list`.
#[derive(serde::Serialize)]
struct ListRow {
    #[serde(flatten)]
    record: VolumeRecord,
    /// From the usage keys; `null` for a volume not mounted since usage accounting began.
    bytes_used: Option<u64>,
}

fn print_list(rows: &[ListRow]) {
    if rows.is_empty() {
        println!("no volumes (create one with `twinfs volume create NAME`)");
        return;
    }
    println!(
        "{:<24} {:>8} {:>11} {:>11} {:>9}  CREATED",
        "NAME", "REPLICAS", "USED", "QUOTA", "CHUNK"
    );
    for row in rows {
        let v = &row.record;
        println!(
            "{:<24} {:>8} {:>11} {:>11} {:>9}  {}",
            v.name,
            v.replicas,
            row.bytes_used.map_or_else(|| "-".into(), human_bytes),
            quota_text(v.quota_bytes),
            human_bytes(u64::from(v.chunk_size)),
            utc(v.created_unix)
        );
    }
}

fn print_info(i: &VolumeInfo) {
    let r = &i.record;
    println!("volume:      {}", r.name);
    println!("replicas:    {}", r.replicas);
    match r.quota_bytes {
        Some(q) => println!("quota:       {} ({q} bytes)", human_bytes(q)),
        None => println!("quota:       none"),
    }
    println!("chunk size:  {}", human_bytes(u64::from(r.chunk_size)));
    println!("created:     {}", utc(r.created_unix));
    println!(
        "formatted:   {}",
        if i.formatted {
            "yes"
        } else {
            "no (the first mount formats it)"
        }
    );
    println!(
        "inodes:      {} ({} files, {} directories, {} symlinks, {} other)",
        i.inodes, i.files, i.dirs, i.symlinks, i.other
    );
    if i.corrupt_inodes > 0 {
        println!(
            "corrupt:     {} inode records do not decode",
            i.corrupt_inodes
        );
    }
    match r.quota_bytes {
        Some(q) => println!(
            "bytes used:  {} ({} bytes, {:.1}% of the quota; apparent size of the files, \
             before replication)",
            human_bytes(i.bytes_used),
            i.bytes_used,
            i.bytes_used as f64 * 100.0 / q as f64
        ),
        None => println!(
            "bytes used:  {} ({} bytes; apparent size of the files, before replication)",
            human_bytes(i.bytes_used),
            i.bytes_used
        ),
    }
    if !i.usage_accounted {
        println!("             (from a scan: no mount has counted usage in this volume yet)");
    } else if i.bytes_in_files != i.bytes_used {
        println!(
            "             (a scan of the files finds {} bytes: mounts are writing, or the \
             count drifted)",
            i.bytes_in_files
        );
    }
    for k in &i.usage_corrupt {
        println!("warning:     usage value at {k} does not decode; counted as 0");
    }
    println!("orphans:     {}", i.orphans);
    println!(
        "mounts:      {}",
        i.mounts.len() + i.unreadable_mounts.len()
    );
    for m in &i.mounts {
        println!(
            "  {}:{} (pid {}, id {}, since {})",
            m.host,
            m.path,
            m.pid,
            m.id,
            utc(m.started_unix)
        );
    }
    for k in &i.unreadable_mounts {
        println!("  unreadable mount record {k}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1"), Ok(1));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10g"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10GB"), Ok(10 << 30));
        assert_eq!(parse_size("10Gi"), Ok(10 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("2P"), Ok(2 << 50));
        assert_eq!(parse_size(" 3M "), Ok(3 << 20));
        assert_eq!(parse_size("7B"), Ok(7));
        for bad in [
            "",
            "G",
            "-1",
            "1.5G",
            "10X",
            "10 GG",
            "abc",
            "0",
            "0G",
            "16384P",
            "99999999999999999999",
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(!e.is_empty(), "{bad:?}");
        }
        assert!(parse_size("10X").unwrap_err().contains("suffix"));
        assert!(parse_size("1.5G").unwrap_err().contains("whole number"));
        assert!(parse_size("0").unwrap_err().contains("greater than 0"));
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(1), "1970-01-01 00:00:01 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
