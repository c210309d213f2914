//! sslyze (PyPI, installed by scripts/install-test-deps.sh) finds the TLS listener compliant
//! with Mozilla's "intermediate" configuration, for an ECDSA and an RSA certificate (the two
//! types the profile allows) served side by side by SNI.

mod common;
use common::certs::{Ca, KeyFormat, Kind};
use common::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn sslyze_finds_the_tls_listener_compliant_with_mozilla_intermediate() {
    let http_port = free_port();
    let mut s = Server::prepare(&format!(
        "[server]\nlisten = \"127.0.0.1:{{port}}\"\nhttp_listen = \"127.0.0.1:{http_port}\"\nthreads = 2\n\n\
         [tls]\ncert_path = \"{{dir}}/ecdsa.crt\"\nkey_path = \"{{dir}}/ecdsa.key\"\n\n\
         [[tls.certificates]]\ncert_path = \"{{dir}}/rsa.crt\"\nkey_path = \"{{dir}}/rsa.key\"\n\n\
         [path_routes.\"*\".\"/\"]\npath = \"{{dir}}/www\"\n"
    ));
    let ca = Ca::new("zerocopy sslyze test CA");
    for (stem, name, kind) in [
        ("ecdsa", "localhost", Kind::EcdsaP256),
        ("rsa", "rsa.test", Kind::Rsa2048),
    ] {
        let leaf = ca.issue(name, &[name], kind, KeyFormat::Pkcs8);
        s.write_file(&format!("{stem}.crt"), leaf.cert_pem.as_bytes());
        s.write_file(&format!("{stem}.key"), leaf.key_pem.as_bytes());
    }
    let ca_file = s.write_file("ca.pem", ca.pem.as_bytes());
    s.write_file("www/index.html", b"hello\n");
    s.spawn();
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
            "127.0.0.1",
            http_port
        ))
        .is_ok()),
        "{}",
        s.log()
    );
    let targets = ["localhost", "rsa.test"].map(|name| format!("{name}:{}{{127.0.0.1}}", s.port));
    // As a module: the same `python3` the install script gave it to, whatever its PATH.
    let out = Command::new("python3")
        .args(["-m", "sslyze", "--mozilla_config=intermediate"])
        .arg("--certinfo_ca_file")
        .arg(&ca_file)
        .args(&targets)
        .output()
        .expect("sslyze (scripts/install-test-deps.sh installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    let what = format!("{report}\n{}", String::from_utf8_lossy(&out.stderr));
    // The whole report, for `--nocapture`: which suites and groups each certificate gets.
    println!("{report}");
    assert_eq!(out.status.code(), Some(0), "{what}");
    for t in &targets {
        // sslyze names a target by its host and port, the IP in parentheses.
        let host = t.split('{').next().unwrap();
        assert!(
            report
                .lines()
                .any(|l| l.contains(host) && l.contains("OK - Compliant.")),
            "{host} not compliant:\n{what}"
        );
    }
}
