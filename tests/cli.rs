//! The command line: -t, -T, -s, -V, and the built-in default.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

fn run(args: &[&str], dir: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_a_good_config() {
    let s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\n\n[path_routes.\"example.com\".\"/\"]\npath = \"{dir}\"\n");
    let (code, _, err) = run(&["-t", "-c", s.config_path.to_str().unwrap()], s.dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("is valid"), "{err}");
}

#[test]
fn check_reports_every_error_with_file_and_key() {
    let s = Server::prepare(
        r#"
[server]
listen = "not-an-address"

[logging]
level = "loud"

[security]
drop_privileges_user = "no-such-user-zc"
drop_privileges_group = "no-such-group-zc"

[tls]
cert_path = "{dir}/missing.crt"
key_path = "{dir}/missing.key"

[path_routes."example.com"."/both"]
type = "Proxy"
url = "http://localhost:8080"
upstream = "pool"

[path_routes."example.com"."/neither"]
type = "Proxy"

[path_routes."example.com"."/undefined"]
type = "Proxy"
upstream = "nope"

[path_routes."example.com"."/badurl"]
type = "Proxy"
url = "invalid-url"

[path_routes."example.com"."/redir"]
type = "Redirect"
redirect_url = "https://example.com"
redirect_status = 200

[path_routes."example.com"."/files"]
path = "/does/not/exist"
mode = "sendfile"

[path_routes."example.com"."/ips"]
path = "{dir}"
  [path_routes."example.com"."/ips".security]
  allowed_ips = ["10.0.0.0/33", "not-an-ip"]
  allowed_methods = ["GET", "get me"]
  send_timeout_secs = 0
  backend_read_timeout_secs = 99999999999

[upstreams."pool"]
servers = ["http://127.0.0.1:1", "ftp://nope"]
"#,
    );
    let cfg = s.config_path.to_str().unwrap().to_string();
    let (code, _, err) = run(&["-t", "-c", &cfg], s.dir.path());
    assert_eq!(code, 1, "{err}");
    for expected in [
        "`server.listen`: invalid socket address: not-an-address",
        "`logging.level`: invalid log level `loud`",
        "`tls.cert_path`: TLS certificate file not found",
        "`tls.key_path`: TLS private key file not found",
        "`path_routes.\"example.com\".\"/both\"`: a Proxy route takes `url` or `upstream`, not both",
        "`path_routes.\"example.com\".\"/neither\"`: a Proxy route needs `url` or `upstream`",
        "`path_routes.\"example.com\".\"/undefined\".upstream`: upstream `nope` not found",
        "`path_routes.\"example.com\".\"/badurl\".url`: invalid proxy URL `invalid-url`",
        "`path_routes.\"example.com\".\"/redir\".redirect_status`: 200 is not one of 301, 302, 303, 307, 308",
        "`path_routes.\"example.com\".\"/files\".path`: file or directory not found: /does/not/exist",
        "`path_routes.\"example.com\".\"/ips\".security.allowed_ips`: invalid IP address or CIDR `10.0.0.0/33`",
        "invalid IP address or CIDR `not-an-ip`",
        "`path_routes.\"example.com\".\"/ips\".security.allowed_methods`: invalid HTTP method `get me`",
        "`upstreams.\"pool\".servers`: invalid upstream URL `ftp://nope`",
        "`path_routes.\"example.com\".\"/ips\".security.send_timeout_secs`: must be at least 1",
        "`path_routes.\"example.com\".\"/ips\".security.backend_read_timeout_secs`: must be at most one year",
        "`security.drop_privileges_user`: unknown user `no-such-user-zc`",
        "`security.drop_privileges_group`: unknown group `no-such-group-zc`",
        // Semantic errors carry the line of their key too.
        "config.toml:3: `server.listen`",
        "config.toml:30: `path_routes.\"example.com\".\"/badurl\".url`",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(
        err.lines()
            .filter(|l| l.starts_with("error: "))
            .all(|l| l.contains(&cfg)),
        "every error names the file:\n{err}"
    );
}

#[test]
fn unknown_keys_and_syntax_errors_name_key_and_line() {
    // Every unknown key at once, each with its line.
    let s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\nthreds = 2\n\n[logging]\nlevle = \"info\"\n\n[path_routes.\"a\".\"/x\"]\npath = \"/tmp\"\ncolour = \"red\"\n\n[bogus]\n");
    let (code, _, err) = run(&["-t", "-c", s.config_path.to_str().unwrap()], s.dir.path());
    assert_eq!(code, 1);
    for expected in [
        "config.toml:3: `server.threds`: unknown field `threds`",
        "config.toml:6: `logging.levle`: unknown field `levle`",
        "config.toml:10: `path_routes.a.\"/x\".colour`: unknown field `colour`",
        "config.toml:12: `bogus`: unknown section `bogus`",
        "(4 errors)",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }

    let s = Server::prepare("[path_routes.\"a\".\"/\"]\npath = \"/tmp\"\nmode = \"mmap\"\n");
    let (code, _, err) = run(&["-t", "-c", s.config_path.to_str().unwrap()], s.dir.path());
    assert_eq!(code, 1);
    assert!(
        err.contains("config.toml:3:") && err.contains("mmap"),
        "{err}"
    );

    let s = Server::prepare("[server\nlisten = 1\n");
    let (code, _, err) = run(&["-t", "-c", s.config_path.to_str().unwrap()], s.dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("config.toml:1:"), "{err}");

    // A bad config never starts a server.
    let (code, _, err) = run(&["-c", s.config_path.to_str().unwrap()], s.dir.path());
    assert_eq!(code, 1, "{err}");
}

/// Issue 9, item 5: keys inside `[[tls.certificates]]` are named with the entry's index (they
/// were named `tls..certificates`).
#[test]
fn keys_in_tls_certificates_are_named_with_their_index() {
    let head = "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[tls]\ncert_path = \"{dir}/d.crt\"\nkey_path = \"{dir}/d.key\"\n\n[[tls.certificates]]\ncert_path = \"{dir}/a.crt\"\nkey_path = \"{dir}/a.key\"\n\n[[tls.certificates]]\n";
    // Line 13 is the second entry's first key.
    let s = Server::prepare(&format!(
        "{head}cert_path = \"{{dir}}/b.crt\"\nkey_pth = \"{{dir}}/b.key\"\n"
    ));
    let (code, _, err) = run(&["-t", "-c", s.config_path.to_str().unwrap()], s.dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("config.toml:14: `tls.certificates[1].key_pth`: unknown field `key_pth`"),
        "{err}"
    );
    // The same key in an inline table.
    let s = Server::prepare("[tls]\ncert_path = \"d\"\nkey_path = \"d\"\ncertificates = [{ cert_path = \"a\", key_path = \"a\", x = 1 }]\n");
    let (code, _, err) = run(&["-t", "-c", s.config_path.to_str().unwrap()], s.dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("config.toml:4: `tls.certificates[0].x`: unknown field `x`"),
        "{err}"
    );
    // Semantic errors carry the index and the line of their key too.
    let s = Server::prepare(&format!(
        "{head}cert_path = \"{{dir}}/b.crt\"\nkey_path = \"{{dir}}/b.key\"\n"
    ));
    for f in ["d.crt", "d.key", "a.crt", "a.key", "b.crt"] {
        s.write_file(f, b"");
    }
    let (code, _, err) = run(&["-t", "-c", s.config_path.to_str().unwrap()], s.dir.path());
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "config.toml:14: `tls.certificates[1].key_path`: TLS private key file not found"
        ),
        "{err}"
    );
}

#[test]
fn print_shows_the_effective_config_with_defaults() {
    let s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\n\n[path_routes.\"example.com\".\"/\"]\npath = \"{dir}\"\n");
    let (code, out, err) = run(&["-T", "-c", s.config_path.to_str().unwrap()], s.dir.path());
    assert_eq!(code, 0, "{err}");
    for expected in [
        "shutdown_timeout_secs = 30",
        "reuseport_balancing = \"kernel\"",
        "level = \"info\"",
        "channel_size = 100000",
        "max_request_body_size = 10485760",
        "max_request_header_size = 8192",
        "websocket_poll_mode = \"adaptive\"",
        "websocket_poll_backoff_multiplier = 2.0",
        "send_timeout_secs = 60",
        "backend_read_timeout_secs = 60",
        "backend_send_timeout_secs = 60",
        "websocket_idle_timeout_secs = 3600",
        "type = \"File\"",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    // What -T prints is itself a valid config.
    let printed = s.path("printed.toml");
    std::fs::write(&printed, out).unwrap();
    let (code, _, err) = run(&["-t", "-c", printed.to_str().unwrap()], s.dir.path());
    assert_eq!(code, 0, "{err}");
}

#[test]
fn version_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, _) = run(&["-V"], dir.path());
    assert_eq!(code, 0);
    assert!(out.starts_with("zerocopy-server "));
    let (code, out, _) = run(&["-h"], dir.path());
    assert_eq!(code, 0);
    assert!(out.contains("-s SIGNAL"));
    let (code, _, err) = run(&["-x"], dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("-x"), "{err}");
}

#[test]
fn signal_option_reloads_and_quits_through_the_pid_file() {
    let template = "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 1\npid_file = \"{dir}/z.pid\"\n\n[path_routes.\"127.0.0.1\".\"/{route}\"]\npath = \"{dir}/f.txt\"\n";
    let mut s = Server::prepare(&template.replace("{route}", "one"));
    s.write_file("f.txt", b"f\n");
    s.spawn();
    s.wait_ready();
    let cfg = s.config_path.to_str().unwrap().to_string();
    assert_eq!(get(&s.url("/one")).0, 200);
    s.write_config(&template.replace("{route}", "two"));
    let (code, _, err) = run(&["-c", &cfg, "-s", "reload"], s.dir.path());
    assert_eq!(code, 0, "{err}");
    assert!(
        wait_until(Duration::from_secs(10), || get(&s.url("/two")).0 == 200),
        "{}",
        s.log()
    );
    let (code, _, err) = run(&["-c", &cfg, "-s", "quit"], s.dir.path());
    assert_eq!(code, 0, "{err}");
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!s.path("z.pid").exists());
    let (code, _, err) = run(&["-c", &cfg, "-s", "reload"], s.dir.path());
    assert_eq!(code, 1, "no master left: {err}");
    let (code, _, err) = run(&["-c", &cfg, "-s", "restart"], s.dir.path());
    assert_eq!(code, 1);
    assert!(err.contains("unknown signal"), "{err}");
}

/// The built-in default binds 127.0.0.1:8080; it runs in a private network namespace so the
/// test uses no shared fixed port.
#[test]
fn builtin_default_serves_welcome_page_and_metrics_without_a_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        r#"
set -e
ip link set lo up
cd {dir}
{bin} > server.log 2>&1 &
pid=$!
for i in $(seq 1 100); do curl -sf -o /dev/null http://127.0.0.1:8080/ && break; sleep 0.05; done
curl -s -i http://127.0.0.1:8080/ > welcome.txt
curl -s http://127.0.0.1:8080/__metrics > metrics.txt
curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:8080/nothing-here > missing.txt
kill -TERM $pid
wait $pid
"#,
        dir = dir.path().display(),
        bin = BIN
    );
    let out = Command::new("unshare")
        .args(["--net", "--", "sh", "-c", &script])
        .output()
        .unwrap();
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        read("server.log")
    );
    let welcome = read("welcome.txt");
    assert!(welcome.starts_with("HTTP/1.1 200"), "{welcome}");
    assert!(welcome.contains("zerocopy-server is running"), "{welcome}");
    assert!(
        read("metrics.txt").contains(
            "zerocopy_proxy_http_requests_total{host=\"other\",method=\"GET\",status=\"200\"} 2"
        ),
        "the readiness probe and the page: {}",
        read("metrics.txt")
    );
    assert_eq!(read("missing.txt"), "404");
    assert!(
        read("server.log")
            .contains("no config file: serving the built-in default on http://127.0.0.1:8080/"),
        "{}",
        read("server.log")
    );
}

#[test]
fn a_first_generation_that_cannot_start_ends_the_master_with_an_error() {
    // Validation passes (the path exists) but no worker can read it: the worker fails to
    // build its routes, and a master with no generation left exits non-zero.
    let s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 1\n\n[path_routes.\"*\".\"/m\"]\npath = \"/proc/1/mem\"\nmode = \"memory\"\n");
    let out = Command::new("timeout")
        .args(["30", BIN, "-c", s.config_path.to_str().unwrap()])
        .current_dir(s.dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot build the routes: /proc/1/mem"),
        "{err}"
    );
    assert!(
        err.contains("no generation of workers is left to serve"),
        "{err}"
    );
}

/// A timeout too long to be a deadline (`Instant + Duration` would panic in a worker at the
/// first request head that arrives in two reads) is refused by `-t` and never starts.
#[test]
fn timeouts_longer_than_a_year_are_config_errors() {
    let s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\nclient_header_timeout_secs = 9223372036854775807\n\n[path_routes.\"*\".\"/\"]\npath = \"{dir}\"\n  [path_routes.\"*\".\"/\".security]\n  client_body_timeout_secs = 31536001\n");
    let cfg = s.config_path.to_str().unwrap().to_string();
    let (code, _, err) = run(&["-t", "-c", &cfg], s.dir.path());
    assert_eq!(code, 1, "{err}");
    for expected in [
        "config.toml:3: `server.client_header_timeout_secs`: must be at most one year",
        "config.toml:8: `path_routes.\"*\".\"/\".security.client_body_timeout_secs`: must be at most one year",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    let s = Server::prepare("[server]\nlisten = \"127.0.0.1:{port}\"\nclient_header_timeout_secs = 31536000\n\n[path_routes.\"*\".\"/\"]\npath = \"{dir}\"\n");
    let (code, _, err) = run(&["-t", "-c", s.config_path.to_str().unwrap()], s.dir.path());
    assert_eq!(code, 0, "a year is still valid: {err}");
}
