//! `[metrics]`: the endpoint's path, and the addresses that may read it. A refused address
//! gets the plain 404 of an unknown path; no route takes the request over.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

/// A `File` route on `/` whose directory has files named like both metrics paths: if routing
/// took a refused or moved metrics request over, it would serve them.
const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"
threads = 2

[path_routes."127.0.0.1"."/"]
path = "{dir}/www"

[metrics]
"#;

fn start(metrics: &str, ready_path: &str, ready_from: Ipv4Addr) -> Server {
    let mut s = Server::prepare(&format!("{CONFIG}{metrics}\n"));
    s.write_file("www/__metrics", b"a file from disk\n");
    s.write_file("www/stats", b"a file from disk\n");
    s.spawn();
    let ready = wait_until(Duration::from_secs(20), || {
        fetch(&s, ready_from, ready_path).0 == 200
    });
    assert!(ready, "server did not start; log:\n{}", s.log());
    s
}

/// `GET path` from `ip`: (status, body).
fn fetch(s: &Server, ip: Ipv4Addr, path: &str) -> (u16, String) {
    let Ok(mut c) = connect(ip, s) else {
        return (0, String::new());
    };
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if c.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    let (status, _, body) = parse_response(&out);
    (status, body)
}

/// From a chosen 127.x source address; an error while the server is not listening yet.
fn connect(ip: Ipv4Addr, s: &Server) -> std::io::Result<std::net::TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    sock.bind(&std::net::SocketAddr::from((ip, 0)).into())?;
    sock.connect(&s.addr().into())?;
    Ok(sock.into())
}

fn is_metrics(body: &str) -> bool {
    body.contains("zerocopy_proxy_http_requests_total")
}

#[test]
fn the_metrics_path_moves() {
    let local = Ipv4Addr::LOCALHOST;
    let s = start("path = \"/stats\"", "/stats", local);
    let (status, body) = fetch(&s, local, "/stats");
    assert_eq!(status, 200);
    assert!(is_metrics(&body), "{body}");
    // The old path is an ordinary path again: the route serves its file.
    assert_eq!(
        fetch(&s, local, "/__metrics"),
        (200, "a file from disk\n".to_string())
    );
}

#[test]
fn allowed_ips_refuse_other_addresses_with_a_plain_404() {
    let allowed = Ipv4Addr::new(127, 0, 0, 2);
    let s = start(
        "allowed_ips = [\"127.0.0.2\", \"10.0.0.0/8\", \"::1\"]",
        "/__metrics",
        allowed,
    );
    for _ in 0..4 {
        let ip = allowed;
        let (status, body) = fetch(&s, ip, "/__metrics");
        assert_eq!(status, 200);
        assert!(is_metrics(&body), "{body}");
    }
    for ip in [Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 3)] {
        let (status, body) = fetch(&s, ip, "/__metrics");
        assert_eq!(status, 404, "from {ip}: {body}");
        assert!(!is_metrics(&body) && !body.contains("from disk"), "{body}");
        // Other paths are routed as usual for that address.
        assert_eq!(fetch(&s, ip, "/stats").0, 200);
    }
}

#[test]
fn metrics_keys_are_validated_and_printed() {
    let s = Server::prepare(&format!(
        "{CONFIG}path = \"stats\"\nallowed_ips = [\"10.0.0.0/33\", \"127.0.0.1\"]\n"
    ));
    let out = Command::new(BIN)
        .args(["-t", "-c", s.config_path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    let file = s.config_path.display().to_string();
    for expected in [
        format!("{file}:10: `metrics.path`: `stats` is not a plain absolute path"),
        format!("{file}:11: `metrics.allowed_ips`: invalid IP address or CIDR `10.0.0.0/33`"),
    ] {
        assert!(err.contains(&expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains("`127.0.0.1`"), "{err}");

    s.write_file("www/index.html", b"index\n");
    s.write_config(&format!("{CONFIG}allowed_ips = [\"127.0.0.2\"]\n"));
    let out = Command::new(BIN)
        .args(["-T", "-c", s.config_path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        text.contains("[metrics]\npath = \"/__metrics\"\nallowed_ips = [\"127.0.0.2\"]"),
        "{text}"
    );
}
