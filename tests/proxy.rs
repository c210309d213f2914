//! Reverse proxy: proxy pass rules, header handling, streaming bodies with bounded memory,
//! connection reuse, retries and failover, HTTPS backends.

mod common;
use common::backend::{pattern_hash, Backend, Fnv, PatternGen};
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// One request on a fresh connection: (status, headers, body).
fn request(s: &Server, raw_request: &str) -> (u16, Vec<(String, String)>, String) {
    parse_response(&raw(
        s.addr(),
        raw_request.as_bytes(),
        Duration::from_secs(10),
    ))
}

fn get_path(
    s: &Server,
    host: &str,
    path: &str,
    extra: &str,
) -> (u16, Vec<(String, String)>, String) {
    request(
        s,
        &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n"),
    )
}

#[test]
fn spec_proxy_pass_table_and_header_rules() {
    let b = Backend::start("b1");
    let template = format!(
        r#"
[server]
listen = "127.0.0.1:{{port}}"
threads = 2

[path_routes."example.com"."/api/"]
type = "Proxy"
url = "{b}/app/"

[path_routes."example.com"."/backend"]
type = "Proxy"
url = "{b}"
  [path_routes."example.com"."/backend".security]
  add_request_headers = {{ "X-Real-IP" = "$client_ip", "X-Forwarded-Proto" = "https", "X-Uri" = "$request_uri" }}
  remove_request_headers = ["X-Debug-Token"]
  add_response_headers = {{ "Strict-Transport-Security" = "max-age=31536000" }}
  remove_response_headers = ["X-Powered-By"]

[path_routes."example.com"."/keephost"]
type = "Proxy"
url = "{b}/"
  [path_routes."example.com"."/keephost".security]
  add_request_headers = {{ "Host" = "$host" }}
"#,
        b = b.url()
    );
    let s = Server::start(&template);
    let rows = [
        ("/api/v1/users", "GET /app/v1/users"),
        ("/api/", "GET /app/"),
        ("/api", "GET /app/"),
        (
            "/api/v1/users?page=2&x=%20y",
            "GET /app/v1/users?page=2&x=%20y",
        ),
        ("/backend", "GET /"),
        ("/backend/", "GET /"),
        ("/backend/users", "GET /users"),
        ("/backend/a%20b", "GET /a%20b"),
    ];
    for (path, want) in rows {
        let (status, _, body) = get_path(&s, "example.com", path, "");
        assert_eq!(status, 200, "{path}");
        assert!(
            body.lines().nth(1) == Some(want),
            "{path}: backend saw {:?}",
            body.lines().nth(1)
        );
    }
    // Host: the backend's own authority by default, the client's with `Host = "$host"`.
    let (_, _, body) = get_path(&s, "example.com", "/backend/h", "");
    assert!(
        body.contains(&format!("Host: 127.0.0.1:{}\n", b.port)),
        "{body}"
    );
    let (_, _, body) = get_path(&s, "example.com:8443", "/keephost/h", "");
    assert!(body.contains("Host: example.com:8443\n"), "{body}");
    // Configured request headers replace what the client sent: X-Real-IP cannot be spoofed.
    let (_, _, body) = get_path(
        &s,
        "example.com",
        "/backend/x?q=1",
        "X-Real-IP: 6.6.6.6\r\nX-Debug-Token: secret\r\nX-Custom: kept\r\n",
    );
    assert!(
        body.contains("X-Real-IP: 127.0.0.1\n") && !body.contains("6.6.6.6"),
        "{body}"
    );
    assert!(
        body.contains("X-Forwarded-Proto: https\n") && body.contains("X-Uri: /backend/x?q=1\n"),
        "{body}"
    );
    assert!(
        !body.contains("X-Debug-Token") && body.contains("X-Custom: kept\n"),
        "{body}"
    );
    // Hop-by-hop request fields, and those the client's Connection names, do not pass.
    let (_, _, body) = get_path(&s, "example.com", "/backend/hop", "Connection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: 300\r\nTE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: x\r\n");
    for gone in [
        "X-Private",
        "Keep-Alive",
        "TE:",
        "Upgrade",
        "Proxy-Authorization",
        "Connection",
    ] {
        assert!(!body.contains(gone), "{gone} reached the backend: {body}");
    }
    // ... nor do the backend's, in the other direction; route response headers apply.
    let (status, h, _) = get_path(&s, "example.com", "/backend/hop", "");
    assert_eq!(status, 200);
    assert_eq!(header(&h, "x-hop"), None);
    assert_eq!(header(&h, "keep-alive"), None);
    assert_eq!(header(&h, "x-powered-by"), None);
    assert_eq!(header(&h, "x-kept"), Some("yes"));
    assert_eq!(
        header(&h, "strict-transport-security"),
        Some("max-age=31536000")
    );
    assert_eq!(header(&h, "server"), Some("zerocopy-server"));
    // Status and reason phrase pass through; HEAD gets the headers only.
    let (status, _, _) = get_path(&s, "example.com", "/backend/status?code=418", "");
    assert_eq!(status, 418);
    let text = raw(
        s.addr(),
        b"HEAD /backend/x HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\n"),
        "{text}"
    );
}

/// Sum of the workers' resident memory, in KiB.
fn workers_rss_kib(s: &Server) -> u64 {
    s.workers()
        .iter()
        .filter_map(|p| proc_status(*p, "VmRSS"))
        .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

const GIB: u64 = 1 << 30;

#[test]
fn gigabyte_bodies_stream_both_ways_in_bounded_memory() {
    let b = Backend::start("big");
    let s = Server::start(&format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\nthreads = 1\n\n[path_routes.\"t\".\"/\"]\ntype = \"Proxy\"\nurl = \"{}\"\n  [path_routes.\"t\".\"/\".security]\n  max_request_body_size = 2147483648\n  max_chunked_body_size = 2147483648\n",
        b.url()
    ));
    let baseline = workers_rss_kib(&s);
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pids = s.workers();
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let rss: u64 = pids
                    .iter()
                    .filter_map(|p| proc_status(*p, "VmRSS"))
                    .filter_map(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                    .sum();
                peak.fetch_max(rss, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let want = format!("{} {:016x}", GIB, pattern_hash(GIB, 3));
    // Uploads: Content-Length and chunked.
    for chunked in [false, true] {
        let mut c = TcpStream::connect(s.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_string()
        } else {
            format!("Content-Length: {GIB}")
        };
        write!(
            c,
            "POST /upload HTTP/1.1\r\nHost: t\r\n{framing}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut g = PatternGen::new(3);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            g.fill(&mut buf);
            if chunked {
                write!(c, "{:x}\r\n", buf.len()).unwrap();
                c.write_all(&buf).unwrap();
                c.write_all(b"\r\n").unwrap();
            } else {
                c.write_all(&buf).unwrap();
            }
        }
        if chunked {
            c.write_all(b"0\r\n\r\n").unwrap();
        }
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.ends_with(&want),
            "upload (chunked={chunked}) arrived as {:?}, want {want}",
            text.rsplit("\r\n").next()
        );
    }
    // Downloads: Content-Length, chunked, close-delimited.
    for mode in ["cl", "chunked", "close"] {
        let mut c = TcpStream::connect(s.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            c,
            "GET /download?n={GIB}&seed=3&mode={mode} HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        .unwrap();
        let mut r = BufReader::with_capacity(1 << 20, c);
        let mut chunked_to_client = false;
        let mut length = None;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            let lower = h.to_ascii_lowercase();
            if lower.starts_with("transfer-encoding: chunked") {
                chunked_to_client = true;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = Some(v.trim().parse::<u64>().unwrap());
            }
            if h == "\r\n" {
                break;
            }
        }
        let mut hash = Fnv::default();
        let mut got = 0u64;
        if chunked_to_client {
            loop {
                let mut size = String::new();
                r.read_line(&mut size).unwrap();
                let n = u64::from_str_radix(size.trim(), 16).unwrap();
                if n == 0 {
                    break;
                }
                let mut chunk = vec![0u8; n as usize];
                r.read_exact(&mut chunk).unwrap();
                hash.update(&chunk);
                got += n;
                let mut crlf = [0u8; 2];
                r.read_exact(&mut crlf).unwrap();
            }
        } else {
            assert_eq!(length, Some(GIB), "{mode}");
            let mut buf = vec![0u8; 1 << 20];
            while got < GIB {
                let n = r.read(&mut buf).unwrap();
                assert!(n > 0, "{mode}: cut at {got}");
                hash.update(&buf[..n]);
                got += n as u64;
            }
        }
        assert_eq!(
            (got, hash.0),
            (GIB, pattern_hash(GIB, 3)),
            "download mode={mode}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    // Five gigabytes went through; the worker grew by at most a few buffers.
    assert!(
        peak < baseline + 48 * 1024,
        "worker RSS rose from {baseline} KiB to {peak} KiB"
    );
}

#[test]
fn a_backend_that_dies_mid_body_cuts_the_client_connection() {
    let b = Backend::start("cut");
    let s = Server::start(&format!("[server]\nlisten = \"127.0.0.1:{{port}}\"\n\n[path_routes.\"t\".\"/\"]\ntype = \"Proxy\"\nurl = \"{}\"\n", b.url()));
    let fetch = |mode: &str| {
        let mut c = TcpStream::connect(s.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            c,
            "GET /download?n=1000000&mode={mode} HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        .unwrap();
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all);
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        (
            String::from_utf8_lossy(&all[..split]).to_string(),
            all[split..].to_vec(),
        )
    };
    // Content-Length announced, half sent: the client gets fewer bytes and a closed connection.
    let (head, body) = fetch("cut");
    assert!(head.contains("Content-Length: 1000000"), "{head}");
    assert!(body.len() < 1_000_000, "a cut body must not look complete");
    // Chunked, cut: the client never gets the last chunk.
    let (head, body) = fetch("chunkcut");
    assert!(head.contains("Transfer-Encoding: chunked"), "{head}");
    assert!(
        !body.ends_with(b"0\r\n\r\n"),
        "a cut chunked body must not be terminated"
    );
}

#[test]
fn backend_connections_are_reused_and_stale_ones_replaced() {
    let b = Backend::start("pool");
    let s = Server::start(&format!("[server]\nlisten = \"127.0.0.1:{{port}}\"\nthreads = 2\n\n[path_routes.\"t\".\"/\"]\ntype = \"Proxy\"\nurl = \"{}\"\n", b.url()));
    let agent = ureq::AgentBuilder::new().build();
    for i in 0..1000 {
        let r = agent
            .get(&s.url("/x"))
            .set("Host", "t")
            .call()
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status(), 200);
    }
    let conns = b.connections.load(Ordering::SeqCst);
    assert!(
        conns <= 4,
        "1000 sequential requests used {conns} backend connections"
    );
    // The backend now closes every connection after its response, without saying so: the
    // pooled connections it closed are noticed (or retried), no client sees an error.
    b.close_after_response.store(true, Ordering::SeqCst);
    for i in 0..100 {
        let r = agent
            .get(&s.url("/y"))
            .set("Host", "t")
            .call()
            .unwrap_or_else(|e| panic!("after close {i}: {e}"));
        assert_eq!(r.status(), 200);
    }
}

#[test]
fn non_idempotent_requests_are_never_replayed() {
    let b = Backend::start("drop");
    let s = Server::start(&format!("[server]\nlisten = \"127.0.0.1:{{port}}\"\n\n[path_routes.\"t\".\"/\"]\ntype = \"Proxy\"\nurl = \"{}\"\n", b.url()));
    let before = b.requests.load(Ordering::SeqCst);
    let (status, _, _) = request(
        &s,
        "POST /drop HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    );
    assert_eq!(status, 502);
    assert_eq!(
        b.requests.load(Ordering::SeqCst) - before,
        1,
        "a POST was sent twice"
    );
}

#[test]
fn refused_is_502_and_a_connect_timeout_is_504() {
    let dead = free_port();
    // A listener that never accepts, its queue full: further SYNs go unanswered.
    let silent = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    silent
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    silent.listen(0).unwrap();
    let silent_port = silent.local_addr().unwrap().as_socket().unwrap().port();
    let _fill: Vec<_> = (0..4)
        .filter_map(|_| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
            s.set_nonblocking(true).ok()?;
            let _ = s.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], silent_port)).into());
            Some(s)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let s = Server::start(&format!(
        r#"
[server]
listen = "127.0.0.1:{{port}}"

[path_routes."t"."/refused"]
type = "Proxy"
url = "http://127.0.0.1:{dead}"

[path_routes."t"."/silent"]
type = "Proxy"
url = "http://127.0.0.1:{silent_port}"
  [path_routes."t"."/silent".security]
  backend_connect_timeout_secs = 1
"#
    ));
    assert_eq!(get_path(&s, "t", "/refused", "").0, 502);
    let t = std::time::Instant::now();
    assert_eq!(get_path(&s, "t", "/silent", "").0, 504);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
fn https_backends_with_sni_and_a_private_ca() {
    let pki_dir = tempfile::tempdir().unwrap();
    let (tls, ca) = test_pki(pki_dir.path());
    let b = Backend::start_tls("tls", tls);
    let ca = ca.display();
    let port = b.port;
    let s = Server::start(&format!(
        r#"
[server]
listen = "127.0.0.1:{{port}}"

[path_routes."t"."/sni"]
type = "Proxy"
url = "https://127.0.0.1:{port}/"
sni_name = "backend.test"
ca_file = "{ca}"

[path_routes."t"."/ip"]
type = "Proxy"
url = "https://127.0.0.1:{port}/"
ca_file = "{ca}"

[path_routes."t"."/untrusted"]
type = "Proxy"
url = "https://127.0.0.1:{port}/"
sni_name = "backend.test"

[path_routes."t"."/wrongname"]
type = "Proxy"
url = "https://127.0.0.1:{port}/"
sni_name = "other.test"
ca_file = "{ca}"

[path_routes."t"."/pool"]
type = "Proxy"
upstream = "tls-pool"

[upstreams."tls-pool"]
ca_file = "{ca}"
servers = [{{ url = "https://127.0.0.1:{port}", sni_name = "backend.test" }}]
"#
    ));
    let (status, _, body) = get_path(&s, "t", "/sni/hello", "");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("GET /hello"), "{body}");
    assert!(
        b.sni.lock().unwrap().iter().any(|n| n == "backend.test"),
        "SNI sent: {:?}",
        b.sni.lock().unwrap()
    );
    assert_eq!(
        get_path(&s, "t", "/ip/x", "").0,
        200,
        "an IP URL verifies against the IP in the certificate"
    );
    assert_eq!(
        get_path(&s, "t", "/untrusted/x", "").0,
        502,
        "not signed by a trusted CA"
    );
    assert_eq!(
        get_path(&s, "t", "/wrongname/x", "").0,
        502,
        "the certificate is not for that name"
    );
    assert_eq!(get_path(&s, "t", "/pool/x", "").0, 200);
    // Kept-alive TLS backend connections are reused too.
    let agent = ureq::AgentBuilder::new().build();
    let before = b.connections.load(Ordering::SeqCst);
    for _ in 0..50 {
        assert_eq!(
            agent
                .get(&s.url("/sni/r"))
                .set("Host", "t")
                .call()
                .unwrap()
                .status(),
            200
        );
    }
    assert!(b.connections.load(Ordering::SeqCst) - before <= 2);
}
