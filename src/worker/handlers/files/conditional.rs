//! The validators of a file (ETag, Last-Modified), conditional requests and byte ranges of
//! RFC 9110, and the Content-Type.

use crate::worker::http::{self, Request};
use std::path::Path;
use std::time::UNIX_EPOCH;

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
        http::date::format(UNIX_EPOCH + std::time::Duration::from_secs(self.modified))
    }

    /// If-None-Match (weak comparison), else If-Modified-Since: the client's copy is current.
    pub fn not_modified(&self, req: &Request) -> bool {
        if let Some(inm) = req.header("if-none-match") {
            return etag_list_matches(inm, &self.etag, false);
        }
        match req.header("if-modified-since").and_then(http::date::parse) {
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
            Some(v) => http::date::parse(v) == Some(self.modified),
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

#[cfg(test)]
mod tests {
    use super::*;

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
            if let Some(secs) = http::date::parse(&v) {
                // Whatever parses is a time this server can write back.
                let _ = http::date::format(UNIX_EPOCH + std::time::Duration::from_secs(secs));
            }
            let req = request("GET", vec![("If-Modified-Since", v.clone()), ("If-Range", v)]);
            let _ = validators().not_modified(&req);
            let _ = range(&req, 10, &validators());
        }

        #[test]
        fn etag_lists_never_panic(list in prop::collection::vec(any::<u8>(), 0..60), strong in any::<bool>()) {
            let _ = etag_list_matches(&list, "\"5f.0-a\"", strong);
        }
    }
}
