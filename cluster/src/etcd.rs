//! How twinfs reaches etcd: endpoints, optional TLS and optional user/password auth.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use etcd_client::Client;

/// The cluster-wide key prefix; volumes and nodes live below it.
pub const PREFIX: &str = "/twinfs/";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// e.g. ["http://10.0.0.1:2379"]; https:// endpoints need `ca_file`.
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// CA that signed etcd's server certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, when etcd requires client certificates.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Bound on any single etcd request; an unreachable etcd becomes an error after this long
/// instead of a hang.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl EtcdConfig {
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            bail!("no etcd endpoints given (--etcd http://HOST:2379, or etcd.endpoints in the config file)");
        }
        for e in &self.endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .unwrap_or(e);
            if rest.is_empty() || !rest.contains(':') {
                bail!("etcd endpoint {e:?} is not of the form [http[s]://]HOST:PORT");
            }
        }
        if self.username.is_some() != self.password.is_some() {
            bail!("etcd username and password must be given together");
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            bail!("etcd cert_file and key_file must be given together");
        }
        Ok(())
    }

    pub async fn connect(&self) -> Result<etcd_client::Client> {
        self.validate()?;
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(3), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        if let (Some(u), Some(p)) = (&self.username, &self.password) {
            opts = opts.with_user(u.clone(), p.clone());
        }
        let tls_wanted = self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.endpoints.iter().any(|e| e.starts_with("https://"));
        if tls_wanted {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &self.ca_file {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("reading etcd CA {}", ca.display()))?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(c), Some(k)) = (&self.cert_file, &self.key_file) {
                let cert = std::fs::read(c).with_context(|| format!("reading {}", c.display()))?;
                let key = std::fs::read(k).with_context(|| format!("reading {}", k.display()))?;
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
        }
        let client = tokio::time::timeout(
            Duration::from_secs(10),
            etcd_client::Client::connect(self.endpoints.clone(), Some(opts)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("etcd at {:?} did not answer within 10 s", self.endpoints))?
        .with_context(|| format!("cannot connect to etcd at {:?}", self.endpoints))?;
        // Connecting is lazy; make one real round trip so a wrong endpoint fails here, clearly.
        let mut probe = client.clone();
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            probe.get(
                PREFIX,
                Some(etcd_client::GetOptions::new().with_count_only()),
            ),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "etcd at {:?} did not answer within {:?}",
                self.endpoints,
                REQUEST_TIMEOUT
            )
        })?
        .with_context(|| format!("etcd at {:?} refused a request", self.endpoints))?;
        Ok(client)
    }
}
