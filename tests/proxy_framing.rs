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
