//! Binary upgrade (SIGUSR2): hand the listening sockets and the shared-memory region to a new
//! master running the binary now on disk, so both serve for a while and no connection waits.
//!
//! Protocol
//! --------
//! * The old master creates a datagram socket pair, forks, and in the child clears
//!   close-on-exec on one end and execs the binary with its original arguments and
//!   `ZEROCOPY_UPGRADE_FD=<that end>` in the environment.
//! * It then sends, on its end, one datagram per item, each with its descriptors attached
//!   (`SCM_RIGHTS`, through `sendfd`):
//!     1. `zerocopy-upgrade 1 <groups>` with the shared-memory memfd;
//!     2. for each listen group, `group <address> <sockets>` with that group's sockets, in
//!        reuseport order (socket *i* is still worker *i*'s).
//! * The new master reads them before anything else, maps the region (checking its layout
//!   version) and adopts the sockets instead of binding. It writes the pid file; the old
//!   master has already renamed its own to `<pid_file>.oldbin`.
//! * Then the nginx procedure: WINCH to the old master drains its workers, QUIT ends it; or, if
//!   the new binary misbehaves, HUP to the old master restarts its workers and QUIT to the new
//!   one ends it. If the new master dies before serving, the old one renames its pid file back.

use super::listeners::ListenGroup;
use crate::shared::shm::Shm;
use anyhow::{bail, Context, Result};
use sendfd::{RecvWithFd, SendWithFd};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

pub const ENV: &str = "ZEROCOPY_UPGRADE_FD";
const MAGIC: &str = "zerocopy-upgrade 1";

/// Starts the new master; returns its pid. The handover happens before this returns.
pub fn spawn_new_master(
    exe: &std::path::Path,
    args: &[std::ffi::OsString],
    shm: &Shm,
    groups: &[ListenGroup],
) -> Result<nix::unistd::Pid> {
    let (ours, theirs) = UnixDatagram::pair().context("socketpair")?;
    let child_fd = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args).env(ENV, child_fd.to_string());
    // The listeners are not close-on-exec (workers inherit them by fork): the new master gets
    // them through the socket only, so that each process knows every descriptor it holds.
    let inherited: Vec<RawFd> = groups
        .iter()
        .flat_map(|g| g.sockets.iter().map(|s| s.as_raw_fd()))
        .collect();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (close, fcntl, sigprocmask) on descriptors and values it owns a copy of.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            for fd in &inherited {
                libc::close(*fd);
            }
            // Keep the socket across exec; the signal mask the master blocked is reset too.
            let flags = libc::fcntl(child_fd, libc::F_GETFD);
            libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            let empty: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    drop(theirs);
    let header = format!("{MAGIC} {}", groups.len());
    ours.send_with_fd(header.as_bytes(), &[shm.raw_fd()])
        .context("sending the shared memory")?;
    for g in groups {
        let fds: Vec<RawFd> = g.sockets.iter().map(|s| s.as_raw_fd()).collect();
        let line = format!("group {} {}", g.addr, fds.len());
        ours.send_with_fd(line.as_bytes(), &fds)
            .context("sending the listeners")?;
    }
    Ok(nix::unistd::Pid::from_raw(child.id() as i32))
}

/// In a master started by an upgrade: what the old master handed over.
pub fn receive() -> Result<Option<(Shm, Vec<ListenGroup>)>> {
    let Ok(fd) = std::env::var(ENV) else {
        return Ok(None);
    };
    // SAFETY: single-threaded here (nothing else reads the environment).
    unsafe { std::env::remove_var(ENV) };
    let fd: RawFd = fd.parse().context("bad upgrade descriptor")?;
    // SAFETY: the old master made this descriptor for us alone and named it in `ENV`.
    let sock = unsafe { UnixDatagram::from_raw_fd(fd) };
    let mut buf = [0u8; 512];
    let mut fds = [0 as RawFd; 1];
    let (n, nfds) = sock
        .recv_with_fd(&mut buf, &mut fds)
        .context("receiving the shared memory")?;
    let header = std::str::from_utf8(&buf[..n]).unwrap_or("");
    let Some(count) = header
        .strip_prefix(MAGIC)
        .and_then(|r| r.trim().parse::<usize>().ok())
    else {
        bail!("unexpected upgrade header {header:?} (another version of zerocopy-server?)");
    };
    if nfds != 1 {
        bail!("no shared-memory descriptor in the upgrade");
    }
    // SAFETY: a descriptor just received with SCM_RIGHTS: new in this process, owned by none.
    let shm =
        Shm::open(unsafe { OwnedFd::from_raw_fd(fds[0]) }).context("mapping the shared memory")?;
    let mut groups = Vec::new();
    for _ in 0..count {
        let mut fds = [0 as RawFd; 256];
        let (n, nfds) = sock
            .recv_with_fd(&mut buf, &mut fds)
            .context("receiving the listeners")?;
        let line = std::str::from_utf8(&buf[..n]).unwrap_or("");
        let mut parts = line.split(' ');
        let (Some("group"), Some(addr), Some(k)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("unexpected upgrade message {line:?}");
        };
        let addr = addr.parse().context("listen address")?;
        if k.parse::<usize>().ok() != Some(nfds) {
            bail!("listener count does not match in {line:?}");
        }
        let sockets = fds[..nfds]
            .iter()
            // SAFETY: descriptors just received with SCM_RIGHTS, each adopted once.
            .map(|fd| unsafe { TcpListener::from_raw_fd(*fd) })
            .collect();
        groups.push(ListenGroup { addr, sockets });
    }
    drop(sock);
    Ok(Some((shm, groups)))
}
