//! What answers a request once its head passed the protocol checks: the metrics endpoint,
//! then the route (host table, path tree), the route's own head limits and access checks,
//! then the route's handler or the proxy. The connection loop reaches it through
//! `conn::Service` only.

use super::conn::Service;
use super::ctx::Ctx;
use super::exchange::{self, Client, Exchange, Incoming};
use super::handlers::access::unix_now;
use super::handlers::metrics::MetricsRoute;
use super::handlers::welcome;
use super::http::client::ClientStream;
use super::http::respond::Response;
use super::http::Framing;
use super::proxy::backend::Pool;
use super::proxy::tunnel::{self, Tunnel};
use super::proxy::ProxyRoute;
use super::router::{Handler, Matched, Router};
use super::timed::Limit;
use crate::shared::config::RouteSecurity;
use std::net::IpAddr;
use std::time::Duration;

pub struct Dispatch {
    pub router: Router,
    pub metrics: MetricsRoute,
    /// Idle keep-alive connections to backends.
    pub backends: Pool,
}

/// What a request is answered with, decided before any byte moves: the same decision for
/// an HTTP/1.1 request and an HTTP/2 stream.
pub enum Routed<'a> {
    /// This response, with the route's header changes (`None`: no route matched).
    Answer(Response, Option<&'a RouteSecurity>),
    /// This error status, the request body left unread.
    Fail(u16, &'a RouteSecurity),
    /// The route's backend answers: `rest` is the path after the route's prefix.
    Proxy {
        route: &'a ProxyRoute,
        rest: String,
        sec: &'a RouteSecurity,
    },
}

impl Dispatch {
    /// The metrics endpoint, then the route, its head limits, its access checks and its
    /// handler. `incoming.meta.access` is dropped for a route that silences its log.
    pub fn route<'a>(&'a self, ctx: &Ctx, incoming: &mut Incoming, ip: IpAddr) -> Routed<'a> {
        if let Some(r) = self.metrics.answer(ctx.region, &incoming.path, ip) {
            return Routed::Answer(r, None);
        }
        let Some(m) = self.router.route(&incoming.meta.host, &incoming.path) else {
            return Routed::Answer(Response::error(404), None);
        };
        log::trace!(
            "{} {} {} -> {}",
            incoming.req.method,
            incoming.meta.host,
            incoming.path,
            m.route.name
        );
        if !m.route.logged {
            incoming.meta.access = None;
        }
        let sec = &m.route.security;
        if let Some(status) = over_limits(incoming, &m) {
            return Routed::Fail(status, sec);
        }
        if let Some(r) = m
            .route
            .access
            .refuse(&incoming.req.method, ip, ctx.region, unix_now)
        {
            return Routed::Answer(r, Some(sec));
        }
        let r = match &m.route.handler {
            Handler::Proxy(route) => {
                let rest = m.rest;
                return Routed::Proxy { route, rest, sec };
            }
            Handler::File(f) => f.serve(&incoming.req, &m.rest, m.exact),
            Handler::Redirect(r) => r.answer(&incoming.req, &m.rest),
            Handler::Welcome => welcome::answer(incoming.req.path()),
        };
        Routed::Answer(r, Some(sec))
    }
}

impl Service for Dispatch {
    type Tunnel = Tunnel;

    async fn exchange<S: ClientStream>(
        &self,
        ctx: &Ctx,
        client: &mut Client<S>,
        mut incoming: Incoming,
    ) -> Exchange<Tunnel> {
        let routed = self.route(ctx, &mut incoming, client.ip());
        let sec = match &routed {
            Routed::Answer(_, sec) => *sec,
            Routed::Fail(_, sec) | Routed::Proxy { sec, .. } => Some(*sec),
        };
        if let Some(sec) = sec {
            client
                .limits
                .set_write(Limit::Each(Duration::from_secs(sec.send_timeout_secs)));
        }
        match routed {
            Routed::Answer(r, sec) => exchange::answer(ctx, client, incoming, r, sec).await,
            Routed::Fail(status, sec) => {
                exchange::fail(ctx, client, status, Some(sec), incoming.meta).await
            }
            Routed::Proxy { route, rest, sec } => {
                let pool = &self.backends;
                super::proxy::forward(ctx, pool, client, incoming, route, &rest, sec).await
            }
        }
    }

    async fn tunnel<S: ClientStream>(&self, ctx: &Ctx, client: Client<S>, t: Tunnel) {
        tunnel::run(ctx, client, t).await
    }
}

/// The route is known only now: its own head limits apply from here. `Some`: the status
/// to answer with before closing.
fn over_limits(incoming: &Incoming, m: &Matched) -> Option<u16> {
    let sec = &m.route.security;
    if incoming.head_len as u64 > sec.max_request_header_size {
        return Some(431);
    }
    let header_time = Duration::from_secs(sec.client_header_timeout_secs);
    if incoming.meta.started.elapsed() > header_time {
        return Some(408);
    }
    match incoming.framing {
        // Not read: the connection cannot be reused.
        Framing::Length(n) if n > sec.max_request_body_size => Some(413),
        _ => None,
    }
}
