//! `performance.huge_pages_enabled`: a worker turns transparent huge pages back on for itself
//! (every process starts with them off) and the log says what it asked for and what it got.

mod common;
use common::*;
use std::time::Duration;

fn thp_enabled(pid: i32) -> Option<String> {
    proc_status(pid, "THP_enabled")
}

#[test]
fn huge_pages_are_asked_for_only_when_enabled_and_the_log_says_what_came() {
    let plain = Server::start("[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 1\n");
    let worker = plain.workers()[0];
    assert_eq!(
        thp_enabled(worker).as_deref(),
        Some("0"),
        "THP must stay off by default"
    );

    let s = Server::start(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nthreads = 1\n\n[performance]\nhuge_pages_enabled = true\n",
    );
    let worker = s.workers()[0];
    assert_eq!(thp_enabled(worker).as_deref(), Some("1"), "{}", s.log());
    assert_eq!(
        thp_enabled(s.pid()).as_deref(),
        Some("0"),
        "the master stays on small pages"
    );
    assert!(!s.log().contains("not active yet"), "{}", s.log());
    // Either what was asked for (then, after a while, what was obtained), or a plain "none".
    let said = wait_until(Duration::from_secs(5), || s.log().contains("huge pages: "));
    assert!(said, "no huge pages line:\n{}", s.log());
    let offered =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !offered.contains("[never]") {
        let reported = wait_until(Duration::from_secs(20), || {
            let log = s.log();
            log.contains("KiB of this worker's memory is in huge pages")
                || log.contains("huge pages: none obtained")
        });
        assert!(reported, "no report of what was obtained:\n{}", s.log());
    }
}
