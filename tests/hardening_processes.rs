//! Processes that cannot be fooled: no child runs as root, shutdown as the spec says (TERM
//! and INT graceful, a second one fast), signals during a worker's start, respawn backoff,
//! health state after a reload, and a failed binary upgrade.

mod common;
use common::backend::Backend;
use common::*;
use std::thread;
use std::time::{Duration, Instant};

const BIG: usize = 24 * 1024 * 1024;

/// Two workers, a 24 MiB file, a pid file; drains may take 30 s.
fn start_with_big_file() -> Server {
    let mut s = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 2\npid_file = \"{dir}/zc.pid\"\nshutdown_timeout_secs = 30\n\n[path_routes.\"127.0.0.1\".\"/big\"]\npath = \"{dir}/big.bin\"\n",
    );
    s.write_file("big.bin", &pattern(BIG, 3));
    s.spawn();
    s.wait_ready();
    s
}

fn uids(pid: i32, field: &str) -> Vec<String> {
    proc_status(pid, field)
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[test]
fn started_as_root_without_a_user_no_child_runs_as_root_nor_reads_as_root() {
    let b = Backend::start("b");
    let mut s = Server::prepare(&format!(
        r#"
[server]
listen = "127.0.0.1:{{port}}"
threads = 2

[path_routes."127.0.0.1"."/mem"]
path = "{{dir}}/mem"
mode = "memory"

[path_routes."127.0.0.1"."/disk"]
path = "{{dir}}/mem"

[path_routes."127.0.0.1"."/api"]
type = "Proxy"
upstream = "u"

[upstreams."u"]
servers = ["{}"]

  [upstreams."u".health_check]
  interval_secs = 1
  path = "/health"
"#,
        b.url()
    ));
    s.write_file("mem/public.txt", b"public\n");
    let secret = s.write_file("mem/secret.txt", b"root only\n");
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    s.spawn();
    s.wait_ready();
    assert!(
        s.log()
            .contains("workers and health checkers run as `nobody`"),
        "{}",
        s.log()
    );
    let children = s.workers();
    assert_eq!(children.len(), 3, "two workers and a health checker");
    for pid in children {
        for field in ["Uid", "Gid"] {
            let ids = uids(pid, field);
            assert!(
                ids.len() == 4 && ids.iter().all(|id| id != "0"),
                "child {pid} {field}: {ids:?}"
            );
        }
        assert_eq!(proc_status(pid, "NoNewPrivs").as_deref(), Some("1"));
        assert_eq!(proc_status(pid, "Groups").as_deref(), Some("65534"));
    }
    assert_eq!(get(&s.url("/mem/public.txt")), (200, "public\n".into()));
    // Memory routes read with the worker's rights too: what root alone may read is refused.
    assert_eq!(get(&s.url("/mem/secret.txt")).0, 403, "memory route");
    assert_eq!(get(&s.url("/disk/secret.txt")).0, 403, "disk route");
}

#[test]
fn sigterm_lets_a_slow_download_finish_then_the_master_exits() {
    let mut s = start_with_big_file();
    let workers = s.workers();
    let download = slow_download(&s, BIG, Duration::from_millis(30));
    thread::sleep(Duration::from_millis(300));
    s.signal(libc::SIGTERM);
    assert!(wait_until(Duration::from_secs(3), || s
        .log()
        .contains("graceful shutdown")));
    thread::sleep(Duration::from_millis(500));
    assert!(alive(s.pid()), "the master waits for the download");
    let code = s.wait_exit(Duration::from_secs(30));
    let body = download.join().unwrap();
    assert!(body == pattern(BIG, 3), "download not byte-exact");
    assert_eq!(code, Some(0), "{}", s.log());
    assert!(workers.iter().all(|p| !alive(*p)), "workers left behind");
    assert!(!s.path("zc.pid").exists());
}

#[test]
fn a_second_signal_during_the_drain_stops_at_once() {
    // Ctrl+C first: graceful, the download goes on; then TERM.
    second_signal_stops_at_once(libc::SIGINT);
}

#[test]
fn a_second_sigterm_during_the_drain_stops_at_once() {
    second_signal_stops_at_once(libc::SIGTERM);
}

/// `first` drains (the download goes on); a TERM sent after it stops at once.
fn second_signal_stops_at_once(first: i32) {
    let mut s = start_with_big_file();
    let workers = s.workers();
    let download = slow_download(&s, BIG, Duration::from_millis(50));
    thread::sleep(Duration::from_millis(300));
    s.signal(first);
    assert!(wait_until(Duration::from_secs(3), || s
        .log()
        .contains("graceful shutdown")));
    thread::sleep(Duration::from_millis(500));
    assert!(alive(s.pid()), "the first signal drains");
    // Then TERM: workers and master go now, well before shutdown_timeout_secs.
    let sent = Instant::now();
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0), "{}", s.log());
    assert!(sent.elapsed() < Duration::from_secs(5));
    assert_fast_exits(&s);
    let body = download.join().unwrap();
    assert!(body.len() < BIG, "the download was cut");
    assert!(wait_until(Duration::from_secs(2), || workers
        .iter()
        .all(|p| !alive(*p))));
}

/// A fast stop: the worker with the download in flight stopped at once, and every worker
/// exited on its own (none killed after the grace period, as one that took the stop for a
/// drain would be).
fn assert_fast_exits(s: &Server) {
    let log = s.log();
    assert!(log.contains("[master] fast shutdown"), "{log}");
    assert!(
        log.contains("[worker 0] fast shutdown") || log.contains("[worker 1] fast shutdown"),
        "{log}"
    );
    assert_eq!(log.matches(") done (exit code 0)").count(), 2, "{log}");
}

#[test]
fn dash_s_stop_is_fast() {
    let mut s = start_with_big_file();
    let download = slow_download(&s, BIG, Duration::from_millis(50));
    thread::sleep(Duration::from_millis(300));
    s.dash_s("stop");
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0), "{}", s.log());
    assert_fast_exits(&s);
    assert!(download.join().unwrap().len() < BIG, "the download was cut");
}

/// A sparse file: reading it costs memory and page faults, not disk.
fn sparse_file(path: &std::path::Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

#[test]
fn usr1_while_a_reload_loads_a_large_memory_route_kills_no_worker() {
    let template = "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 2\n\n[path_routes.\"127.0.0.1\".\"/\"]\npath = \"{dir}/www\"\n";
    let mut s = Server::prepare(template);
    s.write_file("www/index.html", b"x\n");
    sparse_file(&s.path("large.bin"), 768 << 20);
    s.spawn();
    s.wait_ready();
    s.write_config(&format!(
        "{template}\n[path_routes.\"127.0.0.1\".\"/large\"]\npath = \"{{dir}}/large.bin\"\nmode = \"memory\"\n"
    ));
    let reopened = |log: &str| log.matches("[master] USR1: log file reopened").count();
    s.signal(libc::SIGHUP);
    thread::sleep(Duration::from_millis(300));
    // USR1 every 100 ms until the new generation serves: some land while it loads.
    let mut sent_while_loading = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s.log().contains("generation 2: serving") && Instant::now() < deadline {
        s.signal(libc::SIGUSR1);
        thread::sleep(Duration::from_millis(100));
        let log = s.log();
        if !log.contains("generation 2: serving") {
            sent_while_loading = reopened(&log);
        }
    }
    let log = s.log();
    assert!(log.contains("generation 2: serving"), "{log}");
    assert!(
        sent_while_loading >= 1,
        "no USR1 reached the master while the new workers loaded:\n{log}"
    );
    assert!(!log.contains("died"), "{log}");
    assert_eq!(
        metric(&s.metrics(), "zerocopy_proxy_worker_restarts_total", &[]),
        0.0
    );
    assert_eq!(get(&s.url("/")), (200, "x\n".into()));
}

/// Waits for a child of `master` not in `seen`; returns it and when it was first seen.
fn next_child(master: i32, seen: &[i32]) -> (i32, Instant) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(pid) = children_of(master).into_iter().find(|p| !seen.contains(p)) {
            return (pid, Instant::now());
        }
        thread::sleep(Duration::from_millis(5));
    }
    panic!("no new child of {master}");
}

#[test]
fn a_crash_looping_worker_is_re_forked_with_growing_delays() {
    let mut s = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 1\n\n[path_routes.\"127.0.0.1\".\"/\"]\npath = \"{dir}/www\"\n",
    );
    s.write_file("www/index.html", b"x\n");
    s.spawn();
    s.wait_ready();
    let master = s.pid();
    let mut seen = s.workers();
    // The first worker has lived long: its death resets the backoff.
    thread::sleep(Duration::from_millis(1100));
    // Then kill each new worker as soon as it appears: deaths within a second of the fork.
    let mut gaps = Vec::new();
    for _ in 0..7 {
        let victim = *seen.last().unwrap();
        let killed = Instant::now();
        // SAFETY: kill(2) takes plain values and touches no memory of ours.
        unsafe { libc::kill(victim, libc::SIGKILL) };
        let (next, at) = next_child(master, &seen);
        gaps.push(at - killed);
        seen.push(next);
    }
    // After a long life and after one early death: at once; then 0.1, 0.2, 0.4, 0.8, 1.6 s.
    assert!(gaps[6] >= Duration::from_millis(1500), "{gaps:?}");
    assert!(gaps[6] > gaps[4] * 2, "{gaps:?}");
    assert!(gaps[1] < Duration::from_millis(700), "{gaps:?}");
    let log = s.log();
    assert!(log.contains("respawning in 1600 ms"), "{log}");
    // The master answers meanwhile, and a worker that lived past a second is re-forked at once.
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(get(&s.url("/")), (200, "x\n".into()));
    assert_eq!(
        metric(&s.metrics(), "zerocopy_proxy_worker_restarts_total", &[]),
        7.0
    );
    let victim = *seen.last().unwrap();
    let killed = Instant::now();
    // SAFETY: kill(2) takes plain values and touches no memory of ours.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let (_, at) = next_child(master, &seen);
    assert!(
        at - killed < Duration::from_millis(700),
        "{:?}",
        at - killed
    );
}

#[test]
fn a_health_check_removed_by_a_reload_leaves_its_server_healthy() {
    let b = Backend::start("b");
    b.healthy.store(false, std::sync::atomic::Ordering::SeqCst);
    let template = format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\nthreads = 1\n\n[path_routes.\"127.0.0.1\".\"/\"]\ntype = \"Proxy\"\nupstream = \"u\"\n\n[upstreams.\"u\"]\nservers = [\"{}\"]\n",
        b.url()
    );
    let checked = format!(
        "{template}\n  [upstreams.\"u\".health_check]\n  interval_secs = 1\n  path = \"/health\"\n  unhealthy_threshold = 1\n"
    );
    let s = Server::start(&checked);
    let healthy = || {
        metric(
            &s.metrics(),
            "zerocopy_proxy_upstream_healthy",
            &["upstream=\"u\""],
        )
    };
    assert!(
        wait_until(Duration::from_secs(10), || healthy() == 0.0),
        "{}",
        s.log()
    );
    s.write_config(&template);
    s.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || healthy() == 1.0),
        "{}",
        s.log()
    );
    assert_eq!(get(&s.url("/")).0, 200);
}

#[test]
fn a_failed_upgrade_renames_the_oldbin_pid_file_back() {
    let template = "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 1\npid_file = \"{dir}/zc.pid\"\n\n[path_routes.\"127.0.0.1\".\"/\"]\npath = \"{dir}/www\"\n";
    let mut s = Server::prepare(template);
    s.write_file("www/index.html", b"x\n");
    // Started from a link that then disappears: the binary cannot be started again.
    let exe = s.path("zc-bin");
    std::fs::hard_link(BIN, &exe)
        .or_else(|_| std::fs::copy(BIN, &exe).map(|_| ()))
        .unwrap();
    let log = std::fs::File::create(&s.log_path).unwrap();
    let child = std::process::Command::new(&exe)
        .arg("-c")
        .arg(&s.config_path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    s.child = Some(child);
    s.wait_ready();
    let (pid_file, oldbin) = (s.path("zc.pid"), s.path("zc.pid.oldbin"));
    let old = s.pid();

    // 1. The new master cannot be started.
    std::fs::remove_file(&exe).unwrap();
    s.signal(libc::SIGUSR2);
    assert!(
        wait_until(Duration::from_secs(5), || s
            .log()
            .contains("binary upgrade failed")),
        "{}",
        s.log()
    );
    assert_eq!(read_pid(&pid_file), Some(old), "{}", s.log());
    assert!(!oldbin.exists());

    // 2. The new master starts and fails: its config no longer loads.
    std::fs::hard_link(BIN, &exe)
        .or_else(|_| std::fs::copy(BIN, &exe).map(|_| ()))
        .unwrap();
    std::fs::write(&s.config_path, "[server]\nthreads = \"many\"\n").unwrap();
    s.signal(libc::SIGUSR2);
    // The new master fails before or after taking the sockets: either way this one stays.
    assert!(
        wait_until(Duration::from_secs(10), || {
            let log = s.log();
            log.contains("exited; this master stays")
                || log.matches("binary upgrade failed").count() == 2
        }),
        "{}",
        s.log()
    );
    assert!(
        wait_until(Duration::from_secs(2), || read_pid(&pid_file) == Some(old)),
        "{}",
        s.log()
    );
    assert!(!oldbin.exists());
    assert_eq!(get(&s.url("/")), (200, "x\n".into()));
}
