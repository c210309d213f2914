//! What an idle keep-alive connection costs a worker: its task and its socket, no buffer.
//! 2,000 connections that each got one answer and stay open (after 2,000 such, which warm
//! up the pools and the allocator) must add little to the worker's private anonymous memory
//! (RssAnon, /proc/PID/status). Measured with the test build: 0.8–2.0 KiB each; 6.8 KiB
//! each when a quiet connection keeps its 4 KiB head buffer (checked by making it keep it).

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const CONNECTIONS: usize = 2000;
/// The bound asserted: above today's figures with room for the allocator's moods, well below
/// a connection holding a 4 KiB head buffer.
const MAX_BYTES_EACH: u64 = 3 * 1024;

/// Private anonymous memory (RssAnon): unlike Pss, it does not move when other processes
/// that share the binary's pages (other tests' servers) start or stop.
fn anon_kib(pid: i32) -> u64 {
    proc_status(pid, "RssAnon")
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(16384);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// One GET, its whole answer read; the connection stays open.
fn one_get(s: &Server) -> TcpStream {
    let mut c = TcpStream::connect(s.addr()).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /f.txt HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while !got.ends_with(b"END") {
        let n = c.read(&mut buf).expect("answer");
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    c
}

#[test]
fn an_idle_keep_alive_connection_costs_the_worker_under_3_kib() {
    raise_open_files();
    let s = Server::prepare(
        "[server]\nhttp_listen = \"127.0.0.1:{port}\"\nthreads = 1\nkeepalive_timeout_secs = 120\n\n[path_routes.\"*\".\"/\"]\npath = \"{dir}/www\"\n",
    );
    let mut body = vec![b'x'; 1000];
    body.extend_from_slice(b"END");
    s.write_file("www/f.txt", &body);
    let mut s = s;
    s.spawn();
    s.wait_ready();
    let worker = s.workers()[0];
    // A first batch warms up what is not the connections' own cost: the buffer pools, the
    // allocator's pages for the buffers of the connections being answered at a time, the
    // idle queue's growth. The second batch is measured.
    let mut held: Vec<TcpStream> = (0..CONNECTIONS).map(|_| one_get(&s)).collect();
    // Past the 50 ms a quiet connection keeps its buffer, and a sweep of the idle queue.
    std::thread::sleep(Duration::from_millis(600));
    let before = anon_kib(worker);
    held.extend((0..CONNECTIONS).map(|_| one_get(&s)));
    std::thread::sleep(Duration::from_millis(600));
    let after = anon_kib(worker);
    assert_eq!(
        metric(&s.metrics(), "zerocopy_proxy_active_connections", &[]) as usize,
        held.len() + 1,
        "every connection is still open"
    );
    let each = (after.saturating_sub(before)) * 1024 / CONNECTIONS as u64;
    println!("{CONNECTIONS} idle connections: {before} → {after} KiB RssAnon, {each} bytes each");
    assert!(
        each <= MAX_BYTES_EACH,
        "an idle keep-alive connection costs {each} bytes (RssAnon {before} → {after} KiB)"
    );
}
