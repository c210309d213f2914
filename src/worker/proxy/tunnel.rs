//! A WebSocket (or any `Upgrade`) tunnel, once the backend has answered 101: a full-duplex
//! copy between client and backend, each direction one read-then-write loop driven by I/O
//! completions. Nothing polls: an idle tunnel costs one timer, and a frame is forwarded as
//! soon as it arrives. When either side closes (or fails, or the tunnel stays idle past its
//! limit), both connections are closed.

use super::backend::{BackendConn, BackendStream};
use super::relay::BackendResponse;
use crate::shared::config::RouteSecurity;
use crate::worker::ctx::Ctx;
use crate::worker::exchange::{apply_route_headers, Client, Meta};
use crate::worker::http::client::ClientStream;
use crate::worker::http::ResponseHead;
use crate::worker::timed::Limit;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use std::cell::Cell;
use std::time::{Duration, Instant};

const TUNNEL_BUF: usize = 16 * 1024;

/// What the tunnel needs once the exchange that set it up has ended.
pub struct Tunnel {
    /// The server's entry in the shared backend table: a tunnel counts towards `least_conn`
    /// for as long as it is open.
    pub backend_index: Option<usize>,
    pub backend: BackendConn,
    /// Bytes the backend sent after its 101 head.
    pub early: Vec<u8>,
    /// The tunnel closes once no byte has crossed for this long.
    pub idle: Duration,
    /// The upgrade request: its access log line is written at the close.
    pub meta: Meta,
}

/// Sends the 101 head to the client. The tunnel itself runs from `run`, which takes the
/// client connection over.
pub async fn switch<S: ClientStream>(
    conn: &mut Client<S>,
    sec: &RouteSecurity,
    response: &BackendResponse,
) -> std::io::Result<()> {
    let mut head = ResponseHead::new(101);
    head.reason = Some(response.reason.clone());
    for (name, value) in &response.headers {
        if ["server", "date", "content-length", "transfer-encoding"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h))
        {
            continue;
        }
        head.headers.push((name.clone(), value.clone()));
    }
    let mut head = head.with_defaults();
    apply_route_headers(&mut head, sec);
    let (res, _) = conn.stream.write_all(head.encode()).await;
    res.map(|_| ())
}

/// Copies both ways until one side closes, or until no byte has crossed in either direction
/// for `websocket_idle_timeout_secs`. Writes keep their deadlines (`send_timeout_secs` to
/// the client, `backend_send_timeout_secs` to the backend): a peer that stops reading ends
/// the tunnel. Reads have none of their own: a quiet direction is normal while the other
/// one talks. Bytes that already arrived with the 101 (from the backend) or after the
/// upgrade request (from the client) go first.
pub async fn run<S: ClientStream>(ctx: &Ctx, client: Client<S>, tunnel: Tunnel) {
    let Tunnel {
        backend_index,
        backend,
        early: backend_early,
        idle,
        meta,
    } = tunnel;
    let _active = super::Active::of(ctx, backend_index);
    client.limits.set_read(Limit::None);
    backend.limits.set_read(Limit::None);
    let (client, client_early) = (client.stream, client.buf);
    let last = Cell::new(Instant::now());
    let ends = Ends {
        ctx,
        last: &last,
        idle,
        up: Cell::new(0),
        down: Cell::new(0),
    };
    match backend.stream {
        BackendStream::Plain(b) => ends.pipe(client, client_early, b, backend_early).await,
        BackendStream::Tls(b) => ends.pipe(client, client_early, b, backend_early).await,
    }
    meta.log_access(ctx, 101, ends.down.get(), ends.up.get());
}

/// What both directions of a tunnel share: the time of the last byte either way.
struct Ends<'a> {
    ctx: &'a Ctx,
    last: &'a Cell<Instant>,
    idle: Duration,
    /// Bytes written to the backend, and to the client.
    up: Cell<u64>,
    down: Cell<u64>,
}

impl Ends<'_> {
    async fn pipe<S, B>(&self, client: S, client_early: Vec<u8>, backend: B, backend_early: Vec<u8>)
    where
        S: ClientStream,
        B: AsyncReadRent + AsyncWriteRent + monoio::io::Split,
    {
        let (client_r, client_w) = client.into_split();
        let (backend_r, backend_w) = backend.into_split();
        let up = self.copy(client_r, backend_w, client_early, &self.up);
        let down = self.copy(backend_r, client_w, backend_early, &self.down);
        // Either direction ending ends the tunnel: the other copy is dropped, and with it both
        // connections.
        monoio::select! {
            _ = up => {},
            _ = down => {},
            _ = self.watch() => log::debug!("WebSocket tunnel idle for {:?}: closed", self.idle),
        }
    }

    /// Completes once no byte has crossed for `idle`.
    async fn watch(&self) {
        loop {
            let until = self.last.get() + self.idle;
            if Instant::now() >= until {
                return;
            }
            monoio::time::sleep_until(until.into()).await;
        }
    }

    async fn copy<R: AsyncReadRent, W: AsyncWriteRent>(
        &self,
        mut from: R,
        mut to: W,
        early: Vec<u8>,
        moved: &Cell<u64>,
    ) {
        if !early.is_empty() {
            let (res, _) = to.write_all(early).await;
            match res {
                Ok(n) => moved.set(moved.get() + n as u64),
                Err(_) => return,
            }
        }
        let mut buf = self.ctx.take_buf();
        loop {
            buf.clear();
            let read = from.read(buf.slice_mut(0..TUNNEL_BUF)).await;
            let (res, back) = read;
            buf = back.into_inner();
            match res {
                Ok(n) if n > 0 => self.last.set(Instant::now()),
                _ => break,
            }
            let (res, back) = to.write_all(buf).await;
            buf = back;
            match res {
                Ok(n) => moved.set(moved.get() + n as u64),
                Err(_) => break,
            }
        }
        let _ = to.shutdown().await;
        self.ctx.give_buf(buf);
    }
}
