//! Process-wide Prometheus metrics and the small HTTP endpoint that serves them with the
//! health checks (`/metrics`, `/healthz`, `/readyz`).
//!
//! One registry per process: the node agent, its in-process mounts and the block client all
//! count into it, so one scrape shows the whole agent. Counting is a relaxed atomic add; nothing
//! here allocates per request once a label set exists.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
}

/// Per-operation counters: how many, how many failed, how long they took.
#[derive(Clone)]
pub struct OpMetrics {
    pub total: Family<OpLabel, Counter>,
    pub errors: Family<OpLabel, Counter>,
    pub seconds: Family<OpLabel, Histogram>,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s in doublings.
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

impl OpMetrics {
    fn new(registry: &mut Registry, name: &str, what: &str) -> OpMetrics {
        let m = OpMetrics {
            total: Family::default(),
            errors: Family::default(),
            seconds: Family::new_with_constructor(latency_histogram),
        };
        registry.register(name, format!("{what}, by operation"), m.total.clone());
        registry.register(
            format!("{name}_errors"),
            format!("{what} that failed, by operation"),
            m.errors.clone(),
        );
        registry.register(
            format!("{name}_seconds"),
            format!("Time taken by {what}, by operation"),
            m.seconds.clone(),
        );
        m
    }

    /// Counts one operation that started at `start`.
    pub fn record(&self, op: &'static str, start: Instant, ok: bool) {
        let l = OpLabel { op };
        self.total.get_or_create(&l).inc();
        if !ok {
            self.errors.get_or_create(&l).inc();
        }
        self.seconds
            .get_or_create(&l)
            .observe(start.elapsed().as_secs_f64());
    }
}

pub struct Metrics {
    registry: Registry,
    /// Requests a node served over QUIC.
    pub node_requests: OpMetrics,
    pub node_bytes_received: Counter,
    pub node_bytes_sent: Counter,
    pub node_blocks: Gauge,
    pub node_bytes_used: Gauge,
    pub node_corrupt_blocks: Gauge,
    /// Block requests a client (mount, admin tool) made to nodes.
    pub client_requests: OpMetrics,
    pub client_bytes_written: Counter,
    pub client_bytes_read: Counter,
    /// Blocks written with fewer copies than the volume asks for (fewer nodes alive).
    pub client_under_replicated_writes: Counter,
    /// Round trips to etcd made by the filesystem.
    pub etcd_requests: OpMetrics,
    /// FUSE operations served by the mounts of this process.
    pub fuse_ops: OpMetrics,
    pub fuse_bytes_read: Counter,
    pub fuse_bytes_written: Counter,
    /// Volumes mounted by this process right now.
    pub mounts: Gauge,
    /// From this node's last repair scan: owned blocks with fewer copies than wanted, and with
    /// none; copies re-created since start.
    pub blocks_under_replicated: Gauge,
    pub blocks_lost: Gauge,
    pub repaired_bytes: Counter,
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("twinfs");
        let node_requests = OpMetrics::new(&mut r, "node_requests", "Block requests served");
        let client_requests = OpMetrics::new(&mut r, "client_requests", "Block requests sent");
        let etcd_requests = OpMetrics::new(&mut r, "etcd_requests", "etcd round trips");
        let fuse_ops = OpMetrics::new(&mut r, "fuse_ops", "FUSE operations");
        let m = Metrics {
            node_requests,
            node_bytes_received: Counter::default(),
            node_bytes_sent: Counter::default(),
            node_blocks: Gauge::default(),
            node_bytes_used: Gauge::default(),
            node_corrupt_blocks: Gauge::default(),
            client_requests,
            client_bytes_written: Counter::default(),
            client_bytes_read: Counter::default(),
            client_under_replicated_writes: Counter::default(),
            etcd_requests,
            fuse_ops,
            fuse_bytes_read: Counter::default(),
            fuse_bytes_written: Counter::default(),
            mounts: Gauge::default(),
            blocks_under_replicated: Gauge::default(),
            blocks_lost: Gauge::default(),
            repaired_bytes: Counter::default(),
            registry: Registry::default(),
        };
        r.register(
            "node_received_bytes",
            "Block bytes received by this node",
            m.node_bytes_received.clone(),
        );
        r.register(
            "node_sent_bytes",
            "Block bytes sent by this node",
            m.node_bytes_sent.clone(),
        );
        r.register(
            "node_blocks",
            "Blocks stored on this node",
            m.node_blocks.clone(),
        );
        r.register(
            "node_used_bytes",
            "Bytes of blocks stored on this node",
            m.node_bytes_used.clone(),
        );
        r.register(
            "node_corrupt_blocks",
            "Block copies found corrupt and quarantined on this node",
            m.node_corrupt_blocks.clone(),
        );
        r.register(
            "client_written_bytes",
            "Block bytes written to nodes (once per copy)",
            m.client_bytes_written.clone(),
        );
        r.register(
            "client_read_bytes",
            "Block bytes read from nodes",
            m.client_bytes_read.clone(),
        );
        r.register(
            "client_under_replicated_writes",
            "Blocks written with fewer copies than asked, because fewer nodes were alive",
            m.client_under_replicated_writes.clone(),
        );
        r.register(
            "fuse_read_bytes",
            "Bytes read through the mounts",
            m.fuse_bytes_read.clone(),
        );
        r.register(
            "fuse_written_bytes",
            "Bytes written through the mounts",
            m.fuse_bytes_written.clone(),
        );
        r.register(
            "mounts",
            "Volumes this process has mounted",
            m.mounts.clone(),
        );
        r.register(
            "blocks_under_replicated",
            "Blocks this node owns with fewer copies than their volume wants (last repair scan)",
            m.blocks_under_replicated.clone(),
        );
        r.register(
            "blocks_lost",
            "Blocks this node owns with no copy on a live node (last repair scan)",
            m.blocks_lost.clone(),
        );
        r.register(
            "repaired_bytes",
            "Bytes of missing copies this node re-created",
            m.repaired_bytes.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// What `/healthz` and `/readyz` report.
#[derive(Default)]
pub struct Health {
    /// The node is registered in etcd and serving.
    pub node_registered: AtomicBool,
    /// Set when the process is stopping: not ready any more.
    pub stopping: AtomicBool,
    /// Mounts this process should keep: (volume, path, state).
    pub mounts: Mutex<Vec<(String, String, MountHealth)>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountHealth {
    Starting,
    Mounted,
    /// Failed to mount or its session ended; being retried.
    Failed,
}

impl Health {
    pub fn set_mount(&self, volume: &str, path: &str, state: MountHealth) {
        let Ok(mut m) = self.mounts.lock() else {
            return;
        };
        match m.iter_mut().find(|(v, p, _)| v == volume && p == path) {
            Some(e) => e.2 = state,
            None => m.push((volume.to_string(), path.to_string(), state)),
        }
    }

    /// Ready: registered, not stopping, every mount up. The text says what is missing.
    pub fn readiness(&self) -> (bool, String) {
        let mut missing = Vec::new();
        if !self.node_registered.load(Ordering::Relaxed) {
            missing.push("node not registered in etcd".to_string());
        }
        if self.stopping.load(Ordering::Relaxed) {
            missing.push("stopping".to_string());
        }
        if let Ok(m) = self.mounts.lock() {
            for (v, p, s) in m.iter() {
                if *s != MountHealth::Mounted {
                    missing.push(format!("volume {v} at {p}: {s:?}"));
                }
            }
        }
        if missing.is_empty() {
            (true, "ready\n".into())
        } else {
            (false, format!("not ready: {}\n", missing.join("; ")))
        }
    }
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` on `addr` until the
/// runtime stops. Binds before returning, so a taken port is an error at start.
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let health = health.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), answer(stream, &health)).await;
            });
        }
    });
    Ok(local)
}

/// Largest request head read; anything longer is refused.
const MAX_REQUEST_HEAD: usize = 8 << 10;

async fn answer(mut stream: tokio::net::TcpStream, health: &Health) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST_HEAD {
            return respond(&mut stream, 431, "text/plain", "request too large\n").await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let body = metrics().encode();
            respond(
                &mut stream,
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await
        }
        "/healthz" | "/livez" => respond(&mut stream, 200, "text/plain", "ok\n").await,
        "/readyz" => {
            let (ok, text) = health.readiness();
            respond(&mut stream, if ok { 200 } else { 503 }, "text/plain", &text).await
        }
        _ => {
            respond(
                &mut stream,
                404,
                "text/plain",
                "not found: try /metrics, /healthz or /readyz\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn endpoint_serves_metrics_and_health() {
        let health = Arc::new(Health::default());
        let addr = serve("127.0.0.1:0".parse().expect("addr"), health.clone())
            .await
            .expect("serve");
        metrics().fuse_ops.record("lookup", Instant::now(), false);
        let m = get(addr, "/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(
            m.contains("twinfs_fuse_ops_errors_total{op=\"lookup\"}"),
            "{m}"
        );
        assert!(m.contains("# EOF"), "{m}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let r = get(addr, "/readyz").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("not registered"),
            "{r}"
        );
        health.node_registered.store(true, Ordering::Relaxed);
        health.set_mount("uploads", "/mnt/u", MountHealth::Starting);
        assert!(get(addr, "/readyz").await.contains("volume uploads"));
        health.set_mount("uploads", "/mnt/u", MountHealth::Mounted);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(&vec![b'a'; MAX_REQUEST_HEAD + 10])
            .await
            .expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    }
}
