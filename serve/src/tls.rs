//! Mutual TLS between the rollout gate and the agents' TCP face: the gate proves itself to the
//! agents with a client certificate, the agents to the gate with a server certificate, both
//! issued by one CA that only the two trust. `draingate tls-certs` makes the set (for a Secret);
//! `draingate agent --tls DIR` and `draingate gate serve --agent-tls DIR` read it. The agents'
//! unix socket stays plain: only processes on the node reach it, and it is read-only.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The name every agent's certificate carries and the gate checks, whatever address it dials:
/// agents are reached by pod or node IP, which no shared certificate could list.
pub const AGENT_SERVER_NAME: &str = "draingate-agent";

/// The files of a set, as `tls-certs` writes them and a Secret mounts them.
pub const CA_CERT: &str = "ca.crt";
pub const AGENT_CERT: &str = "agent.crt";
pub const AGENT_KEY: &str = "agent.key";
pub const GATE_CERT: &str = "gate.crt";
pub const GATE_KEY: &str = "gate.key";

/// Most bytes read from one certificate or key file.
const MAX_PEM: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_PEM} bytes: not a certificate or key")]
    TooLarge { path: String },
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists: remove the old set first, or write to another directory")]
    Exists { path: String },
    #[error("cannot make the certificates")]
    Generate(#[from] rcgen::Error),
    #[error("invalid TLS setting")]
    Config(#[from] tonic::transport::Error),
    #[error("invalid certificate or key")]
    Pem(#[from] rustls_pki_types::pem::Error),
    #[error("the certificate file holds no certificate")]
    NoCertificate,
    #[error("cannot use the certificate and key")]
    Rustls(#[from] tokio_rustls::rustls::Error),
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, TlsError> {
    use std::io::Read as _;
    let path = dir.join(name);
    let shown = || path.display().to_string();
    let file = std::fs::File::open(&path).map_err(|source| TlsError::Read {
        path: shown(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| TlsError::Read {
            path: shown(),
            source,
        })?;
    if bytes.len() as u64 > MAX_PEM {
        return Err(TlsError::TooLarge { path: shown() });
    }
    Ok(bytes)
}

/// The agent's side: its certificate, and only clients with a certificate of the set's CA.
pub fn server_config(dir: &Path) -> Result<ServerTlsConfig, TlsError> {
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(dir, AGENT_CERT)?,
            read(dir, AGENT_KEY)?,
        ))
        .client_ca_root(Certificate::from_pem(read(dir, CA_CERT)?)))
}

/// The gate's side: its client certificate, and only agents with a certificate of the set's CA
/// for [`AGENT_SERVER_NAME`].
pub fn client_config(dir: &Path) -> Result<ClientTlsConfig, TlsError> {
    Ok(ClientTlsConfig::new()
        .domain_name(AGENT_SERVER_NAME)
        .ca_certificate(Certificate::from_pem(read(dir, CA_CERT)?))
        .identity(Identity::from_pem(
            read(dir, GATE_CERT)?,
            read(dir, GATE_KEY)?,
        )))
}

/// An HTTPS face's TLS settings, as [`crate::limits::serve_https`] takes them.
pub type HttpsConfig = std::sync::Arc<tokio_rustls::rustls::ServerConfig>;

/// A plain HTTPS server's TLS (no client certificates): `cert_pem` is its chain, `key_pem` its
/// key (PKCS#8, PKCS#1 or SEC1). HTTP/1.1 only.
pub fn https_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<HttpsConfig, TlsError> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    use tokio_rustls::rustls;
    let chain = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>()?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// Reads `tls.crt` and `tls.key` from `dir` (a `kubernetes.io/tls` Secret, as cert-manager
/// writes it) into [`https_config`].
pub fn https_config_from_dir(dir: &Path) -> Result<HttpsConfig, TlsError> {
    https_config(&read(dir, "tls.crt")?, &read(dir, "tls.key")?)
}

/// Writes a new set into `dir` (made if missing): a CA certificate (its key is not kept: the
/// set cannot be extended, only replaced), the agents' server certificate and key, and the
/// gate's client certificate and key, valid for `valid` from now. Keys are readable by the
/// owner only. Refuses to overwrite a set. Returns the files written.
pub fn generate(dir: &Path, valid: Duration) -> Result<Vec<PathBuf>, TlsError> {
    let names = [CA_CERT, AGENT_CERT, AGENT_KEY, GATE_CERT, GATE_KEY];
    for name in names {
        let path = dir.join(name);
        if path.exists() {
            return Err(TlsError::Exists {
                path: path.display().to_string(),
            });
        }
    }
    let now = SystemTime::now();
    let until = now + valid;
    let dated = |mut params: CertificateParams| {
        params.not_before = (now - Duration::from_mins(5)).into();
        params.not_after = until.into();
        params
    };
    let mut ca = dated(CertificateParams::new(Vec::<String>::new())?);
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "draingate gate-agent CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut agent = dated(CertificateParams::new(vec![AGENT_SERVER_NAME.to_owned()])?);
    agent
        .distinguished_name
        .push(DnType::CommonName, AGENT_SERVER_NAME);
    agent.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let agent_key = KeyPair::generate()?;
    let agent_cert = agent.signed_by(&agent_key, &issuer)?;

    let mut gate = dated(CertificateParams::new(Vec::<String>::new())?);
    gate.distinguished_name
        .push(DnType::CommonName, "draingate-gate");
    gate.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let gate_key = KeyPair::generate()?;
    let gate_cert = gate.signed_by(&gate_key, &issuer)?;

    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let files = [
        (CA_CERT, ca_cert.pem(), 0o644),
        (AGENT_CERT, agent_cert.pem(), 0o644),
        (AGENT_KEY, agent_key.serialize_pem(), 0o600),
        (GATE_CERT, gate_cert.pem(), 0o644),
        (GATE_KEY, gate_key.serialize_pem(), 0o600),
    ];
    let mut written = Vec::new();
    for (name, pem, mode) in files {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let path = dir.join(name);
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)?;
            file.write_all(pem.as_bytes())?;
            file.sync_all()
        };
        write().map_err(|source| TlsError::Write {
            path: path.display().to_string(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{TlsError, client_config, generate, https_config_from_dir, server_config};

    #[test]
    fn a_set_is_written_once_with_private_keys_and_reads_back() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path(), Duration::from_hours(24)).unwrap();
        assert_eq!(files.len(), 5);
        for key in ["agent.key", "gate.key"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        server_config(dir.path()).unwrap();
        client_config(dir.path()).unwrap();
        // Never over an existing set.
        assert!(matches!(
            generate(dir.path(), Duration::from_hours(24)),
            Err(TlsError::Exists { .. })
        ));
        // A missing file is named.
        std::fs::remove_file(dir.path().join("gate.key")).unwrap();
        let err = client_config(dir.path()).unwrap_err().to_string();
        assert!(err.contains("gate.key"), "{err}");
    }

    /// A `kubernetes.io/tls` Secret's files (as cert-manager writes them) serve HTTPS; a
    /// missing key is named, a file with no certificate refused.
    #[test]
    fn a_tls_secrets_files_make_an_https_config() {
        let set = tempfile::tempdir().unwrap();
        generate(set.path(), Duration::from_hours(1)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(set.path().join("agent.crt"), dir.path().join("tls.crt")).unwrap();
        let err = https_config_from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tls.key"), "{err}");
        std::fs::copy(set.path().join("agent.key"), dir.path().join("tls.key")).unwrap();
        let config = https_config_from_dir(dir.path()).unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        std::fs::write(dir.path().join("tls.crt"), "not a certificate\n").unwrap();
        assert!(matches!(
            https_config_from_dir(dir.path()),
            Err(TlsError::NoCertificate)
        ));
    }
}
