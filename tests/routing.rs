//! Routing, File and Redirect routes, response headers, per-route security, keep-alive.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"
threads = 2

[host_routes."whole.test"]
type = "File"
path = "{dir}/www/assets"

[path_routes."example.com"."/robots.txt"]
type = "File"
path = "{dir}/www/robots.txt"

[path_routes."example.com"."/static/"]
type = "File"
path = "{dir}/www/assets/"
mode = "sendfile"

[path_routes."example.com"."/docs"]
type = "File"
path = "{dir}/www/docs/"

[path_routes."example.com"."/user/"]
type = "File"
path = "{dir}/www/user/"
index = "profile.html"

[path_routes."example.com"."/mem"]
type = "File"
path = "{dir}/www/assets"
mode = "memory"

[path_routes."example.com"."/favicon.ico"]
type = "File"
path = "{dir}/www/favicon.ico"
mode = "memory"

[path_routes."example.com"."/legacy/"]
type = "Redirect"
redirect_url = "https://example.com/v2"
redirect_status = 301
preserve_path = true

[path_routes."example.com"."/moved"]
type = "Redirect"
redirect_url = "https://new.example.com$request_uri"
redirect_status = 308

[path_routes."example.com"."/tail"]
type = "Redirect"
redirect_url = "https://t.example.com$path"
redirect_status = 302

[path_routes."example.com"."/api/"]
type = "Proxy"
url = "http://127.0.0.1:9/app/"

[path_routes."example.com"."/admin/"]
type = "File"
path = "{dir}/www/assets/"
  [path_routes."example.com"."/admin/".security]
  allowed_ips = ["10.0.0.0/8"]

[path_routes."example.com"."/open/"]
type = "File"
path = "{dir}/www/assets/"
  [path_routes."example.com"."/open/".security]
  allowed_ips = ["127.0.0.0/8"]
  denied_ips = ["127.0.0.66"]
  allowed_methods = ["GET"]
  add_response_headers = { "Strict-Transport-Security" = "max-age=31536000", "Content-Type" = "x/replaced" }
  remove_response_headers = ["Server"]

[path_routes."example.com"."/"]
type = "File"
path = "{dir}/www/index.html"

[path_routes."boundary.test"."/"]
path = "{dir}/www"

[path_routes."boundary.test"."/docs"]
path = "{dir}/www/docs"

[path_routes."*"."/"]
type = "Redirect"
redirect_url = "https://fallback.example$request_uri"
redirect_status = 302
"#;

fn start() -> Server {
    let mut s = Server::prepare(CONFIG);
    s.write_file("www/robots.txt", b"robots\n");
    s.write_file("www/assets/index.html", b"assets index\n");
    s.write_file("www/assets/css/style.css", b"body{}\n");
    s.write_file("www/docs/index.html", b"docs index\n");
    s.write_file("www/docs/guide/intro.html", b"intro\n");
    s.write_file("www/user/profile.html", b"profile\n");
    s.write_file("www/favicon.ico", b"\x00\x00\x01\x00icon");
    s.write_file("www/index.html", b"root\n");
    s.write_file("www/docsx", b"not the docs\n");
    s.write_file("secret.txt", b"secret\n");
    std::os::unix::fs::symlink(s.path("secret.txt"), s.path("www/assets/escape.txt")).unwrap();
    s.spawn();
    s.wait_ready();
    s
}

/// One request on a fresh connection: (status, headers lower-cased, body).
fn request(
    s: &Server,
    method: &str,
    host: &str,
    target: &str,
) -> (u16, Vec<(String, String)>, String) {
    let text = raw(
        s.addr(),
        format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(5),
    );
    parse_response(&text)
}

#[test]
fn spec_routing_and_file_tables() {
    let s = start();
    let cases: &[(&str, &str, u16, &str)] = &[
        ("example.com", "/robots.txt", 200, "robots\n"),
        ("example.com", "/robots.txt/extra", 404, ""),
        ("example.com", "/static/css/style.css", 200, "body{}\n"),
        ("example.com", "/static/", 200, "assets index\n"),
        ("example.com", "/static", 200, "assets index\n"),
        ("example.com", "/docs", 200, "docs index\n"),
        ("example.com", "/docs/", 200, "docs index\n"),
        ("example.com", "/docs/guide/intro.html", 200, "intro\n"),
        ("example.com", "/docsx", 404, ""),
        ("example.com", "/robots.txt/", 404, ""),
        ("boundary.test", "/docsx", 200, "not the docs\n"),
        ("boundary.test", "/docs/", 200, "docs index\n"),
        ("example.com", "/user/", 200, "profile\n"),
        ("example.com", "/mem/css/style.css", 200, "body{}\n"),
        ("example.com", "/mem", 200, "assets index\n"),
        ("example.com", "/favicon.ico", 200, "\0\0\u{1}\0icon"),
        ("example.com", "/", 200, "root\n"),
        ("EXAMPLE.com:8080", "/robots.txt", 200, "robots\n"),
        ("whole.test", "/css/style.css", 200, "body{}\n"),
        ("WHOLE.test", "/", 200, "assets index\n"),
        ("example.com", "/static/missing.css", 404, ""),
        // A directory without its index: 404, never a listing.
        ("example.com", "/static/css/", 404, ""),
        ("example.com", "/static/css", 404, ""),
        ("example.com", "/static/escape.txt", 404, ""),
        // Dot-segments resolve before routing: this is `/secret.txt`, not under /static/.
        ("example.com", "/static/../secret.txt", 404, ""),
        ("example.com", "/static/%2e%2e/secret.txt", 404, ""),
        ("example.com", "/static/../../secret.txt", 400, ""),
        ("example.com", "/static/css%2fstyle.css", 400, ""),
    ];
    for (host, path, status, body) in cases {
        let (got, _, got_body) = request(&s, "GET", host, path);
        assert_eq!(got, *status, "{host}{path}");
        if *status == 200 {
            assert_eq!(got_body, *body, "{host}{path}");
        }
    }
    let (_, h, _) = request(&s, "GET", "example.com", "/static/css/style.css");
    assert_eq!(header(&h, "content-type"), Some("text/css; charset=utf-8"));
    assert_eq!(header(&h, "content-length"), Some("7"));
    assert!(header(&h, "last-modified").is_some());
    // HEAD: the same headers, no body.
    let (status, h, body) = request(&s, "HEAD", "example.com", "/robots.txt");
    assert_eq!(
        (status, header(&h, "content-length"), body.as_str()),
        (200, Some("7"), "")
    );
    // Not a GET on a File route.
    let (status, h, _) = request(&s, "POST", "example.com", "/robots.txt");
    assert_eq!((status, header(&h, "allow")), (405, Some("GET, HEAD")));
}

#[test]
fn redirects_substitute_variables_and_keep_paths() {
    let s = start();
    let cases = [
        (
            "example.com",
            "/legacy/users",
            301,
            "https://example.com/v2/users",
        ),
        (
            "example.com",
            "/legacy/api/data?x=1",
            301,
            "https://example.com/v2/api/data?x=1",
        ),
        (
            "example.com",
            "/moved/a?b=c",
            308,
            "https://new.example.com/moved/a?b=c",
        ),
        ("example.com", "/tail/x/y", 302, "https://t.example.com/x/y"),
        ("example.com", "/tail", 302, "https://t.example.com/"),
        ("unknown.host", "/q?1", 302, "https://fallback.example/q?1"),
    ];
    for (host, path, status, location) in cases {
        let (got, h, _) = request(&s, "GET", host, path);
        assert_eq!(
            (got, header(&h, "location")),
            (status, Some(location)),
            "{host}{path}"
        );
    }
}

#[test]
fn route_security_and_response_headers() {
    let s = start();
    let (status, _, _) = request(&s, "GET", "example.com", "/admin/index.html");
    assert_eq!(status, 403, "127.0.0.1 is not in allowed_ips");
    let (status, h, body) = request(&s, "GET", "example.com", "/open/index.html");
    assert_eq!((status, body.as_str()), (200, "assets index\n"));
    assert_eq!(
        header(&h, "strict-transport-security"),
        Some("max-age=31536000")
    );
    assert_eq!(
        header(&h, "content-type"),
        Some("x/replaced"),
        "an added header replaces"
    );
    assert_eq!(header(&h, "server"), None, "removed");
    // The security header is on errors of the route too.
    let (status, h, _) = request(&s, "GET", "example.com", "/open/missing");
    assert_eq!(
        (status, header(&h, "strict-transport-security")),
        (404, Some("max-age=31536000"))
    );
    let (status, h, _) = request(&s, "DELETE", "example.com", "/open/index.html");
    assert_eq!((status, header(&h, "allow")), (405, Some("GET")));
    // denied_ips wins over allowed_ips.
    let mut c = connect_from("127.0.0.66".parse().unwrap(), s.addr());
    write!(
        c,
        "GET /open/index.html HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    assert_eq!(parse_response(&text).0, 403);
    // A proxy route whose backend refuses the connection: 502.
    assert_eq!(request(&s, "GET", "example.com", "/api/v1").0, 502);
}

#[test]
fn metrics_count_by_configured_host_and_other() {
    let s = start();
    request(&s, "GET", "example.com", "/robots.txt");
    request(&s, "GET", "Example.COM", "/robots.txt");
    request(&s, "GET", "nobody.knows", "/x");
    request(&s, "BREW", "example.com", "/robots.txt");
    let m = s.metrics();
    assert_eq!(
        metric(
            &m,
            "zerocopy_proxy_http_requests_total",
            &["host=\"example.com\"", "method=\"GET\"", "status=\"200\""]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "zerocopy_proxy_http_requests_total",
            &["host=\"other\"", "status=\"302\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "zerocopy_proxy_http_requests_total",
            &["host=\"example.com\"", "method=\"OTHER\"", "status=\"405\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "zerocopy_proxy_http_request_duration_seconds_count",
            &["host=\"example.com\"", "method=\"GET\""]
        ),
        2.0
    );
    assert!(!m.contains("nobody.knows"));
    assert!(metric(&m, "zerocopy_proxy_http_response_size_bytes_count", &[]) >= 4.0);
}

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let s = start();
    let stream = TcpStream::connect(s.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for i in 0..200 {
        write!(
            writer,
            "GET /robots.txt HTTP/1.1\r\nHost: example.com\r\n\r\n"
        )
        .unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "request {i}: {line}");
        let mut len = 0;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            assert!(!h.to_ascii_lowercase().starts_with("connection: close"));
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        assert_eq!(body, b"robots\n");
    }
    // HTTP/1.0 closes unless asked to keep alive; `Connection: close` closes.
    let text = raw(
        s.addr(),
        b"GET /robots.txt HTTP/1.0\r\nHost: example.com\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("robots\n"),
        "{text}"
    );
    let text = raw(
        s.addr(),
        b"GET /robots.txt HTTP/1.1\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(
        text.starts_with("HTTP/1.1 400"),
        "HTTP/1.1 without Host: {text}"
    );
    let text = raw(s.addr(), b"NOT HTTP AT ALL\r\n\r\n", Duration::from_secs(5));
    assert!(
        text.starts_with("HTTP/1.1 400") && text.contains("Connection: close"),
        "{text}"
    );
}

#[test]
fn example_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["conf/quickstart.toml", "conf/example.toml"] {
        let out = std::process::Command::new(BIN)
            .args(["-t", "-c", name])
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn rate_limits_hold_per_client_over_all_workers() {
    let mut s = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 2\n\n[path_routes.\"t\".\"/\"]\npath = \"{dir}/www\"\n  [path_routes.\"t\".\"/\".security]\n  rate_limit_requests_per_min = 5\n",
    );
    s.write_file("www/index.html", b"hi\n");
    s.spawn();
    s.wait_ready();
    let from = |ip: [u8; 4]| {
        // A new connection each time: the kernel spreads them over both workers.
        let mut c = connect_from(std::net::Ipv4Addr::from(ip), s.addr());
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(c, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        parse_response(&text)
    };
    for i in 0..5 {
        assert_eq!(from([127, 6, 0, 1]).0, 200, "request {i}");
    }
    let (status, h, _) = from([127, 6, 0, 1]);
    assert_eq!(status, 429);
    let retry: u64 = header(&h, "retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(
        from([127, 6, 0, 1]).0,
        429,
        "refused requests do not reset the window"
    );
    // Another client has its own window.
    assert_eq!(from([127, 6, 0, 2]).0, 200);
}
