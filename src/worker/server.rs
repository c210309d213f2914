//! The worker loop: accept on every listener, run each connection as a task, and react to
//! signals. Draining (SIGQUIT) cancels the pending accepts (an accept cancelled after it
//! completed still hands back its connection, so nothing that reached this worker is
//! dropped) and lets the connections end by themselves: each answers its next request with
//! `Connection: close`, and an idle one closes when its keep-alive time is up. The worker
//! exits when none is left, or when `shutdown_timeout_secs` have passed.

use super::recorder::Recorder;
use super::router::Router;
use super::timed::{Deadlines, Limit, Timed};
use crate::shared::config::{Config, RouteSecurity};
use crate::shared::shm::{Region, Slot, STATE_DRAINING, STATE_SERVING};
use crate::shared::WorkerStart;
use monoio::io::{AsyncReadRent, CancelHandle, Canceller};
use monoio::net::{TcpListener, UnixStream};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering::*;
use std::time::{Duration, Instant};

/// What every connection task of this worker shares.
pub struct Ctx {
    pub router: Router,
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
    limit_logged: Cell<Option<std::time::Instant>>,
    /// How long a head may take until its route is known.
    pub head_timeout: Duration,
    /// Reusable 64 KiB buffers for bodies; an idle connection holds none.
    pool: RefCell<Vec<Vec<u8>>>,
    /// Reusable buffers for request heads, held only while a request is read and answered.
    heads: RefCell<Vec<Vec<u8>>>,
    /// Idle keep-alive connections to backends.
    pub backends: super::proxy::backend::Pool,
    /// Upstream servers of this generation's config, as `/__metrics` names them.
    pub upstream_labels: Vec<crate::shared::metrics::UpstreamServerLabel>,
}

pub const BODY_BUF: usize = 64 * 1024;
pub const HEAD_BUF: usize = 4096;
/// Head buffers kept for reuse: enough for the requests a worker has in flight at once;
/// past that they are freed, so a burst of idle connections leaves nothing behind.
const HEADS_MAX: usize = 64;
const POOL_MAX: usize = 64;

impl Ctx {
    pub fn new(start: &WorkerStart, router: Router) -> Ctx {
        let slot = &start.shm.slots[start.slot];
        Ctx {
            router,
            region: start.shm,
            slot,
            recorder: Recorder::new(start.shm, slot, &start.config),
            draining: Cell::new(false),
            canceller: RefCell::new(Canceller::new()),
            connections: Cell::new(0),
            max_head: max_head_size(&start.config),
            keepalive: Duration::from_secs(start.config.server.keepalive_timeout_secs),
            head_timeout: Duration::from_secs(start.config.server.client_header_timeout_secs),
            pool: RefCell::new(Vec::new()),
            heads: RefCell::new(Vec::new()),
            backends: Default::default(),
            shutdown_timeout: Duration::from_secs(start.config.server.shutdown_timeout_secs),
            default_security: RouteSecurity::default(),
            max_connections: start.config.security.max_concurrent_connections as i64,
            limit_logged: Cell::new(None),
            upstream_labels: upstream_labels(&start.config, start.shm),
        }
    }

    pub fn cancel_handle(&self) -> CancelHandle {
        self.canceller.borrow().handle()
    }

    pub fn take_buf(&self) -> Vec<u8> {
        self.pool
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BODY_BUF))
    }

    /// A buffer for a request head, from the pool of this worker.
    pub fn take_head(&self) -> Vec<u8> {
        self.heads
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(HEAD_BUF))
    }

    /// Gives a head buffer back (a grown one is freed: the pool holds small ones).
    pub fn give_head(&self, mut buf: Vec<u8>) {
        let mut heads = self.heads.borrow_mut();
        if heads.len() < HEADS_MAX && buf.capacity() == HEAD_BUF {
            buf.clear();
            heads.push(buf);
        }
    }

    pub fn give_buf(&self, mut buf: Vec<u8>) {
        let mut pool = self.pool.borrow_mut();
        if pool.len() < POOL_MAX && buf.capacity() >= BODY_BUF {
            buf.clear();
            pool.push(buf);
        }
    }

    fn start_draining(&self) {
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

/// Serves until SIGTERM/SIGINT, or until a SIGQUIT drain completes: the process exits from
/// here and never returns.
/// `tls`: terminate TLS on the first listener (`server.listen`); the others are plain HTTP.
pub async fn run(
    ctx: Rc<Ctx>,
    listeners: Vec<std::net::TcpListener>,
    signals: std::os::unix::net::UnixStream,
    tls: Option<(std::sync::Arc<rustls::ServerConfig>, bool)>,
) -> ! {
    let mut accepting = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        // `refuse`: kTLS is required and unavailable (see `ktls`).
        let acceptor = tls
            .clone()
            .filter(|_| i == 0)
            .map(|(config, refuse)| (monoio_rustls::TlsAcceptor::from(config), refuse));
        match TcpListener::from_std(l) {
            Ok(l) => accepting.push(monoio::spawn(accept_loop(ctx.clone(), l, acceptor))),
            Err(e) => {
                log::error!("cannot register a listener: {e}");
                super::exit(super::EXIT_STARTUP_FAILED);
            }
        }
    }
    let signals = match UnixStream::from_std(signals) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot register the signal socket: {e}");
            super::exit(super::EXIT_STARTUP_FAILED);
        }
    };
    monoio::spawn(sweep_backend_pool(ctx.clone()));
    ctx.slot.state.store(STATE_SERVING, Release);
    log::info!(
        "serving (pid {}, generation {})",
        std::process::id(),
        ctx.slot.generation.load(Relaxed)
    );
    // Startup lines are what an operator waits for: do not leave them in the buffer.
    log::logger().flush();
    let mut accepting = Some(accepting);
    let mut signals = signals;
    loop {
        let (res, buf) = signals.read(vec![0u8; 16]).await;
        let got = match res {
            Ok(n) if n > 0 => &buf[..n],
            _ => {
                log::error!("signal socket closed: draining");
                &[libc::SIGQUIT as u8][..]
            }
        };
        for &sig in got {
            if i32::from(sig) == libc::SIGUSR1 {
                match crate::shared::log::reopen() {
                    Ok(()) => log::info!("log file reopened"),
                    Err(e) => log::error!("cannot reopen the log file: {e}"),
                }
                continue;
            }
            // TERM and INT drain like QUIT (the spec; a terminal's Ctrl+C reaches every
            // process); a second one while draining, or the master's fast stop, exits now.
            if i32::from(sig) != libc::SIGQUIT && accepting.is_none() {
                log::info!("fast shutdown");
                super::exit(0);
            }
            if let Some(tasks) = accepting.take() {
                ctx.start_draining();
                monoio::spawn(drain_then_exit(ctx.clone(), tasks));
            }
        }
    }
}

/// Stops accepting, lets every open connection end by itself, then exits; at the latest
/// when `shutdown_timeout_secs` have passed (the master's kill comes then too).
async fn drain_then_exit(ctx: Rc<Ctx>, accepting: Vec<monoio::task::JoinHandle<()>>) {
    log::info!("draining: {} connections open", ctx.connections.get());
    let deadline = Instant::now() + ctx.shutdown_timeout;
    for task in accepting {
        task.await;
    }
    while ctx.connections.get() > 0 {
        if Instant::now() >= deadline {
            log::warn!(
                "shutdown_timeout_secs passed: closing {} connections",
                ctx.connections.get()
            );
            super::exit(0);
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    log::info!("drained, exiting");
    super::exit(0);
}

async fn accept_loop(
    ctx: Rc<Ctx>,
    listener: TcpListener,
    tls: Option<(monoio_rustls::TlsAcceptor, bool)>,
) {
    loop {
        if ctx.draining.get() {
            return;
        }
        match listener.cancelable_accept(ctx.cancel_handle()).await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let limits = ctx.client_deadlines();
                ctx.connections.set(ctx.connections.get() + 1);
                ctx.slot.connections.fetch_add(1, Relaxed);
                let total = ctx.region.header.connections.fetch_add(1, Relaxed) + 1;
                let over = ctx.max_connections > 0 && total > ctx.max_connections;
                let ctx = ctx.clone();
                let tls = tls.clone();
                monoio::spawn(async move {
                    let stream = Timed::new(stream, limits.clone());
                    // Only the plain connection is inline: this task lives as long as the
                    // connection, idle or not, and is as large as its largest branch.
                    match tls {
                        _ if over => Box::pin(refuse(&ctx, stream, tls.is_some())).await,
                        None => super::conn::serve(&ctx, stream, peer, limits).await,
                        Some((_, true)) => drop(stream),
                        Some((acceptor, false)) => {
                            Box::pin(serve_tls(&ctx, acceptor, stream, peer, limits)).await
                        }
                    }
                    ctx.connections.set(ctx.connections.get() - 1);
                    ctx.slot.connections.fetch_sub(1, Relaxed);
                    ctx.region.header.connections.fetch_sub(1, Relaxed);
                });
            }
            Err(_) if ctx.draining.get() => return,
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                log::error!("accept: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A TLS connection: the handshake (within the head's deadline), then HTTP over it.
async fn serve_tls(
    ctx: &Ctx,
    acceptor: monoio_rustls::TlsAcceptor,
    stream: Timed,
    peer: std::net::SocketAddr,
    limits: Rc<Deadlines>,
) {
    match acceptor.accept(stream).await {
        Ok(tls_stream) => super::conn::serve(ctx, tls_stream, peer, limits).await,
        Err(e) => log::debug!("TLS handshake with {peer} failed: {e}"),
    }
}

/// Over `max_concurrent_connections`: a plain-HTTP client gets a 503 and the connection
/// closes; a TLS one is closed before any handshake work.
async fn refuse(ctx: &Ctx, mut stream: Timed, tls: bool) {
    let now = std::time::Instant::now();
    if ctx
        .limit_logged
        .get()
        .is_none_or(|t| now.duration_since(t).as_secs() >= 1)
    {
        ctx.limit_logged.set(Some(now));
        log::warn!(
            "max_concurrent_connections ({}) reached: refusing connections",
            ctx.max_connections
        );
    }
    if !tls {
        use monoio::io::AsyncWriteRentExt;
        let answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 24\r\nRetry-After: 1\r\nConnection: close\r\n\r\n503 Service Unavailable\n";
        stream
            .limits()
            .set_write(Limit::Each(Duration::from_secs(1)));
        let _ = stream.write_all(answer.to_vec()).await;
    }
}

/// The route is known only once the head is parsed: read heads up to the largest limit.
fn max_head_size(c: &Config) -> usize {
    c.host_routes
        .values()
        .chain(c.path_routes.values().flat_map(|p| p.values()))
        .map(|r| r.security.max_request_header_size as usize)
        .chain(std::iter::once(
            crate::shared::config::RouteSecurity::default().max_request_header_size as usize,
        ))
        .max()
        .unwrap_or(8192)
}

/// Closes idle backend connections past their timeout, or closed by their backend.
async fn sweep_backend_pool(ctx: Rc<Ctx>) {
    loop {
        monoio::time::sleep(Duration::from_secs(5)).await;
        ctx.backends.sweep();
    }
}

fn upstream_labels(
    c: &Config,
    region: &Region,
) -> Vec<crate::shared::metrics::UpstreamServerLabel> {
    let mut out = Vec::new();
    for (name, up) in &c.upstreams {
        for s in &up.servers {
            let key = crate::shared::config::backend_key(name, s.url());
            if let Some(index) = region.header.find_backend(&key) {
                out.push(crate::shared::metrics::UpstreamServerLabel {
                    upstream: name.clone(),
                    server: s.url().to_string(),
                    index,
                });
            }
        }
    }
    out
}
