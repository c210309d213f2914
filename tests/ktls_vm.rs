//! kTLS offload on a kernel that has it: scripts/ktls-vm.sh boots a Debian cloud kernel
//! (`CONFIG_TLS=m`) under QEMU (TCG) with the server built with `--features ktls`, loads the
//! `tls` module, and runs the kTLS checks inside over loopback: the offload on real sockets
//! (both ends in the kernel, the kernel against rustls, alerts and a TLS 1.3 key update never
//! read as data), the server's probe, and the server's connections in kTLS: HTTPS GETs, 100 MB
//! static and proxied byte-exact, a client's TLS 1.3 key update. This machine's own kernel has
//! no `tls` module (see tests/tls.rs for what the server does then).

use std::process::Command;

#[test]
fn ktls_checks_pass_inside_a_vm() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/ktls-vm.sh"))
        .current_dir(root)
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "scripts/ktls-vm.sh failed\n{stdout}\n{stderr}"
    );
    // The script's own verdict, checked here too: every check ran and none failed.
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("KTLS-VM: ") && l.contains(" passed, "))
        .unwrap_or_else(|| panic!("no summary line\n{stdout}\n{stderr}"));
    assert!(summary.ends_with(" 0 failed"), "{summary}");
    for check in [
        "PASS tls module loaded",
        "PASS offload tests on real sockets: 3 passed",
        "PASS server probe finds the TLS ULP and every cipher",
        "PASS curl HTTPS GET, TLS 1.2",
        "PASS curl HTTPS GET, TLS 1.3",
        "PASS curl HTTPS GET, TLS 1.3 ChaCha20-Poly1305",
        "PASS openssl s_client HTTPS GET, TLS 1.3",
        "PASS connections run in kTLS",
        "PASS 100 MB over HTTPS in kTLS, byte-exact: /big.bin",
        "PASS 100 MB over HTTPS in kTLS, byte-exact: /proxied/big.bin",
        "PASS TLS 1.3 key update from the client",
        "PASS metric: tls_connections_total",
    ] {
        assert!(stdout.contains(check), "missing `{check}`\n{stdout}");
    }
}
