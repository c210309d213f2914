//! One proxied exchange, start to end: candidates, a pooled or new connection (failing over),
//! the request sent, the response head read (replayed once where that is safe), then the
//! relay, or a tunnel for a WebSocket upgrade.

use super::backend::{self, BackendConn, ConnectError, Pool, Target};
use super::head::{chunk, is_websocket, request_head, Proxied};
use super::relay::{self, BackendResponse, HeadError};
use super::tunnel::{self, Tunnel};
use super::{Active, Failure, ProxyRoute};
use crate::shared::config::RouteSecurity;
use crate::worker::ctx::Ctx;
use crate::worker::exchange::{self, Client, Exchange, Incoming, Meta};
use crate::worker::http::body::BodyError;
use crate::worker::http::client::ClientStream;
use crate::worker::http::respond;
use crate::worker::http::Framing;
use crate::worker::timed::{self, Limit};
use monoio::io::AsyncWriteRentExt;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// The backend's response head, and the connection it came on.
struct Answered<'a> {
    target: Rc<Target>,
    bconn: BackendConn,
    _active: Active<'a>,
    request_bytes: u64,
    response: BackendResponse,
}

/// Proxies one request: `rest` is the path after the route's prefix, `sec` the route's
/// security table.
pub async fn forward<S: ClientStream>(
    ctx: &Ctx,
    pool: &Pool,
    client: &mut Client<S>,
    incoming: Incoming,
    route: &ProxyRoute,
    rest: &str,
    sec: &RouteSecurity,
) -> Exchange<Tunnel> {
    let Incoming {
        req,
        framing,
        keep,
        mut meta,
        ..
    } = incoming;
    let p = Proxied {
        req: &req,
        rest,
        sec,
        framing,
        client_ip: client.ip(),
        upgrade: is_websocket(&req),
    };
    let since = Instant::now();
    let answered = match send(ctx, pool, client, route, &p).await {
        Ok(a) => a,
        Err(f) => return failed(ctx, client, f, sec, meta).await,
    };
    let Answered {
        target,
        mut bconn,
        _active,
        request_bytes,
        response,
    } = answered;
    meta.request_bytes = request_bytes;
    if meta.logged() {
        meta.upstream(bconn.peer(), since);
    }
    if p.upgrade && response.status == 101 {
        let switched = tunnel::switch(client, sec, &response).await.is_ok();
        // Counted now; its access log line waits for the tunnel's close, with its bytes.
        meta.record_metrics(ctx, 101, 0);
        if !switched {
            meta.log_access(ctx, 101, 0, 0);
            return Exchange::Close;
        }
        return Exchange::Tunnel(Tunnel {
            backend_index: target.backend,
            backend: bconn,
            early: response.rest,
            idle: Duration::from_secs(sec.websocket_idle_timeout_secs),
            meta,
        });
    }
    if response.status == 101 {
        return failed(ctx, client, Failure::Backend, sec, meta).await;
    }
    let relayed = relay::relay(ctx, client, req_view(&p, keep), &mut bconn, response).await;
    let outcome = match relayed {
        Ok(o) => o,
        Err(f) => return failed(ctx, client, f, sec, meta).await,
    };
    meta.record(ctx, outcome.status, outcome.response_bytes);
    if outcome.backend_reusable && !p.upgrade {
        let idle = Duration::from_secs(sec.idle_connection_timeout_secs);
        pool.put(&target, bconn, sec.max_idle_connections_per_host, idle);
    }
    Exchange::keep_if(outcome.client_keep)
}

fn req_view<'a>(p: &Proxied<'a>, keep: bool) -> relay::ClientSide<'a> {
    relay::ClientSide {
        req: p.req,
        sec: p.sec,
        keep,
    }
}

/// Connects (failing over on refusal or timeout), sends, and reads the response head. A
/// request that can be replayed and got no response byte is sent again: once on a fresh
/// connection to the same server if the dead one came from the pool, else to the next
/// candidate.
async fn send<'c, S: ClientStream>(
    ctx: &'c Ctx,
    pool: &Pool,
    client: &mut Client<S>,
    route: &ProxyRoute,
    p: &Proxied<'_>,
) -> Result<Answered<'c>, Failure> {
    let candidates = route.upstream.candidates(ctx.region, p.client_ip);
    if candidates.is_empty() {
        log::warn!("upstream `{}`: no healthy server", route.upstream.name);
        return Err(Failure::NoServer);
    }
    let connect_timeout = Duration::from_secs(p.sec.backend_connect_timeout_secs);
    let mut from = 0;
    let mut pooled = !p.upgrade;
    let mut retried_same = false;
    loop {
        let (target, mut bconn) =
            acquire(ctx, pool, &candidates[from..], connect_timeout, pooled).await?;
        let active = Active::new(ctx, &target);
        let head = request_head(p, &target);
        loop {
            backend_deadlines(&bconn, p.sec);
            let result = match send_request(ctx, client, &mut bconn, &head, p).await {
                Ok(n) => relay::read_head(&mut bconn).await.map(|r| (n, r)),
                Err(Failure::Backend) => Err(HeadError::Stale),
                Err(Failure::Timeout) => Err(HeadError::Timeout),
                Err(f) => return Err(f),
            };
            match result {
                Ok((request_bytes, response)) => {
                    if let Some(i) = target.backend {
                        ctx.slot.count_upstream_response(i, response.status);
                    }
                    return Ok(Answered {
                        target,
                        bconn,
                        _active: active,
                        request_bytes,
                        response,
                    });
                }
                Err(HeadError::Stale) if p.idempotent() => {
                    if bconn.reused && !retried_same {
                        retried_same = true;
                        if let Ok(fresh) = backend::connect(&target, connect_timeout).await {
                            bconn = fresh;
                            ctx.slot.upstream_retries.fetch_add(1, Relaxed);
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
                        return Err(Failure::Backend);
                    }
                    ctx.slot.upstream_retries.fetch_add(1, Relaxed);
                    break;
                }
                Err(HeadError::Timeout) => return Err(Failure::Timeout),
                Err(_) => return Err(Failure::Backend),
            }
        }
    }
}

/// The route's `backend_read_timeout_secs` and `backend_send_timeout_secs`, between two
/// reads and two writes of the backend connection (nginx's `proxy_read_timeout` and
/// `proxy_send_timeout`).
fn backend_deadlines(bconn: &BackendConn, sec: &RouteSecurity) {
    let each = |secs| Limit::Each(Duration::from_secs(secs));
    bconn.limits.set_read(each(sec.backend_read_timeout_secs));
    bconn.limits.set_write(each(sec.backend_send_timeout_secs));
}

/// A connection to the first candidate that accepts one: an idle pooled connection if there
/// is one (and `pooled`), else a new one. `Err`: every candidate failed, by timeout if the
/// last one did.
async fn acquire(
    ctx: &Ctx,
    pool: &Pool,
    candidates: &[Rc<Target>],
    timeout: Duration,
    pooled: bool,
) -> Result<(Rc<Target>, BackendConn), Failure> {
    let mut failure = Failure::Backend;
    for target in candidates {
        if pooled {
            if let Some(c) = pool.take(target) {
                return Ok((target.clone(), c));
            }
        }
        match backend::connect(target, timeout).await {
            Ok(c) => return Ok((target.clone(), c)),
            Err(e) => {
                if let Some(i) = target.backend {
                    ctx.region.header.backends[i].failures.fetch_add(1, Relaxed);
                }
                failure = match e {
                    ConnectError::Timeout => Failure::Timeout,
                    ConnectError::Failed(_) => Failure::Backend,
                };
                log::warn!("backend {}: connect failed: {e}", target.label());
            }
        }
    }
    Err(failure)
}

fn backend_error(e: &std::io::Error) -> Failure {
    if timed::is_timeout(e) {
        Failure::Timeout
    } else {
        Failure::Backend
    }
}

/// Sends the head and streams the body; returns the body bytes sent. `Failure::Backend` and
/// `Failure::Timeout` are the backend's; a client that went away is `Client(Closed)`.
async fn send_request<S: ClientStream>(
    ctx: &Ctx,
    client: &mut Client<S>,
    bconn: &mut BackendConn,
    head: &[u8],
    p: &Proxied<'_>,
) -> Result<u64, Failure> {
    let (res, _) = bconn.stream.write_all(head.to_vec()).await;
    res.map_err(|e| backend_error(&e))?;
    let framing = p.framing;
    if framing == Framing::None {
        return Ok(0);
    }
    if p.req.expects_continue() && respond::send_continue(&mut client.stream).await.is_err() {
        return Err(Failure::Client(BodyError::Closed));
    }
    let mut reader = client.body_reader(framing, p.sec);
    let mut piece = ctx.take_buf();
    let mut sent = 0u64;
    let result = loop {
        match reader
            .next(&mut client.stream, &mut client.buf, &mut piece)
            .await
        {
            Ok(true) => sent += piece.len() as u64,
            Ok(false) => break Ok(()),
            Err(e) => break Err(Failure::Client(e)),
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

/// An error answered by the proxy itself (502, 503, 504, or the client's 4xx), with the
/// route's header changes; the connection closes.
async fn failed<S: ClientStream>(
    ctx: &Ctx,
    client: &mut Client<S>,
    f: Failure,
    sec: &RouteSecurity,
    meta: Meta,
) -> Exchange<Tunnel> {
    match f.status() {
        Some(status) => exchange::fail(ctx, client, status, Some(sec), meta).await,
        None => Exchange::Close,
    }
}
