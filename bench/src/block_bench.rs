//! block-bench: put and get N MiB as fixed-size blocks through the twinfs block client, next to a
//! reference measured in the same run on the same disk (the same bytes written as files with
//! fsync, then read back), the latency of 64 KiB range gets next to 64 KiB preads, and the latency
//! of small puts made one at a time (as a flush on close makes them) next to the same durable
//! writes of the same number of copies on this disk.
//!
//! Usage: block-bench --cluster DIR/cluster.json --ref-dir DIR [--total-mib 1024] [--runs 3]
//! Prints one line per run and the medians; run it through bench/block_bench.sh.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use rand::{Rng, RngCore, SeedableRng};
use twinfs_cluster::client::{BlockClient, ClientOptions};
use twinfs_cluster::etcd::EtcdConfig;
use twinfs_cluster::membership::Membership;
use twinfs_cluster::pki::Identity;
use twinfs_cluster::wire::{ByteRange, Message};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    cluster: PathBuf,
    /// Directory on the same disk as the nodes' data, for the reference files.
    #[arg(long)]
    ref_dir: PathBuf,
    #[arg(long, default_value_t = 1024)]
    total_mib: usize,
    #[arg(long, default_value_t = 4)]
    block_mib: usize,
    /// Blocks in flight at once, for both twinfs and the reference.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    #[arg(long, default_value_t = 1000)]
    small_gets: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Sequential small puts (one in flight, as a file's flush on close does), to time the put
    /// path's latency rather than its throughput; 0 skips them.
    #[arg(long, default_value_t = 200)]
    small_puts: usize,
    #[arg(long, default_value_t = 200)]
    small_put_kib: usize,
    /// Keep the page cache before reads (by default it is dropped, when running as root, so that
    /// both the reference read and the twinfs get read from the disk).
    #[arg(long)]
    keep_cache: bool,
}

/// Drops clean page-cache pages so reads come from the disk. Needs root; returns whether it did.
fn drop_caches() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

struct RunResult {
    ref_write: f64,
    put: f64,
    ref_read: f64,
    get: f64,
    ref_p50: f64,
    ref_p99: f64,
    get_p50: f64,
    get_p99: f64,
    small_put_p50: f64,
    small_ref_p50: f64,
    has_p50: f64,
    small_get_p50: f64,
}

fn make_blocks(seed: u64, n: usize, size: usize) -> Vec<bytes::Bytes> {
    (0..n)
        .map(|i| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1_000_003 + i as u64);
            let mut v = vec![0u8; size];
            rng.fill_bytes(&mut v);
            v.into()
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 0.5)
}

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// A block store's durable write: temp file, fsync, rename, fsync of the directory.
fn durable_write(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The reference write: what a durable block write costs on this disk (temp file, fsync,
/// rename, fsync of the directory), with the same concurrency.
fn reference_write(dir: &Path, blocks: &[bytes::Bytes], concurrency: usize) -> Result<Duration> {
    std::fs::create_dir_all(dir)?;
    let start = Instant::now();
    let chunks: Vec<Vec<(usize, bytes::Bytes)>> = {
        let mut c = vec![Vec::new(); concurrency];
        for (i, b) in blocks.iter().enumerate() {
            c[i % concurrency].push((i, b.clone()));
        }
        c
    };
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|work| {
                s.spawn(move || -> Result<()> {
                    for (i, b) in work {
                        durable_write(dir, &i.to_string(), &b)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        }
        Ok(())
    })?;
    Ok(start.elapsed())
}

/// One durable write per copy, the copies written at the same time by one thread each (the
/// nodes of a dev cluster share this disk): what a replicated block put cannot beat here.
fn reference_small_writes(dir: &Path, blocks: &[bytes::Bytes], copies: usize) -> Result<Vec<f64>> {
    std::fs::create_dir_all(dir)?;
    let mut lat = Vec::with_capacity(blocks.len());
    for (i, b) in blocks.iter().enumerate() {
        let t = Instant::now();
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = (0..copies)
                .map(|c| s.spawn(move || durable_write(dir, &format!("s{i}.{c}"), b)))
                .collect();
            for h in handles {
                h.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
            }
            Ok(())
        })?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(lat)
}

fn reference_read(dir: &Path, n: usize, concurrency: usize) -> Result<Duration> {
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..concurrency)
            .map(|t| {
                s.spawn(move || -> Result<()> {
                    for i in (t..n).step_by(concurrency) {
                        let data = std::fs::read(dir.join(i.to_string()))?;
                        std::hint::black_box(&data);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
        }
        Ok(())
    })?;
    Ok(start.elapsed())
}

async fn run_once(args: &Args, client: &Arc<BlockClient>, seed: u64) -> Result<RunResult> {
    let block = args.block_mib << 20;
    let n = (args.total_mib / args.block_mib).max(1);
    let total = n * block;
    let blocks = make_blocks(seed, n, block);
    let ref_dir = args.ref_dir.join(format!("run-{seed}"));

    let b2 = blocks.clone();
    let rd = ref_dir.clone();
    let conc = args.concurrency;
    let ref_write = tokio::task::spawn_blocking(move || reference_write(&rd, &b2, conc)).await??;

    // Put, `concurrency` blocks in flight.
    let start = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let mut tasks = Vec::new();
    for b in blocks.iter().cloned() {
        let permit = sem.clone().acquire_owned().await?;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let r = client.put(b).await;
            drop(permit);
            r
        }));
    }
    let mut hashes = Vec::new();
    for t in tasks {
        let outcome = t.await??;
        anyhow::ensure!(!outcome.under_replicated(), "put was under-replicated");
        hashes.push(outcome.hash);
    }
    let put = start.elapsed();

    // Get everything back, verified.
    if !args.keep_cache {
        drop_caches();
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for h in hashes.iter().copied() {
        let permit = sem.clone().acquire_owned().await?;
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let r = client.get(h, None).await;
            drop(permit);
            r.map(|d| d.len())
        }));
    }
    let mut got = 0;
    for t in tasks {
        got += t.await??;
    }
    anyhow::ensure!(got == total, "got {got} bytes back of {total}");
    let get = start.elapsed();

    if !args.keep_cache {
        drop_caches();
    }
    let rd = ref_dir.clone();
    let ref_read = tokio::task::spawn_blocking(move || reference_read(&rd, n, conc)).await??;

    // 64 KiB range gets, one at a time, against 64 KiB preads of the reference files.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let picks: Vec<(usize, u64)> = (0..args.small_gets)
        .map(|_| {
            (
                rng.gen_range(0..n),
                rng.gen_range(0..(block as u64 / 65536)) * 65536,
            )
        })
        .collect();
    let mut lat = Vec::with_capacity(picks.len());
    for &(i, off) in &picks {
        let t = Instant::now();
        let d = client
            .get(
                hashes[i],
                Some(ByteRange {
                    offset: off,
                    len: Some(65536),
                }),
            )
            .await?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(
            d[..] == blocks[i][off as usize..off as usize + 65536],
            "range mismatch"
        );
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let rd = ref_dir.clone();
    let mut ref_lat = tokio::task::spawn_blocking(move || -> Result<Vec<f64>> {
        let mut buf = vec![0u8; 65536];
        let mut v = Vec::new();
        for &(i, off) in &picks {
            let t = Instant::now();
            let f = std::fs::File::open(rd.join(i.to_string()))?;
            f.read_exact_at(&mut buf, off)?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(v)
    })
    .await??;
    ref_lat.sort_by(|a, b| a.total_cmp(b));

    // Small puts, one at a time, against the same durable writes of the same copies.
    let small = make_blocks(seed + 7, args.small_puts, args.small_put_kib << 10);
    let mut small_lat = Vec::with_capacity(small.len());
    for b in &small {
        let t = Instant::now();
        let outcome = client.put(b.clone()).await?;
        small_lat.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(!outcome.under_replicated(), "put was under-replicated");
        hashes.push(outcome.hash);
    }
    small_lat.sort_by(|a, b| a.total_cmp(b));
    // The same small blocks read back whole, one at a time (the put dropped them from the
    // nodes' page cache, so each is read from the disk once).
    let mut small_get_lat = Vec::with_capacity(small.len());
    for (b, h) in small.iter().zip(&hashes[hashes.len() - small.len()..]) {
        let t = Instant::now();
        let d = client.get(*h, None).await?;
        small_get_lat.push(t.elapsed().as_secs_f64() * 1e3);
        anyhow::ensure!(d[..] == b[..], "small block read back differs");
    }
    small_get_lat.sort_by(|a, b| a.total_cmp(b));
    let rd = ref_dir.clone();
    let copies = args.replicas;
    let small_ref =
        tokio::task::spawn_blocking(move || reference_small_writes(&rd, &small, copies)).await??;

    // The smallest request (is one block here?) to one node, one at a time: the round trip
    // every put pays on top of its disk work.
    let node = client
        .membership()
        .live()
        .into_iter()
        .next()
        .context("no live node")?;
    let mut has_lat = Vec::with_capacity(args.small_puts);
    for h in hashes.iter().cycle().take(args.small_puts.max(1)) {
        let t = Instant::now();
        client
            .ask_bits(
                &node,
                &Message::Has { hashes: vec![*h] },
                1,
                Duration::from_secs(5),
            )
            .await?;
        has_lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    has_lat.sort_by(|a, b| a.total_cmp(b));

    // Clean up: delete the blocks from every node and the reference files.
    for node in client.membership().live() {
        for h in &hashes {
            let _ = client
                .request_addr(node.addr, &Message::Delete { hash: *h })
                .await;
        }
    }
    std::fs::remove_dir_all(&ref_dir).ok();

    Ok(RunResult {
        ref_write: mib_per_s(total, ref_write),
        put: mib_per_s(total, put),
        ref_read: mib_per_s(total, ref_read),
        get: mib_per_s(total, get),
        ref_p50: percentile(&ref_lat, 0.5),
        ref_p99: percentile(&ref_lat, 0.99),
        get_p50: percentile(&lat, 0.5),
        get_p99: percentile(&lat, 0.99),
        small_put_p50: percentile(&small_lat, 0.5),
        small_ref_p50: percentile(&small_ref, 0.5),
        has_p50: percentile(&has_lat, 0.5),
        small_get_p50: percentile(&small_get_lat, 0.5),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let cluster: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&args.cluster)
            .with_context(|| format!("reading {}", args.cluster.display()))?,
    )?;
    let endpoints: Vec<String> = cluster["etcd"]["endpoints"]
        .as_array()
        .context("cluster file has no etcd endpoints")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let cert_dir = PathBuf::from(
        cluster["client_cert_dir"]
            .as_str()
            .context("no client_cert_dir")?,
    );
    let etcd = EtcdConfig {
        endpoints,
        ..Default::default()
    }
    .connect()
    .await?;
    let membership = Membership::watch(etcd).await?;
    let identity = Identity::load(&cert_dir)?;
    let client = BlockClient::new(
        &identity,
        membership,
        ClientOptions {
            replicas: args.replicas,
            ..Default::default()
        },
    )?;
    // Warm the connections so the first run does not pay the handshakes.
    let warm = client.put(bytes::Bytes::from_static(b"warm-up")).await?;
    client.get(warm.hash, None).await?;

    println!(
        "block-bench: {} MiB as {} MiB blocks, R={}, {} in flight, {} nodes, {} runs",
        args.total_mib,
        args.block_mib,
        args.replicas,
        args.concurrency,
        client.membership().live().len(),
        args.runs
    );
    if !args.keep_cache && !drop_caches() {
        println!("note: cannot drop the page cache (not root): reads are served from memory");
    } else if !args.keep_cache {
        println!("page cache dropped before each read phase: reads come from the disk");
    }
    println!("run  ref-write  put      put/ref  ref-read  get      get/ref  | 64KiB p50/p99 ms: ref        twinfs        | {} KiB put p50 ms: ref   twinfs", args.small_put_kib);
    let mut results = Vec::new();
    for run in 0..args.runs {
        let seed = rand::random::<u32>() as u64 + run as u64;
        let r = run_once(&args, &client, seed).await?;
        println!(
            "{run:<4} {:>8.0}  {:>7.0}  {:>6.2}   {:>8.0}  {:>7.0}  {:>6.2}   |     {:>6.3}/{:<6.3}  {:>6.3}/{:<6.3} |                {:>6.3}  {:>6.3}",
            r.ref_write,
            r.put,
            r.put / r.ref_write,
            r.ref_read,
            r.get,
            r.get / r.ref_read,
            r.ref_p50,
            r.ref_p99,
            r.get_p50,
            r.get_p99,
            r.small_ref_p50,
            r.small_put_p50
        );
        results.push(r);
    }
    let m = |f: &dyn Fn(&RunResult) -> f64| median(results.iter().map(f).collect());
    println!(
        "median: put {:.0} MiB/s = {:.2} x reference write ({:.0} MiB/s); get {:.0} MiB/s = {:.2} x reference read ({:.0} MiB/s)",
        m(&|r| r.put),
        m(&|r| r.put / r.ref_write),
        m(&|r| r.ref_write),
        m(&|r| r.get),
        m(&|r| r.get / r.ref_read),
        m(&|r| r.ref_read)
    );
    println!(
        "median: 64 KiB get p50 {:.3} ms p99 {:.3} ms; reference pread p50 {:.3} ms p99 {:.3} ms",
        m(&|r| r.get_p50),
        m(&|r| r.get_p99),
        m(&|r| r.ref_p50),
        m(&|r| r.ref_p99)
    );
    if args.small_puts > 0 {
        println!(
            "median: {} KiB put, one at a time, p50 {:.3} ms = {:.2} x reference ({:.3} ms: {} durable writes at once on this disk)",
            args.small_put_kib,
            m(&|r| r.small_put_p50),
            m(&|r| r.small_put_p50 / r.small_ref_p50),
            m(&|r| r.small_ref_p50),
            args.replicas
        );
    }
    println!(
        "median: round trip of the smallest request (has one block) p50 {:.3} ms; {} KiB get p50 {:.3} ms",
        m(&|r| r.has_p50),
        args.small_put_kib,
        m(&|r| r.small_get_p50)
    );
    for p in client.path_stats() {
        eprintln!(
            "path {}: mtu {} rtt {:?} cwnd {} sent {} lost {} congestion events {}",
            p.addr, p.mtu, p.rtt, p.cwnd, p.sent_packets, p.lost_packets, p.congestion_events
        );
    }
    Ok(())
}
