//! `File` routes: mapping a request path onto the route's file or directory, and the
//! validators (ETag, Last-Modified), conditional requests and byte ranges of RFC 9110.
//!
//! Staying inside the root: the request path reaches this module already percent-decoded,
//! with dot-segments resolved and encoded `/`, `\` and NUL refused (`http::normalize_path`).
//! The rest after the route's prefix is joined to the root segment by segment; the file found
//! is then resolved through its symlinks and must still lie under the root's own resolved
//! path, else 404.

use super::diskfile::{self, Opened};
use crate::worker::http::{self, Request};
use crate::worker::router::{Cached, FileRoute};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

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
    NotFound,
    /// The worker's user may not read it.
    Forbidden,
    BadRequest,
}

/// `rest`: the normalized path after the route's prefix. `exact`: the request path is the
/// prefix itself, which is all an exact-file route answers (`/robots.txt/extra` is 404).
pub fn resolve<'a>(route: &'a FileRoute, rest: &str, exact: bool) -> Resolved<'a> {
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
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = diskfile::OPEN_FLAGS as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
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

/// What a file's validators say about it.
pub struct Validators {
    pub etag: String,
    /// Last modification, whole seconds since the epoch.
    pub modified: u64,
}

impl Validators {
    /// A strong ETag from modification time (with nanoseconds) and size, as nginx does with
    /// seconds: two versions of a file differ in one or the other. `len`: the size served,
    /// which for a memory route is what was read, not what was stat'ed.
    pub fn new(meta: &std::fs::Metadata, len: u64) -> Self {
        let t = meta.modified().unwrap_or(UNIX_EPOCH);
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        Validators {
            etag: format!("\"{:x}.{:x}-{:x}\"", d.as_secs(), d.subsec_nanos(), len),
            modified: d.as_secs(),
        }
    }

    pub fn last_modified(&self) -> String {
        http::http_date(UNIX_EPOCH + std::time::Duration::from_secs(self.modified))
    }

    /// If-None-Match (weak comparison), else If-Modified-Since: the client's copy is current.
    pub fn not_modified(&self, req: &Request) -> bool {
        if let Some(inm) = req.header("if-none-match") {
            return etag_list_matches(inm, &self.etag, false);
        }
        match req.header("if-modified-since").and_then(parse_http_date) {
            Some(since) => self.modified <= since,
            None => false,
        }
    }

    /// If-Range: the range applies only if the client's validator is still current (a strong
    /// ETag match, or exactly the Last-Modified date).
    fn range_applies(&self, req: &Request) -> bool {
        match req.header("if-range") {
            None => true,
            Some(v) if v.starts_with(b"\"") || v.starts_with(b"W/") => {
                etag_list_matches(v, &self.etag, true)
            }
            Some(v) => parse_http_date(v) == Some(self.modified),
        }
    }
}

fn etag_list_matches(list: &[u8], etag: &str, strong: bool) -> bool {
    let list = String::from_utf8_lossy(list);
    if list.trim() == "*" {
        return true;
    }
    list.split(',').map(str::trim).any(|tag| {
        if strong {
            tag == etag
        } else {
            tag.trim_start_matches("W/") == etag
        }
    })
}

#[derive(Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No (usable) Range: the whole file, 200.
    Full,
    /// Bytes `start..=end`, 206.
    Partial(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// A single byte range of a GET. Several ranges, or a Range that does not parse, get the
/// whole file (RFC 9110 allows ignoring Range).
pub fn range(req: &Request, len: u64, v: &Validators) -> RangeAnswer {
    let Some(value) = req.header("range") else {
        return RangeAnswer::Full;
    };
    if req.method != "GET" || !v.range_applies(req) {
        return RangeAnswer::Full;
    }
    let Some(spec) = std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().strip_prefix("bytes="))
    else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    // A range that does not parse is ignored (200), never judged unsatisfiable (416); nor
    // is one whose last byte comes before its first (RFC 9110 §14.1.1).
    if (!a.is_empty() && num(a).is_none()) || (!b.is_empty() && num(b).is_none()) {
        return RangeAnswer::Full;
    }
    match (num(a), num(b)) {
        // bytes=-N: the last N bytes
        (None, Some(n)) if n > 0 && len > 0 => RangeAnswer::Partial(len.saturating_sub(n), len - 1),
        (None, Some(_)) => RangeAnswer::Unsatisfiable,
        (Some(start), Some(end)) if start > end => RangeAnswer::Full,
        (Some(start), _) if start >= len => RangeAnswer::Unsatisfiable,
        (Some(start), None) => RangeAnswer::Partial(start, len - 1),
        (Some(start), Some(end)) => RangeAnswer::Partial(start, end.min(len - 1)),
        (None, None) => RangeAnswer::Full,
    }
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) to seconds since the epoch.
pub fn parse_http_date(v: &[u8]) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let s = std::str::from_utf8(v).ok()?.trim();
    let mut parts = s.split(' ');
    let (_day, d, mon, y, hms, gmt) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if gmt != "GMT" || parts.next().is_some() {
        return None;
    }
    // Fixed-width digits, as IMF-fixdate has them: a year of any length would overflow the
    // day arithmetic below.
    let digits = |s: &str, n: usize| -> Option<u64> {
        (s.len() == n && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let d = digits(d, 2)? as u32;
    let m = MONTHS.iter().position(|x| *x == mon)? as u32 + 1;
    let y = digits(y, 4)? as i64;
    let mut t = hms.split(':');
    let (hh, mm, ss) = (
        digits(t.next()?, 2)?,
        digits(t.next()?, 2)?,
        digits(t.next()?, 2)?,
    );
    if t.next().is_some() || d == 0 || d > 31 || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let days = days_from_civil(y, m, d);
    if days < 0 {
        return None;
    }
    Some(days as u64 * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// (year, month, day) to days since 1970-01-01; Howard Hinnant's algorithm.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp as i64 + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_round_trip() {
        for secs in [0u64, 784_111_777, 1_700_000_000, 4_102_444_800] {
            let text = http::http_date(UNIX_EPOCH + std::time::Duration::from_secs(secs));
            assert_eq!(parse_http_date(text.as_bytes()), Some(secs), "{text}");
        }
        assert_eq!(
            parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(parse_http_date(b"garbage"), None);
    }

    fn ranged(value: &str, len: u64) -> RangeAnswer {
        let head = format!("GET / HTTP/1.1\r\nHost: t\r\nRange: {value}\r\n\r\n");
        let http::Parse::Complete(req, _) = http::parse(head.as_bytes()) else {
            panic!("test head does not parse: {value:?}");
        };
        let v = Validators {
            etag: "\"e\"".into(),
            modified: 0,
        };
        range(&req, len, &v)
    }

    #[test]
    fn ranges_at_the_edges_never_go_past_the_file() {
        use RangeAnswer::*;
        let huge = "99999999999999999999999999";
        for (value, len, want) in [
            ("bytes=0-0", 1, Partial(0, 0)),
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=-0", 10, Unsatisfiable),
            ("bytes=-0", 0, Unsatisfiable),
            ("bytes=-5", 0, Unsatisfiable),
            ("bytes=-50", 10, Partial(0, 9)),
            ("bytes=9-", 10, Partial(9, 9)),
            ("bytes=10-", 10, Unsatisfiable),
            ("bytes=5-1000000", 10, Partial(5, 9)),
            ("bytes=18446744073709551615-", 10, Unsatisfiable),
            (
                "bytes=0-18446744073709551615",
                u64::MAX,
                Partial(0, u64::MAX - 1),
            ),
            ("bytes=-18446744073709551615", 10, Partial(0, 9)),
            (&format!("bytes={huge}-"), 10, Full),
            (&format!("bytes=0-{huge}"), 10, Full),
            (&format!("bytes=-{huge}"), 10, Full),
            ("bytes=5-3", 10, Full),
            ("bytes=-", 10, Full),
            ("bytes=--1", 10, Full),
            ("bytes=+1-2", 10, Full),
            ("bytes=1-2,4-5", 10, Full),
            ("bytes=\u{e9}-1", 10, Full),
            ("items=0-1", 10, Full),
        ] {
            let got = ranged(value, len);
            assert_eq!(got, want, "{value} of {len}");
            if let Partial(a, b) = got {
                assert!(a <= b && b < len, "{value} of {len}: {a}-{b}");
            }
        }
    }

    #[test]
    fn absurd_dates_do_not_overflow() {
        for date in [
            "Sun, 06 Nov 9223372036854775807 08:49:37 GMT",
            "Sun, 06 Nov -9223372036854775808 08:49:37 GMT",
            "Sun, 06 Nov 0 08:49:37 GMT",
            "Sun, 06 Nov 1994 99999999999999999999:49:37 GMT",
            "Sun, 99 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(date.as_bytes()), None, "{date}");
        }
        assert!(parse_http_date(b"Fri, 31 Dec 9999 23:59:59 GMT").is_some());
    }

    /// Found by the property tests: a range that does not parse, or ends before it starts,
    /// is ignored (200), not answered 416 because its start lies past the end.
    #[test]
    fn invalid_ranges_past_the_end_are_ignored() {
        let v = Validators {
            etag: "\"x\"".into(),
            modified: 0,
        };
        for (value, len) in [("bytes=4425-0", 0), ("bytes=10-abc", 5), ("bytes=9-3", 5)] {
            let req = Request {
                method: "GET".into(),
                target: "/".into(),
                version: 1,
                headers: vec![("Range".into(), value.as_bytes().to_vec())],
            };
            assert_eq!(range(&req, len, &v), RangeAnswer::Full, "{value}");
        }
    }

    /// A year of 19 digits overflowed `days_from_civil` (a panic with overflow checks, a
    /// wrong date without); `props::http_dates_never_panic` reproduces it on the old parser.
    #[test]
    fn http_date_with_a_huge_year_is_no_date() {
        for v in [
            &b"Sun, 06 Nov 9223372036854775807 08:49:37 GMT"[..],
            b"Sun, 06 Nov -9223372036854775808 08:49:37 GMT",
            b"Sun, 06 Nov 99999 08:49:37 GMT",
            b"Sun, 6 Nov 1994 08:49:37 GMT",
            b"Sun, 06 Nov 1994 08:49:37:00 GMT",
            b"Sun, +6 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(v), None, "{}", String::from_utf8_lossy(v));
        }
    }
}

/// Property tests: the Range header and the validators of any client never panic, and a
/// range answered lies inside the file.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn request(method: &str, headers: Vec<(&str, Vec<u8>)>) -> Request {
        Request {
            method: method.into(),
            target: "/f".into(),
            version: 1,
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
        }
    }

    fn validators() -> Validators {
        Validators {
            etag: "\"5f.0-a\"".into(),
            modified: 784_111_777,
        }
    }

    fn len() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..4, 0u64..10_000, any::<u64>()]
    }

    /// A number as a client may write it, overflowing ones included.
    fn number() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u64..20_000).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            "[0-9]{20,25}",
            "0[0-9]{1,3}",
        ]
    }

    /// What RFC 9110 §14.1.2 makes of one `first-last` or `-suffix` range; `None`: ignored.
    fn model(first: Option<u64>, last: Option<u64>, len: u64) -> Option<RangeAnswer> {
        Some(match (first, last) {
            (None, None) => return None,
            (None, Some(0)) => RangeAnswer::Unsatisfiable,
            (None, Some(_)) if len == 0 => RangeAnswer::Unsatisfiable,
            (None, Some(n)) => RangeAnswer::Partial(len - n.min(len), len - 1),
            (Some(a), Some(b)) if a > b => return None,
            (Some(a), _) if a >= len => RangeAnswer::Unsatisfiable,
            (Some(a), None) => RangeAnswer::Partial(a, len - 1),
            (Some(a), Some(b)) => RangeAnswer::Partial(a, b.min(len - 1)),
        })
    }

    /// IMF-fixdate's shape, each field mostly valid, sometimes a number of any size and sign.
    fn date_like() -> impl Strategy<Value = String> {
        let field = |valid: std::ops::Range<i64>, digits: &'static str| {
            prop_oneof![
                3 => valid.prop_map(|n| format!("{n:02}")),
                1 => any::<i64>().prop_map(|n| n.to_string()),
                1 => digits,
            ]
        };
        (
            field(1..32, "[0-9+-]{1,3}"),
            prop::sample::select(vec!["Jan", "Feb", "Nov", "Dec", "nov", "Foo"]),
            field(1900..10_000, "[0-9+-]{1,22}"),
            (
                field(0..24, "[0-9]{1,3}"),
                field(0..60, "[0-9]{1,3}"),
                field(0..61, "[0-9]{1,3}"),
            ),
        )
            .prop_map(|(d, mon, y, (hh, mm, ss))| format!("Sun, {d} {mon} {y} {hh}:{mm}:{ss} GMT"))
    }

    proptest! {
        #![proptest_config(crate::shared::prop::config(1024))]

        #[test]
        fn range_never_leaves_the_file(
            value in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..40),
                "bytes=[0-9 ,-]{0,30}".prop_map(String::into_bytes),
            ],
            if_range in prop::option::of(prop::collection::vec(any::<u8>(), 0..40)),
            len in len(),
        ) {
            let mut headers = vec![("Range", value)];
            if let Some(v) = if_range {
                headers.push(("If-Range", v));
            }
            match range(&request("GET", headers), len, &validators()) {
                RangeAnswer::Partial(a, b) => prop_assert!(a <= b && b < len, "{a}-{b}/{len}"),
                RangeAnswer::Full | RangeAnswer::Unsatisfiable => {}
            }
        }

        #[test]
        fn range_follows_rfc_9110(
            first in prop::option::of(number()),
            last in prop::option::of(number()),
            len in len(),
            spaces in any::<bool>(),
        ) {
            let pad = if spaces { " " } else { "" };
            let value = format!(
                "bytes={pad}{}-{}{pad}",
                first.as_deref().unwrap_or(""),
                last.as_deref().unwrap_or("")
            );
            let parse = |s: &Option<String>| s.as_ref().map(|s| s.parse::<u64>().ok());
            let (first, last) = (parse(&first), parse(&last));
            let want = if first == Some(None) || last == Some(None) {
                // Past u64: not a range this server can mean.
                RangeAnswer::Full
            } else {
                model(first.flatten(), last.flatten(), len).unwrap_or(RangeAnswer::Full)
            };
            let req = request("GET", vec![("Range", value.clone().into_bytes())]);
            prop_assert_eq!(range(&req, len, &validators()), want, "{}", value);
            // Only GET has ranges; an If-Range that does not match the file asks for all of it.
            let req = request("HEAD", vec![("Range", value.clone().into_bytes())]);
            prop_assert_eq!(range(&req, len, &validators()), RangeAnswer::Full);
            let stale = ("If-Range", b"\"other\"".to_vec());
            let req = request("GET", vec![("Range", value.into_bytes()), stale]);
            prop_assert_eq!(range(&req, len, &validators()), RangeAnswer::Full);
        }

        #[test]
        fn http_dates_never_panic(
            v in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..40),
                date_like().prop_map(String::into_bytes),
            ],
        ) {
            if let Some(secs) = parse_http_date(&v) {
                // Whatever parses is a time this server can write back.
                let _ = http::http_date(UNIX_EPOCH + std::time::Duration::from_secs(secs));
            }
            let req = request("GET", vec![("If-Modified-Since", v.clone()), ("If-Range", v)]);
            let _ = validators().not_modified(&req);
            let _ = range(&req, 10, &validators());
        }

        /// Every second from 1970 to the end of year 9999 writes and reads back unchanged.
        #[test]
        fn http_dates_round_trip(secs in 0u64..253_402_300_800) {
            let text = http::http_date(UNIX_EPOCH + std::time::Duration::from_secs(secs));
            prop_assert_eq!(parse_http_date(text.as_bytes()), Some(secs), "{}", text);
        }

        #[test]
        fn etag_lists_never_panic(list in prop::collection::vec(any::<u8>(), 0..60), strong in any::<bool>()) {
            let _ = etag_list_matches(&list, "\"5f.0-a\"", strong);
        }
    }
}
