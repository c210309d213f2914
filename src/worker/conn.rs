//! One client connection: read a request head, route it, answer, and go round again while
//! the connection may be kept alive.

use super::files::{self, Resolved};
use super::http::{self, Parse, Request, ResponseHead};
use super::recorder::Outcome;
use super::router::{FileRoute, Handler, Matched, RedirectRoute};
use super::server::Ctx;
use crate::shared::config::RouteSecurity;
use bytes::Bytes;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, CancelableAsyncReadRent};
use monoio::net::TcpStream;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Server default head timeout, until a route (and its own limit) is known.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an idle keep-alive connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const HEAD_BUF: usize = 4096;
/// While draining, how long a just-accepted connection may take to send its request.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// What a response carries after its head.
pub enum Body {
    Empty,
    Bytes(Bytes),
    File { file: std::fs::File, len: u64 },
}

enum Head {
    Request(Request),
    /// The peer closed, the idle timeout passed, or the worker drains: close quietly.
    Close,
    /// Answer with this status and close.
    Error(u16),
}

pub async fn serve(ctx: &Ctx, mut stream: TcpStream, peer: SocketAddr) {
    let mut buf = Vec::with_capacity(HEAD_BUF);
    let mut fresh = true;
    loop {
        let head = read_head(ctx, &mut stream, &mut buf, fresh).await;
        fresh = false;
        let req = match head {
            Head::Request(r) => r,
            Head::Close => return,
            Head::Error(status) => {
                let started = Instant::now();
                let head = error_head(status).with_defaults();
                let sent = send(ctx, &mut stream, head, error_body(status), false).await;
                record(ctx, "OTHER", "", status, started, 0, sent.unwrap_or(0));
                return;
            }
        };
        match answer(ctx, &mut stream, &req, peer).await {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
    }
}

/// `fresh`: no request has been read on this connection yet.
async fn read_head(ctx: &Ctx, stream: &mut TcpStream, buf: &mut Vec<u8>, fresh: bool) -> Head {
    let limit = max_head_size(ctx);
    let mut deadline = None;
    loop {
        if !buf.is_empty() {
            match http::parse(buf) {
                Parse::Complete(req, n) => {
                    buf.drain(..n);
                    return Head::Request(req);
                }
                Parse::Invalid(why) => {
                    log::debug!("400: {why}");
                    return Head::Error(400);
                }
                Parse::Partial if buf.len() >= limit => return Head::Error(431),
                Parse::Partial => {}
            }
        }
        let idle = buf.is_empty();
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(HEAD_BUF);
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let owned = std::mem::take(buf).slice_mut(len..cap);
        let result = if !idle {
            let until = *deadline.get_or_insert_with(|| Instant::now() + HEAD_TIMEOUT);
            monoio::time::timeout_at(until.into(), stream.read(owned)).await
        } else if ctx.draining.get() {
            if !fresh {
                // Between requests of a kept-alive connection: the client retries elsewhere.
                return Head::Close;
            }
            // Accepted as draining began: its request is normally already on the way.
            monoio::time::timeout(DRAIN_GRACE, stream.read(owned)).await
        } else {
            // Waiting for a request: the one read that draining may cancel.
            let wait = if fresh { HEAD_TIMEOUT } else { IDLE_TIMEOUT };
            let read = stream.cancelable_read(owned, ctx.cancel_handle());
            monoio::time::timeout(wait, read).await
        };
        let Ok((res, slice)) = result else {
            return if idle { Head::Close } else { Head::Error(408) };
        };
        *buf = slice.into_inner();
        match res {
            Ok(0) => return Head::Close,
            Ok(_) => {}
            // Cancelled by draining with nothing read: decide again, now draining.
            Err(_) if idle && ctx.draining.get() => {}
            Err(_) => return Head::Close,
        }
    }
}

/// The largest head any route accepts: the route is known only once the head is parsed.
fn max_head_size(ctx: &Ctx) -> usize {
    let c = &ctx.config;
    c.host_routes
        .values()
        .chain(c.path_routes.values().flat_map(|p| p.values()))
        .map(|r| r.security.max_request_header_size as usize)
        .max()
        .unwrap_or(8192)
        .max(8192)
}

/// Answers one request. `Ok(true)`: the connection may carry another request.
async fn answer(
    ctx: &Ctx,
    stream: &mut TcpStream,
    req: &Request,
    peer: SocketAddr,
) -> std::io::Result<bool> {
    let started = Instant::now();
    let host = req.host();
    let path = req.path().to_string();
    let has_body = !matches!(req.content_length(), Ok(None | Some(0)))
        || req.header("transfer-encoding").is_some();
    // A body we do not read would be taken for the next request: such a connection closes.
    let keep = req.wants_keep_alive() && !has_body && !ctx.draining.get();
    let is_head = req.method == "HEAD";

    let bad_framing = req.content_length().is_err();
    let missing_host =
        req.version == 1 && req.header("host").is_none() && !req.target.contains("://");
    let (status, head, body, route) = if bad_framing || missing_host {
        (400, error_head(400), error_body(400), None)
    } else if path == "/__metrics" {
        let text = crate::shared::metrics::render(ctx.region);
        let head = ResponseHead::new(200)
            .header("Content-Type", "text/plain; version=0.0.4; charset=utf-8");
        (200, head, Body::Bytes(Bytes::from(text)), None)
    } else {
        match ctx.router.route(&host, &path) {
            None => (404, error_head(404), error_body(404), None),
            Some(m) => {
                log::trace!("{} {} -> {}", req.method, path, m.route.name);
                let (status, head, body) = dispatch(req, &m, peer);
                (status, head, body, Some(&m.route.security))
            }
        }
    };
    let keep = keep && status < 500 && status != 400;
    let mut head = head.with_defaults();
    if let Some(sec) = route {
        apply_response_headers(&mut head, sec);
    }
    let body = if is_head {
        strip_body(body, &mut head)
    } else {
        body
    };
    let sent = send(ctx, stream, head, body, keep).await;
    let request_bytes = req.content_length().ok().flatten().unwrap_or(0);
    record(
        ctx,
        &req.method,
        &host,
        status,
        started,
        request_bytes,
        *sent.as_ref().unwrap_or(&0),
    );
    sent.map(|_| keep)
}

fn dispatch(req: &Request, m: &Matched, peer: SocketAddr) -> (u16, ResponseHead, Body) {
    let route = m.route;
    let sec = &route.security;
    let ip = peer.ip();
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    if route.denied.iter().any(|n| n.contains(&ip))
        || (!route.allowed.is_empty() && !route.allowed.iter().any(|n| n.contains(&ip)))
    {
        return (403, error_head(403), error_body(403));
    }
    if !sec.allowed_methods.is_empty() && !sec.allowed_methods.contains(&req.method) {
        let head = error_head(405).header("Allow", sec.allowed_methods.join(", "));
        return (405, head, error_body(405));
    }
    if req.content_length().ok().flatten().unwrap_or(0) > sec.max_request_body_size {
        return (413, error_head(413), error_body(413));
    }
    match &route.handler {
        Handler::File(f) => serve_file(req, f, m),
        Handler::Redirect(r) => redirect(req, r, &m.rest),
        Handler::Welcome => welcome(req),
        Handler::Proxy => (501, error_head(501), error_body(501)),
    }
}

fn serve_file(req: &Request, route: &FileRoute, m: &Matched) -> (u16, ResponseHead, Body) {
    if req.method != "GET" && req.method != "HEAD" {
        let head = error_head(405).header("Allow", "GET, HEAD");
        return (405, head, error_body(405));
    }
    let (path, meta) = match files::resolve(route, m.rest.as_str(), m.exact) {
        Resolved::File { path, meta } => (path, meta),
        Resolved::NotFound => return (404, error_head(404), error_body(404)),
        Resolved::BadRequest => return (400, error_head(400), error_body(400)),
    };
    let mut head = ResponseHead::new(200).header("Content-Type", files::content_type(&path));
    if let Ok(t) = meta.modified() {
        head.set("Last-Modified", http::http_date(t));
    }
    if let Some(bytes) = route.cache.get(&path) {
        return (200, head, Body::Bytes(bytes.clone()));
    }
    match std::fs::File::open(&path) {
        Ok(file) => (
            200,
            head,
            Body::File {
                file,
                len: meta.len(),
            },
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            (403, error_head(403), error_body(403))
        }
        Err(_) => (404, error_head(404), error_body(404)),
    }
}

fn redirect(req: &Request, r: &RedirectRoute, rest: &str) -> (u16, ResponseHead, Body) {
    let path_var = if rest.is_empty() { "/" } else { rest };
    let mut location = r
        .url
        .replace("$request_uri", &req.target)
        .replace("$path", path_var);
    if r.preserve_path {
        location.push_str(rest);
        if let Some(q) = req.target.find('?') {
            location.push_str(&req.target[q..]);
        }
    }
    let head = ResponseHead::new(r.status)
        .header("Location", location)
        .header("Content-Type", "text/plain; charset=utf-8");
    let body = format!("{} {}\n", r.status, http::reason(r.status));
    (r.status, head, Body::Bytes(Bytes::from(body)))
}

const WELCOME: &str = "<!DOCTYPE html>\n<html><head><title>zerocopy-server</title></head>\n<body><h1>zerocopy-server is running</h1>\n<p>This is the built-in default configuration. Write a <code>config.toml</code> and run <code>zerocopy-server -c config.toml</code>.</p>\n<p>Metrics: <a href=\"/__metrics\">/__metrics</a></p></body></html>\n";

fn welcome(req: &Request) -> (u16, ResponseHead, Body) {
    if req.path() != "/" {
        return (404, error_head(404), error_body(404));
    }
    let head = ResponseHead::new(200).header("Content-Type", "text/html; charset=utf-8");
    (
        200,
        head,
        Body::Bytes(Bytes::from_static(WELCOME.as_bytes())),
    )
}

fn error_head(status: u16) -> ResponseHead {
    ResponseHead::new(status).header("Content-Type", "text/plain; charset=utf-8")
}

fn error_body(status: u16) -> Body {
    Body::Bytes(Bytes::from(format!(
        "{} {}\n",
        status,
        http::reason(status)
    )))
}

fn apply_response_headers(head: &mut ResponseHead, sec: &RouteSecurity) {
    for name in &sec.remove_response_headers {
        head.remove(name);
    }
    for (name, value) in &sec.add_response_headers {
        head.set(name, value.clone());
    }
}

/// HEAD: the same headers as GET, no body.
fn strip_body(body: Body, head: &mut ResponseHead) -> Body {
    let len = match &body {
        Body::Empty => 0,
        Body::Bytes(b) => b.len() as u64,
        Body::File { len, .. } => *len,
    };
    head.set("Content-Length", len.to_string());
    Body::Empty
}

/// Writes the head and body; returns the body bytes sent.
async fn send(
    ctx: &Ctx,
    stream: &mut TcpStream,
    mut head: ResponseHead,
    body: Body,
    keep: bool,
) -> std::io::Result<u64> {
    if !head
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        let len = match &body {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        };
        head.set("Content-Length", len.to_string());
    }
    if !keep {
        head.set("Connection", "close");
    }
    let mut out = head.encode();
    match body {
        Body::Empty => write_all(stream, out).await.map(|_| 0),
        Body::Bytes(b) if b.len() <= 16 * 1024 => {
            out.extend_from_slice(&b);
            write_all(stream, out).await.map(|_| b.len() as u64)
        }
        Body::Bytes(b) => {
            write_all(stream, out).await?;
            let n = b.len() as u64;
            let (res, _) = stream.write_all(b).await;
            res.map(|_| n)
        }
        Body::File { file, len } => {
            write_all(stream, out).await?;
            send_file(ctx, stream, file, len).await
        }
    }
}

async fn write_all(stream: &mut TcpStream, buf: Vec<u8>) -> std::io::Result<()> {
    let (res, _) = stream.write_all(buf).await;
    res.map(|_| ())
}

/// Copies `len` bytes of `file` to the client through a pooled buffer. A file that shrinks
/// underneath ends the connection: padding would send bytes that are not the file.
async fn send_file(
    ctx: &Ctx,
    stream: &mut TcpStream,
    file: std::fs::File,
    len: u64,
) -> std::io::Result<u64> {
    let file = monoio::fs::File::from_std(file)?;
    let mut offset = 0u64;
    let mut buf = ctx.take_buf();
    while offset < len {
        let want = (len - offset).min(super::server::BODY_BUF as u64) as usize;
        buf.clear();
        let (res, b) = file.read_at(buf.slice_mut(0..want), offset).await;
        buf = b.into_inner();
        let n = res?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while being sent",
            ));
        }
        let (res, b) = stream.write_all(buf).await;
        buf = b;
        res?;
        offset += n as u64;
    }
    ctx.give_buf(buf);
    Ok(offset)
}

fn record(
    ctx: &Ctx,
    method: &str,
    host: &str,
    status: u16,
    started: Instant,
    request_bytes: u64,
    response_bytes: u64,
) {
    ctx.recorder.record(&Outcome {
        method,
        host,
        status,
        duration: started.elapsed(),
        request_bytes,
        response_bytes,
    });
}
