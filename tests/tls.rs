//! TLS termination: HTTPS clients (curl, rustls), `http_listen` beside it, `wss://` through
//! the proxy, certificate errors in the config, reload with a new certificate.

mod common;
use common::backend::{pattern_hash, Backend, Fnv, PatternGen};
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
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
    Arc::new(rustls_client(Some(ca), rustls::DEFAULT_VERSIONS))
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

/// Reads one response head, then its body (Content-Length or chunked) into `body`; returns
/// the head.
fn read_response(r: &mut impl BufRead, body: &mut impl FnMut(&[u8])) -> String {
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(r.read_line(&mut head).unwrap() > 0, "closed after {head:?}");
    }
    let lower = head.to_ascii_lowercase();
    let mut copy = |r: &mut dyn BufRead, mut n: usize| {
        while n > 0 {
            let got = r.fill_buf().unwrap();
            assert!(!got.is_empty(), "closed with {n} body bytes to come");
            let k = got.len().min(n);
            body(&got[..k]);
            r.consume(k);
            n -= k;
        }
    };
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let size = usize::from_str_radix(line.trim(), 16).expect(&line);
            if size == 0 {
                r.read_line(&mut line).unwrap();
                return head;
            }
            copy(r, size);
            r.read_line(&mut line).unwrap();
        }
    }
    let len = lower
        .split("content-length: ")
        .nth(1)
        .and_then(|v| v.split("\r\n").next()?.parse().ok())
        .unwrap_or(0);
    copy(r, len);
    head
}

/// Bodies cross TLS on both sides byte-exact, on one kept-alive client connection: uploads
/// through the proxy to a TLS backend and downloads from it, with Content-Length and chunked
/// framing. The client's body is read 64 KiB at a time, more ciphertext than rustls decodes
/// at once: what it leaves waits for the next read.
#[test]
fn bodies_cross_tls_on_both_sides_byte_exact() {
    const LEN: usize = 16 << 20;
    let pki_dir = tempfile::tempdir().unwrap();
    let (backend_tls, backend_ca) = test_pki(pki_dir.path());
    let b = Backend::start_tls("tls", backend_tls);
    let template = format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\nhttp_listen = \"127.0.0.1:{}\"\nthreads = 1\n\n[tls]\ncert_path = \"{{dir}}/server.crt\"\nkey_path = \"{{dir}}/server.key\"\n\n[path_routes.\"*\".\"/\"]\ntype = \"Proxy\"\nurl = \"https://127.0.0.1:{}/\"\nsni_name = \"backend.test\"\nca_file = \"{}\"\n  [path_routes.\"*\".\"/\".security]\n  max_request_body_size = 67108864\n  max_chunked_body_size = 67108864\n",
        free_port(),
        b.port,
        backend_ca.display()
    );
    let mut s = Server::prepare(&template);
    let ca = write_cert(&s);
    s.spawn();
    assert!(
        wait_until(Duration::from_secs(10), || TcpStream::connect(s.addr())
            .is_ok()),
        "{}",
        s.log()
    );
    let mut c = BufReader::new(connect_tls(&s, &ca));
    let want = format!("{LEN} {:016x}", pattern_hash(LEN as u64, 9));
    for chunked in [false, true] {
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_string()
        } else {
            format!("Content-Length: {LEN}")
        };
        let w = c.get_mut();
        write!(
            w,
            "POST /upload HTTP/1.1\r\nHost: backend.test\r\n{framing}\r\n\r\n"
        )
        .unwrap();
        let mut g = PatternGen::new(9);
        let mut piece = vec![0u8; 1 << 20];
        for _ in 0..LEN / piece.len() {
            g.fill(&mut piece);
            if chunked {
                write!(w, "{:x}\r\n", piece.len()).unwrap();
                w.write_all(&piece).unwrap();
                w.write_all(b"\r\n").unwrap();
            } else {
                w.write_all(&piece).unwrap();
            }
        }
        if chunked {
            w.write_all(b"0\r\n\r\n").unwrap();
        }
        let mut got = Vec::new();
        let head = read_response(&mut c, &mut |d: &[u8]| got.extend_from_slice(d));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(
            String::from_utf8_lossy(&got),
            want,
            "upload, chunked: {chunked}"
        );
    }
    for mode in ["cl", "chunked"] {
        write!(
            c.get_mut(),
            "GET /download?n={LEN}&seed=4&mode={mode} HTTP/1.1\r\nHost: backend.test\r\n\r\n"
        )
        .unwrap();
        let (mut hash, mut len) = (Fnv::default(), 0);
        let head = read_response(&mut c, &mut |d: &[u8]| {
            hash.update(d);
            len += d.len();
        });
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(len, LEN, "download, {mode}");
        assert!(
            hash.0 == pattern_hash(LEN as u64, 4),
            "download, {mode}: bytes differ"
        );
    }
}

/// Opens a TLS connection, sends one keep-alive GET and reads its whole answer; the
/// connection is then left open, idle.
fn one_get_then_idle(
    s: &Server,
    ca: &std::path::Path,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut c = connect_tls(s, ca);
    write!(c, "GET / HTTP/1.1\r\nHost: backend.test\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 512];
    while !got.ends_with(b"secure hello\n") {
        let n = c.read(&mut b).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    c
}

/// An idle TLS keep-alive connection holds no I/O buffer and no read in flight: only
/// rustls' own state, the socket and the connection's task. Measured here (debug build,
/// 300 connections past 150 kept open to warm up, anonymous memory of the worker, several
/// runs each): 24.8 KiB each with monoio-rustls (its two 16 KiB buffers, and a read in
/// flight with a head buffer); 15.2 KiB with our stream but a read kept in flight;
/// 9.1–9.3 KiB parked. (Pss would be noisier here: other tests' servers share the binary's
/// pages, and each one that exits raises this worker's share.) The bound sits between the
/// last two, about 25 % from each.
#[test]
fn an_idle_tls_connection_holds_no_io_buffers() {
    const CONNS: usize = 300;
    const BOUND_KIB: f64 = 12.0;
    let template = format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\nhttp_listen = \"127.0.0.1:{}\"\nthreads = 1\nkeepalive_timeout_secs = 120\n\n[tls]\ncert_path = \"{{dir}}/server.crt\"\nkey_path = \"{{dir}}/server.key\"\n\n[path_routes.\"*\".\"/\"]\npath = \"{{dir}}/www\"\n",
        free_port()
    );
    let mut s = Server::prepare(&template);
    let ca = write_cert(&s);
    s.write_file("www/index.html", b"secure hello\n");
    s.spawn();
    assert!(
        wait_until(Duration::from_secs(10), || TcpStream::connect(s.addr())
            .is_ok()),
        "{}",
        s.log()
    );
    let anon = |s: &Server| {
        s.workers()
            .iter()
            .filter_map(|p| proc_status(*p, "RssAnon"))
            .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    // Warm up: rustls' session cache (256 entries, two tickets a handshake), the file
    // cache and the allocator's first pages are paid once, not per connection. These stay
    // open: what they freed, the measured connections would reuse and hide their cost.
    let _warm: Vec<_> = (0..150).map(|_| one_get_then_idle(&s, &ca)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = anon(&s);
    let idle: Vec<_> = (0..CONNS).map(|_| one_get_then_idle(&s, &ca)).collect();
    // Past the connections' short wait with a buffer (50 ms), to their idle wait.
    std::thread::sleep(Duration::from_millis(500));
    let after = anon(&s);
    let each = after.saturating_sub(before) as f64 / CONNS as f64;
    eprintln!("worker anonymous memory {before} KiB -> {after} KiB: {each:.1} KiB per idle TLS connection");
    assert!(
        each < BOUND_KIB,
        "{each:.1} KiB per idle TLS connection (bound {BOUND_KIB} KiB)"
    );
    // Still alive and served: idle is not closed.
    for mut c in idle.into_iter().take(3) {
        write!(
            c,
            "GET / HTTP/1.1\r\nHost: backend.test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut got = String::new();
        let _ = c.read_to_string(&mut got);
        assert!(got.ends_with("secure hello\n"), "{got}");
    }
}

#[test]
fn a_closing_tls_connection_ends_with_close_notify() {
    let (s, ca, _) = start();
    let mut tls = connect_tls(&s, &ca);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: backend.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    // rustls reports a TCP close without close_notify as UnexpectedEof: a truncation.
    let end = tls.read_to_end(&mut got);
    assert!(
        end.is_ok(),
        "the server closed without close_notify: {end:?}; got {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(String::from_utf8_lossy(&got).ends_with("secure hello\n"));
}

#[test]
fn a_response_cut_short_gets_no_close_notify() {
    // A backend that answers HTTP/1.0 with a body delimited by its close, then resets the
    // connection halfway: the client may learn of the cut only from the missing close_notify.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut r = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npartial");
            std::thread::sleep(Duration::from_millis(200));
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    });
    let mut s = Server::prepare(&format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\nthreads = 1\n\n[tls]\ncert_path = \"{{dir}}/server.crt\"\nkey_path = \"{{dir}}/server.key\"\n\n[path_routes.\"*\".\"/cut/\"]\ntype = \"Proxy\"\nurl = \"http://127.0.0.1:{backend_port}/\"\n"
    ));
    let ca = write_cert(&s);
    s.spawn();
    assert!(wait_until(Duration::from_secs(10), || TcpStream::connect(
        s.addr()
    )
    .is_ok()));
    let mut tls = connect_tls(&s, &ca);
    tls.write_all(b"GET /cut/ HTTP/1.0\r\nHost: backend.test\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let end = tls.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(text.ends_with("partial"), "{text:?}");
    assert!(
        end.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::UnexpectedEof),
        "a cut response looked complete: {end:?}"
    );
}
