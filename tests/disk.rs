//! Nothing on disk can block a worker: a FIFO, a unix socket or a device under a `File` root
//! is refused with 403 at once, in both modes, and every worker keeps serving.

mod common;
use common::*;
use std::ffi::CString;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TWO_WORKERS: &str = r#"
[server]
listen = "127.0.0.1:{port}"
threads = 2

[performance]
reuseport_balancing = "cbpf"

[path_routes."127.0.0.1"."/"]
path = "{dir}/www"

[path_routes."127.0.0.1"."/mem"]
path = "{dir}/mem"
mode = "memory"
"#;

fn mkfifo(path: &Path) {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// A character device with /dev/zero's numbers: reading it would never end.
fn mknod_zero(path: &Path) {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    let dev = libc::makedev(1, 5);
    assert_eq!(
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o644, dev) },
        0,
        "mknod: {}",
        std::io::Error::last_os_error()
    );
}

fn start() -> Server {
    let mut s = Server::prepare(TWO_WORKERS);
    s.write_file("www/index.html", b"index\n");
    s.write_file("mem/a.txt", b"held in memory\n");
    mkfifo(&s.path("www/pipe"));
    // A FIFO and a device inside a memory route's directory while it loads.
    mkfifo(&s.path("mem/pipe"));
    mknod_zero(&s.path("mem/zero"));
    s.spawn();
    s.wait_ready();
    s
}

/// `GET path` from `ip` on a new connection: (status, how long the answer took).
fn timed_get(s: &Server, ip: Ipv4Addr, path: &str) -> (u16, Duration) {
    let t = Instant::now();
    let status = get_on(connect_from(ip, s.addr()), path);
    (status, t.elapsed())
}

/// Per-worker request counts from the metrics.
fn per_worker(s: &Server) -> [f64; 2] {
    let m = s.metrics();
    let n = |w: &str| metric(&m, "zerocopy_proxy_worker_requests_total", &[w]);
    [n("worker=\"0\""), n("worker=\"1\"")]
}

/// One client address served by each worker (cbpf steers by client address): three requests
/// from an address, and the worker whose count rose by three took them.
fn an_address_per_worker(s: &Server) -> [Ipv4Addr; 2] {
    let mut found = [None, None];
    for i in 1..=64u8 {
        let ip = Ipv4Addr::new(127, 0, 9, i);
        let before = per_worker(s);
        for _ in 0..3 {
            assert_eq!(get_on(connect_from(ip, s.addr()), "/"), 200);
        }
        let after = per_worker(s);
        // The scrape itself adds at most one request to one worker.
        let w = if after[0] - before[0] >= 3.0 && after[1] - before[1] <= 1.0 {
            0
        } else if after[1] - before[1] >= 3.0 && after[0] - before[0] <= 1.0 {
            1
        } else {
            continue;
        };
        found[w].get_or_insert(ip);
        if let [Some(a), Some(b)] = found {
            return [a, b];
        }
    }
    panic!("no address found for each worker: {found:?}\n{}", s.log());
}

#[test]
fn a_fifo_is_refused_at_once_and_both_workers_keep_serving() {
    let s = start();
    assert!(s.log().contains("client-IP steering (cbpf)"), "{}", s.log());
    let ips = an_address_per_worker(&s);
    // Each worker opens the FIFO in turn (no writer ever comes), twice.
    for round in 0..2 {
        for ip in ips {
            let (status, took) = timed_get(&s, ip, "/pipe");
            assert_eq!(status, 403, "round {round}, from {ip}");
            assert!(took < Duration::from_secs(1), "403 after {took:?}");
        }
    }
    // Both still serve, several clients each.
    let before = per_worker(&s);
    for ip in ips {
        for _ in 0..5 {
            let (status, took) = timed_get(&s, ip, "/");
            assert_eq!(status, 200, "from {ip}");
            assert!(took < Duration::from_secs(1), "200 after {took:?}");
        }
    }
    let after = per_worker(&s);
    assert!(
        after[0] - before[0] >= 5.0 && after[1] - before[1] >= 5.0,
        "both workers answered: {before:?} -> {after:?}"
    );
}

#[test]
fn sockets_devices_and_special_index_files_are_403_in_both_modes() {
    let s = start();
    let _socket = std::os::unix::net::UnixListener::bind(s.path("www/sock")).unwrap();
    mknod_zero(&s.path("www/zero"));
    std::fs::create_dir(s.path("www/d")).unwrap();
    mkfifo(&s.path("www/d/index.html"));
    // A symlink out of the root is not followed, whatever it points to.
    std::os::unix::fs::symlink("/dev/zero", s.path("www/devzero")).unwrap();
    let ip = Ipv4Addr::LOCALHOST;
    for (path, want) in [
        ("/sock", 403),
        ("/zero", 403),
        ("/d/", 403),
        ("/d", 403),
        ("/devzero", 404),
        // The memory route left them out when it loaded; from disk they are refused.
        ("/mem/pipe", 403),
        ("/mem/zero", 403),
        ("/mem/a.txt", 200),
        ("/index.html", 200),
    ] {
        let (status, took) = timed_get(&s, ip, path);
        assert_eq!(status, want, "{path}");
        assert!(took < Duration::from_secs(1), "{path} after {took:?}");
    }
    let (status, body) = get(&s.url("/mem/a.txt"));
    assert_eq!((status, body.as_str()), (200, "held in memory\n"));
}

#[test]
fn a_file_route_on_a_fifo_is_a_config_error() {
    let s = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[path_routes.\"t\".\"/p\"]\npath = \"{dir}/pipe\"\nmode = \"memory\"\n",
    );
    mkfifo(&s.path("pipe"));
    let out = Command::new(BIN)
        .args(["-t", "-c", s.config_path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("`path_routes.\"t\".\"/p\".path`: not a regular file or directory"),
        "{err}"
    );
}
