//! The proxy and a backend's framing and bytes: a response with both Transfer-Encoding and
//! Content-Length is read as chunked and its connection is not reused (RFC 9112 §6.3);
//! header values with obs-text (0x80–0xFF) cross the proxy byte-exact in both directions.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// A backend that answers every request on a connection with `answer(head)`, keeps the
/// connection open, and records the heads it got and how many connections it accepted.
struct RawBackend {
    port: u16,
    connections: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RawBackend {
    fn start(answer: fn(&[u8]) -> Vec<u8>) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: Arc<AtomicUsize> = Default::default();
        let heads: Arc<Mutex<Vec<Vec<u8>>>> = Default::default();
        let (c, h) = (connections.clone(), heads.clone());
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                c.fetch_add(1, Ordering::SeqCst);
                let h = h.clone();
                thread::spawn(move || serve(stream, answer, h));
            }
        });
        RawBackend {
            port,
            connections,
            heads,
        }
    }
}

fn serve(mut stream: TcpStream, answer: fn(&[u8]) -> Vec<u8>, heads: Arc<Mutex<Vec<Vec<u8>>>>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return,
        }
        if buf.ends_with(b"\r\n\r\n") {
            let head = std::mem::take(&mut buf);
            let out = answer(&head);
            heads.lock().unwrap().push(head);
            if stream.write_all(&out).is_err() {
                return;
            }
        }
    }
}

fn proxy_to(port: u16) -> Server {
    Server::start(&format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\nthreads = 1\n\n[path_routes.\"127.0.0.1\".\"/\"]\ntype = \"Proxy\"\nurl = \"http://127.0.0.1:{port}/\"\n"
    ))
}

/// One request on its own connection; the whole answer as bytes.
fn exchange(s: &Server, request: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(s.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_response_with_both_framings_is_read_as_chunked_and_its_connection_not_reused() {
    let b = RawBackend::start(|_| {
        // The Content-Length (3) disagrees with the chunked body (hello): chunked wins.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            .to_vec()
    });
    let s = proxy_to(b.port);
    for _ in 0..3 {
        let out = exchange(
            &s,
            b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            !text.to_ascii_lowercase().contains("content-length: 3"),
            "{text}"
        );
        assert!(text.contains("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{text}");
    }
    assert_eq!(
        b.connections.load(Ordering::SeqCst),
        3,
        "a connection that sent both framings was reused"
    );

    // The same backend framing only chunked: its connection is reused (the check above can
    // fail).
    let good = RawBackend::start(|_| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()
    });
    let s = proxy_to(good.port);
    for _ in 0..3 {
        let out = exchange(
            &s,
            b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        );
        assert!(out.starts_with(b"HTTP/1.1 200"));
    }
    assert_eq!(good.connections.load(Ordering::SeqCst), 1);
}

#[test]
fn obs_text_header_values_pass_byte_exact_both_ways() {
    let b = RawBackend::start(|_| {
        b"HTTP/1.1 200 OK\r\nX-Back: caf\xe9 \x80\xff\r\nContent-Length: 2\r\n\r\nok".to_vec()
    });
    let s = proxy_to(b.port);
    let out = exchange(
        &s,
        b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Obs: na\xefve \xfe\x81\r\nConnection: close\r\n\r\n",
    );
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(
        find(&out, b"\r\nX-Back: caf\xe9 \x80\xff\r\n"),
        "the response header was re-encoded: {:?}",
        String::from_utf8_lossy(&out)
    );
    let heads = b.heads.lock().unwrap();
    assert!(
        find(&heads[0], b"\r\nX-Obs: na\xefve \xfe\x81\r\n"),
        "the request header was re-encoded: {:?}",
        String::from_utf8_lossy(&heads[0])
    );
}

/// A backend that sends `first` at once, then `later` after `pause`, on every connection.
fn slow_backend(first: &'static [u8], later: &'static [u8], pause: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = stream.write_all(first);
                thread::sleep(pause);
                let _ = stream.write_all(later);
            });
        }
    });
    port
}

/// Reads until `want` has arrived; `None` if it did not within `within`.
fn read_until(c: &mut TcpStream, got: &mut Vec<u8>, want: &[u8], within: Duration) -> Option<()> {
    c.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    while !find(got, want) {
        match c.read(&mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
    Some(())
}

#[test]
fn a_head_and_the_body_bytes_with_it_reach_the_client_before_the_rest_of_a_slow_body() {
    let pause = Duration::from_secs(3);
    let cases: [(&[u8], &[u8]); 2] = [
        // The body's first bytes come with the head: both go on at once, in one write.
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Case: early\r\n\r\nearly",
            b"later",
        ),
        // The head alone: it goes on at once, not held back until the body comes.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Case: bare\r\n\r\n",
            b"5\r\nlater\r\n0\r\n\r\n",
        ),
    ];
    for (first, later) in cases {
        let s = proxy_to(slow_backend(first, later, pause));
        let mut c = TcpStream::connect(s.addr()).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let early = if find(first, b"early") {
            &b"\r\n\r\nearly"[..]
        } else {
            b"\r\n\r\n"
        };
        assert!(
            read_until(&mut c, &mut got, early, Duration::from_secs(2)).is_some(),
            "what the backend sent at once was held back: {:?}",
            String::from_utf8_lossy(&got)
        );
        assert!(!find(&got, b"later"), "{:?}", String::from_utf8_lossy(&got));
        assert!(
            read_until(&mut c, &mut got, b"later", Duration::from_secs(10)).is_some(),
            "the rest of the body never came: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
}
