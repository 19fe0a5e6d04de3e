//! The `twinfs` command: node agent, operator tools and the local development cluster.

mod admin;
mod agent;
mod clusterfile;
mod devcluster;
mod maintenance;
mod mount_cmd;
mod mount_helper;
mod upkeep_cmd;
mod volume_cmd;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use twinfs_cluster::etcd::EtcdConfig;
use twinfs_cluster::node::NodeConfig;
use twinfs_cluster::pki::{self, CertRole};

#[derive(Parser)]
#[command(
    name = "twinfs",
    version,
    about = "twinfs: a shared POSIX filesystem for clusters of Linux nodes"
)]
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: Command,
}

/// How admin commands reach the cluster: a dev-cluster's cluster.json, or etcd plus a client
/// certificate directory given directly.
#[derive(Args, Clone, Default)]
pub struct ConnArgs {
    /// cluster.json written by `twinfs dev-cluster up`; gives etcd endpoints and a client certificate.
    #[arg(long, global = true, env = "TWINFS_CLUSTER", value_name = "FILE")]
    pub cluster: Option<PathBuf>,
    /// etcd endpoint (repeatable, or comma-separated), e.g. http://10.0.0.1:2379. Overrides the
    /// cluster file.
    #[arg(
        long = "etcd",
        global = true,
        value_name = "URL",
        env = "TWINFS_ETCD",
        value_delimiter = ','
    )]
    pub etcd: Vec<String>,
    /// Certificate directory (ca.crt, tls.crt, tls.key) to talk to nodes with.
    #[arg(long, global = true, value_name = "DIR", env = "TWINFS_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the cluster's certificate authority.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Issue certificates signed by the cluster CA.
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// Run the node agent: serve this node's block store over QUIC and register in etcd.
    Node(Box<NodeArgs>),
    /// Show every node of the cluster: id, address, zone, state, blocks, bytes used and free.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Store, fetch and locate single blocks (operators and tests).
    Block {
        #[command(subcommand)]
        cmd: BlockCmd,
    },
    /// Create, list, inspect, change and delete volumes.
    Volume {
        #[command(subcommand)]
        cmd: volume_cmd::VolumeCmd,
    },
    /// Mount a volume through FUSE (in the background unless --foreground).
    Mount(Box<mount_cmd::MountArgs>),
    /// Unmount a twinfs mount (its mount process flushes, leaves and exits).
    Umount {
        dir: PathBuf,
        /// Detach now even if files are open; the mount goes when the last one is closed.
        #[arg(short, long)]
        lazy: bool,
    },
    /// Check that every block of VOLUME has its copies, verified, on live nodes; name the
    /// files whose data is lost or endangered. Exit status 1 when any is.
    Fsck {
        volume: String,
        /// Only locate copies instead of having each node re-read and re-hash them.
        #[arg(long)]
        quick: bool,
        #[arg(long)]
        json: bool,
    },
    /// Show the blocks no file references (deleted, overwritten, or written by a client that
    /// died before committing); remove them with --apply.
    Gc {
        #[arg(long)]
        apply: bool,
        /// Unreferenced blocks stored more recently than this stay (writes may be about to
        /// commit them).
        #[arg(long, default_value = "1h", value_parser = upkeep_cmd::parse_duration)]
        grace: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// Run a whole cluster (etcd and N nodes) on this machine, for trying twinfs and for tests.
    DevCluster {
        #[command(subcommand)]
        cmd: DevClusterCmd,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a new CA (ca.crt, ca.key with mode 0600) in DIR.
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A name for the cluster, written into the CA's subject.
        #[arg(long, default_value = "twinfs")]
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    /// Nodes: may serve blocks (carries the node server name) and act as clients.
    Node,
    /// Clients (mounts, admin tools): may only connect to nodes.
    Client,
}

#[derive(Subcommand)]
enum CertCmd {
    /// Issue a certificate: writes ca.crt, tls.crt and tls.key (mode 0600) into OUT.
    Issue {
        /// CA directory made by `twinfs ca init`.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// Name of the node or client (letters, digits, '-', '_', '.').
        #[arg(long)]
        name: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "node")]
        role: RoleArg,
    },
}

#[derive(Args)]
struct NodeArgs {
    /// TOML config file; flags given on the command line override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory: blocks, their index and this node's stable id.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address to serve QUIC on, e.g. 0.0.0.0:7480.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Address peers use to reach this node (needed when --listen is a wildcard).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<SocketAddr>,
    /// Failure-domain label; copies of a block go to distinct zones when zones are set.
    #[arg(long)]
    zone: Option<String>,
    /// Bytes this node offers (default: the whole filesystem of the data directory).
    #[arg(long)]
    capacity: Option<u64>,
    /// Seconds after which a node that stopped renewing its etcd lease counts as dead.
    #[arg(long, value_name = "SECONDS")]
    lease_ttl: Option<u64>,
    /// etcd user name (password from TWINFS_ETCD_PASSWORD).
    #[arg(long)]
    etcd_user: Option<String>,
    #[arg(long, env = "TWINFS_ETCD_PASSWORD", hide_env_values = true)]
    etcd_password: Option<String>,
    /// CA certificate of etcd's TLS server.
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate and key for etcd.
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<PathBuf>,
    /// Serve Prometheus /metrics and the /healthz and /readyz probes on ADDR (e.g. 0.0.0.0:9480).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Keep VOLUME mounted at DIR on this host (repeatable): mounted again if it fails, and
    /// over a dead mount left by a killed agent, so pods that bound it regain it.
    #[arg(long = "mount", value_name = "VOLUME=DIR")]
    mounts: Vec<twinfs_cluster::node::MountSpec>,
    /// How long a vanished node may stay away before its copies are re-created elsewhere
    /// (default 60s; a node that announced a planned stop gets --planned-grace, default 15m).
    #[arg(long, value_name = "DURATION", value_parser = upkeep_cmd::parse_duration)]
    repair_grace: Option<std::time::Duration>,
    #[arg(long, value_name = "DURATION", value_parser = upkeep_cmd::parse_duration)]
    planned_grace: Option<std::time::Duration>,
    /// Time between repair scans (default 30s).
    #[arg(long, value_name = "DURATION", value_parser = upkeep_cmd::parse_duration)]
    repair_interval: Option<std::time::Duration>,
    /// Repair bandwidth of this node in MiB/s (default 64).
    #[arg(long, value_name = "MIB")]
    repair_rate: Option<f64>,
    /// Time between garbage collections of this node's copies (default 1h; 0 = never).
    #[arg(long, value_name = "DURATION", value_parser = upkeep_cmd::parse_duration)]
    gc_interval: Option<std::time::Duration>,
    /// Unreferenced copies younger than this are kept (default 1h).
    #[arg(long, value_name = "DURATION", value_parser = upkeep_cmd::parse_duration)]
    gc_grace: Option<std::time::Duration>,
    /// Time from one background scrub pass to the next (default 7d).
    #[arg(long, value_name = "DURATION", value_parser = upkeep_cmd::parse_duration)]
    scrub_interval: Option<std::time::Duration>,
}

#[derive(Subcommand)]
enum BlockCmd {
    /// Store FILE (at most 8 MiB) as one block on R nodes; prints its hash.
    Put {
        file: PathBuf,
        #[arg(long, default_value_t = 2)]
        replicas: usize,
    },
    /// Fetch a block, verified against its hash.
    Get {
        hash: String,
        /// Write to FILE instead of standard output.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Fetch only bytes from OFFSET ...
        #[arg(long)]
        offset: Option<u64>,
        /// ... and at most LEN of them.
        #[arg(long)]
        len: Option<u64>,
    },
    /// Print the ids of the live nodes holding a copy, one a line.
    Locate { hash: String },
}

#[derive(Subcommand)]
enum DevClusterCmd {
    /// Start etcd and N nodes on loopback in the background; writes DIR/cluster.json.
    Up {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Lease TTL of the nodes, in seconds.
        #[arg(long, default_value_t = 10)]
        lease_ttl: u64,
        /// Also create a volume and mount it at M mount points DIR/mnt/mount-I, each by its
        /// own mount process (as on different nodes).
        #[arg(long, default_value_t = 0)]
        mounts: usize,
        /// The volume created for --mounts.
        #[arg(long, default_value = "uploads")]
        volume: String,
        /// An extra argument for every `twinfs node` (repeatable), e.g.
        /// --node-arg=--repair-grace=5s.
        #[arg(long = "node-arg", value_name = "ARG", allow_hyphen_values = true)]
        node_args: Vec<String>,
    },
    /// Stop everything `up` started in DIR.
    Down {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // A log that cannot be written (a full disk, `--log-file /dev/full`) must not stop the
    // process: tracing-subscriber reports a failed write with `eprintln!`, which panics when
    // stderr fails too, in whichever thread logged (FUSE workers, tokio tasks), and a mount on a
    // full disk then died thread by thread. The lines are dropped instead.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .init();
}

fn node_config(args: NodeArgs, conn: &ConnArgs) -> Result<NodeConfig> {
    let mut table: toml::Table = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            text.parse()
                .with_context(|| format!("{} is not valid TOML", path.display()))?
        }
        None => toml::Table::new(),
    };
    let mut set = |k: &str, v: toml::Value| {
        table.insert(k.to_string(), v);
    };
    if let Some(v) = args.data_dir {
        set("data_dir", v.display().to_string().into());
    }
    if let Some(v) = args.listen {
        set("listen", v.to_string().into());
    }
    if let Some(v) = args.advertise {
        set("advertise", v.to_string().into());
    }
    if let Some(v) = args.zone {
        set("zone", v.into());
    }
    if let Some(v) = args.capacity {
        set("capacity", (v as i64).into());
    }
    if let Some(v) = args.lease_ttl {
        set("lease_ttl_secs", (v as i64).into());
    }
    if let Some(v) = &conn.tls_dir {
        set("tls_dir", v.display().to_string().into());
    }
    if let Some(v) = args.metrics_addr {
        set("metrics_addr", v.to_string().into());
    }
    if !args.mounts.is_empty() {
        let list: Vec<toml::Value> = args
            .mounts
            .iter()
            .map(|m| {
                let mut t = toml::Table::new();
                t.insert("volume".into(), m.volume.clone().into());
                t.insert("dir".into(), m.dir.display().to_string().into());
                toml::Value::Table(t)
            })
            .collect();
        set("mounts", list.into());
    }
    let mut etcd = match table.remove("etcd") {
        Some(toml::Value::Table(t)) => t,
        Some(_) => anyhow::bail!("`etcd` in the config file must be a table ([etcd])"),
        None => toml::Table::new(),
    };
    if !conn.etcd.is_empty() {
        etcd.insert("endpoints".into(), conn.etcd.clone().into());
    }
    for (k, v) in [
        ("username", args.etcd_user.map(|s| s.into())),
        ("password", args.etcd_password.map(|s| s.into())),
        (
            "ca_file",
            args.etcd_ca.map(|p| p.display().to_string().into()),
        ),
        (
            "cert_file",
            args.etcd_cert.map(|p| p.display().to_string().into()),
        ),
        (
            "key_file",
            args.etcd_key.map(|p| p.display().to_string().into()),
        ),
    ] {
        if let Some(v) = v {
            etcd.insert(k.into(), v);
        }
    }
    table.insert("etcd".into(), toml::Value::Table(etcd));
    let mut upkeep = match table.remove("maintenance") {
        Some(toml::Value::Table(t)) => t,
        Some(_) => anyhow::bail!("`maintenance` in the config file must be a table"),
        None => toml::Table::new(),
    };
    for (k, v) in [
        ("repair_grace_secs", args.repair_grace),
        ("planned_grace_secs", args.planned_grace),
        ("repair_interval_secs", args.repair_interval),
        ("gc_interval_secs", args.gc_interval),
        ("gc_grace_secs", args.gc_grace),
        ("scrub_interval_secs", args.scrub_interval),
    ] {
        if let Some(d) = v {
            upkeep.insert(k.into(), (d.as_secs() as i64).into());
        }
    }
    if let Some(r) = args.repair_rate {
        upkeep.insert("repair_mib_per_sec".into(), r.into());
    }
    table.insert("maintenance".into(), toml::Value::Table(upkeep));
    let cfg: NodeConfig = toml::Value::Table(table)
        .try_into()
        .context("node configuration is incomplete or wrong (see `twinfs node --help`)")?;
    cfg.validate()?;
    Ok(cfg)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {},
                _ = i.recv() => {},
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop the node with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    // The mount runs its own runtime and blocks; it must not start inside another one.
    let command = match cli.command {
        Command::Mount(args) => return mount_cmd::mount(&cli.conn, *args),
        Command::Umount { dir, lazy } => return mount_cmd::umount(&dir, lazy),
        other => other,
    };
    let cli = Cli {
        conn: cli.conn,
        command,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Ca {
            cmd: CaCmd::Init { dir, name },
        } => {
            pki::init_ca(&dir, &name)?;
            println!("created cluster CA in {}", dir.display());
            Ok(())
        }
        Command::Cert {
            cmd:
                CertCmd::Issue {
                    ca,
                    name,
                    out,
                    role,
                },
        } => {
            let role = match role {
                RoleArg::Node => CertRole::Node,
                RoleArg::Client => CertRole::Client,
            };
            pki::issue_cert(&ca, &name, role, &out)?;
            println!("issued certificate for {name} in {}", out.display());
            Ok(())
        }
        Command::Node(args) => {
            let cfg = node_config(*args, &cli.conn)?;
            rt.block_on(agent::run(cfg, shutdown_signal()))
        }
        Command::Status { json } => rt.block_on(admin::status(&cli.conn, json)),
        Command::Block { cmd } => match cmd {
            BlockCmd::Put { file, replicas } => {
                rt.block_on(admin::block_put(&cli.conn, &file, replicas))
            }
            BlockCmd::Get {
                hash,
                output,
                offset,
                len,
            } => rt.block_on(admin::block_get(
                &cli.conn,
                &hash,
                output.as_deref(),
                offset,
                len,
            )),
            BlockCmd::Locate { hash } => rt.block_on(admin::block_locate(&cli.conn, &hash)),
        },
        Command::Volume { cmd } => rt.block_on(volume_cmd::run(&cli.conn, cmd)),
        Command::Fsck {
            volume,
            quick,
            json,
        } => {
            if rt.block_on(upkeep_cmd::fsck(&cli.conn, &volume, quick, json))? {
                Ok(())
            } else {
                anyhow::bail!("volume {volume} has lost or endangered data")
            }
        }
        Command::Gc { apply, grace, json } => {
            rt.block_on(upkeep_cmd::gc(&cli.conn, apply, grace, json))
        }
        Command::DevCluster { cmd } => match cmd {
            DevClusterCmd::Up {
                dir,
                nodes,
                lease_ttl,
                mounts,
                volume,
                node_args,
            } => rt.block_on(devcluster::up(
                &dir,
                &devcluster::UpOptions {
                    nodes,
                    lease_ttl,
                    mounts,
                    volume,
                    node_args,
                },
            )),
            DevClusterCmd::Down { dir } => devcluster::down(&dir),
        },
        Command::Mount(_) | Command::Umount { .. } => {
            anyhow::bail!("internal error: mount commands are dispatched before the runtime starts")
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let cli = if argv
        .first()
        .is_some_and(|a| mount_helper::invoked_as_helper(a))
    {
        match mount_helper::translate(&argv[1..]) {
            Ok(args) => Cli::parse_from(args),
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "mount.fuse.twinfs: {e:#}");
                return ExitCode::from(32); // mount(8)'s "mount failure"
            }
        }
    } else {
        Cli::parse()
    };
    if matches!(
        cli.command,
        Command::Status { .. }
            | Command::Block { .. }
            | Command::Volume { .. }
            | Command::Fsck { .. }
            | Command::Gc { .. }
            | Command::Ca { .. }
            | Command::Cert { .. }
    ) {
        // A report piped into `head` ends quietly when the reader goes, as other Unix tools
        // do, instead of panicking in println! ("failed printing to stdout: Broken pipe").
        // Sockets are unaffected: std and tokio send with MSG_NOSIGNAL.
        // SAFETY: SIG_DFL installs no handler, so nothing runs in signal context; no other
        // thread exists yet (the runtime starts in `run`).
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(
        if matches!(cli.command, Command::Node(_) | Command::Mount(_)) {
            // fuser warns when its own unmount finds the mount already gone (we unmounted).
            "info,fuser::mnt=error"
        } else {
            "warn"
        },
    );
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: it panics when stderr cannot be written (a full disk).
            let _ = writeln!(std::io::stderr(), "twinfs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves how to reach etcd and which certificate to use, from flags or a cluster file.
pub fn resolve_conn(conn: &ConnArgs) -> Result<(EtcdConfig, PathBuf)> {
    let file = match &conn.cluster {
        Some(p) => Some(clusterfile::ClusterFile::load(p)?),
        None => None,
    };
    let endpoints = if !conn.etcd.is_empty() {
        conn.etcd.clone()
    } else if let Some(f) = &file {
        f.etcd.endpoints.clone()
    } else {
        anyhow::bail!("don't know where the cluster is: give --cluster DIR/cluster.json (or set TWINFS_CLUSTER), or --etcd URL and --tls-dir DIR");
    };
    let tls_dir = match (&conn.tls_dir, &file) {
        (Some(d), _) => d.clone(),
        (None, Some(f)) => f.client_cert_dir.clone(),
        (None, None) => anyhow::bail!(
            "no client certificate: give --tls-dir DIR (with ca.crt, tls.crt, tls.key)"
        ),
    };
    Ok((
        EtcdConfig {
            endpoints,
            ..Default::default()
        },
        tls_dir,
    ))
}
