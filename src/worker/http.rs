//! HTTP/1.1 request heads and response heads.

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
        Err(httparse::Error::TooManyHeaders) => Parse::Invalid("too many header fields"),
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

    pub fn content_length(&self) -> Result<Option<u64>, ()> {
        let mut value = None;
        for v in self.headers_named("content-length") {
            let s = std::str::from_utf8(v).map_err(|_| ())?.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let n: u64 = s.parse().map_err(|_| ())?;
            if value.is_some_and(|old| old != n) {
                return Err(());
            }
            value = Some(n);
        }
        Ok(value)
    }
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
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    pub fn new(status: u16) -> Self {
        ResponseHead {
            status,
            headers: Vec::with_capacity(8),
        }
    }

    /// `Server` and `Date`, set before the route's own header changes so that a route can
    /// remove or replace them.
    pub fn with_defaults(mut self) -> Self {
        self.headers
            .insert(0, ("Server".into(), "zerocopy-server".into()));
        self.set("Date", http_date(std::time::SystemTime::now()));
        self
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.set(name, value);
        self
    }

    /// Sets `name`, replacing any value it had.
    pub fn set(&mut self, name: &str, value: impl Into<String>) {
        self.remove(name);
        self.headers.push((name.to_string(), value.into()));
    }

    pub fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut s = String::with_capacity(256);
        let _ = write!(s, "HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        for (n, v) in &self.headers {
            let _ = write!(s, "{n}: {v}\r\n");
        }
        s.push_str("\r\n");
        s.into_bytes()
    }
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` (IMF-fixdate).
pub fn http_date(t: std::time::SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let (y, m, d) = crate::shared::log::civil_from_days(days);
    let rem = secs % 86_400;
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[m as usize - 1],
        y,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
