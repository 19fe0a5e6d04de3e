//! DIR/cluster.json: what `twinfs dev-cluster up` started, and how to reach it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdEntry {
    pub endpoints: Vec<String>,
    pub pid: u32,
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    pub id: String,
    pub pid: u32,
    pub addr: String,
    pub data_dir: PathBuf,
    /// Certificate directory the node runs with.
    pub tls_dir: PathBuf,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountEntry {
    pub path: PathBuf,
    pub pid: u32,
    pub volume: String,
    #[serde(default)]
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterFile {
    pub etcd: EtcdEntry,
    pub nodes: Vec<NodeEntry>,
    #[serde(default)]
    pub mounts: Vec<MountEntry>,
    pub ca_dir: PathBuf,
    pub client_cert_dir: PathBuf,
    pub lease_ttl_secs: u64,
}

impl ClusterFile {
    pub fn load(path: &Path) -> Result<ClusterFile> {
        // Accept the directory too: `--cluster DIR` is an easy slip.
        let path = if path.is_dir() {
            path.join("cluster.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (start a cluster with `twinfs dev-cluster up --dir DIR`)",
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a twinfs cluster file", path.display()))
    }

    /// Writes atomically (temp file, rename), so a reader never sees half a file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}
