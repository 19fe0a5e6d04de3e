//! Test harness: a real dev cluster (real etcd, real node processes, real QUIC) per test,
//! started through the `twinfs` binary itself and stopped on drop, even when the test fails.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const TWINFS: &str = env!("CARGO_BIN_EXE_twinfs");

pub struct Node {
    pub id: String,
    pub pid: u32,
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
}

pub struct DevCluster {
    pub dir: tempfile::TempDir,
    pub json: Value,
    pub nodes: Vec<Node>,
    /// Mount points of the volume (`--mounts`), each served by its own mount process.
    pub mounts: Vec<PathBuf>,
    pub mount_pids: Vec<u32>,
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running twinfs")
}

pub fn twinfs() -> Command {
    Command::new(TWINFS)
}

impl DevCluster {
    pub fn up(nodes: usize, lease_ttl: u64) -> DevCluster {
        DevCluster::with_mounts(nodes, lease_ttl, 0)
    }

    /// A cluster of `nodes` nodes plus `mounts` FUSE mounts of the volume "uploads".
    pub fn with_mounts(nodes: usize, lease_ttl: u64, mounts: usize) -> DevCluster {
        DevCluster::start(nodes, lease_ttl, mounts, &[])
    }

    /// As [`with_mounts`], with extra arguments for every node (e.g. "--repair-grace=3s").
    pub fn start(nodes: usize, lease_ttl: u64, mounts: usize, node_args: &[&str]) -> DevCluster {
        let dir = tempfile::Builder::new()
            .prefix("twinfs-test-")
            .tempdir()
            .expect("temp dir");
        let out = run(twinfs()
            .args([
                "dev-cluster",
                "up",
                "--nodes",
                &nodes.to_string(),
                "--lease-ttl",
                &lease_ttl.to_string(),
                "--mounts",
                &mounts.to_string(),
            ])
            .args(node_args.iter().map(|a| format!("--node-arg={a}")))
            .arg("--dir")
            .arg(dir.path()));
        if !out.status.success() {
            // `up` stops what it started when it fails; `down` also catches anything it missed.
            let _ = run(twinfs()
                .args(["dev-cluster", "down", "--dir"])
                .arg(dir.path()));
        }
        assert!(
            out.status.success(),
            "dev-cluster up failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("cluster.json")).expect("cluster.json"),
        )
        .expect("cluster.json parses");
        let nodes = json["nodes"]
            .as_array()
            .expect("nodes array")
            .iter()
            .map(|n| Node {
                id: n["id"].as_str().unwrap().to_string(),
                pid: n["pid"].as_u64().unwrap() as u32,
                addr: n["addr"].as_str().unwrap().to_string(),
                data_dir: PathBuf::from(n["data_dir"].as_str().unwrap()),
                log: PathBuf::from(n["log"].as_str().unwrap()),
            })
            .collect();
        let list = json["mounts"].as_array().cloned().unwrap_or_default();
        let mount_paths = list
            .iter()
            .map(|m| PathBuf::from(m["path"].as_str().unwrap()))
            .collect();
        let mount_pids = list
            .iter()
            .map(|m| m["pid"].as_u64().unwrap() as u32)
            .collect();
        DevCluster {
            dir,
            json,
            nodes,
            mounts: mount_paths,
            mount_pids,
        }
    }

    pub fn cluster_file(&self) -> PathBuf {
        self.dir.path().join("cluster.json")
    }

    pub fn client_cert_dir(&self) -> PathBuf {
        PathBuf::from(self.json["client_cert_dir"].as_str().unwrap())
    }

    /// A `twinfs` command pointed at this cluster.
    pub fn cmd(&self) -> Command {
        let mut c = twinfs();
        c.arg("--cluster").arg(self.cluster_file());
        c.env_remove("TWINFS_CLUSTER");
        c
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = run(self.cmd().args(args));
        assert!(
            out.status.success(),
            "twinfs {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    pub fn node(&self, id: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .expect("known node id")
    }

    pub fn kill9(&self, id: &str) {
        let pid = self.node(id).pid;
        // SAFETY: kill(2) has no memory-safety preconditions; `pid` is a node this test started.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        // Wait until it is really gone (its parent, init, reaps it).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists()
            && !is_zombie(pid)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Path of node `id`'s copy of a block.
    pub fn block_path(&self, id: &str, hash: &str) -> PathBuf {
        self.node(id)
            .data_dir
            .join("store/blocks")
            .join(&hash[..2])
            .join(hash)
    }

    /// Rots node `id`'s copy of `hash` (see [`rot_copy`]); false when it holds none.
    #[allow(dead_code)]
    pub fn rot_copy(&self, id: &str, hash: &str, at: usize) -> bool {
        rot_copy(&self.node(id).data_dir.join("store"), hash, at)
    }

    pub fn status_json(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status --json parses")
    }

    pub fn node_state(&self, id: &str) -> String {
        self.status_json()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .map(|n| n["state"].as_str().unwrap().to_string())
            .unwrap_or_default()
    }

    /// Puts a file as a block, returns its hash.
    pub fn put(&self, data: &[u8]) -> String {
        let f = self
            .dir
            .path()
            .join(format!("put-{}", rand::random::<u64>()));
        std::fs::write(&f, data).unwrap();
        let hash = self
            .ok(&["block", "put", f.to_str().unwrap()])
            .trim()
            .to_string();
        assert_eq!(hash, blake3::hash(data).to_hex().to_string());
        hash
    }

    pub fn locate(&self, hash: &str) -> Vec<String> {
        let out = run(self.cmd().args(["block", "locate", hash]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Node ids in the order clients try them for `hash` (the placement ranking).
    pub fn ranking(&self, hash: &str) -> Vec<String> {
        let h: twinfs_cluster::BlockHash = hash.parse().unwrap();
        let candidates: Vec<_> = self
            .nodes
            .iter()
            .map(|n| twinfs_cluster::placement::Candidate {
                id: n.id.clone(),
                zone: None,
            })
            .collect();
        twinfs_cluster::placement::rank(&h, &candidates, 2)
            .into_iter()
            .map(|i| candidates[i].id.clone())
            .collect()
    }
}

pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(true)
}

pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = run(twinfs()
            .args(["dev-cluster", "down", "--dir"])
            .arg(self.dir.path()));
        // Belt and braces: anything still alive that this test started is killed.
        let mut pids: Vec<u32> = self.nodes.iter().map(|n| n.pid).collect();
        pids.extend(&self.mount_pids);
        if let Some(p) = self.json["etcd"]["pid"].as_u64() {
            pids.push(p as u32);
        }
        let marker = self.dir.path().display().to_string();
        for pid in pids {
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&marker))
                .unwrap_or(false);
            if ours {
                // SAFETY: as in kill9; the PID's command line names this test's directory.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
        }
        // A mount whose process was killed leaves a dead mount point: detach it.
        for m in &self.mounts {
            detach_all(m);
        }
    }
}

/// A process a test started itself, killed when the test ends however it ends.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A mount point a test mounted itself, detached when the test ends however it ends.
pub struct DetachOnDrop(pub PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        detach_all(&self.0);
    }
}

/// Lazily detaches every mount stacked at `path` (a killed agent's dead mount lies beneath).
pub fn detach_all(path: &Path) {
    for _ in 0..32 {
        if !is_mounted(path) {
            return;
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let want = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines()
                .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| rand::random::<u8>()).collect()
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes; returns the time it took.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free tcp port")
        .port()
}

/// A plain HTTP/1.1 GET (the metrics endpoints close the connection after answering).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The last `n` lines of a log file (for failure messages).
pub fn log_tail(path: &Path, n: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = std::io::Read::read_to_string(&mut f, &mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// (total, free) bytes as `statvfs` reports them.
pub fn statvfs(path: &Path) -> (u64, u64) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: `c` is a valid NUL-terminated path and `st` a plain struct statvfs fills in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(r, 0, "statvfs {}", path.display());
    let frsize = st.f_frsize as u64;
    (st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize)
}

/// Waits up to `timeout` until `statvfs(path)` — (total, free) — satisfies `ok`; fails naming
/// the path and what it showed last.
pub fn wait_statvfs(path: &Path, timeout: Duration, ok: impl Fn((u64, u64)) -> bool) {
    let seen = wait_for(timeout, || ok(statvfs(path)));
    assert!(
        seen.is_some(),
        "statvfs on {}: {:?}",
        path.display(),
        statvfs(path)
    );
}

/// Flips one byte (at `at`, clamped to the block) of the copy of `hash` stored under a node's
/// `store` directory, wherever it lives: a block file, or a record in the block log
/// (`small/<seq>.log`: `TWB1`, length u32 LE, 32-byte hash, data). Rot a real disk cannot be
/// made to produce on demand. False when the node holds no copy.
#[allow(dead_code)]
pub fn rot_copy(store: &Path, hash: &str, at: usize) -> bool {
    let file = store.join("blocks").join(&hash[..2]).join(hash);
    if let Ok(mut bytes) = std::fs::read(&file) {
        if bytes.is_empty() {
            return false;
        }
        let i = at.min(bytes.len() - 1);
        bytes[i] ^= 0x5a;
        std::fs::write(&file, &bytes).expect("rotting a block file");
        return true;
    }
    let want = blake3::Hash::from_hex(hash).expect("a block hash");
    rot_log_records(store, |h| h == want.as_bytes(), at) > 0
}

/// Flips one byte in the middle of every block copy under a node's `store` directory (files
/// and log records); the number of copies rotted.
#[allow(dead_code)]
pub fn rot_every_copy(store: &Path) -> usize {
    let mut n = 0;
    if let Ok(fans) = std::fs::read_dir(store.join("blocks")) {
        for fan in fans.flatten() {
            for f in std::fs::read_dir(fan.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let mut bytes = std::fs::read(f.path()).expect("copy");
                if bytes.is_empty() {
                    continue;
                }
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x5a;
                std::fs::write(f.path(), &bytes).expect("rotting a block file");
                n += 1;
            }
        }
    }
    n + rot_log_records(store, |_| true, usize::MAX / 2)
}

/// Rots the data of each log record whose hash `pick` accepts, at `at` (clamped; `usize::MAX
/// / 2` means the middle); the number rotted.
fn rot_log_records(store: &Path, pick: impl Fn(&[u8; 32]) -> bool, at: usize) -> usize {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    let Ok(segments) = std::fs::read_dir(store.join("small")) else {
        return 0;
    };
    for seg in segments.flatten() {
        let bytes = std::fs::read(seg.path()).expect("log segment");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(seg.path())
            .expect("log segment");
        let mut o = 0usize;
        while o + 40 <= bytes.len() && &bytes[o..o + 4] == b"TWB1" {
            let len = u32::from_le_bytes(bytes[o + 4..o + 8].try_into().expect("4 bytes")) as usize;
            let hash: [u8; 32] = bytes[o + 8..o + 40].try_into().expect("32 bytes");
            if len > 0 && o + 40 + len <= bytes.len() && pick(&hash) {
                let i = if at == usize::MAX / 2 {
                    len / 2
                } else {
                    at.min(len - 1)
                };
                let pos = o + 40 + i;
                file.write_all_at(&[bytes[pos] ^ 0x5a], pos as u64)
                    .expect("rotting a log record");
                n += 1;
            }
            o += 40 + len;
        }
    }
    n
}
