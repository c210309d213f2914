//! Deadlines on every read and write of a socket, client and backend alike: one mechanism,
//! the way Pingora wraps its streams, instead of a timer written around each call site.
//!
//! `Timed` wraps the TCP socket at the very bottom of a connection, so a TLS layer above it
//! (client or backend) has its record reads and writes bounded too. What the limits are is
//! decided by the code that owns the connection, phase by phase (a head as a whole, between
//! two body reads, between two writes…), through `Deadlines`, which it shares with the
//! stream: a TLS stream does not give its socket back, so the limits are not set through it.
//!
//! An operation past its deadline is cancelled (io_uring cancellation hands the buffer back)
//! and fails with `ErrorKind::TimedOut`; if the kernel completed it in the meantime, its
//! result wins. Reads and writes have cancellers of their own, so a tunnel that reads and
//! writes the same socket at once never cancels the other direction.

use monoio::buf::{IoBuf, IoBufMut, IoVecBuf, IoVecBufMut};
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, CancelHandle, CancelableAsyncReadRent, CancelableAsyncWriteRent,
    Canceller, Split,
};
use monoio::net::TcpStream;
use monoio::BufResult;
use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// No deadline: the owner bounds the wait another way (a tunnel's idle watchdog).
    None,
    /// Each operation must complete within this long: nginx's timeouts "between two
    /// successive operations".
    Each(Duration),
    /// Every operation must complete by then: a request head as a whole.
    By(Instant),
}

impl Limit {
    /// When an operation started now must be done; `None` for no deadline.
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Limit::None => None,
            Limit::Each(d) => Some(Instant::now() + d),
            Limit::By(at) => Some(at),
        }
    }
}

/// The limits in force on one socket, changed by its owner as the connection moves on.
#[derive(Debug)]
pub struct Deadlines {
    read: Cell<Limit>,
    write: Cell<Limit>,
}

impl Deadlines {
    pub fn new(read: Limit, write: Limit) -> Rc<Deadlines> {
        Rc::new(Deadlines {
            read: Cell::new(read),
            write: Cell::new(write),
        })
    }

    pub fn set_read(&self, limit: Limit) {
        self.read.set(limit);
    }

    pub fn set_write(&self, limit: Limit) {
        self.write.set(limit);
    }

    pub fn read(&self) -> Limit {
        self.read.get()
    }

    pub fn write(&self) -> Limit {
        self.write.get()
    }
}

pub fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed")
}

pub fn is_timeout(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
}

pub struct Timed {
    tcp: TcpStream,
    limits: Rc<Deadlines>,
    reads: Canceller,
    writes: Canceller,
}

impl Timed {
    pub fn new(tcp: TcpStream, limits: Rc<Deadlines>) -> Timed {
        Timed {
            tcp,
            limits,
            reads: Canceller::new(),
            writes: Canceller::new(),
        }
    }

    /// The socket, for what goes around the rented-buffer calls (sendfile, readiness).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn limits(&self) -> &Rc<Deadlines> {
        &self.limits
    }
}

/// Runs `op` (made with a handle of `canceller`) until `limit` passes, then cancels it and
/// waits for the kernel to hand the buffer back.
async fn bounded<T, F>(
    limit: Limit,
    canceller: &mut Canceller,
    op: impl FnOnce(CancelHandle) -> F,
) -> BufResult<usize, T>
where
    F: Future<Output = BufResult<usize, T>>,
{
    let at = limit.deadline();
    let op = op(canceller.handle());
    let mut op = std::pin::pin!(op);
    if let Some(at) = at {
        monoio::select! {
            done = &mut op => return done,
            _ = monoio::time::sleep_until(at.into()) => {}
        }
        // A cancelled canceller stays cancelled: the next operation gets a fresh one.
        let spent = std::mem::take(canceller);
        *canceller = spent.cancel();
    }
    match op.await {
        (Err(_), buf) if at.is_some_and(|at| Instant::now() >= at) => (Err(timed_out()), buf),
        done => done,
    }
}

impl AsyncReadRent for Timed {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        let limit = self.limits.read();
        if limit == Limit::None {
            return self.tcp.read(buf).await;
        }
        let Timed { tcp, reads, .. } = self;
        bounded(limit, reads, |c| tcp.cancelable_read(buf, c)).await
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> BufResult<usize, T> {
        let limit = self.limits.read();
        if limit == Limit::None {
            return self.tcp.readv(buf).await;
        }
        let Timed { tcp, reads, .. } = self;
        bounded(limit, reads, |c| tcp.cancelable_readv(buf, c)).await
    }
}

impl AsyncWriteRent for Timed {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let limit = self.limits.write();
        if limit == Limit::None {
            return self.tcp.write(buf).await;
        }
        let Timed { tcp, writes, .. } = self;
        bounded(limit, writes, |c| tcp.cancelable_write(buf, c)).await
    }

    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        let limit = self.limits.write();
        if limit == Limit::None {
            return self.tcp.writev(buf).await;
        }
        let Timed { tcp, writes, .. } = self;
        bounded(limit, writes, |c| tcp.cancelable_writev(buf, c)).await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush().await
    }

    async fn shutdown(&mut self) -> std::io::Result<()> {
        self.tcp.shutdown().await
    }
}

// SAFETY: reads and writes use separate cancellers and the socket's reads and writes are
// independent kernel operations, so the two halves of a split may run at once.
unsafe impl Split for Timed {}
