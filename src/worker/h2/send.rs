//! Responses as HEADERS and DATA frames. A body goes only as fast as the client's
//! flow-control windows let it: each piece waits for window (at most the route's
//! `send_timeout_secs`, after which the stream is stalled and the connection closed), so a
//! stream never holds more than one piece beyond what the client accepted.

use super::Shared;
use crate::shared::config::RouteSecurity;
use crate::worker::ctx::Ctx;
use crate::worker::exchange::{prepare, Meta};
use crate::worker::http::respond::{Body, Response};
use crate::worker::http::ResponseHead;
use bytes::Bytes;
use h2::server::SendResponse;
use h2::SendStream;
use std::time::Duration;

/// Most bytes handed to `h2` for a stream at once.
const PIECE: usize = 64 * 1024;

/// Why a body stopped.
#[derive(Debug)]
pub enum SendError {
    /// The client reset the stream or the connection is gone.
    Gone,
    /// No window for `send_timeout_secs`: the connection is closed.
    Stalled,
    /// The file could not be read to its end.
    File(std::io::Error),
    /// The backend failed mid-body.
    Backend,
}

/// Fields HTTP/2 forbids (RFC 9113 §8.2.2): the connection's business in HTTP/1.1.
const CONNECTION_SPECIFIC: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// The head as HTTP/2 carries it: lower-case names, no connection-specific fields, no
/// reason phrase. A field `http` cannot carry (a backend's invalid name) is dropped.
pub fn head(head: &ResponseHead) -> http_types::Response<()> {
    let mut r = http_types::Response::new(());
    *r.status_mut() = http_types::StatusCode::from_u16(head.status)
        .unwrap_or(http_types::StatusCode::BAD_GATEWAY);
    let fields = r.headers_mut();
    for (name, value) in &head.headers {
        if CONNECTION_SPECIFIC
            .iter()
            .any(|c| name.eq_ignore_ascii_case(c))
        {
            continue;
        }
        let name = http_types::HeaderName::from_bytes(name.as_bytes());
        let value = http_types::HeaderValue::from_bytes(value);
        match (name, value) {
            (Ok(n), Ok(v)) => {
                fields.append(n, v);
            }
            _ => log::debug!("a response field HTTP/2 cannot carry was dropped"),
        }
    }
    r
}

/// Sends `r` (already prepared: defaults, route headers, HEAD); returns the body bytes
/// sent.
pub async fn response(
    respond: &mut SendResponse<Bytes>,
    mut r: Response,
    timeout: Duration,
    shared: &Shared,
) -> Result<u64, SendError> {
    r.declare_length();
    let empty = r.body.len() == 0;
    let mut out = respond
        .send_response(head(&r.head), empty)
        .map_err(|_| SendError::Gone)?;
    let sent = match r.body {
        _ if empty => Ok(0),
        Body::Empty => Ok(0),
        Body::Bytes(b) => bytes(&mut out, b, timeout, shared).await,
        Body::File { file, offset, len } => {
            file_body(&mut out, &file, offset, len, timeout, shared).await
        }
    };
    if let Err(e) = &sent {
        cut(&mut out, e);
    }
    sent
}

/// A body that stops short ends with RST_STREAM, never END_STREAM: the client must not
/// take it for complete.
pub fn cut(out: &mut SendStream<Bytes>, e: &SendError) {
    let reason = match e {
        SendError::Gone => return,
        SendError::Stalled => h2::Reason::CANCEL,
        SendError::File(_) | SendError::Backend => h2::Reason::INTERNAL_ERROR,
    };
    out.send_reset(reason);
}

/// Waits for window for up to `want` bytes; returns how many may go now.
pub async fn window(
    out: &mut SendStream<Bytes>,
    want: usize,
    timeout: Duration,
    shared: &Shared,
) -> Result<usize, SendError> {
    out.reserve_capacity(want);
    let wait = async {
        loop {
            if out.capacity() > 0 {
                return Ok(out.capacity().min(want));
            }
            match std::future::poll_fn(|cx| out.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(SendError::Gone),
            }
        }
    };
    match monoio::time::timeout(timeout, wait).await {
        Ok(r) => r,
        Err(_) => {
            shared.trip("a stream's window stayed shut past send_timeout_secs");
            Err(SendError::Stalled)
        }
    }
}

/// Sends `data` as the end of the stream when `last`.
pub fn data(out: &mut SendStream<Bytes>, data: Bytes, last: bool) -> Result<(), SendError> {
    out.send_data(data, last).map_err(|_| SendError::Gone)
}

/// Bodies up to this size go to `h2` whole, without waiting for window first: the client's
/// initial window (64 KiB unless it says less) almost always has room, and waiting would cost
/// a trip through the connection task and a write of its own for the HEADERS frame (3.5 TCP
/// segments per request instead of nginx's 2). Held by `h2` until the window opens, such a
/// body is at most this size per stream, and a connection whose streams never get their
/// windows ends at its idle timeout like one that sends nothing.
const DIRECT: usize = 16 * 1024;

async fn bytes(
    out: &mut SendStream<Bytes>,
    b: Bytes,
    timeout: Duration,
    shared: &Shared,
) -> Result<u64, SendError> {
    if b.len() <= DIRECT {
        let len = b.len() as u64;
        data(out, b, true)?;
        return Ok(len);
    }
    let mut at = 0;
    while at < b.len() {
        let n = window(out, (b.len() - at).min(PIECE), timeout, shared).await?;
        data(out, b.slice(at..at + n), at + n == b.len())?;
        at += n;
    }
    Ok(b.len() as u64)
}

/// `len` bytes of `file` from `offset`, read piece by piece as the window opens: a local
/// file read, short, as the HTTP/1.1 path over TLS reads it.
async fn file_body(
    out: &mut SendStream<Bytes>,
    file: &std::fs::File,
    offset: u64,
    len: u64,
    timeout: Duration,
    shared: &Shared,
) -> Result<u64, SendError> {
    use std::os::unix::fs::FileExt;
    let mut done = 0u64;
    while done < len {
        let want = ((len - done) as usize).min(PIECE);
        let n = window(out, want, timeout, shared).await?;
        let mut buf = vec![0u8; n];
        let got = file
            .read_at(&mut buf, offset + done)
            .map_err(SendError::File)?;
        if got == 0 {
            let shrank = std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while being sent",
            );
            return Err(SendError::File(shrank));
        }
        buf.truncate(got);
        done += got as u64;
        data(out, Bytes::from(buf), done == len)?;
    }
    Ok(len)
}

/// Sends `r` with the route's header changes and records it.
pub async fn finish(
    ctx: &Ctx,
    respond: &mut SendResponse<Bytes>,
    r: Response,
    sec: Option<&RouteSecurity>,
    meta: Meta,
    shared: &Shared,
) {
    let (r, _) = prepare(r, true, sec, &meta);
    let status = r.status();
    let timeout = send_timeout(sec.unwrap_or(&ctx.default_security));
    let sent = match response(respond, r, timeout, shared).await {
        Ok(n) => n,
        Err(SendError::File(e)) => {
            log::error!("a file response stopped short: {e}");
            0
        }
        Err(_) => 0,
    };
    meta.record(ctx, status, sent);
}

pub fn send_timeout(sec: &RouteSecurity) -> Duration {
    Duration::from_secs(sec.send_timeout_secs)
}

pub fn body_timeout(sec: &RouteSecurity) -> Duration {
    Duration::from_secs(sec.client_body_timeout_secs)
}
