//! Several certificates, chosen by SNI (`[[tls.certificates]]`): each name gets its own
//! certificate whatever its key type and file format, with curl and openssl, TLS 1.2 and 1.3;
//! a certificate swapped on disk reaches new connections after a reload under load without a
//! failed request; a broken file is a config error at start and keeps the old set on reload.

mod common;
use common::certs::{Ca, KeyFormat, Kind};
use common::*;
use rustls::pki_types::CertificateDer;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"
http_listen = "127.0.0.1:{http_port}"
threads = 2
shutdown_timeout_secs = 5

[tls]
cert_path = "{dir}/default.crt"
key_path = "{dir}/default.key"

[[tls.certificates]]
cert_path = "{dir}/a.crt"
key_path = "{dir}/a.key"

[[tls.certificates]]
cert_path = "{dir}/b.crt"
key_path = "{dir}/b.key"

[[tls.certificates]]
cert_path = "{dir}/c.crt"
key_path = "{dir}/c.key"

[path_routes."*"."/"]
path = "{dir}/www"
"#;

/// The default pair (ECDSA P-384, SEC1 key, also valid for 127.0.0.1), `a.test` (ECDSA P-256,
/// PKCS#8), `b.test` (RSA 2048, PKCS#1), `*.c.test` (Ed25519, PKCS#8). Returns the CA file.
fn write_certificates(s: &Server, ca: &Ca) -> std::path::PathBuf {
    let pairs = [
        (
            "default",
            "default.test",
            &["default.test", "127.0.0.1"][..],
            Kind::EcdsaP384,
            KeyFormat::Sec1,
            "-----BEGIN EC PRIVATE KEY-----",
        ),
        (
            "a",
            "a.test",
            &["a.test"][..],
            Kind::EcdsaP256,
            KeyFormat::Pkcs8,
            "-----BEGIN PRIVATE KEY-----",
        ),
        (
            "b",
            "b.test",
            &["b.test"][..],
            Kind::Rsa2048,
            KeyFormat::Pkcs1,
            "-----BEGIN RSA PRIVATE KEY-----",
        ),
        (
            "c",
            "c.test",
            &["*.c.test"][..],
            Kind::Ed25519,
            KeyFormat::Pkcs8,
            "-----BEGIN PRIVATE KEY-----",
        ),
    ];
    for (stem, cn, names, kind, format, header) in pairs {
        let leaf = ca.issue(cn, names, kind, format);
        assert!(leaf.key_pem.starts_with(header), "{stem}: {}", leaf.key_pem);
        s.write_file(&format!("{stem}.crt"), leaf.cert_pem.as_bytes());
        s.write_file(&format!("{stem}.key"), leaf.key_pem.as_bytes());
    }
    s.write_file("ca.pem", ca.pem.as_bytes())
}

/// A server with the four certificates, not started yet; and its CA.
fn prepare() -> (Server, Ca, u16) {
    let http_port = free_port();
    let s = Server::prepare(&CONFIG.replace("{http_port}", &http_port.to_string()));
    let ca = Ca::new("zerocopy SNI test CA");
    write_certificates(&s, &ca);
    s.write_file("www/index.html", b"hello\n");
    (s, ca, http_port)
}

/// Starts a prepared server; returns when its plain listener answers.
fn spawn(s: &mut Server, http_port: u16) {
    s.spawn();
    let up = wait_until(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", http_port)).is_ok()
    });
    assert!(up, "{}", s.log());
}

/// A running server with the four certificates; its CA, and the CA's file.
fn start() -> (Server, Ca, std::path::PathBuf) {
    let (mut s, ca, http_port) = prepare();
    spawn(&mut s, http_port);
    let ca_file = s.path("ca.pem");
    (s, ca, ca_file)
}

/// `openssl s_client` to the TLS listener with `sni` (none: `-noservername`) and `version`
/// (`-tls1_2`, `-tls1_3`); its output with the verification against `ca`.
fn s_client(s: &Server, ca: &std::path::Path, sni: Option<&str>, version: &str) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect"])
        .arg(s.addr().to_string())
        .args([version, "-CAfile"])
        .arg(ca)
        .stdin(std::process::Stdio::null());
    match sni {
        Some(name) => cmd.args(["-servername", name]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// curl with `sni` (none: the URL's host is the IP address, for which curl sends no SNI);
/// its verbose output and body. `verify`: check the certificate against `ca` and the name.
fn curl(
    s: &Server,
    ca: &std::path::Path,
    sni: Option<&str>,
    tls13: bool,
    verify: bool,
) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-v", "--max-time", "5", "--cacert"])
        .arg(ca);
    if tls13 {
        cmd.arg("--tlsv1.3");
    } else {
        cmd.args(["--tlsv1.2", "--tls-max", "1.2"]);
    }
    if !verify {
        cmd.arg("-k");
    }
    match sni {
        Some(name) => cmd
            .arg("--resolve")
            .arg(format!("{name}:{}:127.0.0.1", s.port))
            .arg(format!("https://{name}:{}/", s.port)),
        None => cmd.arg(format!("https://127.0.0.1:{}/", s.port)),
    };
    let out = cmd.output().unwrap();
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn each_name_gets_its_certificate_with_curl_and_openssl_over_tls_1_2_and_1_3() {
    let (s, _, ca) = start();
    // (SNI, the certificate's common name, openssl's name for its signature)
    let cases = [
        (Some("a.test"), "a.test", "ECDSA", true),
        (Some("b.test"), "b.test", "RSA-PSS", true),
        (Some("www.c.test"), "c.test", "ed25519", true),
        (Some("default.test"), "default.test", "ECDSA", true),
        // A wildcard covers one label only; an unknown name or none gets the default.
        (Some("x.www.c.test"), "default.test", "ECDSA", false),
        (Some("unknown.test"), "default.test", "ECDSA", false),
        (None, "default.test", "ECDSA", true),
    ];
    for (sni, cn, signature, valid_for_name) in cases {
        for (version, tls13) in [("-tls1_2", false), ("-tls1_3", true)] {
            let out = s_client(&s, &ca, sni, version);
            let what = format!("openssl {sni:?} {version}:\n{out}");
            assert!(out.contains(&format!("subject=CN = {cn}")), "{what}");
            assert!(
                out.contains(&format!("Peer signature type: {signature}")),
                "{what}"
            );
            // The chain verifies against the CA for every certificate (names aside).
            assert!(out.contains("Verify return code: 0 (ok)"), "{what}");
            let proto = if tls13 { "TLSv1.3" } else { "TLSv1.2" };
            assert!(out.contains(&format!(", {proto}, Cipher is")), "{what}");

            let (log, body) = curl(&s, &ca, sni, tls13, valid_for_name);
            let what = format!("curl {sni:?} {version}:\n{log}");
            assert!(log.contains(&format!("subject: CN={cn}")), "{what}");
            assert!(
                log.contains(&format!("SSL connection using {proto}")),
                "{what}"
            );
            assert_eq!(body, "hello\n", "{what}");
        }
    }
}

/// A TLS client that never resumes (each connection shows the certificate it was given).
fn client_config(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let mut config = rustls_client(Some(ca), rustls::DEFAULT_VERSIONS);
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// `GET /` over a new TLS connection as `name`: the body and the certificate seen.
fn get_tls(
    addr: std::net::SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<(String, CertificateDer<'static>), String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), server_name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    // The server closes after the response without a close_notify alert; what was read is
    // checked whole below.
    match tls.read_to_end(&mut out) {
        Err(e) if e.kind() != std::io::ErrorKind::UnexpectedEof => return Err(e.to_string()),
        _ => {}
    }
    let cert = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no certificate")?
        .clone();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (status, _, body) = parse_response(&text);
    if status != 200 {
        return Err(format!("status {status}: {text}"));
    }
    Ok((body, cert))
}

fn first_cert(path: &std::path::Path) -> CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

#[test]
fn a_certificate_swapped_on_disk_reaches_new_connections_after_hup_under_load() {
    let (s, ca, ca_file) = start();
    let old = first_cert(&s.path("a.crt"));
    let config = client_config(&ca_file);

    // (when the connection started, the certificate it saw) for every request.
    let seen: Arc<Mutex<Vec<(Instant, CertificateDer<'static>)>>> = Default::default();
    let failures: Arc<Mutex<Vec<String>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (seen, failures, stop) = (seen.clone(), failures.clone(), stop.clone());
            let (config, addr) = (config.clone(), s.addr());
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    let start = Instant::now();
                    match get_tls(addr, &config, "a.test") {
                        Ok((body, cert)) if body == "hello\n" => {
                            seen.lock().unwrap().push((start, cert))
                        }
                        Ok((body, _)) => failures.lock().unwrap().push(body),
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                }
            })
        })
        .collect();
    let count = || seen.lock().unwrap().len();
    assert!(wait_until(Duration::from_secs(10), || count() >= 50));

    let leaf = ca.issue("a.test", &["a.test"], Kind::EcdsaP256, KeyFormat::Pkcs8);
    // Written whole before the reload: the master reads them on HUP.
    s.write_file("a.key.new", leaf.key_pem.as_bytes());
    s.write_file("a.crt.new", leaf.cert_pem.as_bytes());
    std::fs::rename(s.path("a.key.new"), s.path("a.key")).unwrap();
    std::fs::rename(s.path("a.crt.new"), s.path("a.crt")).unwrap();
    let new = first_cert(&s.path("a.crt"));
    assert_ne!(old, new);
    s.signal(libc::SIGHUP);

    let sees_new = || seen.lock().unwrap().iter().any(|(_, c)| *c == new);
    assert!(
        wait_until(Duration::from_secs(15), sees_new),
        "no new connection got the new certificate\n{}",
        s.log()
    );
    // Once the new generation serves, the old one is told to drain and stops accepting: from
    // a moment later on, every new connection must get the new certificate.
    assert!(
        wait_until(Duration::from_secs(10), || s
            .log()
            .contains("draining (replaced by generation 2)")),
        "{}",
        s.log()
    );
    let settled = Instant::now() + Duration::from_millis(500);
    let after = count();
    assert!(wait_until(Duration::from_secs(10), || count() >= after + 200));
    stop.store(true, Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let seen = seen.lock().unwrap();
    let stale = seen
        .iter()
        .filter(|(t, c)| *t > settled && *c != new)
        .count();
    assert_eq!(
        stale, 0,
        "connections after the reload got the old certificate"
    );
    assert!(
        seen.iter().any(|(_, c)| *c == old),
        "the old one was served first"
    );
    println!(
        "{} requests over new connections, 0 failed; {} with the new certificate",
        seen.len(),
        seen.iter().filter(|(_, c)| *c == new).count()
    );
}

#[test]
fn a_broken_certificate_file_fails_the_start_and_keeps_the_old_set_on_reload() {
    // At start: the master exits with the error, naming the key and the file.
    let (mut s, _, http_port) = prepare();
    let broken = "not a key\n";
    let good_key = std::fs::read(s.path("b.key")).unwrap();
    s.write_file("b.key", broken.as_bytes());
    let file = s.path("b.key").display().to_string();
    let check = Command::new(BIN)
        .args(["-t", "-c", s.config_path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{err}");
    assert!(
        err.contains("`tls.certificates[1].key_path`") && err.contains(&file),
        "{err}"
    );
    s.spawn();
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(1), "{}", s.log());
    let log = s.log();
    assert!(
        log.contains("`tls.certificates[1].key_path`: cannot read a private key from")
            && log.contains(&file),
        "{log}"
    );

    // On reload: logged, and the running generation keeps its certificates.
    s.write_file("b.key", &good_key);
    spawn(&mut s, http_port);
    let config = client_config(&s.path("ca.pem"));
    let (_, before) = get_tls(s.addr(), &config, "a.test").unwrap();
    let workers = s.workers();
    s.write_file("a.crt", b"not a certificate");
    s.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || s
            .log()
            .contains("reload aborted")),
        "{}",
        s.log()
    );
    let log = s.log();
    let file = s.path("a.crt").display().to_string();
    assert!(
        log.contains(&format!(
            "`tls.certificates[0].cert_path`: no certificate in {file}"
        )),
        "{log}"
    );
    for _ in 0..10 {
        let (body, cert) = get_tls(s.addr(), &config, "a.test").unwrap();
        assert_eq!(body, "hello\n");
        assert!(cert == before, "the old certificate is still served");
    }
    assert_eq!(s.workers(), workers, "no new generation");
}
