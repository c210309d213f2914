//! Mapping a request path onto the route's file or directory.
//!
//! Staying inside the root: the request path reaches this module already percent-decoded,
//! with dot-segments resolved and encoded `/`, `\` and NUL refused (`http::normalize_path`).
//! The rest after the route's prefix is joined to the root segment by segment; the file found
//! is then resolved through its symlinks and must still lie under the root's own resolved
//! path, else 404.

use super::diskfile::{self, Opened};
use super::{Cached, FileRoute};
use std::path::{Path, PathBuf};

pub enum Resolved<'a> {
    /// An open regular file (opened once: what is stat'ed is what is sent).
    File {
        path: PathBuf,
        file: std::fs::File,
        meta: std::fs::Metadata,
    },
    /// A file of a memory route, as read when the generation started.
    Cached {
        path: PathBuf,
        file: &'a Cached,
    },
    /// A small file served before and unchanged since (`recent`).
    Recent(std::rc::Rc<super::recent::Entry>),
    NotFound,
    /// The worker's user may not read it.
    Forbidden,
    BadRequest,
}

/// `rest`: the normalized path after the route's prefix. `exact`: the request path is the
/// prefix itself, which is all an exact-file route answers (`/robots.txt/extra` is 404).
pub fn resolve<'a>(route: &'a FileRoute, rest: &str, exact: bool) -> Resolved<'a> {
    if let Some(entry) = route.recent.get(rest) {
        return Resolved::Recent(entry);
    }
    match from_disk(route, rest, exact) {
        Resolved::File { path, file, meta } => match route.recent.keep(rest, &path, &file, &meta) {
            Some(entry) => Resolved::Recent(entry),
            None => Resolved::File { path, file, meta },
        },
        other => other,
    }
}

fn from_disk<'a>(route: &'a FileRoute, rest: &str, exact: bool) -> Resolved<'a> {
    if !route.is_dir {
        if !exact {
            return Resolved::NotFound;
        }
        if let Some(file) = route.cache.get(&route.root_canon) {
            let path = route.root_canon.clone();
            return Resolved::Cached { path, file };
        }
        return found(route.root.clone(), &route.root_canon);
    }
    let mut path = route.root_canon.clone();
    for seg in rest.split('/').filter(|s| !s.is_empty()) {
        // Normalization removed these; refusing them again costs nothing.
        if seg == "." || seg == ".." || seg.contains(['\\', '\0']) {
            return Resolved::BadRequest;
        }
        path.push(seg);
    }
    if !route.cache.is_empty() {
        // A memory route: what was read at start; anything else (past the route's memory
        // budget, or new since) comes from disk like a sendfile route's.
        for key in [path.clone(), path.join(&route.index)] {
            if let Some(file) = route.cache.get(&key) {
                return Resolved::Cached { path: key, file };
            }
        }
    }
    match open_beneath(route, rest) {
        Some(resolved) => resolved,
        // Kernels without openat2 (before 5.6): resolve in user space.
        None => {
            if path.is_dir() {
                path.push(&route.index);
            }
            found(path, &route.root_canon)
        }
    }
}

/// Opens `rest` (then its index, for a directory) under the route's root with
/// `openat2(RESOLVE_BENEATH)`: the kernel follows symlinks but refuses any path that leaves the
/// root, in one call. `None` where the kernel has no openat2.
fn open_beneath<'a>(route: &FileRoute, rest: &str) -> Option<Resolved<'a>> {
    let dir = route.root_fd.as_ref()?;
    let rel = rest.trim_start_matches('/');
    let rel = if rel.is_empty() { "." } else { rel };
    let opened = match openat2_beneath(dir, rel) {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return None,
        other => other,
    };
    let (rel, opened) = match opened.and_then(diskfile::classify) {
        Ok(Opened::Dir) => {
            let index = format!("{}/{}", rel.trim_end_matches('/'), route.index);
            let opened = openat2_beneath(dir, &index).and_then(diskfile::classify);
            (index, opened)
        }
        other => (rel.to_string(), other),
    };
    Some(match opened {
        Ok(Opened::File(file, meta)) => Resolved::File {
            path: route.root_canon.join(rel),
            file,
            meta,
        },
        // An index that is itself a directory: no listing.
        Ok(Opened::Dir) => Resolved::NotFound,
        Ok(Opened::Special) => special(&rel),
        Err(e) => open_failed(&e),
    })
}

fn openat2_beneath(dir: &std::os::fd::OwnedFd, rel: &str) -> std::io::Result<std::fs::File> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let c = std::ffi::CString::new(rel)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `open_how` is three integers, for which all zeroes is a valid value (and the
    // one openat2(2) asks for in fields not set).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = diskfile::OPEN_FLAGS as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2(2) (neither libc nor nix wraps it) with a live directory descriptor, a
    // NUL-terminated path and an `open_how` with its true size, all outliving the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        Ok(unsafe { std::fs::File::from_raw_fd(fd as i32) })
    }
}

fn open_failed(e: &std::io::Error) -> Resolved<'static> {
    if diskfile::refused(e) {
        Resolved::Forbidden
    } else {
        Resolved::NotFound
    }
}

fn special(path: impl std::fmt::Debug) -> Resolved<'static> {
    log::debug!("403: {path:?} is not a regular file");
    Resolved::Forbidden
}

fn found(path: PathBuf, real_root: &Path) -> Resolved<'static> {
    let Ok(real) = path.canonicalize() else {
        return Resolved::NotFound;
    };
    if !real.starts_with(real_root) {
        return Resolved::NotFound;
    }
    match diskfile::open(&real) {
        Ok(Opened::File(file, meta)) => Resolved::File {
            path: real,
            file,
            meta,
        },
        Ok(Opened::Dir) => Resolved::NotFound,
        Ok(Opened::Special) => special(&real),
        Err(e) => open_failed(&e),
    }
}
