//! A worker's signals. The handler only writes the signal number into one end of a socket
//! pair (async-signal-safe); the runtime reads the other end like any socket, so the worker
//! loop sees signals as ordinary events.

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, Ordering};

const HANDLED: [Signal; 4] = [
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGUSR1,
];

static WRITE_END: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    // The handler may interrupt code between a failing call and its read of `errno`.
    let saved = nix::errno::Errno::last_raw();
    let byte = sig as u8;
    let fd = WRITE_END.load(Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; `fd` is the socket `install` leaked for the
        // life of the process, and one byte is read from a live local.
        unsafe { libc::write(fd, &byte as *const u8 as *const libc::c_void, 1) };
    }
    nix::errno::Errno::set_raw(saved);
}

/// Routes QUIT, TERM, INT and USR1 (reopen the log) to the returned socket; HUP, USR2 and
/// WINCH are meant for the master and ignored here (a terminal may send them to the whole
/// process group). A child starts with the master's mask (every handled signal blocked):
/// only now, with the handlers in place, are signals unblocked, so one sent during startup
/// is delivered here instead of killing the process.
pub fn install() -> std::io::Result<UnixStream> {
    let (read, write) = UnixStream::pair()?;
    write.set_nonblocking(true)?;
    WRITE_END.store(write.into_raw_fd(), Ordering::Relaxed);
    // Handlers never nest: pending signals then arrive in the kernel's order (lowest number
    // first), so the master's fast stop (QUIT, then TERM) reads as "drain", then "now".
    let mut handled = SigSet::empty();
    for s in HANDLED {
        handled.add(s);
    }
    let handler = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, handled);
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    // SAFETY: `on_signal` only does async-signal-safe things (atomic load, write(2), errno).
    unsafe {
        for s in HANDLED {
            sigaction(s, &handler)?;
        }
        for s in [
            Signal::SIGHUP,
            Signal::SIGUSR2,
            Signal::SIGWINCH,
            Signal::SIGPIPE,
        ] {
            sigaction(s, &ignore)?;
        }
    }
    nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    )?;
    Ok(read)
}
