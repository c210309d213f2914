//! `Proxy` routes: the request goes to a backend server and the response comes back, both
//! streamed through one pooled buffer, so a proxied exchange holds bounded memory whatever the
//! body sizes.
//!
//! Order of events: choose the candidates (healthy servers, in the balancing order) → take an
//! idle pooled connection or connect, failing over to the next candidate on a refused or
//! timed-out connect → send the head and stream the body → read the response head (an
//! idempotent, bodiless request that finds a reused connection dead before any response byte
//! is sent again once, on a fresh connection) → relay head and body → pool the connection if
//! the backend keeps it alive and the exchange ended cleanly.

pub mod backend;
pub mod relay;
pub mod tunnel;
pub mod upstream;

use super::ctx::Ctx;
use super::exchange::{self, Client, Exchange, Incoming, Meta};
use super::http::body::BodyError;
use super::http::client::ClientStream;
use super::http::respond;
use super::http::{self, Framing, Request};
use super::timed::{self, Limit};
use crate::shared::config::{Route, RouteSecurity};
use backend::{BackendConn, ConnectError, Pool, Target};
use monoio::io::AsyncWriteRentExt;
use relay::{BackendResponse, HeadError};
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tunnel::Tunnel;
use upstream::Upstream;

pub struct ProxyRoute {
    pub upstream: Rc<Upstream>,
}

impl ProxyRoute {
    /// `name`: the route's key, the name of the upstream a single `url` makes.
    pub fn new(
        route: &Route,
        name: &str,
        upstreams: &HashMap<String, Rc<Upstream>>,
    ) -> Result<ProxyRoute, String> {
        let upstream = match (&route.upstream, &route.url) {
            (Some(u), _) => upstreams
                .get(u)
                .cloned()
                .ok_or_else(|| format!("upstream `{u}` not found"))?,
            (None, Some(url)) => {
                let target = Target::new(
                    url,
                    route.sni_name.as_deref(),
                    route.ca_file.as_deref(),
                    None,
                )?;
                let algorithm = crate::shared::config::Algorithm::RoundRobin;
                let servers = vec![Rc::new(target)];
                Rc::new(Upstream::new(name.to_string(), algorithm, servers))
            }
            (None, None) => return Err(format!("{name}: a Proxy route needs `url` or `upstream`")),
        };
        Ok(ProxyRoute { upstream })
    }
}

/// Why a proxied exchange failed, by whose side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The client's request body was malformed, too large or too slow.
    Client(BodyError),
    /// No server of the upstream is healthy.
    NoServer,
    /// The backend refused or closed the connection, or answered what cannot be relayed.
    Backend,
    /// The backend did not connect, take the request or answer within its timeout.
    Timeout,
}

impl Failure {
    /// What the client is answered; `None`: it is gone, nothing to answer.
    pub fn status(self) -> Option<u16> {
        match self {
            Failure::Client(e) => e.status(),
            Failure::NoServer => Some(503),
            Failure::Backend => Some(502),
            Failure::Timeout => Some(504),
        }
    }
}

/// What the backend request is made of.
#[derive(Clone, Copy)]
struct Proxied<'a> {
    req: &'a Request,
    /// The path after the route's prefix.
    rest: &'a str,
    sec: &'a RouteSecurity,
    framing: Framing,
    client_ip: IpAddr,
    /// A WebSocket upgrade: a fresh connection, never pooled after.
    upgrade: bool,
}

impl Proxied<'_> {
    /// A request that can be sent again when a connection dies before any response byte.
    fn idempotent(&self) -> bool {
        self.framing == Framing::None
            && matches!(
                self.req.method.as_str(),
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            )
    }
}

/// The backend's response head, and the connection it came on.
struct Answered<'a> {
    target: Rc<Target>,
    bconn: BackendConn,
    _active: Active<'a>,
    request_bytes: u64,
    response: BackendResponse,
}

/// Hop-by-hop fields (RFC 9110 §7.6.1): never forwarded, in either direction.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Whether `name` must not cross the proxy, given the message's own `Connection` tokens.
pub fn is_hop_by_hop(name: &str, connection_tokens: &[String]) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || connection_tokens
            .iter()
            .any(|t| name.eq_ignore_ascii_case(t))
}

fn connection_tokens<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    values
        .flat_map(|v| v.split(|b| *b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn is_websocket(req: &Request) -> bool {
    req.method == "GET"
        && req.version == 1
        && req.connection_has("upgrade")
        && req.header("upgrade").is_some_and(|u| {
            String::from_utf8_lossy(u)
                .to_ascii_lowercase()
                .contains("websocket")
        })
}

/// Counts a connection in use towards `least_conn`, in shared memory, until dropped.
pub struct Active<'a> {
    ctx: &'a Ctx,
    backend: Option<usize>,
}

impl<'a> Active<'a> {
    fn new(ctx: &'a Ctx, target: &Target) -> Self {
        Self::of(ctx, target.backend)
    }

    /// Counts a connection to the shared backend `backend` (if it is one).
    pub fn of(ctx: &'a Ctx, backend: Option<usize>) -> Self {
        if let Some(i) = backend {
            ctx.region.header.backends[i].active.fetch_add(1, Relaxed);
            ctx.slot.backend_active[i].fetch_add(1, Relaxed);
        }
        Active { ctx, backend }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.backend {
            self.ctx.region.header.backends[i]
                .active
                .fetch_sub(1, Relaxed);
            self.ctx.slot.backend_active[i].fetch_sub(1, Relaxed);
        }
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
    if p.upgrade && response.status == 101 {
        let switched = tunnel::switch(client, sec, &response).await.is_ok();
        meta.record(ctx, 101, 0);
        if !switched {
            return Exchange::Close;
        }
        return Exchange::Tunnel(Tunnel {
            backend_index: target.backend,
            backend: bconn,
            early: response.rest,
            idle: Duration::from_secs(sec.websocket_idle_timeout_secs),
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
                    return Ok(Answered {
                        target,
                        bconn,
                        _active: active,
                        request_bytes,
                        response,
                    })
                }
                Err(HeadError::Stale) if p.idempotent() => {
                    if bconn.reused && !retried_same {
                        retried_same = true;
                        if let Ok(fresh) = backend::connect(&target, connect_timeout).await {
                            bconn = fresh;
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

/// One chunk of chunked transfer coding around `data`.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    chunk_into(&mut out, data);
    out
}

/// Appends one chunk around `data` to `out`.
pub fn chunk_into(out: &mut Vec<u8>, data: &[u8]) {
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The request head as the backend gets it. Header values go as they came: obs-text bytes
/// (0x80–0xFF) are not re-encoded.
fn request_head(p: &Proxied, target: &Target) -> Vec<u8> {
    use std::io::Write;
    let Proxied {
        req,
        rest,
        sec,
        framing,
        client_ip,
        upgrade,
    } = *p;
    let base = &target.url.path;
    let path = if rest.is_empty() {
        base.clone()
    } else {
        format!("{}{}", base.trim_end_matches('/'), http::encode_path(rest))
    };
    let query = req.target.find('?').map_or("", |q| &req.target[q..]);
    let mut out = Vec::with_capacity(512);
    let _ = write!(out, "{} {path}{query} HTTP/1.1\r\n", req.method);
    let tokens = connection_tokens(req.headers_named("connection"));
    let replaced = |name: &str| {
        sec.add_request_headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case(name))
            || sec
                .remove_request_headers
                .iter()
                .any(|k| k.eq_ignore_ascii_case(name))
    };
    if !sec
        .add_request_headers
        .keys()
        .any(|k| k.eq_ignore_ascii_case("host"))
    {
        let _ = write!(out, "Host: {}\r\n", target.url.authority());
    }
    for (name, value) in &req.headers {
        let skip = is_hop_by_hop(name, &tokens)
            || replaced(name)
            || ["host", "content-length", "expect"]
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h));
        if skip {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    let host_value = req.raw_host();
    for (name, value) in &sec.add_request_headers {
        let value = value
            .replace("$client_ip", &client_ip.to_string())
            .replace("$host", &host_value)
            .replace("$request_uri", &req.target);
        let _ = write!(out, "{name}: {value}\r\n");
    }
    match framing {
        Framing::None => {}
        Framing::Length(n) => {
            let _ = write!(out, "Content-Length: {n}\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
    }
    if upgrade {
        out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: ");
        out.extend_from_slice(req.header("upgrade").unwrap_or_default());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> Request {
        match http::parse(raw.as_bytes()) {
            http::Parse::Complete(req, _) => req,
            _ => panic!("test head does not parse: {raw:?}"),
        }
    }

    fn head_for(req: &Request, sec: &RouteSecurity, rest: &str, upgrade: bool) -> String {
        let framing = req.check().expect("a valid test request");
        let target = Target::new("http://127.0.0.1:8081/base/", None, None, None).unwrap();
        let p = Proxied {
            req,
            rest,
            sec,
            framing,
            client_ip: "192.0.2.7".parse().unwrap(),
            upgrade,
        };
        String::from_utf8(request_head(&p, &target)).unwrap()
    }

    #[test]
    fn the_backend_gets_no_hop_by_hop_fields_and_its_own_host() {
        let req = request(
            "POST /app/a%20b?x=1 HTTP/1.1\r\nHost: front.test:8443\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nTE: trailers\r\nExpect: 100-continue\r\nContent-Length: 3\r\nX-Kept: k\r\n\r\n",
        );
        let head = head_for(&req, &RouteSecurity::default(), "/a b", false);
        assert!(
            head.starts_with("POST /base/a%20b?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8081\r\n"),
            "{head}"
        );
        for gone in [
            "X-Secret",
            "Keep-Alive",
            "TE:",
            "Expect",
            "Connection",
            "front.test",
        ] {
            assert!(!head.contains(gone), "{gone} in {head}");
        }
        assert!(head.contains("X-Kept: k\r\n"), "{head}");
        assert!(head.ends_with("Content-Length: 3\r\n\r\n"), "{head}");
    }

    #[test]
    fn added_request_headers_replace_and_expand_variables() {
        let req = request(
            "GET /p?q HTTP/1.1\r\nHost: Front.test\r\nX-Forwarded-For: spoofed\r\nX-Drop: d\r\n\r\n",
        );
        let mut sec = RouteSecurity {
            remove_request_headers: vec!["x-drop".into()],
            ..RouteSecurity::default()
        };
        sec.add_request_headers
            .insert("X-Forwarded-For".into(), "$client_ip".into());
        sec.add_request_headers
            .insert("X-Original".into(), "$host $request_uri".into());
        let head = head_for(&req, &sec, "", false);
        assert!(head.starts_with("GET /base/?q HTTP/1.1\r\n"), "{head}");
        assert!(
            !head.contains("spoofed") && !head.contains("X-Drop"),
            "{head}"
        );
        assert!(head.contains("X-Forwarded-For: 192.0.2.7\r\n"), "{head}");
        assert!(head.contains("X-Original: Front.test /p?q\r\n"), "{head}");
    }

    #[test]
    fn chunked_bodies_stay_chunked_and_upgrades_keep_their_upgrade() {
        let req = request("PUT /u HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
        let head = head_for(&req, &RouteSecurity::default(), "/u", false);
        assert!(
            head.ends_with("Transfer-Encoding: chunked\r\n\r\n"),
            "{head}"
        );
        let req = request(
            "GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert!(is_websocket(&req));
        let head = head_for(&req, &RouteSecurity::default(), "/ws", true);
        assert!(
            head.ends_with("Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
            "{head}"
        );
    }

    #[test]
    fn only_bodiless_idempotent_requests_are_replayed() {
        let sec = RouteSecurity::default();
        let replayable = |raw: &str| {
            let req = request(raw);
            let p = Proxied {
                req: &req,
                rest: "",
                sec: &sec,
                framing: req.check().unwrap(),
                client_ip: "192.0.2.1".parse().unwrap(),
                upgrade: false,
            };
            p.idempotent()
        };
        assert!(replayable("GET / HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert!(replayable("DELETE / HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert!(!replayable("POST / HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert!(!replayable(
            "PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n"
        ));
    }

    #[test]
    fn a_failure_says_whose_side_failed_in_its_status() {
        assert_eq!(Failure::NoServer.status(), Some(503));
        assert_eq!(Failure::Backend.status(), Some(502));
        assert_eq!(Failure::Timeout.status(), Some(504));
        assert_eq!(Failure::Client(BodyError::TooLarge).status(), Some(413));
        assert_eq!(Failure::Client(BodyError::Timeout).status(), Some(408));
        assert_eq!(Failure::Client(BodyError::Closed).status(), None);
    }

    #[test]
    fn connection_tokens_name_more_hop_by_hop_fields() {
        let values = [&b" Keep-Alive , X-A"[..], b"", b"x-b,,"];
        let tokens = connection_tokens(values.into_iter());
        assert_eq!(tokens, ["keep-alive", "x-a", "x-b"]);
        assert!(is_hop_by_hop("X-A", &tokens));
        assert!(is_hop_by_hop("transfer-encoding", &[]));
        assert!(!is_hop_by_hop("X-C", &tokens));
        assert_eq!(chunk(b"hello"), b"5\r\nhello\r\n");
    }
}
