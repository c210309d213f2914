//! The HTTP/1.1 engine on raw sockets: malformed and ambiguous requests, keep-alive,
//! pipelining, request bodies, 100-continue, timeouts.

mod common;
use common::*;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"
threads = 2
keepalive_timeout_secs = 2
client_header_timeout_secs = 2

[path_routes."t"."/"]
path = "{dir}/www"

[path_routes."t"."/small"]
path = "{dir}/www"
  [path_routes."t"."/small".security]
  max_request_header_size = 1024
  max_request_body_size = 10
  max_chunked_body_size = 10
  client_body_timeout_secs = 1

[path_routes."t"."/go"]
type = "Redirect"
redirect_url = "https://elsewhere.example"
redirect_status = 303
"#;

fn start() -> Server {
    let mut s = Server::prepare(CONFIG);
    s.write_file("www/index.html", b"index\n");
    s.write_file("www/f.txt", b"file f\n");
    s.spawn();
    s.wait_ready();
    s
}

/// A response read off a raw connection.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (skipping 1xx) from `r`; `head_only` for answers to HEAD.
fn read_response(r: &mut impl BufRead, head_only: bool) -> Option<Resp> {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let status: u16 = line.split(' ').nth(1)?.parse().ok()?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).ok()?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (n, v) = h.split_once(':')?;
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        if status < 200 {
            continue;
        }
        let mut resp = Resp {
            status,
            headers,
            body: Vec::new(),
        };
        let len: usize = resp
            .header("content-length")
            .map_or(0, |v| v.parse().unwrap());
        if !head_only && status != 304 {
            resp.body = vec![0; len];
            r.read_exact(&mut resp.body).ok()?;
        }
        return Some(resp);
    }
}

/// Whether the server closed the connection (EOF or reset) within a short wait.
fn closed(r: &mut BufReader<TcpStream>) -> bool {
    r.get_ref()
        .set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let mut b = [0u8; 1];
    let result = match r.read(&mut b) {
        Ok(0) => true,
        Ok(_) => panic!("unexpected extra bytes after the response"),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => false,
        Err(_) => true,
    };
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    result
}

fn connect(s: &Server) -> (TcpStream, BufReader<TcpStream>) {
    let c = TcpStream::connect(s.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = BufReader::new(c.try_clone().unwrap());
    (c, r)
}

/// (request bytes, expected status, whether the server closes after answering)
fn cases() -> Vec<(String, Vec<u8>, u16, bool)> {
    let mut v: Vec<(&str, Vec<u8>, u16, bool)> = vec![
        // Smuggling vectors: ambiguous framing is refused and the connection closed.
        ("CL and TE together", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400, true),
        ("TE and CL together", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n".to_vec(), 400, true),
        ("two differing CL", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!".to_vec(), 400, true),
        ("CL with plus sign", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello".to_vec(), 400, true),
        ("negative CL", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n".to_vec(), 400, true),
        ("CL list", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec(), 400, true),
        ("CL hex", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 0x5\r\n\r\nhello".to_vec(), 400, true),
        ("CL overflow", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999999999\r\n\r\n".to_vec(), 400, true),
        ("CL with inner space", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 1 2\r\n\r\n".to_vec(), 400, true),
        ("TE gzip", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(), 400, true),
        ("TE chunked not final", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n".to_vec(), 400, true),
        ("TE chunked twice", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n".to_vec(), 400, true),
        ("two TE headers", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400, true),
        ("TE lookalike", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".to_vec(), 400, true),
        ("TE in HTTP/1.0", b"GET /f.txt HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400, true),
        ("space before colon", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".to_vec(), 400, true),
        ("obs-fold", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nX-A: a\r\n folded\r\n\r\n".to_vec(), 400, true),
        ("NUL in value", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nX-A: a\0b\r\n\r\n".to_vec(), 400, true),
        ("bare CR in value", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n".to_vec(), 400, true),
        ("control byte in value", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nX-A: a\x01b\r\n\r\n".to_vec(), 400, true),
        ("missing Host", b"GET /f.txt HTTP/1.1\r\n\r\n".to_vec(), 400, true),
        ("two Hosts", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n".to_vec(), 400, true),
        ("Host with space", b"GET /f.txt HTTP/1.1\r\nHost: t u\r\n\r\n".to_vec(), 400, true),
        ("Host with slash", b"GET /f.txt HTTP/1.1\r\nHost: t/u\r\n\r\n".to_vec(), 400, true),
        ("Host with userinfo", b"GET /f.txt HTTP/1.1\r\nHost: a@t\r\n\r\n".to_vec(), 400, true),
        ("space in header name", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nX A: b\r\n\r\n".to_vec(), 400, true),
        ("empty header name", b"GET /f.txt HTTP/1.1\r\nHost: t\r\n: b\r\n\r\n".to_vec(), 400, true),
        ("bad method character", b"G@T /f.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400, true),
        ("HTTP/2.0 line", b"GET /f.txt HTTP/2.0\r\nHost: t\r\n\r\n".to_vec(), 400, true),
        ("HTTP/1.2", b"GET /f.txt HTTP/1.2\r\nHost: t\r\n\r\n".to_vec(), 400, true),
        ("HTTP/0.9 style", b"GET /f.txt\r\n\r\n".to_vec(), 400, true),
        ("relative target", b"GET f.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400, true),
        ("space in target", b"GET /f .txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400, true),
        ("asterisk with GET", b"GET * HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400, true),
        ("bad escape", b"GET /%zz HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400, true),
        ("invalid UTF-8 path", b"GET /%ff HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400, true),
        ("above the root", b"GET /../f.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400, true),
        ("encoded slash", b"GET /a%2Ff.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 400, true),
        // Chunked bodies (read and dropped for a File route).
        ("chunked bad hex", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(), 400, true),
        ("chunked size overflow", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n".to_vec(), 400, true),
        ("chunk without CRLF", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n".to_vec(), 400, true),
        ("chunked over the limit", b"GET /small/f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n".to_vec(), 413, true),
        ("chunked with extension and trailer", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: yes\r\n\r\n".to_vec(), 200, false),
        ("trailer line without a colon", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nno colon\r\n\r\n".to_vec(), 400, true),
        // Chunk extensions: at most 16 KiB per body (`;` and the extension's bytes).
        ("chunk extension of 16 KiB", format!("GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(16 * 1024 - 1)).into_bytes(), 200, false),
        ("chunk extension past 16 KiB", format!("GET /f.txt HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(16 * 1024)).into_bytes(), 400, true),
        ("Content-Length over the limit", b"GET /small/f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello world".to_vec(), 413, true),
        ("Content-Length body dropped", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello".to_vec(), 200, false),
        ("identical CL repeated", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello".to_vec(), 200, false),
        // Size limits.
        ("head over the route's limit", format!("GET /small/f.txt HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(1500)).into_bytes(), 431, true),
        ("same head elsewhere", format!("GET /f.txt HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(1500)).into_bytes(), 200, false),
        ("head over every limit", format!("GET /f.txt HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(9000)).into_bytes(), 431, true),
        ("target too long", format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(9000)).into_bytes(), 414, true),
        ("too many fields", format!("GET /f.txt HTTP/1.1\r\nHost: t\r\n{}\r\n", "X-A: b\r\n".repeat(120)).into_bytes(), 431, true),
        // Well-formed but unusual: answered, connection kept.
        ("absolute-form target", b"GET http://t/f.txt HTTP/1.1\r\nHost: ignored\r\n\r\n".to_vec(), 200, false),
        ("bare LF line ends", b"GET /f.txt HTTP/1.1\nHost: t\n\n".to_vec(), 200, false),
        ("lower-case method", b"get /f.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 405, false),
        ("unknown method", b"BREW /f.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 405, false),
        ("unknown expectation", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nExpect: tea\r\n\r\n".to_vec(), 417, true),
        ("dot segments", b"GET /x/../f.txt HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 200, false),
        ("HTTP/1.0 keep-alive", b"GET /f.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".to_vec(), 404, false),
        ("HTTP/1.0 closes", b"GET /f.txt HTTP/1.0\r\nHost: t\r\n\r\n".to_vec(), 200, true),
        ("Connection: close", b"GET /f.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(), 200, true),
        ("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 204, false),
    ];
    v.drain(..)
        .map(|(n, r, s, c)| (n.to_string(), r, s, c))
        .collect()
}

#[test]
fn malformed_and_ambiguous_requests_table() {
    let s = start();
    let cases = cases();
    assert!(cases.len() >= 40);
    let mut failures = Vec::new();
    for (name, request, status, closes) in &cases {
        let (mut c, mut r) = connect(&s);
        c.write_all(request).unwrap();
        let Some(resp) = read_response(&mut r, false) else {
            failures.push(format!("{name}: no response"));
            continue;
        };
        if resp.status != *status {
            failures.push(format!("{name}: status {} (want {status})", resp.status));
            continue;
        }
        let was_closed = closed(&mut r);
        if was_closed != *closes {
            failures.push(format!("{name}: closed={was_closed} (want {closes})"));
            continue;
        }
        if *closes {
            assert_eq!(
                resp.header("connection"),
                Some("close"),
                "{name}: announces the close"
            );
        } else {
            // Still in step: the next request on the same connection is answered.
            c.write_all(b"GET /f.txt HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            match read_response(&mut r, false) {
                Some(next) if next.status == 200 && next.body == b"file f\n" => {}
                other => failures.push(format!("{name}: follow-up {other:?}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn ten_thousand_requests_on_one_connection() {
    let s = start();
    let (mut c, mut r) = connect(&s);
    for i in 0..10_000 {
        c.write_all(b"GET /f.txt HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let resp =
            read_response(&mut r, false).unwrap_or_else(|| panic!("request {i}: no response"));
        assert_eq!(
            (resp.status, resp.body.as_slice()),
            (200, &b"file f\n"[..]),
            "request {i}"
        );
    }
}

#[test]
fn a_hundred_pipelined_requests_are_answered_in_order() {
    let s = start();
    s.write_file("www/n/x", b"");
    let mut batch = Vec::new();
    for i in 0..100 {
        s.write_file(&format!("www/n/{i}.txt"), format!("{i}\n").as_bytes());
        let method = if i % 10 == 9 { "HEAD" } else { "GET" };
        let body = if i % 7 == 3 {
            "Content-Length: 3\r\n\r\nabc"
        } else {
            "\r\n"
        };
        batch.extend_from_slice(
            format!("{method} /n/{i}.txt HTTP/1.1\r\nHost: t\r\n{body}").as_bytes(),
        );
    }
    let (mut c, mut r) = connect(&s);
    c.write_all(&batch).unwrap();
    for i in 0..100 {
        let head = i % 10 == 9;
        let resp = read_response(&mut r, head).unwrap_or_else(|| panic!("response {i} missing"));
        assert_eq!(resp.status, 200, "response {i}");
        if head {
            assert_eq!(
                resp.header("content-length"),
                Some(format!("{}", format!("{i}\n").len()).as_str())
            );
        } else {
            assert_eq!(
                resp.body,
                format!("{i}\n").as_bytes(),
                "response {i} out of order"
            );
        }
    }
}

#[test]
fn expect_100_continue_and_request_bodies() {
    let s = start();
    let (mut c, mut r) = connect(&s);
    c.write_all(
        b"POST /go HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
    r.read_line(&mut line).unwrap();
    c.write_all(b"hello world").unwrap();
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(
        (resp.status, resp.header("location")),
        (303, Some("https://elsewhere.example"))
    );
    // A chunked body in pieces, then the connection goes on.
    c.write_all(b"POST /go HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab")
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    c.write_all(b"cd\r\n0\r\n\r\nGET /f.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().status, 303);
    assert_eq!(read_response(&mut r, false).unwrap().body, b"file f\n");
    // An error known before the body: no 100, answered at once, connection closed.
    c.write_all(b"POST /small/f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n\r\n").unwrap();
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(
        (resp.status, resp.header("connection")),
        (413, Some("close"))
    );
    assert!(closed(&mut r));
    // The metrics saw the body sizes.
    let m = s.metrics();
    assert!(
        metric(&m, "zerocopy_proxy_http_request_size_bytes_sum", &[]) >= 15.0,
        "{m}"
    );
}

#[test]
fn a_refused_body_does_not_destroy_the_response() {
    // The client keeps sending a large body after the 413: the answer must still arrive
    // (lingering close), not be lost to a connection reset.
    let s = start();
    let (mut c, mut r) = connect(&s);
    c.write_all(b"POST /small/x HTTP/1.1\r\nHost: t\r\nContent-Length: 4000000\r\n\r\n")
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..20 {
        if c.write_all(&chunk).is_err() {
            break;
        }
    }
    let resp = read_response(&mut r, false).expect("the 413 arrives");
    assert_eq!(resp.status, 413);
}

#[test]
fn timeouts_answer_408_and_idle_connections_close() {
    let s = start();
    // A head that stops half-way: 408 after client_header_timeout_secs (2 s).
    let (mut c, mut r) = connect(&s);
    c.write_all(b"GET /f.txt HTTP/1.1\r\nHost: t\r\n").unwrap();
    let t = Instant::now();
    let resp = read_response(&mut r, false).unwrap();
    assert_eq!(resp.status, 408);
    assert!(
        t.elapsed() >= Duration::from_millis(1500) && t.elapsed() < Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
    assert!(closed(&mut r));
    // A body that stops: 408 after the route's client_body_timeout_secs (1 s).
    let (mut c, mut r) = connect(&s);
    c.write_all(b"GET /small/f.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\nabc")
        .unwrap();
    let t = Instant::now();
    assert_eq!(read_response(&mut r, false).unwrap().status, 408);
    assert!(
        t.elapsed() >= Duration::from_millis(800) && t.elapsed() < Duration::from_secs(4),
        "{:?}",
        t.elapsed()
    );
    // An idle keep-alive connection is closed after keepalive_timeout_secs (2 s), silently.
    let (mut c, mut r) = connect(&s);
    c.write_all(b"GET /f.txt HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().status, 200);
    let t = Instant::now();
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(6)))
        .unwrap();
    let mut b = [0u8; 1];
    assert_eq!(r.read(&mut b).unwrap_or(0), 0);
    assert!(
        t.elapsed() >= Duration::from_millis(1500) && t.elapsed() < Duration::from_secs(5),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn http_1_0_keep_alive_is_announced() {
    let s = start();
    let (mut c, mut r) = connect(&s);
    for _ in 0..3 {
        c.write_all(b"GET /f.txt HTTP/1.0\r\nHost: t\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap();
        let resp = read_response(&mut r, false).unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.header("connection"),
            Some("keep-alive"),
            "an HTTP/1.0 client closes unless told"
        );
    }
}

#[test]
fn max_concurrent_connections_is_global_across_workers() {
    let config = CONFIG.replacen(
        "[path_routes",
        "[security]\nmax_concurrent_connections = 3\n\n[path_routes",
        1,
    );
    let mut s = Server::prepare(&config);
    s.write_file("www/f.txt", b"file f\n");
    s.spawn();
    s.wait_ready();
    // Three kept-alive connections, from addresses spread over both workers.
    let mut held = Vec::new();
    for i in 0..3u8 {
        let c = connect_from(std::net::Ipv4Addr::new(127, 5, 0, i + 1), s.addr());
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        let mut w = c;
        w.write_all(b"GET /f.txt HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert_eq!(read_response(&mut r, false).unwrap().status, 200);
        held.push((w, r));
    }
    // A fourth is refused with a 503, whichever worker takes it.
    for i in 0..4u8 {
        let text = raw(
            std::net::SocketAddr::from(([127, 0, 0, 1], s.port)),
            format!("GET /f.txt HTTP/1.1\r\nHost: t\r\nX-Try: {i}\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        );
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    }
    // One closes: there is room again.
    drop(held.pop());
    assert!(wait_until(Duration::from_secs(3), || {
        raw(
            s.addr(),
            b"GET /f.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .starts_with("HTTP/1.1 200")
    }));
    assert!(wait_until(Duration::from_secs(3), || s
        .log()
        .contains("max_concurrent_connections (3) reached")));
}
