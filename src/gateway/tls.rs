//! TLS on the public port: the certificate and key, loaded at start and re-read on SIGHUP.
//!
//! Why rustls and its buffer API rather than a TLS stream type: the connection's socket is an
//! io_uring `TcpStream` that reads into and writes from owned buffers, which no `AsyncRead`
//! wrapper fits; rustls encrypts and decrypts between plain byte slices, so [`super::wire`]
//! keeps io_uring for the socket and hands rustls the bytes.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// TLS flags of `duplex serve` / `duplex demo`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain: serve `wss://` and `https://` on the listen port (re-read on
    /// SIGHUP; connections already open keep the certificate they started with).
    #[arg(long, env = "DUPLEX_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "DUPLEX_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// The server's TLS configuration, shared by every core (read at each accept, written only by
/// a SIGHUP reload).
pub struct Tls {
    args: TlsArgs,
    config: RwLock<Option<Arc<ServerConfig>>>,
}

impl Tls {
    /// Loads the certificate and key named by `args` (none: plain TCP); an unreadable or
    /// mismatched pair is a start-up error.
    pub fn new(args: TlsArgs) -> anyhow::Result<Self> {
        let config = load(&args)?;
        Ok(Self {
            args,
            config: RwLock::new(config),
        })
    }

    /// True when the public port speaks TLS.
    pub fn enabled(&self) -> bool {
        self.args.tls_cert.is_some()
    }

    /// Re-reads the certificate and key; on error the old ones stay in force.
    pub fn reload(&self) -> anyhow::Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        let config = load(&self.args)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// The configuration a new connection starts with (`None`: plain TCP).
    pub fn current(&self) -> Option<Arc<ServerConfig>> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

fn load(args: &TlsArgs) -> anyhow::Result<Option<Arc<ServerConfig>>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificate {}", cert.display()))?;
    if chain.is_empty() {
        bail!("{}: no PEM certificate found", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading private key {}", key.display()))?;
    Ok(Some(Arc::new(server_config(chain, key)?)))
}

/// A server configuration for `chain` and `key`: TLS 1.2 and 1.3, ALPN `http/1.1` (a
/// WebSocket upgrade is HTTP/1.1), no client certificates.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("certificate and key don't form a usable pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A self-signed certificate and key (PEM) for `names` (DNS names or IP addresses): for
/// trying TLS out (`duplex cert`), the bench's `--tls` run and the tests.
pub fn self_signed(names: &[String]) -> anyhow::Result<(String, String)> {
    let cert = rcgen::generate_simple_self_signed(names.to_vec())
        .context("generating a self-signed certificate")?;
    Ok((cert.cert.pem(), cert.key_pair.serialize_pem()))
}

/// Flags of `duplex cert`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertArgs {
    /// Directory to write `cert.pem` and `key.pem` into (existing files are not overwritten).
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// DNS name or IP address the certificate is for (repeat).
    #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub names: Vec<String>,
}

/// Runs `duplex cert`.
pub fn write_self_signed(args: &CertArgs) -> anyhow::Result<()> {
    let (cert, key) = self_signed(&args.names)?;
    let cert_path = args.out_dir.join("cert.pem");
    let key_path = args.out_dir.join("key.pem");
    for p in [&cert_path, &key_path] {
        if p.exists() {
            bail!("{} exists; not overwriting it", p.display());
        }
    }
    std::fs::write(&cert_path, cert).with_context(|| format!("writing {}", cert_path.display()))?;
    write_private(&key_path, key.as_bytes())?;
    println!(
        "wrote {} and {} (for {})",
        cert_path.display(),
        key_path.display(),
        args.names.join(", ")
    );
    Ok(())
}

/// Writes a file only its owner can read (a private key).
fn write_private(path: &std::path::Path, body: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(body)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn loads_reloads_and_keeps_the_old_pair_on_error() {
        let dir = std::env::temp_dir().join(format!("duplex-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = self_signed(&["localhost".into()]).unwrap();
        let args = TlsArgs {
            tls_cert: Some(write(&dir, "c.pem", &cert)),
            tls_key: Some(write(&dir, "k.pem", &key)),
        };
        let tls = Tls::new(args.clone()).unwrap();
        assert!(tls.enabled());
        let first = tls.current().unwrap();
        tls.reload().unwrap();
        assert!(!Arc::ptr_eq(&first, &tls.current().unwrap()));
        // A broken key on reload: error, previous config still served.
        write(&dir, "k.pem", "not a key");
        let before = tls.current().unwrap();
        assert!(tls.reload().is_err());
        assert!(Arc::ptr_eq(&before, &tls.current().unwrap()));
        // A key that doesn't match the certificate is refused at start.
        let (_, other_key) = self_signed(&["localhost".into()]).unwrap();
        write(&dir, "k.pem", &other_key);
        assert!(Tls::new(args).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn no_flags_means_plain_tcp() {
        let tls = Tls::new(TlsArgs::default()).unwrap();
        assert!(!tls.enabled());
        assert!(tls.current().is_none());
        tls.reload().unwrap();
    }
}
