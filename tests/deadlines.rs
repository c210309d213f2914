//! Every read and write has a deadline: a client that stops reading, a backend that never
//! answers or stops reading, an idle WebSocket tunnel — each ends within seconds of its
//! timeout (all four at 2 s here), while other clients are served.

mod common;
use common::backend::Backend;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

const BIG: u64 = 200 * 1000 * 1000;

fn config(backend: &str, silent: u16, deaf: u16, ws: u16) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{{port}}"
threads = 2

[path_routes."127.0.0.1"."/files/"]
path = "{{dir}}/files"
  [path_routes."127.0.0.1"."/files/".security]
  send_timeout_secs = 2

[path_routes."127.0.0.1"."/small"]
path = "{{dir}}/small.txt"

[path_routes."127.0.0.1"."/proxied/"]
type = "Proxy"
url = "{backend}/"
  [path_routes."127.0.0.1"."/proxied/".security]
  send_timeout_secs = 2

[path_routes."127.0.0.1"."/silent"]
type = "Proxy"
url = "http://127.0.0.1:{silent}/"
  [path_routes."127.0.0.1"."/silent".security]
  backend_read_timeout_secs = 2

[path_routes."127.0.0.1"."/deaf"]
type = "Proxy"
url = "http://127.0.0.1:{deaf}/"
  [path_routes."127.0.0.1"."/deaf".security]
  backend_send_timeout_secs = 2
  max_request_body_size = 1000000000

[path_routes."127.0.0.1"."/ws"]
type = "Proxy"
url = "http://127.0.0.1:{ws}/"
  [path_routes."127.0.0.1"."/ws".security]
  websocket_idle_timeout_secs = 2
"#
    )
}

/// A backend that accepts, reads the request head, and then neither answers nor reads.
fn stuck_backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut stream = stream;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                thread::sleep(Duration::from_secs(60));
            });
        }
    });
    port
}

fn start() -> (Server, Backend) {
    let b = Backend::start("b1");
    let mut s = Server::prepare(&config(
        &b.url(),
        stuck_backend(),
        stuck_backend(),
        ws_echo_server(),
    ));
    s.write_file("small.txt", b"small\n");
    let f = std::fs::File::create(s.path("files/big.bin")).unwrap_or_else(|_| {
        std::fs::create_dir_all(s.path("files")).unwrap();
        std::fs::File::create(s.path("files/big.bin")).unwrap()
    });
    f.set_len(BIG).unwrap();
    s.spawn();
    s.wait_ready();
    (s, b)
}

/// Sends `request`, reads nothing for `pause`, then reads what is left: returns the bytes
/// received and whether the connection ended before more than `BIG` bytes came.
fn stalled_reader(addr: std::net::SocketAddr, request: &str, pause: Duration) -> (u64, bool) {
    let mut c = TcpStream::connect(addr).unwrap();
    // A small receive buffer, so the server's writes block early.
    socket2::SockRef::from(&c)
        .set_recv_buffer_size(64 * 1024)
        .unwrap();
    c.write_all(request.as_bytes()).unwrap();
    thread::sleep(pause);
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return (total, true),
            Ok(n) => total += n as u64,
        }
        if total > BIG {
            return (total, false);
        }
    }
}

/// Established connections whose remote end is `port` (from /proc/net/tcp).
fn connections_to(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let remote = f
                .get(2)
                .and_then(|r| r.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            remote == Some(port) && f.get(3) == Some(&"01")
        })
        .count()
}

#[test]
fn a_client_that_stops_reading_a_file_is_dropped_while_others_are_served() {
    let (s, _b) = start();
    let reader = {
        let addr = s.addr();
        thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            socket2::SockRef::from(&c)
                .set_recv_buffer_size(64 * 1024)
                .unwrap();
            c.write_all(b"GET /files/big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .unwrap();
            thread::sleep(Duration::from_secs(6));
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut total = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => return total,
                    Ok(n) => total += n as u64,
                }
            }
        })
    };
    // Meanwhile others are answered at once.
    for _ in 0..20 {
        let began = Instant::now();
        assert_eq!(get(&s.url("/small")), (200, "small\n".to_string()));
        assert!(began.elapsed() < Duration::from_secs(1));
        thread::sleep(Duration::from_millis(100));
    }
    let got = reader.join().unwrap();
    assert!(
        got < BIG / 2,
        "the stalled client was not dropped: it got {got} of {BIG} bytes"
    );
}

#[test]
fn a_client_that_stops_reading_a_proxied_response_is_dropped_with_its_backend_connection() {
    let (s, b) = start();
    let port: u16 = b.url().rsplit(':').next().unwrap().parse().unwrap();
    let request =
        format!("GET /proxied/download?n={BIG}&seed=3 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let began = Instant::now();
    let stalled = {
        let addr = s.addr();
        thread::spawn(move || stalled_reader(addr, &request, Duration::from_secs(6)))
    };
    thread::sleep(Duration::from_secs(1));
    assert!(
        connections_to(port) >= 1,
        "the download reached the backend"
    );
    assert_eq!(get(&s.url("/small")).0, 200, "others are served meanwhile");
    // Within seconds of the 2 s send timeout, the backend connection is gone too.
    assert!(
        wait_until(Duration::from_secs(8), || connections_to(port) == 0),
        "a backend connection is still open {:?} after the client stalled",
        began.elapsed()
    );
    let (got, ended) = stalled.join().unwrap();
    assert!(ended && got < BIG / 2, "got {got} bytes, ended {ended}");
}

#[test]
fn a_backend_that_never_answers_is_a_504_after_the_read_timeout() {
    let (s, _b) = start();
    let began = Instant::now();
    let answer = raw(
        s.addr(),
        b"GET /silent HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(15),
    );
    let took = began.elapsed();
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(8),
        "answered after {took:?}"
    );
}

#[test]
fn a_backend_that_stops_reading_an_upload_ends_the_exchange() {
    let (s, _b) = start();
    let mut c = TcpStream::connect(s.addr()).unwrap();
    let len = 100 * 1000 * 1000u64;
    c.write_all(
        format!("POST /deaf HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut writer = c.try_clone().unwrap();
    thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        let mut sent = 0;
        while sent < len {
            if writer.write_all(&chunk).is_err() {
                return;
            }
            sent += chunk.len() as u64;
        }
    });
    let began = Instant::now();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 504"),
        "after {:?}: {text:?}",
        began.elapsed()
    );
    assert!(began.elapsed() < Duration::from_secs(15));
}

#[test]
fn an_idle_websocket_tunnel_closes_and_an_active_one_stays() {
    let (s, _b) = start();
    let open = |s: &Server| {
        let stream = TcpStream::connect(s.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let url = format!("ws://127.0.0.1:{}/ws", s.port);
        tungstenite::client(url.as_str(), stream).unwrap().0
    };
    let mut idle = open(&s);
    let mut active = open(&s);
    let began = Instant::now();
    let quiet = thread::spawn(move || {
        // Nothing sent: the next read ends when the tunnel is closed.
        let r = idle.read();
        (began.elapsed(), r.is_err() || r.is_ok_and(|m| m.is_close()))
    });
    for i in 0..10 {
        thread::sleep(Duration::from_millis(500));
        let text = format!("frame {i}");
        active
            .send(tungstenite::Message::text(text.clone()))
            .unwrap();
        assert_eq!(active.read().unwrap().into_text().unwrap().as_str(), text);
    }
    let (closed_after, closed) = quiet.join().unwrap();
    assert!(
        closed,
        "the idle tunnel ended without a read error or close"
    );
    assert!(
        closed_after >= Duration::from_millis(1900) && closed_after < Duration::from_secs(6),
        "the idle tunnel closed after {closed_after:?}"
    );
    // 5 s of a frame every 0.5 s, past the 2 s idle timeout: still open.
    active.send(tungstenite::Message::text("last")).unwrap();
    assert_eq!(active.read().unwrap().into_text().unwrap().as_str(), "last");
}
