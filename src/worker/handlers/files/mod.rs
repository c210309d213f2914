//! `File` routes: a single file or a directory, served from disk (`sendfile` mode: the bytes
//! go from the page cache to the socket) or from memory (`memory` mode: read when the
//! generation starts), with validators, conditional requests and byte ranges.

mod conditional;
pub mod diskfile;
mod memory;
mod recent;
mod resolve;

use crate::shared::config::{FileMode, Route};
use crate::worker::http::respond::{Body, Response};
use crate::worker::http::{Request, ResponseHead};
use bytes::Bytes;
pub use conditional::{content_type, range, RangeAnswer, Validators};
use resolve::Resolved;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub struct FileRoute {
    pub root: PathBuf,
    /// `root` with its symlinks resolved: what every file served must lie under.
    pub root_canon: PathBuf,
    /// The root directory, opened once (O_PATH), for `openat2(RESOLVE_BENEATH)`.
    pub root_fd: Option<std::os::fd::OwnedFd>,
    pub is_dir: bool,
    pub index: String,
    /// `mode = "memory"`: files by resolved path, read when the generation starts.
    pub cache: HashMap<PathBuf, Cached>,
    /// Small files served from disk, kept while unchanged.
    pub recent: recent::Recent,
}

/// A file of a memory route: its bytes and its metadata, both as they were when read.
pub struct Cached {
    pub bytes: Bytes,
    pub meta: std::fs::Metadata,
}

impl FileRoute {
    /// Opens (and for a memory route reads) the route's root, with the worker's rights.
    pub fn new(route: &Route) -> Result<FileRoute, String> {
        let root = PathBuf::from(route.path.clone().unwrap_or_default());
        let meta = std::fs::metadata(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let cache = match route.mode.unwrap_or_default() {
            FileMode::Memory => memory::load(&root)?,
            _ => HashMap::new(),
        };
        let root_canon = root
            .canonicalize()
            .map_err(|e| format!("{}: {e}", root.display()))?;
        let root_fd = meta.is_dir().then(|| open_dir(&root_canon)).flatten();
        Ok(FileRoute {
            is_dir: meta.is_dir(),
            root,
            root_canon,
            root_fd,
            index: route.index.clone().unwrap_or_else(|| "index.html".into()),
            cache,
            recent: recent::Recent::default(),
        })
    }
}

/// An O_PATH descriptor of a route's root directory.
fn open_dir(path: &Path) -> Option<std::os::fd::OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(path)
        .ok()
        .map(std::os::fd::OwnedFd::from)
}

impl FileRoute {
    /// Answers `req` for `rest`, the normalized path after the route's prefix (`exact`: the
    /// path is the prefix itself).
    pub fn serve(&self, req: &Request, rest: &str, exact: bool) -> Response {
        serve(self, req, rest, exact)
    }
}

fn serve(route: &FileRoute, req: &Request, rest: &str, exact: bool) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        let mut r = Response::error(405);
        r.head.set("Allow", "GET, HEAD");
        return r;
    }
    let recent;
    let (kind, meta, opened, cached) = match resolve::resolve(route, rest, exact) {
        Resolved::File { path, file, meta } => (content_type(&path), meta, Some(file), None),
        Resolved::Cached { path, file } => (
            content_type(&path),
            file.meta.clone(),
            None,
            Some(&file.bytes),
        ),
        Resolved::Recent(entry) => {
            recent = entry;
            let kind = recent.content_type.clone();
            (
                kind,
                recent.file.meta.clone(),
                None,
                Some(&recent.file.bytes),
            )
        }
        Resolved::NotFound => return Response::error(404),
        Resolved::Forbidden => return Response::error(403),
        Resolved::BadRequest => return Response::error(400),
    };
    // A memory route serves what it read: its length, not the length stat'ed before reading.
    let len = cached.map_or(meta.len(), |b| b.len() as u64);
    let v = Validators::new(&meta, len);
    let mut head = ResponseHead::new(200)
        .header("Content-Type", kind)
        .header("Last-Modified", v.last_modified())
        .header("ETag", v.etag.clone())
        .header("Accept-Ranges", "bytes");
    if v.not_modified(req) {
        head.status = 304;
        head.remove("Content-Type");
        return Response::new(head, Body::Empty);
    }
    let (start, count) = match range(req, len, &v) {
        RangeAnswer::Full => (0, len),
        RangeAnswer::Partial(a, b) => {
            head.status = 206;
            head.set("Content-Range", format!("bytes {a}-{b}/{len}"));
            (a, b - a + 1)
        }
        RangeAnswer::Unsatisfiable => {
            let mut r = Response::error(416);
            r.head.set("Content-Range", format!("bytes */{len}"));
            return r;
        }
    };
    if let Some(bytes) = cached {
        // A memory route answers from what it read at start, even if the file changed since.
        let end = (start + count).min(bytes.len() as u64) as usize;
        let body = bytes.slice((start as usize).min(end)..end);
        return Response::new(head, Body::Bytes(body));
    }
    match opened {
        Some(file) => Response::new(
            head,
            Body::File {
                file,
                offset: start,
                len: count,
            },
        ),
        None => Response::error(404),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memory route whose file grew between stat and read (`meta` says 100 bytes, 10 were
    /// read): a range past the bytes held is 416, and the whole file is the 10 bytes.
    #[test]
    fn memory_route_ranges_are_checked_against_what_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.txt");
        std::fs::write(&path, [b'x'; 100]).unwrap();
        let cached = Cached {
            bytes: Bytes::from_static(b"0123456789"),
            meta: std::fs::metadata(&path).unwrap(),
        };
        let route = FileRoute {
            root: path.clone(),
            root_canon: path.clone(),
            root_fd: None,
            is_dir: false,
            index: "index.html".into(),
            cache: [(path.clone(), cached)].into_iter().collect(),
            recent: recent::Recent::default(),
        };
        let get = |range: Option<&str>| {
            let headers = range
                .map(|r| ("Range".to_string(), r.as_bytes().to_vec()))
                .into_iter()
                .collect();
            let req = Request {
                method: "GET".into(),
                target: "/f.txt".into(),
                version: 1,
                headers,
            };
            let r = route.serve(&req, "", true);
            let body = match r.body {
                Body::Bytes(b) => b,
                _ => Bytes::new(),
            };
            (r.head.status, body)
        };
        assert_eq!(get(Some("bytes=50-60")).0, 416);
        assert_eq!(get(Some("bytes=5-60")), (206, Bytes::from_static(b"56789")));
        assert_eq!(get(Some("bytes=-3")), (206, Bytes::from_static(b"789")));
        assert_eq!(get(None), (200, Bytes::from_static(b"0123456789")));
    }
}
