//! Under systemd (`Type=notify`): the master tells the service manager over `NOTIFY_SOCKET`
//! that it serves (only once a request can be answered), that a reload starts and ends (and
//! how a failed one ended), and that it stops. The unit file passes `systemd-analyze verify`.

mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

const CONFIG: &str = "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 2\n";

/// A fake service manager: the datagrams the server sends, one string each.
struct Manager {
    sock: UnixDatagram,
    _dir: tempfile::TempDir,
    path: String,
}

impl Manager {
    fn new() -> Manager {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Manager {
            sock,
            path: path.to_str().unwrap().to_string(),
            _dir: dir,
        }
    }

    /// The next datagram within `within`.
    fn next(&self, within: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Datagrams until one has `line` (as a whole line); all of them, in order.
    fn until(&self, line: &str, within: Duration) -> Vec<String> {
        let end = Instant::now() + within;
        let mut got = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            let Some(msg) = self.next(left.max(Duration::from_millis(1))) else {
                break;
            };
            let done = msg.lines().any(|l| l == line);
            got.push(msg);
            if done {
                return got;
            }
        }
        panic!("no `{line}` within {within:?}; got {got:?}");
    }
}

fn has(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

#[test]
fn the_master_notifies_ready_reloading_and_stopping() {
    let manager = Manager::new();
    let mut s = Server::prepare(CONFIG);
    s.spawn_with_env(&[("NOTIFY_SOCKET", &manager.path)]);

    // READY=1, and at that moment a request is answered (no waiting for the server first).
    let got = manager.until("READY=1", Duration::from_secs(20));
    let ready = got.last().unwrap();
    assert!(
        has(ready, &format!("MAINPID={}", s.pid())),
        "READY=1 names the master: {ready:?}"
    );
    assert!(
        ready.contains("STATUS=serving"),
        "a readable status: {ready:?}"
    );
    let (status, _) = get(&s.url("/__metrics"));
    assert_eq!(status, 200, "READY=1 came before the server could answer");

    // A good reload: RELOADING=1 with the monotonic clock, then READY=1 once the new
    // generation serves.
    s.signal(libc::SIGHUP);
    let got = manager.until("READY=1", Duration::from_secs(20));
    let reloading = got
        .iter()
        .find(|m| has(m, "RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 before READY=1: {got:?}"));
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC: {reloading:?}"));
    assert!(usec > 0);
    assert!(
        wait_until(Duration::from_secs(10), || s
            .log()
            .contains("generation 2: serving")),
        "READY=1 came before the new generation served:\n{}",
        s.log()
    );

    // A broken config: RELOADING=1, then READY=1 with the error; the old generation serves.
    s.write_config("[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 2\nno_such_key = 1\n");
    s.signal(libc::SIGHUP);
    let got = manager.until("READY=1", Duration::from_secs(20));
    assert!(got.iter().any(|m| has(m, "RELOADING=1")), "{got:?}");
    let failed = got.last().unwrap();
    assert!(
        failed.contains("STATUS=reload failed") && failed.contains("no_such_key"),
        "the status says why: {failed:?}"
    );
    assert_eq!(get(&s.url("/__metrics")).0, 200);

    // QUIT: STOPPING=1.
    s.signal(libc::SIGQUIT);
    let got = manager.until("STOPPING=1", Duration::from_secs(20));
    assert!(got.last().unwrap().contains("STATUS="), "{got:?}");
    assert!(s.wait_exit(Duration::from_secs(20)).is_some());
}

#[test]
fn the_unit_file_is_type_notify_and_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/conf/zerocopy-server.service"
    ))
    .unwrap();
    assert!(unit.lines().any(|l| l == "Type=notify"), "{unit}");
    assert!(unit.lines().any(|l| l.starts_with("ProtectSystem=strict")));
    // systemd-analyze checks that the binary exists: point the unit at this build's.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerocopy-server.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/zerocopy-server", BIN)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect(
            "systemd-analyze (Debian package systemd, installed by scripts/install-test-deps.sh)",
        );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !said.contains(path.to_str().unwrap()),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
}

#[test]
fn after_a_binary_upgrade_systemd_follows_the_new_master_and_hears_no_stop() {
    let manager = Manager::new();
    let mut s = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 2\npid_file = \"{dir}/zc.pid\"\n",
    );
    s.spawn_with_env(&[("NOTIFY_SOCKET", &manager.path)]);
    manager.until("READY=1", Duration::from_secs(20));
    let pid_file = s.path("zc.pid");
    let new = s.upgrade(&pid_file, 2);
    let got = manager.until("READY=1", Duration::from_secs(20));
    assert!(
        has(got.last().unwrap(), &format!("MAINPID={}", new.0)),
        "the new master's READY=1 names it: {got:?}"
    );
    // The old master goes (WINCH, QUIT) as the service goes on: no STOPPING=1 from it.
    s.signal(libc::SIGWINCH);
    s.signal(libc::SIGQUIT);
    assert!(s.wait_exit(Duration::from_secs(20)).is_some());
    let mut after = Vec::new();
    while let Some(m) = manager.next(Duration::from_millis(500)) {
        after.push(m);
    }
    assert!(
        !after.iter().any(|m| has(m, "STOPPING=1")),
        "the old master said STOPPING=1: {after:?}"
    );
    assert_eq!(get(&s.url("/__metrics")).0, 200, "the new master serves");
}
