//! The access log: one line per answered request (and per WebSocket tunnel, at its close),
//! formatted in the worker and handed to a writer thread through a bounded channel. The
//! worker never waits on the file: when the channel is full the line is dropped and counted
//! in the worker's shared-memory slot (`access_log_dropped`).

use crate::shared::config::{AccessLogFormat, LoggingConfig};
use crate::shared::log::{self, LineSender, LogFile};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

pub struct AccessLog {
    lines: LineSender,
    format: AccessLogFormat,
    dropped: &'static AtomicU64,
}

/// What a line says of a request besides its outcome, taken from its head.
pub struct Request {
    pub peer: IpAddr,
    /// `GET /a?b HTTP/1.1`, or the first line as received for a head that did not parse.
    pub line: String,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
    /// The backend that answered, and when the proxy started on it.
    pub upstream: Option<(Option<SocketAddr>, Instant)>,
}

/// The outcome of a request, as the line reports it.
pub struct Done {
    pub status: u16,
    /// Body bytes sent to the client (for a tunnel: every byte sent to it).
    pub sent: u64,
    /// Body bytes read from the client (for a tunnel: every byte read from it).
    pub received: u64,
    pub took: Duration,
}

/// Opens the file (before privileges are dropped, as the error log is).
pub fn open(cfg: &LoggingConfig) -> std::io::Result<Option<LogFile>> {
    cfg.access_log.as_deref().map(LogFile::open).transpose()
}

impl AccessLog {
    /// Starts the writer thread: after fork, in the worker.
    pub fn start(
        file: LogFile,
        cfg: &LoggingConfig,
        dropped: &'static AtomicU64,
    ) -> std::io::Result<AccessLog> {
        let every = Duration::from_millis(cfg.flush_interval_ms);
        let lines = log::start_line_writer(file, cfg.channel_size, every)?;
        Ok(AccessLog {
            lines,
            format: cfg.access_format().unwrap_or_default(),
            dropped,
        })
    }

    pub fn write(&self, r: &Request, d: &Done) {
        let line = format_line(self.format, r, d, time::OffsetDateTime::now_utc());
        if !self.lines.send(line.into_bytes()) {
            self.dropped.fetch_add(1, Relaxed);
        }
    }
}

fn format_line(
    format: AccessLogFormat,
    r: &Request,
    d: &Done,
    now: time::OffsetDateTime,
) -> String {
    let mut s = String::with_capacity(256);
    let time_local = format!(
        "{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000",
        now.day(),
        MONTHS[u8::from(now.month()) as usize - 1],
        now.year(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let request_time = format!("{:.3}", d.took.as_secs_f64());
    let upstream_addr = r
        .upstream
        .as_ref()
        .map(|(a, _)| a.map_or_else(|| "-".to_string(), |a| a.to_string()));
    let upstream_time = r
        .upstream
        .as_ref()
        .map(|(_, t)| format!("{:.3}", t.elapsed().as_secs_f64()));
    match format {
        AccessLogFormat::Combined => {
            let _ = write!(s, "{} - - [{time_local}] \"", r.peer);
            escape_nginx(&mut s, &r.line);
            let _ = write!(s, "\" {} {} \"", d.status, d.sent);
            escape_nginx(&mut s, r.referer.as_deref().unwrap_or("-"));
            s.push_str("\" \"");
            escape_nginx(&mut s, r.user_agent.as_deref().unwrap_or("-"));
            let _ = write!(
                s,
                "\" {request_time} {} {}",
                upstream_addr.as_deref().unwrap_or("-"),
                upstream_time.as_deref().unwrap_or("-")
            );
        }
        AccessLogFormat::Json => {
            let _ = write!(
                s,
                "{{\"remote_addr\":\"{}\",\"time_local\":\"{time_local}\",\"request\":",
                r.peer
            );
            json_string(&mut s, &r.line);
            let _ = write!(
                s,
                ",\"status\":{},\"body_bytes_sent\":{},\"request_body_bytes\":{},\"http_referer\":",
                d.status, d.sent, d.received
            );
            json_opt(&mut s, r.referer.as_deref());
            s.push_str(",\"http_user_agent\":");
            json_opt(&mut s, r.user_agent.as_deref());
            let _ = write!(s, ",\"request_time\":{request_time},\"upstream_addr\":");
            json_opt(&mut s, upstream_addr.as_deref());
            s.push_str(",\"upstream_response_time\":");
            s.push_str(upstream_time.as_deref().unwrap_or("null"));
            s.push('}');
        }
    }
    s.push('\n');
    s
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// As nginx escapes variables in a log line: `"`, `\` and bytes outside printable ASCII
/// as `\xHH`, so a client cannot forge a field or a line.
fn escape_nginx(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b as char);
        }
    }
}

fn json_opt(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_string(out, s),
        None => out.push_str("null"),
    }
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A header value as text for the log (bytes that are not UTF-8 are replaced).
pub fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            peer: "192.0.2.7".parse().unwrap(),
            line: "GET /a?\"b\" HTTP/1.1".into(),
            referer: None,
            user_agent: Some("ua\u{1}\u{e9}".into()),
            upstream: None,
        }
    }

    fn done() -> Done {
        Done {
            status: 200,
            sent: 12,
            received: 0,
            took: Duration::from_millis(3),
        }
    }

    fn at() -> time::OffsetDateTime {
        time::OffsetDateTime::from_unix_timestamp(1_767_323_045).unwrap()
    }

    #[test]
    fn combined_escapes_as_nginx_does() {
        let line = format_line(AccessLogFormat::Combined, &request(), &done(), at());
        assert_eq!(
            line,
            "192.0.2.7 - - [02/Jan/2026:03:04:05 +0000] \"GET /a?\\x22b\\x22 HTTP/1.1\" 200 12 \"-\" \"ua\\x01\\xC3\\xA9\" 0.003 - -\n"
        );
    }

    #[test]
    fn json_escapes_and_uses_null_for_what_is_missing() {
        let line = format_line(AccessLogFormat::Json, &request(), &done(), at());
        assert!(
            line.starts_with("{\"remote_addr\":\"192.0.2.7\",\"time_local\":\"02/Jan/2026:03:04:05 +0000\",\"request\":\"GET /a?\\\"b\\\" HTTP/1.1\",\"status\":200,"),
            "{line}"
        );
        assert!(line.contains("\"http_referer\":null"), "{line}");
        assert!(
            line.contains("\"http_user_agent\":\"ua\\u0001\u{e9}\""),
            "{line}"
        );
        assert!(
            line.ends_with("\"upstream_addr\":null,\"upstream_response_time\":null}\n"),
            "{line}"
        );
    }
}
