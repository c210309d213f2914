//! TLS termination settings: the certificates and keys of `[tls]`, loaded by the master (which
//! may read root-only key files) into a rustls server configuration that every worker of the
//! generation inherits across fork.
//!
//! Certificates are chosen by SNI: each `[[tls.certificates]]` pair answers for the DNS names
//! of its certificate's subjectAltName, `*.example.com` for one label under `example.com`; the
//! default pair (`tls.cert_path`, `tls.key_path`) answers clients that send no SNI or a name no
//! certificate has. An exact name beats a wildcard; between two certificates with the same name
//! the first in the file wins, and the default pair's own names come after every
//! `[[tls.certificates]]` entry.

use super::config::TlsConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::Arc;

/// A config key (`tls.certificates[0].cert_path`) and what is wrong with it, naming the file.
pub type LoadError = (String, String);

/// The certificates of `[tls]`, by name.
#[derive(Debug)]
pub struct Certificates {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `example.com` for a certificate of `*.example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl Certificates {
    /// Reads every pair of `[tls]`; an error names the key and the file.
    pub fn load(cfg: &TlsConfig) -> Result<Certificates, LoadError> {
        let provider = provider();
        let (default, default_names) = load_pair(
            &cfg.cert_path,
            &cfg.key_path,
            "tls.cert_path",
            "tls.key_path",
            &provider,
        )?;
        let mut certs = Certificates {
            default: default.clone(),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for (i, pair) in cfg.certificates.iter().enumerate() {
            let cert_key = format!("tls.certificates[{i}].cert_path");
            let key_key = format!("tls.certificates[{i}].key_path");
            let (key, names) = load_pair(
                &pair.cert_path,
                &pair.key_path,
                &cert_key,
                &key_key,
                &provider,
            )?;
            if names.is_empty() {
                return Err((
                    cert_key,
                    format!(
                        "the certificate in {} has no DNS name in its subjectAltName: no SNI could choose it",
                        pair.cert_path
                    ),
                ));
            }
            certs.add(&key, &names);
        }
        certs.add(&default, &default_names);
        Ok(certs)
    }

    fn add(&mut self, key: &Arc<CertifiedKey>, names: &[String]) {
        for name in names {
            let table = match name.strip_prefix("*.") {
                Some(parent) => self.wildcard.entry(parent.to_string()),
                None => self.exact.entry(name.clone()),
            };
            table.or_insert_with(|| key.clone());
        }
    }

    /// The certificate for a client that sent `sni`.
    pub fn choose(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = sni else {
            return &self.default;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return key;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(hello.server_name()).clone())
    }
}

/// One certificate chain and its key; returns them with the certificate's SAN DNS names
/// (lower case, wildcards as `*.example.com`).
fn load_pair(
    cert_path: &str,
    key_path: &str,
    cert_key: &str,
    key_key: &str,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, Vec<String>), LoadError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            (
                cert_key.to_string(),
                format!("cannot read certificates from {cert_path}: {e}"),
            )
        })?;
    let Some(leaf) = certs.first() else {
        return Err((
            cert_key.to_string(),
            format!("no certificate in {cert_path}"),
        ));
    };
    let names: Vec<String> = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| {
            (
                cert_key.to_string(),
                format!("the first certificate in {cert_path} does not parse: {e}"),
            )
        })?
        .valid_dns_names()
        .map(str::to_ascii_lowercase)
        .collect();
    // PKCS#8, SEC1 (`EC PRIVATE KEY`) and PKCS#1 (`RSA PRIVATE KEY`) alike.
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        (
            key_key.to_string(),
            format!("cannot read a private key from {key_path}: {e}"),
        )
    })?;
    let certified = CertifiedKey::from_der(certs, key, provider).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(_) => {
                format!("the key in {key_path} does not fit the certificate in {cert_path}")
            }
            e => format!(
                "the key in {key_path} cannot sign (ECDSA P-256/P-384, RSA or Ed25519 are): {e}"
            ),
        };
        (key_key.to_string(), why)
    })?;
    Ok((Arc::new(certified), names))
}

/// The cryptography of every TLS connection, client and backend side: aws-lc-rs, whose
/// RSA and ECDSA signatures (what a full handshake mostly costs) are about twice as fast as
/// ring's on x86-64 (AVX-512 IFMA where the CPU has it), close to OpenSSL's.
pub fn provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// The rustls configuration of `[tls]`: certificates by SNI, ALPN (`h2` first when `http2`,
/// then `http/1.1`), and `ticketer`
/// for session tickets (`None`: rustls' default, none).
pub fn server_config(
    cfg: &TlsConfig,
    ticketer: Option<Arc<dyn ProducesTickets>>,
) -> Result<Arc<rustls::ServerConfig>, LoadError> {
    let certs = Certificates::load(cfg)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls".to_string(), e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(certs));
    config.alpn_protocols = alpn(cfg.http2);
    // With a ticketer, TLS 1.3 resumption and TLS 1.2 tickets go through it on any worker.
    // rustls' per-process session-ID cache (256 sessions) stays for TLS 1.2 clients that
    // offer no ticket: they resume on the worker that served them (with `cbpf`, the worker
    // their address always reaches).
    if let Some(t) = ticketer {
        config.ticketer = t;
    }
    // One TLS 1.3 ticket per connection, as nginx sends: a client that resumes gets a fresh
    // one each time, and one that never resumes (most of a benchmark's clients, many
    // scripts) does not pay for parsing two.
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

/// The protocols offered in ALPN, the server's preference first: rustls picks the first of
/// these that the client offers too.
pub fn alpn(http2: bool) -> Vec<Vec<u8>> {
    let mut protocols = Vec::with_capacity(2);
    if http2 {
        protocols.push(b"h2".to_vec());
    }
    protocols.push(b"http/1.1".to_vec());
    protocols
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    /// A self-signed certificate for `names` (DNS, or IP when they parse as one), written
    /// beside its key into `dir` as `stem.crt` / `stem.key`.
    fn pair(dir: &std::path::Path, stem: &str, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().unwrap()),
            })
            .collect();
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }

    fn config(default: (String, String), more: &[(String, String)]) -> TlsConfig {
        let mut text = format!("cert_path = {:?}\nkey_path = {:?}\n", default.0, default.1);
        for (c, k) in more {
            text += &format!("[[certificates]]\ncert_path = {c:?}\nkey_path = {k:?}\n");
        }
        toml::from_str(&text).unwrap()
    }

    fn leaf(certs: &Certificates, sni: Option<&str>) -> CertificateDer<'static> {
        certs.choose(sni).cert[0].clone()
    }

    #[test]
    fn alpn_prefers_h2_unless_it_is_off() {
        assert_eq!(alpn(true), [b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(alpn(false), [b"http/1.1".to_vec()]);
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let default = pair(
            d,
            "default",
            &["default.test", "exact.wild.test", "127.0.0.1"],
        );
        let a = pair(d, "a", &["a.test", "A2.test"]);
        let wild = pair(d, "wild", &["*.wild.test"]);
        let shadow = pair(d, "shadow", &["a.test"]);
        let certs = Certificates::load(&config(
            default.clone(),
            &[a.clone(), wild.clone(), shadow.clone()],
        ))
        .unwrap();
        let der = |p: &(String, String)| {
            CertificateDer::pem_file_iter(&p.0)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
        };
        for (sni, want) in [
            (Some("a.test"), &a),
            (Some("A.Test."), &a),
            (Some("a2.test"), &a),
            (Some("x.wild.test"), &wild),
            // One label only, and an exact name (here the default's) beats a wildcard.
            (Some("y.x.wild.test"), &default),
            (Some("wild.test"), &default),
            (Some("exact.wild.test"), &default),
            (Some("unknown.test"), &default),
            (None, &default),
        ] {
            assert!(leaf(&certs, sni) == der(want), "{sni:?}");
        }
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let default = pair(d, "default", &["default.test"]);
        let a = pair(d, "a", &["a.test"]);
        let b = pair(d, "b", &["b.test"]);
        let ip_only = pair(d, "ip", &["127.0.0.1"]);
        let garbage = d.join("garbage.pem");
        std::fs::write(&garbage, "not pem").unwrap();
        let garbage = garbage.display().to_string();
        let missing = d.join("missing.pem").display().to_string();
        for (more, key, file) in [
            (
                vec![a.clone(), (garbage.clone(), b.1.clone())],
                "tls.certificates[1].cert_path",
                &garbage,
            ),
            (
                vec![(a.0.clone(), missing.clone())],
                "tls.certificates[0].key_path",
                &missing,
            ),
            (
                vec![(a.0.clone(), b.1.clone())],
                "tls.certificates[0].key_path",
                &b.1,
            ),
            (
                vec![ip_only.clone()],
                "tls.certificates[0].cert_path",
                &ip_only.0,
            ),
        ] {
            let (k, why) = Certificates::load(&config(default.clone(), &more)).unwrap_err();
            assert_eq!(k, key, "{why}");
            assert!(why.contains(file.as_str()), "{why}");
        }
        // The default pair needs no DNS name (clients without SNI get it).
        assert!(Certificates::load(&config(ip_only, &[a])).is_ok());
    }
}
