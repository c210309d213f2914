//! `File` routes: mapping a request path onto the route's file or directory.
//!
//! The rule that keeps every answer inside the route's root: the rest of the path is
//! percent-decoded once, split on `/`, and any segment that is `..`, contains a backslash or a
//! NUL, or decodes to contain `/` is refused (400); the file found is then resolved through
//! its symlinks and must still lie under the root's own resolved path (else 404).

use super::router::FileRoute;
use std::path::{Path, PathBuf};

pub enum Resolved {
    File {
        path: PathBuf,
        meta: std::fs::Metadata,
    },
    NotFound,
    BadRequest,
}

pub fn resolve(route: &FileRoute, rest: &str, exact: bool) -> Resolved {
    if !route.is_dir {
        // An exact-file route answers only its own path: `/robots.txt/extra` is 404.
        return if exact {
            found(route.root.clone(), &route.root)
        } else {
            Resolved::NotFound
        };
    }
    let mut path = route.root.clone();
    for raw in rest.split('/').filter(|s| !s.is_empty()) {
        let Some(seg) = percent_decode(raw) else {
            return Resolved::BadRequest;
        };
        if seg == "." {
            continue;
        }
        if seg == ".." || seg.contains(['/', '\\', '\0']) {
            return Resolved::BadRequest;
        }
        path.push(seg);
    }
    if path.is_dir() {
        path.push(&route.index);
    }
    found(path, &route.root)
}

fn found(path: PathBuf, root: &Path) -> Resolved {
    let (Ok(real), Ok(real_root)) = (path.canonicalize(), root.canonicalize()) else {
        return Resolved::NotFound;
    };
    if !real.starts_with(&real_root) {
        return Resolved::NotFound;
    }
    match std::fs::metadata(&real) {
        Ok(meta) if meta.is_file() => Resolved::File { path: real, meta },
        _ => Resolved::NotFound,
    }
}

/// `%41` → `A`; `None` for a malformed escape or invalid UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub fn content_type(path: &Path) -> String {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    match mime.type_() {
        mime_guess::mime::TEXT => format!("{mime}; charset=utf-8"),
        _ if mime.subtype() == "javascript" || mime.subtype() == "json" => {
            format!("{mime}; charset=utf-8")
        }
        _ => mime.to_string(),
    }
}
