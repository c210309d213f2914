//! The backend's response: its head read and checked, then head and body relayed to the
//! client as they arrive. The body keeps the backend's framing where the client can take it
//! (Content-Length), and is re-chunked otherwise (chunked or close-delimited backends, to an
//! HTTP/1.1 client); an HTTP/1.0 client gets it close-delimited.

use super::backend::BackendConn;
use super::{chunk, chunk_into, connection_tokens, is_hop_by_hop, Failure};
use crate::shared::config::RouteSecurity;
use crate::worker::ctx::Ctx;
use crate::worker::exchange::{apply_route_headers, Client};
use crate::worker::http::body::BodyReader;
use crate::worker::http::client::ClientStream;
use crate::worker::http::{Framing, Request, ResponseHead};
use crate::worker::timed;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};

/// Largest response head accepted from a backend.
const MAX_HEAD: usize = 64 * 1024;
/// Most interim (1xx) responses accepted before the final one.
const MAX_INTERIM: u32 = 16;

pub struct BackendResponse {
    pub status: u16,
    pub reason: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes read past the head: the start of the body (or of a tunnel).
    pub rest: Vec<u8>,
}

impl BackendResponse {
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

pub enum HeadError {
    /// Nothing came back: the connection was dead (retry-able on a reused connection).
    Stale,
    Timeout,
    Invalid,
}

pub async fn read_head(bconn: &mut BackendConn) -> Result<BackendResponse, HeadError> {
    let mut buf = Vec::with_capacity(4096);
    let mut received = 0usize;
    let mut interim = 0;
    loop {
        if !buf.is_empty() {
            match parse(&buf) {
                Parsed::Head(r, n) if (100..200).contains(&r.status) && r.status != 101 => {
                    // 100 Continue, 103 Early Hints: interim, not relayed. A backend that
                    // sends them without end would hold the exchange despite every deadline.
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return Err(HeadError::Invalid);
                    }
                    buf.drain(..n);
                    continue;
                }
                Parsed::Head(mut r, n) => {
                    r.rest = buf.split_off(n);
                    return Ok(r);
                }
                Parsed::Invalid => return Err(HeadError::Invalid),
                Parsed::Partial if buf.len() >= MAX_HEAD => return Err(HeadError::Invalid),
                Parsed::Partial => {}
            }
        }
        buf.reserve(4096);
        let (len, cap) = (buf.len(), buf.capacity());
        // Bounded by the route's backend_read_timeout_secs.
        let (res, back) = bconn.stream.read(buf.slice_mut(len..cap)).await;
        buf = back.into_inner();
        match res {
            Err(e) if timed::is_timeout(&e) => return Err(HeadError::Timeout),
            Ok(0) | Err(_) if received == 0 => return Err(HeadError::Stale),
            Ok(0) | Err(_) => return Err(HeadError::Invalid),
            Ok(n) => received += n,
        }
    }
}

enum Parsed {
    Head(BackendResponse, usize),
    Partial,
    Invalid,
}

fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Parsed::Head(
            BackendResponse {
                status: resp.code.unwrap_or(502),
                reason: resp.reason.unwrap_or("").to_string(),
                version: resp.version.unwrap_or(1),
                headers: resp
                    .headers
                    .iter()
                    .map(|h| (h.name.to_string(), h.value.to_vec()))
                    .collect(),
                rest: Vec::new(),
            },
            n,
        ),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// How the backend delimits its body.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum BodyKind {
    None,
    Length(u64),
    Chunked,
    /// Until the backend closes.
    Close,
}

pub struct RelayOutcome {
    pub status: u16,
    pub response_bytes: u64,
    pub backend_reusable: bool,
    pub client_keep: bool,
}

/// `Err`: framing that cannot be relayed (a bad or conflicting Content-Length): 502.
pub fn body_kind(req: &Request, r: &BackendResponse) -> Result<BodyKind, ()> {
    if req.method == "HEAD" || (100..200).contains(&r.status) || r.status == 204 || r.status == 304
    {
        return Ok(BodyKind::None);
    }
    let te: Vec<String> = connection_tokens(r.headers_named("transfer-encoding"));
    if !te.is_empty() {
        // RFC 9112 §6.3: chunked last means chunked; any other coding, until close.
        return Ok(if te.last().map(String::as_str) == Some("chunked") {
            BodyKind::Chunked
        } else {
            BodyKind::Close
        });
    }
    let mut length = None;
    for v in r.headers_named("content-length") {
        let s = v.trim_ascii();
        let n: u64 = std::str::from_utf8(s)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or(())?;
        if length.is_some_and(|l| l != n) {
            return Err(());
        }
        length = Some(n);
    }
    Ok(length.map_or(BodyKind::Close, BodyKind::Length))
}

/// The client's side of the exchange, as the relay needs it.
pub struct ClientSide<'a> {
    pub req: &'a Request,
    /// The route's security table: its response header changes.
    pub sec: &'a RouteSecurity,
    /// The client connection may be kept after this response.
    pub keep: bool,
}

/// The client's response head from the backend's, whatever the client's protocol: the
/// backend's fields but hop-by-hop ones and ours (`Server`, `Date`, the length, restated from
/// `kind`). `tokens`: the backend's `Connection` tokens.
pub fn response_head(r: &BackendResponse, tokens: &[String], kind: BodyKind) -> ResponseHead {
    let mut head = ResponseHead::new(r.status);
    head.reason = Some(r.reason.clone());
    for (name, value) in &r.headers {
        let ours = ["content-length", "server", "date"]
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h));
        if ours || is_hop_by_hop(name, tokens) {
            continue;
        }
        head.headers.push((name.clone(), value.clone()));
    }
    let mut head = head.with_defaults();
    match kind {
        BodyKind::Length(n) => head.set("Content-Length", n.to_string()),
        // HEAD and 304 carry the length of the representation they describe.
        BodyKind::None => {
            if let Some(v) = r.headers_named("content-length").next() {
                head.set("Content-Length", v);
            }
        }
        _ => {}
    }
    head
}

/// Whether the backend connection can carry another request once this response's body was
/// read to its end.
pub fn backend_keeps(r: &BackendResponse, tokens: &[String]) -> bool {
    let keep = if r.version == 1 {
        !tokens.iter().any(|t| t == "close")
    } else {
        tokens.iter().any(|t| t == "keep-alive")
    };
    // RFC 9112 §6.3: both framings at once may be an attempt at smuggling. The body is read
    // as chunked (Transfer-Encoding wins); the connection is not trusted for another request.
    let conflicting = r.headers_named("transfer-encoding").next().is_some()
        && r.headers_named("content-length").next().is_some();
    keep && !conflicting
}

/// The backend's response body, piece by piece, as its framing delimits it.
pub struct BackendBody {
    kind: BodyKind,
    reader: BodyReader,
}

impl BackendBody {
    pub fn new(kind: BodyKind) -> BackendBody {
        let framing = match kind {
            BodyKind::None => Framing::Length(0),
            BodyKind::Length(n) => Framing::Length(n),
            BodyKind::Chunked => Framing::Chunked,
            BodyKind::Close => Framing::None,
        };
        BackendBody {
            kind,
            reader: BodyReader::new(framing, u64::MAX),
        }
    }

    /// The next piece into `piece`; `Ok(false)` at the end. `rest`: bytes read past the head.
    pub async fn next(
        &mut self,
        bconn: &mut BackendConn,
        rest: &mut Vec<u8>,
        piece: &mut Vec<u8>,
    ) -> Result<bool, ()> {
        match self.kind {
            BodyKind::None => Ok(false),
            BodyKind::Close => read_until_close(bconn, rest, piece).await,
            _ => self
                .reader
                .next(&mut bconn.stream, rest, piece)
                .await
                .map_err(|_| ()),
        }
    }
}

/// Sends the response head and body to the client. `Err(Failure::Backend)`: the backend's
/// framing is unusable, and nothing was sent yet.
pub async fn relay<S: ClientStream>(
    ctx: &Ctx,
    conn: &mut Client<S>,
    side: ClientSide<'_>,
    bconn: &mut BackendConn,
    mut r: BackendResponse,
) -> Result<RelayOutcome, Failure> {
    let ClientSide { req, sec, keep } = side;
    let mut outcome = RelayOutcome {
        status: r.status,
        response_bytes: 0,
        backend_reusable: false,
        client_keep: false,
    };
    let Ok(kind) = body_kind(req, &r) else {
        log::warn!("backend response with unusable framing: 502");
        return Err(Failure::Backend);
    };
    let tokens = connection_tokens(r.headers_named("connection"));
    let backend_keep = backend_keeps(&r, &tokens);
    // What the client gets: chunked for a body of unknown length, if it speaks HTTP/1.1.
    let rechunk = matches!(kind, BodyKind::Chunked | BodyKind::Close) && req.version == 1;
    let unknown_length = matches!(kind, BodyKind::Chunked | BodyKind::Close);
    // An HTTP/1.0 client learns the end of such a body only from the close.
    let client_keep = keep && (rechunk || !unknown_length);

    let mut head = response_head(&r, &tokens, kind);
    if rechunk {
        head.set("Transfer-Encoding", "chunked");
    }
    apply_route_headers(&mut head, sec);
    if !client_keep {
        head.set("Connection", "close");
        let whole = match kind {
            BodyKind::None => true,
            BodyKind::Length(n) => r.rest.len() as u64 >= n,
            _ => false,
        };
        // Not for a body still coming: a slow stream's last segment must not wait.
        if whole {
            conn.stream.last_response();
        }
    } else if req.version == 0 {
        head.set("Connection", "keep-alive");
    }
    let mut head = Some(head.encode());
    // The body's first bytes came with the backend's head: they leave with the client's head,
    // in one write (one segment for a small response, as nginx sends it). Otherwise the head
    // goes at once: a backend that streams slowly must not hold it back.
    if kind == BodyKind::None || r.rest.is_empty() {
        let (res, _) = conn.stream.write_all(head.take().unwrap_or_default()).await;
        if res.is_err() {
            return Ok(outcome);
        }
    }

    let copied = copy_body(ctx, conn, bconn, &mut r.rest, kind, rechunk, head).await;
    match copied {
        Ok(n) => {
            outcome.response_bytes = n;
            outcome.client_keep = client_keep;
            outcome.backend_reusable = backend_keep && kind != BodyKind::Close && r.rest.is_empty();
        }
        Err(n) => {
            outcome.response_bytes = n;
            conn.cut = true;
        }
    }
    Ok(outcome)
}

/// Streams the body; `Err(bytes so far)` when either side failed, in which case the client
/// connection is closed without completing the body, so the client sees it cut short.
/// `head`: the response head not sent yet, to go out in front of the first piece.
async fn copy_body<S: ClientStream>(
    ctx: &Ctx,
    conn: &mut Client<S>,
    bconn: &mut BackendConn,
    rest: &mut Vec<u8>,
    kind: BodyKind,
    rechunk: bool,
    mut head: Option<Vec<u8>>,
) -> Result<u64, u64> {
    if kind == BodyKind::None {
        return Ok(0);
    }
    let mut body = BackendBody::new(kind);
    let mut piece = ctx.take_buf();
    let mut total = 0u64;
    let result = loop {
        match body.next(bconn, rest, &mut piece).await {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(()) => break Err(()),
        }
        total += piece.len() as u64;
        if let Some(mut first) = head.take() {
            framed(&mut first, &piece, rechunk);
            let (res, _) = conn.stream.write_all(first).await;
            if res.is_err() {
                break Err(());
            }
            continue;
        }
        let out = if rechunk {
            chunk(&piece)
        } else {
            std::mem::take(&mut piece)
        };
        let (res, back) = conn.stream.write_all(out).await;
        if !rechunk {
            piece = back;
        }
        if res.is_err() {
            break Err(());
        }
    };
    ctx.give_buf(piece);
    if result.is_err() {
        return Err(total);
    }
    if rechunk {
        let (res, _) = conn.stream.write_all(b"0\r\n\r\n".to_vec()).await;
        res.map_err(|_| total)?;
    }
    Ok(total)
}

/// Appends `piece` to `out`, as one chunk if `rechunk`.
fn framed(out: &mut Vec<u8>, piece: &[u8], rechunk: bool) {
    if rechunk {
        chunk_into(out, piece);
    } else {
        out.extend_from_slice(piece);
    }
}

/// A close-delimited body: what is buffered, then reads until EOF. `Ok(false)` at EOF.
async fn read_until_close(
    bconn: &mut BackendConn,
    rest: &mut Vec<u8>,
    piece: &mut Vec<u8>,
) -> Result<bool, ()> {
    piece.clear();
    if !rest.is_empty() {
        piece.append(rest);
        return Ok(true);
    }
    piece.reserve(64 * 1024);
    let cap = piece.capacity().min(64 * 1024);
    let (res, back) = bconn
        .stream
        .read(std::mem::take(piece).slice_mut(0..cap))
        .await;
    *piece = back.into_inner();
    match res {
        Ok(0) => Ok(false),
        Ok(_) => Ok(true),
        Err(_) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(raw: &str) -> BackendResponse {
        match parse(raw.as_bytes()) {
            Parsed::Head(r, n) => {
                assert_eq!(n, raw.find("\r\n\r\n").unwrap() + 4);
                r
            }
            _ => panic!("test head does not parse: {raw:?}"),
        }
    }

    fn get(method: &str) -> Request {
        Request {
            method: method.into(),
            target: "/".into(),
            version: 1,
            headers: vec![],
        }
    }

    #[test]
    fn reads_a_backend_head_and_its_reason() {
        let r = response("HTTP/1.0 299 Fine Thanks\r\nX-A: 1\r\nX-A: 2\r\n\r\nbody");
        assert_eq!(
            (r.status, r.version, r.reason.as_str()),
            (299, 0, "Fine Thanks")
        );
        let values: Vec<&[u8]> = r.headers_named("x-a").collect();
        assert_eq!(values, [&b"1"[..], b"2"]);
        assert!(matches!(parse(b"HTTP/1.1 200 OK\r\nX"), Parsed::Partial));
        assert!(matches!(parse(b"HTTP/9 200 OK\r\n\r\n"), Parsed::Invalid));
    }

    #[test]
    fn the_body_is_framed_as_rfc_9112_says() {
        let kind = |method: &str, raw: &str| body_kind(&get(method), &response(raw));
        let ok = "HTTP/1.1 200 OK\r\n";
        assert_eq!(
            kind("HEAD", &format!("{ok}Content-Length: 5\r\n\r\n")),
            Ok(BodyKind::None)
        );
        assert_eq!(
            kind("GET", "HTTP/1.1 204 No Content\r\n\r\n"),
            Ok(BodyKind::None)
        );
        assert_eq!(
            kind("GET", "HTTP/1.1 304 Not Modified\r\n\r\n"),
            Ok(BodyKind::None)
        );
        let length = format!("{ok}Content-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(kind("GET", &length), Ok(BodyKind::Length(5)));
        let te = format!("{ok}Transfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(kind("GET", &te), Ok(BodyKind::Chunked), "TE wins over CL");
        let te = format!("{ok}Transfer-Encoding: chunked, gzip\r\n\r\n");
        assert_eq!(
            kind("GET", &te),
            Ok(BodyKind::Close),
            "not chunked last: until close"
        );
        assert_eq!(kind("GET", &format!("{ok}\r\n")), Ok(BodyKind::Close));
        let two = format!("{ok}Content-Length: 5\r\nContent-Length: 6\r\n\r\n");
        assert_eq!(kind("GET", &two), Err(()));
        let signed = format!("{ok}Content-Length: +5\r\n\r\n");
        assert_eq!(kind("GET", &signed), Err(()));
    }
}
