//! Writing responses. File bodies on plain TCP go from the page cache to the socket with
//! `sendfile(2)`: their bytes never pass through user space.

use super::client::ClientStream;
use super::{self as http, ResponseHead};
use crate::worker::timed::{timed_out, Timed};
use bytes::Bytes;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};
use std::os::fd::AsRawFd;

/// Bodies up to this size go out in the same write as the head.
const INLINE_BODY: usize = 16 * 1024;
/// In-memory bodies are written in slices of at most this size.
const BYTES_SLICE: usize = 64 * 1024 * 1024;

/// What a response carries after its head.
pub enum Body {
    Empty,
    Bytes(Bytes),
    /// `len` bytes of `file` from `offset`.
    File {
        file: std::fs::File,
        offset: u64,
        len: u64,
    },
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
}

pub struct Response {
    pub head: ResponseHead,
    pub body: Body,
}

impl Response {
    pub fn new(head: ResponseHead, body: Body) -> Self {
        Response { head, body }
    }

    /// An error with a short text body: `404 Not Found`.
    pub fn error(status: u16) -> Self {
        let head = ResponseHead::new(status).header("Content-Type", "text/plain; charset=utf-8");
        let body = Body::Bytes(Bytes::from(format!(
            "{} {}\n",
            status,
            http::reason(status)
        )));
        Response { head, body }
    }

    pub fn status(&self) -> u16 {
        self.head.status
    }

    /// HEAD: the headers GET would send, no body.
    pub fn strip_body(&mut self) {
        self.declare_length();
        self.body = Body::Empty;
    }

    /// States the body's length, unless the head has one or the status carries none: what
    /// every response needs before its head is written, whatever the protocol.
    pub fn declare_length(&mut self) {
        if !self.has_content_length() && self.sends_length() {
            let len = self.body.len();
            self.head.set("Content-Length", len.to_string());
        }
    }

    fn has_content_length(&self) -> bool {
        self.head
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    }

    /// 1xx, 204 and 304 carry no Content-Length of a body.
    fn sends_length(&self) -> bool {
        !matches!(self.head.status, 100..=199 | 204 | 304)
    }
}

/// Writes the response; returns the body bytes sent. `keep`: whether the connection stays
/// open after it (otherwise `Connection: close` is sent).
pub async fn send<S: ClientStream>(
    stream: &mut S,
    mut r: Response,
    keep: bool,
) -> std::io::Result<u64> {
    r.declare_length();
    if !keep {
        r.head.set("Connection", "close");
        // The whole response is written without waiting on anyone: its tail can wait for
        // the close and leave with the FIN.
        stream.last_response();
    }
    let mut out = r.head.encode();
    match r.body {
        Body::Empty => write_all(stream, out).await.map(|_| 0),
        Body::Bytes(b) if b.len() <= INLINE_BODY => {
            out.extend_from_slice(&b);
            write_all(stream, out).await.map(|_| b.len() as u64)
        }
        Body::Bytes(b) => {
            write_all(stream, out).await?;
            // One write may not pass 2 GiB (io_uring refuses it): go in slices.
            for at in (0..b.len()).step_by(BYTES_SLICE) {
                let end = (at + BYTES_SLICE).min(b.len());
                stream.write_all(b.slice(at..end)).await.0?;
            }
            Ok(b.len() as u64)
        }
        Body::File { file, offset, len } if len <= INLINE_BODY as u64 => {
            // A small file costs one read and one write, head included.
            use std::os::unix::fs::FileExt;
            let at = out.len();
            out.resize(at + len as usize, 0);
            let n = file.read_at(&mut out[at..], offset)?;
            if n < len as usize {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while being sent",
                ));
            }
            write_all(stream, out).await.map(|_| len)
        }
        Body::File { file, offset, len } => match stream.plain() {
            Some(tcp) => zero_copy::send(tcp, &out, &file, offset, len).await,
            // Over TLS the bytes must be encrypted here: read, then write.
            None => {
                write_all(stream, out).await?;
                copy_file(stream, &file, offset, len).await
            }
        },
    }
}

/// Bounded by the stream's write deadline (`send_timeout_secs`), like every write.
async fn write_all<S: AsyncWriteRent>(stream: &mut S, buf: Vec<u8>) -> std::io::Result<()> {
    stream.write_all(buf).await.0.map(|_| ())
}

/// `100 Continue`, before reading a body the client holds back.
pub async fn send_continue<S: AsyncWriteRent>(stream: &mut S) -> std::io::Result<()> {
    write_all(stream, b"HTTP/1.1 100 Continue\r\n\r\n".to_vec()).await
}

/// A file through user space, for streams that must see the bytes (TLS).
async fn copy_file<S: AsyncWriteRent>(
    stream: &mut S,
    file: &std::fs::File,
    offset: u64,
    len: u64,
) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    while done < len {
        let want = ((len - done) as usize).min(buf.len());
        buf.resize(want, 0);
        // A local file read: short, and what nginx does without thread pools.
        let n = file.read_at(&mut buf[..want], offset + done)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shrank while being sent",
            ));
        }
        buf.truncate(n);
        let (res, back) = stream.write_all(buf).await;
        buf = back;
        res?;
        done += n as u64;
    }
    Ok(len)
}

mod zero_copy {
    //! The socket is switched to non-blocking for the length of one file response, so that
    //! `send` and `sendfile` return at once, and io_uring's poll waits for room. No other
    //! operation runs on the socket meanwhile: its connection task is here.

    use super::*;
    use nix::errno::Errno;
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use nix::sys::sendfile;
    use nix::sys::socket::{self, MsgFlags};
    use std::os::fd::BorrowedFd;

    struct NonBlocking(i32);

    impl NonBlocking {
        fn set(fd: i32) -> std::io::Result<Self> {
            set_flag(fd, true)?;
            Ok(NonBlocking(fd))
        }
    }

    impl Drop for NonBlocking {
        fn drop(&mut self) {
            let _ = set_flag(self.0, false);
        }
    }

    fn set_flag(fd: i32, on: bool) -> std::io::Result<()> {
        let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
        let new = if on {
            flags | OFlag::O_NONBLOCK
        } else {
            flags - OFlag::O_NONBLOCK
        };
        if new != flags {
            fcntl(fd, FcntlArg::F_SETFL(new))?;
        }
        Ok(())
    }

    /// Waits for room within the socket's write deadline, as its writes do.
    async fn wait_writable(stream: &Timed) -> std::io::Result<()> {
        let wait = stream.tcp().writable(false);
        let Some(at) = stream.limits().write().deadline() else {
            return wait.await;
        };
        match monoio::time::timeout_at(at.into(), wait).await {
            Ok(r) => r,
            Err(_) => Err(timed_out()),
        }
    }

    /// Retries `op` (a non-blocking syscall) until it makes progress.
    async fn progress(
        stream: &Timed,
        mut op: impl FnMut() -> nix::Result<usize>,
    ) -> std::io::Result<usize> {
        loop {
            match op() {
                Ok(n) => return Ok(n),
                Err(Errno::EAGAIN) => wait_writable(stream).await?,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub async fn send(
        stream: &Timed,
        head: &[u8],
        file: &std::fs::File,
        offset: u64,
        len: u64,
    ) -> std::io::Result<u64> {
        let sock = stream.tcp().as_raw_fd();
        let _mode = NonBlocking::set(sock)?;
        // MSG_MORE: the head and the first file bytes leave in one segment (nix has no name
        // for it).
        let more = if len > 0 {
            MsgFlags::from_bits_retain(libc::MSG_MORE)
        } else {
            MsgFlags::empty()
        };
        let mut sent = 0;
        while sent < head.len() {
            let rest = &head[sent..];
            sent += progress(stream, || {
                socket::send(sock, rest, MsgFlags::MSG_NOSIGNAL | more)
            })
            .await?;
        }
        // SAFETY: the descriptor belongs to `stream`, which is borrowed for this whole call.
        let out = unsafe { BorrowedFd::borrow_raw(sock) };
        let mut off = offset as libc::off_t;
        let end = offset + len;
        while (off as u64) < end {
            let want = (end - off as u64).min(1 << 30) as usize;
            let n = progress(stream, || {
                sendfile::sendfile(out, file, Some(&mut off), want)
            })
            .await?;
            if n == 0 {
                // The file shrank under us: end the connection rather than pad or hang.
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while being sent",
                ));
            }
        }
        Ok(len)
    }
}
