//! Generations: reload under load, a broken reload, graceful quit.

mod common;
use common::*;
use std::thread;
use std::time::{Duration, Instant};

const SHUTDOWN_TIMEOUT: u64 = 20;

fn config(route: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{{port}}"
threads = 2
pid_file = "{{dir}}/zerocopy.pid"
shutdown_timeout_secs = {SHUTDOWN_TIMEOUT}

[path_routes."127.0.0.1"."/common"]
path = "{{dir}}/common.txt"

[path_routes."127.0.0.1"."/{route}"]
path = "{{dir}}/{route}.txt"

[path_routes."127.0.0.1"."/big"]
path = "{{dir}}/big.bin"
"#
    )
}

const BIG: usize = 24 * 1024 * 1024;

fn start() -> Server {
    let mut s = Server::prepare(&config("a"));
    s.write_file("common.txt", b"common\n");
    s.write_file("a.txt", b"route a\n");
    s.write_file("b.txt", b"route b\n");
    s.write_file("big.bin", &pattern(BIG, 7));
    s.spawn();
    s.wait_ready();
    s
}

#[test]
fn ten_reloads_under_load_lose_no_request() {
    let s = start();
    let load = Load::start(
        s.url("/common"),
        None,
        Some("common\n"),
        &[true, true, false, false],
    );
    let download = slow_download(&s, BIG, Duration::from_millis(40));
    let metrics_before = metric(&s.metrics(), "zerocopy_proxy_http_requests_total", &[]);

    let mut old_generations = Vec::new();
    for i in 0..10 {
        let (new_route, old_route) = if i % 2 == 0 { ("b", "a") } else { ("a", "b") };
        let before = s.workers();
        s.write_config(&config(new_route));
        let sent = Instant::now();
        s.signal(libc::SIGHUP);
        let switched = wait_until(Duration::from_secs(10), || {
            get(&s.url(&format!("/{new_route}"))) == (200, format!("route {new_route}\n"))
                && get(&s.url(&format!("/{old_route}"))).0 == 404
        });
        assert!(
            switched,
            "reload {i}: new routes do not answer\n{}",
            s.log()
        );
        old_generations.push((sent, before));
        thread::sleep(Duration::from_millis(300));
    }
    // Old workers are gone within shutdown_timeout_secs of their drain (the slow download
    // keeps one of them for a few seconds).
    for (sent, pids) in &old_generations {
        let deadline = *sent + Duration::from_secs(SHUTDOWN_TIMEOUT);
        let gone = wait_until(deadline.saturating_duration_since(Instant::now()), || {
            pids.iter().all(|p| !alive(*p))
        });
        assert!(
            gone,
            "old workers {pids:?} still alive {SHUTDOWN_TIMEOUT}s after the reload"
        );
    }
    let (ok, failures) = load.finish();
    let body = download.join().unwrap();
    assert!(
        body == pattern(BIG, 7),
        "the download that spanned the reloads is not byte-exact"
    );

    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 500, "only {ok} requests made");
    assert_eq!(
        s.workers().len(),
        2,
        "exactly the current generation is left"
    );
    let metrics_after = metric(&s.metrics(), "zerocopy_proxy_http_requests_total", &[]);
    assert!(
        metrics_after >= metrics_before + ok as f64,
        "counters went back: {metrics_before} + {ok} > {metrics_after}"
    );
}

#[test]
fn a_broken_reload_keeps_the_running_generation() {
    let s = start();
    let workers = s.workers();
    std::fs::write(&s.config_path, "[server]\nlisten = \"127.0.0.1:1\"\nthreads = 2\n\n[path_routes.\"127.0.0.1\".\"/x\"]\ntype = \"Redirect\"\nredirect_url = \"https://example.com\"\nredirect_status = 399\n").unwrap();
    s.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || s
            .log()
            .contains("reload aborted")),
        "{}",
        s.log()
    );
    let log = s.log();
    assert!(
        log.contains("redirect_status"),
        "the log names the key: {log}"
    );
    assert!(
        log.contains("399 is not one of 301, 302, 303, 307, 308"),
        "{log}"
    );
    assert_eq!(s.workers(), workers, "the running workers are untouched");
    assert_eq!(get(&s.url("/a")), (200, "route a\n".to_string()));
    // A good config afterwards is picked up.
    s.write_config(&config("b"));
    s.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || get(&s.url("/b")).0 == 200));
}

#[test]
fn quit_finishes_a_slow_download_then_exits_and_removes_the_pid_file() {
    let mut s = start();
    let pid_file = s.path("zerocopy.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        s.pid().to_string()
    );
    let workers = s.workers();
    let download = slow_download(&s, BIG, Duration::from_millis(15));
    thread::sleep(Duration::from_millis(300));
    s.signal(libc::SIGQUIT);
    // New connections are no longer taken once the workers drain.
    let code = s.wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT));
    let body = download.join().unwrap();
    assert!(body == pattern(BIG, 7), "download not byte-exact");
    assert_eq!(code, Some(0), "{}", s.log());
    assert!(workers.iter().all(|p| !alive(*p)), "workers left behind");
    assert!(!pid_file.exists(), "pid file left behind");
    assert!(
        std::net::TcpStream::connect(s.addr()).is_err(),
        "still listening"
    );
}

#[test]
fn term_with_nothing_in_flight_exits_promptly() {
    let mut s = start();
    let workers = s.workers();
    s.signal(libc::SIGTERM);
    assert_eq!(s.wait_exit(Duration::from_secs(5)), Some(0), "{}", s.log());
    assert!(wait_until(Duration::from_secs(2), || workers
        .iter()
        .all(|p| !alive(*p))));
    assert!(!s.path("zerocopy.pid").exists());
}

#[test]
fn usr1_reopens_the_log_files_for_logrotate() {
    let mut s = Server::prepare(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 2\n\n[logging]\nfile_path = \"{dir}/zc.log\"\nflush_interval_ms = 100\n\n[security]\ndrop_privileges_user = \"nobody\"\n\n[path_routes.\"127.0.0.1\".\"/\"]\npath = \"{dir}/www\"\n",
    );
    s.write_file("www/index.html", b"x\n");
    s.spawn();
    s.wait_ready();
    let log = s.path("zc.log");
    let rotated = s.path("zc.log.1");
    assert!(wait_until(Duration::from_secs(3), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("serving (pid")
    }));
    std::fs::rename(&log, &rotated).unwrap();
    s.signal(libc::SIGUSR1);
    let reopened = wait_until(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("[master] USR1: log file reopened")
            && text.matches("] log file reopened").count() >= 2
    });
    assert!(
        reopened,
        "new log:\n{}\nold log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default(),
        std::fs::read_to_string(&rotated).unwrap_or_default()
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&log).unwrap().uid(),
        65534,
        "handed to the workers' user"
    );
    // Workers keep logging into the new file, not the rotated one.
    let before = std::fs::metadata(&rotated).unwrap().len();
    s.signal(libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("generation 2: serving")
    }));
    assert_eq!(
        std::fs::metadata(&rotated).unwrap().len(),
        before,
        "the rotated file was written to"
    );
}
