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
use crate::worker::http::body::{BodyError, BodyReader};
use crate::worker::http::client::ClientStream;
use crate::worker::http::respond;
use crate::worker::http::Framing;
use crate::worker::timed::{self, Limit};
use monoio::io::AsyncWriteRentExt;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// The backend's response head, and the connection it came on.
pub struct Answered<'a> {
    pub target: Rc<Target>,
    pub bconn: BackendConn,
    /// Counts the connection for `least_conn` until the exchange is over.
    pub _active: Active<'a>,
    pub request_bytes: u64,
    pub response: BackendResponse,
}

/// Where a proxied request's body comes from: an HTTP/1.1 connection's framed bytes, or an
/// HTTP/2 stream's DATA frames. The backend half of the proxy is written once over it.
#[allow(async_fn_in_trait)]
pub trait RequestBody {
    /// Once, after the head went to the backend and before the first body byte is read: an
    /// HTTP/1.1 client waiting for `100 Continue` gets it here.
    async fn start(&mut self) -> Result<(), Failure>;

    /// The next piece of body into `piece` (cleared first); `Ok(false)` at its end.
    async fn next(&mut self, piece: &mut Vec<u8>) -> Result<bool, BodyError>;
}

/// The body of an HTTP/1.1 request, read from the client connection.
struct ClientBody<'c, S> {
    client: &'c mut Client<S>,
    framing: Framing,
    sec: &'c RouteSecurity,
    expects_continue: bool,
    reader: Option<BodyReader>,
}

impl<S: ClientStream> RequestBody for ClientBody<'_, S> {
    async fn start(&mut self) -> Result<(), Failure> {
        if self.expects_continue
            && respond::send_continue(&mut self.client.stream)
                .await
                .is_err()
        {
            return Err(Failure::Client(BodyError::Closed));
        }
        self.reader = Some(self.client.body_reader(self.framing, self.sec));
        Ok(())
    }

    async fn next(&mut self, piece: &mut Vec<u8>) -> Result<bool, BodyError> {
        let Some(reader) = &mut self.reader else {
            return Ok(false);
        };
        let client = &mut *self.client;
        reader
            .next(&mut client.stream, &mut client.buf, piece)
            .await
    }
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
    let mut body = ClientBody {
        client: &mut *client,
        framing,
        sec,
        expects_continue: req.expects_continue(),
        reader: None,
    };
    let answered = match send(ctx, pool, &mut body, route, &p).await {
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
        pool.keep(&target, bconn, sec);
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
pub async fn send<'c, B: RequestBody>(
    ctx: &'c Ctx,
    pool: &Pool,
    body: &mut B,
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
            let result = match send_request(ctx, body, &mut bconn, &head, p).await {
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
async fn send_request<B: RequestBody>(
    ctx: &Ctx,
    body: &mut B,
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
    body.start().await?;
    let mut piece = ctx.take_buf();
    let mut sent = 0u64;
    let result = loop {
        match body.next(&mut piece).await {
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
