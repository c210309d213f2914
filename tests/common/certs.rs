//! Certificates for the TLS tests: a CA (rcgen) and leaves of every key type the server takes
//! (ECDSA P-256/P-384, RSA, Ed25519), with keys written in PKCS#8, SEC1 or PKCS#1 PEM as an
//! operator's files would be (openssl converts them: rcgen writes PKCS#8 only, and ring cannot
//! make RSA keys).

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::io::Write;
use std::process::{Command, Stdio};

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
    Ed25519,
}

#[derive(Clone, Copy, Debug)]
pub enum KeyFormat {
    Pkcs8,
    /// `EC PRIVATE KEY` (ECDSA only)
    Sec1,
    /// `RSA PRIVATE KEY` (RSA only)
    Pkcs1,
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A leaf certificate and its key, as PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

/// `openssl ARGS` with `input` on stdin; its stdout.
fn openssl(args: &[&str], input: &str) -> String {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A leaf for `names` (DNS names, or IP addresses), common name `cn`, valid from yesterday
    /// for 90 days (Mozilla's recommended lifespan), with the extensions a strict RFC 5280
    /// verifier (sslyze's) asks for.
    pub fn issue(&self, cn: &str, names: &[&str], kind: Kind, format: KeyFormat) -> Leaf {
        let pkcs8 = match kind {
            Kind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .unwrap()
                .serialize_pem(),
            Kind::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
                .unwrap()
                .serialize_pem(),
            Kind::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519)
                .unwrap()
                .serialize_pem(),
            Kind::Rsa2048 => openssl(
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ],
                "",
            ),
        };
        let key = KeyPair::from_pem(&pkcs8).unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(89);
        let cert_pem = params.signed_by(&key, &self.issuer).unwrap().pem();
        let key_pem = match format {
            KeyFormat::Pkcs8 => pkcs8,
            KeyFormat::Sec1 => openssl(&["ec"], &pkcs8),
            KeyFormat::Pkcs1 => openssl(&["rsa", "-traditional"], &pkcs8),
        };
        Leaf { cert_pem, key_pem }
    }
}
