//! `mode = "memory"` routes: their files read whole when the generation starts.

use super::diskfile::{self, Opened};
use super::Cached;
use bytes::Bytes;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Total bytes one `memory` directory route may hold; files past it are served from disk.
const MEMORY_ROUTE_MAX: u64 = 256 * 1024 * 1024;

/// Reads a `memory` route's file, or every file under its directory, keyed by resolved path.
/// Only the root itself must load: an entry below it that vanished, may not be read or is not
/// a regular file is left out (with a warning) and served from disk like a new file, where
/// such a file gets its 403 or 404.
pub fn load(root: &Path) -> Result<HashMap<PathBuf, Cached>, String> {
    let mut cache = HashMap::new();
    let mut total = 0u64;
    let root = root
        .canonicalize()
        .map_err(|e| format!("{}: {e}", root.display()))?;
    let mut pending = vec![root.clone()];
    let mut seen = std::collections::HashSet::new();
    while let Some(path) = pending.pop() {
        // Only what the route can serve (under its root), each once: symlink loops end here.
        if !path.starts_with(&root) || !seen.insert(path.clone()) {
            continue;
        }
        let is_root = path == root;
        let failed = |why: String| {
            let msg = format!("{}: {why}", path.display());
            if is_root {
                return Err(msg);
            }
            log::warn!("{msg}; not held in memory");
            Ok(())
        };
        let opened = match diskfile::open(&path) {
            Ok(opened) => opened,
            Err(e) => {
                failed(e.to_string())?;
                continue;
            }
        };
        match opened {
            Opened::Dir => match std::fs::read_dir(&path) {
                Ok(entries) => pending.extend(
                    entries
                        .flatten()
                        .filter_map(|entry| entry.path().canonicalize().ok()),
                ),
                Err(e) => failed(e.to_string())?,
            },
            Opened::Special => failed("not a regular file or directory".into())?,
            Opened::File(file, meta) => {
                // A single-file route holds its file whatever its size: that is what it asks for.
                if !is_root && total + meta.len() > MEMORY_ROUTE_MAX {
                    log::warn!(
                        "{}: memory route over {} MiB; served from disk",
                        path.display(),
                        MEMORY_ROUTE_MAX >> 20
                    );
                    continue;
                }
                match read_cached(file, meta) {
                    Ok(cached) => {
                        total += cached.bytes.len() as u64;
                        cache.insert(path, cached);
                    }
                    Err(e) => failed(e.to_string())?,
                }
            }
        }
    }
    Ok(cache)
}

/// Reads at most the `meta.len()` bytes that the memory budget admitted: a file that grows
/// while read is held as its first `len` bytes, one that shrinks as what was there. Handlers
/// take the length from the bytes, so what is served is always self-consistent.
fn read_cached(file: std::fs::File, meta: std::fs::Metadata) -> std::io::Result<Cached> {
    use std::io::Read;
    let mut data = Vec::with_capacity(meta.len() as usize);
    let mut file = file.take(meta.len());
    file.read_to_end(&mut data)?;
    // The validators then name the version read (a change during the read moves mtime).
    let meta = file.get_ref().metadata().unwrap_or(meta);
    Ok(Cached {
        bytes: Bytes::from(data),
        meta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn stat_then_change(before: &[u8], after: &[u8]) -> Cached {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, before).unwrap();
        let Ok(Opened::File(file, meta)) = diskfile::open(&path) else {
            panic!("a regular file");
        };
        let mut w = std::fs::File::create(&path).unwrap();
        w.write_all(after).unwrap();
        read_cached(file, meta).unwrap()
    }

    #[test]
    fn a_file_that_changes_between_stat_and_read_is_held_as_read() {
        // Shrunk: what is there; grown: no more than was stat'ed (the budget counted that).
        assert_eq!(&stat_then_change(b"0123456789", b"abc").bytes[..], b"abc");
        assert_eq!(&stat_then_change(b"0123", b"abcdefghij").bytes[..], b"abcd");
        // The validators describe the version read.
        let c = stat_then_change(b"0123456789", b"abc");
        assert_eq!(c.meta.len(), 3);
    }
}
