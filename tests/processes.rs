//! Process model: one root master, unprivileged pinned workers, CBPF steering, respawn.

mod common;
use common::*;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const TWO_WORKERS_AS_NOBODY: &str = r#"
[server]
listen = "127.0.0.1:{port}"
threads = 2

[security]
drop_privileges_user = "nobody"

[performance]
reuseport_balancing = "cbpf"

[path_routes."127.0.0.1"."/"]
path = "{dir}/www"
"#;

fn start_two_workers() -> Server {
    let mut s = Server::prepare(TWO_WORKERS_AS_NOBODY);
    s.write_file("www/index.html", b"hello from nobody\n");
    s.spawn();
    s.wait_ready();
    s
}

#[test]
fn one_root_master_and_two_pinned_workers_running_as_nobody() {
    let s = start_two_workers();
    let master = s.pid();
    let workers = s.workers();
    assert_eq!(workers.len(), 2, "workers: {workers:?}\n{}", s.log());
    assert_eq!(
        proc_status(master, "Uid")
            .unwrap()
            .split_whitespace()
            .next(),
        Some("0")
    );
    assert_eq!(
        proc_status(master, "Threads").as_deref(),
        Some("1"),
        "the master must not own threads"
    );
    let mut cores = Vec::new();
    for w in &workers {
        let uids: Vec<_> = proc_status(*w, "Uid")
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect();
        assert!(
            uids.iter().all(|u| u == "65534"),
            "worker {w} uids {uids:?}"
        );
        let gids: Vec<_> = proc_status(*w, "Gid")
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect();
        assert!(
            gids.iter().all(|g| g == "65534"),
            "worker {w} gids {gids:?}"
        );
        let allowed = proc_status(*w, "Cpus_allowed_list").unwrap();
        assert!(
            allowed.parse::<usize>().is_ok(),
            "worker {w} is not pinned to one core: {allowed}"
        );
        cores.push(allowed);
        assert!(children_of(*w).is_empty(), "a worker has no children");
    }
    let ncpu = std::thread::available_parallelism().unwrap().get();
    if ncpu >= 2 {
        assert_ne!(cores[0], cores[1], "each worker on its own core");
    }
    // The unprivileged workers serve the files.
    let (status, body) = get(&s.url("/"));
    assert_eq!((status, body.as_str()), (200, "hello from nobody\n"));
}

/// Per-worker request counts from `/__metrics`.
fn per_worker(s: &Server) -> [f64; 2] {
    let m = s.metrics();
    [
        metric(
            &m,
            "zerocopy_proxy_worker_requests_total",
            &["worker=\"0\""],
        ),
        metric(
            &m,
            "zerocopy_proxy_worker_requests_total",
            &["worker=\"1\""],
        ),
    ]
}

fn client_addresses() -> Vec<Ipv4Addr> {
    (0..64u32)
        .map(|i| {
            Ipv4Addr::new(
                127,
                (10 + i * 37 % 200) as u8,
                (i * 11 % 250 + 1) as u8,
                (i * 53 % 250 + 1) as u8,
            )
        })
        .collect()
}

/// Sends 3 requests, each on its own connection (so from 3 source ports), from `ip`;
/// returns the worker that served all three, or panics if they were split.
fn worker_of(s: &Server, ip: Ipv4Addr) -> usize {
    let before = per_worker(s);
    for _ in 0..3 {
        assert_eq!(get_on(connect_from(ip, s.addr()), "/"), 200);
    }
    let after = per_worker(s);
    let delta = [after[0] - before[0], after[1] - before[1]];
    // The scrape itself adds at most one request to one worker.
    match delta {
        [d0, d1] if d0 >= 3.0 && d1 <= 1.0 => 0,
        [d0, d1] if d1 >= 3.0 && d0 <= 1.0 => 1,
        _ => panic!("requests from {ip} were split over workers: {delta:?}"),
    }
}

#[test]
fn cbpf_sends_each_client_address_to_one_worker_and_spreads_addresses() {
    let s = start_two_workers();
    assert!(s.log().contains("client-IP steering (cbpf)"), "{}", s.log());
    let mut per = [0usize; 2];
    let mut seen = std::collections::HashMap::new();
    for ip in client_addresses() {
        let w = worker_of(&s, ip);
        per[w] += 1;
        seen.insert(ip, w);
    }
    assert!(per[0] >= 8 && per[1] >= 8, "64 addresses spread as {per:?}");
    // A second pass: every address still lands on the same worker.
    for (ip, w) in seen {
        assert_eq!(worker_of(&s, ip), w, "{ip} moved");
    }
}

fn sample_lines(metrics: &str, name: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| {
            l.rsplit_once(' ')
                .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        })
        .collect()
}

/// The worker index a pid serves as, from its "serving" log line.
fn index_of(s: &Server, pid: i32) -> usize {
    wait_until(Duration::from_secs(3), || {
        s.log().contains(&format!("serving (pid {pid},"))
    });
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("serving (pid {pid},")))
        .unwrap_or_else(|| panic!("no serving line for {pid}:\n{log}"));
    let i = line.find("[worker ").unwrap() + 8;
    line[i..].split(']').next().unwrap().parse().unwrap()
}

#[test]
fn a_killed_worker_is_replaced_within_a_second_and_counters_do_not_go_back() {
    let s = start_two_workers();
    // Traffic on both workers, and an address known to land on each.
    let mut addr_of = [None, None];
    for ip in client_addresses() {
        let w = worker_of(&s, ip);
        addr_of[w].get_or_insert(ip);
        if addr_of.iter().all(Option::is_some) {
            break;
        }
    }
    let before = s.metrics();
    let victim = s.workers()[0];
    let index = index_of(&s, victim);
    let ip = addr_of[index].unwrap();

    let killed = Instant::now();
    // SAFETY: kill(2) takes plain values and touches no memory of ours.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    // Once the victim is gone, a connection waits in the accept queue that the master keeps
    // open, and is answered by the replacement in the same slot. (A connection the kernel
    // hands to a process in the instant it is being killed dies with it, as with nginx.)
    assert!(wait_until(Duration::from_millis(500), || !alive(victim)));
    assert_eq!(get_on(connect_from(ip, s.addr()), "/"), 200);
    let answered = killed.elapsed();
    assert!(
        answered < Duration::from_secs(1),
        "replacement answered after {answered:?}"
    );
    let workers = s.workers();
    assert_eq!(workers.len(), 2);
    assert!(!workers.contains(&victim));
    assert!(
        s.log().contains(&format!(
            "worker {index} (pid {victim}) died (signal SIGKILL); respawning"
        )),
        "{}",
        s.log()
    );

    let after = s.metrics();
    for name in [
        "zerocopy_proxy_http_requests_total",
        "zerocopy_proxy_worker_requests_total",
        "zerocopy_proxy_http_request_duration_seconds_count",
    ] {
        let after_samples = sample_lines(&after, name);
        for (key, old) in sample_lines(&before, name) {
            let new = after_samples
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| *v)
                .unwrap_or(0.0);
            assert!(new >= old, "{key} went back from {old} to {new}");
        }
    }
    assert_eq!(
        metric(&after, "zerocopy_proxy_worker_restarts_total", &[]),
        1.0
    );
    assert_eq!(
        worker_of(&s, ip),
        index,
        "the replacement serves the same slot"
    );
}
