//! Backend servers: where they are, how to connect (plain TCP or TLS, see `http::tls`), and a
//! per-worker pool of idle keep-alive connections to each.

use crate::shared::config::RouteSecurity;
use crate::shared::url::BackendUrl;
use crate::worker::http::tls::TlsStream;
use crate::worker::timed::{Deadlines, Limit, Timed};
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::pki_types::ServerName;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One backend server, resolved when the generation starts.
pub struct Target {
    pub url: BackendUrl,
    pub addrs: Vec<SocketAddr>,
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// Index in the shared backend table (servers of upstreams; `None` for a route's `url`).
    pub backend: Option<usize>,
    /// Pool key: one pool per distinct URL, TLS name and trusted CA file.
    pub key: String,
}

impl Target {
    pub fn new(
        url: &str,
        sni: Option<&str>,
        ca_file: Option<&str>,
        backend: Option<usize>,
    ) -> Result<Target, String> {
        let url = BackendUrl::parse(url)?;
        let addrs = url.addrs().map_err(|e| format!("{}: {e}", url.host))?;
        let tls = if url.tls {
            let name = url.server_name(sni);
            let server_name = ServerName::try_from(name.clone())
                .map_err(|e| format!("invalid TLS name `{name}`: {e}"))?;
            Some((client_config(ca_file)?, server_name))
        } else {
            None
        };
        // Connections are shared only between routes that verify the backend the same way.
        let key = format!("{}#{}#{}", url, sni.unwrap_or(""), ca_file.unwrap_or(""));
        Ok(Target {
            url,
            addrs,
            tls,
            backend,
            key,
        })
    }

    /// `host:port`, as the health log and metrics name a server.
    pub fn label(&self) -> String {
        format!("{}:{}", self.url.host, self.url.port)
    }
}

thread_local! {
    /// One rustls client configuration per CA file (`""`: the system roots only).
    static CLIENT_CONFIGS: RefCell<HashMap<String, Arc<rustls::ClientConfig>>> = RefCell::new(HashMap::new());
}

/// Verification against the system's roots (Mozilla's bundled list where the system has
/// none), plus the certificates of `ca_file`.
fn client_config(ca_file: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    let key = ca_file.unwrap_or("").to_string();
    if let Some(c) = CLIENT_CONFIGS.with(|m| m.borrow().get(&key).cloned()) {
        return Ok(c);
    }
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = ca_file {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("{path}: {e}"))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("{path}: {e}"))?;
            roots.add(cert).map_err(|e| format!("{path}: {e}"))?;
        }
    }
    let provider = Arc::new(crate::shared::tls::provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let config = Arc::new(config);
    CLIENT_CONFIGS.with(|m| m.borrow_mut().insert(key, config.clone()));
    Ok(config)
}

/// A connection to a backend, plain or TLS, over a socket with deadlines.
pub enum BackendStream {
    Plain(Timed),
    Tls(TlsStream<rustls::ClientConnection>),
}

pub struct BackendConn {
    pub stream: BackendStream,
    /// The socket's deadlines: the exchange sets the route's backend timeouts.
    pub limits: Rc<Deadlines>,
    /// The TCP socket under the stream, to check an idle connection without reading it.
    fd: RawFd,
    /// Bytes read past the last response (a misbehaving backend): such a conn is not reused.
    pub reused: bool,
}

#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Failed(String),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Timeout => f.write_str("timed out"),
            ConnectError::Failed(why) => f.write_str(why),
        }
    }
}

/// Connects within `timeout`, TLS handshake included.
pub async fn connect(target: &Target, timeout: Duration) -> Result<BackendConn, ConnectError> {
    let deadline = Instant::now() + timeout;
    let mut last = ConnectError::Failed("no address".into());
    for addr in &target.addrs {
        let attempt = monoio::time::timeout_at(deadline.into(), TcpStream::connect(*addr)).await;
        let tcp = match attempt {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(Err(e)) => {
                last = ConnectError::Failed(format!("{addr}: {e}"));
                continue;
            }
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        let fd = tcp.as_raw_fd();
        let limits = Deadlines::new(Limit::By(deadline), Limit::By(deadline));
        let tcp = Timed::new(tcp, limits.clone());
        let stream = match &target.tls {
            None => BackendStream::Plain(tcp),
            Some((config, name)) => {
                let session = rustls::ClientConnection::new(config.clone(), name.clone())
                    .map_err(|e| ConnectError::Failed(format!("{addr}: TLS: {e}")))?;
                match TlsStream::handshake(tcp, session, false).await {
                    Ok(s) => BackendStream::Tls(s),
                    Err(_) if Instant::now() >= deadline => return Err(ConnectError::Timeout),
                    Err(e) => return Err(ConnectError::Failed(format!("{addr}: TLS: {e}"))),
                }
            }
        };
        return Ok(BackendConn {
            stream,
            limits,
            fd,
            reused: false,
        });
    }
    Err(last)
}

impl BackendConn {
    /// The backend's address, for the access log.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        use nix::sys::socket::{getpeername, SockaddrStorage};
        let addr: SockaddrStorage = getpeername(self.fd).ok()?;
        if let Some(v4) = addr.as_sockaddr_in() {
            return Some(std::net::SocketAddrV4::from(*v4).into());
        }
        addr.as_sockaddr_in6()
            .map(|v6| std::net::SocketAddrV6::from(*v6).into())
    }

    /// An idle pooled connection is usable if the backend has neither closed it nor sent
    /// anything unasked (a peek that would block).
    fn still_open(&self) -> bool {
        use nix::sys::socket::{recv, MsgFlags};
        let mut b = [0u8; 1];
        let peek = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        recv(self.fd, &mut b, peek) == Err(nix::errno::Errno::EAGAIN)
    }
}

impl AsyncReadRent for BackendStream {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            BackendStream::Plain(s) => s.read(buf).await,
            BackendStream::Tls(s) => s.read(buf).await,
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            BackendStream::Plain(s) => s.readv(buf).await,
            BackendStream::Tls(s) => s.readv(buf).await,
        }
    }
}

impl AsyncWriteRent for BackendStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            BackendStream::Plain(s) => s.write(buf).await,
            BackendStream::Tls(s) => s.write(buf).await,
        }
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        match self {
            BackendStream::Plain(s) => s.writev(buf).await,
            BackendStream::Tls(s) => s.writev(buf).await,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            BackendStream::Plain(s) => s.flush().await,
            BackendStream::Tls(s) => s.flush().await,
        }
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            BackendStream::Plain(s) => s.shutdown().await,
            BackendStream::Tls(s) => s.shutdown().await,
        }
    }
}

/// How long a connection back in the pool is trusted without checking it is still open.
const TRUST_FRESH: Duration = Duration::from_secs(1);

/// A pooled connection, when it expires, and since when it is idle.
type Idle = (BackendConn, Instant, Instant);

/// Idle keep-alive connections of this worker, per backend.
#[derive(Default)]
pub struct Pool {
    idle: RefCell<HashMap<String, Vec<Idle>>>,
}

impl Pool {
    /// The most recently used idle connection to `target` that is still open and not past
    /// its idle timeout.
    pub fn take(&self, target: &Target) -> Option<BackendConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(&target.key)?;
        let now = Instant::now();
        while let Some((conn, expires, idle_since)) = list.pop() {
            // A connection back in the pool for less than `TRUST_FRESH` is taken without a
            // peek (a system call per request on a busy proxy): a backend rarely closes one
            // that soon, and a bodiless idempotent request that finds it dead is sent again
            // on a fresh connection. One idle longer is checked.
            let fresh = now.duration_since(idle_since) < TRUST_FRESH;
            if now < expires && (fresh || conn.still_open()) {
                let mut conn = conn;
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for reuse for `timeout`, up to `max` idle connections to that backend.
    pub fn put(&self, target: &Target, conn: BackendConn, max: usize, timeout: Duration) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(target.key.clone()).or_default();
        if list.len() < max {
            let now = Instant::now();
            list.push((conn, now + timeout, now));
        }
    }

    /// Keeps `conn` for reuse under the route's limits (`idle_connection_timeout_secs`,
    /// `max_idle_connections_per_host`).
    pub fn keep(&self, target: &Target, conn: BackendConn, sec: &RouteSecurity) {
        let idle = Duration::from_secs(sec.idle_connection_timeout_secs);
        self.put(target, conn, sec.max_idle_connections_per_host, idle);
    }

    /// Closes idle connections past their timeout, or closed by the backend (run every
    /// few seconds, so that no descriptor is held for a backend nobody asks for).
    pub fn sweep(&self) {
        let now = Instant::now();
        for list in self.idle.borrow_mut().values_mut() {
            list.retain(|(conn, expires, _)| now < *expires && conn.still_open());
        }
    }
}

pub type Targets = Vec<Rc<Target>>;
