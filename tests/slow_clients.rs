//! Slow and hostile clients (slowhttptest: slowloris, slow body, slow read) against two
//! workers: a normal client is answered within a second throughout.

mod common;
use common::backend::Backend;
use common::*;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Runs slowhttptest in `mode` against `url` for `secs` seconds while a normal client asks
/// for `/small` every 50 ms; returns the slowest answer and slowhttptest's output.
fn under_attack(
    s: &Server,
    mode: &str,
    url: &str,
    extra: &[&str],
    secs: u64,
) -> (Duration, String) {
    let secs_arg = secs.to_string();
    let mut args = vec![
        mode, "-c", "500", "-r", "250", "-i", "1", "-l", &secs_arg, "-p", "3", "-u", url,
    ];
    args.extend_from_slice(extra);
    let attack = Command::new("slowhttptest")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("slowhttptest (scripts/install-test-deps.sh installs it)");
    // Let the attack open its connections first.
    thread::sleep(Duration::from_secs(2));
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_idle_connections(0)
        .build();
    let mut slowest = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(secs.saturating_sub(3));
    let mut answered = 0;
    while Instant::now() < until {
        let began = Instant::now();
        let answer = get_with(&agent, &s.url("/small"));
        let took = began.elapsed();
        assert_eq!(
            answer,
            Ok((200, "small\n".to_string())),
            "{mode}: a normal request failed after {took:?}"
        );
        slowest = slowest.max(took);
        answered += 1;
        thread::sleep(Duration::from_millis(50));
    }
    let out = attack.wait_with_output().unwrap();
    assert!(answered > 20, "{mode}: only {answered} normal requests");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (slowest, text)
}

/// The last "connected: N" of slowhttptest's status reports (colour codes removed).
fn connected_at_end(report: &str) -> u32 {
    let mut plain = String::new();
    let mut chars = report.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
        .rsplit("connected:")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn slowloris_slow_body_and_slow_read_do_not_starve_a_normal_client() {
    // Slow bodies go to a proxied route, whose backend waits for them.
    let b = Backend::start("b1");
    let mut s = Server::prepare(&format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\nthreads = 2\n\n[path_routes.\"127.0.0.1\".\"/\"]\npath = \"{{dir}}/www\"\n\n[path_routes.\"127.0.0.1\".\"/upload\"]\ntype = \"Proxy\"\nurl = \"{}/upload\"\n",
        b.url()
    ));
    s.write_file("www/small", b"small\n");
    // Slow read makes the server queue what it can in each socket's send buffer, and a
    // 16-byte window makes the kernel cut it into tiny segments: on loopback (64 KiB MSS,
    // send buffers of megabytes) a few hundred sockets with 1 MiB each push the whole
    // machine into TCP memory pressure (`net.ipv4.tcp_mem`), which stalls every socket on
    // it, not just this server's. Measured: 600 × 1 MiB → 1.9 GB of socket memory and 2.8 s
    // stalls for any client; 500 × 64 KiB → 0.3 GB. The attack here is about the server.
    s.write_file("www/big.bin", &pattern(64 << 10, 5));
    s.spawn();
    s.wait_ready();
    let base = format!("http://127.0.0.1:{}", s.port);
    let modes: [(&str, String, &[&str]); 3] = [
        ("-H", format!("{base}/small"), &[]),
        ("-B", format!("{base}/upload"), &["-s", "65536"]),
        (
            "-X",
            format!("{base}/big.bin"),
            &["-k", "4", "-n", "1", "-w", "1", "-y", "64", "-z", "16"],
        ),
    ];
    for (mode, url, extra) in modes {
        let (slowest, report) = under_attack(&s, mode, &url, extra, 10);
        assert!(
            slowest < Duration::from_secs(1),
            "{mode}: a normal request took {slowest:?}\n{report}"
        );
        // The attack really held its connections open to the end.
        let held = connected_at_end(&report);
        assert!(
            held >= 250,
            "{mode}: slowhttptest held only {held} connections:\n{report}"
        );
        println!("{mode}: slowest normal answer {slowest:?}");
    }
    // Every worker is still the one that started: none died under the attack.
    assert_eq!(s.workers().len(), 2);
}
