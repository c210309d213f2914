//! A WebSocket (or any `Upgrade`) tunnel, once the backend has answered 101: a full-duplex
//! copy between client and backend, each direction one read-then-write loop driven by I/O
//! completions. Nothing polls and nothing waits on a timer, so an idle tunnel costs no CPU and
//! a frame is forwarded as soon as it arrives. When either side closes (or fails), both
//! connections are closed.

use super::backend::{BackendConn, BackendStream};
use super::relay::BackendResponse;
use crate::worker::client::ClientStream;
use crate::worker::conn::{apply_route_headers, Conn};
use crate::worker::http::ResponseHead;
use crate::worker::router::RouteEntry;
use crate::worker::server::Ctx;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};

const TUNNEL_BUF: usize = 16 * 1024;

/// What the tunnel needs once the exchange that set it up has ended.
pub struct TunnelParts {
    /// The server's entry in the shared backend table: a tunnel counts towards `least_conn`
    /// for as long as it is open.
    pub backend_index: Option<usize>,
    pub backend: BackendConn,
    pub response: BackendResponse,
}

/// Sends the 101 head to the client. The tunnel itself runs from `run`, which takes the
/// client connection over.
pub async fn switch<S: ClientStream>(
    conn: &mut Conn<S>,
    route: &RouteEntry,
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
        head.headers
            .push((name.clone(), String::from_utf8_lossy(value).into_owned()));
    }
    let mut head = head.with_defaults();
    apply_route_headers(&mut head, &route.security);
    let (res, _) = conn.stream.write_all(head.encode()).await;
    res.map(|_| ())
}

/// Copies both ways until one side closes. Bytes that already arrived with the 101 (from
/// the backend) or after the upgrade request (from the client) go first.
pub async fn run<S: ClientStream>(ctx: &Ctx, client: S, client_early: Vec<u8>, parts: TunnelParts) {
    let TunnelParts {
        backend_index,
        backend,
        response,
    } = parts;
    let _active = super::Active::of(ctx, backend_index);
    let backend_early = response.rest;
    match backend.stream {
        BackendStream::Plain(b) => pipe(ctx, client, client_early, b, backend_early).await,
        BackendStream::Tls(b) => pipe(ctx, client, client_early, *b, backend_early).await,
    }
}

async fn pipe<S, B>(ctx: &Ctx, client: S, client_early: Vec<u8>, backend: B, backend_early: Vec<u8>)
where
    S: ClientStream,
    B: AsyncReadRent + AsyncWriteRent + monoio::io::Split,
{
    let (client_r, client_w) = client.into_split();
    let (backend_r, backend_w) = backend.into_split();
    let up = copy(ctx, client_r, backend_w, client_early);
    let down = copy(ctx, backend_r, client_w, backend_early);
    // Either direction ending ends the tunnel: the other copy is dropped, and with it both
    // connections.
    monoio::select! {
        _ = up => {},
        _ = down => {},
    }
}

async fn copy<R: AsyncReadRent, W: AsyncWriteRent>(
    ctx: &Ctx,
    mut from: R,
    mut to: W,
    early: Vec<u8>,
) {
    if !early.is_empty() {
        let (res, _) = to.write_all(early).await;
        if res.is_err() {
            return;
        }
    }
    let mut buf = ctx.take_buf();
    loop {
        buf.clear();
        let read = from.read(buf.slice_mut(0..TUNNEL_BUF)).await;
        let (res, back) = read;
        buf = back.into_inner();
        match res {
            Ok(n) if n > 0 => {}
            _ => break,
        }
        let (res, back) = to.write_all(buf).await;
        buf = back;
        if res.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
    ctx.give_buf(buf);
}
