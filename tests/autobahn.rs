//! The Autobahn WebSocket fuzzing-client cases (kosoku, installed by
//! scripts/install-test-deps.sh) against an echo server, directly and through the proxy:
//! the proxy must add no failure.

mod common;
use common::*;
use std::net::TcpListener;
use std::process::Command;
use tungstenite::Message;

/// A plain echo server (tungstenite), one thread per connection.
fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(stream) else {
                    return;
                };
                loop {
                    match ws.read() {
                        Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                            if ws.send(m).is_err() {
                                break;
                            }
                        }
                        Ok(_) => {
                            if ws.flush().is_err() {
                                break;
                            }
                        }
                        Err(_) => {
                            let _ = ws.flush();
                            break;
                        }
                    }
                }
            });
        }
    });
    port
}

#[test]
fn autobahn_cases_pass_through_the_proxy_as_they_do_directly() {
    let echo = echo_server();
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
        "autobahn through the proxy:\n{stdout}\n{stderr}\n{}",
        s.log()
    );
    assert!(stdout.contains("the proxy adds no failure"));
}
