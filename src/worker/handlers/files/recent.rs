//! Small files of a `sendfile` route, kept in the worker after they were served once.
//!
//! Serving a 1 KiB file from disk costs five system calls (`openat2`, `fstat`, `fcntl`,
//! `pread`, `close`); most of a small file's answer is spent there. A file of at most
//! [`SMALL`] bytes is kept here with its metadata once it has been read, and a later request
//! for the same path costs one `statx` of the path instead: the same device, inode, size, and
//! modification and change times (nanoseconds) say it is the version that was read, and its
//! bytes are served. Anything else (gone, replaced by a rename, written, chmod'ed, no longer
//! reachable) drops the entry and the request is served from disk as before, where every
//! check of a first open applies again (`RESOLVE_BENEATH`, permissions, FIFOs).
//!
//! Why the comparison is safe: the inode compared is the one that was opened beneath the
//! root, so a path that now leads elsewhere (a symlink swapped in) finds another inode and
//! misses. A write after the read moves mtime and ctime, but only by the kernel's coarse
//! clock (a few ms): a file written within the same tick as it was read could keep equal
//! times. So, as git does with "racily clean" entries, only a file whose times are at least
//! [`SETTLED`] old when read is kept; a later write then always gets a later time.
//!
//! Bounded per route: at most [`MAX_ENTRIES`] files and [`MAX_BYTES`] bytes; a full table is
//! emptied and fills again with what is asked for.

use super::Cached;
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// Files up to this size are kept (the size that goes out in the same write as the head).
pub const SMALL: u64 = 16 * 1024;
const MAX_ENTRIES: usize = 1024;
const MAX_BYTES: usize = 8 * 1024 * 1024;
/// How old a file's times must be for equal times to mean an unchanged file.
const SETTLED: Duration = Duration::from_secs(1);

/// A kept file: where it is, what it was, and its Content-Type.
pub struct Entry {
    pub path: PathBuf,
    pub file: Cached,
    pub content_type: String,
}

#[derive(Default)]
pub struct Recent {
    entries: RefCell<HashMap<Box<str>, Rc<Entry>>>,
    bytes: Cell<usize>,
}

impl Recent {
    /// The file kept for `rest` if the path still names that very version of it.
    pub fn get(&self, rest: &str) -> Option<Rc<Entry>> {
        let entry = self.entries.borrow().get(rest).cloned()?;
        match std::fs::metadata(&entry.path) {
            Ok(now) if same_version(&now, &entry.file.meta) => Some(entry),
            _ => {
                self.forget(rest);
                None
            }
        }
    }

    /// Keeps the file just opened for `rest` if it is small and settled, and returns it as
    /// kept; `None`: serve it from `file` as usual.
    pub fn keep(&self, rest: &str, path: &Path, file: &File, meta: &Metadata) -> Option<Rc<Entry>> {
        if meta.len() > SMALL || !settled(meta, SystemTime::now()) {
            return None;
        }
        let mut data = vec![0; meta.len() as usize];
        let n = file.read_at(&mut data, 0).ok()?;
        // A file that changed while read is served from the descriptor, and not kept.
        let after = file.metadata().ok()?;
        if n != data.len() || !same_version(&after, meta) {
            return None;
        }
        let entry = Rc::new(Entry {
            path: path.to_path_buf(),
            content_type: super::content_type(path),
            file: Cached {
                bytes: Bytes::from(data),
                meta: after,
            },
        });
        self.insert(rest, entry.clone());
        Some(entry)
    }

    fn insert(&self, rest: &str, entry: Rc<Entry>) {
        let len = entry.file.bytes.len();
        let mut entries = self.entries.borrow_mut();
        if entries.len() >= MAX_ENTRIES || self.bytes.get() + len > MAX_BYTES {
            entries.clear();
            self.bytes.set(0);
        }
        if let Some(old) = entries.insert(rest.into(), entry) {
            self.bytes.set(self.bytes.get() - old.file.bytes.len());
        }
        self.bytes.set(self.bytes.get() + len);
    }

    fn forget(&self, rest: &str) {
        if let Some(old) = self.entries.borrow_mut().remove(rest) {
            self.bytes.set(self.bytes.get() - old.file.bytes.len());
        }
    }
}

fn same_version(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev()
        && a.ino() == b.ino()
        && a.size() == b.size()
        && a.mode() == b.mode()
        && (a.mtime(), a.mtime_nsec()) == (b.mtime(), b.mtime_nsec())
        && (a.ctime(), a.ctime_nsec()) == (b.ctime(), b.ctime_nsec())
}

/// Both times at least [`SETTLED`] before `now`.
fn settled(meta: &Metadata, now: SystemTime) -> bool {
    let Ok(now) = now.duration_since(SystemTime::UNIX_EPOCH) else {
        return false;
    };
    let limit = now.saturating_sub(SETTLED);
    let at = |secs: i64, nsec: i64| {
        u64::try_from(secs)
            .ok()
            .map(|s| Duration::new(s, nsec.clamp(0, 999_999_999) as u32))
    };
    let older = |t: Option<Duration>| t.is_some_and(|t| t <= limit);
    older(at(meta.mtime(), meta.mtime_nsec())) && older(at(meta.ctime(), meta.ctime_nsec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets a file's mtime (and so, as a change, its ctime to now): `age` in the past.
    fn age(path: &Path, age: Duration) {
        let t = SystemTime::now() - age;
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    fn open(path: &Path) -> (File, Metadata) {
        let f = File::open(path).unwrap();
        let m = f.metadata().unwrap();
        (f, m)
    }

    #[test]
    fn a_fresh_file_is_not_kept_a_settled_one_is_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, b"one").unwrap();
        let recent = Recent::default();
        let (f, m) = open(&p);
        // Just written: its ctime is now, a write in the same tick could go unseen.
        assert!(recent.keep("a.txt", &p, &f, &m).is_none());
        assert!(recent.get("a.txt").is_none());

        // ctime cannot be set back: judge "settled" as of two seconds from now.
        assert!(settled(&m, SystemTime::now() + Duration::from_secs(2)));
        let entry = Rc::new(Entry {
            path: p.clone(),
            content_type: "text/plain".into(),
            file: Cached {
                bytes: Bytes::from_static(b"one"),
                meta: m.clone(),
            },
        });
        recent.insert("a.txt", entry);
        assert_eq!(&recent.get("a.txt").unwrap().file.bytes[..], b"one");

        // The same size written again: another version.
        std::fs::write(&p, b"two").unwrap();
        assert!(recent.get("a.txt").is_none());
        assert_eq!(recent.bytes.get(), 0);
    }

    #[test]
    fn versions_differ_by_inode_times_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a");
        std::fs::write(&p, b"x").unwrap();
        let before = std::fs::metadata(&p).unwrap();
        assert!(same_version(&before, &std::fs::metadata(&p).unwrap()));
        age(&p, Duration::from_secs(10));
        assert!(!same_version(&before, &std::fs::metadata(&p).unwrap()));
        // Replaced by a rename: another inode.
        let before = std::fs::metadata(&p).unwrap();
        let q = dir.path().join("b");
        std::fs::write(&q, b"x").unwrap();
        std::fs::rename(&q, &p).unwrap();
        assert!(!same_version(&before, &std::fs::metadata(&p).unwrap()));
        // chmod: mode and ctime.
        let before = std::fs::metadata(&p).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!same_version(&before, &std::fs::metadata(&p).unwrap()));
    }

    #[test]
    fn large_files_are_not_kept_and_the_table_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![0u8; SMALL as usize + 1]).unwrap();
        let (f, m) = open(&p);
        assert!(Recent::default().keep("big", &p, &f, &m).is_none());

        let recent = Recent::default();
        let m = std::fs::metadata(&p).unwrap();
        for i in 0..MAX_ENTRIES + 10 {
            let entry = Rc::new(Entry {
                path: p.clone(),
                content_type: String::new(),
                file: Cached {
                    bytes: Bytes::from(vec![0u8; 1024]),
                    meta: m.clone(),
                },
            });
            recent.insert(&i.to_string(), entry);
            assert!(recent.entries.borrow().len() <= MAX_ENTRIES);
            assert!(recent.bytes.get() <= MAX_BYTES);
        }
    }
}
