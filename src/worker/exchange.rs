//! One request and its answer, as the keep-alive loop, the handlers' dispatch and the proxy
//! all see it: the client side of the connection, what the metrics need to know of the
//! request, and how an answer is sent (the route's header changes, HEAD, `Connection`, the
//! record). It sits under both the connection loop and the proxy, so neither imports the
//! other.

use super::access_log;
use super::ctx::Ctx;
use super::http::body::{self, BodyReader};
use super::http::client::ClientStream;
use super::http::respond::{self, Response};
use super::http::{self, Framing, Request};
use super::recorder::Outcome;
use super::timed::{Deadlines, Limit};
use crate::shared::config::RouteSecurity;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The client side of a connection.
pub struct Client<S> {
    pub stream: S,
    /// An error was answered and the client may still be sending: close gently.
    pub linger: bool,
    /// A response was cut short: the close must look like a cut (over TLS, no close_notify,
    /// which would make a close-delimited body look complete).
    pub cut: bool,
    /// Bytes read and not yet used: the head being read, then what follows it.
    pub buf: Vec<u8>,
    pub peer: SocketAddr,
    /// The deadlines of the client socket, set phase by phase.
    pub limits: Rc<Deadlines>,
}

impl<S> Client<S> {
    pub fn new(stream: S, peer: SocketAddr, limits: Rc<Deadlines>) -> Client<S> {
        Client {
            stream,
            linger: false,
            cut: false,
            buf: Vec::new(),
            peer,
            limits,
        }
    }

    /// A reader for the request body, with the route's body limits: the socket's reads get
    /// `client_body_timeout_secs`, a chunked body `max_chunked_body_size`.
    pub fn body_reader(&self, framing: Framing, sec: &RouteSecurity) -> BodyReader {
        self.limits.set_read(Limit::Each(Duration::from_secs(
            sec.client_body_timeout_secs,
        )));
        BodyReader::new(framing, sec.max_chunked_body_size)
    }

    /// The client's address, an IPv4-mapped IPv6 address as the IPv4 address it is: what
    /// access lists, balancing and rate limits compare.
    pub fn ip(&self) -> IpAddr {
        canonical_ip(self.peer.ip())
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// How an exchange leaves the connection.
#[derive(Debug)]
pub enum Exchange<T> {
    /// The connection may carry another request.
    KeepAlive,
    Close,
    /// The connection becomes a tunnel (a WebSocket upgrade the backend accepted).
    Tunnel(T),
}

impl<T> Exchange<T> {
    pub fn keep_if(keep: bool) -> Self {
        if keep {
            Exchange::KeepAlive
        } else {
            Exchange::Close
        }
    }
}

/// What the metrics and the access log need to know of a request.
pub struct Meta {
    pub method: String,
    /// 0 for an HTTP/1.0 request: a kept connection must then say `Connection: keep-alive`.
    pub version: u8,
    pub host: String,
    pub started: Instant,
    pub request_bytes: u64,
    /// The access log's view of the request: `None` when there is no access log, or the
    /// route silences it.
    pub access: Option<Box<access_log::Request>>,
}

impl Meta {
    pub fn of(ctx: &Ctx, req: &Request, peer: IpAddr, started: Instant) -> Meta {
        let access = ctx.access_log.as_ref().map(|_| {
            let version = match req.version {
                0 => "1.0",
                2 => "2.0",
                _ => "1.1",
            };
            Box::new(access_log::Request {
                peer,
                line: format!("{} {} HTTP/{version}", req.method, req.target),
                referer: req.header("referer").map(access_log::text),
                user_agent: req.header("user-agent").map(access_log::text),
                upstream: None,
            })
        });
        Meta {
            method: req.method.clone(),
            version: req.version,
            host: req.host(),
            started,
            request_bytes: 0,
            access,
        }
    }

    /// For an answer to a head that did not parse: `head` is what was read of it.
    pub fn unparsed(ctx: &Ctx, head: &[u8], peer: IpAddr, started: Instant) -> Meta {
        let access = ctx.access_log.as_ref().map(|_| {
            // Its first line, as nginx logs it, cut short: a 414's line is as long as the
            // head buffer.
            let end = head
                .iter()
                .position(|&b| b == b'\r' || b == b'\n')
                .unwrap_or(head.len())
                .min(1024);
            Box::new(access_log::Request {
                peer,
                line: access_log::text(&head[..end]),
                referer: None,
                user_agent: None,
                upstream: None,
            })
        });
        Meta {
            method: "OTHER".into(),
            version: 1,
            host: String::new(),
            started,
            request_bytes: 0,
            access,
        }
    }

    /// Counts the answer in the metrics and writes its access log line.
    pub fn record(&self, ctx: &Ctx, status: u16, response_bytes: u64) {
        self.record_metrics(ctx, status, response_bytes);
        self.log_access(ctx, status, response_bytes, self.request_bytes);
    }

    pub fn record_metrics(&self, ctx: &Ctx, status: u16, response_bytes: u64) {
        ctx.recorder.record(&Outcome {
            method: &self.method,
            host: &self.host,
            status,
            duration: self.started.elapsed(),
            request_bytes: self.request_bytes,
            response_bytes,
        });
    }

    /// The access log line alone: a WebSocket tunnel's, at its close.
    pub fn log_access(&self, ctx: &Ctx, status: u16, sent: u64, received: u64) {
        if let (Some(log), Some(request)) = (&ctx.access_log, &self.access) {
            log.write(
                request,
                &access_log::Done {
                    status,
                    sent,
                    received,
                    took: self.started.elapsed(),
                },
            );
        }
    }

    /// Whether the access log wants this request's line.
    pub fn logged(&self) -> bool {
        self.access.is_some()
    }

    /// The backend that answered (`addr`, when known), the proxy having started at `since`.
    pub fn upstream(&mut self, addr: Option<SocketAddr>, since: Instant) {
        if let Some(a) = &mut self.access {
            a.upstream = Some((addr, since));
        }
    }
}

/// A request head that passed the protocol checks, with what its answer needs.
pub struct Incoming {
    pub req: Request,
    /// The normalized path (percent-decoded, dot-segments resolved).
    pub path: String,
    pub framing: Framing,
    pub head_len: usize,
    /// The client wants the connection kept, and the worker is not draining.
    pub keep: bool,
    pub meta: Meta,
}

/// Deals with the request body, then sends `r`. A successful answer reads (and drops) the
/// body first, sending `100 Continue` if the client waits for it; an error answers at once
/// and closes, leaving the body unread.
pub async fn answer<S: ClientStream, T>(
    ctx: &Ctx,
    client: &mut Client<S>,
    incoming: Incoming,
    r: Response,
    sec: Option<&RouteSecurity>,
) -> Exchange<T> {
    let Incoming {
        req,
        framing,
        keep,
        mut meta,
        ..
    } = incoming;
    if framing == Framing::None {
        return finish(ctx, client, r, keep, sec, meta).await;
    }
    if r.status() >= 400 {
        return finish(ctx, client, r, false, sec, meta).await;
    }
    if req.expects_continue() && respond::send_continue(&mut client.stream).await.is_err() {
        return Exchange::Close;
    }
    let mut reader = client.body_reader(framing, sec.unwrap_or(&ctx.default_security));
    let mut scratch = ctx.take_buf();
    let result = body::discard(
        &mut reader,
        &mut client.stream,
        &mut client.buf,
        &mut scratch,
    )
    .await;
    ctx.give_buf(scratch);
    match result {
        Ok(n) => {
            meta.request_bytes = n;
            finish(ctx, client, r, keep, sec, meta).await
        }
        Err(e) => match e.status() {
            Some(status) => finish(ctx, client, Response::error(status), false, sec, meta).await,
            None => Exchange::Close,
        },
    }
}

/// An error status answered at once (the body, if any, left unread), and the connection
/// closed.
pub async fn fail<S: ClientStream, T>(
    ctx: &Ctx,
    client: &mut Client<S>,
    status: u16,
    sec: Option<&RouteSecurity>,
    meta: Meta,
) -> Exchange<T> {
    finish(ctx, client, Response::error(status), false, sec, meta).await
}

/// Sends `r` with the route's header changes and records it.
pub async fn finish<S: ClientStream, T>(
    ctx: &Ctx,
    client: &mut Client<S>,
    r: Response,
    keep: bool,
    sec: Option<&RouteSecurity>,
    meta: Meta,
) -> Exchange<T> {
    let (r, keep) = prepare(r, keep, sec, &meta);
    let status = r.status();
    let sent = respond::send(&mut client.stream, r, keep).await;
    client.linger = status >= 400 && sent.is_ok();
    meta.record(ctx, status, *sent.as_ref().unwrap_or(&0));
    Exchange::keep_if(sent.is_ok() && keep)
}

/// The response as it goes out, and whether the connection stays open after it.
pub fn prepare(
    mut r: Response,
    keep: bool,
    sec: Option<&RouteSecurity>,
    meta: &Meta,
) -> (Response, bool) {
    // Framing that cannot be trusted, or a server-side failure: do not reuse the connection.
    let keep = keep && !matches!(r.status(), 400 | 408 | 413 | 414 | 431 | 500..);
    r.head = std::mem::replace(&mut r.head, http::ResponseHead::new(0)).with_defaults();
    if let Some(sec) = sec {
        apply_route_headers(&mut r.head, sec);
    }
    if meta.method == "HEAD" {
        r.strip_body();
    }
    if keep && meta.version == 0 {
        r.head.set("Connection", "keep-alive");
    }
    (r, keep)
}

/// The route's `remove_response_headers`, then `add_response_headers` (which replace).
pub fn apply_route_headers(head: &mut http::ResponseHead, sec: &RouteSecurity) {
    for name in &sec.remove_response_headers {
        head.remove(name);
    }
    for (name, value) in &sec.add_response_headers {
        head.set(name, value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::http::respond::Body;

    fn meta(method: &str, version: u8) -> Meta {
        Meta {
            method: method.into(),
            version,
            host: String::new(),
            started: Instant::now(),
            request_bytes: 0,
            access: None,
        }
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a [u8]> {
        r.head
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    #[test]
    fn errors_that_leave_framing_in_doubt_close_the_connection() {
        for (status, keep) in [
            (200, true),
            (404, true),
            (400, false),
            (413, false),
            (502, false),
        ] {
            let (_, kept) = prepare(Response::error(status), true, None, &meta("GET", 1));
            assert_eq!(kept, keep, "{status}");
        }
        let (_, kept) = prepare(Response::error(200), false, None, &meta("GET", 1));
        assert!(!kept, "a close asked for stays a close");
    }

    #[test]
    fn route_headers_apply_after_the_defaults_and_head_strips_the_body() {
        let mut sec = RouteSecurity {
            remove_response_headers: vec!["server".into()],
            ..RouteSecurity::default()
        };
        sec.add_response_headers
            .insert("X-Frame-Options".into(), "DENY".into());
        let (r, _) = prepare(Response::error(404), true, Some(&sec), &meta("HEAD", 1));
        assert_eq!(header(&r, "server"), None);
        assert!(header(&r, "date").is_some());
        assert_eq!(header(&r, "x-frame-options"), Some(&b"DENY"[..]));
        assert!(matches!(r.body, Body::Empty));
        assert_eq!(
            header(&r, "content-length"),
            Some(&b"14"[..]),
            "404 Not Found\\n"
        );
    }

    #[test]
    fn a_kept_http_1_0_connection_says_so() {
        let (r, kept) = prepare(Response::error(200), true, None, &meta("GET", 0));
        assert!(kept);
        assert_eq!(header(&r, "connection"), Some(&b"keep-alive"[..]));
    }

    #[test]
    fn ipv4_mapped_clients_are_their_ipv4_address() {
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(canonical_ip(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(canonical_ip(v6), v6);
    }
}
