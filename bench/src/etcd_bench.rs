//! etcd round-trip latency from this machine, as the mounts see it: the floor under every
//! metadata operation. Measures, over one client connection, a linearizable and a serializable
//! get of a missing key, a put, and a two-key compare-and-put transaction (the shape of a create),
//! each sequentially (one at a time, like a single `cp`), and reports medians and p90s in µs,
//! and etcd's own CPU time per operation (from its /metrics): on a small machine shared with
//! the nodes and mounts, etcd's CPU is as much a limit as its latency.
//!
//! `block-bench`'s sibling: run `etcd-bench --endpoint http://127.0.0.1:PORT` against a dev
//! cluster's etcd (`twinfs dev-cluster up` prints it).

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    endpoint: String,
    /// Operations of each kind.
    #[arg(long, default_value_t = 2000)]
    count: usize,
    /// Key prefix used (deleted at the end).
    #[arg(long, default_value = "/twinfs-etcd-bench/")]
    prefix: String,
}

fn report(name: &str, (mut micros, cpu): (Vec<u64>, Option<f64>)) {
    micros.sort_unstable();
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
    let mean = micros.iter().sum::<u64>() / micros.len().max(1) as u64;
    let cpu = cpu.map_or("-".to_string(), |s| {
        format!("{:.0}", s * 1e6 / micros.len().max(1) as f64)
    });
    println!(
        "{name:<29} median {:>6} µs   p90 {:>6} µs   mean {:>6} µs   etcd CPU {cpu:>5} µs/op   ({} ops)",
        at(0.5),
        at(0.9),
        mean,
        micros.len()
    );
}

/// etcd's own CPU seconds so far (`process_cpu_seconds_total` of its /metrics, served on the
/// client URL); `None` when it cannot be read (another etcd, TLS).
async fn etcd_cpu_seconds(endpoint: &str) -> Option<f64> {
    let addr = endpoint
        .strip_prefix("http://")?
        .trim_end_matches('/')
        .to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .ok()?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
            .and_then(|v| v.trim().parse().ok())
    })
    .await
    .ok()
    .flatten()
}

/// Runs `op` `count` times, one at a time: each one's latency in µs, and the etcd CPU seconds
/// they took in all.
async fn timed<F, Fut>(endpoint: &str, count: usize, mut op: F) -> Result<(Vec<u64>, Option<f64>)>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let before = etcd_cpu_seconds(endpoint).await;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let start = Instant::now();
        op(i).await?;
        out.push(start.elapsed().as_micros() as u64);
    }
    let after = etcd_cpu_seconds(endpoint).await;
    Ok((out, before.zip(after).map(|(b, a)| a - b)))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let client = Client::connect([args.endpoint.as_str()], None).await?;
    let p = args.prefix.clone();
    let n = args.count;
    let kv = client.kv_client();

    let c = kv.clone();
    let pp = p.clone();
    let lin = timed(&args.endpoint, n, move |i| {
        let (mut c, k) = (c.clone(), format!("{pp}missing/{i}"));
        async move {
            c.get(k, None).await?;
            Ok(())
        }
    })
    .await?;
    let c = kv.clone();
    let pp = p.clone();
    let ser = timed(&args.endpoint, n, move |i| {
        let (mut c, k) = (c.clone(), format!("{pp}missing/{i}"));
        async move {
            c.get(k, Some(GetOptions::new().with_serializable()))
                .await?;
            Ok(())
        }
    })
    .await?;
    let c = kv.clone();
    let pp = p.clone();
    let put = timed(&args.endpoint, n, move |i| {
        let (mut c, k) = (c.clone(), format!("{pp}put/{i}"));
        async move {
            c.put(k, vec![0u8; 200], None).await?;
            Ok(())
        }
    })
    .await?;
    let c = kv.clone();
    let pp = p.clone();
    let txn = timed(&args.endpoint, n, move |i| {
        let mut c = c.clone();
        let (entry, inode) = (format!("{pp}d/{i}"), format!("{pp}i/{i}"));
        async move {
            let t = Txn::new()
                .when([Compare::create_revision(entry.clone(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(entry, vec![1u8; 16], None),
                    TxnOp::put(inode, vec![2u8; 120], None),
                ]);
            c.txn(t).await?;
            Ok(())
        }
    })
    .await?;
    // A get and an open-shaped read-only transaction (one key and a range, as `open` reads an
    // inode and its chunk map), alternated so that the machine's noise hits both alike.
    let (mut c, pp) = (kv.clone(), p.clone());
    let (mut alt_get, mut alt_txn) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let inode = format!("{pp}i/{i}");
        let start = Instant::now();
        c.get(inode.clone(), None).await?;
        alt_get.push(start.elapsed().as_micros() as u64);
        let (from, to) = (format!("{pp}put/{i}"), format!("{pp}put/{i}~"));
        let t = Txn::new().and_then([
            TxnOp::get(inode, None),
            TxnOp::get(from, Some(GetOptions::new().with_range(to))),
        ]);
        let start = Instant::now();
        c.txn(t).await?;
        alt_txn.push(start.elapsed().as_micros() as u64);
    }
    let mut c = kv.clone();
    c.delete(
        p.clone(),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await?;

    println!("etcd at {} from one client, sequential:", args.endpoint);
    report("get (linearizable)", lin);
    report("get (serializable)", ser);
    report("put", put);
    report("txn create-shaped", txn);
    report("get, alternated with the next", (alt_get, None));
    report("read-only txn open-shaped", (alt_txn, None));
    Ok(())
}
