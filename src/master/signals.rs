//! The master's signals. They are blocked and collected synchronously with `sigtimedwait`, so
//! no handler runs at an arbitrary point: the master cycle asks for the next signal, sets a
//! flag, and acts on the flags in one place.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use std::time::Duration;

const HANDLED: [Signal; 8] = [
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGCHLD,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    set
}

/// Blocks the handled signals in the master; they stay pending until `next` takes them.
pub fn block() -> nix::Result<()> {
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled_set()), None)
}

/// `si_value` of the SIGTERM that `zerocopy-server -s stop` queues: a fast stop in one
/// signal (two plain TERMs sent back to back may merge into one, which is graceful).
const FAST_STOP: usize = 0x7a63_5354;

/// A signal taken from the pending set.
pub struct Received {
    pub signal: Signal,
    /// Queued by `-s stop` (`queue_fast_stop`).
    pub fast_stop: bool,
}

/// Waits up to `timeout` for one handled signal.
pub fn next(timeout: Duration) -> Option<Received> {
    let set = handled_set();
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `siginfo_t` is plain data, valid all zeroes.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to a signal set, a siginfo and a timespec that outlive the call
    // (nix wraps sigwait, not sigtimedwait with its siginfo).
    let n = unsafe { libc::sigtimedwait(set.as_ref(), &mut info, &ts) };
    let signal = Signal::try_from(n).ok()?;
    let fast_stop = signal == Signal::SIGTERM
        && info.si_code == libc::SI_QUEUE
        // SAFETY: for SI_QUEUE, the kernel filled in the value union.
        && unsafe { info.si_value() }.sival_ptr as usize == FAST_STOP;
    Some(Received { signal, fast_stop })
}

/// `-s stop`: a SIGTERM to `pid` that its master reads as a fast stop.
pub fn queue_fast_stop(pid: i32) -> std::io::Result<()> {
    let value = libc::sigval {
        sival_ptr: FAST_STOP as *mut libc::c_void,
    };
    // SAFETY: sigqueue(3) takes its arguments by value; the pointer is a tag, never read.
    if unsafe { libc::sigqueue(pid, libc::SIGTERM, value) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
