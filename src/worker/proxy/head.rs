//! The request as the backend gets it: the head rebuilt from the client's (hop-by-hop fields
//! dropped, the route's header changes applied, the framing restated), and the chunked
//! coding the proxy writes where a body's length is not known in advance.

use super::backend::Target;
use crate::shared::config::RouteSecurity;
use crate::worker::http::{self, Framing, Request};
use std::net::IpAddr;

/// What the backend request is made of.
#[derive(Clone, Copy)]
pub struct Proxied<'a> {
    pub req: &'a Request,
    /// The path after the route's prefix.
    pub rest: &'a str,
    pub sec: &'a RouteSecurity,
    pub framing: Framing,
    pub client_ip: IpAddr,
    /// A WebSocket upgrade: a fresh connection, never pooled after.
    pub upgrade: bool,
}

impl Proxied<'_> {
    /// A request that can be sent again when a connection dies before any response byte.
    pub(super) fn idempotent(&self) -> bool {
        self.framing == Framing::None
            && matches!(
                self.req.method.as_str(),
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            )
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1): never forwarded, in either direction.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether `name` must not cross the proxy, given the message's own `Connection` tokens.
pub fn is_hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || connection_tokens
            .iter()
            .any(|t| name.eq_ignore_ascii_case(t))
}

pub fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    values
        .flat_map(|v| v.split(|b| *b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

pub(super) fn is_websocket(req: &Request) -> bool {
    req.method == "GET"
        && req.version == 1
        && req.connection_has("upgrade")
        && req.header("upgrade").is_some_and(|u| {
            String::from_utf8_lossy(u)
                .to_ascii_lowercase()
                .contains("websocket")
        })
}

/// One chunk of chunked transfer coding around `data`.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    chunk_into(&mut out, data);
    out
}

/// Appends one chunk around `data` to `out`.
pub fn chunk_into(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The request head as the backend gets it. Header values go as they came: obs-text bytes
/// (0x80–0xFF) are not re-encoded.
pub(super) fn request_head(p: &Proxied, target: &Target) -> Vec<u8> {
    use std::io::Write;
    let Proxied {
        req,
        rest,
        sec,
        framing,
        client_ip,
        upgrade,
    } = *p;
    let base = &target.url.path;
    let path = if rest.is_empty() {
        base.clone()
    } else {
        format!("{}{}", base.trim_end_matches('/'), http::encode_path(rest))
    };
    let query = req.target.find('?').map_or("", |q| &req.target[q..]);
    let mut out = Vec::with_capacity(512);
    let _ = write!(out, "{} {path}{query} HTTP/1.1\r\n", req.method);
    let tokens = connection_tokens(req.headers_named("connection"));
    let replaced = |name: &str| {
        sec.add_request_headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case(name))
            || sec
                .remove_request_headers
                .iter()
                .any(|k| k.eq_ignore_ascii_case(name))
    };
    if !sec
        .add_request_headers
        .keys()
        .any(|k| k.eq_ignore_ascii_case("host"))
    {
        let _ = write!(out, "Host: {}\r\n", target.url.authority());
    }
    for (name, value) in &req.headers {
        let skip = is_hop_by_hop(name, &tokens)
            || replaced(name)
            || ["host", "content-length", "expect"]
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h));
        if skip {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    let host_value = req.raw_host();
    for (name, value) in &sec.add_request_headers {
        let value = value
            .replace("$client_ip", &client_ip.to_string())
            .replace("$host", &host_value)
            .replace("$request_uri", &req.target);
        let _ = write!(out, "{name}: {value}\r\n");
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    if upgrade {
        out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: ");
        out.extend_from_slice(req.header("upgrade").unwrap_or_default());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> Request {
        match http::parse(raw.as_bytes()) {
            http::Parse::Complete(req, _) => req,
            _ => panic!("test head does not parse: {raw:?}"),
        }
    }

    fn head_for(req: &Request, sec: &RouteSecurity, rest: &str, upgrade: bool) -> String {
        let framing = req.check().expect("a valid test request");
        let target = Target::new("http://127.0.0.1:8081/base/", None, None, None).unwrap();
        let p = Proxied {
            req,
            rest,
            sec,
            framing,
            client_ip: "192.0.2.7".parse().unwrap(),
            upgrade,
        };
        String::from_utf8(request_head(&p, &target)).unwrap()
    }

    #[test]
    fn the_backend_gets_no_hop_by_hop_fields_and_its_own_host() {
        let req = request(
            "POST /app/a%20b?x=1 HTTP/1.1\r\nHost: front.test:8443\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nTE: trailers\r\nExpect: 100-continue\r\nContent-Length: 3\r\nX-Kept: k\r\n\r\n",
        );
        let head = head_for(&req, &RouteSecurity::default(), "/a b", false);
        assert!(
            head.starts_with("POST /base/a%20b?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8081\r\n"),
            "{head}"
        );
        for gone in [
            "X-Secret",
            "Keep-Alive",
            "TE:",
            "Expect",
            "Connection",
            "front.test",
        ] {
            assert!(!head.contains(gone), "{gone} in {head}");
        }
        assert!(head.contains("X-Kept: k\r\n"), "{head}");
        assert!(head.ends_with("Content-Length: 3\r\n\r\n"), "{head}");
    }

    #[test]
    fn added_request_headers_replace_and_expand_variables() {
        let req = request(
            "GET /p?q HTTP/1.1\r\nHost: Front.test\r\nX-Forwarded-For: spoofed\r\nX-Drop: d\r\n\r\n",
        );
        let mut sec = RouteSecurity {
            remove_request_headers: vec!["x-drop".into()],
            ..RouteSecurity::default()
        };
        sec.add_request_headers
            .insert("X-Forwarded-For".into(), "$client_ip".into());
        sec.add_request_headers
            .insert("X-Original".into(), "$host $request_uri".into());
        let head = head_for(&req, &sec, "", false);
        assert!(head.starts_with("GET /base/?q HTTP/1.1\r\n"), "{head}");
        assert!(
            !head.contains("spoofed") && !head.contains("X-Drop"),
            "{head}"
        );
        assert!(head.contains("X-Forwarded-For: 192.0.2.7\r\n"), "{head}");
        assert!(head.contains("X-Original: Front.test /p?q\r\n"), "{head}");
    }

    #[test]
    fn chunked_bodies_stay_chunked_and_upgrades_keep_their_upgrade() {
        let req = request("PUT /u HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
        let head = head_for(&req, &RouteSecurity::default(), "/u", false);
        assert!(
            head.ends_with("Transfer-Encoding: chunked\r\n\r\n"),
            "{head}"
        );
        let req = request(
            "GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert!(is_websocket(&req));
        let head = head_for(&req, &RouteSecurity::default(), "/ws", true);
        assert!(
            head.ends_with("Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            "{head}"
        );
    }

    #[test]
    fn only_bodiless_idempotent_requests_are_replayed() {
        let sec = RouteSecurity::default();
        let replayable = |raw: &str| {
            let req = request(raw);
            let p = Proxied {
                req: &req,
                rest: "",
                sec: &sec,
                framing: req.check().unwrap(),
                client_ip: "192.0.2.1".parse().unwrap(),
                upgrade: false,
            };
            p.idempotent()
        };
        assert!(replayable("GET / HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert!(replayable("DELETE / HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert!(!replayable("POST / HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert!(!replayable(
            "PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n"
        ));
    }

    #[test]
    fn connection_tokens_name_more_hop_by_hop_fields() {
        let values = [&b" Keep-Alive , X-A"[..], b"", b"x-b,,"];
        let tokens = connection_tokens(values.into_iter());
        assert_eq!(tokens, ["keep-alive", "x-a", "x-b"]);
        assert!(is_hop_by_hop("X-A", &tokens));
        assert!(is_hop_by_hop("transfer-encoding", &[]));
        assert!(!is_hop_by_hop("X-C", &tokens));
        assert_eq!(chunk(b"hello"), b"5\r\nhello\r\n");
    }
}
