//! The client side of a connection: plain TCP, or TLS terminated here with rustls, both over
//! a `Timed` socket. The HTTP engine is written once over `ClientStream`; what differs is
//! whether bytes may go to the socket directly (sendfile, a half-close before lingering).

use super::tls::TlsStream;
use crate::worker::timed::Timed;
use monoio::io::{AsyncReadRent, AsyncWriteRent, Split};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

pub trait ClientStream: AsyncReadRent + AsyncWriteRent + Split + 'static {
    /// The socket, when the bytes on the wire are the HTTP bytes.
    fn plain(&self) -> Option<&Timed>;

    /// The socket to wait on for the next bytes, when nothing already received is left to
    /// read: an idle connection then waits for readability holding no buffer. `None`: read
    /// at once.
    fn idle_socket(&self) -> Option<&Timed>;

    /// Just before the write side of the socket is shut (`linger`): a stream whose records
    /// the kernel frames (kTLS) sends its close_notify first.
    fn before_half_close(&mut self) {}

    fn raw_fd(&self) -> Option<RawFd> {
        self.plain().map(|s| s.tcp().as_raw_fd())
    }

    /// What is written next is the connection's last response, and it is written without
    /// waiting for anyone (no slow stream behind it). On plain TCP its last partial segment
    /// then waits for the close and leaves with the FIN, one segment fewer a connection
    /// (nginx's `tcp_nopush`). Full segments go at once; the close flushes the rest.
    fn last_response(&self) {
        if let Some(fd) = self.raw_fd() {
            // SAFETY: `fd` is the socket of `self`, open for as long as `self` is borrowed.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            // A refused option costs a segment, nothing else.
            let _ = socket2::SockRef::from(&fd).set_cork(true);
        }
    }
}

impl ClientStream for Timed {
    fn plain(&self) -> Option<&Timed> {
        Some(self)
    }

    fn idle_socket(&self) -> Option<&Timed> {
        Some(self)
    }
}

impl ClientStream for TlsStream<rustls::ServerConnection> {
    fn plain(&self) -> Option<&Timed> {
        None
    }

    fn idle_socket(&self) -> Option<&Timed> {
        TlsStream::idle_socket(self)
    }
}
