//! The access log: its formats, its reopening on USR1, and its rotation at `max_log_size`,
//! with the real binary writing it from several workers.

mod common;
use common::backend::Backend;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn template(backend: &Backend, extra_logging: &str) -> String {
    // Lines reach the file quickly, unless the test says otherwise.
    let extra_logging = if extra_logging.contains("flush_interval_ms") {
        extra_logging.to_string()
    } else {
        format!("flush_interval_ms = 20\n{extra_logging}")
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:{{port}}"
threads = 2

[logging]
access_log = "{{dir}}/access.log"
{extra_logging}

[path_routes."localhost"."/f"]
type = "File"
path = "{{dir}}/www/f.txt"

[path_routes."localhost"."/health"]
type = "File"
path = "{{dir}}/www/f.txt"
access_log = false

[path_routes."localhost"."/api/"]
type = "Proxy"
url = "{b}/"

[path_routes."localhost"."/down/"]
type = "Proxy"
url = "http://127.0.0.1:{down}/"
"#,
        b = backend.url(),
        down = free_port()
    )
}

fn start(backend: &Backend, extra_logging: &str) -> Server {
    let mut s = Server::prepare(&template(backend, extra_logging));
    s.write_file("www/f.txt", b"hello\n");
    s.spawn();
    s.wait_ready();
    s
}

/// The lines of an access log file, but those of the harness's own `/__metrics` requests.
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.contains("/__metrics"))
        .map(String::from)
        .collect()
}

/// Waits until the access log holds `n` lines; returns them.
fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    wait_until(Duration::from_secs(10), || lines(path).len() >= n);
    lines(path)
}

fn send(s: &Server, request: &str) -> u16 {
    let got = raw(s.addr(), request.as_bytes(), Duration::from_secs(10));
    parse_response(&got).0
}

/// The four kinds of line the brief names, in order: a file (200, with a referer and a user
/// agent), an unknown path (404), a head that does not parse (400), a proxied request.
fn the_four_requests(s: &Server) {
    let ua = "curl/8.5 \"quoted\"";
    let status = send(
        s,
        &format!("GET /f?x=1 HTTP/1.1\r\nHost: localhost\r\nReferer: http://ref.test/\r\nUser-Agent: {ua}\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200);
    // Not logged: its route says so.
    let status = send(
        s,
        "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    let status = send(
        s,
        "GET /nope HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 404);
    let status = send(s, "BAD\x01 / HTTP/1.1\r\n\r\n");
    assert_eq!(status, 400);
    let status = send(
        s,
        "GET /api/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
}

#[test]
fn combined_lines_for_a_file_a_404_a_400_and_a_proxied_request() {
    let b = Backend::start("b1");
    let s = start(&b, "");
    the_four_requests(&s);
    let got = wait_lines(&s.path("access.log"), 4);
    assert_eq!(got.len(), 4, "{got:#?}\nlog:\n{}", s.log());
    // Each worker writes its own lines: between workers the order is not the requests'.
    let find = |request: &str| -> String {
        got.iter()
            .find(|l| l.contains(&format!("\"{request}\"")))
            .unwrap_or_else(|| panic!("{request}: {got:#?}"))
            .clone()
    };
    let got = [
        find("GET /f?x=1 HTTP/1.1"),
        find("GET /nope HTTP/1.1"),
        find("BAD\\x01 / HTTP/1.1"),
        find("GET /api/x HTTP/1.1"),
    ];
    // `$remote_addr - - [$time_local] "$request" $status $body_bytes_sent "$http_referer"
    // "$http_user_agent" $request_time $upstream_addr $upstream_response_time`
    let re = |line: &str| -> Vec<String> {
        let (head, rest) = line.split_once(" [").expect(line);
        let (time, rest) = rest.split_once("] \"").expect(line);
        assert!(time.ends_with(" +0000") && time.len() == 26, "{time}");
        let (request, rest) = rest.split_once("\" ").expect(line);
        let fields: Vec<&str> = rest.splitn(3, ' ').collect();
        let (status, sent) = (fields[0], fields[1]);
        let rest = fields[2];
        let (referer, rest) = rest[1..].split_once("\" \"").expect(line);
        let (ua, tail) = rest.split_once("\" ").expect(line);
        let mut out = vec![head.to_string(), request.into(), status.into(), sent.into()];
        out.extend([referer.to_string(), ua.to_string()]);
        out.extend(tail.split(' ').map(String::from));
        out
    };
    let f = re(&got[0]);
    assert_eq!(
        &f[..9].iter().map(|s| s.as_str()).collect::<Vec<_>>()[..6],
        &[
            "127.0.0.1 - -",
            "GET /f?x=1 HTTP/1.1",
            "200",
            "6",
            "http://ref.test/",
            "curl/8.5 \\x22quoted\\x22"
        ],
        "{}",
        got[0]
    );
    assert!(f[6].parse::<f64>().is_ok(), "request_time: {}", got[0]);
    assert_eq!(&f[7..], &["-", "-"], "no upstream: {}", got[0]);
    let nope = re(&got[1]);
    assert_eq!(
        (nope[1].as_str(), nope[2].as_str()),
        ("GET /nope HTTP/1.1", "404")
    );
    assert_eq!(
        (nope[4].as_str(), nope[5].as_str()),
        ("-", "-"),
        "{}",
        got[1]
    );
    let bad = re(&got[2]);
    assert_eq!(
        (bad[1].as_str(), bad[2].as_str()),
        ("BAD\\x01 / HTTP/1.1", "400"),
        "{}",
        got[2]
    );
    let proxied = re(&got[3]);
    assert_eq!(
        (proxied[1].as_str(), proxied[2].as_str()),
        ("GET /api/x HTTP/1.1", "200")
    );
    assert_eq!(proxied[7], format!("127.0.0.1:{}", b.port), "{}", got[3]);
    assert!(proxied[8].parse::<f64>().is_ok(), "{}", got[3]);
}

#[test]
fn json_lines_parse_and_carry_the_same_fields() {
    let b = Backend::start("b1");
    let s = start(&b, "access_log_format = \"json\"");
    the_four_requests(&s);
    let path = s.path("access.log");
    let got = wait_lines(&path, 4);
    assert_eq!(got.len(), 4, "{got:#?}");
    // Checked by a JSON parser that is not ours.
    let check = r#"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if "/__metrics" not in r["request"]]
want = [("GET /f?x=1 HTTP/1.1", 200, None), ("GET /nope HTTP/1.1", 404, None),
        ("BAD\x01 / HTTP/1.1", 400, None), ("GET /api/x HTTP/1.1", 200, "127.0.0.1:" + sys.argv[2])]
assert len(rows) == 4, rows
# Each worker writes its own lines: between workers the order is not the requests'.
rows = [next(r for r in rows if r["request"] == w[0]) for w in want]
for row, (request, status, upstream) in zip(rows, want):
    assert row["request"] == request, row
    assert row["status"] == status, row
    assert row["upstream_addr"] == upstream, row
    assert row["remote_addr"] == "127.0.0.1", row
    assert isinstance(row["request_time"], float), row
    assert (row["upstream_response_time"] is None) == (upstream is None), row
assert rows[0]["http_user_agent"] == 'curl/8.5 "quoted"', rows[0]
assert rows[0]["http_referer"] == "http://ref.test/", rows[0]
assert rows[0]["body_bytes_sent"] == 6, rows[0]
print("ok")
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(check)
        .arg(&path)
        .arg(b.port.to_string())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}\n{}\n{got:#?}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_invalid_format_is_a_config_error_naming_the_key() {
    let b = Backend::start("b1");
    let s = Server::prepare(&template(&b, "access_log_format = \"main\""));
    let out = std::process::Command::new(BIN)
        .arg("-t")
        .arg("-c")
        .arg(&s.config_path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("logging.access_log_format"), "{text}");
    assert!(text.contains("config.toml"), "{text}");
}

/// Sends `total` requests for `/f` over `clients` keep-alive connections; `at_half` runs
/// once half of them are answered, while the others are still being sent.
fn load(s: &Server, total: usize, clients: usize, at_half: impl FnOnce()) {
    let done = Arc::new(AtomicUsize::new(0));
    let each = total / clients;
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let addr = s.addr();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut r = BufReader::new(c.try_clone().unwrap());
                for _ in 0..each {
                    c.write_all(b"GET /f HTTP/1.1\r\nHost: localhost\r\nUser-Agent: load\r\n\r\n")
                        .unwrap();
                    let mut len = 0;
                    let mut status = String::new();
                    r.read_line(&mut status).unwrap();
                    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
                    loop {
                        let mut line = String::new();
                        r.read_line(&mut line).unwrap();
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(60), || done
        .load(Ordering::SeqCst)
        >= total / 2));
    at_half();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), each * clients);
}

/// Every access log file of the dir (`access.log` and what was renamed from it).
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("access.log"))
        })
        .collect();
    files.sort();
    files
}

/// Every line whole: a load line, as written, from start to end.
fn assert_whole(line: &str) {
    let ok = line.starts_with("127.0.0.1 - - [")
        && line.contains("] \"GET /f HTTP/1.1\" 200 6 \"-\" \"load\" ")
        && line.ends_with(" - -")
        && line.split(' ').count() == 15;
    assert!(ok, "not a whole line: {line:?}");
}

fn count_lines(files: &[PathBuf]) -> usize {
    files
        .iter()
        .map(|f| {
            let l = lines(f);
            l.iter().for_each(|l| assert_whole(l));
            l.len()
        })
        .sum()
}

#[test]
fn rename_then_usr1_moves_new_lines_to_the_new_file_and_loses_none() {
    let b = Backend::start("b1");
    let s = start(&b, "");
    let path = s.path("access.log");
    let old = s.path("access.log.old");
    const TOTAL: usize = 10_000;
    load(&s, TOTAL, 4, || {
        std::fs::rename(&path, &old).unwrap();
        s.signal(libc::SIGUSR1);
    });
    let files = [old.clone(), path.clone()];
    wait_until(Duration::from_secs(10), || {
        lines(&old).len() + lines(&path).len() >= TOTAL
    });
    let in_old = lines(&old).len();
    let in_new = lines(&path).len();
    println!("old file {in_old} lines, new file {in_new}");
    assert_eq!(count_lines(&files), TOTAL, "old {in_old}, new {in_new}");
    assert!(in_old >= TOTAL / 2, "old {in_old}");
    assert!(in_new > 0, "nothing in the reopened file (old {in_old})");
}

#[test]
fn max_log_size_rotates_under_load_without_losing_or_splitting_a_line() {
    let b = Backend::start("b1");
    let s = start(&b, "max_log_size = 102400");
    const TOTAL: usize = 10_000;
    load(&s, TOTAL, 4, || {});
    let dir = s.dir.path().to_path_buf();
    wait_until(Duration::from_secs(10), || {
        let files = log_files(&dir);
        files.iter().map(|f| lines(f).len()).sum::<usize>() >= TOTAL
    });
    let files = log_files(&dir);
    assert_eq!(count_lines(&files), TOTAL, "{files:?}");
    // About 120 bytes a line: 1.2 MB in files of 100 KiB and what came in before the
    // master's next check (a tenth of a second) and the workers' reopening.
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .collect();
    println!("{} files, sizes {sizes:?}", files.len());
    assert!(files.len() >= 3, "{files:?}\n{}", s.log());
    for f in files.iter().filter(|f| !f.ends_with("access.log")) {
        let size = std::fs::metadata(f).unwrap().len();
        assert!((102_400..1_000_000).contains(&size), "{f:?}: {size}");
    }
}

#[test]
fn a_websocket_tunnel_is_logged_at_its_close_with_bytes_both_ways() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ws_port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(stream) else {
                    return;
                };
                while let Ok(m) = ws.read() {
                    if (m.is_text() || m.is_binary()) && ws.send(m).is_err() {
                        break;
                    }
                    let _ = ws.flush();
                }
            });
        }
    });
    let b = Backend::start("b1");
    let mut s = Server::prepare(&format!(
        "{}\n[path_routes.\"127.0.0.1\".\"/ws/\"]\ntype = \"Proxy\"\nurl = \"http://127.0.0.1:{ws_port}\"\n",
        template(&b, "access_log_format = \"json\"")
    ));
    s.write_file("www/f.txt", b"hello\n");
    s.spawn();
    s.wait_ready();
    let stream = TcpStream::connect(s.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let url = format!("ws://127.0.0.1:{}/ws/chat", s.port);
    let (mut ws, resp) = tungstenite::client(url.as_str(), stream).expect("handshake");
    assert_eq!(resp.status(), 101);
    let payload = "x".repeat(10_000);
    ws.send(tungstenite::Message::text(payload.clone()))
        .unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap().as_str(), payload);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        lines(&s.path("access.log")).is_empty(),
        "no line while the tunnel is open"
    );
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    let got = wait_lines(&s.path("access.log"), 1);
    assert_eq!(got.len(), 1, "{got:#?}");
    let check = r#"
import json, sys
row = json.loads(sys.argv[1])
assert row["request"] == "GET /ws/chat HTTP/1.1", row
assert row["status"] == 101, row
# A 10,000-byte message framed each way (the client's is masked), and the close frames.
assert 10_004 <= row["body_bytes_sent"] < 10_100, row
assert 10_008 <= row["request_body_bytes"] < 10_100, row
assert row["upstream_addr"] == "127.0.0.1:" + sys.argv[2], row
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(check)
        .arg(&got[0])
        .arg(ws_port.to_string())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        got[0]
    );
}

#[test]
fn lines_still_buffered_are_written_when_a_worker_exits() {
    let b = Backend::start("b1");
    // No flush before the exit: the lines are in the writer's batch until then.
    let mut s = start(&b, "flush_interval_ms = 600000");
    for _ in 0..50 {
        let status = send(
            &s,
            "GET /f HTTP/1.1\r\nHost: localhost\r\nUser-Agent: load\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status, 200);
    }
    std::thread::sleep(Duration::from_millis(200));
    let path = s.path("access.log");
    assert!(lines(&path).is_empty(), "flushed before the exit");
    s.signal(libc::SIGQUIT);
    assert!(s.wait_exit(Duration::from_secs(20)).is_some());
    let got = lines(&path);
    got.iter().for_each(|l| assert_whole(l));
    assert_eq!(got.len(), 50, "{}", s.log());
}

#[test]
fn proxy_errors_are_logged() {
    let b = Backend::start("b1");
    let s = start(&b, "");
    let status = send(&s, "GET /down/x HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(status, 502);
    let got = wait_lines(&s.path("access.log"), 1);
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].contains("\"GET /down/x HTTP/1.1\" 502 "),
        "{}",
        got[0]
    );
}

#[test]
fn max_log_size_rotates_the_error_log_too() {
    let b = Backend::start("b1");
    let mut s = Server::prepare(&template(
        &b,
        "max_log_size = 2048\nfile_path = \"{dir}/error.log\"",
    ));
    s.write_file("www/f.txt", b"hello\n");
    s.spawn();
    s.wait_ready();
    let dir = s.dir.path().to_path_buf();
    let error_logs = || -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("error.log"))
            })
            .collect();
        v.sort();
        v
    };
    // Each reload writes a few lines to the error log.
    for _ in 0..6 {
        s.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        wait_until(Duration::from_secs(10), || error_logs().len() >= 2),
        "{:?}",
        error_logs()
    );
    for f in error_logs() {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.lines() {
            assert!(
                line.starts_with("20") && line.contains(" ["),
                "{f:?}: {line:?}"
            );
        }
    }
}

#[test]
fn a_writer_that_falls_behind_drops_lines_and_counts_every_one() {
    let b = Backend::start("b1");
    // A one-line channel flushed rarely: the writer falls behind a burst, and the worker
    // drops rather than waits.
    let s = start(&b, "channel_size = 1\nflush_interval_ms = 500\n");
    let total = 4000;
    load(&s, total, 8, || {});
    let metrics = s.metrics();
    let dropped = metric(&metrics, "zerocopy_proxy_access_log_dropped_total", &[]) as usize;
    let path = s.path("access.log");
    // Every request is either a line or counted as dropped, none both, none neither.
    let written = wait_until(Duration::from_secs(10), || {
        lines(&path).len() + dropped >= total
    });
    let got = lines(&path).len();
    assert!(
        written && got + dropped == total,
        "{got} lines + {dropped} dropped ≠ {total}"
    );
    println!("{got} lines, {dropped} dropped");
    assert!(
        dropped > 0,
        "nothing dropped: the test did not overload the writer"
    );
}
