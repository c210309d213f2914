//! HTTP/2 client connections (RFC 9113): on the TLS listener when ALPN agreed on `h2`, and
//! on a plain listener with `http2_cleartext` when a connection opens with the preface. The
//! `h2` crate does the framing, HPACK and flow-control accounting; this module drives one
//! connection: its settings, one task per stream (`stream`), the flood limits (`guard`), the
//! idle timeout, and a graceful GOAWAY when the worker drains.
//!
//! Each stream goes through the same routing, limits, access checks, handlers and proxy
//! backend half as an HTTP/1.1 request (`Dispatch::route`, `proxy::send`); only how its
//! bytes travel differs (`send`, `body`).

mod body;
mod guard;
mod proxy;
mod send;
mod stream;

use super::ctx::Open;
use super::dispatch::Dispatch;
use super::timed::{Deadlines, Limit};
use bytes::Bytes;
use guard::{Guard, Limits};
use h2::Reason;
use monoio::io::{AsyncReadRent, AsyncWriteRent, Split};
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// How often a connection looks at the drain signal and its idle time: once a second, so
/// that thousands of idle connections cost a worker little (at 200 ms, 10,000 of them woke
/// it 50,000 times a second). A drain's GOAWAY then leaves within a second — an idle
/// HTTP/1.1 connection is not told at all — and an idle timeout is met within one.
const TICK: Duration = Duration::from_secs(1);
/// How long a closing connection may take to send its GOAWAY and the end of its streams,
/// once none is left open (or at once, after a flood).
const CLOSING: Duration = Duration::from_secs(1);
/// Plaintext buffered between the socket and `h2`: one TLS record in, a few out.
const READ_BUF: usize = 16 * 1024;
const WRITE_BUF: usize = 64 * 1024;
/// What h2 writes is gathered up to this size before it goes to the TLS stream.
const WRITE_COALESCE: usize = 16 * 1024;
/// Flow-control windows the server grants: a 50 MB upload must not wait for a round trip
/// each 64 KiB (the protocol's default), and a stream's buffered body stays bounded.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// Response bytes `h2` may hold per stream before the stream waits for the socket.
const SEND_BUFFER: usize = 256 * 1024;

/// What a connection and its streams share.
pub struct Shared {
    /// Streams accepted and not yet finished.
    streams: Cell<usize>,
    /// Since when no stream is open.
    idle_since: Cell<Instant>,
    /// Why the connection must close at once (a flood, a stalled stream).
    tripped: Cell<Option<&'static str>>,
    /// The connection loop, to wake when tripped.
    waker: RefCell<Option<Waker>>,
}

impl Shared {
    fn new() -> Rc<Shared> {
        Rc::new(Shared {
            streams: Cell::new(0),
            idle_since: Cell::new(Instant::now()),
            tripped: Cell::new(None),
            waker: RefCell::new(None),
        })
    }

    pub fn tripped(&self) -> Option<&'static str> {
        self.tripped.get()
    }

    /// Closes the connection with GOAWAY `ENHANCE_YOUR_CALM`, for the reason given.
    pub fn trip(&self, why: &'static str) {
        if self.tripped.get().is_none() {
            self.tripped.set(Some(why));
            if let Some(w) = self.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    async fn wait_trip(&self) -> &'static str {
        std::future::poll_fn(|cx| match self.tripped.get() {
            Some(why) => Poll::Ready(why),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// A stream counted open from its accept until dropped.
pub struct StreamOpen(Rc<Shared>);

impl StreamOpen {
    fn new(shared: &Rc<Shared>) -> StreamOpen {
        shared.streams.set(shared.streams.get() + 1);
        StreamOpen(shared.clone())
    }

    pub fn shared(&self) -> &Shared {
        &self.0
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        let left = self.0.streams.get() - 1;
        self.0.streams.set(left);
        if left == 0 {
            self.0.idle_since.set(Instant::now());
        }
    }
}

fn builder(open: &Open) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(open.h2_streams)
        // The largest head any route takes; each route's own limit applies once routed.
        .max_header_list_size(open.max_head.min(u32::MAX as usize) as u32)
        // The HPACK table a client may make this side keep: the protocol's default, stated.
        .header_table_size(4096)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(SEND_BUFFER)
        // Streams a client resets before they are accepted: past this, GOAWAY
        // ENHANCE_YOUR_CALM from the crate itself (the guard counts the accepted ones).
        .max_pending_accept_reset_streams(20)
        // Streams the server resets for the client's protocol errors: past this, GOAWAY.
        .max_local_error_reset_streams(Some(128));
    b
}

/// Serves one HTTP/2 connection to its end. `early`: plaintext already read from it.
pub async fn serve<S>(
    open: Open,
    dispatch: Rc<Dispatch>,
    stream: S,
    early: Vec<u8>,
    peer: SocketAddr,
    limits: Rc<Deadlines>,
) where
    S: AsyncReadRent + AsyncWriteRent + Split + Unpin + 'static,
{
    let shared = Shared::new();
    let io = monoio_compat::StreamWrapper::new_with_buffer_size(stream, READ_BUF, WRITE_BUF);
    let io = Rc::new(RefCell::new(io));
    let guarded = Guard::new(
        io.clone(),
        early,
        Limits::new(open.h2_streams),
        shared.clone(),
    );
    // The preface and first SETTINGS come within the head's deadline, set at the accept.
    // h2 writes a frame's head and its payload in separate calls, and the compat wrapper
    // starts a socket write on each: buffered here, whatever h2 produced in one pass goes in
    // one TLS record and one write (a 1 KiB response: 2 sends, 32 and 1046 bytes, become 1).
    let buffered = tokio::io::BufWriter::with_capacity(WRITE_COALESCE, guarded);
    let conn = match builder(&open).handshake::<_, Bytes>(buffered).await {
        Ok(conn) => conn,
        Err(e) => {
            log::debug!("HTTP/2 handshake with {peer} failed: {e}");
            return;
        }
    };
    // From now on a wait for frames is not an error: the idle timeout below bounds it.
    limits.set_read(Limit::None);
    let mut driver = Driver {
        conn,
        ctx: open.ctx(),
        open,
        dispatch,
        shared,
        peer,
        closing: None,
    };
    if driver.run().await == End::Linger {
        drop(driver);
        guard::linger(&io, CLOSING).await;
    }
}

type Connection<S> =
    h2::server::Connection<tokio::io::BufWriter<Guard<monoio_compat::StreamWrapper<S>>>, Bytes>;

/// One connection after its handshake.
struct Driver<S> {
    conn: Connection<S>,
    ctx: Rc<super::ctx::Ctx>,
    /// Counts the connection open until the driver is dropped.
    open: Open,
    dispatch: Rc<Dispatch>,
    shared: Rc<Shared>,
    peer: SocketAddr,
    /// When the graceful GOAWAY was sent.
    closing: Option<Instant>,
}

#[derive(PartialEq, Eq)]
enum End {
    /// Closed as the protocol closes.
    Closed,
    /// A GOAWAY went out after an error or a flood: drain what the client still sends.
    Linger,
}

impl<S> Driver<S>
where
    S: AsyncReadRent + AsyncWriteRent + Split + Unpin + 'static,
{
    async fn run(&mut self) -> End {
        // One timer for the connection's life, re-armed when it fires: a stream accepted
        // must not cost a timer of its own.
        let mut tick = std::pin::pin!(monoio::time::sleep(TICK));
        loop {
            enum Event<T> {
                Stream(Option<Result<T, h2::Error>>),
                Tick,
                Trip(&'static str),
            }
            let event = monoio::select! {
                r = self.conn.accept() => Event::Stream(r),
                _ = &mut tick => Event::Tick,
                why = self.shared.wait_trip() => Event::Trip(why),
            };
            match event {
                Event::Stream(Some(Ok((req, respond)))) => self.spawn(req, respond),
                Event::Stream(Some(Err(e))) => {
                    // `h2` has sent its GOAWAY (a protocol error, a CONTINUATION flood, too
                    // many resets before accept): let it reach the client.
                    log::debug!("HTTP/2 connection with {} failed: {e}", self.peer);
                    return End::Linger;
                }
                Event::Stream(None) => return End::Closed,
                Event::Trip(why) => {
                    log::warn!(
                        "HTTP/2 client {}: {why}: closing with ENHANCE_YOUR_CALM",
                        self.peer
                    );
                    self.conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                    let closed = std::future::poll_fn(|cx| self.conn.poll_closed(cx));
                    let _ = monoio::time::timeout(CLOSING, closed).await;
                    return End::Linger;
                }
                Event::Tick => {
                    let now = Instant::now();
                    tick.as_mut().reset((now + TICK).into());
                    if self.tick(now) {
                        return End::Closed;
                    }
                }
            }
        }
    }

    /// A stream's own task.
    fn spawn(&self, req: http_types::Request<h2::RecvStream>, respond: SendResponse) {
        self.ctx.slot.http2_streams.fetch_add(1, Relaxed);
        let arrived = stream::Arrived {
            req,
            respond,
            peer: self.peer,
            open: StreamOpen::new(&self.shared),
        };
        let task = stream::serve(self.ctx.clone(), self.dispatch.clone(), arrived);
        drop(monoio::spawn(task));
    }

    /// The drain and the idle timeout. `true`: the connection is done.
    fn tick(&mut self, now: Instant) -> bool {
        let idle = self.shared.streams.get() == 0;
        let idle_long = idle && now - self.shared.idle_since.get() >= self.open.keepalive;
        if self.closing.is_none() && (self.open.draining.get() || idle_long) {
            // GOAWAY naming the last stream taken; the ones in flight finish.
            self.conn.graceful_shutdown();
            self.closing = Some(now);
        }
        // A client that does not take part in the close (no PING answer) is not waited for
        // once nothing is left to finish.
        self.closing.is_some_and(|at| idle && now - at >= CLOSING)
    }
}

type SendResponse = h2::server::SendResponse<Bytes>;
