//! HTTP/2 on the TLS listener (issue 11), against the real binary: `curl --http2` for every
//! route type and large bodies both ways through the proxy, and a frame-level client
//! (tests/h2_client.py, on PyPI's `h2`) for 100 streams on one connection, the floods, a
//! window that never opens, and a reload under load.

mod common;
use common::backend::{Backend, Fnv, PatternGen};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"
http_listen = "127.0.0.1:{http_port}"
threads = 1
shutdown_timeout_secs = 15

[logging]
access_log = "{dir}/access.log"

[tls]
cert_path = "{dir}/server.crt"
key_path = "{dir}/server.key"

[path_routes."*"."/"]
path = "{dir}/www"

[path_routes."*"."/r"]
type = "Redirect"
redirect_url = "https://example.com/"

[path_routes."*"."/api/"]
type = "Proxy"
url = "http://127.0.0.1:{backend}/"
[path_routes."*"."/api/".security]
max_request_body_size = 104857600
add_response_headers = { "X-Route" = "api" }

[path_routes."*"."/small/"]
type = "Proxy"
url = "http://127.0.0.1:{backend}/"
[path_routes."*"."/small/".security]
max_request_body_size = 1000
max_chunked_body_size = 1000

[path_routes."*"."/hold/"]
type = "Proxy"
url = "http://127.0.0.1:{hold}/"

[path_routes."*"."/stall/"]
path = "{dir}/www"
[path_routes."*"."/stall/".security]
send_timeout_secs = 1
"#;

struct H2Server {
    s: Server,
    ca: PathBuf,
    _backend: Backend,
    /// The backend of `/hold/`: accepts and never answers.
    hold: std::net::TcpListener,
}

/// A server with files, a redirect, proxy routes to a test backend (one with 1000-byte body
/// limits) and a route with a 1-second send timeout; `server_extra` and `tls_extra` are
/// added to its `[server]` and `[tls]` tables.
fn start(server_extra: &str, tls_extra: &str) -> H2Server {
    let backend = Backend::start("b1");
    let hold = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_port = free_port();
    let template = CONFIG
        .replace("{http_port}", &http_port.to_string())
        .replace("{backend}", &backend.port.to_string())
        .replace("{hold}", &hold.local_addr().unwrap().port().to_string())
        .replace(
            "shutdown_timeout_secs = 15\n",
            &format!("shutdown_timeout_secs = 15\n{server_extra}\n"),
        )
        .replace(
            "key_path = \"{dir}/server.key\"\n",
            &format!("key_path = \"{{dir}}/server.key\"\n{tls_extra}\n"),
        );
    let mut s = Server::prepare(&template);
    let p = pki();
    s.write_file("server.crt", p.cert_pem.as_bytes());
    s.write_file("server.key", p.key_pem.as_bytes());
    let ca = s.write_file("ca.pem", p.ca_pem.as_bytes());
    s.write_file("www/index.html", b"hello over h2\n");
    s.write_file("www/mid.bin", &pattern(256 * 1024, 5));
    s.write_file("www/big.bin", &pattern(4 << 20, 9));
    s.spawn();
    let ready = wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", http_port)).is_ok()
    });
    assert!(ready, "{}", s.log());
    H2Server {
        s,
        ca,
        _backend: backend,
        hold,
    }
}

struct Curl {
    /// `%{http_version} %{http_code}`.
    version: String,
    code: u16,
    /// `%{time_total}`: connection, TLS handshake and exchange, not curl's own start.
    took: Duration,
    headers: String,
    body: Vec<u8>,
}

/// curl to the TLS listener as `backend.test`; `args` go before the URL.
fn curl(h: &H2Server, path: &str, args: &[&str]) -> Curl {
    let out_file = h.s.path(&format!("curl-{}.out", free_port()));
    let head_file = h.s.path(&format!("curl-{}.head", free_port()));
    let port = h.s.port;
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--cacert"])
        .arg(&h.ca)
        .arg("--resolve")
        .arg(format!("backend.test:{port}:127.0.0.1"))
        .args(["-w", "%{http_version} %{http_code} %{time_total}", "-o"])
        .arg(&out_file)
        .arg("-D")
        .arg(&head_file)
        .args(args)
        .arg(format!("https://backend.test:{port}{path}"))
        .output()
        .expect("curl");
    let w = String::from_utf8_lossy(&out.stdout).to_string();
    let mut fields = w.split(' ');
    let (version, code, took) = (fields.next(), fields.next(), fields.next());
    let c = Curl {
        version: version.unwrap_or("").to_string(),
        code: code.and_then(|c| c.parse().ok()).unwrap_or(0),
        took: Duration::from_secs_f64(took.and_then(|t| t.trim().parse().ok()).unwrap_or(99.0)),
        headers: std::fs::read_to_string(&head_file)
            .unwrap_or_default()
            .to_ascii_lowercase(),
        body: std::fs::read(&out_file).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(out_file);
    let _ = std::fs::remove_file(head_file);
    c
}

fn h2_get(h: &H2Server, path: &str, args: &[&str]) -> Curl {
    let mut all = vec!["--http2"];
    all.extend_from_slice(args);
    let c = curl(h, path, &all);
    assert_eq!(
        c.version,
        "2",
        "{path}: HTTP/2 expected; log:\n{}",
        h.s.log()
    );
    c
}

/// The Python client's JSON answer.
fn client(h: &H2Server, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h2_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(h.s.port.to_string())
        .args(args)
        .output()
        .expect("python3 (h2 from PyPI: scripts/install-test-deps.sh)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{args:?}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

#[test]
fn curl_gets_every_route_type_over_http2() {
    let h = start("", "");
    let c = h2_get(&h, "/index.html", &[]);
    assert_eq!((c.code, c.body.as_slice()), (200, &b"hello over h2\n"[..]));
    let etag = c
        .headers
        .lines()
        .find_map(|l| l.strip_prefix("etag: "))
        .expect("etag")
        .trim()
        .to_string();
    // HEAD: the length of what GET sends, no body.
    let c = h2_get(&h, "/index.html", &["-I"]);
    assert_eq!(c.code, 200);
    assert!(c.headers.contains("content-length: 14"), "{}", c.headers);
    // A range, a conditional request, a redirect.
    let c = h2_get(&h, "/mid.bin", &["-r", "100-199"]);
    assert_eq!(c.code, 206);
    assert_eq!(c.body, pattern(256 * 1024, 5)[100..200]);
    let c = h2_get(
        &h,
        "/index.html",
        &["-H", &format!("If-None-Match: {etag}")],
    );
    assert_eq!((c.code, c.body.len()), (304, 0), "{}", c.headers);
    let c = h2_get(&h, "/r/x", &[]);
    assert_eq!(c.code, 301);
    assert!(
        c.headers.contains("location: https://example.com/"),
        "{}",
        c.headers
    );
    let c = h2_get(&h, "/nothing", &[]);
    assert_eq!(c.code, 404);
    // A whole file larger than every window.
    let c = h2_get(&h, "/big.bin", &[]);
    assert_eq!(sha256(&c.body), sha256(&pattern(4 << 20, 9)));
    // A proxied GET, with the route's response header.
    let c = h2_get(&h, "/api/echo?q=1", &["-H", "X-Client: yes"]);
    assert_eq!(c.code, 200);
    let echo = String::from_utf8_lossy(&c.body);
    assert!(echo.contains("GET /echo?q=1"), "{echo}");
    assert!(
        echo.to_ascii_lowercase().contains("x-client: yes"),
        "{echo}"
    );
    assert!(c.headers.contains("x-route: api"), "{}", c.headers);
    // ALPN http/1.1 still gets HTTP/1.1.
    let c = curl(&h, "/index.html", &["--http1.1"]);
    assert_eq!((c.version.as_str(), c.code), ("1.1", 200));
    // Metrics over HTTP/2: the streams counted, and the requests in the usual counters.
    let m = String::from_utf8(h2_get(&h, "/__metrics", &[]).body).unwrap();
    let streams = metric(&m, "zerocopy_proxy_http2_streams_total", &[]);
    assert!(streams >= 8.0, "{streams}");
    assert!(
        metric(
            &m,
            "zerocopy_proxy_http_requests_total",
            &["status=\"206\""]
        ) >= 1.0
    );
    let logged = wait_until(Duration::from_secs(5), || {
        let log = std::fs::read_to_string(h.s.path("access.log")).unwrap_or_default();
        log.contains("\"GET /mid.bin HTTP/2.0\" 206")
            && log.contains("\"GET /index.html HTTP/1.1\" 200")
    });
    assert!(
        logged,
        "{}",
        std::fs::read_to_string(h.s.path("access.log")).unwrap_or_default()
    );
}

#[test]
fn proxied_bodies_stream_both_ways_byte_exact() {
    let h = start("", "");
    // 50 MB up: the backend answers with the length and hash of what it received.
    let body = pattern(50 << 20, 3);
    let mut fnv = Fnv::default();
    fnv.update(&body);
    let upload = h.s.write_file("upload.bin", &body);
    drop(body);
    let at = format!("@{}", upload.display());
    let c = h2_get(&h, "/api/upload", &["--data-binary", &at]);
    let answer = String::from_utf8_lossy(&c.body).to_string();
    assert_eq!(
        (c.code, answer),
        (200, format!("{} {:016x}", 50 << 20, fnv.0))
    );
    // 100 MB down, with a Content-Length, then a chunked body.
    let n: usize = 100 << 20;
    let c = h2_get(&h, &format!("/api/download?n={n}&seed=7"), &[]);
    assert_eq!((c.code, c.body.len()), (200, n));
    assert_eq!(sha256(&c.body), pattern_sha256(100, 7));
    let c = h2_get(&h, "/api/download?n=3000000&seed=8&mode=chunked", &[]);
    assert_eq!(sha256(&c.body), sha256(&pattern(3_000_000, 8)));
    // The backend's HEAD answer carries its length (curl -I writes the head, not a body).
    let c = h2_get(&h, "/api/echo", &["-I"]);
    assert_eq!(c.code, 200);
    assert!(c.headers.contains("content-length: "), "{}", c.headers);
}

/// The sha256 of `mib` MiB of `PatternGen::new(seed)`: what the backend's `/download` sends.
fn pattern_sha256(mib: usize, seed: u64) -> Vec<u8> {
    let mut want = ring::digest::Context::new(&ring::digest::SHA256);
    let mut g = PatternGen::new(seed);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        g.fill(&mut buf);
        want.update(&buf);
    }
    want.finish().as_ref().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The same list as curl's, from the Python `h2` client on one connection: GET, HEAD, a
/// range, a 304, a redirect, a proxied GET, a 50 MB POST and a 100 MB proxied download.
#[test]
fn a_python_h2_client_gets_every_route_type_and_both_bodies() {
    let h = start("", "");
    let body = pattern(50 << 20, 4);
    let mut fnv = Fnv::default();
    fnv.update(&body);
    let upload = h.s.write_file("upload-py.bin", &body);
    drop(body);
    let download = format!("/api/download?n={}&seed=9", 100 << 20);
    let r = client(&h, &["requests", upload.to_str().unwrap(), &download]);
    // `name.field=JSON`, one per line.
    let field = |req: &str, key: &str| -> String {
        let prefix = format!("{req}.{key}=");
        let line = r.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
        line.unwrap_or_else(|| panic!("no {prefix}: {r}"))
            .to_string()
    };
    let quoted = |s: &str| format!("\"{s}\"");
    assert_eq!(field("get", "status"), "200");
    assert_eq!(field("get", "text"), quoted("hello over h2\\n"));
    assert_eq!(field("head", "status"), "200");
    assert_eq!(field("head", "length"), "0");
    assert_eq!(field("head", "content-length"), quoted("14"));
    assert_eq!(field("range", "status"), "206");
    let slice = sha256(&pattern(256 * 1024, 5)[100..200]);
    assert_eq!(field("range", "sha256"), quoted(&hex(&slice)));
    assert_eq!(field("304", "status"), "304");
    assert_eq!(field("304", "length"), "0");
    assert_eq!(field("redirect", "status"), "301");
    assert_eq!(
        field("redirect", "location"),
        quoted("https://example.com/")
    );
    assert_eq!(field("proxied", "status"), "200");
    let echo = field("proxied", "text");
    assert!(echo.contains("GET /echo?q=1"), "{r}");
    assert_eq!(field("post", "status"), "200");
    let posted = format!("{} {:016x}", 50 << 20, fnv.0);
    assert_eq!(field("post", "text"), quoted(&posted));
    assert_eq!(field("download", "status"), "200");
    assert_eq!(field("download", "length"), (100 << 20).to_string());
    let want = hex(&pattern_sha256(100, 9));
    assert_eq!(field("download", "sha256"), quoted(&want));
}

#[test]
fn a_hundred_streams_on_one_connection_are_all_answered() {
    let h = start("", "");
    let r = client(&h, &["streams", "100", "/mid.bin"]);
    assert!(r.contains("\"max_streams\": 128"), "{r}");
    assert!(r.contains("\"ended\": 100"), "{r}");
    assert_eq!(r.matches("262144").count(), 100, "{r}");
    let ok = format!("\"statuses\": [{}]", vec!["200"; 100].join(", "));
    assert!(r.contains(&ok), "{r}");
}

#[test]
fn each_flood_closes_its_connection_and_the_worker_serves_on() {
    let h = start("", "");
    for kind in [
        &["flood", "rapid_reset"][..],
        &["flood", "continuation"],
        &["flood", "settings"],
        &["flood", "ping"],
        &["flood", "empty_data"],
        &["flood", "zero_window", "/stall/big.bin"],
    ] {
        let r = client(&h, kind);
        assert!(r.contains("\"closed\": true"), "{kind:?}: {r}");
        // GOAWAY ENHANCE_YOUR_CALM (11).
        assert!(r.contains("\"goaway\": [[11, "), "{kind:?}: {r}");
        let c = h2_get(&h, "/index.html", &[]);
        assert_eq!(c.code, 200);
        assert!(c.took < Duration::from_secs(1), "{kind:?}: {:?}", c.took);
    }
    for why in [
        "rapid reset",
        "SETTINGS flood",
        "PING flood",
        "window stayed shut",
    ] {
        let said = wait_until(Duration::from_secs(5), || h.s.log().contains(why));
        assert!(said, "{why}: {}", h.s.log());
    }
}

#[test]
fn a_reload_finishes_or_refuses_every_stream_in_flight() {
    let h = start("", "");
    let pid = h.s.pid().to_string();
    let r = client(&h, &["reload", "100", "/api/slow?ms=2500", &pid]);
    let number = |key: &str| -> usize {
        let at = r.find(&format!("\"{key}\": ")).expect(key) + key.len() + 4;
        r[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // A GOAWAY came (the drain), and no stream was cut: each completed or was refused by
    // a GOAWAY naming a lower stream.
    assert!(r.contains("\"goaway\": [["), "{r}");
    assert_eq!(number("complete") + number("refused"), 100, "{r}");
    assert!(r.contains("\"reset\": {}"), "{r}");
    assert!(h.s.log().contains("generation 2: serving"), "{}", h.s.log());
}

#[test]
fn http2_off_keeps_http_1_1_and_h2c_serves_prior_knowledge() {
    let h = start("", "http2 = false");
    let c = curl(&h, "/index.html", &["--http2"]);
    assert_eq!((c.version.as_str(), c.code), ("1.1", 200));
    // h2c: HTTP/2 with prior knowledge on a plain listener, HTTP/1.1 beside it.
    let mut s = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 1\nhttp2_cleartext = true\n[path_routes.\"*\".\"/\"]\npath = \"{dir}/www\"\n",
    );
    s.write_file("www/index.html", b"plain h2\n");
    s.spawn();
    s.wait_ready();
    for (flag, version) in [("--http2-prior-knowledge", "2"), ("--http1.1", "1.1")] {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", flag, "-w", " %{http_version}"])
            .arg(s.url("/index.html"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(text, format!("plain h2\n {version}"), "{flag}: {}", s.log());
    }
    // Out of range: a config error.
    let bad = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nhttp2_max_concurrent_streams = 0\n",
    );
    let out = Command::new(BIN)
        .arg("-t")
        .arg("-c")
        .arg(&bad.config_path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("server.http2_max_concurrent_streams"),
        "{text}"
    );
}

#[test]
fn request_bodies_keep_the_route_limits() {
    let h = start("", "");
    let body = h.s.write_file("body.bin", &pattern(2000, 1));
    let at = format!("@{}", body.display());
    // A declared length past max_request_body_size: 413 before any byte is read. The rest
    // of the body is let in before the stream's reset: sent with the answer, that reset made
    // curl fail most such answers ("Stream error in the HTTP/2 framing layer").
    for _ in 0..10 {
        let c = h2_get(&h, "/small/upload", &["--data-binary", &at]);
        assert_eq!(c.code, 413);
    }
    // No length (curl streams stdin): past max_chunked_body_size while it arrives.
    let port = h.s.port;
    let out = Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "10", "--cacert"])
        .arg(&h.ca)
        .arg("--resolve")
        .arg(format!("backend.test:{port}:127.0.0.1"))
        .args([
            "-w",
            "%{http_version} %{http_code}",
            "-o",
            "/dev/null",
            "-T",
            "-",
        ])
        .arg(format!("https://backend.test:{port}/small/upload"))
        .stdin(std::fs::File::open(&body).unwrap())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 413");
    // Within the limit, without a length: sent on chunked, received whole.
    let small = h.s.write_file("small.bin", &pattern(900, 2));
    let out = Command::new("curl")
        .args(["-sS", "--http2", "--max-time", "10", "--cacert"])
        .arg(&h.ca)
        .arg("--resolve")
        .arg(format!("backend.test:{port}:127.0.0.1"))
        .args(["-T", "-"])
        .arg(format!("https://backend.test:{port}/small/upload"))
        .stdin(std::fs::File::open(&small).unwrap())
        .output()
        .unwrap();
    let mut fnv = Fnv::default();
    fnv.update(&pattern(900, 2));
    let want = format!("900 {:016x}", fnv.0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
}

#[test]
fn an_idle_connection_ends_with_a_goaway() {
    let h = start("keepalive_timeout_secs = 1", "");
    let r = client(&h, &["idle"]);
    assert!(r.contains("\"closed\": true"), "{r}");
    // NO_ERROR, naming no stream (none was opened).
    assert!(r.contains("[0, 0]"), "{r}");
    let secs: f64 = r
        .split("\"seconds\": ")
        .nth(1)
        .and_then(|t| t.trim_end_matches(['}', '\n']).parse().ok())
        .unwrap();
    assert!((0.9..4.0).contains(&secs), "{r}");
}

#[test]
fn a_reset_stream_lets_go_of_its_backend_connection() {
    let h = start("", "");
    let hold = h.hold.try_clone().unwrap();
    let seen = std::thread::spawn(move || {
        use std::io::Read;
        let (mut c, _) = hold.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4096];
        let mut head = Vec::new();
        // The request, then nothing: wait for the proxy to close its side.
        loop {
            match c.read(&mut buf) {
                Ok(0) => return (head, Some(Instant::now())),
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(_) => return (head, None),
            }
        }
    });
    let t = Instant::now();
    let r = client(&h, &["cancel", "/hold/x"]);
    assert!(r.contains("\"statuses\": []"), "{r}");
    let (head, closed) = seen.join().unwrap();
    assert!(String::from_utf8_lossy(&head).starts_with("GET /x HTTP/1.1"));
    let closed = closed.expect("the backend connection was not closed");
    // Reset at 0.3 s; the connection to the client stays open until 2.3 s.
    assert!(closed - t < Duration::from_millis(1500), "{:?}", closed - t);
}

#[test]
fn what_http2_forbids_in_a_request_is_refused() {
    let h = start("", "");
    let r = client(&h, &["malformed", "/api/echo"]);
    // Connection-specific fields, TE other than trailers, a body longer than its
    // content-length: that stream is reset with PROTOCOL_ERROR (1), never answered, and the
    // connection serves the next request.
    for case in ["connection", "transfer-encoding", "te", "content-length"] {
        let want = format!(
            "\"{case}\": {{\"reset\": 1, \"answered\": false, \"goaway\": [], \"then\": 200}}"
        );
        assert!(r.contains(&want), "{case}: {r}");
    }
    // An upper-case name fails HPACK decoding in `h2`: the connection ends, GOAWAY
    // PROTOCOL_ERROR.
    assert!(
        r.contains("\"uppercase\": {\"reset\": null, \"answered\": false, \"goaway\": [1], \"then\": null}"),
        "{r}"
    );
}
