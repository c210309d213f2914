//! Upstream pools: balancing, failover when a server dies, active health checks.

mod common;
use common::backend::Backend;
use common::*;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn pool_config(algorithm: &str, backends: &[&Backend], extra: &str) -> String {
    let servers: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{}\"", b.url()))
        .collect();
    format!(
        r#"
[server]
listen = "127.0.0.1:{{port}}"
threads = 2

[path_routes."t"."/"]
type = "Proxy"
upstream = "pool"

[upstreams."pool"]
algorithm = "{algorithm}"
servers = [{}]
{extra}
"#,
        servers.join(", ")
    )
}

/// `backend=ID` from an echo response.
fn backend_of(body: &str) -> String {
    body.lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("backend=")
        .to_string()
}

fn get_from(s: &Server, ip: Ipv4Addr, path: &str) -> (u16, String) {
    let mut c = connect_from(ip, s.addr());
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        text.split_once("\r\n\r\n")
            .map(|x| x.1.to_string())
            .unwrap_or_default(),
    )
}

#[test]
fn round_robin_spreads_evenly() {
    let bs: Vec<Backend> = (0..3).map(|i| Backend::start(&format!("rr{i}"))).collect();
    let s = Server::start(&pool_config(
        "round_robin",
        &bs.iter().collect::<Vec<_>>(),
        "",
    ));
    let agent = ureq::AgentBuilder::new().build();
    for _ in 0..300 {
        assert_eq!(
            agent
                .get(&s.url("/x"))
                .set("Host", "t")
                .call()
                .unwrap()
                .status(),
            200
        );
    }
    let counts: Vec<usize> = bs
        .iter()
        .map(|b| b.requests.load(Ordering::SeqCst))
        .collect();
    assert!(
        counts.iter().all(|c| (90..=110).contains(c)),
        "300 requests spread as {counts:?}"
    );
}

#[test]
fn ip_hash_keeps_each_client_on_one_server_across_workers() {
    let bs: Vec<Backend> = (0..3).map(|i| Backend::start(&format!("ih{i}"))).collect();
    // The kernel's hash spreads one client's connections over both workers.
    let s = Server::start(&pool_config("ip_hash", &bs.iter().collect::<Vec<_>>(), ""));
    let mut used = HashSet::new();
    for i in 0..50u8 {
        let ip = Ipv4Addr::new(127, 3, i / 7, i + 1);
        let seen: HashSet<String> = (0..4)
            .map(|_| backend_of(&get_from(&s, ip, "/who").1))
            .collect();
        assert_eq!(seen.len(), 1, "{ip} reached {seen:?}");
        used.extend(seen);
    }
    assert!(used.len() >= 2, "50 addresses all hashed to {used:?}");
}

#[test]
fn least_conn_prefers_the_server_without_long_requests() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let s = Server::start(&pool_config("least_conn", &[&a, &b], ""));
    let addr = s.addr();
    let slow = std::thread::spawn(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(
            c,
            "GET /slow?ms=3000 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text.rsplit("\r\n\r\n").next().unwrap().to_string()
    });
    std::thread::sleep(Duration::from_millis(400));
    // Quick requests from many addresses, so both workers take some: all avoid the busy server.
    let quick: HashSet<String> = (0..20u8)
        .map(|i| backend_of(&get_from(&s, Ipv4Addr::new(127, 4, 0, i + 1), "/q").1))
        .collect();
    let busy = slow.join().unwrap();
    assert_eq!(quick.len(), 1, "quick requests went to {quick:?}");
    assert!(
        !quick.contains(&busy),
        "quick requests went to the busy server {busy}"
    );
}

#[test]
fn a_killed_server_causes_no_client_error_and_health_checks_follow_it() {
    let bs: Vec<Backend> = (0..3).map(|i| Backend::start(&format!("k{i}"))).collect();
    let health = "\n  [upstreams.\"pool\".health_check]\n  interval_secs = 1\n  timeout_secs = 1\n  path = \"/health\"\n  unhealthy_threshold = 2\n  healthy_threshold = 2\n";
    let s = Server::start(&pool_config(
        "round_robin",
        &bs.iter().collect::<Vec<_>>(),
        health,
    ));
    let victim = &bs[1];
    let label = format!("server=\"{}\"", victim.url());
    assert!(wait_until(Duration::from_secs(5), || metric(
        &s.metrics(),
        "zerocopy_proxy_upstream_healthy",
        &[&label]
    ) == 1.0));

    let load = Load::start(s.url("/load"), Some("t"), None, &[true, false, true, false]);
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    victim.stop();
    // Down within unhealthy_threshold (2) intervals of 1 s, plus a check's timeout.
    let marked = wait_until(Duration::from_secs(5), || {
        s.log().contains(&format!(
            "Upstream 127.0.0.1:{} is now unhealthy",
            victim.port
        ))
    });
    assert!(marked, "{}", s.log());
    let down_after = killed.elapsed();
    assert!(
        down_after <= Duration::from_millis(3500),
        "marked down after {down_after:?}"
    );
    assert_eq!(
        metric(&s.metrics(), "zerocopy_proxy_upstream_healthy", &[&label]),
        0.0
    );
    std::thread::sleep(Duration::from_secs(1));
    let (ok, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} client errors after the kill: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 200);
    // Until the checks caught up, requests that met the dead server failed over: counted.
    assert!(
        metric(
            &s.metrics(),
            "zerocopy_proxy_upstream_connect_failures_total",
            &[&label]
        ) >= 1.0
    );

    // Back up after healthy_threshold (2) good checks.
    let revived = Backend::start_with("k1-again", victim.port, None);
    let back = Instant::now();
    let healthy = wait_until(Duration::from_secs(5), || {
        s.log().contains(&format!(
            "Upstream 127.0.0.1:{} is now healthy",
            victim.port
        ))
    });
    assert!(healthy, "{}", s.log());
    assert!(
        back.elapsed() <= Duration::from_millis(3500),
        "marked up after {:?}",
        back.elapsed()
    );
    assert_eq!(
        metric(&s.metrics(), "zerocopy_proxy_upstream_healthy", &[&label]),
        1.0
    );
    let agent = ureq::AgentBuilder::new().build();
    let ids: HashSet<String> = (0..9)
        .map(|_| {
            backend_of(
                &agent
                    .get(&s.url("/x"))
                    .set("Host", "t")
                    .call()
                    .unwrap()
                    .into_string()
                    .unwrap(),
            )
        })
        .collect();
    assert!(
        ids.contains("k1-again"),
        "the revived server takes requests again: {ids:?}"
    );
    drop(revived);
}

#[test]
fn all_servers_unhealthy_is_503_at_once() {
    let b = Backend::start("sick");
    let health = "\n  [upstreams.\"pool\".health_check]\n  interval_secs = 1\n  path = \"/health\"\n  unhealthy_threshold = 1\n  healthy_threshold = 1\n  healthy_statuses = [200]\n";
    let s = Server::start(&pool_config("round_robin", &[&b], health));
    b.healthy.store(false, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(4), || s
            .log()
            .contains("is now unhealthy")),
        "{}",
        s.log()
    );
    let before = b.requests.load(Ordering::SeqCst);
    let t = Instant::now();
    let (status, _) = get_from(&s, Ipv4Addr::LOCALHOST, "/x");
    assert_eq!(status, 503);
    assert!(t.elapsed() < Duration::from_millis(500));
    // The request never reached the sick server (health checks may have).
    let reached = b.requests.load(Ordering::SeqCst) - before;
    assert!(reached <= 1, "{reached}");
    b.healthy.store(true, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(4), || get_from(
        &s,
        Ipv4Addr::LOCALHOST,
        "/x"
    )
    .0 == 200));
}

#[test]
fn health_checks_reach_https_servers_with_sni() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, ca) = test_pki(dir.path());
    let b = Backend::start_tls("tls", tls);
    let s = Server::start(&format!(
        r#"
[server]
listen = "127.0.0.1:{{port}}"

[path_routes."t"."/"]
type = "Proxy"
upstream = "secure"

[upstreams."secure"]
ca_file = "{}"
servers = [{{ url = "https://127.0.0.1:{}", sni_name = "backend.test" }}]

  [upstreams."secure".health_check]
  interval_secs = 1
  path = "/health"
  unhealthy_threshold = 1
  healthy_threshold = 1
"#,
        ca.display(),
        b.port
    ));
    let healthy = || {
        metric(
            &s.metrics(),
            "zerocopy_proxy_upstream_healthy",
            &["upstream=\"secure\""],
        )
    };
    // Down when the server says so, up again when it recovers: the checks get through TLS.
    b.healthy.store(false, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(5), || healthy() == 0.0),
        "{}",
        s.log()
    );
    b.healthy.store(true, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(5), || healthy() == 1.0),
        "{}",
        s.log()
    );
    assert!(b.sni.lock().unwrap().iter().all(|n| n == "backend.test"));
    let line = format!("Upstream 127.0.0.1:{} is now healthy", b.port);
    assert!(
        wait_until(Duration::from_secs(3), || s.log().contains(&line)),
        "{}",
        s.log()
    );
}
