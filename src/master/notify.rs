//! The systemd notification protocol (`sd_notify(3)`), for a `Type=notify` service: one job,
//! telling the service manager where the master is in its life.
//!
//! Protocol: when systemd starts the service it sets `NOTIFY_SOCKET` to a unix datagram
//! socket (a path, or an abstract name written with a leading `@`). Each notification is one
//! datagram of newline-separated `KEY=VALUE` lines. What the master sends, and when:
//!
//! | when | datagram |
//! |---|---|
//! | the first generation serves (every worker answers) | `MAINPID=<pid>`, `READY=1`, `STATUS=` |
//! | SIGHUP received | `RELOADING=1`, `MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>`, `STATUS=` |
//! | the new generation serves | `READY=1`, `STATUS=` |
//! | the reload failed (the old generation keeps serving) | `READY=1`, `STATUS=<the error>` |
//! | SIGQUIT/SIGTERM/SIGINT (graceful or fast stop) | `STOPPING=1`, `STATUS=` |
//!
//! After a binary upgrade (USR2) the new master sends `MAINPID=` with its `READY=1` once its
//! generation serves, so systemd follows it (the unit needs `NotifyAccess=all`); the old
//! master, stopped next, sends no `STOPPING=1`: the service is not stopping, only that process.
//! Without `NOTIFY_SOCKET` every call does nothing. A failed send is logged once and then
//! ignored: the server serves whether or not anyone listens.

use std::os::unix::net::UnixDatagram;

pub struct Notifier {
    target: Option<Target>,
    warned: bool,
}

enum Target {
    Path(std::ffi::OsString),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`. It stays in the environment: a new master started by USR2
    /// needs it (workers inherit it too, and never send).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").map(|path| {
            use std::os::unix::ffi::OsStrExt;
            match path.as_bytes().strip_prefix(b"@") {
                Some(name) => Target::Abstract(name.to_vec()),
                None => Target::Path(path.clone()),
            }
        });
        Notifier {
            target,
            warned: false,
        }
    }

    /// The first generation of this master serves.
    pub fn ready(&mut self, status: &str) {
        let pid = std::process::id();
        self.send(&format!("MAINPID={pid}\nREADY=1\nSTATUS={status}\n"));
    }

    /// A reload starts.
    pub fn reloading(&mut self) {
        let usec = monotonic_usec();
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the configuration\n"
        ));
    }

    /// A reload is over: the new generation serves, or it failed and the old one does.
    pub fn reloaded(&mut self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\n"));
    }

    pub fn stopping(&mut self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}\n"));
    }

    fn send(&mut self, message: &str) {
        let Some(target) = &self.target else {
            return;
        };
        let sent = UnixDatagram::unbound().and_then(|sock| match target {
            Target::Path(p) => sock.send_to(message.as_bytes(), p),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|addr| sock.send_to_addr(message.as_bytes(), &addr))
            }
        });
        if let Err(e) = sent {
            if !std::mem::replace(&mut self.warned, true) {
                log::warn!("cannot notify systemd (NOTIFY_SOCKET): {e}");
            }
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd compares `MONOTONIC_USEC` with its own.
fn monotonic_usec() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// A single line for `STATUS=`: the protocol separates fields by newlines.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_stays_on_one_line_and_the_clock_moves() {
        assert_eq!(
            one_line("reload failed:\n  bad key\tx"),
            "reload failed: bad key x"
        );
        let a = monotonic_usec();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(monotonic_usec() >= a + 1_000);
    }
}
