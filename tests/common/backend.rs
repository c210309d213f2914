//! A real HTTP/1.1 backend for proxy tests: std sockets, one thread per connection,
//! keep-alive, Content-Length and chunked bodies both ways, optional TLS (rustls), and
//! counters the tests read (connections accepted, requests seen).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Incremental version of `common::pattern`, for bodies too large to hold.
pub struct PatternGen(u64);

impl PatternGen {
    pub fn new(seed: u64) -> Self {
        PatternGen(seed | 1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

/// FNV-1a, fed incrementally.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);
impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}
impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The hash of `len` bytes of `PatternGen::new(seed)`.
pub fn pattern_hash(len: u64, seed: u64) -> u64 {
    let mut g = PatternGen::new(seed);
    let mut h = Fnv::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        g.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.0
}

pub struct Backend {
    pub port: u16,
    pub id: String,
    pub connections: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    pub healthy: Arc<AtomicBool>,
    /// Close each connection right after its response, without saying so.
    pub close_after_response: Arc<AtomicBool>,
    /// The SNI names TLS clients sent.
    pub sni: Arc<Mutex<Vec<String>>>,
    stopped: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

pub type Tls = Arc<rustls::ServerConfig>;

impl Backend {
    pub fn start(id: &str) -> Backend {
        Self::start_with(id, 0, None)
    }

    pub fn start_tls(id: &str, tls: Tls) -> Backend {
        Self::start_with(id, 0, Some(tls))
    }

    pub fn start_with(id: &str, port: u16, tls: Option<Tls>) -> Backend {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("backend bind");
        let b = Backend {
            port: listener.local_addr().unwrap().port(),
            id: id.to_string(),
            connections: Default::default(),
            requests: Default::default(),
            healthy: Arc::new(AtomicBool::new(true)),
            close_after_response: Default::default(),
            sni: Default::default(),
            stopped: Default::default(),
            open: Default::default(),
        };
        let shared = b.shared();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if shared.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                shared
                    .open
                    .lock()
                    .unwrap()
                    .push(stream.try_clone().unwrap());
                let shared = shared.clone();
                let tls = tls.clone();
                std::thread::spawn(move || serve(shared, stream, tls));
            }
        });
        b
    }

    fn shared(&self) -> Shared {
        Shared {
            id: self.id.clone(),
            requests: self.requests.clone(),
            connections: self.connections.clone(),
            healthy: self.healthy.clone(),
            close_after_response: self.close_after_response.clone(),
            sni: self.sni.clone(),
            stopped: self.stopped.clone(),
            open: self.open.clone(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the server: the listener stops (connections are refused) and every open
    /// connection is cut.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees `stopped` and drops the listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Clone)]
struct Shared {
    id: String,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    close_after_response: Arc<AtomicBool>,
    sni: Arc<Mutex<Vec<String>>>,
    stopped: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

trait Io: Read + Write {}
impl<T: Read + Write> Io for T {}

/// Closes the socket when the connection's thread ends, whatever other handles exist.
struct Closer(TcpStream);
impl Drop for Closer {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

fn serve(shared: Shared, stream: TcpStream, tls: Option<Tls>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let _closer = Closer(stream.try_clone().unwrap());
    let io: Box<dyn Io> = match tls {
        None => Box::new(stream),
        Some(cfg) => {
            let mut conn = rustls::ServerConnection::new(cfg).unwrap();
            let mut s = stream;
            while conn.is_handshaking() {
                if conn.complete_io(&mut s).is_err() {
                    return;
                }
            }
            if let Some(name) = conn.server_name() {
                shared.sni.lock().unwrap().push(name.to_string());
            }
            Box::new(rustls::StreamOwned::new(conn, s))
        }
    };
    let mut r = BufReader::with_capacity(64 * 1024, io);
    loop {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Some(req) = read_request(&mut r) else {
            return;
        };
        shared.requests.fetch_add(1, Ordering::SeqCst);
        let close = !handle(&shared, &mut r, &req)
            || req.close
            || shared.close_after_response.load(Ordering::SeqCst);
        if close {
            return;
        }
    }
}

pub struct Req {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub close: bool,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn query(&self, key: &str) -> Option<u64> {
        let q = self.target.split_once('?')?.1;
        q.split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{key}="))?.parse().ok())
    }
}

fn read_request(r: &mut impl BufRead) -> Option<Req> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
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
    let close = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close"));
    Some(Req {
        method,
        target,
        headers,
        close,
    })
}

/// Reads the request body, feeding `sink`; returns its length.
fn read_body(r: &mut impl BufRead, req: &Req, mut sink: impl FnMut(&[u8])) -> Option<u64> {
    let mut total = 0u64;
    if req
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = u64::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            if n == 0 {
                let mut end = String::new();
                r.read_line(&mut end).ok()?;
                return Some(total);
            }
            copy_n(r, n, &mut sink)?;
            total += n;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).ok()?;
        }
    }
    let n: u64 = req
        .header("content-length")
        .map_or(0, |v| v.parse().unwrap_or(0));
    copy_n(r, n, &mut sink)?;
    Some(n + total)
}

fn copy_n(r: &mut impl BufRead, mut n: u64, sink: &mut impl FnMut(&[u8])) -> Option<()> {
    while n > 0 {
        let buf = r.fill_buf().ok()?;
        if buf.is_empty() {
            return None;
        }
        let k = buf.len().min(n as usize);
        sink(&buf[..k]);
        r.consume(k);
        n -= k as u64;
    }
    Some(())
}

fn respond(w: &mut impl Write, status: &str, extra: &str, body: &[u8], head_only: bool) -> bool {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    );
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    w.write_all(&out).is_ok() && w.flush().is_ok()
}

/// Answers one request; `false` to close the connection.
fn handle<S: Read + Write>(shared: &Shared, r: &mut BufReader<S>, req: &Req) -> bool {
    let mut hash = Fnv::default();
    let Some(body_len) = read_body(r, req, |d| hash.update(d)) else {
        return false;
    };
    let head_only = req.method == "HEAD";
    let path = req.target.split('?').next().unwrap_or("");
    match path {
        "/health" => {
            let ok = shared.healthy.load(Ordering::SeqCst);
            respond(r.get_mut(), if ok { "200 OK" } else { "503 Service Unavailable" }, "", b"health\n", head_only)
        }
        "/upload" => respond(r.get_mut(), "200 OK", "", format!("{body_len} {:016x}", hash.0).as_bytes(), head_only),
        "/download" => download(r.get_mut(), req),
        "/slow" => {
            std::thread::sleep(Duration::from_millis(req.query("ms").unwrap_or(1000)));
            respond(r.get_mut(), "200 OK", &format!("X-Backend: {}\r\n", shared.id), shared.id.as_bytes(), head_only)
        }
        "/drop" => false,
        "/hop" => respond(
            r.get_mut(),
            "200 OK",
            "Connection: X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\nX-Powered-By: test\r\nX-Kept: yes\r\n",
            b"hop\n",
            head_only,
        ),
        "/status" => {
            let code = req.query("code").unwrap_or(200);
            respond(r.get_mut(), &format!("{code} Custom Reason"), "", b"status\n", head_only)
        }
        _ => {
            // Echo: who answered, what arrived.
            let mut body = format!("backend={}\n{} {}\n", shared.id, req.method, req.target);
            for (n, v) in &req.headers {
                body.push_str(&format!("{n}: {v}\n"));
            }
            body.push_str(&format!("body={body_len} {:016x}\n", hash.0));
            respond(r.get_mut(), "200 OK", &format!("X-Backend: {}\r\n", shared.id), body.as_bytes(), head_only)
        }
    }
}

/// `/download?n=BYTES&seed=S&mode=cl|chunked|close|cut|chunkcut` (the cut modes announce
/// or start the body, send half, and close).
fn download(w: &mut impl Write, req: &Req) -> bool {
    let n = req.query("n").unwrap_or(0);
    let seed = req.query("seed").unwrap_or(1);
    let mode = req
        .target
        .split("mode=")
        .nth(1)
        .unwrap_or("cl")
        .split('&')
        .next()
        .unwrap_or("cl")
        .to_string();
    let head = match mode.as_str() {
        "chunked" | "chunkcut" => {
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string()
        }
        "close" => "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_string(),
        _ => format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n"),
    };
    if w.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let mut g = PatternGen::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    // `cut`: announce n bytes, send half, then close.
    let cut = mode == "cut" || mode == "chunkcut";
    let chunked = mode == "chunked" || mode == "chunkcut";
    let send = if cut { n / 2 } else { n };
    let mut left = send;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        g.fill(&mut buf[..k]);
        let ok = if chunked {
            w.write_all(format!("{k:x}\r\n").as_bytes()).is_ok()
                && w.write_all(&buf[..k]).is_ok()
                && w.write_all(b"\r\n").is_ok()
        } else {
            w.write_all(&buf[..k]).is_ok()
        };
        if !ok {
            return false;
        }
        left -= k as u64;
    }
    if mode == "chunked" && w.write_all(b"0\r\n\r\n").is_err() {
        return false;
    }
    let _ = w.flush();
    !matches!(mode.as_str(), "close" | "cut" | "chunkcut")
}
