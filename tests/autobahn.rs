//! The Autobahn WebSocket fuzzing-client cases (kosoku, installed by
//! scripts/install-test-deps.sh) against an echo server, directly and through the proxy:
//! the proxy must add no failure.

mod common;
use common::*;
use std::process::Command;

#[test]
fn autobahn_cases_pass_through_the_proxy_as_they_do_directly() {
    let echo = ws_echo_server();
    let s = Server::start(&format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\nthreads = 2\n\n[path_routes.\"*\".\"/\"]\ntype = \"Proxy\"\nurl = \"http://127.0.0.1:{echo}\"\n  [path_routes.\"*\".\"/\".security]\n  max_request_body_size = 67108864\n"
    ));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/autobahn.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("ws://127.0.0.1:{echo}"))
        .arg(format!("ws://127.0.0.1:{}", s.port))
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "autobahn through the proxy ({}):\n{stdout}\n{stderr}\n{}",
        out.status,
        s.log()
    );
    assert!(stdout.contains("the proxy adds no failure"));
}
