//! `twinfs dev-cluster`: a whole cluster on this machine, for trying twinfs and for tests.
//!
//! `up` starts one etcd (Debian's etcd-server) and N nodes on loopback, each on free ports, with
//! certificates from a fresh CA, all as background processes in their own process groups (so a
//! Ctrl-C in the terminal that ran `up` does not reach them), and writes DIR/cluster.json.
//! `down` stops exactly the processes listed there, after checking each PID still runs the
//! command it was started as.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use twinfs_cluster::etcd::EtcdConfig;
use twinfs_cluster::membership::{Membership, NodeRecord};
use twinfs_cluster::pki::{self, CertRole};

use crate::clusterfile::{ClusterFile, EtcdEntry, MountEntry, NodeEntry};

fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn find_etcd() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TWINFS_ETCD_BIN") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/bin", "/usr/local/bin"])
    {
        let p = Path::new(dir).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("etcd not found on PATH; install Debian's etcd-server (scripts/setup.sh does) or set TWINFS_ETCD_BIN")
}

/// Go garbage-collector target for the dev cluster's etcd (see where it is set).
const ETCD_GOGC: &str = "400";

/// Go threads for the dev cluster's etcd: half the machine's cores, at least one.
fn etcd_gomaxprocs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

fn spawn_background(cmd: &mut Command, log: &Path) -> Result<Child> {
    let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    Ok(child)
}

/// True when PID is alive and its command line mentions `marker` (our directory), so a PID the
/// kernel recycled for someone else's process is never signalled.
fn is_ours(pid: u32, marker: &str) -> bool {
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(marker)
        }
        Err(_) => false,
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; a stale PID yields ESRCH, which we
    // ignore. Callers check `is_ours` first so only our own processes are signalled.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL. Returns once the process is gone.
fn stop(pid: u32, marker: &str, grace: Duration) {
    if !is_ours(pid, marker) {
        return;
    }
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_ours(pid, marker) || is_zombie(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && is_ours(pid, marker) && !is_zombie(pid) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(true)
}

/// What a running `up` has started, as child handles: until `up` ends they are its children, so
/// `try_wait` says exactly whether one has exited and its PID cannot be recycled (an unreaped
/// child keeps its PID). Reading /proc/PID/cmdline instead, as `down` must, misjudged a child
/// that had just been spawned: between exec reporting success and the new program's arguments
/// being set up, the kernel returns an empty cmdline, so a healthy mount was declared dead
/// (a CI failure of 2026-12-03, under load).
struct Started {
    children: Vec<Child>,
    /// Mount points to detach if `up` fails (a mount killed by the cleanup can leave one).
    mount_points: Vec<PathBuf>,
}

impl Started {
    fn push(&mut self, child: Child) -> (usize, u32) {
        let pid = child.id();
        self.children.push(child);
        (self.children.len() - 1, pid)
    }

    /// Stops child `index` (SIGTERM, then SIGKILL after 3 s) and waits for it.
    fn stop(&mut self, index: usize) {
        let child = &mut self.children[index];
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Why child `index` has exited, or None while it runs.
    fn exited(&mut self, index: usize) -> Option<String> {
        match self.children[index].try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("state unknown ({e})")),
        }
    }
}

/// A node process `up` started: its child in [`Started`] and where it serves, keeps its data
/// and logs (all kept when it is started again on another port).
struct StartedNode {
    child: usize,
    addr: SocketAddr,
    data_dir: PathBuf,
    tls_dir: PathBuf,
    log: PathBuf,
}

/// Waits (up to 20 s) until the etcd at `cfg` answers, and checks that it is the one started
/// as child `index` under the unique name `member`.
async fn own_etcd(
    cfg: &EtcdConfig,
    member: &str,
    started: &mut Started,
    index: usize,
) -> Result<etcd_client::Client> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        if let Some(status) = started.exited(index) {
            bail!("etcd exited ({status})");
        }
        match cfg.connect().await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let members = tokio::time::timeout(Duration::from_secs(10), client.member_list())
        .await
        .context("etcd did not list its members")??;
    if !members.members().iter().any(|m| m.name() == member) {
        bail!("another etcd answers on that port");
    }
    Ok(client)
}

impl Drop for Started {
    /// On a failed `up`, stop whatever was already started, newest first.
    fn drop(&mut self) {
        for index in (0..self.children.len()).rev() {
            self.stop(index);
        }
        for path in &self.mount_points {
            twinfs_fuse::mount::detach_all(path);
        }
    }
}

/// The last `lines` lines of a log file (empty if it cannot be read).
fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// What `dev-cluster up` starts.
pub struct UpOptions {
    pub nodes: usize,
    pub lease_ttl: u64,
    /// Mounts of `volume` to start (0: no volume is created).
    pub mounts: usize,
    pub volume: String,
    /// Extra arguments for every node.
    pub node_args: Vec<String>,
}

pub async fn up(dir: &Path, opts: &UpOptions) -> Result<()> {
    let (n, lease_ttl) = (opts.nodes, opts.lease_ttl);
    if n == 0 || n > 64 {
        bail!("--nodes must be between 1 and 64");
    }
    if opts.mounts > 16 {
        bail!("--mounts must be at most 16");
    }
    if opts.mounts > 0 {
        twinfs_fuse::volume::validate_name(&opts.volume)?;
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let marker = dir.display().to_string();
    let cluster_json = dir.join("cluster.json");
    if let Ok(existing) = ClusterFile::load(&cluster_json) {
        if is_ours(existing.etcd.pid, &marker)
            || existing.nodes.iter().any(|n| is_ours(n.pid, &marker))
        {
            bail!("a dev cluster is already running in {}; run `twinfs dev-cluster down --dir {}` first", dir.display(), dir.display());
        }
    }
    let etcd_bin = find_etcd()?;
    let exe = std::env::current_exe().context("finding the twinfs executable")?;
    let mut started = Started {
        children: Vec::new(),
        mount_points: Vec::new(),
    };

    // etcd, on free loopback ports, with a fresh data directory. A port found free may be
    // taken by someone else before etcd binds it (several `up`s at once, as the test suite
    // runs them): then the etcd answering there is not ours, which the member name (unique per
    // attempt) shows; that attempt is stopped and another made on other ports. Seen once in a
    // test run: a cluster's `up` found "volume uploads already exists" in another cluster's etcd.
    let etcd_dir = dir.join("etcd");
    let mut attempt = 0;
    let (client_url, etcd_pid, etcd_cfg, etcd) = loop {
        attempt += 1;
        let _ = fs::remove_dir_all(&etcd_dir);
        fs::create_dir_all(&etcd_dir)?;
        let client_port = free_tcp_port()?;
        let peer_port = free_tcp_port()?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        // Unique among `up`s running at once: they are different processes.
        let member = format!("twinfs-dev-{}-{attempt}", std::process::id());
        let mut etcd_cmd = Command::new(&etcd_bin);
        if std::env::var_os("GOGC").is_none() {
            // etcd's CPU per request is the floor under every metadata operation on a small
            // machine; Go's collector at its default (GOGC=100) took 10-20 % of it (etcd-bench,
            // transactions 0.95 -> 0.75 ms of etcd CPU at GOGC=400, 2-core VM), for a heap that
            // stays tens of MiB here. A GOGC set by the caller wins.
            etcd_cmd.env("GOGC", ETCD_GOGC);
        }
        if std::env::var_os("GOMAXPROCS").is_none() {
            // Here etcd shares the machine with the nodes and the mounts: half its cores. On a
            // 2-core VM, etcd with 1 instead of 2 (A/B, 3 rounds each, etcd restarted between):
            // WordPress-tree tar 1.86 vs 2.16 s, 600 uploads verified 848 vs 757 files/s, writes
            // and 8-process creates unchanged (292 vs 294 files/s, 2,455 vs 2,441 creates/s): a
            // read's few hundred microseconds of etcd work no longer hop between cores. A
            // GOMAXPROCS set by the caller wins.
            etcd_cmd.env("GOMAXPROCS", etcd_gomaxprocs().to_string());
        }
        let etcd_child = spawn_background(
            etcd_cmd
                .arg(format!("--name={member}"))
                .arg(format!("--data-dir={}", etcd_dir.join("data").display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster={member}={peer_url}"))
                .arg(format!("--initial-cluster-token={member}"))
                .arg("--auto-compaction-mode=periodic")
                .arg("--auto-compaction-retention=1h")
                .arg("--log-level=warn"),
            &etcd_dir.join("etcd.log"),
        )?;
        let (etcd_index, etcd_pid) = started.push(etcd_child);
        let etcd_cfg = EtcdConfig {
            endpoints: vec![client_url.clone()],
            ..Default::default()
        };
        match own_etcd(&etcd_cfg, &member, &mut started, etcd_index).await {
            Ok(etcd) => break (client_url, etcd_pid, etcd_cfg, etcd),
            Err(e) if attempt < 5 => {
                eprintln!("etcd on {client_url}: {e:#}; trying other ports");
                started.stop(etcd_index);
            }
            Err(e) => {
                return Err(e.context(format!(
                    "etcd did not come up; see {}",
                    etcd_dir.join("etcd.log").display()
                )))
            }
        }
    };

    // Certificates: a fresh CA, one client certificate, one per node.
    let ca_dir = dir.join("ca");
    let _ = fs::remove_dir_all(&ca_dir);
    pki::init_ca(&ca_dir, "dev-cluster")?;
    let client_cert_dir = dir.join("client");
    pki::issue_cert(&ca_dir, "admin", CertRole::Client, &client_cert_dir)?;

    let spawn_node = |addr: SocketAddr, data_dir: &Path, tls_dir: &Path, log: &Path| {
        spawn_background(
            Command::new(&exe)
                .arg("node")
                .arg("--data-dir")
                .arg(data_dir)
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--etcd")
                .arg(&client_url)
                .arg("--tls-dir")
                .arg(tls_dir)
                .arg("--lease-ttl")
                .arg(lease_ttl.to_string())
                .args(&opts.node_args),
            log,
        )
    };
    let mut nodes: Vec<StartedNode> = Vec::new();
    for i in 0..n {
        let node_dir = dir.join("nodes").join(format!("node-{i}"));
        let data_dir = node_dir.join("data");
        let tls_dir = node_dir.join("tls");
        let _ = fs::remove_dir_all(&node_dir);
        fs::create_dir_all(&data_dir)?;
        pki::issue_cert(&ca_dir, &format!("node-{i}"), CertRole::Node, &tls_dir)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
        let log = node_dir.join("node.log");
        let (child, _) = started.push(spawn_node(addr, &data_dir, &tls_dir, &log)?);
        nodes.push(StartedNode {
            child,
            addr,
            data_dir,
            tls_dir,
            log,
        });
    }

    // Wait for every node to register. A node that exits first most likely lost its port
    // (found free, then taken before it bound it, as the etcd ports above): it is started
    // again on another port, up to 3 times.
    let membership = Membership::watch(etcd).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut restarts = 0;
    let all_registered = |nodes: &[StartedNode], live: &[NodeRecord]| {
        nodes.iter().all(|n| live.iter().any(|r| r.addr == n.addr))
    };
    loop {
        if all_registered(&nodes, &membership.live()) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "not every node registered within 30 s; see the node logs under {}",
                dir.join("nodes").display()
            );
        }
        for node in nodes.iter_mut() {
            let Some(status) = started.exited(node.child) else {
                continue;
            };
            if restarts == 3 {
                bail!(
                    "node {} exited ({status}); see {}",
                    node.addr,
                    node.log.display()
                );
            }
            restarts += 1;
            let addr: SocketAddr = format!("127.0.0.1:{}", free_udp_port()?).parse()?;
            eprintln!(
                "node on {} exited ({status}); starting it again on {addr}",
                node.addr
            );
            let (child, _) =
                started.push(spawn_node(addr, &node.data_dir, &node.tls_dir, &node.log)?);
            node.child = child;
            node.addr = addr;
        }
        membership
            .wait_until(Duration::from_millis(200), |live| {
                all_registered(&nodes, live)
            })
            .await;
    }
    let live = membership.live();
    let etcd_client = etcd_cfg.connect().await?;
    let mut entries = Vec::new();
    for node in nodes {
        let id = live
            .iter()
            .find(|r| r.addr == node.addr)
            .map(|r| r.id.clone())
            .context("node vanished after registering")?;
        entries.push(NodeEntry {
            id,
            pid: started.children[node.child].id(),
            addr: node.addr.to_string(),
            data_dir: node.data_dir,
            tls_dir: node.tls_dir,
            log: node.log,
        });
    }
    let mut file = ClusterFile {
        etcd: EtcdEntry {
            endpoints: vec![client_url],
            pid: etcd_pid,
            data_dir: etcd_dir,
        },
        nodes: entries,
        mounts: Vec::new(),
        ca_dir,
        client_cert_dir,
        lease_ttl_secs: lease_ttl,
    };
    file.save(&cluster_json)?;

    // A volume and M mounts of it, each its own process (as on different nodes).
    if opts.mounts > 0 {
        twinfs_fuse::volume::create(&etcd_client, &opts.volume, 2, None).await?;
        let mount_command = |path: &Path| {
            let mut cmd = Command::new(&exe);
            cmd.arg("--cluster")
                .arg(&cluster_json)
                .arg("mount")
                .arg(&opts.volume)
                .arg(path)
                .arg("--foreground");
            cmd
        };
        // Index into `started` of each mount's process.
        let mut mount_children = Vec::new();
        for i in 0..opts.mounts {
            let path = dir.join("mnt").join(format!("mount-{i}"));
            twinfs_fuse::mount::detach_all(&path);
            fs::create_dir_all(&path)?;
            started.mount_points.push(path.clone());
            let log = dir.join("mnt").join(format!("mount-{i}.log"));
            let (index, pid) = started.push(spawn_background(&mut mount_command(&path), &log)?);
            mount_children.push(index);
            file.mounts.push(MountEntry {
                path,
                pid,
                volume: opts.volume.clone(),
                log: Some(log),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for (i, child_index) in mount_children.iter_mut().enumerate() {
            let mut retried = false;
            while twinfs_fuse::mount::mount_state(&file.mounts[i].path)
                != twinfs_fuse::mount::MountState::Live
            {
                let exited = started.exited(*child_index);
                if exited.is_none() && Instant::now() <= deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let m = &file.mounts[i];
                let log = m.log.clone().unwrap_or_default();
                let tail = log_tail(&log, 8);
                if let Some(status) = &exited {
                    if !retried && Instant::now() < deadline {
                        // A mount that fails on its own before mounting (e.g. etcd briefly
                        // unreachable under load) gets one more try; its log is kept.
                        eprintln!(
                            "mount at {} exited ({status}) before mounting; starting it again. Its log:\n{tail}",
                            m.path.display()
                        );
                        retried = true;
                        let retry_log = log.with_extension("retry.log");
                        let (index, pid) = started
                            .push(spawn_background(&mut mount_command(&m.path), &retry_log)?);
                        *child_index = index;
                        file.mounts[i].pid = pid;
                        file.mounts[i].log = Some(retry_log);
                        continue;
                    }
                }
                let what = match &exited {
                    Some(status) => format!("exited ({status})"),
                    None => "was not mounted within 30 s".to_string(),
                };
                bail!(
                    "mount at {} {what}; the end of {}:\n{tail}",
                    m.path.display(),
                    log.display()
                );
            }
        }
        file.save(&cluster_json)?;
    }
    // Success: leave every process running (dropping a Child neither kills nor waits).
    started.children.clear();
    started.mount_points.clear();
    println!(
        "dev cluster up: etcd at {} and {n} nodes",
        file.etcd.endpoints[0]
    );
    for node in &file.nodes {
        println!("  node {} at {} (pid {})", node.id, node.addr, node.pid);
    }
    for m in &file.mounts {
        println!(
            "  volume {} mounted at {} (pid {})",
            m.volume,
            m.path.display(),
            m.pid
        );
    }
    println!("cluster file: {}", cluster_json.display());
    println!(
        "try: export TWINFS_CLUSTER={}; twinfs status",
        cluster_json.display()
    );
    Ok(())
}

pub fn down(dir: &Path) -> Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{} does not exist", dir.display()))?;
    let marker = dir.display().to_string();
    let file = ClusterFile::load(&dir.join("cluster.json"))?;
    // Mounts first (they flush into nodes), then nodes (they deregister from etcd), then etcd.
    for m in &file.mounts {
        stop(m.pid, &marker, Duration::from_secs(15));
        // A mount whose process died (kill -9) leaves a dead mount point behind.
        twinfs_fuse::mount::detach_all(&m.path);
    }
    for n in &file.nodes {
        stop(n.pid, &marker, Duration::from_secs(10));
    }
    stop(file.etcd.pid, &marker, Duration::from_secs(10));
    println!("dev cluster in {} stopped", dir.display());
    Ok(())
}
