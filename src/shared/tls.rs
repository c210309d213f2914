//! TLS termination settings: the certificate chain and key of `[tls]`, loaded by the master
//! (which may read root-only key files) into a rustls server configuration that every worker
//! of the generation inherits across fork.

use super::config::TlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// Loads `[tls]`; an error names the key and the file.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, (&'static str, String)> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            (
                "tls.cert_path",
                format!("cannot read certificates from {}: {e}", cfg.cert_path),
            )
        })?;
    if certs.is_empty() {
        return Err((
            "tls.cert_path",
            format!("no certificate in {}", cfg.cert_path),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_path).map_err(|e| {
        (
            "tls.key_path",
            format!("cannot read a private key from {}: {e}", cfg.key_path),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            (
                "tls.key_path",
                format!("the key does not fit the certificate: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
