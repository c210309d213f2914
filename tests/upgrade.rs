//! Binary upgrade, the nginx procedure: USR2 starts a new master on the same sockets and
//! shared memory, WINCH drains the old master's workers, QUIT ends the old master — under load,
//! losing no request, counters never going back.

mod common;
use common::*;
use std::time::Duration;

/// Inodes of the sockets listening on `port` (from /proc/net/tcp).
fn listening_inodes(port: u16) -> std::collections::HashSet<String> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && f.get(3) == Some(&"0A"))
                .then(|| f.get(9).map(|s| s.to_string()))?
        })
        .collect()
}

/// How many of those listening sockets `pid` holds.
fn listeners_held(pid: i32, port: u16) -> usize {
    let inodes = listening_inodes(port);
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_str()
                        .and_then(|s| s.strip_prefix("socket:["))
                        .map(|s| s.trim_end_matches(']').to_string())
                })
                .filter(|i| inodes.contains(i))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn usr2_winch_quit_hands_over_without_losing_a_request() {
    let mut s = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 2\npid_file = \"{dir}/zc.pid\"\nshutdown_timeout_secs = 10\n\n[path_routes.\"127.0.0.1\".\"/\"]\npath = \"{dir}/www\"\n",
    );
    s.write_file("www/index.html", b"same content\n");
    s.spawn();
    s.wait_ready();
    let pid_file = s.path("zc.pid");
    let oldbin = s.path("zc.pid.oldbin");
    let old = s.pid();

    let load = Load::start(s.url("/"), None, Some("same content\n"), &[true, false]);
    std::thread::sleep(Duration::from_millis(300));
    let before = metric(&s.metrics(), "zerocopy_proxy_http_requests_total", &[]);

    // USR2: a new master from the binary on disk, on the same sockets.
    let reap = s.upgrade(&pid_file, 2);
    let new = reap.0;
    assert_eq!(
        read_pid(&oldbin),
        Some(old),
        "the old master's pid file is renamed .oldbin"
    );
    assert!(
        s.log()
            .contains("binary upgrade: took over 1 listen groups and the shared memory"),
        "{}",
        s.log()
    );
    let old_workers: Vec<i32> = children_of(old).into_iter().filter(|p| *p != new).collect();
    assert_eq!(old_workers.len(), 2);
    // Every process holds exactly the listeners it knows of: the masters all of them, each
    // worker its own.
    assert_eq!(listeners_held(new, s.port), 2, "new master");
    for w in children_of(new)
        .into_iter()
        .chain(old_workers.iter().copied())
    {
        assert_eq!(listeners_held(w, s.port), 1, "worker {w}");
    }

    // WINCH: the old workers drain and exit; the old master stays.
    s.signal(libc::SIGWINCH);
    assert!(
        wait_until(Duration::from_secs(10), || old_workers
            .iter()
            .all(|p| !alive(*p))),
        "{}",
        s.log()
    );
    assert!(alive(old));
    std::thread::sleep(Duration::from_millis(500));

    // QUIT: the old master ends; the new one serves on.
    s.signal(libc::SIGQUIT);
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0), "{}", s.log());
    assert!(!oldbin.exists(), "the .oldbin pid file is removed");
    assert_eq!(read_pid(&pid_file), Some(new));
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100);
    let after = metric(&s.metrics(), "zerocopy_proxy_http_requests_total", &[]);
    assert!(
        after >= before + ok as f64 * 0.5,
        "counters went back: {before} then {after}"
    );

    // The new master answers to -s through the pid file, and stops cleanly.
    let new_workers = children_of(new);
    s.dash_s("stop");
    assert!(wait_until(Duration::from_secs(10), || !alive(new)
        && new_workers.iter().all(|p| !alive(*p))));
}

#[test]
fn a_rejected_upgrade_rolls_back_to_the_old_master() {
    let mut s = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 1\npid_file = \"{dir}/zc.pid\"\nshutdown_timeout_secs = 5\n\n[path_routes.\"127.0.0.1\".\"/\"]\npath = \"{dir}/www\"\n",
    );
    s.write_file("www/index.html", b"x\n");
    s.spawn();
    s.wait_ready();
    let pid_file = s.path("zc.pid");
    let old = s.pid();
    s.signal(libc::SIGUSR2);
    assert!(wait_until(Duration::from_secs(10), || read_pid(&pid_file)
        .is_some_and(|p| p != old)));
    let new = read_pid(&pid_file).unwrap();
    let _reap = Reap(new);
    assert!(wait_until(Duration::from_secs(10), || children_of(new)
        .len()
        == 1));
    // The operator changes their mind: QUIT to the new master; the old one takes its name back.
    // SAFETY: kill(2) takes plain values and touches no memory of ours.
    unsafe { libc::kill(new, libc::SIGQUIT) };
    assert!(wait_until(Duration::from_secs(10), || !alive(new)));
    assert!(
        wait_until(Duration::from_secs(5), || read_pid(&pid_file) == Some(old)),
        "{}",
        s.log()
    );
    assert!(!s.path("zc.pid.oldbin").exists());
    assert!(s.log().contains("the new master"), "{}", s.log());
    assert_eq!(get(&s.url("/")), (200, "x\n".to_string()));
}
