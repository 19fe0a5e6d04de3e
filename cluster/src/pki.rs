//! The cluster's own certificate authority and the mutual-TLS configurations built from it.
//!
//! A CA directory holds `ca.crt` and `ca.key`. A certificate directory (node or client) holds
//! `ca.crt` (the CA to trust), `tls.crt` and `tls.key`: the names a Kubernetes TLS Secret uses,
//! so the same directory can be mounted from a Secret. Private keys are written mode 0600.
//!
//! Node certificates carry the DNS name [`NODE_SERVER_NAME`], which clients require of the server
//! they connect to; client certificates do not, so a client certificate cannot pose as a node.
//! Both kinds authenticate as TLS clients. Only TLS 1.3 is offered, with the ring provider.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The server name every node certificate carries and every client checks.
pub const NODE_SERVER_NAME: &str = "twinfs-node";
/// ALPN protocol id; a peer speaking anything else is refused during the handshake.
pub const ALPN: &[u8] = b"twinfs/1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    Node,
    Client,
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Creates a new cluster CA in `dir`. Refuses to overwrite an existing one.
pub fn init_ca(dir: &Path, name: &str) -> Result<()> {
    if dir.join("ca.key").exists() {
        bail!(
            "{} already holds a CA (ca.key); refusing to overwrite it",
            dir.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("twinfs cluster CA ({name})"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_private(&dir.join("ca.key"), &key.serialize_pem())?;
    fs::write(dir.join("ca.crt"), cert.pem())?;
    Ok(())
}

/// Issues a certificate for `name` signed by the CA in `ca_dir`, into `out_dir`
/// (`ca.crt`, `tls.crt`, `tls.key`).
pub fn issue_cert(ca_dir: &Path, name: &str, role: CertRole, out_dir: &Path) -> Result<()> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!(
            "certificate name {name:?} must be 1-128 characters of letters, digits, '-', '_', '.'"
        );
    }
    let ca_pem = fs::read_to_string(ca_dir.join("ca.crt")).with_context(|| {
        format!(
            "reading {}/ca.crt (is it a CA directory?)",
            ca_dir.display()
        )
    })?;
    let ca_key_pem = fs::read_to_string(ca_dir.join("ca.key"))
        .with_context(|| format!("reading {}/ca.key", ca_dir.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).context("parsing ca.key")?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_pem).context("parsing ca.crt")?;
    // Re-signing the CA's own parameters with its key yields an issuer with the same subject and
    // key identifier as ca.crt, which is all that signing needs; ca.crt itself is unchanged.
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut sans = vec![name.to_string()];
    if role == CertRole::Node {
        sans.push(NODE_SERVER_NAME.to_string());
    }
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match role {
        CertRole::Node => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        CertRole::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    write_private(&out_dir.join("tls.key"), &key.serialize_pem())?;
    fs::write(out_dir.join("tls.crt"), cert.pem())?;
    fs::write(out_dir.join("ca.crt"), ca_pem)?;
    Ok(())
}

/// A loaded certificate directory.
pub struct Identity {
    pub ca: Vec<CertificateDer<'static>>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn load(dir: &Path) -> Result<Identity> {
        let read = |f: &str| {
            fs::read(dir.join(f)).with_context(|| {
                format!(
                    "reading {}/{f} (a certificate directory holds ca.crt, tls.crt, tls.key)",
                    dir.display()
                )
            })
        };
        let ca_pem = read("ca.crt")?;
        let crt_pem = read("tls.crt")?;
        let key_pem = read("tls.key")?;
        let ca = CertificateDer::pem_slice_iter(&ca_pem)
            .collect::<Result<Vec<_>, _>>()
            .context("parsing ca.crt")?;
        let chain = CertificateDer::pem_slice_iter(&crt_pem)
            .collect::<Result<Vec<_>, _>>()
            .context("parsing tls.crt")?;
        if ca.is_empty() || chain.is_empty() {
            bail!("{}: ca.crt or tls.crt holds no certificate", dir.display());
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).context("parsing tls.key")?;
        Ok(Identity { ca, chain, key })
    }

    fn roots(&self) -> Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots
                .add(c.clone())
                .context("adding the cluster CA to the trust store")?;
        }
        Ok(roots)
    }

    /// Server side: TLS 1.3 only, a client certificate from the cluster CA required.
    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider.clone(),
        )
        .build()
        .context("building the client-certificate verifier")?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("tls.key does not match tls.crt")?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// Client side: TLS 1.3 only, the server must present a node certificate of the cluster CA,
    /// and we present ours.
    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .context("tls.key does not match tls.crt")?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_and_certs_are_written_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, "test").unwrap();
        assert!(
            init_ca(&ca, "test").is_err(),
            "an existing CA is not overwritten"
        );
        let node = dir.path().join("node");
        issue_cert(&ca, "node-1", CertRole::Node, &node).unwrap();
        for key in [ca.join("ca.key"), node.join("tls.key")] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let id = Identity::load(&node).unwrap();
        id.server_config().unwrap();
        id.client_config().unwrap();
        assert!(issue_cert(&ca, "bad name!", CertRole::Node, &node).is_err());
    }
}
