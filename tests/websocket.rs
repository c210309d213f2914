//! WebSocket through the proxy, against real WebSocket peers (tungstenite).

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::Frame;
use tungstenite::{Message, WebSocket};

/// An echo server: `/echo` echoes every message; `/once` echoes one message then drops the
/// TCP connection; `/refuse` answers the upgrade with 403.
struct WsBackend {
    port: u16,
    closed: Arc<AtomicUsize>,
}

fn ws_backend(tls: Option<Arc<rustls::ServerConfig>>) -> WsBackend {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let closed = Arc::new(AtomicUsize::new(0));
    let c2 = closed.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (tls, closed) = (tls.clone(), c2.clone());
            std::thread::spawn(move || match tls {
                None => serve_ws(stream, &closed),
                Some(cfg) => {
                    let conn = rustls::ServerConnection::new(cfg).unwrap();
                    serve_ws(rustls::StreamOwned::new(conn, stream), &closed)
                }
            });
        }
    });
    WsBackend { port, closed }
}

// tungstenite's callback type is fixed by the library.
#[allow(clippy::result_large_err)]
fn serve_ws<S: Read + Write>(stream: S, closed: &AtomicUsize) {
    let mut path = String::new();
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        path = req.uri().path().to_string();
        if path == "/refuse" {
            let mut e = ErrorResponse::new(Some("no upgrade for you".into()));
            *e.status_mut() = tungstenite::http::StatusCode::FORBIDDEN;
            return Err(e);
        }
        Ok(resp)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(stream, callback) else {
        return;
    };
    let once = path == "/once";
    loop {
        match ws.read() {
            Ok(m) if m.is_text() || m.is_binary() => {
                if ws.send(m).is_err() {
                    break;
                }
                if once {
                    // Drop the TCP connection without a close frame.
                    return;
                }
            }
            Ok(Message::Close(_)) => {
                let _ = ws.flush();
            }
            Ok(_) => {
                let _ = ws.flush();
            }
            Err(_) => break,
        }
    }
    closed.fetch_add(1, Ordering::SeqCst);
}

fn proxy_for(backend_url: &str, extra: &str) -> Server {
    Server::start(&format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\n\n[path_routes.\"127.0.0.1\".\"/ws/\"]\ntype = \"Proxy\"\nurl = \"{backend_url}\"\n{extra}\n[path_routes.\"127.0.0.1\".\"/plain\"]\ntype = \"Redirect\"\nredirect_url = \"https://example.com\"\n"
    ))
}

fn client(s: &Server, path: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(s.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let url = format!("ws://127.0.0.1:{}{path}", s.port);
    let (ws, resp) =
        tungstenite::client(url.as_str(), stream).expect("handshake through the proxy");
    assert_eq!(resp.status(), 101);
    ws
}

fn echo_session(s: &Server) {
    let mut ws = client(s, "/ws/echo");
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(vec![0u8, 1, 2, 255]));
    // 16 MiB in one message.
    let big = pattern(16 << 20, 11);
    ws.send(Message::binary(big.clone())).unwrap();
    match ws.read().unwrap() {
        Message::Binary(b) => assert!(b[..] == big[..], "16 MiB message corrupted"),
        other => panic!("{other:?}"),
    }
    // A message in three fragments comes back whole.
    ws.write(Message::Frame(Frame::message(
        b"frag".to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .unwrap();
    ws.write(Message::Frame(Frame::message(
        b"men".to_vec(),
        OpCode::Data(Data::Continue),
        false,
    )))
    .unwrap();
    ws.write(Message::Frame(Frame::message(
        b"ted".to_vec(),
        OpCode::Data(Data::Continue),
        true,
    )))
    .unwrap();
    ws.flush().unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("fragmented"));
    // Ping, pong.
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    match ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected a pong, got {other:?}"),
    }
    // Close handshake.
    ws.close(None).unwrap();
    loop {
        match ws.read() {
            Ok(Message::Close(_)) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close: {e}"),
            Ok(other) => panic!("after close: {other:?}"),
        }
    }
}

#[test]
fn echo_through_the_proxy_text_binary_big_fragmented_ping_close() {
    let b = ws_backend(None);
    let s = proxy_for(&format!("http://127.0.0.1:{}/", b.port), "");
    echo_session(&s);
    // The backend saw its side close.
    assert!(wait_until(Duration::from_secs(3), || b
        .closed
        .load(Ordering::SeqCst)
        >= 1));
    // Many at once.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let addr = s.addr();
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).unwrap();
                let (mut ws, _) =
                    tungstenite::client(format!("ws://{addr}/ws/echo").as_str(), stream).unwrap();
                for k in 0..100 {
                    let m = Message::text(format!("{i}-{k}"));
                    ws.send(m.clone()).unwrap();
                    assert_eq!(ws.read().unwrap(), m);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_refused_upgrade_is_relayed_and_no_tunnel_is_opened() {
    let b = ws_backend(None);
    let s = proxy_for(&format!("http://127.0.0.1:{}/", b.port), "");
    let mut c = TcpStream::connect(s.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(c, "GET /ws/refuse HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 4096];
    let n = c.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 403"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("upgrade: websocket"),
        "{text}"
    );
    // Still HTTP: the next request on the same connection is answered as HTTP.
    let mut text = String::new();
    let mut tries = 0;
    write!(
        c,
        "GET /plain HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    while !text.contains("HTTP/1.1 301") && tries < 2 {
        let mut rest = String::new();
        let _ = c.read_to_string(&mut rest);
        text.push_str(&rest);
        tries += 1;
    }
    assert!(
        text.contains("HTTP/1.1 301"),
        "the connection did not stay HTTP: {text}"
    );
}

#[test]
fn closing_either_side_closes_the_other() {
    let b = ws_backend(None);
    let s = proxy_for(&format!("http://127.0.0.1:{}/", b.port), "");
    // The backend drops its connection: the client's ends too.
    let mut ws = client(&s, "/ws/once");
    ws.send(Message::text("one")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("one"));
    let t = std::time::Instant::now();
    assert!(ws.read().is_err(), "the client connection stayed open");
    assert!(t.elapsed() < Duration::from_secs(5));
    // The client drops its TCP connection: the backend's ends too.
    let before = b.closed.load(Ordering::SeqCst);
    let ws = client(&s, "/ws/echo");
    drop(ws);
    assert!(wait_until(Duration::from_secs(3), || b
        .closed
        .load(Ordering::SeqCst)
        > before));
}

#[test]
fn websocket_to_an_https_backend() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, ca) = test_pki(dir.path());
    let b = ws_backend(Some(tls));
    let s = proxy_for(
        &format!("https://127.0.0.1:{}/", b.port),
        &format!(
            "sni_name = \"backend.test\"\nca_file = \"{}\"\n",
            ca.display()
        ),
    );
    echo_session(&s);
}

#[test]
fn an_open_tunnel_counts_as_an_active_backend_connection() {
    let echo = ws_echo_server();
    let s = Server::start(&format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\n\n[path_routes.\"127.0.0.1\".\"/ws/\"]\ntype = \"Proxy\"\nupstream = \"ws\"\n\n[upstreams.\"ws\"]\nalgorithm = \"least_conn\"\nservers = [\"http://127.0.0.1:{echo}\"]\n"
    ));
    let active = || {
        metric(
            &s.metrics(),
            "zerocopy_proxy_upstream_active_connections",
            &["upstream=\"ws\""],
        )
    };
    let mut ws = client(&s, "/ws/x");
    ws.send(Message::text("hi")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hi"));
    assert_eq!(
        active(),
        1.0,
        "an open WebSocket session is a connection in use (least_conn)"
    );
    ws.close(None).unwrap();
    let _ = ws.read();
    drop(ws);
    assert!(wait_until(Duration::from_secs(3), || active() == 0.0));
}
