//! Opening what a `File` route serves so that nothing on disk can block a worker. `open(2)`
//! of a FIFO waits for a writer, and reading a device may never end: every open here is
//! `O_NONBLOCK` (a FIFO then opens at once) and `O_NOCTTY`, and the opened descriptor is
//! `fstat`ed before one byte is read. The check is on the descriptor, not on the name, so a
//! rename between the check and the read cannot slip a FIFO in.

use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Flags of every open of a served file (`openat2` included).
pub const OPEN_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY;

/// What an opened path is.
pub enum Opened {
    /// A regular file, its descriptor back in blocking mode, and its metadata.
    File(File, Metadata),
    Dir,
    /// A FIFO, socket or device: refused (403), never read.
    Special,
}

/// Opens `path` (following symlinks) with [`OPEN_FLAGS`] and says what it is.
pub fn open(path: &Path) -> io::Result<Opened> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    classify(file)
}

/// `fstat` on the descriptor decides; a regular file is switched back to blocking mode,
/// because io_uring honours `O_NONBLOCK` on regular files and would answer `EAGAIN` where the
/// page cache misses.
pub fn classify(file: File) -> io::Result<Opened> {
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Ok(Opened::Dir);
    }
    if !meta.is_file() {
        return Ok(Opened::Special);
    }
    // Only O_NONBLOCK among the settable status flags was set: clearing all clears it.
    let empty = nix::fcntl::OFlag::empty();
    nix::fcntl::fcntl(file.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(empty))?;
    Ok(Opened::File(file, meta))
}

/// Whether a failed open means "there, but not to be served" (403) rather than "not there"
/// (404): no permission, or `ENXIO`, which is what opening a unix socket (or a device without
/// a driver) returns.
pub fn refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EACCES | libc::EPERM | libc::ENXIO)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_opens_at_once_and_is_special() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let fifo = dir.join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(matches!(open(&fifo), Ok(Opened::Special)));
    }

    #[test]
    fn a_socket_is_refused_a_file_is_blocking_a_dir_is_a_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let sock = dir.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert!(refused(&open(&sock).err().unwrap()));
        std::fs::write(dir.join("f"), b"x").unwrap();
        let Ok(Opened::File(f, meta)) = open(&dir.join("f")) else {
            panic!("a regular file");
        };
        assert_eq!(meta.len(), 1);
        let flags = nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        assert!(matches!(open(dir), Ok(Opened::Dir)));
        assert!(matches!(open(Path::new("/dev/null")), Ok(Opened::Special)));
    }
}
