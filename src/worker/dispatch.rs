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
use super::router::{Handler, Matched, Router};
use super::timed::Limit;
use std::time::Duration;

pub struct Dispatch {
    pub router: Router,
    pub metrics: MetricsRoute,
    /// Idle keep-alive connections to backends.
    pub backends: Pool,
}

impl Service for Dispatch {
    type Tunnel = Tunnel;

    async fn exchange<S: ClientStream>(
        &self,
        ctx: &Ctx,
        client: &mut Client<S>,
        mut incoming: Incoming,
    ) -> Exchange<Tunnel> {
        if let Some(r) = self.metrics.answer(ctx.region, &incoming.path, client.ip()) {
            return exchange::answer(ctx, client, incoming, r, None).await;
        }
        let Some(m) = self.router.route(&incoming.meta.host, &incoming.path) else {
            return exchange::answer(ctx, client, incoming, Response::error(404), None).await;
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
        client
            .limits
            .set_write(Limit::Each(Duration::from_secs(sec.send_timeout_secs)));
        if let Some(status) = over_limits(&incoming, &m) {
            return exchange::fail(ctx, client, status, Some(sec), incoming.meta).await;
        }
        let refused =
            m.route
                .access
                .refuse(&incoming.req.method, client.ip(), ctx.region, unix_now);
        if let Some(r) = refused {
            return exchange::answer(ctx, client, incoming, r, Some(sec)).await;
        }
        let r = match &m.route.handler {
            Handler::Proxy(p) => {
                let pool = &self.backends;
                return super::proxy::forward(ctx, pool, client, incoming, p, &m.rest, sec).await;
            }
            Handler::File(f) => f.serve(&incoming.req, &m.rest, m.exact),
            Handler::Redirect(r) => r.answer(&incoming.req, &m.rest),
            Handler::Welcome => welcome::answer(incoming.req.path()),
        };
        exchange::answer(ctx, client, incoming, r, Some(sec)).await
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
