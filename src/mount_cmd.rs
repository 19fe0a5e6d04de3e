//! `twinfs mount` and `twinfs umount`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use twinfs_fuse::mount::{self, MountConfig};

use crate::{resolve_conn, ConnArgs};

#[derive(Args, Clone)]
pub struct MountArgs {
    /// The volume to mount (see `twinfs volume list`).
    pub volume: String,
    /// An existing, empty directory.
    pub dir: PathBuf,
    /// Stay in the foreground (logs to stderr) instead of detaching into the background.
    #[arg(short, long)]
    pub foreground: bool,
    /// Where a background mount writes its log (default: /var/log/twinfs/mount-VOLUME-DIR.log,
    /// DIR the mount point's path with `/` as `-`; the temporary directory when that is not
    /// writable).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Seconds the kernel may cache attributes and directory entries. Other nodes' changes are
    /// pushed out of the cache at once by an etcd watch; this bounds staleness if the watch is cut.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub attr_timeout: f64,
    /// MiB of file data (blocks) cached in memory.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub cache_mb: usize,
    /// MiB one open file may buffer before it writes its blocks out by itself.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    pub write_buffer_mb: usize,
    /// Threads reading FUSE requests (each with its own /dev/fuse descriptor).
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Seconds an operation keeps retrying while etcd is unreachable before it fails with EIO
    /// (applications then see the error instead of waiting). Up to a day, for those that would
    /// rather wait.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub etcd_timeout: f64,
    /// Serve Prometheus /metrics (FUSE operations, etcd round trips and block requests, with
    /// latency histograms) and /healthz, /readyz on ADDR, e.g. 127.0.0.1:9481.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Serves the process's metrics on `addr` from a thread of its own; fails if it cannot bind.
fn serve_metrics(
    addr: std::net::SocketAddr,
    health: std::sync::Arc<twinfs_cluster::metrics::Health>,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("metrics runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let bound = twinfs_cluster::metrics::serve(addr, health).await;
                let ok = bound.is_ok();
                let _ = tx.send(bound);
                if ok {
                    std::future::pending::<()>().await;
                }
            });
        })
        .context("starting the metrics thread")?;
    let local = rx
        .recv()
        .context("the metrics thread ended before binding")??;
    tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
    Ok(())
}

pub fn mount(conn: &ConnArgs, args: MountArgs) -> Result<()> {
    if !(0.0..=3600.0).contains(&args.attr_timeout) {
        bail!("--attr-timeout must be between 0 and 3600 seconds");
    }
    if !(1.0..=86400.0).contains(&args.etcd_timeout) {
        bail!("--etcd-timeout must be between 1 and 86400 seconds");
    }
    if args.cache_mb > 1 << 20 || args.write_buffer_mb == 0 || args.write_buffer_mb > 4096 {
        bail!("--cache-mb must be at most 1048576 and --write-buffer-mb between 1 and 4096");
    }
    if mount::mount_state(&args.dir) == mount::MountState::Live {
        bail!("{} is already a twinfs mount", args.dir.display());
    }
    let (etcd, tls_dir) = resolve_conn(conn)?;
    if !args.foreground {
        return daemonize(conn, &args);
    }
    let mut cfg = MountConfig::new(&args.volume, &args.dir, etcd, &tls_dir);
    cfg.attr_ttl = Duration::from_secs_f64(args.attr_timeout);
    cfg.cache_bytes = args.cache_mb << 20;
    cfg.write_buffer_bytes = args.write_buffer_mb << 20;
    cfg.fuse_threads = args.threads.clamp(1, 64);
    cfg.etcd_timeout = Duration::from_secs_f64(args.etcd_timeout);
    let volume = args.volume.clone();
    let dir = args.dir.clone();
    let health = std::sync::Arc::new(twinfs_cluster::metrics::Health::default());
    // Not a node: nothing to register, readiness is the mount's.
    health
        .node_registered
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let where_ = dir.display().to_string();
    health.set_mount(
        &volume,
        &where_,
        twinfs_cluster::metrics::MountHealth::Starting,
    );
    if let Some(addr) = args.metrics_addr {
        serve_metrics(addr, health.clone())?;
    }
    let mounted = health.clone();
    mount::run(
        cfg,
        move || {
            mounted.set_mount(
                &volume,
                &where_,
                twinfs_cluster::metrics::MountHealth::Mounted,
            );
            // The line a background parent waits for.
            println!("mounted volume {volume} at {}", dir.display());
            let _ = std::io::stdout().flush();
        },
        mount::shutdown_signal(),
    )
}

/// One log per mount point: two mounts of a volume on one host (two pods, a test) must not
/// interleave their lines, nor show each other's when one fails to start.
fn default_log(volume: &str, mount_dir: &Path) -> PathBuf {
    let name = format!("mount-{volume}-{}.log", path_slug(mount_dir));
    let dir = Path::new("/var/log/twinfs");
    if std::fs::create_dir_all(dir).is_ok() {
        return dir.join(name);
    }
    std::env::temp_dir().join(format!("twinfs-{name}"))
}

/// `path` (made absolute when it can be) as one file-name part: its components joined by
/// `-`, anything but ASCII letters, digits, `.`, `_` and `-` as `_`, at most 100 characters.
fn path_slug(path: &Path) -> String {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let slug: String = path
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if slug.is_empty() {
        "root".to_string()
    } else {
        slug
    }
}

/// Starts this same command again with `--foreground` in its own process group, with its log
/// in a file, and returns once it reports the mount live (or fails, with its log's last lines).
fn daemonize(conn: &ConnArgs, args: &MountArgs) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the twinfs executable")?;
    let log = args
        .log_file
        .clone()
        .unwrap_or_else(|| default_log(&args.volume, &args.dir));
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening log file {}", log.display()))?;
    let mut cmd = Command::new(exe);
    if let Some(c) = &conn.cluster {
        cmd.arg("--cluster").arg(c);
    }
    for e in &conn.etcd {
        cmd.arg("--etcd").arg(e);
    }
    if let Some(d) = &conn.tls_dir {
        cmd.arg("--tls-dir").arg(d);
    }
    cmd.arg("mount")
        .arg(&args.volume)
        .arg(&args.dir)
        .arg("--foreground")
        .arg("--attr-timeout")
        .arg(args.attr_timeout.to_string())
        .arg("--cache-mb")
        .arg(args.cache_mb.to_string())
        .arg("--write-buffer-mb")
        .arg(args.write_buffer_mb.to_string())
        .arg("--threads")
        .arg(args.threads.to_string())
        .arg("--etcd-timeout")
        .arg(args.etcd_timeout.to_string());
    if let Some(addr) = args.metrics_addr {
        cmd.arg("--metrics-addr").arg(addr.to_string());
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .process_group(0);
    let mut child = cmd.spawn().context("starting the mount process")?;
    let Some(out) = child.stdout.take() else {
        bail!("mount process has no stdout");
    };
    let mut line = String::new();
    let n = BufReader::new(out).read_line(&mut line).unwrap_or(0);
    if n > 0 && line.starts_with("mounted") {
        println!(
            "{} (pid {}, log {})",
            line.trim_end(),
            child.id(),
            log.display()
        );
        return Ok(());
    }
    let status = child.wait().ok();
    let tail = log_tail(&log, 5);
    bail!(
        "the mount process exited ({}) before mounting; last lines of {}:\n{tail}",
        status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown status".into()),
        log.display()
    )
}

/// The last `lines` lines of the log at `path`, read from at most its last 64 KiB (a log may be
/// huge); nothing for a log that is not a regular file (a device may never end).
fn log_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const TAIL_BYTES: u64 = 64 << 10;
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = match f.metadata() {
        Ok(m) if m.is_file() => m.len(),
        // A device (/dev/null, /dev/full) has no lines to show.
        _ => return String::new(),
    };
    if len > TAIL_BYTES && f.seek(SeekFrom::Start(len - TAIL_BYTES)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.take(TAIL_BYTES).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Unmounts the twinfs mount at `dir`, and then any dead ones a killed process left beneath it
/// (they only answer ENOTCONN).
pub fn umount(dir: &Path, lazy: bool) -> Result<()> {
    if mount::mount_state(dir) == mount::MountState::NotMounted {
        bail!("{} is not a twinfs mount", dir.display());
    }
    // Found before unmounting: afterwards the mount process only finishes its bookkeeping.
    // A lazy unmount ends the session at the last close, whenever that is: not waited for.
    let serving = if lazy {
        Vec::new()
    } else {
        mount_processes_at(dir)
    };
    loop {
        let before = twinfs_fuse::mountpoint::twinfs_mounts_at(dir);
        match mount::mount_state(dir) {
            mount::MountState::NotMounted => break,
            mount::MountState::Dead => mount::unmount(dir, true)?,
            mount::MountState::Live => mount::unmount(dir, lazy)?,
        }
        // The mount process sees its session end, leaves the mount registry and exits.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while twinfs_fuse::mountpoint::twinfs_mounts_at(dir) >= before
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        if twinfs_fuse::mountpoint::twinfs_mounts_at(dir) >= before {
            bail!("{} is still mounted after 10 s", dir.display());
        }
    }
    // The mount process then folds its usage into the volume, leaves the mount registry and
    // exits; returning only after that, a `twinfs mount` right after (same --metrics-addr) or a
    // `twinfs volume delete` finds it gone rather than finishing.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while serving.iter().any(|&pid| process_running(pid)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in serving.iter().filter(|&&pid| process_running(pid)) {
        eprintln!("twinfs: the mount process (pid {pid}) is still finishing after 10 s");
    }
    println!("unmounted {}", dir.display());
    Ok(())
}

/// Processes started as `twinfs ... mount VOLUME DIR` for this `dir` (a background mount, or
/// one started by `twinfs dev-cluster`), found by their command lines. A mount run inside
/// another process (the agent) is not among them; nothing waits for it.
fn mount_processes_at(dir: &Path) -> Vec<u32> {
    use std::os::unix::ffi::OsStrExt;
    let Ok(want) = std::path::absolute(dir) else {
        return Vec::new();
    };
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&std::ffi::OsStr> = cmdline
                .split(|b| *b == 0)
                .map(std::ffi::OsStr::from_bytes)
                .collect();
            let is_twinfs = args
                .first()
                .and_then(|a| Path::new(a).file_name())
                .is_some_and(|n| n == "twinfs");
            // Any argument after `mount` that names the directory: options may come before
            // or between VOLUME and DIR (`twinfs mount --cache-mb 64 v /mnt`).
            let Some(at) = args.iter().position(|a| *a == "mount") else {
                return false;
            };
            is_twinfs
                && args[at + 1..].iter().any(|a| {
                    let p = Path::new(a);
                    let p = if p.is_absolute() {
                        p.to_path_buf()
                    } else {
                        match std::fs::read_link(format!("/proc/{pid}/cwd")) {
                            Ok(cwd) => cwd.join(p),
                            Err(_) => return false,
                        }
                    };
                    std::path::absolute(p).is_ok_and(|p| p == want)
                })
        })
        .collect()
}

/// Whether `pid` still runs (a zombie has finished).
fn process_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_process_is_told_from_a_gone_one() {
        assert!(process_running(std::process::id()));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie has finished.
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z"))
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!process_running(pid));
        child.wait().unwrap();
        assert!(!process_running(pid));
    }

    #[test]
    fn a_mount_process_is_found_by_its_directory_wherever_the_options_are() {
        // A shell named `twinfs` whose command line reads like a mount started from `work`
        // with options before VOLUME and a relative DIR. It waits in its `read` builtin (no
        // child process to leave behind) until its stdin closes.
        let tmp = std::env::temp_dir().join(format!("twinfs-mpa-{}", std::process::id()));
        let work = tmp.join("work");
        std::fs::create_dir_all(work.join("mnt")).unwrap();
        let fake = tmp.join("twinfs");
        let _ = std::fs::remove_file(&fake);
        std::os::unix::fs::symlink("/bin/sh", &fake).unwrap();
        let mut child = Command::new(&fake)
            .args(["-c", "read line", "mount", "--cache-mb", "64", "vol", "mnt"])
            .current_dir(&work)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // spawn() can return while the child's exec is still setting up its command line
        // (a vfork-style spawn resumes the parent when the old memory is released), which
        // reads as empty for a moment: look until it shows.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut found = mount_processes_at(&work.join("mnt"));
        while found.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            found = mount_processes_at(&work.join("mnt"));
        }
        let other = mount_processes_at(&work.join("elsewhere"));
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&tmp);
        assert_eq!(found, vec![child.id()]);
        assert!(other.is_empty());
    }

    #[test]
    fn each_mount_point_gets_its_own_log_name() {
        assert_eq!(
            path_slug(Path::new("/var/www/wp-content/uploads")),
            "var-www-wp-content-uploads"
        );
        assert_eq!(path_slug(Path::new("/mnt/a b/ü")), "mnt-a_b-_");
        assert_eq!(path_slug(Path::new("/")), "root");
        assert_ne!(
            path_slug(Path::new("/srv/a")),
            path_slug(Path::new("/srv/b"))
        );
        assert!(path_slug(Path::new(&format!("/{}", "x".repeat(300)))).len() <= 100);
    }
}
