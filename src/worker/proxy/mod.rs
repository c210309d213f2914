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
mod forward;
mod head;
pub mod relay;
pub mod tunnel;
pub mod upstream;

use super::ctx::Ctx;
use super::http::body::BodyError;
use crate::shared::config::Route;
use backend::Target;
pub use forward::{forward, send, Answered, RequestBody};
pub use head::{chunk, chunk_into, connection_tokens, is_hop_by_hop, Proxied};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_says_whose_side_failed_in_its_status() {
        assert_eq!(Failure::NoServer.status(), Some(503));
        assert_eq!(Failure::Backend.status(), Some(502));
        assert_eq!(Failure::Timeout.status(), Some(504));
        assert_eq!(Failure::Client(BodyError::TooLarge).status(), Some(413));
        assert_eq!(Failure::Client(BodyError::Timeout).status(), Some(408));
        assert_eq!(Failure::Client(BodyError::Closed).status(), None);
    }
}
