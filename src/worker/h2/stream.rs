//! One HTTP/2 stream: its request as the HTTP/1.1 path sees a request (`http::Request`, with
//! `Host` from `:authority`), the same checks (framing, path), the same decision
//! (`Dispatch::route`: metrics, route, limits, access, handler), and its answer in frames.
//!
//! What HTTP/2 forbids in a request (connection-specific fields, `TE` other than `trailers`,
//! upper-case names, a `content-length` the DATA frames disagree with) never reaches here:
//! the `h2` crate treats such a request as malformed and resets the stream with
//! PROTOCOL_ERROR, as RFC 9113 §8.1.1 requires (HTTP/1.1 answers 400 to the same requests).

use super::body::StreamBody;
use super::send::{body_timeout, finish};
use super::{Shared, StreamOpen};
use crate::shared::config::RouteSecurity;
use crate::worker::ctx::Ctx;
use crate::worker::dispatch::{Dispatch, Routed};
use crate::worker::exchange::{canonical_ip, Incoming, Meta};
use crate::worker::http::respond::{Body, Response};
use crate::worker::http::{self, Framing, Request, ResponseHead};
use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

/// A stream's request as it arrived.
pub struct Arrived {
    pub req: http_types::Request<RecvStream>,
    pub respond: SendResponse<Bytes>,
    pub peer: SocketAddr,
    pub open: StreamOpen,
}

/// Serves one stream to its end (a task of its own).
pub async fn serve(ctx: Rc<Ctx>, dispatch: Rc<Dispatch>, arrived: Arrived) {
    let Arrived {
        req,
        mut respond,
        peer,
        open,
    } = arrived;
    let started = Instant::now();
    let ip = canonical_ip(peer.ip());
    let (parts, recv) = req.into_parts();
    let shared = open.shared();
    let Some((request, head_len)) = to_request(&parts) else {
        let meta = Meta::unparsed(&ctx, b"", ip, started);
        let bad = Response::error(400);
        return refuse(&ctx, respond, recv, bad, None, meta, shared).await;
    };
    let meta = Meta::of(&ctx, &request, ip, started);
    let framing = match request.check() {
        Ok(f) => stream_framing(f, &request, recv.is_end_stream()),
        Err(status) => {
            let r = Response::error(status);
            return refuse(&ctx, respond, recv, r, None, meta, shared).await;
        }
    };
    if request.target == "*" {
        let r = Response::new(ResponseHead::new(204), Body::Empty);
        return finish(&ctx, &mut respond, r, None, meta, shared).await;
    }
    let Ok(path) = http::normalize_path(request.path()) else {
        let bad = Response::error(400);
        return refuse(&ctx, respond, recv, bad, None, meta, shared).await;
    };
    let mut incoming = Incoming {
        req: request,
        path,
        framing,
        head_len,
        keep: true,
        meta,
    };
    match dispatch.route(&ctx, &mut incoming, ip) {
        Routed::Answer(r, sec) => answer(&ctx, respond, recv, incoming, r, sec, shared).await,
        Routed::Fail(status, sec) => {
            let r = Response::error(status);
            refuse(&ctx, respond, recv, r, Some(sec), incoming.meta, shared).await
        }
        Routed::Proxy { route, rest, sec } => {
            let exchange = super::proxy::Exchange {
                ctx: &ctx,
                pool: &dispatch.backends,
                route,
                rest: &rest,
                sec,
                shared,
                ip,
            };
            exchange.forward(respond, recv, incoming).await
        }
    }
}

/// How the body is delimited: as declared, or by END_STREAM (a body of unknown length is
/// sent on to a backend chunked, as an HTTP/1.1 chunked body is).
fn stream_framing(checked: Framing, req: &Request, ended: bool) -> Framing {
    if ended {
        return Framing::None;
    }
    match checked {
        Framing::None if req.header("content-length").is_none() => Framing::Chunked,
        f => f,
    }
}

/// The request in the form the HTTP/1.1 path knows, and its head's size as the route's
/// `max_request_header_size` measures it. `None`: `:authority` and `Host` disagree (RFC 9113
/// §8.3.1), or there is neither.
fn to_request(parts: &http_types::request::Parts) -> Option<(Request, usize)> {
    let target = match parts.uri.path_and_query() {
        Some(p) => p.as_str().to_string(),
        // `OPTIONS *` comes with `:path` `*`, which `http` keeps as an authority-less URI.
        None if parts.method == http_types::Method::OPTIONS => "*".to_string(),
        None => "/".to_string(),
    };
    let method = parts.method.as_str().to_string();
    let mut head_len = method.len() + target.len() + 12;
    let mut headers = Vec::with_capacity(parts.headers.len() + 1);
    let host = parts.headers.get(http_types::header::HOST);
    match (parts.uri.authority(), host) {
        (Some(a), Some(h)) if a.as_str().as_bytes() != h.as_bytes() => return None,
        (Some(a), _) => headers.push(("host".to_string(), a.as_str().as_bytes().to_vec())),
        (None, Some(_)) => {}
        (None, None) => return None,
    }
    // RFC 9113 §8.2.3: cookies may come as separate fields; HTTP/1.1 has one.
    let mut cookie: Option<Vec<u8>> = None;
    for (name, value) in &parts.headers {
        head_len += name.as_str().len() + value.len() + 4;
        if name == http_types::header::COOKIE {
            let c = cookie.get_or_insert_with(Vec::new);
            if !c.is_empty() {
                c.extend_from_slice(b"; ");
            }
            c.extend_from_slice(value.as_bytes());
            continue;
        }
        if name == http_types::header::HOST && parts.uri.authority().is_some() {
            continue;
        }
        headers.push((name.as_str().to_string(), value.as_bytes().to_vec()));
    }
    if let Some(c) = cookie {
        headers.push(("cookie".to_string(), c));
    }
    let version = 2;
    let req = Request {
        method,
        target,
        version,
        headers,
    };
    Some((req, head_len))
}

/// A handler's answer. As over HTTP/1.1, a successful one reads the request body first (and
/// drops it); an error answers at once.
async fn answer(
    ctx: &Ctx,
    mut respond: SendResponse<Bytes>,
    recv: RecvStream,
    incoming: Incoming,
    r: Response,
    sec: Option<&RouteSecurity>,
    shared: &Shared,
) {
    let Incoming {
        framing, mut meta, ..
    } = incoming;
    let s = sec.unwrap_or(&ctx.default_security);
    let mut body = StreamBody::new(recv, framing, s.max_chunked_body_size, body_timeout(s));
    let mut r = r;
    if framing != Framing::None && r.status() < 400 {
        match body.discard().await {
            Ok(n) => meta.request_bytes = n,
            Err(e) => match e.status() {
                Some(status) => r = Response::error(status),
                None => return,
            },
        }
    }
    finish(ctx, &mut respond, r, sec, meta, shared).await;
    body.linger().await
}

/// An answer before the request's body was read (an error): sent, then the rest of the body
/// is let in and dropped for a while (`StreamBody::linger`).
async fn refuse(
    ctx: &Ctx,
    mut respond: SendResponse<Bytes>,
    recv: RecvStream,
    r: Response,
    sec: Option<&RouteSecurity>,
    meta: Meta,
    shared: &Shared,
) {
    finish(ctx, &mut respond, r, sec, meta, shared).await;
    let s = sec.unwrap_or(&ctx.default_security);
    let body = StreamBody::new(recv, Framing::Chunked, 0, body_timeout(s));
    body.linger().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http_types::request::Parts {
        let mut b = http_types::Request::builder().uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_authority_is_the_host_and_cookies_are_one_field() {
        let p = parts(
            "https://a.test:8443/x?y",
            &[("cookie", "a=1"), ("cookie", "b=2"), ("x-k", "v")],
        );
        let (req, len) = to_request(&p).unwrap();
        assert_eq!(req.target, "/x?y");
        assert_eq!(req.host(), "a.test");
        assert_eq!(req.header("cookie"), Some(&b"a=1; b=2"[..]));
        assert_eq!(req.version, 2);
        assert!(len > "GET/x?y".len());
        assert_eq!(req.check(), Ok(Framing::None));
    }

    #[test]
    fn a_host_that_disagrees_with_the_authority_is_refused() {
        assert!(to_request(&parts("https://a.test/", &[("host", "b.test")])).is_none());
        assert!(to_request(&parts("https://a.test/", &[("host", "a.test")])).is_some());
        assert!(to_request(&parts("/", &[])).is_none(), "no host at all");
    }

    #[test]
    fn a_body_without_a_length_is_chunked_on() {
        let (req, _) = to_request(&parts("https://a.test/", &[])).unwrap();
        assert_eq!(stream_framing(Framing::None, &req, true), Framing::None);
        assert_eq!(stream_framing(Framing::None, &req, false), Framing::Chunked);
        let (req, _) = to_request(&parts("https://a.test/", &[("content-length", "0")])).unwrap();
        assert_eq!(stream_framing(Framing::None, &req, false), Framing::None);
        let f = stream_framing(Framing::Length(5), &req, false);
        assert_eq!(f, Framing::Length(5));
    }
}
