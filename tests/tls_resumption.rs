//! TLS session resumption on any worker: the session-ticket keys live in shared memory, so a
//! session that worker 0 issued resumes on worker 1 (TLS 1.2 and 1.3), on the workers of the
//! next generation after a reload, and on those of a new master after a binary upgrade; and
//! the keys rotate, the previous one still opening tickets.

mod common;
use common::certs::{Ca, KeyFormat, Kind};
use common::*;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// Two workers, each client address always reaching the same one (cbpf: `address % 2`, so
/// 127.0.0.2 → worker 0 and 127.0.0.3 → worker 1).
const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:{port}"
http_listen = "127.0.0.1:{http_port}"
threads = 2
shutdown_timeout_secs = 5
pid_file = "{dir}/zc.pid"

[performance]
reuseport_balancing = "cbpf"

[tls]
cert_path = "{dir}/default.crt"
key_path = "{dir}/default.key"
{extra}

[[tls.certificates]]
cert_path = "{dir}/a.crt"
key_path = "{dir}/a.key"

[path_routes."*"."/"]
path = "{dir}/www"
"#;

struct Setup {
    s: Server,
    ca: std::path::PathBuf,
    http_port: u16,
}

fn start(extra: &str) -> Setup {
    let http_port = free_port();
    let mut s = Server::prepare(
        &CONFIG
            .replace("{http_port}", &http_port.to_string())
            .replace("{extra}", extra),
    );
    let ca = Ca::new("zerocopy resumption test CA");
    for (stem, names, kind) in [
        ("default", &["default.test"][..], Kind::EcdsaP256),
        ("a", &["a.test"][..], Kind::Rsa2048),
    ] {
        let leaf = ca.issue(names[0], names, kind, KeyFormat::Pkcs8);
        s.write_file(&format!("{stem}.crt"), leaf.cert_pem.as_bytes());
        s.write_file(&format!("{stem}.key"), leaf.key_pem.as_bytes());
    }
    let ca_file = s.write_file("ca.pem", ca.pem.as_bytes());
    s.write_file("www/index.html", b"hello\n");
    s.spawn();
    let up = wait_until(Duration::from_secs(10), || {
        TcpStream::connect(("127.0.0.1", http_port)).is_ok()
    });
    assert!(up, "{}", s.log());
    Setup {
        s,
        ca: ca_file,
        http_port,
    }
}

impl Setup {
    /// Requests served so far by worker 0 and worker 1.
    fn per_worker(&self) -> [f64; 2] {
        let m = get(&format!("http://127.0.0.1:{}/__metrics", self.http_port)).1;
        let n = |w: &str| metric(&m, "zerocopy_proxy_worker_requests_total", &[w]);
        [n("worker=\"0\""), n("worker=\"1\"")]
    }
}

/// A rustls client of one TLS version that keeps the sessions it is given (in memory, shared
/// by every connection made with it).
fn client(
    ca: &std::path::Path,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    Arc::new(rustls_client(Some(ca), &[version]))
}

/// Five keep-alive `GET /` over one TLS connection from `source` to the server as `a.test`
/// (five, so that the worker that served them stands out in the per-worker counts); whether
/// the handshake resumed a session.
fn five_gets_from(
    setup: &Setup,
    config: &Arc<rustls::ClientConfig>,
    source: Ipv4Addr,
) -> rustls::HandshakeKind {
    let tcp = connect_from(source, setup.s.addr());
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("a.test").unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    for i in 0..5 {
        let close = if i == 4 { "Connection: close\r\n" } else { "" };
        write!(tls, "GET / HTTP/1.1\r\nHost: a.test\r\n{close}\r\n").unwrap();
        // Head, then the 6-byte body: enough to read each answer whole.
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tls.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        let mut body = [0u8; 6];
        tls.read_exact(&mut body).unwrap();
        assert_eq!(&body, b"hello\n");
    }
    tls.conn.handshake_kind().expect("handshake done")
}

/// The worker that took the requests between two per-worker counts (the count itself is one
/// more request, to whichever worker).
fn who(before: [f64; 2], after: [f64; 2]) -> usize {
    match [after[0] - before[0], after[1] - before[1]] {
        [d0, d1] if d0 >= 5.0 && d1 <= 1.0 => 0,
        [d0, d1] if d1 >= 5.0 && d0 <= 1.0 => 1,
        d => panic!("requests split over the workers: {d:?}"),
    }
}

#[test]
fn a_session_from_worker_0_resumes_on_worker_1_over_tls_1_2_and_1_3() {
    let setup = start("");
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let config = client(&setup.ca, version);
        let c0 = setup.per_worker();
        let first = five_gets_from(&setup, &config, Ipv4Addr::new(127, 0, 0, 2));
        let c1 = setup.per_worker();
        let second = five_gets_from(&setup, &config, Ipv4Addr::new(127, 0, 0, 3));
        let c2 = setup.per_worker();
        assert_eq!((who(c0, c1), who(c1, c2)), (0, 1), "{version:?}");
        assert_eq!(first, rustls::HandshakeKind::Full, "{version:?}");
        assert_eq!(
            second,
            rustls::HandshakeKind::Resumed,
            "{version:?}: worker 1 did not resume worker 0's session"
        );
        // And back: worker 1's ticket opens on worker 0.
        let third = five_gets_from(&setup, &config, Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(third, rustls::HandshakeKind::Resumed, "{version:?}");
    }
}

/// `openssl s_client` as `a.test` with `version` (`-tls1_2`, `-tls1_3`): a request, read to
/// the end so that TLS 1.3 tickets arrive; the session goes to `sess_out` or comes from
/// `sess_in`. Whether the handshake reused a session.
fn s_client(
    setup: &Setup,
    version: &str,
    sess_out: Option<&std::path::Path>,
    sess_in: Option<&std::path::Path>,
) -> bool {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect"])
        .arg(setup.s.addr().to_string())
        .args(["-servername", "a.test", version, "-ign_eof", "-CAfile"])
        .arg(&setup.ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = sess_out {
        cmd.arg("-sess_out").arg(p);
    }
    if let Some(p) = sess_in {
        cmd.arg("-sess_in").arg(p);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("hello"), "{text}");
    let proto = if version == "-tls1_3" {
        "TLSv1.3"
    } else {
        "TLSv1.2"
    };
    if text.contains(&format!("Reused, {proto},")) {
        true
    } else {
        assert!(text.contains(&format!("New, {proto},")), "{text}");
        false
    }
}

/// Waits until every worker the master has is one that `old` does not list, and serves.
fn wait_new_workers(setup: &Setup, master: i32, old: &[i32]) {
    let fresh = wait_until(Duration::from_secs(15), || {
        let now = children_of(master);
        now.len() == 2 && now.iter().all(|p| !old.contains(p))
    });
    assert!(fresh, "{}", setup.s.log());
}

#[test]
fn sessions_resume_after_a_reload_and_after_a_binary_upgrade() {
    let setup = start("");
    let dir = setup.s.dir.path();
    let versions = ["-tls1_2", "-tls1_3"];
    let sess = |v: &str| dir.join(format!("sess{v}.pem"));
    for v in versions {
        assert!(
            !s_client(&setup, v, Some(&sess(v)), None),
            "{v}: a first session is new"
        );
        assert!(s_client(&setup, v, None, Some(&sess(v))), "{v}: resumes");
    }

    // Reload: the sessions resume on the new generation's workers.
    let master = setup.s.pid();
    let old = children_of(master);
    setup.s.signal(libc::SIGHUP);
    wait_new_workers(&setup, master, &old);
    for v in versions {
        assert!(
            s_client(&setup, v, None, Some(&sess(v))),
            "{v}: no resumption after a reload\n{}",
            setup.s.log()
        );
    }

    // Binary upgrade: a new master, its own workers, the same region and so the same keys.
    let reap = setup.s.upgrade(&setup.s.path("zc.pid"), 2);
    setup.s.signal(libc::SIGWINCH);
    // The new master is a child of the old one: only it is left.
    assert!(
        wait_until(Duration::from_secs(15), || children_of(master) == [reap.0]),
        "the old master's workers still run\n{}",
        setup.s.log()
    );
    for v in versions {
        assert!(
            s_client(&setup, v, None, Some(&sess(v))),
            "{v}: no resumption after a binary upgrade\n{}",
            setup.s.log()
        );
    }
    // The new master's workers sealed new tickets: the old master (the test's server) can
    // go; the new one is killed by `reap`.
    drop(reap);
}

#[test]
fn keys_rotate_and_the_previous_one_still_opens_tickets() {
    // Every 2 s a new key: a ticket lives one to two periods.
    let setup = start("session_ticket_rotation_secs = 2");
    let made = |n: u64| format!("TLS session-ticket key #{n} made");
    let wait_key = |n: u64| {
        assert!(
            wait_until(Duration::from_secs(10), || setup.s.log().contains(&made(n))),
            "{}",
            setup.s.log()
        );
    };
    let versions = ["-tls1_2", "-tls1_3"];
    let sess = |v: &str| setup.s.dir.path().join(format!("sess{v}.pem"));
    // Right after a rotation, so that the next one is a whole period away.
    wait_key(2);
    for v in versions {
        assert!(!s_client(&setup, v, Some(&sess(v)), None), "{v}");
    }
    assert!(!setup.s.log().contains(&made(3)), "sealed with key #2");
    // #3 seals now, #2 still opens (TLS 1.2 tickets are tried before session IDs, so an
    // unopenable ticket is a full handshake even on the worker that cached the session).
    wait_key(3);
    for v in versions {
        assert!(
            s_client(&setup, v, None, Some(&sess(v))),
            "{v}: the previous key opens"
        );
    }
    // #4: #2 is gone.
    wait_key(4);
    for v in versions {
        assert!(
            !s_client(&setup, v, None, Some(&sess(v))),
            "{v}: a ticket two rotations old must not open"
        );
    }
}
