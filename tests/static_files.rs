//! Static files: big files in both modes, concurrency, ranges, conditionals, HEAD, traversal,
//! files that change underneath.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::time::Duration;

const GIB: u64 = 1 << 30;

/// Writes marks at a few offsets of a sparse file, so that a shifted or truncated copy
/// cannot pass the comparison.
fn sparse_file(path: &std::path::Path, len: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    for (i, at) in [0, 4096, len / 3, len / 2 + 7, len - 100_000, len - 17]
        .into_iter()
        .enumerate()
    {
        f.write_all_at(&pattern(4096.min((len - at) as usize), i as u64 + 1), at)
            .unwrap();
    }
}

/// Sends a request, reads the head, returns (status, headers, reader positioned at the body).
fn open(s: &Server, request: &str) -> (u16, Vec<(String, String)>, BufReader<TcpStream>) {
    let mut c = TcpStream::connect(s.addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut r = BufReader::with_capacity(1 << 20, c);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':').unwrap();
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    (status, headers, r)
}

/// Streams `len` bytes of the body and compares them with `file` from `offset`.
fn compare_body(r: &mut impl Read, file: &std::path::Path, offset: u64, len: u64) {
    let mut f = std::fs::File::open(file).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut got = vec![0u8; 1 << 20];
    let mut want = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = ((len - done) as usize).min(got.len());
        r.read_exact(&mut got[..n])
            .unwrap_or_else(|e| panic!("body ended at {done} of {len}: {e}"));
        f.read_exact(&mut want[..n]).unwrap();
        assert!(
            got[..n] == want[..n],
            "bytes differ in [{}, {})",
            offset + done,
            offset + done + n as u64
        );
        done += n as u64;
    }
}

#[test]
fn a_two_gib_file_arrives_byte_exact_in_both_modes() {
    // One worker: a memory route holds its file once per worker.
    let mut s = Server::prepare(
        r#"
[server]
listen = "127.0.0.1:{port}"
threads = 1

[path_routes."t"."/disk.bin"]
path = "{dir}/big.bin"
mode = "sendfile"

[path_routes."t"."/mem.bin"]
path = "{dir}/big.bin"
mode = "memory"
"#,
    );
    let file = s.path("big.bin");
    sparse_file(&file, 2 * GIB);
    s.spawn();
    // The worker reads 2 GiB into memory before it serves.
    s.wait_ready_for(Duration::from_secs(120));
    for path in ["/disk.bin", "/mem.bin"] {
        let (status, h, mut r) = open(&s, &format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert_eq!(status, 200, "{path}");
        assert_eq!(
            header(&h, "content-length"),
            Some((2 * GIB).to_string().as_str())
        );
        compare_body(&mut r, &file, 0, 2 * GIB);
    }
}

#[test]
fn files_over_4_gib_and_ranges_near_their_end() {
    let mut s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 1\n\n[path_routes.\"t\".\"/\"]\npath = \"{dir}/www\"\n");
    std::fs::create_dir_all(s.path("www")).unwrap();
    let file = s.path("www/huge.bin");
    let len = 4 * GIB + 300_000;
    sparse_file(&file, len);
    s.spawn();
    s.wait_ready();
    let (status, h, _) = open(&s, "HEAD /huge.bin HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        (status, header(&h, "content-length")),
        (200, Some(len.to_string().as_str()))
    );
    let start = len - 150_000;
    let (status, h, mut r) = open(
        &s,
        &format!("GET /huge.bin HTTP/1.1\r\nHost: t\r\nRange: bytes={start}-\r\n\r\n"),
    );
    assert_eq!(status, 206);
    assert_eq!(
        header(&h, "content-range"),
        Some(format!("bytes {start}-{}/{len}", len - 1).as_str())
    );
    compare_body(&mut r, &file, start, 150_000);
    let (status, _, mut r) = open(
        &s,
        "GET /huge.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=-100000\r\n\r\n",
    );
    assert_eq!(status, 206);
    compare_body(&mut r, &file, len - 100_000, 100_000);
}

#[test]
fn two_hundred_concurrent_downloads_arrive_whole() {
    let mut s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 2\n\n[path_routes.\"t\".\"/\"]\npath = \"{dir}/www\"\n\n[path_routes.\"t\".\"/m\"]\npath = \"{dir}/www\"\nmode = \"memory\"\n");
    let data = pattern(10 << 20, 99);
    s.write_file("www/ten.bin", &data);
    s.spawn();
    s.wait_ready();
    let addr = s.addr();
    let data = std::sync::Arc::new(data);
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let data = data.clone();
            std::thread::spawn(move || {
                let path = if i % 2 == 0 { "/ten.bin" } else { "/m/ten.bin" };
                let mut c = TcpStream::connect(addr).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                write!(
                    c,
                    "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let mut all = Vec::new();
                c.read_to_end(&mut all).unwrap();
                let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                assert!(all.starts_with(b"HTTP/1.1 200"));
                assert!(
                    all[split..] == data[..],
                    "download {i} ({path}) differs: {} bytes",
                    all.len() - split
                );
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` as RFC 850 writes it: `Sunday, 06-Nov-94 08:49:37 GMT`.
fn rfc850(imf: &str) -> String {
    let p: Vec<&str> = imf.split(' ').collect();
    let day = match p[0] {
        "Mon," => "Monday",
        "Tue," => "Tuesday",
        "Wed," => "Wednesday",
        "Thu," => "Thursday",
        "Fri," => "Friday",
        "Sat," => "Saturday",
        _ => "Sunday",
    };
    format!("{day}, {}-{}-{} {} GMT", p[1], p[2], &p[3][2..], p[4])
}

/// ... and as asctime writes it: `Sun Nov  6 08:49:37 1994`.
fn asctime(imf: &str) -> String {
    let p: Vec<&str> = imf.split(' ').collect();
    let day: u32 = p[1].parse().unwrap();
    format!("{} {} {day:>2} {} {}", &p[0][..3], p[2], p[4], p[3])
}

#[test]
fn range_conditional_and_head_header_by_header() {
    let mut s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\n\n[path_routes.\"t\".\"/\"]\npath = \"{dir}/www\"\n\n[path_routes.\"t\".\"/m\"]\npath = \"{dir}/www\"\nmode = \"memory\"\n");
    s.write_file("www/a.txt", b"0123456789abcdefghij");
    s.spawn();
    s.wait_ready();
    for base in ["/a.txt", "/m/a.txt"] {
        let get = |extra: &str| {
            open(
                &s,
                &format!("GET {base} HTTP/1.1\r\nHost: t\r\n{extra}\r\n"),
            )
        };
        let (status, h, mut r) = get("");
        assert_eq!(status, 200);
        let etag = header(&h, "etag").unwrap().to_string();
        let modified = header(&h, "last-modified").unwrap().to_string();
        assert!(
            etag.starts_with('"') && etag.ends_with('"'),
            "strong ETag: {etag}"
        );
        assert_eq!(
            header(&h, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(header(&h, "content-length"), Some("20"));
        assert_eq!(header(&h, "accept-ranges"), Some("bytes"));
        assert!(modified.ends_with(" GMT"));
        let mut body = vec![0; 20];
        r.read_exact(&mut body).unwrap();

        let range = |spec: &str| get(&format!("Range: {spec}\r\n"));
        let check = |(status, h, mut r): (u16, Vec<(String, String)>, BufReader<TcpStream>),
                     want: u16,
                     content_range: &str,
                     body: &[u8]| {
            assert_eq!(status, want, "{base} {content_range}");
            assert_eq!(header(&h, "content-range"), Some(content_range), "{base}");
            assert_eq!(
                header(&h, "content-length"),
                Some(body.len().to_string().as_str())
            );
            let mut got = vec![0; body.len()];
            r.read_exact(&mut got).unwrap();
            if want == 206 {
                assert_eq!(got, body);
            }
        };
        check(range("bytes=0-4"), 206, "bytes 0-4/20", b"01234");
        check(range("bytes=15-"), 206, "bytes 15-19/20", b"fghij");
        check(range("bytes=-3"), 206, "bytes 17-19/20", b"hij");
        check(range("bytes=18-100"), 206, "bytes 18-19/20", b"ij");
        check(
            range("bytes=20-"),
            416,
            "bytes */20",
            b"416 Range Not Satisfiable\n",
        );
        check(
            range("bytes=-0"),
            416,
            "bytes */20",
            b"416 Range Not Satisfiable\n",
        );
        // Several ranges, or nonsense (even past the end: not 416): the whole file.
        for spec in [
            "bytes=0-1,3-4",
            "bytes=5-2",
            "lines=1-2",
            "bytes=x-y",
            "bytes=30-5",
            "bytes=30-x",
        ] {
            let (status, h, _) = range(spec);
            assert_eq!((status, header(&h, "content-range")), (200, None), "{spec}");
        }
        // If-Range: the range only while the validator still matches.
        let (status, _, _) = get(&format!("Range: bytes=0-1\r\nIf-Range: {etag}\r\n"));
        assert_eq!(status, 206);
        let (status, _, _) = get("Range: bytes=0-1\r\nIf-Range: \"stale\"\r\n");
        assert_eq!(status, 200);
        let (status, _, _) = get(&format!("Range: bytes=0-1\r\nIf-Range: {modified}\r\n"));
        assert_eq!(status, 206);
        let (status, _, _) = get("Range: bytes=0-1\r\nIf-Range: Thu, 01 Jan 1970 00:00:00 GMT\r\n");
        assert_eq!(status, 200);
        // Conditionals.
        for (extra, want) in [
            (format!("If-None-Match: {etag}\r\n"), 304),
            (format!("If-None-Match: \"x\", W/{etag}\r\n"), 304),
            ("If-None-Match: *\r\n".to_string(), 304),
            ("If-None-Match: \"other\"\r\n".to_string(), 200),
            (format!("If-Modified-Since: {modified}\r\n"), 304),
            (
                "If-Modified-Since: Thu, 01 Jan 1970 00:00:00 GMT\r\n".to_string(),
                200,
            ),
            ("If-Modified-Since: not a date\r\n".to_string(), 200),
            // RFC 9110 §5.6.7: the obsolete RFC 850 and asctime forms are dates too.
            (format!("If-Modified-Since: {}\r\n", rfc850(&modified)), 304),
            (
                format!("If-Modified-Since: {}\r\n", asctime(&modified)),
                304,
            ),
            // If-None-Match wins over If-Modified-Since.
            (
                format!("If-None-Match: \"other\"\r\nIf-Modified-Since: {modified}\r\n"),
                200,
            ),
        ] {
            let (status, h, _) = get(&extra);
            assert_eq!(status, want, "{base} {extra}");
            if want == 304 {
                assert_eq!(header(&h, "etag"), Some(etag.as_str()));
                assert_eq!(header(&h, "content-length"), None);
            }
        }
        // HEAD: the same headers as GET, no body (the next response follows right away).
        let mut c = TcpStream::connect(s.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(c, "HEAD {base} HTTP/1.1\r\nHost: t\r\n\r\nGET {base} HTTP/1.1\r\nHost: t\r\nRange: bytes=0-0\r\nConnection: close\r\n\r\n").unwrap();
        let mut all = String::new();
        c.read_to_string(&mut all).unwrap();
        let (head1, rest) = all.split_once("\r\n\r\n").unwrap();
        assert!(head1.starts_with("HTTP/1.1 200"), "{head1}");
        assert!(
            head1.contains("Content-Length: 20") && head1.contains(&format!("ETag: {etag}")),
            "{head1}"
        );
        assert!(rest.starts_with("HTTP/1.1 206"), "HEAD sent a body: {rest}");
        assert!(rest.ends_with("\r\n\r\n0"), "{rest}");
    }
}

#[test]
fn path_traversal_never_leaves_the_root() {
    let mut s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\n\n[path_routes.\"t\".\"/static/\"]\npath = \"{dir}/www/static\"\n\n[path_routes.\"t\".\"/one.txt\"]\npath = \"{dir}/www/one.txt\"\n");
    s.write_file("www/static/ok.txt", b"ok\n");
    s.write_file("www/one.txt", b"one\n");
    s.write_file("secret.txt", b"TOP SECRET\n");
    s.write_file("www/secret2.txt", b"TOP SECRET\n");
    std::os::unix::fs::symlink(s.path("secret.txt"), s.path("www/static/link.txt")).unwrap();
    std::os::unix::fs::symlink(s.dir.path(), s.path("www/static/up")).unwrap();
    s.spawn();
    s.wait_ready();
    let attempts = [
        "/static/../secret.txt",
        "/static/../../secret.txt",
        "/static/%2e%2e/secret.txt",
        "/static/%2E%2E/%2e%2e/secret.txt",
        "/static/.%2e/secret2.txt",
        "/static/%2e./secret2.txt",
        "/static/..%2fsecret2.txt",
        "/static/..%2Fsecret2.txt",
        "/static/%2e%2e%2fsecret2.txt",
        "/static/..\\secret2.txt",
        "/static/..%5csecret2.txt",
        "/static/%5c..%5csecret2.txt",
        "/static/ok.txt%00.html",
        "/static/%00/../secret2.txt",
        "/static/link.txt",
        "/static/up/secret.txt",
        "/static//../secret2.txt",
        "/static/./../secret2.txt",
        "/static/%252e%252e/secret2.txt",
        "/one.txt/../secret2.txt",
        "/static/%c0%ae%c0%ae/secret2.txt",
        "/static/..;/secret2.txt",
    ];
    for path in attempts {
        let text = raw(
            s.addr(),
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        );
        let status: u16 = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        assert!(status == 400 || status == 404, "{path}: {status}");
        assert!(
            !text.contains("TOP SECRET"),
            "{path} leaked a file outside the root"
        );
    }
    let text = raw(
        s.addr(),
        b"GET /static/ok.txt HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(text.ends_with("\r\n\r\nok\n"), "{text}");
}

#[test]
fn a_file_that_shrinks_while_sent_ends_the_connection() {
    let mut s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\n\n[path_routes.\"t\".\"/\"]\npath = \"{dir}/www\"\n");
    let file = s.write_file("www/shrink.bin", &pattern(64 << 20, 5));
    s.spawn();
    s.wait_ready();
    let (status, h, mut r) = open(&s, "GET /shrink.bin HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        (status, header(&h, "content-length")),
        (200, Some((64u64 << 20).to_string().as_str()))
    );
    let mut first = vec![0u8; 1 << 20];
    r.read_exact(&mut first).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mut rest = Vec::new();
    let t = std::time::Instant::now();
    let result = r.read_to_end(&mut rest);
    let total = (1 << 20) + rest.len();
    assert!(
        total < 64 << 20,
        "the server padded the body to its announced length"
    );
    if let Err(e) = result {
        let timed_out = matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        );
        assert!(!timed_out, "the connection hung instead of ending");
    }
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "the connection hung for {:?}",
        t.elapsed()
    );
}

#[test]
fn memory_routes_serve_what_they_read_until_a_reload() {
    let template = "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[path_routes.\"127.0.0.1\".\"/m\"]\npath = \"{dir}/www\"\nmode = \"memory\"\n\n[path_routes.\"127.0.0.1\".\"/d\"]\npath = \"{dir}/www\"\n\n[path_routes.\"127.0.0.1\".\"/one\"]\npath = \"{dir}/www/v.txt\"\nmode = \"memory\"\n";
    let mut s = Server::prepare(template);
    s.write_file("www/v.txt", b"version 1\n");
    s.spawn();
    s.wait_ready();
    // Every worker reads its memory routes when it starts: one worker answering is not all
    // of them done (on a loaded machine the other may still be reading).
    let all_read = wait_until(Duration::from_secs(20), || {
        s.log().contains("generation 1: serving")
    });
    assert!(all_read, "{}", s.log());
    s.write_file("www/v.txt", b"version 2 (longer)\n");
    assert_eq!(get(&s.url("/m/v.txt")), (200, "version 1\n".to_string()));
    assert_eq!(get(&s.url("/one")), (200, "version 1\n".to_string()));
    assert_eq!(
        get(&s.url("/d/v.txt")),
        (200, "version 2 (longer)\n".to_string())
    );
    // Files that were not there at start come from disk.
    s.write_file("www/new.txt", b"new\n");
    assert_eq!(get(&s.url("/m/new.txt")), (200, "new\n".to_string()));
    s.signal(libc::SIGHUP);
    // Once the old generation has drained, every answer comes from the new one.
    let new = "version 2 (longer)\n".to_string();
    let reloaded = wait_until(Duration::from_secs(10), || {
        (0..10).all(|_| get(&s.url("/m/v.txt")).1 == new && get(&s.url("/one")).1 == new)
    });
    assert!(reloaded, "{}", s.log());
}

/// Read system calls of a process so far (`syscr` of /proc/PID/io): a file answered from the
/// worker's small-file table costs none, one read from disk costs one `pread`.
fn read_calls(pid: i32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("syscr: "))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_small_file_kept_by_the_worker_follows_every_change() {
    let mut s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 1\n\n[path_routes.\"127.0.0.1\".\"/\"]\npath = \"{dir}/www\"\n");
    let file = s.write_file("www/small.txt", b"version 1\n");
    s.spawn();
    s.wait_ready();
    let worker = s.workers()[0];
    let url = s.url("/small.txt");
    let agent = ureq::AgentBuilder::new().build();
    let fetch = || get_with(&agent, &url).unwrap();
    // Kept only once its times are a second old (a write within the same clock tick as the
    // read could otherwise go unseen).
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fetch(), (200, "version 1\n".into()));
    let before = read_calls(worker);
    for _ in 0..50 {
        assert_eq!(fetch(), (200, "version 1\n".into()));
    }
    let reads = read_calls(worker) - before;
    assert!(reads < 25, "50 answers of a kept file cost {reads} reads");

    // Written in place, same size: seen at once.
    std::fs::write(&file, b"version 2\n").unwrap();
    assert_eq!(fetch(), (200, "version 2\n".into()));
    // Replaced by a rename with the old modification time: another inode.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(fetch(), (200, "version 2\n".into()));
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    let next = s.write_file("www/next.tmp", b"version 3\n");
    std::fs::File::options()
        .write(true)
        .open(&next)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&next, &file).unwrap();
    assert_eq!(fetch(), (200, "version 3\n".into()));
    // A range and a conditional request answered from the kept bytes.
    std::thread::sleep(Duration::from_millis(1100));
    let (status, h, body) = parse_response(&raw(
        s.addr(),
        b"GET /small.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes=8-\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    ));
    assert_eq!((status, body.as_str()), (206, "3\n"));
    let etag = header(&h, "etag").unwrap().to_string();
    let conditional = format!(
        "GET /small.txt HTTP/1.1\r\nHost: 127.0.0.1\r\nIf-None-Match: {etag}\r\nConnection: close\r\n\r\n"
    );
    let (status, ..) = parse_response(&raw(
        s.addr(),
        conditional.as_bytes(),
        Duration::from_secs(5),
    ));
    assert_eq!(status, 304);
    // Made unreadable for the worker: 403; then a symlink out of the root: 404; then gone.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fetch().0, 403);
    std::fs::remove_file(&file).unwrap();
    let outside = s.path("outside-root.txt");
    std::fs::write(&outside, b"version 3\n").unwrap();
    std::os::unix::fs::symlink(&outside, &file).unwrap();
    assert_eq!(fetch().0, 404);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(fetch().0, 404);
}
