//! `Proxy` routes: the request goes to a backend server and the response comes back, both
//! streamed through one pooled buffer, so a proxied exchange holds bounded memory whatever the
//! body sizes.
//!
//! Order of events: choose the candidates (healthy servers, in the balancing order) → take an
//! idle pooled connection or connect, failing over to the next candidate on a refused or
//! timed-out connect → send the head and stream the body → read the response head (an
//! idempotent, bodiless request that finds a reused connection dead before any response byte
//! is sent again once, on a fresh connection) → relay head and body → pool the connection if
//! the backend keeps it alive and the exchange ended cleanly.

pub mod backend;
pub mod relay;
pub mod tunnel;
pub mod upstream;

use super::http::body::BodyReader;
use super::conn::{Conn, Meta};
use super::http::{self, Framing, Request};
use super::recorder::Outcome;
use super::http::respond::{self, Response};
use super::router::{Matched, RouteEntry};
use super::server::Ctx;
use super::timed::{self, Limit};
use crate::shared::config::RouteSecurity;
use crate::worker::http::client::ClientStream;
use backend::{BackendConn, ConnectError, Target};
use monoio::io::AsyncWriteRentExt;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use upstream::Upstream;

pub struct ProxyRoute {
    pub upstream: Rc<Upstream>,
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

fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    values
        .flat_map(|v| v.split(|b| *b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn is_websocket(req: &Request) -> bool {
    req.method == "GET"
        && req.version == 1
        && req.connection_has("upgrade")
        && req.header("upgrade").is_some_and(|u| {
            String::from_utf8_lossy(u)
                .to_ascii_lowercase()
                .contains("websocket")
        })
}

/// Counts a connection in use towards `least_conn`, in shared memory, until dropped.
pub struct Active<'a> {
    ctx: &'a Ctx,
    backend: Option<usize>,
}

impl<'a> Active<'a> {
    fn new(ctx: &'a Ctx, target: &Target) -> Self {
        Self::of(ctx, target.backend)
    }

    /// Counts a connection to the shared backend `backend` (if it is one).
    pub fn of(ctx: &'a Ctx, backend: Option<usize>) -> Self {
        if let Some(i) = backend {
            ctx.region.header.backends[i].active.fetch_add(1, Relaxed);
            ctx.slot.backend_active[i].fetch_add(1, Relaxed);
        }
        Active { ctx, backend }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.backend {
            self.ctx.region.header.backends[i]
                .active
                .fetch_sub(1, Relaxed);
            self.ctx.slot.backend_active[i].fetch_sub(1, Relaxed);
        }
    }
}

/// Proxies one request. Returns whether the client connection may carry another.
#[allow(clippy::too_many_arguments)]
pub async fn forward<S: ClientStream>(
    ctx: &Ctx,
    conn: &mut Conn<S>,
    req: &Request,
    m: &Matched<'_>,
    route: &ProxyRoute,
    framing: Framing,
    keep: bool,
    meta: Meta,
) -> bool {
    let sec = &m.route.security;
    let client_ip = conn.client_ip();
    let candidates = route.upstream.candidates(ctx.region, client_ip);
    if candidates.is_empty() {
        log::warn!("upstream `{}`: no healthy server", route.upstream.name);
        return fail(ctx, conn, m.route, 503, meta).await;
    }
    let upgrade = is_websocket(req);
    let connect_timeout = Duration::from_secs(sec.backend_connect_timeout_secs);
    let idempotent = framing == Framing::None
        && matches!(
            req.method.as_str(),
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        );

    // Connect (failing over on refusal or timeout), send, read the response head. A request
    // that can be replayed and got no response byte is sent again: once on a fresh connection
    // to the same server if the dead one came from the pool, else to the next candidate.
    let mut from = 0;
    let mut pooled = !upgrade;
    let mut retried_same = false;
    let (target, mut bconn, _active, request_bytes, response) = 'attempts: loop {
        let (target, mut bconn) =
            match acquire(ctx, &candidates[from..], connect_timeout, pooled).await {
                Ok(pair) => pair,
                Err(status) => return fail(ctx, conn, m.route, status, meta).await,
            };
        let active = Active::new(ctx, &target);
        let head = request_head(req, &target, &m.rest, m.route, client_ip, framing, upgrade);
        loop {
            backend_deadlines(&bconn, sec);
            let sent = match send_request(ctx, conn, req, &mut bconn, &head, framing, sec).await {
                Ok(n) => Ok(n),
                Err(SendError::Client(status)) => {
                    return fail(ctx, conn, m.route, status, meta).await
                }
                Err(SendError::ClientGone) => return false,
                Err(SendError::Backend) => Err(relay::HeadError::Stale),
                Err(SendError::BackendTimeout) => Err(relay::HeadError::Timeout),
            };
            let result = match sent {
                Ok(n) => relay::read_head(&mut bconn).await.map(|r| (n, r)),
                Err(e) => Err(e),
            };
            match result {
                Ok((n, r)) => break 'attempts (target, bconn, active, n, r),
                Err(relay::HeadError::Stale) if idempotent => {
                    if bconn.reused && !retried_same {
                        retried_same = true;
                        if let Ok(fresh) = backend::connect(&target, connect_timeout).await {
                            bconn = fresh;
                            continue;
                        }
                    }
                    log::warn!(
                        "backend {}: connection closed before a response; trying the next server",
                        target.label()
                    );
                    let at = candidates
                        .iter()
                        .position(|c| Rc::ptr_eq(c, &target))
                        .unwrap_or(from);
                    from = at + 1;
                    pooled = false;
                    if from >= candidates.len() {
                        return fail(ctx, conn, m.route, 502, meta).await;
                    }
                    continue 'attempts;
                }
                Err(relay::HeadError::Timeout) => return fail(ctx, conn, m.route, 504, meta).await,
                Err(_) => return fail(ctx, conn, m.route, 502, meta).await,
            }
        }
    };
    if upgrade && response.status == 101 {
        let switched = tunnel::switch(conn, m.route, &response).await.is_ok();
        record(ctx, &meta, 101, request_bytes, 0);
        if switched {
            // `serve` takes the client connection over for the tunnel.
            let parts = tunnel::TunnelParts {
                backend_index: target.backend,
                backend: bconn,
                response,
            };
            let idle = Duration::from_secs(sec.websocket_idle_timeout_secs);
            conn.tunnel = Some((parts, idle));
        }
        return false;
    }
    if response.status == 101 {
        return fail(ctx, conn, m.route, 502, meta).await;
    }
    let outcome = match relay::relay(
        ctx,
        conn,
        req,
        m.route,
        &mut bconn,
        response,
        keep,
        request_bytes,
    )
    .await
    {
        Ok(o) => o,
        Err(status) => return fail(ctx, conn, m.route, status, meta).await,
    };
    record(
        ctx,
        &meta,
        outcome.status,
        outcome.request_bytes,
        outcome.response_bytes,
    );
    if outcome.backend_reusable && !upgrade {
        ctx.backends.put(
            &target,
            bconn,
            sec.max_idle_connections_per_host,
            Duration::from_secs(sec.idle_connection_timeout_secs),
        );
    }
    outcome.client_keep
}

/// The route's `backend_read_timeout_secs` and `backend_send_timeout_secs`, between two
/// reads and two writes of the backend connection (nginx's `proxy_read_timeout` and
/// `proxy_send_timeout`).
fn backend_deadlines(bconn: &BackendConn, sec: &RouteSecurity) {
    let each = |secs| Limit::Each(Duration::from_secs(secs));
    bconn.limits.set_read(each(sec.backend_read_timeout_secs));
    bconn.limits.set_write(each(sec.backend_send_timeout_secs));
}

fn record(ctx: &Ctx, meta: &Meta, status: u16, request_bytes: u64, response_bytes: u64) {
    ctx.recorder.record(&Outcome {
        method: &meta.method,
        host: &meta.host,
        status,
        duration: meta.started.elapsed(),
        request_bytes,
        response_bytes,
    });
}

/// A connection to the first candidate that accepts one: an idle pooled connection if there
/// is one (and `pooled`), else a new one. `Err`: every candidate failed: 504 if the last
/// attempt timed out, else 502.
async fn acquire(
    ctx: &Ctx,
    candidates: &[Rc<Target>],
    timeout: Duration,
    pooled: bool,
) -> Result<(Rc<Target>, BackendConn), u16> {
    let mut status = 502;
    for target in candidates {
        if pooled {
            if let Some(c) = ctx.backends.take(target) {
                return Ok((target.clone(), c));
            }
        }
        match backend::connect(target, timeout).await {
            Ok(c) => return Ok((target.clone(), c)),
            Err(e) => {
                if let Some(i) = target.backend {
                    ctx.region.header.backends[i].failures.fetch_add(1, Relaxed);
                }
                status = if matches!(e, ConnectError::Timeout) {
                    504
                } else {
                    502
                };
                log::warn!("backend {}: connect failed: {e}", target.label());
            }
        }
    }
    Err(status)
}

enum SendError {
    /// The client's body was bad (400/413) or too slow (408).
    Client(u16),
    ClientGone,
    Backend,
    /// The backend took no bytes within `backend_send_timeout_secs`.
    BackendTimeout,
}

fn backend_error(e: &std::io::Error) -> SendError {
    if timed::is_timeout(e) {
        SendError::BackendTimeout
    } else {
        SendError::Backend
    }
}

/// Sends the head and streams the body; returns the body bytes sent.
async fn send_request<S: ClientStream>(
    ctx: &Ctx,
    conn: &mut Conn<S>,
    req: &Request,
    bconn: &mut BackendConn,
    head: &[u8],
    framing: Framing,
    sec: &RouteSecurity,
) -> Result<u64, SendError> {
    let (res, _) = bconn.stream.write_all(head.to_vec()).await;
    res.map_err(|e| backend_error(&e))?;
    if framing == Framing::None {
        return Ok(0);
    }
    if req.expects_continue() && respond::send_continue(&mut conn.stream).await.is_err() {
        return Err(SendError::ClientGone);
    }
    conn.limits.set_read(Limit::Each(Duration::from_secs(
        sec.client_body_timeout_secs,
    )));
    let mut reader = BodyReader::new(framing, sec.max_chunked_body_size);
    let mut piece = ctx.take_buf();
    let mut sent = 0u64;
    let result = loop {
        match reader
            .next(&mut conn.stream, &mut conn.buf, &mut piece)
            .await
        {
            Ok(true) => sent += piece.len() as u64,
            Ok(false) => break Ok(()),
            Err(e) => break Err(e.status().map_or(SendError::ClientGone, SendError::Client)),
        }
        let out = if framing == Framing::Chunked {
            chunk(&piece)
        } else {
            std::mem::take(&mut piece)
        };
        let (res, back) = bconn.stream.write_all(out).await;
        if framing != Framing::Chunked {
            piece = back;
        }
        if let Err(e) = res {
            break Err(backend_error(&e));
        }
    };
    ctx.give_buf(piece);
    result?;
    if framing == Framing::Chunked {
        let (res, _) = bconn.stream.write_all(b"0\r\n\r\n".to_vec()).await;
        res.map_err(|e| backend_error(&e))?;
    }
    Ok(sent)
}

/// One chunk of chunked transfer coding around `data`.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The request head as the backend gets it. Header values go as they came: obs-text bytes
/// (0x80–0xFF) are not re-encoded.
fn request_head(
    req: &Request,
    target: &Target,
    rest: &str,
    route: &RouteEntry,
    client_ip: IpAddr,
    framing: Framing,
    upgrade: bool,
) -> Vec<u8> {
    use std::io::Write;
    let sec = &route.security;
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

/// An error answered by the proxy itself (502, 503, 504, or the client's 4xx).
async fn fail<S: ClientStream>(
    ctx: &Ctx,
    conn: &mut Conn<S>,
    route: &RouteEntry,
    status: u16,
    meta: Meta,
) -> bool {
    super::conn::finish_error(ctx, conn, Response::error(status), route, meta).await
}
