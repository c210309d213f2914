//! One client connection: read a request head, check it, route it, deal with its body, answer,
//! and go round again while the connection may be kept alive. Requests on a connection are
//! answered one after the other, so pipelined requests are answered in order.

use super::http::body::{self, BodyReader};
use super::http::client::ClientStream;
use super::handlers;
use super::http::{self, Framing, Parse, Request};
use super::proxy::tunnel::{self, TunnelParts};
use super::recorder::Outcome;
use super::http::respond::{self, Response};
use super::router::{Handler, RouteEntry};
use super::server::Ctx;
use super::timed::{self, Deadlines, Limit};
use crate::shared::config::RouteSecurity;
use monoio::buf::IoBufMut;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::server::HEAD_BUF;
/// How long an idle connection keeps its head buffer before waiting without one.
const HOT: Duration = Duration::from_millis(50);

pub struct Conn<S> {
    pub stream: S,
    /// An error was answered and the client may still be sending: close gently.
    pub linger: bool,
    /// Bytes read and not yet used: the head being read, then what follows it.
    pub buf: Vec<u8>,
    pub peer: SocketAddr,
    /// Set when a WebSocket upgrade succeeded: the connection becomes a tunnel, idle for
    /// at most this long.
    pub tunnel: Option<(TunnelParts, Duration)>,
    /// The deadlines of the client socket, set phase by phase.
    pub limits: Rc<Deadlines>,
}

/// A request head and how it arrived.
struct Incoming {
    req: Request,
    head_len: usize,
    /// From the first byte of the head.
    started: Instant,
}

enum Head {
    Request(Incoming),
    /// The peer closed, or no request came in time: close quietly.
    Close,
    /// Answer with this status and close.
    Error(u16),
}

impl<S> Conn<S> {
    /// The client's address, an IPv4-mapped IPv6 address as the IPv4 address it is: what
    /// access lists, balancing and rate limits compare.
    pub fn client_ip(&self) -> std::net::IpAddr {
        match self.peer.ip() {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        }
    }
}

pub async fn serve<S: ClientStream>(ctx: &Ctx, stream: S, peer: SocketAddr, limits: Rc<Deadlines>) {
    let mut conn = Conn {
        stream,
        linger: false,
        buf: Vec::new(),
        peer,
        tunnel: None,
        limits,
    };
    let mut fresh = true;
    loop {
        let head = read_head(ctx, &mut conn, fresh).await;
        fresh = false;
        // The exchange, the error answer and the tunnel are boxed: their states are large,
        // and inline they would make every idle connection's task as large as the largest.
        let keep = match head {
            Head::Request(incoming) => Box::pin(exchange(ctx, &mut conn, incoming)).await,
            Head::Close => false,
            Head::Error(status) => {
                let started = Instant::now();
                let r = Response::error(status);
                Box::pin(finish(
                    ctx,
                    &mut conn,
                    r,
                    false,
                    None,
                    Meta::unparsed(started),
                ))
                .await;
                false
            }
        };
        if let Some((parts, idle)) = conn.tunnel.take() {
            let early = std::mem::take(&mut conn.buf);
            let run = tunnel::run(ctx, conn.stream, &conn.limits, early, parts, idle);
            return Box::pin(run).await;
        }
        if !keep {
            if conn.linger {
                Box::pin(linger(&mut conn)).await;
            }
            ctx.give_head(std::mem::take(&mut conn.buf));
            return;
        }
        // Between requests the connection holds no buffer (bytes of a pipelined request
        // excepted): an idle connection costs its task and its socket only.
        if conn.buf.is_empty() {
            ctx.give_head(std::mem::take(&mut conn.buf));
        }
    }
}

/// `fresh`: no request has been read on this connection yet; its head's deadline was set
/// when it was accepted.
async fn read_head<S: ClientStream>(ctx: &Ctx, conn: &mut Conn<S>, fresh: bool) -> Head {
    let limit = ctx.max_head;
    let mut started = None;
    if !fresh {
        // Between requests: nginx's keepalive_timeout. Draining does not cut this wait short,
        // since the client may be sending already; the drain's own deadline bounds it.
        conn.limits
            .set_read(Limit::By(Instant::now() + ctx.keepalive));
    }
    // A client that sends at once is read with a buffer at once; one quiet for `HOT` gives
    // its buffer back and is woken by readiness (plain TCP; TLS streams keep reading).
    let waited = conn.limits.read();
    let mut hot = true;
    if conn.buf.is_empty() && conn.stream.plain().is_some() {
        if let Limit::By(at) = waited {
            conn.limits
                .set_read(Limit::By(at.min(Instant::now() + HOT)));
        }
    }
    loop {
        if !conn.buf.is_empty() {
            if started.is_none() {
                let now = Instant::now();
                started = Some(now);
                // The head's deadline: from the accept for a first request, else from its
                // first byte.
                conn.limits.set_read(if fresh {
                    waited
                } else {
                    Limit::By(now + ctx.head_timeout)
                });
            }
            match http::parse(&conn.buf) {
                Parse::Complete(req, n) => {
                    conn.buf.drain(..n);
                    return Head::Request(Incoming {
                        req,
                        head_len: n,
                        started: started.unwrap_or_else(Instant::now),
                    });
                }
                Parse::Invalid(why) => {
                    log::debug!("400 from {}: {why}", conn.peer);
                    return Head::Error(400);
                }
                Parse::TooManyHeaders => return Head::Error(431),
                Parse::Partial if conn.buf.len() >= limit => {
                    let line_done = conn.buf.contains(&b'\n');
                    return Head::Error(if line_done { 431 } else { 414 });
                }
                Parse::Partial => {}
            }
        }
        let idle = conn.buf.is_empty();
        if idle && conn.buf.capacity() == 0 {
            if hot {
                conn.buf = ctx.take_head();
            } else if !wait_for_bytes(ctx, conn).await {
                return Head::Close;
            }
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(HEAD_BUF);
        }
        let (len, cap) = (conn.buf.len(), conn.buf.capacity().min(limit + 1));
        let owned = std::mem::take(&mut conn.buf).slice_mut(len..cap.max(len + 1));
        // Boxed: a read in flight is short-lived, and its state would otherwise widen
        // every connection's task, idle ones included.
        let (res, slice) = Box::pin(conn.stream.read(owned)).await;
        conn.buf = slice.into_inner();
        match res {
            Ok(0) => return Head::Close,
            Ok(_) => {}
            Err(e) if timed::is_timeout(&e) && idle && hot && conn.limits.read() != waited => {
                // Quiet past HOT, not past its deadline: wait without a buffer.
                hot = false;
                conn.limits.set_read(waited);
                ctx.give_head(std::mem::take(&mut conn.buf));
            }
            Err(e) if timed::is_timeout(&e) && !idle => return Head::Error(408),
            Err(_) => return Head::Close,
        }
    }
}

/// Waits, holding no buffer, until the client sends or its read deadline passes; then takes
/// a head buffer. `false`: nothing came in time, or the connection failed.
async fn wait_for_bytes<S: ClientStream>(ctx: &Ctx, conn: &mut Conn<S>) -> bool {
    if let Some(tcp) = conn.stream.plain() {
        // Boxed: its timer is cache-line aligned and large, and only idle connections wait
        // here; inline it would widen every connection's task.
        if Box::pin(tcp.readable()).await.is_err() {
            return false;
        }
    }
    conn.buf = ctx.take_head();
    true
}

/// One request and its response. Returns whether the connection may carry another.
async fn exchange<S: ClientStream>(ctx: &Ctx, conn: &mut Conn<S>, incoming: Incoming) -> bool {
    let Incoming {
        req,
        head_len,
        started,
    } = incoming;
    let meta = Meta {
        method: req.method.clone(),
        version: req.version,
        host: req.host(),
        started,
        request_bytes: 0,
    };
    let framing = match req.check() {
        Ok(f) => f,
        Err(status) => {
            return finish(ctx, conn, Response::error(status), false, None, meta).await;
        }
    };
    let keep = req.wants_keep_alive() && !ctx.draining.get();
    if req.target == "*" {
        // `OPTIONS *` (the only method `check` lets through with it): the server is here.
        let r = Response::new(http::ResponseHead::new(204), respond::Body::Empty);
        return respond_after_body(ctx, conn, &req, framing, r, keep, None, meta).await;
    }
    let Ok(path) = http::normalize_path(req.path()) else {
        return finish(ctx, conn, Response::error(400), false, None, meta).await;
    };
    if let Some(r) = handlers::metrics(ctx, &path, conn.client_ip()) {
        return respond_after_body(ctx, conn, &req, framing, r, keep, None, meta).await;
    }
    let Some(m) = ctx.router.route(&meta.host, &path) else {
        return respond_after_body(
            ctx,
            conn,
            &req,
            framing,
            Response::error(404),
            keep,
            None,
            meta,
        )
        .await;
    };
    log::trace!("{} {} {path} -> {}", req.method, meta.host, m.route.name);
    let sec = &m.route.security;
    conn.limits
        .set_write(Limit::Each(Duration::from_secs(sec.send_timeout_secs)));
    // The route is known only now: its own head limits apply from here.
    if head_len as u64 > sec.max_request_header_size {
        return finish(ctx, conn, Response::error(431), false, Some(sec), meta).await;
    }
    if started.elapsed() > Duration::from_secs(sec.client_header_timeout_secs) {
        return finish(ctx, conn, Response::error(408), false, Some(sec), meta).await;
    }
    if let Framing::Length(n) = framing {
        if n > sec.max_request_body_size {
            // Not read: the connection cannot be reused.
            return finish(ctx, conn, Response::error(413), false, Some(sec), meta).await;
        }
    }
    if let Some(r) = handlers::refuse(&req, m.route, conn.client_ip(), ctx.region) {
        return respond_after_body(ctx, conn, &req, framing, r, keep, Some(sec), meta).await;
    }
    if let Handler::Proxy(p) = &m.route.handler {
        return super::proxy::forward(ctx, conn, &req, &m, p, framing, keep, meta).await;
    }
    let r = handlers::handle(&req, &m);
    respond_after_body(ctx, conn, &req, framing, r, keep, Some(sec), meta).await
}

/// Deals with the request body, then sends `r`. A successful answer reads (and drops) the
/// body first, sending `100 Continue` if the client waits for it; an error answers at once
/// and closes, leaving the body unread.
#[allow(clippy::too_many_arguments)]
async fn respond_after_body<S: ClientStream>(
    ctx: &Ctx,
    conn: &mut Conn<S>,
    req: &Request,
    framing: Framing,
    r: Response,
    keep: bool,
    sec: Option<&RouteSecurity>,
    mut meta: Meta,
) -> bool {
    if framing == Framing::None {
        return finish(ctx, conn, r, keep, sec, meta).await;
    }
    if r.status() >= 400 {
        return finish(ctx, conn, r, false, sec, meta).await;
    }
    if req.expects_continue() && respond::send_continue(&mut conn.stream).await.is_err() {
        return false;
    }
    let limits = sec.unwrap_or(&ctx.default_security);
    conn.limits.set_read(Limit::Each(Duration::from_secs(
        limits.client_body_timeout_secs,
    )));
    let mut reader = BodyReader::new(framing, limits.max_chunked_body_size);
    let mut scratch = ctx.take_buf();
    let result = body::discard(&mut reader, &mut conn.stream, &mut conn.buf, &mut scratch).await;
    ctx.give_buf(scratch);
    match result {
        Ok(n) => {
            meta.request_bytes = n;
            finish(ctx, conn, r, keep, sec, meta).await
        }
        Err(e) => match e.status() {
            Some(status) => finish(ctx, conn, Response::error(status), false, sec, meta).await,
            None => false,
        },
    }
}

/// What the metrics need to know of a request.
pub struct Meta {
    pub method: String,
    /// 0 for an HTTP/1.0 request: a kept connection must then say `Connection: keep-alive`.
    pub version: u8,
    pub host: String,
    pub started: Instant,
    pub request_bytes: u64,
}

impl Meta {
    fn unparsed(started: Instant) -> Meta {
        Meta {
            method: "OTHER".into(),
            version: 1,
            host: String::new(),
            started,
            request_bytes: 0,
        }
    }
}

/// Sends `r` with the route's header changes and records it. Returns whether the connection
/// may carry another request.
async fn finish<S: ClientStream>(
    ctx: &Ctx,
    conn: &mut Conn<S>,
    mut r: Response,
    keep: bool,
    sec: Option<&RouteSecurity>,
    meta: Meta,
) -> bool {
    // Framing that cannot be trusted, or a server-side failure: do not reuse the connection.
    let keep = keep && !matches!(r.status(), 400 | 408 | 413 | 414 | 431 | 500..);
    r.head = std::mem::replace(&mut r.head, http::ResponseHead::new(0)).with_defaults();
    if let Some(sec) = sec {
        apply_route_headers(&mut r.head, sec);
    }
    if meta.method == "HEAD" {
        r.strip_body();
    }
    let status = r.status();
    if keep && meta.version == 0 {
        r.head.set("Connection", "keep-alive");
    }
    let sent = respond::send(&mut conn.stream, r, keep).await;
    conn.linger = status >= 400 && sent.is_ok();
    ctx.recorder.record(&Outcome {
        method: &meta.method,
        host: &meta.host,
        status,
        duration: meta.started.elapsed(),
        request_bytes: meta.request_bytes,
        response_bytes: *sent.as_ref().unwrap_or(&0),
    });
    sent.is_ok() && keep
}

/// An error decided outside this module (the proxy's 502/503/504): sent with the route's
/// header changes, recorded, and the connection closed.
pub async fn finish_error<S: ClientStream>(
    ctx: &Ctx,
    conn: &mut Conn<S>,
    r: Response,
    route: &RouteEntry,
    meta: Meta,
) -> bool {
    finish(ctx, conn, r, false, Some(&route.security), meta).await
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

/// How long a closing connection may keep sending, and may pause, before it is cut.
const LINGER_TOTAL: Duration = Duration::from_secs(5);
const LINGER_IDLE: Duration = Duration::from_secs(2);

/// After an error answer the client may still be sending (a body that was refused unread).
/// Closing at once would make the kernel answer its data with a reset, which can destroy the
/// response before the client reads it. So, like nginx's lingering close: stop writing, then
/// read and drop what still comes, for a bounded time.
async fn linger<S: ClientStream>(conn: &mut Conn<S>) {
    // Over TLS the half-close would need a close_notify first: such a connection just closes.
    let Some(fd) = conn.stream.raw_fd() else {
        return;
    };
    // SAFETY: a plain shutdown(2) on a socket this connection owns.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    let deadline = Instant::now() + LINGER_TOTAL;
    let mut buf = std::mem::take(&mut conn.buf);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        conn.limits
            .set_read(Limit::By(deadline.min(now + LINGER_IDLE)));
        buf.clear();
        buf.reserve(HEAD_BUF);
        let cap = buf.capacity();
        match conn.stream.read(buf.slice_mut(0..cap)).await {
            (Ok(n), back) if n > 0 => buf = back.into_inner(),
            _ => return,
        }
    }
}
