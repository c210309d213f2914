//! Request bodies, read as they arrive: the bytes already buffered after the head first, then
//! the socket, one bounded piece at a time. The socket's own deadline bounds each read (the
//! owner sets `client_body_timeout_secs` or the backend read timeout before reading).

use super::chunked::{ChunkError, ChunkedDecoder};
use super::Framing;
use monoio::buf::IoBufMut;
use monoio::io::AsyncReadRent;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Malformed chunked framing: 400.
    Invalid,
    /// Past `max_chunked_body_size`: 413.
    TooLarge,
    /// No byte within the read deadline: 408 from a client.
    Timeout,
    /// The client went away.
    Closed,
}

impl BodyError {
    /// The status to answer with, if the client can still be answered.
    pub fn status(self) -> Option<u16> {
        match self {
            BodyError::Invalid => Some(400),
            BodyError::TooLarge => Some(413),
            BodyError::Timeout => Some(408),
            BodyError::Closed => None,
        }
    }
}

pub struct BodyReader {
    /// Bytes of a Content-Length body still to come.
    remaining: u64,
    chunked: Option<ChunkedDecoder>,
}

/// Largest piece handed out at once.
const PIECE: usize = 64 * 1024;

impl BodyReader {
    pub fn new(framing: Framing, max_chunked: u64) -> Self {
        BodyReader {
            remaining: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunked: (framing == Framing::Chunked).then(|| ChunkedDecoder::new(max_chunked)),
        }
    }

    fn done(&self) -> bool {
        match &self.chunked {
            Some(d) => d.is_done(),
            None => self.remaining == 0,
        }
    }

    /// Puts the next piece of body into `out` (cleared first). `Ok(false)`: the body is
    /// complete and `out` is empty. `buf` holds bytes read past the head; what is left of it
    /// afterwards belongs to the next request.
    pub async fn next<S: AsyncReadRent>(
        &mut self,
        stream: &mut S,
        buf: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<bool, BodyError> {
        out.clear();
        loop {
            if self.done() {
                return Ok(false);
            }
            if !buf.is_empty() {
                self.take(buf, out)?;
                if !out.is_empty() || self.done() {
                    return Ok(!out.is_empty());
                }
                continue;
            }
            if self.chunked.is_none() {
                // Straight into `out`: no copy through `buf`.
                let want = self.remaining.min(PIECE as u64) as usize;
                out.reserve(want);
                let owned = std::mem::take(out).slice_mut(0..want);
                let (n, back) = self.read(stream, owned).await?;
                *out = back.into_inner();
                self.remaining -= n as u64;
                return Ok(true);
            }
            buf.reserve(PIECE);
            let len = buf.len();
            let cap = buf.capacity().min(len + PIECE);
            let owned = std::mem::take(buf).slice_mut(len..cap);
            let (_, back) = self.read(stream, owned).await?;
            *buf = back.into_inner();
        }
    }

    /// Moves body bytes from `buf` to `out`.
    fn take(&mut self, buf: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), BodyError> {
        let used = match &mut self.chunked {
            Some(d) => {
                let limit = buf.len().min(PIECE);
                d.decode(&buf[..limit], out).map_err(|e| match e {
                    ChunkError::Invalid(_) => BodyError::Invalid,
                    ChunkError::TooLarge => BodyError::TooLarge,
                })?
            }
            None => {
                let n = (buf.len() as u64).min(self.remaining) as usize;
                out.extend_from_slice(&buf[..n]);
                self.remaining -= n as u64;
                n
            }
        };
        buf.drain(..used);
        Ok(())
    }

    async fn read<S: AsyncReadRent, T: IoBufMut>(
        &self,
        stream: &mut S,
        into: T,
    ) -> Result<(usize, T), BodyError> {
        match stream.read(into).await {
            (Err(e), _) if crate::worker::timed::is_timeout(&e) => Err(BodyError::Timeout),
            (Ok(0), _) | (Err(_), _) => Err(BodyError::Closed),
            (Ok(n), back) => Ok((n, back)),
        }
    }
}

/// Reads and drops a whole body; returns its decoded size.
pub async fn discard<S: AsyncReadRent>(
    reader: &mut BodyReader,
    stream: &mut S,
    buf: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<u64, BodyError> {
    let mut total = 0;
    while reader.next(stream, buf, scratch).await? {
        total += scratch.len() as u64;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use monoio::io::AsyncWriteRentExt;
    use monoio::net::UnixStream;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// What the reader hands out, piece by piece, and what is left in `buf` for the next
    /// request.
    async fn read_all(
        framing: Framing,
        buffered: &[u8],
        later: &[u8],
    ) -> (Result<Vec<u8>, BodyError>, Vec<u8>) {
        let (mut ours, mut theirs) = UnixStream::pair().expect("socketpair");
        if !later.is_empty() {
            theirs.write_all(later.to_vec()).await.0.expect("write");
        }
        drop(theirs);
        let mut reader = BodyReader::new(framing, 1 << 20);
        let mut buf = buffered.to_vec();
        let mut piece = Vec::new();
        let mut body = Vec::new();
        loop {
            match reader.next(&mut ours, &mut buf, &mut piece).await {
                Ok(true) => body.extend_from_slice(&piece),
                Ok(false) => return (Ok(body), buf),
                Err(e) => return (Err(e), buf),
            }
        }
    }

    #[test]
    fn a_length_body_takes_its_bytes_and_leaves_the_next_request() {
        let (body, left) = run(read_all(Framing::Length(5), b"hel", b"loGET /"));
        assert_eq!(body.unwrap(), b"hello");
        assert!(
            left.is_empty(),
            "the socket's next bytes stay in the socket"
        );
        let (body, left) = run(read_all(Framing::Length(2), b"hiGET /", b""));
        assert_eq!(body.unwrap(), b"hi");
        assert_eq!(left, b"GET /");
    }

    #[test]
    fn a_chunked_body_is_decoded_across_reads() {
        let (body, left) = run(read_all(
            Framing::Chunked,
            b"3\r\nabc\r\n",
            b"2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\nNEXT",
        ));
        assert_eq!(body.unwrap(), b"abcde");
        assert_eq!(left, b"NEXT");
    }

    #[test]
    fn a_body_cut_short_is_an_error_with_no_status() {
        let (body, _) = run(read_all(Framing::Length(10), b"abc", b"de"));
        assert_eq!(body, Err(BodyError::Closed));
        assert_eq!(BodyError::Closed.status(), None);
        let (body, _) = run(read_all(Framing::Chunked, b"zz\r\n", b""));
        assert_eq!(body, Err(BodyError::Invalid));
        assert_eq!(BodyError::Invalid.status(), Some(400));
    }
}
