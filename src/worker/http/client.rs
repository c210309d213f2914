//! The client side of a connection: plain TCP, or TLS terminated here with rustls, both over
//! a `Timed` socket. The HTTP engine is written once over `ClientStream`; what differs is
//! whether bytes may go to the socket directly (sendfile, a half-close before lingering).

use crate::worker::timed::Timed;
use monoio::io::{AsyncReadRent, AsyncWriteRent, Split};
use monoio_rustls::ServerTlsStream;
use std::os::fd::{AsRawFd, RawFd};

pub trait ClientStream: AsyncReadRent + AsyncWriteRent + Split + 'static {
    /// The socket, when the bytes on the wire are the HTTP bytes.
    fn plain(&self) -> Option<&Timed>;

    fn raw_fd(&self) -> Option<RawFd> {
        self.plain().map(|s| s.tcp().as_raw_fd())
    }
}

impl ClientStream for Timed {
    fn plain(&self) -> Option<&Timed> {
        Some(self)
    }
}

impl ClientStream for ServerTlsStream<Timed> {
    fn plain(&self) -> Option<&Timed> {
        None
    }
}
