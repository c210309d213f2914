//! Draining keeps keep-alive clients whole: across reloads and a binary upgrade, a client that
//! never retries loses no request, whether it keeps its connection alive or opens one per
//! request.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const BODY: &str = "same content\n";

/// A client that never retries: every failure to send a request or read its whole answer
/// counts. On a kept-alive connection it sends the next request right after the previous
/// answer (so the connection is hardly ever idle, the case a drain must not break), and it
/// opens a new connection only when the server said `Connection: close`.
struct StrictClient {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl StrictClient {
    fn start(addr: SocketAddr, keep_alive: bool) -> StrictClient {
        let stop: Arc<AtomicBool> = Default::default();
        let ok: Arc<AtomicU64> = Default::default();
        let failures: Arc<Mutex<Vec<String>>> = Default::default();
        let (s, o, f) = (stop.clone(), ok.clone(), failures.clone());
        let thread = thread::spawn(move || {
            let mut conn: Option<BufReader<TcpStream>> = None;
            while !s.load(Relaxed) {
                let reader = match conn.take() {
                    Some(c) => c,
                    None => match TcpStream::connect(addr) {
                        Ok(t) => {
                            t.set_nodelay(true).unwrap();
                            t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                            BufReader::new(t)
                        }
                        Err(e) => {
                            f.lock().unwrap().push(format!("connect: {e}"));
                            continue;
                        }
                    },
                };
                match exchange(reader, keep_alive) {
                    Ok((reader, server_keeps)) => {
                        o.fetch_add(1, Relaxed);
                        if keep_alive && server_keeps {
                            conn = Some(reader);
                        }
                    }
                    Err(e) => f.lock().unwrap().push(e),
                }
                if !keep_alive {
                    thread::sleep(Duration::from_millis(2));
                }
            }
        });
        StrictClient {
            stop,
            ok,
            failures,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> (u64, Vec<String>) {
        self.stop.store(true, Relaxed);
        self.thread.take().unwrap().join().unwrap();
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (self.ok.load(Relaxed), failures)
    }
}

/// One GET and its whole answer. Returns the connection and whether the server keeps it.
fn exchange(
    mut r: BufReader<TcpStream>,
    keep_alive: bool,
) -> Result<(BufReader<TcpStream>, bool), String> {
    let close = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    let request = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n{close}\r\n");
    r.get_mut()
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut status = String::new();
    r.read_line(&mut status)
        .map_err(|e| format!("read status: {e}"))?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!("status line {status:?}"));
    }
    let (mut length, mut keeps) = (None, true);
    loop {
        let mut line = String::new();
        r.read_line(&mut line)
            .map_err(|e| format!("read head: {e}"))?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').ok_or(format!("header {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        }
        if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keeps = false;
        }
    }
    let mut body = vec![0u8; length.ok_or("no Content-Length")?];
    r.read_exact(&mut body)
        .map_err(|e| format!("read body: {e}"))?;
    if body != BODY.as_bytes() {
        return Err(format!("body {:?}", String::from_utf8_lossy(&body)));
    }
    Ok((r, keeps))
}

#[test]
fn a_non_retrying_keep_alive_client_loses_nothing_across_reloads_and_an_upgrade() {
    let mut s = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 2\npid_file = \"{dir}/zc.pid\"\nshutdown_timeout_secs = 10\n\n[path_routes.\"127.0.0.1\".\"/\"]\npath = \"{dir}/www\"\n",
    );
    s.write_file("www/index.html", BODY.as_bytes());
    s.spawn();
    s.wait_ready();
    let kept = StrictClient::start(s.addr(), true);
    let fresh = StrictClient::start(s.addr(), false);
    thread::sleep(Duration::from_millis(300));

    for i in 0..10 {
        let before = s.workers();
        s.signal(libc::SIGHUP);
        let replaced = wait_until(Duration::from_secs(10), || {
            let now = s.workers();
            now.len() == 2 && now.iter().all(|p| !before.contains(p))
        });
        assert!(replaced, "reload {i}: no new generation\n{}", s.log());
        thread::sleep(Duration::from_millis(250));
    }

    // The binary upgrade, as an operator does it: USR2, WINCH and QUIT to the old master.
    let new = s.upgrade(&s.path("zc.pid"), 2);
    thread::sleep(Duration::from_millis(300));
    s.signal(libc::SIGWINCH);
    thread::sleep(Duration::from_millis(500));
    s.signal(libc::SIGQUIT);
    assert_eq!(s.wait_exit(Duration::from_secs(15)), Some(0), "{}", s.log());
    thread::sleep(Duration::from_millis(500));

    let (kept_ok, kept_failures) = kept.finish();
    let (fresh_ok, fresh_failures) = fresh.finish();
    assert!(
        kept_failures.is_empty() && fresh_failures.is_empty(),
        "keep-alive: {} failed of {}: {:?}\nnew connections: {} failed of {}: {:?}",
        kept_failures.len(),
        kept_ok,
        &kept_failures[..kept_failures.len().min(5)],
        fresh_failures.len(),
        fresh_ok,
        &fresh_failures[..fresh_failures.len().min(5)],
    );
    assert!(kept_ok > 200 && fresh_ok > 100, "{kept_ok} and {fresh_ok}");
    // SAFETY: kill(2) takes plain values and touches no memory of ours.
    unsafe { libc::kill(new.0, libc::SIGQUIT) };
}

#[test]
fn a_connection_idle_when_the_drain_begins_stays_open_until_its_keepalive_time() {
    let mut s = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 1\nkeepalive_timeout_secs = 3\nshutdown_timeout_secs = 20\n\n[path_routes.\"127.0.0.1\".\"/\"]\npath = \"{dir}/www\"\n",
    );
    s.write_file("www/index.html", BODY.as_bytes());
    s.spawn();
    s.wait_ready();
    let stream = TcpStream::connect(s.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (r, keeps) = exchange(BufReader::new(stream), true).unwrap();
    assert!(keeps);
    let old = s.workers();
    s.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || s
        .workers()
        .iter()
        .any(|p| !old.contains(p))));
    // Idle since before the drain: a request sent a second into it is still answered, with
    // `Connection: close`.
    thread::sleep(Duration::from_secs(1));
    let (r, keeps) = exchange(r, true).expect("the drained connection answers");
    assert!(!keeps, "a draining worker closes after the answer");
    drop(r);

    // One left idle is closed once its keep-alive time is up, and the worker then exits.
    let idle = TcpStream::connect(s.addr()).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (mut r, _) = exchange(BufReader::new(idle), true).unwrap();
    let idle_since = Instant::now();
    let current = s.workers();
    s.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || s
        .workers()
        .iter()
        .any(|p| !current.contains(p))));
    let mut rest = Vec::new();
    let n = r.read_to_end(&mut rest).unwrap_or(0);
    let waited = idle_since.elapsed();
    assert_eq!(n, 0, "closed without a byte");
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(8),
        "closed after {waited:?}, keepalive_timeout_secs is 3"
    );
    assert!(wait_until(Duration::from_secs(3), || current
        .iter()
        .all(|p| !alive(*p))));
}
