//! What a routed request is answered with: per-route access checks, then the route's
//! handler. Everything here decides a response; nothing here does I/O on the client socket.

pub mod diskfile;
pub mod files;

use files::{RangeAnswer, Resolved, Validators};
use crate::worker::http::{self, Request, ResponseHead};
use crate::worker::http::respond::{Body, Response};
use crate::worker::router::{FileRoute, Handler, Matched, RedirectRoute, RouteEntry};
use crate::shared::shm::Region;
use bytes::Bytes;
use std::net::IpAddr;

/// Access checks of the route's `security` table, in the spec's order: IP (deny first), then
/// method, then the rate limit. `None`: allowed.
pub fn refuse(req: &Request, route: &RouteEntry, ip: IpAddr, region: &Region) -> Option<Response> {
    let denied = route.denied.iter().any(|n| n.contains(&ip));
    let allowed = route.allowed.is_empty() || route.allowed.iter().any(|n| n.contains(&ip));
    if denied || !allowed {
        return Some(Response::error(403));
    }
    let methods = &route.security.allowed_methods;
    if !methods.is_empty() && !methods.contains(&req.method) {
        let mut r = Response::error(405);
        r.head.set("Allow", methods.join(", "));
        return Some(r);
    }
    let limit = route.security.rate_limit_requests_per_min;
    if limit > 0 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if !region
            .header
            .rate_admit(rate_key(&route.name, ip), now, limit)
        {
            let mut r = Response::error(429);
            r.head.set("Retry-After", (60 - now % 60).to_string());
            return Some(r);
        }
    }
    None
}

/// The rate limiter's key: the route (by its config key, stable over reloads) and the client.
/// An IPv6 client is its /64: one host is routinely given a whole /64, and keying by full
/// address would give it 2^64 separate limits.
fn rate_key(route: &str, ip: IpAddr) -> u64 {
    let client = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets()[..8].to_vec(),
    };
    let bytes = route.bytes().chain([0u8]).chain(client);
    crate::shared::fnv1a(bytes) | 1
}

pub fn handle(req: &Request, m: &Matched) -> Response {
    match &m.route.handler {
        Handler::File(f) => serve_file(req, f, m),
        Handler::Redirect(r) => redirect(req, r, &m.rest),
        Handler::Welcome => welcome(req),
        // Proxied before reaching here (`proxy::forward`).
        Handler::Proxy(_) => Response::error(500),
    }
}

fn serve_file(req: &Request, route: &FileRoute, m: &Matched) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        let mut r = Response::error(405);
        r.head.set("Allow", "GET, HEAD");
        return r;
    }
    let (path, meta, opened, cached) = match files::resolve(route, &m.rest, m.exact) {
        Resolved::File { path, file, meta } => (path, meta, Some(file), None),
        Resolved::Cached { path, file } => (path, file.meta.clone(), None, Some(&file.bytes)),
        Resolved::NotFound => return Response::error(404),
        Resolved::Forbidden => return Response::error(403),
        Resolved::BadRequest => return Response::error(400),
    };
    // A memory route serves what it read: its length, not the length stat'ed before reading.
    let len = cached.map_or(meta.len(), |b| b.len() as u64);
    let v = Validators::new(&meta, len);
    let mut head = ResponseHead::new(200)
        .header("Content-Type", files::content_type(&path))
        .header("Last-Modified", v.last_modified())
        .header("ETag", v.etag.clone())
        .header("Accept-Ranges", "bytes");
    if v.not_modified(req) {
        head.status = 304;
        head.remove("Content-Type");
        return Response::new(head, Body::Empty);
    }
    let (start, count) = match files::range(req, len, &v) {
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

fn redirect(req: &Request, r: &RedirectRoute, rest: &str) -> Response {
    let path_var = if rest.is_empty() { "/" } else { rest };
    let mut location = r
        .url
        .replace("$request_uri", &req.target)
        .replace("$path", &http::encode_path(path_var));
    if r.preserve_path {
        location.push_str(&http::encode_path(rest));
        if let Some(q) = req.target.find('?') {
            location.push_str(&req.target[q..]);
        }
    }
    let head = ResponseHead::new(r.status)
        .header("Location", location)
        .header("Content-Type", "text/plain; charset=utf-8");
    let body = format!("{} {}\n", r.status, http::reason(r.status));
    Response::new(head, Body::Bytes(Bytes::from(body)))
}

const WELCOME: &str = "<!DOCTYPE html>\n<html><head><title>zerocopy-server</title></head>\n<body><h1>zerocopy-server is running</h1>\n<p>This is the built-in default configuration. Write a <code>config.toml</code> and run <code>zerocopy-server -c config.toml</code>.</p>\n<p>Metrics: <a href=\"/__metrics\">/__metrics</a></p></body></html>\n";

fn welcome(req: &Request) -> Response {
    if req.path() != "/" {
        return Response::error(404);
    }
    let head = ResponseHead::new(200).header("Content-Type", "text/html; charset=utf-8");
    Response::new(head, Body::Bytes(Bytes::from_static(WELCOME.as_bytes())))
}

/// The metrics endpoint, if `path` is its path: the metrics, or for an address that may not
/// read them the plain 404 of an unknown path (no route takes the request over). `None`: not
/// the metrics path, route as usual.
pub fn metrics(ctx: &crate::worker::server::Ctx, path: &str, ip: IpAddr) -> Option<Response> {
    let access = &ctx.router.metrics;
    if path != access.path {
        return None;
    }
    if !access.allows(ip) {
        return Some(Response::error(404));
    }
    let text = crate::shared::metrics::render(ctx.region, &ctx.upstream_labels);
    let head =
        ResponseHead::new(200).header("Content-Type", "text/plain; version=0.0.4; charset=utf-8");
    Some(Response::new(head, Body::Bytes(Bytes::from(text))))
}

#[cfg(test)]
mod tests {
    use super::rate_key;
    use std::net::IpAddr;

    fn key(route: &str, ip: &str) -> u64 {
        rate_key(route, ip.parse::<IpAddr>().unwrap())
    }

    #[test]
    fn ipv6_clients_share_a_rate_key_per_64_bit_prefix() {
        let a = key("r", "2001:db8:1:2::1");
        assert_eq!(a, key("r", "2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_ne!(a, key("r", "2001:db8:1:3::1"), "another /64");
        assert_ne!(a, key("other", "2001:db8:1:2::1"), "another route");
        assert_ne!(key("r", "192.0.2.1"), key("r", "192.0.2.2"));
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;
    use crate::shared::config::RouteSecurity;
    use crate::worker::router::Cached;

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
        };
        let entry = RouteEntry {
            name: "t".into(),
            prefix: "/f.txt".into(),
            handler: Handler::File(route),
            security: RouteSecurity::default(),
            allowed: vec![],
            denied: vec![],
        };
        let m = Matched {
            route: &entry,
            rest: String::new(),
            exact: true,
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
            let r = handle(&req, &m);
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
