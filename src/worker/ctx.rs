//! Per-worker state that every connection task shares: the shared-memory slot, the metrics
//! recorder, the buffer pool, the drain signal and the connection-level limits. It knows
//! nothing of routes, handlers or the proxy: those live above it and take it as an argument.

use super::recorder::Recorder;
use super::timed::{Deadlines, Limit};
use crate::shared::config::{Config, RouteSecurity};
use crate::shared::shm::{Region, Slot, STATE_DRAINING};
use crate::shared::WorkerStart;
use monoio::io::{CancelHandle, Canceller};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering::{Relaxed, Release};
use std::time::{Duration, Instant};

pub struct Ctx {
    pub region: &'static Region,
    pub slot: &'static Slot,
    pub recorder: Recorder,
    pub draining: Cell<bool>,
    /// Cancels the pending accepts when draining starts.
    canceller: RefCell<Canceller>,
    pub connections: Cell<usize>,
    /// The largest request head any route accepts: heads are read up to this size.
    pub max_head: usize,
    /// How long a kept-alive connection may wait for its next request.
    pub keepalive: Duration,
    /// How long a drain may take before the worker exits with connections still open.
    pub shutdown_timeout: Duration,
    /// The security defaults, for what happens before a route is known.
    pub default_security: RouteSecurity,
    /// `security.max_concurrent_connections` (0: no limit), over all workers.
    pub max_connections: i64,
    /// When the last over-limit refusal was logged (one line a second at most).
    pub limit_logged: Cell<Option<Instant>>,
    /// How long a head may take until its route is known.
    pub head_timeout: Duration,
    /// `server.http2_max_concurrent_streams`.
    pub h2_streams: u32,
    /// `server.http2_cleartext`: plain connections may open with the HTTP/2 preface.
    pub h2c: bool,
    /// Reusable 64 KiB buffers for bodies: a request holds one only while it moves body
    /// bytes, and an idle connection holds none.
    bodies: BufPool,
    /// Reusable buffers for request heads, held only while a request is read and answered.
    heads: BufPool,
    /// Deadlines of the connections that wait for their next request without a buffer.
    pub idle: super::idle::IdleQueue,
    /// `logging.access_log`, once its writer runs.
    pub access_log: Option<super::access_log::AccessLog>,
}

/// One open client connection: counted in the worker (for the drain) and in shared memory
/// (for `max_concurrent_connections` and the metrics) from its accept until it is dropped.
pub struct Open {
    ctx: Rc<Ctx>,
}

impl Open {
    /// Counts a new connection; returns it and the number open in all workers with it.
    pub fn new(ctx: Rc<Ctx>) -> (Open, i64) {
        ctx.connections.set(ctx.connections.get() + 1);
        ctx.slot.connections.fetch_add(1, Relaxed);
        let total = ctx.region.header.connections.fetch_add(1, Relaxed) + 1;
        (Open { ctx }, total)
    }
}

impl Open {
    /// The worker's state, for tasks that outlive a borrow of the connection (HTTP/2
    /// streams).
    pub fn ctx(&self) -> Rc<Ctx> {
        self.ctx.clone()
    }
}

impl std::ops::Deref for Open {
    type Target = Ctx;

    fn deref(&self) -> &Ctx {
        &self.ctx
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let ctx = &self.ctx;
        ctx.connections.set(ctx.connections.get() - 1);
        ctx.slot.connections.fetch_sub(1, Relaxed);
        ctx.region.header.connections.fetch_sub(1, Relaxed);
    }
}

pub const BODY_BUF: usize = 64 * 1024;
pub const HEAD_BUF: usize = 4096;
/// Head buffers kept for reuse: enough for the requests a worker has in flight at once;
/// past that they are freed, so a burst of idle connections leaves nothing behind.
const HEADS_MAX: usize = 64;
const BODIES_MAX: usize = 64;

impl Ctx {
    pub fn new(start: &WorkerStart) -> Ctx {
        let slot = &start.shm.slots[start.slot];
        let server = &start.config.server;
        Ctx {
            region: start.shm,
            slot,
            recorder: Recorder::new(start.shm, slot, &start.config),
            draining: Cell::new(false),
            canceller: RefCell::new(Canceller::new()),
            connections: Cell::new(0),
            max_head: max_head_size(&start.config),
            keepalive: Duration::from_secs(server.keepalive_timeout_secs),
            head_timeout: Duration::from_secs(server.client_header_timeout_secs),
            h2_streams: server.http2_max_concurrent_streams,
            h2c: server.http2_cleartext,
            bodies: BufPool::new(BODY_BUF, BODIES_MAX),
            heads: BufPool::new(HEAD_BUF, HEADS_MAX),
            idle: Default::default(),
            shutdown_timeout: Duration::from_secs(server.shutdown_timeout_secs),
            default_security: RouteSecurity::default(),
            max_connections: start.config.security.max_concurrent_connections as i64,
            limit_logged: Cell::new(None),
            access_log: None,
        }
    }

    pub fn cancel_handle(&self) -> CancelHandle {
        self.canceller.borrow().handle()
    }

    /// A 64 KiB buffer for body bytes.
    pub fn take_buf(&self) -> Vec<u8> {
        self.bodies.take()
    }

    pub fn give_buf(&self, buf: Vec<u8>) {
        self.bodies.give(buf)
    }

    /// A buffer for a request head.
    pub fn take_head(&self) -> Vec<u8> {
        self.heads.take()
    }

    pub fn give_head(&self, buf: Vec<u8>) {
        self.heads.give(buf)
    }

    /// Marks the worker draining and cancels the pending accepts; once only.
    pub fn start_draining(&self) {
        if self.draining.replace(true) {
            return;
        }
        self.slot.state.store(STATE_DRAINING, Release);
        let old = self.canceller.replace(Canceller::new());
        old.cancel();
    }

    /// Limits for a new client connection, until its route is known: the head must arrive
    /// within `client_header_timeout_secs`, and writes get the default `send_timeout_secs`.
    pub fn client_deadlines(&self) -> Rc<Deadlines> {
        Deadlines::new(
            Limit::By(Instant::now() + self.head_timeout),
            Limit::Each(Duration::from_secs(self.default_security.send_timeout_secs)),
        )
    }
}

/// Buffers of one size, kept for reuse: up to `max`, the rest are freed when given back.
struct BufPool {
    free: RefCell<Vec<Vec<u8>>>,
    size: usize,
    max: usize,
}

impl BufPool {
    fn new(size: usize, max: usize) -> BufPool {
        BufPool {
            free: RefCell::new(Vec::new()),
            size,
            max,
        }
    }

    fn take(&self) -> Vec<u8> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.size))
    }

    /// Only buffers of the pool's size are kept: one that shrank (taken apart by a write)
    /// is not worth keeping, and one that grew (a large head) would pin its memory.
    fn give(&self, mut buf: Vec<u8>) {
        let mut free = self.free.borrow_mut();
        if free.len() < self.max && buf.capacity() == self.size {
            buf.clear();
            free.push(buf);
        }
    }
}

/// The route is known only once the head is parsed: read heads up to the largest limit.
fn max_head_size(c: &Config) -> usize {
    c.host_routes
        .values()
        .chain(c.path_routes.values().flat_map(|p| p.values()))
        .map(|r| r.security.max_request_header_size as usize)
        .chain(std::iter::once(
            RouteSecurity::default().max_request_header_size as usize,
        ))
        .max()
        .unwrap_or(8192)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_reuses_its_buffers_and_frees_other_sizes() {
        let pool = BufPool::new(BODY_BUF, 4);
        let mut a = pool.take();
        assert_eq!(a.capacity(), BODY_BUF);
        a.extend_from_slice(b"left over");
        let ptr = a.as_ptr();
        pool.give(a);
        let b = pool.take();
        assert_eq!(b.as_ptr(), ptr, "the same buffer comes back");
        assert!(b.is_empty(), "cleared before reuse");
        pool.give(Vec::with_capacity(16));
        let mut grown = Vec::with_capacity(BODY_BUF);
        grown.reserve(BODY_BUF * 2);
        pool.give(grown);
        assert_eq!(pool.free.borrow().len(), 0, "other sizes are freed");
        for _ in 0..7 {
            pool.give(Vec::with_capacity(BODY_BUF));
        }
        assert_eq!(pool.free.borrow().len(), 4, "at most `max` are kept");
    }

    #[test]
    fn heads_are_read_up_to_the_largest_route_limit() {
        let mut c = Config::default();
        assert_eq!(
            max_head_size(&c),
            RouteSecurity::default().max_request_header_size as usize
        );
        let mut route = crate::shared::config::Route::default();
        route.security.max_request_header_size = 1 << 20;
        c.host_routes.insert("a.test".into(), route);
        assert_eq!(max_head_size(&c), 1 << 20);
    }
}
