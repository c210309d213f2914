//! TLS termination: HTTPS clients (curl, rustls), `http_listen` beside it, `wss://` through
//! the proxy, certificate errors in the config, reload with a new certificate.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tungstenite::Message;

/// Writes a certificate (for `backend.test` and 127.0.0.1) and its key as PEM files; returns
/// the CA file that signs it.
fn write_cert(s: &Server) -> std::path::PathBuf {
    let p = pki();
    s.write_file("server.crt", p.cert_pem.as_bytes());
    s.write_file("server.key", p.key_pem.as_bytes());
    s.write_file("ca.pem", p.ca_pem.as_bytes())
}

/// curl to the TLS listener as `backend.test`, verifying against `ca`.
fn curl_https(s: &Server, ca: &std::path::Path) -> std::process::Output {
    Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "--cacert",
            ca.to_str().unwrap(),
            "--resolve",
        ])
        .arg(format!("backend.test:{}:127.0.0.1", s.port))
        .arg(format!("https://backend.test:{}/", s.port))
        .output()
        .unwrap()
}

fn tls_client(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn connect_tls(
    s: &Server,
    ca: &std::path::Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let tcp = TcpStream::connect(s.addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("backend.test").unwrap();
    let conn = rustls::ClientConnection::new(tls_client(ca), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"
http_listen = "127.0.0.1:{http_port}"
threads = 2
shutdown_timeout_secs = 5

[tls]
cert_path = "{dir}/server.crt"
key_path = "{dir}/server.key"

[path_routes."*"."/"]
path = "{dir}/www"

[path_routes."*"."/ws/"]
type = "Proxy"
url = "http://127.0.0.1:{ws_port}/"
"#;

fn start() -> (Server, std::path::PathBuf, u16) {
    let http_port = free_port();
    let template = CONFIG
        .replace("{http_port}", &http_port.to_string())
        .replace("{ws_port}", &ws_echo_server().to_string());
    let mut s = Server::prepare(&template);
    let ca = write_cert(&s);
    s.write_file("www/index.html", b"secure hello\n");
    s.write_file("www/big.bin", &pattern(8 << 20, 21));
    s.spawn();
    // Ready when the plain listener answers.
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
            "127.0.0.1",
            http_port
        ))
        .is_ok()),
        "{}",
        s.log()
    );
    (s, ca, http_port)
}

#[test]
fn https_and_plain_listeners_serve_the_same_routes() {
    let (s, ca, http_port) = start();
    // curl, verifying the certificate against the CA.
    let out = curl_https(&s, &ca);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "secure hello\n",
        "curl: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = raw(
        std::net::SocketAddr::from(([127, 0, 0, 1], http_port)),
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(plain.ends_with("secure hello\n"), "{plain}");
    // Plain HTTP on the TLS port gets no answer in clear text.
    let clear = raw(
        s.addr(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(3),
    );
    assert!(!clear.contains("secure hello"));
    // Keep-alive and an 8 MiB file over TLS (copied through user space, byte-exact).
    let mut c = connect_tls(&s, &ca);
    for _ in 0..3 {
        write!(c, "GET /big.bin HTTP/1.1\r\nHost: backend.test\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            c.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        assert!(String::from_utf8_lossy(&head).contains("Content-Length: 8388608"));
        let mut body = vec![0u8; 8 << 20];
        c.read_exact(&mut body).unwrap();
        assert!(body == pattern(8 << 20, 21), "body differs over TLS");
    }
}

#[test]
fn wss_clients_reach_a_websocket_backend() {
    let (s, ca, _) = start();
    let stream = connect_tls(&s, &ca);
    let url = format!("wss://backend.test:{}/ws/echo", s.port);
    let (mut ws, resp) =
        tungstenite::client(url.as_str(), stream).expect("wss handshake through the proxy");
    assert_eq!(resp.status(), 101);
    for i in 0..50 {
        let m = Message::text(format!("over tls {i}"));
        ws.send(m.clone()).unwrap();
        assert_eq!(ws.read().unwrap(), m);
    }
    let big = pattern(4 << 20, 3);
    ws.send(Message::binary(big.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(big));
    ws.close(None).unwrap();
}

#[test]
fn bad_certificates_are_config_errors_naming_the_key() {
    let s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\n\n[tls]\ncert_path = \"{dir}/c.pem\"\nkey_path = \"{dir}/k.pem\"\n");
    s.write_file("c.pem", b"not a certificate");
    s.write_file("k.pem", b"not a key");
    let out = Command::new(BIN)
        .args(["-t", "-c", s.config_path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("`tls.cert_path`: no certificate in"), "{err}");
}

#[test]
fn a_reload_picks_up_a_new_certificate() {
    let (s, _, _) = start();
    let first = s.path("ca.pem");
    let old_ca = std::fs::read(&first).unwrap();
    let new_ca = write_cert(&s);
    assert_ne!(std::fs::read(&new_ca).unwrap(), old_ca);
    s.signal(libc::SIGHUP);
    let works = wait_until(Duration::from_secs(10), || {
        let out = curl_https(&s, &new_ca);
        String::from_utf8_lossy(&out.stdout) == "secure hello\n"
    });
    assert!(works, "{}", s.log());
}

/// kTLS cannot be used here (default build, or a kernel without the TLS ULP): with
/// `ktls_fallback_enabled` TLS stays in user space, without it TLS connections are refused;
/// either way one log line says which and why.
#[test]
fn ktls_falls_back_or_refuses_as_configured() {
    for fallback in [true, false] {
        let template = format!(
            "[server]\nlisten = \"127.0.0.1:{{port}}\"\nhttp_listen = \"127.0.0.1:{}\"\nthreads = 1\n\n[tls]\ncert_path = \"{{dir}}/server.crt\"\nkey_path = \"{{dir}}/server.key\"\nktls_enabled = true\nktls_fallback_enabled = {fallback}\n\n[path_routes.\"*\".\"/\"]\npath = \"{{dir}}/www\"\n",
            free_port()
        );
        let mut s = Server::prepare(&template);
        let ca = write_cert(&s);
        s.write_file("www/index.html", b"secure hello\n");
        s.spawn();
        let want = if fallback {
            "kTLS requested but not used"
        } else {
            "kTLS required (tls.ktls_fallback_enabled = false) but not available"
        };
        assert!(
            wait_until(Duration::from_secs(10), || s.log().contains(want)),
            "{}",
            s.log()
        );
        let out = curl_https(&s, &ca);
        let body = String::from_utf8_lossy(&out.stdout);
        if fallback {
            assert_eq!(
                body,
                "secure hello\n",
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            assert!(
                !out.status.success() && body.is_empty(),
                "a TLS connection was served without kTLS"
            );
        }
    }
}
