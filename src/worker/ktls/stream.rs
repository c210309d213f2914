//! A client connection whose TLS records the kernel encrypts and decrypts: after the rustls
//! handshake the connection is plain TCP to us (the `Timed` socket with its deadlines), so
//! static files go out with `sendfile` through the kernel's TLS and proxied bodies with plain
//! reads and writes. What stays ours is the records that are not application data: a read
//! that meets one fails with `EIO`; the record is then read with its type and handled
//! (`offload::control`), and never reaches the HTTP layer as data.

use super::offload::{self, Cipher, Control, Record, Support};
use crate::worker::http::client::ClientStream;
use crate::worker::http::tls::TlsStream;
use crate::worker::timed::Timed;
use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, Split};
use monoio::BufResult;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ProtocolVersion, ServerConnection};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Room for a control record: an alert is 2 bytes, a KeyUpdate 5. A longer one is read in
/// pieces and fails as malformed, which ends the connection as it should.
const CONTROL_ROOM: usize = 256;

pub struct KtlsStream {
    io: Timed,
    version: ProtocolVersion,
    /// The client's close_notify came: reads give 0 from now on.
    closed: bool,
    /// A control record ended the connection (a fatal alert, a key update not followed).
    failed: bool,
    /// Our close_notify went out.
    notified: bool,
}

/// What became of a connection after its handshake.
pub enum Handed {
    /// The kernel has it; the plaintext rustls had already decrypted comes first.
    Kernel(KtlsStream, Vec<u8>),
    /// Its version or cipher is not one the kernel takes: rustls keeps it.
    Rustls(TlsStream<ServerConnection>),
}

/// Hands a connection whose handshake read whole records to the kernel when it takes the
/// negotiated version and cipher. An error means the socket may be half configured: the
/// connection must be closed.
pub fn hand_over(tls: TlsStream<ServerConnection>, support: Support) -> io::Result<Handed> {
    let session = tls.session();
    let version = session.protocol_version();
    let cipher = session
        .negotiated_cipher_suite()
        .and_then(|s| Cipher::of_suite(s.suite()));
    let (Some(version), Some(cipher)) = (version, cipher) else {
        return Ok(Handed::Rustls(tls));
    };
    if !support.has(version, cipher) {
        return Ok(Handed::Rustls(tls));
    }
    let (io, session, plain) = match tls.into_parts() {
        Ok(parts) => parts,
        Err(tls) => return Ok(Handed::Rustls(tls)),
    };
    let secrets = session
        .dangerous_extract_secrets()
        .map_err(|e| io::Error::other(format!("cannot extract the TLS secrets: {e}")))?;
    let cipher = offload::offload(fd(&io), version, &secrets)?;
    if log::log_enabled!(log::Level::Debug) {
        // What the kernel says, not what we asked for: getsockopt(TCP_ULP).
        let ulp = offload::ulp(fd(&io)).unwrap_or_else(|e| e.to_string());
        log::debug!(
            "kTLS: connection offloaded ({version:?}, {}, TCP_ULP {ulp:?})",
            cipher.name()
        );
    }
    Ok(Handed::Kernel(
        KtlsStream {
            io,
            version,
            closed: false,
            failed: false,
            notified: false,
        },
        plain,
    ))
}

fn fd(io: &Timed) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is the socket `io` owns, open for as long as `io` is borrowed.
    unsafe { BorrowedFd::borrow_raw(io.tcp().as_raw_fd()) }
}

fn ended_before() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the TLS connection ended on a control record",
    )
}

impl KtlsStream {
    /// After a read failed with `EIO`: the record at the head of the socket is a control
    /// record; read it with its type and act on it. `Err`: the connection is over.
    fn control_record(&mut self) -> io::Result<()> {
        let mut payload = [0u8; CONTROL_ROOM];
        let fd = fd(&self.io);
        // Never blocks: the kernel has the record already (that is what the EIO said).
        match offload::recv_flags(fd, &mut payload, libc::MSG_DONTWAIT)? {
            Record::Control { content_type, len } => {
                let keys: Option<&mut KernelConnection<ServerConnectionData>> = None;
                match offload::control(fd, self.version, content_type, &payload[..len], keys)? {
                    Control::CloseNotify => self.closed = true,
                    Control::Ignored | Control::Rekeyed => {}
                }
                Ok(())
            }
            // The EIO announced a control record; data here would be lost bytes, so the
            // connection ends rather than go on without them.
            Record::Data(_) => Err(io::Error::other(
                "kTLS: data where a control record was announced",
            )),
        }
    }

    /// A read's result, with a control record handled: `None` to read again.
    fn after_read(&mut self, res: io::Result<usize>) -> Option<io::Result<usize>> {
        match res {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => match self.control_record() {
                Ok(()) if self.closed => Some(Ok(0)),
                Ok(()) => None,
                Err(e) => {
                    self.failed = true;
                    log::debug!("kTLS connection ends: {e}");
                    Some(Err(e))
                }
            },
            res => Some(res),
        }
    }

    fn ended(&self) -> Option<io::Result<usize>> {
        if self.failed {
            Some(Err(ended_before()))
        } else if self.closed {
            Some(Ok(0))
        } else {
            None
        }
    }

    /// Our close_notify, once, without waiting: the peer can tell a complete response from
    /// a cut one. Skipped (nothing else to do) when the send buffer is full.
    fn notify_close(&mut self) {
        if !self.notified && !self.failed {
            self.notified = true;
            let _ = offload::send_close_notify_now(fd(&self.io));
        }
    }
}

impl AsyncReadRent for KtlsStream {
    async fn read<T: IoBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        loop {
            if let Some(end) = self.ended() {
                return (end, buf);
            }
            let (res, back) = self.io.read(buf).await;
            buf = back;
            if let Some(res) = self.after_read(res) {
                return (res, buf);
            }
        }
    }

    async fn readv<T: IoVecBufMut>(&mut self, mut buf: T) -> BufResult<usize, T> {
        loop {
            if let Some(end) = self.ended() {
                return (end, buf);
            }
            let (res, back) = self.io.readv(buf).await;
            buf = back;
            if let Some(res) = self.after_read(res) {
                return (res, buf);
            }
        }
    }
}

impl AsyncWriteRent for KtlsStream {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        self.io.write(buf).await
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        self.io.writev(buf).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.io.flush().await
    }

    /// close_notify, then the socket's write side.
    async fn shutdown(&mut self) -> io::Result<()> {
        self.notify_close();
        self.io.shutdown().await
    }
}

// SAFETY: the halves of a split stream share the socket, whose reads and writes `Timed`
// keeps independent. The read side sends nothing: control records are answered with a
// KeyUpdate only when rustls' key schedule is kept (`keys`), which it is not here.
unsafe impl Split for KtlsStream {}

impl ClientStream for KtlsStream {
    fn plain(&self) -> Option<&Timed> {
        Some(&self.io)
    }

    fn idle_socket(&self) -> Option<&Timed> {
        // After the end the read returns at once: no waiting on the socket.
        self.ended().is_none().then_some(&self.io)
    }

    fn before_half_close(&mut self) {
        self.notify_close();
    }
}
