//! The client side of a connection: plain TCP, or TLS terminated here with rustls. The HTTP
//! engine is written once over `ClientStream`; what differs is whether bytes may go to the
//! socket directly (sendfile, a half-close before lingering) and how draining interrupts a
//! read that waits for the next request.

use super::server::Ctx;
use monoio::buf::SliceMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, CancelableAsyncReadRent, Split};
use monoio::net::TcpStream;
use monoio_rustls::ServerTlsStream;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};

pub type Buf = SliceMut<Vec<u8>>;

pub trait ClientStream: AsyncReadRent + AsyncWriteRent + Split + 'static {
    /// The plain TCP stream, when the bytes on the wire are the HTTP bytes.
    fn plain(&self) -> Option<&TcpStream>;

    /// A read that waits for the next request: draining interrupts it. `None` for the buffer
    /// when the read was abandoned (its buffer went with it).
    fn idle_read(
        &mut self,
        buf: Buf,
        ctx: &Ctx,
    ) -> impl Future<Output = (std::io::Result<usize>, Option<Buf>)>;

    fn raw_fd(&self) -> Option<RawFd> {
        self.plain().map(|s| s.as_raw_fd())
    }
}

impl ClientStream for TcpStream {
    fn plain(&self) -> Option<&TcpStream> {
        Some(self)
    }

    async fn idle_read(&mut self, buf: Buf, ctx: &Ctx) -> (std::io::Result<usize>, Option<Buf>) {
        // An io_uring read cancelled after it completed still returns its bytes.
        let (res, buf) = self.cancelable_read(buf, ctx.cancel_handle()).await;
        (res, Some(buf))
    }
}

impl ClientStream for ServerTlsStream<TcpStream> {
    fn plain(&self) -> Option<&TcpStream> {
        None
    }

    async fn idle_read(&mut self, buf: Buf, ctx: &Ctx) -> (std::io::Result<usize>, Option<Buf>) {
        // A TLS read cannot be cancelled and resumed; the connection is closed once draining
        // wins, so what the abandoned read held does not matter.
        monoio::select! {
            (res, buf) = self.read(buf) => (res, Some(buf)),
            _ = ctx.drain_signal() => (Err(std::io::ErrorKind::Interrupted.into()), None),
        }
    }
}
