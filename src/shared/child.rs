//! What every forked child (worker or health checker) does for itself: give up root for
//! good, and exit with its log flushed.

use super::WorkerStart;

/// The exit status of a child that could not start (bad routes, no runtime...).
pub const EXIT_STARTUP_FAILED: i32 = 2;

pub fn exit(code: i32) -> ! {
    super::log::stop_line_writer();
    log::logger().flush();
    std::process::exit(code)
}

/// Switches to the child's identity for good, then forbids gaining privileges again (no
/// set-uid or file-capability exec can raise them).
pub fn drop_privileges(start: &WorkerStart) -> Result<(), String> {
    use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
    if let Some((uid, gid)) = start.identity {
        let gid = Gid::from_raw(gid);
        setgroups(&[gid]).map_err(|e| format!("setgroups: {e}"))?;
        setgid(gid).map_err(|e| format!("setgid({gid}): {e}"))?;
        setuid(Uid::from_raw(uid)).map_err(|e| format!("setuid({uid}): {e}"))?;
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(format!("still able to become root after setuid({uid})"));
        }
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("prctl(PR_SET_NO_NEW_PRIVS): {e}"))?;
    Ok(())
}
