//! A worker's signals. The handler only writes the signal number into one end of a socket
//! pair (async-signal-safe); the runtime reads the other end like any socket, so the worker
//! loop sees signals as ordinary events.

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::os::fd::IntoRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicI32, Ordering};

static WRITE_END: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let byte = sig as u8;
    let fd = WRITE_END.load(Ordering::Relaxed);
    if fd >= 0 {
        unsafe { libc::write(fd, &byte as *const u8 as *const libc::c_void, 1) };
    }
}

/// Routes QUIT, TERM, INT and USR1 (reopen the log) to the returned socket; HUP, USR2 and
/// WINCH are meant for the master and ignored here (a terminal may send them to the whole
/// process group).
pub fn install() -> std::io::Result<UnixStream> {
    let (read, write) = UnixStream::pair()?;
    write.set_nonblocking(true)?;
    WRITE_END.store(write.into_raw_fd(), Ordering::Relaxed);
    let handler = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    unsafe {
        for s in [
            Signal::SIGQUIT,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGUSR1,
        ] {
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
    Ok(read)
}
