//! Deployment behaviour, with real processes: the agent (`twinfs node --mount`) keeping a volume
//! mounted for pods, the `mount.fuse.twinfs` helper as fstab uses it, and the /metrics endpoint.
//!
//! A pod is emulated as Kubernetes' HostToContainer does it: a process in its own mount
//! namespace (`unshare -m --propagation slave`) that binds the host's mount directory, and the
//! volume's own directory, into its view. Everything runs as root (CI does).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A command with none of the caller's `TWINFS_*` settings: what these tests run must depend on
/// the arguments and files they give it, not on a cluster file left in the environment.
fn plain_command(program: &str) -> Command {
    let mut c = Command::new(program);
    for var in ["TWINFS_CLUSTER", "TWINFS_ETCD", "TWINFS_TLS_DIR"] {
        c.env_remove(var);
    }
    c
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free udp port")
        .port()
}

fn sh(cmd: &str) -> bool {
    plain_command("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// `twinfs node` with its own node certificate, mounting `uploads` at `mount_dir`, serving
/// metrics; killed and its mounts detached on drop.
struct Agent {
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    metrics: SocketAddr,
    mount_dir: PathBuf,
}

impl Agent {
    fn new(c: &DevCluster, mount_dir: &Path) -> Agent {
        let dir = c.dir.path();
        let tls = dir.join("agent-tls");
        let ca = c.json["ca_dir"].as_str().expect("ca_dir");
        run(twinfs()
            .args([
                "cert", "issue", "--ca", ca, "--name", "agent", "--role", "node",
            ])
            .arg("--out")
            .arg(&tls));
        let etcd = c.json["etcd"]["endpoints"][0]
            .as_str()
            .expect("etcd endpoint")
            .to_string();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port())
            .parse()
            .expect("addr");
        let args = vec![
            "node".to_string(),
            "--data-dir".into(),
            dir.join("agent-data").display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_udp_port()),
            "--etcd".into(),
            etcd,
            "--tls-dir".into(),
            tls.display().to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
            "--mount".into(),
            format!("uploads={}", mount_dir.display()),
        ];
        let mut a = Agent {
            args,
            log: dir.join("agent.log"),
            child: None,
            metrics,
            mount_dir: mount_dir.to_path_buf(),
        };
        a.start();
        a
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        self.child = Some(
            twinfs()
                .args(&self.args)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log fd"))
                .stderr(log)
                .spawn()
                .expect("starting the agent"),
        );
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for /readyz to say ready (node registered, volume mounted).
    fn wait_ready(&self, timeout: Duration) {
        let ready = wait_for(timeout, || {
            http_get(self.metrics, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        });
        assert!(
            ready.is_some(),
            "agent not ready within {timeout:?}; its log:\n{}",
            self.log_text()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        detach_all(&self.mount_dir);
    }
}

/// A host directory made a shared mount point, as the agent's Bidirectional hostPath is.
struct SharedHostDir(PathBuf);

impl SharedHostDir {
    fn new(path: PathBuf) -> SharedHostDir {
        std::fs::create_dir_all(&path).expect("host dir");
        let p = path.display().to_string();
        assert!(sh(&format!(
            "mount --bind '{p}' '{p}' && mount --make-shared '{p}'"
        )));
        SharedHostDir(path)
    }
}

impl Drop for SharedHostDir {
    fn drop(&mut self) {
        detach_all(&self.0.join("uploads"));
        detach_all(&self.0);
    }
}

/// A process in its own mount namespace whose mounts are slaves of the host's: a pod.
struct Pod(Child);

impl Pod {
    fn start() -> Pod {
        let child = plain_command("unshare")
            .args(["-m", "--propagation", "slave", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare");
        let pod = Pod(child);
        // The namespace exists once the process runs `sleep`.
        let pid = pod.0.id();
        let host_ns = std::fs::read_link("/proc/self/ns/mnt").expect("own mount ns");
        assert!(wait_for(Duration::from_secs(5), || {
            std::fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|ns| ns != host_ns)
        })
        .is_some());
        pod
    }

    /// Runs `cmd` with sh inside the pod's mount namespace; true when it succeeds.
    fn run(&self, cmd: &str) -> bool {
        plain_command("nsenter")
            .args(["-t", &self.0.id().to_string(), "-m", "sh", "-c", cmd])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn output(&self, cmd: &str) -> String {
        let out = plain_command("nsenter")
            .args(["-t", &self.0.id().to_string(), "-m", "sh", "-c", cmd])
            .output()
            .expect("nsenter");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_pod_regains_the_volume_after_the_agent_is_killed() {
    let c = DevCluster::up(2, 10);
    c.ok(&["volume", "create", "uploads"]);
    let host = SharedHostDir::new(c.dir.path().join("host"));
    let vol = host.0.join("uploads");
    std::fs::create_dir_all(&vol).expect("volume dir");

    // The pod starts before the volume is mounted, and binds the host's mount directory (as
    // a hostPath of /var/lib/twinfs/volumes with HostToContainer does).
    let pod = Pod::start();
    let pod_root = c.dir.path().join("pod-root");
    std::fs::create_dir_all(&pod_root).expect("pod dir");
    assert!(pod.run(&format!(
        "mount --rbind '{}' '{}' && mount --make-rslave '{}'",
        host.0.display(),
        pod_root.display(),
        pod_root.display()
    )));
    let in_pod = pod_root.join("uploads");

    let mut agent = Agent::new(&c, &vol);
    agent.wait_ready(Duration::from_secs(30));
    std::fs::write(vol.join("from-host.txt"), b"written on the host\n").expect("host write");
    let appeared = wait_for(Duration::from_secs(10), || {
        pod.output(&format!("cat '{}/from-host.txt'", in_pod.display())) == "written on the host\n"
    });
    assert!(
        appeared.is_some(),
        "the volume mounted after the pod started never appeared inside it"
    );

    // A second view binds the volume's directory itself (the WordPress manifest's hostPath of
    // /var/lib/twinfs/volumes/uploads): it holds the mount, not the directory under it.
    let direct = c.dir.path().join("pod-direct");
    std::fs::create_dir_all(&direct).expect("pod dir");
    assert!(pod.run(&format!(
        "mount --bind '{}' '{}'",
        vol.display(),
        direct.display()
    )));
    assert_eq!(
        pod.output(&format!("cat '{}/from-host.txt'", direct.display())),
        "written on the host\n"
    );

    agent.kill9();
    // The kill is real: listing the directory needs the dead process.
    assert!(
        !pod.run(&format!("ls '{}'", in_pod.display())),
        "the volume still answered after the agent was killed"
    );

    agent.start();
    let started = Instant::now();
    for (view, name) in [(&in_pod, "pod-a.txt"), (&direct, "pod-b.txt")] {
        let ok = wait_for(Duration::from_secs(10), || {
            pod.output(&format!("cat '{}/from-host.txt'", view.display()))
                == "written on the host\n"
                && pod.run(&format!(
                    "echo 'written by the pod' > '{}/{name}'",
                    view.display()
                ))
        });
        assert!(
            ok.is_some() && started.elapsed() < Duration::from_secs(10),
            "the pod could not read and write {} within 10 s of the agent's restart; agent log:\n{}",
            view.display(),
            agent.log_text()
        );
    }
    eprintln!(
        "pod regained read and write through both views {:?} after the agent restarted",
        started.elapsed()
    );
    // The pod's writes are in the volume, seen from the host.
    for name in ["pod-a.txt", "pod-b.txt"] {
        assert_eq!(
            std::fs::read_to_string(vol.join(name)).expect("host read"),
            "written by the pod\n"
        );
    }
}

/// Installs /sbin/mount.fuse.twinfs -> the twinfs under test for the test's duration (restoring
/// whatever was there).
struct HelperLink {
    path: PathBuf,
    saved: Option<PathBuf>,
}

impl HelperLink {
    fn install() -> HelperLink {
        let path = PathBuf::from("/sbin/mount.fuse.twinfs");
        let saved = std::fs::symlink_metadata(&path).ok().map(|_| {
            let backup = PathBuf::from("/sbin/.mount.fuse.twinfs.saved-by-test");
            std::fs::rename(&path, &backup).expect("saving the existing helper");
            backup
        });
        std::os::unix::fs::symlink(TWINFS, &path).expect("installing the helper");
        HelperLink { path, saved }
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(b) = &self.saved {
            let _ = std::fs::rename(b, &self.path);
        }
    }
}

fn mount_type(path: &Path) -> Option<String> {
    let want = path.display().to_string();
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (f.get(4) == Some(&want.as_str())).then(|| f[sep + 1].to_string())
    })
}

#[test]
fn mount_helper_mounts_as_fstab_would_and_umount_unmounts() {
    let c = DevCluster::up(2, 10);
    c.ok(&["volume", "create", "uploads"]);
    let _helper = HelperLink::install();
    let etcd = c.json["etcd"]["endpoints"][0].as_str().expect("etcd");
    let tls = c.client_cert_dir();
    let dir = c.dir.path().join("fstab-mnt");
    std::fs::create_dir_all(&dir).expect("dir");
    // A line as it would stand in /etc/fstab, in a file of its own (mount -T).
    let fstab = c.dir.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# twinfs test\nuploads {} fuse.twinfs _netdev,etcd={etcd},tls_dir={},log_file={} 0 0\n",
            dir.display(),
            tls.display(),
            c.dir.path().join("fstab-mount.log").display()
        ),
    )
    .expect("fstab");
    let out = plain_command("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&dir)
        .output()
        .expect("mount");
    assert!(
        out.status.success(),
        "mount -T fstab failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _guard = DetachOnDrop(dir.clone());
    assert_eq!(mount_type(&dir).as_deref(), Some("fuse.twinfs"));
    std::fs::write(dir.join("hello.txt"), b"via fstab\n").expect("write");
    assert_eq!(
        std::fs::read_to_string(dir.join("hello.txt")).expect("read"),
        "via fstab\n"
    );
    let out = plain_command("umount").arg(&dir).output().expect("umount");
    assert!(
        out.status.success(),
        "umount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&dir));

    // The same through mount -t with -o, and the file written before is there.
    let out = plain_command("mount")
        .args(["-t", "fuse.twinfs", "uploads"])
        .arg(&dir)
        .arg("-o")
        .arg(format!("etcd={etcd},tls_dir={}", tls.display()))
        .output()
        .expect("mount -t");
    assert!(
        out.status.success(),
        "mount -t fuse.twinfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("hello.txt")).expect("read"),
        "via fstab\n"
    );
    assert!(plain_command("umount")
        .arg(&dir)
        .status()
        .expect("umount")
        .success());
    // The mount process flushes, leaves and exits; the mount point is free again.
    assert!(wait_for(Duration::from_secs(10), || !is_mounted(&dir)).is_some());

    // A wrong option is refused with the reason, before anything is mounted.
    let out = plain_command("mount")
        .args(["-t", "fuse.twinfs", "uploads"])
        .arg(&dir)
        .args(["-o", "bogus=1"])
        .output()
        .expect("mount -t");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bogus"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&dir));
}

/// The value of one sample line `name{labels} value` in a scrape (0 when absent).
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[test]
fn metrics_count_a_workload() {
    // One node besides the agent: with 2 replicas the agent's node stores every block.
    let c = DevCluster::up(1, 10);
    c.ok(&["volume", "create", "uploads"]);
    let mnt = c.dir.path().join("agent-mnt");
    let agent = Agent::new(&c, &mnt);
    agent.wait_ready(Duration::from_secs(30));
    let before = http_get(agent.metrics, "/metrics").expect("scrape");
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    assert_eq!(sample(&before, "twinfs_mounts"), 1.0, "{before}");

    let data = random_bytes(3 << 20);
    std::fs::create_dir(mnt.join("d")).expect("mkdir");
    std::fs::write(mnt.join("d/f.bin"), &data).expect("write");
    assert!(std::fs::read(mnt.join("d/f.bin")).expect("read") == data);

    let after = http_get(agent.metrics, "/metrics").expect("scrape");
    let grew = |series: &str, by: f64| {
        let (b, a) = (sample(&before, series), sample(&after, series));
        assert!(
            a - b >= by,
            "{series}: {b} -> {a}, expected growth of at least {by}"
        );
    };
    grew("twinfs_fuse_written_bytes_total", data.len() as f64);
    grew("twinfs_fuse_ops_total{op=\"mkdir\"}", 1.0);
    grew("twinfs_fuse_ops_total{op=\"create\"}", 1.0);
    grew("twinfs_client_requests_total{op=\"put\"}", 1.0);
    grew("twinfs_client_written_bytes_total", 2.0 * data.len() as f64);
    grew("twinfs_node_requests_total{op=\"put\"}", 1.0);
    grew("twinfs_node_received_bytes_total", data.len() as f64);
    grew("twinfs_etcd_requests_total{op=\"txn\"}", 2.0);
    assert!(after.contains("twinfs_fuse_ops_seconds_bucket{"), "{after}");
    assert!(after.contains("twinfs_blocks_under_replicated "), "{after}");
    assert!(http_get(agent.metrics, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
}
