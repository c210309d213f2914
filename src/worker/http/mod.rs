//! HTTP/1.1 request heads and response heads.

pub mod body;
pub mod chunked;
pub mod client;
pub mod date;
pub mod respond;
pub mod tls;

use std::fmt::Write as _;

pub const MAX_HEADERS: usize = 100;

/// A parsed request head, owned so that the read buffer can be reused.
pub struct Request {
    pub method: String,
    /// The request target as sent (origin-form or absolute-form).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
}

pub enum Parse {
    Complete(Request, usize),
    Partial,
    Invalid(&'static str),
    TooManyHeaders,
}

pub fn parse(buf: &[u8]) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => Parse::Partial,
        Ok(httparse::Status::Complete(n)) => Parse::Complete(
            Request {
                method: req.method.unwrap_or_default().to_string(),
                target: req.path.unwrap_or_default().to_string(),
                version: req.version.unwrap_or(1),
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_string(), h.value.to_vec()))
                    .collect(),
            },
            n,
        ),
        Err(httparse::Error::TooManyHeaders) => Parse::TooManyHeaders,
        Err(_) => Parse::Invalid("malformed request head"),
    }
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Whether a `Connection` header lists `token`.
    pub fn connection_has(&self, token: &str) -> bool {
        self.headers_named("connection").any(|v| {
            v.split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }

    /// HTTP/1.1 keeps the connection unless `close`; HTTP/1.0 only with `keep-alive`.
    pub fn wants_keep_alive(&self) -> bool {
        if self.version == 1 {
            !self.connection_has("close")
        } else {
            self.connection_has("keep-alive")
        }
    }

    /// The path of the target (origin-form or absolute-form), without the query.
    pub fn path(&self) -> &str {
        let t = self.target.as_str();
        let t = match t.find("://") {
            Some(i) if !t.starts_with('/') => {
                let after = &t[i + 3..];
                after.find('/').map_or("/", |p| &after[p..])
            }
            _ => t,
        };
        t.split(['?', '#']).next().unwrap_or("/")
    }

    /// The Host name: from an absolute-form target, else the Host header; lower-cased, port
    /// removed.
    pub fn host(&self) -> String {
        let raw = if let (Some(i), false) = (self.target.find("://"), self.target.starts_with('/'))
        {
            let after = &self.target[i + 3..];
            after
                .split(['/', '?'])
                .next()
                .unwrap_or("")
                .as_bytes()
                .to_vec()
        } else {
            self.header("host").unwrap_or_default().to_vec()
        };
        let raw = String::from_utf8_lossy(&raw).trim().to_ascii_lowercase();
        strip_port(&raw).to_string()
    }

    /// Checks the head against RFC 9112's framing and field rules. An `Err` is the status to
    /// answer before closing: these are the requests a proxy in front or behind could read
    /// differently (request smuggling), so none of them is served.
    pub fn check(&self) -> Result<Framing, u16> {
        if !valid_target(&self.method, &self.target) {
            return Err(400);
        }
        for (name, value) in &self.headers {
            // httparse refuses CR, LF, obs-fold and space before the colon; NUL and the other
            // controls but HTAB are refused here.
            if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) || name.is_empty() {
                return Err(400);
            }
        }
        let hosts = self.headers_named("host").count();
        if hosts > 1 || (self.version == 1 && hosts == 0) {
            return Err(400);
        }
        if let Some(h) = self.header("host") {
            if !valid_host(h) {
                return Err(400);
            }
        }
        if let Some(e) = self.header("expect") {
            if !e.trim_ascii().eq_ignore_ascii_case(b"100-continue")
                || self.headers_named("expect").count() > 1
            {
                return Err(417);
            }
        }
        let te: Vec<&[u8]> = self
            .headers_named("transfer-encoding")
            .flat_map(|v| v.split(|b| *b == b','))
            .map(|t| t.trim_ascii())
            .collect();
        let cl = self.content_length()?;
        if !te.is_empty() {
            // Only a single, final `chunked`; never together with Content-Length; never in
            // HTTP/1.0, which has no chunked framing.
            if cl.is_some()
                || self.version == 0
                || te.len() != 1
                || !te[0].eq_ignore_ascii_case(b"chunked")
            {
                return Err(400);
            }
            return Ok(Framing::Chunked);
        }
        Ok(match cl {
            None | Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
        })
    }

    /// Content-Length: identical values if repeated, digits only.
    fn content_length(&self) -> Result<Option<u64>, u16> {
        let mut value = None;
        for v in self.headers_named("content-length") {
            let s = v.trim_ascii();
            if s.is_empty() || s.len() > 19 || !s.iter().all(|b| b.is_ascii_digit()) {
                return Err(400);
            }
            let n: u64 = std::str::from_utf8(s)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(400u16)?;
            if value.is_some_and(|old| old != n) {
                return Err(400);
            }
            value = Some(n);
        }
        Ok(value)
    }

    /// The Host as the client sent it (with its port): the `$host` of the spec.
    pub fn raw_host(&self) -> String {
        if let (Some(i), false) = (self.target.find("://"), self.target.starts_with('/')) {
            let after = &self.target[i + 3..];
            return after.split(['/', '?']).next().unwrap_or("").to_string();
        }
        String::from_utf8_lossy(self.header("host").unwrap_or_default()).into_owned()
    }

    pub fn expects_continue(&self) -> bool {
        self.header("expect").is_some()
    }
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

fn valid_target(method: &str, target: &str) -> bool {
    let b = target.as_bytes();
    if b.iter()
        .any(|&c| c <= 0x20 || c == 0x7f || c == b'"' || c == b'<' || c == b'>' || c == b'\\')
    {
        return false;
    }
    if target.starts_with('/') {
        return true;
    }
    if target == "*" {
        return method == "OPTIONS";
    }
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        let after = &target[target.find("://").map_or(0, |i| i + 3)..];
        let authority = after.split(['/', '?', '#']).next().unwrap_or("");
        return !authority.is_empty() && valid_host(authority.as_bytes());
    }
    false
}

/// `host[:port]` or `[v6]:port`, without user info, spaces or controls.
fn valid_host(h: &[u8]) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"-._:[]".contains(&b))
}

/// Percent-decodes `path` and resolves its dot-segments, merging repeated slashes, before any
/// route sees it. `Err` (400): a malformed escape, an encoded `/`, `\` or NUL, a backslash,
/// invalid UTF-8, or `..` above the root.
pub fn normalize_path(path: &str) -> Result<String, ()> {
    if !path.starts_with('/') {
        return Err(());
    }
    let decoded = percent_decode(path)?;
    if decoded.contains(['\\', '\0']) {
        return Err(());
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in decoded.split('/') {
        trailing = false;
        match seg {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                out.pop().ok_or(())?;
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing || s.is_empty() {
        s.push('/');
    }
    Ok(s)
}

/// `%41` → `A`. An encoded `/`, `\` or NUL is refused: it would change how the path splits.
fn percent_decode(s: &str) -> Result<String, ()> {
    if !s.contains('%') {
        return Ok(s.to_string());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // Two hex digits exactly: `u8::from_str_radix` would also take a sign (`%+1`).
            let &[hi, lo] = b.get(i + 1..i + 3).ok_or(())? else {
                return Err(());
            };
            let v = hex_digit(hi)? << 4 | hex_digit(lo)?;
            if v == b'/' || v == b'\\' || v == 0 {
                return Err(());
            }
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

fn hex_digit(b: u8) -> Result<u8, ()> {
    (b as char).to_digit(16).map(|d| d as u8).ok_or(())
}

/// What stays as it is in a URL path: unreserved characters, sub-delims, `:`, `@` and `/`
/// (RFC 3986 §3.3); everything else is percent-encoded.
const PATH_KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@');

/// Percent-encodes what may not stand in a URL path as it is (Location headers, backend
/// request targets).
pub fn encode_path(path: &str) -> String {
    percent_encoding::utf8_percent_encode(path, PATH_KEEP).to_string()
}

fn strip_port(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|h| h.find(']')) {
        return &host[..end + 2];
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// A response head under construction.
pub struct ResponseHead {
    pub status: u16,
    /// The reason phrase to send, when not the standard one (a backend's own).
    pub reason: Option<String>,
    /// Values are bytes: a backend's obs-text (0x80–0xFF) passes through unchanged.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl ResponseHead {
    pub fn new(status: u16) -> Self {
        ResponseHead {
            status,
            reason: None,
            headers: Vec::with_capacity(8),
        }
    }

    /// `Server` and `Date`, set before the route's own header changes so that a route can
    /// remove or replace them.
    pub fn with_defaults(mut self) -> Self {
        self.headers
            .insert(0, ("Server".into(), "zerocopy-server".into()));
        self.set("Date", date::now());
        self
    }

    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.set(name, value);
        self
    }

    /// Sets `name`, replacing any value it had.
    pub fn set(&mut self, name: &str, value: impl Into<Vec<u8>>) {
        self.remove(name);
        self.headers.push((name.to_string(), value.into()));
    }

    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::with_capacity(256);
        let phrase = self
            .reason
            .as_deref()
            .unwrap_or_else(|| reason(self.status));
        let _ = write!(s, "HTTP/1.1 {} {}\r\n", self.status, phrase);
        let mut out = s.into_bytes();
        for (n, v) in &self.headers {
            out.extend_from_slice(n.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(v);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        for (input, want) in [
            ("/", Some("/")),
            ("/a/b", Some("/a/b")),
            ("/a/b/", Some("/a/b/")),
            ("/a/./b", Some("/a/b")),
            ("/a/../b", Some("/b")),
            ("/a/b/..", Some("/a/")),
            ("//a///b", Some("/a/b")),
            ("/%61%62c", Some("/abc")),
            ("/a/%2e%2e/b", Some("/b")),
            ("/..", None),
            ("/a/../..", None),
            ("/%2e%2e/x", None),
            ("/a%2fb", None),
            ("/a%5cb", None),
            ("/a\\b", None),
            ("/a%00b", None),
            ("/a%zz", None),
            ("/a%2", None),
            ("/%ff", None),
            // Found by the property tests: `from_str_radix` took a sign as a digit.
            ("/%+1", None),
            ("/%-1", None),
            ("/% 1", None),
            ("relative", None),
        ] {
            assert_eq!(normalize_path(input).ok().as_deref(), want, "{input}");
        }
    }

    #[test]
    fn encodes_what_a_path_may_not_hold() {
        assert_eq!(encode_path("/a b/ü?#%"), "/a%20b/%C3%BC%3F%23%25");
        assert_eq!(encode_path("/-._~!$&'()*+,;=:@"), "/-._~!$&'()*+,;=:@");
    }

    fn head(raw: &str) -> Request {
        match parse(raw.as_bytes()) {
            Parse::Complete(req, n) => {
                assert_eq!(n, raw.len());
                req
            }
            _ => panic!("test head does not parse: {raw:?}"),
        }
    }

    #[test]
    fn the_host_comes_from_an_absolute_target_first() {
        let r = head("GET http://Abs.test:81/p?q HTTP/1.1\r\nHost: other.test\r\n\r\n");
        assert_eq!(
            (r.host().as_str(), r.raw_host().as_str()),
            ("abs.test", "Abs.test:81")
        );
        assert_eq!(r.path(), "/p");
        let r = head("GET /x#f HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n");
        assert_eq!((r.host().as_str(), r.path()), ("[::1]", "/x"));
    }

    #[test]
    fn keep_alive_follows_the_version() {
        let r = head("GET / HTTP/1.1\r\nHost: t\r\nConnection: foo, Close\r\n\r\n");
        assert!(!r.wants_keep_alive());
        let r = head("GET / HTTP/1.0\r\n\r\n");
        assert!(!r.wants_keep_alive());
        let r = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(r.wants_keep_alive());
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let check = |raw: &str| head(raw).check();
        let te_cl =
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(check(te_cl), Err(400));
        let two_cl = "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(check(two_cl), Err(400));
        let te_gzip = "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(check(te_gzip), Err(400));
        let expect = "POST / HTTP/1.1\r\nHost: t\r\nExpect: magic\r\n\r\n";
        assert_eq!(check(expect), Err(417));
        assert_eq!(
            check("OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n"),
            Ok(Framing::None)
        );
        assert_eq!(check("GET * HTTP/1.1\r\nHost: t\r\n\r\n"), Err(400));
        let same_cl =
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(check(same_cl), Ok(Framing::Length(3)));
    }

    #[test]
    fn a_response_head_is_written_with_its_headers_in_order() {
        let mut h = ResponseHead::new(404).header("X-A", "1").header("X-B", "2");
        h.set("x-a", "3");
        h.remove("X-Gone");
        assert_eq!(
            h.encode(),
            b"HTTP/1.1 404 Not Found\r\nX-B: 2\r\nx-a: 3\r\n\r\n"
        );
        let mut h = ResponseHead::new(299).with_defaults();
        h.reason = Some("Backend Said".into());
        let text = String::from_utf8(h.encode()).unwrap();
        assert!(text.starts_with("HTTP/1.1 299 Backend Said\r\nServer: zerocopy-server\r\nDate: "));
    }
}

/// Property tests: arbitrary bytes never panic the head parser or the path normaliser, and
/// what a well-formed request says comes back out of them unchanged, however it is split.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::select;

    /// A request as a client would write it.
    #[derive(Debug, Clone)]
    struct Wire {
        method: String,
        target: String,
        version: u8,
        headers: Vec<(String, String)>,
    }

    impl Wire {
        fn encode(&self) -> Vec<u8> {
            let mut s = format!(
                "{} {} HTTP/1.{}\r\n",
                self.method, self.target, self.version
            );
            for (n, v) in &self.headers {
                s.push_str(&format!("{n}: {v}\r\n"));
            }
            s.push_str("\r\n");
            s.into_bytes()
        }
    }

    fn method() -> impl Strategy<Value = String> {
        prop_oneof![
            select(vec!["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]).prop_map(String::from),
            "[A-Z][A-Z_-]{0,9}",
        ]
    }

    fn origin_target() -> impl Strategy<Value = String> {
        "/[A-Za-z0-9._~!$&'()*+,;=:@/%?-]{0,40}"
    }

    fn header_name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}"
    }

    /// Visible ASCII, with inner spaces: httparse trims the value's outer whitespace.
    fn header_value() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[!-~]([ -~]{0,30}[!-~])?"]
    }

    /// Names that carry framing or routing are left to the framing property.
    fn plain_header() -> impl Strategy<Value = (String, String)> {
        (header_name(), header_value()).prop_filter("framing or host header", |(n, _)| {
            !["host", "content-length", "transfer-encoding", "expect"]
                .iter()
                .any(|h| n.eq_ignore_ascii_case(h))
        })
    }

    fn wire() -> impl Strategy<Value = Wire> {
        (
            method(),
            origin_target(),
            0u8..2,
            prop::collection::vec(plain_header(), 0..12),
        )
            .prop_map(|(method, target, version, headers)| Wire {
                method,
                target,
                version,
                headers,
            })
    }

    /// Every accessor a connection uses on a parsed head, for the no-panic properties.
    fn exercise(req: &Request) {
        let _ = req.check();
        let _ = (req.host(), req.raw_host(), req.wants_keep_alive());
        let _ = (req.expects_continue(), req.connection_has("upgrade"));
        if let Ok(p) = normalize_path(req.path()) {
            let _ = encode_path(&p);
        }
    }

    fn same(req: &Request, w: &Wire) {
        assert_eq!(req.method, w.method);
        assert_eq!(req.target, w.target);
        assert_eq!(req.version, w.version);
        let got: Vec<(&str, &[u8])> = req
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        let want: Vec<(&str, &[u8])> = w
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(got, want);
    }

    proptest! {
        #![proptest_config(crate::shared::prop::config(512))]

        #[test]
        fn parse_never_panics_on_bytes(buf in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Parse::Complete(req, n) = parse(&buf) {
                prop_assert!(n <= buf.len());
                exercise(&req);
            }
        }

        /// Random edits of a valid head reach the checks behind the parser.
        #[test]
        fn parse_never_panics_on_edited_heads(
            w in wire(),
            host in "[ -~]{0,20}",
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..6),
        ) {
            let mut w = w;
            w.headers.push(("Host".into(), host));
            let mut buf = w.encode();
            for (at, byte, op) in edits {
                let i = at.index(buf.len());
                match op {
                    0 => buf[i] = byte,
                    1 => buf.insert(i, byte),
                    _ => { buf.remove(i); }
                }
            }
            if let Parse::Complete(req, n) = parse(&buf) {
                prop_assert!(n <= buf.len());
                exercise(&req);
            }
        }

        /// A well-formed head parses to what was written, whatever follows it, and every
        /// proper prefix of it is Partial.
        #[test]
        fn parse_round_trips_in_any_split(
            w in wire(),
            tail in prop::collection::vec(any::<u8>(), 0..32),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 1..8),
        ) {
            let head = w.encode();
            for cut in cuts {
                let k = cut.index(head.len());
                prop_assert!(matches!(parse(&head[..k]), Parse::Partial), "prefix {k}");
            }
            let mut buf = head.clone();
            buf.extend_from_slice(&tail);
            match parse(&buf) {
                Parse::Complete(req, n) => {
                    prop_assert_eq!(n, head.len());
                    same(&req, &w);
                }
                _ => prop_assert!(false, "not complete: {:?}", String::from_utf8_lossy(&head)),
            }
        }

        /// `check`'s framing decision, against RFC 9112 §6: Transfer-Encoding and
        /// Content-Length never together, chunked only in HTTP/1.1, Host required in 1.1.
        #[test]
        fn check_decides_framing(
            w in wire(),
            host in prop::option::of("[a-z0-9.-]{1,20}(:[0-9]{1,5})?"),
            length in prop::option::of(0u64..u64::MAX / 2),
            chunked in any::<bool>(),
        ) {
            let mut w = w;
            if let Some(h) = &host {
                w.headers.push(("Host".into(), h.clone()));
            }
            if let Some(n) = length {
                w.headers.push(("Content-Length".into(), n.to_string()));
            }
            if chunked {
                w.headers.push(("Transfer-Encoding".into(), "chunked".into()));
            }
            let Parse::Complete(req, _) = parse(&w.encode()) else {
                return Err(TestCaseError::fail("a valid head did not parse"));
            };
            let no_host = host.is_none() && w.version == 1;
            let want = if no_host || (chunked && (length.is_some() || w.version == 0)) {
                Err(400)
            } else if chunked {
                Ok(Framing::Chunked)
            } else {
                Ok(match length {
                    None | Some(0) => Framing::None,
                    Some(n) => Framing::Length(n),
                })
            };
            prop_assert_eq!(req.check(), want);
            if let Some(h) = host {
                let name = h.split(':').next().unwrap_or_default();
                prop_assert_eq!(req.host(), name);
            }
        }
    }

    /// What a client could put into a path: separators, dots, escapes, and any character.
    fn raw_path() -> impl Strategy<Value = String> {
        prop_oneof![
            "/[/.%0-9a-fA-F\\\\]{0,30}",
            "/[/.%a-z0-9+ -]{0,30}",
            "/\\PC{0,20}",
            "\\PC{0,20}",
        ]
    }

    #[derive(Debug, Clone)]
    enum Seg {
        Name(String),
        Empty,
        Dot,
        DotDot,
    }

    fn seg() -> impl Strategy<Value = Seg> {
        prop_oneof![
            4 => "([A-Za-z0-9_~-]|\\.\\.\\.|[^/\\\\\\x00%]){1,6}"
                .prop_filter("dot segments are generated as such", |n| n != "." && n != "..")
                .prop_map(Seg::Name),
            1 => Just(Seg::Empty),
            1 => Just(Seg::Dot),
            2 => Just(Seg::DotDot),
        ]
    }

    fn join(segs: &[Seg]) -> String {
        let parts: Vec<&str> = segs
            .iter()
            .map(|s| match s {
                Seg::Name(n) => n.as_str(),
                Seg::Empty => "",
                Seg::Dot => ".",
                Seg::DotDot => "..",
            })
            .collect();
        format!("/{}", parts.join("/"))
    }

    /// The normalisation of RFC 3986 §5.2.4 plus slash merging, on segments: `None` when
    /// `..` would climb above the root.
    fn model(segs: &[Seg]) -> Option<String> {
        let mut stack: Vec<&str> = Vec::new();
        let mut trailing = false;
        for s in segs {
            trailing = true;
            match s {
                Seg::Name(n) if n == "." || n == ".." => unreachable!("generated as Dot/DotDot"),
                Seg::Name(n) => {
                    stack.push(n);
                    trailing = false;
                }
                Seg::Empty | Seg::Dot => {}
                Seg::DotDot => {
                    stack.pop()?;
                }
            }
        }
        let mut out: String = stack.iter().map(|s| format!("/{s}")).collect();
        if trailing || out.is_empty() {
            out.push('/');
        }
        Some(out)
    }

    /// Percent-encodes the bytes picked by `mask` (never a `/`), in either hex case.
    fn encode_some(path: &str, mask: &[bool]) -> String {
        let mut out = String::new();
        for (i, b) in path.bytes().enumerate() {
            let pick = mask.get(i % mask.len().max(1)).copied().unwrap_or(false);
            if b == b'/' || !(pick || b >= 0x80 || b == b'%') {
                out.push(b as char);
            } else if i % 2 == 0 {
                out.push_str(&format!("%{b:02X}"));
            } else {
                out.push_str(&format!("%{b:02x}"));
            }
        }
        out
    }

    fn well_formed(n: &str) -> Result<(), TestCaseError> {
        prop_assert!(n.starts_with('/'), "{n}");
        prop_assert!(!n.contains("//"), "{n}");
        for seg in n.split('/') {
            prop_assert!(seg != "." && seg != "..", "dot segment in {n}");
        }
        prop_assert!(!n.contains(['\\', '\0']), "{n}");
        Ok(())
    }

    proptest! {
        #![proptest_config(crate::shared::prop::config(1024))]

        #[test]
        fn normalize_path_output_is_canonical(p in raw_path()) {
            let Ok(n) = normalize_path(&p) else { return Ok(()) };
            well_formed(&n)?;
            // Only complete escapes decode.
            let b = p.as_bytes();
            for (i, _) in p.match_indices('%') {
                let hex = b.get(i + 1..i + 3).unwrap_or_default();
                prop_assert!(hex.len() == 2 && hex.iter().all(u8::is_ascii_hexdigit), "{p}");
            }
            // In URL form (as a Location header or a backend request carries it) the
            // normalised path is a fixed point.
            prop_assert_eq!(normalize_path(&encode_path(&n)), Ok(n.clone()));
            if !n.contains('%') {
                prop_assert_eq!(normalize_path(&n), Ok(n.clone()));
            }
        }

        /// Dot-segments and slashes resolve as on segments, however the path is escaped,
        /// and never above the root.
        #[test]
        fn normalize_path_matches_the_segment_model(
            segs in prop::collection::vec(seg(), 0..10),
            mask in prop::collection::vec(any::<bool>(), 1..8),
        ) {
            let plain = join(&segs);
            let want = model(&segs);
            prop_assert_eq!(normalize_path(&plain).ok(), want.clone());
            let escaped = encode_some(&plain, &mask);
            prop_assert_eq!(normalize_path(&escaped).ok(), want, "{}", escaped);
        }

        #[test]
        fn encode_path_writes_only_path_characters(p in "\\PC{0,30}") {
            let e = encode_path(&p);
            let bad = |b: u8| !b.is_ascii_graphic() || b"\"<>\\^`{|}#?".contains(&b);
            prop_assert!(!e.bytes().any(bad), "{}", e);
        }
    }
}
