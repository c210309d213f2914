//! The worker loop: accept on every listener, run each connection as a task, and react to
//! signals. Draining (SIGQUIT) cancels the pending accepts (an accept cancelled after it
//! completed still hands back its connection, so nothing that reached this worker is
//! dropped) and lets the connections end by themselves: each answers its next request with
//! `Connection: close`, and an idle one closes when its keep-alive time is up. The worker
//! exits when none is left, or when `shutdown_timeout_secs` have passed.

use super::conn;
use super::ctx::{Ctx, Open};
use super::dispatch::Dispatch;
use super::exchange::Client;
use super::http::tls::TlsStream;
use super::ktls;
use super::timed::{Limit, Timed};
use crate::shared::child::{exit, EXIT_STARTUP_FAILED};
use crate::shared::shm::{TlsMode, STATE_SERVING};
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;
use monoio::net::{TcpListener, UnixStream};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Serves until SIGTERM/SIGINT, or until a SIGQUIT drain completes: the process exits from
/// here and never returns.
/// `tls`: terminate TLS on the first listener (`server.listen`); the others are plain HTTP.
pub async fn run(
    ctx: Rc<Ctx>,
    dispatch: Rc<Dispatch>,
    listeners: Vec<std::net::TcpListener>,
    signals: std::os::unix::net::UnixStream,
    tls: Option<(Arc<rustls::ServerConfig>, ktls::Mode)>,
) -> ! {
    let mut accepting = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let listener_tls = tls.clone().filter(|_| i == 0);
        match TcpListener::from_std(l) {
            Ok(l) => {
                let task = accept_loop(ctx.clone(), dispatch.clone(), l, listener_tls);
                accepting.push(monoio::spawn(task))
            }
            Err(e) => {
                log::error!("cannot register a listener: {e}");
                exit(EXIT_STARTUP_FAILED);
            }
        }
    }
    let signals = match UnixStream::from_std(signals) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot register the signal socket: {e}");
            exit(EXIT_STARTUP_FAILED);
        }
    };
    monoio::spawn(sweep_backend_pool(dispatch.clone()));
    monoio::spawn(sweep_idle(ctx.clone()));
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
                exit(0);
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
            exit(0);
        }
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    log::info!("drained, exiting");
    exit(0);
}

async fn accept_loop(
    ctx: Rc<Ctx>,
    dispatch: Rc<Dispatch>,
    listener: TcpListener,
    tls: Option<(Arc<rustls::ServerConfig>, ktls::Mode)>,
) {
    loop {
        if ctx.draining.get() {
            return;
        }
        match listener.cancelable_accept(ctx.cancel_handle()).await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let limits = ctx.client_deadlines();
                let (open, total) = Open::new(ctx.clone());
                let over = ctx.max_connections > 0 && total > ctx.max_connections;
                let stream = Timed::new(stream, limits.clone());
                // One task a connection, spawned as it is (not wrapped): the plain one lives
                // as long as the connection, idle or not, and its size is paid for each.
                match &tls {
                    _ if over => drop(monoio::spawn(refuse(open, stream, tls.is_some()))),
                    None if ctx.h2c => {
                        let task = serve_cleartext(open, dispatch.clone(), stream, peer);
                        drop(monoio::spawn(task));
                    }
                    None => {
                        let client = Client::new(stream, peer, limits);
                        drop(monoio::spawn(conn::serve(open, dispatch.clone(), client)));
                    }
                    // kTLS is required and unavailable (see `ktls`).
                    Some((_, ktls::Mode::Refuse)) => drop(stream),
                    Some((config, mode)) => {
                        let config = config.clone();
                        let tls = serve_tls(open, dispatch.clone(), config, *mode, stream, peer);
                        drop(monoio::spawn(tls));
                    }
                }
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

/// A TLS connection: the handshake (within the head's deadline), then HTTP over it, in the
/// kernel's TLS when `mode` says the kernel takes the connection's cipher, else in rustls.
async fn serve_tls(
    open: Open,
    dispatch: Rc<Dispatch>,
    config: Arc<rustls::ServerConfig>,
    mode: ktls::Mode,
    stream: Timed,
    peer: std::net::SocketAddr,
) {
    let limits = stream.limits().clone();
    let session = match rustls::ServerConnection::new(config) {
        Ok(session) => session,
        Err(e) => {
            log::error!("cannot start a TLS session: {e}");
            return;
        }
    };
    #[cfg(feature = "ktls")]
    let offload = match mode {
        ktls::Mode::Offload(support) => Some(support),
        _ => None,
    };
    #[cfg(not(feature = "ktls"))]
    let offload: Option<()> = {
        let _ = mode;
        None
    };
    // Boxed: its state is dead weight once the handshake is done.
    let tls_stream = match Box::pin(TlsStream::handshake(stream, session, offload.is_some())).await
    {
        Ok(tls_stream) => tls_stream,
        Err(e) => {
            count_handshake(&open, super::http::tls::failed_version(&e), false);
            log::debug!("TLS handshake with {peer} failed: {e}");
            return;
        }
    };
    count_handshake(&open, tls_stream.session().protocol_version(), true);
    let h2 = tls_stream.session().alpn_protocol() == Some(b"h2");
    #[cfg(feature = "ktls")]
    let tls_stream = match offload {
        None => tls_stream,
        Some(support) => match ktls::stream::hand_over(tls_stream, support) {
            Ok(ktls::stream::Handed::Rustls(tls_stream)) => tls_stream,
            Ok(ktls::stream::Handed::Kernel(ktls_stream, plain)) => {
                open.slot.count_tls_connection(TlsMode::Ktls);
                if h2 {
                    let h2 = super::h2::serve(open, dispatch, ktls_stream, plain, peer, limits);
                    return Box::pin(h2).await;
                }
                let mut client = Client::new(ktls_stream, peer, limits);
                client.buf = plain;
                return conn::serve(open, dispatch, client).await;
            }
            Err(e) => {
                log::warn!("cannot hand the TLS connection with {peer} to the kernel: {e}");
                return;
            }
        },
    };
    open.slot.count_tls_connection(TlsMode::Rustls);
    if h2 {
        // Boxed: an HTTP/1.1 connection's task must not be as large as an HTTP/2 one's.
        let h2 = super::h2::serve(open, dispatch, tls_stream, Vec::new(), peer, limits);
        return Box::pin(h2).await;
    }
    let client = Client::new(tls_stream, peer, limits);
    conn::serve(open, dispatch, client).await
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A plain connection with `http2_cleartext`: HTTP/2 if it opens with the preface (prior
/// knowledge, RFC 9113 §3.3), else HTTP/1.1 with what was read as the start of its head.
/// The first bytes must come within the head's deadline, as a first request's do.
async fn serve_cleartext(open: Open, dispatch: Rc<Dispatch>, mut stream: Timed, peer: SocketAddr) {
    let limits = stream.limits().clone();
    // Small: an HTTP/1.1 head grows it as it needs; an idle client holds no head buffer.
    let mut first = Vec::with_capacity(PREFACE.len());
    while first.len() < PREFACE.len() && PREFACE.starts_with(&first) {
        let len = first.len();
        let (res, back) = stream.read(first.slice_mut(len..PREFACE.len())).await;
        first = back.into_inner();
        match res {
            Ok(n) if n > 0 => {}
            _ => return,
        }
    }
    if first == PREFACE {
        let h2 = super::h2::serve(open, dispatch, stream, first, peer, limits);
        return Box::pin(h2).await;
    }
    let mut client = Client::new(stream, peer, limits);
    client.buf = first;
    conn::serve(open, dispatch, client).await
}

/// `zerocopy_proxy_tls_handshakes_total`: by the version agreed (none if the handshake failed
/// before: a client that sent no or a bad ClientHello).
fn count_handshake(open: &Open, version: Option<rustls::ProtocolVersion>, ok: bool) {
    use crate::shared::shm::TlsVersion;
    let version = match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => TlsVersion::V13,
        Some(rustls::ProtocolVersion::TLSv1_2) => TlsVersion::V12,
        _ => TlsVersion::Unknown,
    };
    open.slot.count_tls_handshake(version, ok);
}

/// Over `max_concurrent_connections`: a plain-HTTP client gets a 503 and the connection
/// closes; a TLS one is closed before any handshake work.
async fn refuse(ctx: Open, mut stream: Timed, tls: bool) {
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

/// Closes idle backend connections past their timeout, or closed by their backend.
/// Closes the idle connections whose wait for a request is over (see `idle`).
async fn sweep_idle(ctx: Rc<Ctx>) {
    loop {
        monoio::time::sleep(super::idle::SWEEP).await;
        ctx.idle.sweep(std::time::Instant::now());
    }
}

async fn sweep_backend_pool(dispatch: Rc<Dispatch>) {
    loop {
        monoio::time::sleep(Duration::from_secs(5)).await;
        dispatch.backends.sweep();
    }
}
