//! Whom a client trusts for TLS: the PEM certificates of a private CA (or a server's
//! self-signed certificate). One loader for the WebSocket client (`duplex say --ca`, the bench)
//! and the orchestrator's gRPC client (`--worker-ca`); they differ only in ALPN.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;

/// A client configuration trusting the certificates in `ca` and offering `alpn`.
pub fn client_config(ca: &Path, alpn: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        roots
            .add(cert.with_context(|| format!("parsing {}", ca.display()))?)
            .with_context(|| format!("{}: unusable certificate", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("{}: no PEM certificate found", ca.display());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}
