//! A twinfs cluster spread over Linux network namespaces, for failover tests (issue 4).
//!
//! Layout of one [`NetCluster`] (TAG is `twfo-PID-N`: the test's PID and a per-process
//! counter, so namespaces of concurrent runs and tests never meet; interface names such as
//! `br0`, `v-n0` and `eth0` need no tag since each exists only inside this run's namespaces):
//!
//! ```text
//!   netns TAG-br:   bridge br0 (no address), one veth end per member: v-etcd, v-n0.., v-c0.., v-adm
//!   netns TAG-etcd: eth0 10.213.0.2    etcd
//!   netns TAG-nI:   eth0 10.213.0.10+I twinfs node I (QUIC on :7480)
//!   netns TAG-cJ:   eth0 10.213.0.100+J client J: `twinfs mount` processes
//!   netns TAG-adm:  eth0 10.213.0.3    admin commands (`twinfs status`, `volume create`, ...)
//! ```
//!
//! Every interface and address lives in a namespace this harness created; the root namespace
//! gets nothing, so the fixed 10.213.0.0/24 cannot clash with the host or with another run.
//!
//! Processes are started as `nsenter --net=/run/netns/NS -- PROGRAM ...`: nsenter execs PROGRAM
//! (no fork), so the child's PID is the program's, and it changes only the network namespace.
//! (`ip netns exec` would also give the process a private mount namespace, and FUSE mounts made
//! there would be invisible to the test.)
//!
//! All processes of one cluster run the same `twinfs` build, a hard link made at start (see
//! [`snapshot_binary`]), even if `cargo build` replaces target/debug/twinfs meanwhile.
//!
//! Everything is undone on drop, also when the test panicked: mount processes are stopped
//! (SIGTERM, then SIGKILL), dead mounts detached with `umount -l` until none is left (a killed
//! mount process leaves a dead mount that may be stacked), nodes and etcd killed by PID, tmpfs
//! data directories detached, veths and namespaces (and with them the bridge) deleted.

#![allow(dead_code)]

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const TWINFS: &str = env!("CARGO_BIN_EXE_twinfs");

/// The volume every [`NetCluster`] creates.
pub const VOLUME: &str = "uploads";
const SUBNET: &str = "10.213.0";
const NODE_PORT: u16 = 7480;
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Runs `cmd`, panicking with its output when it cannot be run or fails.
fn must(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd` for cleanup: failures are ignored (the thing may already be gone).
fn quiet(cmd: &mut Command) {
    let _ = cmd.stdout(Stdio::null()).stderr(Stdio::null()).status();
}

fn ip() -> Command {
    Command::new("ip")
}

pub use crate::common::{detach_all, is_mounted, log_tail, wait_for};

/// A hard link to the `twinfs` binary inside `dir`, so that every process of one cluster runs the
/// same build even if `cargo build` replaces target/debug/twinfs meanwhile (cargo writes a new
/// file; the link keeps the old one). Falls back to the binary itself when linking fails (e.g.
/// the temp dir is on another filesystem).
pub fn snapshot_binary(dir: &Path) -> PathBuf {
    let link = dir.join("twinfs");
    match std::fs::hard_link(TWINFS, &link) {
        Ok(()) => link,
        Err(_) => PathBuf::from(TWINFS),
    }
}

/// One process started in a network namespace, restartable with the same arguments.
pub struct NsProc {
    pub label: String,
    netns: String,
    program: PathBuf,
    args: Vec<OsString>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl NsProc {
    fn new(label: &str, netns: &str, program: impl AsRef<Path>, log: PathBuf) -> NsProc {
        NsProc {
            label: label.to_string(),
            netns: netns.to_string(),
            program: program.as_ref().to_path_buf(),
            args: Vec::new(),
            log,
            child: None,
        }
    }

    fn arg(&mut self, a: impl Into<OsString>) -> &mut NsProc {
        self.args.push(a.into());
        self
    }

    /// Starts (or starts again) the process; its output is appended to its log.
    fn spawn(&mut self) {
        assert!(
            self.child.is_none(),
            "{} is already running (pid {:?})",
            self.label,
            self.pid()
        );
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.log.display()));
        let err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("duplicating the log descriptor: {e}"));
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(&self.program)
            .args(&self.args)
            .env_remove("TWINFS_CLUSTER")
            .env_remove("TWINFS_ETCD")
            .env_remove("TWINFS_TLS_DIR")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} in netns {}: {e}", self.label, self.netns));
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process still runs (reaps it if it has exited).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our own child and
            // has not been reaped (we hold its `Child`), so it cannot have been recycled.
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// SIGTERM; waits up to `grace` for the exit, then SIGKILL. True if it exited by itself.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        if !self.running() {
            return true;
        }
        self.signal(libc::SIGTERM);
        let exited = wait_for(grace, || !self.running()).is_some();
        if !exited {
            self.kill9();
        }
        exited
    }
}

/// A twinfs node in its own network namespace.
pub struct NetNode {
    pub index: usize,
    pub netns: String,
    /// The veth end in the bridge namespace.
    pub bridge_if: String,
    pub ip: String,
    pub addr: String,
    pub data_dir: PathBuf,
    pub tls_dir: PathBuf,
    /// The node's stable id, once it has registered.
    pub id: String,
    /// The data directory is a tmpfs of this many MiB (for disk-full tests).
    pub tmpfs_mib: Option<u64>,
    pub proc: NsProc,
}

/// One `twinfs mount` process in a client namespace.
pub struct NetMount {
    pub path: PathBuf,
    pub client: usize,
    pub proc: NsProc,
}

/// What [`NetCluster::start_with`] builds.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// `--lease-ttl` of every node: how soon a silent node counts as dead.
    pub lease_ttl: u64,
    /// (node index, MiB): that node's data directory is a `tmpfs -o size=MiB` of its own.
    pub tmpfs_nodes: Vec<(usize, u64)>,
    /// Replicas of the volume.
    pub replicas: usize,
    /// Extra flags for every `twinfs node` (e.g. "--repair-grace=5s").
    pub node_args: Vec<String>,
}

impl ClusterOptions {
    pub fn new(nodes: usize) -> ClusterOptions {
        ClusterOptions {
            nodes,
            lease_ttl: 5,
            tmpfs_nodes: Vec::new(),
            replicas: 2,
            node_args: Vec::new(),
        }
    }
}

/// Which end of a member's veth pair to switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkSide {
    /// `eth0` inside the member's namespace: its own sockets see the network vanish.
    Member,
    /// The bridge port: the cable is pulled, peers' packets are dropped silently.
    Bridge,
}

pub struct NetCluster {
    pub dir: tempfile::TempDir,
    /// The `twinfs` binary every process of this cluster runs (see [`snapshot_binary`]).
    pub bin: PathBuf,
    /// Prefix of every namespace name: `twfo-PID-N`.
    pub tag: String,
    bridge_ns: String,
    admin_ns: String,
    /// Namespaces created, in order (deleted in reverse on drop).
    namespaces: Vec<String>,
    /// Bridge-side veth names created.
    veths: Vec<String>,
    tmpfs_mounts: Vec<PathBuf>,
    /// Client namespaces by index.
    clients: Vec<Option<String>>,
    pub etcd_ip: String,
    etcd: Option<NsProc>,
    pub nodes: Vec<NetNode>,
    pub mounts: Vec<NetMount>,
    pub ca_dir: PathBuf,
    pub client_dir: PathBuf,
    pub opts: ClusterOptions,
}

impl NetCluster {
    /// `n` nodes with a 5 s lease and a volume "uploads" with 2 replicas.
    pub fn start(n: usize) -> NetCluster {
        NetCluster::start_with(ClusterOptions::new(n))
    }

    pub fn start_with(opts: ClusterOptions) -> NetCluster {
        assert!((1..=64).contains(&opts.nodes), "1 to 64 nodes");
        let tag = format!(
            "twfo-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::Builder::new()
            .prefix(&format!("twinfs-failover-{}-", std::process::id()))
            .tempdir()
            .expect("creating the test's temp dir");
        let base = dir.path().to_path_buf();
        // The struct exists from here on, so a panic below still cleans up what was made.
        let bin = snapshot_binary(&base);
        let mut c = NetCluster {
            dir,
            bin,
            bridge_ns: format!("{tag}-br"),
            admin_ns: format!("{tag}-adm"),
            tag,
            namespaces: Vec::new(),
            veths: Vec::new(),
            tmpfs_mounts: Vec::new(),
            clients: Vec::new(),
            etcd_ip: format!("{SUBNET}.2"),
            etcd: None,
            nodes: Vec::new(),
            mounts: Vec::new(),
            ca_dir: base.join("ca"),
            client_dir: base.join("client"),
            opts: opts.clone(),
        };

        // The bridge, in a namespace of its own.
        let br = c.bridge_ns.clone();
        c.add_netns(&br);
        must(ip().args(["-n", &br, "link", "add", "br0", "type", "bridge"]));
        must(ip().args(["-n", &br, "link", "set", "br0", "up"]));

        // Certificates (no network needed: made in the root namespace).
        must(
            Command::new(&c.bin)
                .args(["ca", "init", "--name", "failover", "--dir"])
                .arg(&c.ca_dir),
        );
        c.issue_cert("admin", "client", &c.client_dir.clone());

        // etcd.
        let etcd_ns = format!("{}-etcd", c.tag);
        c.add_member(&etcd_ns, "v-etcd", &c.etcd_ip.clone());
        let adm = c.admin_ns.clone();
        c.add_member(&adm, "v-adm", &format!("{SUBNET}.3"));
        let etcd_dir = base.join("etcd");
        std::fs::create_dir_all(&etcd_dir).expect("creating etcd's directory");
        let client_url = c.etcd_url();
        let peer_url = format!("http://{}:{ETCD_PEER_PORT}", c.etcd_ip);
        let mut etcd = NsProc::new("etcd", &etcd_ns, "etcd", etcd_dir.join("etcd.log"));
        etcd.arg("--name=e")
            .arg(format!("--data-dir={}", etcd_dir.join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=e={peer_url}"))
            .arg("--auto-compaction-mode=periodic")
            .arg("--auto-compaction-retention=1h")
            .arg("--log-level=warn");
        etcd.spawn();
        c.etcd = Some(etcd);
        c.wait_etcd(Duration::from_secs(20));

        // Nodes.
        for i in 0..opts.nodes {
            let netns = format!("{}-n{i}", c.tag);
            let bridge_if = format!("v-n{i}");
            let node_ip = format!("{SUBNET}.{}", 10 + i);
            c.add_member(&netns, &bridge_if, &node_ip);
            let node_dir = base.join(format!("node-{i}"));
            let data_dir = node_dir.join("data");
            let tls_dir = node_dir.join("tls");
            std::fs::create_dir_all(&data_dir).expect("creating a node's data dir");
            let tmpfs_mib = opts
                .tmpfs_nodes
                .iter()
                .find(|(n, _)| *n == i)
                .map(|(_, mib)| *mib);
            if let Some(mib) = tmpfs_mib {
                must(
                    Command::new("mount")
                        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "twinfs-test"])
                        .arg(&data_dir),
                );
                c.tmpfs_mounts.push(data_dir.clone());
            }
            c.issue_cert(&format!("node-{i}"), "node", &tls_dir);
            let addr = format!("{node_ip}:{NODE_PORT}");
            let mut proc = NsProc::new(
                &format!("node-{i}"),
                &netns,
                &c.bin,
                node_dir.join("node.log"),
            );
            proc.arg("node")
                .arg("--data-dir")
                .arg(&data_dir)
                .arg("--listen")
                .arg(&addr)
                .arg("--etcd")
                .arg(&client_url)
                .arg("--tls-dir")
                .arg(&tls_dir)
                .arg("--lease-ttl")
                .arg(opts.lease_ttl.to_string());
            for a in &opts.node_args {
                proc.arg(a);
            }
            proc.spawn();
            c.nodes.push(NetNode {
                index: i,
                netns,
                bridge_if,
                ip: node_ip,
                addr,
                data_dir,
                tls_dir,
                id: String::new(),
                tmpfs_mib,
                proc,
            });
        }
        for i in 0..opts.nodes {
            c.wait_node_alive(i, Duration::from_secs(30));
        }
        c.twinfs_ok(&[
            "volume",
            "create",
            VOLUME,
            "--replicas",
            &opts.replicas.to_string(),
        ]);
        c
    }

    pub fn etcd_url(&self) -> String {
        format!("http://{}:{ETCD_CLIENT_PORT}", self.etcd_ip)
    }

    fn issue_cert(&self, name: &str, role: &str, out: &Path) {
        must(
            Command::new(&self.bin)
                .args(["cert", "issue", "--ca"])
                .arg(&self.ca_dir)
                .args(["--name", name, "--role", role, "--out"])
                .arg(out),
        );
    }

    fn add_netns(&mut self, name: &str) {
        must(ip().args(["netns", "add", name]));
        self.namespaces.push(name.to_string());
        must(ip().args(["-n", name, "link", "set", "lo", "up"]));
    }

    /// A namespace `netns` joined to the bridge by a veth pair (`bridge_if` on the bridge side,
    /// `eth0` inside), with address `addr`/24.
    fn add_member(&mut self, netns: &str, bridge_if: &str, addr: &str) {
        assert!(bridge_if.len() < 15, "interface name {bridge_if} too long");
        self.add_netns(netns);
        let br = self.bridge_ns.clone();
        must(ip().args([
            "-n", &br, "link", "add", bridge_if, "type", "veth", "peer", "name", "eth0", "netns",
            netns,
        ]));
        self.veths.push(bridge_if.to_string());
        must(ip().args(["-n", &br, "link", "set", bridge_if, "master", "br0", "up"]));
        must(ip().args([
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]));
        must(ip().args(["-n", netns, "link", "set", "eth0", "up"]));
    }

    // ---- admin commands ----------------------------------------------------------------

    /// `twinfs ARGS` against this cluster, run in the admin namespace.
    pub fn twinfs(&self, args: &[&str]) -> Output {
        self.twinfs_timeout(args, Duration::from_secs(60))
    }

    /// As [`NetCluster::twinfs`], killed after `timeout` (then its status is a failure).
    pub fn twinfs_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        let dir = self.dir.path();
        let out_path = dir.join(format!(
            "admin-{}.out",
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let err_path = out_path.with_extension("err");
        let out = File::create(&out_path).expect("creating an admin output file");
        let err = File::create(&err_path).expect("creating an admin output file");
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.admin_ns))
            .arg("--")
            .arg(&self.bin)
            .arg("--etcd")
            .arg(self.etcd_url())
            .arg("--tls-dir")
            .arg(&self.client_dir)
            .args(args)
            .env_remove("TWINFS_CLUSTER")
            .env_remove("TWINFS_ETCD")
            .env_remove("TWINFS_TLS_DIR")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting twinfs {args:?}: {e}"));
        let mut status = None;
        wait_for(timeout, || match child.try_wait() {
            Ok(Some(s)) => {
                status = Some(s);
                true
            }
            Ok(None) => false,
            Err(_) => true,
        });
        let status = match status {
            Some(s) => s,
            None => {
                let _ = child.kill();
                child.wait().expect("reaping an admin command")
            }
        };
        let stdout = std::fs::read(&out_path).unwrap_or_default();
        let mut stderr = std::fs::read(&err_path).unwrap_or_default();
        if !status.success() && status.code().is_none() {
            stderr.extend_from_slice(format!("\n(killed after {timeout:?})").as_bytes());
        }
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        Output {
            status,
            stdout,
            stderr,
        }
    }

    /// `twinfs ARGS`, which must succeed; its standard output.
    pub fn twinfs_ok(&self, args: &[&str]) -> String {
        let out = self.twinfs(args);
        assert!(
            out.status.success(),
            "twinfs {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `twinfs status --json`, or None when it fails (etcd away, ...).
    pub fn status_json(&self) -> Option<Value> {
        let out = self.twinfs_timeout(&["status", "--json"], Duration::from_secs(20));
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice::<Value>(&out.stdout).ok()
    }

    /// The nodes listed by `twinfs status --json` (its "nodes" list, or the whole answer when
    /// that is a list), or None when it fails.
    pub fn status(&self) -> Option<Vec<Value>> {
        let v = self.status_json()?;
        v.get("nodes").unwrap_or(&v).as_array().cloned()
    }

    /// Node `i`'s state per `twinfs status` ("alive", "dead", "stopped"), None if unknown.
    pub fn node_state(&self, i: usize) -> Option<String> {
        let addr = &self.nodes[i].addr;
        self.status()?
            .iter()
            .find(|n| n["addr"].as_str() == Some(addr))
            .and_then(|n| n["state"].as_str().map(str::to_string))
    }

    /// Index of the node with id `id`.
    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    // ---- etcd --------------------------------------------------------------------------

    pub fn wait_etcd(&self, timeout: Duration) {
        let ok = wait_for(timeout, || self.status().is_some());
        assert!(
            ok.is_some(),
            "etcd did not answer within {timeout:?}; its log:\n{}",
            self.etcd
                .as_ref()
                .map(|e| log_tail(&e.log, 20))
                .unwrap_or_default()
        );
    }

    pub fn etcd_pid(&self) -> Option<u32> {
        self.etcd.as_ref().and_then(NsProc::pid)
    }

    /// SIGTERM to etcd; waits for it to exit (SIGKILL after 10 s).
    pub fn stop_etcd(&mut self) {
        if let Some(e) = self.etcd.as_mut() {
            e.terminate(Duration::from_secs(10));
        }
    }

    /// Starts etcd again with the same data directory and addresses.
    pub fn start_etcd(&mut self) {
        if let Some(e) = self.etcd.as_mut() {
            e.spawn();
        }
    }

    /// Stops etcd (SIGTERM), waits `down`, starts it again, and waits until it answers.
    pub fn restart_etcd(&mut self, down: Duration) {
        self.stop_etcd();
        std::thread::sleep(down);
        self.start_etcd();
        self.wait_etcd(Duration::from_secs(20));
    }

    // ---- nodes -------------------------------------------------------------------------

    pub fn node_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].proc.pid()
    }

    /// Waits until node `i` is alive in `twinfs status`, and records its id; panics (with the
    /// end of its log) if it is not alive within `timeout`.
    pub fn wait_node_alive(&mut self, i: usize, timeout: Duration) -> Duration {
        match self.try_wait_node_alive(i, timeout) {
            Some(took) => took,
            None => {
                let node = &mut self.nodes[i];
                panic!(
                    "node {i} ({}) not alive within {timeout:?}; running: {}; its log:\n{}",
                    node.addr,
                    node.proc.running(),
                    log_tail(&node.proc.log, 30)
                );
            }
        }
    }

    /// As [`NetCluster::wait_node_alive`], but None instead of a panic.
    pub fn try_wait_node_alive(&mut self, i: usize, timeout: Duration) -> Option<Duration> {
        let addr = self.nodes[i].addr.clone();
        let mut id = None;
        let took = wait_for(timeout, || {
            id = self.status().and_then(|nodes| {
                nodes
                    .iter()
                    .find(|n| n["addr"].as_str() == Some(&addr) && n["state"] == "alive")
                    .and_then(|n| n["id"].as_str().map(str::to_string))
            });
            id.is_some()
        })?;
        if let Some(id) = id {
            self.nodes[i].id = id;
        }
        Some(took)
    }

    /// kill -9 of node `i` (reaped before returning).
    pub fn kill9_node(&mut self, i: usize) {
        self.nodes[i].proc.kill9();
    }

    /// SIGTERM to node `i` (a planned stop); waits for its exit. True if it exited within 15 s
    /// by itself (else it was killed).
    pub fn stop_node(&mut self, i: usize) -> bool {
        self.nodes[i].proc.terminate(Duration::from_secs(15))
    }

    /// Starts node `i` again: same data directory, address and certificate.
    pub fn start_node(&mut self, i: usize) {
        self.nodes[i].proc.spawn();
    }

    /// Stop (SIGTERM) and start again; waits up to 30 s until it is alive. Ok: the time from
    /// the signal to alive again; Err: what went wrong (with the end of its log).
    pub fn restart_node(&mut self, i: usize) -> Result<Duration, String> {
        let t = Instant::now();
        if !self.stop_node(i) {
            return Err(format!(
                "node {i} did not exit within 15 s of SIGTERM (killed); its log:\n{}",
                log_tail(&self.nodes[i].proc.log, 30)
            ));
        }
        self.start_node(i);
        match self.try_wait_node_alive(i, Duration::from_secs(30)) {
            Some(_) => Ok(t.elapsed()),
            None => Err(format!(
                "node {i} not alive within 30 s of its restart; its log:\n{}",
                log_tail(&self.nodes[i].proc.log, 30)
            )),
        }
    }

    pub fn node_running(&mut self, i: usize) -> bool {
        self.nodes[i].proc.running()
    }

    fn set_link(&self, netns: &str, bridge_if: &str, side: LinkSide, state: &str) {
        match side {
            LinkSide::Member => must(ip().args(["-n", netns, "link", "set", "eth0", state])),
            LinkSide::Bridge => {
                must(ip().args(["-n", &self.bridge_ns, "link", "set", bridge_if, state]))
            }
        };
    }

    /// Cuts node `i` off the network (its process keeps running).
    pub fn link_down(&self, i: usize, side: LinkSide) {
        let n = &self.nodes[i];
        self.set_link(&n.netns, &n.bridge_if, side, "down");
    }

    pub fn link_up(&self, i: usize, side: LinkSide) {
        let n = &self.nodes[i];
        self.set_link(&n.netns, &n.bridge_if, side, "up");
    }

    /// Cuts etcd off the network (its process keeps running).
    pub fn etcd_link(&self, side: LinkSide, up: bool) {
        let ns = format!("{}-etcd", self.tag);
        self.set_link(&ns, "v-etcd", side, if up { "up" } else { "down" });
    }

    // ---- mounts ------------------------------------------------------------------------

    /// The network namespace of client `i`, made on first use.
    pub fn client_netns(&mut self, i: usize) -> String {
        if self.clients.len() <= i {
            self.clients.resize(i + 1, None);
        }
        if let Some(ns) = &self.clients[i] {
            return ns.clone();
        }
        assert!(i < 100, "at most 100 clients");
        let ns = format!("{}-c{i}", self.tag);
        self.add_member(&ns, &format!("v-c{i}"), &format!("{SUBNET}.{}", 100 + i));
        self.clients[i] = Some(ns.clone());
        ns
    }

    /// Mounts the volume from client namespace `client` (default options); the mount path.
    pub fn mount(&mut self, client: usize) -> PathBuf {
        self.mount_with(client, &[])
    }

    /// Mounts the volume from client namespace `client`, with extra `twinfs mount` flags (e.g.
    /// `--cache-mb 8`). Returns once the mount process reports the mount live.
    pub fn mount_with(&mut self, client: usize, extra: &[&str]) -> PathBuf {
        let ns = self.client_netns(client);
        let k = self.mounts.len();
        let path = self.dir.path().join("mnt").join(format!("m{k}-c{client}"));
        std::fs::create_dir_all(&path).expect("creating a mount point");
        let log = self
            .dir
            .path()
            .join("mnt")
            .join(format!("m{k}-c{client}.log"));
        let mut proc = NsProc::new(&format!("mount-{k}"), &ns, &self.bin, log);
        proc.arg("--etcd")
            .arg(self.etcd_url())
            .arg("--tls-dir")
            .arg(&self.client_dir)
            .arg("mount")
            .arg(VOLUME)
            .arg(&path)
            .arg("--foreground");
        for a in extra {
            proc.arg(*a);
        }
        proc.spawn();
        self.mounts.push(NetMount {
            path: path.clone(),
            client,
            proc,
        });
        let m = self.mounts.last_mut().expect("the mount just pushed");
        let mut exited = false;
        let live = wait_for(Duration::from_secs(30), || {
            if !m.proc.running() {
                exited = true;
                return true;
            }
            is_mounted(&m.path)
                && std::fs::read_to_string(&m.proc.log)
                    .map(|t| t.contains("mounted volume"))
                    .unwrap_or(false)
        });
        assert!(
            live.is_some() && !exited,
            "mount {k} (client {client}) did not come up (exited: {exited}); its log:\n{}",
            log_tail(&m.proc.log, 30)
        );
        path
    }

    /// Stops mount `k` (SIGTERM: it flushes and unmounts) and detaches whatever is left.
    pub fn unmount(&mut self, k: usize) {
        let m = &mut self.mounts[k];
        m.proc.terminate(Duration::from_secs(15));
        detach_all(&m.path);
    }

    /// Stops every process this cluster started and removes every namespace, veth and mount.
    /// Idempotent; also what drop does.
    pub fn teardown(&mut self) {
        // Mounts first (they flush into nodes): SIGTERM all, then give them 5 s together.
        for m in &mut self.mounts {
            if m.proc.running() {
                m.proc.signal(libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for m in &mut self.mounts {
            while m.proc.running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            m.proc.kill9();
            detach_all(&m.path);
        }
        for n in &mut self.nodes {
            n.proc.kill9();
        }
        if let Some(e) = self.etcd.as_mut() {
            e.kill9();
        }
        for t in self.tmpfs_mounts.drain(..) {
            detach_all(&t);
        }
        for v in self.veths.drain(..) {
            quiet(ip().args(["-n", &self.bridge_ns, "link", "del", &v]));
        }
        for ns in self.namespaces.drain(..).rev() {
            quiet(ip().args(["netns", "del", &ns]));
        }
    }
}

impl Drop for NetCluster {
    fn drop(&mut self) {
        self.teardown();
    }
}
