//! One client connection: read a request head, check it, hand it to the service, and go
//! round again while the connection may be kept alive. Requests on a connection are answered
//! one after the other, so pipelined requests are answered in order. What a request is
//! answered with (routes, handlers, the proxy) is the service's business, behind `Service`.

use super::ctx::{Ctx, Open, HEAD_BUF};
use super::exchange::{self, Client, Exchange, Incoming, Meta};
use super::http::client::ClientStream;
use super::http::respond::{Body, Response};
use super::http::{self, Parse, Request};
use super::timed::{self, Limit};
use monoio::buf::IoBufMut;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long an idle connection keeps its head buffer before waiting without one.
const HOT: Duration = Duration::from_millis(50);

/// What answers the requests of a connection.
#[allow(async_fn_in_trait)]
pub trait Service {
    /// What a connection becomes after a successful upgrade.
    type Tunnel;

    /// Answers one request whose head passed the protocol checks.
    async fn exchange<S: ClientStream>(
        &self,
        ctx: &Ctx,
        client: &mut Client<S>,
        incoming: Incoming,
    ) -> Exchange<Self::Tunnel>;

    /// Runs the tunnel to its end; the connection closes after it.
    async fn tunnel<S: ClientStream>(&self, ctx: &Ctx, client: Client<S>, tunnel: Self::Tunnel);
}

/// A request head and how it arrived.
struct Arrived {
    req: Request,
    head_len: usize,
    /// From the first byte of the head.
    started: Instant,
}

enum Head {
    Request(Arrived),
    /// The peer closed, or no request came in time: close quietly.
    Close,
    /// Answer with this status and close.
    Error(u16),
}

/// Serves one client connection to its end. A plain function returning the task itself:
/// what it takes is moved into the task once (an `async fn`, and a wrapper around it, would
/// keep a second copy of its arguments), since every idle connection costs its task's size.
#[allow(clippy::manual_async_fn)]
pub fn serve<S: ClientStream, H: Service + 'static>(
    open: Open,
    service: Rc<H>,
    mut conn: Client<S>,
) -> impl Future<Output = ()> + 'static {
    async move {
        let ctx: &Ctx = &open;
        let mut fresh = true;
        let tunnel = loop {
            // The exchange, the error answer and the tunnel are boxed: their states are large,
            // and inline they would make every idle connection's task as large as the largest.
            // The head is turned into its answer's future before anything is awaited, so it
            // is not kept in the task beside the read state.
            let answer: Pin<Box<dyn Future<Output = Exchange<H::Tunnel>> + '_>> =
                match read_head(ctx, &mut conn, fresh).await {
                    Head::Request(arrived) => {
                        Box::pin(exchange(ctx, &*service, &mut conn, arrived))
                    }
                    Head::Close => Box::pin(std::future::ready(Exchange::Close)),
                    Head::Error(status) => {
                        let meta = Meta::unparsed(ctx, &conn.buf, conn.ip(), Instant::now());
                        Box::pin(exchange::fail(ctx, &mut conn, status, None, meta))
                    }
                };
            let next = answer.await;
            fresh = false;
            match next {
                Exchange::KeepAlive => {}
                Exchange::Tunnel(t) => break Some(Box::new(t)),
                Exchange::Close => break None,
            }
            // Between requests the connection holds no buffer (bytes of a pipelined request
            // excepted): an idle connection costs its task and its socket only.
            if conn.buf.is_empty() {
                ctx.give_head(std::mem::take(&mut conn.buf));
            }
        };
        if let Some(t) = tunnel {
            return Box::pin(service.tunnel(ctx, conn, *t)).await;
        }
        if conn.linger {
            Box::pin(linger(&mut conn)).await;
        } else if conn.stream.plain().is_none() && !conn.cut {
            // TLS ends with close_notify, as nginx's SSL_shutdown does, so a client can tell
            // the end from a cut (a cut response gets none); one that does not take it within
            // a second is not waited for.
            conn.limits.set_write(Limit::Each(Duration::from_secs(1)));
            let _ = Box::pin(monoio::io::AsyncWriteRent::shutdown(&mut conn.stream)).await;
        }
        ctx.give_head(std::mem::take(&mut conn.buf));
    }
}

/// `fresh`: no request has been read on this connection yet; its head's deadline was set
/// when it was accepted.
async fn read_head<S: ClientStream>(ctx: &Ctx, conn: &mut Client<S>, fresh: bool) -> Head {
    let limit = ctx.max_head;
    let mut started = None;
    if !fresh {
        // Between requests: nginx's keepalive_timeout. Draining does not cut this wait short,
        // since the client may be sending already; the drain's own deadline bounds it.
        conn.limits
            .set_read(Limit::By(Instant::now() + ctx.keepalive));
    }
    // A client that sends at once is read with a buffer at once; one quiet for `HOT` gives
    // its buffer back and is woken by readiness. Not when the stream holds bytes already
    // (TLS: decrypted, or not yet decrypted): those are read at once.
    let waited = conn.limits.read();
    let mut hot = true;
    if conn.buf.is_empty() && conn.stream.idle_socket().is_some() {
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
                    return Head::Request(Arrived {
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
async fn wait_for_bytes<S: ClientStream>(ctx: &Ctx, conn: &mut Client<S>) -> bool {
    if let Some(tcp) = conn.stream.idle_socket() {
        // The deadline is kept by the worker's idle queue, not by a timer of its own.
        let deadline = conn
            .limits
            .read()
            .deadline()
            .unwrap_or_else(|| Instant::now() + ctx.keepalive);
        let parked = ctx.idle.park(deadline);
        let readable = tcp.tcp().readable(false);
        let woken = monoio::select! {
            r = readable => r.is_ok(),
            _ = parked => false,
        };
        if !woken {
            return false;
        }
    }
    conn.buf = ctx.take_head();
    true
}

/// The protocol's checks (framing, target, path), then the service.
async fn exchange<S: ClientStream, H: Service>(
    ctx: &Ctx,
    service: &H,
    conn: &mut Client<S>,
    arrived: Arrived,
) -> Exchange<H::Tunnel> {
    let Arrived {
        req,
        head_len,
        started,
    } = arrived;
    let meta = Meta::of(ctx, &req, conn.ip(), started);
    let framing = match req.check() {
        Ok(f) => f,
        Err(status) => return exchange::fail(ctx, conn, status, None, meta).await,
    };
    let keep = req.wants_keep_alive() && !ctx.draining.get();
    // `OPTIONS *` (the only method `check` lets through with it) asks about the server.
    let star = req.target == "*";
    let path = if star {
        String::new()
    } else {
        match http::normalize_path(req.path()) {
            Ok(path) => path,
            Err(()) => return exchange::fail(ctx, conn, 400, None, meta).await,
        }
    };
    let incoming = Incoming {
        req,
        path,
        framing,
        head_len,
        keep,
        meta,
    };
    if star {
        let r = Response::new(http::ResponseHead::new(204), Body::Empty);
        return exchange::answer(ctx, conn, incoming, r, None).await;
    }
    service.exchange(ctx, conn, incoming).await
}

/// How long a closing connection may keep sending, and may pause, before it is cut.
const LINGER_TOTAL: Duration = Duration::from_secs(5);
const LINGER_IDLE: Duration = Duration::from_secs(2);

/// After an error answer the client may still be sending (a body that was refused unread).
/// Closing at once would make the kernel answer its data with a reset, which can destroy the
/// response before the client reads it. So, like nginx's lingering close: stop writing, then
/// read and drop what still comes, for a bounded time.
async fn linger<S: ClientStream>(conn: &mut Client<S>) {
    // Over rustls the half-close would need a close_notify written through the stream first:
    // such a connection just closes. Plain TCP and kTLS have the socket.
    let Some(fd) = conn.stream.raw_fd() else {
        return;
    };
    conn.stream.before_half_close();
    // A failed half-close only makes the linger shorter.
    let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::config::Config;
    use crate::worker::timed::Timed;
    use std::io::{Read, Write};

    /// Answers every request with its normalized path.
    struct PathEcho;

    impl Service for PathEcho {
        type Tunnel = ();

        async fn exchange<S: ClientStream>(
            &self,
            ctx: &Ctx,
            client: &mut Client<S>,
            incoming: Incoming,
        ) -> Exchange<()> {
            let body = bytes::Bytes::from(incoming.path.clone());
            let r = Response::new(http::ResponseHead::new(200), Body::Bytes(body));
            exchange::answer(ctx, client, incoming, r, None).await
        }

        async fn tunnel<S: ClientStream>(&self, _: &Ctx, _: Client<S>, _: ()) {}
    }

    fn ctx() -> Ctx {
        static SHM: std::sync::OnceLock<crate::shared::shm::Shm> = std::sync::OnceLock::new();
        let shm = SHM.get_or_init(|| crate::shared::shm::Shm::create().expect("memfd"));
        Ctx::new(&crate::shared::WorkerStart {
            index: 0,
            slot: 0,
            config: std::sync::Arc::new(Config::default()),
            builtin: false,
            listeners: Vec::new(),
            shm: shm.region(),
            tls: None,
            identity: None,
        })
    }

    /// Serves one connection with `PathEcho`; returns all the client read.
    fn exchange_bytes(sent: &'static [u8]) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(sent).unwrap();
            let mut got = Vec::new();
            let _ = c.read_to_end(&mut got);
            String::from_utf8_lossy(&got).into_owned()
        });
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (open, _) = Open::new(Rc::new(ctx()));
            let listener = monoio::net::TcpListener::from_std(listener).unwrap();
            let (stream, peer) = listener.accept().await.unwrap();
            let limits = open.client_deadlines();
            let client = Client::new(Timed::new(stream, limits.clone()), peer, limits);
            serve(open, Rc::new(PathEcho), client).await;
        });
        client.join().unwrap()
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_then_a_bad_one_closes() {
        let got = exchange_bytes(
            b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /x/../b?q HTTP/1.1\r\nHost: t\r\n\r\nBAD\r\n\r\n",
        );
        let a = got.find("\r\n\r\n/a").expect(&got);
        let b = got.find("\r\n\r\n/b").expect(&got);
        assert!(a < b, "{got}");
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 2, "{got}");
        assert!(got.contains("HTTP/1.1 400 Bad Request"), "{got}");
        assert!(
            got.ends_with("400 Bad Request\n"),
            "closed after the 400: {got}"
        );
    }

    #[test]
    fn protocol_errors_are_answered_before_the_service_sees_them() {
        let got = exchange_bytes(b"GET /%2e%2e/x HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
        let got = exchange_bytes(b"GET / HTTP/1.1\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 400"), "no Host: {got}");
        let got = exchange_bytes(b"OPTIONS * HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 204"), "{got}");
        assert!(
            !got.contains("\r\n\r\n/"),
            "the service did not answer: {got}"
        );
    }

    #[test]
    fn an_http_1_0_request_closes_after_its_answer() {
        let got = exchange_bytes(b"GET /one HTTP/1.0\r\n\r\nGET /two HTTP/1.0\r\n\r\n");
        assert!(got.ends_with("\r\n\r\n/one"), "{got}");
        assert!(got.contains("Connection: close"), "{got}");
    }
}
