//! A stream for a `Proxy` route: the backend half is the HTTP/1.1 path's (`proxy::send`:
//! candidates, pooled connection, failover, the request head from `proxy/head.rs`, the body
//! streamed from DATA frames); the response comes back in frames, read from the backend only
//! as fast as the client's window opens, so flow control is the back-pressure both ways.

use super::body::StreamBody;
use super::send::{self, body_timeout, finish, send_timeout, SendError};
use super::Shared;
use crate::shared::config::RouteSecurity;
use crate::worker::ctx::Ctx;
use crate::worker::exchange::{apply_route_headers, Incoming, Meta};
use crate::worker::http::respond::Response;
use crate::worker::http::Request;
use crate::worker::proxy::backend::Pool;
use crate::worker::proxy::relay::{self, BackendBody, BackendResponse, BodyKind};
use crate::worker::proxy::{self, connection_tokens, Answered, Failure, Proxied, ProxyRoute};
use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use std::net::IpAddr;
use std::time::Instant;

pub struct Exchange<'a> {
    pub ctx: &'a Ctx,
    pub pool: &'a Pool,
    pub route: &'a ProxyRoute,
    /// The path after the route's prefix.
    pub rest: &'a str,
    pub sec: &'a RouteSecurity,
    pub shared: &'a Shared,
    /// The client's address (balancing by `ip_hash`, `X-Forwarded-For`).
    pub ip: IpAddr,
}

impl Exchange<'_> {
    pub async fn forward(&self, mut respond: SendResponse<Bytes>, recv: RecvStream, i: Incoming) {
        let Incoming {
            req,
            framing,
            mut meta,
            ..
        } = i;
        let p = Proxied {
            req: &req,
            rest: self.rest,
            sec: self.sec,
            framing,
            client_ip: self.ip,
            upgrade: false,
        };
        let timeout = body_timeout(self.sec);
        let mut body = StreamBody::new(recv, framing, self.sec.max_chunked_body_size, timeout);
        let since = Instant::now();
        // A stream the client resets stops here: its backend connection is not held until
        // the backend answers (a Rapid Reset below the frame limit must not pile them up).
        let sent = proxy::send(self.ctx, self.pool, &mut body, self.route, &p);
        let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
        let answered = monoio::select! {
            a = sent => a,
            _ = reset => return,
        };
        let answered = match answered {
            Ok(a) => a,
            Err(f) => {
                self.failed(&mut respond, f, meta).await;
                return body.linger().await;
            }
        };
        meta.request_bytes = answered.request_bytes;
        if meta.logged() {
            meta.upstream(answered.bconn.peer(), since);
        }
        self.relay(respond, &req, answered, meta).await
    }

    /// The proxy's own answer (502, 503, 504, or the client's 4xx); nothing for a client
    /// that is gone.
    async fn failed(&self, respond: &mut SendResponse<Bytes>, f: Failure, meta: Meta) {
        match f.status() {
            Some(status) => {
                let r = Response::error(status);
                finish(self.ctx, respond, r, Some(self.sec), meta, self.shared).await
            }
            None => respond.send_reset(h2::Reason::CANCEL),
        }
    }

    async fn relay(
        &self,
        mut respond: SendResponse<Bytes>,
        req: &Request,
        answered: Answered<'_>,
        meta: Meta,
    ) {
        let Answered {
            target,
            mut bconn,
            _active,
            response: mut r,
            ..
        } = answered;
        let kind = match relay::body_kind(req, &r) {
            Ok(kind) if r.status != 101 => kind,
            _ => {
                log::warn!("backend response with unusable framing: 502");
                return self.failed(&mut respond, Failure::Backend, meta).await;
            }
        };
        let tokens = connection_tokens(r.headers_named("connection"));
        let reusable = relay::backend_keeps(&r, &tokens) && kind != BodyKind::Close;
        let mut head = relay::response_head(&r, &tokens, kind);
        apply_route_headers(&mut head, self.sec);
        let status = r.status;
        let last = kind == BodyKind::None;
        let Ok(mut out) = respond.send_response(send::head(&head), last) else {
            return meta.record(self.ctx, status, 0);
        };
        let copied = self.copy(&mut out, &mut bconn, &mut r, kind).await;
        let (sent, whole) = match copied {
            Ok(n) => (n, true),
            Err((n, e)) => {
                send::cut(&mut out, &e);
                (n, false)
            }
        };
        meta.record(self.ctx, status, sent);
        if whole && reusable && r.rest.is_empty() {
            self.pool.keep(&target, bconn, self.sec);
        }
    }

    /// The backend's body into DATA frames, each piece read from the backend once the client
    /// has window for it. `Err`: the bytes sent and why it stopped.
    async fn copy(
        &self,
        out: &mut SendStream<Bytes>,
        bconn: &mut proxy::backend::BackendConn,
        r: &mut BackendResponse,
        kind: BodyKind,
    ) -> Result<u64, (u64, SendError)> {
        if kind == BodyKind::None {
            return Ok(0);
        }
        let mut body = BackendBody::new(kind);
        let mut piece = self.ctx.take_buf();
        let mut total = 0u64;
        let result = self
            .pieces(out, bconn, r, &mut body, &mut piece, &mut total)
            .await;
        self.ctx.give_buf(piece);
        result.map(|()| total).map_err(|e| (total, e))
    }

    async fn pieces(
        &self,
        out: &mut SendStream<Bytes>,
        bconn: &mut proxy::backend::BackendConn,
        r: &mut BackendResponse,
        body: &mut BackendBody,
        piece: &mut Vec<u8>,
        total: &mut u64,
    ) -> Result<(), SendError> {
        let timeout = send_timeout(self.sec);
        loop {
            send::window(out, piece.capacity(), timeout, self.shared).await?;
            match body.next(bconn, &mut r.rest, piece).await {
                Ok(true) => {}
                Ok(false) => return send::data(out, Bytes::new(), true),
                Err(()) => return Err(SendError::Backend),
            }
            // The window granted may be smaller than the piece: the rest waits for more.
            let mut at = 0;
            while at < piece.len() {
                let n = send::window(out, piece.len() - at, timeout, self.shared).await?;
                send::data(out, Bytes::copy_from_slice(&piece[at..at + n]), false)?;
                at += n;
                *total += n as u64;
            }
        }
    }
}
